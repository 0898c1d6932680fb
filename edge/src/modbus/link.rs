//! One task per link: polls the units (devices) behind one Modbus TCP endpoint, one serial
//! port (RTU), or one serial-to-Ethernet converter (RTU over TCP), and serves writes to them.
//!
//! # Behaviour
//!
//! - **One connection, one request at a time.** The task owns one connection (a TCP stream or
//!   an open serial port, see [`transport`](super::transport)) and sends one request at a
//!   time, each under `tokio::time::timeout(device.timeout)`, setting the unit id per request.
//!   On RTU the inter-frame delay is kept between requests.
//! - **Schedule.** Each device groups its readable tags by `poll_interval`; each group has its
//!   own due instant. When one or more groups of a device are due, their tags are planned
//!   together ([`plan`](mod@super::plan)) and read in one cycle, which yields exactly one
//!   [`DeviceReading`] with a sample for every tag read (good or bad). After a cycle a group is
//!   due again one interval after its previous due instant; if that instant has already passed
//!   (a slow link, a long outage), it is due one interval from now: missed ticks are skipped,
//!   never caught up in a burst. The device whose due instant is earliest goes first.
//! - **Exceptions** mark the tags of that request `Bad(Exception(code))` and keep the
//!   connection. Exception 2 (illegal data address) splits the request in halves by tags and
//!   retries them, down to single tags, so only the tag at fault goes bad; the refined plan is
//!   remembered for that set of tags until the next reconnect, so the search is not repeated
//!   every cycle. Exceptions 0x0A and 0x0B (a gateway cannot reach the unit) end the unit's
//!   cycle (its remaining tags get the same exception) and back the unit off, like a timeout.
//! - **Timeouts** mark the tags of that request and of the rest of the device's cycle
//!   `Bad(Timeout)`. The *unit* then backs off on its own (jittered exponential, 1 s doubling
//!   to 30 s by default) while the other units keep their schedule. On Modbus TCP,
//!   tokio-modbus checks the transaction id of a response but reports a mismatch as an error
//!   instead of skipping the stale frame, so a late answer to the timed-out request would
//!   spoil the next request of a healthy unit: a TCP link therefore reconnects (quietly)
//!   after every timeout. An RTU link is shared by every unit on the bus and is never reset
//!   for a timeout: stale bytes are discarded before the next request instead (see
//!   [`transport`](super::transport)).
//! - **Transport errors** (connection refused or reset, end of stream) mark every readable tag
//!   of every device on the link `Bad(Disconnected)` once per outage, then the link reconnects
//!   with jittered exponential backoff (capped at 30 s by default). Malformed or mismatched
//!   responses mark the request's tags `Bad(BadResponse)`; a TCP link reconnects, an RTU link
//!   reconnects only when the frame decoder gave up (its stream ends after that).
//! - **Writes** ([`LinkHandle::write`], rules in [`write`](super::write)) are served between
//!   poll cycles, through the same one-request-at-a-time connection and timeouts.
//! - **Timestamps** come from the injected clock, read right after the last response of the
//!   cycle.
//! - The task ends when `cancel` fires or when the receiver of readings is dropped. It never
//!   panics on anything a device sends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use edgesync_protocol::{BadReason, DeviceId, Quality, Timestamp, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;

use super::codec;
use super::metrics::{ErrorKind, Health, UnitMetrics};
use super::plan::{Plan, ReadRequest, plan_with_rejects, split};
use super::transport::{self, Conn, Reply};
use super::write::{self, ConnFate, LinkHandle, WriteCommand, WriteError, WriteMetrics};
use crate::model::{Access, DeviceSpec, LinkSpec, Table};

/// The wall clock the link stamps readings with (injected so tests control it).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What one poll cycle of one device read.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReading {
    /// The device.
    pub device: DeviceId,
    /// When the cycle's last response arrived (from the link's clock).
    pub ts: Timestamp,
    /// One sample per tag read in the cycle, ordered by tag index.
    pub samples: Vec<TagSample>,
    /// Another reading is expected soon: another unit (or another poll group) was already due
    /// when this cycle ended, and this cycle took less than [`FOLLOWS_WITHIN`] (on a slow
    /// serial bus the next one would not come sooner). A hint for batching the outbox commit,
    /// never needed for correctness.
    pub follows: bool,
}

/// The longest cycle after which a reading still says [`DeviceReading::follows`].
pub const FOLLOWS_WITHIN: Duration = Duration::from_millis(10);

/// One tag's result in a [`DeviceReading`].
#[derive(Debug, Clone, PartialEq)]
pub struct TagSample {
    /// Index into [`DeviceSpec::tags`] (which names its property).
    pub tag: usize,
    /// The decoded value; `None` when the quality is bad.
    pub value: Option<Value>,
    /// Good, or bad with the reason.
    pub quality: Quality,
}

/// `(tag, property, quality)` of each sample of a reading of `spec`, for the health log.
fn named<'a>(
    spec: &'a DeviceSpec,
    samples: &'a [TagSample],
) -> impl Iterator<Item = (usize, &'a str, Quality)> + 'a {
    samples
        .iter()
        .filter_map(|s| Some((s.tag, spec.tags.get(s.tag)?.property.as_str(), s.quality)))
}

/// Tuning of a link task. The defaults suit production; tests shorten them. Poll intervals
/// and backoff delays longer than a year are cut to a year.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOptions {
    /// First backoff delay of a unit after a timeout, and of the link after a transport error.
    pub backoff_initial: Duration,
    /// Largest backoff delay (the delay doubles per failure up to this).
    pub backoff_max: Duration,
    /// Timeout of establishing the TCP connection.
    pub connect_timeout: Duration,
    /// Shortest poll interval honoured (shorter configured intervals are raised to it, so a
    /// zero interval cannot spin the task).
    pub min_poll_interval: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            min_poll_interval: Duration::from_millis(10),
        }
    }
}

/// Spawns the task polling `devices` over `link`, with default [`LinkOptions`]. See
/// [`spawn_link_with`].
pub fn spawn_link(
    link: LinkSpec,
    devices: Vec<Arc<DeviceSpec>>,
    tx: mpsc::Sender<DeviceReading>,
    clock: Clock,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    spawn_link_with(LinkOptions::default(), link, devices, tx, clock, cancel)
}

/// How many writes may wait for a link task before [`LinkHandle::write`] waits for room.
const WRITE_QUEUE: usize = 32;

/// Spawns the task polling `devices` over `link` (see the module docs for its behaviour).
///
/// Devices whose [`DeviceSpec::link`] does not have `link`'s [key](LinkSpec::key) are ignored
/// (with a warning). Readings go to `tx`; a full channel slows polling down (back-pressure), a
/// closed one ends the task, as does `cancel`. Metric handles are registered here, with the
/// recorder current in this call. Must be called within a tokio runtime. The link serves no
/// writes; see [`spawn_link_writable`].
pub fn spawn_link_with(
    options: LinkOptions,
    link: LinkSpec,
    devices: Vec<Arc<DeviceSpec>>,
    tx: mpsc::Sender<DeviceReading>,
    clock: Clock,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    spawn_link_writable(options, link, devices, tx, clock, cancel).1
}

/// Like [`spawn_link_with`], and returns a [`LinkHandle`] that writes to the link's devices.
/// Dropping every clone of the handle only ends writing; polling goes on.
pub fn spawn_link_writable(
    options: LinkOptions,
    link: LinkSpec,
    devices: Vec<Arc<DeviceSpec>>,
    tx: mpsc::Sender<DeviceReading>,
    clock: Clock,
    cancel: CancellationToken,
) -> (LinkHandle, JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(WRITE_QUEUE);
    let handle = LinkHandle::new(link.key(), cmd_tx);
    let task = LinkTask::new(options, link, devices, tx, clock, cancel, cmd_rx);
    (handle, tokio::spawn(task.run()))
}

/// Longest poll interval or backoff honoured (longer ones are cut to it), so that instant
/// arithmetic can never overflow whatever the config says.
const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Exponential backoff with jitter: the n-th delay is uniformly drawn from `[d/2, d]` where
/// `d = min(initial * 2^n, max)`.
#[derive(Debug, Clone)]
struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(MAX_DELAY);
        Backoff {
            initial,
            max: max.min(MAX_DELAY).max(initial),
            failures: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let full = self.initial.saturating_mul(factor).min(self.max);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The next due instant of a group read at `due`, never in the past of `now`.
fn advance(due: Instant, interval: Duration, now: Instant) -> Instant {
    let next = due + interval;
    if next > now { next } else { now + interval }
}

/// Tags of one device sharing a poll interval.
#[derive(Debug)]
struct Group {
    interval: Duration,
    tags: Vec<usize>,
    next_due: Instant,
}

/// Most plans remembered per unit (a unit with many poll intervals has several due sets).
const MAX_CACHED_PLANS: usize = 32;

/// One device (unit) on the link and its schedule.
struct Unit {
    spec: Arc<DeviceSpec>,
    groups: Vec<Group>,
    /// All readable tags, for "disconnected" readings.
    readable: Vec<usize>,
    backoff: Backoff,
    /// While set and in the future, the unit is not polled (it timed out).
    retry_at: Option<Instant>,
    /// Plans by the sorted set of tags they read: computed once per set of due tags (planning
    /// every cycle costs more than the rest of a cycle), and replaced by the refined plan after
    /// splitting on exception 2.
    plans: HashMap<Vec<usize>, Arc<Plan>>,
    metrics: UnitMetrics,
    writes: WriteMetrics,
    health: Health,
}

impl Unit {
    fn new(spec: Arc<DeviceSpec>, link_key: &str, options: &LinkOptions, now: Instant) -> Self {
        let mut by_interval: Vec<(Duration, Vec<usize>)> = Vec::new();
        let mut readable = Vec::new();
        for (index, tag) in spec.tags.iter().enumerate() {
            if tag.access == Access::Write {
                continue;
            }
            readable.push(index);
            let interval = tag
                .poll_interval
                .max(options.min_poll_interval)
                .min(MAX_DELAY);
            match by_interval.iter_mut().find(|(i, _)| *i == interval) {
                Some((_, tags)) => tags.push(index),
                None => by_interval.push((interval, vec![index])),
            }
        }
        by_interval.sort_by_key(|(i, _)| *i);
        let groups = by_interval
            .into_iter()
            .map(|(interval, tags)| Group {
                interval,
                tags,
                next_due: now,
            })
            .collect();
        let metrics = UnitMetrics::new(link_key, &spec.unit_id.to_string());
        let writes = WriteMetrics::new(link_key, &spec.unit_id.to_string());
        Unit {
            spec,
            groups,
            readable,
            backoff: Backoff::new(options.backoff_initial, options.backoff_max),
            retry_at: None,
            plans: HashMap::new(),
            metrics,
            writes,
            health: Health::default(),
        }
    }

    /// When this unit next needs a cycle (`None` if it has nothing to read).
    fn wake_at(&self) -> Option<Instant> {
        let due = self.groups.iter().map(|g| g.next_due).min()?;
        Some(match self.retry_at {
            Some(retry) => due.max(retry),
            None => due,
        })
    }

    /// A reading marking every readable tag not in `except` bad with `reason`.
    fn all_bad(&self, reason: BadReason, except: &[usize]) -> Vec<TagSample> {
        self.readable
            .iter()
            .filter(|i| !except.contains(i))
            .filter(|&&i| i < self.spec.tags.len())
            .map(|&i| TagSample {
                tag: i,
                value: None,
                quality: Quality::Bad(reason),
            })
            .collect()
    }
}

/// How a cycle ended, for the link.
#[derive(Debug)]
enum CycleEnd {
    /// The connection is fine.
    Ok,
    /// Reconnect quietly (after a timeout or a mismatched response on TCP, or a frame the
    /// RTU decoder gave up on).
    Reconnect,
    /// The connection broke.
    Transport(String),
}

/// The state of one link task.
struct LinkTask {
    key: String,
    link: LinkSpec,
    options: LinkOptions,
    units: Vec<Unit>,
    tx: mpsc::Sender<DeviceReading>,
    clock: Clock,
    cancel: CancellationToken,
    conn: Option<Conn>,
    /// Writes to serve; `None` once every [`LinkHandle`] is gone.
    commands: Option<mpsc::Receiver<WriteCommand>>,
    backoff: Backoff,
    /// Whether the outage has been reported (readings and log) since the last connect.
    down_reported: bool,
    /// Link-level metrics (connect failures), `unit = "-"`.
    metrics: UnitMetrics,
    /// Connections established.
    connects: metrics::Counter,
}

/// Why the task stops.
struct Stop;

impl LinkTask {
    fn new(
        options: LinkOptions,
        link: LinkSpec,
        devices: Vec<Arc<DeviceSpec>>,
        tx: mpsc::Sender<DeviceReading>,
        clock: Clock,
        cancel: CancellationToken,
        commands: mpsc::Receiver<WriteCommand>,
    ) -> Self {
        let key = link.key();
        let now = Instant::now();
        let units = devices
            .into_iter()
            .filter(|d| {
                let ok = d.link.key() == key;
                if !ok {
                    tracing::warn!(link = %key, device = %d.id, "device is not on this link; ignored");
                }
                ok
            })
            .map(|d| Unit::new(d, &key, &options, now))
            .collect();
        LinkTask {
            metrics: UnitMetrics::new(&key, "-"),
            connects: metrics::counter!(transport::CONNECTS_TOTAL, "link" => key.clone()),
            link,
            backoff: Backoff::new(options.backoff_initial, options.backoff_max),
            key,
            options,
            units,
            tx,
            clock,
            cancel,
            conn: None,
            commands: Some(commands),
            down_reported: false,
        }
    }

    async fn run(mut self) {
        let _ = self.run_inner().await;
        tracing::debug!(link = %self.key, "modbus link task ended");
    }

    async fn run_inner(&mut self) -> Result<(), Stop> {
        loop {
            if self.conn.is_none() {
                self.ensure_connected().await?;
                continue;
            }
            let next = self
                .units
                .iter()
                .enumerate()
                .filter_map(|(i, u)| Some((i, u.wake_at()?)))
                .min_by_key(|(i, at)| (*at, *i));
            let due = async {
                match next {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    // Nothing to poll: only writes and cancellation can wake the task.
                    None => std::future::pending().await,
                }
            };
            let command = tokio::select! {
                // Cancellation: stop at once (nothing is in flight).
                () = self.cancel.cancelled() => return Err(Stop),
                // The earliest unit is due (cancellation-safe: a plain timer).
                () = due => None,
                // A write arrived (cancellation-safe: `recv` loses nothing when dropped).
                cmd = next_command(&mut self.commands) => Some(cmd),
            };
            if let Some(cmd) = command {
                self.handle_write(cmd).await?;
                continue;
            }
            let Some((unit, _)) = next else {
                continue;
            };
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            let cycle_start = Instant::now();
            let cycle = run_cycle(&mut self.units[unit], conn, &self.clock, &self.key);
            let (mut reading, end) = tokio::select! {
                // Cancellation mid-cycle: the request in flight is abandoned with the task.
                () = self.cancel.cancelled() => return Err(Stop),
                // The cycle ran to its end (all due tags have a sample).
                out = cycle => out,
            };
            let now = Instant::now();
            if matches!(end, CycleEnd::Ok) && now.duration_since(cycle_start) < FOLLOWS_WITHIN {
                reading.follows = self
                    .units
                    .iter()
                    .any(|u| u.wake_at().is_some_and(|at| at <= now));
            }
            let mut except: Vec<usize> = Vec::new();
            if let CycleEnd::Transport(_) = end {
                except = reading.samples.iter().map(|s| s.tag).collect();
            }
            self.send(reading).await?;
            match end {
                CycleEnd::Ok => {}
                CycleEnd::Reconnect => self.conn = None,
                CycleEnd::Transport(error) => {
                    self.conn = None;
                    self.report_down(&error, Some((unit, except))).await?;
                }
            }
        }
    }

    /// Serves one write (see [`write`](super::write)) and answers it.
    async fn handle_write(&mut self, cmd: WriteCommand) -> Result<(), Stop> {
        let WriteCommand {
            device,
            property,
            value,
            reply,
        } = cmd;
        let Some(index) = self.units.iter().position(|u| u.spec.id == device) else {
            let _ = reply.send(Err(WriteError::UnknownDevice(device)));
            return Ok(());
        };
        let spec = Arc::clone(&self.units[index].spec);
        let mut down: Option<String> = None;
        let result = 'write: {
            let Some(tag) = spec.tags.iter().find(|t| t.property == property) else {
                break 'write Err(WriteError::UnknownTag {
                    device: device.clone(),
                    property: property.clone(),
                });
            };
            let op = match write::prepare(tag, &value) {
                Ok(op) => op,
                Err(e) => break 'write Err(e),
            };
            let unit = &mut self.units[index];
            let now = Instant::now();
            if let Some(at) = unit.retry_at
                && at > now
            {
                break 'write Err(WriteError::UnitBackingOff { retry_in: at - now });
            }
            let Some(conn) = self.conn.as_mut() else {
                break 'write Err(WriteError::Disconnected);
            };
            let target = write::Target {
                unit: spec.unit_id,
                timeout: spec.timeout,
                metrics: &unit.metrics,
            };
            let (result, fate) = tokio::select! {
                // Cancellation mid-write: the request in flight is abandoned with the task.
                () = self.cancel.cancelled() => return Err(Stop),
                // The write and its verification ran to their end.
                out = write::execute(conn, &target, tag, op) => out,
            };
            match fate {
                ConnFate::Ok => {}
                ConnFate::Reset => self.conn = None,
                ConnFate::Down(error) => {
                    self.conn = None;
                    down = Some(error);
                }
            }
            if matches!(
                result,
                Err(WriteError::Timeout | WriteError::Exception(0x0A | 0x0B))
            ) {
                // Keep in step with `is_unit_unreachable`.
                let delay = unit.backoff.next_delay();
                unit.retry_at = Some(Instant::now() + delay);
            }
            result
        };
        let unit = &self.units[index];
        unit.writes.record(&result);
        match &result {
            Ok(outcome) => tracing::info!(
                link = %self.key, device = %device, property = %property,
                outcome = outcome.label(), "modbus write"
            ),
            Err(error) => tracing::warn!(
                link = %self.key, device = %device, property = %property,
                %error, "modbus write failed"
            ),
        }
        let _ = reply.send(result);
        if let Some(error) = down {
            self.report_down(&error, None).await?;
        }
        Ok(())
    }

    /// Sends a reading; a closed channel stops the task.
    async fn send(&mut self, reading: DeviceReading) -> Result<(), Stop> {
        tokio::select! {
            // Cancellation while the consumer applies back-pressure.
            () = self.cancel.cancelled() => Err(Stop),
            // The consumer took the reading, or is gone (then the task has no purpose).
            sent = self.tx.send(reading) => sent.map_err(|_| Stop),
        }
    }

    /// Connects, or reports the outage and waits out the backoff (failing the writes that
    /// arrive meanwhile with [`WriteError::Disconnected`]).
    async fn ensure_connected(&mut self) -> Result<(), Stop> {
        let attempt = transport::open(&self.link, self.options.connect_timeout);
        let result = tokio::select! {
            // Cancellation while connecting (dropping a connect attempt is safe).
            () = self.cancel.cancelled() => return Err(Stop),
            // The attempt succeeded, failed or timed out.
            r = attempt => r,
        };
        let error = match result {
            Ok(conn) => {
                self.conn = Some(conn);
                self.connects.increment(1);
                self.backoff.reset();
                for unit in &mut self.units {
                    // The device may have been reconfigured while we were away.
                    unit.plans.clear();
                }
                if self.down_reported {
                    self.down_reported = false;
                    tracing::info!(link = %self.key, "modbus link connected again");
                } else {
                    tracing::debug!(link = %self.key, "modbus link connected");
                }
                return Ok(());
            }
            Err(e) => e.to_string(),
        };
        self.metrics.error(ErrorKind::Transport);
        self.report_down(&error, None).await?;
        let until = Instant::now() + self.backoff.next_delay();
        loop {
            tokio::select! {
                // Cancellation during the backoff.
                () = self.cancel.cancelled() => return Err(Stop),
                // Backoff over: try again.
                () = tokio::time::sleep_until(until) => return Ok(()),
                // A write while down fails at once (cancellation-safe: `recv`).
                cmd = next_command(&mut self.commands) => {
                    if let Some(unit) = self.units.iter().find(|u| u.spec.id == cmd.device) {
                        unit.writes.record(&Err(WriteError::Disconnected));
                    }
                    let _ = cmd.reply.send(Err(WriteError::Disconnected));
                }
            }
        }
    }

    /// Reports an outage once: a log line and, for every device, a reading marking its
    /// readable tags disconnected (for `skip`'s unit, except the tags its last reading held).
    async fn report_down(
        &mut self,
        error: &str,
        skip: Option<(usize, Vec<usize>)>,
    ) -> Result<(), Stop> {
        if self.down_reported {
            tracing::debug!(link = %self.key, error, "modbus link still down");
            return Ok(());
        }
        self.down_reported = true;
        tracing::warn!(link = %self.key, error, "modbus link down; reconnecting with backoff");
        let ts = (self.clock)();
        let mut readings = Vec::new();
        for (i, unit) in self.units.iter_mut().enumerate() {
            let except: &[usize] = match &skip {
                Some((u, tags)) if *u == i => tags,
                _ => &[],
            };
            let samples = unit.all_bad(BadReason::Disconnected, except);
            if samples.is_empty() {
                continue;
            }
            unit.health.observe(
                &self.key,
                unit.spec.id.as_str(),
                unit.spec.unit_id,
                named(&unit.spec, &samples),
            );
            readings.push(DeviceReading {
                device: unit.spec.id.clone(),
                ts,
                samples,
                follows: false,
            });
        }
        for reading in readings {
            self.send(reading).await?;
        }
        Ok(())
    }
}

/// The registers or bits of an answered read.
enum Data {
    Registers(Vec<u16>),
    Bits(Vec<bool>),
}

fn request_for(req: &ReadRequest) -> Request<'static> {
    match req.table {
        Table::Coil => Request::ReadCoils(req.start, req.count),
        Table::DiscreteInput => Request::ReadDiscreteInputs(req.start, req.count),
        Table::InputRegister => Request::ReadInputRegisters(req.start, req.count),
        Table::HoldingRegister => Request::ReadHoldingRegisters(req.start, req.count),
    }
}

/// Checks that a response answers the request with the right amount of data.
fn extract(req: &ReadRequest, response: Response) -> Option<Data> {
    let count = usize::from(req.count);
    match (req.table, response) {
        (Table::HoldingRegister, Response::ReadHoldingRegisters(words))
        | (Table::InputRegister, Response::ReadInputRegisters(words)) => {
            (words.len() == count).then_some(Data::Registers(words))
        }
        (Table::Coil, Response::ReadCoils(mut bits))
        | (Table::DiscreteInput, Response::ReadDiscreteInputs(mut bits)) => {
            // Bits come padded to whole bytes.
            if bits.len() < count {
                return None;
            }
            bits.truncate(count);
            Some(Data::Bits(bits))
        }
        _ => None,
    }
}

/// Exceptions 0x0A (gateway path unavailable) and 0x0B (gateway target device failed to
/// respond): the unit behind a gateway is unreachable, which is treated like a timeout (the
/// rest of the cycle is skipped, the unit backs off) except that the connection is kept.
fn is_unit_unreachable(code: u8) -> bool {
    matches!(code, 0x0A | 0x0B)
}

/// The outcome of one request, before samples are made.
enum Outcome {
    Answered(Data, Duration),
    Exception(u8, Duration),
    Timeout,
    Transport(String),
    /// Malformed or mismatched; whether the connection must be re-established.
    BadResponse(String, Duration, bool),
}

/// Waits for the next write; pending forever once every handle is gone.
async fn next_command(commands: &mut Option<mpsc::Receiver<WriteCommand>>) -> WriteCommand {
    if let Some(rx) = commands.as_mut() {
        if let Some(cmd) = rx.recv().await {
            return cmd;
        }
        *commands = None;
    }
    std::future::pending().await
}

async fn send_request(conn: &mut Conn, unit: u8, req: &ReadRequest, timeout: Duration) -> Outcome {
    match conn.call(unit, request_for(req), timeout).await {
        Reply::Timeout => Outcome::Timeout,
        Reply::Transport(e) => Outcome::Transport(e),
        Reply::BadResponse { error, took, reset } => Outcome::BadResponse(error, took, reset),
        Reply::Exception(code, took) => Outcome::Exception(code, took),
        Reply::Response(response, took) => match extract(req, response) {
            Some(data) => Outcome::Answered(data, took),
            None => Outcome::BadResponse(
                "response does not match the request".to_owned(),
                took,
                !conn.is_rtu(),
            ),
        },
    }
}

/// Runs one cycle of `unit`: reads every due tag, and returns the reading and how the
/// connection fared.
async fn run_cycle(
    unit: &mut Unit,
    conn: &mut Conn,
    clock: &Clock,
    link_key: &str,
) -> (DeviceReading, CycleEnd) {
    let started = Instant::now();
    let mut due: Vec<usize> = Vec::new();
    for group in &mut unit.groups {
        if group.next_due <= started {
            due.extend(&group.tags);
            group.next_due = advance(group.next_due, group.interval, started);
        }
    }
    due.sort_unstable();
    due.dedup();

    let spec = Arc::clone(&unit.spec);
    let plan = match unit.plans.get(&due) {
        Some(plan) => Arc::clone(plan),
        None => {
            if unit.plans.len() >= MAX_CACHED_PLANS {
                unit.plans.clear();
            }
            let plan = Arc::new(plan_with_rejects(&spec, due.iter().copied()));
            unit.plans.insert(due.clone(), Arc::clone(&plan));
            plan
        }
    };
    let mut samples: Vec<TagSample> = Vec::with_capacity(due.len());
    let push = |samples: &mut Vec<TagSample>, tag: usize, result: Result<Value, BadReason>| {
        if tag >= spec.tags.len() {
            return;
        }
        let (value, quality) = match result {
            Ok(v) => (Some(v), Quality::Good),
            Err(reason) => (None, Quality::Bad(reason)),
        };
        samples.push(TagSample {
            tag,
            value,
            quality,
        });
    };
    for (tag, _) in &plan.rejected {
        push(&mut samples, *tag, Err(BadReason::DecodeError));
    }

    let mut queue: VecDeque<ReadRequest> = plan.requests.iter().cloned().collect();
    let mut leaves: Vec<ReadRequest> = Vec::new();
    let mut was_split = false;
    let mut end = CycleEnd::Ok;
    let mut abort: Option<BadReason> = None;
    while let Some(req) = queue.pop_front() {
        let mark = |samples: &mut Vec<TagSample>, reason: BadReason| {
            for &(tag, _) in &req.tags {
                push(samples, tag, Err(reason));
            }
        };
        if let Some(reason) = abort {
            mark(&mut samples, reason);
            continue;
        }
        unit.metrics.request();
        match send_request(conn, spec.unit_id, &req, spec.timeout).await {
            Outcome::Timeout => {
                unit.metrics.error(ErrorKind::Timeout);
                mark(&mut samples, BadReason::Timeout);
                abort = Some(BadReason::Timeout);
                if conn.timeout_resets() {
                    end = CycleEnd::Reconnect;
                }
            }
            Outcome::Transport(error) => {
                unit.metrics.error(ErrorKind::Transport);
                mark(&mut samples, BadReason::Disconnected);
                abort = Some(BadReason::Disconnected);
                end = CycleEnd::Transport(error);
            }
            Outcome::BadResponse(error, took, reset) => {
                unit.metrics.response(took);
                unit.metrics.error(ErrorKind::BadResponse);
                tracing::debug!(link = link_key, device = %spec.id, error, "bad modbus response");
                mark(&mut samples, BadReason::BadResponse);
                abort = Some(BadReason::BadResponse);
                if reset {
                    end = CycleEnd::Reconnect;
                }
            }
            Outcome::Exception(code, took) => {
                unit.metrics.response(took);
                if code == 2
                    && let Some((a, b)) = split(&spec, &req)
                {
                    queue.push_front(b);
                    queue.push_front(a);
                    was_split = true;
                    continue;
                }
                unit.metrics.error(ErrorKind::Exception);
                mark(&mut samples, BadReason::Exception(code));
                if is_unit_unreachable(code) {
                    // The gateway cannot reach the unit: do not ask it anything else now.
                    abort = Some(BadReason::Exception(code));
                } else {
                    leaves.push(req);
                }
            }
            Outcome::Answered(data, took) => {
                unit.metrics.response(took);
                for &(tag, offset) in &req.tags {
                    let Some(spec_tag) = spec.tags.get(tag) else {
                        continue;
                    };
                    let from = usize::from(offset);
                    let to = from + usize::from(spec_tag.data_type.width());
                    let decoded = match &data {
                        Data::Registers(regs) => {
                            regs.get(from..to).map(|r| codec::decode(spec_tag, r))
                        }
                        Data::Bits(bits) => {
                            bits.get(from..to).map(|b| codec::decode_bit(spec_tag, b))
                        }
                    };
                    let result = match decoded {
                        Some(Ok(v)) => Ok(v),
                        Some(Err(error)) => {
                            unit.metrics.error(ErrorKind::Decode);
                            tracing::trace!(device = %spec.id, tag, %error, "decode failed");
                            Err(BadReason::DecodeError)
                        }
                        None => Err(BadReason::BadResponse),
                    };
                    push(&mut samples, tag, result);
                }
                leaves.push(req);
            }
        }
    }
    let ts = clock();

    match abort {
        // Keep in step with `is_unit_unreachable`.
        Some(BadReason::Timeout | BadReason::Exception(0x0A | 0x0B)) => {
            let delay = unit.backoff.next_delay();
            unit.retry_at = Some(Instant::now() + delay);
        }
        Some(_) => {}
        None => {
            unit.backoff.reset();
            unit.retry_at = None;
            if was_split {
                if unit.plans.len() >= MAX_CACHED_PLANS {
                    unit.plans.clear();
                }
                let refined = Plan {
                    requests: leaves,
                    rejected: plan.rejected.clone(),
                };
                unit.plans.insert(due, Arc::new(refined));
            }
        }
    }
    if let CycleEnd::Transport(_) = end {
        // The outage report covers the other tags; mark this unit's remaining ones here.
        let read: Vec<usize> = samples.iter().map(|s| s.tag).collect();
        samples.extend(unit.all_bad(BadReason::Disconnected, &read));
    }
    samples.sort_by_key(|s| s.tag);
    unit.metrics.cycle(started.elapsed());
    unit.health.observe(
        link_key,
        spec.id.as_str(),
        spec.unit_id,
        named(&spec, &samples),
    );
    (
        DeviceReading {
            device: spec.id.clone(),
            ts,
            samples,
            follows: false,
        },
        end,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::net::TcpListener;
    use tokio_modbus::server::Service;
    use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
    use tokio_modbus::{ExceptionCode, SlaveRequest};

    use super::*;
    use crate::modbus::write::WriteOutcome;
    use crate::model::{ByteOrder, DataType, Parity, ReportPolicy, TagSpec};
    use edgesync_protocol::PropertyId;

    /// One simulated unit.
    #[derive(Default)]
    struct SimUnit {
        holding: HashMap<u16, u16>,
        input: HashMap<u16, u16>,
        coils: HashMap<u16, bool>,
        /// Addresses that make any read covering them fail with exception 2.
        illegal: HashSet<u16>,
        /// Answer every input-register read with this exception.
        input_exception: Option<u8>,
        /// Never answer.
        silent: bool,
        /// Answer this late.
        delay: Option<Duration>,
        /// Answer like a gateway whose target does not respond (exception 0x0B).
        gateway_fail: bool,
        /// Requests received.
        requests: u64,
        /// Function codes received, in order.
        functions: Vec<u8>,
        /// Acknowledge writes without applying them.
        ignore_writes: bool,
        /// Answer every write with this exception.
        write_exception: Option<u8>,
        /// Answer functions 5 and 6 with "illegal function" (only 15 and 16 work).
        no_single_writes: bool,
    }

    #[derive(Clone, Default)]
    struct Sim(Arc<Mutex<HashMap<u8, SimUnit>>>);

    impl Sim {
        fn with<R>(&self, unit: u8, f: impl FnOnce(&mut SimUnit) -> R) -> R {
            let mut units = self.0.lock().unwrap();
            f(units.entry(unit).or_default())
        }

        fn delay_of(&self, unit: u8) -> Option<Duration> {
            self.0.lock().unwrap().get(&unit).and_then(|u| u.delay)
        }

        fn handle(&self, req: SlaveRequest<'static>) -> Result<Option<Response>, ExceptionCode> {
            let mut units = self.0.lock().unwrap();
            let Some(u) = units.get_mut(&req.slave) else {
                return Err(ExceptionCode::GatewayTargetDevice);
            };
            u.requests += 1;
            u.functions.push(req.request.function_code().value());
            if u.silent {
                return Ok(None);
            }
            if u.gateway_fail {
                return Err(ExceptionCode::GatewayTargetDevice);
            }
            let range = |start: u16, count: u16| start..start.saturating_add(count);
            let check = |u: &SimUnit, start: u16, count: u16| {
                if range(start, count).any(|a| u.illegal.contains(&a)) {
                    Err(ExceptionCode::IllegalDataAddress)
                } else {
                    Ok(())
                }
            };
            let words = |m: &HashMap<u16, u16>, start: u16, count: u16| -> Vec<u16> {
                range(start, count)
                    .map(|a| m.get(&a).copied().unwrap_or(0))
                    .collect()
            };
            match req.request {
                Request::ReadHoldingRegisters(start, count) => {
                    check(u, start, count)?;
                    Ok(Some(Response::ReadHoldingRegisters(words(
                        &u.holding, start, count,
                    ))))
                }
                Request::ReadInputRegisters(start, count) => {
                    if let Some(code) = u.input_exception {
                        return Err(ExceptionCode::new(code));
                    }
                    check(u, start, count)?;
                    Ok(Some(Response::ReadInputRegisters(words(
                        &u.input, start, count,
                    ))))
                }
                Request::ReadCoils(start, count) => {
                    check(u, start, count)?;
                    Ok(Some(Response::ReadCoils(
                        range(start, count)
                            .map(|a| u.coils.get(&a).copied().unwrap_or(false))
                            .collect(),
                    )))
                }
                Request::WriteSingleCoil(..) | Request::WriteSingleRegister(..)
                    if u.no_single_writes =>
                {
                    Err(ExceptionCode::IllegalFunction)
                }
                Request::WriteSingleCoil(..)
                | Request::WriteSingleRegister(..)
                | Request::WriteMultipleCoils(..)
                | Request::WriteMultipleRegisters(..)
                    if u.write_exception.is_some() =>
                {
                    Err(ExceptionCode::new(u.write_exception.unwrap()))
                }
                Request::WriteSingleCoil(a, v) => {
                    if !u.ignore_writes {
                        u.coils.insert(a, v);
                    }
                    Ok(Some(Response::WriteSingleCoil(a, v)))
                }
                Request::WriteMultipleCoils(a, vs) => {
                    if !u.ignore_writes {
                        for (i, v) in vs.iter().enumerate() {
                            u.coils.insert(a + i as u16, *v);
                        }
                    }
                    Ok(Some(Response::WriteMultipleCoils(a, vs.len() as u16)))
                }
                Request::WriteSingleRegister(a, v) => {
                    if !u.ignore_writes {
                        u.holding.insert(a, v);
                    }
                    Ok(Some(Response::WriteSingleRegister(a, v)))
                }
                Request::WriteMultipleRegisters(a, vs) => {
                    if !u.ignore_writes {
                        for (i, v) in vs.iter().enumerate() {
                            u.holding.insert(a + i as u16, *v);
                        }
                    }
                    Ok(Some(Response::WriteMultipleRegisters(a, vs.len() as u16)))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            }
        }
    }

    impl Service for Sim {
        type Request = SlaveRequest<'static>;
        type Response = Option<Response>;
        type Exception = ExceptionCode;
        type Future =
            std::pin::Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

        fn call(&self, req: Self::Request) -> Self::Future {
            let delay = self.delay_of(req.slave);
            let result = self.handle(req);
            Box::pin(async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                result
            })
        }
    }

    /// Serves `sim` on `addr` until the returned task is aborted (which also closes the
    /// connections it accepted).
    async fn serve(addr: SocketAddr, sim: Sim) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        let server = Server::new(listener);
        let task = tokio::spawn(async move {
            let on_connected = |stream, socket_addr| {
                let sim = sim.clone();
                async move { accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(sim.clone()))) }
            };
            let _ = server.serve(&on_connected, |_err| {}).await;
        });
        (local, task)
    }

    fn tag(name: &str, table: Table, address: u16, data_type: DataType) -> TagSpec {
        TagSpec {
            property: PropertyId::new(name).unwrap(),
            table,
            address,
            data_type,
            bit: None,
            byte_order: ByteOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            access: Access::Read,
            poll_interval: Duration::from_millis(100),
            report: ReportPolicy::default(),
        }
    }

    fn device(name: &str, addr: SocketAddr, unit_id: u8, tags: Vec<TagSpec>) -> Arc<DeviceSpec> {
        device_on(link(addr), name, unit_id, tags)
    }

    fn device_on(link: LinkSpec, name: &str, unit_id: u8, tags: Vec<TagSpec>) -> Arc<DeviceSpec> {
        Arc::new(DeviceSpec {
            id: DeviceId::new(name).unwrap(),
            link,
            unit_id,
            timeout: Duration::from_millis(200),
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 4,
            tags,
        })
    }

    fn link(addr: SocketAddr) -> LinkSpec {
        LinkSpec::Tcp {
            endpoint: addr.to_string(),
        }
    }

    fn options() -> LinkOptions {
        LinkOptions {
            backoff_initial: Duration::from_millis(400),
            backoff_max: Duration::from_millis(800),
            connect_timeout: Duration::from_millis(500),
            min_poll_interval: Duration::from_millis(10),
        }
    }

    fn counting_clock() -> Clock {
        let n = Arc::new(AtomicU64::new(1000));
        Arc::new(move || Timestamp(n.fetch_add(1, Ordering::SeqCst)))
    }

    struct Running {
        rx: mpsc::Receiver<DeviceReading>,
        cancel: CancellationToken,
        task: JoinHandle<()>,
        handle: LinkHandle,
        specs: HashMap<DeviceId, Arc<DeviceSpec>>,
    }

    /// A reading with the property of each of its samples (readings name tags by index).
    struct Got {
        reading: DeviceReading,
        properties: Vec<String>,
    }

    impl std::ops::Deref for Got {
        type Target = DeviceReading;
        fn deref(&self) -> &DeviceReading {
            &self.reading
        }
    }

    impl std::fmt::Debug for Got {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Got")
                .field("properties", &self.properties)
                .field("reading", &self.reading)
                .finish()
        }
    }

    impl Running {
        fn start(addr: SocketAddr, devices: Vec<Arc<DeviceSpec>>) -> Self {
            Self::start_on(link(addr), devices)
        }

        fn start_on(link: LinkSpec, devices: Vec<Arc<DeviceSpec>>) -> Self {
            let (tx, rx) = mpsc::channel(64);
            let cancel = CancellationToken::new();
            let specs = devices.iter().map(|d| (d.id.clone(), d.clone())).collect();
            let (handle, task) = spawn_link_writable(
                options(),
                link,
                devices,
                tx,
                counting_clock(),
                cancel.clone(),
            );
            Running {
                rx,
                cancel,
                task,
                handle,
                specs,
            }
        }

        /// Writes `value` to `property` of `device` (bounded in time).
        async fn write(
            &self,
            device: &str,
            property: &str,
            value: Value,
        ) -> Result<WriteOutcome, WriteError> {
            let device = DeviceId::new(device).unwrap();
            let property = PropertyId::new(property).unwrap();
            tokio::time::timeout(
                Duration::from_secs(5),
                self.handle.write(&device, &property, value),
            )
            .await
            .expect("a write answer within 5 s")
        }

        async fn next(&mut self) -> Got {
            let reading = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("a reading within 5 s")
                .expect("link task alive");
            let spec = &self.specs[&reading.device];
            let properties = reading
                .samples
                .iter()
                .map(|s| spec.tags[s.tag].property.to_string())
                .collect();
            Got {
                reading,
                properties,
            }
        }

        /// The next reading of `device` (others are skipped).
        async fn next_of(&mut self, device: &str) -> Got {
            loop {
                let r = self.next().await;
                if r.device.as_str() == device {
                    return r;
                }
            }
        }

        async fn stop(self) {
            self.cancel.cancel();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("task ends on cancel")
                .expect("task did not panic");
        }
    }

    fn sample<'a>(r: &'a Got, property: &str) -> &'a TagSample {
        r.properties
            .iter()
            .position(|p| p == property)
            .map(|i| &r.samples[i])
            .unwrap_or_else(|| panic!("no sample {property} in {r:?}"))
    }

    fn good(r: &Got, property: &str) -> Value {
        let s = sample(r, property);
        assert_eq!(s.quality, Quality::Good, "{property}: {s:?}");
        s.value.clone().unwrap()
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn reads_decoded_values_of_two_units() {
        let sim = Sim::default();
        sim.with(1, |u| {
            let f = 21.5f32.to_bits();
            u.holding.insert(0, (f >> 16) as u16);
            u.holding.insert(1, f as u16);
            u.holding.insert(3, 42);
            u.input.insert(7, 0x8000);
            u.coils.insert(5, true);
        });
        sim.with(2, |u| {
            let v = (-70_000i32) as u32;
            u.holding.insert(100, v as u16); // CDAB: low word first
            u.holding.insert(101, (v >> 16) as u16);
            u.holding.insert(200, u16::from_be_bytes(*b"OK"));
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut bit = tag("flag", Table::HoldingRegister, 3, DataType::Bool);
        bit.bit = Some(1);
        let mut scaled = tag("level", Table::InputRegister, 7, DataType::UInt16);
        scaled.scale = 0.5;
        let d1 = device(
            "plc-1",
            addr,
            1,
            vec![
                tag("temp", Table::HoldingRegister, 0, DataType::Float32),
                tag("count", Table::HoldingRegister, 3, DataType::UInt16),
                bit,
                scaled,
                tag("run", Table::Coil, 5, DataType::Bool),
            ],
        );
        let mut swapped = tag("pos", Table::HoldingRegister, 100, DataType::Int32);
        swapped.byte_order = ByteOrder::Cdab;
        let d2 = device(
            "plc-2",
            addr,
            2,
            vec![
                swapped,
                tag(
                    "name",
                    Table::HoldingRegister,
                    200,
                    DataType::String { len: 2 },
                ),
            ],
        );
        let mut run = Running::start(addr, vec![d1, d2]);
        let r1 = run.next_of("plc-1").await;
        assert_eq!(good(&r1, "temp"), Value::Float(21.5));
        assert_eq!(good(&r1, "count"), Value::UInt(42));
        assert_eq!(good(&r1, "flag"), Value::Bool(true));
        assert_eq!(good(&r1, "level"), Value::Float(16384.0));
        assert_eq!(good(&r1, "run"), Value::Bool(true));
        assert_eq!(
            r1.samples.iter().map(|s| s.tag).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(r1.ts.0 >= 1000, "timestamp from the injected clock");
        let r2 = run.next_of("plc-2").await;
        assert_eq!(good(&r2, "pos"), Value::Int(-70_000));
        assert_eq!(good(&r2, "name"), Value::Str("OK".into()));
        // Values change, the next cycle sees it.
        sim.with(1, |u| u.holding.insert(3, 43));
        let mut seen = false;
        for _ in 0..20 {
            let r = run.next_of("plc-1").await;
            if good(&r, "count") == Value::UInt(43) {
                seen = true;
                break;
            }
        }
        assert!(seen);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn silent_unit_backs_off_while_other_unit_keeps_its_cycle() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 7);
        });
        sim.with(2, |u| u.silent = true);
        let (addr, server) = serve(local(), sim.clone()).await;
        let d1 = device(
            "ok",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let d2 = device(
            "dead",
            addr,
            2,
            vec![
                tag("x", Table::HoldingRegister, 0, DataType::UInt16),
                tag("y", Table::InputRegister, 0, DataType::UInt16),
            ],
        );
        let mut run = Running::start(addr, vec![d1, d2]);
        let started = Instant::now();
        let mut ok_readings = 0;
        let mut dead_readings = 0;
        while started.elapsed() < Duration::from_millis(2000) {
            let r = run.next().await;
            match r.device.as_str() {
                "ok" => {
                    assert_eq!(good(&r, "a"), Value::UInt(7));
                    ok_readings += 1;
                }
                _ => {
                    // Both tags bad timeout; the second request was not even sent.
                    for s in &r.samples {
                        assert_eq!(s.quality, Quality::Bad(BadReason::Timeout), "{s:?}");
                        assert_eq!(s.value, None);
                    }
                    assert_eq!(r.samples.len(), 2);
                    dead_readings += 1;
                }
            }
        }
        // 100 ms interval over 2 s, minus the time spent waiting for the dead unit
        // (200 ms per probe, probes every 200-800 ms).
        assert!(ok_readings >= 8, "ok unit starved: {ok_readings}");
        // Without backoff the dead unit would be probed ~7 times (200 ms timeout + 100 ms).
        assert!(
            (2..=5).contains(&dead_readings),
            "dead unit probed {dead_readings} times"
        );
        let dead_requests = sim.with(2, |u| u.requests);
        assert_eq!(dead_requests, dead_readings, "one request per probe");
        // It comes back.
        sim.with(2, |u| u.silent = false);
        let r = run.next_of("dead").await;
        let r = if r.samples[0].quality.is_good() {
            r
        } else {
            run.next_of("dead").await
        };
        assert_eq!(good(&r, "x"), Value::UInt(0));
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn exception_marks_only_the_tags_of_that_request() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 5);
            u.input_exception = Some(4);
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let d = device(
            "plc",
            addr,
            1,
            vec![
                tag("good", Table::HoldingRegister, 0, DataType::UInt16),
                tag("bad1", Table::InputRegister, 0, DataType::UInt16),
                tag("bad2", Table::InputRegister, 1, DataType::UInt16),
            ],
        );
        let mut run = Running::start(addr, vec![d]);
        for _ in 0..3 {
            let r = run.next().await;
            assert_eq!(good(&r, "good"), Value::UInt(5));
            for p in ["bad1", "bad2"] {
                let s = sample(&r, p);
                assert_eq!(s.quality, Quality::Bad(BadReason::Exception(4)));
                assert_eq!(s.value, None);
            }
        }
        // The connection was kept: still no transport trouble, the device recovers in place.
        sim.with(1, |u| u.input_exception = None);
        let mut recovered = false;
        for _ in 0..5 {
            let r = run.next().await;
            if sample(&r, "bad1").quality.is_good() {
                recovered = true;
                break;
            }
        }
        assert!(recovered);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn illegal_data_address_isolates_the_bad_tag() {
        let sim = Sim::default();
        sim.with(1, |u| {
            for a in 0..5 {
                u.holding.insert(a, 100 + a);
            }
            u.illegal.insert(2);
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let tags = (0..5)
            .map(|a| {
                tag(
                    &format!("t{a}"),
                    Table::HoldingRegister,
                    a,
                    DataType::UInt16,
                )
            })
            .collect();
        let d = device("plc", addr, 1, tags);
        let mut run = Running::start(addr, vec![d]);
        let check = |r: &Got| {
            for a in [0u16, 1, 3, 4] {
                assert_eq!(good(r, &format!("t{a}")), Value::UInt(u64::from(100 + a)));
            }
            let s = sample(r, "t2");
            assert_eq!(s.quality, Quality::Bad(BadReason::Exception(2)));
        };
        let r = run.next().await;
        check(&r);
        // First cycle: [0..5) fails, [0,1] ok, [2..5) fails, [2] fails, [3,4] ok.
        let first = sim.with(1, |u| u.requests);
        assert_eq!(first, 5);
        let r = run.next().await;
        check(&r);
        // Next cycles reuse the refined plan: three requests.
        let second = sim.with(1, |u| u.requests);
        assert_eq!(second - first, 3);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn reconnects_after_the_server_restarts() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 1);
        });
        sim.with(2, |u| {
            u.holding.insert(0, 2);
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut slow = tag("b", Table::HoldingRegister, 0, DataType::UInt16);
        slow.poll_interval = Duration::from_millis(300);
        let d1 = device(
            "one",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt16), slow],
        );
        let d2 = device(
            "two",
            addr,
            2,
            vec![tag("c", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start(addr, vec![d1, d2]);
        assert_eq!(good(&run.next_of("one").await, "a"), Value::UInt(1));
        assert_eq!(good(&run.next_of("two").await, "c"), Value::UInt(2));

        server.abort();
        let _ = server.await;
        // Every tag of both devices goes bad disconnected, once per device.
        let mut disconnected: HashMap<String, Vec<String>> = HashMap::new();
        while disconnected.len() < 2 {
            let r = run.next().await;
            if r.samples
                .iter()
                .all(|s| s.quality == Quality::Bad(BadReason::Disconnected))
            {
                let props = r.properties.clone();
                assert!(
                    disconnected.insert(r.device.to_string(), props).is_none(),
                    "reported twice: {r:?}"
                );
            }
        }
        assert_eq!(disconnected["one"], vec!["a", "b"]);
        assert_eq!(disconnected["two"], vec!["c"]);
        // Nothing more while the server is down (reconnect attempts are quiet).
        let quiet = tokio::time::timeout(Duration::from_millis(700), run.rx.recv()).await;
        assert!(quiet.is_err(), "unexpected reading while down: {quiet:?}");

        let (_, server) = serve(addr, sim.clone()).await;
        assert_eq!(good(&run.next_of("one").await, "a"), Value::UInt(1));
        assert_eq!(good(&run.next_of("two").await, "c"), Value::UInt(2));
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn late_answers_do_not_spoil_the_next_request() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 11);
        });
        sim.with(2, |u| {
            u.holding.insert(0, 22);
            // Answers after the 200 ms timeout, while unit 1 is asked next.
            u.delay = Some(Duration::from_millis(300));
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let d1 = device(
            "fast",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let d2 = device(
            "late",
            addr,
            2,
            vec![tag("b", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start(addr, vec![d1, d2]);
        let mut fast = 0;
        let mut late = 0;
        while fast < 10 || late < 2 {
            let r = run.next().await;
            if r.device.as_str() == "fast" {
                assert_eq!(good(&r, "a"), Value::UInt(11), "{r:?}");
                fast += 1;
            } else {
                assert_eq!(r.samples[0].quality, Quality::Bad(BadReason::Timeout));
                late += 1;
            }
        }
        run.stop().await;
        server.abort();
    }

    /// A raw TCP peer answering every read with a short but well-framed response first, then
    /// with bytes that are not valid Modbus.
    async fn serve_malformed() -> (SocketAddr, JoinHandle<()>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind(local()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut answered = 0u32;
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut req = [0u8; 12];
                while stream.read_exact(&mut req).await.is_ok() {
                    let (tid0, tid1, unit) = (req[0], req[1], req[6]);
                    let reply: Vec<u8> = if answered == 0 {
                        // One register where two were asked for.
                        vec![tid0, tid1, 0, 0, 0, 5, unit, 0x03, 0x02, 0x00, 0x07]
                    } else {
                        // Byte count 3: odd, impossible for registers.
                        vec![tid0, tid1, 0, 0, 0, 6, unit, 0x03, 0x03, 0x00, 0x07, 0x00]
                    };
                    answered += 1;
                    if stream.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn malformed_responses_are_bad_response() {
        let (addr, server) = serve_malformed().await;
        let d = device(
            "plc",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt32)],
        );
        let mut run = Running::start(addr, vec![d]);
        for _ in 0..2 {
            let r = run.next().await;
            assert_eq!(
                r.samples[0].quality,
                Quality::Bad(BadReason::BadResponse),
                "{r:?}"
            );
            assert_eq!(r.samples[0].value, None);
        }
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn unreachable_unit_behind_a_gateway_backs_off_on_a_kept_connection() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 1);
        });
        sim.with(2, |u| u.gateway_fail = true);
        let (addr, server) = serve(local(), sim.clone()).await;
        let d1 = device(
            "ok",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let d2 = device(
            "gone",
            addr,
            2,
            vec![
                tag("x", Table::HoldingRegister, 0, DataType::UInt16),
                tag("y", Table::Coil, 0, DataType::Bool),
            ],
        );
        let mut run = Running::start(addr, vec![d1, d2]);
        let started = Instant::now();
        let mut gone = 0u64;
        while started.elapsed() < Duration::from_millis(1000) {
            let r = run.next().await;
            if r.device.as_str() == "gone" {
                for s in &r.samples {
                    assert_eq!(s.quality, Quality::Bad(BadReason::Exception(0x0B)));
                }
                assert_eq!(r.samples.len(), 2);
                gone += 1;
            } else {
                assert_eq!(good(&r, "a"), Value::UInt(1));
            }
        }
        // Probes at 0, then after 200-400 ms, then 400-800 ms: at most 3 in a second, one
        // request each (the coil read is skipped), instead of 10 cycles of 2 requests.
        assert!((1..=3).contains(&gone), "probed {gone} times");
        assert_eq!(sim.with(2, |u| u.requests), gone);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn tags_whose_intervals_coincide_are_read_in_one_cycle() {
        let sim = Sim::default();
        sim.with(1, |u| u.holding.insert(1, 9));
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut slow = tag("slow", Table::HoldingRegister, 1, DataType::UInt16);
        slow.poll_interval = Duration::from_millis(200);
        let mut write_only = tag("setpoint", Table::HoldingRegister, 2, DataType::UInt16);
        write_only.access = Access::Write;
        let d = device(
            "plc",
            addr,
            1,
            vec![
                tag("fast", Table::HoldingRegister, 0, DataType::UInt16),
                slow,
                write_only,
            ],
        );
        let mut run = Running::start(addr, vec![d]);
        let mut with_slow = 0;
        let n = 12;
        for _ in 0..n {
            let r = run.next().await;
            assert_eq!(good(&r, "fast"), Value::UInt(0));
            let props: Vec<&str> = r.properties.iter().map(String::as_str).collect();
            match props.as_slice() {
                ["fast"] => {}
                ["fast", "slow"] => with_slow += 1,
                other => panic!("unexpected cycle {other:?}"),
            }
        }
        // The 200 ms group coincides with every second 100 ms cycle.
        assert!((n / 2 - 1..=n / 2 + 1).contains(&with_slow), "{with_slow}");
        // One request per cycle: adjacent registers of both groups are merged.
        assert!(sim.with(1, |u| u.requests) <= n as u64 + 1);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn a_reading_says_whether_the_sweep_goes_on() {
        let sim = Sim::default();
        for u in 1..=3u8 {
            sim.with(u, |unit| unit.holding.insert(0, u16::from(u)));
        }
        let (addr, server) = serve(local(), sim.clone()).await;
        let devices = (1..=3u8)
            .map(|u| {
                let t = tag("v", Table::HoldingRegister, 0, DataType::UInt16);
                device(&format!("plc-{u}"), addr, u, vec![t])
            })
            .collect();
        let mut run = Running::start(addr, devices);
        // The three units share their due instant (100 ms): the first two readings of a
        // sweep are followed at once by the next unit's, the last is not.
        let mut sweeps = 0;
        for _ in 0..4 {
            let r = run.next().await;
            if r.device.as_str() != "plc-1" {
                continue;
            }
            assert!(r.follows, "{r:?}");
            let r = run.next().await;
            assert_eq!(r.device.as_str(), "plc-2");
            assert!(r.follows, "{r:?}");
            let r = run.next().await;
            assert_eq!(r.device.as_str(), "plc-3");
            assert!(!r.follows, "the sweep ends: {r:?}");
            sweeps += 1;
        }
        assert!(sweeps >= 3, "{sweeps}");
        // A slow unit (a serial bus, a busy gateway) is not waited for: its reading does not
        // promise another soon.
        sim.with(1, |u| u.delay = Some(FOLLOWS_WITHIN * 2));
        let r = run.next_of("plc-1").await;
        assert!(!r.follows, "a slow cycle: {r:?}");
        sim.with(1, |u| u.delay = None);
        // A unit that times out ends its reading without `follows` (its cycle was cut short).
        sim.with(2, |u| u.silent = true);
        let r = run.next_of("plc-2").await;
        assert_eq!(sample(&r, "v").quality, Quality::Bad(BadReason::Timeout));
        assert!(!r.follows, "{r:?}");
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn unreachable_endpoint_reports_disconnected_once_and_stops_on_cancel() {
        // A port with nothing listening.
        let listener = TcpListener::bind(local()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let d = device(
            "plc",
            addr,
            1,
            vec![tag("a", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start(addr, vec![d]);
        let r = run.next().await;
        assert_eq!(r.samples[0].quality, Quality::Bad(BadReason::Disconnected));
        let quiet = tokio::time::timeout(Duration::from_millis(1000), run.rx.recv()).await;
        assert!(quiet.is_err(), "reported again: {quiet:?}");
        run.stop().await;
    }

    #[tokio::test]
    async fn metrics_are_counted_per_link_and_unit() {
        let sim = Sim::default();
        sim.with(1, |u| u.input_exception = Some(3));
        let (addr, server) = serve(local(), sim.clone()).await;
        let d = device(
            "plc",
            addr,
            1,
            vec![
                tag("a", Table::HoldingRegister, 0, DataType::UInt16),
                tag("b", Table::InputRegister, 0, DataType::UInt16),
            ],
        );
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let mut run = metrics::with_local_recorder(&recorder, || Running::start(addr, vec![d]));
        run.next().await;
        run.next().await;
        run.stop().await;
        let text = handle.render();
        let key = format!("link=\"tcp://{addr}\",unit=\"1\"");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&key))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        let value = |l: String| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        assert!(value(line("edgesync_modbus_requests_total")) >= 4.0);
        let exceptions = text
            .lines()
            .find(|l| {
                l.starts_with("edgesync_modbus_errors_total")
                    && l.contains("kind=\"exception\"")
                    && l.contains("unit=\"1\"")
            })
            .unwrap_or_else(|| panic!("no exception count in {text}"));
        assert!(value(exceptions.to_owned()) >= 2.0);
        assert!(text.contains("edgesync_modbus_response_seconds"));
        assert!(text.contains("edgesync_modbus_cycle_seconds"));
        server.abort();
    }

    #[test]
    fn schedule_skips_missed_ticks() {
        let t0 = Instant::now();
        let i = Duration::from_millis(100);
        // On time: keeps the phase.
        assert_eq!(advance(t0, i, t0 + Duration::from_millis(30)), t0 + i);
        // Late by several intervals: one interval from now, no catch-up burst.
        let now = t0 + Duration::from_millis(450);
        assert_eq!(advance(t0, i, now), now + i);
    }

    #[test]
    fn huge_durations_are_capped_not_overflowing() {
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        for _ in 0..40 {
            assert!(b.next_delay() <= MAX_DELAY);
        }
        let spec = Arc::new(DeviceSpec {
            id: DeviceId::new("d").unwrap(),
            link: link(local()),
            unit_id: 1,
            timeout: Duration::MAX,
            max_registers_per_read: 125,
            max_bits_per_read: 2000,
            max_gap: 0,
            tags: vec![{
                let mut t = tag("a", Table::HoldingRegister, 0, DataType::UInt16);
                t.poll_interval = Duration::MAX;
                t
            }],
        });
        let unit = Unit::new(spec, "l", &options(), Instant::now());
        assert_eq!(unit.groups[0].interval, MAX_DELAY);
        let now = Instant::now();
        assert!(advance(now, unit.groups[0].interval, now) > now);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let expected_caps = [1, 2, 4, 8, 16, 30, 30, 30];
        for cap in expected_caps {
            let d = b.next_delay();
            let cap = Duration::from_secs(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    // ---- writes ----------------------------------------------------------------------

    fn writable(name: &str, table: Table, address: u16, data_type: DataType) -> TagSpec {
        TagSpec {
            access: Access::ReadWrite,
            ..tag(name, table, address, data_type)
        }
    }

    fn ordered(mut t: TagSpec, order: ByteOrder) -> TagSpec {
        t.byte_order = order;
        t
    }

    /// Registers of big-endian `bytes` laid out in `order`, computed independently of the
    /// codec: ABCD as is, BADC bytes swapped per register, CDAB registers reversed, DCBA all
    /// bytes reversed (little endian).
    fn wire(bytes: &[u8], order: ByteOrder) -> Vec<u16> {
        let mut b = bytes.to_vec();
        match order {
            ByteOrder::Abcd => {}
            ByteOrder::Badc => b.chunks_mut(2).for_each(|c| c.swap(0, 1)),
            ByteOrder::Cdab => {
                let mut regs: Vec<[u8; 2]> = b.chunks(2).map(|c| [c[0], c[1]]).collect();
                regs.reverse();
                b = regs.concat();
            }
            ByteOrder::Dcba => b.reverse(),
        }
        b.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    fn holding(sim: &Sim, unit: u8, start: u16, count: u16) -> Vec<u16> {
        sim.with(unit, |u| {
            (start..start + count)
                .map(|a| u.holding.get(&a).copied().unwrap_or(0))
                .collect()
        })
    }

    /// Function codes unit `unit` received since the last call (reads by the poller
    /// included), then forgets them.
    fn take_functions(sim: &Sim, unit: u8) -> Vec<u8> {
        sim.with(unit, |u| std::mem::take(&mut u.functions))
    }

    /// Write function codes only.
    fn writes_of(functions: &[u8]) -> Vec<u8> {
        functions
            .iter()
            .copied()
            .filter(|f| matches!(f, 5 | 6 | 15 | 16))
            .collect()
    }

    #[tokio::test]
    async fn writes_every_writable_type_and_verifies_them() {
        let sim = Sim::default();
        sim.with(1, |_| {});
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut tags = vec![
            writable("coil", Table::Coil, 3, DataType::Bool),
            writable("i16", Table::HoldingRegister, 0, DataType::Int16),
            writable("u16", Table::HoldingRegister, 1, DataType::UInt16),
            writable("i32", Table::HoldingRegister, 2, DataType::Int32),
            writable("u32", Table::HoldingRegister, 4, DataType::UInt32),
            writable("i64", Table::HoldingRegister, 6, DataType::Int64),
            writable("u64", Table::HoldingRegister, 10, DataType::UInt64),
            writable("f32", Table::HoldingRegister, 14, DataType::Float32),
            writable("s", Table::HoldingRegister, 16, DataType::String { len: 3 }),
            writable("flag", Table::HoldingRegister, 20, DataType::Bool),
        ];
        let orders = [
            ByteOrder::Abcd,
            ByteOrder::Badc,
            ByteOrder::Cdab,
            ByteOrder::Dcba,
        ];
        for (i, order) in orders.iter().enumerate() {
            tags.push(ordered(
                writable(
                    &format!("f64_{i}"),
                    Table::HoldingRegister,
                    30 + 4 * i as u16,
                    DataType::Float64,
                ),
                *order,
            ));
            tags.push(ordered(
                writable(
                    &format!("f32_{i}"),
                    Table::HoldingRegister,
                    50 + 2 * i as u16,
                    DataType::Float32,
                ),
                *order,
            ));
        }
        // Polled slowly, so the function log is mostly the writes'.
        for t in &mut tags {
            t.poll_interval = Duration::from_secs(3600);
        }
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics_handle = recorder.handle();
        let mut run = metrics::with_local_recorder(&recorder, || {
            Running::start(addr, vec![device("plc", addr, 1, tags)])
        });
        run.next().await;
        take_functions(&sim, 1);

        // A coil: function 5, read back with 1.
        assert_eq!(
            run.write("plc", "coil", Value::Bool(true)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(sim.with(1, |u| u.coils.get(&3).copied()), Some(true));
        assert_eq!(take_functions(&sim, 1), vec![5, 1]);

        // One register: function 6, read back with 3.
        assert_eq!(
            run.write("plc", "i16", Value::Int(-2)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 0, 1), vec![0xFFFE]);
        assert_eq!(take_functions(&sim, 1), vec![6, 3]);
        assert_eq!(
            run.write("plc", "u16", Value::UInt(65535)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 1, 1), vec![0xFFFF]);

        // Several registers: one function 16, read back with 3.
        assert_eq!(
            run.write("plc", "i32", Value::Int(-100_000)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            holding(&sim, 1, 2, 2),
            wire(&(-100_000i32).to_be_bytes(), ByteOrder::Abcd)
        );
        assert_eq!(take_functions(&sim, 1), vec![6, 3, 16, 3]);
        assert_eq!(
            run.write("plc", "u32", Value::UInt(0xDEAD_BEEF)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 4, 2), vec![0xDEAD, 0xBEEF]);
        assert_eq!(
            run.write("plc", "i64", Value::Int(-1_234_567_890_123))
                .await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            holding(&sim, 1, 6, 4),
            wire(&(-1_234_567_890_123i64).to_be_bytes(), ByteOrder::Abcd)
        );
        assert_eq!(
            run.write("plc", "u64", Value::UInt(u64::MAX - 1)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            holding(&sim, 1, 10, 4),
            vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]
        );
        assert_eq!(
            run.write("plc", "f32", Value::Float(1.5)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            holding(&sim, 1, 14, 2),
            wire(&1.5f32.to_be_bytes(), ByteOrder::Abcd)
        );
        assert_eq!(
            run.write("plc", "s", Value::Str("abc".into())).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 16, 3), vec![0x6162, 0x6300, 0x0000]);
        assert_eq!(
            run.write("plc", "flag", Value::Bool(true)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 20, 1), vec![1]);
        take_functions(&sim, 1);

        // Every byte order, 64 and 32 bits.
        for (i, order) in orders.iter().enumerate() {
            let v = -1234.5678e9f64;
            let r = run.write("plc", &format!("f64_{i}"), Value::Float(v)).await;
            assert_eq!(r, Ok(WriteOutcome::Verified), "{order:?}");
            assert_eq!(
                holding(&sim, 1, 30 + 4 * i as u16, 4),
                wire(&v.to_be_bytes(), *order),
                "{order:?}"
            );
            let w = 3.25f32;
            let r = run
                .write("plc", &format!("f32_{i}"), Value::Float(f64::from(w)))
                .await;
            assert_eq!(r, Ok(WriteOutcome::Verified), "{order:?}");
            assert_eq!(
                holding(&sim, 1, 50 + 2 * i as u16, 2),
                wire(&w.to_be_bytes(), *order),
                "{order:?}"
            );
        }
        assert_eq!(writes_of(&take_functions(&sim, 1)), vec![16; 8]);

        run.stop().await;
        let text = metrics_handle.render();
        let verified = text
            .lines()
            .find(|l| {
                l.starts_with(write::WRITES_TOTAL)
                    && l.contains("result=\"verified\"")
                    && l.contains("unit=\"1\"")
            })
            .unwrap_or_else(|| panic!("no verified writes in {text}"));
        assert!(verified.ends_with(" 18"), "{verified}");
        server.abort();
    }

    #[tokio::test]
    async fn register_bit_write_is_read_modify_write_preserving_other_bits() {
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(5, 0b1010_0000_0000_0001);
        });
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut bit = writable("b3", Table::HoldingRegister, 5, DataType::Bool);
        bit.bit = Some(3);
        bit.poll_interval = Duration::from_secs(3600);
        let mut run = Running::start(addr, vec![device("plc", addr, 1, vec![bit])]);
        assert_eq!(good(&run.next().await, "b3"), Value::Bool(false));
        take_functions(&sim, 1);
        assert_eq!(
            run.write("plc", "b3", Value::Bool(true)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 5, 1), vec![0b1010_0000_0000_1001]);
        // Read, write the whole register, read back.
        assert_eq!(take_functions(&sim, 1), vec![3, 6, 3]);
        // The PLC changes another bit meanwhile; clearing ours keeps it.
        sim.with(1, |u| u.holding.insert(5, 0b1010_0000_0100_1001));
        assert_eq!(
            run.write("plc", "b3", Value::Bool(false)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(holding(&sim, 1, 5, 1), vec![0b1010_0000_0100_0001]);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn refused_writes_send_nothing() {
        let sim = Sim::default();
        sim.with(1, |_| {});
        let (addr, server) = serve(local(), sim.clone()).await;
        let tags = vec![
            tag("ro", Table::HoldingRegister, 0, DataType::UInt16),
            writable("input", Table::InputRegister, 0, DataType::UInt16),
            writable("di", Table::DiscreteInput, 0, DataType::Bool),
            writable("small", Table::HoldingRegister, 1, DataType::Int16),
        ];
        let mut run = Running::start(addr, vec![device("plc", addr, 1, tags)]);
        run.next().await;
        take_functions(&sim, 1);
        let not_writable = |r: Result<WriteOutcome, WriteError>| {
            assert!(matches!(r, Err(WriteError::NotWritable { .. })), "{r:?}")
        };
        not_writable(run.write("plc", "ro", Value::UInt(1)).await);
        not_writable(run.write("plc", "input", Value::UInt(1)).await);
        not_writable(run.write("plc", "di", Value::Bool(true)).await);
        let r = run.write("plc", "small", Value::Int(70_000)).await;
        assert!(matches!(r, Err(WriteError::Encode(_))), "{r:?}");
        let r = run.write("plc", "small", Value::Str("x".into())).await;
        assert!(matches!(r, Err(WriteError::Encode(_))), "{r:?}");
        let r = run.write("plc", "nope", Value::Int(1)).await;
        assert!(matches!(r, Err(WriteError::UnknownTag { .. })), "{r:?}");
        let r = run.write("other", "small", Value::Int(1)).await;
        assert!(matches!(r, Err(WriteError::UnknownDevice(_))), "{r:?}");
        assert_eq!(writes_of(&take_functions(&sim, 1)), Vec::<u8>::new());
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn write_exceptions_and_mismatches_are_reported() {
        let sim = Sim::default();
        sim.with(1, |_| {});
        let (addr, server) = serve(local(), sim.clone()).await;
        let tags = vec![
            writable("r", Table::HoldingRegister, 0, DataType::UInt32),
            writable("c", Table::Coil, 0, DataType::Bool),
        ];
        let mut run = Running::start(addr, vec![device("plc", addr, 1, tags)]);
        run.next().await;
        // The device refuses: the exception is reported, the link is kept.
        sim.with(1, |u| u.write_exception = Some(4));
        assert_eq!(
            run.write("plc", "r", Value::UInt(7)).await,
            Err(WriteError::Exception(4))
        );
        assert_eq!(
            run.write("plc", "c", Value::Bool(true)).await,
            Err(WriteError::Exception(4))
        );
        // The device acknowledges but ignores the write: the read-back catches it.
        sim.with(1, |u| {
            u.write_exception = None;
            u.ignore_writes = true;
            u.holding.insert(1, 9);
        });
        assert_eq!(
            run.write("plc", "r", Value::UInt(0x0001_0002)).await,
            Err(WriteError::Mismatch {
                wrote: vec![1, 2],
                read: vec![0, 9]
            })
        );
        assert_eq!(
            run.write("plc", "c", Value::Bool(true)).await,
            Err(WriteError::Mismatch {
                wrote: vec![1],
                read: vec![0]
            })
        );
        // Polling carried on throughout.
        let r = run.next().await;
        assert_eq!(good(&r, "r"), Value::UInt(9));
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn devices_without_single_writes_get_functions_15_and_16() {
        let sim = Sim::default();
        sim.with(1, |u| u.no_single_writes = true);
        let (addr, server) = serve(local(), sim.clone()).await;
        let mut wo = writable("wo", Table::HoldingRegister, 1, DataType::UInt16);
        wo.access = Access::Write;
        let tags = vec![
            writable("r", Table::HoldingRegister, 0, DataType::UInt16),
            writable("c", Table::Coil, 0, DataType::Bool),
            wo,
        ];
        let mut run = Running::start(addr, vec![device("plc", addr, 1, tags)]);
        run.next().await;
        take_functions(&sim, 1);
        assert_eq!(
            run.write("plc", "r", Value::UInt(77)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            run.write("plc", "c", Value::Bool(true)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(writes_of(&take_functions(&sim, 1)), vec![6, 16, 5, 15]);
        assert_eq!(holding(&sim, 1, 0, 1), vec![77]);
        assert_eq!(sim.with(1, |u| u.coils.get(&0).copied()), Some(true));
        // A write-only tag is written, not read back.
        assert_eq!(
            run.write("plc", "wo", Value::UInt(5)).await,
            Ok(WriteOutcome::Written)
        );
        let f = take_functions(&sim, 1);
        assert_eq!(f.iter().filter(|&&f| f == 16).count(), 1, "{f:?}");
        assert_eq!(holding(&sim, 1, 1, 1), vec![5]);
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn writes_to_a_unit_in_backoff_fail_fast() {
        let sim = Sim::default();
        sim.with(2, |u| u.silent = true);
        let (addr, server) = serve(local(), sim.clone()).await;
        let d2 = device(
            "dead",
            addr,
            2,
            vec![writable("x", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start(addr, vec![d2]);
        let r = run.next().await;
        assert_eq!(r.samples[0].quality, Quality::Bad(BadReason::Timeout));
        let started = Instant::now();
        let w = run.write("dead", "x", Value::UInt(1)).await;
        assert!(matches!(w, Err(WriteError::UnitBackingOff { .. })), "{w:?}");
        assert!(started.elapsed() < Duration::from_millis(100));
        run.stop().await;
        server.abort();
    }

    #[tokio::test]
    async fn writes_while_the_link_is_down_fail_fast() {
        // Nothing listens there.
        let addr = {
            let l = std::net::TcpListener::bind(local()).unwrap();
            l.local_addr().unwrap()
        };
        let d = device(
            "plc",
            addr,
            1,
            vec![writable("x", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start(addr, vec![d]);
        let r = run.next().await;
        assert_eq!(r.samples[0].quality, Quality::Bad(BadReason::Disconnected));
        let w = run.write("plc", "x", Value::UInt(1)).await;
        assert_eq!(w, Err(WriteError::Disconnected));
        run.stop().await;
        // The task is gone: writes say so.
        let w = run_write_after_stop().await;
        assert_eq!(w, Err(WriteError::LinkClosed));
    }

    async fn run_write_after_stop() -> Result<WriteOutcome, WriteError> {
        let (tx, _rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let link = LinkSpec::Tcp {
            endpoint: "127.0.0.1:1".into(),
        };
        let (handle, task) = spawn_link_writable(
            options(),
            link,
            vec![],
            tx,
            counting_clock(),
            cancel.clone(),
        );
        cancel.cancel();
        task.await.unwrap();
        handle
            .write(
                &DeviceId::new("plc").unwrap(),
                &PropertyId::new("x").unwrap(),
                Value::UInt(1),
            )
            .await
    }

    // ---- RTU ---------------------------------------------------------------------------

    /// A pseudo-terminal pair joined by socat; killed (by its pid) on drop.
    struct PtyPair {
        child: tokio::process::Child,
        a: String,
        b: String,
    }

    impl PtyPair {
        async fn open() -> Self {
            use tokio::io::AsyncBufReadExt as _;
            let mut child = tokio::process::Command::new("socat")
                .args(["-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"])
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("socat is installed");
            let stderr = child.stderr.take().unwrap();
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut paths = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let line = lines.next_line().await.unwrap().expect("socat output");
                    if let Some(i) = line.find("PTY is ") {
                        paths.push(line[i + 7..].trim().to_owned());
                    }
                    if line.contains("starting data transfer loop") {
                        break;
                    }
                }
            })
            .await
            .expect("socat ready within 5 s");
            // Keep reading its log so socat never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            assert_eq!(paths.len(), 2, "{paths:?}");
            let b = paths.pop().unwrap();
            let a = paths.pop().unwrap();
            PtyPair { child, a, b }
        }

        async fn close(mut self) {
            let _ = self.child.kill().await;
        }
    }

    fn rtu_link(path: &str) -> LinkSpec {
        LinkSpec::Rtu {
            path: path.to_owned(),
            baud: 19_200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
            inter_frame_delay: Duration::from_millis(2),
        }
    }

    fn serve_rtu(path: &str, sim: Sim) -> JoinHandle<()> {
        let serial = tokio_serial::SerialStream::open(&tokio_serial::new(path, 19_200)).unwrap();
        tokio::spawn(async move {
            let _ = tokio_modbus::server::rtu::Server::new(serial)
                .serve_forever(sim)
                .await;
        })
    }

    /// Serves `sim` as RTU frames over TCP; counts the connections accepted.
    async fn serve_rtu_over_tcp(sim: Sim) -> (SocketAddr, JoinHandle<()>, Arc<AtomicU64>) {
        use tokio_modbus::server::rtu_over_tcp::{Server as RtuServer, accept_tcp_connection};
        let listener = TcpListener::bind(local()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        let server = RtuServer::new(listener);
        let task = tokio::spawn(async move {
            let on_connected = |stream, socket_addr| {
                let sim = sim.clone();
                count.fetch_add(1, Ordering::SeqCst);
                async move { accept_tcp_connection(stream, socket_addr, move |_| Ok(Some(sim.clone()))) }
            };
            let _ = server.serve(&on_connected, |_err| {}).await;
        });
        (addr, task, accepted)
    }

    fn connects(text: &str, link: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(transport::CONNECTS_TOTAL) && l.contains(link))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no connect count for {link} in {text}"))
    }

    /// Two units on one bus: both decode; then one goes silent and only it times out and
    /// backs off while the other keeps its cycle, on the same (never reset) link.
    async fn two_units_one_silent(link: LinkSpec, sim: Sim) -> String {
        sim.with(1, |u| {
            u.holding.insert(0, 0x4049);
            u.holding.insert(1, 0x0FDB);
            u.coils.insert(2, true);
        });
        sim.with(2, |u| {
            u.input.insert(7, 0xFFFF);
        });
        let d1 = device_on(
            link.clone(),
            "one",
            1,
            vec![
                writable("pi", Table::HoldingRegister, 0, DataType::Float32),
                tag("c", Table::Coil, 2, DataType::Bool),
                writable("w", Table::HoldingRegister, 10, DataType::Float64),
            ],
        );
        let d2 = device_on(
            link.clone(),
            "two",
            2,
            vec![tag("neg", Table::InputRegister, 7, DataType::Int16)],
        );
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics_handle = recorder.handle();
        let mut run = metrics::with_local_recorder(&recorder, || {
            Running::start_on(link.clone(), vec![d1, d2])
        });
        let r = run.next_of("one").await;
        match good(&r, "pi") {
            Value::Float(f) => assert!((f - std::f64::consts::PI).abs() < 1e-6, "{f}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(good(&r, "c"), Value::Bool(true));
        assert_eq!(good(&run.next_of("two").await, "neg"), Value::Int(-1));

        // A verified multi-register write over this transport.
        let v = 6.02214076e23f64;
        assert_eq!(
            run.write("one", "w", Value::Float(v)).await,
            Ok(WriteOutcome::Verified)
        );
        assert_eq!(
            holding(&sim, 1, 10, 4),
            wire(&v.to_be_bytes(), ByteOrder::Abcd)
        );

        sim.with(2, |u| u.silent = true);
        let started = Instant::now();
        let (mut ones, mut twos) = (0, 0);
        while started.elapsed() < Duration::from_millis(1500) {
            let r = run.next().await;
            if r.device.as_str() == "one" {
                assert_eq!(good(&r, "c"), Value::Bool(true));
                ones += 1;
            } else if r.samples[0].quality != Quality::Good {
                assert_eq!(r.samples[0].quality, Quality::Bad(BadReason::Timeout));
                twos += 1;
            }
        }
        assert!(ones >= 7, "unit 1 starved: {ones} cycles");
        assert!((1..=4).contains(&twos), "unit 2 probed {twos} times");
        // It comes back on the same link.
        sim.with(2, |u| u.silent = false);
        loop {
            let r = run.next_of("two").await;
            if r.samples[0].quality == Quality::Good {
                break;
            }
        }
        run.stop().await;
        let text = metrics_handle.render();
        assert_eq!(connects(&text, &link.key()), 1.0, "the link was reset");
        text
    }

    #[tokio::test]
    async fn rtu_over_a_pty_pair_isolates_a_silent_unit_without_resetting_the_bus() {
        let pty = PtyPair::open().await;
        let sim = Sim::default();
        let server = serve_rtu(&pty.b, sim.clone());
        two_units_one_silent(rtu_link(&pty.a), sim).await;
        server.abort();
        pty.close().await;
    }

    #[tokio::test]
    async fn rtu_over_tcp_isolates_a_silent_unit_on_one_connection() {
        let sim = Sim::default();
        let (addr, server, accepted) = serve_rtu_over_tcp(sim.clone()).await;
        let link = LinkSpec::RtuOverTcp {
            endpoint: addr.to_string(),
        };
        two_units_one_silent(link, sim).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        server.abort();
    }

    #[tokio::test]
    async fn rtu_late_answers_never_become_another_units_values() {
        let pty = PtyPair::open().await;
        let sim = Sim::default();
        sim.with(1, |u| {
            u.holding.insert(0, 111);
        });
        sim.with(3, |u| {
            u.holding.insert(0, 333);
            // Answers 150 ms after its 200 ms timeout.
            u.delay = Some(Duration::from_millis(350));
        });
        let server = serve_rtu(&pty.b, sim.clone());
        let link = rtu_link(&pty.a);
        let d1 = device_on(
            link.clone(),
            "one",
            1,
            vec![tag("v", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let d3 = device_on(
            link.clone(),
            "late",
            3,
            vec![tag("v", Table::HoldingRegister, 0, DataType::UInt16)],
        );
        let mut run = Running::start_on(link, vec![d1, d3]);
        let started = Instant::now();
        let (mut good_ones, mut bad_ones) = (0, 0);
        while started.elapsed() < Duration::from_millis(2000) {
            let r = run.next().await;
            let s = &r.samples[0];
            match r.device.as_str() {
                "one" if s.quality == Quality::Good => {
                    assert_eq!(
                        s.value,
                        Some(Value::UInt(111)),
                        "unit 1 got another unit's answer"
                    );
                    good_ones += 1;
                }
                "one" => bad_ones += 1,
                _ => {
                    // Always too late: its answer must never be accepted.
                    assert_eq!(s.quality, Quality::Bad(BadReason::Timeout), "{s:?}");
                }
            }
        }
        assert!(good_ones >= 8, "unit 1: {good_ones} good, {bad_ones} bad");
        assert!(bad_ones <= 2, "unit 1: {good_ones} good, {bad_ones} bad");
        run.stop().await;
        server.abort();
        pty.close().await;
    }
}
