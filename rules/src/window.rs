//! Window assignment: which rows a `GROUP BY <window>` clause hands to the aggregates, and when.
//!
//! Pure: time comes in as milliseconds since the Unix epoch (`ts_ms` of a row, `now_ms` of a
//! timeout), never from a clock. The caller asks [`Windows::poll_timeout`] when to call
//! [`Windows::handle_timeout`] next.
//!
//! # Semantics
//!
//! The eKuiper references below are to `lf-edge/ekuiper` (`docs/en_US/sqls/windows.md`,
//! `internal/topo/node/window_op.go`, `window_v2_op.go`, `event_window_trigger.go`,
//! `internal/xsql/parser.go`).
//!
//! * **Time units** (`dd`, `hh`, `mi`, `ss`, `ms`, any case): a day is 86 400 000 ms, an hour
//!   3 600 000 ms, and so on ([`unit_ms`]), as eKuiper's planner converts them
//!   (`convertFromDuration`).
//! * **Alignment.** eKuiper aligns time windows "to the nature time": a 10 s window always
//!   ends at a multiple of 10 s, whenever the rule started (`windows.md`, "Time-units";
//!   `getAlignedWindowEndTime`). Here every tumbling window, and every hopping window's end,
//!   is a multiple of the size (tumbling) or of the hop (hopping) since the Unix epoch.
//!   Differences from eKuiper: eKuiper aligns within the enclosing clock unit (the second,
//!   minute, hour or day) in the local time zone (a day window ends at local midnight),
//!   while this engine has no time zone and aligns to multiples since the epoch, in UTC. The
//!   two agree when the size divides the enclosing unit (10 s, 15 mi, 6 hh) and, for `hh`
//!   and `dd`, the zone's UTC offset is a multiple of the size. And eKuiper's first window
//!   starts at the rule's start (or first event) rather than at the aligned start, a
//!   start-up artefact not reproduced.
//! * **Bounds.** Tumbling and hopping windows are half-open, `[start, end)`: a row whose
//!   timestamp equals `end` belongs to the next window (eKuiper `handleInputs`: for time
//!   windows a row must be strictly before the window end). A window closes, and is handed
//!   out, when time reaches its end: `now >= end`.
//! * **Tumbling** `TUMBLINGWINDOW(unit, n)`: windows `[k·size, (k+1)·size)`, each row in
//!   exactly one.
//! * **Hopping** `HOPPINGWINDOW(unit, size, hop)`: a window ends at every multiple of `hop`
//!   and covers `[end - size, end)`; windows overlap when `hop < size`, so a row belongs to
//!   `size / hop` windows when `size` is a multiple of `hop` (eKuiper: "events can belong to
//!   more than one Hopping window result set"). With `hop > size` the windows leave gaps; a
//!   row in a gap belongs to no window and is discarded (not counted as late), as eKuiper's
//!   scan discards it. Rows are stored once and shared by the windows that overlap them.
//! * **Sliding** `SLIDINGWINDOW(unit, size)`: each row fires a window covering
//!   `(ts - size, ts]`, start excluded, end included, holding every row received in that
//!   range, itself included (eKuiper's v2 window operator: "scan left-open, right-closed
//!   window", `window_v2_op.go`). eKuiper's default (v1) operator also keeps a row exactly
//!   `size` old, `[ts - size, ts]`; this engine follows v2 so that a sliding window spans
//!   exactly `size` ms like the others. Sliding windows fire in [`Windows::handle_row`]
//!   only; they need no timer. The delayed form `SLIDINGWINDOW(unit, size, delay)` is not
//!   supported here.
//! * **Count** `COUNTWINDOW(count[, hop])`: without `hop`, every `count` rows form a window
//!   and the rows are partitioned. With `hop` (`1 <= hop <= count`, eKuiper's parser rejects
//!   `hop > count`): every `hop` rows, if at least `count` rows have arrived, a window of the
//!   latest `count` rows fires (eKuiper `TupleList`: `COUNTWINDOW(5, 2)` first fires at the
//!   6th row with rows 2..=6). Count windows ignore time; their bounds are the timestamps of
//!   their first and last rows.
//! * **Empty windows emit nothing.** A time window that received no row is never handed
//!   out, and no timer is pending for it ([`Windows::poll_timeout`] is `None` when no row is
//!   held). eKuiper's processing-time operator does emit an empty window (the sink then gets
//!   `[]`, see its `TestWindowRule2`), but drops it when a `WHERE` runs after the window
//!   (the filter forwards only non-empty collections) or when the sink sets `omitIfEmpty`;
//!   this engine behaves as eKuiper with `omitIfEmpty` (no output without input, and an
//!   idle rule needs no wake-ups).
//! * **Late rows.** Rows should arrive in non-decreasing timestamp order (the caller passes
//!   `now`). A row every one of whose windows has already closed is late: it is dropped and
//!   counted ([`Windows::late_rows`]), as eKuiper drops late events in event-time mode
//!   (`lateTolerance` 0, its default). An older row whose window is still open is accepted
//!   into it. For sliding windows a row older than the newest row (or timeout) seen is late,
//!   since its own window would end in the past. Count windows have no late rows.
//! * **Time advancing.** [`Windows::handle_row`] first closes the windows that ended at or
//!   before the row's timestamp (as if [`Windows::handle_timeout`] had been called with it),
//!   so closes are never missed when the caller skips a timeout. Time never goes backwards: a
//!   timeout earlier than one already seen does nothing.
//! * **Memory.** A row is held only while some open window still needs it: until the last
//!   hopping/tumbling window holding it closes, until it is `size` old for sliding windows
//!   (dropped on the next row or timeout); for count windows, at most the latest `count`
//!   rows, and after each trigger point only the `count - hop` the next window needs.
//!   Timestamps are saturating: a window start before the epoch reads as 0.

use std::collections::VecDeque;

/// eKuiper time units: `dd`, `hh`, `mi`, `ss`, `ms` → milliseconds per unit (case-insensitive).
pub fn unit_ms(unit: &str) -> Option<u64> {
    match unit.to_ascii_lowercase().as_str() {
        "dd" => Some(86_400_000),
        "hh" => Some(3_600_000),
        "mi" => Some(60_000),
        "ss" => Some(1_000),
        "ms" => Some(1),
        _ => None,
    }
}

/// A window definition, validated: build it with [`WindowSpec::tumbling`],
/// [`WindowSpec::hopping`], [`WindowSpec::sliding`] or [`WindowSpec::count`], or check a
/// hand-made one with [`WindowSpec::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowSpec {
    /// `TUMBLINGWINDOW(unit, n)`: windows `[k·size, (k+1)·size)` since the epoch.
    Tumbling {
        /// Window length in milliseconds (> 0).
        size_ms: u64,
    },
    /// `HOPPINGWINDOW(unit, size, hop)`: a window `[end - size, end)` at every multiple of hop.
    Hopping {
        /// Window length in milliseconds (> 0).
        size_ms: u64,
        /// Distance between window ends in milliseconds (> 0).
        hop_ms: u64,
    },
    /// `SLIDINGWINDOW(unit, size)`: triggered by each row, covers `(ts - size, ts]`.
    Sliding {
        /// Window length in milliseconds (> 0).
        size_ms: u64,
    },
    /// `COUNTWINDOW(count[, interval])`: the latest `count` rows, every `hop` rows
    /// (every `count` rows without `hop`).
    Count {
        /// Rows per window (> 0).
        count: usize,
        /// Rows between two windows (`1..=count`); `None` is `count` (tumbling).
        hop: Option<usize>,
    },
}

/// `n` units of `unit` in milliseconds, for a window argument named `what`.
fn duration_ms(what: &str, unit: &str, n: i64) -> Result<u64, String> {
    let per = unit_ms(unit).ok_or_else(|| {
        format!("{what}: unknown time unit `{unit}`, expected one of dd, hh, mi, ss, ms")
    })?;
    let n = u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{what}: must be a positive integer, got {n}"))?;
    n.checked_mul(per)
        .ok_or_else(|| format!("{what}: {n} {unit} is too long"))
}

impl WindowSpec {
    /// `TUMBLINGWINDOW(unit, length)`.
    pub fn tumbling(unit: &str, length: i64) -> Result<WindowSpec, String> {
        Ok(WindowSpec::Tumbling {
            size_ms: duration_ms("TUMBLINGWINDOW length", unit, length)?,
        })
    }

    /// `HOPPINGWINDOW(unit, length, hop)`.
    pub fn hopping(unit: &str, length: i64, hop: i64) -> Result<WindowSpec, String> {
        Ok(WindowSpec::Hopping {
            size_ms: duration_ms("HOPPINGWINDOW length", unit, length)?,
            hop_ms: duration_ms("HOPPINGWINDOW hop", unit, hop)?,
        })
    }

    /// `SLIDINGWINDOW(unit, length)`.
    pub fn sliding(unit: &str, length: i64) -> Result<WindowSpec, String> {
        Ok(WindowSpec::Sliding {
            size_ms: duration_ms("SLIDINGWINDOW length", unit, length)?,
        })
    }

    /// `COUNTWINDOW(count)` or `COUNTWINDOW(count, hop)`.
    pub fn count(count: i64, hop: Option<i64>) -> Result<WindowSpec, String> {
        let positive = |what: &str, n: i64| {
            usize::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("COUNTWINDOW {what}: must be a positive integer, got {n}"))
        };
        let spec = WindowSpec::Count {
            count: positive("count", count)?,
            hop: hop.map(|h| positive("interval", h)).transpose()?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the invariants the constructors enforce: positive sizes, hops and counts, and a
    /// count window's hop not larger than its count (eKuiper's parser rule).
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            WindowSpec::Tumbling { size_ms } | WindowSpec::Sliding { size_ms } if size_ms == 0 => {
                Err("window length must be positive".to_owned())
            }
            WindowSpec::Hopping { size_ms, hop_ms } if size_ms == 0 || hop_ms == 0 => {
                Err("HOPPINGWINDOW length and hop must be positive".to_owned())
            }
            WindowSpec::Count { count: 0, .. } | WindowSpec::Count { hop: Some(0), .. } => {
                Err("COUNTWINDOW count and interval must be positive".to_owned())
            }
            WindowSpec::Count {
                count,
                hop: Some(hop),
            } if hop > count => Err(format!(
                "COUNTWINDOW interval {hop} must not be larger than the count {count}"
            )),
            _ => Ok(()),
        }
    }

    /// The same window with invalid parameters raised to the nearest valid ones (used by
    /// [`Windows::new`], which cannot fail).
    fn clamped(self) -> WindowSpec {
        match self {
            WindowSpec::Tumbling { size_ms } => WindowSpec::Tumbling {
                size_ms: size_ms.max(1),
            },
            WindowSpec::Hopping { size_ms, hop_ms } => WindowSpec::Hopping {
                size_ms: size_ms.max(1),
                hop_ms: hop_ms.max(1),
            },
            WindowSpec::Sliding { size_ms } => WindowSpec::Sliding {
                size_ms: size_ms.max(1),
            },
            WindowSpec::Count { count, hop } => {
                let count = count.max(1);
                WindowSpec::Count {
                    count,
                    hop: hop.map(|h| h.clamp(1, count)),
                }
            }
        }
    }
}

/// A window that closed: its bounds and the rows it holds, in arrival order.
///
/// Bounds are `[start_ms, end_ms)` for tumbling and hopping windows, `(start_ms, end_ms]` for
/// sliding windows (`end_ms` is the triggering row's timestamp), and the first and last rows'
/// timestamps for count windows. `rows` is never empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed<R> {
    /// Window start in milliseconds since the epoch (saturating at 0).
    pub start_ms: u64,
    /// Window end in milliseconds since the epoch.
    pub end_ms: u64,
    /// The window's rows, in arrival order.
    pub rows: Vec<R>,
}

/// Assigns rows to windows and hands out the windows that close.
#[derive(Debug, Clone)]
pub struct Windows<R> {
    /// The (clamped, hence valid) definition.
    spec: WindowSpec,
    /// Held rows with their timestamps, in arrival order; each stored once.
    rows: VecDeque<(u64, R)>,
    /// Time windows: every window ending at or before this has been handed out. Sliding
    /// windows: the newest row or timeout seen.
    watermark: u64,
    /// Time windows: the end of the earliest open window holding a row.
    next_due: Option<u64>,
    /// Count windows: rows since the last trigger point.
    since_trigger: usize,
    /// Rows dropped as late.
    late: u64,
}

impl<R: Clone> Windows<R> {
    /// Windows for `spec`. Never fails: a spec that [`WindowSpec::validate`] rejects is
    /// clamped (zero sizes, hops and counts become 1, a count hop above the count becomes the
    /// count); build specs with the `WindowSpec` constructors to report such errors.
    pub fn new(spec: WindowSpec) -> Self {
        Windows {
            spec: spec.clamped(),
            rows: VecDeque::new(),
            watermark: 0,
            next_due: None,
            since_trigger: 0,
            late: 0,
        }
    }

    /// A row with event time `ts_ms` (the caller passes `now` as ts). Returns the windows
    /// this row closes: time windows that ended at or before `ts_ms` (closed before the row
    /// is added), the sliding window the row fires, or the count window it completes. A row
    /// whose windows have all closed already is dropped and counted in [`Self::late_rows`].
    pub fn handle_row(&mut self, ts_ms: u64, row: R) -> Vec<Closed<R>> {
        match self.spec {
            WindowSpec::Tumbling { size_ms } => self.time_row(size_ms, size_ms, ts_ms, row),
            WindowSpec::Hopping { size_ms, hop_ms } => self.time_row(size_ms, hop_ms, ts_ms, row),
            WindowSpec::Sliding { size_ms } => self.sliding_row(size_ms, ts_ms, row),
            WindowSpec::Count { count, hop } => {
                self.count_row(count, hop.unwrap_or(count), ts_ms, row)
            }
        }
    }

    /// Time advanced to `now_ms`: the tumbling and hopping windows whose end is at or before
    /// `now_ms` close and are returned, oldest first. Sliding windows drop rows that are now
    /// too old; count windows ignore time.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Vec<Closed<R>> {
        match self.spec {
            WindowSpec::Tumbling { size_ms } => self.advance(size_ms, size_ms, now_ms),
            WindowSpec::Hopping { size_ms, hop_ms } => self.advance(size_ms, hop_ms, now_ms),
            WindowSpec::Sliding { size_ms } => {
                if now_ms > self.watermark {
                    self.watermark = now_ms;
                    self.expire_sliding(size_ms, now_ms);
                }
                Vec::new()
            }
            WindowSpec::Count { .. } => Vec::new(),
        }
    }

    /// When [`Self::handle_timeout`] must be called next: the end of the earliest open
    /// tumbling or hopping window holding a row. `None` when nothing is pending (no row held,
    /// or sliding and count windows, which fire on rows).
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.spec {
            WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } => self.next_due,
            WindowSpec::Sliding { .. } | WindowSpec::Count { .. } => None,
        }
    }

    /// Rows dropped as late so far.
    pub fn late_rows(&self) -> u64 {
        self.late
    }

    /// Rows currently held (for memory accounting); each row counts once even when it
    /// belongs to several open windows.
    pub fn held_rows(&self) -> usize {
        self.rows.len()
    }

    // --- tumbling and hopping -------------------------------------------------------------

    /// A row for time windows of `size` ms ending at multiples of `hop` ms.
    fn time_row(&mut self, size: u64, hop: u64, ts: u64, row: R) -> Vec<Closed<R>> {
        let closed = self.advance(size, hop, ts);
        match window_ends(size, hop, ts) {
            Ends::Windows { first, last } if last > self.watermark => {
                let due = first.max(next_end_after(hop, self.watermark).unwrap_or(last));
                self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
                self.rows.push_back((ts, row));
            }
            Ends::Gap => {}
            Ends::Windows { .. } | Ends::Unrepresentable => self.late = self.late.saturating_add(1),
        }
        closed
    }

    /// Closes every window ending at or before `now` (oldest first), then moves the
    /// watermark to `now`.
    fn advance(&mut self, size: u64, hop: u64, now: u64) -> Vec<Closed<R>> {
        let mut closed = Vec::new();
        if now < self.watermark {
            return closed;
        }
        while let Some(end) = self.next_due.filter(|end| *end <= now) {
            let start = end.saturating_sub(size);
            let rows: Vec<R> = self
                .rows
                .iter()
                .filter(|(ts, _)| *ts >= start && *ts < end)
                .map(|(_, r)| r.clone())
                .collect();
            if !rows.is_empty() {
                closed.push(Closed {
                    start_ms: start,
                    end_ms: end,
                    rows,
                });
            }
            self.watermark = end;
            // Keep the rows some later window still needs; find the next window to close.
            let next_open = next_end_after(hop, end);
            let mut next_due: Option<u64> = None;
            self.rows
                .retain(|(ts, _)| match window_ends(size, hop, *ts) {
                    Ends::Windows { first, last } if last > end => {
                        let due = next_open.map_or(last, |n| first.max(n));
                        next_due = Some(next_due.map_or(due, |d| d.min(due)));
                        true
                    }
                    _ => false,
                });
            self.next_due = next_due;
        }
        // No held row has a window ending in (watermark, now]: `next_due` stays valid.
        self.watermark = now;
        closed
    }

    // --- sliding ----------------------------------------------------------------------------

    /// A row for sliding windows of `size` ms: fires the window `(ts - size, ts]`.
    fn sliding_row(&mut self, size: u64, ts: u64, row: R) -> Vec<Closed<R>> {
        if ts < self.watermark {
            self.late = self.late.saturating_add(1);
            return Vec::new();
        }
        self.watermark = ts;
        self.expire_sliding(size, ts);
        self.rows.push_back((ts, row));
        vec![Closed {
            start_ms: ts.saturating_sub(size),
            end_ms: ts,
            rows: self.rows.iter().map(|(_, r)| r.clone()).collect(),
        }]
    }

    /// Drops the rows outside `(now - size, now]`, which no later sliding window can hold.
    fn expire_sliding(&mut self, size: u64, now: u64) {
        self.rows.retain(|(ts, _)| ts.saturating_add(size) > now);
    }

    // --- count ------------------------------------------------------------------------------

    /// A row for count windows of `count` rows firing every `hop` rows.
    fn count_row(&mut self, count: usize, hop: usize, ts: u64, row: R) -> Vec<Closed<R>> {
        self.rows.push_back((ts, row));
        self.since_trigger = self.since_trigger.saturating_add(1);
        if self.since_trigger < hop {
            return Vec::new();
        }
        self.since_trigger = 0;
        let mut closed = Vec::new();
        if self.rows.len() >= count {
            let skip = self.rows.len().saturating_sub(count);
            let window: Vec<&(u64, R)> = self.rows.iter().skip(skip).collect();
            if let (Some(first), Some(last)) = (window.first(), window.last()) {
                closed.push(Closed {
                    start_ms: first.0,
                    end_ms: last.0,
                    rows: window.iter().map(|(_, r)| r.clone()).collect(),
                });
            }
        }
        // The next window, `hop` rows later, holds only the latest `count - hop` rows of these.
        let keep = count.saturating_sub(hop);
        while self.rows.len() > keep {
            self.rows.pop_front();
        }
        closed
    }
}

/// Which time windows hold a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// The windows ending at the multiples of hop from `first` to `last`.
    Windows { first: u64, last: u64 },
    /// In a gap between hopping windows (hop > size): no window.
    Gap,
    /// Too close to `u64::MAX` for its window end to be represented.
    Unrepresentable,
}

/// The ends of the windows of `size` ms, ending at multiples of `hop`, that hold time `ts`:
/// those in `(ts, ts + size]`.
fn window_ends(size: u64, hop: u64, ts: u64) -> Ends {
    let Some(first) = next_end_after(hop, ts) else {
        return Ends::Unrepresentable;
    };
    if first.saturating_sub(ts) > size {
        return Ends::Gap;
    }
    let last = ts.saturating_add(size) / hop * hop;
    Ends::Windows {
        first,
        last: last.max(first),
    }
}

/// The smallest multiple of `hop` strictly after `t`, if representable.
fn next_end_after(hop: u64, t: u64) -> Option<u64> {
    (t / hop).checked_add(1)?.checked_mul(hop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn ids(c: &Closed<u32>) -> Vec<u32> {
        c.rows.clone()
    }

    fn bounds(c: &Closed<u32>) -> (u64, u64) {
        (c.start_ms, c.end_ms)
    }

    #[test]
    fn units() {
        assert_eq!(unit_ms("dd"), Some(86_400_000));
        assert_eq!(unit_ms("HH"), Some(3_600_000));
        assert_eq!(unit_ms("Mi"), Some(60_000));
        assert_eq!(unit_ms("ss"), Some(1_000));
        assert_eq!(unit_ms("ms"), Some(1));
        assert_eq!(unit_ms("s"), None);
        assert_eq!(unit_ms(""), None);
    }

    #[test]
    fn constructors_validate() {
        assert_eq!(
            WindowSpec::tumbling("ss", 10),
            Ok(WindowSpec::Tumbling { size_ms: 10_000 })
        );
        assert_eq!(
            WindowSpec::hopping("mi", 10, 5),
            Ok(WindowSpec::Hopping {
                size_ms: 600_000,
                hop_ms: 300_000
            })
        );
        assert_eq!(
            WindowSpec::sliding("ms", 7),
            Ok(WindowSpec::Sliding { size_ms: 7 })
        );
        assert!(WindowSpec::tumbling("ss", 0).is_err());
        assert!(WindowSpec::tumbling("ss", -3).is_err());
        assert!(WindowSpec::tumbling("weeks", 1).is_err());
        assert!(WindowSpec::tumbling("dd", i64::MAX).is_err());
        assert!(WindowSpec::hopping("ss", 10, 0).is_err());
        assert_eq!(
            WindowSpec::count(5, Some(2)),
            Ok(WindowSpec::Count {
                count: 5,
                hop: Some(2)
            })
        );
        assert!(WindowSpec::count(5, Some(6)).is_err());
        assert!(WindowSpec::count(0, None).is_err());
        assert!(WindowSpec::count(5, Some(0)).is_err());
        assert!(WindowSpec::Tumbling { size_ms: 0 }.validate().is_err());
        assert!(WindowSpec::Sliding { size_ms: 1 }.validate().is_ok());
    }

    #[test]
    fn invalid_specs_are_clamped_not_panicking() {
        for spec in [
            WindowSpec::Tumbling { size_ms: 0 },
            WindowSpec::Hopping {
                size_ms: 0,
                hop_ms: 0,
            },
            WindowSpec::Sliding { size_ms: 0 },
            WindowSpec::Count {
                count: 0,
                hop: Some(0),
            },
            WindowSpec::Count {
                count: 2,
                hop: Some(9),
            },
        ] {
            let mut w = Windows::new(spec);
            for ts in [0, 1, 1, 5, u64::MAX - 1, u64::MAX] {
                let _ = w.handle_row(ts, 1u32);
                let _ = w.handle_timeout(ts);
                let _ = w.poll_timeout();
            }
        }
    }

    #[test]
    fn tumbling_boundaries_empty_windows_and_late_rows() {
        let mut w = Windows::new(WindowSpec::Tumbling { size_ms: 10_000 });
        assert_eq!(w.poll_timeout(), None, "nothing held, nothing pending");
        assert!(w.handle_row(1_000, 1).is_empty());
        assert!(w.handle_row(9_999, 2).is_empty());
        assert_eq!(w.poll_timeout(), Some(10_000));
        assert!(w.handle_timeout(9_999).is_empty(), "end not reached");
        // A row exactly at the end closes [0, 10000) first and opens the next window.
        let c = w.handle_row(10_000, 3);
        assert_eq!(c.len(), 1);
        assert_eq!(bounds(&c[0]), (0, 10_000));
        assert_eq!(ids(&c[0]), vec![1, 2]);
        assert_eq!(w.held_rows(), 1);
        assert_eq!(w.poll_timeout(), Some(20_000));
        // Time passes [20000, 30000) and [30000, 40000) without rows: nothing is emitted.
        let c = w.handle_timeout(35_000);
        assert_eq!(c.len(), 1);
        assert_eq!(bounds(&c[0]), (10_000, 20_000));
        assert_eq!(ids(&c[0]), vec![3]);
        assert_eq!(w.poll_timeout(), None);
        assert_eq!(w.held_rows(), 0);
        // A row for the closed window [10000, 20000) is late; [30000, 40000) is still open.
        assert!(w.handle_row(15_000, 4).is_empty());
        assert_eq!(w.late_rows(), 1);
        assert!(w.handle_row(31_000, 5).is_empty());
        assert_eq!(w.late_rows(), 1);
        // An older row whose window is still open is accepted (arrival order kept).
        assert!(w.handle_row(30_000, 6).is_empty());
        assert_eq!(w.poll_timeout(), Some(40_000));
        let c = w.handle_timeout(40_000);
        assert_eq!(c.len(), 1);
        assert_eq!(bounds(&c[0]), (30_000, 40_000));
        assert_eq!(ids(&c[0]), vec![5, 6]);
        // Time does not go backwards.
        assert!(w.handle_timeout(1).is_empty());
        assert!(w.handle_row(39_999, 7).is_empty());
        assert_eq!(w.late_rows(), 2);
    }

    #[test]
    fn tumbling_row_far_ahead_closes_the_open_windows_first() {
        let mut w = Windows::new(WindowSpec::Tumbling { size_ms: 10 });
        assert!(w.handle_row(3, 1).is_empty());
        let c = w.handle_row(14, 2);
        assert_eq!(
            c.iter().map(|c| (bounds(c), ids(c))).collect::<Vec<_>>(),
            vec![((0, 10), vec![1])]
        );
        let c = w.handle_row(95, 3);
        assert_eq!(
            c.iter().map(|c| (bounds(c), ids(c))).collect::<Vec<_>>(),
            vec![((10, 20), vec![2])]
        );
        assert_eq!(w.poll_timeout(), Some(100));
    }

    #[test]
    fn hopping_overlaps_and_shares_rows() {
        // HOPPINGWINDOW(ms, 10, 5): windows [end-10, end) for end = 5, 10, 15, ...
        let mut w = Windows::new(WindowSpec::Hopping {
            size_ms: 10,
            hop_ms: 5,
        });
        assert!(w.handle_row(3, 1).is_empty()); // in [-5,5) and [0,10)
        assert_eq!(w.poll_timeout(), Some(5));
        let c = w.handle_timeout(5);
        assert_eq!(c.len(), 1);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((0, 5), vec![1]));
        assert!(w.handle_row(7, 2).is_empty()); // in [0,10) and [5,15)
        assert_eq!(w.held_rows(), 2, "each row stored once");
        assert_eq!(w.poll_timeout(), Some(10));
        let c = w.handle_timeout(12);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((0, 10), vec![1, 2]));
        assert_eq!(w.held_rows(), 1, "row 1 is no longer needed");
        let c = w.handle_timeout(100);
        assert_eq!(c.len(), 1);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((5, 15), vec![2]));
        assert_eq!(w.held_rows(), 0);
        assert_eq!(w.poll_timeout(), None);
        // Row at 103 after time 100: window [95,105) still open, [90,100) not.
        assert!(w.handle_row(103, 3).is_empty());
        assert_eq!(w.late_rows(), 0);
        // Row at 94 arriving at time 103: its windows [85,95) and [90,100) have closed.
        assert!(w.handle_row(94, 4).is_empty());
        assert_eq!(w.late_rows(), 1);
        // Row at 97: [90,100) closed, [95,105) open: accepted there only.
        assert!(w.handle_row(97, 5).is_empty());
        let c = w.handle_timeout(110);
        assert_eq!(
            c.iter().map(|c| (bounds(c), ids(c))).collect::<Vec<_>>(),
            vec![((95, 105), vec![3, 5]), ((100, 110), vec![3])]
        );
    }

    #[test]
    fn hopping_with_gaps_discards_gap_rows() {
        // HOPPINGWINDOW(ms, 3, 10): windows [7,10), [17,20), ...
        let mut w = Windows::new(WindowSpec::Hopping {
            size_ms: 3,
            hop_ms: 10,
        });
        assert!(w.handle_row(2, 1).is_empty()); // gap
        assert_eq!(w.held_rows(), 0);
        assert!(w.handle_row(7, 2).is_empty());
        assert!(w.handle_row(9, 3).is_empty());
        let c = w.handle_row(10, 4); // closes [7,10); 10 is in a gap
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((7, 10), vec![2, 3]));
        assert_eq!(w.late_rows(), 0);
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn sliding_window_is_left_open_right_closed() {
        let mut w = Windows::new(WindowSpec::Sliding { size_ms: 10 });
        let c = w.handle_row(0, 1);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((0, 0), vec![1]));
        let c = w.handle_row(10, 2); // (0, 10]: row at 0 is exactly size old, excluded
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((0, 10), vec![2]));
        let c = w.handle_row(15, 3);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((5, 15), vec![2, 3]));
        let c = w.handle_row(15, 4); // same timestamp: both in
        assert_eq!(ids(&c[0]), vec![2, 3, 4]);
        assert_eq!(w.poll_timeout(), None);
        assert!(
            w.handle_row(14, 5).is_empty(),
            "older than the newest row: late"
        );
        assert_eq!(w.late_rows(), 1);
        assert!(w.handle_timeout(25).is_empty());
        assert_eq!(w.held_rows(), 0, "all rows at least 10 old at time 25");
        let c = w.handle_row(30, 6);
        assert_eq!((bounds(&c[0]), ids(&c[0])), ((20, 30), vec![6]));
    }

    #[test]
    fn count_window_without_hop_partitions() {
        let mut w = Windows::new(WindowSpec::Count {
            count: 3,
            hop: None,
        });
        let mut out = Vec::new();
        for i in 1..=7u32 {
            for c in w.handle_row(u64::from(i) * 10, i) {
                out.push((bounds(&c), ids(&c)));
            }
        }
        assert_eq!(
            out,
            vec![((10, 30), vec![1, 2, 3]), ((40, 60), vec![4, 5, 6])]
        );
        assert_eq!(w.held_rows(), 1);
        assert!(w.handle_timeout(u64::MAX).is_empty());
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn count_window_with_hop_matches_ekuiper_example() {
        // eKuiper docs: COUNTWINDOW(5, 2) fires at the 6th event with events 2..=6.
        let mut w = Windows::new(WindowSpec::Count {
            count: 5,
            hop: Some(2),
        });
        let mut out = Vec::new();
        for i in 1..=10u32 {
            for c in w.handle_row(u64::from(i), i) {
                out.push((i, ids(&c)));
            }
            assert!(w.held_rows() <= 5);
        }
        assert_eq!(
            out,
            vec![
                (6, vec![2, 3, 4, 5, 6]),
                (8, vec![4, 5, 6, 7, 8]),
                (10, vec![6, 7, 8, 9, 10])
            ]
        );
        // COUNTWINDOW(3, 1): every row once three are held.
        let mut w = Windows::new(WindowSpec::Count {
            count: 3,
            hop: Some(1),
        });
        let fired: Vec<Vec<u32>> = (1..=4u32)
            .flat_map(|i| w.handle_row(0, i))
            .map(|c| c.rows)
            .collect();
        assert_eq!(fired, vec![vec![1, 2, 3], vec![2, 3, 4]]);
    }

    /// Sorted timestamps (with repeats) and, per row, an optional timeout inserted before it.
    fn sorted_input() -> impl Strategy<Value = Vec<(u64, Option<u64>)>> {
        proptest::collection::vec((0u64..60, proptest::option::of(0u64..60)), 0..80).prop_map(
            |steps| {
                let mut ts = 0u64;
                steps
                    .into_iter()
                    .map(|(d, t)| {
                        ts += d;
                        (ts, t.map(|extra| ts.saturating_sub(30) + extra))
                    })
                    .collect()
            },
        )
    }

    /// Feeds rows (ids 0..) with optional timeouts, then a final timeout; returns the windows.
    fn run(
        spec: WindowSpec,
        input: &[(u64, Option<u64>)],
        last: u64,
    ) -> (Vec<Closed<u32>>, Windows<u32>) {
        let mut w = Windows::new(spec);
        let mut out = Vec::new();
        let mut now = 0u64;
        for (i, (ts, timeout)) in input.iter().enumerate() {
            if let Some(t) = timeout {
                // Timeouts never run ahead of the next row's time (the caller's clock).
                let t = (*t).min(*ts);
                now = now.max(t);
                out.extend(w.handle_timeout(t));
            }
            now = now.max(*ts);
            out.extend(w.handle_row(*ts, i as u32));
        }
        out.extend(w.handle_timeout(last.max(now)));
        (out, w)
    }

    proptest! {
        #[test]
        fn tumbling_every_row_in_exactly_one_window(size in 1u64..50, input in sorted_input()) {
            let last = input.last().map_or(0, |(ts, _)| ts + size);
            let (out, w) = run(WindowSpec::Tumbling { size_ms: size }, &input, last);
            let mut seen = BTreeMap::new();
            let mut prev_end = 0;
            for c in &out {
                prop_assert!(!c.rows.is_empty());
                prop_assert_eq!(c.end_ms - c.start_ms, size);
                prop_assert_eq!(c.start_ms % size, 0);
                prop_assert!(c.end_ms > prev_end);
                prev_end = c.end_ms;
                for id in &c.rows {
                    let ts = input[*id as usize].0;
                    prop_assert!(c.start_ms <= ts && ts < c.end_ms);
                    *seen.entry(*id).or_insert(0) += 1;
                }
            }
            prop_assert_eq!(w.late_rows(), 0);
            prop_assert_eq!(w.held_rows(), 0);
            prop_assert_eq!(w.poll_timeout(), None);
            prop_assert_eq!(seen.len(), input.len());
            prop_assert!(seen.values().all(|n| *n == 1));
        }

        #[test]
        fn hopping_every_row_in_size_over_hop_windows(
            hop in 1u64..20, k in 1u64..5, input in sorted_input()
        ) {
            let size = hop * k;
            let last = input.last().map_or(0, |(ts, _)| ts + size);
            let (out, w) = run(WindowSpec::Hopping { size_ms: size, hop_ms: hop }, &input, last);
            let mut seen = BTreeMap::new();
            for c in &out {
                prop_assert!(!c.rows.is_empty());
                prop_assert_eq!(c.end_ms % hop, 0);
                prop_assert_eq!(c.start_ms, c.end_ms.saturating_sub(size));
                // Exactly the rows in range.
                let expected: Vec<u32> = (0..input.len() as u32)
                    .filter(|i| { let ts = input[*i as usize].0; c.start_ms <= ts && ts < c.end_ms })
                    .collect();
                prop_assert_eq!(&c.rows, &expected);
                for id in &c.rows {
                    *seen.entry(*id).or_insert(0u64) += 1;
                }
            }
            prop_assert_eq!(w.late_rows(), 0);
            prop_assert_eq!(w.held_rows(), 0);
            prop_assert_eq!(seen.len(), input.len());
            prop_assert!(seen.values().all(|n| *n == k));
        }

        #[test]
        fn count_windows_partition_rows(count in 1usize..10, n in 0usize..60) {
            let mut w = Windows::new(WindowSpec::Count { count, hop: None });
            let mut all = Vec::new();
            for i in 0..n as u32 {
                for c in w.handle_row(u64::from(i), i) {
                    prop_assert_eq!(c.rows.len(), count);
                    all.extend(c.rows);
                }
            }
            prop_assert_eq!(all, (0..(n / count * count) as u32).collect::<Vec<_>>());
            prop_assert_eq!(w.held_rows(), n % count);
        }

        #[test]
        fn count_windows_with_hop_hold_the_latest_rows(
            count in 1usize..10, hop_seed in 0usize..10, n in 0usize..60
        ) {
            let hop = hop_seed % count + 1;
            let mut w = Windows::new(WindowSpec::Count { count, hop: Some(hop) });
            for i in 1..=n {
                let fired = w.handle_row(i as u64, i);
                let expected: Vec<Vec<usize>> = if i % hop == 0 && i >= count {
                    vec![(i - count + 1..=i).collect()]
                } else {
                    Vec::new()
                };
                prop_assert_eq!(fired.into_iter().map(|c| c.rows).collect::<Vec<_>>(), expected);
                prop_assert!(w.held_rows() <= count);
            }
        }

        #[test]
        fn sliding_windows_hold_exactly_their_range(size in 1u64..50, input in sorted_input()) {
            let mut w = Windows::new(WindowSpec::Sliding { size_ms: size });
            for (i, (ts, _)) in input.iter().enumerate() {
                let fired = w.handle_row(*ts, i as u32);
                prop_assert_eq!(fired.len(), 1);
                let c = &fired[0];
                prop_assert_eq!((c.start_ms, c.end_ms), (ts.saturating_sub(size), *ts));
                let expected: Vec<u32> = (0..=i as u32)
                    .filter(|j| { let t = input[*j as usize].0; t + size > *ts && t <= *ts })
                    .collect();
                prop_assert_eq!(&c.rows, &expected);
            }
            prop_assert_eq!(w.late_rows(), 0);
        }

        #[test]
        fn unordered_rows_are_windowed_once_or_counted_late(
            size in 1u64..50,
            input in proptest::collection::vec((0u64..500, proptest::option::of(0u64..500)), 0..80)
        ) {
            let mut w = Windows::new(WindowSpec::Tumbling { size_ms: size });
            let mut out = Vec::new();
            for (i, (ts, timeout)) in input.iter().enumerate() {
                if let Some(t) = timeout {
                    out.extend(w.handle_timeout(*t));
                }
                out.extend(w.handle_row(*ts, i as u32));
            }
            out.extend(w.handle_timeout(10_000));
            let emitted: usize = out.iter().map(|c| c.rows.len()).sum();
            prop_assert_eq!(emitted as u64 + w.late_rows(), input.len() as u64);
            for c in &out {
                for id in &c.rows {
                    let ts = input[*id as usize].0;
                    prop_assert!(c.start_ms <= ts && ts < c.end_ms);
                }
            }
        }

        #[test]
        fn never_panics_at_extreme_times(
            size in 1u64..u64::MAX, hop in 1u64..u64::MAX,
            times in proptest::collection::vec(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()], 0..20)
        ) {
            let mut ws = [
                Windows::new(WindowSpec::Tumbling { size_ms: size }),
                Windows::new(WindowSpec::Hopping { size_ms: size, hop_ms: hop }),
                Windows::new(WindowSpec::Sliding { size_ms: size }),
            ];
            for w in &mut ws {
                for t in &times {
                    let _ = w.handle_row(*t, 0u8);
                    let _ = w.handle_timeout(*t);
                    let _ = w.poll_timeout();
                }
            }
        }
    }
}
