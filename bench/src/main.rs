//! `chat-bench` binary: parses the command line and hands it to [`chat_bench::run`].
//!
//! Exit status: 0 when the run completed (losses are results, reported, not failures), 64
//! for bad arguments, 1 when the run could not be carried out (e.g. more connect failures
//! than `--max-connect-failures`) or, for `seed-suite`, when any of its tests failed.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match chat_bench::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; bad arguments exit 64 like
            // a failed validation.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = chat_bench::report::command_line(std::env::args());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(chat_bench::run(cli, command));
    // A run that ended early (e.g. `rebalance` interrupted) may leave a blocking task behind,
    // such as a `--command` still running; do not wait for it past a moment.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: {e}");
            match e {
                chat_bench::BenchError::Config(_) => ExitCode::from(64),
                chat_bench::BenchError::Failed(_) => ExitCode::from(1),
            }
        }
    }
}
