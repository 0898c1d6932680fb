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
use edgesync_edge::modbus::{DeviceReading, LinkOptions, spawn_link_with, spawn_link_writable};
use edgesync_edge::model::{DeviceSpec, LinkSpec};
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
async fn pymodbus_server(
    dir: &Path,
    name: &str,
    layout: &serde_json::Value,
    where_: &[&str],
) -> anyhow::Result<(Proc, String)> {
    let py = python()?;
    let layout_file = dir.join(format!("{name}.json"));
    std::fs::write(&layout_file, serde_json::to_vec_pretty(layout)?)?;
    let script = peer_script();
    let layout_arg = layout_file.display().to_string();
    let mut args = vec![
        script.to_str().context("script path")?,
        "serve",
        "--layout",
        &layout_arg,
    ];
    args.extend_from_slice(where_);
    let proc = Proc::spawn(&py, &args, &dir.join(format!("{name}.log")), Some("READY ")).await?;
    let line = proc.ready_line.clone().unwrap_or_default();
    let addr = line
        .split_whitespace()
        .nth(2)
        .context("no address in the READY line")?
        .to_owned();
    Ok((proc, addr))
}

/// Reads `layout`'s entries from the Modbus TCP server at `addr` with the pymodbus client;
/// `{"<unit>/<name>": {"value": .., "registers": [..]}}`.
async fn pymodbus_read(
    dir: &Path,
    layout: &serde_json::Value,
    addr: &str,
) -> anyhow::Result<serde_json::Value> {
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
        bail!(
            "pymodbus read-back failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
            let Some(line) = lines.next_line().await? else {
                bail!("socat exited before opening two ptys")
            };
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
    Ok(PtyPair {
        _child: child,
        a: ptys[0].clone(),
        b: ptys[1].clone(),
    })
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
            Expect::Float(f) => v
                .as_f64()
                .is_some_and(|g| (g - f).abs() <= 1e-9 * f.abs().max(1.0)),
            Expect::Bool(b) => v.as_bool() == Some(*b),
            Expect::Str(s) => v.as_str() == Some(*s),
        }
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
    fn numeric(
        &mut self,
        table: &'static str,
        ty: &'static str,
        order: &'static str,
        raw: serde_json::Value,
        scale: Option<f64>,
        offset: Option<f64>,
        expect: Expect,
    ) -> &mut Self {
        let address = self.next_register;
        self.next_register += width(ty);
        let name = format!("{ty}_{}_{}", order.to_lowercase(), self.tags.len());
        self.layout.push(json!({"name": name, "table": table, "address": address, "type": ty, "order": order, "value": raw}));
        self.tags.push(Tag {
            name,
            table,
            address,
            ty,
            order: Some(order),
            bit: None,
            length: None,
            scale,
            offset,
            access: "read",
            expect,
        });
        self
    }

    fn string(&mut self, length: u16, raw: &str, expect: &'static str) -> &mut Self {
        let address = self.next_register;
        self.next_register += length;
        let name = format!("str_{}", self.tags.len());
        self.layout.push(json!({"name": name, "table": "holding_register", "address": address, "type": "string", "length": length, "value": raw}));
        self.tags.push(Tag {
            name,
            table: "holding_register",
            address,
            ty: "string",
            order: None,
            bit: None,
            length: Some(length),
            scale: None,
            offset: None,
            access: "read",
            expect: Expect::Str(expect),
        });
        self
    }

    /// One holding register holding `word`, read as bool tags for every bit in `bits`.
    fn bits(&mut self, word: u16, bits: &[u8]) -> &mut Self {
        let address = self.next_register;
        self.next_register += 1;
        self.layout.push(json!({"name": format!("word_{address}"), "table": "holding_register", "address": address, "type": "uint16", "value": word}));
        for &bit in bits {
            let name = format!("bit{bit}_at_{address}");
            self.tags.push(Tag {
                name,
                table: "holding_register",
                address,
                ty: "bool",
                order: None,
                bit: Some(bit),
                length: None,
                scale: None,
                offset: None,
                access: "read",
                expect: Expect::Bool(word & (1 << bit) != 0),
            });
        }
        self
    }

    /// Bits `values` at `start` of a bit table (`coil` or `discrete_input`).
    fn bit_table(&mut self, table: &'static str, start: u16, values: &[bool]) -> &mut Self {
        for (i, &v) in values.iter().enumerate() {
            let address = start + i as u16;
            let name = format!("{table}_{address}");
            self.layout.push(json!({"name": name, "table": table, "address": address, "type": "bool", "value": v}));
            self.tags.push(Tag {
                name,
                table,
                address,
                ty: "bool",
                order: None,
                bit: None,
                length: None,
                scale: None,
                offset: None,
                access: "read",
                expect: Expect::Bool(v),
            });
        }
        self
    }

    /// Every numeric type in every byte order (values distinct per order, so a swapped
    /// order can never read right by accident), in `table`.
    fn every_type_and_order(&mut self, table: &'static str) -> &mut Self {
        for (i, order) in ORDERS.iter().enumerate() {
            let k = i as i64;
            let o64 = ORDERS_64[i];
            self.numeric(
                table,
                "int16",
                order,
                json!(-12345 + k),
                None,
                None,
                Expect::Int(-12345 + k),
            );
            self.numeric(
                table,
                "uint16",
                order,
                json!(54321 + k),
                None,
                None,
                Expect::UInt(54321 + k as u64),
            );
            self.numeric(
                table,
                "int32",
                order,
                json!(-123_456_789 - k),
                None,
                None,
                Expect::Int(-123_456_789 - k),
            );
            self.numeric(
                table,
                "uint32",
                order,
                json!(3_000_000_000u64 + k as u64),
                None,
                None,
                Expect::UInt(3_000_000_000 + k as u64),
            );
            // Exactly representable in f32.
            let f = 123_456.0 - 0.25 * k as f64;
            self.numeric(
                table,
                "float32",
                order,
                json!(f),
                None,
                None,
                Expect::Float(f),
            );
            // 64-bit types: 4-letter names for the integers, 8-letter names for float64.
            self.numeric(
                table,
                "int64",
                order,
                json!(-1_234_567_890_123_456_789i64 + k),
                None,
                None,
                Expect::Int(-1_234_567_890_123_456_789 + k),
            );
            self.numeric(
                table,
                "uint64",
                order,
                json!(0x1122_3344_5566_7788u64 + k as u64),
                None,
                None,
                Expect::UInt(0x1122_3344_5566_7788 + k as u64),
            );
            let d = -98_765.432_1 - k as f64;
            self.numeric(
                table,
                "float64",
                o64,
                json!(d),
                None,
                None,
                Expect::Float(d),
            );
        }
        self
    }

    /// The full catalogue of one unit.
    fn full() -> Catalogue {
        let mut c = Catalogue::default();
        c.every_type_and_order("holding_register");
        // Scale and offset (value = raw * scale + offset).
        c.numeric(
            "holding_register",
            "int16",
            "ABCD",
            json!(2150),
            Some(0.1),
            Some(-40.0),
            Expect::Float(2150.0 * 0.1 - 40.0),
        );
        c.numeric(
            "holding_register",
            "uint32",
            "CDAB",
            json!(123_456),
            Some(0.01),
            None,
            Expect::Float(123_456.0 * 0.01),
        );
        c.numeric(
            "holding_register",
            "float32",
            "DCBA",
            json!(2.5),
            Some(2.0),
            Some(1.0),
            Expect::Float(6.0),
        );
        c.numeric(
            "holding_register",
            "int64",
            "BADC",
            json!(-5000),
            Some(0.5),
            Some(10.0),
            Expect::Float(-2490.0),
        );
        c.string(4, "Hi!", "Hi!");
        c.string(5, "PUMP-7  ", "PUMP-7");
        c.string(4, "edgesync", "edgesync");
        c.bits(0x8009, &[0, 1, 3, 4, 15]);
        // Input registers: a second pass over a few types and orders.
        c.next_register = 0;
        for (i, order) in ORDERS.iter().enumerate() {
            let k = i as i64;
            c.numeric(
                "input_register",
                "int32",
                order,
                json!(305_419_896 + k),
                None,
                None,
                Expect::Int(305_419_896 + k),
            );
            c.numeric(
                "input_register",
                "float32",
                order,
                json!(-0.5 - k as f64),
                None,
                None,
                Expect::Float(-0.5 - k as f64),
            );
            c.numeric(
                "input_register",
                "uint64",
                ORDERS_64[i],
                json!(u64::MAX - k as u64),
                None,
                None,
                Expect::UInt(u64::MAX - k as u64),
            );
        }
        c.numeric(
            "input_register",
            "uint16",
            "ABCD",
            json!(400),
            Some(0.25),
            Some(-50.0),
            Expect::Float(50.0),
        );
        c.bit_table(
            "coil",
            0,
            &[true, false, true, true, false, false, false, true, true],
        );
        c.bit_table("discrete_input", 3, &[false, true, true, false, true]);
        c
    }

    /// A short catalogue (for a second unit): distinct values, a few types.
    fn short(seed: i64) -> Catalogue {
        let mut c = Catalogue::default();
        c.numeric(
            "holding_register",
            "int32",
            "CDAB",
            json!(-7 * seed),
            None,
            None,
            Expect::Int(-7 * seed),
        );
        c.numeric(
            "holding_register",
            "float64",
            "ABCD",
            json!(0.5 * seed as f64),
            None,
            None,
            Expect::Float(0.5 * seed as f64),
        );
        c.numeric(
            "holding_register",
            "uint16",
            "BADC",
            json!(1000 + seed),
            None,
            None,
            Expect::UInt(1000 + seed as u64),
        );
        c.string(3, "unit2", "unit2");
        c.bit_table("coil", 10, &[true, false]);
        c
    }

    /// The `[[devices.tags]]` tables.
    fn tags_toml(&self) -> String {
        let mut s = String::new();
        for t in &self.tags {
            let _ = writeln!(
                s,
                "[[devices.tags]]\nname = {:?}\ntable = {:?}\naddress = {}\ntype = {:?}\naccess = {:?}",
                t.name, t.table, t.address, t.ty, t.access
            );
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
        let _ = writeln!(
            s,
            "[[devices]]\nid = {:?}\n{}\nunit_id = {}\npoll_interval_ms = {poll_ms}\ntimeout_ms = {timeout_ms}\n",
            d.id, d.link, d.unit
        );
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
        format!(
            "--- agent log ---\n{}\n--- hub log ---\n{}",
            self.agent.log_text(),
            self.hub.log_text()
        )
    }
}

async fn stack(tmp: &Path, devices: &str) -> anyhow::Result<Stack> {
    let pki = Pki::new(&tmp.join("pki"), TD)?;
    let (hub, tunnel, http) = harness::start_hub(tmp, &pki, "127.0.0.1:0", "127.0.0.1:0").await?;
    let dir = tmp.join("gw-1");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = pki.svid(&format!("spiffe://{TD}/edge/gw-1"), "agent")?;
    let cfg = harness::agent_toml(&dir, &tunnel, TD, &cert, &key, &pki.bundle, &[], devices)?;
    let agent = harness::spawn_agent(&cfg, &dir.join("agent.log")).await?;
    Ok(Stack {
        hub,
        agent,
        api: Api::new(&http),
    })
}

/// Waits (up to `within`) until the hub's twin of every device shows every expected value
/// with quality good; on failure lists every mismatch.
async fn hub_shows(s: &Stack, devs: &[Dev], within: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = start + within;
    let mut last_wrong = usize::MAX;
    loop {
        let mut wrong = vec![];
        for d in devs {
            let (status, twin) = s
                .api
                .get(&format!("/api/v1/nodes/gw-1/devices/{}/twin", d.id))
                .await?;
            if status != 200 {
                wrong.push(format!("{}: twin status {status}", d.id));
                continue;
            }
            for t in &d.cat.tags {
                let r = &twin["reported"][&t.name];
                if r["quality"] != "good" || !t.expect.matches(&r["value"]) {
                    wrong.push(format!(
                        "{}/{} ({} {} @{} {:?}): want {:?}, hub has {r}",
                        d.id, t.name, t.table, t.ty, t.address, t.order, t.expect
                    ));
                }
            }
        }
        if wrong.len() != last_wrong {
            eprintln!(
                "{:>8.3?}: {} tags not yet right in the hub",
                start.elapsed(),
                wrong.len()
            );
            last_wrong = wrong.len();
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "after {within:?}, {} tags are wrong:\n{}\n{}",
                wrong.len(),
                wrong.join("\n"),
                s.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_tcp_every_type_and_byte_order_reaches_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-tcp")?;
    let (c1, c2) = (Catalogue::full(), Catalogue::short(3));
    let (_py, addr) = pymodbus_server(
        tmp.path(),
        "tcp",
        &layout(&[(1, &c1), (2, &c2)]),
        &["--tcp", "127.0.0.1:0"],
    )
    .await?;
    let link = format!("protocol = \"tcp\"\nendpoint = {addr:?}");
    let devs = [
        Dev {
            id: "py-1".into(),
            link: link.clone(),
            unit: 1,
            cat: c1,
        },
        Dev {
            id: "py-2".into(),
            link,
            unit: 2,
            cat: c2,
        },
    ];
    let s = stack(tmp.path(), &devices_toml(&devs, 200, 1000)).await?;
    let started = Instant::now();
    hub_shows(&s, &devs, Duration::from_secs(30)).await?;
    eprintln!(
        "pymodbus TCP: {} tags correct in the hub {:?} after the agent started",
        devs.iter().map(|d| d.cat.tags.len()).sum::<usize>(),
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_rtu_over_a_pty_pair_two_units_reach_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-rtu")?;
    let pty = pty_pair().await?;
    // 19200 8N1: a Linux pty refuses parity through pyserial's tcsetattr (EINVAL), so both
    // ends run without parity.
    let (c1, c2) = (Catalogue::full(), Catalogue::short(5));
    let (_py, _) = pymodbus_server(
        tmp.path(),
        "rtu",
        &layout(&[(1, &c1), (7, &c2)]),
        &[
            "--serial",
            &pty.a,
            "--baud",
            "19200",
            "--parity",
            "N",
            "--stopbits",
            "1",
            "--bytesize",
            "8",
        ],
    )
    .await?;
    let link = format!(
        "protocol = \"rtu\"\nserial_port = {:?}\nbaud = 19200\nparity = \"none\"\ndata_bits = 8\nstop_bits = 1",
        pty.b
    );
    let devs = [
        Dev {
            id: "rtu-1".into(),
            link: link.clone(),
            unit: 1,
            cat: c1,
        },
        Dev {
            id: "rtu-7".into(),
            link,
            unit: 7,
            cat: c2,
        },
    ];
    let s = stack(tmp.path(), &devices_toml(&devs, 300, 1000)).await?;
    let started = Instant::now();
    hub_shows(&s, &devs, Duration::from_secs(40)).await?;
    eprintln!(
        "pymodbus RTU on {} <-> {}: all tags correct in the hub {:?} after the agent started",
        pty.a,
        pty.b,
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymodbus_rtu_over_tcp_reaches_the_hub() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-rtutcp")?;
    let (c1, c2) = (Catalogue::full(), Catalogue::short(9));
    let (_py, addr) = pymodbus_server(
        tmp.path(),
        "rtutcp",
        &layout(&[(1, &c1), (2, &c2)]),
        &["--tcp", "127.0.0.1:0", "--framer", "rtu"],
    )
    .await?;
    let link = format!("protocol = \"rtu_over_tcp\"\nendpoint = {addr:?}");
    let devs = [
        Dev {
            id: "gw-dev-1".into(),
            link: link.clone(),
            unit: 1,
            cat: c1,
        },
        Dev {
            id: "gw-dev-2".into(),
            link,
            unit: 2,
            cat: c2,
        },
    ];
    let s = stack(tmp.path(), &devices_toml(&devs, 200, 1000)).await?;
    hub_shows(&s, &devs, Duration::from_secs(30)).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// In-process links
// ---------------------------------------------------------------------------------------------

/// Validates `devices` (TOML `[[devices]]` tables) with the agent's own config code.
fn specs(devices: &str) -> anyhow::Result<Vec<Arc<DeviceSpec>>> {
    let text = format!(
        "[agent]\ndata_dir = \"/nonexistent\"\n\n[hub]\naddress = \"127.0.0.1:1\"\n\n\
         [identity]\ntrust_domain = \"{TD}\"\ncert = \"a.pem\"\nkey = \"a.key\"\nbundle = \"b.pem\"\n\n{devices}"
    );
    let cfg = edgesync_edge::config::parse("modbus-test.toml", &text, Path::new("/"))
        .map_err(|e| anyhow::anyhow!("{}", edgesync_edge::config::render_errors(&e)))?;
    Ok(cfg.devices.into_iter().map(Arc::new).collect())
}

fn clock() -> edgesync_edge::modbus::Clock {
    Arc::new(|| Timestamp(1))
}

fn test_options() -> LinkOptions {
    LinkOptions {
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..LinkOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_every_type_verified_by_pymodbus() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-write")?;
    // What is written (to unit 3), and what pymodbus must then hold, decoded in Python.
    struct W {
        name: &'static str,
        table: &'static str,
        address: u16,
        toml: &'static str,
        value: Value,
        readback: serde_json::Value,
        want: Expect,
    }
    let ws = vec![
        W {
            name: "i16",
            table: "holding_register",
            address: 0,
            toml: "type = \"int16\"\nbyte_order = \"ABCD\"",
            value: Value::Int(-1234),
            readback: json!({"type": "int16", "order": "ABCD"}),
            want: Expect::Int(-1234),
        },
        W {
            name: "u16",
            table: "holding_register",
            address: 1,
            toml: "type = \"uint16\"\nbyte_order = \"DCBA\"",
            value: Value::UInt(0xABCD),
            readback: json!({"type": "uint16", "order": "DCBA"}),
            want: Expect::UInt(0xABCD),
        },
        W {
            name: "i32",
            table: "holding_register",
            address: 2,
            toml: "type = \"int32\"\nbyte_order = \"BADC\"",
            value: Value::Int(-305_419_896),
            readback: json!({"type": "int32", "order": "BADC"}),
            want: Expect::Int(-305_419_896),
        },
        W {
            name: "u32",
            table: "holding_register",
            address: 4,
            toml: "type = \"uint32\"\nbyte_order = \"CDAB\"",
            value: Value::UInt(4_000_000_001),
            readback: json!({"type": "uint32", "order": "CDAB"}),
            want: Expect::UInt(4_000_000_001),
        },
        W {
            name: "i64",
            table: "holding_register",
            address: 6,
            toml: "type = \"int64\"\nbyte_order = \"DCBA\"",
            value: Value::Int(-9_000_000_000_000_000_001),
            readback: json!({"type": "int64", "order": "DCBA"}),
            want: Expect::Int(-9_000_000_000_000_000_001),
        },
        W {
            name: "u64",
            table: "holding_register",
            address: 10,
            toml: "type = \"uint64\"\nbyte_order = \"GHEFCDAB\"",
            value: Value::UInt(18_000_000_000_000_000_003),
            readback: json!({"type": "uint64", "order": "CDAB"}),
            want: Expect::UInt(18_000_000_000_000_000_003),
        },
        W {
            name: "f32",
            table: "holding_register",
            address: 14,
            toml: "type = \"float32\"\nbyte_order = \"CDAB\"",
            value: Value::Float(-1234.5),
            readback: json!({"type": "float32", "order": "CDAB"}),
            want: Expect::Float(-1234.5),
        },
        W {
            name: "f64",
            table: "holding_register",
            address: 16,
            toml: "type = \"float64\"\nbyte_order = \"BADCFEHG\"",
            value: Value::Float(std::f64::consts::PI),
            readback: json!({"type": "float64", "order": "BADC"}),
            want: Expect::Float(std::f64::consts::PI),
        },
        W {
            name: "text",
            table: "holding_register",
            address: 20,
            toml: "type = \"string\"\nlength = 4",
            value: Value::Str("PUMP9".into()),
            readback: json!({"type": "string", "length": 4}),
            want: Expect::Str("PUMP9"),
        },
        // 175.0 = raw * 0.1 - 40: raw 2150 on the wire.
        W {
            name: "scaled",
            table: "holding_register",
            address: 24,
            toml: "type = \"int16\"\nscale = 0.1\noffset = -40.0",
            value: Value::Float(175.0),
            readback: json!({"type": "int16"}),
            want: Expect::Int(2150),
        },
        // Bit 3 of a register holding 0x8001: read-modify-write keeps bits 0 and 15.
        W {
            name: "bit3",
            table: "holding_register",
            address: 25,
            toml: "type = \"bool\"\nbit = 3",
            value: Value::Bool(true),
            readback: json!({"type": "uint16"}),
            want: Expect::UInt(0x8009),
        },
        W {
            name: "valve",
            table: "coil",
            address: 7,
            toml: "type = \"bool\"",
            value: Value::Bool(true),
            readback: json!({"type": "bool"}),
            want: Expect::Bool(true),
        },
    ];
    let initial = json!({"units": {"3": [
        {"name": "word", "table": "holding_register", "address": 25, "type": "uint16", "value": 0x8001},
        {"name": "valve", "table": "coil", "address": 7, "type": "bool", "value": false}
    ]}});
    let (_py, addr) =
        pymodbus_server(tmp.path(), "write", &initial, &["--tcp", "127.0.0.1:0"]).await?;
    let mut toml = format!(
        "[[devices]]\nid = \"plc\"\nprotocol = \"tcp\"\nendpoint = {addr:?}\nunit_id = 3\npoll_interval_ms = 100\ntimeout_ms = 1000\n\n"
    );
    for w in &ws {
        let _ = writeln!(
            toml,
            "[[devices.tags]]\nname = {:?}\ntable = {:?}\naddress = {}\naccess = \"read_write\"\n{}\n",
            w.name, w.table, w.address, w.toml
        );
    }
    let devices = specs(&toml)?;
    let link = devices[0].link.clone();
    let (tx, mut rx) = mpsc::channel::<DeviceReading>(64);
    let cancel = CancellationToken::new();
    let (handle, task) =
        spawn_link_writable(test_options(), link, devices, tx, clock(), cancel.clone());
    let dev = DeviceId::new("plc")?;
    // The link is up once it delivered a reading.
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await?
        .context("link ended")?;
    let started = Instant::now();
    for w in &ws {
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            handle.write(&dev, &PropertyId::new(w.name)?, w.value.clone()),
        )
        .await?;
        assert_eq!(
            outcome,
            Ok(edgesync_edge::modbus::WriteOutcome::Verified),
            "write of {:?} to {}",
            w.value,
            w.name
        );
    }
    let write_time = started.elapsed();
    // Read back independently: the pymodbus client, decoded by Python's struct.
    let entries: Vec<serde_json::Value> = ws
        .iter()
        .map(|w| {
            let mut e = w.readback.clone();
            e["name"] = json!(w.name);
            e["table"] = json!(w.table);
            e["address"] = json!(w.address);
            e
        })
        .collect();
    let got = pymodbus_read(tmp.path(), &json!({"units": {"3": entries}}), &addr).await?;
    for w in &ws {
        let v = &got[format!("3/{}", w.name)];
        assert!(
            w.want.matches(&v["value"]),
            "{}: pymodbus holds {v}, want {:?}",
            w.name,
            w.want
        );
    }
    // And the agent's own polling reads the written values back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = tokio::time::timeout_at(deadline, rx.recv())
            .await?
            .context("link ended")?;
        let all = ws.iter().enumerate().all(|(i, w)| {
            r.samples.iter().any(|s| {
                s.tag == i && s.quality == Quality::Good && s.value.as_ref() == Some(&w.value)
            })
        });
        if all {
            break;
        }
    }
    eprintln!(
        "{} verified writes against pymodbus in {write_time:?}",
        ws.len()
    );
    cancel.cancel();
    task.await?;
    Ok(())
}

/// Desired values set through the real hub's API land in pymodbus's registers: written by
/// the real agent, verified by reading them back with pymodbus's own client (decoded by
/// Python's `struct`) and with tokio-modbus, and shown applied and reported by the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_values_through_the_hub_land_in_pymodbus() -> anyhow::Result<()> {
    let tmp = TempDir::new("py-desired")?;
    let entries = json!([
        {"name": "sp", "table": "holding_register", "address": 10, "type": "uint16", "value": 100},
        {"name": "spf", "table": "holding_register", "address": 12, "type": "float32", "order": "CDAB", "value": 1.5},
        {"name": "valve", "table": "coil", "address": 3, "type": "bool", "value": false}
    ]);
    let layout = json!({"units": {"1": entries}});
    let (_py, addr) =
        pymodbus_server(tmp.path(), "desired", &layout, &["--tcp", "127.0.0.1:0"]).await?;
    let devices = format!(
        "[[devices]]\nid = \"plc\"\nprotocol = \"tcp\"\nendpoint = {addr:?}\nunit_id = 1\npoll_interval_ms = 100\ntimeout_ms = 1000\n\n\
         [[devices.tags]]\nname = \"sp\"\ntable = \"holding_register\"\naddress = 10\ntype = \"uint16\"\naccess = \"read_write\"\n\n\
         [[devices.tags]]\nname = \"spf\"\ntable = \"holding_register\"\naddress = 12\ntype = \"float32\"\nbyte_order = \"CDAB\"\naccess = \"read_write\"\n\n\
         [[devices.tags]]\nname = \"valve\"\ntable = \"coil\"\naddress = 3\ntype = \"bool\"\naccess = \"read_write\"\n"
    );
    let s = stack(tmp.path(), &devices).await?;
    const TWIN: &str = "/api/v1/nodes/gw-1/devices/plc/twin";
    let r = async {
        s.api
            .wait_for(Duration::from_secs(20), |api| async move {
                let (status, t) = api.get(TWIN).await?;
                Ok((status == 200 && t["reported"]["spf"]["value"] == 1.5).then_some(()))
            })
            .await
            .context("the hub sees pymodbus's values")?;
        let (status, v) = s
            .api
            .patch(
                &format!("{TWIN}/desired"),
                &json!({"sp": 4321, "spf": -12.25, "valve": true}),
            )
            .await?;
        assert_eq!(status, 200, "{v}");
        let versions = v["versions"].clone();
        let started = Instant::now();
        let twin = s
            .api
            .wait_for(Duration::from_secs(15), |api| {
                let versions = versions.clone();
                async move {
                    let (_, t) = api.get(TWIN).await?;
                    let done = ["sp", "spf", "valve"].iter().all(|p| {
                        let d = &t["desired"][*p];
                        d["version"] == versions[*p] && d["applied"]["outcome"] == "ok"
                    });
                    let reported = t["reported"]["sp"]["value"] == 4321
                        && t["reported"]["spf"]["value"] == -12.25
                        && t["reported"]["valve"]["value"] == true;
                    Ok((done && reported).then_some(t))
                }
            })
            .await
            .context("the hub shows the values applied and reported")?;
        eprintln!("applied and reported in {:?}", started.elapsed());
        for p in ["sp", "spf", "valve"] {
            assert_eq!(
                twin["desired"][p]["applied"]["version"], versions[p],
                "{twin}"
            );
        }
        assert_eq!(twin["delta"], json!({}), "{twin}");

        // pymodbus's own client, decoding with struct.
        let got = pymodbus_read(tmp.path(), &layout, &addr).await?;
        assert_eq!(got["1/sp"]["value"], 4321, "{got}");
        assert_eq!(got["1/spf"]["value"], -12.25, "{got}");
        assert_eq!(got["1/valve"]["value"], true, "{got}");
        // -12.25f32 is 0xC144_0000; CDAB puts the low register first.
        assert_eq!(got["1/spf"]["registers"], json!([0x0000, 0xC144]), "{got}");

        // tokio-modbus, the raw registers.
        use tokio_modbus::client::Reader;
        let mut ctx =
            tokio_modbus::client::tcp::connect_slave(addr.parse()?, tokio_modbus::Slave(1)).await?;
        let regs = ctx.read_holding_registers(10, 4).await??;
        assert_eq!(regs, vec![4321, 0, 0x0000, 0xC144]);
        let coils = ctx.read_coils(3, 1).await??;
        assert_eq!(coils, vec![true]);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    r.map_err(|e| anyhow::anyhow!("{e:#}\n{}", s.logs()))
}

/// A raw Modbus TCP peer: unit 1 answers every read of holding registers with registers equal
/// to their address; unit 2 answers with a malformed PDU (a byte count that disagrees with
/// the data and the request).
async fn malformed_peer() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 7];
                while sock.read_exact(&mut head).await.is_ok() {
                    let len = usize::from(u16::from_be_bytes([head[4], head[5]]));
                    let mut pdu = vec![0u8; len.saturating_sub(1)];
                    if sock.read_exact(&mut pdu).await.is_err() {
                        return;
                    }
                    let unit = head[6];
                    let (fc, start, count) = match pdu.as_slice() {
                        [fc, a, b, c, d, ..] => (
                            *fc,
                            u16::from_be_bytes([*a, *b]),
                            u16::from_be_bytes([*c, *d]),
                        ),
                        _ => return,
                    };
                    let body: Vec<u8> = if fc != 3 {
                        vec![fc | 0x80, 1]
                    } else if unit == 1 {
                        let mut b = vec![3, (count * 2) as u8];
                        for a in start..start + count {
                            b.extend_from_slice(&a.to_be_bytes());
                        }
                        b
                    } else {
                        // Says 3 bytes of data follow, carries 5: malformed.
                        vec![3, 3, 0, 1, 0, 2, 9]
                    };
                    let mut frame = vec![head[0], head[1], 0, 0];
                    frame.extend_from_slice(&((body.len() + 1) as u16).to_be_bytes());
                    frame.push(unit);
                    frame.extend_from_slice(&body);
                    if sock.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

fn tcp_device(
    id: &str,
    endpoint: &str,
    unit: u8,
    poll_ms: u64,
    timeout_ms: u64,
    registers: u16,
) -> String {
    let mut s = format!(
        "[[devices]]\nid = {id:?}\nprotocol = \"tcp\"\nendpoint = {endpoint:?}\nunit_id = {unit}\npoll_interval_ms = {poll_ms}\ntimeout_ms = {timeout_ms}\n\n"
    );
    for i in 0..registers {
        let _ = writeln!(
            s,
            "[[devices.tags]]\nname = \"r{i}\"\ntable = \"holding_register\"\naddress = {i}\ntype = \"uint16\"\n"
        );
    }
    s
}

/// Readings of each device, with the instant they arrived.
#[derive(Default)]
struct Seen {
    by_device: std::collections::HashMap<String, Vec<(Instant, DeviceReading)>>,
}

impl Seen {
    fn of(&self, id: &str) -> &[(Instant, DeviceReading)] {
        self.by_device.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every quality seen for `id` after `from`.
    fn qualities(&self, id: &str, from: Instant) -> Vec<Quality> {
        self.of(id)
            .iter()
            .filter(|(t, _)| *t >= from)
            .flat_map(|(_, r)| r.samples.iter().map(|s| s.quality))
            .collect()
    }
}

async fn collect(rx: &mut mpsc::Receiver<DeviceReading>, for_: Duration) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + for_;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        seen.by_device
            .entry(r.device.to_string())
            .or_default()
            .push((Instant::now(), r));
    }
    seen
}

fn intervals(rs: &[(Instant, DeviceReading)]) -> Vec<Duration> {
    rs.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_units_are_isolated_and_the_healthy_unit_keeps_its_cycle() -> anyhow::Result<()> {
    const POLL_MS: u64 = 100;
    const TIMEOUT_MS: u64 = 500;
    // Link A (our simulator): a healthy unit and three faulty ones on one connection.
    let sim = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1, 2, 3, 4])).await?;
    for u in [1u8, 2, 3, 4] {
        sim.set_holding(
            u,
            0,
            &[
                u16::from(u) * 100,
                u16::from(u) * 100 + 1,
                u16::from(u) * 100 + 2,
            ],
        )?;
    }
    sim.set_fault(2, Fault::NoAnswer)?;
    sim.set_fault(3, Fault::Delay(Duration::from_secs(2)))?;
    sim.set_fault(4, Fault::Exception(4))?;
    sim.record_arrivals(true);
    let a = sim.local_addr().to_string();
    // Link B (simulator): a healthy unit and one whose requests reset the connection.
    let sim_b = SimHandle::start("127.0.0.1:0".parse()?, SimConfig::with_units([1, 5])).await?;
    sim_b.set_holding(1, 0, &[11, 12, 13])?;
    sim_b.set_fault(5, Fault::Disconnect)?;
    let b = sim_b.local_addr().to_string();
    // Link C (raw peer): a healthy unit and one answering malformed frames.
    let (c_addr, peer) = malformed_peer().await?;
    let c = c_addr.to_string();

    let mut toml = String::new();
    for (id, ep, unit) in [
        ("healthy", &a, 1u8),
        ("silent", &a, 2),
        ("late", &a, 3),
        ("refusing", &a, 4),
        ("b-healthy", &b, 1),
        ("resetting", &b, 5),
        ("c-healthy", &c, 1),
        ("garbled", &c, 2),
    ] {
        toml.push_str(&tcp_device(id, ep, unit, POLL_MS, TIMEOUT_MS, 3));
    }
    let devices = specs(&toml)?;
    let (tx, mut rx) = mpsc::channel::<DeviceReading>(1024);
    let cancel = CancellationToken::new();
    let mut tasks = vec![];
    for ep in [&a, &b, &c] {
        let on: Vec<_> = devices
            .iter()
            .filter(|d| matches!(&d.link, LinkSpec::Tcp { endpoint } if endpoint == ep))
            .cloned()
            .collect();
        tasks.push(spawn_link_with(
            test_options(),
            on[0].link.clone(),
            on,
            tx.clone(),
            clock(),
            cancel.clone(),
        ));
    }
    drop(tx);
    // Let every fault happen a few times (the faulty units back off 0.5 s..2 s).
    let watch = Duration::from_secs(6);
    let start = Instant::now();
    let seen = collect(&mut rx, watch).await;
    let settled = start + Duration::from_millis(500);

    // The healthy unit of link A: every sample good, with its values, and its cycle kept.
    let healthy = seen.of("healthy");
    assert!(!healthy.is_empty(), "the healthy unit was read");
    for (_, r) in healthy {
        for s in &r.samples {
            assert_eq!(s.quality, Quality::Good, "healthy unit sample {s:?}");
            assert_eq!(s.value, Some(Value::UInt(100 + s.tag as u64)));
        }
    }
    let iv = intervals(healthy);
    let (p50, max) = (percentile(&iv, 0.5), percentile(&iv, 1.0));
    // Worst case: two faulty units time out back to back just before its turn.
    let budget = Duration::from_millis(POLL_MS + 2 * TIMEOUT_MS + 300);
    eprintln!(
        "healthy unit on the faulty link: {} readings in {watch:?}, interval p50 {p50:?}, max {max:?} (budget {budget:?})",
        healthy.len()
    );
    assert!(
        max <= budget,
        "healthy unit waited {max:?} between cycles, budget {budget:?}: {iv:?}"
    );
    assert!(
        p50 <= Duration::from_millis(2 * POLL_MS),
        "healthy unit mostly keeps its {POLL_MS} ms cycle: p50 {p50:?}"
    );
    assert!(
        healthy.len() as u128 >= watch.as_millis() / budget.as_millis(),
        "healthy unit read often enough: {}",
        healthy.len()
    );
    for id in [
        "healthy",
        "silent",
        "late",
        "refusing",
        "b-healthy",
        "resetting",
        "c-healthy",
        "garbled",
    ] {
        let good = seen
            .of(id)
            .iter()
            .filter(|(_, r)| r.samples.iter().all(|s| s.quality.is_good()))
            .count();
        eprintln!(
            "  {id:<10} {:>3} readings, {good:>3} all good",
            seen.of(id).len()
        );
    }
    // The simulator saw the healthy unit's requests at the same pace.
    let arrivals = sim.take_arrivals(1);
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        percentile(&gaps, 1.0) <= budget,
        "request arrivals of the healthy unit: max gap {:?}",
        percentile(&gaps, 1.0)
    );

    // Each faulty unit: bad with the right reason, never a value.
    let only = |id: &str, want: Quality| {
        let q = seen.qualities(id, settled);
        assert!(!q.is_empty(), "{id} was reported");
        assert!(
            q.iter().all(|x| *x == want),
            "{id}: every sample {want}, got {q:?}"
        );
        assert!(
            seen.of(id)
                .iter()
                .flat_map(|(_, r)| &r.samples)
                .all(|s| s.value.is_none()),
            "{id}: no values"
        );
    };
    only("silent", Quality::Bad(BadReason::Timeout));
    only("late", Quality::Bad(BadReason::Timeout));
    only("refusing", Quality::Bad(BadReason::Exception(4)));
    only("garbled", Quality::Bad(BadReason::BadResponse));
    let r = seen.qualities("resetting", settled);
    assert!(
        r.iter()
            .all(|q| *q == Quality::Bad(BadReason::Disconnected))
            && !r.is_empty(),
        "resetting: {r:?}"
    );
    // Timeouts back the silent units off: they are polled far less often than the healthy one.
    for id in ["silent", "late"] {
        assert!(
            seen.of(id).len() * 3 < healthy.len(),
            "{id} backs off: {} readings vs {}",
            seen.of(id).len(),
            healthy.len()
        );
    }
    // The exception unit keeps the connection and its cycle.
    assert!(
        seen.of("refusing").len() * 2 >= healthy.len(),
        "exceptions do not back off: {} vs {}",
        seen.of("refusing").len(),
        healthy.len()
    );

    // Link B: a reset is a link fault, so its healthy unit is bad (disconnected) during the
    // outage, never with a wrong value, and good again after each reconnect.
    let bq = seen.of("b-healthy");
    assert!(
        bq.iter()
            .flat_map(|(_, r)| &r.samples)
            .all(
                |s| s.quality == Quality::Good && s.value == Some(Value::UInt(11 + s.tag as u64))
                    || s.quality == Quality::Bad(BadReason::Disconnected)
            )
    );
    let good_b = bq
        .iter()
        .filter(|(t, r)| *t >= settled && r.samples.iter().all(|s| s.quality.is_good()))
        .count();
    assert!(
        good_b >= 3,
        "link B's healthy unit recovers after each reset: {good_b} good readings"
    );
    // Link C: the malformed answers spoil only the garbled unit.
    let cq = seen.qualities("c-healthy", settled);
    let good_c = cq.iter().filter(|q| q.is_good()).count();
    assert!(
        good_c * 10 >= cq.len() * 9,
        "link C's healthy unit stays good: {cq:?}"
    );
    assert!(
        seen.of("c-healthy")
            .iter()
            .flat_map(|(_, r)| &r.samples)
            .all(|s| !s.quality.is_good() || s.value == Some(Value::UInt(s.tag as u64))),
        "link C's healthy unit reads the right values"
    );

    // Link A and C never reported the healthy unit on another link as disconnected because of B.
    assert!(seen.qualities("healthy", start).iter().all(|q| q.is_good()));
    cancel.cancel();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t).await??;
    }
    peer.abort();
    Ok(())
}
