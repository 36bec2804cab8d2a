//! `entitled portal-token`: mints a customer portal token offline, with the key the
//! server reads from `--portal-key-file`. The token names one customer and expires
//! after `--ttl`; anyone holding it sees that customer's portal page until then.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use entitled::portal::{self, Key};
use entitled::time::Timestamp;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The customer the token shows (and the only one it shows).
    #[arg(long)]
    customer: String,
    /// How long the token works (`24h`, `7d`; at most 366d).
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// The key file the server was given (`serve --portal-key-file`).
    #[arg(long, env = "ENTITLED_PORTAL_KEY_FILE")]
    key_file: PathBuf,
    /// Count the lifetime from this instant (RFC 3339) instead of now: for a server
    /// running with `--test-clock`.
    #[arg(long)]
    from: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.customer.is_empty() {
        anyhow::bail!("--customer: a customer id is not empty");
    }
    let ttl = entitled::policy::units::parse_duration(&args.ttl)
        .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let from = match &args.from {
        Some(t) => Timestamp::parse(t).map_err(|e| anyhow::anyhow!("--from: {e}"))?,
        None => Timestamp::now(),
    };
    let expires = portal::expiry(from, ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    let key = Key::from_file(&args.key_file).context("reading the portal key")?;
    out!("{}", key.mint_portal(&args.customer, expires));
    eprintln!(
        "portal token for `{}`, valid until {expires}: open /portal?token=<token>",
        args.customer
    );
    Ok(ExitCode::SUCCESS)
}
