//! Scalar functions: eKuiper's catalogue (names, arity, semantics), evaluated over [`Value`].
//!
//! Followed from eKuiper's implementation (`internal/binder/function/funcs_*.go`) and its
//! documentation (`docs/en_US/sqls/functions/*.md`); where the two disagree, or where eKuiper's
//! behaviour is an accident of Go (a panic, a wrap-around, an `Inf`), the choice is noted on the
//! function. The rules common to all:
//!
//! - A null argument makes the result null, except where eKuiper says otherwise: `concat`
//!   treats null as `""`, `startswith`/`endswith` give `false`, `indexof` gives `-1`,
//!   `length`/`numbytes` give `0`, `coalesce`/`isnull` look at nulls by design,
//!   `greatest`/`least` skip them.
//! - Numeric functions take bigint and float (never a string or a boolean). Where eKuiper
//!   wants an integer (`bitand`, `lpad`, `substring`, ...) a float with no fractional part is
//!   accepted, as eKuiper's strict integer conversion does.
//! - String functions convert a bigint, float or boolean argument to its text, as eKuiper
//!   does (`concat('t=', 21.5)` is `"t=21.5"`); floats print as Go's `%v` would.
//! - Integers stay integers where the result is exact: `abs`, `ceil`, `floor`, `round` and
//!   `mod` of bigints are bigints (eKuiper returns floats that print the same, and loses
//!   precision above 2^53). Integer overflow is an error, never a wrap or a panic.
//! - A float result that is not a number (`acos(2)`, `power(-8, 1/3)`) is null, as eKuiper's
//!   trigonometric functions do; an infinite one (`exp(1000)`, `cot(0)`) is an error, since
//!   it cannot be carried in JSON.
//! - Strings are indexed by characters (eKuiper indexes UTF-8 bytes, which is the same for
//!   ASCII and can cut a character in two otherwise).
//! - Nothing reads the clock: the time functions read [`Ctx::now_ms`], and times are
//!   formatted in UTC (eKuiper uses its configured time zone).
//!
//! Not provided: the random ones (`rand`, `newuuid`: rules must be deterministic), the regular
//! expressions (`regexp_*`: no regex engine here), `format` (locale tables), hashing, and the
//! array, object, JSON and datetime-arithmetic families, and the accumulating `acc_*`
//! functions. `window_start`, `window_end`, the aggregates ([`crate::aggregate`]) and the
//! analytic functions ([`crate::analytic`]: `lag`, `latest`, `had_changed`, `changed_col`)
//! are the planner's.
//!
//! Three names are extensions, not eKuiper's: `greatest`, `least` and `replace`.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::value::Value;

/// What a function may read besides its arguments (time is injected; never read the clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ctx {
    /// The current time, milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// One scalar function.
#[derive(Debug)]
pub struct Function {
    /// The function's lowercase eKuiper name.
    pub name: &'static str,
    /// The fewest arguments it takes.
    pub min_args: usize,
    /// The most arguments it takes; `None` for variadic.
    pub max_args: Option<usize>,
    /// Evaluates the function. `Err` is a run-time error naming the function and the bad
    /// argument (`round: argument 2 must be an integer, got string`). It does not check the
    /// arity (see [`Function::call`]) but never panics on any arguments.
    pub eval: fn(&Ctx, &[Value]) -> Result<Value, String>,
}

impl Function {
    /// Whether the function takes `n` arguments.
    pub fn accepts(&self, n: usize) -> bool {
        n >= self.min_args && self.max_args.is_none_or(|max| n <= max)
    }

    /// Checks the number of arguments, then evaluates.
    pub fn call(&self, ctx: &Ctx, args: &[Value]) -> Result<Value, String> {
        if !self.accepts(args.len()) {
            let expected = match self.max_args {
                Some(max) if max == self.min_args => format!("{max}"),
                Some(max) => format!("{} to {max}", self.min_args),
                None => format!("at least {}", self.min_args),
            };
            return Err(format!(
                "{}: expects {expected} argument{}, got {}",
                self.name,
                if self.max_args.unwrap_or(self.min_args) == 1 {
                    ""
                } else {
                    "s"
                },
                args.len()
            ));
        }
        (self.eval)(ctx, args)
    }
}

/// The function called `name` (case-insensitive), if it exists.
pub fn lookup(name: &str) -> Option<&'static Function> {
    FUNCTIONS.iter().find(|f| f.name.eq_ignore_ascii_case(name))
}

/// Every function name (for "unknown function, did you mean" messages).
pub fn names() -> impl Iterator<Item = &'static str> {
    FUNCTIONS.iter().map(|f| f.name)
}

type R = Result<Value, String>;

const fn f(
    name: &'static str,
    min_args: usize,
    max_args: Option<usize>,
    eval: fn(&Ctx, &[Value]) -> R,
) -> Function {
    Function {
        name,
        min_args,
        max_args,
        eval,
    }
}

/// The catalogue, sorted by name.
static FUNCTIONS: &[Function] = &[
    f("abs", 1, Some(1), abs),
    f("acos", 1, Some(1), acos),
    f("asin", 1, Some(1), asin),
    f("atan", 1, Some(1), atan),
    f("atan2", 2, Some(2), atan2),
    f("bitand", 2, Some(2), bitand),
    f("bitnot", 1, Some(1), bitnot),
    f("bitor", 2, Some(2), bitor),
    f("bitxor", 2, Some(2), bitxor),
    f("cast", 2, Some(2), cast),
    f("ceil", 1, Some(1), ceil),
    f("ceiling", 1, Some(1), ceiling),
    f("coalesce", 1, None, coalesce),
    f("concat", 1, None, concat),
    f("cos", 1, Some(1), cos),
    f("cosh", 1, Some(1), cosh),
    f("cot", 1, Some(1), cot),
    f("cur_date", 0, Some(0), cur_date),
    f("cur_time", 0, Some(1), cur_time),
    f("current_date", 0, Some(0), current_date),
    f("current_time", 0, Some(1), current_time),
    f("current_timestamp", 0, Some(1), current_timestamp),
    f("dec2hex", 1, Some(1), dec2hex),
    f("degrees", 1, Some(1), degrees),
    f("endswith", 2, Some(2), endswith),
    f("exp", 1, Some(1), exp),
    f("floor", 1, Some(1), floor),
    f("greatest", 1, None, greatest),
    f("hex2dec", 1, Some(1), hex2dec),
    f("indexof", 2, Some(2), indexof),
    f("isnull", 1, Some(1), isnull),
    f("least", 1, None, least),
    f("length", 1, Some(1), length),
    f("ln", 1, Some(1), ln),
    f("local_time", 0, Some(1), local_time),
    f("local_timestamp", 0, Some(1), local_timestamp),
    f("log", 1, Some(2), log),
    f("lower", 1, Some(1), lower),
    f("lpad", 2, Some(2), lpad),
    f("ltrim", 1, Some(1), ltrim),
    f("mod", 2, Some(2), modulo),
    f("now", 0, Some(1), now),
    f("numbytes", 1, Some(1), numbytes),
    f("pi", 0, Some(0), pi),
    f("pow", 2, Some(2), pow),
    f("power", 2, Some(2), power),
    f("radians", 1, Some(1), radians),
    f("replace", 3, Some(3), replace),
    f("reverse", 1, Some(1), reverse),
    f("round", 1, Some(2), round),
    f("rpad", 2, Some(2), rpad),
    f("rtrim", 1, Some(1), rtrim),
    f("sign", 1, Some(1), sign),
    f("sin", 1, Some(1), sin),
    f("sinh", 1, Some(1), sinh),
    f("split_value", 3, Some(3), split_value),
    f("sqrt", 1, Some(1), sqrt),
    f("startswith", 2, Some(2), startswith),
    f("substring", 2, Some(3), substring),
    f("tan", 1, Some(1), tan),
    f("tanh", 1, Some(1), tanh),
    f("trim", 1, Some(1), trim),
    f("tstamp", 0, Some(0), tstamp),
    f("upper", 1, Some(1), upper),
];

// ---------------------------------------------------------------------------------------------
// Argument helpers

static NULL: Value = Value::Null;

/// Argument `i`, null when missing (eval does not check arity; it must not panic either).
fn arg(args: &[Value], i: usize) -> &Value {
    args.get(i).unwrap_or(&NULL)
}

fn has_null(args: &[Value]) -> bool {
    args.iter().any(Value::is_null)
}

fn type_err(name: &str, i: usize, want: &str, got: &Value) -> String {
    format!(
        "{name}: argument {} must be {want}, got {}",
        i + 1,
        got.type_name()
    )
}

enum Num {
    I(i64),
    F(f64),
}

fn num(name: &str, args: &[Value], i: usize) -> Result<Num, String> {
    match arg(args, i) {
        Value::Int(v) => Ok(Num::I(*v)),
        Value::Float(v) => Ok(Num::F(*v)),
        other => Err(type_err(name, i, "a number", other)),
    }
}

fn float_arg(name: &str, args: &[Value], i: usize) -> Result<f64, String> {
    match num(name, args, i)? {
        Num::I(v) => Ok(v as f64),
        Num::F(v) => Ok(v),
    }
}

/// A float with no fractional part that fits a bigint.
fn integral(v: f64) -> Option<i64> {
    // 2^63 is exact as a float; every float in [-2^63, 2^63) converts exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (v.is_finite() && v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v)).then_some(v as i64)
}

/// An integer argument: a bigint, or a float with no fractional part (eKuiper's strict
/// integer conversion).
fn int_arg(name: &str, args: &[Value], i: usize) -> Result<i64, String> {
    let v = arg(args, i);
    match v {
        Value::Int(x) => Ok(*x),
        Value::Float(x) => integral(*x).ok_or_else(|| type_err(name, i, "an integer", v)),
        other => Err(type_err(name, i, "an integer", other)),
    }
}

/// A string argument, other scalars converted as eKuiper's `ToStringAlways` (Go's `%v`);
/// null is `""`.
fn str_arg(args: &[Value], i: usize) -> Cow<'_, str> {
    match arg(args, i) {
        Value::Str(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed(""),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Int(v) => Cow::Owned(v.to_string()),
        Value::Float(v) => Cow::Owned(go_float_v(*v)),
    }
}

/// A float result: not-a-number is null, infinite is an error.
fn float_result(name: &str, v: f64) -> R {
    if v.is_nan() {
        Ok(Value::Null)
    } else if v.is_infinite() {
        Err(format!("{name}: result out of range"))
    } else {
        Ok(Value::Float(v))
    }
}

fn count(n: usize) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Go's `fmt` `%v` of a float64: shortest representation, exponent form below 1e-4 and from
/// 1e21 (`1e+21`, `1e-05`).
fn go_float_v(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    let sci = format!("{v:e}");
    match sci.split_once('e').map(|(m, e)| (m, e.parse::<i32>())) {
        Some((mantissa, Ok(exp))) if !(-4..21).contains(&exp) => format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        ),
        _ => format!("{v}"),
    }
}

/// Go's `strconv.FormatFloat(v, 'f', -1, 64)` (eKuiper's cast to string).
fn go_float_f(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

// ---------------------------------------------------------------------------------------------
// Mathematical functions

fn unary_float(name: &str, args: &[Value], op: fn(f64) -> f64) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    float_result(name, op(float_arg(name, args, 0)?))
}

macro_rules! unary_float_fns {
    ($($id:ident = $name:literal, $op:expr;)*) => {$(
        fn $id(_: &Ctx, args: &[Value]) -> R {
            unary_float($name, args, $op)
        }
    )*};
}

unary_float_fns! {
    acos = "acos", f64::acos;
    asin = "asin", f64::asin;
    atan = "atan", f64::atan;
    cos = "cos", f64::cos;
    cosh = "cosh", f64::cosh;
    cot = "cot", |x: f64| 1.0 / x.tan();
    degrees = "degrees", f64::to_degrees;
    exp = "exp", f64::exp;
    radians = "radians", f64::to_radians;
    sin = "sin", f64::sin;
    sinh = "sinh", f64::sinh;
    tan = "tan", f64::tan;
    tanh = "tanh", f64::tanh;
}

/// `abs(x)`: bigint stays bigint (`abs` of the smallest bigint is an error).
fn abs(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    match num("abs", args, 0)? {
        Num::I(v) => v
            .checked_abs()
            .map(Value::Int)
            .ok_or_else(|| "abs: result out of range for bigint".to_owned()),
        Num::F(v) => float_result("abs", v.abs()),
    }
}

fn atan2(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let y = float_arg("atan2", args, 0)?;
    let x = float_arg("atan2", args, 1)?;
    float_result("atan2", y.atan2(x))
}

fn bitwise(name: &str, args: &[Value], op: fn(i64, i64) -> i64) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    Ok(Value::Int(op(
        int_arg(name, args, 0)?,
        int_arg(name, args, 1)?,
    )))
}

fn bitand(_: &Ctx, args: &[Value]) -> R {
    bitwise("bitand", args, |a, b| a & b)
}

fn bitor(_: &Ctx, args: &[Value]) -> R {
    bitwise("bitor", args, |a, b| a | b)
}

fn bitxor(_: &Ctx, args: &[Value]) -> R {
    bitwise("bitxor", args, |a, b| a ^ b)
}

fn bitnot(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    Ok(Value::Int(!int_arg("bitnot", args, 0)?))
}

/// `ceil`/`floor`: a bigint is returned as is; a float gives a float.
fn rounding(name: &str, args: &[Value], op: fn(f64) -> f64) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    match num(name, args, 0)? {
        Num::I(v) => Ok(Value::Int(v)),
        Num::F(v) => float_result(name, op(v)),
    }
}

fn ceil(_: &Ctx, args: &[Value]) -> R {
    rounding("ceil", args, f64::ceil)
}

fn ceiling(_: &Ctx, args: &[Value]) -> R {
    rounding("ceiling", args, f64::ceil)
}

fn floor(_: &Ctx, args: &[Value]) -> R {
    rounding("floor", args, f64::floor)
}

/// `ln(x)`: an error unless `x > 0` (eKuiper's).
fn ln(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let x = float_arg("ln", args, 0)?;
    if x.is_nan() || x <= 0.0 {
        return Err(format!(
            "ln: argument 1 must be a strictly positive number, got {}",
            go_float_v(x)
        ));
    }
    float_result("ln", x.ln())
}

/// `log(x)` is the decimal logarithm, `log(b, x)` the base-`b` one; null when `x <= 0` or
/// `b <= 1` (eKuiper's documentation; its code gives `-Inf` or an error instead).
fn log(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    if args.len() < 2 {
        let x = float_arg("log", args, 0)?;
        if x.is_nan() || x <= 0.0 {
            return Ok(Value::Null);
        }
        float_result("log", x.log10())
    } else {
        let b = float_arg("log", args, 0)?;
        let x = float_arg("log", args, 1)?;
        if x.is_nan() || x <= 0.0 || b.is_nan() || b <= 1.0 {
            return Ok(Value::Null);
        }
        float_result("log", x.ln() / b.ln())
    }
}

/// `mod(a, b)`: the remainder with the sign of `a`; bigints give a bigint; `b = 0` is an error
/// (eKuiper computes on floats and gives NaN).
fn modulo(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    match (num("mod", args, 0)?, num("mod", args, 1)?) {
        (Num::I(_), Num::I(0)) => Err("mod: division by zero".to_owned()),
        // `checked_rem` fails only for MIN % -1, whose remainder is 0.
        (Num::I(a), Num::I(b)) => Ok(Value::Int(a.checked_rem(b).unwrap_or(0))),
        (a, b) => {
            let a = match a {
                Num::I(v) => v as f64,
                Num::F(v) => v,
            };
            let b = match b {
                Num::I(v) => v as f64,
                Num::F(v) => v,
            };
            if b == 0.0 {
                return Err("mod: division by zero".to_owned());
            }
            float_result("mod", a % b)
        }
    }
}

fn pi(_: &Ctx, _: &[Value]) -> R {
    Ok(Value::Float(std::f64::consts::PI))
}

/// `power(a, b)`: always a float, as eKuiper.
fn powf(name: &str, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let a = float_arg(name, args, 0)?;
    let b = float_arg(name, args, 1)?;
    float_result(name, a.powf(b))
}

fn power(_: &Ctx, args: &[Value]) -> R {
    powf("power", args)
}

fn pow(_: &Ctx, args: &[Value]) -> R {
    powf("pow", args)
}

/// `round(x[, s])`: to `s` decimal places (0 by default; negative rounds to tens, hundreds,
/// ...), halves away from zero. A bigint gives a bigint, a float a float.
fn round(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let x = num("round", args, 0)?;
    let places = if args.len() > 1 {
        int_arg("round", args, 1)?
    } else {
        0
    };
    match x {
        Num::I(v) if places >= 0 => Ok(Value::Int(v)),
        Num::I(v) => {
            let k = places.unsigned_abs();
            if k > 38 {
                return Ok(Value::Int(0));
            }
            let unit = 10_i128.pow(k as u32);
            let v = i128::from(v);
            let mut q = v / unit;
            if (v % unit).abs() * 2 >= unit {
                q += v.signum();
            }
            i64::try_from(q * unit)
                .map(Value::Int)
                .map_err(|_| "round: result out of range for bigint".to_owned())
        }
        Num::F(v) => {
            // Beyond ±400 places every finite float rounds to itself or to zero.
            let places = places.clamp(-400, 400) as i32;
            let factor = 10_f64.powi(places);
            if factor == 0.0 {
                return float_result("round", 0.0 * v.signum());
            }
            let scaled = v * factor;
            if factor.is_infinite() || scaled.is_infinite() {
                // Only when `places > 0`: such a float has no fractional digits.
                return float_result("round", v);
            }
            float_result("round", scaled.round() / factor)
        }
    }
}

/// `sign(x)`: the bigint 1, 0 or -1.
fn sign(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    Ok(Value::Int(match num("sign", args, 0)? {
        Num::I(v) => v.signum(),
        Num::F(v) if v > 0.0 => 1,
        Num::F(v) if v < 0.0 => -1,
        Num::F(_) => 0,
    }))
}

/// `sqrt(x)`: an error when `x < 0` (eKuiper's).
fn sqrt(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let x = float_arg("sqrt", args, 0)?;
    if x.is_nan() || x < 0.0 {
        return Err(format!(
            "sqrt: argument 1 must be a positive number, got {}",
            go_float_v(x)
        ));
    }
    float_result("sqrt", x.sqrt())
}

/// `greatest`/`least` (extensions, not eKuiper's): the largest / smallest argument, nulls
/// (and NaN) skipped, null if there is none; arguments must be comparable with one another
/// (numbers with numbers, strings with strings, booleans with booleans). The winner keeps its
/// type.
fn extreme(name: &str, args: &[Value], want: Ordering) -> R {
    let mut best: Option<&Value> = None;
    for v in args {
        if v.is_null() || matches!(v, Value::Float(x) if x.is_nan()) {
            continue;
        }
        match best {
            None => best = Some(v),
            Some(b) => {
                if v.compare(b).map_err(|e| format!("{name}: {e}"))? == Some(want) {
                    best = Some(v);
                }
            }
        }
    }
    Ok(best.cloned().unwrap_or(Value::Null))
}

fn greatest(_: &Ctx, args: &[Value]) -> R {
    extreme("greatest", args, Ordering::Greater)
}

fn least(_: &Ctx, args: &[Value]) -> R {
    extreme("least", args, Ordering::Less)
}

// ---------------------------------------------------------------------------------------------
// String functions

/// The most spaces `lpad`/`rpad` add (eKuiper has no limit and warns about memory).
const MAX_PAD: i64 = 1 << 20;

fn unary_str(args: &[Value], op: fn(&str) -> String) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    Ok(Value::str(&op(&str_arg(args, 0))))
}

/// `concat(a, ...)`: nulls count as `""`.
fn concat(_: &Ctx, args: &[Value]) -> R {
    let mut out = String::new();
    for i in 0..args.len() {
        out.push_str(&str_arg(args, i));
    }
    Ok(Value::str(&out))
}

/// `endswith(s, suffix)`: false when either is null.
fn endswith(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Bool(false));
    }
    Ok(Value::Bool(str_arg(args, 0).ends_with(&*str_arg(args, 1))))
}

/// `startswith(s, prefix)`: false when either is null.
fn startswith(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Bool(false));
    }
    Ok(Value::Bool(
        str_arg(args, 0).starts_with(&*str_arg(args, 1)),
    ))
}

/// `indexof(s, sub)`: the 0-based character index of the first `sub`, -1 if absent or either
/// is null.
fn indexof(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Int(-1));
    }
    let s = str_arg(args, 0);
    let at = s
        .find(&*str_arg(args, 1))
        .and_then(|byte| s.get(..byte))
        .map_or(-1, |before| {
            i64::try_from(before.chars().count()).unwrap_or(i64::MAX)
        });
    Ok(Value::Int(at))
}

/// `length(s)`: the number of characters; 0 for null.
fn length(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Int(0));
    }
    Ok(count(str_arg(args, 0).chars().count()))
}

/// `numbytes(s)`: the length of the UTF-8 encoding; 0 for null.
fn numbytes(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Int(0));
    }
    Ok(count(str_arg(args, 0).len()))
}

fn lower(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, str::to_lowercase)
}

fn upper(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, str::to_uppercase)
}

fn trim(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, |s| s.trim().to_owned())
}

fn ltrim(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, |s| s.trim_start().to_owned())
}

fn rtrim(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, |s| s.trim_end().to_owned())
}

fn reverse(_: &Ctx, args: &[Value]) -> R {
    unary_str(args, |s| s.chars().rev().collect())
}

/// `lpad(s, n)`/`rpad(s, n)`: `s` with `n` spaces added (not padded to width `n`: eKuiper's).
fn pad(name: &str, args: &[Value], left: bool) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let s = str_arg(args, 0);
    let n = int_arg(name, args, 1)?;
    if !(0..=MAX_PAD).contains(&n) {
        return Err(format!(
            "{name}: argument 2 must be between 0 and {MAX_PAD}, got {n}"
        ));
    }
    let spaces = " ".repeat(usize::try_from(n).unwrap_or(0));
    Ok(Value::str(&if left {
        spaces + &s
    } else {
        format!("{s}{spaces}")
    }))
}

fn lpad(_: &Ctx, args: &[Value]) -> R {
    pad("lpad", args, true)
}

fn rpad(_: &Ctx, args: &[Value]) -> R {
    pad("rpad", args, false)
}

/// `replace(s, from, to)` (an extension, not eKuiper's): every `from` replaced by `to`; an
/// empty `from` leaves `s` as is.
fn replace(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let s = str_arg(args, 0);
    let from = str_arg(args, 1);
    if from.is_empty() {
        return Ok(Value::str(&s));
    }
    Ok(Value::str(&s.replace(&*from, &str_arg(args, 2))))
}

/// `substring(s, start[, end])`: characters `start` (0-based, inclusive) to `end` (exclusive,
/// to the end by default). Negative indices, or `start > end`, are errors; indices past the
/// end are clamped (eKuiper's; its documentation calls the third argument a length, its code
/// an end index).
fn substring(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let s = str_arg(args, 0);
    let start = int_arg("substring", args, 1)?;
    if start < 0 {
        return Err(format!(
            "substring: argument 2 (start) must not be negative, got {start}"
        ));
    }
    let end = if args.len() > 2 {
        let end = int_arg("substring", args, 2)?;
        if end < 0 {
            return Err(format!(
                "substring: argument 3 (end) must not be negative, got {end}"
            ));
        }
        if start > end {
            return Err(format!(
                "substring: start {start} must not be greater than end {end}"
            ));
        }
        Some(end)
    } else {
        None
    };
    let skip = usize::try_from(start).unwrap_or(usize::MAX);
    let chars = s.chars().skip(skip);
    let out: String = match end {
        Some(end) => chars
            .take(usize::try_from(end - start).unwrap_or(usize::MAX))
            .collect(),
        None => chars.collect(),
    };
    Ok(Value::str(&out))
}

/// `split_value(s, sep, i)`: part `i` of `s` split at every `sep` (negative `i` counts from the
/// end); an empty `sep` splits into characters; out of range is an error.
fn split_value(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let s = str_arg(args, 0);
    let sep = str_arg(args, 1);
    let i = int_arg("split_value", args, 2)?;
    let parts: Vec<Cow<'_, str>> = if sep.is_empty() {
        s.chars().map(|c| Cow::Owned(c.to_string())).collect()
    } else {
        s.split(&*sep).map(Cow::Borrowed).collect()
    };
    let n = i64::try_from(parts.len()).unwrap_or(i64::MAX);
    let at = if i < 0 { i.checked_add(n) } else { Some(i) };
    at.and_then(|at| usize::try_from(at).ok())
        .and_then(|at| parts.get(at))
        .map(|p| Value::str(p))
        .ok_or_else(|| format!("split_value: index {i} out of range ({n} parts)"))
}

// ---------------------------------------------------------------------------------------------
// Conversion functions

/// Go's `strconv.ParseInt(s, 0, 64)`: optional sign, `0x`/`0o`/`0b` prefixes, a leading `0`
/// for octal, `_` between digits.
fn go_parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        b => (false, b),
    };
    let (base, digits): (u64, &[u8]) = match body {
        [] => return None,
        [b'0', p, rest @ ..] if !rest.is_empty() && p.eq_ignore_ascii_case(&b'x') => (16, rest),
        [b'0', p, rest @ ..] if !rest.is_empty() && p.eq_ignore_ascii_case(&b'o') => (8, rest),
        [b'0', p, rest @ ..] if !rest.is_empty() && p.eq_ignore_ascii_case(&b'b') => (2, rest),
        [b'0', rest @ ..] => (8, rest),
        b => (10, b),
    };
    let mut n: u64 = 0;
    let mut underscores = false;
    for &c in digits {
        let d = match c {
            b'_' => {
                underscores = true;
                continue;
            }
            b'0'..=b'9' => c - b'0',
            b'a'..=b'z' => c - b'a' + 10,
            b'A'..=b'Z' => c - b'A' + 10,
            _ => return None,
        };
        if u64::from(d) >= base {
            return None;
        }
        n = n.checked_mul(base)?.checked_add(u64::from(d))?;
    }
    if underscores && !go_underscore_ok(body) {
        return None;
    }
    if neg {
        i64::try_from(-i128::from(n)).ok()
    } else {
        i64::try_from(n).ok()
    }
}

/// Go's `strconv.underscoreOK`: underscores only between digits (or after a base prefix).
fn go_underscore_ok(s: &[u8]) -> bool {
    let mut saw = b'^';
    let mut hex = false;
    let mut rest = s;
    if let [b'0', p, tail @ ..] = s {
        let p = p.to_ascii_lowercase();
        if matches!(p, b'b' | b'o' | b'x') {
            saw = b'0';
            hex = p == b'x';
            rest = tail;
        }
    }
    for &c in rest {
        if c.is_ascii_digit() || (hex && c.is_ascii_hexdigit()) {
            saw = b'0';
        } else if c == b'_' {
            if saw != b'0' {
                return false;
            }
            saw = b'_';
        } else if saw == b'_' {
            return false;
        } else {
            saw = b'!';
        }
    }
    saw != b'_'
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `cast(x, type)` with `type` one of `"bigint"`, `"float"`, `"string"`, `"boolean"`
/// (case-insensitive here), eKuiper's conversions:
///
/// - bigint: floats truncate toward zero (an error when out of range); booleans are 1/0;
///   strings parse as Go integer literals (`"42"`, `"-7"`, `"0x1F"`, `"0b101"`, `"0o17"`,
///   `"017"` octal, `"1_000"`), so `"1.5"` and `"abc"` are errors.
/// - float: bigints convert; booleans are 1.0/0.0; strings parse as decimal floats
///   (`"1.5"`, `"-2e3"`); non-finite results are errors (Go would accept `"NaN"`, `"Inf"`).
/// - string: numbers print in full decimal notation (`1e21` is `"1000000000000000000000"`),
///   booleans as `true`/`false`.
/// - boolean: numbers are true when non-zero; strings as Go's `ParseBool` (`1`, `t`, `T`,
///   `TRUE`, `true`, `True` and their false counterparts), anything else an error.
///
/// `datetime` and `bytea` have no value here and are errors.
fn cast(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let v = arg(args, 0);
    let ty = match arg(args, 1) {
        Value::Str(t) => t.to_ascii_lowercase(),
        other => {
            return Err(type_err(
                "cast",
                1,
                "a type name string (bigint, float, string, boolean)",
                other,
            ));
        }
    };
    let fail = || {
        let shown = match v {
            Value::Str(s) => format!("{s:?}"),
            other => other.to_string(),
        };
        Err(format!(
            "cast: cannot convert {} {shown} to {ty}",
            v.type_name()
        ))
    };
    match ty.as_str() {
        "bigint" => match v {
            Value::Int(i) => Ok(Value::Int(*i)),
            Value::Float(x) => {
                const LIMIT: f64 = 9_223_372_036_854_775_808.0;
                if x.is_finite() && x.trunc() >= -LIMIT && x.trunc() < LIMIT {
                    Ok(Value::Int(x.trunc() as i64))
                } else {
                    fail()
                }
            }
            Value::Bool(b) => Ok(Value::Int(i64::from(*b))),
            Value::Str(s) => go_parse_int(s).map_or_else(fail, |i| Ok(Value::Int(i))),
            Value::Null => Ok(Value::Null),
        },
        "float" => match v {
            Value::Int(i) => Ok(Value::Float(*i as f64)),
            Value::Float(x) => Ok(Value::Float(*x)),
            Value::Bool(b) => Ok(Value::Float(if *b { 1.0 } else { 0.0 })),
            Value::Str(s) => match s.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Value::Float(x)),
                _ => fail(),
            },
            Value::Null => Ok(Value::Null),
        },
        "string" => Ok(match v {
            Value::Float(x) => Value::str(&go_float_f(*x)),
            Value::Str(s) => Value::Str(s.clone()),
            other => Value::str(&other.to_string()),
        }),
        "boolean" => match v {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            Value::Int(i) => Ok(Value::Bool(*i != 0)),
            Value::Float(x) => Ok(Value::Bool(*x != 0.0)),
            Value::Str(s) => go_parse_bool(s).map_or_else(fail, |b| Ok(Value::Bool(b))),
            Value::Null => Ok(Value::Null),
        },
        "datetime" | "bytea" => Err(format!("cast: type {ty} is not supported")),
        _ => Err(format!(
            "cast: unknown type {ty:?}, expected bigint, float, string or boolean"
        )),
    }
}

/// `hex2dec(s)`: the bigint written in hexadecimal by the string `s` (`"0x10"` or `"10"`).
fn hex2dec(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let s = match arg(args, 0) {
        Value::Str(s) => s,
        other => return Err(type_err("hex2dec", 0, "a string", other)),
    };
    let hex = s.strip_prefix("0x").unwrap_or(s);
    i64::from_str_radix(hex, 16)
        .map(Value::Int)
        .map_err(|_| format!("hex2dec: invalid hexadecimal value {hex:?}"))
}

/// `dec2hex(n)`: `"0x"` and the hexadecimal digits of `n` (`"0x-1a"` for -26, as Go prints).
fn dec2hex(_: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let n = int_arg("dec2hex", args, 0)?;
    let sign = if n < 0 { "-" } else { "" };
    Ok(Value::str(&format!("0x{sign}{:x}", n.unsigned_abs())))
}

// ---------------------------------------------------------------------------------------------
// Date and time functions

/// UTC calendar fields of a Unix time in milliseconds.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    micros: u64,
}

fn civil(ms: u64) -> Civil {
    const DAY_MS: u64 = 86_400_000;
    let of_day = ms % DAY_MS;
    // At most u64::MAX / 86_400_000, about 2.1e11: fits.
    let days = i64::try_from(ms / DAY_MS).unwrap_or(i64::MAX / 2);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month: u32::try_from(month).unwrap_or(0),
        day: u32::try_from(day).unwrap_or(0),
        hour: of_day / 3_600_000,
        minute: of_day / 60_000 % 60,
        second: of_day / 1000 % 60,
        micros: of_day % 1000 * 1000,
    }
}

/// The fractional-second digits asked for: `fsp` 1 to 6 gives that many digits, anything else
/// none (eKuiper's).
fn fsp_arg(name: &str, args: &[Value]) -> Result<Option<usize>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    let fsp = int_arg(name, args, 0)?;
    Ok((1..=6)
        .contains(&fsp)
        .then(|| usize::try_from(fsp).unwrap_or(0)))
}

fn clock_text(c: &Civil, fsp: Option<usize>) -> String {
    let mut out = format!("{:02}:{:02}:{:02}", c.hour, c.minute, c.second);
    if let Some(digits) = fsp {
        let fraction = format!("{:06}", c.micros);
        out.push('.');
        out.push_str(fraction.get(..digits).unwrap_or(&fraction));
    }
    out
}

fn date_text(c: &Civil) -> String {
    format!("{:04}-{:02}-{:02}", c.year, c.month, c.day)
}

/// `now([fsp])` and its synonyms: the current UTC time as `"YYYY-MM-DD HH:mm:ss"`, with `fsp`
/// (1 to 6) fractional-second digits. A string, as eKuiper's (use `tstamp()` for a number).
fn datetime_now(name: &str, ctx: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let fsp = fsp_arg(name, args)?;
    let c = civil(ctx.now_ms);
    Ok(Value::str(&format!(
        "{} {}",
        date_text(&c),
        clock_text(&c, fsp)
    )))
}

fn now(ctx: &Ctx, args: &[Value]) -> R {
    datetime_now("now", ctx, args)
}

fn current_timestamp(ctx: &Ctx, args: &[Value]) -> R {
    datetime_now("current_timestamp", ctx, args)
}

fn local_time(ctx: &Ctx, args: &[Value]) -> R {
    datetime_now("local_time", ctx, args)
}

fn local_timestamp(ctx: &Ctx, args: &[Value]) -> R {
    datetime_now("local_timestamp", ctx, args)
}

/// `cur_date()`, `current_date()`: the current UTC date as `"YYYY-MM-DD"`.
fn cur_date(ctx: &Ctx, _: &[Value]) -> R {
    Ok(Value::str(&date_text(&civil(ctx.now_ms))))
}

fn current_date(ctx: &Ctx, args: &[Value]) -> R {
    cur_date(ctx, args)
}

/// `cur_time([fsp])`, `current_time([fsp])`: the current UTC time of day as `"HH:mm:ss"`.
fn time_of_day(name: &str, ctx: &Ctx, args: &[Value]) -> R {
    if has_null(args) {
        return Ok(Value::Null);
    }
    let fsp = fsp_arg(name, args)?;
    Ok(Value::str(&clock_text(&civil(ctx.now_ms), fsp)))
}

fn cur_time(ctx: &Ctx, args: &[Value]) -> R {
    time_of_day("cur_time", ctx, args)
}

fn current_time(ctx: &Ctx, args: &[Value]) -> R {
    time_of_day("current_time", ctx, args)
}

/// `tstamp()`: the current time, bigint milliseconds since the Unix epoch.
fn tstamp(ctx: &Ctx, _: &[Value]) -> R {
    i64::try_from(ctx.now_ms)
        .map(Value::Int)
        .map_err(|_| "tstamp: time out of range".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Other functions

/// `coalesce(a, ...)`: the first argument that is not null, else null.
fn coalesce(_: &Ctx, args: &[Value]) -> R {
    Ok(args
        .iter()
        .find(|v| !v.is_null())
        .cloned()
        .unwrap_or(Value::Null))
}

/// `isnull(x)`: whether `x` is null.
fn isnull(_: &Ctx, args: &[Value]) -> R {
    Ok(Value::Bool(arg(args, 0).is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const CTX: Ctx = Ctx {
        // 2023-11-14T22:13:20.123Z
        now_ms: 1_700_000_000_123,
    };

    fn i(v: i64) -> Value {
        Value::Int(v)
    }
    fn fl(v: f64) -> Value {
        Value::Float(v)
    }
    fn s(v: &str) -> Value {
        Value::str(v)
    }
    fn b(v: bool) -> Value {
        Value::Bool(v)
    }
    const N: Value = Value::Null;

    fn call(name: &str, args: &[Value]) -> R {
        let func = lookup(name).unwrap_or_else(|| panic!("no function {name}"));
        func.call(&CTX, args)
    }

    fn same(got: &Value, want: &Value) -> bool {
        match (got, want) {
            (Value::Float(g), Value::Float(w)) => {
                g == w || (g - w).abs() <= 1e-12 * w.abs().max(1.0)
            }
            _ => got == want,
        }
    }

    /// (function, arguments, expected result).
    fn ok_cases() -> Vec<(&'static str, Vec<Value>, Value)> {
        use std::f64::consts::{E, FRAC_PI_2, FRAC_PI_4, PI};
        vec![
            // math
            ("abs", vec![i(-5)], i(5)),
            ("abs", vec![i(i64::MAX)], i(i64::MAX)),
            ("abs", vec![fl(-2.5)], fl(2.5)),
            ("abs", vec![N], N),
            ("acos", vec![i(1)], fl(0.0)),
            ("acos", vec![fl(2.0)], N),
            ("asin", vec![i(1)], fl(FRAC_PI_2)),
            ("asin", vec![fl(-1.5)], N),
            ("atan", vec![i(1)], fl(FRAC_PI_4)),
            ("atan", vec![N], N),
            ("atan2", vec![i(1), i(1)], fl(FRAC_PI_4)),
            ("atan2", vec![N, i(1)], N),
            ("bitand", vec![i(12), i(10)], i(8)),
            ("bitand", vec![fl(12.0), i(10)], i(8)),
            ("bitand", vec![i(1), N], N),
            ("bitor", vec![i(12), i(10)], i(14)),
            ("bitxor", vec![i(12), i(10)], i(6)),
            ("bitnot", vec![i(0)], i(-1)),
            ("bitnot", vec![i(i64::MIN)], i(i64::MAX)),
            ("bitnot", vec![N], N),
            ("ceil", vec![fl(1.2)], fl(2.0)),
            ("ceil", vec![fl(-1.2)], fl(-1.0)),
            ("ceil", vec![i(7)], i(7)),
            ("ceiling", vec![fl(1.2)], fl(2.0)),
            ("ceiling", vec![N], N),
            ("cos", vec![i(0)], fl(1.0)),
            ("cosh", vec![i(0)], fl(1.0)),
            ("cot", vec![fl(FRAC_PI_4)], fl(1.0)),
            ("degrees", vec![fl(PI)], fl(180.0)),
            ("exp", vec![i(1)], fl(E)),
            ("exp", vec![N], N),
            ("floor", vec![fl(1.8)], fl(1.0)),
            ("floor", vec![fl(-1.2)], fl(-2.0)),
            ("floor", vec![i(-3)], i(-3)),
            ("floor", vec![fl(f64::NAN)], N),
            ("ln", vec![fl(E)], fl(1.0)),
            ("ln", vec![N], N),
            ("log", vec![i(1000)], fl(3.0)),
            ("log", vec![i(0)], N),
            ("log", vec![i(-10)], N),
            ("log", vec![i(2), i(8)], fl(3.0)),
            ("log", vec![i(1), i(8)], N),
            ("log", vec![i(2), i(0)], N),
            ("log", vec![N, i(8)], N),
            ("mod", vec![i(7), i(3)], i(1)),
            ("mod", vec![i(-7), i(3)], i(-1)),
            ("mod", vec![i(i64::MIN), i(-1)], i(0)),
            ("mod", vec![fl(7.5), i(2)], fl(1.5)),
            ("mod", vec![N, i(0)], N),
            ("pi", vec![], fl(PI)),
            ("power", vec![i(2), i(10)], fl(1024.0)),
            ("power", vec![i(2), i(-1)], fl(0.5)),
            ("power", vec![i(-8), fl(1.0 / 3.0)], N),
            ("power", vec![N, i(2)], N),
            ("pow", vec![i(3), i(2)], fl(9.0)),
            ("radians", vec![i(180)], fl(PI)),
            ("round", vec![fl(42.4)], fl(42.0)),
            ("round", vec![fl(42.5)], fl(43.0)),
            ("round", vec![fl(-42.5)], fl(-43.0)),
            ("round", vec![fl(42.4382), i(2)], fl(42.44)),
            ("round", vec![fl(1234.5), i(-2)], fl(1200.0)),
            ("round", vec![fl(1.5), i(1000)], fl(1.5)),
            ("round", vec![fl(1e300), i(-1000)], fl(0.0)),
            ("round", vec![fl(1.7e308), i(5)], fl(1.7e308)),
            ("round", vec![fl(2.5), fl(0.0)], fl(3.0)),
            ("round", vec![i(42)], i(42)),
            ("round", vec![i(42), i(3)], i(42)),
            ("round", vec![i(1250), i(-2)], i(1300)),
            ("round", vec![i(-1250), i(-2)], i(-1300)),
            ("round", vec![i(1249), i(-2)], i(1200)),
            ("round", vec![i(5), i(-100)], i(0)),
            ("round", vec![N], N),
            ("round", vec![fl(1.5), N], N),
            ("sign", vec![i(-3)], i(-1)),
            ("sign", vec![fl(0.0)], i(0)),
            ("sign", vec![fl(2.5)], i(1)),
            ("sign", vec![N], N),
            ("sin", vec![fl(FRAC_PI_2)], fl(1.0)),
            ("sinh", vec![i(0)], fl(0.0)),
            ("sqrt", vec![i(16)], fl(4.0)),
            ("sqrt", vec![N], N),
            ("tan", vec![fl(FRAC_PI_4)], fl(1.0)),
            ("tanh", vec![i(0)], fl(0.0)),
            ("greatest", vec![i(1), fl(2.5), i(2)], fl(2.5)),
            ("greatest", vec![i(3), N, fl(2.5)], i(3)),
            ("greatest", vec![s("a"), s("b")], s("b")),
            ("greatest", vec![N, N], N),
            ("greatest", vec![fl(f64::NAN), i(1)], i(1)),
            ("least", vec![i(1), fl(0.5), i(2)], fl(0.5)),
            ("least", vec![N, i(4)], i(4)),
            // string
            ("concat", vec![s("a"), s("b"), s("c")], s("abc")),
            ("concat", vec![s("t="), fl(21.5)], s("t=21.5")),
            ("concat", vec![s("x"), N, i(1), b(true)], s("x1true")),
            ("concat", vec![fl(1e21), s(" "), fl(1e-5)], s("1e+21 1e-05")),
            ("concat", vec![N], s("")),
            ("endswith", vec![s("hello"), s("lo")], b(true)),
            ("endswith", vec![s("hello"), s("he")], b(false)),
            ("endswith", vec![N, s("x")], b(false)),
            ("startswith", vec![s("hello"), s("he")], b(true)),
            ("startswith", vec![s("hello"), N], b(false)),
            ("indexof", vec![s("hello"), s("l")], i(2)),
            ("indexof", vec![s("héllo"), s("l")], i(2)),
            ("indexof", vec![s("hello"), s("z")], i(-1)),
            ("indexof", vec![s("hello"), s("")], i(0)),
            ("indexof", vec![N, s("z")], i(-1)),
            ("length", vec![s("héllo")], i(5)),
            ("length", vec![i(123)], i(3)),
            ("length", vec![N], i(0)),
            ("numbytes", vec![s("héllo")], i(6)),
            ("numbytes", vec![N], i(0)),
            ("lower", vec![s("HeLLo")], s("hello")),
            ("lower", vec![N], N),
            ("upper", vec![s("héllo")], s("HÉLLO")),
            ("upper", vec![b(true)], s("TRUE")),
            ("lpad", vec![s("ab"), i(2)], s("  ab")),
            ("lpad", vec![s("ab"), i(0)], s("ab")),
            ("lpad", vec![N, i(2)], N),
            ("rpad", vec![s("ab"), i(2)], s("ab  ")),
            ("rpad", vec![s("ab"), N], N),
            ("ltrim", vec![s(" \t ab  ")], s("ab  ")),
            ("rtrim", vec![s("  ab \n")], s("  ab")),
            ("trim", vec![s("\t ab  ")], s("ab")),
            ("trim", vec![N], N),
            ("replace", vec![s("a-b-c"), s("-"), s("+")], s("a+b+c")),
            ("replace", vec![s("abc"), s(""), s("+")], s("abc")),
            ("replace", vec![s("abc"), N, s("+")], N),
            ("reverse", vec![s("héllo")], s("olléh")),
            ("reverse", vec![N], N),
            ("substring", vec![s("hello"), i(1)], s("ello")),
            ("substring", vec![s("hello"), i(1), i(3)], s("el")),
            ("substring", vec![s("héllo"), i(1), i(2)], s("é")),
            ("substring", vec![s("hello"), i(9)], s("")),
            ("substring", vec![s("hello"), i(2), i(99)], s("llo")),
            ("substring", vec![s("hello"), i(2), i(2)], s("")),
            ("substring", vec![N, i(1)], N),
            (
                "split_value",
                vec![s("/test/device001/message"), s("/"), i(0)],
                s(""),
            ),
            (
                "split_value",
                vec![s("/test/device001/message"), s("/"), i(3)],
                s("message"),
            ),
            ("split_value", vec![s("a,b,c"), s(","), i(-1)], s("c")),
            ("split_value", vec![s("a,b,c"), s(","), i(-3)], s("a")),
            ("split_value", vec![s("héllo"), s(""), i(1)], s("é")),
            ("split_value", vec![N, s(","), i(0)], N),
            // conversion
            ("cast", vec![s("1.5"), s("float")], fl(1.5)),
            ("cast", vec![s("-2e3"), s("float")], fl(-2000.0)),
            ("cast", vec![i(3), s("float")], fl(3.0)),
            ("cast", vec![b(true), s("float")], fl(1.0)),
            ("cast", vec![fl(2.5), s("float")], fl(2.5)),
            ("cast", vec![s("42"), s("bigint")], i(42)),
            ("cast", vec![s("-42"), s("bigint")], i(-42)),
            ("cast", vec![s("+7"), s("bigint")], i(7)),
            ("cast", vec![s("0x1F"), s("bigint")], i(31)),
            ("cast", vec![s("0b101"), s("bigint")], i(5)),
            ("cast", vec![s("0o17"), s("bigint")], i(15)),
            ("cast", vec![s("017"), s("bigint")], i(15)),
            ("cast", vec![s("0"), s("bigint")], i(0)),
            ("cast", vec![s("1_000"), s("bigint")], i(1000)),
            (
                "cast",
                vec![s("-9223372036854775808"), s("bigint")],
                i(i64::MIN),
            ),
            ("cast", vec![fl(2.9), s("bigint")], i(2)),
            ("cast", vec![fl(-2.9), s("bigint")], i(-2)),
            ("cast", vec![b(true), s("bigint")], i(1)),
            ("cast", vec![b(false), s("bigint")], i(0)),
            ("cast", vec![i(5), s("BIGINT")], i(5)),
            ("cast", vec![i(42), s("string")], s("42")),
            ("cast", vec![fl(1.5), s("string")], s("1.5")),
            ("cast", vec![fl(2.0), s("string")], s("2")),
            (
                "cast",
                vec![fl(1e21), s("string")],
                s("1000000000000000000000"),
            ),
            ("cast", vec![b(false), s("string")], s("false")),
            ("cast", vec![s("x"), s("string")], s("x")),
            ("cast", vec![i(2), s("boolean")], b(true)),
            ("cast", vec![i(0), s("boolean")], b(false)),
            ("cast", vec![fl(0.0), s("boolean")], b(false)),
            ("cast", vec![s("true"), s("boolean")], b(true)),
            ("cast", vec![s("F"), s("boolean")], b(false)),
            ("cast", vec![s("1"), s("boolean")], b(true)),
            ("cast", vec![N, s("bigint")], N),
            ("cast", vec![i(1), N], N),
            ("hex2dec", vec![s("0x10")], i(16)),
            ("hex2dec", vec![s("ff")], i(255)),
            ("hex2dec", vec![N], N),
            ("dec2hex", vec![i(16)], s("0x10")),
            ("dec2hex", vec![i(-26)], s("0x-1a")),
            ("dec2hex", vec![N], N),
            // time
            ("now", vec![], s("2023-11-14 22:13:20")),
            ("now", vec![i(3)], s("2023-11-14 22:13:20.123")),
            ("now", vec![i(1)], s("2023-11-14 22:13:20.1")),
            ("now", vec![i(6)], s("2023-11-14 22:13:20.123000")),
            ("now", vec![i(9)], s("2023-11-14 22:13:20")),
            ("now", vec![N], N),
            ("current_timestamp", vec![], s("2023-11-14 22:13:20")),
            ("local_time", vec![i(2)], s("2023-11-14 22:13:20.12")),
            ("local_timestamp", vec![], s("2023-11-14 22:13:20")),
            ("cur_date", vec![], s("2023-11-14")),
            ("current_date", vec![], s("2023-11-14")),
            ("cur_time", vec![], s("22:13:20")),
            ("current_time", vec![i(3)], s("22:13:20.123")),
            ("tstamp", vec![], i(1_700_000_000_123)),
            // other
            ("coalesce", vec![N, N, i(3), i(4)], i(3)),
            ("coalesce", vec![N, N], N),
            ("coalesce", vec![s("a")], s("a")),
            ("isnull", vec![N], b(true)),
            ("isnull", vec![i(0)], b(false)),
            ("isnull", vec![s("")], b(false)),
        ]
    }

    /// (function, arguments, words the error must contain).
    fn err_cases() -> Vec<(&'static str, Vec<Value>, &'static str)> {
        vec![
            (
                "abs",
                vec![s("x")],
                "abs: argument 1 must be a number, got string",
            ),
            (
                "abs",
                vec![b(true)],
                "abs: argument 1 must be a number, got bool",
            ),
            ("abs", vec![i(i64::MIN)], "abs: result out of range"),
            (
                "acos",
                vec![s("1")],
                "acos: argument 1 must be a number, got string",
            ),
            (
                "atan2",
                vec![i(1), s("1")],
                "atan2: argument 2 must be a number",
            ),
            (
                "bitand",
                vec![fl(1.5), i(1)],
                "bitand: argument 1 must be an integer, got float",
            ),
            (
                "bitor",
                vec![i(1), s("1")],
                "bitor: argument 2 must be an integer, got string",
            ),
            (
                "bitxor",
                vec![b(true), i(1)],
                "bitxor: argument 1 must be an integer, got bool",
            ),
            (
                "bitnot",
                vec![fl(f64::NAN)],
                "bitnot: argument 1 must be an integer, got float",
            ),
            ("ceil", vec![s("1")], "ceil: argument 1 must be a number"),
            (
                "ceiling",
                vec![s("1")],
                "ceiling: argument 1 must be a number",
            ),
            ("cosh", vec![i(1000)], "cosh: result out of range"),
            ("cot", vec![i(0)], "cot: result out of range"),
            ("exp", vec![i(1000)], "exp: result out of range"),
            (
                "floor",
                vec![b(false)],
                "floor: argument 1 must be a number, got bool",
            ),
            (
                "ln",
                vec![i(0)],
                "ln: argument 1 must be a strictly positive number, got 0",
            ),
            (
                "ln",
                vec![fl(-1.5)],
                "ln: argument 1 must be a strictly positive number, got -1.5",
            ),
            ("log", vec![s("1")], "log: argument 1 must be a number"),
            ("mod", vec![i(1), i(0)], "mod: division by zero"),
            ("mod", vec![fl(1.0), fl(0.0)], "mod: division by zero"),
            (
                "mod",
                vec![s("1"), i(2)],
                "mod: argument 1 must be a number",
            ),
            ("power", vec![i(0), i(-1)], "power: result out of range"),
            ("pow", vec![i(10), i(400)], "pow: result out of range"),
            (
                "round",
                vec![fl(1.5), s("2")],
                "round: argument 2 must be an integer, got string",
            ),
            (
                "round",
                vec![fl(1.5), fl(0.5)],
                "round: argument 2 must be an integer, got float",
            ),
            (
                "round",
                vec![s("1.5")],
                "round: argument 1 must be a number, got string",
            ),
            (
                "round",
                vec![i(i64::MAX), i(-1)],
                "round: result out of range",
            ),
            ("sign", vec![s("-1")], "sign: argument 1 must be a number"),
            (
                "sqrt",
                vec![i(-4)],
                "sqrt: argument 1 must be a positive number, got -4",
            ),
            ("sinh", vec![i(1000)], "sinh: result out of range"),
            ("greatest", vec![i(1), s("a")], "greatest: cannot compare"),
            ("least", vec![b(true), i(1)], "least: cannot compare"),
            (
                "lpad",
                vec![s("a"), s("2")],
                "lpad: argument 2 must be an integer, got string",
            ),
            (
                "lpad",
                vec![s("a"), i(-1)],
                "lpad: argument 2 must be between 0 and",
            ),
            (
                "rpad",
                vec![s("a"), i(i64::MAX)],
                "rpad: argument 2 must be between 0 and",
            ),
            (
                "substring",
                vec![s("abc"), i(-1)],
                "substring: argument 2 (start) must not be negative",
            ),
            (
                "substring",
                vec![s("abc"), i(0), i(-1)],
                "substring: argument 3 (end) must not be negative",
            ),
            (
                "substring",
                vec![s("abc"), i(2), i(1)],
                "substring: start 2 must not be greater than end 1",
            ),
            (
                "substring",
                vec![s("abc"), fl(0.5)],
                "substring: argument 2 must be an integer, got float",
            ),
            (
                "split_value",
                vec![s("a,b"), s(","), i(2)],
                "split_value: index 2 out of range (2 parts)",
            ),
            (
                "split_value",
                vec![s("a,b"), s(","), i(-3)],
                "split_value: index -3 out of range",
            ),
            (
                "split_value",
                vec![s("a,b"), s(","), i(i64::MIN)],
                "split_value: index",
            ),
            (
                "split_value",
                vec![s("a,b"), s(","), s("0")],
                "split_value: argument 3 must be an integer",
            ),
            (
                "cast",
                vec![s("abc"), s("bigint")],
                "cast: cannot convert string \"abc\" to bigint",
            ),
            (
                "cast",
                vec![s("1.5"), s("bigint")],
                "cast: cannot convert string \"1.5\" to bigint",
            ),
            ("cast", vec![s("1_"), s("bigint")], "cast: cannot convert"),
            ("cast", vec![s("_1"), s("bigint")], "cast: cannot convert"),
            ("cast", vec![s("0x"), s("bigint")], "cast: cannot convert"),
            ("cast", vec![s(""), s("bigint")], "cast: cannot convert"),
            (
                "cast",
                vec![s("9223372036854775808"), s("bigint")],
                "cast: cannot convert",
            ),
            (
                "cast",
                vec![fl(1e19), s("bigint")],
                "cast: cannot convert float",
            ),
            (
                "cast",
                vec![fl(f64::NAN), s("bigint")],
                "cast: cannot convert float",
            ),
            (
                "cast",
                vec![s("abc"), s("float")],
                "cast: cannot convert string",
            ),
            (
                "cast",
                vec![s("1e400"), s("float")],
                "cast: cannot convert string",
            ),
            (
                "cast",
                vec![s("NaN"), s("float")],
                "cast: cannot convert string",
            ),
            (
                "cast",
                vec![s("yes"), s("boolean")],
                "cast: cannot convert string \"yes\" to boolean",
            ),
            (
                "cast",
                vec![i(1), s("datetime")],
                "cast: type datetime is not supported",
            ),
            ("cast", vec![i(1), s("int")], "cast: unknown type \"int\""),
            (
                "cast",
                vec![i(1), i(2)],
                "cast: argument 2 must be a type name string",
            ),
            (
                "hex2dec",
                vec![i(16)],
                "hex2dec: argument 1 must be a string, got bigint",
            ),
            (
                "hex2dec",
                vec![s("0xzz")],
                "hex2dec: invalid hexadecimal value \"zz\"",
            ),
            (
                "hex2dec",
                vec![s("0x10000000000000000")],
                "hex2dec: invalid hexadecimal",
            ),
            (
                "dec2hex",
                vec![fl(1.5)],
                "dec2hex: argument 1 must be an integer, got float",
            ),
            (
                "dec2hex",
                vec![s("16")],
                "dec2hex: argument 1 must be an integer, got string",
            ),
            (
                "now",
                vec![s("3")],
                "now: argument 1 must be an integer, got string",
            ),
            (
                "cur_time",
                vec![fl(0.5)],
                "cur_time: argument 1 must be an integer",
            ),
        ]
    }

    #[test]
    fn results_match_ekuiper() {
        let mut failures = Vec::new();
        for (name, args, want) in ok_cases() {
            match call(name, &args) {
                Ok(got) if same(&got, &want) => {}
                other => failures.push(format!("{name}{args:?}: want {want:?}, got {other:?}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn errors_name_the_function_and_the_argument() {
        let mut failures = Vec::new();
        for (name, args, want) in err_cases() {
            match call(name, &args) {
                Err(e) if e.contains(want) && e.starts_with(&format!("{name}: ")) => {}
                other => failures.push(format!("{name}{args:?}: want Err({want}), got {other:?}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn every_function_is_covered_by_the_tables() {
        let covered: BTreeSet<&str> = ok_cases().iter().map(|(n, _, _)| *n).collect();
        let missing: Vec<&str> = names().filter(|n| !covered.contains(n)).collect();
        assert!(missing.is_empty(), "untested: {missing:?}");
    }

    #[test]
    fn catalogue_is_sorted_unique_lowercase_and_consistent() {
        let all: Vec<&str> = names().collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(all, sorted);
        for func in FUNCTIONS {
            assert_eq!(func.name, func.name.to_ascii_lowercase());
            assert!(
                func.max_args.is_none_or(|max| max >= func.min_args),
                "{}",
                func.name
            );
        }
        for skipped in [
            "rand",
            "newuuid",
            "regexp_matches",
            "format",
            "md5",
            "window_start",
        ] {
            assert!(lookup(skipped).is_none(), "{skipped}");
        }
    }

    #[test]
    fn lookup_ignores_case() {
        assert_eq!(lookup("ROUND").map(|f| f.name), Some("round"));
        assert_eq!(lookup("Split_Value").map(|f| f.name), Some("split_value"));
        assert!(lookup("nope").is_none());
        assert!(lookup("").is_none());
    }

    #[test]
    fn arity_metadata() {
        let arity = |name: &str| lookup(name).map(|f| (f.min_args, f.max_args));
        assert_eq!(arity("abs"), Some((1, Some(1))));
        assert_eq!(arity("atan2"), Some((2, Some(2))));
        assert_eq!(arity("round"), Some((1, Some(2))));
        assert_eq!(arity("log"), Some((1, Some(2))));
        assert_eq!(arity("substring"), Some((2, Some(3))));
        assert_eq!(arity("split_value"), Some((3, Some(3))));
        assert_eq!(arity("cast"), Some((2, Some(2))));
        assert_eq!(arity("concat"), Some((1, None)));
        assert_eq!(arity("coalesce"), Some((1, None)));
        assert_eq!(arity("greatest"), Some((1, None)));
        assert_eq!(arity("now"), Some((0, Some(1))));
        assert_eq!(arity("cur_date"), Some((0, Some(0))));
        assert_eq!(arity("tstamp"), Some((0, Some(0))));
        assert_eq!(arity("pi"), Some((0, Some(0))));
        assert_eq!(
            call("round", &[]),
            Err("round: expects 1 to 2 arguments, got 0".to_owned())
        );
        assert_eq!(
            call("abs", &[i(1), i(2)]),
            Err("abs: expects 1 argument, got 2".to_owned())
        );
        assert_eq!(
            call("concat", &[]),
            Err("concat: expects at least 1 argument, got 0".to_owned())
        );
        assert_eq!(
            call("pi", &[i(1)]),
            Err("pi: expects 0 arguments, got 1".to_owned())
        );
    }

    /// Null in, null out, except for the functions eKuiper gives another answer.
    #[test]
    fn null_arguments_propagate() {
        let special: &[(&str, Value)] = &[
            ("coalesce", N),
            ("concat", s("")),
            ("endswith", b(false)),
            ("indexof", i(-1)),
            ("isnull", b(true)),
            ("length", i(0)),
            ("numbytes", i(0)),
            ("startswith", b(false)),
        ];
        for func in FUNCTIONS.iter().filter(|f| f.min_args > 0) {
            for at in 0..func.min_args {
                let mut args = vec![i(1); func.min_args];
                if func.name == "cast" {
                    args = vec![i(1), s("string")];
                }
                if let Some(slot) = args.get_mut(at) {
                    *slot = N;
                }
                let got = func.call(&CTX, &args);
                let all_null = vec![N; func.min_args];
                let want = special
                    .iter()
                    .find(|(n, _)| *n == func.name)
                    .map_or(N, |(_, v)| v.clone());
                match func.name {
                    // One null among others: the others decide.
                    "coalesce" | "greatest" | "least" | "concat" => {}
                    _ => assert_eq!(got, Ok(want.clone()), "{}({args:?})", func.name),
                }
                assert_eq!(
                    func.call(&CTX, &all_null),
                    Ok(want),
                    "{}({all_null:?})",
                    func.name
                );
            }
        }
    }

    #[test]
    fn go_formatting_helpers() {
        assert_eq!(go_float_v(100000.0), "100000");
        assert_eq!(go_float_v(1e20), "100000000000000000000");
        assert_eq!(go_float_v(1.5e21), "1.5e+21");
        assert_eq!(go_float_v(0.0001), "0.0001");
        assert_eq!(go_float_v(0.00012), "0.00012");
        assert_eq!(go_float_v(1.2e-7), "1.2e-07");
        assert_eq!(go_float_v(-2.5e300), "-2.5e+300");
        assert_eq!(go_float_v(f64::INFINITY), "+Inf");
        assert_eq!(go_float_f(f64::NEG_INFINITY), "-Inf");
        assert_eq!(go_parse_int("0x_1f"), Some(31));
        assert_eq!(go_parse_int("1__0"), None);
        assert_eq!(go_parse_int("-0b11"), Some(-3));
        assert_eq!(go_parse_int("08"), None);
        assert_eq!(go_parse_int("-"), None);
    }

    #[test]
    fn dates_across_eras() {
        let text = |ms: u64| {
            let c = civil(ms);
            format!("{} {}", date_text(&c), clock_text(&c, Some(3)))
        };
        assert_eq!(text(0), "1970-01-01 00:00:00.000");
        assert_eq!(text(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(text(4_107_542_399_999), "2100-02-28 23:59:59.999");
        assert_eq!(text(253_402_300_799_999), "9999-12-31 23:59:59.999");
        // Far future must not panic.
        let _ = text(u64::MAX);
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            prop_oneof![
                Just(i64::MIN),
                Just(i64::MAX),
                Just(-1_i64),
                Just(0_i64),
                -10_i64..10
            ]
            .prop_map(Value::Int),
            any::<f64>().prop_map(Value::Float),
            prop_oneof![
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(-0.0),
                Just(f64::MAX),
                Just(f64::MIN_POSITIVE),
                Just(9.223_372_036_854_776e18),
                Just(-9.223_372_036_854_776e18),
            ]
            .prop_map(Value::Float),
            "\\PC{0,12}".prop_map(|t| Value::str(&t)),
            prop_oneof![
                Just("bigint"),
                Just("float"),
                Just("string"),
                Just("boolean"),
                Just("datetime"),
                Just("0x7fffffffffffffff"),
                Just("-0b1_0"),
                Just("1e309"),
                Just("é"),
                Just(""),
                Just(","),
            ]
            .prop_map(Value::str),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// No function panics on any arguments, and every error names its function.
        #[test]
        fn no_function_panics(
            args in proptest::collection::vec(any_value(), 0..4),
            now_ms in prop_oneof![Just(u64::MAX), Just(0_u64), any::<u64>()],
        ) {
            let ctx = Ctx { now_ms };
            for func in FUNCTIONS {
                let direct = (func.eval)(&ctx, &args);
                let checked = func.call(&ctx, &args);
                if func.accepts(args.len()) {
                    prop_assert_eq!(format!("{direct:?}"), format!("{checked:?}"));
                }
                for result in [direct, checked] {
                    if let Err(e) = result {
                        let prefix = format!("{}: ", func.name);
                        prop_assert!(e.starts_with(&prefix), "{}", e);
                    }
                }
            }
        }
    }
}
