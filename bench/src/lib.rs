//! `chat-bench`: the load generator and report writer capacity planners run against a local
//! or production chat cluster.
//!
//! The binary only parses arguments and calls [`run`]. Each scenario is a module that
//! connects real WebSocket clients to the `--url` it is given and nowhere else, measures
//! what the cluster guarantees (delivery, order, isolation, acks) and how fast, and returns a
//! [`report::Report`] that is printed as Markdown and optionally written as JSON.

pub mod client;
pub mod fanout;
pub mod metrics_scrape;
pub mod payload;
pub mod report;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "chat-bench",
    version,
    about = "Load generator for the chat cluster"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Rooms × members connections; every member sends at a paced rate and receives its
    /// room's traffic. Reports loss, duplicates, order, acks and latency.
    Fanout(fanout::FanoutArgs),
}

/// How a run failed; `main` maps each kind to an exit status.
#[derive(Debug)]
pub enum BenchError {
    /// Bad arguments: exit status 64.
    Config(String),
    /// The run could not be carried out (e.g. too many connect failures): exit status 1.
    Failed(anyhow::Error),
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Config(m) => f.write_str(m),
            BenchError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

/// Runs the chosen scenario, prints its Markdown report on stdout and writes the files
/// asked for. `command` is the command line recorded in the report.
pub async fn run(cli: Cli, command: String) -> Result<(), BenchError> {
    match cli.command {
        Command::Fanout(args) => {
            let (json, markdown) = (args.json.clone(), args.markdown.clone());
            let report = fanout::run(args, command).await?;
            let md = report.to_markdown();
            println!("{md}");
            if let Some(path) = json {
                std::fs::write(&path, report.to_json() + "\n").map_err(|e| {
                    BenchError::Failed(anyhow::anyhow!("writing {}: {e}", path.display()))
                })?;
            }
            if let Some(path) = markdown {
                std::fs::write(&path, md).map_err(|e| {
                    BenchError::Failed(anyhow::anyhow!("writing {}: {e}", path.display()))
                })?;
            }
            Ok(())
        }
    }
}
