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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config: path } => match config::load(&path) {
            Ok(cfg) => {
                let tags: usize = cfg.devices.iter().map(|d| d.tags.len()).sum();
                println!("{}: ok ({} devices, {} tags)", path.display(), cfg.devices.len(), tags);
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{}", config::render_errors(&errors));
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let cfg = match config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{}", config::render_errors(&errors));
                    return ExitCode::FAILURE;
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
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

async fn run(cfg: config::AgentConfig) -> ExitCode {
    if let Some(addr) = cfg.metrics_listen
        && let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
    {
        eprintln!("metrics listener {addr}: {e}");
        return ExitCode::FAILURE;
    }
    let agent = match Agent::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("edgesync-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    ExitCode::SUCCESS
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
