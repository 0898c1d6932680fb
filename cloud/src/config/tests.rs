#![allow(clippy::unwrap_used)]

use std::path::Path;

use super::*;

const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/hub.toml"));

/// The smallest valid hub config (13 lines).
const BASE: &str = r#"[hub]
data_dir = "data"
[identity]
trust_domain = "example.org"
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"

[[api.tokens]]
name = "admin"
token = "0123456789abcdef"
role = "admin"

"#;

fn parse_text(text: &str) -> Result<HubConfig, ConfigErrors> {
    parse("hub.toml", text, Path::new("/etc/edgesync"))
}

fn problems(text: &str) -> Vec<(Option<usize>, String)> {
    match parse_text(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|e| (e.line, e.message)).collect(),
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

fn assert_problem(text: &str, marker: &str, needle: &str) {
    assert_problem_at(text, line_of(text, marker), needle);
}

fn assert_problem_at(text: &str, line: usize, needle: &str) {
    let found = problems(text);
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(line) && m.contains(needle)),
        "no problem on line {line} containing {needle:?}; got {found:#?}"
    );
}

#[test]
fn deploy_example_is_valid() {
    let cfg =
        parse("deploy/hub.toml", EXAMPLE, Path::new("/opt/hub")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.listen, "0.0.0.0:7443".parse().unwrap());
    assert_eq!(cfg.http_listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.data_dir, Path::new("/opt/hub/./hub-data"));
    assert_eq!(cfg.sled_cache_bytes, 64 << 20);
    assert_eq!(cfg.max_nodes, Some(1000));
    assert_eq!(cfg.identity.trust_domain, "example.org");
    assert_eq!(cfg.identity.hub_id, "spiffe://example.org/hub");
    match &cfg.identity.source {
        IdentitySource::Files(f) => assert_eq!(f.key, Path::new("/opt/hub/./pki/hub.key")),
        other => panic!("{other:?}"),
    }
    assert_eq!(cfg.identity.node_path_prefix, "/edge/");
    assert_eq!(cfg.tokens.len(), 2);
    assert_eq!(cfg.tokens[0].name, "operator");
    assert_eq!(cfg.tokens[0].role, Role::Admin);
    assert_eq!(cfg.tokens[1].role, Role::ReadOnly);
    assert_eq!(cfg.tokens[1].token, "read-only-example-token-change-me");
}

#[test]
fn defaults_apply() {
    let cfg = parse_text(BASE).unwrap();
    assert_eq!(cfg.listen, "0.0.0.0:7443".parse().unwrap());
    assert_eq!(cfg.http_listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.sled_cache_bytes, DEFAULT_SLED_CACHE_BYTES);
    assert_eq!(cfg.max_nodes, None);
    assert_eq!(cfg.idle_timeout, std::time::Duration::from_secs(10));
    assert_eq!(cfg.http_limits, crate::http::HttpLimits::default());
    assert_eq!(cfg.http_limits.max_connections, 256);
    assert_eq!(
        cfg.http_limits.head_timeout,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(cfg.max_handshakes, 64);
    assert_eq!(cfg.handshake_timeout, std::time::Duration::from_secs(5));
    assert_eq!(cfg.node_max_records_per_s.map(|r| r.get()), Some(100_000));
    assert_eq!(
        cfg.retention.max_age,
        Some(std::time::Duration::from_secs(7 * 86_400))
    );
    assert_eq!(cfg.retention.node_max_bytes, Some(1 << 30));
    assert_eq!(cfg.identity.hub_id, "spiffe://example.org/hub");
    assert_eq!(cfg.data_dir, Path::new("/etc/edgesync/data"));
}

#[test]
fn several_problems_with_lines_and_unknown_fields() {
    let text = r#"[hub]
listen = "7443"
http_listen = "localhost:8080"
data_dir = "data"
max_nodes = 0
max_conns = 3

[identity]
trust_domain = "example.org"
hub_id = "spiffe://other.org/hub"
cert = "c.pem"
key = "k.pem"

[api]
port = 1

[[api.tokens]]
name = "ops"
token = "short"
role = "root"

[[api.tokens]]
name = "ops"
role = "admin"
scope = "all"

[tls]
"#;
    let err = parse("deploy/hub.toml", text, Path::new(".")).unwrap_err();
    let rendered: Vec<String> = err.iter().map(|e| e.to_string()).collect();
    let expected = [
        "deploy/hub.toml:2: [hub]: listen \"7443\" is not an ip:port socket address",
        "deploy/hub.toml:3: [hub]: http_listen \"localhost:8080\" is not an ip:port socket address",
        "deploy/hub.toml:5: [hub]: max_nodes is 0 but must be in 1..=4294967295",
        "deploy/hub.toml:6: [hub]: unknown field \"max_conns\" (did you mean \"max_nodes\"?)",
        "deploy/hub.toml:8: [identity]: missing required field \"bundle\"",
        "deploy/hub.toml:10: [identity]: hub_id \"spiffe://other.org/hub\" is not in trust domain \"example.org\"",
        "deploy/hub.toml:15: [api]: unknown field \"port\"",
        "deploy/hub.toml:19: api token \"ops\": token is 5 characters long, shorter than 16",
        "deploy/hub.toml:20: api token \"ops\": role \"root\" is not one of \"admin\", \"read_only\"",
        "deploy/hub.toml:22: api token \"ops\": missing token (give token or token_file)",
        "deploy/hub.toml:23: api token \"ops\": token name \"ops\" is already used on line 18",
        "deploy/hub.toml:25: api token \"ops\": unknown field \"scope\"",
        "deploy/hub.toml:27: top level: unknown field \"tls\"",
    ];
    for want in expected {
        assert!(
            rendered.iter().any(|r| r.starts_with(want)),
            "missing {want:?} in\n{}",
            rendered.join("\n")
        );
    }
    assert_eq!(rendered.len(), expected.len(), "{}", rendered.join("\n"));
    assert_eq!(render_errors(&err).lines().count(), expected.len());
}

#[test]
fn missing_everything() {
    let found = problems("");
    let msgs: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "missing required table [hub] (it needs data_dir)",
            "missing required table [identity] (it needs trust_domain, and cert, key and bundle or source = \"workload_api\")",
            "missing required table [api] (it needs at least one [[api.tokens]])",
        ]
    );
    let text = BASE.replace(
        "[[api.tokens]]\nname = \"admin\"\ntoken = \"0123456789abcdef\"\nrole = \"admin\"\n",
        "[api]\n",
    );
    assert_problem(&text, "[api]", "[api]: no API tokens are configured");
}

#[test]
fn token_checks() {
    let with_token = |lines: &str| format!("{BASE}[[api.tokens]]\n{lines}\n");
    let text = with_token("name = \"b\"\ntoken = \"0123456789abcdef\"\nrole = \"read_only\"");
    assert!(
        problems(&text)
            .iter()
            .any(|(_, m)| m.contains("the same secret is already used by token \"admin\"")),
        "{:#?}",
        problems(&text)
    );
    let text = with_token("name = \"b\"\ntoken = \"0123456789 abcdef\"\nrole = \"admin\"");
    assert_problem(
        &text,
        "0123456789 abcdef",
        "token may only hold visible ASCII characters",
    );
    let text = with_token(
        "name = \"b\"\ntoken = \"0123456789abcdefX\"\ntoken_file = \"t\"\nrole = \"admin\"",
    );
    assert_problem(&text, "token_file", "give token or token_file, not both");
    let text = with_token("name = \"b\"\ntoken = \"0123456789abcdefX\"");
    // Missing fields are reported at the table header: the second [[api.tokens]], line 14.
    assert_problem_at(
        &text,
        14,
        "api token \"b\": missing required field \"role\"",
    );
    let text = with_token("token = \"0123456789abcdefX\"\nrole = \"admin\"");
    assert_problem_at(&text, 14, "api token #2: missing required field \"name\"");
    let text = with_token("name = \"b\"\ntoken_file = \"does-not-exist.token\"\nrole = \"admin\"");
    assert_problem(
        &text,
        "token_file",
        "cannot read token_file /etc/edgesync/does-not-exist.token",
    );
    let text = format!("{BASE}[api]\ntokens = 1\n");
    assert!(
        problems(&text)
            .iter()
            .any(|(_, m)| m.contains("invalid TOML") || m.contains("expected an array of tables"))
    );
}

#[test]
fn token_file_is_read_relative_to_the_config() {
    let dir = std::env::temp_dir().join(format!("edgesync-hubcfg-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    std::fs::write(
        dir.join("secrets/ops.token"),
        "  abcdefghijklmnopqrstuvwxyz\n",
    )
    .unwrap();
    std::fs::write(dir.join("secrets/short.token"), "abc\n").unwrap();
    let text = format!(
        "{BASE}[[api.tokens]]\nname = \"ops\"\ntoken_file = \"secrets/ops.token\"\nrole = \"read_only\"\n"
    );
    let file = dir.join("hub.toml");
    std::fs::write(&file, &text).unwrap();
    let cfg = load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.source, file);
    assert_eq!(cfg.tokens[1].token, "abcdefghijklmnopqrstuvwxyz");
    assert!(cfg.data_dir.is_absolute());

    std::fs::write(&file, text.replace("ops.token", "short.token")).unwrap();
    let err = load(&file).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    assert!(
        err.to_string()
            .contains("is 3 characters long, shorter than 16"),
        "{err}"
    );
    assert_eq!(err.errors[0].line, Some(line_of(&text, "token_file")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn identity_and_listen_checks() {
    let text = BASE.replace(
        "trust_domain = \"example.org\"",
        "trust_domain = \"Example.org\"",
    );
    assert_problem(
        &text,
        "trust_domain",
        "trust_domain \"Example.org\" may only hold lowercase",
    );
    let text = BASE.replace("cert = \"c.pem\"", "cert = \"c.pem\"\nhub_id = \"hub\"");
    assert_problem(&text, "hub_id", "hub_id \"hub\" is not a SPIFFE id");
    let text = BASE.replace(
        "data_dir = \"data\"",
        "data_dir = \"data\"\nlisten = \"[::]:7443\"\nsled_cache_bytes = 0",
    );
    assert_problem(
        &text,
        "sled_cache_bytes",
        "sled_cache_bytes is 0 but must be at least 65536",
    );
    let cfg = parse_text(&BASE.replace(
        "data_dir = \"data\"",
        "data_dir = \"/var/lib/hub\"\nlisten = \"[::]:7443\"",
    ))
    .unwrap();
    assert_eq!(cfg.listen, "[::]:7443".parse().unwrap());
    assert_eq!(cfg.data_dir, Path::new("/var/lib/hub"));
    let text = BASE.replace("data_dir = \"data\"", "data_dir = 5");
    assert_problem(
        &text,
        "data_dir",
        "[hub]: data_dir: invalid type: integer `5`, expected a string",
    );
}

#[test]
fn idle_timeout_is_checked() {
    let with = |v: &str| BASE.replacen("[hub]\n", &format!("[hub]\nidle_timeout_ms = {v}\n"), 1);
    assert_eq!(
        parse_text(&with("3000")).unwrap().idle_timeout,
        std::time::Duration::from_secs(3)
    );
    let text = with("10");
    assert_problem(&text, "idle_timeout_ms", "idle_timeout_ms");
}

#[test]
fn connection_bounds_are_read_and_checked() {
    let with = |extra: &str| BASE.replacen("[hub]\n", &format!("[hub]\n{extra}\n"), 1);
    let cfg = parse_text(&with(
        "http_max_connections = 32\nhttp_head_timeout_ms = 2500\nmax_handshakes = 8\nhandshake_timeout_ms = 1500",
    ))
    .unwrap();
    assert_eq!(cfg.http_limits.max_connections, 32);
    assert_eq!(
        cfg.http_limits.head_timeout,
        std::time::Duration::from_millis(2500)
    );
    assert_eq!(cfg.max_handshakes, 8);
    assert_eq!(
        cfg.handshake_timeout,
        std::time::Duration::from_millis(1500)
    );
    for (field, bad) in [
        ("http_max_connections", "0"),
        ("http_head_timeout_ms", "5"),
        ("max_handshakes", "0"),
        ("handshake_timeout_ms", "600000"),
    ] {
        let text = with(&format!("{field} = {bad}"));
        assert_problem(&text, field, field);
    }
}

#[test]
fn quotas_and_retention_are_read_and_zero_turns_them_off() {
    let with = |extra: &str| BASE.replacen("[hub]\n", &format!("[hub]\n{extra}\n"), 1);
    let cfg = parse_text(&with(
        "node_max_records_per_s = 2000\nhistory_max_age_s = 3600\nnode_history_max_bytes = 1_000_000",
    ))
    .unwrap();
    assert_eq!(cfg.node_max_records_per_s.map(|r| r.get()), Some(2000));
    assert_eq!(
        cfg.retention.max_age,
        Some(std::time::Duration::from_secs(3600))
    );
    assert_eq!(cfg.retention.node_max_bytes, Some(1_000_000));
    let off = parse_text(&with(
        "node_max_records_per_s = 0\nhistory_max_age_s = 0\nnode_history_max_bytes = 0",
    ))
    .unwrap();
    assert_eq!(off.node_max_records_per_s, None);
    assert_eq!(off.retention, crate::store::Retention::default());
    for (field, bad) in [
        ("node_max_records_per_s", "-1"),
        ("history_max_age_s", "-5"),
        ("node_history_max_bytes", "-1"),
        ("node_max_records_per_s", "\"fast\""),
    ] {
        let text = with(&format!("{field} = {bad}"));
        assert_problem(&text, field, field);
    }
}

#[test]
fn api_tls_fields_are_read_and_checked() {
    let with_api = |lines: &str| format!("{BASE}[api]\n{lines}\n");
    let cfg = parse_text(BASE).unwrap();
    assert_eq!(cfg.api_tls, None, "plain HTTP is the default");
    let cfg = parse_text(&with_api(
        "tls_cert = \"tls/api.crt\"\ntls_key = \"/secrets/api.key\"",
    ))
    .unwrap();
    assert_eq!(
        cfg.api_tls,
        Some(TlsFiles {
            cert: PathBuf::from("/etc/edgesync/tls/api.crt"),
            key: PathBuf::from("/secrets/api.key"),
        })
    );
    let text = with_api("tls_cert = \"api.crt\"");
    assert_problem(
        &text,
        "tls_cert",
        "[api]: tls_cert is set but tls_key is not (give both, or neither for plain HTTP)",
    );
    let text = with_api("tls_key = \"api.key\"");
    assert_problem(
        &text,
        "tls_key",
        "[api]: tls_key is set but tls_cert is not",
    );
    let text = with_api("tls_cert = \"\"\ntls_key = \"api.key\"");
    assert_problem(&text, "tls_cert", "[api]: tls_cert is empty");
    let text = with_api("tls_cert = \"api.pem\"\ntls_key = \"api.pem\"");
    assert_problem(&text, "tls_key", "tls_key names the same file as tls_cert");
    let text = with_api("tls_cert = 5\ntls_key = \"api.key\"");
    assert_problem(
        &text,
        "tls_cert",
        "[api]: tls_cert: invalid type: integer `5`",
    );
    let text = with_api("tls_crt = \"api.crt\"");
    assert_problem(&text, "tls_crt", "[api]: unknown field \"tls_crt\"");
    // A problem in [api] does not stop the tokens from being checked.
    let text = format!(
        "{}[api]\ntls_cert = 5\n",
        BASE.replace("0123456789abcdef", "short")
    );
    let found = problems(&text);
    assert!(
        found.iter().any(|(_, m)| m.contains("shorter than 16")),
        "{found:#?}"
    );
    // The [api] table may come before or after its tokens.
    let text = BASE.replacen(
        "[[api.tokens]]",
        "[api]\ntls_cert = \"a.crt\"\ntls_key = \"a.key\"\n\n[[api.tokens]]",
        1,
    );
    assert!(parse_text(&text).unwrap().api_tls.is_some());
}

#[test]
fn token_files_are_remembered_for_reloading() {
    let dir = std::env::temp_dir().join(format!("edgesync-hubcfg-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ops.token"), "abcdefghijklmnopqrstuvwxyz\n").unwrap();
    let text = format!(
        "{BASE}[[api.tokens]]\nname = \"ops\"\ntoken_file = \"ops.token\"\nrole = \"read_only\"\n"
    );
    let cfg = parse("hub.toml", &text, &dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.token_files,
        [TokenFile {
            name: "ops".into(),
            path: dir.join("ops.token"),
        }]
    );
    assert_eq!(cfg.tokens[1].token, "abcdefghijklmnopqrstuvwxyz");
    // Inline tokens are not watched.
    assert!(parse_text(BASE).unwrap().token_files.is_empty());
    assert_eq!(
        secret_problem("abc").as_deref(),
        Some("is 3 characters long, shorter than 16")
    );
    assert_eq!(secret_problem("abcdefghijklmnop"), None);
    let _ = std::fs::remove_dir_all(&dir);
}
