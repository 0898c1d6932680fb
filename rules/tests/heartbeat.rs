//! Heartbeat: report on change with a floor (an edgesync extension), on a virtual clock.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgesync_rules::{Output, Value};

/// (time, device, heartbeat?, field values).
fn beats(out: &[(u64, Output)], names: &[&str]) -> Vec<(u64, String, bool, Vec<Value>)> {
    out.iter()
        .map(|(t, o)| match o {
            Output::Record {
                device,
                ts_ms,
                heartbeat,
                ..
            } => {
                assert_eq!(ts_ms, t);
                (
                    *t,
                    device.to_string(),
                    *heartbeat,
                    names.iter().map(|n| field(o, n).clone()).collect(),
                )
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn deadband_with_a_one_minute_floor() {
    let mut e = engine(
        r#"{"id": "db", "sql": "SELECT temp FROM boiler WHERE deadband(temp, 0.5)", "heartbeat": "60s"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(20.0)),
            (10_000, "boiler", "temp", f(20.2)),
            (30_000, "boiler", "temp", f(20.6)),
            (50_000, "boiler", "temp", f(20.7)),
            (160_000, "boiler", "temp", f(21.2)),
        ],
        200_000,
    );
    let b = |t: u64, hb: bool, v: f64| (t, "boiler".to_owned(), hb, vec![f(v)]);
    // Changes of 0.5 at once; the last one repeated 60 s after the last output; a real
    // output restarts the count.
    assert_eq!(
        beats(&out, &["temp"]),
        vec![
            b(0, false, 20.0),
            b(30_000, false, 20.6),
            b(90_000, true, 20.6),
            b(150_000, true, 20.6),
            b(160_000, false, 21.2),
        ]
    );
    assert_eq!(e.poll_timeout(), Some(220_000));
    let (_, stats) = e.rules().next().unwrap();
    assert_eq!((stats.events_out, stats.heartbeats), (5, 2));
}

#[test]
fn one_heartbeat_per_device() {
    let mut e = engine(
        r#"{"id": "all", "sql": "SELECT device, temp FROM devices WHERE deadband(temp, 1)", "heartbeat": "10s"}"#,
    );
    let out = run(
        &mut e,
        &[
            (0, "boiler", "temp", f(20.0)),
            (5_000, "oven", "temp", f(100.0)),
            (12_000, "boiler", "temp", f(20.5)),
        ],
        16_000,
    );
    let got: Vec<(u64, String, bool)> = beats(&out, &["temp"])
        .into_iter()
        .map(|(t, d, hb, _)| (t, d, hb))
        .collect();
    // The boiler's 20.5 at 12 s is within its deadband: no output.
    assert_eq!(
        got,
        vec![
            (0, "boiler".into(), false),
            (5_000, "oven".into(), false),
            (10_000, "boiler".into(), true),
            (15_000, "oven".into(), true),
        ]
    );
}

#[test]
fn window_outputs_are_repeated_too() {
    let mut e = engine(
        r#"{"id": "avg", "sql": "SELECT avg(temp) AS a FROM boiler GROUP BY TumblingWindow(ss, 10)", "heartbeat": "25s"}"#,
    );
    let out = run(&mut e, &[(1_000, "boiler", "temp", f(30.0))], 61_000);
    let b = |t: u64, hb: bool| (t, "boiler".to_owned(), hb, vec![f(30.0)]);
    assert_eq!(
        beats(&out, &["a"]),
        vec![b(10_000, false), b(35_000, true), b(60_000, true)]
    );
}

#[test]
fn nothing_to_repeat_before_the_first_output() {
    let mut e = engine(
        r#"{"id": "hot", "sql": "SELECT temp FROM boiler WHERE temp > 85", "heartbeat": "1s"}"#,
    );
    e.handle_change(0, "boiler", "temp", f(20.0));
    assert_eq!(e.poll_timeout(), None);
    // A WHERE that stops passing does not stop the repeats: the last record stands.
    e.handle_change(1_000, "boiler", "temp", f(90.0));
    assert_eq!(drain(&mut e).len(), 1);
    e.handle_change(1_500, "boiler", "temp", f(20.0));
    assert!(drain(&mut e).is_empty());
    assert_eq!(e.poll_timeout(), Some(2_000));
    let out = run(&mut e, &[], 3_500);
    assert_eq!(
        beats(&out, &["temp"]),
        vec![
            (2_000, "boiler".into(), true, vec![f(90.0)]),
            (3_000, "boiler".into(), true, vec![f(90.0)]),
        ]
    );
}

#[test]
fn late_timeouts_do_not_burst() {
    let mut e = engine(r#"{"id": "t", "sql": "SELECT temp FROM boiler", "heartbeat": "10s"}"#);
    e.handle_change(0, "boiler", "temp", f(1.0));
    drain(&mut e);
    // Called 35 s late: one repeat, and the next one 10 s later.
    e.handle_timeout(45_000);
    assert_eq!(drain(&mut e).len(), 1);
    assert_eq!(e.poll_timeout(), Some(55_000));
}
