//! The command line: one subcommand per file. The subcommands that read a policy
//! directory or a state directory run here and exit; `serve` starts a
//! [`entitled::sidecar::Sidecar`]. `anyhow` lives in this binary only.

/// `println!` that never panics: a reader that went away (`| head`) is not an error
/// worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod check;
mod report;
mod serve;
mod test;
mod usage;
mod validate;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use entitled::policy::{self, Limits, Snapshot};
use entitled::sidecar::ServeArgs;

#[derive(Debug, Parser)]
#[command(name = "entitled", version, about = "Entitlement decision sidecar")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve decisions over HTTP from the policy directory, reloading it on change.
    Serve(Box<ServeArgs>),
    /// Load and compile a policy directory; print every error with file:line:col.
    Validate(validate::Args),
    /// Make one decision offline and explain it.
    Check(check::Args),
    /// Run the policy tests (`tests/*.yaml`) of a policy directory; exit 1 on failure.
    Test(test::Args),
    /// Reports over a policy directory.
    Report {
        #[command(subcommand)]
        command: report::Command,
    },
    /// Read the usage ledger of a state directory.
    Usage {
        #[command(subcommand)]
        command: usage::Command,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Test(args) => test::run(args),
        Command::Report { command } => report::run(command),
        Command::Usage { command } => usage::run(command),
        Command::Validate(args) => validate::run(args),
        Command::Check(args) => check::run(args),
    }
}

/// The compiled policy directory, or `None` once its errors are printed.
fn load(dir: &Path) -> Option<Snapshot> {
    match policy::load_dir(dir, &Limits::default()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}
