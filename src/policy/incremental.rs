//! Incremental reload of customer files: re-read only the files that changed and
//! apply the difference to the customer table.
//!
//! A load remembers, per file, its stamp (size, modification time, inode), its content
//! hash (the snapshot version is the hash of every file's hash, so only changed files
//! are hashed again) and, for a file that holds customers only (NDJSON, or a YAML/JSON
//! document whose only key is `customers`), each record's hash and id. A reload that
//! finds only such files changed, added or removed reads just those, diffs their
//! records against what they held (an NDJSON line whose text is unchanged is not even
//! parsed), and applies the difference with [`update_customers`], sharing the catalog
//! and every untouched customer shard.
//!
//! Anything else goes to the full load, which reports every problem with file:line:col:
//! a catalog document changed, added or removed; a file that does not read or parse; a
//! record that does not compile; an id defined twice (in one file or in two). A
//! customer that moves between files in one reload is a replacement, not a removal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use compact_str::CompactString;

use super::compile::{Change, update_customers};
use super::raw::{Customer, Document};
use super::source::{self, Content, Format, FoundFile, Limits, Origin};
use super::{LoadError, Snapshot, read};
use crate::files::Stamp;

/// A file modified this recently when it is looked at may be modified again within the
/// same timestamp tick (filesystems keep coarse times) with the same size: its stamp
/// would not show that, so such a file is read again by the next load.
const RACY: std::time::Duration = std::time::Duration::from_millis(100);

/// The file's stamp, or `None` when it cannot be trusted to show the next change
/// (unreadable, or modified within [`RACY`] of now).
fn trusted_stamp(path: &Path) -> Option<Stamp> {
    let stamp = Stamp::of(path).ok()?;
    let age = SystemTime::now()
        .duration_since(stamp.modified?)
        .unwrap_or_default();
    (age >= RACY).then_some(stamp)
}

/// One record of a customer file: the hash of its text (NDJSON) or of its parsed form
/// (documents), and its id. Kept in file order: a changed file shares most of its
/// start and end with what it was, and that is found by one sequential pass.
type Records = Vec<(u64, CompactString)>;

#[derive(Debug, Clone)]
struct FileState {
    stat: Option<Stamp>,
    hash: blake3::Hash,
    /// `None`: a catalog document (anything besides customers).
    records: Option<Records>,
}

/// What the last served load read from each file (by path relative to the directory).
#[derive(Debug, Clone, Default)]
pub struct FileIndex {
    files: BTreeMap<PathBuf, FileState>,
}

/// Why a reload could not be applied incrementally (the full load runs instead).
pub type Fallback = &'static str;

/// An incremental load, ready to be served.
#[derive(Debug)]
pub struct Applied {
    pub snapshot: Snapshot,
    pub index: FileIndex,
    /// Files read (changed or added).
    pub files_read: usize,
    /// Customers the change removes.
    pub removed: usize,
}

/// Loads every policy file under `dir` (as [`super::load_dir`]) and indexes them for
/// the next incremental reload.
pub fn load_dir_indexed(dir: &Path, limits: &Limits) -> Result<(Snapshot, FileIndex), LoadError> {
    let found = source::discover(dir).map_err(|d| LoadError {
        diagnostics: vec![d],
    })?;
    let stats: Vec<Option<Stamp>> = found.iter().map(|f| trusted_stamp(&f.abs)).collect();
    let texts = super::read_all(&found, limits)?;
    let (snapshot, units) = super::load_units(&found, &texts, limits)?;
    let mut index = FileIndex::default();
    for (((f, text), unit), stat) in found.iter().zip(&texts).zip(&units).zip(stats) {
        let records = match &unit.content {
            Content::Customers(list) => Some(ndjson_records(text, list)),
            Content::Document(d) => document_records(d),
        };
        let state = FileState {
            stat,
            hash: blake3::hash(text.as_bytes()),
            records,
        };
        index.files.insert(f.rel.clone(), state);
    }
    Ok((snapshot, index))
}

/// Applies the files changed since `index` was taken to `files` (the snapshot that
/// load produced), or says why the full load must run.
pub fn apply_changes(
    dir: &Path,
    limits: &Limits,
    index: &FileIndex,
    files: &Snapshot,
) -> Result<Applied, Fallback> {
    let found = source::discover(dir).map_err(|_| "the directory cannot be listed")?;
    let mut next = FileIndex::default();
    let mut diff = Diff::default();
    for (i, f) in found.iter().enumerate() {
        let stat = trusted_stamp(&f.abs);
        let old = index.files.get(&f.rel);
        if let Some(old) = old
            && old.stat.is_some()
            && old.stat == stat
        {
            next.files.insert(f.rel.clone(), old.clone());
            continue;
        }
        let text = read::read_file(f, limits).map_err(|_| "a file cannot be read")?;
        let hash = blake3::hash(text.as_bytes());
        if let Some(old) = old
            && old.hash == hash
        {
            // Touched, or only its stat was unknown: the same content.
            diff.files_read += 1;
            let state = FileState {
                stat,
                ..old.clone()
            };
            next.files.insert(f.rel.clone(), state);
            continue;
        }
        let old_records = match old {
            Some(FileState { records: None, .. }) => return Err("a catalog file changed"),
            Some(FileState {
                records: Some(r), ..
            }) => r.as_slice(),
            None => &[],
        };
        let (records, set) = read_customers(f, &text, limits, old_records)?;
        let (p, q) = common_ends(old_records, &records);
        let old_mid = by_hash(&old_records[p..old_records.len() - q]);
        let new_mid = by_hash(&records[p..records.len() - q]);
        diff.file(i, &old_mid, &new_mid, set)?;
        let state = FileState {
            stat,
            hash,
            records: Some(records),
        };
        next.files.insert(f.rel.clone(), state);
    }
    for (rel, old) in &index.files {
        if !next.files.contains_key(rel) {
            let Some(records) = &old.records else {
                return Err("a catalog file was removed");
            };
            diff.file(usize::MAX, &by_hash(records), &[], Vec::new())?;
        }
    }
    diff.into_applied(files, next)
}

/// The records a changed file holds now (in file order), and the ones to compile:
/// records whose hash the file did not hold before, with their place.
fn read_customers(
    f: &FoundFile,
    text: &str,
    limits: &Limits,
    old: &[(u64, CompactString)],
) -> Result<(Records, Vec<(Customer, Origin)>), Fallback> {
    if f.format == Format::Ndjson {
        return read_ndjson(text, old);
    }
    let parsed = source::parse_file(f, text, limits);
    let (Some(Content::Document(d)), true) = (parsed.content, parsed.diagnostics.is_empty()) else {
        return Err("a file does not parse");
    };
    let Some(records) = document_records(&d) else {
        return Err("a catalog document was added or changed");
    };
    let known = by_hash(old);
    let mut set = Vec::new();
    for (i, ((h, _), c)) in records.iter().zip(d.customers).enumerate() {
        if known.binary_search_by_key(h, |r| r.0).is_err() {
            let index = d.customer_positions.get(i).copied().unwrap_or(i);
            set.push((c, Origin::Document { index }));
        }
    }
    Ok((records, set))
}

/// An NDJSON file's records: the lines shared with the old file at its start and end
/// are taken as they were (a sequential comparison of hashes); of the lines between,
/// only those whose text the old file did not have are parsed.
fn read_ndjson(
    text: &str,
    old: &[(u64, CompactString)],
) -> Result<(Records, Vec<(Customer, Origin)>), Fallback> {
    let lines: Vec<(usize, &str, u64)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n, l, line_hash(l)))
        .collect();
    let hashes: Vec<(u64, CompactString)> = lines
        .iter()
        .map(|l| (l.2, CompactString::default()))
        .collect();
    let (p, q) = common_ends(old, &hashes);
    drop(hashes);
    let known = by_hash(&old[p..old.len() - q]);
    let mut records = Records::with_capacity(lines.len());
    records.extend_from_slice(&old[..p]);
    let mut set = Vec::new();
    for &(n, line, h) in &lines[p..lines.len() - q] {
        if let Ok(at) = known.binary_search_by_key(&h, |r| r.0) {
            records.push(known[at].clone());
            continue;
        }
        let c: Customer = serde_json::from_str(line).map_err(|_| "a line does not parse")?;
        records.push((h, c.id.as_str().into()));
        let line = n as u64 + 1;
        set.push((c, Origin::Line { line }));
    }
    records.extend_from_slice(&old[old.len() - q..]);
    Ok((records, set))
}

/// How many records two lists share at their start, and then at their end (by hash).
fn common_ends(old: &[(u64, CompactString)], new: &[(u64, CompactString)]) -> (usize, usize) {
    let p = old.iter().zip(new).take_while(|(o, n)| o.0 == n.0).count();
    let q = old[p..]
        .iter()
        .rev()
        .zip(new[p..].iter().rev())
        .take_while(|(o, n)| o.0 == n.0)
        .count();
    (p, q)
}

/// A copy of `records` sorted by hash.
fn by_hash(records: &[(u64, CompactString)]) -> Records {
    let mut sorted = records.to_vec();
    sorted.sort_unstable_by_key(|r| r.0);
    sorted
}

/// The changes a reload makes, gathered file by file.
#[derive(Debug, Default)]
struct Diff {
    /// Ids a changed file defines now and did not before, with the file.
    added: HashMap<CompactString, usize>,
    /// Ids a changed (or removed) file defined before and does not now.
    removed: HashSet<CompactString>,
    /// Records to compile: (file, record, origin).
    set: Vec<(usize, Customer, Origin)>,
    files_read: usize,
}

impl Diff {
    fn file(
        &mut self,
        file: usize,
        old: &[(u64, CompactString)],
        new: &[(u64, CompactString)],
        set: Vec<(Customer, Origin)>,
    ) -> Result<(), Fallback> {
        if file != usize::MAX {
            self.files_read += 1;
        }
        // Both lists are sorted by hash; a record whose hash is on both sides is the
        // same text, so the same id: only the records on one side are compared by id.
        let (mut gone, mut came) = (HashSet::new(), HashSet::new());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            if j > 0 && j < new.len() && new[j].0 == new[j - 1].0 {
                return Err("a customer is defined twice");
            }
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o.0 == n.0 => (i, j) = (i + 1, j + 1),
                (Some(o), Some(n)) if o.0 < n.0 => {
                    gone.insert(&o.1);
                    i += 1;
                }
                (Some(o), None) => {
                    gone.insert(&o.1);
                    i += 1;
                }
                (_, Some(n)) => {
                    if !came.insert(&n.1) {
                        return Err("a customer is defined twice");
                    }
                    j += 1;
                }
                (None, None) => break,
            }
        }
        for id in &came {
            if !gone.contains(id) && self.added.insert((*id).clone(), file).is_some() {
                return Err("a customer is defined twice");
            }
        }
        for id in gone {
            if !came.contains(id) {
                self.removed.insert(id.clone());
            }
        }
        self.set
            .extend(set.into_iter().map(|(c, origin)| (file, c, origin)));
        Ok(())
    }

    fn into_applied(self, files: &Snapshot, index: FileIndex) -> Result<Applied, Fallback> {
        // An id new to its file that the table already holds, and that no changed
        // file gives up, is defined in another file as well.
        for id in self.added.keys() {
            if !self.removed.contains(id) && files.customers.get(id).is_some() {
                return Err("a customer is defined twice");
            }
        }
        // A removed id that another file now defines moved: its Set replaces it.
        let removals: Vec<&CompactString> = self
            .removed
            .iter()
            .filter(|id| !self.added.contains_key(*id))
            .collect();
        let mut changes: Vec<Change<'_>> = removals.iter().map(|id| Change::Remove(id)).collect();
        changes.extend(self.set.iter().map(|(file, record, origin)| Change::Set {
            record,
            file: *file,
            origin: *origin,
        }));
        let customers = update_customers(&files.catalog, &files.customers, &changes)
            .map_err(|_| "a record does not compile")?;
        let (version, infos) = super::version_of(
            index
                .files
                .iter()
                .map(|(rel, state)| (rel.as_path(), state.hash)),
        );
        Ok(Applied {
            snapshot: Snapshot {
                version,
                catalog: files.catalog.clone(),
                customers,
                files: infos.into(),
                revision: 0,
            },
            index,
            files_read: self.files_read,
            removed: removals.len(),
        })
    }
}

/// The hash of one NDJSON line's text.
fn line_hash(line: &str) -> u64 {
    let h = blake3::hash(line.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// An NDJSON file's records, by the hash of each parsed line's text.
fn ndjson_records(text: &str, parsed: &[(u64, Customer)]) -> Records {
    let mut records = Records::with_capacity(parsed.len());
    let mut wanted = parsed.iter().peekable();
    for (n, line) in text.lines().enumerate() {
        let Some((at, c)) = wanted.peek() else { break };
        if *at == n as u64 + 1 {
            records.push((line_hash(line), c.id.as_str().into()));
            wanted.next();
        }
    }
    records
}

/// A customers-only document's records, by the hash of each parsed record; `None` for
/// a document with anything besides customers.
fn document_records(d: &Document) -> Option<Records> {
    let catalog = !d.features.is_empty()
        || !d.plans.is_empty()
        || !d.groups.is_empty()
        || !d.routes.is_empty();
    if catalog {
        return None;
    }
    Some(
        d.customers
            .iter()
            .map(|c| (record_hash(c), c.id.as_str().into()))
            .collect(),
    )
}

/// The hash of a parsed record (its debug form, which names every field and value).
fn record_hash(c: &Customer) -> u64 {
    struct Feed(blake3::Hasher);
    impl std::fmt::Write for Feed {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut feed = Feed(blake3::Hasher::new());
    let _ = write!(feed, "{c:?}");
    let mut b = [0u8; 8];
    b.copy_from_slice(&feed.0.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str =
        "features:\n  f: { kind: flag }\nplans:\n  p:\n    grants:\n      f: true\n";

    fn line(id: &str) -> String {
        format!(r#"{{"id": "{id}", "subscriptions": [{{"plan": "p", "starts": "2020-01-01"}}]}}"#)
    }

    /// Writes `text` to `rel` and dates it `secs` seconds after an hour ago.
    fn put(dir: &Path, rel: &str, text: &str, secs: u64) {
        let path = dir.join(rel);
        std::fs::write(&path, text).unwrap();
        let at = SystemTime::now() - std::time::Duration::from_secs(3600 - secs);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(at).unwrap();
    }

    fn setup() -> (tempfile::TempDir, Snapshot, FileIndex) {
        let dir = tempfile::tempdir().unwrap();
        put(dir.path(), "catalog.yaml", CATALOG, 0);
        put(dir.path(), "a.ndjson", &(line("x") + "\n" + &line("y")), 0);
        let (snap, index) = load_dir_indexed(dir.path(), &Limits::default()).unwrap();
        (dir, snap, index)
    }

    #[test]
    fn a_line_repeated_in_one_file_falls_back() {
        let (dir, snap, index) = setup();
        let text = [line("x"), line("y"), line("y")].join("\n");
        put(dir.path(), "a.ndjson", &text, 1);
        let why = apply_changes(dir.path(), &Limits::default(), &index, &snap).unwrap_err();
        assert_eq!(why, "a customer is defined twice");
    }

    #[test]
    fn a_touched_file_is_read_and_changes_nothing() {
        let (dir, snap, index) = setup();
        put(dir.path(), "a.ndjson", &(line("x") + "\n" + &line("y")), 5);
        let a = apply_changes(dir.path(), &Limits::default(), &index, &snap).unwrap();
        assert_eq!((a.files_read, a.removed), (1, 0));
        assert_eq!(a.snapshot.version, snap.version);
        assert_eq!(
            a.snapshot.customers.shared_shards(&snap.customers),
            crate::policy::customers::SHARDS
        );
    }

    #[test]
    fn a_new_catalog_document_falls_back() {
        let (dir, snap, index) = setup();
        put(
            dir.path(),
            "more.yaml",
            "features:\n  g: { kind: flag }\n",
            1,
        );
        let why = apply_changes(dir.path(), &Limits::default(), &index, &snap).unwrap_err();
        assert_eq!(why, "a catalog document was added or changed");
    }
}
