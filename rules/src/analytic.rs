//! Analytic functions: `lag`, `latest`, `had_changed`, `changed_col` (eKuiper's) and
//! `deadband` (edgesync's), with eKuiper's `OVER ([PARTITION BY e, ...] [WHEN cond])`.
//!
//! References are to `lf-edge/ekuiper`: `docs/en_US/sqls/functions/analytic_functions.md`,
//! `internal/binder/function/funcs_analytic.go` (the functions),
//! `internal/topo/planner/analyzer.go` and `operator/analyticfuncs_operator.go` (when they
//! run), `internal/xsql/valuer.go` (`WHEN` and the partition key), `internal/xsql/parser.go`
//! (`parseOver`).
//!
//! # When they are evaluated
//!
//! As in eKuiper ("analytic functions are evaluated first so that they are not affected by
//! predicates in WHERE clause"): every call site is evaluated exactly once for every row the
//! rule receives, before the table join, `WHERE` and the window, whatever clause it is
//! written in and even inside a `CASE` branch or behind `AND`/`OR` that would not reach it;
//! the clauses then read the result. So in
//! `SELECT temp, lag(temp) AS prev FROM boiler WHERE had_changed(true, temp)`, `prev` is the
//! previous *row's* temperature, also when that row did not pass the `WHERE`; to remember
//! only the rows that pass, put the condition in `WHEN`:
//! `lag(temp) OVER (WHEN had_changed(true, temp))`. Call sites are evaluated innermost
//! first, in the order `SELECT`, `WHERE`, `HAVING` (nested calls and calls in `PARTITION BY`
//! or `WHEN` before the call holding them). In a window rule each row keeps its results: an
//! aggregate of an analytic function (`avg(lag(temp))`) sees every row's, a bare one in the
//! window's `SELECT` the last row's. Their arguments cannot read a joined table (the join
//! comes later, as in eKuiper), aggregates or `window_start()`/`window_end()`.
//!
//! # State
//!
//! Per rule, per call site, per partition. The partition is the value of the `PARTITION BY`
//! expressions; without it, one partition for `FROM <device>` and one per device for
//! `FROM devices` (eKuiper has no `devices` source; this is as if `PARTITION BY device` were
//! written). Partition values compare as values (`1` and `1.0` are one partition, `null` is
//! one). A call site holds at most [`MAX_PARTITIONS`] partitions: a row that would open
//! another is a run-time error (eKuiper has no bound). State lives as long as the rule is
//! loaded unchanged.
//!
//! # `WHEN`
//!
//! With `WHEN cond`, a row for which `cond` is `false` is not a valid event: the function
//! returns its answer from the saved state without updating it (below, "not valid"). As in
//! eKuiper, only `false` makes a row invalid: a `null` condition counts as valid (eKuiper
//! treats any non-boolean as valid).
//!
//! # The functions
//!
//! * `lag(expr[, offset[, default[, ignoreNull]]])`: `expr` of the row `offset` (default 1)
//!   valid rows back, or `default` (default null) before there are that many. `offset` is an
//!   integer literal from 1 to [`MAX_LAG_OFFSET`] (eKuiper accepts any non-negative integer;
//!   its `lag(x, 0)` is always null). `default` is taken from the partition's first row, as
//!   eKuiper fills its queue then: `ts - lag(ts, 1, ts)` is 0 on the first row. With
//!   `ignoreNull` (default `true`) a null `expr` is not remembered.
//! * `latest(expr[, default])`: the latest non-null `expr` of a valid row (this row's when
//!   non-null and valid), else `default` (default null).
//! * `had_changed(ignoreNull, expr, ...)`: whether any `expr` differs from its value on the
//!   last valid row that had it (the first non-null value is a change; with `ignoreNull`,
//!   a null is skipped rather than compared). Values compare as eKuiper's
//!   `reflect.DeepEqual`: an integer and a float are different. Not valid: `false`.
//!   `had_changed(ignoreNull, *)` watches every property of the source. `ignoreNull` must be
//!   a boolean (a run-time error otherwise).
//! * `changed_col(ignoreNull, expr)`: `expr` when it differs from the last value returned
//!   (as above), else null; null when `ignoreNull` and `expr` is null, or not valid.
//! * `deadband(value, width)`: `true` when `value` moved by at least `width` since it was
//!   last `true` (and on the first number), else `false`; null when either is not a number
//!   (the state is kept). Not valid: `false`. An edgesync extension, treated as an analytic
//!   function (so it supports `OVER`, and runs for every row whatever the `WHERE` around it).
//!
//! Run-time errors (a non-boolean `ignoreNull`, too many partitions, an error in an argument)
//! make the row's evaluation fail, as for any expression.

use std::collections::{HashMap, VecDeque};

use crate::functions::Ctx;
use crate::plan::{self, Expr, Layout, Scope};
use crate::value::{self, Value};

/// Most partitions one call site keeps.
pub const MAX_PARTITIONS: usize = 4096;

/// Largest `lag` offset.
pub const MAX_LAG_OFFSET: usize = 1024;

/// An analytic function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnalyticKind {
    /// `lag(expr, offset, default, ignoreNull)`; `args`: expr, default, ignoreNull.
    Lag {
        /// Rows back.
        offset: usize,
    },
    /// `latest(expr, default)`; `args`: expr, default.
    Latest,
    /// `had_changed(ignoreNull, expr, ...)`; `args`: ignoreNull, exprs.
    HadChanged,
    /// `changed_col(ignoreNull, expr)`; `args`: ignoreNull, expr.
    ChangedCol,
    /// `deadband(value, width)`; `args`: value, width.
    Deadband,
}

impl AnalyticKind {
    /// The function's name.
    pub fn name(self) -> &'static str {
        match self {
            AnalyticKind::Lag { .. } => "lag",
            AnalyticKind::Latest => "latest",
            AnalyticKind::HadChanged => "had_changed",
            AnalyticKind::ChangedCol => "changed_col",
            AnalyticKind::Deadband => "deadband",
        }
    }
}

/// The names of the analytic functions (the ones `OVER` is allowed after).
pub const NAMES: &[&str] = &["lag", "latest", "had_changed", "changed_col", "deadband"];

/// Whether `name` (any case) is an analytic function.
pub fn is_analytic(name: &str) -> bool {
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// One call site.
#[derive(Debug, Clone)]
pub struct Analytic {
    /// The function.
    pub kind: AnalyticKind,
    /// Arguments, completed with their defaults (see [`AnalyticKind`]).
    pub args: Vec<Expr>,
    /// `PARTITION BY` expressions; empty: the default partition (see the module docs).
    pub partition: Vec<Expr>,
    /// `WHEN` condition.
    pub when: Option<Expr>,
}

#[derive(Debug, Clone)]
enum SiteState {
    Lag(VecDeque<Value>),
    Latest(Option<Value>),
    HadChanged(Vec<Value>),
    ChangedCol(Value),
    Deadband(Option<f64>),
}

/// The analytic state of one rule: per call site, per partition.
#[derive(Debug, Clone, Default)]
pub struct State {
    sites: Vec<HashMap<String, SiteState>>,
}

impl State {
    /// Evaluates every call site of `sites` for one row: `row` holds the row's columns and
    /// gets each site's result appended, in order. `by_device`: the default partition is the
    /// row's device.
    pub fn evaluate(
        &mut self,
        sites: &[Analytic],
        layout: Layout,
        row: &mut Vec<Value>,
        device: &str,
        ctx: &Ctx,
        by_device: bool,
    ) -> Result<(), String> {
        if self.sites.len() != sites.len() {
            self.sites = vec![HashMap::new(); sites.len()];
        }
        for (site, states) in sites.iter().zip(self.sites.iter_mut()) {
            let (args, key, valid) = {
                let mut scope = Scope {
                    row,
                    layout,
                    device,
                    ctx,
                    window: None,
                };
                let mut args = Vec::with_capacity(site.args.len());
                for a in &site.args {
                    args.push(plan::eval(a, &mut scope)?);
                }
                let mut key = String::new();
                if site.partition.is_empty() {
                    if by_device {
                        value::push_key(&Value::str(device), &mut key);
                    }
                } else {
                    for p in &site.partition {
                        value::push_key(&plan::eval(p, &mut scope)?, &mut key);
                    }
                }
                let valid = match &site.when {
                    Some(w) => !matches!(plan::eval(w, &mut scope)?, Value::Bool(false)),
                    None => true,
                };
                (args, key, valid)
            };
            let result = step(site.kind, states, key, &args, valid)?;
            row.push(result);
        }
        Ok(())
    }
}

fn arg(args: &[Value], i: usize) -> Value {
    args.get(i).cloned().unwrap_or(Value::Null)
}

fn flag(kind: AnalyticKind, args: &[Value], i: usize, what: &str) -> Result<bool, String> {
    match args.get(i) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!(
            "{}: {what} must be a bool, got {}",
            kind.name(),
            v.type_name()
        )),
        None => Ok(true),
    }
}

/// One function step on the partition `key`'s state.
fn step(
    kind: AnalyticKind,
    states: &mut HashMap<String, SiteState>,
    key: String,
    args: &[Value],
    valid: bool,
) -> Result<Value, String> {
    // Checks made before the state is touched, in eKuiper's order.
    let ignore_null = match kind {
        AnalyticKind::Lag { .. } => flag(kind, args, 2, "ignoreNull (the fourth argument)")?,
        AnalyticKind::ChangedCol => flag(kind, args, 0, "ignoreNull (the first argument)")?,
        _ => true,
    };
    match kind {
        AnalyticKind::ChangedCol if ignore_null && arg(args, 1).is_null() => {
            return Ok(Value::Null);
        }
        AnalyticKind::ChangedCol if !valid => return Ok(Value::Null),
        AnalyticKind::HadChanged if !valid => return Ok(Value::Bool(false)),
        AnalyticKind::Deadband => {
            if arg(args, 0).as_f64().is_none() || arg(args, 1).as_f64().is_none() {
                return Ok(Value::Null);
            }
            if !valid {
                return Ok(Value::Bool(false));
            }
        }
        _ => {}
    }
    let ignore_null = match kind {
        AnalyticKind::HadChanged => flag(kind, args, 0, "ignoreNull (the first argument)")?,
        _ => ignore_null,
    };
    let full = states.len() >= MAX_PARTITIONS;
    let state = match states.entry(key) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            if full {
                return Err(format!(
                    "{}: more than {MAX_PARTITIONS} partitions",
                    kind.name()
                ));
            }
            v.insert(match kind {
                AnalyticKind::Lag { offset } => {
                    SiteState::Lag(std::iter::repeat_n(arg(args, 1), offset).collect())
                }
                AnalyticKind::Latest => SiteState::Latest(None),
                AnalyticKind::HadChanged => {
                    SiteState::HadChanged(vec![Value::Null; args.len().saturating_sub(1)])
                }
                AnalyticKind::ChangedCol => SiteState::ChangedCol(Value::Null),
                AnalyticKind::Deadband => SiteState::Deadband(None),
            })
        }
    };
    let v = arg(args, 0);
    Ok(match state {
        SiteState::Lag(queue) => {
            let out = queue.front().cloned().unwrap_or(Value::Null);
            if valid && (!ignore_null || !v.is_null()) {
                queue.pop_front();
                queue.push_back(v);
            }
            out
        }
        SiteState::Latest(last) => {
            if valid && !v.is_null() {
                *last = Some(v.clone());
                v
            } else {
                last.clone().unwrap_or_else(|| arg(args, 1))
            }
        }
        SiteState::HadChanged(last) => {
            let mut changed = false;
            for (v, prev) in args.iter().skip(1).zip(last.iter_mut()) {
                if ignore_null && v.is_null() {
                    continue;
                }
                if v != prev {
                    changed = true;
                    *prev = v.clone();
                }
            }
            Value::Bool(changed)
        }
        SiteState::ChangedCol(last) => {
            let v = arg(args, 1);
            if v != *last {
                *last = v.clone();
                v
            } else {
                Value::Null
            }
        }
        SiteState::Deadband(last) => {
            let (Some(x), Some(w)) = (v.as_f64(), arg(args, 1).as_f64()) else {
                return Ok(Value::Null);
            };
            let pass = match *last {
                None => true,
                Some(prev) => (x - prev).abs() >= w,
            };
            if pass {
                *last = Some(x);
            }
            Value::Bool(pass)
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(kind: AnalyticKind, rows: &[(Vec<Value>, bool)]) -> Vec<Value> {
        let mut states = HashMap::new();
        rows.iter()
            .map(|(args, valid)| step(kind, &mut states, String::new(), args, *valid).unwrap())
            .collect()
    }

    const N: Value = Value::Null;
    fn i(x: i64) -> Value {
        Value::Int(x)
    }
    fn b(x: bool) -> Value {
        Value::Bool(x)
    }

    #[test]
    fn lag_follows_ekuiper_ring_queue() {
        // lag(x, 2, -1): the default twice, then the value two valid rows back.
        let rows: Vec<(Vec<Value>, bool)> = [1, 2, 3, 4]
            .iter()
            .map(|x| (vec![i(*x), i(-1), b(true)], true))
            .collect();
        assert_eq!(
            run(AnalyticKind::Lag { offset: 2 }, &rows),
            vec![i(-1), i(-1), i(1), i(2)]
        );
        // Null is skipped with ignoreNull, kept without; an invalid row is not remembered.
        let rows = vec![
            (vec![i(1), N, b(true)], true),
            (vec![N, N, b(true)], true),
            (vec![i(3), N, b(true)], false),
            (vec![i(4), N, b(true)], true),
            (vec![i(5), N, b(true)], true),
        ];
        assert_eq!(
            run(AnalyticKind::Lag { offset: 1 }, &rows),
            vec![N, i(1), i(1), i(1), i(4)]
        );
        let rows: Vec<(Vec<Value>, bool)> = [i(1), N, i(3)]
            .into_iter()
            .map(|v| (vec![v, N, b(false)], true))
            .collect();
        assert_eq!(
            run(AnalyticKind::Lag { offset: 1 }, &rows),
            vec![N, i(1), N]
        );
    }

    #[test]
    fn latest_had_changed_changed_col() {
        let rows = vec![
            (vec![N, i(0)], true),
            (vec![i(5), i(0)], true),
            (vec![N, i(0)], true),
            (vec![i(7), i(0)], false),
        ];
        assert_eq!(
            run(AnalyticKind::Latest, &rows),
            vec![i(0), i(5), i(5), i(5)]
        );
        // The eKuiper docs' example: temperature 23, 23, 25; humidity 88, 88, 90.
        let rows = vec![
            (vec![b(true), i(23), i(88)], true),
            (vec![b(true), i(23), i(88)], true),
            (vec![b(true), i(25), i(88)], true),
            (vec![b(true), i(25), i(90)], true),
            (vec![b(true), N, i(90)], true),
            (vec![b(true), i(26), i(90)], false),
        ];
        assert_eq!(
            run(AnalyticKind::HadChanged, &rows),
            vec![b(true), b(false), b(true), b(true), b(false), b(false)]
        );
        // Without ignoreNull a null is a change (after a value), and an int is not a float.
        let rows = vec![
            (vec![b(false), N], true),
            (vec![b(false), i(1)], true),
            (vec![b(false), N], true),
            (vec![b(false), Value::Float(1.0)], true),
        ];
        assert_eq!(
            run(AnalyticKind::HadChanged, &rows),
            vec![b(false), b(true), b(true), b(true)]
        );
        let rows = vec![
            (vec![b(true), i(23)], true),
            (vec![b(true), i(23)], true),
            (vec![b(true), N], true),
            (vec![b(true), i(25)], true),
            (vec![b(true), i(26)], false),
        ];
        assert_eq!(
            run(AnalyticKind::ChangedCol, &rows),
            vec![i(23), N, N, i(25), N]
        );
    }

    #[test]
    fn deadband_with_when() {
        let f = Value::Float;
        let rows = vec![
            (vec![f(20.0), f(0.5)], true),
            (vec![f(20.6), f(0.5)], false),
            (vec![f(20.4), f(0.5)], true),
            (vec![f(20.6), f(0.5)], true),
            (vec![N, f(0.5)], true),
        ];
        assert_eq!(
            run(AnalyticKind::Deadband, &rows),
            vec![b(true), b(false), b(false), b(true), N]
        );
    }

    #[test]
    fn bad_flags_and_too_many_partitions_are_errors() {
        let mut states = HashMap::new();
        assert!(
            step(
                AnalyticKind::HadChanged,
                &mut states,
                String::new(),
                &[i(1), i(2)],
                true
            )
            .is_err()
        );
        // Not valid: false before the flag is looked at (eKuiper's order).
        assert_eq!(
            step(
                AnalyticKind::HadChanged,
                &mut states,
                String::new(),
                &[i(1), i(2)],
                false
            ),
            Ok(b(false))
        );
        let mut states = HashMap::new();
        for k in 0..MAX_PARTITIONS {
            step(
                AnalyticKind::Latest,
                &mut states,
                k.to_string(),
                &[i(1)],
                true,
            )
            .unwrap();
        }
        let e = step(AnalyticKind::Latest, &mut states, "x".into(), &[i(1)], true).unwrap_err();
        assert!(e.contains("partitions"), "{e}");
        // An existing partition still works.
        assert_eq!(
            step(AnalyticKind::Latest, &mut states, "0".into(), &[i(2)], true),
            Ok(i(2))
        );
    }
}
