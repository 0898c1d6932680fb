//! Helpers shared by the integration tests: a catalog, a virtual clock, output accessors.

#![allow(clippy::unwrap_used, dead_code)]

use edgesync_rules::{Catalog, ColType, Engine, LoadError, Output, Value, parse_rule_file};

pub fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.add_device(
        "boiler",
        vec![
            ("temp".into(), ColType::Float),
            ("pressure".into(), ColType::Float),
            ("running".into(), ColType::Bool),
        ],
    );
    c.add_device(
        "oven",
        vec![
            ("temp".into(), ColType::Float),
            ("door".into(), ColType::Bool),
        ],
    );
    c.add_device("kiln", vec![("temp".into(), ColType::Float)]);
    c.add_device(
        "pump",
        vec![
            ("flow".into(), ColType::Float),
            ("pressure".into(), ColType::Int),
        ],
    );
    c.add_device("machine", vec![("status".into(), ColType::Int)]);
    c.add_device("tank", vec![("level".into(), ColType::Float)]);
    c
}

/// An engine over `catalog` with one rule (a rule file's JSON).
pub fn engine_with(catalog: Catalog, rule_json: &str) -> Engine {
    let mut e = Engine::new(catalog);
    let def = parse_rule_file("rule.json", rule_json).unwrap();
    e.load(vec![def]).unwrap_or_else(|errs| panic!("{errs:?}"));
    e
}

pub fn engine(rule_json: &str) -> Engine {
    engine_with(catalog(), rule_json)
}

/// The errors of loading a rule with `sql` (id `r1`) over `catalog`.
pub fn load_errors(catalog: Catalog, sql: &str) -> Vec<LoadError> {
    let def = parse_rule_file(
        "r.json",
        &serde_json::json!({"id": "r1", "sql": sql}).to_string(),
    )
    .unwrap();
    match Engine::new(catalog).load(vec![def]) {
        Ok(()) => panic!("{sql}: loaded"),
        Err(e) => e,
    }
}

pub fn drain(e: &mut Engine) -> Vec<Output> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

/// Runs `steps` of (time, device, property, value) and fires timers up to each step's time;
/// returns every output with the time it appeared.
pub fn run(e: &mut Engine, steps: &[(u64, &str, &str, Value)], until: u64) -> Vec<(u64, Output)> {
    let mut out = vec![];
    let advance = |e: &mut Engine, to: u64, out: &mut Vec<(u64, Output)>| {
        while let Some(t) = e.poll_timeout() {
            if t > to {
                break;
            }
            e.handle_timeout(t);
            out.extend(drain(e).into_iter().map(|o| (t, o)));
        }
    };
    for (t, d, p, v) in steps {
        advance(e, *t, &mut out);
        e.handle_change(*t, d, p, v.clone());
        out.extend(drain(e).into_iter().map(|o| (*t, o)));
    }
    advance(e, until, &mut out);
    out
}

pub fn f(x: f64) -> Value {
    Value::Float(x)
}

pub fn i(x: i64) -> Value {
    Value::Int(x)
}

pub fn s(x: &str) -> Value {
    Value::str(x)
}

pub const NULL: Value = Value::Null;

pub fn fields(o: &Output) -> &[(std::sync::Arc<str>, Value)] {
    match o {
        Output::Record { fields, .. } => fields,
        Output::Raised(a) | Output::Cleared(a) => &a.fields,
    }
}

pub fn field<'a>(o: &'a Output, name: &str) -> &'a Value {
    &fields(o)
        .iter()
        .find(|(n, _)| &**n == name)
        .unwrap_or_else(|| panic!("no field {name} in {o:?}"))
        .1
}

/// Each output's values of `names`, in order.
pub fn rows(out: &[(u64, Output)], names: &[&str]) -> Vec<(u64, Vec<Value>)> {
    out.iter()
        .map(|(t, o)| (*t, names.iter().map(|n| field(o, n).clone()).collect()))
        .collect()
}

/// 1-based (line, column) of the first occurrence of `needle` in `text`.
pub fn pos(text: &str, needle: &str) -> (u64, u64) {
    let at = text.find(needle).unwrap();
    let before = &text[..at];
    let line = before.matches('\n').count() as u64 + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() as u64 + 1;
    (line, col)
}
