//! `entitled validate DIR`: load and compile a policy directory; print every error
//! with file:line:col (what an editor or CI annotation jumps to).

use std::process::ExitCode;

use super::PolicyDir;

#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct Args {
    #[command(flatten)]
    policies: PolicyDir,
}

pub fn run(Args { policies }: Args) -> anyhow::Result<ExitCode> {
    match policies.load() {
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
                eprintln!("{}", policies.show(d));
            }
            eprintln!("{} error(s)", e.diagnostics.len());
            Ok(ExitCode::FAILURE)
        }
    }
}
