//! `edgesync-demo`: a simulated PLC, a hub and an agent on loopback with a throwaway trust
//! domain, printing live values as the hub's API sees them, until Ctrl-C.
//!
//! Everything runs in this one process (the agent and the hub are the same library code the
//! binaries run); the tunnel between them is real QUIC with mutual SPIFFE TLS over loopback.

use std::time::Duration;

use anyhow::Context;
use edgesync_edge::agent::Agent;
use edgesync_testkit::harness::{self, Api, Pki, TOKEN, TempDir};
use edgesync_testkit::sim::{Script, SimConfig, SimHandle, Table};

const TD: &str = "demo.edgesync.local";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let tmp = TempDir::new("demo")?;
    let dir = tmp.path();
    let pki = Pki::new(&dir.join("pki"), TD)?;
    let (agent_cert, agent_key) = pki.svid(&format!("spiffe://{TD}/edge/line-1"), "agent")?;

    // A PLC with two units: counters, a ramp and a temperature sine.
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1, 2])).await?;
    for unit in [1u8, 2] {
        sim.add_script(
            unit,
            Table::HoldingRegisters,
            0,
            Script::Counter { step: 1 },
            Duration::from_millis(250),
        )?;
        sim.add_script(
            unit,
            Table::HoldingRegisters,
            10,
            Script::sine_f32(5.0, 20.0 + f64::from(unit), Duration::from_secs(20)),
            Duration::from_millis(100),
        )?;
    }

    let hub = harness::embedded_hub(&pki, dir).await?;

    let mut toml = format!(
        "[agent]\ndata_dir = {:?}\n\n[hub]\naddress = \"{}\"\n\n[identity]\ntrust_domain = {TD:?}\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\n[outbox]\ncommit_interval_ms = 20\n\n[mqtt]\nlisten = \"127.0.0.1:0\"\n",
        dir.join("agent").display().to_string(),
        hub.tunnel_addr,
        agent_cert.display().to_string(),
        agent_key.display().to_string(),
        pki.bundle.display().to_string(),
    );
    for unit in [1u8, 2] {
        toml.push_str(&format!(
            "\n[[devices]]\nid = \"press-{unit}\"\nprotocol = \"tcp\"\nendpoint = \"{}\"\nunit_id = {unit}\npoll_interval_ms = 100\n\
             \n[[devices.tags]]\nname = \"cycles\"\naddress = \"40001\"\ntype = \"uint16\"\n\
             \n[[devices.tags]]\nname = \"temperature\"\naddress = \"40011\"\ntype = \"float32\"\nbyte_order = \"ABCD\"\nunit = \"degC\"\ndeadband = 0.05\n",
            sim.local_addr()
        ));
    }
    let cfg_path = dir.join("agent.toml");
    std::fs::write(&cfg_path, toml)?;
    let cfg = edgesync_edge::config::load(&cfg_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let agent = Agent::start(cfg).await.context("agent")?;

    println!("edgesync demo");
    println!("  PLC simulator  modbus://{}", sim.local_addr());
    println!(
        "  hub tunnel     quic://{} (mTLS, spiffe://{TD}/hub)",
        hub.tunnel_addr
    );
    println!(
        "  hub API        http://{}  (Authorization: Bearer {TOKEN})",
        hub.http_addr
    );
    println!("  agent          spiffe://{TD}/edge/{}", agent.node);
    if let Some(addr) = agent.mqtt_addr {
        println!(
            "  local MQTT     mqtt://{addr}  (watch it with mosquitto-clients: mosquitto_sub -h {} -p {} -t 'edgesync/#' -v)",
            addr.ip(),
            addr.port()
        );
    }
    println!("live values as the hub sees them (Ctrl-C to stop):\n");
    let api = Api::new(&hub.http_addr.to_string());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let mut line = String::new();
                for unit in [1u8, 2] {
                    let (status, twin) = api.get(&format!("/api/v1/nodes/line-1/devices/press-{unit}/twin")).await?;
                    if status != 200 {
                        line.push_str(&format!("press-{unit}: (waiting)  "));
                        continue;
                    }
                    let r = &twin["reported"];
                    let temp = r["temperature"]["value"].as_f64().map(|t| format!("{t:6.2}")).unwrap_or_else(|| "  -   ".into());
                    line.push_str(&format!(
                        "press-{unit}: cycles={:<6} temperature={temp} degC [{}]   ",
                        r["cycles"]["value"], r["temperature"]["quality"].as_str().unwrap_or("-"),
                    ));
                }
                let up = if agent.status.borrow().connected { "up" } else { "down" };
                println!("{line}tunnel={up} acked={}", agent.status.borrow().acked);
            }
        }
    }
    println!("\nstopping");
    agent.shutdown().await;
    hub.shutdown().await;
    sim.shutdown();
    Ok(())
}
