//! Session state machines of both ends of the tunnel.
//!
//! Both are driven the same way (as quinn-proto's `Connection`): the driver calls `handle_*`
//! with what happened (a frame arrived, the transport came up or went down, a timer fired, the
//! outbox grew, the store committed) and then drains `poll_transmit`, `poll_event` and
//! `poll_timeout` until they return `None`, acting on each result. Time is a monotonic
//! millisecond counter ([`Millis`]) supplied by the driver.
//!
//! Delivery is at least once on the wire and exactly once in effect:
//! - every record has a per-node uplink sequence number assigned by the edge's outbox;
//! - the hub accepts only the next expected sequence number; duplicates are dropped, a gap is
//!   answered with [`Resend`](crate::frame::Resend);
//! - the hub acknowledges cumulatively, and only what its store committed durably;
//! - the edge deletes records only once acknowledged; after a reconnect it resumes from the
//!   sequence number the hub reports in its welcome.

mod edge;
mod hub;
#[cfg(test)]
mod sim;

pub use edge::{EdgeConfig, EdgeEvent, EdgeSession, EdgeState, Transmit};
pub use hub::{HubConfig, HubEvent, HubSession, HubState, PeerHello};

/// Monotonic time in milliseconds, from an origin the driver chooses.
pub type Millis = u64;

/// Why a session ended or refused a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer sent a frame that is not allowed in the current state.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// No protocol version in common.
    #[error("no common protocol version (ours {ours:?}, theirs {theirs:?})")]
    Incompatible {
        /// Versions we speak.
        ours: Vec<u32>,
        /// Versions the peer speaks.
        theirs: Vec<u32>,
    },
    /// Nothing was received for longer than the idle timeout.
    #[error("peer silent for {0} ms")]
    IdleTimeout(u64),
    /// The handshake (hello/welcome) did not complete in time.
    #[error("handshake not completed after {0} ms")]
    HandshakeTimeout(u64),
    /// The peer closed the session.
    #[error("peer said goodbye: {0}")]
    PeerClosed(String),
    /// A record in a frame is invalid.
    #[error("invalid record: {0}")]
    InvalidRecord(String),
}

/// Picks the highest version both sides speak.
pub fn negotiate(ours: &[u32], theirs: &[u32]) -> Option<u32> {
    ours.iter().copied().filter(|v| theirs.contains(v)).max()
}
