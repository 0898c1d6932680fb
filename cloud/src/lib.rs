//! # edgesync-cloud

pub mod api;
pub mod store;
pub mod telemetry;
