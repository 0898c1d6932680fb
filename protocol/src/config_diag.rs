//! Config diagnostics: errors that name file and line, and a TOML reader that collects every
//! problem instead of stopping at the first.
//!
//! How a config file is read:
//!
//! 1. [`Doc::parse_root`] parses the TOML syntax (all syntax errors are reported, with lines).
//! 2. Each table (a section, one device, one tag) is deserialized on its own with
//!    [`Doc::section`] into a raw serde struct whose fields are all optional. Unknown keys are
//!    collected (through `serde_ignored`) and reported with their line and, when one is close,
//!    the field that was probably meant. A type error stops only that table.
//! 3. The caller validates the raw values, reporting each problem with [`Doc::error`] at the
//!    line of the offending key ([`Loc::at`]).
//! 4. [`Doc::finish`] returns the validated value if nothing was reported, else every problem,
//!    in file order.
//!
//! This module (feature `config`) depends only on `toml`, `serde` and `serde_ignored`; the
//! agent's and the hub's config loaders both use it. It lives here because `edgesync-protocol`
//! is the one crate both depend on; it does no I/O beyond what callers pass in.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as named by the caller (usually the path given on the command line).
    pub file: String,
    /// The 1-based line the problem is on, when it has a place in the file.
    pub line: Option<usize>,
    /// A lowercase sentence naming the component and what is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in a config file, in file order; displayed one per line as
/// `file:line: message`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors {
    /// The problems, sorted by line (problems without a line first).
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// A single problem without a line (for example, the file could not be read).
    pub fn single(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            errors: vec![ConfigError {
                file: file.into(),
                line: None,
                message: message.into(),
            }],
        }
    }

    /// The number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there are no problems.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The problems, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.errors.iter()
    }

    /// All problems, one per line (`file:line: message`), with a trailing newline; what
    /// `validate` commands print.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.errors {
            out.push_str(&e.to_string());
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// A parsed TOML value with its place in the file.
pub type Node<'i> = Spanned<DeValue<'i>>;

/// Where a table is in the file and what it is called in messages.
#[derive(Debug, Clone)]
pub struct Loc {
    /// How messages name the table: `[hub]`, `device "plc-1"`, `device "plc-1" tag "temp"`.
    pub component: String,
    /// Line of the table header (or of the key holding an inline table), if the table exists.
    pub header: Option<usize>,
    /// Line of each key of the table.
    keys: Vec<(String, usize)>,
}

impl Loc {
    /// The line of `key` in the table, else the table's own line.
    pub fn at(&self, key: &str) -> Option<usize> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, l)| *l)
            .or(self.header)
    }

    /// A location for a table that is absent from the file.
    pub fn absent(component: impl Into<String>) -> Self {
        Self {
            component: component.into(),
            header: None,
            keys: Vec::new(),
        }
    }

    /// Renames the component (once the table's id is known).
    pub fn named(mut self, component: impl Into<String>) -> Self {
        self.component = component.into();
        self
    }
}

/// Files at least this large are parsed block by block (see [`Doc::parse_root`]).
const CHUNKED_PARSE_MIN_BYTES: usize = 64 * 1024;

/// Whether `line` is exactly an array-of-tables header `[[devices]]` (a comment may follow).
fn is_devices_header(line: &str) -> bool {
    let t = line.trim();
    let Some(rest) = t.strip_prefix("[[") else {
        return false;
    };
    let Some(end) = rest.find("]]") else {
        return false;
    };
    let after = rest[end + 2..].trim_start();
    rest[..end].trim() == "devices" && (after.is_empty() || after.starts_with('#'))
}

/// Parses `text` split before every `[[devices]]` header and merges the parts, except the
/// devices themselves: their trees are dropped as soon as each part is parsed (a file with
/// 100,000 tags would otherwise hold a TOML table per tag, about 1 KiB each), and the byte
/// ranges of the parts holding them are returned, to be parsed again one at a time
/// ([`Doc::device_chunks`]). `None` when anything is unusual (a syntax error, a key defined in
/// two parts, a `devices` key before the first header), so the caller parses the whole text
/// instead.
fn parse_in_chunks(text: &str) -> Option<(DeTable<'_>, Vec<(usize, usize)>)> {
    let mut starts = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > 0 && is_devices_header(line) {
            starts.push(offset);
        }
        offset += line.len();
    }
    if starts.len() < 2 {
        return None;
    }
    starts.push(text.len());
    let mut root: Option<DeTable<'_>> = None;
    let mut device_parts = Vec::new();
    for w in starts.windows(2) {
        let (from, to) = (w[0], w[1]);
        let (part, errors) = DeTable::parse_recoverable(&text[from..to]);
        if !errors.is_empty() {
            return None;
        }
        let part = shift_table(part.into_inner(), from);
        match root.as_mut() {
            None => {
                if part.contains_key("devices") {
                    return None;
                }
                root = Some(part);
            }
            Some(root) => {
                for (key, value) in part {
                    if key.get_ref() == "devices" {
                        // Read again, part by part, when the devices are checked.
                        if !matches!(value.get_ref(), DeValue::Array(_)) {
                            return None;
                        }
                        device_parts.push((from, to));
                    } else if root.contains_key(key.get_ref().as_ref()) {
                        return None;
                    } else {
                        root.insert(key, value);
                    }
                }
            }
        }
    }
    root.map(|r| (r, device_parts))
}

fn shift_table(table: DeTable<'_>, offset: usize) -> DeTable<'_> {
    let mut out = DeTable::new();
    for (k, v) in table {
        let span = k.span();
        out.insert(
            Spanned::new(span.start + offset..span.end + offset, k.into_inner()),
            shift_value(v, offset),
        );
    }
    out
}

fn shift_value(value: Spanned<DeValue<'_>>, offset: usize) -> Spanned<DeValue<'_>> {
    let span = value.span();
    let inner = match value.into_inner() {
        DeValue::Table(t) => DeValue::Table(shift_table(t, offset)),
        DeValue::Array(mut a) => {
            for item in a.iter_mut() {
                let taken = std::mem::replace(item, Spanned::new(0..0, DeValue::Boolean(false)));
                *item = shift_value(taken, offset);
            }
            DeValue::Array(a)
        }
        other => other,
    };
    Spanned::new(span.start + offset..span.end + offset, inner)
}

/// One config file being checked: its line table and the problems found so far.
pub struct Doc<'t> {
    file: String,
    text: &'t str,
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
    /// With a large file parsed in parts: the byte ranges of the parts holding `[[devices]]`
    /// (not kept in the root; see [`Doc::device_chunks`]).
    device_parts: Option<Vec<(usize, usize)>>,
}

impl<'t> Doc<'t> {
    /// Starts checking `text`, which messages call `file`.
    pub fn new(file: &str, text: &'t str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Self {
            file: file.to_owned(),
            text,
            line_starts,
            errors: Vec::new(),
            device_parts: None,
        }
    }

    /// Where the `[[devices]]` tables are: `None` when they are in the root returned by
    /// [`Doc::parse_root`]; otherwise one table per part of the file, each holding only a
    /// `devices` array, parsed now (one part at a time, so that at most one part's tree is in
    /// memory while its devices are checked).
    pub fn device_chunks(&self) -> Option<impl Iterator<Item = DeTable<'t>> + use<'t>> {
        let text = self.text;
        let parts = self.device_parts.clone()?;
        Some(parts.into_iter().filter_map(move |(from, to)| {
            let (part, errors) = DeTable::parse_recoverable(&text[from..to]);
            if !errors.is_empty() {
                // It parsed when the file was first read.
                return None;
            }
            let mut part = shift_table(part.into_inner(), from);
            let devices = part.remove("devices")?;
            let mut only = DeTable::new();
            only.insert(Spanned::new(0..0, "devices".into()), devices);
            Some(only)
        }))
    }

    /// The 1-based line holding byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).max(1)
    }

    /// Reports a problem.
    pub fn error(&mut self, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            message: message.into(),
        });
    }

    /// Reports a problem with the key `key` of the table at `loc`, prefixing the component.
    pub fn at(&mut self, loc: &Loc, key: &str, message: impl fmt::Display) {
        self.error(loc.at(key), format!("{}: {}", loc.component, message));
    }

    /// How many problems have been reported so far.
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// `value` if no problem was reported, else every problem in file order.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        Err(self.into_errors())
    }

    /// Every problem reported, in file order.
    pub fn into_errors(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|e| e.line.unwrap_or(0));
        ConfigErrors {
            errors: self.errors,
        }
    }

    /// Reports `key` as missing (at the table's line) when `value` is `None`.
    pub fn required<T>(&mut self, loc: &Loc, key: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            let msg = format!("{}: missing required field {key:?}", loc.component);
            self.error(loc.header, msg);
        }
        value
    }

    /// `value` (or `default` when absent) if it lies in `range`; else reports it and returns
    /// `default`.
    pub fn int_in(
        &mut self,
        loc: &Loc,
        key: &str,
        value: Option<i64>,
        default: i64,
        range: RangeInclusive<i64>,
    ) -> i64 {
        let Some(v) = value else {
            return default;
        };
        if range.contains(&v) {
            return v;
        }
        let msg = if *range.end() == i64::MAX {
            format!("{key} is {v} but must be at least {}", range.start())
        } else {
            format!(
                "{key} is {v} but must be in {}..={}",
                range.start(),
                range.end()
            )
        };
        self.at(loc, key, msg);
        default
    }

    /// A required, non-empty path, resolved against `base` when relative.
    pub fn path(
        &mut self,
        loc: &Loc,
        key: &str,
        value: Option<String>,
        base: &Path,
    ) -> Option<PathBuf> {
        let value = self.required(loc, key, value)?;
        if value.is_empty() {
            self.at(loc, key, format_args!("{key} is empty"));
            return None;
        }
        Some(base.join(value))
    }

    /// The option named `value`, or a report listing the accepted names.
    pub fn choice<T: Copy>(
        &mut self,
        loc: &Loc,
        key: &str,
        value: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == value) {
            return Some(*v);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.at(
            loc,
            key,
            format_args!("{key} {value:?} is not one of {}", names.join(", ")),
        );
        None
    }

    /// Parses the TOML syntax; reports every syntax error (and returns `None`) if there is any.
    ///
    /// A large file is parsed one `[[devices]]` block at a time (the TOML parser tokenizes its
    /// whole input first, which for a 10,000-tag file would cost an agent ~15 MB of peak
    /// memory); the blocks' other keys are merged into the root, and the devices are left out
    /// of it, to be read again block by block with [`Doc::device_chunks`] (their trees, about
    /// 1 KiB per tag, are never all in memory). Any problem on that path falls back to parsing
    /// the whole text, so errors are reported exactly as for a small file.
    pub fn parse_root(&mut self) -> Option<DeTable<'t>> {
        if self.text.len() >= CHUNKED_PARSE_MIN_BYTES
            && let Some((root, device_parts)) = parse_in_chunks(self.text)
        {
            self.device_parts = Some(device_parts);
            return Some(root);
        }
        let (root, errors) = DeTable::parse_recoverable(self.text);
        if errors.is_empty() {
            return Some(root.into_inner());
        }
        for e in errors {
            let line = e.span().map(|s| self.line(s.start));
            self.error(line, format!("invalid TOML: {}", e.message()));
        }
        None
    }

    /// The location of `table`, the value of a key (or array element) whose own line is at
    /// `header_offset`.
    pub fn loc(
        &self,
        component: impl Into<String>,
        header_offset: usize,
        table: &DeTable<'_>,
    ) -> Loc {
        Loc {
            component: component.into(),
            header: Some(self.line(header_offset)),
            keys: table
                .iter()
                .map(|(k, _)| (k.get_ref().to_string(), self.line(k.span().start)))
                .collect(),
        }
    }

    /// Reports every key of `table` not in `known` as unknown (for tables read by hand, such as
    /// the document root).
    pub fn check_keys(&mut self, loc: &Loc, table: &DeTable<'_>, known: &[&str]) {
        for (k, _) in table.iter() {
            let key = k.get_ref();
            if !known.contains(&key.as_ref()) {
                let line = Some(self.line(k.span().start));
                let msg = unknown_field_message(&loc.component, key, known);
                self.error(line, msg);
            }
        }
    }

    /// The table under `key` of `parent`, with its location; reports a value that is not a table.
    pub fn table<'a, 'i>(
        &mut self,
        parent: &'a DeTable<'i>,
        key: &str,
        component: &str,
    ) -> Option<(&'a Node<'i>, Loc)> {
        let (k, node) = parent.iter().find(|(k, _)| k.get_ref() == key)?;
        match node.get_ref() {
            DeValue::Table(t) => {
                let loc = self.loc(component, k.span().start, t);
                Some((node, loc))
            }
            other => {
                let line = Some(self.line(k.span().start));
                self.error(
                    line,
                    format!("{component}: expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// The tables of the array of tables under `key` of `parent` (`[[key]]`), each with its
    /// location (named `component` until the caller renames it); reports anything else.
    pub fn table_array<'a, 'i>(
        &mut self,
        parent: &'a DeTable<'i>,
        key: &str,
        component: &str,
    ) -> Vec<(&'a Node<'i>, Loc)> {
        let Some((k, node)) = parent.iter().find(|(k, _)| k.get_ref() == key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = node.get_ref() else {
            let line = Some(self.line(k.span().start));
            self.error(
                line,
                format!(
                    "{component}: expected an array of tables ([[{key}]]), found {}",
                    node.get_ref().type_str()
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::Table(t) => {
                    let loc = self.loc(component, item.span().start, t);
                    out.push((item, loc));
                }
                other => {
                    let line = Some(self.line(item.span().start));
                    self.error(
                        line,
                        format!("{component}: expected a table, found {}", other.type_str()),
                    );
                }
            }
        }
        out
    }

    /// Deserializes one table into the raw struct `T`, reporting unknown keys (all of them) and
    /// a type error (which stops this table only) with their lines. `T` should make every field
    /// optional, so that missing fields are reported by validation, all at once.
    pub fn section<T: DeserializeOwned>(&mut self, node: &Node<'_>, loc: &Loc) -> Option<T> {
        self.section_except(node, loc, &[])
    }

    /// Like [`Doc::section`], but leaves out the keys `nested` (nested tables the caller reads
    /// on its own, such as a device's `tags`).
    pub fn section_except<T: DeserializeOwned>(
        &mut self,
        node: &Node<'_>,
        loc: &Loc,
        nested: &[&str],
    ) -> Option<T> {
        let mut ignored: Vec<Vec<Seg>> = Vec::new();
        let mut value = node.clone();
        if let DeValue::Table(t) = value.get_mut() {
            for key in nested {
                t.remove(*key);
            }
        }
        let de = toml::de::ValueDeserializer::from(value);
        let result: Result<T, toml::de::Error> = serde_ignored::deserialize(de, |path| {
            let mut segs = Vec::new();
            path_segments(&path, &mut segs);
            ignored.push(segs);
        });
        let mut known: Vec<&str> = struct_fields::<T>().to_vec();
        known.extend_from_slice(nested);
        for segs in &ignored {
            let line = locate(node, segs)
                .map(|span| self.line(span.start))
                .or(loc.header);
            let name = segs_to_string(segs);
            let msg = if segs.len() == 1 {
                unknown_field_message(&loc.component, &name, &known)
            } else {
                format!("{}: unknown field {name:?}", loc.component)
            };
            self.error(line, msg);
        }
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let (line, key) = match e.span() {
                    Some(span) => (Some(self.line(span.start)), key_at(node, span.start)),
                    None => (loc.header, None),
                };
                let msg = match key {
                    Some(key) => format!("{}: {key}: {}", loc.component, e.message()),
                    None => format!("{}: {}", loc.component, e.message()),
                };
                self.error(line, msg);
                None
            }
        }
    }
}

/// One step of a path into a TOML value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn path_segments(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            path_segments(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            path_segments(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_segments(parent, out),
    }
}

fn segs_to_string(segs: &[Seg]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The span of the last key (or element) of `segs` inside `node`.
fn locate(node: &Node<'_>, segs: &[Seg]) -> Option<Range<usize>> {
    let (first, rest) = segs.split_first()?;
    match (first, node.get_ref()) {
        (Seg::Key(key), DeValue::Table(t)) => {
            let (k, v) = t.iter().find(|(k, _)| k.get_ref() == key)?;
            if rest.is_empty() {
                Some(k.span())
            } else {
                locate(v, rest).or(Some(k.span()))
            }
        }
        (Seg::Index(i), DeValue::Array(a)) => {
            let v = a.get(*i)?;
            if rest.is_empty() {
                Some(v.span())
            } else {
                locate(v, rest).or(Some(v.span()))
            }
        }
        _ => None,
    }
}

/// The dotted path of the deepest key of `node` whose value contains byte `offset`.
fn key_at(node: &Node<'_>, offset: usize) -> Option<String> {
    fn walk(node: &Node<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
        match node.get_ref() {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    if v.span().contains(&offset) || v.span().start == offset {
                        path.push(Seg::Key(k.get_ref().to_string()));
                        walk(v, offset, path);
                        return true;
                    }
                }
                false
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    if v.span().contains(&offset) {
                        path.push(Seg::Index(i));
                        walk(v, offset, path);
                        return true;
                    }
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    walk(node, offset, &mut path);
    if path.is_empty() {
        None
    } else {
        Some(segs_to_string(&path))
    }
}

fn unknown_field_message(component: &str, key: &str, known: &[&str]) -> String {
    if known.is_empty() {
        return format!("{component}: unknown field {key:?}");
    }
    let close = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min_by_key(|(d, _)| *d);
    match close {
        Some((_, k)) => format!("{component}: unknown field {key:?} (did you mean {k:?}?)"),
        None => format!(
            "{component}: unknown field {key:?} (expected one of: {})",
            known.join(", ")
        ),
    }
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment),
/// for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The field names a derived `Deserialize` struct expects (empty for anything else).
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("probe"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Raw {
        /// A number.
        port: Option<i64>,
        /// A name.
        name: Option<String>,
    }

    #[test]
    fn lines_are_one_based() {
        let doc = Doc::new("f", "a\nbc\n\nd");
        assert_eq!(doc.line(0), 1);
        assert_eq!(doc.line(1), 1);
        assert_eq!(doc.line(2), 2);
        assert_eq!(doc.line(5), 3);
        assert_eq!(doc.line(6), 4);
    }

    #[test]
    fn unknown_fields_and_type_errors_have_lines() {
        let text = "[s]\nport = 1\nnmae = \"x\"\nother = { deep = 1 }\n";
        let mut doc = Doc::new("f.toml", text);
        let root = doc.parse_root().unwrap();
        let (node, loc) = doc.table(&root, "s", "[s]").unwrap();
        let raw: Raw = doc.section(node, &loc).unwrap();
        assert_eq!(raw.port, Some(1));
        assert_eq!(raw.name, None);
        let errs = doc.finish(()).unwrap_err();
        let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            [
                "f.toml:3: [s]: unknown field \"nmae\" (did you mean \"name\"?)",
                "f.toml:4: [s]: unknown field \"other\" (expected one of: port, name)",
            ]
        );

        let text = "[s]\n\nport = \"x\"\n";
        let mut doc = Doc::new("f.toml", text);
        let root = doc.parse_root().unwrap();
        let (node, loc) = doc.table(&root, "s", "[s]").unwrap();
        assert!(doc.section::<Raw>(node, &loc).is_none());
        let errs = doc.finish(()).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs.errors[0].line, Some(3));
        assert!(
            errs.errors[0]
                .message
                .starts_with("[s]: port: invalid type"),
            "{errs}"
        );
    }

    #[test]
    fn syntax_errors_are_all_reported() {
        let mut doc = Doc::new("f.toml", "a = 1\na = 2\n[t\n");
        assert!(doc.parse_root().is_none());
        let errs = doc.finish(()).unwrap_err();
        assert!(errs.len() >= 2, "{errs}");
        assert_eq!(errs.errors[0].line, Some(2));
        assert!(
            errs.to_string().contains("f.toml:3: invalid TOML"),
            "{errs}"
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("adress", "address"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("nmae", "name"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(struct_fields::<Raw>(), ["port", "name"]);
    }
}
