//! The hub end of a session.

use std::collections::VecDeque;

use crate::frame::{
    Ack, Body, Control, ControlAck, DesiredFrame, DeviceSchema, Goodbye, Hello, Records, Resend,
    SUPPORTED_VERSIONS, VERSION_DESIRED, Welcome, samples_from_wire_with,
};
use crate::ids::NodeId;
use crate::value::Sample;

use super::{Millis, SessionError, negotiate};

/// Longest string field of a hello (agent version, boot id, store id), in bytes.
pub const MAX_HELLO_STRING: usize = 256;
/// Most protocol versions a hello may list.
pub const MAX_HELLO_VERSIONS: usize = 16;

/// Settings of the hub session.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Version string sent in welcome.
    pub hub_version: String,
    /// Close the session after this much silence (the edge pings more often).
    pub idle_timeout_ms: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            hub_version: String::new(),
            idle_timeout_ms: 10_000,
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubState {
    /// Waiting for hello.
    AwaitHello,
    /// Receiving records.
    Ready {
        /// Negotiated version.
        version: u32,
    },
    /// Closed; the driver drops the connection.
    Closed(SessionError),
}

/// What the edge said about itself in hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    /// Agent version string.
    pub agent_version: String,
    /// Agent process run id.
    pub boot_id: String,
    /// Negotiated protocol version.
    pub version: u32,
    /// Records waiting in the agent's outbox.
    pub backlog: u64,
    /// Config version the agent runs.
    pub config_version: u64,
    /// Last downlink sequence the agent applied.
    pub last_downlink_seq: u64,
    /// The agent's outbox id (empty from older agents).
    pub store_id: String,
}

/// What happened, for the driver to act on.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum HubEvent {
    /// The edge introduced itself.
    Hello(PeerHello),
    /// Records `first_seq ..` must be committed durably, then reported with
    /// [`HubSession::handle_stored`].
    Store {
        /// Sequence number of the first record.
        first_seq: u64,
        /// The records, validated.
        samples: Vec<Sample>,
    },
    /// Records `from..=to` are lost for good (the edge no longer has them): record the gap
    /// durably (it counts as stored), then call [`HubSession::handle_stored`] with `to`.
    Gap {
        /// First lost.
        from: u64,
        /// Last lost.
        to: u64,
    },
    /// Records that were already accepted arrived again and were dropped.
    Duplicates {
        /// How many.
        count: u64,
    },
    /// The edge reported its backlog.
    Backlog(u64),
    /// (Version 2) A new control record: store it durably, then call
    /// [`HubSession::handle_control_stored`] with its sequence number.
    Control(Control),
    /// (Version 2) The edge described one of its devices.
    Schema(DeviceSchema),
    /// (Version 2) Control records `from..=to` are lost for good (the hub's store is behind
    /// the edge's acknowledgements): store that the node's control log continues after `to`,
    /// then call [`HubSession::handle_control_stored`] with `to`.
    ControlGap {
        /// First lost.
        from: u64,
        /// Last lost.
        to: u64,
    },
    /// The session closed.
    Closed(SessionError),
}

/// The hub end of one node's session. See the [module docs](super) for the calling order.
#[derive(Debug)]
pub struct HubSession {
    cfg: HubConfig,
    node: NodeId,
    state: HubState,
    /// Highest sequence number durably stored.
    stored: u64,
    /// Highest sequence number handed to the store (stored or being stored).
    accepted: u64,
    last_rx: Millis,
    created_at: Millis,
    transmits: VecDeque<Body>,
    events: VecDeque<HubEvent>,
    /// Highest control sequence number durably stored.
    ctl_stored: u64,
    /// Highest control sequence number handed to the store.
    ctl_accepted: u64,
    /// The node's ids validated so far.
    ids: crate::frame::IdCache,
}

impl HubSession {
    /// A session for `node` (taken from its certificate) whose store holds records up to
    /// `stored_seq`.
    pub fn new(cfg: HubConfig, node: NodeId, stored_seq: u64, now: Millis) -> Self {
        HubSession {
            cfg,
            node,
            state: HubState::AwaitHello,
            stored: stored_seq,
            accepted: stored_seq,
            last_rx: now,
            created_at: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            ctl_stored: 0,
            ctl_accepted: 0,
            ids: crate::frame::IdCache::default(),
        }
    }

    /// Sets the last control record the store holds for this node. Call before hello.
    pub fn with_control_stored(mut self, seq: u64) -> Self {
        self.ctl_stored = seq;
        self.ctl_accepted = seq;
        self
    }

    /// The negotiated protocol version, once hello arrived.
    pub fn version(&self) -> Option<u32> {
        match self.state {
            HubState::Ready { version } => Some(version),
            _ => None,
        }
    }

    /// Whether desired values may be sent (ready, version 2 or later).
    pub fn desired_enabled(&self) -> bool {
        self.version().is_some_and(|v| v >= VERSION_DESIRED)
    }

    /// Queues a desired value for the edge. Returns false (queuing nothing) unless
    /// [`desired_enabled`](Self::desired_enabled); the driver sends versions in order.
    pub fn send_desired(&mut self, d: DesiredFrame) -> bool {
        if !self.desired_enabled() {
            return false;
        }
        self.transmits.push_back(Body::Desired(d));
        true
    }

    /// The store durably holds control records up to `upto`.
    pub fn handle_control_stored(&mut self, upto: u64) {
        if upto > self.ctl_stored {
            self.ctl_stored = upto;
            self.ctl_accepted = self.ctl_accepted.max(upto);
            if matches!(self.state, HubState::Ready { .. }) {
                self.transmits
                    .push_back(Body::ControlAck(ControlAck { upto }));
            }
        }
    }

    /// The node this session serves.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Current state.
    pub fn state(&self) -> &HubState {
        &self.state
    }

    /// Highest sequence number durably stored.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    fn close(&mut self, err: SessionError, tell_peer: bool) -> Result<(), SessionError> {
        self.state = HubState::Closed(err.clone());
        self.transmits.clear();
        if tell_peer {
            self.transmits.push_back(Body::Goodbye(Goodbye {
                reason: err.to_string(),
            }));
        }
        self.events.push_back(HubEvent::Closed(err.clone()));
        Err(err)
    }

    /// A frame arrived from the edge. An error closes the session; frames still queued (a
    /// goodbye) should be sent before the connection is dropped.
    pub fn handle_frame(&mut self, body: Body, now: Millis) -> Result<(), SessionError> {
        if matches!(self.state, HubState::Closed(_)) {
            return Ok(());
        }
        self.last_rx = now;
        match body {
            Body::Hello(h) => self.on_hello(h),
            Body::Records(r) => self.on_records(r),
            Body::Ping(p) => {
                self.transmits.push_back(Body::Pong(p));
                Ok(())
            }
            Body::Pong(_) => Ok(()),
            Body::Goodbye(Goodbye { reason }) => {
                self.close(SessionError::PeerClosed(reason), false)
            }
            Body::Control(c) => self.on_control(c),
            Body::Schema(schema) => {
                self.require_desired("schema")?;
                self.events.push_back(HubEvent::Schema(schema));
                Ok(())
            }
            Body::Welcome(_)
            | Body::Ack(_)
            | Body::Resend(_)
            | Body::Desired(_)
            | Body::ControlAck(_) => self.close(
                SessionError::Violation("edge sent a hub-only frame".into()),
                true,
            ),
        }
    }

    fn require_desired(&mut self, what: &str) -> Result<(), SessionError> {
        if self.desired_enabled() {
            Ok(())
        } else {
            self.close(
                SessionError::Violation(format!("{what} before hello or in version 1")),
                true,
            )
        }
    }

    fn on_control(&mut self, c: Control) -> Result<(), SessionError> {
        self.require_desired("control record")?;
        if c.seq == 0 {
            return self.close(SessionError::Violation("control sequence 0".into()), true);
        }
        if c.seq <= self.ctl_accepted {
            // Already taken: re-ack so an edge that lost our ack makes progress.
            self.transmits.push_back(Body::ControlAck(ControlAck {
                upto: self.ctl_stored,
            }));
            return Ok(());
        }
        if c.seq != self.ctl_accepted + 1 {
            return self.close(
                SessionError::Violation(format!(
                    "control record {} after {}",
                    c.seq, self.ctl_accepted
                )),
                true,
            );
        }
        if c.kind.is_none() {
            return self.close(
                SessionError::InvalidRecord(format!("control record {} has no body", c.seq)),
                true,
            );
        }
        self.ctl_accepted = c.seq;
        self.events.push_back(HubEvent::Control(c));
        Ok(())
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), SessionError> {
        if self.state != HubState::AwaitHello {
            return self.close(SessionError::Violation("second hello".into()), true);
        }
        // Its strings are stored and served by the hub: bounded.
        for (field, text) in [
            ("agent_version", &h.agent_version),
            ("boot_id", &h.boot_id),
            ("store_id", &h.store_id),
        ] {
            if text.len() > MAX_HELLO_STRING {
                return self.close(
                    SessionError::Violation(format!(
                        "hello: {field} of {} bytes (at most {MAX_HELLO_STRING})",
                        text.len()
                    )),
                    true,
                );
            }
        }
        if h.versions.len() > MAX_HELLO_VERSIONS {
            return self.close(
                SessionError::Violation(format!(
                    "hello: {} protocol versions (at most {MAX_HELLO_VERSIONS})",
                    h.versions.len()
                )),
                true,
            );
        }
        let Some(version) = negotiate(SUPPORTED_VERSIONS, &h.versions) else {
            return self.close(
                SessionError::Incompatible {
                    ours: SUPPORTED_VERSIONS.to_vec(),
                    theirs: h.versions,
                },
                true,
            );
        };
        self.state = HubState::Ready { version };
        self.events.push_back(HubEvent::Hello(PeerHello {
            agent_version: h.agent_version,
            boot_id: h.boot_id,
            version,
            backlog: h.backlog,
            config_version: h.config_version,
            last_downlink_seq: h.last_downlink_seq,
            store_id: h.store_id.clone(),
        }));
        self.transmits.push_back(Body::Welcome(Welcome {
            version,
            stored_seq: self.stored,
            hub_version: self.cfg.hub_version.clone(),
            node: self.node.as_str().to_owned(),
            control_seq: if version >= VERSION_DESIRED {
                self.ctl_stored
            } else {
                0
            },
        }));
        // Control records below the edge's oldest are gone too: continue after them.
        if version >= VERSION_DESIRED && h.control_oldest_seq > self.ctl_accepted + 1 {
            let (from, to) = (self.ctl_accepted + 1, h.control_oldest_seq - 1);
            self.ctl_accepted = to;
            self.events.push_back(HubEvent::ControlGap { from, to });
        }
        // Records below the edge's oldest are gone for good: account for them as a gap.
        if h.oldest_seq > self.accepted + 1 {
            let (from, to) = (self.accepted + 1, h.oldest_seq - 1);
            self.accepted = to;
            self.events.push_back(HubEvent::Gap { from, to });
        }
        Ok(())
    }

    fn on_records(&mut self, r: Records) -> Result<(), SessionError> {
        if !matches!(self.state, HubState::Ready { .. }) {
            return self.close(SessionError::Violation("records before hello".into()), true);
        }
        self.events.push_back(HubEvent::Backlog(r.backlog));
        let n = r.samples.len() as u64;
        if n == 0 {
            return Ok(());
        }
        if r.first_seq == 0 {
            return self.close(SessionError::Violation("record sequence 0".into()), true);
        }
        let Some(last) = r.first_seq.checked_add(n - 1) else {
            return self.close(SessionError::Violation("sequence overflow".into()), true);
        };
        if r.first_seq > self.accepted + 1 {
            // A gap (frames lost or reordered): ask for what we miss; drop this one.
            self.transmits.push_back(Body::Resend(Resend {
                from_seq: self.accepted + 1,
            }));
            return Ok(());
        }
        if last <= self.accepted {
            self.events.push_back(HubEvent::Duplicates { count: n });
            // Re-ack so an edge that lost our ack makes progress.
            self.transmits.push_back(Body::Ack(Ack {
                stored_seq: self.stored,
            }));
            return Ok(());
        }
        let skip = (self.accepted + 1 - r.first_seq) as usize;
        if skip > 0 {
            self.events
                .push_back(HubEvent::Duplicates { count: skip as u64 });
        }
        let fresh: Vec<_> = r.samples.into_iter().skip(skip).collect();
        let samples = match samples_from_wire_with(fresh, &mut self.ids) {
            Ok(s) => s,
            Err(e) => return self.close(SessionError::InvalidRecord(e.to_string()), true),
        };
        let first_seq = self.accepted + 1;
        self.accepted = last;
        self.events
            .push_back(HubEvent::Store { first_seq, samples });
        Ok(())
    }

    /// The store committed records (or a gap) up to and including `upto`, durably.
    pub fn handle_stored(&mut self, upto: u64) {
        if upto > self.stored {
            self.stored = upto;
            self.accepted = self.accepted.max(upto);
            if matches!(self.state, HubState::Ready { .. }) {
                self.transmits
                    .push_back(Body::Ack(Ack { stored_seq: upto }));
            }
        }
    }

    /// A commit failed: records after `stored` must be received again. The session closes so
    /// the edge reconnects and resends from what is really stored.
    pub fn handle_store_failed(&mut self, reason: String) {
        let _ = self.close(
            SessionError::Violation(format!("store failed: {reason}")),
            true,
        );
    }

    /// Time passed: idle timeout.
    pub fn handle_timeout(&mut self, now: Millis) {
        if matches!(self.state, HubState::Closed(_)) {
            return;
        }
        let silent = now.saturating_sub(self.last_rx);
        if silent >= self.cfg.idle_timeout_ms {
            let _ = self.close(SessionError::IdleTimeout(silent), true);
            return;
        }
        let waited = now.saturating_sub(self.created_at);
        if self.state == HubState::AwaitHello && waited >= self.cfg.idle_timeout_ms {
            let _ = self.close(SessionError::HandshakeTimeout(waited), true);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        match self.state {
            HubState::Closed(_) => None,
            HubState::AwaitHello => Some(
                (self.last_rx + self.cfg.idle_timeout_ms)
                    .min(self.created_at + self.cfg.idle_timeout_ms),
            ),
            HubState::Ready { .. } => Some(self.last_rx + self.cfg.idle_timeout_ms),
        }
    }

    /// The next frame to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Body> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }
}
