//! Features: each name defined once, each definition's fields fit for its kind.
//!
//! Also the "unknown feature" message every later step uses, with its "did you mean".

use super::{Issue, Issues, Map, Place, key_place, place, seg_path};
use crate::policy::raw;
use crate::policy::snapshot::*;

/// Compiles every document's features, in file order, into the feature table and its
/// name index (ids are positions in the table).
pub(super) fn compile_features(
    docs: &[(usize, &raw::Document)],
    issues: &mut Issues,
) -> (Vec<Feature>, Map<Box<str>, FeatureId>) {
    let mut features = Vec::new();
    let mut feature_index: Map<Box<str>, FeatureId> = Map::default();
    let mut feature_at: Vec<Place> = Vec::new();
    for &(file, doc) in docs {
        for (name, f) in doc.features.iter() {
            let at = key_place(file, seg_path(&["features", name]));
            if let Some(&id) = feature_index.get(name) {
                issues.0.push(Issue {
                    at,
                    message: format!("feature `{name}` is defined twice"),
                    unresolved: None,
                    first: Some(feature_at[id as usize].clone()),
                });
                continue;
            }
            if let Some(feature) = compile_feature(name, f, file, issues) {
                feature_index.insert(name.into(), features.len() as FeatureId);
                features.push(feature);
                feature_at.push(at);
            }
        }
    }
    (features, feature_index)
}

pub(super) fn unknown_feature(name: &str, index: &Map<Box<str>, FeatureId>) -> String {
    let hint = super::names::did_you_mean(name, index.keys().map(|k| &**k));
    format!("unknown feature `{name}`{hint}")
}

fn compile_feature(
    name: &str,
    f: &raw::Feature,
    file: usize,
    issues: &mut Issues,
) -> Option<Feature> {
    let at = |field: &str| place(file, seg_path(&["features", name, field]));
    let mut ok = true;
    if name.is_empty() {
        issues.push(
            key_place(file, seg_path(&["features", name])),
            "a feature name may not be empty",
        );
        ok = false;
    }
    if f.combine.is_some() && !matches!(f.kind, Kind::Quota | Kind::Seats) {
        issues.push(
            at("combine"),
            format!(
                "`combine` applies to quota and seats features, not to a {} feature",
                f.kind.as_str()
            ),
        );
        ok = false;
    }
    if f.kind == Kind::Value {
        match f.value_type {
            None => {
                issues.push(
                    key_place(file, seg_path(&["features", name])),
                    "a value feature needs `type: duration|number|string|bool`",
                );
                ok = false;
            }
            Some(ValueType::Duration | ValueType::Number) => {}
            Some(ValueType::String) => {
                if f.prefer.is_some() {
                    issues.push(at("prefer"), "`prefer` orders durations and numbers; order strings with `order: [least, .., most generous]`");
                    ok = false;
                }
            }
            Some(ValueType::Bool) => {}
        }
    } else {
        for (field, set) in [
            ("type", f.value_type.is_some()),
            ("prefer", f.prefer.is_some()),
            ("order", f.order.is_some()),
        ] {
            if set {
                issues.push(
                    at(field),
                    format!(
                        "`{field}` applies to value features, not to a {} feature",
                        f.kind.as_str()
                    ),
                );
                ok = false;
            }
        }
    }
    let notify_at = match (&f.notify_at, f.kind) {
        (None, _) => NotifyAt::DEFAULT,
        (Some(list), Kind::Quota) => match NotifyAt::parse(list) {
            Ok(n) => n,
            Err(e) => {
                issues.push(at("notify_at"), e);
                ok = false;
                NotifyAt::NONE
            }
        },
        (Some(_), kind) => {
            issues.push(
                at("notify_at"),
                format!(
                    "`notify_at` applies to quota features, not to a {} feature",
                    kind.as_str()
                ),
            );
            ok = false;
            NotifyAt::NONE
        }
    };
    if f.order.is_some() && f.value_type != Some(ValueType::String) && f.kind == Kind::Value {
        issues.push(at("order"), "`order` applies to string values");
        ok = false;
    }
    ok.then(|| Feature {
        name: name.into(),
        kind: f.kind,
        combine: f.combine.unwrap_or(Combine::Max),
        value_type: f.value_type,
        prefer: f.prefer.unwrap_or(Prefer::Max),
        order: f
            .order
            .as_ref()
            .map(|o| o.iter().map(|s| s.as_str().into()).collect()),
        description: f.description.as_deref().map(Into::into),
        unit: f.unit.as_deref().map(Into::into),
        notify_at,
    })
}
