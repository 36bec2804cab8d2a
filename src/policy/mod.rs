//! Policy files → compiled [`Snapshot`].
//!
//! Three stages, three types: [`raw`] is what a file says (serde, unknown keys refused),
//! [`compile`] checks references, kinds, dates and cycles and builds the [`Snapshot`]
//! (interned ids, flattened plans, flat customer tables), and [`load_dir`] ties them to a
//! directory, reporting every problem of every file with file:line:col.

pub mod compile;
pub mod customers;
pub mod error;
pub mod incremental;
mod lenient;
pub mod raw;
pub mod read;
pub mod snapshot;
pub mod source;
pub mod units;

use std::path::Path;

pub use error::{Diagnostic, LoadError};
pub use snapshot::*;
pub use source::Limits;

use compile::{Issue, Unit};
use source::{FoundFile, Locator};

/// Loads and compiles every policy file under `dir`.
pub fn load_dir(dir: &Path, limits: &Limits) -> Result<Snapshot, LoadError> {
    let found = source::discover(dir).map_err(|d| LoadError {
        diagnostics: vec![d],
    })?;
    let texts = read_all(&found, limits)?;
    load_texts(&found, &texts, limits)
}

/// Reads every found file, reporting every file that cannot be read.
fn read_all(found: &[FoundFile], limits: &Limits) -> Result<Vec<String>, LoadError> {
    let mut texts = Vec::with_capacity(found.len());
    let mut diagnostics = Vec::new();
    for f in found {
        match read::read_file(f, limits) {
            Ok(t) => texts.push(t),
            Err(d) => {
                diagnostics.push(d);
                texts.push(String::new());
            }
        }
    }
    if !diagnostics.is_empty() {
        return Err(LoadError { diagnostics });
    }
    Ok(texts)
}

/// Refuses a policy set that defines no feature. An empty directory, or one whose
/// files were mistyped (`polices/`, `*.yml.txt`), would otherwise load cleanly and
/// deny every request; callers let an operator accept it on purpose.
pub fn require_features(dir: &Path, snapshot: &Snapshot) -> Result<(), LoadError> {
    if !snapshot.catalog.features.is_empty() {
        return Ok(());
    }
    let found = match snapshot.files.len() {
        0 => "no policy files (*.yaml, *.yml, *.json, *.ndjson)".to_string(),
        n => format!("{n} policy file(s) but no `features`"),
    };
    Err(LoadError {
        diagnostics: vec![Diagnostic::at_path(
            dir,
            format!(
                "{found}: a policy directory without features would deny every request (`--allow-empty` accepts it)"
            ),
        )],
    })
}

/// Compiles already-read files (`found[i]` holds `texts[i]`).
pub fn load_texts(
    found: &[FoundFile],
    texts: &[String],
    limits: &Limits,
) -> Result<Snapshot, LoadError> {
    load_units(found, texts, limits).map(|(snapshot, _)| snapshot)
}

/// As [`load_texts`], also giving back each file's parsed content (in `found` order).
fn load_units(
    found: &[FoundFile],
    texts: &[String],
    limits: &Limits,
) -> Result<(Snapshot, Vec<Unit>), LoadError> {
    // Parse the files on both cores: parsing is most of a large load.
    let parsed: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = found
            .iter()
            .zip(texts)
            .map(|(f, t)| s.spawn(move || source::parse_file(f, t, limits)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut units = Vec::with_capacity(parsed.len());
    let mut diagnostics = Vec::new();
    let mut broken = std::collections::HashSet::new();
    // A file none of which could be read: any name may have been defined there.
    let mut opaque = false;
    for p in parsed {
        opaque |= p.content.is_none() && !p.diagnostics.is_empty();
        diagnostics.extend(p.diagnostics);
        broken.extend(p.broken);
        units.push(Unit {
            content: p
                .content
                .unwrap_or_else(|| source::Content::Document(Default::default())),
        });
    }
    let hashes = found
        .iter()
        .zip(texts)
        .map(|(f, t)| (f.rel.as_path(), blake3::hash(t.as_bytes())));
    let (version, files) = version_of(hashes);
    match compile::compile(&units, version, files) {
        Ok(snapshot) if diagnostics.is_empty() => Ok((snapshot, units)),
        Ok(_) => Err(sorted(diagnostics)),
        Err(mut issues) => {
            issues.retain(|i| match &i.unresolved {
                None => true,
                Some(name) => !opaque && !broken.contains(&**name),
            });
            diagnostics.extend(locate(found, texts, limits, issues));
            Err(sorted(diagnostics))
        }
    }
}

/// The snapshot version (the content hash of every file: its path and its bytes'
/// hash, in path order) and the file list, from each file's hash.
pub(crate) fn version_of<'a>(
    hashes: impl Iterator<Item = (&'a Path, blake3::Hash)>,
) -> (Box<str>, Vec<SourceInfo>) {
    let mut hasher = blake3::Hasher::new();
    let mut files = Vec::new();
    for (rel, h) in hashes {
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        hasher.update(h.as_bytes());
        files.push(SourceInfo {
            path: rel.to_path_buf(),
            hash: h.to_hex()[..16].to_string(),
        });
    }
    (hasher.finalize().to_hex()[..12].into(), files)
}

/// Orders diagnostics as a reader goes through the files.
fn sorted(mut diagnostics: Vec<Diagnostic>) -> LoadError {
    diagnostics.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    LoadError { diagnostics }
}

/// Turns compile issues' paths into file:line:col, reading each affected file's
/// positions once.
fn locate(
    found: &[FoundFile],
    texts: &[String],
    limits: &Limits,
    issues: Vec<Issue>,
) -> Vec<Diagnostic> {
    let mut locators: Vec<Option<Locator>> = (0..found.len()).map(|_| None).collect();
    let mut at = |p: &compile::Place| -> (std::path::PathBuf, u64, u64) {
        let f = &found[p.file];
        let loc =
            locators[p.file].get_or_insert_with(|| Locator::new(&texts[p.file], f.format, limits));
        let (line, col) = loc.locate(p.line, &p.path, p.key);
        (f.rel.clone(), line, col)
    };
    let mut out = Vec::with_capacity(issues.len());
    for issue in issues {
        let (file, line, column) = at(&issue.at);
        let mut message = issue.message;
        if let Some(first) = &issue.first {
            let (ff, fl, fc) = at(first);
            message.push_str(&format!(" (first defined at {}:{fl}:{fc})", ff.display()));
        }
        out.push(Diagnostic {
            file,
            line,
            column,
            message,
        });
    }
    out.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    out
}
