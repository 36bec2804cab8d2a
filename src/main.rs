//! The `entitled` command: parse the command line into a configuration, build, run.

use std::path::PathBuf;

/// jemalloc, built with transparent huge pages on (`.cargo/config.toml`): a
/// 1M-customer snapshot spans ~150 MB, and with 4 KiB pages nearly every customer
/// lookup also misses the TLB (measured here: 233 ns per random dependent load over
/// 256 MiB with glibc malloc, 156 ns with jemalloc and huge pages).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use entitled::engine::{self, Op, Request};
use entitled::policy::{self, Limits};
use entitled::time::Timestamp;
use entitled::usage::{self, MemoryStore};

#[derive(Debug, Parser)]
#[command(name = "entitled", version, about = "Entitlement decision sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and compile a policy directory; print every error with file:line:col.
    Validate {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Make one decision offline and explain it.
    Check {
        dir: PathBuf,
        #[arg(long)]
        customer: String,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { dir } => match policy::load_dir(&dir, &Limits::default()) {
            Ok(s) => {
                println!(
                    "ok: {} features, {} plans, {} customers, {} routes (snapshot {})",
                    s.features.len(),
                    s.plans().count(),
                    s.customers.len(),
                    s.routes.len(),
                    s.version
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                for d in &e.diagnostics {
                    eprintln!(
                        "{}: {}",
                        dir.join(&d.file).display().to_string().replace("/./", "/")
                            + &format!(":{}:{}", d.line, d.column),
                        d.message
                    );
                }
                eprintln!("{} error(s)", e.diagnostics.len());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Check {
            dir,
            customer,
            feature,
            at,
            context,
            amount,
            json,
        } => {
            let snap = match policy::load_dir(&dir, &Limits::default()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
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
            let decision = usage::decide(&snap, &store, Op::Check, &req, now)?;
            let body = serde_json::to_string_pretty(&decision)?;
            println!("{body}");
            if !json {
                let ex = engine::explain(&snap, &req, now);
                println!("\nas of {}:", at.unwrap_or(now));
                if ex.considered.is_empty() {
                    println!("  no grant of `{feature}` on `{customer}`");
                }
                for g in &ex.considered {
                    let mark = if g.won { "=>" } else { "  " };
                    println!("{mark} {:<16} {} — {}", g.status, g.source, g.grant);
                }
                if let Some(rule) = ex.rule {
                    println!("rule: {rule}");
                }
            }
            Ok(if decision.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
