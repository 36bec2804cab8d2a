//! `entitled validate DIR`: load and compile a policy directory; print every error
//! with file:line:col (what an editor or CI annotation jumps to).

use std::path::PathBuf;
use std::process::ExitCode;

use entitled::policy::{self, Limits};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy directory.
    dir: PathBuf,
}

pub fn run(Args { dir }: Args) -> anyhow::Result<ExitCode> {
    match policy::load_dir(&dir, &Limits::default()) {
        Ok(s) => {
            out!(
                "ok: {} features, {} plans, {} customers, {} routes (snapshot {})",
                s.catalog.features.len(),
                s.plans().count(),
                s.customers.len(),
                s.catalog.routes.len(),
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
    }
}
