#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use super::*;

const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml"));

/// The smallest valid config without devices (9 lines).
const BASE: &str = r#"[agent]
data_dir = "data"
[hub]
address = "hub.local:7443"
[identity]
trust_domain = "example.org"
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
"#;

fn parse_text(text: &str) -> Result<AgentConfig, ConfigErrors> {
    parse("agent.toml", text, Path::new("/etc/edgesync"))
}

/// `line: message` of every problem.
fn problems(text: &str) -> Vec<(Option<usize>, String)> {
    match parse_text(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.errors.into_iter().map(|e| (e.line, e.message)).collect(),
    }
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

/// Asserts that some problem is on the line holding `marker` and contains `needle`.
fn assert_problem(text: &str, marker: &str, needle: &str) {
    let line = line_of(text, marker);
    let found = problems(text);
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(line) && m.contains(needle)),
        "no problem on line {line} containing {needle:?}; got {found:#?}"
    );
}

fn with_device(device: &str) -> String {
    format!("{BASE}{device}")
}

fn one_tag(tag_lines: &str) -> String {
    with_device(&format!(
        "[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"127.0.0.1:502\"\n[[devices.tags]]\nname = \"t\"\n{tag_lines}\n"
    ))
}

fn single_tag(tag_lines: &str) -> TagSpec {
    let cfg = parse_text(&one_tag(tag_lines)).unwrap_or_else(|e| panic!("{e}"));
    cfg.devices[0].tags[0].clone()
}

#[test]
fn deploy_example_is_valid() {
    let cfg = parse("deploy/agent.toml", EXAMPLE, Path::new("/opt/edgesync"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.node_id.as_ref().map(|n| n.as_str()), Some("line-1"));
    assert_eq!(cfg.data_dir, Path::new("/opt/edgesync/./data"));
    let IdentitySource::Files(files) = &cfg.identity.source else {
        panic!("{:?}", cfg.identity.source)
    };
    assert_eq!(files.cert, Path::new("/opt/edgesync/./pki/agent.crt"));
    assert_eq!(cfg.identity.trust_domain, "example.org");
    assert_eq!(cfg.hub.address, "hub.example.org:7443");
    assert_eq!(cfg.hub.idle_timeout, Duration::from_secs(10));
    assert_eq!(cfg.outbox, OutboxConfig::default());
    assert_eq!(cfg.metrics_listen, "127.0.0.1:9464".parse().ok());
    assert_eq!(cfg.devices.len(), 3);

    let flow = &cfg.devices[2];
    assert!(
        matches!(&flow.link, LinkSpec::Rtu { path, baud: 9600, parity: crate::model::Parity::None, data_bits: 8, stop_bits: 1, inter_frame_delay }
            if path == "/dev/ttyUSB0" && *inter_frame_delay == crate::model::default_inter_frame_delay(9600, crate::model::Parity::None, 8, 1)),
        "{:?}",
        flow.link
    );
    assert_eq!(
        (flow.unit_id, flow.tags[0].table),
        (7, Table::InputRegister)
    );

    let boiler = &cfg.devices[0];
    assert_eq!(boiler.id.as_str(), "boiler-1");
    assert_eq!(
        boiler.link,
        LinkSpec::Tcp {
            endpoint: "127.0.0.1:5020".into()
        }
    );
    assert_eq!(boiler.tags.len(), 6);
    let temp = &boiler.tags[0];
    assert_eq!(temp.data_type, DataType::Float32);
    assert_eq!(temp.byte_order, ByteOrder::Cdab, "device default applies");
    assert_eq!(temp.poll_interval, Duration::from_millis(500));
    assert_eq!(temp.report.deadband_abs, 0.5);
    assert_eq!(temp.report.max_interval, Some(Duration::from_secs(60)));
    assert_eq!(boiler.tags[2].byte_order, ByteOrder::Abcd, "tag override");
    assert_eq!(boiler.tags[4].bit, Some(3));
    assert_eq!(boiler.tags[5].data_type, DataType::String { len: 8 });

    let packer = &cfg.devices[1];
    assert_eq!(packer.unit_id, 7);
    assert_eq!(packer.max_registers_per_read, 64);
    assert_eq!(packer.timeout, Duration::from_millis(500));
    let count = &packer.tags[0];
    assert_eq!((count.table, count.address), (Table::HoldingRegister, 0));
    assert_eq!(count.byte_order, ByteOrder::Dcba);
    assert!(count.report.every_sample);
    assert_eq!(
        (packer.tags[1].table, packer.tags[1].address),
        (Table::InputRegister, 0)
    );
    let door = &packer.tags[2];
    assert_eq!((door.table, door.address), (Table::DiscreteInput, 4));
    assert_eq!(door.data_type, DataType::Bool);
    assert_eq!(
        (packer.tags[3].table, packer.tags[3].address),
        (Table::Coil, 2)
    );
    assert_eq!(packer.tags[3].access, Access::Write);
}

#[test]
fn load_resolves_paths_against_the_file() {
    let dir = std::env::temp_dir().join(format!("edgesync-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    std::fs::write(&file, BASE).unwrap();
    let cfg = load(&file).unwrap();
    assert_eq!(cfg.source, file);
    assert!(cfg.data_dir.is_absolute());
    assert_eq!(
        cfg.data_dir,
        std::path::absolute(&dir).unwrap().join("data")
    );
    let IdentitySource::Files(files) = &cfg.identity.source else {
        panic!("{:?}", cfg.identity.source)
    };
    assert_eq!(
        files.bundle,
        std::path::absolute(&dir).unwrap().join("b.pem")
    );
    assert!(cfg.devices.is_empty());
    let _ = std::fs::remove_dir_all(&dir);

    let missing = dir.join("nope.toml");
    let err = load(&missing).unwrap_err();
    assert_eq!(err.len(), 1);
    assert!(
        err.to_string()
            .starts_with(&format!("{}: cannot read", missing.display()))
    );
}

#[test]
fn defaults_apply() {
    let cfg = parse_text(&one_tag(
        "table = \"holding_register\"\naddress = 5\ntype = \"int16\"",
    ))
    .unwrap();
    assert_eq!(cfg.sled_cache_bytes, 2 * 1024 * 1024);
    // sled panics on a page cache under 256 bytes: refused with the line instead.
    let text = BASE.replace(
        "data_dir = \"data\"",
        "data_dir = \"data\"\nsled_cache_bytes = 100",
    );
    assert_problem(
        &text,
        "sled_cache_bytes",
        "sled_cache_bytes is 100 but must be at least 65536",
    );
    assert_eq!(cfg.hub.hub_id, None);
    assert_eq!(cfg.hub.connect_timeout, Duration::from_millis(5000));
    assert_eq!(cfg.hub.keepalive, Duration::from_millis(2000));
    assert_eq!(cfg.hub.backoff_initial, Duration::from_millis(200));
    assert_eq!(cfg.hub.backoff_max, Duration::from_millis(30_000));
    assert_eq!(cfg.metrics_listen, None);
    let d = &cfg.devices[0];
    assert_eq!(d.unit_id, 1);
    assert_eq!(d.timeout, Duration::from_millis(1000));
    assert_eq!(
        (d.max_registers_per_read, d.max_bits_per_read, d.max_gap),
        (125, 2000, 10)
    );
    let t = &d.tags[0];
    assert_eq!(t.poll_interval, Duration::from_millis(1000));
    assert_eq!((t.scale, t.offset), (1.0, 0.0));
    assert_eq!(t.access, Access::Read);
    assert_eq!(t.byte_order, ByteOrder::Abcd);
    assert_eq!(t.report, ReportPolicy::default());
}

#[test]
fn defaults_table_applies_to_devices() {
    let text = format!(
        "{BASE}[defaults]\npoll_interval_ms = 250\nbyte_order = \"DCBA\"\nmax_gap = 3\n[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\n[[devices.tags]]\nname = \"t\"\naddress = \"40001\"\ntype = \"int32\"\n"
    );
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.devices[0].max_gap, 3);
    assert_eq!(cfg.devices[0].tags[0].byte_order, ByteOrder::Dcba);
    assert_eq!(
        cfg.devices[0].tags[0].poll_interval,
        Duration::from_millis(250)
    );
}

#[test]
fn an_outbox_section_without_a_key_takes_the_same_default_as_no_section() {
    // `commit_interval_ms` once defaulted to 20 ms inside `[outbox]` and to 0 without it.
    let none = parse_text(BASE).unwrap().outbox;
    let empty = parse_text(&format!("{BASE}[outbox]\n")).unwrap().outbox;
    let fsync_only = parse_text(&format!("{BASE}[outbox]\nfsync = \"every_commit\"\n"))
        .unwrap()
        .outbox;
    assert_eq!(none, OutboxConfig::default());
    assert_eq!(empty, none);
    assert_eq!(fsync_only, none);
    // The documented default: commit at once when no commit runs.
    assert_eq!(none.commit_interval_ms, 0);
    assert_eq!(none.fsync, FsyncPolicy::EveryCommit);
    // A sweep of 10 units x 100 changed registers goes up in one frame, as the session's own
    // default (for embedders of the protocol crate) also sends it.
    assert_eq!(none.batch_max_records, 1024);
    assert_eq!(
        none.batch_max_records,
        edgesync_protocol::session::EdgeConfig::default().max_batch_records
    );
    let set = parse_text(&format!("{BASE}[outbox]\nbatch_max_records = 100\n")).unwrap();
    assert_eq!(set.outbox.batch_max_records, 100);
}

#[test]
fn an_empty_optional_section_means_the_same_as_none() {
    let none = format!("{:?}", parse_text(BASE).unwrap());
    // (`[rules]` needs its `dir`.)
    for section in ["outbox", "mqtt", "metrics", "defaults"] {
        let empty = parse_text(&format!("{BASE}[{section}]\n")).unwrap();
        assert_eq!(format!("{empty:?}"), none, "[{section}]");
    }
}

#[test]
fn a_hub_id_outside_our_trust_domains_is_reported_by_the_parser() {
    let with_hub_id = |id: &str, extra: &str| {
        BASE.replace(
            "address = \"hub.local:7443\"",
            &format!("address = \"hub.local:7443\"\nhub_id = {id:?}"),
        ) + extra
    };
    let ours = parse_text(&with_hub_id("spiffe://example.org/hub", "")).unwrap();
    assert_eq!(ours.hub.hub_id.as_deref(), Some("spiffe://example.org/hub"));
    assert_problem(
        &with_hub_id("spiffe://other.org/hub", ""),
        "hub_id = ",
        "is in trust domain \"other.org\", neither ours (\"example.org\") nor listed in [identity] federates_with",
    );
    let federated = with_hub_id(
        "spiffe://other.org/hub",
        "federates_with = [\"other.org\"]\n[identity.federated_bundles]\n\"other.org\" = \"other.pem\"\n",
    );
    parse_text(&federated).unwrap();
    // A broken [identity] (here its socket) is reported alone: its federated domains are
    // unknown, so the hub_id is not called foreign.
    let api = BASE
        .replace(
            "address = \"hub.local:7443\"",
            "address = \"hub.local:7443\"\nhub_id = \"spiffe://other.org/hub\"",
        )
        .replace(
            "cert = \"c.pem\"\nkey = \"k.pem\"\nbundle = \"b.pem\"\n",
            "source = \"workload_api\"\nworkload_api_socket = \"tcp://nowhere\"\nfederates_with = [\"other.org\"]\n",
        );
    let found = problems(&api);
    assert!(
        found.iter().any(|(_, m)| m.contains("workload_api_socket")),
        "{found:#?}"
    );
    assert!(
        !found.iter().any(|(_, m)| m.contains("hub_id")),
        "{found:#?}"
    );
}

#[test]
fn outbox_policies() {
    let cfg = parse_text(&format!(
        "{BASE}[outbox]\nfsync = \"interval\"\nfsync_interval_ms = 250\non_full = \"refuse_new\"\nmax_bytes = 1048576\n"
    ))
    .unwrap();
    assert_eq!(
        cfg.outbox.fsync,
        FsyncPolicy::Interval(Duration::from_millis(250))
    );
    assert_eq!(cfg.outbox.on_full, OutboxFullPolicy::RefuseNew);
    assert_eq!(cfg.outbox.max_bytes, 1 << 20);
    let cfg = parse_text(&format!("{BASE}[outbox]\nfsync = \"never\"\n")).unwrap();
    assert_eq!(cfg.outbox.fsync, FsyncPolicy::Never);
    let text = format!("{BASE}[outbox]\nfsync = \"never\"\nfsync_interval_ms = 5\n");
    assert_problem(
        &text,
        "fsync_interval_ms",
        "applies only with fsync = \"interval\"",
    );
    let text = format!("{BASE}[outbox]\nfsync = \"always\"\n");
    assert_problem(&text, "fsync =", "fsync \"always\" is not one of");
}

#[test]
fn several_problems_are_all_reported_with_lines() {
    let text = r#"[agent]
data_dir = "data"
node_id = "bad/node"

[hub]
address = "hub.local"
keepalive_ms = 20000

[identity]
trust_domain = "Example.org"
cert = "c.pem"
key = "k.pem"

[[devices]]
id = "plc-1"
protocol = "rtu"
unit_id = 248
poll_interval_ms = 5

[[devices.tags]]
name = "temp"
table = "holding_register"
address = 70000
type = "float32"

[[devices.tags]]
name = "temp"
address = "40001"
table = "coil"
type = "float32"

[[devices]]
id = "plc-1"
protocol = "tcp"
endpoint = "10.0.0.1:502"
"#;
    let err = parse("deploy/agent.toml", text, Path::new(".")).unwrap_err();
    let rendered: Vec<String> = err.iter().map(|e| e.to_string()).collect();
    let expected = [
        "deploy/agent.toml:3: [agent]: node id \"bad/node\" may only hold letters",
        "deploy/agent.toml:6: [hub]: address \"hub.local\" is not host:port",
        "deploy/agent.toml:7: [hub]: keepalive_ms (20000) must be shorter than idle_timeout_ms (10000)",
        "deploy/agent.toml:9: [identity]: missing required field \"bundle\"",
        "deploy/agent.toml:10: [identity]: trust_domain \"Example.org\" may only hold lowercase",
        "deploy/agent.toml:14: device \"plc-1\": missing required field \"serial_port\"",
        "deploy/agent.toml:17: device \"plc-1\": unit_id is 248 but must be in 0..=247",
        "deploy/agent.toml:18: device \"plc-1\": poll_interval_ms is 5 but must be in 10..=86400000",
        "deploy/agent.toml:23: device \"plc-1\" tag \"temp\": address 70000 does not fit the holding register table (0..=65535)",
        "deploy/agent.toml:27: device \"plc-1\" tag \"temp\": tag name \"temp\" is already used in this device on line 21",
        "deploy/agent.toml:29: device \"plc-1\" tag \"temp\": table \"coil\" disagrees with address \"40001\", which is a holding register",
        "deploy/agent.toml:33: device \"plc-1\": device id \"plc-1\" is already used on line 15",
        "deploy/agent.toml:32: device \"plc-1\": device has no tags",
    ];
    for want in expected {
        assert!(
            rendered.iter().any(|r| r.starts_with(want)),
            "missing {want:?} in\n{}",
            rendered.join("\n")
        );
    }
    assert_eq!(rendered.len(), expected.len(), "{}", rendered.join("\n"));
    // Sorted by line, and Display prints one per line.
    let lines: Vec<usize> = err.iter().filter_map(|e| e.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
    assert_eq!(err.to_string().lines().count(), expected.len());
    assert_eq!(render_errors(&err), format!("{err}\n"));
}

#[test]
fn unknown_fields_at_every_depth() {
    let text = r#"colour = "blue"
[agent]
data_dir = "data"
datadir = "x"
[hub]
adress = "hub:1"
address = "hub:1"
[identity]
trust_domain = "example.org"
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
extra = { nested = 1 }
[mqtt_bridge]
port = 1883
[[devices]]
id = "d"
protocol = "tcp"
endpoint = "h:502"
unitid = 3
[[devices.tags]]
name = "t"
address = "40001"
type = "int16"
scael = 2.0
[[devices.tags]]
name = "u"
address = "40002"
type = "int16"
deadband = 1.0
deadband_percent = 2.0
"#;
    let found = problems(text);
    let want = [
        (1, "top level: unknown field \"colour\""),
        (
            4,
            "[agent]: unknown field \"datadir\" (did you mean \"data_dir\"?)",
        ),
        (
            6,
            "[hub]: unknown field \"adress\" (did you mean \"address\"?)",
        ),
        (
            13,
            "[identity]: unknown field \"extra\" (expected one of: trust_domain, source, cert, key, bundle, workload_api_socket, workload_api_timeout_ms, federates_with, federated_bundles, node_path_prefix)",
        ),
        (14, "top level: unknown field \"mqtt_bridge\""),
        (
            20,
            "device \"d\": unknown field \"unitid\" (did you mean \"unit_id\"?)",
        ),
        (
            25,
            "device \"d\" tag \"t\": unknown field \"scael\" (did you mean \"scale\"?)",
        ),
        (
            31,
            "device \"d\" tag \"u\": unknown field \"deadband_percent\" (did you mean \"deadband_pct\"?)",
        ),
    ];
    for (line, msg) in want {
        assert!(
            found
                .iter()
                .any(|(l, m)| *l == Some(line) && m.starts_with(msg)),
            "missing {line}: {msg}; got {found:#?}"
        );
    }
    assert_eq!(found.len(), want.len(), "{found:#?}");
}

#[test]
fn syntax_errors_have_lines() {
    let text = format!("{BASE}[[devices]]\nid = \"d\nprotocol = \"tcp\"\n");
    let found = problems(&text);
    assert!(!found.is_empty());
    assert!(
        found.iter().all(|(_, m)| m.starts_with("invalid TOML")),
        "{found:#?}"
    );
    assert_eq!(found[0].0, Some(11), "{found:#?}");
}

#[test]
fn a_type_error_stops_only_its_table() {
    let text = format!(
        "{BASE}[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\nunit_id = \"one\"\n[[devices.tags]]\nname = \"t\"\naddress = \"40001\"\ntype = \"int16\"\nscale = \"big\"\n[[devices.tags]]\nname = \"u\"\naddress = 1.5\n[[devices.tags]]\nname = \"v\"\naddress = \"40003\"\ntype = \"float128\"\n"
    );
    assert_problem(
        &text,
        "unit_id = \"one\"",
        "device \"d\": unit_id: invalid type: string \"one\"",
    );
    assert_problem(
        &text,
        "scale = \"big\"",
        "device \"d\" tag \"t\": scale: invalid type: string \"big\"",
    );
    assert_problem(
        &text,
        "address = 1.5",
        "tag \"u\": address: invalid type: floating point",
    );
    assert_problem(
        &text,
        "float128",
        "type \"float128\" is not one of \"bool\", \"int16\"",
    );
    assert_eq!(problems(&text).len(), 4, "{:#?}", problems(&text));
}

#[test]
fn missing_tables_and_fields() {
    let found = problems("");
    let msgs: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        msgs,
        [
            "missing required table [agent] (it needs data_dir)",
            "missing required table [hub] (it needs address)",
            "missing required table [identity] (it needs trust_domain, and cert, key and bundle or source = \"workload_api\")",
        ]
    );
    assert!(found.iter().all(|(l, _)| l.is_none()));
    let text = format!("{BASE}[[devices]]\nunit_id = 2\n[[devices.tags]]\ntype = \"int16\"\n");
    assert_problem(
        &text,
        "[[devices]]",
        "device #1: missing required field \"id\"",
    );
    assert_problem(
        &text,
        "[[devices]]",
        "device #1: missing required field \"protocol\"",
    );
    assert_problem(
        &text,
        "[[devices.tags]]",
        "device #1 tag #1: missing required field \"name\"",
    );
    assert_problem(
        &text,
        "[[devices.tags]]",
        "device #1 tag #1: missing required field \"address\"",
    );
    let text = format!(
        "{BASE}[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\n[[devices.tags]]\nname = \"x\"\naddress = \"40001\"\n"
    );
    assert_problem(
        &text,
        "[[devices]]",
        "device \"d\": missing required field \"endpoint\"",
    );
    assert_problem(&text, "[[devices.tags]]", "missing required field \"type\"");
}

#[test]
fn address_shorthand_forms_in_config() {
    let cases = [
        ("\"40001\"", Table::HoldingRegister, 0),
        ("\"49999\"", Table::HoldingRegister, 9998),
        ("\"400001\"", Table::HoldingRegister, 0),
        ("\"465535\"", Table::HoldingRegister, 65534),
        ("\"30001\"", Table::InputRegister, 0),
        ("\"310000\"", Table::InputRegister, 9999),
    ];
    for (addr, table, offset) in cases {
        let t = single_tag(&format!("address = {addr}\ntype = \"uint16\""));
        assert_eq!((t.table, t.address), (table, offset), "{addr}");
    }
    let bits = [
        ("\"10001\"", Table::DiscreteInput, 0),
        ("\"165536\"", Table::DiscreteInput, 65535),
        ("\"00001\"", Table::Coil, 0),
        ("\"1\"", Table::Coil, 0),
        ("\"123\"", Table::Coil, 122),
        ("\"000010\"", Table::Coil, 9),
    ];
    for (addr, table, offset) in bits {
        let t = single_tag(&format!("address = {addr}"));
        assert_eq!(
            (t.table, t.address, t.data_type),
            (table, offset, DataType::Bool),
            "{addr}"
        );
    }
    // A table that agrees is fine.
    let t = single_tag("table = \"input_register\"\naddress = \"30002\"\ntype = \"int16\"");
    assert_eq!((t.table, t.address), (Table::InputRegister, 1));
    // Bad forms.
    let text = one_tag("address = \"20001\"\ntype = \"int16\"");
    assert_problem(&text, "20001", "starts with 2, which names no table");
    let text = one_tag("address = \"40000\"\ntype = \"int16\"");
    assert_problem(
        &text,
        "40000",
        "register number 0 is out of range (1..=9999)",
    );
    let text = one_tag("address = \"465537\"\ntype = \"int16\"");
    assert_problem(
        &text,
        "465537",
        "register number 65537 is out of range (1..=65536)",
    );
    let text = one_tag("address = \"4x001\"\ntype = \"int16\"");
    assert_problem(&text, "4x001", "is not a shorthand address");
    // An integer address needs a table.
    let text = one_tag("address = 3\ntype = \"int16\"");
    assert_problem(&text, "address = 3", "table is required");
    let text = one_tag("table = \"holding_register\"\naddress = -1\ntype = \"int16\"");
    assert_problem(
        &text,
        "address = -1",
        "address -1 does not fit the holding register table (0..=65535)",
    );
    let text = one_tag("table = \"register\"\naddress = 1\ntype = \"int16\"");
    assert_problem(
        &text,
        "table =",
        "table \"register\" is not one of \"coil\"",
    );
}

#[test]
fn extent_checks_name_the_register() {
    let text = one_tag("table = \"holding_register\"\naddress = 65534\ntype = \"float64\"");
    assert_problem(
        &text,
        "address = 65534",
        "address 65534 (holding register 465535) with type float64 (4 registers) runs past the end of the holding register table: its last register would be 65537",
    );
    let t = single_tag("table = \"holding_register\"\naddress = 65532\ntype = \"float64\"");
    assert_eq!(t.address, 65532);
    let text = one_tag("address = \"465536\"\ntype = \"string\"\nlength = 2");
    assert_problem(&text, "465536", "its last register would be 65536");
    let t = single_tag("address = \"465536\"\ntype = \"uint16\"");
    assert_eq!(t.address, 65535);
}

#[test]
fn width_must_fit_one_read() {
    let text = with_device(
        "[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\nmax_registers_per_read = 2\n[[devices.tags]]\nname = \"t\"\naddress = \"40001\"\ntype = \"int64\"\n",
    );
    assert_problem(
        &text,
        "int64",
        "type int64 takes 4 registers, more than the device reads at once (max_registers_per_read = 2)",
    );
    let text = one_tag("address = \"40001\"\ntype = \"string\"\nlength = 126");
    assert_problem(
        &text,
        "length = 126",
        "length is 126 but must be in 1..=125",
    );
    let text = one_tag("address = \"40001\"\ntype = \"string\"");
    assert_problem(&text, "type = \"string\"", "type \"string\" needs length");
    let text = one_tag("address = \"40001\"\ntype = \"int16\"\nlength = 2");
    assert_problem(
        &text,
        "length = 2",
        "length applies only to type \"string\"",
    );
    let text = with_device(
        "[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\nmax_registers_per_read = 126\nmax_bits_per_read = 0\n[[devices.tags]]\nname = \"t\"\naddress = \"1\"\n",
    );
    assert_problem(
        &text,
        "max_registers_per_read",
        "max_registers_per_read is 126 but must be in 1..=125",
    );
    assert_problem(
        &text,
        "max_bits_per_read",
        "max_bits_per_read is 0 but must be in 1..=2000",
    );
}

#[test]
fn bits_and_bit_tables() {
    let text = one_tag("address = \"00001\"\ntype = \"bool\"\nbit = 2");
    assert_problem(
        &text,
        "bit = 2",
        "bit applies only to a bool in a register table; a coil is a single bit already",
    );
    let text = one_tag("address = \"10001\"\ntype = \"int16\"");
    assert_problem(
        &text,
        "type = \"int16\"",
        "type \"int16\" cannot live in the discrete input table, which holds single bits",
    );
    let text = one_tag("address = \"40001\"\ntype = \"bool\"");
    assert_problem(
        &text,
        "type = \"bool\"",
        "a bool in the holding register table needs bit (0..=15)",
    );
    let text = one_tag("address = \"40001\"\ntype = \"bool\"\nbit = 16");
    assert_problem(&text, "bit = 16", "bit is 16 but must be in 0..=15");
    let text = one_tag("address = \"40001\"\ntype = \"int16\"\nbit = 1");
    assert_problem(&text, "bit = 1", "bit applies only to type \"bool\"");
    let t = single_tag("address = \"30001\"\ntype = \"bool\"\nbit = 15");
    assert_eq!(
        (t.table, t.bit, t.data_type),
        (Table::InputRegister, Some(15), DataType::Bool)
    );
}

#[test]
fn device_checks() {
    let dev = |lines: &str| {
        with_device(&format!(
            "[[devices]]\nid = \"d\"\n{lines}\n[[devices.tags]]\nname = \"t\"\naddress = \"1\"\n"
        ))
    };
    let text = dev("protocol = \"tcp\"\nendpoint = \"h:1\"\nunit_id = 0");
    assert_eq!(parse_text(&text).unwrap().devices[0].unit_id, 0);
    let text = dev("protocol = \"tcp\"\nendpoint = \"h:1\"\nunit_id = 247");
    assert_eq!(parse_text(&text).unwrap().devices[0].unit_id, 247);
    let text = dev("protocol = \"tcp\"\nendpoint = \"h:1\"\nunit_id = -1");
    assert_problem(&text, "unit_id", "unit_id is -1 but must be in 0..=247");
    let text = dev("protocol = \"tcp\"\nendpoint = \"h:1\"\ntimeout_ms = 0");
    assert_problem(
        &text,
        "timeout_ms",
        "timeout_ms is 0 but must be in 1..=600000",
    );
    let text = dev("protocol = \"tcp\"\nendpoint = \"h:1\"\npoll_interval_ms = 9");
    assert_problem(
        &text,
        "poll_interval_ms",
        "poll_interval_ms is 9 but must be in 10..",
    );
    let text = dev("protocol = \"tcp\"\nendpoint = \"::1:502\"");
    assert_problem(
        &text,
        "endpoint",
        "device \"d\": endpoint \"::1:502\" has an IPv6 host without brackets",
    );
    let text = dev("protocol = \"tcp\"\nendpoint = \"plc:0\"");
    assert_problem(&text, "endpoint", "has port 0");
    let text = dev("protocol = \"tcp\"\nendpoint = \"[::1]:502\"\nbyte_order = \"ABDC\"");
    assert_problem(
        &text,
        "byte_order",
        "byte_order \"ABDC\" is not one of \"ABCD\"",
    );
    let text = with_device(
        "[[devices]]\nid = \"a b\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\n[[devices.tags]]\nname = \"t\"\naddress = \"1\"\n",
    );
    assert_problem(&text, "id = \"a b\"", "device id \"a b\" may only hold");
    let text =
        with_device("[[devices]]\nid = \"d\"\nprotocol = \"tcp\"\nendpoint = \"h:1\"\ntags = []\n");
    assert_problem(&text, "[[devices]]", "device \"d\": device has no tags");
    let text = format!("devices = 3\n{BASE}");
    assert_problem(
        &text,
        "devices = 3",
        "expected an array of tables ([[devices]]), found integer",
    );
}

#[test]
fn tag_value_checks() {
    let tag = |lines: &str| one_tag(&format!("address = \"40001\"\n{lines}"));
    assert_problem(
        &tag("type = \"int16\"\nscale = 0.0"),
        "scale",
        "scale is 0 but must be finite and non-zero",
    );
    assert_problem(
        &tag("type = \"int16\"\nscale = nan"),
        "scale",
        "must be finite and non-zero",
    );
    assert_problem(
        &tag("type = \"int16\"\noffset = inf"),
        "offset",
        "offset is inf but must be finite",
    );
    assert_problem(
        &tag("type = \"string\"\nlength = 2\nscale = 2.0"),
        "scale",
        "scale and offset apply only to numeric types",
    );
    assert_problem(
        &tag("type = \"int16\"\ndeadband = -1.0"),
        "deadband",
        "deadband is -1 but must be a finite number >= 0",
    );
    assert_problem(
        &tag("type = \"int16\"\ndeadband_pct = 101.0"),
        "deadband_pct",
        "deadband_pct is 101 but must be in 0..=100",
    );
    assert_problem(
        &tag("type = \"int16\"\ndeadband = 1.0\ndeadband_pct = 1.0"),
        "deadband_pct",
        "both given; choose one",
    );
    assert_problem(
        &tag("type = \"int16\"\ndeadband = 1.0\nreport = \"every_sample\""),
        "deadband",
        "has no effect with report = \"every_sample\"",
    );
    assert_problem(
        &tag("type = \"int16\"\nreport = \"sometimes\""),
        "report",
        "report \"sometimes\" is not one of \"on_change\", \"every_sample\"",
    );
    assert_problem(
        &tag("type = \"int16\"\npoll_interval_ms = 100\nmax_interval_ms = 50"),
        "max_interval_ms",
        "max_interval_ms (50) is shorter than the tag's poll interval (100 ms)",
    );
    assert_problem(
        &tag("type = \"int16\"\nmax_interval_ms = 0"),
        "max_interval_ms",
        "max_interval_ms is 0 but must be at least 1",
    );
    assert_problem(
        &tag("type = \"int16\"\npoll_interval_ms = 1"),
        "poll_interval_ms",
        "poll_interval_ms is 1 but must be in 10..",
    );
    assert_problem(
        &tag("type = \"int16\"\nunit = \" \""),
        "unit",
        "unit is empty",
    );
    assert_problem(
        &tag("type = \"int16\"\naccess = \"rw\""),
        "access",
        "access \"rw\" is not one of",
    );
    assert_problem(
        &tag("type = \"int32\"\nbyte_order = \"GHEFCDAB\""),
        "byte_order",
        "8-byte order, for 64-bit types only",
    );
    assert_problem(
        &one_tag("address = \"30001\"\ntype = \"int16\"\naccess = \"write\""),
        "access",
        "access \"write\" is not possible: the input register table is read only",
    );
    assert_problem(
        &one_tag("address = \"10001\"\naccess = \"read_write\""),
        "access",
        "the discrete input table is read only",
    );
    assert_problem(
        &one_tag("address = \"00001\"\ndeadband = 1.0"),
        "deadband",
        "deadband applies only to numeric types, not \"bool\"",
    );

    let t = single_tag(
        "address = \"40001\"\ntype = \"float64\"\nbyte_order = \"GHEFCDAB\"\nscale = 2\noffset = -1\ndeadband_pct = 2.5\nmax_interval_ms = 5000\naccess = \"read_write\"\nunit = \"m\"",
    );
    assert_eq!(t.byte_order, ByteOrder::Cdab);
    assert_eq!((t.scale, t.offset), (2.0, -1.0));
    assert_eq!(t.report.deadband_pct, 2.5);
    assert_eq!(t.report.max_interval, Some(Duration::from_secs(5)));
    assert_eq!(t.access, Access::ReadWrite);
    assert_eq!(t.unit.as_deref(), Some("m"));
    for (name, order) in [
        ("ABCDEFGH", ByteOrder::Abcd),
        ("BADCFEHG", ByteOrder::Badc),
        ("HGFEDCBA", ByteOrder::Dcba),
    ] {
        let t = single_tag(&format!(
            "address = \"40001\"\ntype = \"int64\"\nbyte_order = \"{name}\""
        ));
        assert_eq!(t.byte_order, order, "{name}");
    }
    for (name, dt) in [
        ("int16", DataType::Int16),
        ("uint16", DataType::UInt16),
        ("int32", DataType::Int32),
        ("uint32", DataType::UInt32),
        ("int64", DataType::Int64),
        ("uint64", DataType::UInt64),
        ("float32", DataType::Float32),
        ("float64", DataType::Float64),
    ] {
        let t = single_tag(&format!("address = \"40001\"\ntype = \"{name}\""));
        assert_eq!(t.data_type, dt, "{name}");
    }
}

#[test]
fn hub_identity_and_metrics_checks() {
    let text = BASE.replace("address = \"hub.local:7443\"", "address = \"hub.local:7443\"\nhub_id = \"https://example.org/hub\"\nbackoff_initial_ms = 5000\nbackoff_max_ms = 1000\nconnect_timeout_ms = 0");
    assert_problem(
        &text,
        "hub_id",
        "hub_id \"https://example.org/hub\" is not a SPIFFE id",
    );
    assert_problem(
        &text,
        "backoff_max_ms",
        "backoff_max_ms (1000) is shorter than backoff_initial_ms (5000)",
    );
    assert_problem(
        &text,
        "connect_timeout_ms",
        "connect_timeout_ms is 0 but must be at least 1",
    );
    let text = BASE.replace("cert = \"c.pem\"", "cert = \"\"");
    assert_problem(&text, "cert", "[identity]: cert is empty");
    let text = BASE.replace(
        "trust_domain = \"example.org\"",
        "trust_domain = \"spiffe://example.org\"",
    );
    assert_problem(&text, "trust_domain", "must be the bare name");
    let text = format!("{BASE}[metrics]\nlisten = \"localhost:9464\"\n");
    assert_problem(
        &text,
        "listen",
        "listen \"localhost:9464\" is not an ip:port socket address",
    );
    let text = format!("{BASE}[agent2]\n");
    assert_problem(
        &text,
        "[agent2]",
        "top level: unknown field \"agent2\" (did you mean \"agent\"?)",
    );
    let text = format!(
        "hub = 1\n{}",
        BASE.replace("[hub]\naddress = \"hub.local:7443\"\n", "")
    );
    assert_problem(&text, "hub = 1", "[hub]: expected a table, found integer");
    let text = format!("{BASE}[agent.x]\n");
    assert!(
        problems(&text)
            .iter()
            .any(|(_, m)| m.contains("invalid TOML") || m.contains("unknown field \"x\""))
    );
    let cfg = parse_text(&BASE.replace(
        "address = \"hub.local:7443\"",
        "address = \"[2001:db8::1]:7443\"\nhub_id = \"spiffe://example.org/hub/eu\"",
    ))
    .unwrap();
    assert_eq!(
        cfg.hub.hub_id.as_deref(),
        Some("spiffe://example.org/hub/eu")
    );
}

/// Appends devices `plc-0`..`plc-39` (endpoint `10.0.0.<d>:502`), 25 `uint16` tags each: more
/// than 64 KiB, so the file is parsed block by block.
fn push_forty_devices(text: &mut String) {
    for d in 0..40 {
        text.push_str(&format!(
            "\n[[devices]] # device {d}\nid = \"plc-{d}\"\nprotocol = \"tcp\"\nendpoint = \"10.0.0.{d}:502\"\n"
        ));
        for t in 0..25 {
            text.push_str(&format!(
                "\n[[devices.tags]]\nname = \"t{t}\"\naddress = \"4{:05}\"\ntype = \"uint16\"\n",
                t + 1
            ));
        }
    }
}

/// In a large file, a section after the devices (`[defaults]`) still applies to every device,
/// and a device id used in two blocks is reported on the second one's line.
#[test]
fn large_files_read_sections_that_follow_the_devices() {
    let mut text = String::from(BASE);
    push_forty_devices(&mut text);
    text.push_str("\n[defaults]\npoll_interval_ms = 750\n");
    assert!(text.len() > 64 * 1024);
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.devices.len(), 40);
    assert!(cfg.devices.iter().all(|d| {
        d.tags
            .iter()
            .all(|t| t.poll_interval == Duration::from_millis(750))
    }));
    let dup = text.replacen("id = \"plc-30\"", "id = \"plc-3\"", 1);
    let probs = problems(&dup);
    let line = line_of(&dup, "endpoint = \"10.0.0.30:502\"") - 2;
    assert!(
        probs
            .iter()
            .any(|(l, m)| *l == Some(line) && m.contains("\"plc-3\" is already used")),
        "{probs:?}"
    );
}

/// A large file (parsed block by block) reports the same problems on the same lines as a
/// small one, and its devices come out complete and in order.
#[test]
fn large_files_parse_in_blocks_with_the_same_lines() {
    let mut text = String::from(BASE);
    text.push_str("[defaults]\npoll_interval_ms = 250\n");
    push_forty_devices(&mut text);
    assert!(
        text.len() > 64 * 1024,
        "the test must take the block-by-block path"
    );
    let cfg = parse_text(&text).unwrap();
    assert_eq!(cfg.devices.len(), 40);
    assert!(
        cfg.devices
            .iter()
            .enumerate()
            .all(|(i, d)| d.id.as_str() == format!("plc-{i}") && d.tags.len() == 25)
    );
    assert_eq!(
        cfg.devices[39].tags[0].poll_interval,
        Duration::from_millis(250)
    );

    // Problems in late blocks keep their real line numbers.
    let bad = text
        .replacen(
            "name = \"t7\"\naddress = \"400008\"",
            "name = \"t7\"\naddress = 70000\ntable = \"holding_register\"",
            1,
        )
        .replace("id = \"plc-33\"", "id = \"plc-33\"\nfrobnicate = 1");
    let probs = problems(&bad);
    let frob = line_of(&bad, "frobnicate");
    assert!(
        probs
            .iter()
            .any(|(l, m)| *l == Some(frob) && m.contains("frobnicate")),
        "{probs:?}"
    );
    let addr = line_of(&bad, "address = 70000");
    assert!(
        probs
            .iter()
            .any(|(l, m)| *l == Some(addr) && m.contains("70000")),
        "{probs:?}"
    );
    // A syntax error anywhere is reported with its line (the whole-text path).
    let broken = text.replace("id = \"plc-20\"", "id = \"plc-20");
    let probs = problems(&broken);
    let line = line_of(&broken, "id = \"plc-20");
    assert!(
        probs
            .iter()
            .any(|(l, m)| *l == Some(line) && m.contains("invalid TOML")),
        "{probs:?}"
    );
}

#[test]
fn state_only_is_a_per_tag_flag() {
    assert!(
        single_tag("address = \"40001\"\ntype = \"int16\"\nstate_only = true")
            .report
            .state_only
    );
    assert!(
        !single_tag("address = \"40001\"\ntype = \"int16\"")
            .report
            .state_only
    );
    let text = one_tag("address = \"40001\"\ntype = \"int16\"\nstate_only = \"yes\"");
    let found = problems(&text);
    assert!(
        found
            .iter()
            .any(|(l, m)| *l == Some(line_of(&text, "state_only")) && m.contains("state_only")),
        "{found:#?}"
    );
}

#[test]
fn a_workload_api_socket_is_a_unix_path_or_a_tcp_socket_address() {
    let with = |socket: &str| {
        BASE.replace(
            "cert = \"c.pem\"\nkey = \"k.pem\"\nbundle = \"b.pem\"\n",
            &format!("source = \"workload_api\"\nworkload_api_socket = {socket:?}\n"),
        )
    };
    for ok in [
        "unix:///run/spire/agent.sock",
        "tcp://127.0.0.1:8081",
        "tcp://[::1]:8081",
    ] {
        parse_text(&with(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "tcp://spire-agent",
        "tcp://localhost:8081",
        "tcp://",
        "unix:///",
        "unix://x",
    ] {
        assert_problem(
            &with(bad),
            "workload_api_socket",
            "must be unix:///<absolute path> or tcp://<ip>:<port>",
        );
    }
}

#[test]
fn identity_sources_and_federation() {
    let api = r#"[agent]
data_dir = "data"
[hub]
address = "hub.local:7443"
hub_id = "spiffe://cloud.example/hub"
[identity]
trust_domain = "example.org"
source = "workload_api"
workload_api_socket = "unix:///run/spire/agent.sock"
federates_with = ["cloud.example"]
node_path_prefix = "/factory/gw/"
"#;
    let cfg = parse_text(api).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.identity.source,
        IdentitySource::WorkloadApi {
            endpoint: Some("unix:///run/spire/agent.sock".into()),
            federates_with: vec![
                edgesync_protocol::spiffe_id::trust_domain("cloud.example").unwrap()
            ],
            initial_timeout: Duration::from_millis(60_000),
        }
    );
    assert_eq!(cfg.identity.node_path_prefix, "/factory/gw/");

    let files = BASE.to_owned()
        + "federates_with = [\"cloud.example\"]\n[identity.federated_bundles]\n\"cloud.example\" = \"cloud.pem\"\n";
    let cfg = parse_text(&files).unwrap_or_else(|e| panic!("{e}"));
    let IdentitySource::Files(f) = &cfg.identity.source else {
        panic!("{:?}", cfg.identity.source)
    };
    assert_eq!(f.federated.len(), 1);
    assert_eq!(f.federated[0].1, Path::new("/etc/edgesync/cloud.pem"));

    // Every mistake is named with its line.
    let bad = r#"[agent]
data_dir = "data"
[hub]
address = "hub.local:7443"
[identity]
trust_domain = "example.org"
source = "workload_api"
cert = "c.pem"
workload_api_socket = "/run/spire/agent.sock"
federates_with = ["example.org", "Cloud", "x.org", "x.org"]
node_path_prefix = "edge"
workload_api_timeout_ms = 5
"#;
    let found = problems(bad);
    for (line, text) in [
        (8, "cert is only used with source = \"files\""),
        (9, "must be unix:///<absolute path> or tcp://<ip>:<port>"),
        (10, "\"example.org\" is our own trust domain"),
        (10, "\"Cloud\" may only hold lowercase"),
        (10, "\"x.org\" is listed twice"),
        (11, "node_path_prefix \"edge\" must start and end with '/'"),
        (
            12,
            "workload_api_timeout_ms is 5 but must be in 100..=86400000",
        ),
    ] {
        assert!(
            found
                .iter()
                .any(|(l, m)| *l == Some(line) && m.contains(text)),
            "missing {line}: {text} in {found:#?}"
        );
    }
    let missing = BASE.to_owned()
        + "federates_with = [\"cloud.example\"]\nworkload_api_socket = \"unix:///x\"\n[identity.federated_bundles]\n\"other.example\" = \"o.pem\"\n";
    let found = problems(&missing);
    for text in [
        "federated trust domain cloud.example needs a bundle file",
        "\"other.example\" is not listed in federates_with",
        "workload_api_socket is only used with source = \"workload_api\"",
    ] {
        assert!(
            found.iter().any(|(_, m)| m.contains(text)),
            "missing {text} in {found:#?}"
        );
    }
}
