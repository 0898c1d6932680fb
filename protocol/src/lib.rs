//! # edgesync-protocol
//!
//! The language edge and hub speak, with no I/O and no clocks:
//!
//! - [`ids`] and [`value`]: the domain types (node, device and property ids; typed values,
//!   quality, timestamps, versions).
//! - [`frame`]: the tunnel frames and their length-delimited, size-bounded codec. Frames are
//!   protobuf messages (prost), so a newer peer may add optional fields that an older peer
//!   skips.
//! - [`session`]: the state machines of both ends ([`session::EdgeSession`],
//!   [`session::HubSession`]): hello/welcome with version negotiation, per-node uplink sequence
//!   numbers, cumulative acks sent only after the hub stored records durably, resume after a
//!   reconnect, duplicates ignored.
//! - [`spiffe_id`]: the SPIFFE ID conventions (`spiffe://<td>/edge/<node>`, `spiffe://<td>/hub`).
//! - `tls` (feature `tls`): rustls configs that present and verify X.509-SVIDs.
//! - `durable` (feature `durable`): the one module with I/O, shared by both ends' stores: makes
//!   what sled wrote survive a power cut (`fdatasync`/`fsync`, which sled itself omits).
//!
//! Drivers (in `edgesync-edge` and `edgesync-cloud`) own the sockets and the clock: they feed
//! bytes and `now` in with `handle_*` calls and act on what `poll_*` calls return.

#![warn(missing_docs)]

pub mod close;
#[cfg(feature = "config")]
pub mod config_diag;
pub mod desired;
#[cfg(feature = "durable")]
pub mod durable;
pub mod frame;
#[cfg(all(feature = "config", feature = "svid-files"))]
pub mod identity_config;
pub mod ids;
pub mod session;
pub mod spiffe_id;
#[cfg(feature = "svid-files")]
pub mod svid_files;
#[cfg(feature = "svid-files")]
pub mod svid_keeper;
#[cfg(feature = "tls")]
pub mod tls;
pub mod value;
#[cfg(feature = "workload-api")]
pub mod workload_api;

pub use ids::{DeviceId, IdError, NodeId, PropertyId};
pub use value::{BadReason, Quality, Sample, Timestamp, Value, Version};
