//! # edgesync-edge
//!
//! The agent that runs next to the PLCs. Data flows:
//! Modbus links (`modbus`) poll devices and emit samples; the twin store (`store`) keeps the
//! latest value per property and decides what changed; changes go to the outbox (`store`), an
//! append-only log in sled; the uplink (`uplink`) drives an [`edgesync_protocol::session::EdgeSession`]
//! over QUIC and deletes outbox records once the hub acknowledged them as stored.

#![warn(missing_docs)]

pub mod agent;
pub mod config;
pub mod downlink;
pub mod health;
pub mod held;
pub mod local;
pub mod logging;
pub mod modbus;
pub mod model;
pub mod mqtt;
pub mod outbox_log;
pub mod probe;
pub mod rules;
pub mod store;
pub mod twin;
pub mod uplink;
pub mod values;
