//! `edgesync-plc-sim`: the test kit's Modbus TCP PLC simulator as a standalone process.
//!
//! Serves unit ids `1..=--units`, each with `--registers` items per bank. Every unit's
//! holding registers `0..--counters` count up by one per `--tick-ms`, and a float32 (ABCD)
//! sine occupies holding registers `--sine-at` and `--sine-at + 1`.
//!
//! Once bound it prints exactly one line, `listening on <addr>`, to stdout, so a harness
//! started with `--listen 127.0.0.1:0` can learn the real port. Logs go to stderr
//! (`RUST_LOG`). It serves until SIGINT or SIGTERM.

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    time::Duration,
};

use anyhow::{Context, ensure};
use clap::Parser;
use edgesync_testkit::sim::{BankSizes, Script, SimConfig, SimHandle, Table};

/// Modbus TCP PLC simulator with counting and sine registers.
#[derive(Debug, Parser)]
#[command(name = "edgesync-plc-sim", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (see the `listening on` line).
    #[arg(long, default_value = "127.0.0.1:5020")]
    listen: SocketAddr,

    /// Number of units to simulate, with unit ids 1..=N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=247))]
    units: u8,

    /// Items per bank (coils, discrete inputs, input registers, holding registers).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    registers: u32,

    /// Holding registers 0..K of every unit count up by one per tick.
    #[arg(long, default_value_t = 10)]
    counters: u16,

    /// Script tick in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    tick_ms: u64,

    /// First of the two holding registers holding a float32 (ABCD) sine on every unit.
    #[arg(long, default_value_t = 100)]
    sine_at: u16,

    /// Do not run the sine script.
    #[arg(long)]
    no_sine: bool,

    /// Peak deviation of the sine.
    #[arg(long, default_value_t = 100.0)]
    sine_amplitude: f64,

    /// Centre value of the sine.
    #[arg(long, default_value_t = 0.0)]
    sine_offset: f64,

    /// Period of the sine in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    sine_period_ms: u64,
}

impl Args {
    /// Check that the scripts fit in the banks and do not overlap.
    fn validate(&self) -> anyhow::Result<()> {
        let registers = u64::from(self.registers);
        ensure!(
            u64::from(self.counters) <= registers,
            "--counters {} exceeds --registers {}",
            self.counters,
            self.registers
        );
        if !self.no_sine {
            ensure!(
                u64::from(self.sine_at) + 2 <= registers,
                "--sine-at {} needs two registers but --registers is {}",
                self.sine_at,
                self.registers
            );
            ensure!(
                self.sine_at >= self.counters,
                "--sine-at {} overlaps the counters 0..{}; use --sine-at {} or more",
                self.sine_at,
                self.counters,
                self.counters
            );
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let args = Args::parse();
    args.validate()?;

    // Validated to lie in 1..=65536, so the conversion cannot fail on any supported target.
    let bank = usize::try_from(args.registers).context("--registers does not fit in memory")?;
    let config = SimConfig::with_units(1..=args.units).sizes(BankSizes::uniform(bank));
    let sim = SimHandle::start(args.listen, config)
        .await
        .with_context(|| format!("bind {}", args.listen))?;

    let tick = Duration::from_millis(args.tick_ms);
    for unit in 1..=args.units {
        for addr in 0..args.counters {
            sim.add_script(
                unit,
                Table::HoldingRegisters,
                addr,
                Script::Counter { step: 1 },
                tick,
            )?;
        }
        if !args.no_sine {
            sim.add_script(
                unit,
                Table::HoldingRegisters,
                args.sine_at,
                Script::sine_f32(
                    args.sine_amplitude,
                    args.sine_offset,
                    Duration::from_millis(args.sine_period_ms),
                ),
                tick,
            )?;
        }
    }

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", sim.local_addr()).context("write to stdout")?;
    stdout.flush().context("flush stdout")?;
    drop(stdout);
    tracing::info!(
        addr = %sim.local_addr(),
        units = args.units,
        registers = args.registers,
        counters = args.counters,
        "plc sim serving"
    );

    wait_for_signal().await?;
    tracing::info!("plc sim stopping");
    sim.shutdown();
    Ok(())
}

/// Wait for SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
        tokio::select! {
            // Ctrl-C / SIGINT.
            res = tokio::signal::ctrl_c() => res.context("wait for SIGINT")?,
            // SIGTERM, as sent by a harness or a service manager.
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("edgesync-plc-sim").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_valid() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:5020".parse().unwrap());
        assert_eq!((args.units, args.registers, args.counters), (1, 1000, 10));
        assert_eq!((args.tick_ms, args.sine_at), (100, 100));
        args.validate().unwrap();
    }

    #[test]
    fn rejects_out_of_range_options() {
        assert!(parse(&["--units", "0"]).is_err());
        assert!(parse(&["--units", "248"]).is_err());
        assert!(parse(&["--registers", "0"]).is_err());
        assert!(parse(&["--registers", "65537"]).is_err());
        assert!(parse(&["--tick-ms", "0"]).is_err());
        assert!(parse(&["--listen", "localhost"]).is_err());
    }

    #[test]
    fn rejects_scripts_that_do_not_fit() {
        let too_many = parse(&["--registers", "5", "--counters", "6", "--no-sine"]).unwrap();
        assert!(too_many.validate().is_err());
        let sine_past_end = parse(&["--registers", "101", "--sine-at", "100"]).unwrap();
        assert!(sine_past_end.validate().is_err());
        let overlap = parse(&["--counters", "101", "--sine-at", "100"]).unwrap();
        assert!(overlap.validate().is_err());
        let fits = parse(&[
            "--registers",
            "102",
            "--counters",
            "100",
            "--sine-at",
            "100",
        ])
        .unwrap();
        fits.validate().unwrap();
    }
}
