//! chat-server: what `chat-node` and `chat-router` are made of besides their own logic.
//!
//! - [`binary`]: the start-up of both binaries (config errors exit 64, logs, the open-file
//!   limit, the runtime, the listener, SIGTERM/SIGINT).
//! - [`telemetry`]: the tracing subscriber and the process-global Prometheus recorder.
//! - [`http`]: JSON answers and error bodies, the query string, health and metrics routes,
//!   and the accept loop with its graceful stop.
//! - [`head`] and [`origin`]: the first-request check before hyper sees a byte, and the
//!   `Origin` allow-list.
//! - [`membership`]: node registration, leases and the ring watch in Redis.
//!
//! Nothing here knows rooms, messages or routing. `common` stays free of all of it, so a
//! client links `common` without a server dependency.

pub mod binary;
pub mod head;
pub mod http;
pub mod membership;
pub mod origin;
pub mod telemetry;

pub use binary::{InvalidConfig, Server};
