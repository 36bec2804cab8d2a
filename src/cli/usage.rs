//! `entitled usage …`: read the usage ledger of a state directory, from a running or
//! stopped sidecar, for a billing system, and acknowledge what it has ingested.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use entitled::time::Timestamp;
use entitled::usage::durable::{archive, ledger};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print usage events (CloudEvents, one JSON object per line), oldest first: for
    /// OpenMeter, Lago or a billing job. The last position printed goes to stderr.
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
        /// Only events after this position (an event `id`): what was not ingested yet.
        #[arg(long)]
        after: Option<u64>,
    },
    /// Record that billing has ingested every event up to POSITION (an event `id`):
    /// ledger segments wholly at or before it are deleted by the sidecar.
    Ack {
        #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
        state_dir: PathBuf,
        /// The `id` of the last event ingested.
        position: u64,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Export {
            state_dir,
            since,
            until,
            after,
        } => export(&state_dir, since, until, after),
        Command::Ack {
            state_dir,
            position,
        } => ack(&state_dir, position),
    }
}

fn ledger_dir(state_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = state_dir.join("ledger");
    if !dir.is_dir() {
        anyhow::bail!("{}: no usage ledger here", dir.display());
    }
    Ok(dir)
}

fn export(
    state_dir: &Path,
    since: Option<String>,
    until: Option<String>,
    after: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let time = |s: Option<String>, flag: &str| {
        s.map(|s| Timestamp::parse(&s).map_err(anyhow::Error::msg))
            .transpose()
            .with_context(|| flag.to_string())
    };
    let filter = ledger::Filter {
        since: time(since, "--since")?,
        until: time(until, "--until")?,
        after,
    };
    let dir = ledger_dir(state_dir)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let done = ledger::export(&dir, filter, &mut out)?;
    std::io::Write::flush(&mut out)?;
    match done.last_position {
        Some(p) => eprintln!(
            "{} events; last position {p} (once ingested: entitled usage ack {p})",
            done.events
        ),
        None => eprintln!("0 events"),
    }
    Ok(ExitCode::SUCCESS)
}

fn ack(state_dir: &Path, position: u64) -> anyhow::Result<ExitCode> {
    let dir = ledger_dir(state_dir)?;
    let last = ledger::last_position(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .unwrap_or(0);
    if position > last {
        anyhow::bail!(
            "position {position} is past the ledger's last event ({last}): acknowledge only what was exported"
        );
    }
    let now = archive::acknowledge(&dir, position)
        .with_context(|| format!("recording the position in {}", dir.display()))?;
    if now > position {
        eprintln!("position {now} was already acknowledged; it stays");
    } else {
        eprintln!("acknowledged up to {now}");
    }
    Ok(ExitCode::SUCCESS)
}
