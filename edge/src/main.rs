//! `edgesync-agent`: the edge agent binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgesync_edge::agent::Agent;
use edgesync_edge::config;

/// edgesync agent: polls PLCs over Modbus and syncs with the hub over QUIC.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run {
        /// Path of agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and report every problem at once (file and line).
    Validate {
        /// Path of agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Read a register range from a live device once and print it as every type in every
    /// byte order.
    Probe {
        /// `host:port` of the Modbus TCP server.
        #[arg(long)]
        endpoint: String,
        /// Modbus unit id (slave id).
        #[arg(long, default_value_t = 1)]
        unit: u8,
        /// `holding_register` or `input_register`; without it, --address must be a shorthand
        /// such as 40001.
        #[arg(long, value_parser = ["holding_register", "input_register"])]
        table: Option<String>,
        /// With --table: the 0-based offset; without: the 1-based shorthand (40001, 30001).
        #[arg(long)]
        address: String,
        /// Number of registers (1..=125).
        #[arg(long, default_value_t = 8)]
        count: u16,
        /// Timeout of connecting and of the request, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config: path } => match config::load(&path) {
            Ok(cfg) => {
                let tags: usize = cfg.devices.iter().map(|d| d.tags.len()).sum();
                // The rule files too, against these devices, as the agent would load them.
                let rules = match &cfg.rules {
                    None => String::new(),
                    Some(r) => {
                        let specs = cfg
                            .devices
                            .iter()
                            .map(|d| (d.id.clone(), std::sync::Arc::new(d.clone())))
                            .collect();
                        match edgesync_edge::rules::validate_dir(&r.dir, &specs) {
                            Ok(n) => format!(", {n} rules"),
                            Err(errors) => {
                                for e in errors {
                                    eprintln!("{e}");
                                }
                                return ExitCode::FAILURE;
                            }
                        }
                    }
                };
                println!(
                    "{}: ok ({} devices, {} tags{rules})",
                    path.display(),
                    cfg.devices.len(),
                    tags
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{}", config::render_errors(&errors));
                ExitCode::FAILURE
            }
        },
        Command::Probe {
            endpoint,
            unit,
            table,
            address,
            count,
            timeout_ms,
        } => probe(endpoint, unit, table, &address, count, timeout_ms),
        Command::Run { config: path } => {
            edgesync_edge::logging::init();
            let cfg = match config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{}", config::render_errors(&errors));
                    return ExitCode::FAILURE;
                }
            };
            // One thread runs every task: the agent spends a few percent of a core, and fewer
            // threads mean fewer malloc arenas (RSS) on small gateways.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(run(cfg))
        }
    }
}

/// `edgesync-agent probe`: one read, printed in every interpretation; errors exit non-zero.
fn probe(
    endpoint: String,
    unit: u8,
    table: Option<String>,
    address: &str,
    count: u16,
    timeout_ms: u64,
) -> ExitCode {
    use edgesync_edge::model::Table;
    use edgesync_edge::probe::{self, ProbeRequest};

    let table = match table.as_deref() {
        Some("holding_register") => Some(Table::HoldingRegister),
        Some("input_register") => Some(Table::InputRegister),
        _ => None,
    };
    let (table, address) = match probe::resolve_address(table, address) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("edgesync-agent probe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let req = ProbeRequest {
        endpoint,
        unit,
        table,
        address,
        count,
        timeout: std::time::Duration::from_millis(timeout_ms),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(probe::read_registers(&req)) {
        Ok(regs) => {
            println!(
                "{} unit {}: {}",
                req.endpoint,
                req.unit,
                probe::render(req.table, req.address, &regs)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgesync-agent probe: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: config::AgentConfig) -> ExitCode {
    // The metrics/health listener is bound before anything else, so a port in use fails the
    // start at once.
    let endpoint = match cfg.metrics_listen {
        Some(addr) => {
            let handle =
                match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("metrics recorder: {e}");
                        return ExitCode::FAILURE;
                    }
                };
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some((l, handle)),
                Err(e) => {
                    eprintln!("metrics listener {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    let agent = match Agent::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("edgesync-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let endpoint_stop = tokio_util::sync::CancellationToken::new();
    if let Some((listener, handle)) = endpoint {
        tokio::spawn(edgesync_edge::health::serve(
            listener,
            handle,
            agent.health.clone(),
            endpoint_stop.clone(),
        ));
    }
    let restart = agent.restart.clone();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = restart.cancelled() => {
            // The held records are in the spill file: a fresh run of this program reopens the
            // store and imports them (same process id; files and locks are released).
            tracing::warn!("restarting to reopen the outbox store");
            endpoint_stop.cancel();
            let err = reexec();
            tracing::error!(error = %err, "cannot restart; exiting (the held records wait in the spill file)");
            std::process::exit(1);
        }
    }
    tracing::info!("shutting down");
    endpoint_stop.cancel();
    let broken = agent.health.unready().is_some();
    agent.shutdown().await;
    if broken {
        // The store cannot write: closing it would wait forever for a stuck write.
        std::process::exit(0);
    }
    ExitCode::SUCCESS
}

/// Replaces this process with a fresh run of the same program and arguments; returns only on
/// failure.
fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "edgesync-agent".into());
    std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec()
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
