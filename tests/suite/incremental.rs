//! Incremental customer changes: applying any sequence of changes to a compiled table
//! gives the same decisions as compiling the final customers from scratch, and shares
//! every shard it did not touch.

use entitled::decide;
use entitled::engine::{Op, Request};
use entitled::policy::compile::{Change, update_customers};
use entitled::policy::customers::{SHARDS, shard_of};
use entitled::policy::source::Origin;
use entitled::policy::{self, Limits, Snapshot, raw};
use entitled::time::Timestamp;
use entitled::usage::MemoryStore;
use proptest::prelude::*;

const CATALOG: &str = "\
features:
  sso: { kind: flag }
  api.calls: { kind: quota }
  export: { kind: flag }
plans:
  free:
    grants:
      api.calls: { limit: 100, per: month }
  pro:
    grants:
      sso: true
      api.calls: { limit: 1000, per: month }
  enterprise:
    includes: [pro]
    grants:
      export: true
";

/// Ids drawn from a small pool so that changes hit existing customers often.
const IDS: u32 = 24;

/// The pool's ids: the first half share one shard (so one rebuild carries several
/// changes and keeps several untouched neighbours), the rest fall where they fall.
fn id(n: u32) -> String {
    static POOL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let same = shard_of("c0");
        let mut crowded: Vec<String> = (0..200_000)
            .map(|i| format!("c{i}"))
            .filter(|c| shard_of(c) == same)
            .take(IDS as usize / 2)
            .collect();
        crowded.extend((0..IDS / 2).map(|i| format!("other{i}")));
        crowded
    });
    pool[n as usize].clone()
}

/// One of a few record shapes: plans, scopes (interned per shard), grants, overrides,
/// dates in the past and future.
fn record(n: u32, shape: u8) -> String {
    let plan = ["free", "pro", "enterprise"][usize::from(shape % 3)];
    let scope = if shape % 4 == 1 {
        r#", "scope": {"region": ["eu"]}"#
    } else {
        ""
    };
    let ends = if shape % 5 == 2 {
        r#", "ends": "2026-03-01""#
    } else {
        ""
    };
    let mut extra = String::new();
    if shape % 6 == 3 {
        extra.push_str(r#", "grants": [{"feature": "export", "grant": true, "scope": {"site": ["s1", "s2"]}}]"#);
    }
    if shape % 7 == 4 {
        extra.push_str(r#", "overrides": [{"feature": "api.calls", "grant": {"limit": 5, "per": "month"}, "expires": "2027-01-01", "approved_by": "ops", "reason": "trial"}]"#);
    }
    format!(
        r#"{{"id": "{}", "name": "Customer {shape}", "subscriptions": [{{"plan": "{plan}", "starts": "2026-01-01"{ends}{scope}}}]{extra}}}"#,
        id(n)
    )
}

fn load(customers: &std::collections::BTreeMap<u32, u8>) -> Result<Snapshot, TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let fail = |e: std::io::Error| TestCaseError::fail(e.to_string());
    std::fs::write(dir.path().join("catalog.yaml"), CATALOG).map_err(fail)?;
    let lines: Vec<String> = customers.iter().map(|(&id, &s)| record(id, s)).collect();
    std::fs::write(dir.path().join("customers.ndjson"), lines.join("\n")).map_err(fail)?;
    policy::load_dir(dir.path(), &Limits::default()).map_err(|e| TestCaseError::fail(e.to_string()))
}

/// Every decision the test compares, as JSON without the snapshot version.
fn decisions(snap: &Snapshot) -> Result<Vec<serde_json::Value>, TestCaseError> {
    let now = Timestamp::parse("2026-06-01").map_err(TestCaseError::fail)?;
    let store = MemoryStore::new();
    let contexts: [&[(&str, &str)]; 3] = [&[], &[("region", "eu")], &[("site", "s2")]];
    let mut out = Vec::new();
    for n in 0..IDS {
        let customer = id(n);
        for feature in ["sso", "api.calls", "export"] {
            for context in contexts {
                let mut req = Request::new(&customer, feature);
                req.context = context;
                let d = decide::in_memory(snap, &store, Op::Check, &req, now)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut v =
                    serde_json::to_value(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(m) = v.as_object_mut() {
                    m.remove("snapshot");
                }
                out.push(serde_json::json!({"customer": &customer, "context": format!("{context:?}"), "d": v}));
            }
        }
    }
    Ok(out)
}

/// A change: set to a record shape, remove, or restore the record another table (the
/// files') has for the id.
#[derive(Debug, Clone, Copy)]
enum Step {
    Set(u8),
    Remove,
    Restore,
}

fn change() -> impl Strategy<Value = (u32, Step)> {
    let step = prop_oneof![
        7 => (0u8..84).prop_map(Step::Set),
        2 => Just(Step::Remove),
        2 => Just(Step::Restore),
    ];
    (0..IDS, step)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn incremental_changes_decide_as_a_full_compile(
        initial in proptest::collection::btree_map(0..IDS, 0u8..84, 0..20),
        files in proptest::collection::btree_map(0..IDS, 0u8..84, 0..20),
        changes in proptest::collection::vec(change(), 1..12),
    ) {
        let before = load(&initial)?;
        let reference = load(&files)?;
        let records: Vec<Option<raw::Customer>> = changes
            .iter()
            .map(|&(id, step)| match step {
                Step::Set(s) => serde_json::from_str::<raw::Customer>(&record(id, s)).ok(),
                Step::Remove | Step::Restore => None,
            })
            .collect();
        let ids: Vec<String> = changes.iter().map(|&(n, _)| id(n)).collect();
        let list: Vec<Change<'_>> = records
            .iter()
            .zip(&ids)
            .zip(&changes)
            .map(|((rec, id), &(_, step))| match (rec, step) {
                (Some(record), _) => Change::Set { record, file: 1, origin: Origin::Line { line: 1 } },
                (None, Step::Restore) => Change::Restore { id, from: &reference.customers },
                (None, _) => Change::Remove(id),
            })
            .collect();
        let table = update_customers(&before.catalog, &before.customers, &list)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let after = Snapshot { customers: table, ..before.clone() };

        let mut last = initial.clone();
        for &(id, step) in &changes {
            let now = match step {
                Step::Set(s) => Some(s),
                Step::Remove => None,
                Step::Restore => files.get(&id).copied(),
            };
            match now {
                Some(s) => { last.insert(id, s); }
                None => { last.remove(&id); }
            }
        }
        let full = load(&last)?;
        prop_assert_eq!(after.customers.len(), full.customers.len());
        prop_assert_eq!(decisions(&after)?, decisions(&full)?);
        let touched: std::collections::BTreeSet<usize> =
            ids.iter().map(|id| shard_of(id)).collect();
        prop_assert_eq!(
            after.customers.shared_shards(&before.customers),
            SHARDS - touched.len()
        );
    }
}

/// A rejected record changes nothing and names what is wrong.
#[test]
fn a_bad_record_is_refused_with_its_problem() {
    let before = load(&[(1, 1)].into_iter().collect()).expect("loads");
    let bad: raw::Customer = serde_json::from_str(
        r#"{"id": "c1", "subscriptions": [{"plan": "platinum", "starts": "2026-01-01"}]}"#,
    )
    .expect("parses");
    let err = update_customers(
        &before.catalog,
        &before.customers,
        &[Change::Set {
            record: &bad,
            file: 1,
            origin: Origin::Line { line: 1 },
        }],
    )
    .expect_err("unknown plan");
    assert!(
        err.iter()
            .any(|i| i.message.contains("unknown plan `platinum`")),
        "{err:?}"
    );
}
