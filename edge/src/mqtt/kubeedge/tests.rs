#![allow(clippy::unwrap_used)]

use edgesync_protocol::desired::Origin;
use edgesync_protocol::{DeviceId, PropertyId, Timestamp};
use serde_json::json;

use super::*;
use crate::model::test_support::{device, tag};
use crate::model::{Access, Table};

fn spec() -> DeviceSpec {
    let mut temp = tag("temp", Table::InputRegister, DataType::Int16, Access::Read);
    temp.scale = 0.1;
    device(
        "boiler",
        vec![
            tag(
                "setpoint",
                Table::HoldingRegister,
                DataType::Int16,
                Access::ReadWrite,
            ),
            tag("pump", Table::Coil, DataType::Bool, Access::ReadWrite),
            temp,
            tag(
                "label",
                Table::HoldingRegister,
                DataType::String { len: 4 },
                Access::ReadWrite,
            ),
        ],
    )
}

fn sample(p: &str, v: Option<Value>, q: Quality) -> Sample {
    Sample {
        device: DeviceId::new("boiler").unwrap(),
        property: PropertyId::new(p).unwrap(),
        value: v,
        quality: q,
        ts: Timestamp(1_700_000_000_000),
    }
}

#[test]
fn request_topics_are_recognised() {
    assert_eq!(
        Topics::request("$hw/events/device/boiler/twin/update"),
        Some(Request::Update("boiler"))
    );
    assert_eq!(
        Topics::request("$hw/events/device/boiler/twin/get"),
        Some(Request::Get("boiler"))
    );
    for other in [
        "$hw/events/device/boiler/twin/update/result",
        "$hw/events/device/boiler/twin/get/result",
        "$hw/events/device//twin/get",
        "$hw/events/device/boiler/state/update",
        "edgesync/n/boiler",
    ] {
        assert_eq!(Topics::request(other), None, "{other}");
    }
    let t = Topics::new("line-1");
    assert_eq!(t.uplink(true), "$hw/events/connected/line-1");
    assert_eq!(t.uplink(false), "$hw/events/disconnected/line-1");
    assert_eq!(t.telemetry("boiler"), "edgesync/line-1/boiler");
    assert_eq!(
        Topics::update_document("b"),
        "$hw/events/device/b/twin/update/document"
    );
}

#[test]
fn expected_strings_convert_by_tag_type() {
    let s = spec();
    let (setpoint, pump, label) = (&s.tags[0], &s.tags[1], &s.tags[3]);
    assert_eq!(expected_to_json(setpoint, &json!("42")).unwrap(), json!(42));
    assert_eq!(expected_to_json(setpoint, &json!("-3")).unwrap(), json!(-3));
    assert_eq!(
        expected_to_json(setpoint, &json!("21.5")).unwrap(),
        json!(21.5)
    );
    assert_eq!(expected_to_json(setpoint, &json!(7)).unwrap(), json!(7));
    assert!(expected_to_json(setpoint, &json!(" 42")).is_err());
    assert!(expected_to_json(setpoint, &json!("forty")).is_err());
    assert!(expected_to_json(setpoint, &json!("")).is_err());
    assert!(expected_to_json(setpoint, &json!(null)).is_err());
    assert!(expected_to_json(setpoint, &json!([1])).is_err());
    for (text, b) in [("true", true), ("FALSE", false), ("1", true), ("0", false)] {
        assert_eq!(expected_to_json(pump, &json!(text)).unwrap(), json!(b));
    }
    assert!(expected_to_json(pump, &json!("yes")).is_err());
    assert_eq!(expected_to_json(pump, &json!(true)).unwrap(), json!(true));
    assert_eq!(
        expected_to_json(label, &json!("42")).unwrap(),
        json!("42"),
        "a string tag keeps the string"
    );
}

#[test]
fn updates_collect_every_problem() {
    let doc = json!({
        "event_id": "e1",
        "timestamp": 1,
        "twin": {
            "setpoint": {"expected": {"value": "55"}, "metadata": {"type": "int"}},
            "pump": {"expected": {"value": "maybe"}},
            "nope": {"expected": {"value": "1"}},
            "temp": {"actual": {"value": "3"}},
            "label": null
        }
    });
    let u = parse_update(&doc, &spec()).unwrap();
    assert_eq!(u.event_id, "e1");
    assert_eq!(u.values.get("setpoint"), Some(&json!(55)));
    let named: Vec<&str> = u.problems.iter().map(|p| p.property.as_str()).collect();
    assert_eq!(named, ["label", "nope", "pump", "temp"]);
    assert!(u.problems[1].message.contains("has no property"));

    let whole = parse_update(&json!({"event_id": "e2"}), &spec()).unwrap_err();
    assert_eq!(whole.event_id, "e2");
    assert_eq!(whole.code, CODE_BAD_REQUEST);
    assert!(parse_update(&json!({"twin": []}), &spec()).is_err());
    assert!(parse_update(&json!({"twin": {}}), &spec()).is_err());
}

#[test]
fn non_json_is_refused_with_a_reason() {
    let r = parse_json(b"{not json").unwrap_err();
    assert_eq!((r.event_id.as_str(), r.code), ("", 400));
    assert!(r.reason().contains("not JSON"));
    assert!(
        parse_json(b"[1,2]")
            .unwrap_err()
            .reason()
            .contains("an array")
    );
    assert!(parse_json(br#"{"event_id": "x"}"#).is_ok());
}

#[test]
fn results_have_kubeedge_fields() {
    let refusal = Refusal {
        event_id: "e".into(),
        code: 400,
        problems: vec![
            Problem::of("pump", "bad"),
            Problem::whole("and the whole thing"),
        ],
    };
    let v: Json = serde_json::from_slice(&error_result(&refusal, 9)).unwrap();
    assert_eq!(
        v,
        json!({
            "event_id": "e", "timestamp": 9, "code": 400,
            "reason": "pump: bad; and the whole thing",
            "errors": [{"property": "pump", "message": "bad"},
                       {"property": "", "message": "and the whole thing"}]
        })
    );
    let mut values = Map::new();
    values.insert("setpoint".into(), json!(55));
    values.insert("pump".into(), json!(true));
    let v: Json = serde_json::from_slice(&update_result("e", &values, 9)).unwrap();
    assert_eq!(
        v,
        json!({"event_id": "e", "timestamp": 9, "twin": {
            "setpoint": {"expected": {"value": "55", "metadata": {"timestamp": 9}}},
            "pump": {"expected": {"value": "true", "metadata": {"timestamp": 9}}}
        }})
    );
}

#[test]
fn msg_twin_has_expected_actual_and_type() {
    let s = spec();
    let desired = DesiredValue {
        value: Value::Int(55),
        version: 3,
        origin: Origin::Hub,
        set_ms: 5,
    };
    let reported = sample("setpoint", Some(Value::Int(50)), Quality::Good);
    assert_eq!(
        msg_twin(&s.tags[0], Some(&reported), Some(&desired)),
        json!({
            "expected": {"value": "55", "metadata": {"timestamp": 5}},
            "actual": {"value": "50", "metadata": {"timestamp": 1_700_000_000_000u64, "quality": "good"}},
            "optional": false,
            "metadata": {"type": "int"}
        })
    );
    // Never read, no desired value: just the type.
    assert_eq!(
        msg_twin(&s.tags[2], None, None),
        json!({"optional": false, "metadata": {"type": "double"}})
    );
    assert_eq!(type_name(&s.tags[1]), "boolean");
    assert_eq!(type_name(&s.tags[3]), "string");
    assert_eq!(value_string(&Value::Float(21.5)), "21.5");
    assert_eq!(value_string(&Value::Bool(false)), "false");
}

#[test]
fn delta_compares_numbers_as_numbers() {
    assert!(!differs(
        &Value::Float(21.3),
        Some(&Value::Float(21.299_999_2))
    ));
    assert!(differs(&Value::Float(21.3), Some(&Value::Float(21.4))));
    assert!(!differs(
        &Value::Int(55),
        Some(&Value::Float(55.000_000_000_1))
    ));
    assert!(!differs(&Value::Bool(true), Some(&Value::Bool(true))));
    assert!(differs(&Value::Int(1), None));
    assert!(differs(
        &Value::Str("a".into()),
        Some(&Value::Str("b".into()))
    ));
}

#[test]
fn telemetry_state_and_uplink_payloads() {
    let samples = vec![
        sample("setpoint", Some(Value::Int(50)), Quality::Good),
        sample("temp", None, Quality::Bad(BadReason::Timeout)),
    ];
    let v: Json = serde_json::from_slice(&telemetry(&samples)).unwrap();
    assert_eq!(
        v,
        json!({
            "setpoint": {"value": 50, "quality": "good", "ts": 1_700_000_000_000u64},
            "temp": {"value": null, "quality": "bad: timeout", "ts": 1_700_000_000_000u64}
        })
    );
    assert_eq!(DeviceState::of_samples(&samples), Some(DeviceState::Online));
    assert_eq!(
        DeviceState::of_samples(&samples[1..]),
        Some(DeviceState::Offline)
    );
    assert_eq!(
        DeviceState::of_samples(&[sample("temp", None, Quality::Bad(BadReason::Exception(2)))]),
        Some(DeviceState::Online)
    );
    assert_eq!(DeviceState::of_samples(&[]), None);
    let v: Json = serde_json::from_slice(&state("id", DeviceState::Offline, 3)).unwrap();
    assert_eq!(
        v,
        json!({"event_id": "id", "timestamp": 3, "state": "offline"})
    );
    let v: Json = serde_json::from_slice(&uplink(true, 3)).unwrap();
    assert_eq!(v, json!({"event_type": "connected", "timestamp": 3}));
}

#[test]
fn event_ids_look_like_uuids() {
    let id = new_event_id();
    let parts: Vec<&str> = id.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12]
    );
    assert!(parts[2].starts_with('4'));
    assert_ne!(id, new_event_id());
}

#[test]
fn applied_payloads_carry_the_outcome_and_the_value() {
    use edgesync_protocol::desired::{Applied, Outcome};
    let desired = DesiredValue {
        value: Value::Int(55),
        version: 7,
        origin: Origin::Hub,
        set_ms: 5,
    };
    let ok = Applied {
        version: 7,
        outcome: Outcome::Ok,
        ts_ms: 11,
    };
    let v: Json =
        serde_json::from_slice(&applied("a1", "setpoint", &ok, Some(&desired), 12)).unwrap();
    assert_eq!(
        v,
        json!({"event_id": "a1", "timestamp": 12, "property": "setpoint", "version": 7,
               "outcome": "ok", "ts_ms": 11, "value": 55, "origin": "hub"})
    );
    let exception = Applied {
        version: 0,
        outcome: Outcome::Exception(2),
        ts_ms: 11,
    };
    let v: Json = serde_json::from_slice(&applied("a2", "setpoint", &exception, None, 12)).unwrap();
    assert_eq!(
        v,
        json!({"event_id": "a2", "timestamp": 12, "property": "setpoint", "version": 0,
               "outcome": "exception", "detail": 2, "ts_ms": 11})
    );
    let refused = Applied {
        version: 3,
        outcome: Outcome::Refused("above the tag's range".into()),
        ts_ms: 11,
    };
    let v: Json = serde_json::from_slice(&applied("a3", "pump", &refused, None, 12)).unwrap();
    assert_eq!(v["outcome"], "refused");
    assert_eq!(v["detail"], "above the tag's range");
    let topics = Topics::new("line-1");
    assert_eq!(topics.applied("boiler"), "edgesync/line-1/boiler/applied");
}

#[test]
fn the_twin_shows_what_became_of_the_last_desired_version() {
    use edgesync_protocol::desired::{Applied, Outcome};
    let s = spec();
    let mut props = BTreeMap::new();
    props.insert(
        PropertyId::new("setpoint").unwrap(),
        PropertyTwin {
            reported: Some(sample("setpoint", Some(Value::Int(50)), Quality::Good)),
            desired: Some(DesiredValue {
                value: Value::Int(55),
                version: 3,
                origin: Origin::Edge,
                set_ms: 5,
            }),
            applied: Some(Applied {
                version: 3,
                outcome: Outcome::Expired,
                ts_ms: 9,
            }),
            writable: true,
        },
    );
    let twin = twin_map(&s, &props);
    assert_eq!(
        twin["setpoint"]["applied"],
        json!({"version": 3, "outcome": "expired", "ts_ms": 9})
    );
    assert_eq!(twin["setpoint"]["expected"]["value"], "55");
    assert!(twin["pump"].get("applied").is_none());
}

#[test]
fn agent_owned_topics_cover_every_topic_the_agent_publishes() {
    use crate::mqtt::guard::{is_reserved, topic_matches};
    let reserved: Vec<String> = Topics::agent_owned()
        .iter()
        .map(|t| (*t).to_owned())
        .collect();
    let t = Topics::new("line-1");
    for topic in [
        Topics::update_result("boiler"),
        Topics::update_document("boiler"),
        Topics::update_delta("boiler"),
        Topics::get_result("boiler"),
        Topics::state_update("boiler"),
        t.uplink(true),
        t.uplink(false),
        t.telemetry("boiler"),
        t.applied("boiler"),
    ] {
        assert!(is_reserved(&reserved, &topic), "{topic}");
    }
    // The request topics stay open to apps.
    for filter in Topics::subscriptions() {
        let topic = filter.replace('+', "boiler");
        assert!(!is_reserved(&reserved, &topic), "{topic}");
        assert!(topic_matches(filter, &topic));
    }
}

/// The telemetry payload as serde_json writes it (the writer before `telemetry` was written by
/// hand): the reference the property test holds `telemetry` to.
fn telemetry_serde(samples: &[Sample]) -> Vec<u8> {
    struct Cycle<'a>(&'a [Sample]);
    struct Entry<'a>(&'a Sample);
    impl Serialize for Cycle<'_> {
        fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = ser.serialize_map(Some(self.0.len()))?;
            for s in self.0 {
                m.serialize_entry(s.property.as_str(), &Entry(s))?;
            }
            m.end()
        }
    }
    impl Serialize for Entry<'_> {
        fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeStruct;
            let mut m = ser.serialize_struct("Entry", 3)?;
            m.serialize_field("value", &self.0.value)?;
            m.serialize_field("quality", &self.0.quality)?;
            m.serialize_field("ts", &self.0.ts.as_millis())?;
            m.end()
        }
    }
    serde_json::to_vec(&Cycle(samples)).unwrap()
}

mod telemetry_bytes {
    use proptest::prelude::*;

    use super::*;

    fn value() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            any::<bool>().prop_map(|b| Some(Value::Bool(b))),
            any::<i64>().prop_map(|i| Some(Value::Int(i))),
            any::<u64>().prop_map(|u| Some(Value::UInt(u))),
            any::<f64>().prop_map(|f| Some(Value::Float(f))),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300)]
                .prop_map(|f| Some(Value::Float(f))),
            any::<String>().prop_map(|s| Some(Value::Str(s))),
        ]
    }

    fn quality() -> impl Strategy<Value = Quality> {
        prop_oneof![
            Just(Quality::Good),
            Just(Quality::Bad(BadReason::Timeout)),
            Just(Quality::Bad(BadReason::Disconnected)),
            Just(Quality::Bad(BadReason::DecodeError)),
            Just(Quality::Bad(BadReason::BadResponse)),
            any::<u8>().prop_map(|c| Quality::Bad(BadReason::Exception(c))),
        ]
    }

    fn samples() -> impl Strategy<Value = Vec<Sample>> {
        prop::collection::vec(
            (
                "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
                value(),
                quality(),
                any::<u64>(),
            ),
            0..12,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(p, value, quality, ts)| Sample {
                    device: DeviceId::new("boiler").unwrap(),
                    property: PropertyId::new(p).unwrap(),
                    value,
                    quality,
                    ts: Timestamp(ts),
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The hand-written telemetry is byte for byte what serde_json writes.
        #[test]
        fn telemetry_is_what_serde_json_writes(samples in samples()) {
            prop_assert_eq!(
                String::from_utf8(telemetry(&samples)).unwrap(),
                String::from_utf8(telemetry_serde(&samples)).unwrap()
            );
        }

        /// Any string, escaping needed or not, is written as serde_json writes it.
        #[test]
        fn json_str_is_what_serde_json_writes(s in any::<String>(), ctl in "[\u{0}-\u{1f}\"\\\\]{0,3}") {
            for s in [s.clone(), format!("{ctl}{s}{ctl}")] {
                let mut out = vec![];
                json_str(&mut out, &s);
                prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
            }
        }
    }
}
