//! `entitled customers export`: the customer records written through the API, as
//! NDJSON a policy directory can load (one record a line, ordered by id).
//!
//! Deleted ids (tombstones) have no line; their count goes to stderr, since a policy
//! file cannot say "this id is gone". Reading the journal changes nothing, so it is
//! safe while a server is writing to it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the API-written customer records as NDJSON (a policy file).
    Export {
        /// The state directory the server writes to.
        #[arg(long, env = "ENTITLED_STATE_DIR", default_value = "./state")]
        state_dir: PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Export { state_dir } => {
            let journal = entitled::live::journal_dir(&state_dir);
            let (records, tombstones) =
                entitled::live::exported(&state_dir).with_context(|| {
                    format!("reading the customer journal in {}", journal.display())
                })?;
            for r in &records {
                out!("{}", serde_json::to_string(r)?);
            }
            if tombstones > 0 {
                eprintln!(
                    "{tombstones} customer(s) deleted through the API are not in the export (a policy file cannot delete a record)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
