//! The `entitled` command: parse the command line, then run the subcommand (`cli/`).

mod allocator;
mod cli;

use std::process::ExitCode;

use clap::Parser as _;

/// jemalloc, built with transparent huge pages on (`.cargo/config.toml`): a
/// 1M-customer snapshot spans ~150 MB, and with 4 KiB pages nearly every customer
/// lookup also misses the TLB (measured here: 233 ns per random dependent load over
/// 256 MiB with glibc malloc, 156 ns with jemalloc and huge pages). Its background
/// thread gives freed pages back on a timer: without it, pages are purged only when the
/// process allocates again, so an idle sidecar kept a large load's transient parse
/// memory for good (1M customers: 1,020 MB resident after 30 s idle, 148 MB with the
/// thread; `bash benches/customers_rss.sh`).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
