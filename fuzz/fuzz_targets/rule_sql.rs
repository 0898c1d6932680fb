//! Arbitrary text as a rule's SQL, and as a whole rule file: planning must report problems,
//! never panic, and a rule that loads must evaluate arbitrary values without panicking.

#![no_main]

use edgesync_rules::{Catalog, ColType, Engine, RuleDef, Value, parse_rule_file};
use libfuzzer_sys::fuzz_target;

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.add_device(
        "boiler",
        vec![
            ("temp".into(), ColType::Float),
            ("count".into(), ColType::Int),
            ("on".into(), ColType::Bool),
            ("name".into(), ColType::Str),
        ],
    );
    c.add_device("pump", vec![("temp".into(), ColType::Int)]);
    c
}

fuzz_target!(|input: (&str, u8, i64, f64)| {
    let (text, pick, i, x) = input;
    let _ = parse_rule_file("fuzz.json", text);
    let _ = parse_rule_file("fuzz.yaml", text);
    let mut engine = Engine::new(catalog());
    let def = RuleDef {
        id: "fuzz".into(),
        sql: text.to_owned(),
        actions: vec![],
        alarm: None,
        heartbeat_ms: None,
        ignored_options: vec![],
    };
    if engine.load(vec![def]).is_ok() {
        let value = match pick % 5 {
            0 => Value::Int(i),
            1 => Value::Float(x),
            2 => Value::Bool(i % 2 == 0),
            3 => Value::str(text),
            _ => Value::Null,
        };
        for (t, prop) in ["temp", "count", "on", "name"].iter().enumerate() {
            engine.handle_change(t as u64 * 1_000, "boiler", prop, value.clone());
            engine.handle_change(t as u64 * 1_000 + 1, "pump", "temp", Value::Int(i));
        }
        engine.handle_timeout(u64::MAX / 2);
        while engine.poll_output().is_some() {}
    }
});
