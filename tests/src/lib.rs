//! # edgesync-testkit
//!
//! Test support for edgesync: a PLC simulator ([`sim`]), SVID minting ([`pki`]) and a harness
//! that starts the real binaries ([`harness`]).

#![warn(missing_docs)]

pub mod fleet;
pub mod harness;
pub mod hostile;
pub mod pki;
pub mod sim;
pub mod udp_proxy;
