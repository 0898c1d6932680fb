//! Lookup tables: static rows (per-device limits, set points, names) that rules join with
//! `FROM <device> [INNER | LEFT] JOIN <table> ON ...` (see [`crate::plan`] for the join and
//! [`crate::engine`] for when it is evaluated).
//!
//! This is eKuiper's table join (`docs/en_US/guide/tables/scan.md`: a `TYPE="file"` table
//! holding "an array of objects", joined `SELECT * FROM demo INNER JOIN table1 on demo.id =
//! table1.id`; `lookup.md` for the lookup kind). A table here is given whole to the engine
//! ([`crate::Catalog::add_table`], [`crate::Engine::set_table`]); it is never updated by
//! rules, and a change to it does not trigger any rule (the next row reads it).
//!
//! [`load_table_file`] reads one from text (the caller reads the file):
//!
//! * **JSON** (`.json`, `.jsonl`, `.ndjson`): an array of objects, as eKuiper's file table, or
//!   a sequence of objects (JSON Lines). Columns are the keys in first-seen order; a key a row
//!   lacks is null in that row. A column's type is that of its values (integers and floats
//!   together make a float column); strings, numbers and booleans cannot share a column, and
//!   nested arrays or objects are refused. A column with only nulls is a string column.
//! * **CSV** (any other extension): a header line of column names, then one row per line;
//!   RFC 4180 quoting (`"a, b"`, `""` for a quote). A header name may carry its type,
//!   `name:string`, `name:bigint` (or `int`), `name:float`, `name:bool` (or `boolean`);
//!   otherwise the type is inferred from the column's cells: integers, else numbers, else
//!   `true`/`false`, else strings. An empty cell is null. Annotate identifiers that look
//!   like numbers (`device:string` for devices named `001`).
//!
//! Every error names the file and, where it applies, the line and column.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::plan::ColType;
use crate::rule::RuleFileError;
use crate::value::Value;

/// Largest table file read.
pub const MAX_TABLE_FILE_BYTES: usize = 16 << 20;

/// A table: typed columns and rows of values (null allowed anywhere).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    columns: Vec<(String, ColType)>,
    rows: Vec<Vec<Value>>,
}

impl Table {
    /// A table of `columns` (unique, non-empty names) and `rows` (one value per column, each
    /// null or of its column's type; an integer in a float column becomes a float).
    pub fn new(
        columns: Vec<(String, ColType)>,
        mut rows: Vec<Vec<Value>>,
    ) -> Result<Table, String> {
        let mut seen = HashSet::new();
        for (name, _) in &columns {
            if name.is_empty() {
                return Err("a column has an empty name".into());
            }
            if !seen.insert(name.as_str()) {
                return Err(format!("column {name:?} appears twice"));
            }
        }
        for (r, row) in rows.iter_mut().enumerate() {
            if row.len() != columns.len() {
                return Err(format!(
                    "row {}: {} values for {} columns",
                    r + 1,
                    row.len(),
                    columns.len()
                ));
            }
            for ((name, ty), v) in columns.iter().zip(row.iter_mut()) {
                *v = conform(v, *ty).ok_or_else(|| {
                    format!(
                        "row {}: column {name:?} holds {}, not a {}",
                        r + 1,
                        v.type_name(),
                        type_word(*ty)
                    )
                })?;
            }
        }
        Ok(Table { columns, rows })
    }

    /// The columns and their types, in order.
    pub fn columns(&self) -> &[(String, ColType)] {
        &self.columns
    }

    /// The rows, in order.
    pub fn rows(&self) -> &[Vec<Value>] {
        &self.rows
    }

    /// The index of column `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|(n, _)| n == name)
    }
}

fn conform(v: &Value, ty: ColType) -> Option<Value> {
    match (v, ty) {
        (Value::Null, _) => Some(Value::Null),
        (Value::Bool(_), ColType::Bool)
        | (Value::Int(_), ColType::Int)
        | (Value::Float(_), ColType::Float)
        | (Value::Str(_), ColType::Str)
        | (_, ColType::Any) => Some(v.clone()),
        (Value::Int(i), ColType::Float) => Some(Value::Float(*i as f64)),
        _ => None,
    }
}

fn type_word(ty: ColType) -> &'static str {
    match ty {
        ColType::Bool => "bool",
        ColType::Int => "bigint",
        ColType::Float => "float",
        ColType::Str => "string",
        ColType::Any => "any",
    }
}

/// Parses a table file's text; `file` names it in errors and its extension picks JSON
/// (`.json`, `.jsonl`, `.ndjson`) or CSV (anything else). See the module docs.
pub fn load_table_file(file: &str, text: &str) -> Result<Table, RuleFileError> {
    let err = |line: usize, column: usize, message: String| RuleFileError {
        file: file.to_owned(),
        line,
        column,
        message,
    };
    if text.len() > MAX_TABLE_FILE_BYTES {
        return Err(err(
            0,
            0,
            format!("larger than {MAX_TABLE_FILE_BYTES} bytes"),
        ));
    }
    let ext = Path::new(file)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if matches!(ext.as_str(), "json" | "jsonl" | "ndjson") {
        json_table(text).map_err(|(l, c, m)| err(l, c, m))
    } else {
        csv_table(text).map_err(|(l, c, m)| err(l, c, m))
    }
}

/// An error: line, column (1-based; 0 unknown), message.
type Fail = (usize, usize, String);

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Builds a table from rows of (name, value) pairs, each with its line, inferring each
/// column's type from its values.
fn typed_table(rows: Vec<(usize, Vec<(String, Value)>)>) -> Result<Table, Fail> {
    let mut names: Vec<String> = Vec::new();
    for (_, row) in &rows {
        for (k, _) in row {
            if !names.iter().any(|n| n == k) {
                names.push(k.clone());
            }
        }
    }
    // Infer each column's type from its values, first mismatch reported with its line.
    let mut types: Vec<Option<ColType>> = vec![None; names.len()];
    let mut first_line: Vec<usize> = vec![0; names.len()];
    for (line, row) in &rows {
        for (k, v) in row {
            let Some(i) = names.iter().position(|n| n == k) else {
                continue;
            };
            let t = match v {
                Value::Null => continue,
                Value::Bool(_) => ColType::Bool,
                Value::Int(_) => ColType::Int,
                Value::Float(_) => ColType::Float,
                Value::Str(_) => ColType::Str,
            };
            let merged = match (types[i], t) {
                (None, t) => Some(t),
                (Some(a), b) if a == b => Some(a),
                (Some(ColType::Int), ColType::Float) | (Some(ColType::Float), ColType::Int) => {
                    Some(ColType::Float)
                }
                _ => None,
            };
            match merged {
                Some(m) => {
                    if types[i].is_none() {
                        first_line[i] = *line;
                    }
                    types[i] = Some(m);
                }
                None => {
                    let prev = types[i].map_or("?", type_word);
                    return Err((
                        *line,
                        0,
                        format!(
                            "column {k:?} holds {} here but {prev} on line {}",
                            v.type_name(),
                            first_line[i]
                        ),
                    ));
                }
            }
        }
    }
    let columns: Vec<(String, ColType)> = names
        .into_iter()
        .zip(types)
        .map(|(n, t)| (n, t.unwrap_or(ColType::Str)))
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for (_, row) in rows {
        let mut values = vec![Value::Null; columns.len()];
        for (k, v) in row {
            if let Some(i) = columns.iter().position(|(n, _)| *n == k) {
                values[i] = v;
            }
        }
        out.push(values);
    }
    Table::new(columns, out).map_err(|m| (0, 0, m))
}

// ---- JSON ----

/// One JSON object, keys in document order.
struct OrderedRow(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedRow;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object (one row)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedRow, A::Error> {
                let mut out: Vec<(String, serde_json::Value)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if out.iter().any(|(n, _)| *n == k) {
                        return Err(de::Error::custom(format!("key {k:?} appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(OrderedRow(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn json_value(v: serde_json::Value) -> Result<Value, &'static str> {
    Ok(match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => match n.as_f64() {
                Some(f) if f.is_finite() => Value::Float(f),
                _ => return Err("a number out of range"),
            },
        },
        serde_json::Value::String(s) => Value::str(&s),
        serde_json::Value::Array(_) => return Err("an array (nested values are not supported)"),
        serde_json::Value::Object(_) => {
            return Err("an object (nested values are not supported)");
        }
    })
}

fn json_table(text: &str) -> Result<Table, Fail> {
    let trimmed = text.trim_start();
    let start = text.len() - trimmed.len();
    let mut rows: Vec<(usize, Vec<(String, Value)>)> = Vec::new();
    let mut push = |offset: usize, row: OrderedRow| -> Result<(), Fail> {
        let (line, _) = line_col(text, offset);
        let mut values = Vec::with_capacity(row.0.len());
        for (k, v) in row.0 {
            let v = json_value(v).map_err(|m| (line, 0, format!("column {k:?}: {m}")))?;
            values.push((k, v));
        }
        rows.push((line, values));
        Ok(())
    };
    let syntax = |e: serde_json::Error, base: usize| -> Fail {
        // Positions of errors in a slice starting at `base`, made absolute.
        let (bl, bc) = line_col(text, base);
        let (l, c) = (e.line(), e.column());
        let msg = strip_json_position(&e.to_string());
        if l <= 1 {
            (bl, bc + c.saturating_sub(1), msg)
        } else {
            (bl + l - 1, c, msg)
        }
    };
    if trimmed.starts_with('[') {
        // eKuiper's file table: an array of objects. Walk it element by element to know
        // each row's line.
        serde_json::from_str::<de::IgnoredAny>(text).map_err(|e| syntax(e, 0))?;
        let mut pos = start + 1;
        loop {
            pos = skip_ws(text, pos);
            match text.as_bytes().get(pos) {
                Some(b']') | None => break,
                Some(b',') => {
                    pos += 1;
                    continue;
                }
                Some(_) => {}
            }
            let rest = text.get(pos..).unwrap_or("");
            let mut it = serde_json::Deserializer::from_str(rest).into_iter::<OrderedRow>();
            match it.next() {
                Some(Ok(row)) => {
                    push(pos, row)?;
                    pos += it.byte_offset();
                }
                Some(Err(e)) => return Err(syntax(e, pos)),
                None => break,
            }
        }
    } else {
        // JSON Lines (or any whitespace-separated objects).
        let mut it = serde_json::Deserializer::from_str(text).into_iter::<OrderedRow>();
        loop {
            let offset = skip_ws(text, it.byte_offset());
            match it.next() {
                Some(Ok(row)) => push(offset, row)?,
                Some(Err(e)) => return Err(syntax(e, 0)),
                None => break,
            }
        }
    }
    typed_table(rows)
}

fn skip_ws(text: &str, mut pos: usize) -> usize {
    let b = text.as_bytes();
    while b.get(pos).is_some_and(|c| c.is_ascii_whitespace()) {
        pos += 1;
    }
    pos
}

fn strip_json_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

// ---- CSV ----

/// A cell: its text, its line and column.
struct Cell {
    text: String,
    line: usize,
    column: usize,
}

/// Splits CSV text into records of cells (RFC 4180; blank lines skipped).
fn csv_records(text: &str) -> Result<Vec<Vec<Cell>>, Fail> {
    let mut records = Vec::new();
    let mut record: Vec<Cell> = Vec::new();
    let mut chars = text.chars().peekable();
    let (mut line, mut col) = (1usize, 1usize);
    loop {
        // At the start of a cell.
        let (cl, cc) = (line, col);
        let mut cell = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            col += 1;
            loop {
                match chars.next() {
                    None => return Err((cl, cc, "a quoted cell is not closed".into())),
                    Some('"') => {
                        col += 1;
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            col += 1;
                            cell.push('"');
                        } else {
                            break;
                        }
                    }
                    Some('\n') => {
                        line += 1;
                        col = 1;
                        cell.push('\n');
                    }
                    Some(c) => {
                        col += 1;
                        cell.push(c);
                    }
                }
            }
            match chars.peek() {
                None | Some(',' | '\n' | '\r') => {}
                Some(_) => {
                    return Err((
                        line,
                        col,
                        "a quoted cell must end at a comma or the end of the line".into(),
                    ));
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if matches!(c, ',' | '\n' | '\r') {
                    break;
                }
                if c == '"' {
                    return Err((line, col, "a quote inside an unquoted cell".into()));
                }
                cell.push(c);
                chars.next();
                col += 1;
            }
        }
        record.push(Cell {
            text: cell,
            line: cl,
            column: cc,
        });
        match chars.next() {
            Some(',') => col += 1,
            Some('\r') => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                line += 1;
                col = 1;
                end_record(&mut records, &mut record);
            }
            Some('\n') => {
                line += 1;
                col = 1;
                end_record(&mut records, &mut record);
            }
            None => {
                end_record(&mut records, &mut record);
                break;
            }
            Some(_) => {}
        }
    }
    Ok(records)
}

fn end_record(records: &mut Vec<Vec<Cell>>, record: &mut Vec<Cell>) {
    let r = std::mem::take(record);
    let blank = r.len() == 1 && r[0].text.trim().is_empty();
    if !blank {
        records.push(r);
    }
}

fn parse_type(t: &str) -> Option<ColType> {
    Some(match t.trim().to_ascii_lowercase().as_str() {
        "string" | "str" => ColType::Str,
        "bigint" | "int" | "integer" => ColType::Int,
        "float" | "double" => ColType::Float,
        "bool" | "boolean" => ColType::Bool,
        _ => return None,
    })
}

fn csv_table(text: &str) -> Result<Table, Fail> {
    let mut records = csv_records(text)?.into_iter();
    let Some(header) = records.next() else {
        return Err((
            1,
            1,
            "a CSV table needs a header line of column names".into(),
        ));
    };
    let mut declared: Vec<(String, Option<ColType>)> = Vec::with_capacity(header.len());
    for cell in &header {
        let (name, ty) = match cell.text.rsplit_once(':') {
            Some((n, t)) => match parse_type(t) {
                Some(ty) => (n.trim(), Some(ty)),
                None => {
                    return Err((
                        cell.line,
                        cell.column,
                        format!(
                            "column {:?}: type {t:?} is not one of string, bigint, float, bool",
                            n.trim()
                        ),
                    ));
                }
            },
            None => (cell.text.trim(), None),
        };
        if name.is_empty() {
            return Err((cell.line, cell.column, "a column has an empty name".into()));
        }
        if declared.iter().any(|(d, _)| d == name) {
            return Err((
                cell.line,
                cell.column,
                format!("column {name:?} appears twice"),
            ));
        }
        declared.push((name.to_owned(), ty));
    }
    let records: Vec<Vec<Cell>> = records.collect();
    // Infer undeclared types from every cell of the column.
    let mut types: Vec<ColType> = Vec::with_capacity(declared.len());
    for (i, (_, ty)) in declared.iter().enumerate() {
        let t = match ty {
            Some(t) => *t,
            None => {
                let cells = || {
                    records
                        .iter()
                        .filter_map(move |r| r.get(i))
                        .map(|c| c.text.trim())
                        .filter(|t| !t.is_empty())
                };
                if cells().next().is_none() {
                    ColType::Str
                } else if cells().all(|t| t.parse::<i64>().is_ok()) {
                    ColType::Int
                } else if cells().all(|t| t.parse::<f64>().is_ok_and(f64::is_finite)) {
                    ColType::Float
                } else if cells()
                    .all(|t| t.eq_ignore_ascii_case("true") || t.eq_ignore_ascii_case("false"))
                {
                    ColType::Bool
                } else {
                    ColType::Str
                }
            }
        };
        types.push(t);
    }
    let mut rows = Vec::with_capacity(records.len());
    for r in records {
        if r.len() != declared.len() {
            let at = r.first().map_or((0, 0), |c| (c.line, c.column));
            return Err((
                at.0,
                at.1,
                format!("{} cells, but the header has {}", r.len(), declared.len()),
            ));
        }
        let mut values = Vec::with_capacity(r.len());
        for ((cell, (name, _)), ty) in r.iter().zip(&declared).zip(&types) {
            let t = cell.text.trim();
            let v = if t.is_empty() {
                Value::Null
            } else {
                match ty {
                    ColType::Str | ColType::Any => Value::str(&cell.text),
                    ColType::Int => t.parse::<i64>().map(Value::Int).map_err(|_| {
                        (
                            cell.line,
                            cell.column,
                            format!("column {name:?}: {t:?} is not a bigint"),
                        )
                    })?,
                    ColType::Float => match t.parse::<f64>() {
                        Ok(f) if f.is_finite() => Value::Float(f),
                        _ => {
                            return Err((
                                cell.line,
                                cell.column,
                                format!("column {name:?}: {t:?} is not a float"),
                            ));
                        }
                    },
                    ColType::Bool => {
                        if t.eq_ignore_ascii_case("true") {
                            Value::Bool(true)
                        } else if t.eq_ignore_ascii_case("false") {
                            Value::Bool(false)
                        } else {
                            return Err((
                                cell.line,
                                cell.column,
                                format!("column {name:?}: {t:?} is not true or false"),
                            ));
                        }
                    }
                }
            };
            values.push(v);
        }
        rows.push(values);
    }
    let columns = declared
        .into_iter()
        .zip(types)
        .map(|((n, _), t)| (n, t))
        .collect();
    Table::new(columns, rows).map_err(|m| (0, 0, m))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn csv_with_inferred_and_declared_types() {
        let t = load_table_file(
            "limits.csv",
            "device:string,max_temp,alarm,label\r\n001,85,true,\"hot, very\"\n\nboiler,90.5,false,\n",
        )
        .unwrap();
        assert_eq!(
            t.columns(),
            &[
                ("device".into(), ColType::Str),
                ("max_temp".into(), ColType::Float),
                ("alarm".into(), ColType::Bool),
                ("label".into(), ColType::Str),
            ]
        );
        assert_eq!(
            t.rows()[0],
            vec![
                Value::str("001"),
                Value::Float(85.0),
                Value::Bool(true),
                Value::str("hot, very")
            ]
        );
        assert_eq!(t.rows()[1][3], Value::Null);
        assert_eq!(t.column("alarm"), Some(2));
    }

    #[test]
    fn csv_errors_name_file_line_and_column() {
        let e = load_table_file("l.csv", "a,b\n1,2\n3\n").unwrap_err();
        assert_eq!((e.file.as_str(), e.line, e.column), ("l.csv", 3, 1));
        assert!(e.message.contains("1 cells"), "{e}");
        let e = load_table_file("l.csv", "a:bigint,b\n1,2\nx,3\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1));
        assert!(e.to_string().starts_with("l.csv:3:1: column \"a\""), "{e}");
        let e = load_table_file("l.csv", "a:decimal\n1\n").unwrap_err();
        assert_eq!((e.line, e.column), (1, 1));
        let e = load_table_file("l.csv", "a,b\n1,\"open\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
        let e = load_table_file("l.csv", "a,a\n").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
        let e = load_table_file("l.csv", "").unwrap_err();
        assert!(e.message.contains("header"), "{e}");
    }

    #[test]
    fn json_array_and_lines() {
        let text = "[\n  {\"device\": \"boiler\", \"max_temp\": 85},\n  {\"device\": \"oven\", \"max_temp\": 250.5, \"zone\": \"b\"}\n]";
        let t = load_table_file("limits.json", text).unwrap();
        assert_eq!(
            t.columns(),
            &[
                ("device".into(), ColType::Str),
                ("max_temp".into(), ColType::Float),
                ("zone".into(), ColType::Str),
            ]
        );
        assert_eq!(
            t.rows()[0],
            vec![Value::str("boiler"), Value::Float(85.0), Value::Null]
        );
        let t = load_table_file(
            "l.jsonl",
            "{\"id\": 1, \"on\": true}\n{\"id\": 2, \"on\": false}\n",
        )
        .unwrap();
        assert_eq!(
            t.columns(),
            &[("id".into(), ColType::Int), ("on".into(), ColType::Bool)]
        );
        assert_eq!(t.rows().len(), 2);
        assert!(load_table_file("e.json", "[]").unwrap().rows().is_empty());
    }

    #[test]
    fn json_errors_name_the_line() {
        let text = "[\n {\"a\": 1},\n {\"a\": \"x\"}\n]";
        let e = load_table_file("t.json", text).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(
            e.message
                .contains("column \"a\" holds string here but bigint on line 2"),
            "{e}"
        );
        let e = load_table_file("t.json", "[\n {\"a\": 1},\n {\"a\": [1]}\n]").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("nested"), "{e}");
        let e = load_table_file("t.json", "[\n {\"a\": 1},\n {\"a\" 2}\n]").unwrap_err();
        assert_eq!((e.line, e.column), (3, 7));
        let e = load_table_file("t.json", "[\n 1\n]").unwrap_err();
        assert_eq!(e.line, 2);
        let e = load_table_file("t.jsonl", "{\"a\": 1}\n{\"a\": 2,}\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = load_table_file("t.json", "{\"a\": 1, \"a\": 2}").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
    }

    #[test]
    fn table_new_checks_shape_and_types() {
        assert!(Table::new(vec![("a".into(), ColType::Int)], vec![vec![]]).is_err());
        assert!(
            Table::new(
                vec![("a".into(), ColType::Int)],
                vec![vec![Value::str("x")]]
            )
            .is_err()
        );
        let t = Table::new(
            vec![("a".into(), ColType::Float)],
            vec![vec![Value::Int(2)], vec![Value::Null]],
        )
        .unwrap();
        assert_eq!(t.rows()[0][0], Value::Float(2.0));
    }
}
