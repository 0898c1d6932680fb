//! The device twin's hot copy and the reporting policy.
//!
//! The twin holds the latest sample of every property in memory. [`Twin::observe`] takes one
//! poll cycle of a device and returns the samples worth reporting under each tag's
//! [`ReportPolicy`]: the first sample, a change of quality, a value that moved past the
//! deadband, every sample when asked, and a heartbeat after `max_interval` of silence. What
//! it returns is what goes to the outbox, to local subscribers and into the persisted twin.

use std::collections::HashMap;

use edgesync_protocol::{DeviceId, PropertyId, Sample, Timestamp, Value};

use crate::modbus::link::DeviceReading;
use crate::model::{DeviceSpec, ReportPolicy};

#[derive(Debug, Clone)]
struct Entry {
    /// Last reported sample.
    reported: Sample,
}

/// Latest reported sample per property.
#[derive(Debug, Default)]
pub struct Twin {
    entries: HashMap<(DeviceId, PropertyId), Entry>,
}

fn moved(policy: &ReportPolicy, old: &Option<Value>, new: &Option<Value>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => match (o.as_f64(), n.as_f64()) {
            (Some(a), Some(b)) if !matches!(o, Value::Str(_)) => {
                if a == b {
                    return false;
                }
                if !a.is_finite() || !b.is_finite() {
                    return true;
                }
                let d = (b - a).abs();
                if policy.deadband_abs > 0.0 && d <= policy.deadband_abs {
                    return false;
                }
                if policy.deadband_pct > 0.0 && d <= a.abs() * policy.deadband_pct / 100.0 {
                    return false;
                }
                true
            }
            _ => o != n,
        },
        (None, None) => false,
        _ => true,
    }
}

impl Twin {
    /// A twin starting from persisted samples.
    pub fn from_samples(samples: Vec<Sample>) -> Self {
        let entries = samples
            .into_iter()
            .map(|s| {
                (
                    (s.device.clone(), s.property.clone()),
                    Entry { reported: s },
                )
            })
            .collect();
        Twin { entries }
    }

    /// The latest reported sample of a property.
    pub fn get(&self, device: &DeviceId, property: &PropertyId) -> Option<&Sample> {
        self.entries
            .get(&(device.clone(), property.clone()))
            .map(|e| &e.reported)
    }

    /// Number of properties held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the twin is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies one poll cycle; returns the samples to report (in tag order).
    pub fn observe(&mut self, spec: &DeviceSpec, reading: &DeviceReading) -> Vec<Sample> {
        let mut out = Vec::new();
        for ts in &reading.samples {
            let Some(tag) = spec.tags.get(ts.tag) else {
                continue;
            };
            let policy = &tag.report;
            // A bad sample keeps the last good value (stale, flagged by quality).
            let key = (reading.device.clone(), ts.property.clone());
            let prev = self.entries.get(&key);
            let value = match (&ts.value, prev) {
                (None, Some(p)) => p.reported.value.clone(),
                (v, _) => v.clone(),
            };
            let report = match prev {
                None => true,
                Some(p) => {
                    let old = &p.reported;
                    policy.every_sample
                        || old.quality != ts.quality
                        || moved(policy, &old.value, &value)
                        || policy.max_interval.is_some_and(|mi| {
                            reading.ts.0.saturating_sub(old.ts.0) >= mi.as_millis() as u64
                        })
                }
            };
            if report {
                let s = Sample {
                    device: reading.device.clone(),
                    property: ts.property.clone(),
                    value,
                    quality: ts.quality,
                    ts: reading.ts,
                };
                self.entries.insert(
                    key,
                    Entry {
                        reported: s.clone(),
                    },
                );
                out.push(s);
            }
        }
        out
    }

    /// Timestamp of the newest sample held (for diagnostics).
    pub fn newest(&self) -> Option<Timestamp> {
        self.entries.values().map(|e| e.reported.ts).max()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use edgesync_protocol::{BadReason, Quality};

    use super::*;
    use crate::modbus::link::TagSample;
    use crate::model::*;

    fn spec(policy: ReportPolicy) -> DeviceSpec {
        DeviceSpec {
            id: DeviceId::new("d").unwrap(),
            link: LinkSpec::Tcp {
                endpoint: "x:1".into(),
            },
            unit_id: 1,
            timeout: Duration::from_secs(1),
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 0,
            tags: vec![TagSpec {
                property: PropertyId::new("t").unwrap(),
                table: Table::HoldingRegister,
                address: 0,
                data_type: DataType::Float32,
                bit: None,
                byte_order: ByteOrder::Abcd,
                scale: 1.0,
                offset: 0.0,
                unit: None,
                access: Access::Read,
                poll_interval: Duration::from_millis(100),
                report: policy,
            }],
        }
    }

    fn reading(ts: u64, v: Option<f64>, q: Quality) -> DeviceReading {
        DeviceReading {
            device: DeviceId::new("d").unwrap(),
            ts: Timestamp(ts),
            samples: vec![TagSample {
                tag: 0,
                property: PropertyId::new("t").unwrap(),
                value: v.map(Value::Float),
                quality: q,
            }],
        }
    }

    fn values(out: Vec<Sample>) -> Vec<Option<f64>> {
        out.iter()
            .map(|s| s.value.as_ref().and_then(Value::as_f64))
            .collect()
    }

    #[test]
    fn on_change_with_absolute_deadband_and_heartbeat() {
        let sp = spec(ReportPolicy {
            deadband_abs: 0.5,
            max_interval: Some(Duration::from_millis(1000)),
            ..Default::default()
        });
        let mut t = Twin::default();
        let g = Quality::Good;
        assert_eq!(
            values(t.observe(&sp, &reading(0, Some(10.0), g))),
            vec![Some(10.0)]
        );
        assert!(t.observe(&sp, &reading(100, Some(10.4), g)).is_empty());
        assert_eq!(
            values(t.observe(&sp, &reading(200, Some(10.6), g))),
            vec![Some(10.6)]
        );
        assert!(t.observe(&sp, &reading(1100, Some(10.6), g)).is_empty());
        // Heartbeat: unchanged for max_interval.
        assert_eq!(
            values(t.observe(&sp, &reading(1200, Some(10.6), g))),
            vec![Some(10.6)]
        );
    }

    #[test]
    fn percent_deadband_quality_change_and_every_sample() {
        let sp = spec(ReportPolicy {
            deadband_pct: 10.0,
            ..Default::default()
        });
        let mut t = Twin::default();
        let g = Quality::Good;
        let _ = t.observe(&sp, &reading(0, Some(100.0), g));
        assert!(t.observe(&sp, &reading(1, Some(109.0), g)).is_empty());
        assert_eq!(
            values(t.observe(&sp, &reading(2, Some(111.0), g))),
            vec![Some(111.0)]
        );
        // Going bad is reported, keeping the last value.
        let bad = t.observe(&sp, &reading(3, None, Quality::Bad(BadReason::Timeout)));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].value, Some(Value::Float(111.0)));
        assert!(
            t.observe(&sp, &reading(4, None, Quality::Bad(BadReason::Timeout)))
                .is_empty()
        );

        let sp = spec(ReportPolicy {
            every_sample: true,
            ..Default::default()
        });
        let mut t = Twin::default();
        for i in 0..3 {
            assert_eq!(t.observe(&sp, &reading(i, Some(1.0), g)).len(), 1);
        }
    }
}
