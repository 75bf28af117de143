//! `--webhook-sink`: the bench as the app's webhook endpoint. It answers every delivery 200
//! and records which message ids arrived (once, or again) and how long after the message's
//! timestamp, so a run reports webhook throughput and lag next to the ack latency it costs.
//! It reads only the payload's `id` and `ts`; it shares nothing with the node's delivery.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

use crate::latency::{new_histogram, LatencySummary};

#[derive(Default)]
struct Seen {
    ids: HashSet<u64>,
    duplicates: u64,
    /// Unique deliveries that arrived inside the measured window.
    in_window: u64,
    lag_us: Option<Histogram<u64>>,
    window: Option<(Instant, Instant)>,
}

/// What the sink saw, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WebhookSummary {
    /// Distinct messages delivered (warm-up and drain included).
    pub unique: u64,
    /// Deliveries of a message that had arrived before.
    pub duplicates: u64,
    /// Distinct messages delivered per second of the measured window.
    pub per_second: f64,
    /// From the message's `ts` (stamped by its owner) to its first arrival here, µs.
    pub lag_us: LatencySummary,
}

#[derive(Clone)]
pub struct Sink {
    seen: Arc<Mutex<Seen>>,
    pub addr: SocketAddr,
}

#[derive(Deserialize)]
struct Payload {
    id: String,
    ts: u64,
}

impl Sink {
    /// Listens on `addr` (the nodes' `--webhook-url` must point at it).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Sink> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let sink = Sink {
            seen: Arc::new(Mutex::new(Seen {
                lag_us: Some(new_histogram()),
                ..Seen::default()
            })),
            addr: listener.local_addr()?,
        };
        let served = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let sink = sink.clone();
                        async move { sink.take(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(sink)
    }

    async fn take(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let parsed = body
            .ok()
            .and_then(|b| serde_json::from_slice::<Payload>(&b).ok())
            .and_then(|p| Some((p.id.parse::<u64>().ok()?, p.ts)));
        if let (Some((id, ts)), Ok(mut seen)) = (parsed, self.seen.lock()) {
            if seen.ids.insert(id) {
                let lag = now_ms.saturating_sub(ts) * 1000;
                if let Some(h) = &mut seen.lag_us {
                    let _ = h.record(lag.max(1));
                }
                if seen
                    .window
                    .is_some_and(|(a, b)| (a..b).contains(&Instant::now()))
                {
                    seen.in_window += 1;
                }
            } else {
                seen.duplicates += 1;
            }
        }
        Ok(hyper::Response::new(Full::new(Bytes::from_static(b"{}"))))
    }

    /// The measured window: deliveries inside it count toward the throughput.
    pub fn set_window(&self, from: Instant, to: Instant) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.window = Some((from, to));
        }
    }

    pub fn unique(&self) -> u64 {
        self.seen.lock().map_or(0, |s| s.ids.len() as u64)
    }

    pub fn summary(&self, window_s: f64) -> WebhookSummary {
        let Ok(seen) = self.seen.lock() else {
            return WebhookSummary::default();
        };
        WebhookSummary {
            unique: seen.ids.len() as u64,
            duplicates: seen.duplicates,
            per_second: if window_s > 0.0 {
                seen.in_window as f64 / window_s
            } else {
                0.0
            },
            lag_us: seen
                .lag_us
                .as_ref()
                .map(LatencySummary::from_histogram)
                .unwrap_or_default(),
        }
    }
}

impl WebhookSummary {
    pub fn to_markdown(&self, out: &mut String) {
        out.push_str(&format!(
            "\n## Webhook sink\n\n| unique | duplicates | per second (window) | lag p50 ms | lag p99 ms | lag max ms |\n|---|---|---|---|---|---|\n| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            self.unique,
            self.duplicates,
            self.per_second,
            self.lag_us.p50 as f64 / 1000.0,
            self.lag_us.p99 as f64 / 1000.0,
            self.lag_us.max as f64 / 1000.0,
        ));
    }
}
