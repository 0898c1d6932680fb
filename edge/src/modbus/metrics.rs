//! Telemetry of the Modbus links: metrics (with low-cardinality labels `link` and `unit`) and
//! rate-limited logs.
//!
//! Metric handles are registered when a link is spawned, with the recorder installed at that
//! moment (the global one, or a local one in tests): install the recorder first.
//!
//! Logs are rate-limited by state: a tag's problem is logged when its quality changes (good to
//! bad, one reason to another, bad to good), summarised per unit and cycle, so a PLC that stays
//! dead logs once, not every cycle. Link loss and recovery are logged once per episode by the
//! link itself.

use std::time::Duration;

use edgesync_protocol::{BadReason, Quality};
use metrics::{Counter, Histogram};

/// Counter of Modbus requests sent, labels `link`, `unit`.
pub const REQUESTS_TOTAL: &str = "edgesync_modbus_requests_total";
/// Counter of failed requests, labels `link`, `unit`, `kind` (see [`ErrorKind`]).
pub const ERRORS_TOTAL: &str = "edgesync_modbus_errors_total";
/// Histogram of request round-trip times in seconds (answered requests only), labels `link`,
/// `unit`.
pub const RESPONSE_SECONDS: &str = "edgesync_modbus_response_seconds";
/// Histogram of the duration of one poll cycle of a unit in seconds, labels `link`, `unit`.
pub const CYCLE_SECONDS: &str = "edgesync_modbus_cycle_seconds";

/// Describes the Modbus metrics to the installed recorder (help texts and units).
pub fn describe() {
    metrics::describe_counter!(REQUESTS_TOTAL, "Modbus requests sent");
    metrics::describe_counter!(
        ERRORS_TOTAL,
        "Modbus requests that failed, by kind (timeout, exception, transport, decode, bad_response)"
    );
    metrics::describe_histogram!(
        RESPONSE_SECONDS,
        metrics::Unit::Seconds,
        "Round-trip time of answered Modbus requests"
    );
    metrics::describe_histogram!(
        CYCLE_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one poll cycle of a Modbus unit"
    );
}

/// The kind of a Modbus failure, the `kind` label of [`ERRORS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No answer within the request timeout.
    Timeout,
    /// An exception response.
    Exception,
    /// The connection failed (connect error, reset, end of stream).
    Transport,
    /// Registers that did not decode into the tag's type (counted per tag).
    Decode,
    /// A malformed or mismatched response.
    BadResponse,
}

impl ErrorKind {
    const ALL: [ErrorKind; 5] = [
        ErrorKind::Timeout,
        ErrorKind::Exception,
        ErrorKind::Transport,
        ErrorKind::Decode,
        ErrorKind::BadResponse,
    ];

    /// The label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Exception => "exception",
            ErrorKind::Transport => "transport",
            ErrorKind::Decode => "decode",
            ErrorKind::BadResponse => "bad_response",
        }
    }

    fn slot(self) -> usize {
        match self {
            ErrorKind::Timeout => 0,
            ErrorKind::Exception => 1,
            ErrorKind::Transport => 2,
            ErrorKind::Decode => 3,
            ErrorKind::BadResponse => 4,
        }
    }
}

/// Metric handles of one unit (or of the link itself, with `unit = "-"`).
#[derive(Debug, Clone)]
pub(crate) struct UnitMetrics {
    requests: Counter,
    errors: [Counter; 5],
    response: Histogram,
    cycle: Histogram,
}

impl UnitMetrics {
    /// Registers the handles with the current recorder.
    pub(crate) fn new(link: &str, unit: &str) -> Self {
        let labels = [("link", link.to_owned()), ("unit", unit.to_owned())];
        let errors = ErrorKind::ALL.map(|kind| {
            metrics::counter!(
                ERRORS_TOTAL,
                "link" => link.to_owned(),
                "unit" => unit.to_owned(),
                "kind" => kind.as_str()
            )
        });
        UnitMetrics {
            requests: metrics::counter!(REQUESTS_TOTAL, &labels),
            errors,
            response: metrics::histogram!(RESPONSE_SECONDS, &labels),
            cycle: metrics::histogram!(CYCLE_SECONDS, &labels),
        }
    }

    /// A request was sent.
    pub(crate) fn request(&self) {
        self.requests.increment(1);
    }

    /// A request (or, for [`ErrorKind::Decode`], a tag) failed.
    pub(crate) fn error(&self, kind: ErrorKind) {
        self.errors[kind.slot()].increment(1);
    }

    /// A request was answered after `d`.
    pub(crate) fn response(&self, d: Duration) {
        self.response.record(d.as_secs_f64());
    }

    /// A poll cycle took `d`.
    pub(crate) fn cycle(&self, d: Duration) {
        self.cycle.record(d.as_secs_f64());
    }
}

/// Most property names listed in one log line.
const LOGGED_NAMES: usize = 8;

/// Per-unit memory of each tag's last quality, to log only changes.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// By tag index.
    last: Vec<Option<Quality>>,
}

impl Health {
    /// Records the qualities of one reading (`(tag index, property, quality)`) and logs tags
    /// that went bad (grouped by reason) or recovered since their previous reading. Tags going
    /// bad because the link is down are not logged here: the link logs that once.
    pub(crate) fn observe<'a>(
        &mut self,
        link: &str,
        device: &str,
        unit: u8,
        samples: impl Iterator<Item = (usize, &'a str, Quality)>,
    ) {
        let mut went_bad: Vec<(BadReason, Vec<&str>)> = Vec::new();
        let mut recovered: Vec<&str> = Vec::new();
        for (tag, property, quality) in samples {
            if self.last.len() <= tag {
                self.last.resize(tag + 1, None);
            }
            let previous = self.last[tag].replace(quality);
            if previous == Some(quality) {
                continue;
            }
            match quality {
                Quality::Good => {
                    if previous.is_some() {
                        recovered.push(property);
                    }
                }
                Quality::Bad(BadReason::Disconnected) => {}
                Quality::Bad(reason) => match went_bad.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, list)) => list.push(property),
                    None => went_bad.push((reason, vec![property])),
                },
            }
        }
        for (reason, properties) in went_bad {
            tracing::warn!(
                link,
                device,
                unit,
                %reason,
                count = properties.len(),
                properties = %names(&properties),
                "modbus tags went bad"
            );
        }
        if !recovered.is_empty() {
            tracing::info!(
                link,
                device,
                unit,
                count = recovered.len(),
                properties = %names(&recovered),
                "modbus tags are good again"
            );
        }
    }
}

/// The first few names, comma separated, with "…" when some were left out.
fn names(list: &[&str]) -> String {
    let mut s = list
        .iter()
        .take(LOGGED_NAMES)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    if list.len() > LOGGED_NAMES {
        s.push_str(",…");
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_truncated() {
        assert_eq!(names(&["a", "b"]), "a,b");
        let many: Vec<&str> = std::iter::repeat_n("x", 10).collect();
        assert_eq!(names(&many), "x,x,x,x,x,x,x,x,…");
    }

    #[test]
    fn health_remembers_last_quality() {
        let mut h = Health::default();
        let bad = Quality::Bad(BadReason::Timeout);
        h.observe(
            "l",
            "d",
            1,
            [(0, "a", bad), (1, "b", Quality::Good)].into_iter(),
        );
        assert_eq!(h.last.first().copied().flatten(), Some(bad));
        h.observe("l", "d", 1, [(0, "a", Quality::Good)].into_iter());
        assert_eq!(h.last.first().copied().flatten(), Some(Quality::Good));
        assert_eq!(h.last.get(1).copied().flatten(), Some(Quality::Good));
    }
}
