//! Modbus links.

pub mod codec;
pub mod plan;
