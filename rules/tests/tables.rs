//! Lookup-table joins (eKuiper's stream/table join), against hand-computed outputs on a
//! virtual clock.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use edgesync_rules::{Catalog, ColType, Output, Table, Value, load_table_file};

const LIMITS_CSV: &str = "device:string,max_temp,zone\nboiler,85,A\noven,250,B\n";

const SETPOINTS_JSON: &str = r#"[
  {"device": "boiler", "level": "low", "threshold": 60},
  {"device": "boiler", "level": "high", "threshold": 90},
  {"device": "oven", "level": "high", "threshold": 300}
]"#;

fn tables() -> Catalog {
    let mut c = catalog();
    c.add_table("limits", load_table_file("limits.csv", LIMITS_CSV).unwrap());
    c.add_table(
        "setpoints",
        load_table_file("setpoints.json", SETPOINTS_JSON).unwrap(),
    );
    c.add_table(
        "codes",
        load_table_file(
            "codes.jsonl",
            "{\"code\": 2.0, \"name\": \"two\"}\n{\"code\": 3, \"name\": \"three\"}\n",
        )
        .unwrap(),
    );
    c.add_table(
        "tdefaults",
        Table::new(
            vec![
                ("device".into(), ColType::Str),
                ("temp".into(), ColType::Float),
            ],
            vec![vec![Value::str("boiler"), f(70.0)]],
        )
        .unwrap(),
    );
    c
}

fn rule(sql: &str) -> String {
    serde_json::json!({"id": "r", "sql": sql}).to_string()
}

fn names(o: &Output) -> Vec<&str> {
    fields(o).iter().map(|(n, _)| &**n).collect()
}

const STEPS: [(u64, &str, &str, Value); 5] = [
    (0, "boiler", "temp", Value::Float(90.0)),
    (1, "oven", "temp", Value::Float(200.0)),
    (2, "oven", "temp", Value::Float(260.0)),
    (3, "boiler", "temp", Value::Float(80.0)),
    (4, "kiln", "temp", Value::Float(1000.0)),
];

#[test]
fn a_limit_per_device_from_a_table() {
    let cases = [
        (
            "SELECT device, temp, limits.max_temp AS max FROM devices INNER JOIN limits ON devices.device = limits.device WHERE temp > limits.max_temp",
            // The kiln has no row: dropped.
            vec![
                (0, vec![s("boiler"), f(90.0), i(85)]),
                (2, vec![s("oven"), f(260.0), i(250)]),
            ],
        ),
        (
            "SELECT device, temp, limits.max_temp AS max FROM devices LEFT JOIN limits ON devices.device = limits.device WHERE temp > coalesce(limits.max_temp, 100)",
            // The kiln goes on with a null limit.
            vec![
                (0, vec![s("boiler"), f(90.0), i(85)]),
                (2, vec![s("oven"), f(260.0), i(250)]),
                (4, vec![s("kiln"), f(1000.0), NULL]),
            ],
        ),
        (
            // One device, its name as `boiler.device`; aliases; bare table column names.
            "SELECT device, temp, max_temp AS max FROM boiler AS b JOIN limits AS l ON b.device = l.device WHERE temp > l.max_temp",
            vec![(0, vec![s("boiler"), f(90.0), i(85)])],
        ),
    ];
    for (sql, want) in cases {
        let mut e = engine_with(tables(), &rule(sql));
        let out = run(&mut e, &STEPS, 10);
        assert_eq!(rows(&out, &["device", "temp", "max"]), want, "{sql}");
    }
}

#[test]
fn the_brief_example_as_an_alarm() {
    let mut e = engine_with(
        tables(),
        r#"{"id": "hot", "sql": "SELECT temp FROM boiler INNER JOIN limits ON boiler.device = limits.device WHERE temp > limits.max_temp", "alarm": {}}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(80.0)),
            (1, "boiler", "temp", f(90.0)),
            (2, "boiler", "temp", f(84.0)),
        ],
        10,
    );
    let seen: Vec<(u64, &str)> = out
        .iter()
        .map(|(t, o)| match o {
            Output::Raised(_) => (*t, "raised"),
            Output::Cleared(_) => (*t, "cleared"),
            Output::Record { .. } => (*t, "record"),
        })
        .collect();
    assert_eq!(seen, vec![(1, "raised"), (2, "cleared")]);
}

#[test]
fn several_matching_rows_make_several_rows() {
    let sql = "SELECT temp, setpoints.level AS level FROM boiler JOIN setpoints ON device = setpoints.device WHERE temp > setpoints.threshold";
    let steps = [
        (0, "boiler", "temp", f(70.0)),
        (1, "boiler", "temp", f(95.0)),
        (2, "boiler", "temp", f(50.0)),
    ];
    let mut e = engine_with(tables(), &rule(sql));
    let out = run(&mut e, &steps, 10);
    assert_eq!(
        rows(&out, &["temp", "level"]),
        vec![
            (0, vec![f(70.0), s("low")]),
            (1, vec![f(95.0), s("low")]),
            (1, vec![f(95.0), s("high")]),
        ]
    );
    // An alarm passes when any row passes, with the first passing row's fields.
    let alarm = serde_json::json!({"id": "a", "sql": sql, "alarm": {}}).to_string();
    let mut e = engine_with(tables(), &alarm);
    let out = run(&mut e, &steps, 10);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(&out[0].1, Output::Raised(a) if a.fields[1].1 == s("low")));
    assert!(matches!(&out[1], (2, Output::Cleared(_))));
}

#[test]
fn select_star_and_shadowed_columns() {
    let mut e = engine_with(
        tables(),
        &rule("SELECT * FROM boiler JOIN limits ON device = limits.device"),
    );
    let out = run(&mut e, &[(0, "boiler", "temp", f(50.0))], 10);
    assert_eq!(
        names(&out[0].1),
        vec!["temp", "pressure", "running", "device", "max_temp", "zone"]
    );
    assert_eq!(field(&out[0].1, "zone"), &s("A"));
    // The table's columns come in the table's order, whatever the ON reads first.
    let mut e = engine_with(
        tables(),
        &rule("SELECT * FROM boiler JOIN limits ON \"A\" = limits.zone"),
    );
    let out = run(&mut e, &[(0, "boiler", "temp", f(50.0))], 10);
    assert_eq!(
        names(&out[0].1),
        vec!["temp", "pressure", "running", "device", "max_temp", "zone"]
    );
    // A table column named like a property: the bare name is the device's (as eKuiper's
    // join tuple looks in the stream first); `SELECT *` leaves the table's out.
    let mut e = engine_with(
        tables(),
        &rule(
            "SELECT temp, tdefaults.temp AS dflt FROM boiler JOIN tdefaults ON device = tdefaults.device",
        ),
    );
    let out = run(&mut e, &[(0, "boiler", "temp", f(50.0))], 10);
    assert_eq!(
        rows(&out, &["temp", "dflt"]),
        vec![(0, vec![f(50.0), f(70.0)])]
    );
    let mut e = engine_with(
        tables(),
        &rule("SELECT * FROM boiler JOIN tdefaults ON device = tdefaults.device"),
    );
    let out = run(&mut e, &[(0, "boiler", "temp", f(50.0))], 10);
    assert_eq!(
        names(&out[0].1),
        vec!["temp", "pressure", "running", "device"]
    );
    assert_eq!(field(&out[0].1, "temp"), &f(50.0));
}

#[test]
fn keys_compare_as_values_and_null_never_matches() {
    let mut e = engine_with(
        tables(),
        &rule("SELECT pressure, codes.name AS name FROM pump JOIN codes ON pressure = codes.code"),
    );
    let out = run(
        &mut e,
        &[
            (0, "pump", "pressure", i(2)),
            (1, "pump", "pressure", i(5)),
            (2, "pump", "pressure", NULL),
            (3, "pump", "pressure", i(3)),
        ],
        10,
    );
    assert_eq!(
        rows(&out, &["pressure", "name"]),
        vec![(0, vec![i(2), s("two")]), (3, vec![i(3), s("three")])]
    );
}

#[test]
fn analytic_functions_run_before_the_join() {
    let mut e = engine_with(
        tables(),
        &rule(
            "SELECT device, temp, lag(temp) OVER (PARTITION BY 1) AS prev FROM devices JOIN limits ON device = limits.device",
        ),
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(10.0)),
            (1, "kiln", "temp", f(20.0)),
            (2, "boiler", "temp", f(30.0)),
        ],
        10,
    );
    // The kiln's row is dropped by the join, but lag saw it.
    assert_eq!(
        rows(&out, &["device", "prev"]),
        vec![
            (0, vec![s("boiler"), NULL]),
            (2, vec![s("boiler"), f(20.0)])
        ]
    );
}

#[test]
fn windows_hold_joined_rows() {
    let mut e = engine_with(
        tables(),
        &rule(
            "SELECT avg(temp) AS a, max(limits.max_temp) AS m, count(*) AS n FROM devices JOIN limits ON device = limits.device GROUP BY TumblingWindow(ss, 10)",
        ),
    );
    let out = run(
        &mut e,
        &[
            (1_000, "boiler", "temp", f(80.0)),
            (2_000, "oven", "temp", f(200.0)),
            (3_000, "kiln", "temp", f(500.0)),
        ],
        20_000,
    );
    assert_eq!(
        rows(&out, &["a", "m", "n"]),
        vec![(10_000, vec![f(140.0), i(250), i(2)])]
    );
}

#[test]
fn set_table_replaces_rows_when_every_rule_still_loads() {
    let mut e = engine_with(
        tables(),
        &rule(
            "SELECT temp FROM boiler JOIN limits ON device = limits.device WHERE temp > limits.max_temp",
        ),
    );
    e.handle_change(0, "boiler", "temp", f(90.0));
    assert_eq!(drain(&mut e).len(), 1);
    let raised = load_table_file("limits.csv", "device,max_temp,zone\nboiler,95.5,A\n").unwrap();
    e.set_table("limits", raised).unwrap();
    e.handle_change(1, "boiler", "temp", f(90.0));
    assert!(drain(&mut e).is_empty());
    e.handle_change(2, "boiler", "temp", f(96.0));
    assert_eq!(drain(&mut e).len(), 1);
    // A table the rule cannot read is refused, naming the rule; the old one stays.
    let text = load_table_file("limits.csv", "device,max_temp\nboiler,high\n").unwrap();
    let errs = e.set_table("limits", text).unwrap_err();
    assert!(
        errs[0].rule == "r" && errs[0].message.contains("different types"),
        "{errs:?}"
    );
    let missing = load_table_file("limits.csv", "device,zone\nboiler,A\n").unwrap();
    let errs = e.set_table("limits", missing).unwrap_err();
    assert!(
        errs[0].message.contains("no column \"max_temp\""),
        "{errs:?}"
    );
    e.handle_change(3, "boiler", "temp", f(95.0));
    assert!(drain(&mut e).is_empty());
    e.handle_change(4, "boiler", "temp", f(96.0));
    assert_eq!(drain(&mut e).len(), 1);
    // A new table can be added, and rules loaded later join it.
    e.set_table(
        "extra",
        load_table_file("x.csv", "device\nboiler\n").unwrap(),
    )
    .unwrap();
    let defs = [
        rule("SELECT temp FROM boiler JOIN limits ON device = limits.device WHERE temp > limits.max_temp"),
        serde_json::json!({"id": "x", "sql": "SELECT temp FROM boiler JOIN extra ON device = extra.device"}).to_string(),
    ]
    .iter()
    .map(|r| edgesync_rules::parse_rule_file("r.json", r).unwrap())
    .collect();
    e.load(defs).unwrap();
    e.handle_change(5, "boiler", "temp", f(1.0));
    let out = drain(&mut e);
    assert!(
        matches!(&out[..], [Output::Record { rule, .. }] if **rule == *"x"),
        "{out:?}"
    );
}

#[test]
fn load_errors_name_the_rule_line_and_column() {
    let cases = [
        (
            "SELECT temp FROM boiler JOIN limitz ON boiler.device = limitz.device",
            "limitz",
            "unknown table \"limitz\"",
        ),
        (
            "SELECT temp FROM boiler JOIN oven ON boiler.temp = oven.temp",
            "oven",
            "is a device",
        ),
        (
            "SELECT temp FROM boiler RIGHT JOIN limits ON boiler.device = limits.device",
            "limits",
            "only INNER JOIN and LEFT JOIN",
        ),
        (
            "SELECT temp FROM boiler CROSS JOIN limits",
            "limits",
            "only INNER JOIN",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON temp > limits.max_temp",
            "temp >",
            "ON takes equalities",
        ),
        (
            "SELECT temp FROM boiler JOIN limits USING (device)",
            "limits",
            "JOIN needs ON",
        ),
        (
            "SELECT limits.max_tmp FROM boiler JOIN limits ON device = limits.device",
            "max_tmp",
            "table \"limits\" has no column \"max_tmp\"",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON device = limits.max_temp",
            "device =",
            "compares values of different types",
        ),
        ("SELECT temp FROM limits", "limits", "is a table"),
        (
            "SELECT temp FROM boiler JOIN limits ON device = limits.device JOIN setpoints ON device = setpoints.device",
            "setpoints ON",
            "one table join at most",
        ),
        (
            "SELECT foo.temp FROM boiler JOIN limits ON device = limits.device",
            "foo",
            "unknown source \"foo\"",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON limits.device = limits.zone",
            "limits.device =",
            "stream side",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON latest(device) = limits.device",
            "latest",
            "stream side",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON limits.device = device AND device = limits.device",
            "device = limits.device",
            "twice",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON boiler.device = limits.device WHERE max_tmp > 1",
            "max_tmp",
            "device \"boiler\" has no property \"max_tmp\" and table \"limits\" has no column \"max_tmp\"",
        ),
        (
            "SELECT temp FROM boiler AS limits JOIN limits ON device = limits.device",
            "limits ON",
            "both called \"limits\"",
        ),
        (
            "SELECT temp\nFROM boiler\nJOIN limits ON device = limits.devise",
            "devise",
            "no column \"devise\"",
        ),
        (
            "SELECT temp FROM boiler JOIN limits ON device = limits.device, oven",
            "oven",
            "one source only",
        ),
        (
            "SELECT lag(limits.max_temp) FROM boiler JOIN limits ON device = limits.device",
            "lag",
            "table columns",
        ),
    ];
    for (sql, at, want) in cases {
        let errs = load_errors(tables(), sql);
        let e = &errs[0];
        assert!(
            e.to_string().starts_with("rule \"r1\": line ") && e.message.contains(want),
            "{sql}: {e}"
        );
        assert_eq!((e.line, e.column), pos(sql, at), "{sql}: {e}");
    }
}

#[test]
fn catalog_lists_tables() {
    let c = tables();
    let names: Vec<&str> = c.tables().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["codes", "limits", "setpoints", "tdefaults"]);
    let limits: &Arc<Table> = c.table("limits").unwrap();
    assert_eq!(limits.rows().len(), 2);
}
