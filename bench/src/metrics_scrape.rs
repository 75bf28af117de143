//! Reads the server's own view of a run: one `GET /metrics` (Prometheus text format) on the
//! bench target's host and port, and the few process numbers the report shows.
//!
//! `process_cpu_seconds_total` and `process_resident_memory_bytes` are the names the
//! `metrics-process` crate exports. A missing endpoint or metric is reported as "n/a", never
//! as an error: the bench result stands without them. One request, bounded in time and size.

use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::client::Target;

pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
const MAX_BODY: usize = 16 << 20;

/// The server's process numbers at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServerSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
}

impl ServerSample {
    pub fn from_text(text: &str) -> Self {
        ServerSample {
            cpu_seconds: metric_value(text, CPU_SECONDS),
            resident_bytes: metric_value(text, RESIDENT_BYTES),
        }
    }
}

/// The value of the first sample named exactly `name` (any labels), if present and numeric.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    samples(text, name).next()
}

/// The sum of every numeric sample named exactly `name` (all label sets), or `None` when
/// there is none: a counter split by labels, counted whole.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    samples(text, name).fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
}

/// The values of the samples named exactly `name` (any labels), in order.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter_map(move |line| sample_value(line, name))
}

fn sample_value(line: &str, name: &str) -> Option<f64> {
    let line = line.trim_start();
    let rest = line.strip_prefix(name)?;
    let rest = if let Some(labelled) = rest.strip_prefix('{') {
        // Label values are quoted and may contain '}'; skip to the closing brace outside
        // quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let end = labelled.char_indices().find_map(|(i, c)| {
            match (in_quotes, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (_, false, '"') => in_quotes = !in_quotes,
                (false, _, '}') => return Some(i),
                _ => {}
            }
            None
        })?;
        &labelled[end + 1..]
    } else if rest.starts_with(char::is_whitespace) {
        rest
    } else {
        // A longer name that merely starts with `name`.
        return None;
    };
    rest.split_whitespace().next()?.parse().ok()
}

/// Fetches `http://<target>/metrics` within `timeout`.
pub async fn fetch(target: &Target, timeout: Duration) -> anyhow::Result<String> {
    tokio::time::timeout(timeout, fetch_inner(target))
        .await
        .map_err(|_| anyhow!("GET /metrics timed out"))?
}

async fn fetch_inner(target: &Target) -> anyhow::Result<String> {
    let stream = TcpStream::connect(target.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The driver ends when the response is read and `sender` is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method("GET")
        .uri("/metrics")
        .header(HOST, &target.authority)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("GET /metrics answered {}", resp.status());
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("reading /metrics: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Fetches and parses; any failure becomes an empty sample (reported as "n/a").
pub async fn sample(target: &Target, timeout: Duration) -> (ServerSample, Option<String>) {
    match fetch(target, timeout).await {
        Ok(text) => (ServerSample::from_text(&text), None),
        Err(e) => (ServerSample::default(), Some(e.to_string())),
    }
}

/// Server CPU as percent of one core between two samples taken `wall_s` apart.
pub fn cpu_percent(before: &ServerSample, after: &ServerSample, wall_s: f64) -> Option<f64> {
    let (b, a) = (before.cpu_seconds?, after.cpu_seconds?);
    (wall_s > 0.0 && a >= b).then(|| (a - b) / wall_s * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
process_cpu_seconds_total_extra 99
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.2345e7
chat_node_connections{node=\"a}b\",x=\"q\\\"}\"} 42 1700000000000
chat_node_bad_input_total{kind=\"bad_json\"} NaN
";

    #[test]
    fn parses_plain_and_labelled_samples() {
        assert_eq!(metric_value(TEXT, CPU_SECONDS), Some(12.5));
        assert_eq!(metric_value(TEXT, RESIDENT_BYTES), Some(12_345_000.0));
        assert_eq!(metric_value(TEXT, "chat_node_connections"), Some(42.0));
        assert!(metric_value(TEXT, "chat_node_bad_input_total").is_some_and(f64::is_nan));
        assert_eq!(metric_value(TEXT, "process_cpu"), None);
        assert_eq!(metric_value(TEXT, "missing"), None);
        assert_eq!(
            metric_value("process_cpu_seconds_total oops", CPU_SECONDS),
            None
        );
    }

    #[test]
    fn sums_every_label_set() {
        let text = "\
# TYPE chat_node_bus_errors_total counter
chat_node_bus_errors_total{kind=\"publish\"} 3
chat_node_bus_errors_total_other 100
chat_node_bus_errors_total{kind=\"decode\"} 4.5
chat_node_bus_published_total 7
";
        assert_eq!(metric_sum(text, "chat_node_bus_errors_total"), Some(7.5));
        assert_eq!(metric_sum(text, "chat_node_bus_published_total"), Some(7.0));
        assert_eq!(metric_sum(text, "chat_node_bus_received_total"), None);
    }

    #[test]
    fn sample_and_cpu_percent() {
        let before = ServerSample::from_text(TEXT);
        let after = ServerSample {
            cpu_seconds: Some(14.5),
            ..before
        };
        assert_eq!(cpu_percent(&before, &after, 4.0), Some(50.0));
        assert_eq!(cpu_percent(&after, &before, 4.0), None);
        assert_eq!(cpu_percent(&ServerSample::default(), &after, 4.0), None);
        assert_eq!(ServerSample::from_text(""), ServerSample::default());
    }
}
