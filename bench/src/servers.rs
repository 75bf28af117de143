//! The servers a run watches: every `--metrics-url` (or, by default, each target URL's own
//! `/metrics`), sampled at the run's milestones, and the per-server and total figures the
//! `connections` and `churn` reports show (CPU, RSS, RSS per connection).
//!
//! Behind a router the connections live on the nodes, so a planner names the nodes (and the
//! router, whose proxy holds two sockets per client) with `--metrics-url`. A server that does
//! not answer is reported as n/a with the reason; the run's result stands without it.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Target;
use crate::metrics_scrape::{self, ServerSample};

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// The `http://host:port` of each server to scrape: `metrics_urls` when given, else the
/// host and port of each distinct target URL.
pub fn metrics_urls(urls: &[String], metrics_urls: &[String]) -> Vec<String> {
    if !metrics_urls.is_empty() {
        return metrics_urls.to_vec();
    }
    let mut out: Vec<String> = Vec::new();
    for u in urls {
        let http = match u.parse::<hyper::Uri>() {
            Ok(uri) => match uri.authority() {
                Some(a) => format!("http://{a}"),
                None => continue,
            },
            Err(_) => continue,
        };
        if !out.contains(&http) {
            out.push(http);
        }
    }
    out
}

/// One server's samples over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    pub metrics_url: String,
    /// `process_resident_memory_bytes` before the load, when it was in place, and after it
    /// ended (and the settle time passed).
    pub rss_before: Option<u64>,
    pub rss_loaded: Option<u64>,
    pub rss_after: Option<u64>,
    /// `chat_node_connections` (or the router's gauge) at the same moments, when exported.
    pub connections_before: Option<f64>,
    pub connections_loaded: Option<f64>,
    pub connections_after: Option<f64>,
    /// (loaded − before) RSS / this server's own connection gauge when loaded: what one
    /// connection costs this process (a router holds two sockets per client).
    pub rss_per_own_connection: Option<f64>,
    /// Percent of one core between the first two samples.
    pub cpu_percent: Option<f64>,
    pub error: Option<String>,
}

/// A sample plus the connection gauges the node and router export.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub process: ServerSample,
    pub connections: Option<f64>,
    pub at: Option<Instant>,
    pub error: Option<String>,
}

/// The servers of one run.
pub struct Watched {
    pub servers: Vec<(String, Option<Target>, Option<String>)>,
}

impl Watched {
    pub async fn resolve(urls: Vec<String>) -> Watched {
        let mut servers = Vec::with_capacity(urls.len());
        for u in urls {
            match Target::resolve(&u).await {
                Ok(t) => servers.push((u, Some(t), None)),
                Err(e) => servers.push((u, None, Some(format!("{e:#}")))),
            }
        }
        Watched { servers }
    }

    /// Samples every server, one after another (a handful of short requests).
    pub async fn sample(&self) -> Vec<Sample> {
        let mut out = Vec::with_capacity(self.servers.len());
        for (_, t, err) in &self.servers {
            let Some(t) = t else {
                out.push(Sample {
                    error: err.clone(),
                    ..Default::default()
                });
                continue;
            };
            out.push(match metrics_scrape::fetch(t, SCRAPE_TIMEOUT).await {
                Ok(text) => Sample {
                    process: ServerSample::from_text(&text),
                    connections: metrics_scrape::metric_value(&text, common::metrics::CONNECTIONS)
                        .or_else(|| {
                            metrics_scrape::metric_value(
                                &text,
                                common::metrics::ROUTER_WS_CONNECTIONS,
                            )
                        }),
                    at: Some(Instant::now()),
                    error: None,
                },
                Err(e) => Sample {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            });
        }
        out
    }
}

/// Per-server figures from the three sample rounds.
pub fn figures(
    urls: &[(String, Option<Target>, Option<String>)],
    before: &[Sample],
    loaded: &[Sample],
    after: &[Sample],
) -> Vec<ServerFigures> {
    let rss = |s: &Sample| s.process.resident_bytes.map(|b| b as u64);
    urls.iter()
        .enumerate()
        .map(|(i, (url, _, _))| {
            let (b, l, a) = (&before[i], &loaded[i], &after[i]);
            let wall = match (b.at, l.at) {
                (Some(x), Some(y)) => y.duration_since(x).as_secs_f64(),
                _ => 0.0,
            };
            ServerFigures {
                metrics_url: url.clone(),
                rss_before: rss(b),
                rss_loaded: rss(l),
                rss_after: rss(a),
                connections_before: b.connections,
                connections_loaded: l.connections,
                connections_after: a.connections,
                rss_per_own_connection: match (rss(b), rss(l), l.connections) {
                    (Some(x), Some(y), Some(n)) if n > 0.0 => Some((y as f64 - x as f64) / n),
                    _ => None,
                },
                cpu_percent: metrics_scrape::cpu_percent(&b.process, &l.process, wall),
                error: b
                    .error
                    .clone()
                    .or_else(|| l.error.clone())
                    .or_else(|| a.error.clone()),
            }
        })
        .collect()
}

/// Σ (loaded − before) RSS over the servers, divided by `connections`; `None` unless every
/// server reported RSS both times.
pub fn rss_per_connection(servers: &[ServerFigures], connections: u64) -> Option<f64> {
    if servers.is_empty() || connections == 0 {
        return None;
    }
    let mut delta = 0i64;
    for s in servers {
        delta += s.rss_loaded? as i64 - s.rss_before? as i64;
    }
    Some(delta as f64 / connections as f64)
}

/// Σ (after − before) RSS: what the servers kept once the connections were gone.
pub fn rss_retained(servers: &[ServerFigures]) -> Option<i64> {
    let mut delta = 0i64;
    for s in servers {
        delta += s.rss_after? as i64 - s.rss_before? as i64;
    }
    (!servers.is_empty()).then_some(delta)
}

/// The servers' figures as a Markdown table; `loaded` names the loaded sample ("held").
pub fn table(out: &mut String, servers: &[ServerFigures], loaded: &str) {
    out.push_str(&format!(
        "| server | RSS before | RSS {loaded} | RSS after close | connections gauge before / {loaded} / after | RSS growth per own connection | CPU (% of one core) |\n|---|---|---|---|---|---|---|\n"
    ));
    let g = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
    for s in servers {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
            s.metrics_url,
            crate::report::opt_mib(s.rss_before),
            crate::report::opt_mib(s.rss_loaded),
            crate::report::opt_mib(s.rss_after),
            g(s.connections_before),
            g(s.connections_loaded),
            g(s.connections_after),
            s.rss_per_own_connection
                .map_or_else(|| "n/a".to_owned(), |b| format!("{:.1} KiB", b / 1024.0)),
            crate::report::opt_pct(s.cpu_percent),
        ));
        if let Some(e) = &s.error {
            out.push_str(&format!(
                "| ↳ {} metrics n/a: {e} | | | | | | |\n",
                s.metrics_url
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_metrics_urls_are_the_targets_hosts() {
        let u = metrics_urls(
            &[
                "ws://127.0.0.1:7001/ws".into(),
                "ws://127.0.0.1:7002".into(),
                "ws://127.0.0.1:7001".into(),
            ],
            &[],
        );
        assert_eq!(u, vec!["http://127.0.0.1:7001", "http://127.0.0.1:7002"]);
        let named = metrics_urls(&["ws://r:7000".into()], &["http://n:7001".into()]);
        assert_eq!(named, vec!["http://n:7001"]);
    }

    #[test]
    fn memory_per_connection_sums_servers() {
        let s = |b, l| ServerFigures {
            rss_before: Some(b),
            rss_loaded: Some(l),
            rss_after: Some(b + 10),
            ..Default::default()
        };
        let servers = vec![s(1000, 5000), s(2000, 4000)];
        assert_eq!(rss_per_connection(&servers, 100), Some(60.0));
        assert_eq!(rss_retained(&servers), Some(20));
        assert_eq!(rss_per_connection(&servers, 0), None);
        let mut missing = servers.clone();
        missing[1].rss_loaded = None;
        assert_eq!(rss_per_connection(&missing, 100), None);
    }
}
