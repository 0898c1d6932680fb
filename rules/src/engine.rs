//! The engine: rules evaluated over accepted twin changes, in the quinn-proto shape.
//!
//! Calling order: [`Engine::load`] a rule set (validated completely before it replaces the
//! old one); then for every accepted change [`Engine::handle_change`], and whenever
//! [`Engine::poll_timeout`] comes due [`Engine::handle_timeout`]; after either, drain
//! [`Engine::poll_output`]. Time is always the caller's `now` (ms since the Unix epoch).
//!
//! Invariants:
//! - A rule is triggered by a change of a property it reads (anywhere: `SELECT`, `WHERE`,
//!   `HAVING`, a join's `ON`, an `OVER` clause); changes of other properties do not evaluate
//!   it. `SELECT *` and `had_changed(.., *)` read every property. A change of a table does
//!   not evaluate anything.
//! - Rows see the device's latest value of every column (a property not read yet is null).
//! - A rule that fails at run time (division by zero, a bad value) counts an error for that
//!   evaluation and produces nothing for it; no other rule is affected.
//! - A window rule applies `WHERE` before the window; its output is evaluated when a window
//!   closes. Time windows close on [`Engine::handle_timeout`], count and sliding windows on the
//!   row that completes them. An empty window produces nothing.
//! - An alarm rule raises an alarm per device once its condition (a row passing `WHERE`, or a
//!   window passing `HAVING`) has held for `for`; a later evaluation that does not pass starts
//!   the `keep_firing_for` countdown, after which the alarm clears. Active alarms can be taken
//!   out ([`Engine::active_alarms`]) and put back after a restart ([`Engine::restore_alarms`])
//!   without being raised again.
//! - A row is evaluated in this order: the analytic functions (every call site, once per row;
//!   see [`crate::analytic`]), the table join (zero, one or several rows; see
//!   [`crate::plan`]), `WHERE` on each joined row, then `SELECT` for each passing one (one
//!   record each) or, for a window rule, the window. For an alarm rule the evaluation passes
//!   when any joined row passes, and the alarm carries the first passing row's fields. The
//!   join reads the table as it is when the row arrives ([`Engine::set_table`] replaces it;
//!   a window keeps the joined rows it holds).
//! - Heartbeat (an edgesync extension; eKuiper has none): a record rule with
//!   [`RuleDef::heartbeat_ms`] repeats its last output for a device when it has produced
//!   nothing for that device for that long: report on change (`WHERE deadband(temp, 0.5)`)
//!   with a floor (at least once a minute). The repeat is the last evaluation's records
//!   (all of them when a join produced several), with `heartbeat: true` and the time of the
//!   repeat; it is due `heartbeat_ms` after the last output (real or repeated) at
//!   [`Engine::poll_timeout`], so an idle device is repeated every `heartbeat_ms` forever.
//!   Nothing is repeated before the first output, or after a `WHERE` stops passing unless
//!   by the repeat itself: the last record stands until a new one replaces it. A window
//!   rule's outputs are repeated the same way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use crate::aggregate::Accumulator;
use crate::analytic;
use crate::functions::Ctx;
use crate::plan::{self, Catalog, JoinKind, LoadError, Plan, Scope, Source};
use crate::rule::{AlarmDef, RuleDef};
use crate::table::Table;
use crate::value::{self, Value};
use crate::window::{Closed, Windows};

/// What the rules produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A rule's output row.
    Record {
        /// The rule.
        rule: Arc<str>,
        /// The device the row belongs to.
        device: Arc<str>,
        /// When, ms.
        ts_ms: u64,
        /// Output fields, in `SELECT` order.
        fields: Vec<(Arc<str>, Value)>,
        /// A heartbeat's repeat of the last record (see the module docs).
        heartbeat: bool,
    },
    /// An alarm was raised.
    Raised(Alarm),
    /// An alarm was cleared (`cleared_ms` set).
    Cleared(Alarm),
}

/// An alarm of one rule on one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    /// The rule.
    pub rule: Arc<str>,
    /// The device.
    pub device: Arc<str>,
    /// Severity.
    pub severity: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When the condition started to hold, ms.
    pub since_ms: u64,
    /// When the alarm was raised, ms.
    pub raised_ms: u64,
    /// When it was cleared, ms.
    pub cleared_ms: Option<u64>,
    /// The output fields of the evaluation that raised it.
    pub fields: Vec<(Arc<str>, Value)>,
}

/// Counters of one rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Evaluations triggered (changes of properties it reads).
    pub events_in: u64,
    /// Outputs produced (records and alarm transitions).
    pub events_out: u64,
    /// Evaluations that failed at run time.
    pub errors: u64,
    /// Records repeated by the heartbeat (also counted in `events_out`).
    pub heartbeats: u64,
    /// Time spent evaluating its triggered changes, in the meter's unit (nanoseconds for the
    /// agent's); 0 without a meter ([`Engine::set_meter`]).
    pub eval_ns: u64,
}

/// A monotonic counter of nanoseconds, injected: the engine reads no clock of its own.
pub type Meter = Box<dyn Fn() -> u64 + Send>;

#[derive(Debug, Clone, PartialEq)]
enum AlarmState {
    Pending { since: u64 },
    Firing(Alarm),
    Resolving { alarm: Alarm, since: u64 },
}

/// A row held by a window: its device and its values (see [`Scope::row`]).
type WindowRow = (Arc<str>, CompactRow);

/// What a window keeps of a row: the slots its output reads outside aggregates
/// ([`Plan::bare`]), and the argument values of the aggregates the row enters.
#[derive(Debug, Clone)]
struct CompactRow {
    bare: Vec<Value>,
    aggs: Vec<(u32, Value)>,
}

/// One output's fields.
type Fields = Vec<(Arc<str>, Value)>;

/// A rule's join, resolved against the table's current rows.
struct JoinState {
    table: Arc<Table>,
    /// The table index of each of the plan's table columns.
    columns: Vec<Option<usize>>,
    /// Key (the `ON` columns' values) → matching rows, in table order.
    index: HashMap<String, Vec<usize>>,
}

impl JoinState {
    fn new(join: &plan::Join, table: Arc<Table>) -> JoinState {
        let columns: Vec<Option<usize>> = join.columns.iter().map(|c| table.column(c)).collect();
        let key_cols: Vec<Option<usize>> = join
            .keys
            .iter()
            .map(|(_, k)| columns.get(*k).copied().flatten())
            .collect();
        let mut index: HashMap<String, Vec<usize>> = HashMap::new();
        for (r, row) in table.rows().iter().enumerate() {
            let values: Vec<Value> = key_cols
                .iter()
                .map(|c| c.and_then(|c| row.get(c)).cloned().unwrap_or(Value::Null))
                .collect();
            if let Some(k) = join_key(&values) {
                index.entry(k).or_default().push(r);
            }
        }
        JoinState {
            table,
            columns,
            index,
        }
    }
}

/// The key of join values; `None` when one cannot match (null, NaN).
fn join_key(values: &[Value]) -> Option<String> {
    let mut key = String::new();
    for v in values {
        match v {
            Value::Null => return None,
            Value::Float(f) if f.is_nan() => return None,
            v => value::push_key(v, &mut key),
        }
    }
    Some(key)
}

/// The heartbeat of one device: when the last records are repeated, and them.
struct Beat {
    due: u64,
    records: Vec<Fields>,
}

struct Compiled {
    def: RuleDef,
    id: Arc<str>,
    plan: Plan,
    /// Per device: the device slot of each of the plan's columns.
    slots: HashMap<Arc<str>, Vec<Option<usize>>>,
    /// Analytic function state.
    analytic: analytic::State,
    /// The joined table.
    join: Option<JoinState>,
    /// Windows: one, or one per device.
    windows: HashMap<Option<Arc<str>>, Windows<WindowRow>>,
    alarms: HashMap<Arc<str>, AlarmState>,
    /// The latest passing fields of a pending alarm (raised with them).
    pending: HashMap<Arc<str>, Fields>,
    /// Heartbeats per device.
    beats: HashMap<Arc<str>, Beat>,
    stats: RuleStats,
}

struct DeviceState {
    name: Arc<str>,
    slots: HashMap<Arc<str>, usize>,
    values: Vec<Value>,
}

/// The rule engine (see the module docs).
pub struct Engine {
    /// The devices and tables given to [`Engine::new`] and [`Engine::set_table`].
    base: Catalog,
    /// `base` plus the memory topics of the loaded rules.
    catalog: Catalog,
    /// Per rule id: the memory topics its records feed.
    feeds: HashMap<Arc<str>, Vec<Arc<str>>>,
    devices: HashMap<Arc<str>, DeviceState>,
    rules: Vec<Compiled>,
    /// (device, slot) → rules that read it.
    triggers: HashMap<(Arc<str>, usize), Vec<usize>>,
    outputs: VecDeque<Output>,
    meter: Option<Meter>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.len())
            .field("devices", &self.devices.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over the devices of `catalog`, with no rules.
    pub fn new(catalog: Catalog) -> Engine {
        let devices = catalog
            .devices()
            .map(|(d, props)| {
                let name: Arc<str> = Arc::from(d);
                let slots = props
                    .iter()
                    .enumerate()
                    .map(|(i, (p, _))| (Arc::from(p.as_str()), i))
                    .collect();
                (
                    name.clone(),
                    DeviceState {
                        name,
                        slots,
                        values: vec![Value::Null; props.len()],
                    },
                )
            })
            .collect();
        Engine {
            base: catalog.clone(),
            catalog,
            feeds: HashMap::new(),
            devices,
            rules: Vec::new(),
            triggers: HashMap::new(),
            outputs: VecDeque::new(),
            meter: None,
        }
    }

    /// Replaces the rule set. Every rule is checked first; on any error nothing changes and
    /// every error is returned. Rules whose definition did not change keep their window and
    /// alarm state.
    pub fn load(&mut self, defs: Vec<RuleDef>) -> Result<(), Vec<LoadError>> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut pending = Vec::with_capacity(defs.len());
        for def in defs {
            if !seen.insert(def.id.clone()) {
                errors.push(LoadError {
                    rule: def.id.clone(),
                    line: 0,
                    column: 0,
                    message: "another rule has the same id".into(),
                });
                continue;
            }
            for a in &def.actions {
                if let crate::rule::Action::Memory { topic } = a
                    && !valid_topic(topic)
                {
                    errors.push(LoadError {
                        rule: def.id.clone(),
                        line: 0,
                        column: 0,
                        message: format!(
                            "memory topic {topic:?}: 1-128 letters, digits, '-' or '_'"
                        ),
                    });
                }
            }
            pending.push(def);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let (plans, catalog) = plan_with_memory(pending, &self.base)?;
        // Device states for the memory topics (kept when their columns did not change).
        for (name, props) in catalog.devices() {
            let same = self.devices.get(name).is_some_and(|ds| {
                ds.slots.len() == props.len()
                    && props.iter().all(|(p, _)| ds.slots.contains_key(p.as_str()))
            });
            if !same {
                let st = device_state(name, props);
                self.devices.insert(st.name.clone(), st);
            }
        }
        self.devices
            .retain(|name, _| catalog.device(name).is_some());
        self.catalog = catalog;
        self.feeds = plans
            .iter()
            .filter_map(|(def, _)| {
                let topics: Vec<Arc<str>> = def
                    .actions
                    .iter()
                    .filter_map(|a| match a {
                        crate::rule::Action::Memory { topic } => {
                            Some(Arc::from(memory_device(topic).as_str()))
                        }
                        _ => None,
                    })
                    .collect();
                (!topics.is_empty()).then(|| (Arc::from(def.id.as_str()), topics))
            })
            .collect();
        let mut old: HashMap<String, Compiled> = self
            .rules
            .drain(..)
            .map(|c| (c.def.id.clone(), c))
            .collect();
        for (def, plan) in plans {
            match old.remove(&def.id) {
                Some(c) if c.def == def => self.rules.push(c),
                _ => {
                    let c = self.compile(def, plan);
                    self.rules.push(c);
                }
            }
        }
        self.index();
        Ok(())
    }

    fn compile(&self, def: RuleDef, plan: Plan) -> Compiled {
        let mut slots = HashMap::new();
        for dev in self.devices.values() {
            if let Source::Device(d) = &plan.source
                && **d != *dev.name
            {
                continue;
            }
            let map: Vec<Option<usize>> = plan
                .columns
                .iter()
                .map(|c| dev.slots.get(c).copied())
                .collect();
            if plan.star || map.iter().any(Option::is_some) {
                slots.insert(dev.name.clone(), map);
            }
        }
        let join = plan.join.as_ref().and_then(|j| {
            self.catalog
                .table(&j.table)
                .map(|t| JoinState::new(j, t.clone()))
        });
        Compiled {
            id: Arc::from(def.id.as_str()),
            def,
            plan,
            slots,
            analytic: analytic::State::default(),
            join,
            windows: HashMap::new(),
            alarms: HashMap::new(),
            pending: HashMap::new(),
            beats: HashMap::new(),
            stats: RuleStats::default(),
        }
    }

    /// Adds lookup table `name`, or replaces its rows (and columns). Every loaded rule must
    /// still load against the new table: that is checked first, and on any error nothing
    /// changes and every error is returned. Rules keep their state (windows, alarms,
    /// analytic functions); rows arriving from now on join the new rows.
    pub fn set_table(&mut self, name: &str, table: Table) -> Result<(), Vec<LoadError>> {
        let mut catalog = self.catalog.clone();
        let kept = table.clone();
        catalog.add_table(name, table);
        let mut plans = Vec::with_capacity(self.rules.len());
        let mut errors = Vec::new();
        for r in &self.rules {
            match plan::plan(&r.def.id, &r.def.sql, &catalog) {
                Ok(p) => plans.push(p),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.catalog = catalog;
        self.base.add_table(name, kept);
        for (r, p) in self.rules.iter_mut().zip(plans) {
            // Same SQL, same devices: the same columns and call sites, so the rule's state
            // still fits; only the table's columns may have moved.
            r.join = p.join.as_ref().and_then(|j| {
                self.catalog
                    .table(&j.table)
                    .map(|t| JoinState::new(j, t.clone()))
            });
            r.plan = p;
        }
        Ok(())
    }

    fn index(&mut self) {
        self.triggers.clear();
        for (ri, r) in self.rules.iter().enumerate() {
            for (dev, map) in &r.slots {
                let Some(ds) = self.devices.get(dev) else {
                    continue;
                };
                let read: Vec<usize> = if r.plan.star {
                    (0..ds.values.len()).collect()
                } else {
                    map.iter().flatten().copied().collect()
                };
                for slot in read {
                    self.triggers
                        .entry((dev.clone(), slot))
                        .or_default()
                        .push(ri);
                }
            }
        }
    }

    /// An accepted change of `device`.`property` at `now_ms`.
    pub fn handle_change(&mut self, now_ms: u64, device: &str, property: &str, value: Value) {
        let Some(ds) = self.devices.get_mut(device) else {
            return;
        };
        let Some(&slot) = ds.slots.get(property) else {
            return;
        };
        if let Some(v) = ds.values.get_mut(slot) {
            *v = value;
        }
        let name = ds.name.clone();
        let Some(rules) = self.triggers.get(&(name.clone(), slot)).cloned() else {
            return;
        };
        let ctx = Ctx { now_ms };
        let first = self.outputs.len();
        for ri in rules {
            let (Some(rule), Some(ds)) = (self.rules.get_mut(ri), self.devices.get(&name)) else {
                continue;
            };
            rule.stats.events_in += 1;
            let started = self.meter.as_ref().map(|m| m());
            evaluate_row(rule, ds, Changed::Slot(slot), &ctx, &mut self.outputs);
            if let (Some(m), Some(t0)) = (&self.meter, started) {
                rule.stats.eval_ns = rule.stats.eval_ns.saturating_add(m().saturating_sub(t0));
            }
        }
        self.feed_memory(first, &ctx);
    }

    /// Feeds the records produced since output `from` (and those they produce in turn) to
    /// the rules that read their memory topics; at most [`MAX_MEMORY_FEEDS`] per call.
    fn feed_memory(&mut self, from: usize, ctx: &Ctx) {
        if self.feeds.is_empty() {
            return;
        }
        let mut i = from;
        let mut fed = 0usize;
        while let Some(out) = self.outputs.get(i) {
            i += 1;
            let Output::Record { rule, fields, .. } = out else {
                continue;
            };
            let Some(topics) = self.feeds.get(rule).cloned() else {
                continue;
            };
            let fields = fields.clone();
            for topic in topics {
                fed += 1;
                if fed > MAX_MEMORY_FEEDS {
                    return;
                }
                self.handle_record(ctx, &topic, &fields);
            }
        }
    }

    /// A record on a memory topic: its fields are the topic's columns; each rule reading any
    /// of them is evaluated once.
    fn handle_record(&mut self, ctx: &Ctx, device: &Arc<str>, fields: &[(Arc<str>, Value)]) {
        let Some(ds) = self.devices.get_mut(device) else {
            return;
        };
        let mut slots = Vec::with_capacity(fields.len());
        for (name, v) in fields {
            if let Some(&slot) = ds.slots.get(name)
                && let Some(cell) = ds.values.get_mut(slot)
            {
                *cell = v.clone();
                slots.push(slot);
            }
        }
        let mut rules: Vec<usize> = slots
            .iter()
            .filter_map(|s| self.triggers.get(&(device.clone(), *s)))
            .flatten()
            .copied()
            .collect();
        rules.sort_unstable();
        rules.dedup();
        for ri in rules {
            let (Some(rule), Some(ds)) = (self.rules.get_mut(ri), self.devices.get(device)) else {
                continue;
            };
            rule.stats.events_in += 1;
            evaluate_row(rule, ds, Changed::All, ctx, &mut self.outputs);
        }
    }

    /// Time advanced to `now_ms`: time windows close, alarm timers fire, heartbeats repeat.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let ctx = Ctx { now_ms };
        let first = self.outputs.len();
        for rule in &mut self.rules {
            let keys: Vec<Option<Arc<str>>> = rule.windows.keys().cloned().collect();
            for k in keys {
                let closed = match rule.windows.get_mut(&k) {
                    Some(w) => w.handle_timeout(now_ms),
                    None => continue,
                };
                for c in closed {
                    emit_window(rule, &ctx, c, &mut self.outputs);
                }
            }
            alarm_timers(rule, now_ms, &mut self.outputs);
            heartbeats(rule, now_ms, &mut self.outputs);
        }
        self.feed_memory(first, &ctx);
    }

    /// Measures each rule's evaluation time with `meter` ([`RuleStats::eval_ns`]).
    pub fn set_meter(&mut self, meter: Meter) {
        self.meter = Some(meter);
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Engine::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut take = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        for r in &self.rules {
            for w in r.windows.values() {
                if let Some(t) = w.poll_timeout() {
                    take(t);
                }
            }
            if let Some(a) = &r.def.alarm {
                for s in r.alarms.values() {
                    match s {
                        AlarmState::Pending { since } => take(since.saturating_add(a.for_ms)),
                        AlarmState::Resolving { since, .. } => {
                            take(since.saturating_add(a.keep_firing_for_ms))
                        }
                        AlarmState::Firing(_) => {}
                    }
                }
            }
            for b in r.beats.values() {
                take(b.due);
            }
        }
        next
    }

    /// Each rule's id, definition and counters.
    pub fn rules(&self) -> impl Iterator<Item = (&RuleDef, RuleStats)> {
        self.rules.iter().map(|r| (&r.def, r.stats))
    }

    /// The alarms currently raised (firing, or waiting out `keep_firing_for`).
    pub fn active_alarms(&self) -> Vec<Alarm> {
        let mut out = Vec::new();
        for r in &self.rules {
            for s in r.alarms.values() {
                match s {
                    AlarmState::Firing(a) | AlarmState::Resolving { alarm: a, .. } => {
                        out.push(a.clone())
                    }
                    AlarmState::Pending { .. } => {}
                }
            }
        }
        out
    }

    /// Puts back alarms that were active before a restart (of rules that still exist and
    /// are still alarms): they are not raised again, and clear as usual.
    pub fn restore_alarms(&mut self, alarms: Vec<Alarm>) {
        for a in alarms {
            if let Some(r) = self
                .rules
                .iter_mut()
                .find(|r| *r.id == *a.rule && r.def.alarm.is_some())
            {
                r.alarms.insert(a.device.clone(), AlarmState::Firing(a));
            }
        }
    }
}

fn row_for(rule: &Compiled, ds: &DeviceState) -> Vec<Value> {
    match rule.slots.get(&ds.name) {
        Some(map) => map
            .iter()
            .map(|s| {
                s.and_then(|i| ds.values.get(i).cloned())
                    .unwrap_or(Value::Null)
            })
            .collect(),
        None => vec![Value::Null; rule.plan.columns.len()],
    }
}

/// Most records fed to memory topics per change or timeout (a bound against runaway chains;
/// cycles are refused when rules load).
pub const MAX_MEMORY_FEEDS: usize = 10_000;

/// The source name of a memory topic: `FROM memory.<topic>`.
pub fn memory_device(topic: &str) -> String {
    format!("memory.{topic}")
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn device_state(name: &str, props: &[(String, crate::plan::ColType)]) -> DeviceState {
    DeviceState {
        slots: props
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (Arc::from(p.as_str()), i))
            .collect(),
        values: vec![Value::Null; props.len()],
        name: Arc::from(name),
    }
}

/// Rules with their plans.
type Planned = Vec<(RuleDef, Plan)>;

/// Plans `defs` against `base` plus their memory topics. A topic's columns are the output
/// fields of the rules that feed it, so those are planned first: a rule reading a topic waits
/// until every rule feeding it is planned. Rules that can never be planned (the topics form a
/// cycle) are errors.
fn plan_with_memory(
    defs: Vec<RuleDef>,
    base: &Catalog,
) -> Result<(Planned, Catalog), Vec<LoadError>> {
    let topics_of = |def: &RuleDef| -> Vec<String> {
        def.actions
            .iter()
            .filter_map(|a| match a {
                crate::rule::Action::Memory { topic } => Some(memory_device(topic)),
                _ => None,
            })
            .collect()
    };
    let mut catalog = base.clone();
    // Per topic: its columns so far, and how many feeding rules are not planned yet.
    let mut open: BTreeMap<String, (Vec<String>, usize)> = BTreeMap::new();
    for def in &defs {
        for t in topics_of(def) {
            open.entry(t).or_default().1 += 1;
        }
    }
    let mut planned = Vec::with_capacity(defs.len());
    let mut errors = Vec::new();
    let mut pending = defs;
    loop {
        let mut waiting = Vec::new();
        let mut progress = false;
        for def in pending {
            match plan::plan(&def.id, &def.sql, &catalog) {
                Ok(p) => {
                    progress = true;
                    let names: Vec<String> = if p.star {
                        p.columns.iter().map(|c| c.to_string()).collect()
                    } else {
                        p.fields.iter().map(|(n, _)| n.to_string()).collect()
                    };
                    for t in topics_of(&def) {
                        if let Some((cols, left)) = open.get_mut(&t) {
                            for n in &names {
                                if !cols.contains(n) {
                                    cols.push(n.clone());
                                }
                            }
                            *left = left.saturating_sub(1);
                            if *left == 0 {
                                let props = cols
                                    .iter()
                                    .map(|c| (c.clone(), crate::plan::ColType::Any))
                                    .collect();
                                catalog.add_device(&t, props);
                            }
                        }
                    }
                    planned.push((def, p));
                }
                Err(e) => {
                    let waits = open.iter().any(|(t, (_, left))| {
                        *left > 0 && e.message == format!("unknown device {t:?}")
                    });
                    if waits {
                        waiting.push((def, e));
                    } else {
                        errors.push(e);
                    }
                }
            }
        }
        if waiting.is_empty() {
            break;
        }
        if !progress {
            for (_, mut e) in waiting {
                e.message = format!(
                    "{}: the rules feeding that memory topic read it themselves (a cycle) or do not load",
                    e.message
                );
                errors.push(e);
            }
            break;
        }
        pending = waiting.into_iter().map(|(d, _)| d).collect();
    }
    if errors.is_empty() {
        Ok((planned, catalog))
    } else {
        Err(errors)
    }
}

/// What a window keeps of `row`, which came from a change of the rule's column `changed`.
fn compact(
    plan: &Plan,
    row: &[Value],
    device: &str,
    changed: Option<usize>,
    all_changed: bool,
    ctx: &Ctx,
) -> Result<CompactRow, String> {
    let bare = plan
        .bare
        .iter()
        .map(|&i| row.get(i).cloned().unwrap_or(Value::Null))
        .collect();
    let mut aggs = Vec::new();
    for (k, site) in plan.aggs.iter().enumerate() {
        let enters = all_changed
            || site.reads.is_empty()
            || changed.is_some_and(|c| site.reads.contains(&c));
        if !enters {
            continue;
        }
        let v = match &site.arg {
            // count(*): every row counts.
            None => Value::Bool(true),
            Some(arg) => {
                let mut scope = Scope {
                    row,
                    layout: plan.layout(),
                    device,
                    ctx,
                    window: None,
                };
                plan::eval(arg, &mut scope)?
            }
        };
        aggs.push((u32::try_from(k).unwrap_or(u32::MAX), v));
    }
    Ok(CompactRow { bare, aggs })
}

/// What changed to trigger an evaluation.
#[derive(Debug, Clone, Copy)]
enum Changed {
    /// One property of a device (its slot).
    Slot(usize),
    /// Every field (a record on a memory topic).
    All,
}

fn evaluate_row(
    rule: &mut Compiled,
    ds: &DeviceState,
    changed_slot: Changed,
    ctx: &Ctx,
    out: &mut VecDeque<Output>,
) {
    let mut row = row_for(rule, ds);
    let layout = rule.plan.layout();
    let by_device = rule.plan.partition_by_device();
    if rule
        .analytic
        .evaluate(
            &rule.plan.analytics,
            layout,
            &mut row,
            &ds.name,
            ctx,
            by_device,
        )
        .is_err()
    {
        rule.stats.errors += 1;
        return;
    }
    let rows = match joined(rule, row, &ds.name, ctx) {
        Ok(rows) => rows,
        Err(_) => {
            rule.stats.errors += 1;
            return;
        }
    };
    let mut passing = Vec::with_capacity(rows.len());
    for row in rows {
        let pass = match &rule.plan.filter {
            None => Ok(true),
            Some(f) => {
                let mut scope = Scope {
                    row: &row,
                    layout,
                    device: &ds.name,
                    ctx,
                    window: None,
                };
                plan::eval(f, &mut scope).map(|v| v.is_true())
            }
        };
        match pass {
            Ok(true) => passing.push(row),
            Ok(false) => {}
            Err(_) => {
                rule.stats.errors += 1;
                return;
            }
        }
    }
    if rule.plan.window.is_some() {
        let key = rule.plan.per_device.then(|| ds.name.clone());
        // The rule's column that changed (aggregates take values from changes of what they
        // read).
        let (changed, all) = match changed_slot {
            Changed::Slot(slot) => (
                rule.slots
                    .get(&ds.name)
                    .and_then(|m| m.iter().position(|s| *s == Some(slot))),
                false,
            ),
            Changed::All => (None, true),
        };
        for row in passing {
            let row = match compact(&rule.plan, &row, &ds.name, changed, all, ctx) {
                Ok(r) => r,
                Err(_) => {
                    rule.stats.errors += 1;
                    return;
                }
            };
            let spec = rule.plan.window.clone();
            let w = rule.windows.entry(key.clone()).or_insert_with(|| {
                Windows::new(spec.unwrap_or(crate::window::WindowSpec::Count {
                    count: 1,
                    hop: None,
                }))
            });
            let closed = w.handle_row(ctx.now_ms, (ds.name.clone(), row));
            for c in closed {
                emit_window(rule, ctx, c, out);
            }
        }
        return;
    }
    // An alarm needs the first passing row only.
    if rule.def.alarm.is_some() {
        passing.truncate(1);
    }
    let mut records = Vec::with_capacity(passing.len());
    for row in &passing {
        match project(rule, row, ds, ctx) {
            Ok(f) => records.push(f),
            Err(_) => {
                rule.stats.errors += 1;
                return;
            }
        }
    }
    conclude(rule, ds.name.clone(), ctx.now_ms, records, out);
}

/// The row joined with the table: itself without a join, else one row per matching table
/// row (or, for a left join without a match, one with null table columns).
fn joined(
    rule: &Compiled,
    mut row: Vec<Value>,
    device: &str,
    ctx: &Ctx,
) -> Result<Vec<Vec<Value>>, String> {
    let Some(join) = &rule.plan.join else {
        return Ok(vec![row]);
    };
    let Some(state) = &rule.join else {
        return Err(format!("table {:?} missing", join.table));
    };
    let mut values = Vec::with_capacity(join.keys.len());
    {
        let mut scope = Scope {
            row: &row,
            layout: rule.plan.layout(),
            device,
            ctx,
            window: None,
        };
        for (e, _) in &join.keys {
            values.push(plan::eval(e, &mut scope)?);
        }
    }
    let matches: &[usize] = join_key(&values)
        .and_then(|k| state.index.get(&k))
        .map_or(&[], Vec::as_slice);
    if matches.is_empty() {
        return Ok(match join.kind {
            JoinKind::Inner => Vec::new(),
            JoinKind::Left => {
                row.extend(std::iter::repeat_n(Value::Null, state.columns.len()));
                vec![row]
            }
        });
    }
    let rows = state.table.rows();
    Ok(matches
        .iter()
        .map(|&m| {
            let mut r = row.clone();
            r.extend(state.columns.iter().map(|c| {
                c.and_then(|c| rows.get(m).and_then(|t| t.get(c)))
                    .cloned()
                    .unwrap_or(Value::Null)
            }));
            r
        })
        .collect())
}

fn project(rule: &Compiled, row: &[Value], ds: &DeviceState, ctx: &Ctx) -> Result<Fields, String> {
    let layout = rule.plan.layout();
    if rule.plan.star {
        // The device's own properties (with `FROM devices`, the others are not its).
        let own = rule.slots.get(&ds.name);
        let mut fields: Fields = rule
            .plan
            .columns
            .iter()
            .cloned()
            .zip(row.iter().cloned())
            .enumerate()
            .filter(|(i, _)| own.is_none_or(|m| m.get(*i).is_some_and(Option::is_some)))
            .map(|(_, f)| f)
            .collect();
        if let (Some(join), Some(state)) = (&rule.plan.join, &rule.join) {
            // The table's columns, in the table's order.
            let values = row.get(layout.table..).unwrap_or_default();
            let mut table: Vec<(Option<usize>, &Arc<str>, &Value)> = state
                .columns
                .iter()
                .zip(&join.columns)
                .zip(values)
                .map(|((at, name), v)| (*at, name, v))
                .collect();
            table.sort_by_key(|(at, _, _)| *at);
            for (_, name, v) in table {
                if !fields.iter().any(|(n, _)| n == name) {
                    fields.push((name.clone(), v.clone()));
                }
            }
        }
        return Ok(fields);
    }
    let mut scope = Scope {
        row,
        layout,
        device: &ds.name,
        ctx,
        window: None,
    };
    rule.plan
        .fields
        .iter()
        .map(|(n, e)| Ok((n.clone(), plan::eval(e, &mut scope)?)))
        .collect()
}

fn emit_window(rule: &mut Compiled, ctx: &Ctx, c: Closed<WindowRow>, out: &mut VecDeque<Output>) {
    let Some((device, _)) = c.rows.last() else {
        return;
    };
    let device = device.clone();
    // Every aggregate folded in one pass over the rows.
    let mut accs: Vec<Accumulator> = rule
        .plan
        .aggs
        .iter()
        .map(|a| Accumulator::new(a.kind))
        .collect();
    for (_, row) in &c.rows {
        for (k, v) in &row.aggs {
            if let Some(acc) = accs.get_mut(*k as usize)
                && acc.add(v).is_err()
            {
                rule.stats.errors += 1;
                return;
            }
        }
    }
    let results: Vec<Value> = accs.iter().map(Accumulator::result).collect();
    // The last row, as far as the output reads it outside aggregates.
    let layout = rule.plan.layout();
    let width = layout.table + rule.plan.join.as_ref().map_or(0, |j| j.columns.len());
    let mut last = vec![Value::Null; width.max(layout.table)];
    if let Some((_, row)) = c.rows.last() {
        for (&i, v) in rule.plan.bare.iter().zip(&row.bare) {
            if let Some(slot) = last.get_mut(i) {
                *slot = v.clone();
            }
        }
    }
    let mut scope = Scope {
        row: &last,
        layout,
        device: &device,
        ctx,
        window: Some((c.start_ms, c.end_ms, &results)),
    };
    let pass = match &rule.plan.having {
        None => Ok(true),
        Some(h) => plan::eval(h, &mut scope).map(|v| v.is_true()),
    };
    let result = pass.and_then(|pass| {
        if !pass {
            return Ok(Vec::new());
        }
        rule.plan
            .fields
            .iter()
            .map(|(n, e)| Ok((n.clone(), plan::eval(e, &mut scope)?)))
            .collect::<Result<Fields, String>>()
            .map(|f| vec![f])
    });
    match result {
        Ok(records) => conclude(rule, device, ctx.now_ms, records, out),
        Err(_) => rule.stats.errors += 1,
    }
}

/// One evaluation's result: the records of the rows that passed (none: it did not pass).
fn conclude(
    rule: &mut Compiled,
    device: Arc<str>,
    now: u64,
    records: Vec<Fields>,
    out: &mut VecDeque<Output>,
) {
    let Some(alarm) = rule.def.alarm.clone() else {
        if records.is_empty() {
            return;
        }
        for fields in &records {
            rule.stats.events_out += 1;
            out.push_back(Output::Record {
                rule: rule.id.clone(),
                device: device.clone(),
                ts_ms: now,
                fields: fields.clone(),
                heartbeat: false,
            });
        }
        if let Some(every) = rule.def.heartbeat_ms {
            rule.beats.insert(
                device,
                Beat {
                    due: now.saturating_add(every),
                    records,
                },
            );
        }
        return;
    };
    let fields = records.into_iter().next();
    let state = rule.alarms.remove(&device);
    let next = match (state, fields) {
        (None, None) => None,
        (None, Some(f)) => {
            if alarm.for_ms == 0 {
                Some(raise(rule, &alarm, device.clone(), now, now, f, out))
            } else {
                rule.pending_fields(&device, f);
                Some(AlarmState::Pending { since: now })
            }
        }
        (Some(AlarmState::Pending { since }), Some(f)) => {
            if now >= since.saturating_add(alarm.for_ms) {
                rule.pending.remove(&device);
                Some(raise(rule, &alarm, device.clone(), since, now, f, out))
            } else {
                rule.pending_fields(&device, f);
                Some(AlarmState::Pending { since })
            }
        }
        (Some(AlarmState::Pending { .. }), None) => {
            rule.pending.remove(&device);
            None
        }
        (Some(AlarmState::Firing(a)), Some(_)) => Some(AlarmState::Firing(a)),
        (Some(AlarmState::Resolving { alarm: a, .. }), Some(_)) => Some(AlarmState::Firing(a)),
        (Some(AlarmState::Firing(a)), None) => {
            if alarm.keep_firing_for_ms == 0 {
                clear(rule, a, now, out);
                None
            } else {
                Some(AlarmState::Resolving {
                    alarm: a,
                    since: now,
                })
            }
        }
        (Some(s @ AlarmState::Resolving { .. }), None) => Some(s),
    };
    if let Some(s) = next {
        rule.alarms.insert(device, s);
    }
}

impl Compiled {
    /// Keeps the fields of the evaluation that started a pending alarm (raised with them).
    fn pending_fields(&mut self, device: &Arc<str>, fields: Fields) {
        self.pending.insert(device.clone(), fields);
    }
}

fn raise(
    rule: &mut Compiled,
    def: &AlarmDef,
    device: Arc<str>,
    since: u64,
    now: u64,
    fields: Vec<(Arc<str>, Value)>,
    out: &mut VecDeque<Output>,
) -> AlarmState {
    let a = Alarm {
        rule: rule.id.clone(),
        device,
        severity: def.severity.clone(),
        labels: def.labels.clone(),
        since_ms: since,
        raised_ms: now,
        cleared_ms: None,
        fields,
    };
    rule.stats.events_out += 1;
    out.push_back(Output::Raised(a.clone()));
    AlarmState::Firing(a)
}

fn clear(rule: &mut Compiled, mut a: Alarm, now: u64, out: &mut VecDeque<Output>) {
    a.cleared_ms = Some(now);
    rule.stats.events_out += 1;
    out.push_back(Output::Cleared(a));
}

fn alarm_timers(rule: &mut Compiled, now: u64, out: &mut VecDeque<Output>) {
    let Some(def) = rule.def.alarm.clone() else {
        return;
    };
    let due: Vec<Arc<str>> = rule
        .alarms
        .iter()
        .filter(|(_, s)| match s {
            AlarmState::Pending { since } => now >= since.saturating_add(def.for_ms),
            AlarmState::Resolving { since, .. } => {
                now >= since.saturating_add(def.keep_firing_for_ms)
            }
            AlarmState::Firing(_) => false,
        })
        .map(|(d, _)| d.clone())
        .collect();
    for d in due {
        match rule.alarms.remove(&d) {
            Some(AlarmState::Pending { since }) => {
                let fields = rule.pending.remove(&d).unwrap_or_default();
                let s = raise(rule, &def, d.clone(), since, now, fields, out);
                rule.alarms.insert(d, s);
            }
            Some(AlarmState::Resolving { alarm, .. }) => clear(rule, alarm, now, out),
            Some(other) => {
                rule.alarms.insert(d, other);
            }
            None => {}
        }
    }
}

/// Repeats the last records of every device whose heartbeat is due.
fn heartbeats(rule: &mut Compiled, now: u64, out: &mut VecDeque<Output>) {
    let Some(every) = rule.def.heartbeat_ms else {
        return;
    };
    let mut due: Vec<Arc<str>> = rule
        .beats
        .iter()
        .filter(|(_, b)| now >= b.due)
        .map(|(d, _)| d.clone())
        .collect();
    due.sort();
    for d in due {
        let Some(beat) = rule.beats.get_mut(&d) else {
            continue;
        };
        beat.due = now.saturating_add(every);
        for fields in &beat.records {
            rule.stats.events_out += 1;
            rule.stats.heartbeats += 1;
            out.push_back(Output::Record {
                rule: rule.id.clone(),
                device: d.clone(),
                ts_ms: now,
                fields: fields.clone(),
                heartbeat: true,
            });
        }
    }
}
