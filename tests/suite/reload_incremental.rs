//! Incremental reload: a change to customer files only re-reads those files and applies
//! the difference; anything else loads the whole directory, as before.
//!
//! The server tests run a sidecar in-process on a tempdir and read `/v1/status`'s
//! `last_load` (which path the load took, how many files it read). The property test
//! drives the loader directly: every sequence of file edits, applied incrementally,
//! serves the same version and the same decisions as a fresh load of the final files.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use entitled::decide;
use entitled::engine::{Op, Request};
use entitled::policy::incremental::{FileIndex, apply_changes, load_dir_indexed};
use entitled::policy::{self, Limits, Snapshot};
use entitled::time::Timestamp;
use entitled::usage::MemoryStore;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::support::{PolicyDir, Server, names_file_line_col, wait_for, wait_until};

const DEADLINE: Duration = Duration::from_secs(10);

const CATALOG: &str = "\
features:
  api.calls: { kind: quota }
  sso: { kind: flag }
plans:
  free:
    grants:
      api.calls: { limit: 100, per: month }
  pro:
    grants:
      sso: true
      api.calls: { limit: 1000, per: month }
";

fn line(id: &str, plan: &str) -> String {
    format!(r#"{{"id": "{id}", "subscriptions": [{{"plan": "{plan}", "starts": "2020-01-01"}}]}}"#)
}

/// `n` customers `{prefix}{i}` on the free plan, one NDJSON line each.
fn lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| line(&format!("{prefix}{i}"), "free") + "\n")
        .collect()
}

/// Dates every file an hour back: files written just before a load are read again by
/// the next one (their stat may not show a change made within the same clock tick).
fn age(dir: &Path) {
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for e in walk(dir) {
        let f = std::fs::File::options().write(true).open(&e).expect("open");
        f.set_modified(an_hour_ago).expect("set mtime");
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("list").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Replaces `rel` by rename, as a deploy tool does.
fn replace(dir: &PolicyDir, rel: &str, text: &str) {
    let tmp = dir.join(&format!(".{}.tmp", rel.replace('/', "_")));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(rel)).expect("rename");
}

/// A catalog, three NDJSON files of 50 customers and a customers-only YAML file.
fn customer_dir() -> PolicyDir {
    let dir = PolicyDir::with(&[
        ("catalog.yaml", CATALOG),
        ("customers/a.ndjson", &lines("a", 50)),
        ("customers/b.ndjson", &lines("b", 50)),
        ("customers/c.ndjson", &lines("c", 50)),
        (
            "customers/d.yaml",
            "customers:\n  - id: d0\n    subscriptions: [{ plan: free, starts: 2020-01-01 }]\n",
        ),
    ]);
    age(dir.path());
    dir
}

fn limit(s: &Server, customer: &str) -> Value {
    s.check(customer, "api.calls")["limit"].clone()
}

fn await_limit(s: &Server, customer: &str, want: u64) {
    assert!(
        wait_until(DEADLINE, || limit(s, customer) == json!(want)),
        "{customer}: limit {want} not served within {DEADLINE:?}; status {}",
        s.status()
    );
}

fn start(dir: &Path) -> Server {
    Server::start_with(dir, &["--reload-debounce", "50ms"])
}

#[test]
fn one_changed_customer_file_among_several_is_read_alone() {
    let dir = customer_dir();
    // The real binary: `/metrics` is the process's.
    let s = Server::spawn_with(dir.path(), &["--reload-debounce", "50ms"]);
    assert_eq!(s.status()["last_load"]["path"], "full", "{}", s.status());
    assert_eq!(limit(&s, "b7"), 100);

    let mut b = lines("b", 50).replace(&line("b7", "free"), &line("b7", "pro"));
    b.push_str(&line("b-new", "pro"));
    replace(&dir, "customers/b.ndjson", &b);
    await_limit(&s, "b7", 1000);
    await_limit(&s, "b-new", 1000);

    let st = s.status();
    assert_eq!(st["last_load"]["path"], "incremental", "{st}");
    assert_eq!(st["last_load"]["files_read"], 1, "{st}");
    assert_eq!(st["snapshot"]["customers"], 152, "{st}");
    // The version is the content hash of every file, as a fresh load computes it.
    let fresh = policy::load_dir(dir.path(), &Limits::default()).expect("loads");
    assert_eq!(st["snapshot"]["version"], &*fresh.version, "{st}");
    let metrics = s.get("/metrics").text();
    assert!(
        metrics.contains(r#"entitled_policy_loads_total{path="incremental"}"#),
        "{metrics}"
    );
}

#[test]
fn a_customer_moving_between_files_stays_served() {
    let dir = customer_dir();
    let s = start(dir.path());
    assert_eq!(limit(&s, "a3"), 100);
    // Added to b first (for a moment it is defined twice, and that load fails), then
    // taken out of a: at no point is a3 gone, and the end state is applied
    // incrementally whether the reloader saw the middle state or not.
    let mut b = lines("b", 50);
    b.push_str(&line("a3", "pro"));
    replace(&dir, "customers/b.ndjson", &b);
    replace(
        &dir,
        "customers/a.ndjson",
        &lines("a", 50).replace(&(line("a3", "free") + "\n"), ""),
    );
    await_limit(&s, "a3", 1000);
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        st["last_error"].is_null().then_some(st)
    })
    .unwrap_or_else(|| panic!("the move left an error: {}", s.status()));
    assert_eq!(st["last_load"]["path"], "incremental", "{st}");
    assert_eq!(st["snapshot"]["customers"], 151, "{st}");
}

#[test]
fn a_customer_defined_in_two_files_is_reported_with_both_places() {
    let dir = customer_dir();
    let s = start(dir.path());
    let v1 = s.version().expect("version");
    let failed0 = s.status()["reloads_failed"].as_u64().expect("failed");
    let mut c = lines("c", 50);
    c.push_str(&line("a5", "pro"));
    replace(&dir, "customers/c.ndjson", &c);
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        (st["reloads_failed"].as_u64() > Some(failed0)).then_some(st)
    })
    .unwrap_or_else(|| panic!("the duplicate was never reported: {}", s.status()));
    let errors = st["last_error"]["errors"].to_string();
    assert!(
        errors.contains("customer `a5` is defined twice") && errors.contains("customers/a.ndjson"),
        "{st}"
    );
    let first = st["last_error"]["errors"][0].as_str().unwrap_or("");
    assert!(names_file_line_col(first, "customers/c.ndjson"), "{st}");
    assert_eq!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert_eq!(limit(&s, "a5"), 100, "still the last good snapshot");
}

#[test]
fn a_catalog_change_recompiles_fully() {
    let dir = customer_dir();
    let s = start(dir.path());
    replace(
        &dir,
        "catalog.yaml",
        &CATALOG.replace("limit: 100,", "limit: 150,"),
    );
    await_limit(&s, "a1", 150);
    let st = s.status();
    assert_eq!(st["last_load"]["path"], "full", "{st}");
    assert_eq!(
        st["last_load"]["fallback"], "a catalog file changed",
        "{st}"
    );
    assert_eq!(st["last_load"]["files_read"], 5, "{st}");
}

/// A bad record in a customer file is reported with file:line:col, as a full load
/// reports it, and the last good snapshot keeps serving.
#[test]
fn a_bad_record_in_a_customer_file_is_located() {
    let dir = customer_dir();
    let s = start(dir.path());
    let failed0 = s.status()["reloads_failed"].as_u64().expect("failed");
    let b = lines("b", 50).replace(&line("b2", "free"), &line("b2", "platinum"));
    replace(&dir, "customers/b.ndjson", &b);
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        (st["reloads_failed"].as_u64() > Some(failed0)).then_some(st)
    })
    .unwrap_or_else(|| panic!("the bad record was never reported: {}", s.status()));
    let first = st["last_error"]["errors"][0].as_str().unwrap_or("");
    assert!(
        names_file_line_col(first, "customers/b.ndjson") && first.contains("platinum"),
        "{st}"
    );
    assert_eq!(limit(&s, "b2"), 100);
}

/// Asserts the last load was incremental and read the changed file and at most the
/// two changed by the steps before (a file modified within 100 ms of a load is read
/// again by the next one) — never all seven.
fn assert_incremental(s: &Server) {
    let st = s.status();
    assert_eq!(st["last_load"]["path"], "incremental", "{st}");
    let read = st["last_load"]["files_read"].as_u64();
    assert!(matches!(read, Some(1..=3)), "{st}");
    assert!(st["last_error"].is_null(), "{st}");
}

/// The ways files change that the reload tests cover, each applied incrementally: an
/// in-place write, a new file in a new subdirectory, delete then recreate, and a
/// Kubernetes ConfigMap swap of a customer file (its `..data` symlink moved to a new
/// folder).
#[test]
fn each_file_change_pattern_is_applied_incrementally() {
    use std::os::unix::fs::symlink;
    let dir = customer_dir();
    let root = dir.path();
    let version = |stamp: &str, plan: &str| {
        std::fs::create_dir(root.join(stamp)).expect("folder");
        std::fs::write(root.join(stamp).join("k.ndjson"), line("k0", plan)).expect("key");
    };
    version("..v1", "free");
    symlink("..v1", root.join("..data")).expect("..data");
    symlink("..data/k.ndjson", root.join("k.ndjson")).expect("key symlink");
    age(root);
    let s = start(root);
    assert_eq!(limit(&s, "k0"), 100, "{}", s.status());

    dir.write(
        "customers/c.ndjson",
        &lines("c", 50).replace(&line("c4", "free"), &line("c4", "pro")),
    );
    await_limit(&s, "c4", 1000);
    assert_incremental(&s);

    std::fs::create_dir_all(dir.join("customers/eu")).expect("subdirectory");
    dir.write("customers/eu/e.ndjson", &line("e0", "pro"));
    await_limit(&s, "e0", 1000);
    assert_incremental(&s);

    dir.remove("customers/a.ndjson");
    dir.write(
        "customers/a.ndjson",
        &lines("a", 50).replace(&line("a9", "free"), &line("a9", "pro")),
    );
    await_limit(&s, "a9", 1000);
    assert_incremental(&s);

    version("..v2", "pro");
    symlink("..v2", root.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(root.join("..v1")).expect("old folder");
    await_limit(&s, "k0", 1000);
    assert_incremental(&s);
    assert_eq!(s.status()["snapshot"]["customers"], 153);
}

/// The mass-removal guard holds on the incremental path: removing two customer files
/// (100 of 151 customers) is held, and the last snapshot keeps serving.
#[test]
fn removing_most_customers_incrementally_is_held() {
    let dir = customer_dir();
    let s = Server::start_with(
        dir.path(),
        &["--reload-debounce", "50ms", "--reload-settle", "1h"],
    );
    let v1 = s.version().expect("version");
    dir.remove("customers/a.ndjson");
    dir.remove("customers/b.ndjson");
    let st = wait_for(DEADLINE, || {
        let st = s.status();
        (st["held"]["customers_removed"] == 100).then_some(st)
    })
    .unwrap_or_else(|| panic!("the mass removal was not held: {}", s.status()));
    assert_eq!(st["last_load"]["path"], "incremental", "{st}");
    assert_eq!(st["snapshot"]["version"], v1.as_str(), "{st}");
    assert_eq!(limit(&s, "a1"), 100, "still served");
}

// ---- property: incremental edits decide as a fresh load of the final files ----

const FILES: [&str; 4] = ["a.ndjson", "b.ndjson", "c.ndjson", "d.yaml"];
const IDS: usize = 12;

/// The customers each file holds: file -> id -> plan.
type Layout = [BTreeMap<usize, bool>; 4];

fn render(file: usize, customers: &BTreeMap<usize, bool>) -> String {
    let plan = |pro: bool| if pro { "pro" } else { "free" };
    if FILES[file].ends_with(".yaml") {
        if customers.is_empty() {
            return "customers: []\n".into();
        }
        let mut s = String::from("customers:\n");
        for (&id, &pro) in customers {
            s.push_str(&format!(
                "  - id: u{id}\n    subscriptions: [{{ plan: {}, starts: 2020-01-01 }}]\n",
                plan(pro)
            ));
        }
        s
    } else {
        customers
            .iter()
            .map(|(&id, &pro)| line(&format!("u{id}"), plan(pro)) + "\n")
            .collect()
    }
}

/// Writes the layout (removing NDJSON files left empty), each changed file dated `step` seconds after an hour ago (distinct per
/// step, long settled).
fn write(dir: &Path, layout: &Layout, step: u64) -> Result<(), TestCaseError> {
    let fail = |e: std::io::Error| TestCaseError::fail(e.to_string());
    let at = SystemTime::now() - Duration::from_secs(3600) + Duration::from_secs(step);
    for (f, customers) in layout.iter().enumerate() {
        let path = dir.join(FILES[f]);
        // An NDJSON file left without customers is removed (and added back later).
        if customers.is_empty() && FILES[f].ends_with(".ndjson") {
            if path.exists() {
                std::fs::remove_file(&path).map_err(fail)?;
            }
            continue;
        }
        let text = render(f, customers);
        let same = std::fs::read_to_string(&path).is_ok_and(|t| t == text);
        if !same {
            std::fs::write(&path, text).map_err(fail)?;
            let file = std::fs::File::options()
                .write(true)
                .open(&path)
                .map_err(fail)?;
            file.set_modified(at).map_err(fail)?;
        }
    }
    Ok(())
}

fn decisions(snap: &Snapshot) -> Result<Vec<Value>, TestCaseError> {
    let now = Timestamp::parse("2026-06-01").map_err(TestCaseError::fail)?;
    let store = MemoryStore::new();
    let mut out = Vec::new();
    for id in 0..IDS {
        let customer = format!("u{id}");
        for feature in ["sso", "api.calls"] {
            let req = Request::new(&customer, feature);
            let d = decide::in_memory(snap, &store, Op::Check, &req, now)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            out.push(serde_json::to_value(&d).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
    }
    Ok(out)
}

/// One edit: put customer `id` (pro or free) into `file`, taking it out of any other
/// file (a move), or remove it everywhere (`file` is `None`).
fn edit() -> impl Strategy<Value = (usize, Option<usize>, bool)> {
    (
        0..IDS,
        proptest::option::weighted(0.8, 0..FILES.len()),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn file_edits_applied_incrementally_decide_as_a_fresh_load(
        edits in proptest::collection::vec(proptest::collection::vec(edit(), 1..4), 1..6),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        std::fs::write(dir.path().join("catalog.yaml"), CATALOG)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut layout: Layout = Default::default();
        for id in 0..IDS / 2 {
            layout[id % FILES.len()].insert(id, false);
        }
        write(dir.path(), &layout, 0)?;
        let limits = Limits::default();
        let (mut files, mut index): (Snapshot, FileIndex) = load_dir_indexed(dir.path(), &limits)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (step, batch) in edits.iter().enumerate() {
            for &(id, file, pro) in batch {
                for f in layout.iter_mut() {
                    f.remove(&id);
                }
                if let Some(f) = file {
                    layout[f].insert(id, pro);
                }
            }
            write(dir.path(), &layout, step as u64 + 1)?;
            let applied = apply_changes(dir.path(), &limits, &index, &files)
                .map_err(|why| TestCaseError::fail(format!("fell back: {why}")))?;
            let fresh = policy::load_dir(dir.path(), &limits)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&applied.snapshot.version, &fresh.version);
            prop_assert_eq!(applied.snapshot.customers.len(), fresh.customers.len());
            prop_assert_eq!(decisions(&applied.snapshot)?, decisions(&fresh)?);
            files = applied.snapshot;
            index = applied.index;
        }
    }
}
