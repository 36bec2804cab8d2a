//! Raw documents → compiled [`Snapshot`], with every semantic check.
//!
//! The compiler reports problems as [`Issue`]s: a file, a path into it and a message.
//! It never stops at the first one; `policy::load` turns the paths into line:col once,
//! at the end, for the files that have problems.
//!
//! [`compile`] is the list of steps, in the order their problems are reported:
//! features, plans and groups (with `includes` flattened and the upgrade candidates
//! per feature), customers, routes. Each step has its file.

mod bundles;
mod customers;
mod features;
mod grants;
mod names;

pub(crate) use names::did_you_mean;
mod routes;

pub use customers::{Change, update_customers};
pub use grants::compile_grant;

use std::collections::HashMap;
use std::sync::Arc;

use super::raw;
use super::snapshot::*;
use super::source::{Content, Seg};

/// A compile problem, located by path.
#[derive(Debug, Clone)]
pub struct Issue {
    pub at: Place,
    pub message: String,
    /// For "defined twice": where the first definition is.
    pub first: Option<Place>,
    /// A reference to a name that is not defined: the name. When the entry that
    /// defines a name failed to parse, references to it are left out (the definition
    /// is there, broken, and reported); when a whole file failed, all of them are.
    pub unresolved: Option<Box<str>>,
}

/// A place in a file: the file's index, the NDJSON record's line (if any), a path
/// inside the document or record, and whether the key (not the value) is meant.
#[derive(Debug, Clone)]
pub struct Place {
    pub file: usize,
    pub line: Option<u64>,
    pub path: Vec<Seg>,
    pub key: bool,
}

/// A parsed file handed to the compiler.
#[derive(Debug)]
pub struct Unit {
    pub content: Content,
}

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

#[derive(Debug, Default)]
struct Issues(Vec<Issue>);

impl Issues {
    fn push(&mut self, at: Place, message: impl Into<String>) {
        self.0.push(Issue {
            at,
            message: message.into(),
            first: None,
            unresolved: None,
        });
    }

    fn unresolved(&mut self, at: Place, name: &str, message: impl Into<String>) {
        self.0.push(Issue {
            at,
            message: message.into(),
            first: None,
            unresolved: Some(name.into()),
        });
    }
}

fn place(file: usize, path: Vec<Seg>) -> Place {
    Place {
        file,
        line: None,
        path,
        key: false,
    }
}

fn key_place(file: usize, path: Vec<Seg>) -> Place {
    Place {
        file,
        line: None,
        path,
        key: true,
    }
}

fn seg_path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|s| Seg::Key((*s).to_string())).collect()
}

fn k(s: &str) -> Seg {
    Seg::Key(s.to_string())
}

/// Compiles parsed files into a snapshot. `version` is the content hash.
pub fn compile(
    units: &[Unit],
    version: Box<str>,
    files: Vec<SourceInfo>,
) -> Result<Snapshot, Vec<Issue>> {
    let mut issues = Issues::default();
    let docs: Vec<(usize, &raw::Document)> = units
        .iter()
        .enumerate()
        .filter_map(|(i, u)| match &u.content {
            Content::Document(d) => Some((i, d)),
            Content::Customers(_) => None,
        })
        .collect();
    let (features, feature_index) = features::compile_features(&docs, &mut issues);
    let (raw_bundles, bundle_index) = bundles::collect_bundles(&docs, &mut issues);
    let own = bundles::own_grants(&raw_bundles, &features, &feature_index, &mut issues);
    let flat = bundles::flatten(&raw_bundles, &own, &bundle_index, &features, &mut issues);
    let (bundles, grants) = bundles::bundle_tables(&raw_bundles, &flat, features.len());
    let upgrades = bundles::upgrades(&bundles, &grants, features.len());
    let routes = routes::compile_routes(&docs, &features, &feature_index, &mut issues);
    let catalog = Catalog {
        features,
        feature_index,
        bundles,
        bundle_index,
        grants,
        routes,
        upgrades,
    };
    let customers = customers::compile_customers(units, &catalog, &mut issues);
    if !issues.0.is_empty() {
        return Err(issues.0);
    }
    Ok(Snapshot {
        version,
        catalog: Arc::new(catalog),
        customers,
        files: files.into(),
        revision: 0,
    })
}
