//! The twin as local consumers see it (the MQTT bus, later the rules): documents per device,
//! a stream of changes, and local desired changes.
//!
//! [`LocalTwin`] is a cheap, cloneable handle. Reads take a short lock on the in-memory twin
//! (never the disk); [`LocalTwin::set_desired`] validates the values against the tags (all or
//! nothing, every problem named) and hands them to the downlink, which writes them to the PLC
//! and proposes them to the hub (see `edgesync_protocol::desired` for the rules).
//!
//! Events ([`TwinEvent`]) go out on a broadcast channel as they happen, before the outbox's
//! durable commit: local consumers want the value now. A consumer that lags loses the oldest
//! events (it is told by `RecvError::Lagged`) and should re-read the documents it needs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use edgesync_protocol::desired::{Applied, DesiredValue};
use edgesync_protocol::{DeviceId, NodeId, PropertyId, Sample};
use tokio::sync::{broadcast, mpsc};

use crate::model::{Access, DeviceSpec, TagSpec};
use crate::twin::Twin;
use crate::values::{self, FieldError};

/// One property of a device twin.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyTwin {
    /// The latest reported sample (`None` before the first read).
    pub reported: Option<Sample>,
    /// The desired value, if any.
    pub desired: Option<DesiredValue>,
    /// What became of the last desired version applied.
    pub applied: Option<Applied>,
    /// Whether the tag may be written.
    pub writable: bool,
}

/// A device twin: every configured property, in tag order.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTwin {
    /// The device.
    pub device: DeviceId,
    /// Its properties.
    pub properties: BTreeMap<PropertyId, PropertyTwin>,
}

/// Something that changed in the twin.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinEvent {
    /// One poll cycle of a device reported these changes (only properties whose report
    /// policy said so).
    Reported {
        /// The device.
        device: DeviceId,
        /// The changed samples, in tag order.
        samples: Arc<Vec<Sample>>,
    },
    /// A property's desired value changed (from the hub or a local app).
    Desired {
        /// The device.
        device: DeviceId,
        /// The property.
        property: PropertyId,
        /// The new desired value.
        desired: DesiredValue,
    },
    /// A desired version reached an outcome (or became pending).
    Applied {
        /// The device.
        device: DeviceId,
        /// The property.
        property: PropertyId,
        /// The outcome.
        applied: Applied,
    },
    /// A local rule's output to publish on the local MQTT bus as it is.
    Publish {
        /// The topic.
        topic: String,
        /// The payload (JSON).
        payload: Arc<Vec<u8>>,
    },
    /// The tunnel to the hub came up or went down.
    Uplink {
        /// Whether a session with the hub is established.
        connected: bool,
    },
}

/// A desired change made by a local app, validated, on its way to the downlink.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalChange {
    /// The device.
    pub device: DeviceId,
    /// Property and typed value, in the order given.
    pub values: Vec<(PropertyId, edgesync_protocol::Value)>,
}

/// Why a local desired change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SetError {
    /// No device with this id is configured.
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// Some values do not fit their tags (every problem, each naming its property).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// The downlink has stopped (the agent is shutting down) or is overloaded.
    #[error("the agent is not accepting desired changes right now: {0}")]
    Unavailable(&'static str),
}

struct Shared {
    node: NodeId,
    twin: Arc<Mutex<Twin>>,
    specs: HashMap<DeviceId, Arc<DeviceSpec>>,
    events: broadcast::Sender<TwinEvent>,
    local_changes: mpsc::Sender<LocalChange>,
    uplink: AtomicBool,
}

/// A handle on the agent's twin for local consumers. Cheap to clone.
#[derive(Clone)]
pub struct LocalTwin {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalTwin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTwin")
            .field("node", &self.shared.node)
            .field("devices", &self.shared.specs.len())
            .finish_non_exhaustive()
    }
}

/// Capacity of the event channel: a consumer further behind than this lags.
pub const EVENT_CAPACITY: usize = 4096;

impl LocalTwin {
    /// A handle over `twin` (shared with the pipeline), the device specs, and the channel
    /// on which local desired changes go to the downlink.
    pub fn new(
        node: NodeId,
        twin: Arc<Mutex<Twin>>,
        specs: HashMap<DeviceId, Arc<DeviceSpec>>,
        local_changes: mpsc::Sender<LocalChange>,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        LocalTwin {
            shared: Arc::new(Shared {
                node,
                twin,
                specs,
                events,
                local_changes,
                uplink: AtomicBool::new(false),
            }),
        }
    }

    /// The node this agent is.
    pub fn node(&self) -> &NodeId {
        &self.shared.node
    }

    /// Every configured device, ordered by id.
    pub fn devices(&self) -> Vec<DeviceId> {
        let mut v: Vec<DeviceId> = self.shared.specs.keys().cloned().collect();
        v.sort();
        v
    }

    /// The spec of a device.
    pub fn spec(&self, device: &DeviceId) -> Option<&Arc<DeviceSpec>> {
        self.shared.specs.get(device)
    }

    /// The twin document of one device (`None` for an unknown device).
    pub fn document(&self, device: &DeviceId) -> Option<DeviceTwin> {
        let spec = self.shared.specs.get(device)?;
        let twin = self.lock();
        let properties = spec
            .tags
            .iter()
            .enumerate()
            .map(|(i, tag)| {
                let (reported, desired, applied) = twin.property(device, i);
                (
                    tag.property.clone(),
                    PropertyTwin {
                        reported,
                        desired,
                        applied,
                        writable: writable(tag),
                    },
                )
            })
            .collect();
        Some(DeviceTwin {
            device: device.clone(),
            properties,
        })
    }

    /// Whether the tunnel to the hub is up.
    pub fn uplink_connected(&self) -> bool {
        self.shared.uplink.load(Ordering::Relaxed)
    }

    /// Subscribes to twin events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TwinEvent> {
        self.shared.events.subscribe()
    }

    /// Sets desired values from a local app: `{property: json value}`. Every value is checked
    /// against its tag (known property, writable, type, range); if any fails, nothing is
    /// changed and every problem is returned. Accepted values are applied at once (written to
    /// the PLC by the downlink, even while the hub is unreachable) and proposed to the hub.
    pub fn set_desired(
        &self,
        device: &DeviceId,
        values: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), SetError> {
        let spec = self
            .shared
            .specs
            .get(device)
            .ok_or_else(|| SetError::UnknownDevice(device.to_string()))?;
        let typed = values::from_json_map(spec, values).map_err(SetError::Invalid)?;
        let change = LocalChange {
            device: device.clone(),
            values: typed,
        };
        self.shared
            .local_changes
            .try_send(change)
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SetError::Unavailable("downlink queue full"),
                mpsc::error::TrySendError::Closed(_) => SetError::Unavailable("agent stopping"),
            })
    }

    /// Publishes an event to local subscribers (no subscriber is fine).
    pub fn emit(&self, event: TwinEvent) {
        if let TwinEvent::Uplink { connected } = event {
            self.shared.uplink.store(connected, Ordering::Relaxed);
        }
        let _ = self.shared.events.send(event);
    }

    /// The twin, locked (for the pipeline and the downlink).
    pub fn lock(&self) -> MutexGuard<'_, Twin> {
        self.shared
            .twin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a tag may be written.
pub fn writable(tag: &TagSpec) -> bool {
    matches!(tag.access, Access::Write | Access::ReadWrite)
        && matches!(
            tag.table,
            crate::model::Table::Coil | crate::model::Table::HoldingRegister
        )
}
