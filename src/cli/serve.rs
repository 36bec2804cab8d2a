//! `entitled serve`: the process around a [`Sidecar`]. What is process-wide is set
//! up here: the log subscriber, the Prometheus recorder, the TLS crypto provider,
//! the open-files limit, the tokio runtime, the signal handlers (SIGTERM and SIGINT
//! stop, SIGHUP confirms a held policy load) and the address lines
//! on stdout.

use std::process::ExitCode;

use anyhow::Context as _;

use entitled::sidecar::{ServeArgs, Sidecar};

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let prometheus = entitled::metrics::install().context("installing the metrics recorder")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("entitled-worker");
    if let Some(n) = args.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("starting the runtime")?;
    let mut config = args.into_config()?;
    config.prometheus = Some(prometheus);
    fit_connections_to_open_files(&mut config.limits.max_connections);
    if config.store.is_some() {
        // rustls is built with ring only: make it the process's provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    rt.block_on(async {
        let sidecar = Sidecar::start(config).await?;
        crate::allocator::give_back_start_up_memory();
        let stop = shutdown_signal()?;
        confirm_on_hangup(sidecar.reload_state())?;
        // Plain lines on stdout, for scripts and tests that start us on port 0.
        out!("entitled: listening on http://{}", sidecar.addr());
        if let Some(a) = sidecar.metrics_addr() {
            out!("entitled: metrics on http://{a}");
        }
        if let Some(a) = sidecar.grpc_addr() {
            out!("entitled: grpc on http://{a}");
        }
        sidecar.serve(stop).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// File descriptors kept for everything but connections: the state directory's
/// journal, ledger and checkpoint files, policy files, the audit and notice logs, Redis.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-files limit to the hard one (the default soft limit, 1024 on
/// most systems, is far below what `--max-connections` allows on two ports), says so,
/// and caps connections so that a flood of them can never take the descriptors the
/// state directory needs: a journal that cannot open its next segment stops counting.
fn fit_connections_to_open_files(max_connections: &mut usize) {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open files limit");
            return;
        }
    };
    if let Ok(before) = before
        && before < limit
    {
        tracing::info!(from = before, to = limit, "raised the open files limit");
    }
    // Two ports (HTTP and gRPC) each hold up to `max_connections`.
    let room = (limit.saturating_sub(FD_RESERVE) / 2).max(1);
    if (*max_connections as u64) > room {
        tracing::warn!(
            max_connections = *max_connections,
            open_files_limit = limit,
            capped_to = room,
            "--max-connections on two ports would leave too few file descriptors for the state directory: connections capped"
        );
        *max_connections = usize::try_from(room).unwrap_or(usize::MAX);
    }
}

/// SIGHUP is the operator's confirmation of a held policy load (one that removes most
/// customers): the directory is loaded again and served whatever it removes.
fn confirm_on_hangup(reload: std::sync::Arc<entitled::reload::ReloadState>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP: loading the policy directory, serving it even if it removes most customers"
            );
            reload.confirm();
        }
    });
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now (before the address is announced, so
/// a stop sent the moment we are up is graceful) and returns the wait for either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
