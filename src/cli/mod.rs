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
mod customers;
mod portal;
mod report;
mod serve;
mod test;
mod usage;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use entitled::policy::{self, Diagnostic, Limits, LoadError, Snapshot};
use entitled::sidecar::ServeArgs;

/// Exit codes of the offline subcommands: 0 the answer is yes, 1 it is no, 2 there is
/// no answer (a wrong command line, or a policy directory that does not load), 3 the
/// question names a customer or feature the policy does not have (`check`).
const EXIT_CODES: &str = "Exit codes: 0 yes (valid, allowed, all tests pass); 1 no (validate: the policy has errors; check: denied; test: a test failed or there is none); 2 no answer (a wrong command line, or for check, test and report a policy directory that does not load); 3 check only: the customer or feature is not in the policy.";

/// See [`EXIT_CODES`].
fn no_answer() -> ExitCode {
    ExitCode::from(2)
}

/// The policy directory argument the offline subcommands share, defaulting as
/// `serve --policies` does.
#[derive(Debug, clap::Args)]
pub struct PolicyDir {
    /// The policy directory.
    #[arg(
        value_name = "DIR",
        env = "ENTITLED_POLICIES",
        default_value = "./policies"
    )]
    dir: PathBuf,
    /// Accept a policy directory that defines no features (by default it is refused:
    /// an empty or mistyped directory would deny everything).
    #[arg(long)]
    allow_empty: bool,
}

impl PolicyDir {
    /// Loads and compiles the directory (refusing one without features unless
    /// `--allow-empty`).
    fn load(&self) -> Result<Snapshot, LoadError> {
        let snap = policy::load_dir(&self.dir, &Limits::default())?;
        if !self.allow_empty {
            policy::require_features(&self.dir, &snap)?;
        }
        Ok(snap)
    }

    /// A diagnostic as the user named the directory: `DIR/file:line:col: message`
    /// (a path-level one names the path only).
    fn show(&self, d: &Diagnostic) -> String {
        let file = if d.file.starts_with(&self.dir) {
            d.file.clone()
        } else {
            self.dir.join(&d.file)
        };
        d.display_as(&file).replace("/./", "/")
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "entitled",
    version,
    about = "Entitlement decision sidecar",
    after_help = EXIT_CODES
)]
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
    /// Customer records written through the API (in a state directory).
    Customers {
        #[command(subcommand)]
        command: customers::Command,
    },
    /// Mint a customer portal token (`/portal?token=…`) with the server's portal key.
    PortalToken(portal::Args),
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
        Command::Customers { command } => customers::run(command),
        Command::Validate(args) => validate::run(args),
        Command::Check(args) => check::run(args),
        Command::PortalToken(args) => portal::run(args),
    }
}

/// The compiled policy directory, or `None` once its errors are printed.
fn load(dir: &PolicyDir) -> Option<Snapshot> {
    match dir.load() {
        Ok(s) => Some(s),
        Err(e) => {
            for d in &e.diagnostics {
                eprintln!("{}", dir.show(d));
            }
            None
        }
    }
}
