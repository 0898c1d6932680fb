//! How the hub closes a tunnel connection: the QUIC application close codes, and the retry hint
//! it adds when it wants its agents to spread their reconnects (a hub restart, a full hub).
//!
//! The hint travels in the close frame's reason, as `"<text>; retry_within_ms=<n>"`: an agent
//! that understands it waits a random delay in `0..=n` ms before it reconnects (instead of its
//! own backoff), so that a fleet told at the same moment does not come back at the same moment.
//! An agent that does not understand it (or a reason without one) falls back to its backoff.

use std::time::Duration;

/// A normal close (the session ended, the peer said goodbye).
pub const CLOSE_NORMAL: u32 = 0;
/// The peer's identity is not accepted.
pub const CLOSE_FORBIDDEN: u32 = 1;
/// The hub has as many nodes connected as it allows (`max_nodes`).
pub const CLOSE_HUB_FULL: u32 = 2;
/// The hub is shutting down (usually to restart).
pub const CLOSE_HUB_STOPPING: u32 = 3;
/// The certificate the agent authenticated this connection with has expired: reconnect (with
/// the rotated SVID).
pub const CLOSE_CERT_EXPIRED: u32 = 4;
/// The retry hint of a [`CLOSE_CERT_EXPIRED`] close.
pub const CERT_EXPIRED_RETRY_WITHIN: Duration = Duration::from_secs(1);

/// Longest spread a hint may ask for (a longer one is read as this).
pub const MAX_RETRY_WITHIN: Duration = Duration::from_secs(300);

const KEY: &str = "; retry_within_ms=";

/// A close reason: `text` and a hint to reconnect within `within`.
pub fn reason_with_hint(text: &str, within: Duration) -> Vec<u8> {
    format!("{text}{KEY}{}", within.as_millis()).into_bytes()
}

/// The hint in a close reason, if it has one (at most [`MAX_RETRY_WITHIN`]).
pub fn retry_hint(reason: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(reason).ok()?;
    let (_, ms) = text.rsplit_once(KEY)?;
    let ms: u64 = ms.parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_WITHIN))
}

/// How long the hub asks `sessions` agents to spread their reconnects over when it stops:
/// 2 ms per agent (about what the hub spends to take one back in), between 200 ms and 30 s.
pub fn restart_spread(sessions: usize) -> Duration {
    Duration::from_millis((sessions as u64).saturating_mul(2).clamp(200, 30_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_round_trips_and_bad_ones_are_ignored() {
        let r = reason_with_hint("hub shutting down", Duration::from_millis(1500));
        assert_eq!(r, b"hub shutting down; retry_within_ms=1500");
        assert_eq!(retry_hint(&r), Some(Duration::from_millis(1500)));
        assert_eq!(retry_hint(b"bye"), None);
        assert_eq!(retry_hint(b"x; retry_within_ms=-1"), None);
        assert_eq!(retry_hint(b"x; retry_within_ms=12abc"), None);
        assert_eq!(retry_hint(&[0xff, 0xfe]), None);
        assert_eq!(
            retry_hint(b"x; retry_within_ms=99999999999"),
            Some(MAX_RETRY_WITHIN)
        );
        assert_eq!(retry_hint(b"x; retry_within_ms=18446744073709551616"), None);
    }

    #[test]
    fn the_restart_spread_grows_with_the_fleet_within_bounds() {
        assert_eq!(restart_spread(0), Duration::from_millis(200));
        assert_eq!(restart_spread(1000), Duration::from_secs(2));
        assert_eq!(restart_spread(10_000_000), Duration::from_secs(30));
    }
}
