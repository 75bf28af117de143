//! Logs and metrics: the tracing subscriber, the Prometheus recorder and the process
//! collector (CPU, RSS, open files), plus the RAII guard that counts live splices.
//!
//! The recorder is process-global (the `metrics` facade allows one), installed once and
//! rendered by the router's own `/metrics` route; no listener of the exporter's is started.
//! Nothing here decides what to count: the proxy and the routes do.

use std::sync::OnceLock;
use std::time::Duration;

use common::metrics as m;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat};

/// Histogram buckets for every `_seconds` metric: 100 µs to 10 s, as on the nodes.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let recorder = match PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        {
            Ok(b) => b.build_recorder(),
            // Only reachable with an empty bucket list, which the constant is not.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (an embedding program's);
        // then our route renders an empty page rather than crashing the router.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        register_zeroes();
        Metrics { handle, process }
    })
}

/// Installs the recorder if needed and keeps histograms' upkeep running until `shutdown`.
pub fn start(shutdown: CancellationToken) {
    let handle = metrics().handle.clone();
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

pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Counts one live WebSocket splice for as long as it is held.
pub struct SpliceGuard(());

impl SpliceGuard {
    pub fn open() -> SpliceGuard {
        metrics::gauge!(m::ROUTER_WS_CONNECTIONS).increment(1.0);
        metrics::counter!(m::ROUTER_WS_CONNECTIONS_OPENED).increment(1);
        SpliceGuard(())
    }
}

impl Drop for SpliceGuard {
    fn drop(&mut self) {
        metrics::gauge!(m::ROUTER_WS_CONNECTIONS).decrement(1.0);
    }
}

fn describe() {
    describe_gauge!(
        m::ROUTER_WS_CONNECTIONS,
        "WebSocket connections being spliced to a node."
    );
    describe_counter!(
        m::ROUTER_WS_CONNECTIONS_OPENED,
        "WebSocket upgrades accepted by an owner and spliced."
    );
    describe_counter!(
        m::ROUTER_HTTP_REQUESTS,
        "Requests answered, by route and status class."
    );
    describe_histogram!(
        m::ROUTER_REQUEST_SECONDS,
        Unit::Seconds,
        "Arrival to response head, by route."
    );
    describe_counter!(
        m::ROUTER_PROXIED_BYTES,
        Unit::Bytes,
        "Bytes copied through WebSocket splices, by direction."
    );
    describe_counter!(
        m::ROUTER_UPSTREAM_ERRORS,
        "Failed exchanges with an owner node, by kind."
    );
    describe_gauge!(m::ROUTER_RING_NODES, "Live nodes in this router's ring.");
    describe_gauge!(
        m::ROUTER_RING_VERSION,
        "The ring's version digest as a float; equal on routers that agree."
    );
    describe_counter!(m::ROUTER_RING_CHANGES, "Ring changes this router has seen.");
    describe_gauge!(m::ROUTER_READY, "1 when /readyz answers 200.");
}

/// Creates, at zero, the series alerts read that would otherwise only appear with their
/// first event (`rate()` needs two samples to see an increase; see the node's twin).
fn register_zeroes() {
    metrics::counter!(m::ROUTER_RING_CHANGES).increment(0);
    for kind in ["connect", "timeout", "protocol"] {
        metrics::counter!(m::ROUTER_UPSTREAM_ERRORS, "kind" => kind).increment(0);
    }
}
