//! Rule files: eKuiper's shape (`id`, `sql`, `actions`, `options`) with an alarm layer.
//!
//! ```json
//! {
//!   "id": "boiler_hot",
//!   "sql": "SELECT temp FROM boiler WHERE temp > 85",
//!   "actions": [{"mqtt": {"topic": "alarms/{{device}}"}}, {"hub": {}}, {"log": {}}],
//!   "alarm": {"for": "30s", "keep_firing_for": "10s", "severity": "critical",
//!             "labels": {"area": "boiler room"}}
//! }
//! ```
//!
//! The same in YAML (`.yaml`, `.yml`). One rule per file. eKuiper `options` are accepted and
//! listed back as ignored (none changes how this engine evaluates). Every error names the file,
//! and the line and column when the file's syntax is at fault.
//!
//! `"heartbeat": "60s"` (an edgesync extension, next to `alarm`; eKuiper has no such option)
//! makes a record rule repeat its last output for a device when it has produced nothing for
//! that device for that long (see [`crate::engine`]): with
//! `SELECT temp FROM boiler WHERE deadband(temp, 0.5)`, every change of 0.5 at once, and the
//! last value at least once a minute. It cannot be combined with `alarm`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// What to do with a rule's output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// Publish to the local MQTT bus; `{{device}}` and `{{rule}}` in the topic are replaced.
    Mqtt {
        /// Topic template.
        topic: String,
    },
    /// Send upstream to the hub.
    Hub {},
    /// Write a tag through the twin's desired path (verified and acknowledged).
    Write {
        /// The device to write.
        device: String,
        /// The property to write.
        property: String,
        /// The output field whose value is written.
        field: String,
    },
    /// Log at info level.
    Log {},
    /// Feed other rules: their SQL reads `FROM memory.<topic>`, whose columns are this rule's
    /// output fields.
    Memory {
        /// Topic.
        topic: String,
    },
}

/// The alarm layer: the rule's condition (its `WHERE`, or `HAVING` for a window) must hold
/// for `for` before the alarm is raised, and stop holding for `keep_firing_for` before it is
/// cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmDef {
    /// How long the condition must hold, ms.
    pub for_ms: u64,
    /// How long the condition must stop holding before the alarm clears, ms.
    pub keep_firing_for_ms: u64,
    /// Severity, free text (`critical`, `warning`, ...).
    pub severity: String,
    /// Labels carried by the alarm.
    pub labels: BTreeMap<String, String>,
}

/// One rule, as loaded from a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleDef {
    /// Unique id.
    pub id: String,
    /// The SQL.
    pub sql: String,
    /// What to do with outputs.
    pub actions: Vec<Action>,
    /// The alarm layer, if this rule is an alarm.
    pub alarm: Option<AlarmDef>,
    /// Repeat the last record of a device after this long without output, ms (record rules
    /// only; see [`crate::engine`]).
    pub heartbeat_ms: Option<u64>,
    /// eKuiper options given, which this engine ignores.
    pub ignored_options: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    sql: String,
    #[serde(default)]
    actions: Vec<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    options: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alarm: Option<RawAlarm>,
    #[serde(default)]
    heartbeat: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlarm {
    #[serde(rename = "for", default)]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A rule file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", location(*line, *column))]
pub struct RuleFileError {
    /// The file.
    pub file: String,
    /// Line (0: unknown).
    pub line: usize,
    /// Column (0: unknown).
    pub column: usize,
    /// What is wrong (naming the rule and field when known).
    pub message: String,
}

fn location(line: usize, column: usize) -> String {
    match (line, column) {
        (0, _) => String::new(),
        (l, 0) => format!(":{l}"),
        (l, c) => format!(":{l}:{c}"),
    }
}

/// Parses a duration such as `30s`, `500ms`, `2m`, `1h`, `1d` (or a bare number of
/// milliseconds).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 5m, 1h)"))?;
    let per = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "{text:?}: unit {other:?} is not one of ms, s, m, h, d"
            ));
        }
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Largest rule file read.
pub const MAX_RULE_FILE_BYTES: usize = 1 << 20;

/// Parses one rule file's text; `file` names it in errors and its extension picks JSON or
/// YAML.
pub fn parse_rule_file(file: &str, text: &str) -> Result<RuleDef, RuleFileError> {
    let err = |line: usize, column: usize, message: String| RuleFileError {
        file: file.to_owned(),
        line,
        column,
        message,
    };
    if text.len() > MAX_RULE_FILE_BYTES {
        return Err(err(
            0,
            0,
            format!("larger than {MAX_RULE_FILE_BYTES} bytes"),
        ));
    }
    let yaml = Path::new(file)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    let raw: RawRule = if yaml {
        serde_saphyr::from_str(text).map_err(|e| err(0, 0, e.to_string()))?
    } else {
        serde_json::from_str(text).map_err(|e| err(e.line(), e.column(), e.to_string()))?
    };
    let id = raw.id.trim().to_owned();
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(err(
            0,
            0,
            format!(
                "rule id {:?} must be 1-128 letters, digits, '-', '_' or '.'",
                raw.id
            ),
        ));
    }
    let rule_err = |m: String| err(0, 0, format!("rule {id:?}: {m}"));
    let mut actions = Vec::with_capacity(raw.actions.len());
    for (i, a) in raw.actions.into_iter().enumerate() {
        if a.len() != 1 {
            return Err(rule_err(format!(
                "actions[{i}] must hold exactly one action kind (mqtt, hub, write, log, memory)"
            )));
        }
        let value = serde_json::Value::Object(a.into_iter().collect());
        let action: Action =
            serde_json::from_value(value).map_err(|e| rule_err(format!("actions[{i}]: {e}")))?;
        actions.push(action);
    }
    let alarm = match raw.alarm {
        None => None,
        Some(a) => {
            let ms = |field: &str, v: Option<String>| -> Result<u64, RuleFileError> {
                match v {
                    None => Ok(0),
                    Some(t) => {
                        parse_duration_ms(&t).map_err(|m| rule_err(format!("alarm.{field}: {m}")))
                    }
                }
            };
            Some(AlarmDef {
                for_ms: ms("for", a.for_)?,
                keep_firing_for_ms: ms("keep_firing_for", a.keep_firing_for)?,
                severity: a.severity.unwrap_or_else(|| "warning".to_owned()),
                labels: a.labels,
            })
        }
    };
    let heartbeat_ms = match raw.heartbeat {
        None => None,
        Some(t) => {
            let ms = parse_duration_ms(&t).map_err(|m| rule_err(format!("heartbeat: {m}")))?;
            if ms == 0 {
                return Err(rule_err("heartbeat: must be longer than 0".into()));
            }
            if alarm.is_some() {
                return Err(rule_err(
                    "heartbeat repeats records: it cannot be combined with alarm".into(),
                ));
            }
            Some(ms)
        }
    };
    Ok(RuleDef {
        id,
        sql: raw.sql,
        actions,
        alarm,
        heartbeat_ms,
        ignored_options: raw.options.into_keys().collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn json_and_yaml_rules() {
        let json = r#"{"id": "hot", "sql": "SELECT temp FROM boiler WHERE temp > 85",
            "actions": [{"mqtt": {"topic": "alarms/{{device}}"}}, {"hub": {}}, {"log": {}}],
            "options": {"qos": 1},
            "alarm": {"for": "30s", "keep_firing_for": "10s", "severity": "critical", "labels": {"area": "b"}}}"#;
        let r = parse_rule_file("rules/hot.json", json).unwrap();
        assert_eq!(r.id, "hot");
        assert_eq!(r.actions.len(), 3);
        assert_eq!(r.ignored_options, vec!["qos".to_owned()]);
        let a = r.alarm.unwrap();
        assert_eq!((a.for_ms, a.keep_firing_for_ms), (30_000, 10_000));
        let yaml = "id: avg\nsql: SELECT avg(temp) FROM boiler GROUP BY TumblingWindow(mi, 1)\nactions:\n  - write: {device: valve, property: open, field: cmd}\n";
        let r = parse_rule_file("avg.yaml", yaml).unwrap();
        assert_eq!(
            r.actions,
            vec![Action::Write {
                device: "valve".into(),
                property: "open".into(),
                field: "cmd".into()
            }]
        );
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let e = parse_rule_file("r.json", "{\"id\": \"x\",\n \"sql\": 5}").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("r.json", 2));
        let e = parse_rule_file("r.json", r#"{"id": "x", "sql": "", "colour": 1}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse_rule_file(
            "r.json",
            r#"{"id": "x", "sql": "", "actions": [{"mqtt": {"topik": "a"}}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rule \"x\": actions[0]"), "{e}");
        let e = parse_rule_file(
            "r.json",
            r#"{"id": "x", "sql": "", "alarm": {"for": "3 weeks"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("alarm.for"), "{e}");
        let e = parse_rule_file("r.json", r#"{"id": "x", "sql": "", "heartbeat": "soon"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("rule \"x\": heartbeat"), "{e}");
        let e =
            parse_rule_file("r.json", r#"{"id": "x", "sql": "", "heartbeat": "0s"}"#).unwrap_err();
        assert!(e.to_string().contains("longer than 0"), "{e}");
        let e = parse_rule_file(
            "r.json",
            r#"{"id": "x", "sql": "", "heartbeat": "1m", "alarm": {}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("alarm"), "{e}");
        let r = parse_rule_file("r.yaml", "id: x\nsql: s\nheartbeat: 60s\n").unwrap();
        assert_eq!(r.heartbeat_ms, Some(60_000));
        let e = parse_rule_file("r.json", r#"{"id": "a b", "sql": ""}"#).unwrap_err();
        assert!(e.to_string().contains("rule id"), "{e}");
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert!(parse_duration_ms("99999999999999999999d").is_err());
    }
}
