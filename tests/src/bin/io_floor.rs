//! `edgesync-io-floor`: the system calls of the Modbus → MQTT → durable-commit load and
//! nothing else, as a floor under the agent's CPU (`edgesync-bench-modbus --floor`).
//!
//! Every `--period-ms` it does what the agent must do for one poll sweep of an endpoint, in
//! the cheapest way: one Modbus TCP "read holding registers" round trip per unit (one request
//! of up to 125 registers at a time, on one connection, one unit after the other), after each
//! unit one write of `--message-bytes` bytes to a TCP socket (the telemetry message the agent
//! publishes for that unit), and after the sweep one write of `--commit-bytes` bytes into a
//! preallocated file followed by `fdatasync` on the same thread (the durable commit). Nothing
//! is decoded, formatted, compared, kept or sent to a hub: no twin, no rules, no QUIC. So its
//! CPU is a lower bound for any program doing this load, not a model of the agent.
//!
//! Prints `ready` once its connections are up; exits with an error naming the unit when a
//! response is not the one asked for.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest register count of one read (Modbus limit).
const MAX_READ: u16 = 125;
/// Size of the preallocated commit file (writes go round in it).
const FILE_BYTES: u64 = 4 << 20;

#[derive(Parser, Debug)]
#[command(about = "The bare I/O of a Modbus -> MQTT -> commit poll loop (a CPU floor)")]
struct Args {
    /// Modbus TCP endpoint.
    #[arg(long)]
    endpoint: String,
    /// Units 1..=N behind the endpoint.
    #[arg(long)]
    units: u8,
    /// Holding registers read per unit, from address 0.
    #[arg(long)]
    registers: u16,
    /// Sweep period.
    #[arg(long, default_value_t = 100)]
    period_ms: u64,
    /// TCP address that receives one message per unit per sweep (none: no messages).
    #[arg(long)]
    sink: Option<String>,
    /// Bytes of each message.
    #[arg(long, default_value_t = 0)]
    message_bytes: usize,
    /// Bytes written and synced per sweep (0: no commit).
    #[arg(long, default_value_t = 0)]
    commit_bytes: usize,
    /// Directory of the commit file.
    #[arg(long)]
    data_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.units >= 1, "--units must be at least 1");
    ensure!(args.registers >= 1, "--registers must be at least 1");
    ensure!(
        u64::try_from(args.commit_bytes)? <= FILE_BYTES / 2,
        "--commit-bytes must be at most {}",
        FILE_BYTES / 2
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut plc = TcpStream::connect(&args.endpoint)
        .await
        .with_context(|| format!("connect to the Modbus endpoint {}", args.endpoint))?;
    plc.set_nodelay(true)?;
    let mut sink = match &args.sink {
        Some(a) => {
            let s = TcpStream::connect(a)
                .await
                .with_context(|| format!("connect to the sink {a}"))?;
            s.set_nodelay(true)?;
            Some(s)
        }
        None => None,
    };
    std::fs::create_dir_all(&args.data_dir)?;
    let path = args.data_dir.join("commits");
    let file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // Blocks that exist already: a commit's sync writes data, not a longer file.
    file.write_all_at(&vec![0u8; usize::try_from(FILE_BYTES)?], 0)?;
    file.sync_all()?;

    let message = vec![b'x'; args.message_bytes];
    let commit = vec![b'c'; args.commit_bytes];
    let mut offset = 0u64;
    let mut response = vec![0u8; 9 + 2 * usize::from(MAX_READ)];
    let mut tid: u16 = 0;
    println!("ready");
    let mut tick = tokio::time::interval(Duration::from_millis(args.period_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for unit in 1..=args.units {
            let mut start = 0u16;
            while start < args.registers {
                let count = (args.registers - start).min(MAX_READ);
                tid = tid.wrapping_add(1);
                let mut req = [0u8; 12];
                req[0..2].copy_from_slice(&tid.to_be_bytes());
                req[4..6].copy_from_slice(&6u16.to_be_bytes());
                req[6] = unit;
                req[7] = 3;
                req[8..10].copy_from_slice(&start.to_be_bytes());
                req[10..12].copy_from_slice(&count.to_be_bytes());
                plc.write_all(&req)
                    .await
                    .context("write a Modbus request")?;
                let want = 9 + 2 * usize::from(count);
                plc.read_exact(&mut response[..9])
                    .await
                    .with_context(|| format!("read the response header of unit {unit}"))?;
                if response[7] != 3 || response[6] != unit || response[0..2] != tid.to_be_bytes() {
                    bail!(
                        "unit {unit}, registers {start}..: unexpected response header {:02x?}",
                        &response[..9]
                    );
                }
                plc.read_exact(&mut response[9..want])
                    .await
                    .with_context(|| format!("read the registers of unit {unit}"))?;
                start += count;
            }
            if let Some(s) = sink.as_mut() {
                s.write_all(&message).await.context("write to the sink")?;
            }
        }
        if !commit.is_empty() {
            if offset + commit.len() as u64 > FILE_BYTES {
                offset = 0;
            }
            file.write_all_at(&commit, offset)?;
            file.sync_data()?;
            offset += commit.len() as u64;
        }
    }
}
