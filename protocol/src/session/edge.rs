//! The edge (agent) end of a session.

use std::collections::VecDeque;

use crate::frame::{
    Ack, Body, ControlAck, DesiredFrame, Goodbye, Hello, Ping, Resend, SUPPORTED_VERSIONS,
    VERSION_DESIRED, Welcome,
};

use super::{Millis, SessionError, negotiate};

/// Settings of the edge session.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Version string sent in hello.
    pub agent_version: String,
    /// Random id of this process run.
    pub boot_id: String,
    /// Send a ping after this much silence.
    pub keepalive_ms: u64,
    /// Give up on the connection after this much silence.
    pub idle_timeout_ms: u64,
    /// Resend unacknowledged records when no ack progressed for this long.
    pub resend_timeout_ms: u64,
    /// Most records in one frame.
    pub max_batch_records: usize,
    /// Most records sent but not yet acknowledged (flow control: the hub's acks pace us).
    pub max_inflight_records: u64,
    /// Last downlink sequence applied (reported in hello).
    pub last_downlink_seq: u64,
    /// Config version running (reported in hello).
    pub config_version: u64,
    /// The outbox's id (reported in hello).
    pub store_id: String,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            agent_version: String::new(),
            boot_id: String::new(),
            store_id: String::new(),
            keepalive_ms: 2_000,
            idle_timeout_ms: 10_000,
            resend_timeout_ms: 5_000,
            max_batch_records: 1024,
            max_inflight_records: 16_384,
            last_downlink_seq: 0,
            config_version: 0,
        }
    }
}

/// Where the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeState {
    /// No transport.
    Disconnected,
    /// Hello sent, waiting for welcome.
    AwaitWelcome,
    /// Streaming records.
    Ready {
        /// Negotiated protocol version.
        version: u32,
    },
    /// Closed with an error; the driver drops the transport and reconnects later.
    Closed(SessionError),
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// A control frame.
    Frame(Body),
    /// Read `count` records starting at `first_seq` from the outbox and send them as one
    /// [`Records`](crate::frame::Records) frame.
    Records {
        /// First sequence number.
        first_seq: u64,
        /// How many.
        count: usize,
    },
    /// (Version 2) Read control records `first_seq .. first_seq + count` from the control log
    /// and send each as a [`Control`](crate::frame::Control) frame.
    Control {
        /// First control sequence number.
        first_seq: u64,
        /// How many.
        count: usize,
    },
}

/// What happened, for the driver to act on.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum EdgeEvent {
    /// The hub welcomed us.
    Welcomed {
        /// Negotiated version.
        version: u32,
        /// What the hub had stored.
        stored_seq: u64,
    },
    /// Every record up to `upto` is stored by the hub: delete them from the outbox.
    Acked {
        /// Highest acknowledged sequence number.
        upto: u64,
    },
    /// The hub has stored records the outbox no longer knows (the outbox was lost or restored
    /// from an older backup): the outbox must number the records it holds from `next_seq` on
    /// (they are not acknowledged) and tell the session with `handle_appended`.
    Rebased {
        /// The next sequence number to assign.
        next_seq: u64,
    },
    /// The hub is missing records `from..=to` that the outbox no longer has.
    Gap {
        /// First missing.
        from: u64,
        /// Last missing.
        to: u64,
    },
    /// (Version 2) The hub sent a desired value. Versions arrive in increasing order; the
    /// driver takes over only versions above the last one it persisted.
    Desired(DesiredFrame),
    /// (Version 2) Every control record up to `upto` is stored by the hub: delete them.
    ControlAcked {
        /// Highest acknowledged control sequence number.
        upto: u64,
    },
    /// (Version 2) The hub has stored control records the edge no longer knows (its store was
    /// lost): number the next control record `next_seq`.
    ControlRebased {
        /// The next control sequence number to assign.
        next_seq: u64,
    },
    /// The session closed.
    Closed(SessionError),
}

/// Most control records in one burst of transmits.
const CONTROL_BATCH: u64 = 64;

/// The edge end of a session. See the [module docs](super) for the calling order.
#[derive(Debug)]
pub struct EdgeSession {
    cfg: EdgeConfig,
    state: EdgeState,
    /// Highest sequence number the hub acknowledged.
    acked: u64,
    /// Next sequence number the outbox will assign: records `acked+1 .. next_seq` are pending.
    next_seq: u64,
    /// Next sequence number to transmit.
    send_from: u64,
    last_rx: Millis,
    connected_at: Millis,
    last_progress: Millis,
    ping_outstanding: bool,
    nonce: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<EdgeEvent>,
    /// Highest control sequence number the hub acknowledged.
    ctl_acked: u64,
    /// Next control sequence number the control log will assign.
    ctl_next: u64,
    /// Next control sequence number to transmit.
    ctl_send_from: u64,
}

impl EdgeSession {
    /// A session over an outbox that holds records `acked+1 .. next_seq`.
    pub fn new(cfg: EdgeConfig, acked: u64, next_seq: u64) -> Self {
        let next_seq = next_seq.max(acked + 1);
        EdgeSession {
            cfg,
            state: EdgeState::Disconnected,
            acked,
            next_seq,
            send_from: acked + 1,
            last_rx: 0,
            connected_at: 0,
            last_progress: 0,
            ping_outstanding: false,
            nonce: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            ctl_acked: 0,
            ctl_next: 1,
            ctl_send_from: 1,
        }
    }

    /// Sets the control log's state: records `acked+1 .. next_seq` are pending. Call before
    /// the first connection.
    pub fn with_control(mut self, acked: u64, next_seq: u64) -> Self {
        self.ctl_acked = acked;
        self.ctl_next = next_seq.max(acked + 1);
        self.ctl_send_from = acked + 1;
        self
    }

    /// The negotiated protocol version, while ready.
    pub fn version(&self) -> Option<u32> {
        match self.state {
            EdgeState::Ready { version } => Some(version),
            _ => None,
        }
    }

    /// Whether desired values, control records and schemas may be exchanged (ready, and
    /// version 2 or later negotiated).
    pub fn desired_enabled(&self) -> bool {
        self.version().is_some_and(|v| v >= VERSION_DESIRED)
    }

    /// The highest desired version the edge has taken over (sent in the next hello).
    pub fn set_last_downlink(&mut self, version: u64) {
        self.cfg.last_downlink_seq = version;
    }

    /// The control log appended records: it will number the next one `next_seq`.
    pub fn handle_control_appended(&mut self, next_seq: u64) {
        if next_seq > self.ctl_next {
            self.ctl_next = next_seq;
        }
    }

    /// Control records not yet acknowledged.
    pub fn control_backlog(&self) -> u64 {
        self.ctl_next - self.ctl_acked - 1
    }

    /// Queues a frame the driver composed (a schema). Ignored unless ready.
    pub fn queue_frame(&mut self, body: Body) {
        if matches!(self.state, EdgeState::Ready { .. }) {
            self.transmits.push_back(Transmit::Frame(body));
        }
    }

    /// Current state.
    pub fn state(&self) -> &EdgeState {
        &self.state
    }

    /// Highest sequence number acknowledged by the hub.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.next_seq - self.acked - 1
    }

    /// Records sent but not yet acknowledged.
    pub fn inflight(&self) -> u64 {
        self.send_from - self.acked - 1
    }

    /// The transport is up: queues hello.
    pub fn handle_connected(&mut self, now: Millis) {
        self.state = EdgeState::AwaitWelcome;
        self.transmits.clear();
        self.send_from = self.acked + 1;
        self.ctl_send_from = self.ctl_acked + 1;
        self.last_rx = now;
        self.connected_at = now;
        self.last_progress = now;
        self.ping_outstanding = false;
        // Always the first record we can send, even with nothing to send: the hub learns of
        // records lost below it (a full outbox, or a hub store rolled back behind our acks).
        let oldest_seq = self.acked + 1;
        self.transmits.push_back(Transmit::Frame(Body::Hello(Hello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            agent_version: self.cfg.agent_version.clone(),
            boot_id: self.cfg.boot_id.clone(),
            next_seq: self.next_seq,
            last_downlink_seq: self.cfg.last_downlink_seq,
            config_version: self.cfg.config_version,
            backlog: self.backlog(),
            oldest_seq,
            store_id: self.cfg.store_id.clone(),
            control_oldest_seq: self.ctl_acked + 1,
        })));
    }

    /// The transport is gone: in-flight records return to pending and will be replayed.
    pub fn handle_disconnected(&mut self) {
        self.state = EdgeState::Disconnected;
        self.transmits.clear();
        self.send_from = self.acked + 1;
        self.ctl_send_from = self.ctl_acked + 1;
        self.ping_outstanding = false;
    }

    /// The outbox no longer holds records up to `upto` (dropped or refused when it was full):
    /// they count as handled and are never sent. The hub learns of them from the next hello
    /// (its `oldest_seq`), so the driver reconnects after calling this.
    pub fn handle_lost(&mut self, upto: u64) {
        if upto > self.acked {
            self.acked = upto;
        }
        self.next_seq = self.next_seq.max(self.acked + 1);
        self.send_from = self.send_from.max(self.acked + 1);
    }

    /// The outbox accepted records: it will number the next one `next_seq`.
    pub fn handle_appended(&mut self, next_seq: u64) {
        if next_seq > self.next_seq {
            self.next_seq = next_seq;
        }
    }

    fn close(&mut self, err: SessionError) -> Result<(), SessionError> {
        self.state = EdgeState::Closed(err.clone());
        self.transmits.clear();
        self.send_from = self.acked + 1;
        self.ctl_send_from = self.ctl_acked + 1;
        self.events.push_back(EdgeEvent::Closed(err.clone()));
        Err(err)
    }

    /// A frame arrived from the hub.
    ///
    /// An error closes the session (also reported as [`EdgeEvent::Closed`]); the driver drops
    /// the transport.
    pub fn handle_frame(&mut self, body: Body, now: Millis) -> Result<(), SessionError> {
        if matches!(self.state, EdgeState::Disconnected | EdgeState::Closed(_)) {
            return Ok(());
        }
        self.last_rx = now;
        self.ping_outstanding = false;
        match body {
            Body::Welcome(w) => self.on_welcome(w, now),
            Body::Ack(Ack { stored_seq }) => self.on_ack(stored_seq, now),
            Body::Resend(Resend { from_seq }) => {
                self.require_ready("resend")?;
                if from_seq > self.send_from || from_seq == 0 {
                    return self.close(SessionError::Violation(format!(
                        "resend from {from_seq}, but only {} were sent",
                        self.send_from - 1
                    )));
                }
                self.send_from = self.send_from.min(from_seq.max(self.acked + 1));
                self.last_progress = now;
                Ok(())
            }
            Body::Ping(p) => {
                self.transmits.push_back(Transmit::Frame(Body::Pong(p)));
                Ok(())
            }
            Body::Pong(_) => Ok(()),
            Body::Goodbye(Goodbye { reason }) => self.close(SessionError::PeerClosed(reason)),
            Body::Desired(d) => {
                self.require_desired("desired")?;
                self.events.push_back(EdgeEvent::Desired(d));
                Ok(())
            }
            Body::ControlAck(ControlAck { upto }) => {
                self.require_desired("control ack")?;
                if upto >= self.ctl_send_from {
                    return self.close(SessionError::Violation(format!(
                        "control ack of {upto}, but only {} were sent",
                        self.ctl_send_from - 1
                    )));
                }
                if upto > self.ctl_acked {
                    self.ctl_acked = upto;
                    self.events.push_back(EdgeEvent::ControlAcked { upto });
                }
                Ok(())
            }
            Body::Hello(_) | Body::Records(_) | Body::Control(_) | Body::Schema(_) => self.close(
                SessionError::Violation("hub sent an edge-only frame".into()),
            ),
        }
    }

    fn require_desired(&mut self, what: &str) -> Result<(), SessionError> {
        self.require_ready(what)?;
        if self.desired_enabled() {
            Ok(())
        } else {
            self.close(SessionError::Violation(format!(
                "{what} in protocol version 1"
            )))
        }
    }

    fn require_ready(&mut self, what: &str) -> Result<(), SessionError> {
        if matches!(self.state, EdgeState::Ready { .. }) {
            Ok(())
        } else {
            self.close(SessionError::Violation(format!("{what} before welcome")))
        }
    }

    fn on_welcome(&mut self, w: Welcome, now: Millis) -> Result<(), SessionError> {
        if self.state != EdgeState::AwaitWelcome {
            return self.close(SessionError::Violation("second welcome".into()));
        }
        if negotiate(SUPPORTED_VERSIONS, &[w.version]).is_none() {
            return self.close(SessionError::Incompatible {
                ours: SUPPORTED_VERSIONS.to_vec(),
                theirs: vec![w.version],
            });
        }
        self.state = EdgeState::Ready { version: w.version };
        self.last_progress = now;
        let stored = w.stored_seq;
        self.events.push_back(EdgeEvent::Welcomed {
            version: w.version,
            stored_seq: stored,
        });
        if stored >= self.next_seq {
            // The hub knows more than our outbox: ours was lost. Continue after the hub.
            // Not an ack: the hub's records up to `stored` are another history than what
            // the outbox holds under those numbers, which must be renumbered, not deleted.
            self.acked = stored;
            self.next_seq = stored + 1;
            self.events.push_back(EdgeEvent::Rebased {
                next_seq: self.next_seq,
            });
        } else if stored > self.acked {
            self.acked = stored;
            self.events.push_back(EdgeEvent::Acked { upto: stored });
        } else if stored < self.acked {
            self.events.push_back(EdgeEvent::Gap {
                from: stored + 1,
                to: self.acked,
            });
        }
        self.send_from = self.acked + 1;
        if w.version >= VERSION_DESIRED {
            let stored = w.control_seq;
            if stored >= self.ctl_next {
                // The hub knows control records we do not: ours are renumbered after them
                // (not acknowledged: see `Rebased`).
                self.ctl_acked = stored;
                self.ctl_next = stored + 1;
                self.events.push_back(EdgeEvent::ControlRebased {
                    next_seq: self.ctl_next,
                });
            } else if stored > self.ctl_acked {
                self.ctl_acked = stored;
                self.events
                    .push_back(EdgeEvent::ControlAcked { upto: stored });
            }
            self.ctl_send_from = self.ctl_acked + 1;
        }
        Ok(())
    }

    fn on_ack(&mut self, stored: u64, now: Millis) -> Result<(), SessionError> {
        self.require_ready("ack")?;
        if stored >= self.send_from {
            return self.close(SessionError::Violation(format!(
                "ack of {stored}, but only {} were sent",
                self.send_from - 1
            )));
        }
        if stored > self.acked {
            self.acked = stored;
            self.last_progress = now;
            self.events.push_back(EdgeEvent::Acked { upto: stored });
        }
        Ok(())
    }

    /// Time passed: keep-alives, idle timeout, resend timer.
    pub fn handle_timeout(&mut self, now: Millis) {
        let live = matches!(
            self.state,
            EdgeState::AwaitWelcome | EdgeState::Ready { .. }
        );
        if !live {
            return;
        }
        let silent = now.saturating_sub(self.last_rx);
        if silent >= self.cfg.idle_timeout_ms {
            let _ = self.close(SessionError::IdleTimeout(silent));
            return;
        }
        let waited = now.saturating_sub(self.connected_at);
        if self.state == EdgeState::AwaitWelcome && waited >= self.cfg.idle_timeout_ms {
            let _ = self.close(SessionError::HandshakeTimeout(waited));
            return;
        }
        if silent >= self.cfg.keepalive_ms && !self.ping_outstanding {
            self.ping_outstanding = true;
            self.nonce += 1;
            self.transmits
                .push_back(Transmit::Frame(Body::Ping(Ping { nonce: self.nonce })));
        }
        if self.inflight() > 0
            && now.saturating_sub(self.last_progress) >= self.cfg.resend_timeout_ms
        {
            self.send_from = self.acked + 1;
            self.last_progress = now;
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if !matches!(
            self.state,
            EdgeState::AwaitWelcome | EdgeState::Ready { .. }
        ) {
            return None;
        }
        let mut t = self.last_rx + self.cfg.idle_timeout_ms;
        if self.state == EdgeState::AwaitWelcome {
            t = t.min(self.connected_at + self.cfg.idle_timeout_ms);
        }
        if !self.ping_outstanding {
            t = t.min(self.last_rx + self.cfg.keepalive_ms);
        }
        if self.inflight() > 0 {
            t = t.min(self.last_progress + self.cfg.resend_timeout_ms);
        }
        Some(t)
    }

    /// The next thing to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.transmits.pop_front() {
            return Some(t);
        }
        if !matches!(self.state, EdgeState::Ready { .. }) {
            return None;
        }
        // Control records first: few, small, and an operator is waiting for them.
        if self.desired_enabled() && self.ctl_send_from < self.ctl_next {
            let count = (self.ctl_next - self.ctl_send_from).min(CONTROL_BATCH);
            let first_seq = self.ctl_send_from;
            self.ctl_send_from += count;
            return Some(Transmit::Control {
                first_seq,
                count: count as usize,
            });
        }
        let pending = self.next_seq.saturating_sub(self.send_from);
        let window = self
            .cfg
            .max_inflight_records
            .saturating_sub(self.inflight());
        let count = pending.min(window).min(self.cfg.max_batch_records as u64);
        if count == 0 {
            return None;
        }
        let first_seq = self.send_from;
        self.send_from += count;
        Some(Transmit::Records {
            first_seq,
            count: count as usize,
        })
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<EdgeEvent> {
        self.events.pop_front()
    }
}
