//! Validated identifiers: node, device and property ids.
//!
//! Invariant: a value of these types always holds 1 to 64 bytes of `[A-Za-z0-9._-]`, starting
//! with an ASCII letter or digit. That keeps them safe in SPIFFE paths, sled keys, MQTT topics,
//! NATS subjects and URLs without escaping.

use std::fmt;

use smol_str::SmolStr;

use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Longest id held inline (cloned by copying its bytes); longer ones share an allocation.
pub const INLINE_ID_LEN: usize = 23;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} id is empty")]
    Empty {
        /// Which kind of id (node, device, property).
        kind: &'static str,
    },
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("{kind} id {id:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong {
        /// Which kind of id.
        kind: &'static str,
        /// The offending id (truncated).
        id: String,
    },
    /// The id holds a character outside `[A-Za-z0-9._-]` or does not start with a letter or digit.
    #[error(
        "{kind} id {id:?} may only hold letters, digits, '.', '_' and '-', and must start with a letter or digit"
    )]
    BadChar {
        /// Which kind of id.
        kind: &'static str,
        /// The offending id.
        id: String,
    },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        let id: String = s.chars().take(MAX_ID_LEN).collect();
        return Err(IdError::TooLong { kind, id });
    }
    let first_ok = s.as_bytes()[0].is_ascii_alphanumeric();
    let rest_ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !first_ok || !rest_ok {
        return Err(IdError::BadChar {
            kind,
            id: s.to_owned(),
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// Cloning is cheap, so ids can be copied into every sample: an id of up to
        /// [`INLINE_ID_LEN`] bytes (most are) is held inline and cloned as a copy of its
        /// bytes, touching no shared memory; a longer one shares a reference-counted
        /// allocation.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(SmolStr);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl AsRef<str>) -> Result<Self, IdError> {
                let s = s.as_ref();
                validate($kind, s)?;
                Ok(Self(SmolStr::new(s)))
            }

            /// Whether the id is held inline (see [`INLINE_ID_LEN`]).
            #[cfg(test)]
            #[allow(dead_code, reason = "the tests use it for one of the id types")]
            fn is_inline(&self) -> bool {
                !self.0.is_heap_allocated()
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.into()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A gateway (edge node), as named in its SVID `spiffe://<td>/edge/<node>`.
    NodeId,
    "node"
);
id_type!(
    /// A device (one PLC unit or logical machine) on a node.
    DeviceId,
    "device"
);
id_type!(
    /// A property (tag) of a device.
    PropertyId,
    "property"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["line-1", "plc_3", "a", "Boiler.Temp", "0abc"] {
            assert!(NodeId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(DeviceId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            DeviceId::new("a".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
        for bad in ["-x", ".x", "a/b", "a b", "ü", "a+b", "x\n"] {
            assert!(
                matches!(PropertyId::new(bad), Err(IdError::BadChar { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn short_and_long_ids_behave_the_same() {
        use std::collections::HashSet;
        // Up to 23 bytes are held inline, longer ones in a shared allocation: no difference
        // shows but the sharing.
        for len in [1, 22, 23, 24, 63, 64] {
            let s: String = std::iter::once('a')
                .chain((1..len).map(|i| char::from(b'0' + (i % 10) as u8)))
                .collect();
            let id = PropertyId::new(&s).unwrap();
            let copy = id.clone();
            assert_eq!(id.is_inline(), len <= INLINE_ID_LEN, "{len}");
            assert_eq!(
                std::ptr::eq(id.as_str(), copy.as_str()),
                len > INLINE_ID_LEN,
                "{len}"
            );
            assert_eq!(id.as_str(), s, "{len}");
            assert_eq!(copy, id, "{len}");
            assert_eq!(String::from(copy), s, "{len}");
            assert_eq!(PropertyId::new(s.clone()).unwrap(), id, "{len}");
            let set: HashSet<PropertyId> = [id.clone(), PropertyId::new(&s).unwrap()].into();
            assert_eq!(set.len(), 1, "{len}");
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(json, format!("{s:?}"), "{len}");
            assert_eq!(
                serde_json::from_str::<PropertyId>(&json).unwrap(),
                id,
                "{len}"
            );
        }
        // Order is the strings' order whatever their length.
        let short = DeviceId::new("b").unwrap();
        let long = DeviceId::new("a".repeat(40)).unwrap();
        assert!(long < short);
    }

    #[test]
    fn serde_validates() {
        let ok: Result<NodeId, _> = serde_json::from_str("\"gw-1\"");
        assert!(ok.is_ok());
        let bad: Result<NodeId, _> = serde_json::from_str("\"gw/1\"");
        let err = bad.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("node id"), "{err}");
    }
}
