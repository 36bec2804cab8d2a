//! `entitled test DIR`: run the policy tests (`tests/*.yaml`) of a policy directory;
//! exit 1 on any failure, or when there is no test at all, 2 when the policy does not
//! load.

use std::process::ExitCode;

use anyhow::Context as _;

use super::PolicyDir;

#[derive(Debug, clap::Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct Args {
    #[command(flatten)]
    policies: PolicyDir,
}

pub fn run(Args { policies }: Args) -> anyhow::Result<ExitCode> {
    let Some(snap) = super::load(&policies) else {
        return Ok(super::no_answer());
    };
    let dir = &policies.dir;
    let report = entitled::test_runner::run_dir(dir, &snap)
        .with_context(|| format!("reading the tests of {}", dir.display()))?;
    for f in &report.failures {
        out!("FAIL {f}");
    }
    out!(
        "{} file(s), {} step(s), {} failure(s)",
        report.files,
        report.steps,
        report.failures.len()
    );
    Ok(if report.failures.is_empty() && report.files > 0 {
        ExitCode::SUCCESS
    } else {
        if report.files == 0 {
            eprintln!("no tests/*.yaml under {}", dir.display());
        }
        ExitCode::FAILURE
    })
}
