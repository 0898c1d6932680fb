//! Starting the real binaries from tests, the demo and the benchmarks.
//!
//! - [`bin`] finds (building once if needed) `edgesync-agent` and `edgesync-hub` next to the
//!   running test executable, in the same cargo profile.
//! - [`Pki`] mints a throwaway trust domain with a hub SVID, edge SVIDs and a bundle on disk.
//! - [`agent_toml`] and [`hub_toml`] write configs; [`Proc`] runs a child process that is
//!   killed (by its PID) when dropped, with its output captured to a log file.
//! - [`Api`] reads the hub's HTTP API.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::pki::TestCa;

/// The API token the harness configures (admin).
pub const TOKEN: &str = "test-token-0123456789abcdef";

fn target_dir() -> anyhow::Result<PathBuf> {
    // .../target/<profile>/deps/<test-exe> or .../target/<profile>/<bin>
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe has no parent")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Path of one of the workspace's binaries, built first (once per process) so tests never
/// run stale binaries.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = target_dir()?;
    let built = BUILT.get_or_init(|| {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "edgesync-edge",
            "-p",
            "edgesync-cloud",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build of the binaries failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} was not built", p.display());
    }
    Ok(p)
}

/// A fresh temporary directory (removed on drop).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/edgesync-<tag>-<random>`.
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!(
            "edgesync-{tag}-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("EDGESYNC_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A throwaway trust domain on disk.
pub struct Pki {
    /// The CA.
    pub ca: TestCa,
    /// Directory holding the PEM files.
    pub dir: PathBuf,
    /// `bundle.pem`.
    pub bundle: PathBuf,
}

impl Pki {
    /// Mints a CA for `td` and writes its bundle into `dir`.
    pub fn new(dir: &Path, td: &str) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca = TestCa::new(td)?;
        let bundle = ca.write_bundle(dir)?;
        Ok(Pki {
            ca,
            dir: dir.to_path_buf(),
            bundle,
        })
    }

    /// Mints an SVID for `spiffe_id` valid for a day, written as `<name>.pem` / `<name>.key.pem`.
    pub fn svid(&self, spiffe_id: &str, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.ca
            .mint(spiffe_id, Duration::from_secs(86_400))?
            .write(&self.dir, name)
    }
}

/// One Modbus device for [`agent_toml`]: `unit` on `endpoint` with `counters` uint16 holding
/// registers named `c0..` polled every `poll_ms`.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// Device id.
    pub id: String,
    /// `host:port` of the PLC.
    pub endpoint: String,
    /// Unit id.
    pub unit: u8,
    /// Holding registers 0..counters, as uint16 tags `c<i>`.
    pub counters: u16,
    /// Poll interval.
    pub poll_ms: u64,
}

/// The `[identity]` section of an agent config (with a blank line after it).
pub fn identity_toml(td: &str, cert: &Path, key: &Path, bundle: &Path) -> String {
    format!(
        "[identity]\ntrust_domain = {td:?}\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n\n",
        cert.display().to_string(),
        key.display().to_string(),
        bundle.display().to_string()
    )
}

/// The SVID of `spiffe://{td}/edge/{node}` in `dir/agent.pem` and `dir/agent.key.pem`, minted
/// on the first call and kept, so a restarted agent presents the same files.
pub fn node_svid(
    pki: &Pki,
    dir: &Path,
    td: &str,
    node: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("agent.pem");
    let key = dir.join("agent.key.pem");
    if !cert.exists() {
        let (c, k) = pki.svid(&format!("spiffe://{td}/edge/{node}"), "agent")?;
        std::fs::rename(&c, &cert)?;
        std::fs::rename(&k, &key)?;
    }
    Ok((cert, key))
}

/// Writes an agent config into `dir/agent.toml`.
#[allow(clippy::too_many_arguments)] // a flat call reads best in tests; callers name each path
pub fn agent_toml(
    dir: &Path,
    hub: &str,
    td: &str,
    cert: &Path,
    key: &Path,
    bundle: &Path,
    devices: &[SimDevice],
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let mut s = String::new();
    writeln!(
        s,
        "[agent]\ndata_dir = {:?}\n",
        dir.join("data").display().to_string()
    )?;
    writeln!(
        s,
        "[hub]\naddress = {hub:?}\nbackoff_initial_ms = 100\nbackoff_max_ms = 1000\nkeepalive_ms = 500\nidle_timeout_ms = 3000\n"
    )?;
    s.push_str(&identity_toml(td, cert, key, bundle));
    // The outbox with its defaults (commit at once, fsync every commit).
    if !extra.contains("[mqtt]") {
        // Tests run many agents at once: no broker on a fixed port unless a test asks.
        writeln!(s, "[mqtt]\nmode = \"off\"\n")?;
    }
    s.push_str(extra);
    s.push('\n');
    for d in devices {
        writeln!(
            s,
            "[[devices]]\nid = {:?}\nprotocol = \"tcp\"\nendpoint = {:?}\nunit_id = {}\npoll_interval_ms = {}\ntimeout_ms = 500\n",
            d.id, d.endpoint, d.unit, d.poll_ms
        )?;
        for i in 0..d.counters {
            writeln!(
                s,
                "[[devices.tags]]\nname = \"c{i}\"\ntable = \"holding_register\"\naddress = {i}\ntype = \"uint16\"\n"
            )?;
        }
    }
    let p = dir.join("agent.toml");
    std::fs::write(&p, s)?;
    Ok(p)
}

/// Writes a hub config into `dir/hub.toml` (tunnel and API on the given addresses; port 0
/// allowed).
#[allow(clippy::too_many_arguments)] // as agent_toml
pub fn hub_toml(
    dir: &Path,
    listen: &str,
    http: &str,
    td: &str,
    cert: &Path,
    key: &Path,
    bundle: &Path,
    hub_id: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let mut s = String::new();
    writeln!(
        s,
        "[hub]\nlisten = {listen:?}\nhttp_listen = {http:?}\ndata_dir = {:?}\n",
        dir.join("hubdata").display().to_string()
    )?;
    writeln!(
        s,
        "[identity]\ntrust_domain = {td:?}\ncert = {:?}\nkey = {:?}\nbundle = {:?}",
        cert.display().to_string(),
        key.display().to_string(),
        bundle.display().to_string()
    )?;
    if let Some(id) = hub_id {
        writeln!(s, "hub_id = {id:?}")?;
    }
    writeln!(
        s,
        "\n[[api.tokens]]\nname = \"test\"\ntoken = {TOKEN:?}\nrole = \"admin\""
    )?;
    let p = dir.join("hub.toml");
    std::fs::write(&p, s)?;
    Ok(p)
}

/// Starts the `edgesync-hub` binary with its SVID (`spiffe://<td>/hub`) minted from `pki`, its
/// config (`hub.toml`), store (`hubdata/`) and log (`hub.log`) in `dir`, the tunnel on `listen`
/// and the HTTP API on `http` (port 0 allowed). Returns the process and the addresses it
/// actually listens on: `(hub, tunnel, http)`.
pub async fn start_hub(
    dir: &Path,
    pki: &Pki,
    listen: &str,
    http: &str,
) -> anyhow::Result<(Proc, String, String)> {
    start_hub_env(dir, pki, listen, http, &[]).await
}

/// [`start_hub`] with extra environment variables for the hub (e.g. `RUST_LOG`).
pub async fn start_hub_env(
    dir: &Path,
    pki: &Pki,
    listen: &str,
    http: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Proc, String, String)> {
    let td = pki.ca.trust_domain().to_owned();
    let (cert, key) = pki.svid(&format!("spiffe://{td}/hub"), "hub")?;
    let cfg = hub_toml(dir, listen, http, &td, &cert, &key, &pki.bundle, None)?;
    let hub = Proc::spawn_env(
        &bin("edgesync-hub")?,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("hub.log"),
        Some("edgesync-hub listening"),
        env,
    )
    .await?;
    let (tunnel, http) = hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    Ok((hub, tunnel, http))
}

/// [`start_hub`] with `extra` lines added to the `[hub]` section of its config, and run
/// through `wrapper` (e.g. `["prlimit", "--nofile=256"]`; it must exec the hub, so that the
/// returned process is the hub) when not empty.
pub async fn start_hub_with(
    dir: &Path,
    pki: &Pki,
    extra: &str,
    wrapper: &[&str],
) -> anyhow::Result<(Proc, String, String)> {
    let td = pki.ca.trust_domain().to_owned();
    let (cert, key) = pki.svid(&format!("spiffe://{td}/hub"), "hub")?;
    let cfg = hub_toml(
        dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &td,
        &cert,
        &key,
        &pki.bundle,
        None,
    )?;
    let text = std::fs::read_to_string(&cfg)?.replacen("[hub]\n", &format!("[hub]\n{extra}\n"), 1);
    std::fs::write(&cfg, text)?;
    let hub_bin = bin("edgesync-hub")?;
    let cfg_arg = cfg.display().to_string();
    let hub_bin_arg = hub_bin.display().to_string();
    let mut args: Vec<&str> = wrapper.iter().skip(1).copied().collect();
    let program = match wrapper.first() {
        Some(w) => {
            args.push(&hub_bin_arg);
            PathBuf::from(w)
        }
        None => hub_bin.clone(),
    };
    args.extend(["run", "--config", &cfg_arg]);
    let hub = Proc::spawn_env(
        &program,
        &args,
        &dir.join("hub.log"),
        Some("edgesync-hub listening"),
        &[],
    )
    .await?;
    let (tunnel, http) = hub_addrs(hub.ready_line.as_deref().unwrap_or_default())?;
    Ok((hub, tunnel, http))
}

/// Starts the `edgesync-agent` binary on `config`, its output in `log` (not waiting for a
/// ready line).
pub async fn spawn_agent(config: &Path, log: &Path) -> anyhow::Result<Proc> {
    Proc::spawn(
        &bin("edgesync-agent")?,
        &["run", "--config", &config.display().to_string()],
        log,
        None,
    )
    .await
}

/// A child process, killed by PID when dropped.
pub struct Proc {
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// The first stdout line matching what [`Proc::spawn`] waited for.
    pub ready_line: Option<String>,
}

impl Proc {
    /// Starts `program args`, logging to `log`. If `ready` is given, waits (up to 30 s) for a
    /// stdout line starting with it.
    pub async fn spawn(
        program: &Path,
        args: &[&str],
        log: &Path,
        ready: Option<&str>,
    ) -> anyhow::Result<Proc> {
        Self::spawn_env(program, args, log, ready, &[]).await
    }

    /// [`Proc::spawn`] with extra environment variables (`RUST_LOG` among them overrides the
    /// default `info`).
    pub async fn spawn_env(
        program: &Path,
        args: &[&str],
        log: &Path,
        ready: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Proc> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::from(logf.try_clone()?))
            .kill_on_drop(true);
        if ready.is_some() {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(logf.try_clone()?));
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        let mut ready_line = None;
        if let Some(prefix) = ready {
            let out = child.stdout.take().context("no stdout")?;
            let mut lines = BufReader::new(out).lines();
            // Stdout goes to the log too (the hub logs there), line by line.
            let mut out_log = logf.try_clone()?;
            let line = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(l) = lines.next_line().await? {
                    let _ = writeln!(out_log, "{l}");
                    if l.starts_with(prefix) {
                        return Ok::<_, std::io::Error>(Some(l));
                    }
                }
                Ok(None)
            })
            .await;
            match line {
                Ok(Ok(Some(l))) => ready_line = Some(l),
                _ => {
                    let _ = child.start_kill();
                    let log_text = std::fs::read_to_string(log).unwrap_or_default();
                    bail!(
                        "{} did not become ready; log:\n{log_text}",
                        program.display()
                    );
                }
            }
            // Keep draining stdout into the log so the child never blocks on a full pipe.
            tokio::spawn(async move {
                while let Ok(Some(l)) = lines.next_line().await {
                    let _ = writeln!(out_log, "{l}");
                }
            });
        }
        Ok(Proc {
            child,
            log: log.to_path_buf(),
            ready_line,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then wait (up to 15 s) for a clean exit; returns whether it exited 0.
    pub async fn terminate(mut self) -> anyhow::Result<bool> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(s) => Ok(s?.success()),
            Err(_) => {
                self.child.kill().await?;
                bail!("process did not exit within 15 s of SIGTERM")
            }
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Parses `edgesync-hub listening tunnel=A http=B`.
pub fn hub_addrs(line: &str) -> anyhow::Result<(String, String)> {
    let mut tunnel = None;
    let mut http = None;
    for part in line.split_whitespace() {
        if let Some(v) = part.strip_prefix("tunnel=") {
            tunnel = Some(v.to_owned());
        }
        if let Some(v) = part.strip_prefix("http=") {
            http = Some(v.to_owned());
        }
    }
    Ok((
        tunnel.context("no tunnel= in line")?,
        http.context("no http= in line")?,
    ))
}

/// A client of the hub API.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    /// For the API at `http_addr` (`ip:port`).
    pub fn new(http_addr: &str) -> Api {
        Api {
            base: format!("http://{http_addr}"),
            // Idle connections are dropped well before the hub closes them (its head timeout,
            // 10 s by default, also bounds the wait between requests): a request sent on a
            // connection the hub is closing at that moment fails with a reset.
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(4))
                .build()
                .unwrap_or_default(),
        }
    }

    /// GET `path` with the harness token; JSON body and status.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, v))
    }

    /// PATCH `path` with a JSON body and the harness token; JSON body and status.
    pub async fn patch(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.send(self.client.patch(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POST to `path` (no body) with the harness token; JSON body and status.
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.send(self.client.post(format!("{}{path}", self.base)))
            .await
    }

    /// Sends `req` with the harness token; JSON body (or the text as a JSON string) and status.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = req
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, v))
    }

    /// GET `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The reported value of `node/device/prop` as u64, if present and good.
    pub async fn reported_u64(
        &self,
        node: &str,
        device: &str,
        prop: &str,
    ) -> anyhow::Result<Option<u64>> {
        let (status, v) = self
            .get(&format!("/api/v1/nodes/{node}/devices/{device}/twin"))
            .await?;
        if status != 200 {
            return Ok(None);
        }
        Ok(v["reported"][prop]["value"].as_u64())
    }

    /// Waits until `check` returns `Some`, polling every 50 ms, for at most `within`.
    pub async fn wait_for<T, F, Fut>(&self, within: Duration, mut check: F) -> anyhow::Result<T>
    where
        F: FnMut(Api) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(v)) = check(self.clone()).await {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("condition not met within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts a hub in this process on loopback ports the OS chooses: its SVID
/// (`spiffe://<td>/hub`) minted from `pki`, its store under `dir/hub`, the harness
/// [`TOKEN`] as admin. The demo and the benchmarks embed their hub this way.
pub async fn embedded_hub(pki: &Pki, dir: &Path) -> anyhow::Result<edgesync_cloud::hub::Hub> {
    use edgesync_cloud::api::{ApiToken, Role};
    use edgesync_cloud::hub::{Hub, HubOptions};
    let td = pki.ca.trust_domain().to_owned();
    let hub_id = format!("spiffe://{td}/hub");
    let (cert, key) = pki.svid(&hub_id, "hub")?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(Hub::start(HubOptions {
        listen: loopback,
        http_listen: loopback,
        data_dir: dir.join("hub"),
        sled_cache_bytes: 64 << 20,
        trust_domain: td,
        hub_id,
        identity: edgesync_protocol::svid_keeper::IdentitySource::Files(
            edgesync_protocol::svid_files::SvidFiles {
                cert,
                key,
                bundle: pki.bundle.clone(),
                federated: Vec::new(),
            },
        ),
        node_path_prefix: edgesync_protocol::spiffe_id::EDGE_PATH_PREFIX.to_owned(),
        tokens: vec![ApiToken {
            name: "harness".into(),
            token: TOKEN.into(),
            role: Role::Admin,
        }],
        idle_timeout: Duration::from_secs(10),
        max_connections: 100,
        http_limits: Default::default(),
        max_handshakes: edgesync_cloud::server::DEFAULT_MAX_HANDSHAKES,
        handshake_timeout: edgesync_cloud::server::DEFAULT_HANDSHAKE_TIMEOUT,
        node_max_records_per_s: None,
        retention: edgesync_cloud::store::Retention::default(),
    })
    .await?)
}

/// The median of `v` (the upper one for an even count; NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time (user + system) of process `pid` so far, in seconds, from `/proc/<pid>/stat`.
pub fn proc_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).context("no utime")?.parse::<f64>()?
        + f.get(12).context("no stime")?.parse::<f64>()?;
    let per_second: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    Ok(ticks / per_second)
}

/// A `kB` line of `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`), in MiB.
pub fn proc_status_mib(pid: u32, key: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key}"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .context("bad status line")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`): process logs are coloured.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
