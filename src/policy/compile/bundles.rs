//! Plans and groups: one shared namespace, each bundle's own grants, `includes`
//! flattened once (cycles and unknown names reported), then the per-bundle grant tables
//! and, per feature, the plans that grant it (the upgrade suggestions).
//!
//! Flattening here means a decision never walks `includes`: a bundle's table already
//! holds the most generous grant of each feature it reaches, with the path it came by.

use super::features::unknown_feature;
use super::grants::compile_grant;
use super::{Issue, Issues, Map, k, key_place, place, seg_path};
use crate::policy::raw;
use crate::policy::snapshot::*;
use crate::policy::source::Seg;

/// A plan or group as written, with where it was written.
pub(super) struct RawBundle<'a> {
    name: &'a str,
    is_plan: bool,
    raw: &'a raw::Bundle,
    file: usize,
    section: &'static str,
}

/// Collects plans, then groups, in file order. Plans and groups share one namespace:
/// `includes` may name either.
pub(super) fn collect_bundles<'a>(
    docs: &[(usize, &'a raw::Document)],
    issues: &mut Issues,
) -> (Vec<RawBundle<'a>>, Map<Box<str>, BundleId>) {
    let mut raw_bundles: Vec<RawBundle> = Vec::new();
    let mut bundle_index: Map<Box<str>, BundleId> = Map::default();
    for (section, is_plan) in [("plans", true), ("groups", false)] {
        for &(file, doc) in docs {
            let list = if is_plan { &doc.plans } else { &doc.groups };
            for (name, b) in list.iter() {
                if let Some(&id) = bundle_index.get(name) {
                    let first = &raw_bundles[id as usize];
                    issues.0.push(Issue {
                        at: key_place(file, seg_path(&[section, name])),
                        message: format!(
                            "`{name}` is defined twice (plans and groups share one namespace)"
                        ),
                        unresolved: None,
                        first: Some(key_place(
                            first.file,
                            seg_path(&[first.section, first.name]),
                        )),
                    });
                    continue;
                }
                bundle_index.insert(name.into(), raw_bundles.len() as BundleId);
                raw_bundles.push(RawBundle {
                    name,
                    is_plan,
                    raw: b,
                    file,
                    section,
                });
            }
        }
    }
    (raw_bundles, bundle_index)
}

/// A bundle's own grants (not those it includes).
pub(super) type OwnGrants = Vec<(FeatureId, GrantValue)>;

/// Each bundle's own grants, compiled against the features' kinds.
pub(super) fn own_grants(
    raw_bundles: &[RawBundle],
    features: &[Feature],
    feature_index: &Map<Box<str>, FeatureId>,
    issues: &mut Issues,
) -> Vec<OwnGrants> {
    let mut own: Vec<OwnGrants> = Vec::with_capacity(raw_bundles.len());
    for b in raw_bundles {
        let mut grants = Vec::new();
        for (fname, g) in b.raw.grants.iter() {
            let path = || seg_path(&[b.section, b.name, "grants", fname]);
            let Some(&fid) = feature_index.get(fname) else {
                issues.unresolved(
                    key_place(b.file, path()),
                    fname,
                    unknown_feature(fname, feature_index),
                );
                continue;
            };
            match compile_grant(&features[fid as usize], g) {
                Ok(v) => grants.push((fid, v)),
                Err((sub, msg)) => {
                    let mut p = path();
                    if let Some(sub) = sub {
                        p.push(k(sub));
                    }
                    issues.push(place(b.file, p), msg)
                }
            }
        }
        own.push(grants);
    }
    own
}

/// Where the depth-first walk stands with a bundle.
#[derive(Clone, Copy, PartialEq)]
enum State {
    New,
    Visiting,
    Done,
}

/// A bundle's flattened grants, per feature: the grant and the bundles it came through
/// (the bundle itself first).
pub(super) type Flat = Vec<Option<(GrantValue, Vec<BundleId>)>>;

/// The depth-first walk over `includes`.
struct Flattener<'a, 'b> {
    raw: &'a [RawBundle<'b>],
    own: &'a [OwnGrants],
    index: &'a Map<Box<str>, BundleId>,
    features: &'a [Feature],
    state: Vec<State>,
    flat: Vec<Flat>,
    stack: Vec<BundleId>,
    issues: &'a mut Issues,
}

impl Flattener<'_, '_> {
    fn visit(&mut self, id: BundleId) {
        match self.state[id as usize] {
            State::Done => return,
            State::Visiting => return,
            State::New => {}
        }
        self.state[id as usize] = State::Visiting;
        self.stack.push(id);
        let b = &self.raw[id as usize];
        let mut flat: Flat = vec![None; self.features.len()];
        for (i, inc) in b.raw.includes.iter().enumerate() {
            let at = || {
                place(
                    b.file,
                    vec![k(b.section), k(b.name), k("includes"), Seg::Index(i)],
                )
            };
            let Some(&child) = self.index.get(inc.as_str()) else {
                let hint = super::names::did_you_mean(inc, self.index.keys().map(|k| &**k));
                self.issues.unresolved(
                    at(),
                    inc,
                    format!("unknown plan or group `{inc}` in `includes`{hint}"),
                );
                continue;
            };
            if self.state[child as usize] == State::Visiting {
                let start = self.stack.iter().position(|&s| s == child).unwrap_or(0);
                let mut cycle: Vec<&str> = self.stack[start..]
                    .iter()
                    .map(|&s| self.raw[s as usize].name)
                    .collect();
                cycle.push(self.raw[child as usize].name);
                self.issues
                    .push(at(), format!("include cycle: {}", cycle.join(" -> ")));
                continue;
            }
            self.visit(child);
            for (f, g) in self.flat[child as usize].iter().enumerate() {
                let Some((gv, via)) = g else { continue };
                let feature = &self.features[f];
                let better = match &flat[f] {
                    None => true,
                    Some((cur, _)) => gv.cmp_generosity(1, cur, 1, feature).is_gt(),
                };
                if better {
                    let mut v = Vec::with_capacity(via.len() + 1);
                    v.push(id);
                    v.extend_from_slice(via);
                    flat[f] = Some((gv.clone(), v));
                }
            }
        }
        for (f, g) in &self.own[id as usize] {
            flat[*f as usize] = Some((g.clone(), vec![id]));
        }
        self.flat[id as usize] = flat;
        self.stack.pop();
        self.state[id as usize] = State::Done;
    }
}

/// Flattens includes once, depth first, reporting cycles and unknown names.
pub(super) fn flatten(
    raw_bundles: &[RawBundle],
    own: &[OwnGrants],
    bundle_index: &Map<Box<str>, BundleId>,
    features: &[Feature],
    issues: &mut Issues,
) -> Vec<Flat> {
    let mut fl = Flattener {
        raw: raw_bundles,
        own,
        index: bundle_index,
        features,
        state: vec![State::New; raw_bundles.len()],
        flat: vec![Vec::new(); raw_bundles.len()],
        stack: Vec::new(),
        issues,
    };
    for id in 0..raw_bundles.len() as BundleId {
        fl.visit(id);
    }
    fl.flat
}

/// The compiled bundles (plans numbered into tiers in file order) and the grants their
/// tables point into.
pub(super) fn bundle_tables(
    raw_bundles: &[RawBundle],
    flat: &[Flat],
    nf: usize,
) -> (Vec<Bundle>, Vec<BundleGrant>) {
    let mut grants: Vec<BundleGrant> = Vec::new();
    let mut bundles: Vec<Bundle> = Vec::with_capacity(raw_bundles.len());
    let mut tier = 0;
    for (id, b) in raw_bundles.iter().enumerate() {
        let mut table = vec![NONE; nf].into_boxed_slice();
        for (f, g) in flat[id].iter().enumerate() {
            if let Some((value, via)) = g {
                table[f] = grants.len() as GrantId;
                grants.push(BundleGrant {
                    value: value.clone(),
                    via: via
                        .iter()
                        .map(|&v| Box::from(raw_bundles[v as usize].name))
                        .collect(),
                });
            }
        }
        bundles.push(Bundle {
            name: b.name.into(),
            is_plan: b.is_plan,
            tier,
            grants: table,
        });
        if b.is_plan {
            tier += 1;
        }
    }
    (bundles, grants)
}

/// Per feature, the plans (tier order) that grant it something: the candidates for
/// upgrade suggestions.
pub(super) fn upgrades(
    bundles: &[Bundle],
    grants: &[BundleGrant],
    nf: usize,
) -> Vec<Box<[(BundleId, GrantId)]>> {
    (0..nf)
        .map(|f| {
            bundles
                .iter()
                .enumerate()
                .filter(|(_, b)| b.is_plan)
                .filter_map(|(id, b)| {
                    let g = b.grants[f];
                    (g != NONE && grants[g as usize].value.grants_something())
                        .then_some((id as BundleId, g))
                })
                .collect()
        })
        .collect()
}
