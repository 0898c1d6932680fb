//! Modbus: polling PLCs and turning their registers into typed samples.
//!
//! # Data flow
//!
//! ```text
//! DeviceSpec (validated, model.rs)
//!     │  grouped per link key (one TCP endpoint, serial port or RTU-over-TCP converter)
//!     ▼
//! link::spawn_link ── one task per link, one connection, one request at a time
//!     │  per device: tags grouped by poll interval, due groups read together
//!     │  plan::plan_with_rejects ── due tags → fewest ReadRequests (limits, gaps)
//!     │  tokio-modbus call under the device timeout; exception 2 → plan::split, retry
//!     │  codec::decode / decode_bit ── registers → Value (byte order, scale, offset)
//!     ▼
//! DeviceReading { device, ts, samples: [TagSample { tag, value, quality }], follows }
//!     │  mpsc channel (bounded: a slow consumer slows polling, never grows memory)
//!     ▼
//! twin store, rules, MQTT, outbox
//! ```
//!
//! # Invariants
//!
//! - One [`DeviceReading`] per device and cycle, holding one sample per tag read in that cycle,
//!   good or bad; a failure of one tag or request never hides the others' values.
//! - Quality says why a tag is bad: `Timeout` (no answer; the unit backs off alone),
//!   `Exception(code)` (the device said no; the connection is kept), `Disconnected` (the link
//!   broke; reported once per outage for every tag), `DecodeError` (registers not decodable,
//!   or a tag the planner cannot read), `BadResponse` (malformed answer).
//! - A bad sample carries no value (`value: None`); keeping the last good one is the twin
//!   store's business.
//! - No register is read twice in one cycle, a tag is never split across reads, and reads
//!   respect the device's and the protocol's limits ([`mod@plan`]).
//! - Every request has a timeout; retries back off with jitter; nothing a device sends can
//!   panic the task or make it spin.
//! - [`codec::encode`] is the exact inverse of [`codec::decode`] and is what writes use.
//!
//! Telemetry (metric names and the log rate-limiting rule) is in [`metrics`].

pub mod codec;
pub mod link;
pub mod metrics;
pub mod plan;
pub mod transport;
pub mod write;

pub use codec::{
    DecodeError, EncodeError, decode, decode_bit, encode, encode_bit, encode_bit_mask,
};
pub use link::{
    Clock, DeviceReading, LinkOptions, TagSample, spawn_link, spawn_link_with, spawn_link_writable,
};
pub use plan::{Plan, PlanError, ReadRequest, plan, plan_with_rejects, split};
pub use write::{LinkHandle, WriteError, WriteOutcome};
