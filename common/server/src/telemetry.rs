//! Logs and the metrics recorder: the tracing subscriber, the Prometheus recorder and the
//! process collector (CPU, RSS, open files).
//!
//! The recorder is process-global (the `metrics` facade allows one), so it is installed
//! once and shared by every server in the process; in-process tests that start several
//! nodes (or a node and a router) see their sums. Each binary describes its own metrics
//! through [`start`]. Rendering happens in the servers' own `/metrics` route; no listener
//! of the exporter's is started.

use std::sync::OnceLock;
use std::time::Duration;

use clap::ValueEnum;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Histogram buckets for every `_seconds` metric: 100 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const RATIO_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 0.75, 0.9, 1.0];
/// For counts of items per batch (`_items`).
const ITEMS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0];

struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_ratio".into()), RATIO_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_items".into()), ITEMS_BUCKETS)
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            // Only reachable with an empty bucket list, which the constants are not.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (an embedding program's);
        // then our route renders an empty page rather than crashing the server.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        let process = metrics_process::Collector::default();
        process.describe();
        Metrics { handle, process }
    })
}

/// Installs the recorder if needed, runs `describe` (the binary's descriptions and the
/// series it creates at zero), and keeps histograms' upkeep running until `shutdown`.
pub fn start(describe: fn(), shutdown: CancellationToken) {
    let handle = metrics().handle.clone();
    describe();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    });
}

/// The Prometheus text exposition of every metric, process metrics refreshed first.
pub fn render() -> String {
    let m = metrics();
    m.process.collect();
    m.handle.render()
}

/// Logs to stdout, filtered by `CHAT_LOG` (default `info`), colored on a terminal.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
