//! `entitled usage …`: read the usage ledger of a state directory, from a running or
//! stopped sidecar, for a billing system.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use entitled::time::Timestamp;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print usage events (CloudEvents, one JSON object per line), oldest first: for
    /// OpenMeter, Lago or a billing job.
    Export {
        /// The state directory of a (running or stopped) `entitled serve`.
        #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
        state_dir: PathBuf,
        /// Only events at or after this time (RFC 3339 or a date).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this time.
        #[arg(long)]
        until: Option<String>,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let Command::Export {
        state_dir,
        since,
        until,
    } = command;
    let time = |s: Option<String>, flag: &str| {
        s.map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
            .transpose()
            .with_context(|| flag.to_string())
    };
    let since = time(since, "--since")?;
    let until = time(until, "--until")?;
    let dir = state_dir.join("ledger");
    if !dir.is_dir() {
        anyhow::bail!("{}: no usage ledger here", dir.display());
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    entitled::usage::durable::ledger::export(&dir, since, until, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(ExitCode::SUCCESS)
}
