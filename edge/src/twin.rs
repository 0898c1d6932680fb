//! The device twin's hot copy and the reporting policy.
//!
//! The twin holds the latest sample of every property in memory. [`Twin::observe`] takes one
//! poll cycle of a device and returns the samples worth reporting under each tag's
//! [`ReportPolicy`]: the first sample, a change of quality, a value that moved past the
//! deadband, every sample when asked, and a heartbeat after `max_interval` of silence. What
//! it returns is what goes to the outbox, to local subscribers and into the persisted twin.

use std::collections::HashMap;

use edgesync_protocol::desired::{Applied, DesiredValue};
use edgesync_protocol::{DeviceId, PropertyId, Sample, Timestamp, Value};

use crate::modbus::link::DeviceReading;
use crate::model::{DeviceSpec, ReportPolicy};

/// Latest reported sample per property, held per device in tag order, so the hot path does
/// one map lookup per device reading and indexes tags by position (no string hashing or
/// cloning per sample).
///
/// Samples restored from the persisted twin after a restart serve readers at once, but they
/// are never the baseline of the reporting policy: the persisted twin is written behind and
/// may be older than what was already reported to the hub (or newer than what the hub
/// stored), so the first reading of every property after a restart is always reported. That
/// is what makes the hub converge to what the PLC holds whenever the agent crashed.
#[derive(Debug, Default)]
pub struct Twin {
    devices: HashMap<DeviceId, Slots>,
}

/// One device's state in tag order: samples, which of them were restored from disk and not
/// yet confirmed by a reading of this run, desired values and what became of them. `desired`
/// and `applied` stay empty until a tag of the device gets a desired value (most devices never
/// do; 88 bytes per tag otherwise), and are then as long as the device's tags.
#[derive(Debug, Default, Clone)]
struct Slots {
    samples: Vec<Option<Sample>>,
    restored: Vec<bool>,
    desired: Vec<Option<DesiredValue>>,
    applied: Vec<Option<Applied>>,
}

impl Slots {
    fn new(len: usize) -> Self {
        Slots {
            samples: vec![None; len],
            restored: vec![false; len],
            desired: Vec::new(),
            applied: Vec::new(),
        }
    }

    fn grow(&mut self, len: usize) {
        if self.samples.len() < len {
            self.samples.resize(len, None);
            self.restored.resize(len, false);
        }
    }

    /// `desired` and `applied`, sized to the device's tags on first use.
    fn downlink_slots(&mut self) -> (&mut Vec<Option<DesiredValue>>, &mut Vec<Option<Applied>>) {
        let len = self.samples.len();
        if self.desired.len() < len {
            self.desired.resize(len, None);
            self.applied.resize(len, None);
        }
        (&mut self.desired, &mut self.applied)
    }
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
        let mut devices: HashMap<DeviceId, Slots> = specs
            .iter()
            .map(|d| (d.id.clone(), Slots::new(d.tags.len())))
            .collect();
        for s in persisted {
            let Some(spec) = specs.iter().find(|d| d.id == s.device) else {
                continue;
            };
            let Some(i) = spec.tags.iter().position(|t| t.property == s.property) else {
                continue;
            };
            if let Some(slots) = devices.get_mut(&s.device)
                && let (Some(slot), Some(restored)) =
                    (slots.samples.get_mut(i), slots.restored.get_mut(i))
            {
                *slot = Some(s);
                *restored = true;
            }
        }
        Twin { devices }
    }

    /// The latest reported sample of a property.
    pub fn get(&self, device: &DeviceId, property: &PropertyId) -> Option<&Sample> {
        self.devices
            .get(device)?
            .samples
            .iter()
            .flatten()
            .find(|s| &s.property == property)
    }

    /// Number of properties holding a sample.
    pub fn len(&self) -> usize {
        self.devices
            .values()
            .flat_map(|d| d.samples.iter().flatten())
            .count()
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
            .or_insert_with(|| Slots::new(spec.tags.len()));
        slots.grow(spec.tags.len());
        for (i, ts) in reading.samples.iter().enumerate() {
            let (Some(tag), Some(slot), Some(restored)) = (
                spec.tags.get(ts.tag),
                slots.samples.get_mut(ts.tag),
                slots.restored.get_mut(ts.tag),
            ) else {
                continue;
            };
            let policy = &tag.report;
            let report = match slot.as_ref() {
                None => true,
                // Restored from disk: never a baseline (see the type's docs).
                Some(_) if *restored => true,
                Some(old) => {
                    // A bad sample keeps the last good value (stale, flagged by quality).
                    let value = ts.value.as_ref().or(old.value.as_ref());
                    policy.every_sample
                        || old.quality != ts.quality
                        || moved(policy, old.value.as_ref(), value)
                        // A heartbeat is due after `max_interval`, or at once when the wall
                        // clock stepped back past the last report (else it would stay silent
                        // until the clock caught up again).
                        || policy.max_interval.is_some_and(|mi| {
                            reading.ts.0 < old.ts.0
                                || reading.ts.0 - old.ts.0 >= mi.as_millis() as u64
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
                    property: tag.property.clone(),
                    value,
                    quality: ts.quality,
                    ts: reading.ts,
                };
                match slot {
                    // Updated in place: it holds the same ids (no reference counts touched,
                    // which at 10,000 changes a second showed in profiles).
                    Some(old) => {
                        old.value.clone_from(&s.value);
                        old.quality = s.quality;
                        old.ts = s.ts;
                    }
                    None => *slot = Some(s.clone()),
                }
                *restored = false;
                if out.capacity() == 0 {
                    // Room for the rest of the reading at the first change (when one changes,
                    // most often all do), not a doubling per push.
                    out.reserve_exact(reading.samples.len() - i);
                }
                out.push(s);
            }
        }
        if out.capacity() > 2 * out.len() {
            // Few changed: the batch may be held a while (events, pending records).
            out.shrink_to_fit();
        }
        out
    }

    /// Reported sample, desired value and applied outcome of tag `index` of `device`.
    pub fn property(
        &self,
        device: &DeviceId,
        index: usize,
    ) -> (Option<Sample>, Option<DesiredValue>, Option<Applied>) {
        let Some(d) = self.devices.get(device) else {
            return (None, None, None);
        };
        (
            d.samples.get(index).cloned().flatten(),
            d.desired.get(index).cloned().flatten(),
            d.applied.get(index).cloned().flatten(),
        )
    }

    /// Sets the desired value of tag `index` of `device` (a device with `len` tags).
    pub fn set_desired(
        &mut self,
        device: &DeviceId,
        len: usize,
        index: usize,
        desired: DesiredValue,
    ) {
        let d = self
            .devices
            .entry(device.clone())
            .or_insert_with(|| Slots::new(len));
        d.grow(len);
        if let Some(slot) = d.downlink_slots().0.get_mut(index) {
            *slot = Some(desired);
        }
    }

    /// Records what became of the desired value of tag `index` of `device`.
    pub fn set_applied(&mut self, device: &DeviceId, len: usize, index: usize, applied: Applied) {
        let d = self
            .devices
            .entry(device.clone())
            .or_insert_with(|| Slots::new(len));
        d.grow(len);
        if let Some(slot) = d.downlink_slots().1.get_mut(index) {
            *slot = Some(applied);
        }
    }

    /// [`Twin::device_samples`] encoded as the store persists them, without cloning them.
    pub fn encoded_device_samples(&self, device: &DeviceId) -> Vec<u8> {
        match self.devices.get(device) {
            Some(v) => edgesync_protocol::frame::encode_samples_of(v.samples.iter().flatten()),
            None => edgesync_protocol::frame::encode_samples(&[]),
        }
    }

    /// The latest samples of every property of `device` (what the store persists per device).
    pub fn device_samples(&self, device: &DeviceId) -> Vec<Sample> {
        self.devices
            .get(device)
            .map(|v| v.samples.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Timestamp of the newest sample held (for diagnostics).
    pub fn newest(&self) -> Option<Timestamp> {
        self.devices
            .values()
            .flat_map(|d| d.samples.iter().flatten())
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
        let mut t = test_support::tag("t", Table::HoldingRegister, DataType::Float32, Access::Read);
        t.report = policy;
        test_support::device("d", vec![t])
    }

    fn reading(ts: u64, v: Option<f64>, q: Quality) -> DeviceReading {
        DeviceReading {
            device: DeviceId::new("d").unwrap(),
            ts: Timestamp(ts),
            follows: false,
            samples: vec![TagSample {
                tag: 0,
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
    fn a_reading_where_few_change_holds_no_room_for_the_rest() {
        let tags = (0..100)
            .map(|i| {
                test_support::tag(
                    &format!("t{i}"),
                    Table::HoldingRegister,
                    DataType::Float32,
                    Access::Read,
                )
            })
            .collect();
        let sp = test_support::device("d", tags);
        let read = |ts: u64, changed: f64| DeviceReading {
            device: DeviceId::new("d").unwrap(),
            ts: Timestamp(ts),
            follows: false,
            samples: (0..100)
                .map(|i| TagSample {
                    tag: i,
                    value: Some(Value::Float(if i == 7 { changed } else { 1.0 })),
                    quality: Quality::Good,
                })
                .collect(),
        };
        let mut t = Twin::new(&[], vec![]);
        assert_eq!(t.observe(&sp, &read(0, 1.0)).len(), 100);
        let out = t.observe(&sp, &read(100, 2.0));
        assert_eq!(out.len(), 1);
        assert!(out.capacity() <= 2, "capacity {}", out.capacity());
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
        // The wall clock steps back an hour: the heartbeat does not wait for it to catch up.
        let back = 3_600_000_000;
        let mut t = Twin::new(&[], vec![]);
        let _ = t.observe(&sp, &reading(back + 1200, Some(10.6), g));
        assert_eq!(
            values(t.observe(&sp, &reading(1300, Some(10.6), g))),
            vec![Some(10.6)]
        );
        assert!(t.observe(&sp, &reading(1400, Some(10.6), g)).is_empty());
        assert_eq!(
            values(t.observe(&sp, &reading(2300, Some(10.6), g))),
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

    #[test]
    fn restored_samples_are_never_the_reporting_baseline() {
        // The persisted twin says 7 (written behind before a crash); the hub may hold
        // something else. The first reading after the restart is reported even though it
        // equals the restored value, then the policy applies again.
        let sp = spec(ReportPolicy::default());
        let restored = Sample {
            device: DeviceId::new("d").unwrap(),
            property: PropertyId::new("t").unwrap(),
            value: Some(Value::Float(7.0)),
            quality: Quality::Good,
            ts: Timestamp(5),
        };
        let mut t = Twin::new(std::slice::from_ref(&sp), vec![restored]);
        // Readers see the restored value before any reading.
        assert_eq!(
            t.get(&sp.id, &PropertyId::new("t").unwrap())
                .and_then(|s| s.value.clone()),
            Some(Value::Float(7.0))
        );
        let g = Quality::Good;
        assert_eq!(
            values(t.observe(&sp, &reading(10, Some(7.0), g))),
            vec![Some(7.0)]
        );
        assert!(t.observe(&sp, &reading(20, Some(7.0), g)).is_empty());
    }
}
