//! No panics on any input: generated rules with analytic calls, `OVER` and joins planned and
//! run, and arbitrary table files loaded (the fuzz target `rule_sql` does the same with
//! arbitrary bytes).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgesync_rules::{Engine, RuleDef, Table, Value, load_table_file};
use proptest::prelude::*;

fn pick(items: &[&'static str]) -> impl Strategy<Value = String> + Clone {
    proptest::sample::select(items.to_vec()).prop_map(String::from)
}

/// A boolean without analytic calls (for `WHEN` and `CASE`).
fn cond() -> impl Strategy<Value = String> + Clone {
    pick(&[
        "running",
        "true",
        "false",
        "null",
        "temp > 1",
        "had_changed(true, temp)",
        "deadband(temp, 0.5)",
        "device = \"boiler\"",
    ])
}

/// An optional `OVER` clause.
fn over() -> impl Strategy<Value = String> + Clone {
    (
        0u8..5,
        cond(),
        pick(&["device", "temp", "running", "1", "null"]),
    )
        .prop_map(|(k, c, p)| match k {
            0 => format!(" OVER (PARTITION BY {p})"),
            1 => format!(" OVER (WHEN {c})"),
            2 => format!(" OVER (PARTITION BY {p}, device WHEN {c})"),
            _ => String::new(),
        })
}

/// Numeric expressions over the test catalog, with analytic calls, `OVER`, table columns.
fn expr() -> impl Strategy<Value = String> {
    let leaf = pick(&[
        "temp",
        "pressure",
        "limits.max_temp",
        "max_temp",
        "1",
        "0",
        "-1",
        "2.5",
        "tstamp()",
        "null",
    ]);
    leaf.prop_recursive(3, 24, 3, |inner| {
        prop_oneof![
            (inner.clone(), pick(&["+", "-", "*", "/"]), inner.clone())
                .prop_map(|(a, o, b)| format!("({a} {o} {b})")),
            (
                inner.clone(),
                pick(&["", ", 2", ", 1, 0.0", ", 3, -1, false"]),
                over()
            )
                .prop_map(|(x, rest, o)| format!("lag({x}{rest}){o}")),
            (inner.clone(), over()).prop_map(|(x, o)| format!("latest({x}, 0){o}")),
            (inner.clone(), cond(), over())
                .prop_map(|(x, c, o)| format!("changed_col({c}, {x}){o}")),
            (cond(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("CASE WHEN {c} THEN {a} ELSE {b} END")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("coalesce({a}, {b})")),
            inner.prop_map(|x| format!("avg({x})")),
        ]
    })
}

/// A boolean with analytic calls.
fn predicate() -> impl Strategy<Value = String> {
    (expr(), expr(), 0u8..4, over(), cond()).prop_map(|(a, b, k, o, c)| match k {
        0 => format!("{a} > {b}"),
        1 => format!("had_changed(true, {a}, {b}){o}"),
        2 => format!("deadband({a}, 0.5){o} AND {c}"),
        _ => format!("had_changed(false, *){o} OR {a} = {b}"),
    })
}

/// Rules, mostly well formed.
fn rule_sql() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(expr(), 1..3),
        proptest::sample::select(vec!["boiler", "devices", "boiler AS b"]),
        proptest::sample::select(vec![
            "",
            " JOIN limits ON device = limits.device",
            " LEFT JOIN limits AS l ON device = l.device",
        ]),
        proptest::option::of(predicate()),
        proptest::sample::select(vec![
            "",
            " GROUP BY CountWindow(2)",
            " GROUP BY TumblingWindow(ss, 1)",
        ]),
    )
        .prop_map(|(sel, from, join, whr, group)| {
            let whr = whr.map(|w| format!(" WHERE {w}")).unwrap_or_default();
            format!("SELECT {} FROM {from}{join}{whr}{group}", sel.join(", "))
        })
}

fn with_limits() -> edgesync_rules::Catalog {
    let mut c = catalog();
    c.add_table(
        "limits",
        load_table_file("l.csv", "device:string,max_temp\nboiler,85\n").unwrap(),
    );
    c
}

fn exercise(sql: &str, value: Value) {
    let mut e = Engine::new(with_limits());
    let def = RuleDef {
        id: "p".into(),
        sql: sql.to_owned(),
        heartbeat_ms: Some(1_000),
        ..RuleDef::default()
    };
    if e.load(vec![def]).is_ok() {
        for (k, (d, p)) in [
            ("boiler", "temp"),
            ("boiler", "running"),
            ("oven", "temp"),
            ("boiler", "pressure"),
            ("kiln", "temp"),
        ]
        .iter()
        .enumerate()
        {
            e.handle_change(k as u64 * 700, d, p, value.clone());
            e.handle_change(k as u64 * 700 + 1, d, p, Value::Null);
        }
        let _ = e.set_table(
            "limits",
            Table::new(
                vec![("device".into(), edgesync_rules::ColType::Str)],
                vec![],
            )
            .unwrap(),
        );
        e.handle_change(10_000, "boiler", "temp", value);
        e.handle_timeout(u64::MAX / 2);
        while e.poll_output().is_some() {}
        let _ = e.poll_timeout();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn planning_and_running_never_panic(
        sql in prop_oneof![4 => rule_sql(), 1 => "\\PC{0,80}"],
        pick in 0u8..5,
        x in any::<f64>(),
        n in any::<i64>(),
    ) {
        let value = match pick {
            0 => Value::Int(n),
            1 => Value::Float(x),
            2 => Value::Bool(n % 2 == 0),
            3 => Value::str(&sql),
            _ => Value::Null,
        };
        exercise(&sql, value);
    }

    #[test]
    fn table_files_never_panic(text in "\\PC{0,200}", ext in prop_oneof![Just("csv"), Just("json"), Just("jsonl")]) {
        let _ = load_table_file(&format!("t.{ext}"), &text);
    }

    #[test]
    fn csv_like_text_never_panics(cells in proptest::collection::vec("[a-z0-9\",:. \r\n-]{0,6}", 0..20)) {
        let _ = load_table_file("t.csv", &cells.join(","));
        let _ = load_table_file("t.json", &format!("[{}]", cells.join(",")));
    }
}
