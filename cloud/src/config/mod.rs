//! Hub configuration: `hub.toml` → [`HubConfig`].
//!
//! Reading happens in three steps:
//!
//! 1. **Syntax.** The TOML is parsed; every syntax error is reported with its line.
//! 2. **Raw values.** Each table (`[hub]`, `[identity]`, `[api]`, each `[[api.tokens]]`) is
//!    deserialized on its own into a raw serde struct whose fields are all optional. Unknown keys
//!    are errors, all of them reported with their lines. A wrong type stops only its table.
//! 3. **Validation.** Every value is checked and every problem is reported as a sentence naming
//!    file, line and component (`deploy/hub.toml:31: api token "ops": token is 9 characters
//!    long, shorter than 16`). Only when nothing is wrong is [`HubConfig`] built, with defaults
//!    filled in and relative paths resolved against the config file's directory.
//!
//! Validation reads no file except the `token_file`s of API tokens (a token is a secret that the
//! hub needs as a value); the PEM files (`[identity]`, `[api] tls_cert` and `tls_key`) are only
//! named here and read when the hub starts. The hub reads the token files and the API's PEM
//! files again while it runs ([`crate::api::ApiAccess`]), with the same rules for a secret
//! ([`secret_problem`]).
//!
//! Invariant: a [`HubConfig`] has passed every check. `deploy/README.md` documents every field;
//! `deploy/hub.toml` is a checked example.

use edgesync_protocol::config_diag as diag;
use edgesync_protocol::identity_config::{
    RawSource, check_node_prefix, check_source, check_trust_domain,
};
use edgesync_protocol::spiffe_id::EDGE_PATH_PREFIX;
use edgesync_protocol::svid_files::SvidFiles;
use edgesync_protocol::svid_keeper::IdentitySource;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::de::DeTable;

pub use crate::api::{ApiToken, Role, TokenFile};
pub use crate::http::TlsFiles;
pub use diag::{ConfigError, ConfigErrors};

use diag::{Doc, Loc};

/// Default sled page cache of the hub: 64 MiB.
/// sled refuses (panics on) a page cache below 256 bytes; anything under 64 KiB is a typo.
const MIN_SLED_CACHE_BYTES: i64 = 64 * 1024;
const DEFAULT_SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Default QUIC (UDP) listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// Default HTTP API listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default tunnel idle timeout, in milliseconds.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Shortest API token accepted, in characters.
pub const MIN_TOKEN_LEN: usize = 16;
/// Default `[hub] history_max_age_s`: 7 days.
pub const DEFAULT_HISTORY_MAX_AGE_S: u64 = 7 * 86_400;
/// Default `[hub] node_history_max_bytes`: 1 GiB.
pub const DEFAULT_NODE_HISTORY_MAX_BYTES: u64 = 1 << 30;

/// The validated hub configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// The file this was read from (as given), for messages.
    pub source: PathBuf,
    /// `[hub] listen`: the QUIC (UDP) address agents connect to.
    pub listen: SocketAddr,
    /// `[hub] http_listen`: the HTTP API, SSE and metrics address (TCP).
    pub http_listen: SocketAddr,
    /// `[hub] data_dir`: where the sled hub store lives.
    pub data_dir: PathBuf,
    /// `[hub] sled_cache_bytes`: sled's page cache size.
    pub sled_cache_bytes: u64,
    /// `[hub] http_max_connections` and `http_head_timeout_ms`: bounds of the HTTP listener.
    pub http_limits: crate::http::HttpLimits,
    /// `[hub] max_handshakes`: most tunnel handshakes in progress at once.
    pub max_handshakes: usize,
    /// `[hub] handshake_timeout_ms`: time allowed for a tunnel handshake.
    pub handshake_timeout: std::time::Duration,
    /// `[hub] max_nodes`: most agents connected at once, if limited.
    pub max_nodes: Option<u32>,
    /// `[hub] idle_timeout_ms`: a tunnel silent this long is closed (QUIC uses the shorter of
    /// the hub's and the agent's), so a half-open path is noticed.
    pub idle_timeout: std::time::Duration,
    /// `[hub] node_max_records_per_s`: most records per second one node may store (`None`
    /// when set to 0: no limit).
    pub node_max_records_per_s: Option<std::num::NonZeroU32>,
    /// `[hub] history_max_age_s` and `node_history_max_bytes`: how long records are kept and
    /// how much disk each node's may take (0: no limit).
    pub retention: crate::store::Retention,
    /// `[identity]`: the hub's X.509-SVID files and SPIFFE names.
    pub identity: HubIdentity,
    /// `[[api.tokens]]`: the bearer tokens the HTTP API accepts (at least one).
    pub tokens: Vec<ApiToken>,
    /// `[[api.tokens]] token_file`: the tokens whose secret comes from a file (their secret as
    /// read by validation is in [`HubConfig::tokens`]), in the order of the file.
    pub token_files: Vec<TokenFile>,
    /// `[api] tls_cert` and `tls_key`: HTTPS on `http_listen` (`None`: plain HTTP).
    pub api_tls: Option<TlsFiles>,
}

/// The hub's identity (`[identity]`). Paths are resolved; the files are not read here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubIdentity {
    /// The SPIFFE trust domain (`example.org`); agents must be `spiffe://<td>/edge/<node>`.
    pub trust_domain: String,
    /// The hub's own SPIFFE id, which agents expect (default `spiffe://<td>/hub`).
    pub hub_id: String,
    /// Where the SVID and bundles come from (files or the Workload API) and the federated
    /// trust domains, whose nodes the hub accepts too.
    pub source: IdentitySource,
    /// The path prefix of node SPIFFE IDs (default `/edge/`).
    pub node_path_prefix: String,
}

/// Reads and validates the hub config at `path`; relative paths in it are resolved against the
/// file's directory.
pub fn load(path: &Path) -> Result<HubConfig, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::single(&name, format!("cannot read the config file: {e}")))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = std::path::absolute(&dir).unwrap_or(dir);
    let mut config = parse(&name, &text, &base)?;
    config.source = path.to_path_buf();
    Ok(config)
}

/// Validates the hub config `text`; messages name it `source_name`, and relative paths are
/// resolved against `base_dir`. Reads no file but the API tokens' `token_file`s.
pub fn parse(source_name: &str, text: &str, base_dir: &Path) -> Result<HubConfig, ConfigErrors> {
    let mut doc = Doc::new(source_name, text);
    let Some(root) = doc.parse_root() else {
        return Err(doc.into_errors());
    };
    let config = check(&mut doc, &root, source_name, base_dir);
    doc.finish(config)
}

/// All problems, one per line as `file:line: message`: what `edgesync-hub validate` prints.
pub fn render_errors(errors: &ConfigErrors) -> String {
    errors.render()
}

// ---------------------------------------------------------------------------------------------
// Raw (unvalidated) file structure; every field optional so that all problems are reported.

/// `[hub]`.
#[derive(Debug, Default, Deserialize)]
struct RawHub {
    /// QUIC (UDP) listen address `ip:port` (default 0.0.0.0:7443).
    listen: Option<String>,
    /// HTTP listen address `ip:port` (default 127.0.0.1:8080).
    http_listen: Option<String>,
    /// Directory of the sled hub store; required.
    data_dir: Option<String>,
    /// sled page cache in bytes (default 64 MiB).
    sled_cache_bytes: Option<i64>,
    /// Most HTTP connections open at once (default 256).
    http_max_connections: Option<i64>,
    /// Time for an HTTP request head to arrive, in milliseconds (default 10000).
    http_head_timeout_ms: Option<i64>,
    /// Most agents connected at once (default: no limit).
    max_nodes: Option<i64>,
    /// Most tunnel handshakes in progress at once (default 64).
    max_handshakes: Option<i64>,
    /// Time allowed for a tunnel handshake, in milliseconds (default 5000).
    handshake_timeout_ms: Option<i64>,
    /// Tunnel idle timeout in milliseconds (default 10000).
    idle_timeout_ms: Option<i64>,
    /// Most records per second one node may store; 0: no limit (default 100000).
    node_max_records_per_s: Option<i64>,
    /// Records older than this many seconds are pruned; 0: kept (default 7 days).
    history_max_age_s: Option<i64>,
    /// Most bytes of records stored per node; 0: no quota (default 1 GiB).
    node_history_max_bytes: Option<i64>,
}

/// `[identity]` (the source keys are checked by `identity_config::check_source`).
#[derive(Debug, Default, Deserialize)]
struct RawIdentity {
    /// SPIFFE trust domain; required.
    trust_domain: Option<String>,
    /// `files` (default) or `workload_api`.
    source: Option<String>,
    /// SVID certificate chain (PEM); required with files.
    cert: Option<String>,
    /// SVID private key (PEM); required with files.
    key: Option<String>,
    /// Trust bundle (PEM); required with files.
    bundle: Option<String>,
    /// Workload API endpoint (default `SPIFFE_ENDPOINT_SOCKET`).
    workload_api_socket: Option<String>,
    /// How long start-up waits for the first SVID from the Workload API.
    workload_api_timeout_ms: Option<i64>,
    /// Federated trust domains whose nodes are accepted.
    federates_with: Option<Vec<String>>,
    /// Bundle file per federated trust domain (files only).
    federated_bundles: Option<std::collections::BTreeMap<String, String>>,
    /// The hub's SPIFFE id (default `spiffe://<trust_domain>/hub`).
    hub_id: Option<String>,
    /// Path prefix of node SPIFFE IDs (default `/edge/`).
    node_path_prefix: Option<String>,
}

/// `[api]` (besides the `[[api.tokens]]` array, read table by table).
#[derive(Debug, Default, Deserialize)]
struct RawApi {
    /// HTTPS certificate chain of the API listener (PEM); with `tls_key`.
    tls_cert: Option<String>,
    /// Its private key (PEM); with `tls_cert`.
    tls_key: Option<String>,
}

/// `[[api.tokens]]`.
#[derive(Debug, Default, Deserialize)]
struct RawToken {
    /// A name for logs; required, unique.
    name: Option<String>,
    /// The secret, at least 16 characters (or `token_file`).
    token: Option<String>,
    /// A file holding the secret (or `token`).
    token_file: Option<String>,
    /// `admin` or `read_only`; required.
    role: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

const ROOT_KEYS: &[&str] = &["hub", "identity", "api"];

const ROLES: &[(&str, Role)] = &[("admin", Role::Admin), ("read_only", Role::ReadOnly)];

/// Reads the table `key` of the root into `T`. `None` if it is broken (already reported), or
/// if it is absent and `required` (reported here).
fn read_section<T: DeserializeOwned + Default>(
    doc: &mut Doc<'_>,
    root: &DeTable<'_>,
    key: &str,
    required: Option<&str>,
    nested: &[&str],
) -> Option<(T, Loc)> {
    let component = format!("[{key}]");
    if !root.iter().any(|(k, _)| k.get_ref() == key) {
        if let Some(needs) = required {
            doc.error(
                None,
                format!("missing required table {component} ({needs})"),
            );
            return None;
        }
        return Some((T::default(), Loc::absent(component)));
    }
    let (node, loc) = doc.table(root, key, &component)?;
    let raw = doc.section_except(node, &loc, nested)?;
    Some((raw, loc))
}

fn socket_addr(
    doc: &mut Doc<'_>,
    loc: &Loc,
    key: &str,
    value: Option<String>,
    default: &str,
) -> SocketAddr {
    let fallback = SocketAddr::from(([0, 0, 0, 0], 0));
    let text = value.unwrap_or_else(|| default.to_owned());
    match text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            doc.at(
                loc,
                key,
                format_args!(
                    "{key} {text:?} is not an ip:port socket address (use 0.0.0.0:port for all interfaces)"
                ),
            );
            fallback
        }
    }
}

fn check(doc: &mut Doc<'_>, root: &DeTable<'_>, source: &str, base: &Path) -> HubConfig {
    doc.check_keys(&Loc::absent("top level"), root, ROOT_KEYS);

    let mut config = HubConfig {
        source: PathBuf::from(source),
        listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
        http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        data_dir: PathBuf::new(),
        sled_cache_bytes: DEFAULT_SLED_CACHE_BYTES,
        http_limits: crate::http::HttpLimits::default(),
        max_nodes: None,
        max_handshakes: crate::server::DEFAULT_MAX_HANDSHAKES,
        handshake_timeout: crate::server::DEFAULT_HANDSHAKE_TIMEOUT,
        node_max_records_per_s: std::num::NonZeroU32::new(
            crate::server::DEFAULT_NODE_MAX_RECORDS_PER_S,
        ),
        retention: crate::store::Retention {
            max_age: Some(std::time::Duration::from_secs(DEFAULT_HISTORY_MAX_AGE_S)),
            node_max_bytes: Some(DEFAULT_NODE_HISTORY_MAX_BYTES),
        },
        idle_timeout: std::time::Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
        identity: HubIdentity {
            trust_domain: String::new(),
            hub_id: String::new(),
            source: IdentitySource::Files(SvidFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
                bundle: PathBuf::new(),
                federated: Vec::new(),
            }),
            node_path_prefix: EDGE_PATH_PREFIX.to_owned(),
        },
        tokens: Vec::new(),
        token_files: Vec::new(),
        api_tls: None,
    };

    // [hub]
    if let Some((raw, loc)) =
        read_section::<RawHub>(doc, root, "hub", Some("it needs data_dir"), &[])
    {
        config.listen = socket_addr(doc, &loc, "listen", raw.listen, DEFAULT_LISTEN);
        config.http_listen = socket_addr(
            doc,
            &loc,
            "http_listen",
            raw.http_listen,
            DEFAULT_HTTP_LISTEN,
        );
        config.data_dir = doc
            .path(&loc, "data_dir", raw.data_dir, base)
            .unwrap_or_default();
        config.sled_cache_bytes = u64::try_from(doc.int_in(
            &loc,
            "sled_cache_bytes",
            raw.sled_cache_bytes,
            DEFAULT_SLED_CACHE_BYTES as i64,
            MIN_SLED_CACHE_BYTES..=i64::MAX,
        ))
        .unwrap_or(DEFAULT_SLED_CACHE_BYTES);
        config.idle_timeout = std::time::Duration::from_millis(
            u64::try_from(doc.int_in(
                &loc,
                "idle_timeout_ms",
                raw.idle_timeout_ms,
                DEFAULT_IDLE_TIMEOUT_MS as i64,
                1_000..=600_000,
            ))
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_MS),
        );
        let d = crate::http::HttpLimits::default();
        config.http_limits.max_connections = usize::try_from(doc.int_in(
            &loc,
            "http_max_connections",
            raw.http_max_connections,
            d.max_connections as i64,
            1..=1_000_000,
        ))
        .unwrap_or(d.max_connections);
        config.http_limits.head_timeout = std::time::Duration::from_millis(
            u64::try_from(doc.int_in(
                &loc,
                "http_head_timeout_ms",
                raw.http_head_timeout_ms,
                d.head_timeout.as_millis() as i64,
                100..=600_000,
            ))
            .unwrap_or(d.head_timeout.as_millis() as u64),
        );
        config.max_handshakes = usize::try_from(doc.int_in(
            &loc,
            "max_handshakes",
            raw.max_handshakes,
            crate::server::DEFAULT_MAX_HANDSHAKES as i64,
            1..=100_000,
        ))
        .unwrap_or(crate::server::DEFAULT_MAX_HANDSHAKES);
        config.handshake_timeout = std::time::Duration::from_millis(
            u64::try_from(doc.int_in(
                &loc,
                "handshake_timeout_ms",
                raw.handshake_timeout_ms,
                crate::server::DEFAULT_HANDSHAKE_TIMEOUT.as_millis() as i64,
                100..=60_000,
            ))
            .unwrap_or(5_000),
        );
        let rate = doc.int_in(
            &loc,
            "node_max_records_per_s",
            raw.node_max_records_per_s,
            i64::from(crate::server::DEFAULT_NODE_MAX_RECORDS_PER_S),
            0..=i64::from(u32::MAX),
        );
        config.node_max_records_per_s =
            u32::try_from(rate).ok().and_then(std::num::NonZeroU32::new);
        let age = doc.int_in(
            &loc,
            "history_max_age_s",
            raw.history_max_age_s,
            DEFAULT_HISTORY_MAX_AGE_S as i64,
            0..=100 * 365 * 86_400,
        );
        config.retention.max_age = u64::try_from(age)
            .ok()
            .filter(|a| *a > 0)
            .map(std::time::Duration::from_secs);
        let quota = doc.int_in(
            &loc,
            "node_history_max_bytes",
            raw.node_history_max_bytes,
            DEFAULT_NODE_HISTORY_MAX_BYTES as i64,
            0..=i64::MAX,
        );
        config.retention.node_max_bytes = u64::try_from(quota).ok().filter(|q| *q > 0);
        if raw.max_nodes.is_some() {
            let n = doc.int_in(&loc, "max_nodes", raw.max_nodes, 1, 1..=i64::from(u32::MAX));
            config.max_nodes = u32::try_from(n).ok();
        }
    }

    // [identity]
    if let Some((raw, loc)) = read_section::<RawIdentity>(
        doc,
        root,
        "identity",
        Some("it needs trust_domain, and cert, key and bundle or source = \"workload_api\""),
        &[],
    ) {
        let id = &mut config.identity;
        let mut td_ok = false;
        if let Some(td) = doc.required(&loc, "trust_domain", raw.trust_domain) {
            match check_trust_domain(&td) {
                Ok(()) => {
                    id.trust_domain = td;
                    td_ok = true;
                }
                Err(why) => doc.at(
                    &loc,
                    "trust_domain",
                    format_args!("trust_domain {td:?} {why}"),
                ),
            }
        }
        match raw.hub_id {
            Some(hub_id) => match spiffe::SpiffeId::new(&hub_id) {
                Ok(parsed) => {
                    if td_ok && parsed.trust_domain_name() != id.trust_domain {
                        doc.at(
                            &loc,
                            "hub_id",
                            format_args!(
                                "hub_id {hub_id:?} is not in trust domain {:?}",
                                id.trust_domain
                            ),
                        );
                    }
                    id.hub_id = hub_id;
                }
                Err(e) => doc.at(
                    &loc,
                    "hub_id",
                    format_args!("hub_id {hub_id:?} is not a SPIFFE id: {e}"),
                ),
            },
            None => id.hub_id = format!("spiffe://{}/hub", id.trust_domain),
        }
        if let Some(prefix) = check_node_prefix(doc, &loc, raw.node_path_prefix) {
            id.node_path_prefix = prefix;
        }
        let own = td_ok.then(|| id.trust_domain.clone());
        let src = RawSource {
            source: raw.source,
            cert: raw.cert,
            key: raw.key,
            bundle: raw.bundle,
            workload_api_socket: raw.workload_api_socket,
            workload_api_timeout_ms: raw.workload_api_timeout_ms,
            federates_with: raw.federates_with,
            federated_bundles: raw.federated_bundles,
        };
        if let Some(source) = check_source(doc, &loc, src, own.as_deref(), base) {
            id.source = source;
        }
    }

    // [api] and [[api.tokens]]
    check_api(doc, root, base, &mut config);
    config
}

/// `[api] tls_cert` and `tls_key`: both or neither, non-empty paths (the files are read when
/// the hub starts).
fn check_api_tls(doc: &mut Doc<'_>, loc: &Loc, raw: RawApi, base: &Path) -> Option<TlsFiles> {
    match (raw.tls_cert, raw.tls_key) {
        (None, None) => None,
        (Some(_), None) => {
            doc.at(
                loc,
                "tls_cert",
                "tls_cert is set but tls_key is not (give both, or neither for plain HTTP)",
            );
            None
        }
        (None, Some(_)) => {
            doc.at(
                loc,
                "tls_key",
                "tls_key is set but tls_cert is not (give both, or neither for plain HTTP)",
            );
            None
        }
        (Some(cert), Some(key)) => {
            let cert = doc.path(loc, "tls_cert", Some(cert), base);
            let key = doc.path(loc, "tls_key", Some(key), base);
            match (cert, key) {
                (Some(cert), Some(key)) if cert == key => {
                    doc.at(
                        loc,
                        "tls_key",
                        "tls_key names the same file as tls_cert (give the certificate chain and the private key as two files)",
                    );
                    None
                }
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                _ => None,
            }
        }
    }
}

fn check_api(doc: &mut Doc<'_>, root: &DeTable<'_>, base: &Path, config: &mut HubConfig) {
    let needs = "it needs at least one [[api.tokens]]";
    // A wrong type in [api] itself (already reported) still lets the tokens be checked.
    let api_loc = match read_section::<RawApi>(doc, root, "api", Some(needs), &["tokens"]) {
        Some((raw, loc)) => {
            config.api_tls = check_api_tls(doc, &loc, raw, base);
            loc
        }
        None => Loc::absent("[api]"),
    };
    let Some(api) = root
        .iter()
        .find(|(k, _)| k.get_ref() == "api")
        .and_then(|(_, v)| v.get_ref().as_table())
    else {
        return;
    };
    let (tokens, files) = check_tokens(doc, api, &api_loc, base);
    config.tokens = tokens;
    config.token_files = files;
}

fn check_tokens(
    doc: &mut Doc<'_>,
    api: &DeTable<'_>,
    api_loc: &Loc,
    base: &Path,
) -> (Vec<ApiToken>, Vec<TokenFile>) {
    let mut tokens = Vec::new();
    let mut files = Vec::new();
    let before = doc.error_count();
    let items = doc.table_array(api, "tokens", "[api]");
    if items.is_empty() && doc.error_count() == before {
        doc.error(
            api_loc.header,
            "[api]: no API tokens are configured (add an [[api.tokens]] table)",
        );
    }
    let mut names: HashMap<String, Option<usize>> = HashMap::new();
    let mut secrets: HashMap<String, String> = HashMap::new();
    for (i, (node, loc)) in items.into_iter().enumerate() {
        let component = match node
            .get_ref()
            .get("name")
            .and_then(|v| v.get_ref().as_str())
        {
            Some(name) => format!("api token {name:?}"),
            None => format!("api token #{}", i + 1),
        };
        let loc = loc.named(component);
        let Some(raw) = doc.section::<RawToken>(node, &loc) else {
            continue;
        };
        let before = doc.error_count();

        let name = doc.required(&loc, "name", raw.name);
        if let Some(name) = &name {
            if name.trim().is_empty() {
                doc.at(&loc, "name", "name is empty");
            } else if let Some(first) = names.get(name) {
                let first = first.map(|l| format!(" on line {l}")).unwrap_or_default();
                doc.at(
                    &loc,
                    "name",
                    format_args!("token name {name:?} is already used{first}"),
                );
            } else {
                names.insert(name.clone(), loc.at("name"));
            }
        }

        let mut file_path = None;
        let secret_key = if raw.token.is_some() {
            "token"
        } else {
            "token_file"
        };
        let secret = match (raw.token, raw.token_file) {
            (Some(_), Some(_)) => {
                doc.at(&loc, "token_file", "give token or token_file, not both");
                None
            }
            (None, None) => {
                doc.error(
                    loc.header,
                    format!(
                        "{}: missing token (give token or token_file)",
                        loc.component
                    ),
                );
                None
            }
            (Some(t), None) => check_secret(doc, &loc, "token", t, "token"),
            (None, Some(file)) => {
                if file.is_empty() {
                    doc.at(&loc, "token_file", "token_file is empty");
                    None
                } else {
                    let path = base.join(&file);
                    let secret = match std::fs::read_to_string(&path) {
                        Ok(text) => {
                            let what = format!("the token in {}", path.display());
                            check_secret(doc, &loc, "token_file", text.trim().to_owned(), &what)
                        }
                        Err(e) => {
                            doc.at(
                                &loc,
                                "token_file",
                                format_args!("cannot read token_file {}: {e}", path.display()),
                            );
                            None
                        }
                    };
                    file_path = Some(path);
                    secret
                }
            }
        };
        if let (Some(secret), Some(name)) = (&secret, &name) {
            if let Some(other) = secrets.get(secret) {
                doc.at(
                    &loc,
                    secret_key,
                    format_args!("the same secret is already used by token {other:?}"),
                );
            } else {
                secrets.insert(secret.clone(), name.clone());
            }
        }

        let role = match doc.required(&loc, "role", raw.role) {
            Some(r) => doc.choice(&loc, "role", &r, ROLES),
            None => None,
        };

        if doc.error_count() > before {
            continue;
        }
        if let (Some(name), Some(token), Some(role)) = (name, secret, role) {
            if let Some(path) = file_path {
                files.push(TokenFile {
                    name: name.clone(),
                    path,
                });
            }
            tokens.push(ApiToken { name, token, role });
        }
    }
    (tokens, files)
}

/// What is wrong with a bearer token secret, as a phrase to follow its name (`is 9 characters
/// long, shorter than 16`): a secret is at least [`MIN_TOKEN_LEN`] visible ASCII characters.
/// `None` when it is acceptable. The hub applies the same rule to a reloaded `token_file`.
pub fn secret_problem(secret: &str) -> Option<String> {
    let len = secret.chars().count();
    if len < MIN_TOKEN_LEN {
        return Some(format!(
            "is {len} characters long, shorter than {MIN_TOKEN_LEN}"
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("may only hold visible ASCII characters (no spaces)".to_owned());
    }
    None
}

/// Checks a bearer token secret (see [`secret_problem`]).
fn check_secret(
    doc: &mut Doc<'_>,
    loc: &Loc,
    key: &str,
    secret: String,
    what: &str,
) -> Option<String> {
    match secret_problem(&secret) {
        Some(problem) => {
            doc.at(loc, key, format_args!("{what} {problem}"));
            None
        }
        None => Some(secret),
    }
}

#[cfg(test)]
mod tests;
