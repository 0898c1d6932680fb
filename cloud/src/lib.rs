//! # edgesync-cloud
//!
//! The hub. Data flows: edge agents connect over QUIC ([`server`]), each connection drives an
//! `edgesync_protocol::session::HubSession`; records are committed to the [`store`] (sled) in
//! group commits and only then acknowledged; the HTTP [`api`] serves nodes and twins from the
//! store's memory; [`telemetry`] exposes Prometheus metrics. [`hub::Hub`] starts it all.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod devca;
pub mod events;
pub mod http;
pub mod hub;
pub mod server;
pub mod store;
pub mod telemetry;
