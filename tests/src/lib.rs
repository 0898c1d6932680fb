//! # edgesync-testkit

pub mod pki;
pub mod sim;
