//! `entitled report …`: reports read offline — `expiring` over a policy directory
//! (as `GET /v1/expiring`), `usage` over a state directory's usage aggregation and a
//! policy directory (as `GET /v1/reports/usage`).

use std::process::ExitCode;

use anyhow::Context as _;

use entitled::engine;
use entitled::time::Timestamp;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Subscriptions, grants and overrides ending soon, soonest first.
    #[command(after_help = super::EXIT_CODES)]
    Expiring {
        #[command(flatten)]
        policies: super::PolicyDir,
        /// How far ahead (`90d`, `2w`, `36h`).
        #[arg(long, default_value = "90d")]
        within: String,
        /// As of this time (RFC 3339 or a date); default now.
        #[arg(long)]
        at: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Limits hit (upsell candidates), entitlements granted but unused, overrides by
    /// feature and approver, denials by reason: from the usage aggregation a server
    /// keeps in its state directory, joined with the policy directory.
    #[command(after_help = super::EXIT_CODES)]
    Usage {
        #[command(flatten)]
        policies: super::PolicyDir,
        /// The state directory of the server (`serve --state-dir`).
        #[arg(long, default_value = "./state")]
        state_dir: std::path::PathBuf,
        /// From this day (RFC 3339 or a date); all the days kept without it.
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339 or a date): whose grants count as granted; default now.
        #[arg(long)]
        at: Option<String>,
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let (policies, within, at, json) = match command {
        Command::Expiring {
            policies,
            within,
            at,
            json,
        } => (policies, within, at, json),
        Command::Usage {
            policies,
            state_dir,
            since,
            at,
            json,
        } => return usage(&policies, &state_dir, since, at, json),
    };
    let us = entitled::policy::units::parse_duration(&within)
        .map_err(anyhow::Error::msg)
        .context("--within")?;
    let now = at
        .map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
        .transpose()
        .context("--at")?
        .unwrap_or_else(Timestamp::now);
    let Some(snap) = super::load(&policies) else {
        return Ok(super::no_answer());
    };
    let items = engine::report::expiring(&snap, now, us);
    if json {
        let doc = serde_json::json!({ "now": now, "within": within, "snapshot": &*snap.version, "items": items });
        out!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        out!(
            "{:<24} {:<13} {:<24} {:<21} {:>9}",
            "CUSTOMER",
            "TYPE",
            "PLAN / FEATURE",
            "ENDS",
            "DAYS LEFT"
        );
        for i in &items {
            let what = i.plan.or(i.feature).unwrap_or("-");
            let trial = if i.trial { " (trial)" } else { "" };
            out!(
                "{:<24} {:<13} {:<24} {:<21} {:>9}",
                i.customer,
                i.kind,
                format!("{what}{trial}"),
                i.ends.to_string(),
                i.days_left
            );
        }
        out!("{} ending within {within} of {now}", items.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn usage(
    policies: &super::PolicyDir,
    state_dir: &std::path::Path,
    since: Option<String>,
    at: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let parse = |s: Option<String>, flag: &'static str| {
        s.map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
            .transpose()
            .context(flag)
    };
    let since = parse(since, "--since")?;
    let until = parse(at, "--at")?.unwrap_or_else(Timestamp::now);
    let path = state_dir.join(entitled::insights::FILE);
    let agg = match entitled::insights::Aggregate::load(&path) {
        Ok(Some(a)) => a,
        Ok(None) => {
            eprintln!(
                "{}: no usage aggregation (a server with --state-dir {} writes it every 30 s and at stop)",
                path.display(),
                state_dir.display()
            );
            return Ok(super::no_answer());
        }
        Err(e) => {
            eprintln!("{e}");
            return Ok(super::no_answer());
        }
    };
    let Some(snap) = super::load(policies) else {
        return Ok(super::no_answer());
    };
    let r = entitled::insights::build(
        &agg.totals(since),
        &agg.denials(since),
        Some(&snap),
        since,
        until,
    );
    if json {
        out!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    let plan = |p: &Option<String>| p.clone().unwrap_or_else(|| "-".into());
    let from = since.map_or_else(
        || {
            agg.first_day()
                .map_or("the first day kept".into(), |t| t.to_string())
        },
        |t| t.to_string(),
    );
    out!("Usage from {from} to {until}\n");
    out!("LIMITS HIT (upsell candidates)");
    out!(
        "{:<28} {:<16} {:>9} {:>10}",
        "FEATURE",
        "PLAN",
        "DENIALS",
        "CUSTOMERS"
    );
    for l in &r.limits_hit {
        out!(
            "{:<28} {:<16} {:>9} {:>10}",
            l.feature,
            plan(&l.plan),
            l.denials,
            l.customers
        );
    }
    out!("\nGRANTED BUT UNUSED");
    out!(
        "{:<28} {:<16} {:>9} {:>7} {:>7}",
        "FEATURE",
        "PLAN",
        "GRANTED",
        "USING",
        "UNUSED"
    );
    for u in &r.unused {
        out!(
            "{:<28} {:<16} {:>9} {:>7} {:>7}",
            u.feature,
            plan(&u.plan),
            u.customers_granted,
            u.customers_using,
            u.customers_granted - u.customers_using
        );
    }
    out!("\nOVERRIDES");
    out!("{:<28} {:<28} {:>6}", "FEATURE", "APPROVED BY", "COUNT");
    for o in &r.overrides {
        out!("{:<28} {:<28} {:>6}", o.feature, o.approved_by, o.count);
    }
    out!("\nDENIALS");
    out!("{:<28} {:>9}", "REASON", "COUNT");
    for d in &r.denials {
        out!("{:<28} {:>9}", d.reason, d.count);
    }
    Ok(ExitCode::SUCCESS)
}
