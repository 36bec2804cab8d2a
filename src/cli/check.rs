//! `entitled check DIR --customer C --feature F`: make one decision offline, against
//! a fresh in-memory usage store, and explain which grant won and why. The exit code
//! tells an allowed (0) from a denied (1) request, a policy that does not load (2)
//! and a customer or feature the policy does not have (3).

use std::process::ExitCode;

use anyhow::Context as _;

use entitled::decide;
use entitled::engine::{self, Op, Reason, Request};
use entitled::time::Timestamp;
use entitled::usage::MemoryStore;

#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct Args {
    #[command(flatten)]
    policies: super::PolicyDir,
    /// The customer id asked about.
    #[arg(long)]
    customer: String,
    /// The feature asked about (`sso`, `api.calls`).
    #[arg(long)]
    feature: String,
    /// Evaluate as of this time (RFC 3339 or a date); default now.
    #[arg(long)]
    at: Option<String>,
    /// Context for scoped grants, `key=value` (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE")]
    context: Vec<String>,
    /// Units asked for (quota and rate checks).
    #[arg(long, default_value_t = 1)]
    amount: u64,
    /// Print the decision as JSON only.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Args {
        policies,
        customer,
        feature,
        at,
        context,
        amount,
        json,
    } = args;
    let Some(snap) = super::load(&policies) else {
        return Ok(super::no_answer());
    };
    let at = at
        .map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
        .transpose()
        .context("--at")?;
    let pairs: Vec<(String, String)> = context
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect::<Option<_>>()
        .context("--context expects key=value")?;
    let ctx: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let req = Request {
        customer: &customer,
        feature: &feature,
        amount,
        context: &ctx,
        at,
        holder: None,
    };
    let now = Timestamp::now();
    let store = MemoryStore::new();
    let decision = decide::in_memory(&snap, &store, Op::Check, &req, now)?;
    let body = serde_json::to_string_pretty(&decision)?;
    out!("{body}");
    if !json {
        let ex = engine::explain(&snap, &req, now);
        out!("\nas of {}:", at.unwrap_or(now));
        if ex.considered.is_empty() {
            out!("  no grant of `{feature}` on `{customer}`");
        }
        for g in &ex.considered {
            let mark = if g.won { "=>" } else { "  " };
            out!("{mark} {:<16} {} — {}", g.status, g.source, g.grant);
        }
        if let Some(rule) = ex.rule {
            out!("rule: {rule}");
        }
    }
    Ok(match decision.reason {
        _ if decision.allowed => ExitCode::SUCCESS,
        Reason::UnknownCustomer | Reason::UnknownFeature => ExitCode::from(3),
        _ => ExitCode::FAILURE,
    })
}
