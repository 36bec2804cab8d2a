//! Gateway routes: matchers, where the customer id comes from, and the features a route
//! requires, consumes or rate-limits (each checked to exist and to be of a fitting kind).

use super::features::unknown_feature;
use super::{Issues, Map, k, place};
use crate::policy::raw;
use crate::policy::snapshot::*;
use crate::policy::source::Seg;

/// Compiles every document's routes, in file order. A route with a problem is left
/// out (its problems are reported).
pub(super) fn compile_routes(
    docs: &[(usize, &raw::Document)],
    features: &[Feature],
    feature_index: &Map<Box<str>, FeatureId>,
    issues: &mut Issues,
) -> Vec<Route> {
    let mut routes = Vec::new();
    for &(file, doc) in docs {
        for (i, r) in doc.routes.iter().enumerate() {
            let at = doc.route_position(i);
            if let Some(route) = compile_route(r, file, at, features, feature_index, issues) {
                routes.push(route);
            }
        }
    }
    routes
}

fn compile_route(
    r: &raw::Route,
    file: usize,
    i: usize,
    features: &[Feature],
    index: &Map<Box<str>, FeatureId>,
    issues: &mut Issues,
) -> Option<Route> {
    let at = |rest: &[&str]| {
        let mut p = vec![k("routes"), Seg::Index(i)];
        p.extend(rest.iter().map(|s| k(s)));
        place(file, p)
    };
    let before = issues.0.len();
    let customer = match (&r.customer.header, &r.customer.jwt_claim) {
        (Some(h), None) => Some(CustomerFrom::Header(h.to_ascii_lowercase().into())),
        (Some(h), Some(c)) => Some(CustomerFrom::JwtClaim {
            header: h.to_ascii_lowercase().into(),
            claim: c.as_str().into(),
        }),
        (None, Some(_)) => {
            issues.push(at(&["customer"]), "`jwt_claim` needs `header`: the header carrying the verified JWT payload (e.g. `x-jwt-payload`)");
            None
        }
        (None, None) => {
            issues.push(
                at(&["customer"]),
                "expected `header` or `jwt_claim` + `header`",
            );
            None
        }
    };
    let mut feature = |name: &str, path: Vec<Seg>, kinds: &[Kind]| -> Option<FeatureId> {
        let Some(&f) = index.get(name) else {
            issues.unresolved(place(file, path), name, unknown_feature(name, index));
            return None;
        };
        let kind = features[f as usize].kind;
        if !kinds.is_empty() && !kinds.contains(&kind) {
            let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
            issues.push(
                place(file, path),
                format!(
                    "`{name}` is a {} feature; expected {}",
                    kind.as_str(),
                    names.join(" or ")
                ),
            );
            return None;
        }
        Some(f)
    };
    let base = |rest: &[Seg]| {
        let mut p = vec![k("routes"), Seg::Index(i)];
        p.extend_from_slice(rest);
        p
    };
    let require: Vec<FeatureId> = r
        .require
        .iter()
        .enumerate()
        .filter_map(|(j, n)| feature(n, base(&[k("require"), Seg::Index(j)]), &[]))
        .collect();
    let consume = r.consume.as_ref().and_then(|c| {
        let f = feature(
            &c.feature,
            base(&[k("consume"), k("feature")]),
            &[Kind::Quota, Kind::Rate],
        )?;
        Some((f, c.amount.unwrap_or(1)))
    });
    let rate = r
        .rate
        .as_ref()
        .and_then(|n| feature(n, base(&[k("rate")]), &[Kind::Rate]));
    if let Some(c) = &r.consume
        && c.amount == Some(0)
    {
        issues.push(at(&["consume", "amount"]), "`amount` must be at least 1");
    }
    if issues.0.len() > before {
        return None;
    }
    Some(Route {
        path_prefix: r.matcher.path_prefix.as_deref().map(Into::into),
        path: r.matcher.path.as_deref().map(Into::into),
        methods: r
            .matcher
            .methods
            .iter()
            .map(|m| m.to_ascii_uppercase().into())
            .collect(),
        headers: r
            .matcher
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase().into(), v.as_str().into()))
            .collect(),
        customer: customer?,
        require: require.into_boxed_slice(),
        consume,
        rate,
    })
}
