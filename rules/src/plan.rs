//! From SQL text to a checked plan, and the evaluation of its expressions.
//!
//! [`plan`] parses one rule's SQL with [`EkuiperDialect`] and lowers it against a
//! [`Catalog`] of the gateway's devices and their typed properties, and of the lookup tables
//! rules may join. Everything that can be known before the first event is checked here, and
//! every error names the rule, and the line and column in its SQL: syntax, an unknown device,
//! table, property or column, an unknown function or a wrong number of arguments, operands of
//! the wrong type, aggregates outside a window, a malformed window, join or `OVER` clause.
//!
//! The subset:
//!
//! * `SELECT` of expressions (with `AS` aliases) or `*`;
//! * `FROM <device>` (its properties are the columns, and `device` its name unless it has a
//!   property of that name) or `FROM devices` (every device, with the column `device`; a
//!   device named `devices` takes precedence), or `FROM memory.<topic>` (the records other
//!   rules feed to a memory topic, see [`crate::engine`]), optionally `AS <alias>`;
//! * optionally one lookup-table join (eKuiper's stream/table join, see
//!   [`crate::table`]): `[INNER] JOIN <table> [AS <alias>] ON <stream expr> = <table>.<col>
//!   [AND ...]` or `LEFT [OUTER] JOIN ...`. The `ON` condition is one or more equalities
//!   joined by `AND`, each between an expression over the device's columns and a column of
//!   the table (eKuiper's lookup join takes equalities only, `lookupPlan.go`). A row matches
//!   the table rows whose key columns equal its values (numbers by value; a null never
//!   matches); an `INNER JOIN` row without a match is dropped, a `LEFT JOIN` one goes on
//!   with the table's columns null; a row matching several table rows becomes one row per
//!   match (in table order). Table columns are `<table or alias>.<column>`, or the bare
//!   column name when the device has no such property (the stream's columns win, as in
//!   eKuiper's `JoinTuple`); `SELECT *` gives the device's properties, then the table's
//!   other columns. Joins of two devices (eKuiper's stream joins, which need a window),
//!   `RIGHT`, `FULL` and `CROSS` joins, `USING` and non-equality `ON` conditions are refused;
//! * `WHERE`;
//! * `GROUP BY` one of `TumblingWindow(unit, size)`, `HoppingWindow(unit, size, hop)`,
//!   `SlidingWindow(unit, size)`, `CountWindow(count[, hop])`, optionally with `device`;
//! * `HAVING`;
//! * arithmetic, comparison, `AND`/`OR`/`NOT`, `IN`, `BETWEEN`, `IS [NOT] NULL`, `CASE`;
//!   `<source>.<column>` with the `FROM` device (or `devices`), the table, or their aliases;
//! * the scalar functions of [`crate::functions`], the aggregates of [`crate::aggregate`],
//!   `window_start()`/`window_end()`, and the analytic functions of [`crate::analytic`]
//!   (`lag`, `latest`, `had_changed`, `changed_col`, and `deadband(value, width)`, true when
//!   the value moved by at least `width` since it was last true; eKuiper has no `deadband`),
//!   with `OVER ([PARTITION BY e, ...] [WHEN cond])` (see [`crate::dialect`]).
//!
//! Evaluation order for a row: the analytic functions, then the join, then `WHERE`, then
//! either `SELECT` or (window rules) the window, whose `HAVING` and `SELECT` run when it
//! closes.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlparser::ast::{
    self, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SelectItem,
    SetExpr, Spanned, Statement, TableFactor, UnaryOperator,
};
use sqlparser::parser::Parser;

use crate::aggregate::AggKind;
use crate::analytic::{self, Analytic, AnalyticKind};
use crate::dialect::EkuiperDialect;
use crate::functions::{self, Ctx, Function};
use crate::table::Table;
use crate::value::Value;
use crate::window::{self, WindowSpec};

/// The source name that reads every device (unless a device has this name).
pub const ALL_DEVICES: &str = "devices";

/// The type of a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// A boolean (coils, discrete inputs, bit tags).
    Bool,
    /// An integer.
    Int,
    /// A float (also an integer with a scale).
    Float,
    /// A string.
    Str,
    /// Any value: the fields of a memory topic (another rule's output, see
    /// [`crate::rule::Action::Memory`]).
    Any,
}

/// The devices rules may read, with their properties and types, and the lookup tables they
/// may join.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    devices: BTreeMap<String, Vec<(String, ColType)>>,
    tables: BTreeMap<String, Arc<Table>>,
}

impl Catalog {
    /// Adds (or replaces) a lookup table: its columns for planning, its rows for the engine
    /// built from this catalog (see [`crate::Engine::set_table`] to replace them later).
    pub fn add_table(&mut self, name: &str, table: Table) {
        self.tables.insert(name.to_owned(), Arc::new(table));
    }

    /// A table.
    pub fn table(&self, name: &str) -> Option<&Arc<Table>> {
        self.tables.get(name)
    }

    /// Every table, in name order.
    pub fn tables(&self) -> impl Iterator<Item = (&str, &Arc<Table>)> {
        self.tables.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Adds (or replaces) a device and its properties, in slot order.
    pub fn add_device(&mut self, device: &str, props: Vec<(String, ColType)>) {
        self.devices.insert(device.to_owned(), props);
    }

    /// A device's properties.
    pub fn device(&self, device: &str) -> Option<&[(String, ColType)]> {
        self.devices.get(device).map(Vec::as_slice)
    }

    /// Every device, in name order.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &[(String, ColType)])> {
        self.devices.iter().map(|(d, p)| (d.as_str(), p.as_slice()))
    }

    /// The type of `prop` in `device`, or, with `None`, in every device that has it (`None`
    /// when no device has it; `Some(None)` when devices disagree).
    fn column_type(&self, device: Option<&str>, prop: &str) -> Option<Option<ColType>> {
        let find =
            |props: &[(String, ColType)]| props.iter().find(|(n, _)| n == prop).map(|(_, t)| *t);
        match device {
            Some(d) => self.device(d).and_then(find).map(Some),
            None => {
                let mut seen: Option<Option<ColType>> = None;
                for (_, props) in self.devices() {
                    if let Some(t) = find(props) {
                        seen = Some(match seen {
                            None => Some(t),
                            Some(Some(prev)) if prev == t => Some(t),
                            Some(_) => None,
                        });
                    }
                }
                seen
            }
        }
    }
}

/// A rule that cannot be loaded: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule:?}: line {line}, column {column}: {message}")]
pub struct LoadError {
    /// The rule id.
    pub rule: String,
    /// Line in the SQL (1-based; 0 when unknown).
    pub line: u64,
    /// Column in the SQL (1-based; 0 when unknown).
    pub column: u64,
    /// What is wrong.
    pub message: String,
}

/// Where a rule's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One device: its properties are the columns.
    Device(String),
    /// Every device (`FROM devices`); `device` names the row's device.
    AllDevices,
}

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Mod,
    /// `=`
    Eq,
    /// `!=`, `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `AND`
    And,
    /// `OR`
    Or,
}

/// A checked expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// A literal.
    Lit(Value),
    /// A referenced column (index into [`Plan::columns`]).
    Col(usize),
    /// The row's device id.
    Device,
    /// `NOT e`
    Not(Box<Expr>),
    /// `-e`
    Neg(Box<Expr>),
    /// `l op r`
    Bin(BinOp, Box<Expr>, Box<Expr>),
    /// A scalar function.
    Call(&'static Function, Vec<Expr>),
    /// An aggregate over the window's rows; `None`: `count(*)`.
    Agg(AggKind, Option<Box<Expr>>, usize),
    /// `CASE [operand] WHEN .. THEN .. [ELSE ..] END`
    Case {
        /// The simple form's operand.
        operand: Option<Box<Expr>>,
        /// Conditions (or values) and results.
        whens: Vec<(Expr, Expr)>,
        /// The `ELSE` result.
        otherwise: Option<Box<Expr>>,
    },
    /// `e [NOT] IN (..)`
    InList(Box<Expr>, Vec<Expr>, bool),
    /// `e [NOT] BETWEEN low AND high`
    Between(Box<Expr>, Box<Expr>, Box<Expr>, bool),
    /// `e IS [NOT] NULL`
    IsNull(Box<Expr>, bool),
    /// `window_start()`
    WindowStart,
    /// `window_end()`
    WindowEnd,
    /// The result of an analytic call site (index into [`Plan::analytics`]), computed for
    /// the row before anything else reads it.
    Analytic(usize),
    /// A column of the joined table (index into [`Join::columns`]).
    TableCol(usize),
}

/// One aggregate of a window rule: what it folds, and over which rows.
#[derive(Debug, Clone)]
pub struct AggSite {
    /// The aggregate.
    pub kind: AggKind,
    /// Its argument (`None`: `count(*)`).
    pub arg: Option<Expr>,
    /// The columns (indices into [`Plan::columns`]) its argument reads. A row enters the
    /// aggregate only when it comes from a change of one of them (or always, when it reads
    /// none), as in eKuiper, where an event carries the changed fields and aggregates skip
    /// the missing ones.
    pub reads: Vec<usize>,
}

/// The columns `e` reads directly (not through analytic functions or tables).
fn cols_of(e: &Expr, out: &mut Vec<usize>) {
    match e {
        Expr::Col(c) => {
            if !out.contains(c) {
                out.push(*c);
            }
        }
        _ => for_each_child(e, &mut |x| cols_of(x, out)),
    }
}

/// Calls `f` on each expression directly inside `e` (an aggregate's argument too).
fn for_each_child(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    match e {
        Expr::Col(_)
        | Expr::Lit(_)
        | Expr::Device
        | Expr::WindowStart
        | Expr::WindowEnd
        | Expr::Analytic(_)
        | Expr::TableCol(_) => {}
        Expr::Not(x) | Expr::Neg(x) | Expr::IsNull(x, _) => f(x),
        Expr::Bin(_, l, r) => {
            f(l);
            f(r);
        }
        Expr::Call(_, args) => args.iter().for_each(f),
        Expr::Agg(_, arg, _) => {
            if let Some(a) = arg {
                f(a);
            }
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            for x in operand.iter().chain(otherwise.iter()) {
                f(x);
            }
            for (c, r) in whens {
                f(c);
                f(r);
            }
        }
        Expr::InList(x, l, _) => {
            f(x);
            l.iter().for_each(f);
        }
        Expr::Between(x, l, h, _) => {
            f(x);
            f(l);
            f(h);
        }
    }
}

/// The row slots `e` reads outside aggregates (what a window's output needs of its last row).
fn bare_slots(e: &Expr, layout: Layout, out: &mut Vec<usize>) {
    let slot = match e {
        Expr::Col(c) => *c,
        Expr::Analytic(k) => layout.analytic + k,
        Expr::TableCol(t) => layout.table + t,
        // Aggregates read their rows, not the last one.
        Expr::Agg(..) => return,
        _ => return for_each_child(e, &mut |x| bare_slots(x, layout, out)),
    };
    if !out.contains(&slot) {
        out.push(slot);
    }
}

impl Expr {
    /// Whether `pred` holds for this expression or one inside it (not looking into the
    /// arguments of analytic call sites, which are separate).
    pub fn any(&self, pred: &dyn Fn(&Expr) -> bool) -> bool {
        if pred(self) {
            return true;
        }
        match self {
            Expr::Lit(_)
            | Expr::Col(_)
            | Expr::Device
            | Expr::WindowStart
            | Expr::WindowEnd
            | Expr::Analytic(_)
            | Expr::TableCol(_) => false,
            Expr::Not(x) | Expr::Neg(x) | Expr::IsNull(x, _) => x.any(pred),
            Expr::Bin(_, l, r) => l.any(pred) || r.any(pred),
            Expr::Call(_, args) => args.iter().any(|a| a.any(pred)),
            Expr::Agg(_, arg, _) => arg.as_deref().is_some_and(|a| a.any(pred)),
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                operand.as_deref().is_some_and(|o| o.any(pred))
                    || whens.iter().any(|(c, r)| c.any(pred) || r.any(pred))
                    || otherwise.as_deref().is_some_and(|o| o.any(pred))
            }
            Expr::InList(x, l, _) => x.any(pred) || l.iter().any(|i| i.any(pred)),
            Expr::Between(x, l, h, _) => x.any(pred) || l.any(pred) || h.any(pred),
        }
    }
}

/// How a table is joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// `[INNER] JOIN`: rows without a match are dropped.
    Inner,
    /// `LEFT [OUTER] JOIN`: rows without a match go on with null table columns.
    Left,
}

/// A lookup-table join.
#[derive(Debug, Clone)]
pub struct Join {
    /// The table's name in the catalog.
    pub table: String,
    /// Inner or left.
    pub kind: JoinKind,
    /// The `ON` equalities: an expression over the row, and the table column (index into
    /// [`Join::columns`]) it must equal.
    pub keys: Vec<(Expr, usize)>,
    /// The table columns the rule reads (by name: resolved against the table's rows by the
    /// engine).
    pub columns: Vec<Arc<str>>,
}

/// Where the parts of a row sit in the values an expression reads: the plan's columns
/// first, then the analytic results from `analytic`, then the table columns from `table`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Layout {
    /// Index of the first analytic result.
    pub analytic: usize,
    /// Index of the first table column.
    pub table: usize,
}

/// A rule's checked query.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where rows come from.
    pub source: Source,
    /// The properties the rule reads (a change of any other does not trigger it).
    pub columns: Vec<Arc<str>>,
    /// Output fields: name and expression. Empty with `star`.
    pub fields: Vec<(Arc<str>, Expr)>,
    /// `SELECT *`: every property of the row's device.
    pub star: bool,
    /// `WHERE`.
    pub filter: Option<Expr>,
    /// The window of `GROUP BY`.
    pub window: Option<WindowSpec>,
    /// Windows kept per device (`GROUP BY device, <window>`).
    pub per_device: bool,
    /// `HAVING`.
    pub having: Option<Expr>,
    /// The aggregates of `SELECT` and `HAVING`, by the index in their [`Expr::Agg`].
    pub aggs: Vec<AggSite>,
    /// The row slots `SELECT` and `HAVING` read outside aggregates (a window keeps only these
    /// of its rows, and shows the last row's).
    pub bare: Vec<usize>,
    /// The analytic call sites, in evaluation order (innermost first).
    pub analytics: Vec<Analytic>,
    /// The table join.
    pub join: Option<Join>,
}

impl Plan {
    /// Where analytic results and table columns sit in a row.
    pub fn layout(&self) -> Layout {
        let analytic = self.columns.len();
        Layout {
            analytic,
            table: analytic + self.analytics.len(),
        }
    }

    /// Whether the analytic functions' default partition is the row's device.
    pub fn partition_by_device(&self) -> bool {
        self.source == Source::AllDevices
    }
}

/// Static type of an expression, as far as it is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Bool,
    Num,
    Str,
    Any,
}

fn ty_of(c: Option<ColType>) -> Ty {
    match c {
        Some(ColType::Bool) => Ty::Bool,
        Some(ColType::Int | ColType::Float) => Ty::Num,
        Some(ColType::Str) => Ty::Str,
        Some(ColType::Any) | None => Ty::Any,
    }
}

/// The joined table, while planning.
struct TableCtx<'a> {
    name: String,
    /// Names that qualify its columns: its name and alias.
    qualifiers: Vec<String>,
    table: &'a Table,
}

struct Lower<'a> {
    rule: &'a str,
    catalog: &'a Catalog,
    device: Option<&'a str>,
    /// Names that qualify the source's columns: its name and alias.
    qualifiers: Vec<String>,
    columns: Vec<Arc<str>>,
    windowed: bool,
    analytics: Vec<Analytic>,
    table: Option<TableCtx<'a>>,
    table_columns: Vec<Arc<str>>,
    aggs: Vec<AggSite>,
}

type R<T> = Result<T, LoadError>;

impl Lower<'_> {
    fn err<S: Spanned + ?Sized>(&self, at: &S, message: impl Into<String>) -> LoadError {
        self.err_at(at.span(), message)
    }

    fn err_at(&self, span: sqlparser::tokenizer::Span, message: impl Into<String>) -> LoadError {
        let start = span.start;
        LoadError {
            rule: self.rule.to_owned(),
            line: start.line,
            column: start.column,
            message: message.into(),
        }
    }

    /// A property of the source (added to the columns read), or its `device` pseudo-column.
    fn stream_column(&mut self, ident: &ast::Ident) -> Option<(Expr, Ty)> {
        let name = ident.value.as_str();
        let pseudo = ident.quote_style.is_none() && name.eq_ignore_ascii_case("device");
        if pseudo && self.device.is_none() {
            return Some((Expr::Device, Ty::Str));
        }
        let Some(t) = self.catalog.column_type(self.device, name) else {
            return pseudo.then_some((Expr::Device, Ty::Str));
        };
        Some((Expr::Col(self.read(name)), ty_of(t)))
    }

    /// Adds `name` to the columns read.
    fn read(&mut self, name: &str) -> usize {
        match self.columns.iter().position(|c| &**c == name) {
            Some(i) => i,
            None => {
                self.columns.push(Arc::from(name));
                self.columns.len() - 1
            }
        }
    }

    /// A column of the joined table (added to the table columns read).
    fn table_column(&mut self, name: &str) -> Option<(Expr, Ty)> {
        let t = self.table.as_ref()?;
        let (_, ty) = t.table.columns().iter().find(|(n, _)| n == name)?;
        let ty = ty_of(Some(*ty));
        let idx = match self.table_columns.iter().position(|c| &**c == name) {
            Some(i) => i,
            None => {
                self.table_columns.push(Arc::from(name));
                self.table_columns.len() - 1
            }
        };
        Some((Expr::TableCol(idx), ty))
    }

    fn column(&mut self, ident: &ast::Ident) -> R<(Expr, Ty)> {
        if let Some(found) = self.stream_column(ident) {
            return Ok(found);
        }
        if let Some(found) = self.table_column(&ident.value) {
            return Ok(found);
        }
        let name = ident.value.as_str();
        let mut message = match self.device {
            Some(d) => format!("device {d:?} has no property {name:?}"),
            None => format!("no device has a property {name:?}"),
        };
        if let Some(t) = &self.table {
            message.push_str(&format!(" and table {:?} has no column {name:?}", t.name));
        }
        Err(self.err_at(ident.span, message))
    }

    /// `<source>.<column>`.
    fn qualified(&mut self, e: &ast::Expr, parts: &[ast::Ident]) -> R<(Expr, Ty)> {
        let [q, col] = parts else {
            return Err(self.err(e, "qualified names are <source>.<column>"));
        };
        if self.qualifiers.contains(&q.value) {
            return match self.stream_column(col) {
                Some(found) => Ok(found),
                None => Err(self.err_at(
                    col.span,
                    match self.device {
                        Some(d) => format!("device {d:?} has no property {:?}", col.value),
                        None => format!("no device has a property {:?}", col.value),
                    },
                )),
            };
        }
        if let Some(t) = &self.table
            && t.qualifiers.contains(&q.value)
        {
            let name = t.name.clone();
            return self.table_column(&col.value).ok_or_else(|| {
                self.err_at(
                    col.span,
                    format!("table {name:?} has no column {:?}", col.value),
                )
            });
        }
        let mut known = self.qualifiers.clone();
        if let Some(t) = &self.table {
            known.extend(t.qualifiers.iter().cloned());
        }
        Err(self.err_at(
            q.span,
            format!(
                "unknown source {:?} (a qualified name is <source>.<column> with {})",
                q.value,
                known.join(" or ")
            ),
        ))
    }

    fn expr(&mut self, e: &ast::Expr) -> R<(Expr, Ty)> {
        use ast::Expr as E;
        match e {
            E::Identifier(id) => self.column(id),
            E::CompoundIdentifier(parts) => self.qualified(e, parts),
            E::Value(v) => Ok(self.literal(v)?),
            E::Nested(inner) => self.expr(inner),
            E::UnaryOp { op, expr } => {
                let (x, t) = self.expr(expr)?;
                match op {
                    UnaryOperator::Not => {
                        self.want(expr, t, Ty::Bool, "NOT")?;
                        Ok((Expr::Not(Box::new(x)), Ty::Bool))
                    }
                    UnaryOperator::Minus => {
                        self.want(expr, t, Ty::Num, "-")?;
                        Ok((Expr::Neg(Box::new(x)), Ty::Num))
                    }
                    UnaryOperator::Plus => {
                        self.want(expr, t, Ty::Num, "+")?;
                        Ok((x, Ty::Num))
                    }
                    other => Err(self.err(e, format!("operator {other} is not supported"))),
                }
            }
            E::BinaryOp { left, op, right } => {
                let (l, lt) = self.expr(left)?;
                let (r, rt) = self.expr(right)?;
                let (bop, ty) = match op {
                    BinaryOperator::Plus => (BinOp::Add, Ty::Num),
                    BinaryOperator::Minus => (BinOp::Sub, Ty::Num),
                    BinaryOperator::Multiply => (BinOp::Mul, Ty::Num),
                    BinaryOperator::Divide => (BinOp::Div, Ty::Num),
                    BinaryOperator::Modulo => (BinOp::Mod, Ty::Num),
                    BinaryOperator::Eq => (BinOp::Eq, Ty::Bool),
                    BinaryOperator::NotEq => (BinOp::Ne, Ty::Bool),
                    BinaryOperator::Lt => (BinOp::Lt, Ty::Bool),
                    BinaryOperator::LtEq => (BinOp::Le, Ty::Bool),
                    BinaryOperator::Gt => (BinOp::Gt, Ty::Bool),
                    BinaryOperator::GtEq => (BinOp::Ge, Ty::Bool),
                    BinaryOperator::And => (BinOp::And, Ty::Bool),
                    BinaryOperator::Or => (BinOp::Or, Ty::Bool),
                    other => return Err(self.err(e, format!("operator {other} is not supported"))),
                };
                match bop {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => {
                        self.want(left, lt, Ty::Num, &op.to_string())?;
                        self.want(right, rt, Ty::Num, &op.to_string())?;
                    }
                    BinOp::And | BinOp::Or => {
                        self.want(left, lt, Ty::Bool, &op.to_string())?;
                        self.want(right, rt, Ty::Bool, &op.to_string())?;
                    }
                    _ => self.comparable(e, lt, rt)?,
                }
                Ok((Expr::Bin(bop, Box::new(l), Box::new(r)), ty))
            }
            E::IsNull(x) | E::IsNotNull(x) => {
                let (x, _) = self.expr(x)?;
                Ok((
                    Expr::IsNull(Box::new(x), matches!(e, E::IsNotNull(_))),
                    Ty::Bool,
                ))
            }
            E::In {
                expr,
                target: ast::InTarget::List(list),
                negated,
                global: false,
            } => {
                let (x, t) = self.expr(expr)?;
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let (i, it) = self.expr(item)?;
                    self.comparable(item, t, it)?;
                    items.push(i);
                }
                Ok((Expr::InList(Box::new(x), items, *negated), Ty::Bool))
            }
            E::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let (x, t) = self.expr(expr)?;
                let (lo, lt) = self.expr(low)?;
                let (hi, ht) = self.expr(high)?;
                self.comparable(low, t, lt)?;
                self.comparable(high, t, ht)?;
                Ok((
                    Expr::Between(Box::new(x), Box::new(lo), Box::new(hi), *negated),
                    Ty::Bool,
                ))
            }
            E::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let operand = match operand {
                    Some(o) => Some(Box::new(self.expr(o)?.0)),
                    None => None,
                };
                let mut whens = Vec::with_capacity(conditions.len());
                let mut ty: Option<Ty> = None;
                for w in conditions {
                    let (c, ct) = self.expr(&w.condition)?;
                    if operand.is_none() {
                        self.want(&w.condition, ct, Ty::Bool, "WHEN")?;
                    }
                    let (r, rt) = self.expr(&w.result)?;
                    ty = Some(merge(ty, rt));
                    whens.push((c, r));
                }
                let otherwise = match else_result {
                    Some(x) => {
                        let (x, t) = self.expr(x)?;
                        ty = Some(merge(ty, t));
                        Some(Box::new(x))
                    }
                    None => None,
                };
                Ok((
                    Expr::Case {
                        operand,
                        whens,
                        otherwise,
                    },
                    ty.unwrap_or(Ty::Any),
                ))
            }
            E::Function(f) => self.function(f),
            other => Err(self.err(other, format!("{other} is not supported in rules"))),
        }
    }

    fn literal(&self, v: &ast::ValueWithSpan) -> R<(Expr, Ty)> {
        use ast::Value as V;
        let (value, ty) = match &v.value {
            V::Number(n, _) => match n.parse::<i64>() {
                Ok(i) => (Value::Int(i), Ty::Num),
                Err(_) => match n.parse::<f64>() {
                    Ok(f) if f.is_finite() => (Value::Float(f), Ty::Num),
                    _ => return Err(self.err(v, format!("{n} is not a number"))),
                },
            },
            V::SingleQuotedString(s) | V::DoubleQuotedString(s) => (Value::str(s), Ty::Str),
            V::Boolean(b) => (Value::Bool(*b), Ty::Bool),
            V::Null => (Value::Null, Ty::Any),
            other => return Err(self.err(v, format!("literal {other} is not supported"))),
        };
        Ok((Expr::Lit(value), ty))
    }

    fn want(&self, at: &ast::Expr, got: Ty, want: Ty, what: &str) -> R<()> {
        if got == want || got == Ty::Any {
            return Ok(());
        }
        let name = |t: Ty| match t {
            Ty::Bool => "a boolean",
            Ty::Num => "a number",
            Ty::Str => "a string",
            Ty::Any => "any value",
        };
        Err(self.err(
            at,
            format!("{what} needs {}, but {at} is {}", name(want), name(got)),
        ))
    }

    fn comparable(&self, at: &ast::Expr, a: Ty, b: Ty) -> R<()> {
        if a == b || a == Ty::Any || b == Ty::Any {
            return Ok(());
        }
        Err(self.err(at, format!("{at} compares values of different types")))
    }

    fn args<'f>(&self, f: &'f ast::Function) -> R<Vec<Option<&'f ast::Expr>>> {
        match &f.args {
            FunctionArguments::None => Ok(vec![]),
            FunctionArguments::List(list) => list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Ok(Some(x)),
                    FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => Ok(None),
                    other => Err(self.err(f, format!("argument {other} is not supported"))),
                })
                .collect(),
            FunctionArguments::Subquery(_) => Err(self.err(f, "subqueries are not supported")),
        }
    }

    fn function(&mut self, f: &ast::Function) -> R<(Expr, Ty)> {
        let name = f.name.to_string().to_ascii_lowercase();
        if analytic::is_analytic(&name) {
            return self.analytic(f, &name);
        }
        if f.over.is_some() {
            return Err(self.err(
                f,
                format!(
                    "{name}: OVER is only for the analytic functions ({})",
                    analytic::NAMES.join(", ")
                ),
            ));
        }
        if f.filter.is_some() || !f.within_group.is_empty() {
            return Err(self.err(
                f,
                format!("{name}: FILTER and WITHIN GROUP are not supported"),
            ));
        }
        let args = self.args(f)?;
        let count = args.len();
        let arity = |lo: usize, hi: usize| -> R<()> {
            if count < lo || count > hi {
                let want = if lo == hi {
                    format!("{lo}")
                } else {
                    format!("{lo} to {hi}")
                };
                return Err(self.err(f, format!("{name} takes {want} arguments, not {count}")));
            }
            Ok(())
        };
        let plain = |this: &mut Self, a: Option<&ast::Expr>| -> R<(Expr, Ty)> {
            match a {
                Some(x) => this.expr(x),
                None => Err(this.err(f, format!("{name}: * is only allowed in count(*)"))),
            }
        };
        match name.as_str() {
            "window_start" | "window_end" => {
                arity(0, 0)?;
                if !self.windowed {
                    return Err(
                        self.err(f, format!("{name}() needs a window (GROUP BY ...Window)"))
                    );
                }
                let e = if name == "window_start" {
                    Expr::WindowStart
                } else {
                    Expr::WindowEnd
                };
                return Ok((e, Ty::Num));
            }
            _ => {}
        }
        // `min`/`max` of one value in a window are aggregates; of several, eKuiper's scalar
        // greatest/least.
        // eKuiper's first_value/last_value, also as first/last.
        let agg_name = match name.as_str() {
            "first" => "first_value",
            "last" => "last_value",
            n => n,
        };
        if let Some(kind) = AggKind::from_name(agg_name)
            && !(matches!(kind, AggKind::Min | AggKind::Max) && count > 1)
        {
            if !self.windowed {
                return Err(self.err(
                    f,
                    format!("aggregate {name} needs a window (GROUP BY ...Window)"),
                ));
            }
            arity(1, 1)?;
            let index = self.aggs.len();
            if kind == AggKind::Count && args[0].is_none() {
                self.aggs.push(AggSite {
                    kind,
                    arg: None,
                    reads: Vec::new(),
                });
                return Ok((Expr::Agg(kind, None, index), Ty::Num));
            }
            let (x, t) = plain(self, args[0])?;
            if x.any(&|e| matches!(e, Expr::Agg(..))) {
                return Err(self.err(f, format!("{name}: aggregates cannot be nested")));
            }
            let ty = match kind {
                AggKind::Min | AggKind::Max | AggKind::First | AggKind::Last => t,
                _ => Ty::Num,
            };
            let mut reads = Vec::new();
            cols_of(&x, &mut reads);
            self.aggs.push(AggSite {
                kind,
                arg: Some(x.clone()),
                reads,
            });
            return Ok((Expr::Agg(kind, Some(Box::new(x)), index), ty));
        }
        let lookup = match name.as_str() {
            "min" => "least",
            "max" => "greatest",
            n => n,
        };
        let Some(func) = functions::lookup(lookup) else {
            let near: Vec<&str> = functions::names()
                .filter(|n| {
                    let prefix: String = name.chars().take(3).collect();
                    n.starts_with(&prefix)
                })
                .take(4)
                .collect();
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!(" (similar: {})", near.join(", "))
            };
            return Err(self.err(f, format!("unknown function {name}{hint}")));
        };
        arity(func.min_args, func.max_args.unwrap_or(usize::MAX))?;
        let mut out = Vec::with_capacity(count);
        for a in args {
            out.push(plain(self, a)?.0);
        }
        Ok((Expr::Call(func, out), Ty::Any))
    }

    /// An analytic call site: checks it, lowers its arguments, `PARTITION BY` and `WHEN`
    /// (nested call sites first), and adds it to the plan.
    fn analytic(&mut self, f: &ast::Function, name: &str) -> R<(Expr, Ty)> {
        if !f.within_group.is_empty() {
            return Err(self.err(f, format!("{name}: WITHIN GROUP is not supported")));
        }
        let (partition, when) = match &f.over {
            None if f.filter.is_some() => {
                return Err(self.err(f, format!("{name}: FILTER is not supported")));
            }
            None => (&[][..], None),
            Some(ast::WindowType::WindowSpec(w))
                if w.window_name.is_none() && w.order_by.is_empty() && w.window_frame.is_none() =>
            {
                (w.partition_by.as_slice(), f.filter.as_deref())
            }
            Some(_) => {
                return Err(self.err(f, format!("{name}: OVER takes only PARTITION BY and WHEN")));
            }
        };
        let args = self.args(f)?;
        let count = args.len();
        let arity = |lo: usize, hi: usize| -> R<()> {
            if count < lo || count > hi {
                let want = match (lo, hi) {
                    (lo, hi) if lo == hi => format!("{lo}"),
                    (lo, usize::MAX) => format!("at least {lo}"),
                    (lo, hi) => format!("{lo} to {hi}"),
                };
                return Err(self.err(f, format!("{name} takes {want} arguments, not {count}")));
            }
            Ok(())
        };
        let plain = |this: &mut Self, a: Option<&ast::Expr>| -> R<(Expr, Ty)> {
            match a {
                Some(x) => this.expr(x),
                None => Err(this.err(
                    f,
                    format!("{name}: * is only allowed in count(*) and had_changed"),
                )),
            }
        };
        let flag = |this: &mut Self, a: Option<&ast::Expr>, what: &str| -> R<Expr> {
            let (x, t) = plain(this, a)?;
            if let Some(a) = a {
                this.want(a, t, Ty::Bool, &format!("{name}'s {what}"))?;
            }
            Ok(x)
        };
        let null = Expr::Lit(Value::Null);
        let (kind, lowered, ty) = match name {
            "lag" => {
                arity(1, 4)?;
                let (x, xt) = plain(self, args[0])?;
                let offset = match args.get(1) {
                    None => 1,
                    Some(a) => self.lag_offset(f, *a)?,
                };
                let (default, dt) = match args.get(2) {
                    Some(a) => plain(self, *a)?,
                    None => (null.clone(), xt),
                };
                let ignore = match args.get(3) {
                    Some(a) => flag(self, *a, "ignoreNull")?,
                    None => Expr::Lit(Value::Bool(true)),
                };
                let ty = if matches!(default, Expr::Lit(Value::Null)) {
                    xt
                } else {
                    merge(Some(xt), dt)
                };
                (AnalyticKind::Lag { offset }, vec![x, default, ignore], ty)
            }
            "latest" => {
                arity(1, 2)?;
                let (x, xt) = plain(self, args[0])?;
                let (default, dt) = match args.get(1) {
                    Some(a) => plain(self, *a)?,
                    None => (null.clone(), xt),
                };
                let ty = if matches!(default, Expr::Lit(Value::Null)) {
                    xt
                } else {
                    merge(Some(xt), dt)
                };
                (AnalyticKind::Latest, vec![x, default], ty)
            }
            "had_changed" => {
                arity(2, usize::MAX)?;
                let mut lowered = vec![flag(self, args[0], "ignoreNull")?];
                for a in &args[1..] {
                    match a {
                        Some(x) => lowered.push(self.expr(x)?.0),
                        None => lowered.extend(self.every_column()),
                    }
                }
                (AnalyticKind::HadChanged, lowered, Ty::Bool)
            }
            "changed_col" => {
                arity(2, 2)?;
                let ignore = flag(self, args[0], "ignoreNull")?;
                let (x, xt) = plain(self, args[1])?;
                (AnalyticKind::ChangedCol, vec![ignore, x], xt)
            }
            _ => {
                arity(2, 2)?;
                let mut lowered = Vec::with_capacity(2);
                for a in &args {
                    let (x, t) = plain(self, *a)?;
                    if let Some(a) = a {
                        self.want(a, t, Ty::Num, "deadband")?;
                    }
                    lowered.push(x);
                }
                (AnalyticKind::Deadband, lowered, Ty::Bool)
            }
        };
        let mut parts = Vec::with_capacity(partition.len());
        for p in partition {
            parts.push(self.expr(p)?.0);
        }
        let when = match when {
            Some(w) => {
                let (x, t) = self.expr(w)?;
                self.want(w, t, Ty::Bool, "WHEN")?;
                Some(x)
            }
            None => None,
        };
        let all = lowered.iter().chain(&parts).chain(when.as_ref());
        for e in all {
            let bad = |x: &Expr| {
                matches!(
                    x,
                    Expr::Agg(..) | Expr::TableCol(_) | Expr::WindowStart | Expr::WindowEnd
                )
            };
            if e.any(&bad) {
                return Err(self.err(
                    f,
                    format!(
                        "{name}: analytic functions are evaluated for each row before the join and the window: their arguments, PARTITION BY and WHEN cannot use aggregates, table columns, window_start() or window_end()"
                    ),
                ));
            }
        }
        self.analytics.push(Analytic {
            kind,
            args: lowered,
            partition: parts,
            when,
        });
        Ok((Expr::Analytic(self.analytics.len() - 1), ty))
    }

    /// `lag`'s offset: an integer literal from 1 to [`analytic::MAX_LAG_OFFSET`].
    fn lag_offset(&self, f: &ast::Function, a: Option<&ast::Expr>) -> R<usize> {
        let max = analytic::MAX_LAG_OFFSET;
        let n = match a {
            Some(ast::Expr::Value(v)) => match &v.value {
                ast::Value::Number(n, _) => n.parse::<usize>().ok(),
                _ => None,
            },
            _ => None,
        };
        match n {
            Some(n) if (1..=max).contains(&n) => Ok(n),
            _ => {
                let at = a.map_or_else(|| f.span(), Spanned::span);
                Err(self.err_at(
                    at,
                    format!("lag: the offset (second argument) must be an integer literal from 1 to {max}"),
                ))
            }
        }
    }

    /// Every property the source can have (`had_changed(ignoreNull, *)`), as columns read.
    fn every_column(&mut self) -> Vec<Expr> {
        let mut names: Vec<String> = Vec::new();
        for (d, props) in self.catalog.devices() {
            if self.device.is_some_and(|own| own != d) {
                continue;
            }
            for (p, _) in props {
                if !names.contains(p) {
                    names.push(p.clone());
                }
            }
        }
        names.iter().map(|n| Expr::Col(self.read(n))).collect()
    }
}

fn merge(prev: Option<Ty>, t: Ty) -> Ty {
    match prev {
        None => t,
        Some(p) if p == t => t,
        Some(_) => Ty::Any,
    }
}

/// Parses and checks one rule's SQL against `catalog` (see the module docs).
pub fn plan(rule: &str, sql: &str, catalog: &Catalog) -> Result<Plan, LoadError> {
    let fail = |line: u64, column: u64, message: String| LoadError {
        rule: rule.to_owned(),
        line,
        column,
        message,
    };
    let mut statements = Parser::parse_sql(&EkuiperDialect, sql).map_err(|e| {
        // sqlparser's messages end with "at Line: L, Column: C".
        let text = e.to_string();
        let (line, column) = position_in(&text).unwrap_or((0, 0));
        fail(line, column, format!("syntax: {}", strip_position(&text)))
    })?;
    if statements.len() != 1 {
        return Err(fail(
            1,
            1,
            format!("one SELECT statement expected, found {}", statements.len()),
        ));
    }
    let Some(Statement::Query(query)) = statements.pop() else {
        return Err(fail(1, 1, "only SELECT statements are rules".into()));
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(fail(
            1,
            1,
            "only a plain SELECT is supported (no UNION, VALUES)".into(),
        ));
    };
    if query.order_by.is_some() || query.limit_clause.is_some() {
        return Err(fail(
            1,
            1,
            "ORDER BY and LIMIT are not supported in rules".into(),
        ));
    }
    // FROM
    let (relation, joins) = match select.from.as_slice() {
        [t] => (&t.relation, t.joins.as_slice()),
        [] => {
            return Err(fail(
                1,
                1,
                "a rule needs FROM <device> (or FROM devices)".into(),
            ));
        }
        [_, second, ..] => {
            let at = second.span().start;
            return Err(fail(
                at.line,
                at.column,
                "one source only (join a table with JOIN <table> ON ...)".into(),
            ));
        }
    };
    let (source, qualifiers) = match relation {
        TableFactor::Table { name, alias, .. } => {
            let n = name.to_string();
            let n = n.trim_matches('`');
            let source = if catalog.device(n).is_some() {
                Source::Device(n.to_owned())
            } else if n == ALL_DEVICES {
                Source::AllDevices
            } else {
                let at = name.span().start;
                let message = if catalog.table(n).is_some() {
                    format!(
                        "{n:?} is a table: FROM takes a device (or devices), and tables are joined to it (FROM <device> JOIN {n} ON ...)"
                    )
                } else {
                    format!("unknown device {n:?}")
                };
                return Err(fail(at.line, at.column, message));
            };
            let mut q = vec![n.to_owned()];
            q.extend(alias.as_ref().map(|a| a.name.value.clone()));
            (source, q)
        }
        other => {
            let at = other.span().start;
            return Err(fail(
                at.line,
                at.column,
                "FROM takes a device name or devices".into(),
            ));
        }
    };
    let device_name = match &source {
        Source::Device(d) => Some(d.clone()),
        Source::AllDevices => None,
    };
    let device = device_name.as_deref();
    let mut lower = Lower {
        rule,
        catalog,
        device,
        qualifiers,
        columns: Vec::new(),
        windowed: false,
        analytics: Vec::new(),
        table: None,
        table_columns: Vec::new(),
        aggs: Vec::new(),
    };
    // JOIN
    let join = match joins {
        [] => None,
        [j] => Some(join(&mut lower, j)?),
        [_, second, ..] => {
            return Err(lower.err(&second.relation, "one table join at most"));
        }
    };
    // GROUP BY: a window, and maybe `device`.
    let mut window = None;
    let mut per_device = false;
    match &select.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => {
            for g in exprs {
                match g {
                    ast::Expr::Identifier(id)
                        if id.value.eq_ignore_ascii_case("device") && device.is_none() =>
                    {
                        per_device = true
                    }
                    ast::Expr::Function(f) if window.is_none() => {
                        window = Some(window_spec(&lower, f)?);
                    }
                    other => {
                        return Err(lower.err(
                            other,
                            "GROUP BY takes one window (TumblingWindow, HoppingWindow, SlidingWindow, CountWindow) and, with FROM devices, device",
                        ));
                    }
                }
            }
        }
        other => return Err(lower.err(other, "GROUP BY ALL and modifiers are not supported")),
    }
    if per_device && window.is_none() {
        return Err(fail(1, 1, "GROUP BY device needs a window too".into()));
    }
    lower.windowed = window.is_some();
    // SELECT
    let mut fields = Vec::new();
    let mut star = false;
    for item in &select.projection {
        match item {
            SelectItem::UnnamedExpr(e) => {
                let name = match e {
                    ast::Expr::Identifier(id) => id.value.clone(),
                    ast::Expr::Function(f) => f.name.to_string().to_ascii_lowercase(),
                    other => other.to_string(),
                };
                let (x, _) = lower.expr(e)?;
                fields.push((Arc::from(name.as_str()), x));
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                let (x, _) = lower.expr(expr)?;
                fields.push((Arc::from(alias.value.as_str()), x));
            }
            SelectItem::Wildcard(_) if !lower.windowed => star = true,
            other => return Err(lower.err(other, format!("{other} is not supported in SELECT"))),
        }
    }
    if star {
        // Every property is read: any change triggers the rule.
        let names: Vec<String> = match device {
            Some(d) => catalog
                .device(d)
                .unwrap_or_default()
                .iter()
                .map(|(n, _)| n.clone())
                .collect(),
            // Every property of every device (a row shows its own device's).
            None => {
                let mut all: Vec<String> = catalog
                    .devices()
                    .flat_map(|(_, props)| props.iter().map(|(n, _)| n.clone()))
                    .collect();
                all.sort();
                all.dedup();
                all
            }
        };
        for n in names {
            lower.read(&n);
        }
        // And every column of the table.
        let table_names: Vec<String> = lower.table.as_ref().map_or_else(Vec::new, |t| {
            t.table.columns().iter().map(|(n, _)| n.clone()).collect()
        });
        for n in table_names {
            lower.table_column(&n);
        }
    }
    let filter = match &select.selection {
        Some(w) => {
            let (x, t) = lower.expr(w)?;
            lower.want(w, t, Ty::Bool, "WHERE")?;
            if x.any(&|e| matches!(e, Expr::Agg(..))) {
                return Err(lower.err(w, "aggregates belong in HAVING, not WHERE"));
            }
            Some(x)
        }
        None => None,
    };
    let having = match &select.having {
        Some(h) => {
            if !lower.windowed {
                return Err(lower.err(h, "HAVING needs a window (GROUP BY ...Window)"));
            }
            let (x, t) = lower.expr(h)?;
            lower.want(h, t, Ty::Bool, "HAVING")?;
            Some(x)
        }
        None => None,
    };
    let mut plan = Plan {
        source,
        columns: lower.columns,
        fields,
        star,
        filter,
        window,
        per_device,
        having,
        aggs: lower.aggs,
        bare: Vec::new(),
        analytics: lower.analytics,
        join: join.map(|mut j| {
            j.columns = lower.table_columns;
            j
        }),
    };
    let layout = plan.layout();
    let mut bare = Vec::new();
    for e in plan.fields.iter().map(|(_, e)| e).chain(plan.having.iter()) {
        bare_slots(e, layout, &mut bare);
    }
    plan.bare = bare;
    Ok(plan)
}

/// `[INNER | LEFT] JOIN <table> [AS alias] ON <stream expr> = <table>.<col> [AND ...]`.
fn join(lower: &mut Lower<'_>, j: &ast::Join) -> R<Join> {
    use ast::JoinOperator as O;
    let (kind, constraint) = match &j.join_operator {
        O::Join(c) | O::Inner(c) => (JoinKind::Inner, c),
        O::Left(c) | O::LeftOuter(c) => (JoinKind::Left, c),
        _ => {
            return Err(lower.err(
                &j.relation,
                "only INNER JOIN and LEFT JOIN (of a lookup table) are supported",
            ));
        }
    };
    let TableFactor::Table { name, alias, .. } = &j.relation else {
        return Err(lower.err(&j.relation, "JOIN takes a table name"));
    };
    let n = name.to_string();
    let n = n.trim_matches('`').to_owned();
    let catalog = lower.catalog;
    let Some(table) = catalog.table(&n) else {
        let message = if catalog.device(&n).is_some() || n == ALL_DEVICES {
            format!(
                "{n:?} is a device: joins of two devices are not supported, JOIN takes a lookup table"
            )
        } else {
            format!("unknown table {n:?}")
        };
        return Err(lower.err(name, message));
    };
    let mut qualifiers = vec![n.clone()];
    qualifiers.extend(alias.as_ref().map(|a| a.name.value.clone()));
    if let Some(clash) = qualifiers.iter().find(|q| lower.qualifiers.contains(q)) {
        return Err(lower.err(
            name,
            format!("the source and the table are both called {clash:?}: give one an alias (AS)"),
        ));
    }
    lower.table = Some(TableCtx {
        name: n.clone(),
        qualifiers,
        table: table.as_ref(),
    });
    let ast::JoinConstraint::On(on) = constraint else {
        return Err(lower.err(
            &j.relation,
            "JOIN needs ON <stream expression> = <table>.<column>",
        ));
    };
    let mut conjuncts = Vec::new();
    flatten_and(on, &mut conjuncts);
    let mut keys: Vec<(Expr, usize)> = Vec::new();
    for c in conjuncts {
        let shape = "ON takes equalities <stream expression> = <table>.<column>, joined by AND (other conditions belong in WHERE)";
        let ast::Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = c
        else {
            return Err(lower.err(c, shape));
        };
        let (l, lt) = lower.expr(left)?;
        let (r, rt) = lower.expr(right)?;
        lower.comparable(c, lt, rt)?;
        let (stream, col) = match (l, r) {
            (Expr::TableCol(i), other) | (other, Expr::TableCol(i)) => (other, i),
            _ => return Err(lower.err(c, shape)),
        };
        let bad = |x: &Expr| {
            matches!(
                x,
                Expr::TableCol(_)
                    | Expr::Analytic(_)
                    | Expr::Agg(..)
                    | Expr::WindowStart
                    | Expr::WindowEnd
            )
        };
        if stream.any(&bad) {
            return Err(lower.err(
                c,
                "the stream side of an ON equality reads the device's columns only (no table columns, aggregates or analytic functions)",
            ));
        }
        if keys.iter().any(|(_, k)| *k == col) {
            return Err(lower.err(c, "the same table column appears twice in ON"));
        }
        keys.push((stream, col));
    }
    Ok(Join {
        table: n,
        kind,
        keys,
        columns: Vec::new(),
    })
}

fn flatten_and<'e>(e: &'e ast::Expr, out: &mut Vec<&'e ast::Expr>) {
    match e {
        ast::Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            flatten_and(left, out);
            flatten_and(right, out);
        }
        ast::Expr::Nested(inner) => flatten_and(inner, out),
        other => out.push(other),
    }
}

/// `TumblingWindow(ss, 10)` and its kin.
fn window_spec(lower: &Lower<'_>, f: &ast::Function) -> R<WindowSpec> {
    let name = f.name.to_string().to_ascii_lowercase();
    let args = lower.args(f)?;
    let int = |a: Option<&ast::Expr>| -> R<u64> {
        match a {
            Some(ast::Expr::Value(v)) => match &v.value {
                ast::Value::Number(n, _) => {
                    n.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        lower.err(v, format!("{name}: {n} is not a positive integer"))
                    })
                }
                _ => Err(lower.err(v, format!("{name}: a positive integer expected"))),
            },
            _ => Err(lower.err(f, format!("{name}: a positive integer expected"))),
        }
    };
    let unit = |a: Option<&ast::Expr>| -> R<u64> {
        match a {
            Some(ast::Expr::Identifier(id)) => window::unit_ms(&id.value).ok_or_else(|| {
                lower.err_at(
                    id.span,
                    format!(
                        "{name}: time unit {:?} is not one of dd, hh, mi, ss, ms",
                        id.value
                    ),
                )
            }),
            _ => Err(lower.err(
                f,
                format!("{name}: the first argument is a time unit (dd, hh, mi, ss, ms)"),
            )),
        }
    };
    let times = |u: u64, n: u64| -> R<u64> {
        u.checked_mul(n)
            .ok_or_else(|| lower.err(f, format!("{name}: the window is too long")))
    };
    let spec = match (name.as_str(), args.as_slice()) {
        ("tumblingwindow", [u, n]) => WindowSpec::Tumbling {
            size_ms: times(unit(*u)?, int(*n)?)?,
        },
        ("hoppingwindow", [u, n, h]) => {
            let ms = unit(*u)?;
            let (size_ms, hop_ms) = (times(ms, int(*n)?)?, times(ms, int(*h)?)?);
            WindowSpec::Hopping { size_ms, hop_ms }
        }
        ("slidingwindow", [u, n]) => WindowSpec::Sliding {
            size_ms: times(unit(*u)?, int(*n)?)?,
        },
        ("countwindow", [n]) => WindowSpec::Count {
            count: usize::try_from(int(*n)?).unwrap_or(usize::MAX),
            hop: None,
        },
        ("countwindow", [n, h]) => WindowSpec::Count {
            count: usize::try_from(int(*n)?).unwrap_or(usize::MAX),
            hop: Some(usize::try_from(int(*h)?).unwrap_or(usize::MAX)),
        },
        ("tumblingwindow" | "hoppingwindow" | "slidingwindow" | "countwindow", _) => {
            return Err(lower.err(
                f,
                format!("{name}: wrong arguments (TumblingWindow(unit, size), HoppingWindow(unit, size, hop), SlidingWindow(unit, size), CountWindow(count[, hop]))"),
            ));
        }
        _ => return Err(lower.err(f, format!("{name} is not a window"))),
    };
    spec.validate()
        .map_err(|e| lower.err(f, format!("{name}: {e}")))?;
    Ok(spec)
}

fn position_in(msg: &str) -> Option<(u64, u64)> {
    let i = msg.rfind("Line: ")?;
    let rest = &msg[i + "Line: ".len()..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.trim().parse().ok()?, column.parse().ok()?))
}

fn strip_position(msg: &str) -> &str {
    let msg = msg.strip_prefix("sql parser error: ").unwrap_or(msg);
    match msg.rfind(" at Line: ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

/// What expressions see: the row's values, its device, the time, the window.
pub struct Scope<'a> {
    /// The row: the referenced columns' values (see [`Plan::columns`]), then the analytic
    /// results and the table columns, where `layout` says.
    pub row: &'a [Value],
    /// Where analytic results and table columns sit in `row`.
    pub layout: Layout,
    /// The row's device.
    pub device: &'a str,
    /// Functions' context (the time).
    pub ctx: &'a Ctx,
    /// The window's bounds and its aggregates' results (by [`Expr::Agg`] index), when
    /// evaluating a window's output.
    pub window: Option<(u64, u64, &'a [Value])>,
}

/// Evaluates `e` (a run-time error is a message naming what failed).
pub fn eval(e: &Expr, s: &mut Scope<'_>) -> Result<Value, String> {
    Ok(match e {
        Expr::Lit(v) => v.clone(),
        Expr::Col(i) => s.row.get(*i).cloned().unwrap_or(Value::Null),
        Expr::Device => Value::str(s.device),
        Expr::Not(x) => match eval(x, s)? {
            Value::Bool(b) => Value::Bool(!b),
            Value::Null => Value::Null,
            v => return Err(format!("NOT of {}", v.type_name())),
        },
        Expr::Neg(x) => match eval(x, s)? {
            Value::Int(i) => Value::Int(i.checked_neg().ok_or("integer overflow in -")?),
            Value::Float(f) => Value::Float(-f),
            Value::Null => Value::Null,
            v => return Err(format!("- of {}", v.type_name())),
        },
        Expr::Bin(BinOp::And, l, r) => match eval(l, s)? {
            Value::Bool(false) => Value::Bool(false),
            lv => match (lv, eval(r, s)?) {
                (_, Value::Bool(false)) => Value::Bool(false),
                (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                _ => Value::Null,
            },
        },
        Expr::Bin(BinOp::Or, l, r) => match eval(l, s)? {
            Value::Bool(true) => Value::Bool(true),
            lv => match (lv, eval(r, s)?) {
                (_, Value::Bool(true)) => Value::Bool(true),
                (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                _ => Value::Null,
            },
        },
        Expr::Bin(op, l, r) => {
            let (a, b) = (eval(l, s)?, eval(r, s)?);
            binary(*op, &a, &b)?
        }
        Expr::Call(f, args) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args {
                vals.push(eval(a, s)?);
            }
            (f.eval)(s.ctx, &vals)?
        }
        Expr::Agg(_, _, index) => {
            let Some((_, _, results)) = s.window else {
                return Err("aggregate outside a window".into());
            };
            results.get(*index).cloned().unwrap_or(Value::Null)
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            let op = match operand {
                Some(o) => Some(eval(o, s)?),
                None => None,
            };
            for (c, r) in whens {
                let cv = eval(c, s)?;
                let hit = match &op {
                    Some(o) => o.compare(&cv)? == Some(std::cmp::Ordering::Equal),
                    None => cv.is_true(),
                };
                if hit {
                    return eval(r, s);
                }
            }
            match otherwise {
                Some(o) => eval(o, s)?,
                None => Value::Null,
            }
        }
        Expr::InList(x, list, negated) => {
            let v = eval(x, s)?;
            if v.is_null() {
                return Ok(Value::Null);
            }
            let mut found = false;
            for item in list {
                if v.compare(&eval(item, s)?)? == Some(std::cmp::Ordering::Equal) {
                    found = true;
                    break;
                }
            }
            Value::Bool(found != *negated)
        }
        Expr::Between(x, lo, hi, negated) => {
            let v = eval(x, s)?;
            let (l, h) = (eval(lo, s)?, eval(hi, s)?);
            match (v.compare(&l)?, v.compare(&h)?) {
                (Some(a), Some(b)) => Value::Bool((a.is_ge() && b.is_le()) != *negated),
                _ => Value::Null,
            }
        }
        Expr::IsNull(x, negated) => Value::Bool(eval(x, s)?.is_null() != *negated),
        Expr::WindowStart => match s.window {
            Some((start, _, _)) => Value::Int(i64::try_from(start).unwrap_or(i64::MAX)),
            None => Value::Null,
        },
        Expr::WindowEnd => match s.window {
            Some((_, end, _)) => Value::Int(i64::try_from(end).unwrap_or(i64::MAX)),
            None => Value::Null,
        },
        Expr::Analytic(k) => s
            .row
            .get(s.layout.analytic + k)
            .cloned()
            .unwrap_or(Value::Null),
        Expr::TableCol(j) => s
            .row
            .get(s.layout.table + j)
            .cloned()
            .unwrap_or(Value::Null),
    })
}

fn binary(op: BinOp, a: &Value, b: &Value) -> Result<Value, String> {
    use std::cmp::Ordering as O;
    if a.is_null() || b.is_null() {
        return Ok(Value::Null);
    }
    let cmp = |want: fn(O) -> bool| -> Result<Value, String> {
        Ok(match a.compare(b)? {
            Some(o) => Value::Bool(want(o)),
            None => Value::Null,
        })
    };
    match op {
        BinOp::Eq => cmp(|o| o == O::Equal),
        BinOp::Ne => cmp(|o| o != O::Equal),
        BinOp::Lt => cmp(|o| o == O::Less),
        BinOp::Le => cmp(|o| o != O::Greater),
        BinOp::Gt => cmp(|o| o == O::Greater),
        BinOp::Ge => cmp(|o| o != O::Less),
        BinOp::And | BinOp::Or => Err("logic on non-booleans".into()),
        _ => arith(op, a, b),
    }
}

fn arith(op: BinOp, a: &Value, b: &Value) -> Result<Value, String> {
    let sym = match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        _ => "%",
    };
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => {
            let r = match op {
                BinOp::Add => x.checked_add(*y),
                BinOp::Sub => x.checked_sub(*y),
                BinOp::Mul => x.checked_mul(*y),
                BinOp::Div => {
                    if *y == 0 {
                        return Err("division by zero".into());
                    }
                    x.checked_div(*y)
                }
                _ => {
                    if *y == 0 {
                        return Err("modulo by zero".into());
                    }
                    x.checked_rem(*y)
                }
            };
            r.map(Value::Int)
                .ok_or_else(|| format!("integer overflow in {x} {sym} {y}"))
        }
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => {
                if matches!(op, BinOp::Div | BinOp::Mod) && y == 0.0 {
                    return Err(if op == BinOp::Div {
                        "division by zero".into()
                    } else {
                        "modulo by zero".into()
                    });
                }
                Ok(Value::Float(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                    _ => x % y,
                }))
            }
            _ => Err(format!(
                "{} {sym} {}: numbers expected",
                a.type_name(),
                b.type_name()
            )),
        },
    }
}
