//! Where decisions are reported, whatever the protocol that asked: the decision
//! counters, quota-warning crossings, usage-threshold notices, the usage report's
//! aggregation and the audit log.

use std::sync::Arc;

use super::Query;
use crate::audit::{Audit, DecisionRecord};
use crate::engine::Decision;
use crate::insights::InsightsSink;
use crate::metrics::DecisionMetrics;
use crate::notices::{Crossing, UsageNotifier};
use crate::time::Timestamp;

/// Reports every decision the [`super::Decider`] makes.
#[derive(Debug)]
pub struct Observer {
    pub metrics: DecisionMetrics,
    /// The audit log, for decisions (`--audit-decisions`).
    pub audit: Option<Arc<Audit>>,
    /// Where usage-threshold crossings go (with notices on).
    pub usage_notices: Option<UsageNotifier>,
    /// The usage report's aggregation.
    pub insights: Option<InsightsSink>,
}

impl Observer {
    /// Counts a decision in metrics, and in the audit log if it records this one.
    pub fn decided(&self, q: &Query<'_>, now: Timestamp, d: &Decision<'_>) {
        let (op, req) = (q.op, &q.req);
        self.metrics.decision(op, d.kind, d.reason);
        if let Some(a) = &self.audit
            && a.wants(d.allowed)
        {
            // Dropped (and counted) when the queue is full: the request never waits.
            let _queued = {
                a.decision(DecisionRecord {
                    decision_id: crate::audit::decision_id(),
                    time: now,
                    snapshot: d.snapshot.to_string(),
                    op: op.as_str(),
                    customer: req.customer.to_string(),
                    feature: req.feature.to_string(),
                    amount: req.amount,
                    context: req
                        .context
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    allowed: d.allowed,
                    reason: d.reason.as_str(),
                })
            };
        }
        if let Some(i) = &self.insights {
            let plan = d.source.as_ref().and_then(|s| s.plan);
            i.decided(req.customer, d.feature, plan, d.reason, now);
        }
        if d.warning_crossed {
            crate::metrics::quota_warning(d.feature);
        }
        if let (Some(c), Some(n)) = (&d.crossed, &self.usage_notices) {
            // Rare (a threshold reached): the allocation is not on every request.
            n.send(Crossing {
                customer: req.customer.to_string(),
                feature: d.feature.to_string(),
                plan: d.source.as_ref().and_then(|s| s.plan).map(str::to_string),
                thresholds: c.thresholds().collect(),
                limit: c.limit,
                used: c.used,
                window_start: c.window_start,
                window_end: c.window_end,
                at: now,
                snapshot: d.snapshot.to_string(),
            });
        }
    }
}
