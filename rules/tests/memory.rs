//! Rules feeding rules through memory topics (the `memory` action and `FROM memory.<topic>`).

#![allow(clippy::unwrap_used)]

mod common;

use common::{catalog, drain, f, field, run};
use edgesync_rules::{Engine, Output, parse_rule_file};

fn engine(rules: &[&str]) -> Engine {
    let mut e = Engine::new(catalog());
    let defs = rules
        .iter()
        .enumerate()
        .map(|(i, r)| parse_rule_file(&format!("r{i}.json"), r).unwrap())
        .collect();
    e.load(defs).unwrap_or_else(|errs| panic!("{errs:?}"));
    e
}

fn of_rule<'a>(out: &'a [(u64, Output)], id: &str) -> Vec<&'a Output> {
    out.iter()
        .map(|(_, o)| o)
        .filter(|o| matches!(o, Output::Record { rule, .. } if &**rule == id))
        .collect()
}

#[test]
fn a_rule_reads_another_rules_records() {
    // Declared consumer first: loading orders them by their topics.
    let mut e = engine(&[
        r#"{"id": "avg_alarm", "sql": "SELECT a, device FROM memory.avgs WHERE a > 50"}"#,
        r#"{"id": "avg", "sql": "SELECT avg(temp) AS a FROM boiler GROUP BY TumblingWindow(ss, 10)", "actions": [{"memory": {"topic": "avgs"}}]}"#,
    ]);
    let out = run(
        &mut e,
        &[
            (1_000, "boiler", "temp", f(40.0)),
            (2_000, "boiler", "temp", f(80.0)),
            (11_000, "boiler", "temp", f(10.0)),
        ],
        30_000,
    );
    // [0, 10 s): avg 60 -> passes; [10 s, 20 s): avg 10 -> filtered.
    assert_eq!(of_rule(&out, "avg").len(), 2);
    let fed = of_rule(&out, "avg_alarm");
    assert_eq!(fed.len(), 1, "{out:?}");
    assert_eq!(field(fed[0], "a"), &f(60.0));
    assert_eq!(
        field(fed[0], "device"),
        &edgesync_rules::Value::str("memory.avgs")
    );
}

#[test]
fn chains_work_and_cycles_and_unknown_fields_are_refused() {
    let mut e = engine(&[
        r#"{"id": "c", "sql": "SELECT y + 1 AS z FROM memory.b"}"#,
        r#"{"id": "b", "sql": "SELECT x * 2 AS y FROM memory.a", "actions": [{"memory": {"topic": "b"}}]}"#,
        r#"{"id": "a", "sql": "SELECT temp AS x FROM boiler", "actions": [{"memory": {"topic": "a"}}]}"#,
    ]);
    e.handle_change(0, "boiler", "temp", f(5.0));
    let out: Vec<Output> = drain(&mut e);
    let z: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Output::Record { rule, .. } if &**rule == "c"))
        .collect();
    assert_eq!(z.len(), 1);
    assert_eq!(field(z[0], "z"), &f(11.0));

    // A cycle: a -> b -> a.
    let mut e = Engine::new(catalog());
    let defs = vec![
        parse_rule_file("a.json", r#"{"id": "a", "sql": "SELECT y AS x FROM memory.b", "actions": [{"memory": {"topic": "a"}}]}"#).unwrap(),
        parse_rule_file("b.json", r#"{"id": "b", "sql": "SELECT x AS y FROM memory.a", "actions": [{"memory": {"topic": "b"}}]}"#).unwrap(),
    ];
    let errs = e.load(defs).unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].message.contains("a cycle"), "{errs:?}");
    // A field the feeding rule does not produce; a bad topic name.
    let mut e = Engine::new(catalog());
    let defs = vec![
        parse_rule_file("a.json", r#"{"id": "a", "sql": "SELECT temp AS x FROM boiler", "actions": [{"memory": {"topic": "a"}}]}"#).unwrap(),
        parse_rule_file("b.json", r#"{"id": "b", "sql": "SELECT nope FROM memory.a"}"#).unwrap(),
    ];
    let errs = e.load(defs).unwrap_err();
    assert!(
        errs[0].to_string().contains("has no property \"nope\""),
        "{errs:?}"
    );
    let defs = vec![
        parse_rule_file("a.json", r#"{"id": "a", "sql": "SELECT temp FROM boiler", "actions": [{"memory": {"topic": "a b"}}]}"#).unwrap(),
    ];
    let errs = Engine::new(catalog()).load(defs).unwrap_err();
    assert!(errs[0].message.contains("memory topic"), "{errs:?}");
}
