//! SPIFFE ID conventions of edgesync.
//!
//! - an agent is `spiffe://<trust-domain>/edge/<node-id>`;
//! - the hub is `spiffe://<trust-domain>/hub` unless configured otherwise.
//!
//! The node id is always taken from the peer's SVID, never from a message.

pub use spiffe::{SpiffeId, TrustDomain};

use crate::ids::NodeId;

/// Path prefix of edge identities.
pub const EDGE_PATH_PREFIX: &str = "/edge/";
/// Path of the default hub identity.
pub const HUB_PATH: &str = "/hub";

/// Why a peer's SPIFFE ID is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerIdError {
    /// The string is not a SPIFFE ID.
    #[error("{id:?} is not a SPIFFE ID: {reason}")]
    NotSpiffe {
        /// What was given.
        id: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The peer belongs to another trust domain.
    #[error("peer {id} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The peer id.
        id: String,
        /// Our trust domain.
        expected: String,
    },
    /// The path is not `/edge/<node>`.
    #[error("peer {id} is not an edge identity (expected spiffe://{td}/edge/<node>)")]
    NotEdge {
        /// The peer id.
        id: String,
        /// Our trust domain.
        td: String,
    },
    /// The node part is not a valid node id.
    #[error("peer {id}: {reason}")]
    BadNode {
        /// The peer id.
        id: String,
        /// Why the node id is invalid.
        reason: String,
    },
    /// The peer is not the expected one.
    #[error("peer {id} is not the expected {expected}")]
    Unexpected {
        /// The peer id.
        id: String,
        /// The id we accept.
        expected: String,
    },
}

/// Parses a trust domain name (`example.org`).
pub fn trust_domain(name: &str) -> Result<TrustDomain, PeerIdError> {
    TrustDomain::new(name).map_err(|e| PeerIdError::NotSpiffe {
        id: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses a SPIFFE ID.
pub fn parse_id(id: &str) -> Result<SpiffeId, PeerIdError> {
    SpiffeId::new(id).map_err(|e| PeerIdError::NotSpiffe {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

/// The SPIFFE ID of an edge node.
pub fn edge_id(td: &TrustDomain, node: &NodeId) -> String {
    format!(
        "spiffe://{}{}{}",
        td.as_str(),
        EDGE_PATH_PREFIX,
        node.as_str()
    )
}

/// The default SPIFFE ID of the hub.
pub fn hub_id(td: &TrustDomain) -> String {
    format!("spiffe://{}{}", td.as_str(), HUB_PATH)
}

/// Accepts `spiffe://<td>/edge/<node>` of our trust domain and returns the node id.
pub fn node_from_edge_id(id: &SpiffeId, td: &TrustDomain) -> Result<NodeId, PeerIdError> {
    let text = id.to_string();
    if !id.is_member_of(td) {
        return Err(PeerIdError::ForeignTrustDomain {
            id: text,
            expected: td.as_str().to_owned(),
        });
    }
    let node = id
        .path()
        .strip_prefix(EDGE_PATH_PREFIX)
        .filter(|rest| !rest.contains('/'))
        .ok_or_else(|| PeerIdError::NotEdge {
            id: text.clone(),
            td: td.as_str().to_owned(),
        })?;
    NodeId::new(node).map_err(|e| PeerIdError::BadNode {
        id: text,
        reason: e.to_string(),
    })
}

/// Accepts exactly `expected`.
pub fn expect_id(id: &SpiffeId, expected: &SpiffeId) -> Result<(), PeerIdError> {
    if id == expected {
        Ok(())
    } else {
        Err(PeerIdError::Unexpected {
            id: id.to_string(),
            expected: expected.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_ids() {
        let td = trust_domain("example.org").unwrap();
        let ok = parse_id("spiffe://example.org/edge/gw-1").unwrap();
        assert_eq!(node_from_edge_id(&ok, &td).unwrap().as_str(), "gw-1");
        let foreign = parse_id("spiffe://evil.org/edge/gw-1").unwrap();
        assert!(matches!(
            node_from_edge_id(&foreign, &td),
            Err(PeerIdError::ForeignTrustDomain { .. })
        ));
        for bad in [
            "spiffe://example.org/hub",
            "spiffe://example.org/edge/gw-1/x",
            "spiffe://example.org/edgy/gw-1",
            "spiffe://example.org/edge",
        ] {
            let id = parse_id(bad).unwrap();
            assert!(
                matches!(
                    node_from_edge_id(&id, &td),
                    Err(PeerIdError::NotEdge { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            edge_id(&td, &NodeId::new("gw-1").unwrap()),
            "spiffe://example.org/edge/gw-1"
        );
        assert_eq!(hub_id(&td), "spiffe://example.org/hub");
        assert!(parse_id("https://example.org/edge/x").is_err());
    }
}
