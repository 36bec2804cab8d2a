//! Explanations: every grant considered for a request, and why the winner won.
//!
//! Built from the same candidate walk and precedence as decisions, so an explanation
//! can never disagree with the decision; this path may allocate (it serves people, not
//! the hot path).

use super::Request;
use super::grants::{Origin, Rule, Selector, for_each_candidate};
use crate::policy::{GrantValue, Limit, Snapshot};
use crate::time::Timestamp;

/// One candidate in an explanation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExplainedGrant {
    pub source: String,
    pub grant: String,
    pub status: &'static str,
    pub won: bool,
}

/// Which grants were considered for a decision and why the winner won.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explanation {
    pub considered: Vec<ExplainedGrant>,
    pub rule: Option<&'static str>,
}

/// Explains the precedence for a request, using the same walk as
/// [`evaluate`](super::evaluate()).
pub fn explain(snap: &Snapshot, req: &Request<'_>, now: Timestamp) -> Explanation {
    let mut considered = Vec::new();
    let (Some(fid), Some(c)) = (
        snap.feature_id(req.feature),
        snap.customers.get(req.customer),
    ) else {
        return Explanation {
            considered,
            rule: None,
        };
    };
    let feature = snap.feature(fid);
    let t = req.at.unwrap_or(now);
    let mut sel = Selector::new(feature);
    let mut all = Vec::new();
    for_each_candidate(snap, &c, fid, t, req.context, |cand| {
        all.push(cand);
        sel.offer(cand);
    });
    let winner = sel.winner();
    for cand in &all {
        let source = match cand.origin {
            Origin::Subscription(i) => {
                let s = &c.subs[i as usize];
                let via = snap
                    .bundle_grant(s.plan, fid)
                    .map(|g| g.via.join(" > "))
                    .unwrap_or_default();
                let mut text = format!(
                    "subscription `{}` ({} .. {})",
                    snap.bundle(s.plan).name,
                    fmt_t(s.starts),
                    fmt_t(s.ends)
                );
                if via.contains('>') {
                    text.push_str(&format!(" via {via}"));
                }
                if s.quantity > 1 {
                    text.push_str(&format!(" x{}", s.quantity));
                }
                if s.trial {
                    text.push_str(" trial");
                }
                text
            }
            Origin::Grant(_) => match cand.priority {
                Some(p) => format!(
                    "customer grant, priority {p} ({} .. {})",
                    fmt_t(cand.starts),
                    fmt_t(cand.ends)
                ),
                None => format!(
                    "customer grant ({} .. {})",
                    fmt_t(cand.starts),
                    fmt_t(cand.ends)
                ),
            },
            Origin::Override(i) => {
                let o = &c.overrides[i as usize];
                format!(
                    "override until {}, approved by {}: {}",
                    fmt_t(o.expires),
                    o.approved_by,
                    o.reason
                )
            }
        };
        let won = winner.as_ref().is_some_and(|(w, rule, _)| {
            w.origin == cand.origin
                || (*rule == Rule::Sum
                    && cand.status.usable()
                    && !matches!(cand.origin, Origin::Override(_)))
        });
        considered.push(ExplainedGrant {
            source,
            grant: describe(cand.value),
            status: cand.status.as_str(),
            won,
        });
    }
    Explanation {
        considered,
        rule: winner.map(|(_, r, _)| r.as_str()),
    }
}

fn fmt_t(t: Timestamp) -> String {
    match t {
        Timestamp::MIN => "-".into(),
        Timestamp::MAX => "open".into(),
        t => t.to_string(),
    }
}

/// A grant in policy notation, for explanations.
pub fn describe(g: &GrantValue) -> String {
    let lim = |l: &Limit| match l {
        Limit::Finite(n) => n.to_string(),
        Limit::Unlimited => "unlimited".into(),
    };
    match g {
        GrantValue::Flag(b) => b.to_string(),
        GrantValue::Revoked => "false (revoked)".into(),
        GrantValue::Quota(q) => format!("{} per {}", lim(&q.limit), q.period.name()),
        GrantValue::Rate(r) => format!(
            "{} per {}, burst {}",
            r.limit,
            crate::policy::units::format_duration(r.per_us),
            r.burst
        ),
        GrantValue::Seats(l) => format!("{} seats", lim(l)),
        GrantValue::Value(v) => match &v.repr {
            crate::policy::ValueRepr::Str(s) => s.to_string(),
            crate::policy::ValueRepr::Int(n) => n.to_string(),
            crate::policy::ValueRepr::Float(x) => x.to_string(),
            crate::policy::ValueRepr::Bool(b) => b.to_string(),
        },
    }
}
