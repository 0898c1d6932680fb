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
    /// The path is not `<prefix><node>` (`/edge/<node>` by default).
    #[error("peer {id} is not an edge identity (expected spiffe://{td}{prefix}<node>)")]
    NotEdge {
        /// The peer id.
        id: String,
        /// Its trust domain.
        td: String,
        /// The accepted path prefix.
        prefix: String,
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
    NodeIds::new(td.clone()).node(id)
}

/// Checks a node path prefix (see [`NodeIds::with_prefix`]); returns what is wrong.
pub fn check_path_prefix(prefix: &str) -> Result<(), String> {
    let inner = prefix
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix('/'))
        .ok_or_else(|| format!("{prefix:?} must start and end with '/' (e.g. \"/edge/\")"))?;
    let bad_segment = |seg: &str| {
        seg.is_empty()
            || seg == "."
            || seg == ".."
            || !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    if inner.is_empty() || inner.split('/').any(bad_segment) {
        return Err(format!(
            "{prefix:?} is not a SPIFFE path prefix: segments of letters, digits, '.', '-', '_'"
        ));
    }
    Ok(())
}

/// Which SPIFFE IDs the hub accepts as nodes: `spiffe://<td><prefix><node>`, where `<td>` is
/// its own trust domain or one of the federated domains it was configured to accept nodes
/// from, and `<prefix>` is `/edge/` unless configured otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIds {
    /// Our own trust domain first.
    domains: Vec<TrustDomain>,
    prefix: String,
}

impl NodeIds {
    /// Nodes of `own` under `/edge/`.
    pub fn new(own: TrustDomain) -> NodeIds {
        NodeIds {
            domains: vec![own],
            prefix: EDGE_PATH_PREFIX.to_owned(),
        }
    }

    /// Nodes under `prefix` instead (`/edge/` by default): it must start and end with `/`
    /// and hold path segments of letters, digits, `.`, `-` and `_` (as SPIFFE paths do).
    pub fn with_prefix(mut self, prefix: &str) -> Result<NodeIds, String> {
        check_path_prefix(prefix)?;
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// Also accepts nodes of the federated trust domain `td`.
    pub fn with_domain(mut self, td: TrustDomain) -> NodeIds {
        if !self.domains.contains(&td) {
            self.domains.push(td);
        }
        self
    }

    /// The path prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Our own trust domain.
    pub fn own_domain(&self) -> &TrustDomain {
        &self.domains[0]
    }

    /// The trust domains whose nodes are accepted, ours first.
    pub fn domains(&self) -> &[TrustDomain] {
        &self.domains
    }

    /// The SPIFFE ID of `node` in our own trust domain.
    pub fn id_of(&self, node: &NodeId) -> String {
        format!(
            "spiffe://{}{}{}",
            self.own_domain().as_str(),
            self.prefix,
            node.as_str()
        )
    }

    /// The node id of `id`, if it is an accepted node identity.
    pub fn node(&self, id: &SpiffeId) -> Result<NodeId, PeerIdError> {
        let text = id.to_string();
        let Some(td) = self.domains.iter().find(|td| id.is_member_of(td)) else {
            return Err(PeerIdError::ForeignTrustDomain {
                id: text,
                expected: self
                    .domains
                    .iter()
                    .map(TrustDomain::as_str)
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        };
        let node = id
            .path()
            .strip_prefix(self.prefix.as_str())
            .filter(|rest| !rest.contains('/'))
            .ok_or_else(|| PeerIdError::NotEdge {
                id: text.clone(),
                td: td.as_str().to_owned(),
                prefix: self.prefix.clone(),
            })?;
        NodeId::new(node).map_err(|e| PeerIdError::BadNode {
            id: text,
            reason: e.to_string(),
        })
    }
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

    #[test]
    fn node_ids_with_prefix_and_federated_domains() {
        let own = trust_domain("example.org").unwrap();
        let fed = trust_domain("plant2.example").unwrap();
        let ids = NodeIds::new(own)
            .with_prefix("/factory/gw/")
            .unwrap()
            .with_domain(fed);
        let node = |s: &str| ids.node(&parse_id(s).unwrap());
        assert_eq!(
            node("spiffe://example.org/factory/gw/a1").unwrap().as_str(),
            "a1"
        );
        assert_eq!(
            node("spiffe://plant2.example/factory/gw/b2")
                .unwrap()
                .as_str(),
            "b2"
        );
        let e = node("spiffe://example.org/edge/a1").unwrap_err();
        assert!(
            e.to_string()
                .contains("spiffe://example.org/factory/gw/<node>"),
            "{e}"
        );
        let e = node("spiffe://evil.org/factory/gw/a1").unwrap_err();
        assert!(
            e.to_string().contains("example.org or plant2.example"),
            "{e}"
        );
        assert_eq!(
            ids.id_of(&NodeId::new("a1").unwrap()),
            "spiffe://example.org/factory/gw/a1"
        );
        for bad in [
            "edge/", "/edge", "/", "//", "/a//b/", "/a/../", "/sp ace/", "/é/",
        ] {
            assert!(
                NodeIds::new(trust_domain("x.org").unwrap())
                    .with_prefix(bad)
                    .is_err(),
                "{bad}"
            );
        }
    }
}
