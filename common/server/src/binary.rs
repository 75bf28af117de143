//! The start-up both binaries share: parse the config, set up logs, raise the open-file
//! limit, bind, and serve until SIGTERM or SIGINT.
//!
//! A config clap refuses, or one [`Server::check`] refuses, exits 64 (`EX_USAGE`) with one
//! line on stderr; a failure while serving exits 1 with its whole error chain. Tests skip
//! this and call each crate's `run` on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{self, LogFormat};

/// Exit status for a bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// A configuration that parsed but cannot run; the message names the flag.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

/// The flags every server takes the same way, flattened into each one's config.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerFlags {
    /// Length of the listening socket's accept queue. Connections the process has not
    /// accepted yet wait there; when it is full the kernel drops new SYNs and each client
    /// retries after 1 s, then 3 s (a reconnect storm's latency tail). The kernel caps it
    /// at net.core.somaxconn.
    #[arg(long, env = "CHAT_LISTEN_BACKLOG", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub listen_backlog: u32,
    /// Log format.
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A server binary: its config and what it serves on its listener.
pub trait Server: clap::Parser + Sized {
    /// The binary's name, which starts its lines on stderr.
    const NAME: &'static str;
    /// Checks what clap cannot (ranges, formats, readable key files).
    fn check(&self) -> Result<(), InvalidConfig>;
    /// The address to listen on.
    fn listen(&self) -> SocketAddr;
    fn flags(&self) -> &ServerFlags;
    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>>;
}

/// The whole of a server's `main`.
pub fn main<S: Server>() -> ExitCode {
    let name = S::NAME;
    let config = match S::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let msg = e.to_string();
            eprintln!(
                "{name}: {}",
                msg.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = config.check() {
        eprintln!("{name}: invalid config: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    telemetry::init_logging(config.flags().log_format);
    // Each WebSocket holds a file descriptor (two on a router): use the whole hard limit,
    // not the soft default.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<S: Server>(config: S) -> anyhow::Result<()> {
    let (addr, backlog) = (config.listen(), config.flags().listen_backlog);
    let listener = listen(addr, backlog).with_context(|| format!("cannot listen on {addr}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    config.serve(listener, shutdown).await
}

/// Binds with `SO_REUSEADDR` (a restarted process gets its port back while old
/// connections linger in TIME_WAIT) and an accept queue of `backlog`.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
