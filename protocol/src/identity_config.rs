//! The `[identity]` keys both binaries share (features `config` and `svid-files`): where the
//! SVID comes from and which other trust domains are trusted.
//!
//! ```toml
//! [identity]
//! trust_domain = "example.org"
//! source = "files"                     # or "workload_api"
//! cert = "svid.pem"                    # files only: chain, key, own bundle
//! key = "svid.key.pem"
//! bundle = "bundle.pem"
//! # workload_api_socket = "unix:///run/spire/agent.sock"   # workload_api only
//! # workload_api_timeout_ms = 60000
//! # federates_with = ["cloud.example"]
//! # [identity.federated_bundles]       # files only: one bundle file per federated domain
//! # "cloud.example" = "cloud-bundle.pem"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::config_diag::{Doc, Loc};
use crate::spiffe_id::{self, TrustDomain};
use crate::svid_files::SvidFiles;
use crate::svid_keeper::IdentitySource;

/// Default of `workload_api_timeout_ms`: how long start-up waits for the first SVID.
pub const DEFAULT_WORKLOAD_API_TIMEOUT_MS: i64 = 60_000;

/// The source keys of an `[identity]` table, as deserialized by the binary's own raw struct.
#[derive(Debug, Default)]
pub struct RawSource {
    /// `files` (default) or `workload_api`.
    pub source: Option<String>,
    /// SVID chain file.
    pub cert: Option<String>,
    /// SVID key file.
    pub key: Option<String>,
    /// Own trust domain's bundle file.
    pub bundle: Option<String>,
    /// Workload API endpoint.
    pub workload_api_socket: Option<String>,
    /// How long start-up waits for the first SVID from the Workload API.
    pub workload_api_timeout_ms: Option<i64>,
    /// Federated trust domains.
    pub federates_with: Option<Vec<String>>,
    /// Bundle file per federated trust domain (files only).
    pub federated_bundles: Option<BTreeMap<String, String>>,
}

/// Checks a SPIFFE trust domain name: 1 to 255 bytes of lowercase letters, digits, '.', '-'
/// and '_'. Returns what is wrong, as a phrase.
pub fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("is empty");
    }
    if td.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if td.starts_with("spiffe://") {
        return Err("must be the bare name (example.org), not a spiffe:// URI");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("may only hold lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

/// Validates `node_path_prefix` (reported with its line); `None` if absent or wrong.
pub fn check_node_prefix(doc: &mut Doc<'_>, loc: &Loc, prefix: Option<String>) -> Option<String> {
    let prefix = prefix?;
    match crate::spiffe_id::check_path_prefix(&prefix) {
        Ok(()) => Some(prefix),
        Err(why) => {
            doc.at(
                loc,
                "node_path_prefix",
                format_args!("node_path_prefix {why}"),
            );
            None
        }
    }
}

/// Validates the source keys (every problem reported with its line) and returns the source,
/// or `None` if something is wrong. `own` is the table's `trust_domain`, if valid.
pub fn check_source(
    doc: &mut Doc<'_>,
    loc: &Loc,
    raw: RawSource,
    own: Option<&str>,
    base: &Path,
) -> Option<IdentitySource> {
    let errors = doc.error_count();
    let kind = match raw.source.as_deref() {
        None => Some("files"),
        Some(s) => doc.choice(
            loc,
            "source",
            s,
            &[("files", "files"), ("workload_api", "workload_api")],
        ),
    };
    // Federated trust domains.
    let mut federates_with: Vec<TrustDomain> = Vec::new();
    for name in raw.federates_with.unwrap_or_default() {
        if let Err(why) = check_trust_domain(&name) {
            doc.at(
                loc,
                "federates_with",
                format_args!("federates_with: {name:?} {why}"),
            );
            continue;
        }
        if Some(name.as_str()) == own {
            doc.at(
                loc,
                "federates_with",
                format_args!("federates_with: {name:?} is our own trust domain"),
            );
            continue;
        }
        match spiffe_id::trust_domain(&name) {
            Ok(td) if federates_with.contains(&td) => doc.at(
                loc,
                "federates_with",
                format_args!("federates_with: {name:?} is listed twice"),
            ),
            Ok(td) => federates_with.push(td),
            Err(e) => doc.at(loc, "federates_with", format_args!("federates_with: {e}")),
        }
    }
    let only = |doc: &mut Doc<'_>, key: &str, present: bool, source: &str| {
        if present {
            doc.at(
                loc,
                key,
                format_args!("{key} is only used with source = \"{source}\""),
            );
        }
    };
    let source = match kind? {
        "workload_api" => {
            only(doc, "cert", raw.cert.is_some(), "files");
            only(doc, "key", raw.key.is_some(), "files");
            only(doc, "bundle", raw.bundle.is_some(), "files");
            only(
                doc,
                "federated_bundles",
                raw.federated_bundles.is_some(),
                "files",
            );
            if let Some(s) = &raw.workload_api_socket
                && !(s.strip_prefix("unix:///").is_some_and(|p| !p.is_empty())
                    || s.strip_prefix("tcp://")
                        .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_ok()))
            {
                doc.at(
                    loc,
                    "workload_api_socket",
                    format_args!(
                        "workload_api_socket {s:?} must be unix:///<absolute path> or tcp://<ip>:<port>"
                    ),
                );
            }
            let timeout = doc.int_in(
                loc,
                "workload_api_timeout_ms",
                raw.workload_api_timeout_ms,
                DEFAULT_WORKLOAD_API_TIMEOUT_MS,
                100..=86_400_000,
            );
            IdentitySource::WorkloadApi {
                endpoint: raw.workload_api_socket,
                federates_with,
                initial_timeout: Duration::from_millis(u64::try_from(timeout).unwrap_or(0)),
            }
        }
        _ => {
            only(
                doc,
                "workload_api_socket",
                raw.workload_api_socket.is_some(),
                "workload_api",
            );
            only(
                doc,
                "workload_api_timeout_ms",
                raw.workload_api_timeout_ms.is_some(),
                "workload_api",
            );
            let cert = doc.path(loc, "cert", raw.cert, base);
            let key = doc.path(loc, "key", raw.key, base);
            let bundle = doc.path(loc, "bundle", raw.bundle, base);
            let mut given = raw.federated_bundles.unwrap_or_default();
            let mut federated = Vec::new();
            for td in &federates_with {
                match given.remove(td.as_str()) {
                    Some(p) if !p.is_empty() => federated.push((td.clone(), base.join(p))),
                    _ => doc.at(
                        loc,
                        "federated_bundles",
                        format_args!(
                            "federated trust domain {td} needs a bundle file in [identity.federated_bundles]"
                        ),
                    ),
                }
            }
            for td in given.keys() {
                doc.at(
                    loc,
                    "federated_bundles",
                    format_args!("federated_bundles: {td:?} is not listed in federates_with"),
                );
            }
            IdentitySource::Files(SvidFiles {
                cert: cert.unwrap_or_default(),
                key: key.unwrap_or_default(),
                bundle: bundle.unwrap_or_default(),
                federated,
            })
        }
    };
    (doc.error_count() == errors).then_some(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        for ok in ["example.org", "prod_1", "a-b.c"] {
            assert_eq!(check_trust_domain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Example.org", "spiffe://example.org", "a/b", "a b"] {
            assert!(check_trust_domain(bad).is_err(), "{bad}");
        }
        assert!(check_trust_domain(&"a".repeat(256)).is_err());
    }
}
