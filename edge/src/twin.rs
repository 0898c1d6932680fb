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

/// Latest reported sample per property, held per device in tag order, so the hot path does
/// one map lookup per device reading and indexes tags by position (no string hashing or
/// cloning per sample).
#[derive(Debug, Default)]
pub struct Twin {
    devices: HashMap<DeviceId, Vec<Option<Sample>>>,
}

fn moved(policy: &ReportPolicy, old: Option<&Value>, new: Option<&Value>) -> bool {
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
    /// A twin for `specs`, starting from persisted samples (those of properties no longer
    /// configured are dropped).
    pub fn new(specs: &[DeviceSpec], persisted: Vec<Sample>) -> Self {
        let mut devices: HashMap<DeviceId, Vec<Option<Sample>>> = specs
            .iter()
            .map(|d| (d.id.clone(), vec![None; d.tags.len()]))
            .collect();
        for s in persisted {
            let Some(spec) = specs.iter().find(|d| d.id == s.device) else {
                continue;
            };
            let Some(i) = spec.tags.iter().position(|t| t.property == s.property) else {
                continue;
            };
            if let Some(slot) = devices.get_mut(&s.device).and_then(|v| v.get_mut(i)) {
                *slot = Some(s);
            }
        }
        Twin { devices }
    }

    /// The latest reported sample of a property.
    pub fn get(&self, device: &DeviceId, property: &PropertyId) -> Option<&Sample> {
        self.devices
            .get(device)?
            .iter()
            .flatten()
            .find(|s| &s.property == property)
    }

    /// Number of properties holding a sample.
    pub fn len(&self) -> usize {
        self.devices.values().flatten().flatten().count()
    }

    /// Whether no property holds a sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one poll cycle; returns the samples to report (in tag order).
    pub fn observe(&mut self, spec: &DeviceSpec, reading: &DeviceReading) -> Vec<Sample> {
        let mut out = Vec::new();
        let slots = self
            .devices
            .entry(reading.device.clone())
            .or_insert_with(|| vec![None; spec.tags.len()]);
        if slots.len() < spec.tags.len() {
            slots.resize(spec.tags.len(), None);
        }
        for ts in &reading.samples {
            let (Some(tag), Some(slot)) = (spec.tags.get(ts.tag), slots.get_mut(ts.tag)) else {
                continue;
            };
            let policy = &tag.report;
            let report = match slot.as_ref() {
                None => true,
                Some(old) => {
                    // A bad sample keeps the last good value (stale, flagged by quality).
                    let value = ts.value.as_ref().or(old.value.as_ref());
                    policy.every_sample
                        || old.quality != ts.quality
                        || moved(policy, old.value.as_ref(), value)
                        || policy.max_interval.is_some_and(|mi| {
                            reading.ts.0.saturating_sub(old.ts.0) >= mi.as_millis() as u64
                        })
                }
            };
            if report {
                let value = match (&ts.value, slot.as_ref()) {
                    (None, Some(old)) => old.value.clone(),
                    (v, _) => v.clone(),
                };
                let s = Sample {
                    device: reading.device.clone(),
                    property: ts.property.clone(),
                    value,
                    quality: ts.quality,
                    ts: reading.ts,
                };
                *slot = Some(s.clone());
                out.push(s);
            }
        }
        out
    }

    /// The latest samples of every property of `device` (what the store persists per device).
    pub fn device_samples(&self, device: &DeviceId) -> Vec<Sample> {
        self.devices
            .get(device)
            .map(|v| v.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Timestamp of the newest sample held (for diagnostics).
    pub fn newest(&self) -> Option<Timestamp> {
        self.devices
            .values()
            .flatten()
            .flatten()
            .map(|s| s.ts)
            .max()
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
        let mut t = Twin::new(&[], vec![]);
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
        let mut t = Twin::new(&[], vec![]);
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
        let mut t = Twin::new(&[], vec![]);
        for i in 0..3 {
            assert_eq!(t.observe(&sp, &reading(i, Some(1.0), g)).len(), 1);
        }
    }
}
