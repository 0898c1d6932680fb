//! Shared pieces of the twin tests with real processes (`local`, `events`): the agent under
//! test (node `gw-1`, device `plc-1`), a local app (an MQTT client), a Mosquitto broker started
//! by the test, a UDP relay that cuts the tunnel, and free loopback ports. Also the audit of a
//! stopped hub's store (`outbox`, `hub_restart`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use edgesync_cloud::store::HubStore;
use edgesync_protocol::{NodeId, Value};
use edgesync_testkit::harness::{self, Pki, Proc};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value as Json;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The trust domain of these tests.
pub const TD: &str = "example.org";
/// The agent's node id.
pub const NODE: &str = "gw-1";
/// The agent's device.
pub const DEVICE: &str = "plc-1";
/// The hub API path of the device's twin.
pub const TWIN: &str = "/api/v1/nodes/gw-1/devices/plc-1/twin";
/// `$hw/events/device/plc-1/twin/update` and friends.
pub const UPDATE: &str = "$hw/events/device/plc-1/twin/update";
/// The agent's answer to an update.
pub const UPDATE_RESULT: &str = "$hw/events/device/plc-1/twin/update/result";
/// Published when a desired value changed.
pub const DOCUMENT: &str = "$hw/events/device/plc-1/twin/update/document";
/// Published when the delta changed.
pub const DELTA: &str = "$hw/events/device/plc-1/twin/update/delta";
/// Ask for the twin.
pub const GET: &str = "$hw/events/device/plc-1/twin/get";
/// The twin.
pub const GET_RESULT: &str = "$hw/events/device/plc-1/twin/get/result";
/// Telemetry of the device.
pub const TELEMETRY: &str = "edgesync/gw-1/plc-1";
/// Outcomes of desired values of the device.
pub const APPLIED: &str = "edgesync/gw-1/plc-1/applied";

/// Holding register of `sp` (uint16, read_write).
pub const SP: u16 = 10;
/// Holding register of `ro` (uint16, read only).
pub const RO: u16 = 11;
/// Holding register of `level` (uint16, read only).
pub const LEVEL: u16 = 12;

/// A TCP port on loopback that was free a moment ago.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `r`, with the logs of `procs` appended to its error.
pub fn with_log<T>(r: anyhow::Result<T>, procs: &[&Proc]) -> anyhow::Result<T> {
    r.map_err(|e| {
        let logs: Vec<String> = procs
            .iter()
            .map(|p| format!("--- {} ---\n{}", p.log.display(), p.log_text()))
            .collect();
        anyhow::anyhow!("{e:#}\n{}", logs.join("\n"))
    })
}

/// A loopback UDP address where nothing listens: a hub that is not there.
pub fn dead_hub() -> anyhow::Result<String> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// How the agent under test runs its MQTT bus and how an app reaches it.
#[derive(Debug, Clone)]
pub struct Bus {
    /// The agent's `[mqtt]` section.
    pub toml: String,
    /// Where apps connect.
    pub addr: SocketAddr,
    /// The user name and password of apps, if the broker wants them.
    pub app_login: Option<(String, String)>,
}

impl Bus {
    /// The agent's embedded broker on a free loopback port, no credentials.
    pub fn embedded() -> anyhow::Result<Bus> {
        // Build the binaries first, so the port is taken moments after it is chosen.
        harness::bin("edgesync-agent")?;
        let port = free_tcp_port()?;
        Ok(Bus {
            toml: format!(
                "[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\nconnect_timeout_ms = 1000\n"
            ),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            app_login: None,
        })
    }

    /// The app's credentials as `&str`s.
    pub fn login(&self) -> Option<(&str, &str)> {
        self.app_login
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }
}

/// Writes the agent's config into `dir/gw-1/agent.toml` (its SVID minted once and kept across
/// restarts, its store in `dir/gw-1/data`) and starts it. Device `plc-1`: unit 1 at `plc`,
/// polled every 50 ms, tags `sp` (holding 10, uint16, read_write), `ro` (holding 11, read) and
/// `level` (holding 12, read).
pub async fn start_agent(
    dir: &Path,
    pki: &Pki,
    hub: &str,
    plc: &str,
    mqtt: &str,
) -> anyhow::Result<Proc> {
    start_agent_env(dir, pki, hub, plc, mqtt, &[]).await
}

/// [`start_agent`] with extra environment variables for the agent (e.g. `RUST_LOG`).
pub async fn start_agent_env(
    dir: &Path,
    pki: &Pki,
    hub: &str,
    plc: &str,
    mqtt: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let dir = dir.join(NODE);
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = harness::node_svid(pki, &dir, TD, NODE)?;
    let mut s = String::new();
    writeln!(
        s,
        "[agent]\ndata_dir = {:?}\ndesired_expiry_ms = 30000\n",
        dir.join("data").display().to_string()
    )?;
    writeln!(
        s,
        "[hub]\naddress = {hub:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 500\nkeepalive_ms = 500\nidle_timeout_ms = 3000\n"
    )?;
    s.push_str(&harness::identity_toml(TD, &cert, &key, &pki.bundle));
    writeln!(s, "{mqtt}\n")?;
    writeln!(
        s,
        "[[devices]]\nid = {DEVICE:?}\nprotocol = \"tcp\"\nendpoint = {plc:?}\nunit_id = 1\npoll_interval_ms = 50\ntimeout_ms = 300\n"
    )?;
    for (name, addr, access) in [
        ("sp", SP, "read_write"),
        ("ro", RO, "read"),
        ("level", LEVEL, "read"),
    ] {
        writeln!(
            s,
            "[[devices.tags]]\nname = {name:?}\ntable = \"holding_register\"\naddress = {addr}\ntype = \"uint16\"\naccess = {access:?}\n"
        )?;
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, s)?;
    Proc::spawn_env(
        &harness::bin("edgesync-agent")?,
        &["run", "--config", &path.display().to_string()],
        &dir.join("agent.log"),
        None,
        env,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// A local app: an MQTT client.

/// An MQTT client (rumqttc, MQTT 3.1.1, clean session) whose received messages are kept in
/// arrival order until a test takes them.
pub struct App {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Incoming>,
    /// Received and not yet taken: (topic, payload).
    pending: VecDeque<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
    /// What was taken or skipped, for failure messages.
    history: Vec<String>,
    /// Connection errors the client's event loop saw (the broker closed the connection...).
    errors: Arc<std::sync::atomic::AtomicUsize>,
}

enum Incoming {
    Publish(String, Vec<u8>),
    SubAck,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// Connects to `addr` as `id`, retrying (the agent's broker may still be starting) for up
    /// to `within`.
    pub async fn connect(
        addr: SocketAddr,
        id: &str,
        login: Option<(&str, &str)>,
        within: Duration,
    ) -> anyhow::Result<App> {
        let deadline = Instant::now() + within;
        loop {
            match Self::try_connect(addr, id, login).await {
                Ok(app) => return Ok(app),
                Err(e) if Instant::now() >= deadline => {
                    bail!("MQTT client {id} could not connect to {addr} within {within:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn try_connect(
        addr: SocketAddr,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> anyhow::Result<App> {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        let (client, mut ev) = AsyncClient::new(o, 1000);
        let first = tokio::time::timeout(Duration::from_secs(5), ev.poll())
            .await
            .context("no CONNACK within 5 s")?;
        match first {
            Ok(Event::Incoming(Packet::ConnAck(a)))
                if a.code == rumqttc::ConnectReturnCode::Success => {}
            Ok(other) => bail!("unexpected first event {other:?}"),
            Err(e) => bail!("{e}"),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen_errors = errors.clone();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Incoming::Publish(p.topic, p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Incoming::SubAck);
                    }
                    Ok(_) => {}
                    // The broker went away; rumqttc reconnects on the next poll (without the
                    // subscriptions: a test reconnects with a new App when it needs them).
                    Err(_) => {
                        seen_errors.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(App {
            client,
            rx,
            pending: VecDeque::new(),
            task,
            history: Vec::new(),
            errors,
        })
    }

    /// Waits (up to `within`) until the broker closed this client's connection; whether it did.
    pub async fn wait_closed(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.errors.load(Ordering::SeqCst) == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Subscribes to `filter` and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        self.client.subscribe(filter, QoS::AtMostOnce).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Incoming::SubAck)) => return Ok(()),
                Ok(Some(Incoming::Publish(t, p))) => self.pending.push_back((t, p)),
                Ok(None) => bail!("the MQTT client stopped"),
                Err(_) => bail!("no SUBACK for {filter} within 5 s"),
            }
        }
    }

    /// Publishes `payload` on `topic` (QoS 0).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await?;
        Ok(())
    }

    /// Forgets every message received so far.
    pub fn clear(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            if let Incoming::Publish(t, _) = m {
                self.history.push(format!("(cleared) {t}"));
            }
        }
        for (t, _) in self.pending.drain(..) {
            self.history.push(format!("(cleared) {t}"));
        }
    }

    /// The first message (oldest first, earlier ones kept for later calls) on `topic` whose
    /// JSON payload satisfies `pred`, waiting up to `within`.
    pub async fn wait_for(
        &mut self,
        topic: &str,
        within: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> anyhow::Result<Json> {
        let matches = |t: &str, p: &[u8]| {
            if t != topic {
                return None;
            }
            serde_json::from_slice::<Json>(p).ok().filter(|j| pred(j))
        };
        if let Some(i) = self
            .pending
            .iter()
            .position(|(t, p)| matches(t, p).is_some())
            && let Some((t, p)) = self.pending.remove(i)
            && let Some(j) = matches(&t, &p)
        {
            self.history.push(format!("{t} {j}"));
            return Ok(j);
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Incoming::Publish(t, p))) => {
                    if let Some(j) = matches(&t, &p) {
                        self.history.push(format!("{t} {j}"));
                        return Ok(j);
                    }
                    self.pending.push_back((t, p));
                }
                Ok(Some(Incoming::SubAck)) => {}
                Ok(None) => bail!("the MQTT client stopped"),
                Err(_) => {
                    let seen: Vec<String> = self
                        .history
                        .iter()
                        .cloned()
                        .chain(
                            self.pending
                                .iter()
                                .map(|(t, p)| format!("{t} {}", String::from_utf8_lossy(p))),
                        )
                        .collect();
                    let tail = &seen[seen.len().saturating_sub(40)..];
                    bail!(
                        "no matching message on {topic} within {within:?}; the last messages seen:\n  {}",
                        tail.join("\n  ")
                    )
                }
            }
        }
    }

    /// Every message on `topic` received within `d` (pending ones included), as JSON.
    pub async fn collect(&mut self, topic: &str, d: Duration) -> Vec<Json> {
        let deadline = Instant::now() + d;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let Incoming::Publish(t, p) = m {
                self.pending.push_back((t, p));
            }
        }
        let mut out = Vec::new();
        self.pending.retain(|(t, p)| {
            if t == topic {
                if let Ok(j) = serde_json::from_slice(p) {
                    out.push(j);
                }
                false
            } else {
                true
            }
        });
        out
    }

    /// Sends a request on `topic` with `event_id` and waits for the answer on `result` that
    /// echoes it.
    pub async fn request(
        &mut self,
        topic: &str,
        result: &str,
        event_id: &str,
        payload: &str,
    ) -> anyhow::Result<Json> {
        self.publish(topic, payload).await?;
        self.wait_for(result, Duration::from_secs(10), |j| {
            j["event_id"] == event_id
        })
        .await
    }

    /// `twin/get` of `plc-1`.
    pub async fn twin(&mut self, event_id: &str) -> anyhow::Result<Json> {
        self.request(
            GET,
            GET_RESULT,
            event_id,
            &format!(r#"{{"event_id":"{event_id}"}}"#),
        )
        .await
    }

    /// `twin/update` of `plc-1` setting `sp`.
    pub async fn set_sp(&mut self, event_id: &str, value: &str) -> anyhow::Result<Json> {
        self.request(
            UPDATE,
            UPDATE_RESULT,
            event_id,
            &format!(
                r#"{{"event_id":"{event_id}","timestamp":0,"twin":{{"sp":{{"expected":{{"value":"{value}"}}}}}}}}"#
            ),
        )
        .await
    }

    /// Polls `twin/get` until `pred` holds for the result's `twin`, for up to `within`.
    pub async fn twin_until(
        &mut self,
        within: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> anyhow::Result<Json> {
        let deadline = Instant::now() + within;
        let mut n = 0;
        loop {
            n += 1;
            let t = self.twin(&format!("poll-{n}")).await?;
            if pred(&t["twin"]) {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                bail!("the twin never matched within {within:?}; last: {t}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mosquitto.

/// Path of a program, from `PATH` or `/usr/sbin`, `/usr/bin`; an error naming the Debian
/// package when missing.
pub fn which(name: &str) -> anyhow::Result<PathBuf> {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found: install its Debian package (scripts/setup-debian.sh installs mosquitto and strace)"
    )
}

/// A Mosquitto process on a free loopback port with a password file (no anonymous clients);
/// killed (by its PID) when dropped.
pub struct Mosquitto {
    _proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Mosquitto {
    /// Starts Mosquitto with a password file for `users` and the ACL file `acl` (in `dir`),
    /// waiting until it listens.
    pub async fn start(
        dir: &Path,
        users: &[(&str, &str)],
        acl: Option<&str>,
    ) -> anyhow::Result<Mosquitto> {
        std::fs::create_dir_all(dir)?;
        let passwd = dir.join("passwd");
        for (i, (u, p)) in users.iter().enumerate() {
            let mut cmd = std::process::Command::new(which("mosquitto_passwd")?);
            if i == 0 {
                cmd.arg("-c");
            }
            let status = cmd.arg("-b").arg(&passwd).arg(u).arg(p).status()?;
            if !status.success() {
                bail!("mosquitto_passwd failed: {status}");
            }
        }
        let port = free_tcp_port()?;
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\n",
            passwd.display()
        );
        if let Some(acl) = acl {
            let file = dir.join("acl");
            std::fs::write(&file, acl)?;
            writeln!(text, "acl_file {}", file.display())?;
        }
        std::fs::write(&conf, text)?;
        let proc = Proc::spawn(
            &which("mosquitto")?,
            &["-c", &conf.display().to_string()],
            &dir.join("mosquitto.log"),
            None,
        )
        .await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() >= deadline {
                bail!(
                    "mosquitto did not listen on {addr} within 10 s; log:\n{}",
                    proc.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Mosquitto { _proc: proc, addr })
    }

    /// The agent's `[mqtt]` section for this broker (user `agent`), and the app's login.
    pub fn bus(&self, agent: (&str, &str), app: (&str, &str)) -> Bus {
        Bus {
            toml: format!(
                "[mqtt]\nmode = \"external\"\nbroker = \"{}\"\nusername = {:?}\npassword = {:?}\nconnect_timeout_ms = 500\n",
                self.addr, agent.0, agent.1
            ),
            addr: self.addr,
            app_login: Some((app.0.to_owned(), app.1.to_owned())),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A UDP relay: the tunnel, with a switch.

/// Forwards UDP datagrams between its address and `target` (one upstream socket per client
/// address) while open; drops every datagram both ways while closed: a network partition
/// between the agent and the hub, with both processes running.
pub struct UdpRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cancel: CancellationToken,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl UdpRelay {
    /// Starts an open relay to `target` on a loopback port.
    pub async fn start(target: SocketAddr) -> anyhow::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let cancel = CancellationToken::new();
        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        {
            let (open, cancel) = (open.clone(), cancel.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let (n, from) = tokio::select! {
                        () = cancel.cancelled() => return,
                        r = front.recv_from(&mut buf) => match r {
                            Ok(x) => x,
                            Err(_) => continue,
                        },
                    };
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let existing = upstreams
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&from)
                        .cloned();
                    let up = match existing {
                        Some(u) => u,
                        None => {
                            let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else {
                                continue;
                            };
                            if u.connect(target).await.is_err() {
                                continue;
                            }
                            let u = Arc::new(u);
                            upstreams
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(from, u.clone());
                            let (u2, front2, open2, cancel2) =
                                (u.clone(), front.clone(), open.clone(), cancel.clone());
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 65536];
                                loop {
                                    let n = tokio::select! {
                                        () = cancel2.cancelled() => return,
                                        r = u2.recv(&mut buf) => match r {
                                            Ok(n) => n,
                                            Err(_) => continue,
                                        },
                                    };
                                    if open2.load(Ordering::SeqCst) {
                                        let _ = front2.send_to(&buf[..n], from).await;
                                    }
                                }
                            });
                            u
                        }
                    };
                    let _ = up.send(&buf[..n]).await;
                }
            });
        }
        Ok(UdpRelay { addr, open, cancel })
    }

    /// Opens (forwards) or closes (drops everything) the relay.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Auditing the hub's store (`outbox`, `hub_restart`).

/// What the hub's store holds for the node, checked: records and gaps cover `1..=stored` with
/// no hole and no overlap, and per property the counter values only go up.
pub struct Audit {
    /// (seq, property, value) of every stored record.
    pub records: Vec<(u64, String, u64)>,
    /// Sequence numbers inside gaps.
    pub lost: u64,
    /// The gaps, `(from, to)` inclusive.
    pub gaps: Vec<(u64, u64)>,
}

/// Audits the store of node [`NODE`] (opened after the hub stopped).
///
/// `restarts`: the agent was restarted, so a counter's value may repeat (see below).
pub fn audit(store: &HubStore, restarts: bool) -> anyhow::Result<Audit> {
    let node = NodeId::new(NODE)?;
    let stored = store.stored_seq(&node)?;
    let gaps = store.gaps(&node)?;
    let mut records = vec![];
    for (seq, s) in store.records(&node, 1)? {
        let v = match s.value {
            Some(Value::UInt(u)) => u,
            Some(Value::Int(i)) => u64::try_from(i)?,
            other => bail!("record {seq}: unexpected value {other:?}"),
        };
        records.push((seq, s.property.to_string(), v));
    }
    // Every sequence number 1..=stored exactly once, as a record or inside a gap.
    let mut covered: Vec<(u64, u64)> = records.iter().map(|(s, _, _)| (*s, *s)).collect();
    covered.extend(gaps.iter().copied());
    covered.sort_unstable();
    let mut next = 1;
    for (from, to) in &covered {
        ensure!(
            *from == next,
            "sequence {next} is {} (records and gaps: {covered:?})",
            if *from > next {
                "missing"
            } else {
                "stored twice"
            }
        );
        next = to + 1;
    }
    ensure!(
        next == stored + 1,
        "records and gaps end at {}, the hub stored up to {stored}",
        next - 1
    );
    // The counters never go back (an older record replayed, or sent again out of order). A
    // value may repeat: the first reading after an agent restart is reported even when it
    // did not change (so the hub converges whatever the agent's disk kept). `sp` holds still.
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (seq, p, v) in records.iter().filter(|(_, p, _)| p.starts_with('c')) {
        if let Some(prev) = last.get(p.as_str()) {
            ensure!(
                v > prev || (restarts && v == prev),
                "record {seq}: {p} went from {prev} to {v} (duplicated or replayed)"
            );
        }
        last.insert(p, *v);
    }
    let lost = gaps.iter().map(|(f, t)| t - f + 1).sum();
    Ok(Audit {
        records,
        lost,
        gaps,
    })
}

/// Holding registers `0..n` of unit 1 count up by one every 50 ms.
pub fn start_counters(
    sim: &edgesync_testkit::sim::SimHandle,
    n: u16,
) -> anyhow::Result<Vec<edgesync_testkit::sim::ScriptId>> {
    use edgesync_testkit::sim::{Script, Table};
    (0..n)
        .map(|i| {
            Ok(sim.add_script(
                1,
                Table::HoldingRegisters,
                i,
                Script::Counter { step: 1 },
                Duration::from_millis(50),
            )?)
        })
        .collect()
}
