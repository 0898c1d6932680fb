//! Modbus interop and fault tests.
//!
//! - **Interop with pymodbus** (a Modbus stack no one here wrote, installed into `$ROOT/.venv`
//!   by `scripts/setup-python.sh`): every type in every byte order, strings, register bits,
//!   coils and discrete inputs, scale and offset, served by `tests/pymodbus/modbus_peer.py`
//!   over Modbus TCP, RTU over TCP and RTU on a socat pty pair, read by the real
//!   `edgesync-agent` and checked in the real hub's twin API against numbers written in this
//!   file. The registers are encoded by Python's `struct`, not by our codec.
//! - **Writes against pymodbus** through an in-process link's `LinkHandle`, read back by the
//!   pymodbus client and decoded in Python.
//! - **Faults** on one link with several units (our simulator, and a raw TCP peer that sends
//!   malformed answers): the healthy unit keeps its cycle and every faulty unit's tags are bad
//!   with the right reason.
//!
//! The tests fail (never skip) when Python with pymodbus or socat is missing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use edgesync_edge::model::{DeviceSpec, LinkSpec};
use edgesync_edge::modbus::{DeviceReading, LinkOptions, spawn_link_with, spawn_link_writable};
use edgesync_protocol::{BadReason, DeviceId, PropertyId, Quality, Timestamp, Value};
use edgesync_testkit::harness::{self, Api, Pki, Proc, TempDir};
use edgesync_testkit::sim::{Fault, SimConfig, SimHandle};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const TD: &str = "example.org";

// ---------------------------------------------------------------------------------------------
// Python / pymodbus / socat
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's Python with pymodbus: `EDGESYNC_PYTHON`, else `$ROOT/.venv/bin/python`.
fn python() -> anyhow::Result<PathBuf> {
    let p = match std::env::var_os("EDGESYNC_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => root().join(".venv").join("bin").join("python"),
    };
    if !p.exists() {
        bail!(
            "no Python for the pymodbus interop tests at {}: run scripts/setup-python.sh \
             (or set EDGESYNC_PYTHON to a Python that has pymodbus and pyserial)",
            p.display()
        );
    }
    let out = std::process::Command::new(&p)
        .args(["-c", "import pymodbus, serial; print(pymodbus.__version__)"])
        .output()
        .with_context(|| format!("cannot run {}", p.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import pymodbus and pyserial: run scripts/setup-python.sh\n{}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(p)
}

fn peer_script() -> PathBuf {
    root().join("tests").join("pymodbus").join("modbus_peer.py")
}

/// A pymodbus server serving `layout`; `where_` is `["--tcp", "127.0.0.1:0"]` or
/// `["--serial", path, ...]`. Returns the process and its address (`ip:port` or the path).
async fn pymodbus_server(dir: &Path, name: &str, layout: &serde_json::Value, where_: &[&str]) -> anyhow::Result<(Proc, String)> {
    let py = python()?;
    let layout_file = dir.join(format!("{name}.json"));
    std::fs::write(&layout_file, serde_json::to_vec_pretty(layout)?)?;
    let script = peer_script();
    let layout_arg = layout_file.display().to_string();
    let mut args = vec![script.to_str().context("script path")?, "serve", "--layout", &layout_arg];
    args.extend_from_slice(where_);
    let proc = Proc::spawn(&py, &args, &dir.join(format!("{name}.log")), Some("READY ")).await?;
    let line = proc.ready_line.clone().unwrap_or_default();
    let addr = line.split_whitespace().nth(2).context("no address in the READY line")?.to_owned();
    Ok((proc, addr))
}

/// Reads `layout`'s entries from the Modbus TCP server at `addr` with the pymodbus client;
/// `{"<unit>/<name>": {"value": .., "registers": [..]}}`.
async fn pymodbus_read(dir: &Path, layout: &serde_json::Value, addr: &str) -> anyhow::Result<serde_json::Value> {
    let py = python()?;
    let layout_file = dir.join("readback.json");
    std::fs::write(&layout_file, serde_json::to_vec_pretty(layout)?)?;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(py)
            .arg(peer_script())
            .args(["read", "--layout"])
            .arg(&layout_file)
            .args(["--tcp", addr])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("pymodbus read-back took more than 20 s")??;
    if !out.status.success() {
        bail!("pymodbus read-back failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `socat -d -d pty,raw,echo=0 pty,raw,echo=0`, killed on drop.
struct PtyPair {
    _child: tokio::process::Child,
    a: String,
    b: String,
}

async fn pty_pair() -> anyhow::Result<PtyPair> {
    let mut child = tokio::process::Command::new("socat")
        .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start socat ({e}): install it with scripts/setup-python.sh (or apt-get install socat)"
            )
        })?;
    let stderr = child.stderr.take().context("socat stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut ptys = vec![];
    tokio::time::timeout(Duration::from_secs(10), async {
        while ptys.len() < 2 {
            let Some(line) = lines.next_line().await? else { bail!("socat exited before opening two ptys") };
            // "2024/01/01 00:00:00 socat[123] N PTY is /dev/pts/5"
            if let Some(i) = line.find("PTY is ") {
                ptys.push(line[i + 7..].trim().to_owned());
            }
        }
        Ok(())
    })
    .await
    .context("socat did not report two ptys within 10 s")??;
    // Keep draining socat's log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(PtyPair { _child: child, a: ptys[0].clone(), b: ptys[1].clone() })
}

// ---------------------------------------------------------------------------------------------
// The catalogue: tags, their registers (for pymodbus) and the values the hub must show.
// ---------------------------------------------------------------------------------------------

/// What a tag must read as.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(&'static str),
}

impl Expect {
    fn matches(&self, v: &serde_json::Value) -> bool {
        match self {
            Expect::Int(i) => v.as_i64() == Some(*i),
            Expect::UInt(u) => v.as_u64() == Some(*u),
            Expect::Float(f) => v.as_f64().is_some_and(|g| (g - f).abs() <= 1e-9 * f.abs().max(1.0)),
            Expect::Bool(b) => v.as_bool() == Some(*b),
            Expect::Str(s) => v.as_str() == Some(*s),
        }
    }

    fn matches_value(&self, v: &Value) -> bool {
        self.matches(&serde_json::to_value(v).unwrap_or_default())
    }
}

/// One agent tag.
#[derive(Debug, Clone)]
struct Tag {
    name: String,
    table: &'static str,
    address: u16,
    ty: &'static str,
    order: Option<&'static str>,
    bit: Option<u8>,
    length: Option<u16>,
    scale: Option<f64>,
    offset: Option<f64>,
    access: &'static str,
    expect: Expect,
}

/// Tags of one unit and the pymodbus layout entries that hold their values.
#[derive(Debug, Default, Clone)]
struct Catalogue {
    tags: Vec<Tag>,
    layout: Vec<serde_json::Value>,
    next_register: u16,
}

const ORDERS: [&str; 4] = ["ABCD", "BADC", "CDAB", "DCBA"];
const ORDERS_64: [&str; 4] = ["ABCDEFGH", "BADCFEHG", "GHEFCDAB", "HGFEDCBA"];

fn width(ty: &str) -> u16 {
    match ty {
        "int16" | "uint16" => 1,
        "int32" | "uint32" | "float32" => 2,
        _ => 4,
    }
}

impl Catalogue {
    /// A numeric register tag: pymodbus holds `raw` in `order`; the agent reads `expect`.
    #[allow(clippy::too_many_arguments)]
    fn numeric(&mut self, table: &'static str, ty: &'static str, order: &'static str, raw: serde_json::Value, scale: Option<f64>, offset: Option<f64>, expect: Expect) -> &mut Self {
        let address = self.next_register;
        self.next_register += width(ty);
        let name = format!("{ty}_{}_{}", order.to_lowercase(), self.tags.len());
        self.layout.push(json!({"name": name, "table": table, "address": address, "type": ty, "order": order, "value": raw}));
        self.tags.push(Tag { name, table, address, ty, order: Some(order), bit: None, length: None, scale, offset, access: "read", expect });
        self
    }

    fn string(&mut self, length: u16, raw: &str, expect: &'static str) -> &mut Self {
        let address = self.next_register;
        self.next_register += length;
        let name = format!("str_{}", self.tags.len());
        self.layout.push(json!({"name": name, "table": "holding_register", "address": address, "type": "string", "length": length, "value": raw}));
        self.tags.push(Tag { name, table: "holding_register", address, ty: "string", order: None, bit: None, length: Some(length), scale: None, offset: None, access: "read", expect: Expect::Str(expect) });
        self
    }

    /// One holding register holding `word`, read as bool tags for every bit in `bits`.
    fn bits(&mut self, word: u16, bits: &[u8]) -> &mut Self {
        let address = self.next_register;
        self.next_register += 1;
        self.layout.push(json!({"name": format!("word_{address}"), "table": "holding_register", "address": address, "type": "uint16", "value": word}));
        for &bit in bits {
            let name = format!("bit{bit}_at_{address}");
            self.tags.push(Tag { name, table: "holding_register", address, ty: "bool", order: None, bit: Some(bit), length: None, scale: None, offset: None, access: "read", expect: Expect::Bool(word & (1 << bit) != 0) });
        }
        self
    }

    /// Bits `values` at `start` of a bit table (`coil` or `discrete_input`).
    fn bit_table(&mut self, table: &'static str, start: u16, values: &[bool]) -> &mut Self {
        for (i, &v) in values.iter().enumerate() {
            let address = start + i as u16;
            let name = format!("{table}_{address}");
            self.layout.push(json!({"name": name, "table": table, "address": address, "type": "bool", "value": v}));
            self.tags.push(Tag { name, table, address, ty: "bool", order: None, bit: None, length: None, scale: None, offset: None, access: "read", expect: Expect::Bool(v) });
        }
        self
    }

    /// Every numeric type in every byte order (values distinct per order, so a swapped
    /// order can never read right by accident), in `table`.
    fn every_type_and_order(&mut self, table: &'static str) -> &mut Self {
        for (i, order) in ORDERS.iter().enumerate() {
            let k = i as i64;
            let o64 = ORDERS_64[i];
            self.numeric(table, "int16", order, json!(-12345 + k), None, None, Expect::Int(-12345 + k));
            self.numeric(table, "uint16", order, json!(54321 + k), None, None, Expect::UInt(54321 + k as u64));
            self.numeric(table, "int32", order, json!(-123_456_789 - k), None, None, Expect::Int(-123_456_789 - k));
            self.numeric(table, "uint32", order, json!(3_000_000_000u64 + k as u64), None, None, Expect::UInt(3_000_000_000 + k as u64));
            // Exactly representable in f32.
            let f = 123_456.0 - 0.25 * k as f64;
            self.numeric(table, "float32", order, json!(f), None, None, Expect::Float(f));
            // 64-bit types: 4-letter names for the integers, 8-letter names for float64.
            self.numeric(table, "int64", order, json!(-1_234_567_890_123_456_789i64 + k), None, None, Expect::Int(-1_234_567_890_123_456_789 + k));
            self.numeric(table, "uint64", order, json!(0x1122_3344_5566_7788u64 + k as u64), None, None, Expect::UInt(0x1122_3344_5566_7788 + k as u64));
            let d = -98_765.432_1 - k as f64;
            self.numeric(table, "float64", o64, json!(d), None, None, Expect::Float(d));
        }
        self
    }

    /// The full catalogue of one unit.
    fn full() -> Catalogue {
        let mut c = Catalogue::default();
        c.every_type_and_order("holding_register");
        // Scale and offset (value = raw * scale + offset).
        c.numeric("holding_register", "int16", "ABCD", json!(2150), Some(0.1), Some(-40.0), Expect::Float(2150.0 * 0.1 - 40.0));
        c.numeric("holding_register", "uint32", "CDAB", json!(123_456), Some(0.01), None, Expect::Float(123_456.0 * 0.01));
        c.numeric("holding_register", "float32", "DCBA", json!(2.5), Some(2.0), Some(1.0), Expect::Float(6.0));
        c.numeric("holding_register", "int64", "BADC", json!(-5000), Some(0.5), Some(10.0), Expect::Float(-2490.0));
        c.string(4, "Hi!", "Hi!");
        c.string(5, "PUMP-7  ", "PUMP-7");
        c.string(4, "edgesync", "edgesync");
        c.bits(0x8009, &[0, 1, 3, 4, 15]);
        // Input registers: a second pass over a few types and orders.
        c.next_register = 0;
        for (i, order) in ORDERS.iter().enumerate() {
            let k = i as i64;
            c.numeric("input_register", "int32", order, json!(305_419_896 + k), None, None, Expect::Int(305_419_896 + k));
            c.numeric("input_register", "float32", order, json!(-0.5 - k as f64), None, None, Expect::Float(-0.5 - k as f64));
            c.numeric("input_register", "uint64", ORDERS_64[i], json!(u64::MAX - k as u64), None, None, Expect::UInt(u64::MAX - k as u64));
        }
        c.numeric("input_register", "uint16", "ABCD", json!(400), Some(0.25), Some(-50.0), Expect::Float(50.0));
        c.bit_table("coil", 0, &[true, false, true, true, false, false, false, true, true]);
        c.bit_table("discrete_input", 3, &[false, true, true, false, true]);
        c
    }

    /// A short catalogue (for a second unit): distinct values, a few types.
    fn short(seed: i64) -> Catalogue {
        let mut c = Catalogue::default();
        c.numeric("holding_register", "int32", "CDAB", json!(-7 * seed), None, None, Expect::Int(-7 * seed));
        c.numeric("holding_register", "float64", "ABCD", json!(0.5 * seed as f64), None, None, Expect::Float(0.5 * seed as f64));
        c.numeric("holding_register", "uint16", "BADC", json!(1000 + seed), None, None, Expect::UInt(1000 + seed as u64));
        c.string(3, "unit2", "unit2");
        c.bit_table("coil", 10, &[true, false]);
        c
    }

    /// The `[[devices.tags]]` tables.
    fn tags_toml(&self) -> String {
        let mut s = String::new();
        for t in &self.tags {
            let _ = writeln!(s, "[[devices.tags]]\nname = {:?}\ntable = {:?}\naddress = {}\ntype = {:?}\naccess = {:?}", t.name, t.table, t.address, t.ty, t.access);
            if let Some(o) = t.order {
                let _ = writeln!(s, "byte_order = {o:?}");
            }
            if let Some(b) = t.bit {
                let _ = writeln!(s, "bit = {b}");
            }
            if let Some(l) = t.length {
                let _ = writeln!(s, "length = {l}");
            }
            if let Some(x) = t.scale {
                let _ = writeln!(s, "scale = {x:?}");
            }
            if let Some(x) = t.offset {
                let _ = writeln!(s, "offset = {x:?}");
            }
            s.push('\n');
        }
        s
    }
}

/// One agent device: `[[devices]]` header lines (link, unit) and its catalogue.
struct Dev {
    id: String,
    link: String,
    unit: u8,
    cat: Catalogue,
}

fn devices_toml(devs: &[Dev], poll_ms: u64, timeout_ms: u64) -> String {
    let mut s = String::new();
    for d in devs {
        let _ = writeln!(s, "[[devices]]\nid = {:?}\n{}\nunit_id = {}\npoll_interval_ms = {poll_ms}\ntimeout_ms = {timeout_ms}\n", d.id, d.link, d.unit);
        s.push_str(&d.cat.tags_toml());
    }
    s
}

fn layout(units: &[(u8, &Catalogue)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (u, c) in units {
        m.insert(u.to_string(), serde_json::Value::Array(c.layout.clone()));
    }
    json!({ "units": m })
}

// ---------------------------------------------------------------------------------------------
// Real agent + hub
// ---------------------------------------------------------------------------------------------

struct Stack {
    hub: Proc,
    agent: Proc,
    api: Api,
}

impl Stack {
    fn logs(&self) -> String {
        format!("--- agent log ---\n{}\n--- hub log ---\n{}", self.agent.log_text(), self.hub.log_text())
    }
}

async fn stack(tmp: &Path, devices: &str) -> anyhow::Result<Stack> {
    let pki = Pki::new(&tmp.join("pki"), TD)?;
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/hub"), "hub")?;
    let cfg = harness::hub_toml(tmp, "127.0.0.1:0", "127.0.0.1:0", TD, &cert, &key, &pki.bundle, None)?;
    let hub = Proc::spawn(&harness::bin("edgesync-hub")?, &["run", "--config", &cfg.display().to_string()], &tmp.join("hub.log"), Some("edgesync-hub listening")).await?;
    let (tunnel, http) = harness::hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    let dir = tmp.join("gw-1");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/gw-1"), "agent")?;
    let cfg = harness::agent_toml(&dir, &tunnel, TD, &cert, &key, &pki.bundle, &[], devices)?;
    let agent = Proc::spawn(&harness::bin("edgesync-agent")?, &["run", "--config", &cfg.display().to_string()], &dir.join("agent.log"), None).await?;
    Ok(Stack { hub, agent, api: Api::new(&http) })
}

/// Waits (up to `within`) until the hub's twin of every device shows every expected value
/// with quality good; on failure lists every mismatch.
async fn hub_shows(s: &Stack, devs: &[Dev], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut wrong = vec![];
        for d in devs {
            let (status, twin) = s.api.get(&format!("/api/v1/nodes/gw-1/devices/{}/twin", d.id)).await?;
            if status != 200 {
                wrong.push(format!("{}: twin status {status}", d.id));
                continue;
            }
            for t in &d.cat.tags {
                let r = &twin["reported"][&t.name];
                if r["quality"] != "good" || !t.expect.matches(&r["value"]) {
                    wrong.push(format!("{}/{} ({} {} @{} {:?}): want {:?}, hub has {r}", d.id, t.name, t.table, t.ty, t.address, t.order, t.expect));
                }
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("after {within:?}, {} tags are wrong:\n{}\n{}", wrong.len(), wrong.join("\n"), s.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_tcp_every_type_and_byte_order_reaches_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-tcp")?;
    let (c1, c2) = (Catalogue::full(), Catalogue::short(3));
    let (_py, addr) = pymodbus_server(tmp.path(), "tcp", &layout(&[(1, &c1), (2, &c2)]), &["--tcp", "127.0.0.1:0"]).await?;
    let link = format!("protocol = \"tcp\"\nendpoint = {addr:?}");
    let devs = [
        Dev { id: "py-1".into(), link: link.clone(), unit: 1, cat: c1 },
        Dev { id: "py-2".into(), link, unit: 2, cat: c2 },
    ];
    let started = Instant::now();
    let s = stack(tmp.path(), &devices_toml(&devs, 200, 1000)).await?;
    hub_shows(&s, &devs, Duration::from_secs(30)).await?;
    eprintln!("pymodbus TCP: {} tags correct in the hub after {:?}", devs.iter().map(|d| d.cat.tags.len()).sum::<usize>(), started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_rtu_over_a_pty_pair_two_units_reach_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-rtu")?;
    let pty = pty_pair().await?;
    let (c1, c2) = (Catalogue::full(), Catalogue::short(5));
    let (_py, _) = pymodbus_server(
        tmp.path(),
        "rtu",
        &layout(&[(1, &c1), (7, &c2)]),
        &["--serial", &pty.a, "--baud", "19200", "--parity", "E", "--stopbits", "1", "--bytesize", "8"],
    )
    .await?;
    let link = format!("protocol = \"rtu\"\nserial_port = {:?}\nbaud = 19200\nparity = \"even\"\ndata_bits = 8\nstop_bits = 1", pty.b);
    let devs = [
        Dev { id: "rtu-1".into(), link: link.clone(), unit: 1, cat: c1 },
        Dev { id: "rtu-7".into(), link, unit: 7, cat: c2 },
    ];
    let started = Instant::now();
    let s = stack(tmp.path(), &devices_toml(&devs, 300, 1000)).await?;
    hub_shows(&s, &devs, Duration::from_secs(40)).await?;
    eprintln!("pymodbus RTU on {} <-> {}: all tags correct in the hub after {:?}", pty.a, pty.b, started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_rtu_over_tcp_reaches_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-rtutcp")?;
    let (c1, c2) = (Catalogue::full(), Catalogue::short(9));
    let (_py, addr) = pymodbus_server(tmp.path(), "rtutcp", &layout(&[(1, &c1), (2, &c2)]), &["--tcp", "127.0.0.1:0", "--framer", "rtu"]).await?;
    let link = format!("protocol = \"rtu_over_tcp\"\nendpoint = {addr:?}");
    let devs = [
        Dev { id: "gw-dev-1".into(), link: link.clone(), unit: 1, cat: c1 },
        Dev { id: "gw-dev-2".into(), link, unit: 2, cat: c2 },
    ];
    let s = stack(tmp.path(), &devices_toml(&devs, 200, 1000)).await?;
    hub_shows(&s, &devs, Duration::from_secs(30)).await?;
    Ok(())
}
