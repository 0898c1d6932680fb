//! # edgesync-testkit
//!
//! Test support for edgesync: a PLC simulator ([`sim`]), SVID minting ([`pki`]) and a harness
//! that starts the real binaries ([`harness`]).

#![warn(missing_docs)]

pub mod fleet;
pub mod harness;
pub mod hostile;
/// SVID minting: the hub's development CA ([`edgesync_cloud::devca`]), under the names the tests
/// use.
pub mod pki {
    pub use edgesync_cloud::devca::{DevCa as TestCa, Svid};
}
pub mod sim;
pub mod udp_proxy;
pub mod workload_api;
