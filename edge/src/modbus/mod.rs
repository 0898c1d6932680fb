//! Modbus links.
