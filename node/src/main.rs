//! The `chat-node` binary: parse config, set up logs, bind, run until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use chat_node::config::Config;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let msg = e.to_string();
            eprintln!(
                "chat-node: {}",
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
    if let Err(msg) = config.validate() {
        eprintln!("chat-node: invalid config: {msg}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Key files are part of the config: an unreadable one is a config error too.
    if let Err(e) = chat_node::auth::Authenticator::from_config(&config) {
        eprintln!("chat-node: invalid config: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    chat_node::telemetry::init_logging(&config);
    // Each WebSocket is a file descriptor: use the whole hard limit, not the soft default.
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
            eprintln!("chat-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "chat-node failed");
            eprintln!("chat-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = listen(config.listen, config.listen_backlog)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    chat_node::run(config, listener, shutdown).await
}

/// Binds with `SO_REUSEADDR` (a restarted process gets its port back while old
/// connections linger in TIME_WAIT) and an accept queue of `backlog`.
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
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
