//! Debian's Prometheus against a real cluster (a router, three chat-node processes, the
//! real Redis and CQL server): it scrapes them with the scrape config of
//! `deploy/prometheus/local.yml` (only the addresses and intervals swapped), loads
//! `deploy/prometheus/alerts.yml`, and is asked over its HTTP API for every series the
//! Grafana dashboard and the alert rules use. A renamed or dropped metric, a label the
//! queries rely on, or a rule Prometheus cannot evaluate fails this test.
//!
//! `deploy/local/test.sh` installs the `prometheus` package (through `deploy/check.sh`);
//! without the binary this test fails and says so.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::cluster::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// A Prometheus server, killed (and its data removed) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn prometheus_bin() -> &'static str {
    let bin = "/usr/bin/prometheus";
    assert!(
        Path::new(bin).exists(),
        "{bin} is missing: this test needs Debian's prometheus package; run deploy/local/test.sh \
         (it installs it through deploy/check.sh) or apt-get install prometheus"
    );
    bin
}

/// `deploy/prometheus/local.yml` with the cluster's real addresses, 1 s intervals and the
/// rule file's absolute path. Each substitution must apply, so the file cannot drift away
/// from what this test checks.
fn scrape_config(router: SocketAddr, nodes: &[SocketAddr]) -> String {
    let text = std::fs::read_to_string(format!("{DEPLOY}/prometheus/local.yml"))
        .expect("read deploy/prometheus/local.yml");
    let node_list = nodes
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let alerts = std::fs::canonicalize(format!("{DEPLOY}/prometheus/alerts.yml"))
        .expect("deploy/prometheus/alerts.yml exists");
    let mut out = text;
    for (from, to) in [
        ("[\"127.0.0.1:7000\"]", format!("[\"{router}\"]")),
        (
            "[\"127.0.0.1:7001\", \"127.0.0.1:7002\", \"127.0.0.1:7003\"]",
            format!("[{node_list}]"),
        ),
        ("scrape_interval: 5s", "scrape_interval: 1s".to_owned()),
        (
            "evaluation_interval: 5s",
            "evaluation_interval: 1s".to_owned(),
        ),
        ("- alerts.yml", format!("- {}", alerts.display())),
    ] {
        assert!(out.contains(from), "local.yml no longer contains {from:?}");
        out = out.replace(from, &to);
    }
    out
}

async fn start_prometheus(config: &str) -> Prometheus {
    let bin = prometheus_bin();
    let dir = std::env::temp_dir().join(format!("chat-prom-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("write config");
    // Prometheus cannot report a port it picked, so take a free one and hand it over.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn prometheus");
    let prom = Prometheus { child, addr, dir };
    eventually("prometheus ready", || async move {
        get(addr, "/-/ready").await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    prom
}

/// A GET over HTTP/1.0 (no chunked answers to decode); `None` when nothing listens yet.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("answer within the wait")
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs an instant query; panics unless Prometheus accepted it.
async fn query(prom: SocketAddr, promql: &str) -> Vec<serde_json::Value> {
    let path = format!("/api/v1/query?query={}", url_encode(promql));
    let (status, body) = get(prom, &path).await.expect("prometheus answers");
    let v = json(&body);
    assert!(
        status == 200 && v["status"] == "success",
        "query {promql:?} failed: {status} {body}"
    );
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Names of our series (`chat_*`, `process_*`) a PromQL text refers to.
fn metric_names(promql: &str, into: &mut BTreeSet<String>) {
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &promql[i..];
        if starts_word && (rest.starts_with("chat_") || rest.starts_with("process_")) {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
                .count();
            into.insert(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
}

/// The dashboard's queries with Grafana's variables replaced by what "All" and a 1 m range
/// stand for.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/dashboards/chat.json"))
        .expect("read the dashboard");
    let dash = json(&text);
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(
                    expr.replace("$__rate_interval", "1m")
                        .replace("${node}", ".*")
                        .replace("$node", ".*"),
                );
            }
        }
    }
    out
}

/// Traffic that makes every kind of series appear: local sends (fan-out, ack, store write),
/// history reads, a publish forwarded to the owner (cross-shard), a bridged join, and a bad
/// request on the router.
async fn traffic(c: &Cluster) {
    let router = c.router();
    for i in 0..6 {
        let room = format!("prom-{i}");
        let mut client = Client::connect(router, &format!("/ws?room={room}&user=p{i}"))
            .await
            .expect("connect through the router");
        client.expect_joined().await;
        for k in 0..5 {
            client.send_text(&room, &format!("c{k}"), "hello").await;
        }
        for _ in 0..5 {
            client.ack().await;
        }
        let (status, _) = http_get(
            router,
            &format!("/v1/rooms/{room}/messages?limit=10&user=p{i}"),
        )
        .await;
        assert_eq!(status, 200);
        // Published on a node that does not own the room: forwarded over the bus.
        let owner = c.owner(router, &room).await;
        let other = c
            .nodes
            .iter()
            .find(|(id, _)| **id != owner)
            .map(|(_, p)| p.addr)
            .expect("another node");
        let (status, body) = http_post(
            other,
            &format!("/v1/rooms/{room}/messages?user=bot"),
            r#"{"cid":"http-1","body":"forwarded"}"#,
        )
        .await;
        assert!(status < 300, "forwarded publish: {status} {body}");
    }
    let (status, _) = http_get(router, "/v1/rooms/bad%20room/owner").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_cluster_and_every_dashboard_and_alert_series_exists() {
    let c = Cluster::start("prom", 3, 1).await;
    traffic(&c).await;
    let nodes: Vec<SocketAddr> = c.nodes.values().map(|p| p.addr).collect();
    let prom = start_prometheus(&scrape_config(c.router(), &nodes)).await;
    let p = prom.addr;

    // Every target is scraped successfully.
    eventually("every target up", || async move {
        let r = query(p, "up").await;
        r.len() == 4 && r.iter().all(|s| s["value"][1] == "1")
    })
    .await;

    // Every alert of alerts.yml is loaded and evaluates without error.
    let alerts_file = std::fs::read_to_string(format!("{DEPLOY}/prometheus/alerts.yml"))
        .expect("read alerts.yml");
    let declared = alerts_file
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let rules: Vec<serde_json::Value> = {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            let (status, body) = get(p, "/api/v1/rules?type=alert").await.expect("rules");
            assert_eq!(status, 200, "{body}");
            let v = json(&body);
            let rules: Vec<_> = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            if let Some(bad) = rules.iter().find(|r| r["health"] == "err") {
                panic!("alert rule fails to evaluate: {bad}");
            }
            if rules.len() == declared && rules.iter().all(|r| r["health"] == "ok") {
                break rules;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rules not all evaluated: {} of {declared} loaded: {body}",
                rules.len()
            );
        }
    };
    assert!(declared >= 10, "alerts.yml declares {declared} alerts");

    // Every dashboard query is valid PromQL to this Prometheus.
    let dash = dashboard_queries();
    assert!(dash.len() >= 30, "dashboard has {} queries", dash.len());
    for q in &dash {
        query(p, q).await;
    }

    // Every series either of them names exists, scraped from the cluster.
    let mut names = BTreeSet::new();
    for q in &dash {
        metric_names(q, &mut names);
    }
    for r in &rules {
        metric_names(r["query"].as_str().expect("rule query"), &mut names);
    }
    assert!(names.len() >= 25, "found only {} metric names", names.len());
    let mut missing = Vec::new();
    // Scrapes run every second; the last name waited for has had its chances.
    let deadline = tokio::time::Instant::now() + WAIT;
    for name in &names {
        let promql = format!("count({{__name__=\"{name}\"}})");
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            if !query(p, &promql).await.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                missing.push(name.clone());
                break;
            }
        }
    }
    assert!(
        missing.is_empty(),
        "series used by the dashboard or the alerts that the cluster does not export: {missing:?}"
    );
}
