//! Analytic functions (`lag`, `latest`, `had_changed`, `changed_col`, `deadband`) with
//! `OVER (PARTITION BY .. WHEN ..)`, against hand-computed outputs on a virtual clock.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgesync_rules::{Engine, Value};

fn temps(values: &[f64]) -> Vec<(u64, &'static str, &'static str, Value)> {
    values
        .iter()
        .enumerate()
        .map(|(k, v)| (k as u64 * 1_000, "boiler", "temp", f(*v)))
        .collect()
}

#[test]
fn lag_is_the_previous_row() {
    let mut e = engine(r#"{"id": "a", "sql": "SELECT temp, lag(temp) AS prev FROM boiler"}"#);
    let out = run(&mut e, &temps(&[20.0, 21.0, 23.0]), 10_000);
    assert_eq!(
        rows(&out, &["temp", "prev"]),
        vec![
            (0, vec![f(20.0), NULL]),
            (1_000, vec![f(21.0), f(20.0)]),
            (2_000, vec![f(23.0), f(21.0)]),
        ]
    );
}

/// Analytic functions run for every row, before `WHERE`: `lag` without `WHEN` remembers rows
/// the `WHERE` drops; with `WHEN` the same condition it remembers only the rows that count.
#[test]
fn analytic_functions_run_before_where_unless_when_says_otherwise() {
    let values = [20.0, 20.2, 21.0, 21.3];
    let cases = [
        (
            "SELECT temp, lag(temp) AS prev FROM boiler WHERE deadband(temp, 0.5)",
            // 20.2 was the previous row when 21 passed.
            vec![(0, vec![f(20.0), NULL]), (2_000, vec![f(21.0), f(20.2)])],
        ),
        (
            "SELECT temp, lag(temp) OVER (WHEN deadband(temp, 0.5)) AS prev FROM boiler WHERE deadband(temp, 0.5)",
            // Only rows that moved by 0.5 are remembered: 20.
            vec![(0, vec![f(20.0), NULL]), (2_000, vec![f(21.0), f(20.0)])],
        ),
        (
            // In a CASE branch taken only by the last row: still evaluated for every row, so
            // it has the row before (21), not its first call's null.
            "SELECT temp, CASE WHEN temp > 21.1 THEN lag(temp) ELSE 0.0 END AS l FROM boiler WHERE temp > 21.1 OR (temp > 100 AND had_changed(true, temp))",
            vec![(3_000, vec![f(21.3), f(21.0)])],
        ),
    ];
    for (sql, want) in cases {
        let mut e = engine(&serde_json::json!({"id": "a", "sql": sql}).to_string());
        let out = run(&mut e, &temps(&values), 10_000);
        let names: Vec<&str> = if sql.contains(" AS prev") {
            vec!["temp", "prev"]
        } else {
            vec!["temp", "l"]
        };
        assert_eq!(rows(&out, &names), want, "{sql}");
    }
}

/// eKuiper's documented use: the time spent in the previous state, with
/// `ts - lag(ts, 1, ts, true) OVER (WHEN had_changed(true, status))` (here `tstamp()`).
#[test]
fn duration_of_the_previous_state() {
    let mut e = engine(
        r#"{"id": "dur", "sql": "SELECT status, lag(status) AS prev, tstamp() - lag(tstamp(), 1, tstamp(), true) OVER (WHEN had_changed(true, status)) AS duration FROM machine WHERE had_changed(true, status)"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "machine", "status", i(1)),
            (10_000, "machine", "status", i(1)),
            (25_000, "machine", "status", i(2)),
            (40_000, "machine", "status", i(2)),
            (70_000, "machine", "status", i(1)),
        ],
        100_000,
    );
    // Status 1 held 25 s, status 2 held 45 s.
    assert_eq!(
        rows(&out, &["status", "prev", "duration"]),
        vec![
            (0, vec![i(1), NULL, i(0)]),
            (25_000, vec![i(2), i(1), i(25_000)]),
            (70_000, vec![i(1), i(2), i(45_000)]),
        ]
    );
}

#[test]
fn partitions_default_to_the_device_and_follow_partition_by() {
    let steps = [
        (0, "boiler", "temp", f(10.0)),
        (1, "oven", "temp", f(100.0)),
        (2, "boiler", "temp", f(11.0)),
        (3, "oven", "temp", f(101.0)),
        (4, "kiln", "temp", f(500.0)),
    ];
    let cases = [
        // Without PARTITION BY, FROM devices keeps one state per device.
        ("lag(temp)", vec![NULL, NULL, f(10.0), f(100.0), NULL]),
        (
            "lag(temp) OVER (PARTITION BY device)",
            vec![NULL, NULL, f(10.0), f(100.0), NULL],
        ),
        // One partition for every device.
        (
            "lag(temp) OVER (PARTITION BY 1)",
            vec![NULL, f(10.0), f(100.0), f(11.0), f(101.0)],
        ),
        // Partitions by an expression: boiler and kiln are "b", the oven "a".
        (
            "lag(temp) OVER (PARTITION BY CASE WHEN device = \"oven\" THEN \"a\" ELSE \"b\" END)",
            vec![NULL, NULL, f(10.0), f(100.0), f(11.0)],
        ),
        (
            "lag(temp, 1, -1.0) OVER (PARTITION BY device WHEN temp > 10)",
            vec![f(-1.0), f(-1.0), f(-1.0), f(100.0), f(-1.0)],
        ),
    ];
    for (call, want) in cases {
        let sql = format!("SELECT device, {call} AS p FROM devices");
        let mut e = engine(&serde_json::json!({"id": "p", "sql": sql}).to_string());
        let out = run(&mut e, &steps, 10);
        let got: Vec<Value> = out.iter().map(|(_, o)| field(o, "p").clone()).collect();
        assert_eq!(got, want, "{sql}");
    }
}

#[test]
fn latest_changed_col_and_had_changed() {
    // latest: the latest non-null value, else the default.
    let mut e = engine(r#"{"id": "l", "sql": "SELECT latest(temp, 0.0) AS t FROM boiler"}"#);
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", NULL),
            (1, "boiler", "temp", f(5.0)),
            (2, "boiler", "temp", NULL),
        ],
        10,
    );
    let got: Vec<&Value> = out.iter().map(|(_, o)| field(o, "t")).collect();
    assert_eq!(got, vec![&f(0.0), &f(5.0), &f(5.0)]);

    // eKuiper's CHANGED_COL example (temperature, humidity), on two properties.
    let mut e = engine(
        r#"{"id": "c", "sql": "SELECT changed_col(true, temp) AS t, changed_col(true, pressure) AS p FROM boiler"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(23.0)),
            (1, "boiler", "pressure", f(88.0)),
            (2, "boiler", "temp", f(23.0)),
            (3, "boiler", "temp", f(25.0)),
            (4, "boiler", "pressure", f(90.0)),
        ],
        10,
    );
    assert_eq!(
        rows(&out, &["t", "p"]),
        vec![
            (0, vec![f(23.0), NULL]),
            (1, vec![NULL, f(88.0)]),
            (2, vec![NULL, NULL]),
            (3, vec![f(25.0), NULL]),
            (4, vec![NULL, f(90.0)]),
        ]
    );

    // had_changed(true, *) watches every property; WHERE changed_col(..) > 24 as in eKuiper.
    let cases = [
        (
            "SELECT temp, pressure FROM boiler WHERE had_changed(true, *)",
            vec![0, 1, 3, 4],
        ),
        (
            // At 0 the pressure is null: ignored, so not changed.
            "SELECT temp, pressure FROM boiler WHERE had_changed(true, temp) AND NOT had_changed(true, pressure)",
            vec![0, 3],
        ),
        (
            "SELECT temp FROM boiler WHERE changed_col(true, temp) > 24",
            vec![3],
        ),
    ];
    for (sql, want) in cases {
        let mut e = engine(&serde_json::json!({"id": "h", "sql": sql}).to_string());
        let out = run(
            &mut e,
            &[
                (0, "boiler", "temp", f(23.0)),
                (1, "boiler", "pressure", f(88.0)),
                (2, "boiler", "temp", f(23.0)),
                (3, "boiler", "temp", f(25.0)),
                (4, "boiler", "pressure", f(90.0)),
            ],
            10,
        );
        let at: Vec<u64> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(at, want, "{sql}");
    }
}

/// Only `false` makes a row invalid: a null `WHEN` (a property not read yet) counts, as in
/// eKuiper. A change of a property read only in `WHEN` evaluates the rule too.
#[test]
fn deadband_over_when() {
    let mut e = engine(
        r#"{"id": "d", "sql": "SELECT temp FROM boiler WHERE deadband(temp, 0.5) OVER (WHEN running)"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(20.0)),
            (1, "boiler", "running", Value::Bool(false)),
            (2, "boiler", "temp", f(21.0)),
            (3, "boiler", "running", Value::Bool(true)),
            (4, "boiler", "temp", f(21.3)),
        ],
        10,
    );
    assert_eq!(
        rows(&out, &["temp"]),
        vec![(0, vec![f(20.0)]), (3, vec![f(21.0)])]
    );
}

/// Deadband in SELECT (its state used to be WHERE-only), and two call sites of the same
/// function keep separate states.
#[test]
fn call_sites_have_their_own_state() {
    let mut e = engine(
        r#"{"id": "s", "sql": "SELECT deadband(temp, 1) AS coarse, deadband(temp, 0.5) AS fine FROM boiler"}"#,
    );
    let out = run(&mut e, &temps(&[20.0, 20.6, 21.0, 21.2]), 10_000);
    assert_eq!(
        rows(&out, &["coarse", "fine"]),
        vec![
            (0, vec![Value::Bool(true), Value::Bool(true)]),
            (1_000, vec![Value::Bool(false), Value::Bool(true)]),
            (2_000, vec![Value::Bool(true), Value::Bool(false)]),
            (3_000, vec![Value::Bool(false), Value::Bool(true)]),
        ]
    );
}

/// In a window rule each row keeps its analytic results: aggregates see every row's, a bare
/// call the last row's; `WHERE` does not hide rows from them.
#[test]
fn analytic_functions_in_windows() {
    let mut e = engine(
        r#"{"id": "w", "sql": "SELECT avg(lag(temp)) AS a, lag(temp) AS l, count(*) AS n FROM boiler WHERE temp > 15 GROUP BY CountWindow(2)"}"#,
    );
    let out = run(&mut e, &temps(&[10.0, 20.0, 30.0, 40.0, 50.0]), 10_000);
    // lag: null, 10, 20, 30, 40; rows 20, 30 form the first window, 40, 50 the second.
    assert_eq!(
        rows(&out, &["a", "l", "n"]),
        vec![
            (2_000, vec![f(15.0), f(20.0), i(2)]),
            (4_000, vec![f(35.0), f(40.0), i(2)]),
        ]
    );
}

#[test]
fn run_time_errors_count_and_do_not_stop_the_rule() {
    let mut e =
        engine(r#"{"id": "x", "sql": "SELECT had_changed(running, temp) AS c FROM boiler"}"#);
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(1.0)),
            (1, "boiler", "running", Value::Bool(true)),
        ],
        10,
    );
    // The first row: ignoreNull is null, an error; then true.
    assert_eq!(rows(&out, &["c"]), vec![(1, vec![Value::Bool(true)])]);
    let (_, stats) = e.rules().next().unwrap();
    assert_eq!((stats.errors, stats.events_out), (1, 1));

    // A call site holds at most 4096 partitions.
    let mut e = engine(
        r#"{"id": "p", "sql": "SELECT lag(temp) OVER (PARTITION BY temp) AS l FROM boiler"}"#,
    );
    for k in 0..4_097 {
        e.handle_change(k, "boiler", "temp", f(k as f64));
    }
    let (_, stats) = e.rules().next().unwrap();
    assert_eq!((stats.events_out, stats.errors), (4_096, 1));
}

#[test]
fn state_survives_a_reload_of_the_same_rule_only() {
    let rule = r#"{"id": "a", "sql": "SELECT lag(temp) AS prev FROM boiler"}"#;
    let mut e = engine(rule);
    e.handle_change(0, "boiler", "temp", f(1.0));
    let def = edgesync_rules::parse_rule_file("a.json", rule).unwrap();
    e.load(vec![def]).unwrap();
    e.handle_change(1, "boiler", "temp", f(2.0));
    let out = drain(&mut e);
    assert_eq!(field(out.last().unwrap(), "prev"), &f(1.0));
    let changed = r#"{"id": "a", "sql": "SELECT lag(temp) AS prev FROM boiler WHERE true"}"#;
    e.load(vec![
        edgesync_rules::parse_rule_file("a.json", changed).unwrap(),
    ])
    .unwrap();
    e.handle_change(2, "boiler", "temp", f(3.0));
    let out = drain(&mut e);
    assert_eq!(field(out.last().unwrap(), "prev"), &NULL);
}

#[test]
fn load_errors_name_the_rule_line_and_column() {
    let cases = [
        ("SELECT lag(temp, 0) FROM boiler", "0", "offset"),
        ("SELECT lag(temp, temp) FROM boiler", "temp)", "offset"),
        (
            "SELECT lag(temp, 2000) FROM boiler",
            "2000",
            "from 1 to 1024",
        ),
        (
            "SELECT lag(temp) OVER (WHEN temp) FROM boiler",
            "temp) FROM",
            "WHEN needs a boolean",
        ),
        (
            "SELECT abs(temp) OVER (PARTITION BY device) FROM boiler",
            "abs",
            "OVER is only for the analytic functions",
        ),
        (
            "SELECT had_changed(1, temp) FROM boiler",
            "1,",
            "ignoreNull needs a boolean",
        ),
        (
            "SELECT had_changed(true) FROM boiler",
            "had_changed",
            "had_changed takes at least 2 arguments, not 1",
        ),
        (
            "SELECT latest() FROM boiler",
            "latest",
            "latest takes 1 to 2",
        ),
        (
            "SELECT deadband(temp, \"x\") FROM boiler",
            "\"x\"",
            "deadband needs a number",
        ),
        (
            "SELECT lag(avg(temp)) FROM boiler GROUP BY TumblingWindow(ss, 10)",
            "lag",
            "cannot use aggregates",
        ),
        (
            "SELECT lag(temp) OVER (PARTITION BY window_end()) FROM boiler GROUP BY TumblingWindow(ss, 10)",
            "lag",
            "window_end()",
        ),
        (
            "SELECT lag(temp) OVER (WHEN) FROM boiler",
            ") FROM",
            "syntax: Expected: an expression",
        ),
        (
            "SELECT lag(temp) OVER (ORDER BY temp) FROM boiler",
            "ORDER",
            "syntax: Expected: PARTITION BY or WHEN after OVER (",
        ),
        (
            "SELECT lag(temp) OVER () FROM boiler",
            ") FROM",
            "syntax: Expected: PARTITION BY or WHEN",
        ),
        (
            "SELECT lag(temp) OVER (PARTITION BY device WHEN true ORDER BY temp) FROM boiler",
            "ORDER",
            "syntax: Expected: ) to close OVER (",
        ),
        (
            "SELECT temp\nFROM boiler\nWHERE had_changed(true, temp) OVER (\n  WHEN tmp > 3)",
            "tmp",
            "device \"boiler\" has no property \"tmp\"",
        ),
        (
            "SELECT latest(temp) OVER\n (PARTITION BY presure) FROM boiler",
            "presure",
            "no property \"presure\"",
        ),
        (
            "SELECT temp FROM boiler WHERE lag(temp) > \"hot\"",
            "lag(temp) >",
            "compares values of different types",
        ),
    ];
    for (sql, at, want) in cases {
        let errs = load_errors(catalog(), sql);
        let e = &errs[0];
        assert!(
            e.to_string().starts_with("rule \"r1\": line ") && e.message.contains(want),
            "{sql}: {e}"
        );
        assert_eq!((e.line, e.column), pos(sql, at), "{sql}: {e}");
    }
}

#[test]
fn rules_that_load() {
    // Forms that must plan (no output checked).
    for sql in [
        "SELECT lag(temp, 3, 0.0, false) OVER (PARTITION BY running, pressure WHEN temp > 1) FROM boiler",
        "SELECT had_changed(false, temp, pressure, running) FROM boiler",
        "SELECT LAG(temp) over (partition by device) FROM devices",
        "SELECT lag(lag(temp)) OVER (WHEN had_changed(true, lag(running))) FROM boiler",
        "SELECT device FROM devices WHERE had_changed(true, *) GROUP BY device, CountWindow(2)",
        "SELECT changed_col(true, temp) AS t FROM devices GROUP BY TumblingWindow(ss, 1) HAVING count(*) > 1",
    ] {
        let def = edgesync_rules::parse_rule_file(
            "r.json",
            &serde_json::json!({"id": "ok", "sql": sql}).to_string(),
        )
        .unwrap();
        let loaded = Engine::new(catalog()).load(vec![def]);
        assert!(loaded.is_ok(), "{sql}: {loaded:?}");
    }
}
