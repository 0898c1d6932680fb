//! The kinds of rule factory users write, checked against hand-computed outputs on a virtual
//! clock (time is only what the test passes in).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

mod common;

use common::{catalog, drain, engine, f, field, run};
use edgesync_rules::{Alarm, Engine, Output, Value, parse_rule_file};

fn alarm(o: &Output) -> Option<(&'static str, &Alarm)> {
    match o {
        Output::Raised(a) => Some(("raised", a)),
        Output::Cleared(a) => Some(("cleared", a)),
        Output::Record { .. } => None,
    }
}

#[test]
fn threshold_alarm() {
    let mut e = engine(
        r#"{"id": "hot", "sql": "SELECT temp FROM boiler WHERE temp > 85",
            "alarm": {"severity": "critical"}}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(80.0)),
            (1_000, "boiler", "temp", f(90.0)),
            (2_000, "boiler", "temp", f(95.0)),
            (3_000, "boiler", "temp", f(70.0)),
        ],
        10_000,
    );
    let seen: Vec<(u64, &str)> = out
        .iter()
        .filter_map(|(t, o)| alarm(o).map(|(k, _)| (*t, k)))
        .collect();
    assert_eq!(seen, vec![(1_000, "raised"), (3_000, "cleared")]);
    let (_, raised) = alarm(&out[0].1).unwrap();
    assert_eq!(raised.severity, "critical");
    assert_eq!(field(&out[0].1, "temp"), &f(90.0));
    assert!(e.active_alarms().is_empty());
}

#[test]
fn above_85_for_30_seconds() {
    let rule = r#"{"id": "hot30", "sql": "SELECT temp FROM boiler WHERE temp > 85",
        "alarm": {"for": "30s", "keep_firing_for": "10s"}}"#;
    // Holds for 30 s: raised at 30 s exactly (a timer, no event needed), with the latest
    // passing value; a dip shorter than keep_firing_for does not clear it; a longer one does.
    let mut e = engine(rule);
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(86.0)),
            (10_000, "boiler", "temp", f(88.0)),
            (40_000, "boiler", "temp", f(80.0)),
            (45_000, "boiler", "temp", f(90.0)),
            (60_000, "boiler", "temp", f(70.0)),
        ],
        100_000,
    );
    let seen: Vec<(u64, &str)> = out
        .iter()
        .filter_map(|(t, o)| alarm(o).map(|(k, _)| (*t, k)))
        .collect();
    assert_eq!(seen, vec![(30_000, "raised"), (70_000, "cleared")]);
    let (_, a) = alarm(&out[0].1).unwrap();
    assert_eq!((a.since_ms, a.raised_ms), (0, 30_000));
    assert_eq!(field(&out[0].1, "temp"), &f(88.0));
    // Broken off at 20 s: never raised.
    let mut e = engine(rule);
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(86.0)),
            (20_000, "boiler", "temp", f(84.0)),
        ],
        100_000,
    );
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn on_change_with_deadband() {
    let mut e =
        engine(r#"{"id": "db", "sql": "SELECT temp FROM boiler WHERE deadband(temp, 0.5)"}"#);
    let values = [20.0, 20.2, 20.6, 20.3, 21.2, 21.0, 20.7];
    let steps: Vec<(u64, &str, &str, Value)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64 * 1_000, "boiler", "temp", f(*v)))
        .collect();
    let out = run(&mut e, &steps, 10_000);
    let got: Vec<&Value> = out.iter().map(|(_, o)| field(o, "temp")).collect();
    // 20.0 (first), 20.6 (moved 0.6), 21.2 (0.6 from 20.6), 20.7 (0.5 from 21.2).
    assert_eq!(got, vec![&f(20.0), &f(20.6), &f(21.2), &f(20.7)]);
    // A change of a property the rule does not read does not evaluate it.
    e.handle_change(20_000, "boiler", "pressure", f(3.0));
    assert!(e.poll_output().is_none());
}

#[test]
fn one_minute_averages() {
    let mut e = engine(
        r#"{"id": "avg", "sql": "SELECT avg(temp) AS avg_temp, count(*) AS n, window_start() AS ws, window_end() AS we FROM boiler GROUP BY TumblingWindow(mi, 1)"}"#,
    );
    let out = run(
        &mut e,
        &[
            (10_000, "boiler", "temp", f(20.0)),
            (30_000, "boiler", "temp", f(22.0)),
            (59_999, "boiler", "temp", f(24.0)),
            (60_000, "boiler", "temp", f(30.0)),
            (200_000, "boiler", "temp", f(40.0)),
        ],
        300_000,
    );
    let rows: Vec<(u64, Value, Value, Value, Value)> = out
        .iter()
        .map(|(t, o)| {
            (
                *t,
                field(o, "avg_temp").clone(),
                field(o, "n").clone(),
                field(o, "ws").clone(),
                field(o, "we").clone(),
            )
        })
        .collect();
    // [0, 60 s): 20, 22, 24; [60 s, 120 s): 30; nothing in [120 s, 180 s) (no output);
    // [180 s, 240 s): 40.
    assert_eq!(
        rows,
        vec![
            (
                60_000,
                f(22.0),
                Value::Int(3),
                Value::Int(0),
                Value::Int(60_000)
            ),
            (
                120_000,
                f(30.0),
                Value::Int(1),
                Value::Int(60_000),
                Value::Int(120_000)
            ),
            (
                240_000,
                f(40.0),
                Value::Int(1),
                Value::Int(180_000),
                Value::Int(240_000)
            ),
        ]
    );
}

#[test]
fn derived_values() {
    let mut e = engine(
        r#"{"id": "derived", "sql": "SELECT flow * 60 AS per_hour, pressure / 10.0 AS bar, CASE WHEN flow > 10 THEN \"high\" ELSE \"normal\" END AS band FROM pump"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "pump", "pressure", Value::Int(25)),
            (1, "pump", "flow", f(12.5)),
        ],
        10,
    );
    let last = &out.last().unwrap().1;
    assert_eq!(field(last, "per_hour"), &f(750.0));
    assert_eq!(field(last, "bar"), &f(2.5));
    assert_eq!(field(last, "band"), &Value::str("high"));
    // The first change: flow not read yet, so per_hour is null.
    assert_eq!(field(&out[0].1, "per_hour"), &Value::Null);
}

#[test]
fn rate_of_change() {
    let mut e = engine(
        r#"{"id": "rate", "sql": "SELECT (last(level) - first(level)) * 1000 / (window_end() - window_start()) AS per_s FROM tank GROUP BY TumblingWindow(ss, 10) HAVING abs(last(level) - first(level)) > 1"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "tank", "level", f(50.0)),
            (5_000, "tank", "level", f(50.5)),
            (10_000, "tank", "level", f(50.0)),
            (19_000, "tank", "level", f(45.0)),
        ],
        30_000,
    );
    // [0, 10 s): moved 0.5: HAVING drops it; [10 s, 20 s): -5 over 10 s.
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, 20_000);
    assert_eq!(field(&out[0].1, "per_s"), &f(-0.5));
}

#[test]
fn a_limit_per_device() {
    let mut e = engine(
        r#"{"id": "limits", "sql": "SELECT device, temp FROM devices WHERE temp > CASE device WHEN \"boiler\" THEN 85 WHEN \"oven\" THEN 250 ELSE 1000 END",
            "alarm": {}}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(90.0)),
            (1, "oven", "temp", f(200.0)),
            (2, "oven", "temp", f(260.0)),
            (3, "boiler", "temp", f(80.0)),
        ],
        10,
    );
    let seen: Vec<(&str, &str)> = out
        .iter()
        .filter_map(|(_, o)| alarm(o).map(|(k, a)| (k, &*a.device)))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("raised", "boiler"),
            ("raised", "oven"),
            ("cleared", "boiler")
        ]
    );
    let active: Vec<Arc<str>> = e.active_alarms().into_iter().map(|a| a.device).collect();
    assert_eq!(active, vec![Arc::<str>::from("oven")]);
}

#[test]
fn time_spent_in_a_state() {
    // The alarm layer on a state: raise and clear times bound each stretch of it.
    let mut e = engine(
        r#"{"id": "running", "sql": "SELECT running FROM boiler WHERE running = true", "alarm": {}}"#,
    );
    let out = run(
        &mut e,
        &[
            (1_000, "boiler", "running", Value::Bool(true)),
            (61_000, "boiler", "running", Value::Bool(false)),
            (100_000, "boiler", "running", Value::Bool(true)),
            (130_000, "boiler", "running", Value::Bool(false)),
        ],
        200_000,
    );
    let spans: Vec<u64> = out
        .iter()
        .filter_map(|(_, o)| match o {
            Output::Cleared(a) => Some(a.cleared_ms.unwrap() - a.since_ms),
            _ => None,
        })
        .collect();
    assert_eq!(spans, vec![60_000, 30_000]);
}

#[test]
fn active_alarms_survive_a_restart_without_being_raised_again() {
    let rule = r#"{"id": "hot", "sql": "SELECT temp FROM boiler WHERE temp > 85", "alarm": {}}"#;
    let mut e = engine(rule);
    run(&mut e, &[(0, "boiler", "temp", f(90.0))], 1);
    let kept = e.active_alarms();
    assert_eq!(kept.len(), 1);
    let mut e2 = engine(rule);
    e2.restore_alarms(kept);
    let out = run(
        &mut e2,
        &[
            (5, "boiler", "temp", f(95.0)),
            (6, "boiler", "temp", f(20.0)),
        ],
        10,
    );
    let seen: Vec<&str> = out
        .iter()
        .filter_map(|(_, o)| alarm(o).map(|(k, _)| k))
        .collect();
    assert_eq!(seen, vec!["cleared"]);
}

#[test]
fn a_failing_rule_counts_errors_and_leaves_others_alone() {
    let mut e = Engine::new(catalog());
    let defs = vec![
        parse_rule_file(
            "a.json",
            r#"{"id": "div", "sql": "SELECT 100 / temp AS x FROM boiler"}"#,
        )
        .unwrap(),
        parse_rule_file(
            "b.json",
            r#"{"id": "ok", "sql": "SELECT temp FROM boiler"}"#,
        )
        .unwrap(),
    ];
    e.load(defs).unwrap();
    e.handle_change(0, "boiler", "temp", f(0.0));
    let out = drain(&mut e);
    assert_eq!(out.len(), 1, "only the healthy rule produced: {out:?}");
    let stats: Vec<(String, u64, u64)> = e
        .rules()
        .map(|(d, s)| (d.id.clone(), s.errors, s.events_out))
        .collect();
    assert_eq!(stats, vec![("div".into(), 1, 0), ("ok".into(), 0, 1)]);
}

#[test]
fn load_errors_name_the_rule_line_and_column() {
    let cases = [
        ("SELECT temp FROM boiler WHERE temp >", "syntax"),
        ("SELECT temp FROM boilr", "unknown device \"boilr\""),
        (
            "SELECT temp\nFROM boiler\nWHERE tmp > 3",
            "device \"boiler\" has no property \"tmp\"",
        ),
        ("SELECT foo(temp) FROM boiler", "unknown function foo"),
        (
            "SELECT temp FROM boiler WHERE temp > \"hot\"",
            "compares values of different types",
        ),
        ("SELECT avg(temp) FROM boiler", "needs a window"),
        (
            "SELECT temp FROM boiler GROUP BY TumblingWindow(yy, 10)",
            "time unit",
        ),
        ("SELECT round(temp, 1, 2, 3) FROM boiler", "round takes"),
        (
            "SELECT temp FROM boiler WHERE temp + 1",
            "WHERE needs a boolean",
        ),
    ];
    for (sql, want) in cases {
        let def = parse_rule_file(
            "r.json",
            &serde_json::json!({"id": "r1", "sql": sql}).to_string(),
        )
        .unwrap();
        let mut e = Engine::new(catalog());
        let errs = e.load(vec![def]).unwrap_err();
        let msg = errs[0].to_string();
        assert!(
            msg.contains(want) && msg.starts_with("rule \"r1\": line "),
            "{sql}: {msg}"
        );
    }
    // The position points at the offending token.
    let def = parse_rule_file(
        "r.json",
        &serde_json::json!({"id": "r1", "sql": "SELECT temp\nFROM boiler\nWHERE tmp > 3"})
            .to_string(),
    )
    .unwrap();
    let errs = Engine::new(catalog()).load(vec![def]).unwrap_err();
    assert_eq!((errs[0].line, errs[0].column), (3, 7));
}

#[test]
fn a_rule_set_is_replaced_only_when_all_of_it_is_valid_and_unchanged_rules_keep_state() {
    let avg = r#"{"id": "avg", "sql": "SELECT avg(temp) AS a FROM boiler GROUP BY TumblingWindow(ss, 10)"}"#;
    let mut e = engine(avg);
    e.handle_change(1_000, "boiler", "temp", f(10.0));
    // A set with a bad rule is refused whole: the window keeps its row.
    let bad = parse_rule_file(
        "b.json",
        r#"{"id": "bad", "sql": "SELECT nope FROM boiler"}"#,
    )
    .unwrap();
    assert!(
        e.load(vec![parse_rule_file("a.json", avg).unwrap(), bad])
            .is_err()
    );
    // The same rule plus a new one: the unchanged rule's window still holds the row.
    let other = parse_rule_file(
        "c.json",
        r#"{"id": "other", "sql": "SELECT temp FROM oven"}"#,
    )
    .unwrap();
    e.load(vec![parse_rule_file("a.json", avg).unwrap(), other])
        .unwrap();
    e.handle_change(2_000, "boiler", "temp", f(20.0));
    e.handle_timeout(10_000);
    let out = drain(&mut e);
    assert_eq!(out.len(), 1);
    assert_eq!(field(&out[0], "a"), &f(15.0));
}

#[test]
fn select_star_from_devices_shows_each_devices_own_properties() {
    let mut e = engine(r#"{"id": "all", "sql": "SELECT * FROM devices"}"#);
    let out = run(
        &mut e,
        &[(0, "oven", "temp", f(200.0)), (1, "tank", "level", f(3.0))],
        10,
    );
    let names = |o: &Output| match o {
        Output::Record { device, fields, .. } => (
            device.to_string(),
            fields
                .iter()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>(),
        ),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(&out[0].1),
        (
            "oven".to_owned(),
            vec!["door".to_owned(), "temp".to_owned()]
        )
    );
    assert_eq!(
        names(&out[1].1),
        ("tank".to_owned(), vec!["level".to_owned()])
    );
    assert_eq!(field(&out[1].1, "level"), &f(3.0));
}

#[test]
fn a_windows_aggregates_take_the_changes_of_what_they_read() {
    // As in eKuiper, where an event carries the changed fields and aggregates skip missing
    // ones: avg(temp) averages temp's changes, not temp repeated on pressure's changes.
    let mut e = engine(
        r#"{"id": "w", "sql": "SELECT avg(temp) AS t, avg(pressure) AS p, count(*) AS n, temp AS last_temp, avg(temp + pressure) AS sum_avg FROM boiler GROUP BY TumblingWindow(ss, 10)"}"#,
    );
    let out = run(
        &mut e,
        &[
            (1_000, "boiler", "temp", f(10.0)),
            (2_000, "boiler", "pressure", f(5.0)),
            (3_000, "boiler", "temp", f(20.0)),
        ],
        10_000,
    );
    assert_eq!(out.len(), 1, "{out:?}");
    let o = &out[0].1;
    assert_eq!(field(o, "t"), &f(15.0));
    assert_eq!(field(o, "p"), &f(5.0));
    assert_eq!(field(o, "n"), &Value::Int(3));
    assert_eq!(field(o, "last_temp"), &f(20.0));
    // temp + pressure: null at 1 s (no pressure yet), 15 at 2 s, 25 at 3 s.
    assert_eq!(field(o, "sum_avg"), &f(20.0));
}

#[test]
fn an_injected_meter_measures_each_rules_evaluation_time() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut e = engine(r#"{"id": "m", "sql": "SELECT temp FROM boiler WHERE temp > 1"}"#);
    // A fake clock that advances 5 units per reading.
    let t = std::sync::Arc::new(AtomicU64::new(0));
    let t2 = t.clone();
    e.set_meter(Box::new(move || t2.fetch_add(5, Ordering::Relaxed)));
    e.handle_change(0, "boiler", "temp", f(2.0));
    e.handle_change(1, "boiler", "temp", f(3.0));
    let (_, stats) = e.rules().next().unwrap();
    assert_eq!((stats.events_in, stats.eval_ns), (2, 10));
}
