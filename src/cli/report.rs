//! `entitled report …`: reports over a policy directory, read offline (the same
//! answers the running sidecar gives under `/v1/reports`).

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
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let Command::Expiring {
        policies,
        within,
        at,
        json,
    } = command;
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
