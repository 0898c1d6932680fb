//! Aggregate accumulators: `avg`, `sum`, `min`, `max`, `count`, `first_value`, `last_value`,
//! `stddev`, `stddevs` and `median` over the rows of a window.
//!
//! eKuiper references are to `lf-edge/ekuiper` (`docs/en_US/sqls/functions/aggregate_functions.md`,
//! `internal/binder/function/funcs_agg.go`, `common_array_funcs.go`, `funcs_inc_agg.go`).
//!
//! * **Nulls are skipped** by every function ("The null values will be ignored").
//!   `count(col)` counts the non-null values; `count(*)` counts rows and is the caller's.
//! * **Empty input** (no non-null value): `count` is `0`, every other function is null
//!   (eKuiper returns nil for an empty group; strictly, its `count` of zero rows is nil
//!   too, but a window that fires holds rows, so that case does not arise there).
//! * **`sum`** of integers stays an integer; it is checked, and on `i64` overflow it turns
//!   into a float sum (approximate but no wrap-around; eKuiper's Go `int64` silently wraps).
//!   A float anywhere makes the sum a float (an integer meets a float as a float, as in
//!   [`Value`]'s arithmetic; eKuiper instead decides by the first value's type and errors or
//!   truncates on the others).
//! * **`avg`** is always a float. eKuiper's incremental `avg` is a float too (`inc_avg`),
//!   while its windowed `avg` of integers truncates to an integer (`r / int64(c)`); this
//!   engine never truncates.
//! * **`min` / `max`** compare numbers with numbers (integers and floats together) and
//!   strings with strings ([`Value::compare`]); they return the winning value unchanged
//!   (an `Int` stays an `Int`), the first of equal ones. Mixing strings with numbers is an
//!   error, and so is a boolean (eKuiper: "found invalid arg"). A float NaN is unordered
//!   and skipped.
//! * **`stddev`** is the population standard deviation and **`stddevs`** the sample one
//!   (eKuiper docs; `stats.StandardDeviation` / `StandardDeviationSample`), computed with
//!   Welford's online algorithm. `stddevs` of a single value is null (eKuiper computes
//!   0/0 = NaN, which JSON cannot carry).
//! * **`median`**: the middle value (odd count: returned unchanged, so a median of integers
//!   is an integer, as in eKuiper), or the mean of the two middle values as a float (even
//!   count). It keeps every value of the window.
//! * **`first_value` / `last_value`**: the first / last non-null value in arrival order, of
//!   any type. eKuiper has `last_value(col, ignoreNull)`; this accumulator implements
//!   `ignoreNull = true`. `first_value` is an edgesync extension (eKuiper has none).
//! * `sum`, `avg`, `stddev`, `stddevs` and `median` reject non-numbers with an error naming
//!   the function and the type (eKuiper validates the argument as a number).

use std::cmp::Ordering;

use crate::value::Value;

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// `avg(col)`: the mean, a float.
    Avg,
    /// `sum(col)`: an integer for integers, else a float.
    Sum,
    /// `min(col)`: the smallest number or string.
    Min,
    /// `max(col)`: the largest number or string.
    Max,
    /// `count(col)`: the number of non-null values.
    Count,
    /// `first_value(col)`: the first non-null value.
    First,
    /// `last_value(col)`: the last non-null value.
    Last,
    /// `stddev(col)`: the population standard deviation.
    Stddev,
    /// `stddevs(col)`: the sample standard deviation.
    StddevS,
    /// `median(col)`: the middle value.
    Median,
}

impl AggKind {
    /// The aggregate named `name` (case-insensitive), `None` if it is not one.
    pub fn from_name(name: &str) -> Option<AggKind> {
        let kind = match name.to_ascii_lowercase().as_str() {
            "avg" => AggKind::Avg,
            "sum" => AggKind::Sum,
            "min" => AggKind::Min,
            "max" => AggKind::Max,
            "count" => AggKind::Count,
            "first_value" => AggKind::First,
            "last_value" => AggKind::Last,
            "stddev" => AggKind::Stddev,
            "stddevs" => AggKind::StddevS,
            "median" => AggKind::Median,
            _ => return None,
        };
        Some(kind)
    }

    /// The function's SQL name (lower case), as [`AggKind::from_name`] accepts it.
    pub fn name(self) -> &'static str {
        match self {
            AggKind::Avg => "avg",
            AggKind::Sum => "sum",
            AggKind::Min => "min",
            AggKind::Max => "max",
            AggKind::Count => "count",
            AggKind::First => "first_value",
            AggKind::Last => "last_value",
            AggKind::Stddev => "stddev",
            AggKind::StddevS => "stddevs",
            AggKind::Median => "median",
        }
    }
}

/// A running sum: integral while it fits in an `i64`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sum {
    Int(i64),
    Float(f64),
}

impl Sum {
    fn add(self, v: &Value) -> Sum {
        match (self, v) {
            (Sum::Int(a), Value::Int(b)) => match a.checked_add(*b) {
                Some(s) => Sum::Int(s),
                None => Sum::Float(a as f64 + *b as f64),
            },
            (Sum::Int(a), other) => Sum::Float(a as f64 + other.as_f64().unwrap_or(0.0)),
            (Sum::Float(a), other) => Sum::Float(a + other.as_f64().unwrap_or(0.0)),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Sum::Int(i) => i as f64,
            Sum::Float(f) => f,
        }
    }
}

/// Folds values; null inputs are skipped (`count(*)` is the caller's: it counts rows).
#[derive(Debug, Clone)]
pub struct Accumulator {
    kind: AggKind,
    /// Non-null values added.
    count: u64,
    /// `sum`, `avg`.
    sum: Sum,
    /// `min`, `max`, `first_value`, `last_value`.
    pick: Option<Value>,
    /// `stddev`, `stddevs` (Welford): running mean and sum of squared deviations.
    mean: f64,
    m2: f64,
    /// `median`.
    values: Vec<Value>,
}

impl Accumulator {
    /// An empty accumulator for `kind`.
    pub fn new(kind: AggKind) -> Self {
        Accumulator {
            kind,
            count: 0,
            sum: Sum::Int(0),
            pick: None,
            mean: 0.0,
            m2: 0.0,
            values: Vec::new(),
        }
    }

    /// Folds `v` in. Nulls are skipped. `Err` (the state is unchanged) for a value the
    /// function cannot take: a non-number into `sum`, `avg`, `stddev`, `stddevs` or `median`;
    /// a boolean, or a string against numbers (or the reverse), into `min` / `max`. The
    /// message names the function and the type.
    pub fn add(&mut self, v: &Value) -> Result<(), String> {
        if v.is_null() {
            return Ok(());
        }
        match self.kind {
            AggKind::Count => {}
            AggKind::Sum | AggKind::Avg => {
                self.number(v)?;
                self.sum = self.sum.add(v);
            }
            AggKind::Stddev | AggKind::StddevS => {
                let x = self.number(v)?;
                let n = self.count.saturating_add(1) as f64;
                let delta = x - self.mean;
                self.mean += delta / n;
                self.m2 += delta * (x - self.mean);
            }
            AggKind::Median => {
                self.number(v)?;
                self.values.push(v.clone());
            }
            AggKind::First => {
                if self.pick.is_none() {
                    self.pick = Some(v.clone());
                }
            }
            AggKind::Last => self.pick = Some(v.clone()),
            AggKind::Min | AggKind::Max => {
                if matches!(v, Value::Bool(_)) {
                    return Err(self.type_error(v, "a number or a string"));
                }
                if matches!(v, Value::Float(f) if f.is_nan()) {
                    return Ok(());
                }
                let replace = match &self.pick {
                    None => true,
                    Some(cur) => {
                        let ord = v
                            .compare(cur)
                            .map_err(|e| format!("{}: {e}", self.kind.name()))?;
                        let better = if self.kind == AggKind::Min {
                            Ordering::Less
                        } else {
                            Ordering::Greater
                        };
                        ord == Some(better)
                    }
                };
                if replace {
                    self.pick = Some(v.clone());
                }
            }
        }
        self.count = self.count.saturating_add(1);
        Ok(())
    }

    /// The aggregate of the values added so far. With none: `count` is `Int(0)`, the others
    /// `Null`.
    pub fn result(&self) -> Value {
        if self.count == 0 {
            return match self.kind {
                AggKind::Count => Value::Int(0),
                _ => Value::Null,
            };
        }
        match self.kind {
            AggKind::Count => Value::Int(i64::try_from(self.count).unwrap_or(i64::MAX)),
            AggKind::Sum => match self.sum {
                Sum::Int(i) => Value::Int(i),
                Sum::Float(f) => Value::Float(f),
            },
            AggKind::Avg => Value::Float(self.sum.as_f64() / self.count as f64),
            AggKind::Min | AggKind::Max | AggKind::First | AggKind::Last => {
                self.pick.clone().unwrap_or(Value::Null)
            }
            AggKind::Stddev => Value::Float((self.m2.max(0.0) / self.count as f64).sqrt()),
            AggKind::StddevS => {
                if self.count < 2 {
                    Value::Null
                } else {
                    Value::Float((self.m2.max(0.0) / self.count.saturating_sub(1) as f64).sqrt())
                }
            }
            AggKind::Median => self.median(),
        }
    }

    fn median(&self) -> Value {
        let mut sorted: Vec<&Value> = self.values.iter().collect();
        sorted.sort_by(|a, b| {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            x.total_cmp(&y)
        });
        let n = sorted.len();
        let mid = n / 2;
        match (n % 2, sorted.get(mid)) {
            (1, Some(v)) => (*v).clone(),
            (_, Some(hi)) => match mid.checked_sub(1).and_then(|i| sorted.get(i)) {
                Some(lo) => {
                    Value::Float((lo.as_f64().unwrap_or(0.0) + hi.as_f64().unwrap_or(0.0)) / 2.0)
                }
                None => Value::Null,
            },
            _ => Value::Null,
        }
    }

    /// `v` as a float, or the error for a numeric function given a non-number.
    fn number(&self, v: &Value) -> Result<f64, String> {
        v.as_f64().ok_or_else(|| self.type_error(v, "a number"))
    }

    fn type_error(&self, v: &Value, expected: &str) -> String {
        format!(
            "{}: expected {expected}, got {} ({v})",
            self.kind.name(),
            v.type_name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fold(kind: AggKind, vals: &[Value]) -> Result<Value, String> {
        let mut acc = Accumulator::new(kind);
        for v in vals {
            acc.add(v)?;
        }
        Ok(acc.result())
    }

    fn ints(v: &[i64]) -> Vec<Value> {
        v.iter().map(|i| Value::Int(*i)).collect()
    }

    const ALL: [AggKind; 10] = [
        AggKind::Avg,
        AggKind::Sum,
        AggKind::Min,
        AggKind::Max,
        AggKind::Count,
        AggKind::First,
        AggKind::Last,
        AggKind::Stddev,
        AggKind::StddevS,
        AggKind::Median,
    ];

    #[test]
    fn names_round_trip() {
        for k in ALL {
            assert_eq!(AggKind::from_name(k.name()), Some(k));
            assert_eq!(AggKind::from_name(&k.name().to_uppercase()), Some(k));
        }
        assert_eq!(AggKind::from_name("abs"), None);
        assert_eq!(AggKind::from_name("collect"), None);
    }

    #[test]
    fn empty_and_all_null() {
        for k in ALL {
            let expected = if k == AggKind::Count {
                Value::Int(0)
            } else {
                Value::Null
            };
            assert_eq!(fold(k, &[]), Ok(expected.clone()), "{k:?}");
            assert_eq!(fold(k, &[Value::Null, Value::Null]), Ok(expected), "{k:?}");
        }
    }

    #[test]
    fn sums_and_averages() {
        let v = vec![Value::Int(1), Value::Null, Value::Int(2), Value::Int(4)];
        assert_eq!(fold(AggKind::Sum, &v), Ok(Value::Int(7)));
        assert_eq!(fold(AggKind::Count, &v), Ok(Value::Int(3)));
        assert_eq!(fold(AggKind::Avg, &v), Ok(Value::Float(7.0 / 3.0)));
        let mixed = vec![Value::Int(1), Value::Float(0.5)];
        assert_eq!(fold(AggKind::Sum, &mixed), Ok(Value::Float(1.5)));
        assert_eq!(fold(AggKind::Avg, &mixed), Ok(Value::Float(0.75)));
        // Overflow turns the sum into a float instead of wrapping.
        let big = ints(&[i64::MAX, 1]);
        assert_eq!(
            fold(AggKind::Sum, &big),
            Ok(Value::Float(i64::MAX as f64 + 1.0))
        );
        assert_eq!(
            fold(AggKind::Avg, &big),
            Ok(Value::Float((i64::MAX as f64 + 1.0) / 2.0))
        );
        assert_eq!(
            fold(AggKind::Sum, &ints(&[i64::MIN, -1])),
            Ok(Value::Float(i64::MIN as f64 - 1.0))
        );
    }

    #[test]
    fn type_errors_name_function_and_type() {
        for k in [
            AggKind::Sum,
            AggKind::Avg,
            AggKind::Stddev,
            AggKind::StddevS,
            AggKind::Median,
        ] {
            let mut acc = Accumulator::new(k);
            acc.add(&Value::Int(3)).unwrap();
            let e = acc.add(&Value::str("x")).unwrap_err();
            assert!(e.contains(k.name()) && e.contains("string"), "{e}");
            let e = acc.add(&Value::Bool(true)).unwrap_err();
            assert!(e.contains("bool"), "{e}");
            // The state is unchanged by the refused values.
            assert_eq!(acc.result(), fold(k, &[Value::Int(3)]).unwrap());
        }
        let e = fold(AggKind::Max, &[Value::Int(1), Value::str("a")]).unwrap_err();
        assert!(
            e.starts_with("max:") && e.contains("string") && e.contains("bigint"),
            "{e}"
        );
        let e = fold(AggKind::Min, &[Value::Bool(false)]).unwrap_err();
        assert!(e.starts_with("min:") && e.contains("bool"), "{e}");
        // count, first_value and last_value take anything.
        let any = vec![Value::Bool(true), Value::str("s"), Value::Float(1.0)];
        assert_eq!(fold(AggKind::Count, &any), Ok(Value::Int(3)));
        assert_eq!(fold(AggKind::First, &any), Ok(Value::Bool(true)));
        assert_eq!(fold(AggKind::Last, &any), Ok(Value::Float(1.0)));
    }

    #[test]
    fn min_max_keep_the_winning_value() {
        let v = vec![
            Value::Int(3),
            Value::Float(2.5),
            Value::Null,
            Value::Int(7),
            Value::Float(f64::NAN),
        ];
        assert_eq!(fold(AggKind::Min, &v), Ok(Value::Float(2.5)));
        assert_eq!(fold(AggKind::Max, &v), Ok(Value::Int(7)));
        let s = vec![Value::str("b"), Value::str("a"), Value::str("c")];
        assert_eq!(fold(AggKind::Min, &s), Ok(Value::str("a")));
        assert_eq!(fold(AggKind::Max, &s), Ok(Value::str("c")));
        // Ties keep the first: Int(2) before Float(2.0).
        assert_eq!(
            fold(AggKind::Max, &[Value::Int(2), Value::Float(2.0)]),
            Ok(Value::Int(2))
        );
    }

    #[test]
    fn first_and_last_skip_nulls() {
        let v = vec![Value::Null, Value::Int(1), Value::Int(2), Value::Null];
        assert_eq!(fold(AggKind::First, &v), Ok(Value::Int(1)));
        assert_eq!(fold(AggKind::Last, &v), Ok(Value::Int(2)));
    }

    #[test]
    fn standard_deviations_hand_computed() {
        // 2 4 4 4 5 5 7 9: mean 5, squared deviations sum 32; population 32/8 = 4 → 2,
        // sample 32/7 → 2.138089935299395.
        let v = ints(&[2, 4, 4, 4, 5, 5, 7, 9]);
        assert_eq!(fold(AggKind::Stddev, &v), Ok(Value::Float(2.0)));
        let Ok(Value::Float(s)) = fold(AggKind::StddevS, &v) else {
            panic!("float expected");
        };
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12, "{s}");
        assert!((s - 2.138_089_935_299_395).abs() < 1e-12);
        // One value: population 0, sample undefined.
        assert_eq!(
            fold(AggKind::Stddev, &[Value::Float(3.5)]),
            Ok(Value::Float(0.0))
        );
        assert_eq!(
            fold(AggKind::StddevS, &[Value::Float(3.5)]),
            Ok(Value::Null)
        );
        // Floats: 1.5, 2.5 → population 0.5, sample sqrt(0.5).
        let f = vec![Value::Float(1.5), Value::Null, Value::Float(2.5)];
        assert_eq!(fold(AggKind::Stddev, &f), Ok(Value::Float(0.5)));
        assert_eq!(fold(AggKind::StddevS, &f), Ok(Value::Float(0.5f64.sqrt())));
    }

    #[test]
    fn medians() {
        assert_eq!(fold(AggKind::Median, &ints(&[5, 1, 3])), Ok(Value::Int(3)));
        assert_eq!(
            fold(AggKind::Median, &ints(&[4, 1, 3, 2])),
            Ok(Value::Float(2.5))
        );
        assert_eq!(
            fold(
                AggKind::Median,
                &[
                    Value::Float(1.5),
                    Value::Int(7),
                    Value::Null,
                    Value::Int(-2)
                ]
            ),
            Ok(Value::Float(1.5))
        );
        assert_eq!(
            fold(AggKind::Median, &ints(&[i64::MAX, i64::MAX])),
            Ok(Value::Float(i64::MAX as f64))
        );
    }

    proptest! {
        #[test]
        fn sum_count_avg_agree_with_naive(vals in proptest::collection::vec(proptest::option::of(-1_000_000i64..1_000_000), 0..100)) {
            let values: Vec<Value> = vals.iter().map(|v| v.map_or(Value::Null, Value::Int)).collect();
            let present: Vec<i64> = vals.iter().flatten().copied().collect();
            let n = present.len();
            let total: i64 = present.iter().sum();
            prop_assert_eq!(fold(AggKind::Count, &values), Ok(Value::Int(n as i64)));
            if n == 0 {
                prop_assert_eq!(fold(AggKind::Sum, &values), Ok(Value::Null));
                prop_assert_eq!(fold(AggKind::Avg, &values), Ok(Value::Null));
            } else {
                prop_assert_eq!(fold(AggKind::Sum, &values), Ok(Value::Int(total)));
                prop_assert_eq!(fold(AggKind::Avg, &values), Ok(Value::Float(total as f64 / n as f64)));
                prop_assert_eq!(fold(AggKind::Min, &values), Ok(Value::Int(*present.iter().min().unwrap())));
                prop_assert_eq!(fold(AggKind::Max, &values), Ok(Value::Int(*present.iter().max().unwrap())));
                prop_assert_eq!(fold(AggKind::First, &values), Ok(Value::Int(present[0])));
                prop_assert_eq!(fold(AggKind::Last, &values), Ok(Value::Int(present[n - 1])));
            }
        }

        #[test]
        fn float_sums_and_stddev_agree_with_naive(vals in proptest::collection::vec(-1.0e6f64..1.0e6, 1..100)) {
            let values: Vec<Value> = vals.iter().map(|v| Value::Float(*v)).collect();
            let n = vals.len() as f64;
            let total: f64 = vals.iter().sum();
            let mean = total / n;
            let ss: f64 = vals.iter().map(|x| (x - mean) * (x - mean)).sum();
            let Ok(Value::Float(sum)) = fold(AggKind::Sum, &values) else { panic!("float sum") };
            prop_assert!((sum - total).abs() <= 1e-6 * (1.0 + total.abs()));
            let Ok(Value::Float(avg)) = fold(AggKind::Avg, &values) else { panic!("float avg") };
            prop_assert!((avg - mean).abs() <= 1e-6 * (1.0 + mean.abs()));
            let Ok(Value::Float(sd)) = fold(AggKind::Stddev, &values) else { panic!("float stddev") };
            let naive = (ss / n).sqrt();
            prop_assert!((sd - naive).abs() <= 1e-6 * (1.0 + naive), "{} vs {}", sd, naive);
        }

        #[test]
        fn never_panics(vals in proptest::collection::vec(prop_oneof![
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            any::<bool>().prop_map(Value::Bool),
            ".{0,3}".prop_map(|s: String| Value::str(&s)),
            Just(Value::Null),
        ], 0..30)) {
            for k in ALL {
                let mut acc = Accumulator::new(k);
                for v in &vals {
                    let _ = acc.add(v);
                }
                let _ = acc.result();
            }
        }
    }
}
