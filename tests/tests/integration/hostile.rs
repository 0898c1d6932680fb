//! Hostile and broken peers against a real `edgesync-hub` process: handshake floods, peers that
//! never read, oversized hellos and frames, and HTTP clients that never finish a request. In
//! each case a real agent (or a health probe) still gets through.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use edgesync_protocol::frame::{self, Body, Frame, Hello};
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use edgesync_testkit::hostile::{self, HubAnswer};
use edgesync_testkit::sim::{SimConfig, SimHandle};
use tokio::io::AsyncWriteExt;

use crate::support::{self, TD};

/// The client config of a peer with the edge identity `node` minted from `pki`.
fn peer_config(pki: &Pki, tunnel: &str, node: &str) -> anyhow::Result<quinn::ClientConfig> {
    hostile::peer_client(pki, TD, tunnel, node, Duration::from_secs(5))
}

async fn metric(api: &Api, name: &str, label: &str) -> anyhow::Result<f64> {
    let text = api.metrics().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A hub (with `extra` in `[hub]`), a simulator and a real agent (node gw-1) started after
/// `before_agent` ran.
struct Setup {
    tmp: TempDir,
    pki: Pki,
    hub: Proc,
    tunnel: String,
    http: String,
    api: Api,
    sim: SimHandle,
}

async fn setup(extra: &str, wrapper: &[&str]) -> anyhow::Result<Setup> {
    let tmp = TempDir::new("hostile")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1])).await?;
    let (hub, tunnel, http) = harness::start_hub_with(tmp.path(), &pki, extra, wrapper).await?;
    let api = Api::new(&http);
    Ok(Setup {
        tmp,
        pki,
        hub,
        tunnel,
        http,
        api,
        sim,
    })
}

impl Setup {
    async fn start_agent(&self) -> anyhow::Result<Proc> {
        let plc = self.sim.local_addr().to_string();
        let bus = support::Bus::embedded()?;
        support::start_agent(self.tmp.path(), &self.pki, &self.tunnel, &plc, &bus.toml).await
    }

    /// Waits until a new value written to the simulator reaches the hub through the agent.
    async fn agent_delivers(&self, value: u16, within: Duration) -> anyhow::Result<()> {
        self.sim.set_holding(1, support::LEVEL, &[value])?;
        self.api
            .wait_for(within, move |api| async move {
                Ok(api
                    .reported_u64("gw-1", "plc-1", "level")
                    .await?
                    .filter(|v| *v == u64::from(value)))
            })
            .await
            .map(drop)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_keeps_no_state_for_unvalidated_addresses_and_never_keeps_an_agent_out()
-> anyhow::Result<()> {
    let s = setup("max_handshakes = 16\nhandshake_timeout_ms = 2000", &[]).await?;
    let hub_addr: SocketAddr = s.tunnel.parse()?;
    let client = peer_config(&s.pki, &s.tunnel, "flood")?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let idx = |a: HubAnswer| match a {
        HubAnswer::Nothing => 0,
        HubAnswer::Retry => 1,
        HubAnswer::Handshake => 2,
        HubAnswer::Refused => 3,
    };
    // Two floods: from 127.0.0.2, attempts that answer the Retry and then stall (validated
    // addresses holding handshakes); from 127.0.0.3, attempts that never answer (as spoofed
    // source addresses would). About 150 attempts per second each, 40 in flight at most.
    let mut floods = Vec::new();
    let unvalidated: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    for (ip, answer_retry, tally) in [
        (Ipv4Addr::new(127, 0, 0, 2), true, counts.clone()),
        (Ipv4Addr::new(127, 0, 0, 3), false, unvalidated.clone()),
    ] {
        let (stop, client) = (stop.clone(), client.clone());
        floods.push(tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(40));
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (client, tally) = (client.clone(), tally.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Ok(a) = hostile::stalled_handshake(
                        hub_addr,
                        IpAddr::V4(ip),
                        client,
                        answer_retry,
                        Duration::from_millis(1500),
                    )
                    .await
                    {
                        tally[idx(a)].fetch_add(1, Ordering::Relaxed);
                    }
                });
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A real agent (from 127.0.0.1) connects while both floods go on, and keeps delivering.
    let agent = s.start_agent().await?;
    let logs = || {
        format!(
            "--- agent ---\n{}\n--- hub ---\n{}",
            agent.log_text(),
            s.hub.log_text()
        )
    };
    s.agent_delivers(7, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    s.agent_delivers(8, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let get = |t: &[AtomicUsize; 4], a| t[idx(a)].load(Ordering::Relaxed);
    // Unvalidated attempts only ever got a Retry: the hub started no handshake for them.
    assert!(get(&unvalidated, HubAnswer::Retry) > 100, "{unvalidated:?}");
    assert_eq!(
        get(&unvalidated, HubAnswer::Handshake),
        0,
        "{unvalidated:?}"
    );
    // Validated ones from one address: a few handshakes, the rest refused.
    assert!(get(&counts, HubAnswer::Handshake) > 0, "{counts:?}");
    assert!(get(&counts, HubAnswer::Refused) > 50, "{counts:?}");
    assert!(metric(&s.api, "edgesync_hub_quic_retries_total", "").await? > 200.0);
    assert!(
        metric(
            &s.api,
            "edgesync_hub_connections_refused_total",
            "handshakes_per_ip"
        )
        .await?
            > 50.0
    );
    // The hub's memory stayed small.
    let rss = harness::proc_status_mib(s.hub.pid().unwrap_or(0), "VmHWM:")?;
    assert!(rss < 150.0, "hub peak RSS {rss} MiB during the flood");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_from_many_addresses_are_bounded_in_total() -> anyhow::Result<()> {
    let s = setup("max_handshakes = 16\nhandshake_timeout_ms = 3000", &[]).await?;
    let hub_addr: SocketAddr = s.tunnel.parse()?;
    let client = peer_config(&s.pki, &s.tunnel, "flood")?;
    // 6 addresses x 6 stalled handshakes = 36 at once, more than 16.
    let mut tasks = Vec::new();
    for host in 10..16u8 {
        for _ in 0..6 {
            let client = client.clone();
            tasks.push(tokio::spawn(hostile::stalled_handshake(
                hub_addr,
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
                client,
                true,
                Duration::from_millis(1500),
            )));
        }
    }
    let mut handshakes = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await?? {
            HubAnswer::Handshake => handshakes += 1,
            HubAnswer::Refused => refused += 1,
            _ => {}
        }
    }
    assert!(
        handshakes <= 16,
        "{handshakes} handshakes in progress at once"
    );
    assert!(handshakes >= 8, "only {handshakes} handshakes started");
    assert!(refused >= 36 - 16, "{refused} refused");
    assert!(
        metric(
            &s.api,
            "edgesync_hub_connections_refused_total",
            "reason=\"handshakes\""
        )
        .await?
            >= 20.0
    );
    // Once they time out, a real agent gets in.
    let agent = s.start_agent().await?;
    s.agent_delivers(5, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_read_cannot_hold_session_slots() -> anyhow::Result<()> {
    let s = setup("max_nodes = 2\nidle_timeout_ms = 2000", &[]).await?;
    let hub_addr: SocketAddr = s.tunnel.parse()?;
    // Five connections with one node's certificate: they share one slot (each replaces the
    // previous, although the hub's writes to it are blocked).
    let rogue = peer_config(&s.pki, &s.tunnel, "rogue")?;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(hostile::silent_peer(hub_addr, rogue.clone()).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second node fills the hub (max_nodes = 2).
    let rogue2 = peer_config(&s.pki, &s.tunnel, "rogue2")?;
    silent.push(hostile::silent_peer(hub_addr, rogue2).await?);
    // The replaced connections were closed at once.
    for p in &silent[..4] {
        tokio::time::timeout(Duration::from_secs(5), p.conn.closed())
            .await
            .map_err(|_| anyhow::anyhow!("a replaced connection stayed open"))?;
    }
    // The real agent gets in once the silent sessions' writes time out (idle timeout, 2 s).
    let agent = s.start_agent().await?;
    s.agent_delivers(3, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    for p in &silent[4..] {
        tokio::time::timeout(Duration::from_secs(10), p.conn.closed())
            .await
            .map_err(|_| anyhow::anyhow!("a silent peer kept its session"))?;
    }
    assert!(metric(&s.api, "edgesync_hub_session_write_timeouts_total", "").await? >= 2.0);
    assert!(
        s.hub
            .log_text()
            .contains("the node did not read for 2000 ms")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hellos_and_frames_of_tiny_samples_are_refused_before_they_cost_memory()
-> anyhow::Result<()> {
    let s = setup("", &[]).await?;
    let hub_addr: SocketAddr = s.tunnel.parse()?;
    let client = peer_config(&s.pki, &s.tunnel, "rogue")?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let base_rss = harness::proc_status_mib(s.hub.pid().unwrap_or(0), "VmRSS:")?;
    // A hello with a 512 KiB agent version.
    let conn = ep.connect_with(client.clone(), hub_addr, "hub")?.await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let hello = |agent_version: String| Frame {
        body: Some(Body::Hello(Hello {
            versions: frame::SUPPORTED_VERSIONS.to_vec(),
            agent_version,
            boot_id: "b".into(),
            next_seq: 1,
            oldest_seq: 1,
            ..Default::default()
        })),
    };
    send.write_all(&frame::frame_bytes(
        &hello("v".repeat(512 << 10)),
        frame::DEFAULT_MAX_FRAME_LEN,
    )?)
    .await?;
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .map_err(|_| anyhow::anyhow!("the hub kept a connection with an oversized hello"))?;
    let (_, nodes) = s.api.get("/api/v1/nodes").await?;
    assert!(
        nodes.to_string().len() < 10_000,
        "{}",
        nodes.to_string().len()
    );
    // Sixteen 1 MiB frames of empty samples (over 500,000 each), on a proper session.
    for _ in 0..16 {
        let conn = ep.connect_with(client.clone(), hub_addr, "hub")?.await?;
        let (mut send, _recv) = conn.open_bi().await?;
        send.write_all(&frame::frame_bytes(
            &hello("rogue".into()),
            frame::DEFAULT_MAX_FRAME_LEN,
        )?)
        .await?;
        let bytes = hostile::frame_of_empty_samples(1 << 20);
        let _ = send.write_all(&bytes).await;
        tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .map_err(|_| {
                anyhow::anyhow!("the hub kept a connection after a frame of 500,000 samples")
            })?;
    }
    assert!(metric(&s.api, "edgesync_hub_bad_frames_total", "").await? >= 16.0);
    assert!(s.hub.log_text().contains("exceeds the limit of 8192"));
    let peak = harness::proc_status_mib(s.hub.pid().unwrap_or(0), "VmHWM:")?;
    assert!(
        peak < base_rss + 40.0,
        "hub peak RSS {peak} MiB, {base_rss} MiB before the frames"
    );
    // The hub still serves a real agent.
    let agent = s.start_agent().await?;
    s.agent_delivers(9, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_get_through_unfinished_http_requests_under_a_low_file_limit()
-> anyhow::Result<()> {
    let prlimit = support::which("prlimit")?;
    let prlimit = prlimit.display().to_string();
    let s = setup(
        "http_max_connections = 64\nhttp_head_timeout_ms = 60000",
        &[&prlimit, "--nofile=200:200", "--"],
    )
    .await?;
    let http: SocketAddr = s.http.parse()?;
    // 600 connections that send half a request head and stay: three times the hub's file limit.
    let mut open = Vec::new();
    for _ in 0..600 {
        let mut c = tokio::net::TcpStream::connect(http).await?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
        open.push(c);
    }
    // Probes still answer, each time, although the head timeout (60 s) is far away.
    for _ in 0..10 {
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), s.api.get("/healthz"))
            .await
            .map_err(|_| anyhow::anyhow!("/healthz did not answer\n{}", s.hub.log_text()))??;
        assert_eq!(status, 200);
        let mut c = tokio::net::TcpStream::connect(http).await?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await?;
        open.push(c);
    }
    assert!(
        metric(
            &s.api,
            "edgesync_hub_http_connections_closed_total",
            "evicted_without_request"
        )
        .await?
            >= 500.0
    );
    // Said once in the log, not once per connection.
    let log = s.hub.log_text();
    let warnings = log.matches("every connection slot is taken").count();
    assert!((1..=3).contains(&warnings), "{warnings} warnings\n{log}");
    Ok(())
}

/// 200 simulated agents (the testkit's fleet, speaking the protocol) connected to a real hub;
/// the hub restarts; every agent resumes within a bounded time, and none is dropped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_resumes_after_a_hub_restart_without_flapping() -> anyhow::Result<()> {
    use edgesync_testkit::fleet::{Fleet, FleetOptions};
    let tmp = TempDir::new("fleet")?;
    let pki = Pki::new(&tmp.path().join("pki"), TD)?;
    let (hub, tunnel, http) =
        harness::start_hub(tmp.path(), &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let opts = FleetOptions {
        agents: 200,
        ..Default::default()
    };
    let fleet = Fleet::start(&pki, TD, tunnel.parse()?, &opts)?;
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    while fleet.counters.connected.load(Ordering::Relaxed) < opts.agents {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} of {} agents connected within 60 s\n{}",
            fleet.counters.connected.load(Ordering::Relaxed),
            opts.agents,
            hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Restart the hub on the same addresses and store.
    assert!(hub.terminate().await?, "the hub did not stop cleanly");
    let stopped = std::time::Instant::now();
    let (hub, _, _) = harness::start_hub(tmp.path(), &pki, &tunnel, &http).await?;
    let restarted = std::time::Instant::now();
    let all = loop {
        if let Some(t) = fleet.all_established_by(stopped) {
            break t;
        }
        anyhow::ensure!(
            restarted.elapsed() < Duration::from_secs(60),
            "{} of {} agents resumed within 60 s of the restart\n{}",
            fleet.established_since(stopped),
            opts.agents,
            hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let resume = all.saturating_duration_since(restarted);
    // Bounded: the agents' backoff after a ~0.1 s outage is at most a second or two, and
    // 200 handshakes take the hub well under a second of CPU.
    assert!(
        resume < Duration::from_secs(20),
        "all resumed {resume:?} after the restart"
    );
    // No flapping: nobody is dropped again, and all keep their sessions.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        fleet.ended_since(all),
        0,
        "sessions ended again after the resume"
    );
    assert_eq!(
        fleet.counters.connected.load(Ordering::Relaxed),
        opts.agents
    );
    let api = Api::new(&http);
    assert_eq!(
        metric(&api, "edgesync_hub_sessions", "").await?,
        opts.agents as f64
    );
    Ok(())
}

/// Stalled handshakes from many addresses fill the hub's handshake slots; a gateway whose address
/// authenticated before still gets back in (it has a pool of its own), while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_gateway_gets_back_in_during_a_flood_from_many_addresses() -> anyhow::Result<()> {
    let s = setup("max_handshakes = 16\nhandshake_timeout_ms = 3000", &[]).await?;
    let hub_addr: SocketAddr = s.tunnel.parse()?;
    let agent = s.start_agent().await?;
    s.agent_delivers(11, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    // 12 addresses x up to 8 stalled handshakes each: far more than 16 slots, all the time.
    let client = peer_config(&s.pki, &s.tunnel, "flood")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(96));
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                n = (n + 1) % 12;
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 20 + n));
                let client = client.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = hostile::stalled_handshake(
                        hub_addr,
                        ip,
                        client,
                        true,
                        Duration::from_millis(3500),
                    )
                    .await;
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The gateway restarts (kill -9) while the flood holds every general slot.
    agent.kill9().await?;
    let agent = s.start_agent().await?;
    s.agent_delivers(12, Duration::from_secs(15))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    let refused = metric(
        &s.api,
        "edgesync_hub_connections_refused_total",
        "reason=\"handshakes\"",
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    flood.await?;
    assert!(
        refused > 50.0,
        "the flood did not fill the slots ({refused} refused)"
    );
    Ok(())
}

/// A node that sends as fast as the protocol lets it is held to its rate quota (its records
/// wait at its end, none is lost), its history is kept within its disk quota, records past the
/// age limit are pruned (the twin keeps the latest values), and a real agent's values still
/// get through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_node_is_held_to_its_rate_and_disk_quotas_and_old_history_is_pruned()
-> anyhow::Result<()> {
    use edgesync_testkit::fleet::{Fleet, FleetOptions};
    const RATE: u64 = 2_000;
    // A few commits' worth: under load a commit holds up to one second of records (56 kB).
    const QUOTA: u64 = 200_000;
    let s = setup(
        &format!(
            "node_max_records_per_s = {RATE}\nnode_history_max_bytes = {QUOTA}\nhistory_max_age_s = 4"
        ),
        &[],
    )
    .await?;
    let agent = s.start_agent().await?;
    s.agent_delivers(1, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    let first_gw1 = s.api.get("/api/v1/nodes/gw-1").await?.1["uplink_seq"]
        .as_u64()
        .unwrap_or(0);
    let opts = FleetOptions {
        agents: 1,
        record_every: Duration::from_millis(1),
        records_per_tick: 500,
        max_unacked: 20_000,
        prefix: "greedy".into(),
        source_octet: 7,
        ..Default::default()
    };
    let fleet = Fleet::start(&s.pki, TD, s.tunnel.parse()?, &opts)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fleet.counters.acked.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the greedy node got nothing stored\n{}",
            s.hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t0, acked0) = (
        std::time::Instant::now(),
        fleet.counters.acked.load(Ordering::Relaxed),
    );
    // The real agent's changes reach the hub while the greedy node pushes.
    for value in 2..5u16 {
        s.agent_delivers(value, Duration::from_secs(5))
            .await
            .map_err(|e| anyhow::anyhow!("during the flood: {e}\n{}", s.hub.log_text()))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(t0.elapsed())).await;
    let (elapsed, acked1) = (
        t0.elapsed().as_secs_f64(),
        fleet.counters.acked.load(Ordering::Relaxed),
    );
    let stored = acked1 - acked0;
    // At most the rate plus one second's burst (and one part being committed); well above zero.
    let ceiling = (RATE as f64 * (elapsed + 1.0)) as u64 + RATE;
    assert!(
        stored <= ceiling,
        "the greedy node stored {stored} records in {elapsed:.1} s (rate {RATE}/s)"
    );
    assert!(
        stored as f64 >= RATE as f64 * elapsed * 0.5,
        "the greedy node was starved: {stored} records in {elapsed:.1} s"
    );
    assert!(metric(&s.api, "edgesync_hub_rate_limited_total", "").await? > 0.0);
    // Its history stays within the disk quota, oldest records pruned, the rest served in order.
    let status = s
        .api
        .wait_for(Duration::from_secs(5), |api| async move {
            let (_, n) = api.get("/api/v1/nodes/greedy-0").await?;
            Ok((n["history_bytes"].as_u64().unwrap_or(u64::MAX) <= QUOTA).then_some(n))
        })
        .await?;
    let from = status["history_from"].as_u64().unwrap_or(0);
    assert!(from > 1, "{status}");
    let (code, page) = s
        .api
        .get("/api/v1/nodes/greedy-0/records?from=1&limit=3")
        .await?;
    assert_eq!(code, 200);
    let first = page["records"][0]["seq"].as_u64().unwrap_or(0);
    assert!(
        first >= from,
        "first record {first}, history from {from}\n{status}\n{page}"
    );
    assert_eq!(page["records"][1]["seq"].as_u64(), Some(first + 1));
    assert!(metric(&s.api, "edgesync_hub_history_pruned_records_total", "").await? > 0.0);
    // Nothing was lost: the greedy node's records are all acknowledged in order, none as a gap.
    let (_, gaps) = s.api.get("/api/v1/nodes/greedy-0/gaps").await?;
    assert_eq!(gaps["lost_records"], 0);
    drop(fleet);
    // gw-1's first records are older than the 4 s age limit by now: pruned, twin intact.
    let gw1 = s
        .api
        .wait_for(Duration::from_secs(10), |api| async move {
            let (_, n) = api.get("/api/v1/nodes/gw-1").await?;
            Ok((n["history_from"].as_u64().unwrap_or(0) > first_gw1).then_some(n))
        })
        .await
        .map_err(|e| anyhow::anyhow!("gw-1's old records were not pruned: {e}"))?;
    let (_, page) = s.api.get("/api/v1/nodes/gw-1/records").await?;
    let oldest = page["records"][0]["seq"].as_u64().unwrap_or(u64::MAX);
    assert!(oldest > first_gw1, "{gw1}\n{page}");
    assert_eq!(s.api.reported_u64("gw-1", "plc-1", "level").await?, Some(4));
    Ok(())
}

/// A stopping hub tells its agents to come back at a random moment within a spread (a fleet
/// told at once does not return at once), and a full hub tells a refused node when to retry;
/// the real agent follows the hint and is back at once after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_and_full_hubs_give_a_retry_hint_that_the_agent_follows() -> anyhow::Result<()> {
    use edgesync_protocol::close;
    let s = setup("max_nodes = 1", &[]).await?;
    let agent = s.start_agent().await?;
    s.agent_delivers(1, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), s.hub.log_text()))?;
    // Full: another node is refused after its handshake, with a hint.
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = ep
        .connect_with(
            peer_config(&s.pki, &s.tunnel, "gw-2")?,
            s.tunnel.parse()?,
            "hub",
        )?
        .await?;
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close::CLOSE_HUB_FULL.into());
            assert_eq!(
                close::retry_hint(&c.reason),
                Some(edgesync_cloud::server::HUB_FULL_RETRY_WITHIN)
            );
        }
        other => anyhow::bail!("a full hub closed with {other}"),
    }
    // Stopping: the agent hears the hint (one session: the shortest spread) and follows it.
    let Setup {
        tmp,
        pki,
        hub,
        tunnel,
        sim,
        ..
    } = s;
    assert!(hub.terminate().await?, "the hub did not stop cleanly");
    let wait_log = |needle: &'static str| {
        let agent = &agent;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !agent.log_text().contains(needle) {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the agent never logged {needle:?}\n{}",
                    agent.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    };
    wait_log("reconnecting at the moments the hub's hint allows").await?;
    // The log is colored: drop the escape sequences before looking for the field.
    let log = harness::strip_ansi(&agent.log_text());
    assert!(log.contains("within_ms=200"), "{log}");
    let (hub, _, http) = harness::start_hub(tmp.path(), &pki, &tunnel, "127.0.0.1:0").await?;
    let api = Api::new(&http);
    sim.set_holding(1, support::LEVEL, &[2])?;
    api.wait_for(Duration::from_secs(10), |api| async move {
        Ok(api
            .reported_u64("gw-1", "plc-1", "level")
            .await?
            .filter(|v| *v == 2))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", agent.log_text(), hub.log_text()))?;
    Ok(())
}
