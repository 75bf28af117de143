//! `chat-bench`: the load generator and report writer capacity planners run against a local
//! or production chat cluster.
//!
//! The binary only parses arguments and calls [`run`]. Each scenario is a module that
//! connects real WebSocket clients to the `--url` it is given (`cross-shard` also to the
//! nodes that URL's router names) and nowhere else, measures what the cluster guarantees
//! (delivery, order, isolation, acks) and how fast, and returns a [`report::Report`] that
//! is printed as Markdown and optionally written as JSON.

pub mod args;
pub mod auth;
pub mod baseline;
pub mod chart;
pub mod churn;
pub mod client;
pub mod cluster_cost;
pub mod connections;
pub mod cross_shard;
pub mod fanout;
pub mod harness;
pub mod history;
pub mod http;
pub mod idle;
pub mod latency;
pub mod machine;
pub mod markdown;
pub mod metrics_scrape;
pub mod owner;
pub mod payload;
pub mod rebalance;
pub mod report;
pub mod seed;
pub mod servers;
pub mod timeline;
pub mod webhook_sink;
pub mod workers;

use std::path::PathBuf;

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
    /// The three load tests the earlier chat backends passed, in turn, each with a PASS/FAIL verdict and its
    /// evidence: (a) 100 clients × 10 msg/s in one room, nothing lost, duplicated or out of
    /// order and every send acked; (b) 10 rooms × 50 clients, isolated and lossless; (c) one
    /// slow client among 100, closed with 4000 while the other 99 receive everything.
    /// Exit status 0 when all pass, 1 otherwise.
    SeedSuite(seed::SeedSuiteArgs),
    /// The ceiling reference: a bare fastwebsockets broadcast server (no auth, ids beyond a
    /// counter, storage or cluster) that `fanout` drives unchanged; a node's figures can be
    /// read as a fraction of it. Stops on Ctrl-C or after --max-seconds.
    Baseline(baseline::BaselineArgs),
    /// Ramp to N concurrent connections at a given rate, hold them, close them: connect
    /// latency, the connect rate reached, failures by kind, server memory per connection.
    /// Spreads over several processes (--processes) and loopback source addresses
    /// (--source-addresses) to get past one process's open files and one address's ports.
    /// Exit status 1 when more connections failed than --max-connect-failures.
    Connections(connections::ConnectionsArgs),
    /// A connect/disconnect storm: C connections, each living a seeded random lifetime and
    /// reconnecting (join, optionally one acked send), at a target churn rate for a fixed
    /// duration. Reports connects/s and disconnects/s, connect latency, join failures,
    /// close and error codes, acks, and server CPU/RSS before, during and after.
    Churn(churn::ChurnArgs),
    /// A `connections` load generator process (started by the parent; reads its plan on
    /// stdin, writes JSON lines on stdout).
    #[command(name = "__worker", hide = true)]
    Worker,
    /// Rooms × members through a router that resume (reconnect, rejoin with `since`, resend
    /// unacked sends with the same cid; also when a socket goes silent, --dead-after) while
    /// `--command` changes the cluster or the bench pauses a process (--pause-pid) or cuts
    /// the network (--cut-command) mid-run; then reads every room back (history API, and the
    /// CQL store with --cql-nodes) and judges by the store. Exit status 1 when the store shows an acked
    /// message lost, a cid stored twice, or a member's stream with a gap, out of order or
    /// holding an id never stored, or when the store could not be read.
    Rebalance(rebalance::RebalanceArgs),
    /// The read path: seeds rooms over the HTTP API, then concurrent readers page through
    /// each room's history (newest-first with `before=`, oldest-first with `after=`) for a
    /// fixed time. Reports pages/s, page latency, errors by status, and checks every full
    /// walk returns exactly the seeded ids in order.
    History(history::HistoryArgs),
    /// Cross-node traffic through a router: `fanout --bridge`, with members that are local
    /// to the room's owner and members bridged through Redis reported separately (decided
    /// from the router's `/v1/rooms/{room}/owner`); optionally HTTP publishes forwarded by
    /// a non-owner node (`--http-publishers`).
    CrossShard(cross_shard::CrossShardArgs),
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
/// asked for ([`harness::emit`]). `command` is the command line recorded in the report.
pub async fn run(cli: Cli, command: String) -> Result<(), BenchError> {
    use harness::{emit, Outputs};
    let out =
        |json: &Option<PathBuf>, markdown: &Option<PathBuf>, chart: &Option<PathBuf>| Outputs {
            json: json.clone(),
            markdown: markdown.clone(),
            chart: chart.clone(),
        };
    match cli.command {
        Command::Fanout(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&fanout::run(a, command).await?, o)
        }
        Command::SeedSuite(a) => {
            let o = out(&a.json, &a.markdown, &None);
            emit(&seed::run(a, command).await?, o)
        }
        Command::Baseline(a) => baseline::run(a).await,
        Command::Connections(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&connections::run(a, command).await?, o)
        }
        Command::Churn(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&churn::run(a, command).await?, o)
        }
        Command::Worker => connections::run_worker().await,
        Command::CrossShard(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&cross_shard::run(a, command).await?, o)
        }
        Command::History(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&history::run(a, command).await?, o)
        }
        Command::Rebalance(a) => {
            let o = out(&a.json, &a.markdown, &a.chart);
            emit(&rebalance::run(a, command).await?, o)
        }
    }
}
