//! `edgesync-hub`: the hub binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgesync_cloud::api::{ApiAccess, ApiToken, Role, Trigger};
use edgesync_cloud::config::{self, HubConfig};
use edgesync_cloud::hub::{Hub, HubOptions};

/// edgesync hub: accepts edge tunnels, stores twins and telemetry, serves the HTTP API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub.
    Run {
        /// Path of hub.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and report every problem at once (file and line).
    Validate {
        /// Path of hub.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create a throwaway trust-domain CA and SVIDs for the hub and some nodes, as PEM files,
    /// for trying edgesync without SPIRE. NOT FOR PRODUCTION: the keys are written in the
    /// clear, nothing rotates the SVIDs, nobody attests who gets one.
    DevCa {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The trust domain, e.g. example.org.
        #[arg(long, default_value = "example.org")]
        trust_domain: String,
        /// A node to issue an SVID for (`spiffe://<trust_domain>/edge/<node>`); repeat for more.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// How long the SVIDs are valid, in hours.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=87_600))]
        valid_hours: u64,
    },
}

fn options(cfg: &HubConfig) -> HubOptions {
    HubOptions {
        listen: cfg.listen,
        http_listen: cfg.http_listen,
        data_dir: cfg.data_dir.clone(),
        sled_cache_bytes: cfg.sled_cache_bytes,
        trust_domain: cfg.identity.trust_domain.clone(),
        hub_id: cfg.identity.hub_id.clone(),
        identity: cfg.identity.source.clone(),
        node_path_prefix: cfg.identity.node_path_prefix.clone(),
        tokens: cfg
            .tokens
            .iter()
            .map(|t| ApiToken {
                name: t.name.clone(),
                token: t.token.clone(),
                role: match t.role {
                    config::Role::Admin => Role::Admin,
                    config::Role::ReadOnly => Role::ReadOnly,
                },
            })
            .collect(),
        idle_timeout: cfg.idle_timeout,
        max_connections: cfg.max_nodes.map_or(10_000, |n| n as usize),
        http_limits: cfg.http_limits,
        max_handshakes: cfg.max_handshakes,
        handshake_timeout: cfg.handshake_timeout,
        node_max_records_per_s: cfg.node_max_records_per_s,
        retention: cfg.retention,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config: path } => match config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::DevCa {
            dir,
            trust_domain,
            nodes,
            valid_hours,
        } => match edgesync_cloud::devca::write_dev_pki(
            &dir,
            &trust_domain,
            &nodes,
            std::time::Duration::from_secs(valid_hours * 3600),
        ) {
            Ok(written) => {
                eprintln!(
                    "NOT FOR PRODUCTION: a throwaway CA for {trust_domain}; its SVIDs expire in {valid_hours} h and nothing rotates them"
                );
                for p in written {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dev-ca: {e:#}");
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
                    eprint!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                // Before anything else: SIGHUP's default action would end the process.
                let hangups = hangup_signals();
                let opts = options(&cfg);
                let access = match ApiAccess::new(
                    opts.tokens.clone(),
                    cfg.token_files.clone(),
                    cfg.api_tls.clone(),
                ) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("edgesync-hub: {}: [api] {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                };
                let https = access.tls_config().is_some();
                let hub = match Hub::start_with_access(opts, access.clone()).await {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("edgesync-hub: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Some(hangups) = hangups {
                    tokio::spawn(reload_on_hangup(hangups, access));
                }
                tracing::info!(
                    https,
                    "API listening; SIGHUP reloads the token files and TLS files (also checked every second)"
                );
                // One machine-readable line, for scripts and tests that asked for port 0.
                println!(
                    "edgesync-hub listening tunnel={} http={}",
                    hub.tunnel_addr, hub.http_addr
                );
                wait_for_signal().await;
                tracing::info!("shutting down");
                hub.shutdown().await;
                ExitCode::SUCCESS
            })
        }
    }
}

/// SIGHUP, if it can be caught (else it is logged, and SIGHUP keeps its default action).
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot catch SIGHUP; the token and TLS files are still checked every second");
            None
        }
    }
}

/// Reloads the API's token and TLS files on every SIGHUP.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    access: std::sync::Arc<ApiAccess>,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the API's token and TLS files");
        match access.reload_async(Trigger::Signal).await {
            Some(done) => tracing::info!(
                tokens_reloaded = done.tokens,
                tls_reloaded = done.tls,
                errors = done.errors,
                "SIGHUP reload done"
            ),
            None => return,
        }
    }
}

async fn wait_for_signal() {
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
