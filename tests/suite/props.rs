//! Property tests: window arithmetic, precedence against a model, and a loader that
//! never panics on hostile input.

use entitled::decide;
use entitled::engine::{Op, Request, window};
use entitled::policy::{self, Limits, Period, Reset};
use entitled::time::{DAY, Timestamp};
use entitled::usage::MemoryStore;
use proptest::prelude::*;

fn period() -> impl Strategy<Value = Period> {
    prop_oneof![
        Just(Period::Hour),
        Just(Period::Day),
        Just(Period::Week),
        Just(Period::Month),
        Just(Period::Year),
        (1i64..400 * DAY).prop_map(Period::Fixed),
    ]
}

fn reset() -> impl Strategy<Value = Reset> {
    prop_oneof![Just(Reset::Anniversary), Just(Reset::Calendar)]
}

/// Instants between 2000 and 2100, at microsecond resolution.
fn instant() -> impl Strategy<Value = Timestamp> {
    (946_684_800_000_000i64..4_102_444_800_000_000).prop_map(Timestamp)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn now_is_in_its_window_and_reset_is_later(p in period(), r in reset(), anchor in instant(), t in instant()) {
        let w = window(p, r, anchor, t);
        prop_assert!(w.contains(t), "{t:?} not in {w:?}");
        prop_assert!(w.resets_at().is_some_and(|e| e > t));
    }

    #[test]
    fn rollover_is_exact_at_the_boundary(p in period(), r in reset(), anchor in instant(), t in instant()) {
        let w = window(p, r, anchor, t);
        // The last microsecond of a window is still in it; its end starts the next.
        prop_assert_eq!(window(p, r, anchor, Timestamp(w.end.0 - 1)), w);
        let next = window(p, r, anchor, w.end);
        prop_assert_eq!(next.start, w.end);
        prop_assert!(next.end > next.start);
        // And the window before ends where this one starts.
        prop_assert_eq!(window(p, r, anchor, Timestamp(w.start.0 - 1)).end, w.start);
    }

    #[test]
    fn monthly_anniversaries_fall_on_the_anchor_day_or_month_end(day in 1i8..=31, month in 1i8..=12, t in instant()) {
        let Ok(d) = jiff::civil::Date::new(2024, month, day) else { return Ok(()) };
        let anchor = Timestamp::parse(&d.to_string()).map_err(TestCaseError::fail)?;
        let w = window(Period::Month, Reset::Anniversary, anchor, t);
        let start = jiff::tz::Offset::UTC.to_datetime(w.start.to_jiff().ok_or_else(|| TestCaseError::fail("range"))?);
        let last = start.date().last_of_month().day();
        prop_assert!(start.day() == day || (start.day() == last && last < day), "{start} for anchor day {day}");
    }
}

/// A grant on a customer for the precedence model.
#[derive(Debug, Clone)]
enum G {
    Plan(u64),
    Grant { limit: u64, priority: Option<i32> },
    Override(u64),
}

fn grants() -> impl Strategy<Value = Vec<G>> {
    let g = prop_oneof![
        (1u64..1000).prop_map(G::Plan),
        (1u64..1000, proptest::option::of(-5i32..5))
            .prop_map(|(limit, priority)| G::Grant { limit, priority }),
        (1u64..1000).prop_map(G::Override),
    ];
    proptest::collection::vec(g, 1..6)
}

/// Precedence as docs/policy.md states it: an active override wins (the most generous
/// of them); otherwise the grant with the highest priority; otherwise the most generous
/// grant, or the sum of them all with `combine: sum`.
fn model(gs: &[G], sum: bool) -> u64 {
    let overrides: Vec<u64> = gs
        .iter()
        .filter_map(|g| {
            if let G::Override(l) = g {
                Some(*l)
            } else {
                None
            }
        })
        .collect();
    if let Some(m) = overrides.iter().max() {
        return *m;
    }
    let prio = gs
        .iter()
        .filter_map(|g| {
            if let G::Grant {
                limit,
                priority: Some(p),
            } = g
            {
                Some((*p, *limit))
            } else {
                None
            }
        })
        .max();
    if let Some((_, l)) = prio {
        return l;
    }
    let limits = gs.iter().filter_map(|g| match g {
        G::Plan(l) | G::Grant { limit: l, .. } => Some(*l),
        G::Override(_) => None,
    });
    if sum {
        limits.sum()
    } else {
        limits.max().unwrap_or(0)
    }
}

fn policy_for(gs: &[G], sum: bool) -> String {
    let combine = if sum { ", combine: sum" } else { "" };
    let mut plans = String::new();
    let mut subs = String::new();
    let mut grants = String::new();
    let mut overrides = String::new();
    for (i, g) in gs.iter().enumerate() {
        match g {
            G::Plan(l) => {
                plans.push_str(&format!("  p{i}:\n    grants:\n      q: {{ limit: {l}, per: month }}\n"));
                subs.push_str(&format!("      - {{ plan: p{i}, starts: 2026-01-01 }}\n"));
            }
            G::Grant { limit, priority } => {
                let p = priority.map(|p| format!(", priority: {p}")).unwrap_or_default();
                grants.push_str(&format!("      - {{ feature: q, limit: {limit}, per: month{p} }}\n"));
            }
            G::Override(l) => overrides.push_str(&format!(
                "      - {{ feature: q, grant: {{ limit: {l}, per: month }}, expires: 2027-01-01, approved_by: a, reason: r }}\n"
            )),
        }
    }
    let mut s = format!("features:\n  q: {{ kind: quota{combine} }}\n");
    if !plans.is_empty() {
        s.push_str(&format!("plans:\n{plans}"));
    }
    s.push_str("customers:\n  - id: c\n");
    for (k, v) in [
        ("subscriptions", subs),
        ("grants", grants),
        ("overrides", overrides),
    ] {
        if !v.is_empty() {
            s.push_str(&format!("    {k}:\n{v}"));
        }
    }
    s
}

/// The case the property below once found: a JSON error before the first character of
/// a line, which serde_json places at column 0.
#[test]
fn a_json_error_at_the_start_of_a_line_is_located() {
    let base = policy_for(
        &[
            G::Plan(5),
            G::Grant {
                limit: 3,
                priority: Some(1),
            },
            G::Override(9),
        ],
        true,
    );
    let text = format!("{}\n{}", &base[..1], &base[1..]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("p.json"), &text).expect("writing p.json");
    let e = policy::load_dir(dir.path(), &Limits::default()).expect_err("not JSON");
    assert!(!e.diagnostics.is_empty());
    for d in &e.diagnostics {
        assert!(d.line >= 1 && d.column >= 1, "unlocated: {d}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn precedence_matches_the_model(gs in grants(), sum in any::<bool>()) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let text = policy_for(&gs, sum);
        std::fs::write(dir.path().join("p.yaml"), &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let snap = policy::load_dir(dir.path(), &Limits::default()).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let now = Timestamp::parse("2026-06-01").map_err(TestCaseError::fail)?;
        let d = decide::in_memory(&snap, &MemoryStore::new(), Op::Check, &Request::new("c", "q"), now)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want = model(&gs, sum);
        prop_assert_eq!(serde_json::to_value(d.limit).ok(), Some(serde_json::json!(want)), "{}", text);
    }

    #[test]
    fn loader_never_panics_on_mangled_policies(cut in 0usize..2000, junk in "[ -~\n\t]{0,40}") {
        // A valid policy, cut at a random byte and spliced with random text.
        let base = policy_for(&[G::Plan(5), G::Grant { limit: 3, priority: Some(1) }, G::Override(9)], true);
        let cut = cut.min(base.len());
        let text = format!("{}{junk}{}", &base[..cut], &base[cut..]);
        for name in ["p.yaml", "p.json", "p.ndjson"] {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            std::fs::write(dir.path().join(name), &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Err(e) = policy::load_dir(dir.path(), &Limits::default()) {
                for d in &e.diagnostics {
                    prop_assert!(d.line >= 1 && d.column >= 1, "unlocated: {d}");
                }
            }
        }
    }
}

#[test]
fn yaml_bombs_and_deep_nesting_are_refused() {
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
    let deep = format!("features:\n  x: {}{}\n", "[".repeat(200), "]".repeat(200));
    for text in [bomb.to_string(), deep] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.yaml"), &text).expect("write");
        let err = policy::load_dir(dir.path(), &Limits::default()).expect_err("refused");
        assert_eq!(err.diagnostics.len(), 1, "{err}");
        assert_eq!(err.diagnostics[0].file.to_str(), Some("p.yaml"));
    }
}

#[test]
fn files_over_the_size_limit_are_refused_before_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("big.yaml"), "features: {}\n".repeat(100)).expect("write");
    let limits = Limits {
        max_file_bytes: 100,
        ..Limits::default()
    };
    let err = policy::load_dir(dir.path(), &limits).expect_err("refused");
    assert!(
        err.to_string().contains("over the limit of 100 bytes"),
        "{err}"
    );
}
