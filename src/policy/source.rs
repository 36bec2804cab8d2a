//! Finding and parsing policy files.
//!
//! Discovery walks the directory recursively, follows symlinks (a Kubernetes ConfigMap
//! mounts every file as a symlink into `..data`), skips dot-names and `tests/` folders.
//! YAML is read by serde-saphyr under a budget (alias expansion, depth, size), JSON and
//! NDJSON by serde_json. Syntax, type and unknown-key errors come located from the
//! parsers. Errors found later by the compiler carry a path into the document
//! (`customers[3].subscriptions[0].plan`); [`Locator`] turns such a path back into a
//! line and column by re-reading that one file with positions, which only ever happens
//! on the error path, so loading a million customers never pays for positions.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

use super::error::Diagnostic;
use super::raw::{Customer, Document};

/// Limits that keep a hostile or broken file from exhausting the process.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest policy file, in bytes (default 256 MiB).
    pub max_file_bytes: u64,
    /// Deepest nesting of YAML collections (default 32; the schema needs 6).
    pub max_depth: usize,
    /// Most YAML alias uses per file (default 1,000).
    pub max_aliases: usize,
    /// Most parser events replayed through aliases per file (default 10,000): the
    /// alias expansion budget that stops "billion laughs" documents.
    pub max_alias_expansion: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 256 * 1024 * 1024,
            max_depth: 32,
            max_aliases: 1_000,
            max_alias_expansion: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
    Ndjson,
}

impl Format {
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            "ndjson" => Some(Format::Ndjson),
            _ => None,
        }
    }
}

/// A policy file found on disk: its path relative to the policy directory.
#[derive(Debug, Clone)]
pub struct FoundFile {
    pub rel: PathBuf,
    pub abs: PathBuf,
    pub format: Format,
}

/// Lists policy files under `dir`, sorted by relative path (the snapshot version must
/// not depend on directory iteration order).
pub fn discover(dir: &Path) -> Result<Vec<FoundFile>, Diagnostic> {
    let meta =
        std::fs::metadata(dir).map_err(|e| io_diag(dir, &e, "cannot read policy directory"))?;
    if !meta.is_dir() {
        return Err(Diagnostic {
            file: dir.to_path_buf(),
            line: 0,
            column: 0,
            message: "expected a directory of policy files".into(),
        });
    }
    let mut out = Vec::new();
    let mut visited = HashSet::new();
    walk(dir, Path::new(""), &mut out, &mut visited)?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn walk(
    abs: &Path,
    rel: &Path,
    out: &mut Vec<FoundFile>,
    visited: &mut HashSet<PathBuf>,
) -> Result<(), Diagnostic> {
    // A symlink cycle would otherwise walk forever.
    if let Ok(canon) = std::fs::canonicalize(abs)
        && !visited.insert(canon)
    {
        return Ok(());
    }
    let entries = std::fs::read_dir(abs).map_err(|e| io_diag(abs, &e, "cannot list directory"))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_diag(abs, &e, "cannot list directory"))?;
        let name = entry.file_name();
        let Some(name_str) = name.to_str() else {
            continue;
        };
        if name_str.starts_with('.') {
            continue;
        }
        let child_abs = entry.path();
        let child_rel = rel.join(&name);
        // `metadata` follows symlinks; a dangling link is skipped like a vanished file
        // (it is routine in the middle of a ConfigMap swap).
        let Ok(meta) = std::fs::metadata(&child_abs) else {
            continue;
        };
        if meta.is_dir() {
            if name_str == "tests" {
                continue;
            }
            walk(&child_abs, &child_rel, out, visited)?;
        } else if let Some(format) = Format::of(&child_abs) {
            out.push(FoundFile {
                rel: child_rel,
                abs: child_abs,
                format,
            });
        }
    }
    Ok(())
}

pub(super) fn io_diag(path: &Path, e: &std::io::Error, what: &str) -> Diagnostic {
    Diagnostic {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message: format!("{what}: {e}"),
    }
}

/// Where a customer record came from, for locating its errors.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// `customers[i]` of a YAML/JSON document.
    Document { index: usize },
    /// One line of an NDJSON file (1-based).
    Line { line: u64 },
}

/// The parsed content of one file.
#[derive(Debug)]
pub enum Content {
    Document(Document),
    Customers(Vec<(u64, Customer)>),
}

/// One file, parsed: what could be read of it, its errors, and the names of the
/// entries that failed (references to them are not reported as unknown).
#[derive(Debug, Default)]
pub struct Parsed {
    /// `None` when nothing of the file could be read (a syntax error).
    pub content: Option<Content>,
    pub diagnostics: Vec<Diagnostic>,
    pub broken: Vec<String>,
}

/// Reads and parses one file. A document that does not fit the schema is read again
/// entry by entry, so every bad entry is reported and the good ones are still
/// compiled; an NDJSON file reports every bad line, and its good lines still parse.
pub fn parse_file(file: &FoundFile, text: &str, limits: &Limits) -> Parsed {
    let diag = |(line, column, message): (u64, u64, String)| Diagnostic {
        file: file.rel.clone(),
        line,
        column,
        message,
    };
    let first = match file.format {
        Format::Yaml => match parse_yaml::<Document>(text, limits) {
            Ok(doc) => return Parsed::whole(Content::Document(doc)),
            Err(e) => diag(e),
        },
        Format::Json => match serde_json::from_str::<Document>(text) {
            Ok(doc) => return Parsed::whole(Content::Document(doc)),
            Err(e) if e.classify() != serde_json::error::Category::Data => {
                return Parsed::failed(json_diag(&file.rel, &e, 0));
            }
            Err(e) => json_diag(&file.rel, &e, 0),
        },
        Format::Ndjson => {
            let (customers, diagnostics) = parse_ndjson(&file.rel, text);
            return Parsed {
                content: Some(Content::Customers(customers)),
                diagnostics,
                broken: Vec::new(),
            };
        }
    };
    match super::lenient::recover(text, limits) {
        Some(r) if !r.errors.is_empty() => Parsed {
            content: Some(Content::Document(r.document)),
            diagnostics: r.errors.into_iter().map(diag).collect(),
            broken: r.broken,
        },
        _ => Parsed::failed(first),
    }
}

impl Parsed {
    fn whole(content: Content) -> Self {
        Parsed {
            content: Some(content),
            ..Parsed::default()
        }
    }

    fn failed(d: Diagnostic) -> Self {
        Parsed {
            content: None,
            diagnostics: vec![d],
            broken: Vec::new(),
        }
    }
}

/// Parses NDJSON customers, one per line; a big file is split at line boundaries and
/// parsed on every core (bulk exports are the largest policy files there are).
fn parse_ndjson(rel: &Path, text: &str) -> (Vec<(u64, Customer)>, Vec<Diagnostic>) {
    let parse = |chunk: &str, first_line: u64| {
        let mut customers = Vec::new();
        let mut errors = Vec::new();
        for (i, line) in chunk.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let n = first_line + i as u64;
            match serde_json::from_str::<Customer>(line) {
                Ok(c) => customers.push((n, c)),
                Err(e) => errors.push(json_diag(rel, &e, n - 1)),
            }
        }
        (customers, errors)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    if threads < 2 || text.len() < (1 << 20) {
        return parse(text, 1);
    }
    // Chunk boundaries just after a newline, with each chunk's first line number.
    let mut chunks = Vec::with_capacity(threads);
    let mut start = 0;
    let mut line = 1u64;
    for k in 1..=threads {
        let mut end = if k == threads {
            text.len()
        } else {
            (text.len() * k / threads).max(start)
        };
        while end < text.len() && !text.is_char_boundary(end) {
            end += 1;
        }
        if let Some(nl) = text[end..].find('\n') {
            end += nl + 1;
        } else {
            end = text.len();
        }
        if end <= start {
            continue;
        }
        let chunk = &text[start..end];
        chunks.push((chunk, line));
        line += chunk.bytes().filter(|&b| b == b'\n').count() as u64;
        start = end;
        if start >= text.len() {
            break;
        }
    }
    let parts: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|&(c, l)| s.spawn(move || parse(c, l)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut customers = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
    let mut errors = Vec::new();
    for (c, e) in parts {
        customers.extend(c);
        errors.extend(e);
    }
    (customers, errors)
}

fn json_diag(file: &Path, e: &serde_json::Error, line_offset: u64) -> Diagnostic {
    // serde_json appends " at line L column C"; the location is ours to print.
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    Diagnostic {
        file: file.to_path_buf(),
        line: e.line() as u64 + line_offset,
        // serde_json says column 0 for an error before the first character of a line.
        column: (e.column() as u64).max(1),
        message: msg,
    }
}

fn yaml_options(text: &str, limits: &Limits) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    // Node and event counts scale with the file (a million customers is legitimate);
    // what a small file must not do is expand through aliases or nest without end.
    let scale = text.len().saturating_mul(2).max(1_000_000);
    budget.max_events = scale;
    budget.max_nodes = scale;
    budget.max_total_scalar_bytes = text.len().max(1 << 20);
    budget.max_reader_input_bytes = Some(limits.max_file_bytes as usize);
    budget.max_depth = limits.max_depth;
    budget.max_aliases = limits.max_aliases;
    budget.max_anchors = limits.max_aliases;
    budget.max_recorded_anchor_events = limits.max_alias_expansion;
    budget.max_documents = 1;
    let mut opts = serde_saphyr::Options::default();
    opts.budget = Some(budget);
    opts.with_snippet = false;
    opts
}

/// Parses YAML into `T`, returning `(line, column, message)` on error.
pub(super) fn parse_yaml<T: for<'de> Deserialize<'de> + Default>(
    text: &str,
    limits: &Limits,
) -> Result<T, (u64, u64, String)> {
    if is_blank_yaml(text) {
        return Ok(T::default());
    }
    serde_saphyr::from_str_with_options::<T>(text, yaml_options(text, limits)).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        (
            line.max(1),
            column.max(1),
            clean_yaml_message(&e.without_snippet().to_string()),
        )
    })
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---"
    })
}

/// serde-saphyr writes "line L column C: message"; the location is printed by us.
fn clean_yaml_message(msg: &str) -> String {
    let msg = msg.strip_prefix("error: ").unwrap_or(msg);
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains(", column ") => &msg[..i],
        _ => msg,
    };
    let msg = msg.replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    if let Some(breach) = msg.strip_prefix("budget breached: ") {
        let what = match breach.split([' ', '{']).next().unwrap_or("") {
            "Aliases" | "RecordedAnchorEvents" | "RecordedAnchorBytes" | "AliasAnchorRatio" => {
                "too many YAML aliases or too much alias expansion"
            }
            "Anchors" => "too many YAML anchors",
            "Depth" => "nesting too deep",
            "Nodes" | "Events" | "TotalScalarBytes" => "document too large",
            "Documents" => "more than one YAML document in a file",
            _ => "document over a safety limit",
        };
        return format!("{what} ({breach}); the loader refuses it");
    }
    let msg = msg.as_str();
    if let Some(rest) = msg.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        let head = &rest[..i];
        if head
            .split(" column ")
            .all(|p| p.chars().all(|c| c.is_ascii_digit()))
        {
            return rest[i + 2..].to_string();
        }
    }
    msg.to_string()
}

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

pub fn path_to_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
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

/// A document tree that remembers where each node was written.
#[derive(Debug)]
pub(super) enum PosNode {
    Leaf(Scalar),
    Seq(Vec<Spanned<PosNode>>),
    Map(Vec<(Spanned<String>, Spanned<PosNode>)>),
}

impl Default for PosNode {
    fn default() -> Self {
        PosNode::Leaf(Scalar::Null)
    }
}

/// A scalar as the YAML core schema typed it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for PosNode {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PosNode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E>(self, v: bool) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Int(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::UInt(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Float(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Str(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Null))
            }
            fn visit_none<E>(self) -> Result<PosNode, E> {
                Ok(PosNode::Leaf(Scalar::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PosNode, A::Error> {
                let mut v = Vec::new();
                while let Some(n) = seq.next_element()? {
                    v.push(n);
                }
                Ok(PosNode::Seq(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PosNode, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = map.next_key::<Spanned<KeyString>>()? {
                    let key = Spanned::new(k.value.0, k.referenced, k.defined);
                    v.push((key, map.next_value()?));
                }
                Ok(PosNode::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key of any scalar type, as text.
struct KeyString(String);

impl<'de> Deserialize<'de> for KeyString {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyString, E> {
                Ok(KeyString(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyString, E> {
                Ok(KeyString(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Turns paths into positions for one file, re-reading it with positions on demand.
#[derive(Debug)]
pub struct Locator<'a> {
    text: &'a str,
    format: Format,
    limits: &'a Limits,
    tree: Option<Option<Spanned<PosNode>>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str, format: Format, limits: &'a Limits) -> Self {
        Locator {
            text,
            format,
            limits,
            tree: None,
        }
    }

    /// The line and column of the node at `path` (or of the deepest node of it that
    /// exists). `key` asks for the position of the last key rather than its value.
    /// For NDJSON, `line` selects the record and the path is inside it.
    pub fn locate(&mut self, line: Option<u64>, path: &[Seg], key: bool) -> (u64, u64) {
        if let (Format::Ndjson, Some(n)) = (self.format, line) {
            let text = self
                .text
                .lines()
                .nth(n.saturating_sub(1) as usize)
                .unwrap_or("");
            let tree = parse_pos(text, self.limits);
            let (_, col) = tree.as_ref().map(|t| find(t, path, key)).unwrap_or((1, 1));
            return (n, col);
        }
        let (text, limits) = (self.text, self.limits);
        let tree = self.tree.get_or_insert_with(|| parse_pos(text, limits));
        tree.as_ref().map(|t| find(t, path, key)).unwrap_or((1, 1))
    }
}

pub(super) fn parse_pos(text: &str, limits: &Limits) -> Option<Spanned<PosNode>> {
    serde_saphyr::from_str_with_options::<Spanned<PosNode>>(text, yaml_options(text, limits)).ok()
}

fn find(root: &Spanned<PosNode>, path: &[Seg], key: bool) -> (u64, u64) {
    let pos = |s: &serde_saphyr::Location| (s.line().max(1), s.column().max(1));
    let mut node = root;
    let mut at = pos(&root.referenced);
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        let next = match (&node.value, seg) {
            (PosNode::Map(entries), Seg::Key(k)) => entries
                .iter()
                .find(|(ek, _)| &ek.value == k)
                .map(|(ek, v)| {
                    if last && key {
                        at = pos(&ek.referenced);
                    }
                    v
                }),
            (PosNode::Seq(items), Seg::Index(i)) => items.get(*i),
            _ => None,
        };
        match next {
            Some(n) => {
                node = n;
                if !(last && key) {
                    at = pos(&n.referenced);
                }
            }
            None => break,
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_paths_in_yaml_and_json() {
        let limits = Limits::default();
        let yaml = "features:\n  a: { kind: flag }\nplans:\n  free:\n    grants:\n      a: true\n";
        let mut loc = Locator::new(yaml, Format::Yaml, &limits);
        let p: Vec<Seg> = vec!["plans".into(), "free".into(), "grants".into(), "a".into()];
        assert_eq!(loc.locate(None, &p, false), (6, 10));
        assert_eq!(loc.locate(None, &p, true), (6, 7));
        let json =
            "{\"customers\": [\n {\"id\": \"x\", \"subscriptions\": [{\"plan\": \"nope\"}]}\n]}";
        let mut loc = Locator::new(json, Format::Json, &limits);
        let p: Vec<Seg> = vec![
            "customers".into(),
            0.into(),
            "subscriptions".into(),
            0.into(),
            "plan".into(),
        ];
        assert_eq!(loc.locate(None, &p, false), (2, 41));
    }

    #[test]
    fn yaml_errors_are_located() {
        let limits = Limits::default();
        let err = parse_yaml::<Document>("features:\n  a: { kind: flag, colour: red }\n", &limits)
            .unwrap_err();
        assert_eq!(err.0, 2, "{err:?}");
        assert!(err.2.contains("colour"), "{err:?}");
    }
}
