//! The agent's log output: `RUST_LOG` (default [`DEFAULT_FILTER`]) to standard output.
//!
//! rumqttd opens a span around every packet its router handles, some at the `error` level (so
//! they pass any level filter), with their fields formatted as each span opens. The log never
//! shows them (the agent logs none of rumqttd's events below `warn`), yet at 100 messages per
//! second they took about 4 % of the agent's CPU. Its spans are filtered out before the level
//! filter; its events still reach the log as `RUST_LOG` says.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,rumqttd=warn";

/// Whether a span or event may reach the log at all (then `RUST_LOG` decides): every one but
/// rumqttd's spans.
pub fn admits(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    !(meta.is_span() && (target == "rumqttd" || target.starts_with("rumqttd::")))
}

/// `env` and [`admits`], for a layer of the log.
///
/// The combination keeps `env`'s most verbose level as its hint: without a hint of its own,
/// [`admits`] would make the combined hint "none", hence the process's maximum level `trace`,
/// and every `debug!`/`trace!` of every library (and every record of the `log` crate, which
/// tokio-modbus uses for each request) would be built and filtered one by one instead of
/// skipped by a level check.
pub fn filter<S>(env: EnvFilter) -> impl Filter<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    env.and(filter_fn(admits).with_max_level_hint(LevelFilter::TRACE))
}

/// Installs the log: `RUST_LOG`, or [`DEFAULT_FILTER`] when it is unset or invalid.
pub fn init() {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_filter(filter(env)))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_most_verbose_level_is_the_filters() {
        for (env, want) in [
            (DEFAULT_FILTER, LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("info,edgesync_edge::uplink=debug", LevelFilter::DEBUG),
            ("trace", LevelFilter::TRACE),
        ] {
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::fmt::layer().with_filter(filter(EnvFilter::new(env))));
            assert_eq!(subscriber.max_level_hint(), Some(want), "{env}");
        }
    }

    #[test]
    fn rumqttd_spans_are_off_and_its_warnings_and_our_spans_are_not() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .with_filter(filter(EnvFilter::new("info"))),
        );
        tracing::subscriber::with_default(subscriber, || {
            let theirs =
                tracing::error_span!(target: "rumqttd::router::routing", "publish", topic = "t");
            assert!(theirs.is_disabled(), "a rumqttd span was created");
            let ours = tracing::info_span!(target: "edgesync_edge::uplink", "uplink", node = "n1");
            assert!(!ours.is_disabled(), "our own span was filtered out");
            let _in = ours.enter();
            tracing::warn!(target: "rumqttd::server", "a rumqttd warning");
            tracing::debug!(target: "rumqttd::server", "a rumqttd debug line");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("a rumqttd warning"), "{text}");
        assert!(
            text.contains("uplink{node=\"n1\"}") || text.contains("uplink{node=n1}"),
            "{text}"
        );
        assert!(!text.contains("debug line"), "{text}");
    }
}
