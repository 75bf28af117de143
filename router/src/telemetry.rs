//! What the router counts: the description of every router metric, the series alerts read
//! (created at zero at start-up), and the RAII guard that counts live splices. The
//! recorder itself (process-global) is `chat_server::telemetry`.

use common::metrics as m;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Describes the router's metrics and creates the series that must exist from start-up.
pub fn describe_all() {
    describe();
    register_zeroes();
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
