//! Reading a document that does not fit the schema, entry by entry, so that one bad
//! entry hides no other error.
//!
//! The fast path deserializes a whole file at once, and serde stops at its first
//! error: one misspelt key (`start:` for `starts:`) would hide every other problem of
//! the file, and every reference to a name the file defines. Only when that fails is
//! the file read again here, into a tree that keeps each node's position
//! ([`PosNode`]); each feature, plan, group, customer and route is then deserialized
//! on its own from that tree. Unknown keys are collected (all of them, each at its
//! key) instead of ending the entry, and the entries that fit the schema go on to be
//! compiled, so their errors are reported in the same load.
//!
//! An entry with any error is left out of the snapshot (it is never served: the load
//! fails), and its name is returned so that references to it are not also reported as
//! unknown.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde_saphyr::Spanned;

use super::raw::Document;
use super::source::{Limits, PosNode, Scalar, parse_pos};

/// What could be read of a broken document.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// The entries that fit the schema.
    pub document: Document,
    /// Every error, as (line, column, message).
    pub errors: Vec<(u64, u64, String)>,
    /// The names of the entries left out.
    pub broken: Vec<String>,
}

const SECTIONS: &[&str] = &["features", "plans", "groups", "customers", "routes"];

/// Reads `text` entry by entry; `None` if it is not even a YAML tree (a syntax
/// error, which the fast path has reported with its position).
pub(super) fn recover(text: &str, limits: &Limits) -> Option<Recovered> {
    let root = parse_pos(text, limits)?;
    let mut r = Recovered::default();
    match &root.value {
        PosNode::Map(entries) => {
            for (key, value) in entries {
                r.section(key, value);
            }
        }
        PosNode::Leaf(Scalar::Null) => {}
        _ => r.error(
            &root,
            "expected a mapping of `features`, `plans`, `groups`, `customers` and `routes`",
        ),
    }
    Some(r)
}

type Node = Spanned<PosNode>;

fn pos(node_at: &serde_saphyr::Location) -> (u64, u64) {
    (node_at.line().max(1), node_at.column().max(1))
}

impl Recovered {
    fn error(&mut self, node: &Node, message: &str) {
        let (line, column) = pos(&node.referenced);
        self.errors.push((line, column, message.to_string()));
    }

    fn section(&mut self, key: &Spanned<String>, value: &Node) {
        let doc = &mut self.document;
        match key.value.as_str() {
            "features" => {
                let mut out = std::mem::take(&mut doc.features.0);
                self.named(value, &mut out);
                self.document.features.0 = out;
            }
            "plans" => {
                let mut out = std::mem::take(&mut doc.plans.0);
                self.named(value, &mut out);
                self.document.plans.0 = out;
            }
            "groups" => {
                let mut out = std::mem::take(&mut doc.groups.0);
                self.named(value, &mut out);
                self.document.groups.0 = out;
            }
            "customers" => {
                let mut out = std::mem::take(&mut doc.customers);
                let mut at = std::mem::take(&mut doc.customer_positions);
                self.listed(value, &mut out, &mut at, |n| scalar_field(n, "id"));
                (self.document.customers, self.document.customer_positions) = (out, at);
            }
            "routes" => {
                let mut out = std::mem::take(&mut doc.routes);
                let mut at = std::mem::take(&mut doc.route_positions);
                self.listed(value, &mut out, &mut at, |_| None);
                (self.document.routes, self.document.route_positions) = (out, at);
            }
            other => {
                let e = <Error as de::Error>::unknown_field(other, SECTIONS);
                let (line, column) = pos(&key.referenced);
                self.errors.push((line, column, e.message));
            }
        }
    }

    /// A mapping section (`features`, `plans`, `groups`): each entry on its own.
    fn named<T: DeserializeOwned>(&mut self, node: &Node, out: &mut Vec<(String, T)>) {
        let entries = match &node.value {
            PosNode::Map(entries) => entries,
            PosNode::Leaf(Scalar::Null) => return,
            _ => return self.error(node, "expected a mapping of names"),
        };
        for (key, value) in entries {
            let name = &key.value;
            if out.iter().any(|(n, _)| n == name) || self.broken.contains(name) {
                let (line, column) = pos(&key.referenced);
                let message = format!("duplicate key `{name}`");
                self.errors.push((line, column, message));
                continue;
            }
            match self.entry::<T>(value) {
                Some(v) => out.push((name.clone(), v)),
                None => self.broken.push(name.clone()),
            }
        }
    }

    /// A list section (`customers`, `routes`): each item on its own, with where it
    /// sits in the file (`positions[i]` for `out[i]`).
    fn listed<T: DeserializeOwned>(
        &mut self,
        node: &Node,
        out: &mut Vec<T>,
        positions: &mut Vec<usize>,
        name: impl Fn(&Node) -> Option<String>,
    ) {
        let items = match &node.value {
            PosNode::Seq(items) => items,
            PosNode::Leaf(Scalar::Null) => return,
            _ => return self.error(node, "expected a list"),
        };
        for (i, item) in items.iter().enumerate() {
            match self.entry::<T>(item) {
                Some(v) => {
                    out.push(v);
                    positions.push(i);
                }
                None => self.broken.extend(name(item)),
            }
        }
    }

    /// One entry, with every error it has; `None` if it has any.
    fn entry<T: DeserializeOwned>(&mut self, node: &Node) -> Option<T> {
        let found = RefCell::new(Vec::new());
        let result = T::deserialize(NodeDe {
            node,
            found: &found,
        });
        let mut errors = found.into_inner();
        let value = match result {
            Ok(v) => Some(v),
            Err(e) if e.silent => None,
            Err(e) => {
                errors.push(e.located(node));
                None
            }
        };
        if errors.is_empty() {
            return value;
        }
        self.errors.extend(errors.into_iter().map(|e| {
            let (line, column) = e.at.unwrap_or((1, 1));
            (line, column, e.message)
        }));
        None
    }
}

/// The text of a scalar field of a mapping node (a customer's `id`).
fn scalar_field(node: &Node, field: &str) -> Option<String> {
    let PosNode::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k.value == field)
        .and_then(|(_, v)| scalar_text(&v.value))
}

fn scalar_text(node: &PosNode) -> Option<String> {
    match node {
        PosNode::Leaf(Scalar::Str(s)) => Some(s.clone()),
        PosNode::Leaf(Scalar::Bool(b)) => Some(b.to_string()),
        PosNode::Leaf(Scalar::Int(i)) => Some(i.to_string()),
        PosNode::Leaf(Scalar::UInt(u)) => Some(u.to_string()),
        PosNode::Leaf(Scalar::Float(f)) => Some(f.to_string()),
        _ => None,
    }
}

/// A deserialization error with the position of the innermost node it came from.
#[derive(Debug)]
struct Error {
    message: String,
    at: Option<(u64, u64)>,
    /// Already explained by errors collected on the way (a missing `starts` after an
    /// unknown `start`): not reported again.
    silent: bool,
}

impl Error {
    fn located(mut self, node: &Node) -> Self {
        if self.at.is_none() {
            self.at = Some(pos(&node.referenced));
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            message: msg.to_string(),
            at: None,
            silent: false,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let list: Vec<String> = expected.iter().map(|f| format!("`{f}`")).collect();
        let hint = super::compile::did_you_mean(field, expected.iter().copied());
        Error::custom(format!(
            "unknown field `{field}`, expected one of {}{hint}",
            list.join(", ")
        ))
    }
}

/// Deserializes from a node of the tree, collecting unknown keys into `found`.
#[derive(Clone, Copy)]
struct NodeDe<'a> {
    node: &'a Node,
    found: &'a RefCell<Vec<Error>>,
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let found = self.found;
        let r = match &self.node.value {
            PosNode::Leaf(s) => match s {
                Scalar::Null => v.visit_unit(),
                Scalar::Bool(b) => v.visit_bool(*b),
                Scalar::Int(i) => v.visit_i64(*i),
                Scalar::UInt(u) => v.visit_u64(*u),
                Scalar::Float(f) => v.visit_f64(*f),
                Scalar::Str(s) => v.visit_str(s),
            },
            PosNode::Seq(items) => v.visit_seq(SeqDe {
                items: items.iter(),
                found,
            }),
            PosNode::Map(entries) => v.visit_map(MapDe {
                entries: entries.iter().collect::<Vec<_>>().into_iter(),
                value: None,
                found,
            }),
        };
        r.map_err(|e| e.located(self.node))
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match &self.node.value {
            PosNode::Leaf(Scalar::Null) => v.visit_none(),
            _ => v.visit_some(self),
        }
        .map_err(|e| e.located(self.node))
    }

    /// A plain scalar is text where text is expected (`id: 42`), as on the fast path.
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match scalar_text(&self.node.value) {
            Some(s) => v.visit_string::<Error>(s).map_err(|e| e.located(self.node)),
            None => self.deserialize_any(v),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_string(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match &self.node.value {
            PosNode::Leaf(Scalar::Str(s)) => v
                .visit_enum(de::value::StrDeserializer::<Error>::new(s))
                .map_err(|e: Error| e.located(self.node)),
            _ => self.deserialize_any(v),
        }
    }

    /// Unknown keys are collected, each at its key, and left out, so the rest of the
    /// entry is still checked.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let PosNode::Map(entries) = &self.node.value else {
            return self.deserialize_any(v);
        };
        let mut known = Vec::with_capacity(entries.len());
        let mut unknown = false;
        for entry in entries {
            if fields.contains(&entry.0.value.as_str()) {
                known.push(entry);
            } else {
                unknown = true;
                let mut e = <Error as de::Error>::unknown_field(&entry.0.value, fields);
                e.at = Some(pos(&entry.0.referenced));
                self.found.borrow_mut().push(e);
            }
        }
        let r = v.visit_map(MapDe {
            entries: known.into_iter(),
            value: None,
            found: self.found,
        });
        match r {
            Err(e) if !e.silent && unknown && e.at.is_none() => Err(Error { silent: true, ..e }),
            r => r.map_err(|e| e.located(self.node)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct SeqDe<'a> {
    items: std::slice::Iter<'a, Node>,
    found: &'a RefCell<Vec<Error>>,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            None => Ok(None),
            Some(node) => seed
                .deserialize(NodeDe {
                    node,
                    found: self.found,
                })
                .map(Some),
        }
    }
}

struct MapDe<'a> {
    entries: std::vec::IntoIter<&'a (Spanned<String>, Node)>,
    value: Option<&'a Node>,
    found: &'a RefCell<Vec<Error>>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.value = Some(value);
        let de: de::value::StrDeserializer<'_, Error> = key.value.as_str().into_deserializer();
        seed.deserialize(de).map(Some).map_err(|mut e| {
            e.at = e.at.or(Some(pos(&key.referenced)));
            e
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self
            .value
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("a key without a value"))?;
        seed.deserialize(NodeDe {
            node,
            found: self.found,
        })
    }
}
