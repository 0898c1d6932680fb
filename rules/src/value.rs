//! Values flowing through rules: what a twin property holds, plus strings and null.
//!
//! Comparison and arithmetic follow eKuiper where it is defined: integers and floats compare
//! and compute together (an integer meets a float as a float), a null operand makes
//! arithmetic and comparisons null (a `WHERE` that is null does not match), and comparing a
//! string with a number is a type error.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// One value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No value (a property never read, a failed read, an empty aggregate).
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(Arc<str>),
}

impl Value {
    /// A string value.
    pub fn str(s: &str) -> Value {
        Value::Str(Arc::from(s))
    }

    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "bigint",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
        }
    }

    /// Whether this is null.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The number as a float (integers converted), `None` for anything else.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Truthiness for `WHERE`, `HAVING`, `CASE WHEN` and logic: only `true` is true.
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// Compares two values of comparable types: numbers with numbers, strings with
    /// strings, booleans with booleans. `Ok(None)` when either is null; `Err` names the types.
    pub fn compare(&self, other: &Value) -> Result<Option<Ordering>, String> {
        match (self, other) {
            (Value::Null, _) | (_, Value::Null) => Ok(None),
            (Value::Int(a), Value::Int(b)) => Ok(Some(a.cmp(b))),
            (Value::Str(a), Value::Str(b)) => Ok(Some(a.cmp(b))),
            (Value::Bool(a), Value::Bool(b)) => Ok(Some(a.cmp(b))),
            (a, b) => match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => Ok(x.partial_cmp(&y)),
                _ => Err(format!(
                    "cannot compare {} with {}",
                    a.type_name(),
                    b.type_name()
                )),
            },
        }
    }
}

/// Appends a self-delimiting key for `v` to `out`: equal keys for equal values, numbers
/// compared by value (`1` and `1.0` share a key), `null` a key of its own. Used for
/// partitions (`OVER (PARTITION BY ..)`) and table-join lookups.
pub(crate) fn push_key(v: &Value, out: &mut String) {
    use std::fmt::Write as _;
    // Integral floats in the range of i64 key as integers.
    const LIMIT: f64 = 9.223_372_036_854_775e18;
    let _ = match v {
        Value::Null => write!(out, "~;"),
        Value::Bool(b) => write!(out, "b{};", u8::from(*b)),
        Value::Int(i) => write!(out, "n{i};"),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < LIMIT => write!(out, "n{};", *f as i64),
        Value::Float(f) => write!(out, "f{f:?};"),
        Value::Str(s) => write!(out, "s{}:{s}", s.len()),
    };
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

impl From<&Value> for serde_json::Value {
    fn from(v: &Value) -> serde_json::Value {
        match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(x) => serde_json::Number::from_f64(*x)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_across_types_and_null_is_unknown() {
        assert_eq!(
            Value::Int(2).compare(&Value::Float(2.5)),
            Ok(Some(Ordering::Less))
        );
        assert_eq!(Value::Null.compare(&Value::Int(1)), Ok(None));
        assert!(Value::str("a").compare(&Value::Int(1)).is_err());
        assert!(Value::Bool(true).is_true());
        assert!(!Value::Int(1).is_true());
    }
}
