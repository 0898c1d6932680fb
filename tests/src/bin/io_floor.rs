//! `edgesync-io-floor`: the system calls of the Modbus → MQTT → durable-commit → uplink load
//! and nothing else, as a floor under the agent's CPU (`edgesync-bench-modbus --floor`).
//!
//! Every `--period-ms` it does what the agent must do for one poll sweep of an endpoint, in
//! the cheapest way: one Modbus TCP "read holding registers" round trip per unit (one request
//! of up to 125 registers at a time, on one connection, one unit after the other), after each
//! unit one write of `--message-bytes` bytes to a TCP socket (the telemetry message the agent
//! publishes for that unit), and after the sweep one write of `--commit-bytes` bytes into a
//! preallocated file followed by `fdatasync` on the same thread (the durable commit). Nothing
//! is decoded, formatted, compared or kept: no twin, no rules. So its CPU is a lower bound for
//! any program doing this load, not a model of the agent.
//!
//! Two options make the floor cover more of what the agent does, or less of what it must:
//!
//! - `--quic ADDR --quic-cert PEM --uplink-bytes N`: after the commit, `N` bytes are written
//!   on one QUIC stream (quinn and rustls with ring, as the agent's tunnel; the server
//!   certificate is trusted from `PEM`) and an 8-byte acknowledgement is read back before the
//!   next sweep (the agent's uplink frame and the hub's durable ack).
//! - `--pipeline`: every request of the sweep is written at once and the answers are read
//!   afterwards (Modbus TCP allows several transactions in flight; the agent sends one at a
//!   time), and the messages follow the last answer.
//!
//! Prints `ready` once its connections are up; exits with an error naming the unit when a
//! response is not the one asked for.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
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
    /// Write every request of a sweep at once, then read the answers.
    #[arg(long)]
    pipeline: bool,
    /// QUIC server that receives `--uplink-bytes` per sweep and acknowledges them.
    #[arg(long, requires_all = ["quic_cert", "uplink_bytes"])]
    quic: Option<SocketAddr>,
    /// PEM certificate of the QUIC server (trusted as its only root; name `localhost`).
    #[arg(long)]
    quic_cert: Option<PathBuf>,
    /// Bytes sent over QUIC per sweep.
    #[arg(long)]
    uplink_bytes: Option<usize>,
}

/// Bytes of the acknowledgement the QUIC server returns per sweep.
const ACK_BYTES: usize = 8;

/// One stream to the QUIC server (the connection and endpoint are kept alive with it).
struct Uplink {
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn connect_uplink(addr: SocketAddr, cert: &std::path::Path) -> anyhow::Result<Uplink> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let cert = CertificateDer::from_pem_file(cert)
        .with_context(|| format!("read the QUIC server certificate {}", cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(addr, "localhost")?
        .await
        .with_context(|| format!("QUIC handshake with {addr}"))?;
    let (send, recv) = conn.open_bi().await?;
    Ok(Uplink {
        _endpoint: endpoint,
        _conn: conn,
        send,
        recv,
    })
}

/// A Modbus TCP "read holding registers" request.
fn read_request(tid: u16, unit: u8, start: u16, count: u16) -> [u8; 12] {
    let mut req = [0u8; 12];
    req[0..2].copy_from_slice(&tid.to_be_bytes());
    req[4..6].copy_from_slice(&6u16.to_be_bytes());
    req[6] = unit;
    req[7] = 3;
    req[8..10].copy_from_slice(&start.to_be_bytes());
    req[10..12].copy_from_slice(&count.to_be_bytes());
    req
}

/// Reads the answer to `(tid, unit, start, count)` into `buf`.
async fn read_answer(
    plc: &mut TcpStream,
    buf: &mut [u8],
    (tid, unit, start, count): (u16, u8, u16, u16),
) -> anyhow::Result<()> {
    plc.read_exact(&mut buf[..9])
        .await
        .with_context(|| format!("read the response header of unit {unit}"))?;
    if buf[7] != 3 || buf[6] != unit || buf[0..2] != tid.to_be_bytes() {
        bail!(
            "unit {unit}, registers {start}..: unexpected response header {:02x?}",
            &buf[..9]
        );
    }
    let want = 9 + 2 * usize::from(count);
    plc.read_exact(&mut buf[9..want])
        .await
        .with_context(|| format!("read the registers of unit {unit}"))?;
    Ok(())
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
    let mut uplink = match (args.quic, &args.quic_cert) {
        (Some(addr), Some(cert)) => Some(connect_uplink(addr, cert).await?),
        _ => None,
    };
    let uplink_bytes = vec![b'u'; args.uplink_bytes.unwrap_or(0)];
    let mut ack = [0u8; ACK_BYTES];
    // Every request of a sweep: (tid, unit, start, count); a unit's last one says so.
    let mut sweep: Vec<((u16, u8, u16, u16), bool)> = Vec::new();
    let mut requests: Vec<u8> = Vec::new();
    println!("ready");
    let mut tick = tokio::time::interval(Duration::from_millis(args.period_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sweep.clear();
        for unit in 1..=args.units {
            let mut start = 0u16;
            while start < args.registers {
                let count = (args.registers - start).min(MAX_READ);
                tid = tid.wrapping_add(1);
                start += count;
                sweep.push(((tid, unit, start - count, count), start >= args.registers));
            }
        }
        if args.pipeline {
            requests.clear();
            for &((tid, unit, start, count), _) in &sweep {
                requests.extend_from_slice(&read_request(tid, unit, start, count));
            }
            plc.write_all(&requests)
                .await
                .context("write the Modbus requests")?;
            for &(req, _) in &sweep {
                read_answer(&mut plc, &mut response, req).await?;
            }
            if let Some(s) = sink.as_mut() {
                for _ in 1..=args.units {
                    s.write_all(&message).await.context("write to the sink")?;
                }
            }
        } else {
            for &((tid, unit, start, count), last) in &sweep {
                plc.write_all(&read_request(tid, unit, start, count))
                    .await
                    .context("write a Modbus request")?;
                read_answer(&mut plc, &mut response, (tid, unit, start, count)).await?;
                if let (true, Some(s)) = (last, sink.as_mut()) {
                    s.write_all(&message).await.context("write to the sink")?;
                }
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
        if let Some(u) = uplink.as_mut() {
            u.send
                .write_all(&uplink_bytes)
                .await
                .context("send on the QUIC stream")?;
            u.recv
                .read_exact(&mut ack)
                .await
                .context("read the QUIC acknowledgement")?;
        }
    }
}
