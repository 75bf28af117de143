//! The `cross-shard` scenario: cross-node traffic through a router, measured per path.
//!
//! Members connect to a home room of their own and join the bench room over the socket
//! (exactly `fanout --bridge`, whose machinery runs the traffic here). Before the run the
//! bench asks the router who owns each member's home room and each bench room
//! (`GET /v1/rooms/{room}/owner`): a member whose home room lives on the bench room's owner
//! is *local*, any other is *bridged* through Redis, and the two groups' deliveries, loss
//! and end-to-end latency are reported separately.
//!
//! With `--direct` each member opens its WebSocket straight to the node the router named as
//! its home room's owner (`ws://<addr>/ws`, the same query), as a client SDK that looks the
//! owner up and connects directly would; the router then only answers the owner lookups.
//!
//! Optionally `--http-publishers` post over HTTP straight to a node that does not own the
//! room they post to, so each publish is forwarded to the owner through Redis; their
//! latency (request to 201) is reported. They post to rooms of their own, so the members'
//! accounting is not disturbed. Every phase is bounded; addresses used are `--url` and the
//! node addresses the router reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use tokio::sync::watch;

use crate::auth::{Auth, AuthArgs};
use crate::client::Target;
use crate::cluster_cost::ClusterCostArgs;
use crate::fanout::{self, FanoutArgs, GroupResult, Groups};
use crate::harness::{self, Outcome};
use crate::http::HttpClient;
pub use crate::owner::{lookup, Lookup, Owner};
use crate::report::{self, map_or_none, new_histogram, LatencySummary, Report};
use crate::BenchError;

/// Options of `chat-bench cross-shard`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 when the run completed (loss is a result, in the report); 1 when it could \
not be carried out (owner lookups failed, too many connect failures); 64 for bad arguments.")]
pub struct CrossShardArgs {
    /// WebSocket URL of a router (the owner lookups need one).
    #[arg(long, env = "CHAT_BENCH_URL", default_value = "ws://127.0.0.1:7000")]
    pub url: String,
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Messages per second each member sends.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    #[arg(long, default_value_t = 0)]
    pub max_connect_failures: u64,
    /// HTTP publishers posting to a node that does not own their room (forwarded publishes).
    #[arg(long, default_value_t = 0)]
    pub http_publishers: usize,
    /// Publishes per second per HTTP publisher.
    #[arg(long, default_value_t = 10.0)]
    pub http_rate: f64,
    /// Connect each member straight to the node that owns its home room (the address the
    /// router's owner lookup gave), not through the router.
    #[arg(long)]
    pub direct: bool,
    #[arg(long, default_value = "xs")]
    pub user_prefix: String,
    /// Rooms are `<prefix>-<room>`; defaults to `xshard-<unix seconds>`.
    #[arg(long)]
    pub room_prefix: Option<String>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    /// Write the per-second timeline of the whole run as an SVG chart (see `fanout`).
    #[arg(long)]
    pub chart: Option<PathBuf>,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub cost: ClusterCostArgs,
}

impl CrossShardArgs {
    fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "xshard")
    }

    /// The equivalent `fanout --bridge` arguments.
    fn fanout(&self, room_prefix: &str) -> FanoutArgs {
        FanoutArgs {
            url: self.url.clone(),
            rooms: self.rooms,
            members: self.members,
            rate: self.rate,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            drain: self.drain,
            user_prefix: self.user_prefix.clone(),
            room_prefix: Some(room_prefix.to_owned()),
            connect_concurrency: 64,
            bridge: true,
            connect_timeout: self.connect_timeout,
            max_connect_failures: self.max_connect_failures,
            quiet: self.quiet,
            chart: self.chart.clone(),
            auth: self.auth.clone(),
            cost: self.cost.clone(),
            ..Default::default()
        }
    }

    /// Checks every limit (fanout's, plus the publishers'); the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        self.fanout(&self.room_prefix()).validate()?;
        if self.http_publishers > 1000 {
            return Err("--http-publishers must be at most 1000".into());
        }
        if !(self.http_rate.is_finite() && self.http_rate > 0.0 && self.http_rate <= 10_000.0) {
            return Err("--http-rate must be in (0, 10000] publishes per second".into());
        }
        Ok(())
    }
}

async fn owner(http: &mut HttpClient, room: &str) -> anyhow::Result<Owner> {
    Ok(lookup(http, room).await?.owner)
}

/// The WebSocket URL of the node at `addr` as an owner lookup gave it: `ws://<addr>/ws`,
/// or why `addr` is not `host:port` (a name or IPv4 address, or a bracketed IPv6 one, and
/// a port from 1 to 65535; nothing else).
pub fn node_ws_url(addr: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("node address {addr:?} is not host:port ({why})"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    if !digits || !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return bad("the port is not a number from 1 to 65535");
    }
    let ok_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    if !ok_host {
        return bad("the host is not a name, an IPv4 address or a bracketed IPv6 address");
    }
    Ok(format!("ws://{addr}/ws"))
}

/// Each member's WebSocket target for `--direct`, in connection order (`room × members +
/// member`): the node owning its home room, resolved once per node.
async fn direct_targets(
    home_owners: &[Vec<u64>],
    nodes: &BTreeMap<u64, String>,
) -> anyhow::Result<Vec<Arc<Target>>> {
    let mut resolved: BTreeMap<u64, Arc<Target>> = BTreeMap::new();
    let mut out = Vec::new();
    for id in home_owners.iter().flatten() {
        if !resolved.contains_key(id) {
            let addr = nodes.get(id).map_or("", String::as_str);
            let url = node_ws_url(addr).map_err(|e| anyhow::anyhow!("--direct: node {id}: {e}"))?;
            let t = Target::resolve(&url)
                .await
                .with_context(|| format!("--direct: node {id} at {addr}"))?;
            resolved.insert(*id, Arc::new(t));
        }
        out.push(resolved[id].clone());
    }
    Ok(out)
}

/// Local (index 0) or bridged (index 1) for each connection, from the owners of the bench
/// rooms and of the members' home rooms.
pub fn classify(room_owner: &[u64], home_owner: &[Vec<u64>]) -> Vec<usize> {
    home_owner
        .iter()
        .enumerate()
        .flat_map(|(r, homes)| {
            homes
                .iter()
                .map(move |h| usize::from(Some(h) != room_owner.get(r)))
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HttpPublishStats {
    pub publishers: usize,
    /// The nodes posted to, none of which owned the room posted to.
    pub posted_to: Vec<String>,
    pub published: u64,
    pub duplicates: u64,
    /// Refusals and failures by status (`transport` when no answer came).
    pub errors: BTreeMap<String, u64>,
    pub latency_us: LatencySummary,
    pub publishes_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CrossShardReport {
    pub scenario: String,
    /// The owner of each bench room (router's view at the start).
    pub room_owners: Vec<Owner>,
    /// Members whose home room is on the bench room's owner, and the others.
    pub local: GroupResult,
    pub bridged: GroupResult,
    pub http_publish: Option<HttpPublishStats>,
    /// The whole run as `fanout --bridge` reports it (command line, git revision, CPU...).
    pub fanout: Report,
    pub notes: Vec<String>,
}

impl Outcome for CrossShardReport {
    fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut o = self.fanout.to_markdown().replacen(
            "## chat-bench fanout",
            "## chat-bench cross-shard",
            1,
        );
        let owners: Vec<String> = self
            .room_owners
            .iter()
            .map(|w| format!("node {} ({})", w.id, w.addr))
            .collect();
        let _ = writeln!(o, "\nBench room owners: {}\n", owners.join(", "));
        let _ = writeln!(
            o,
            "| group | members | expected | delivered | lost | e2e p50 | p90 | p99 | p99.9 | max (ms) |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for g in [&self.local, &self.bridged] {
            let l = &g.e2e_latency_us;
            let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                g.name,
                g.members,
                g.expected_deliveries,
                g.delivered,
                g.lost,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
        if let Some(h) = &self.http_publish {
            let _ = writeln!(
                o,
                "\nHTTP publishes forwarded by a non-owner node ({} publishers to {}): {} \
                 published ({:.1}/s), {} duplicates, errors: {}\n",
                h.publishers,
                h.posted_to.join(", "),
                h.published,
                h.publishes_per_s,
                h.duplicates,
                map_or_none(&h.errors)
            );
            report::latency_table(&mut o, &[("forwarded publish", &h.latency_us)]);
        }
        report::notes_md(&mut o, &self.notes);
        o
    }

    fn svg(&self) -> Option<String> {
        Some(crate::fanout::chart(&self.fanout))
    }
}

/// One HTTP publisher: posts to `room` on `node` (not its owner) at `rate` until `stop`.
/// A publisher's publish latencies, duplicates answered and errors by kind.
type PublisherOutcome = (hdrhistogram::Histogram<u64>, u64, BTreeMap<String, u64>);

async fn publisher(
    node: SocketAddr,
    room: String,
    // `user=U` or `token=JWT`.
    creds: String,
    rate: f64,
    size: usize,
    mut stop: watch::Receiver<bool>,
) -> PublisherOutcome {
    let mut http = HttpClient::new(node, node.to_string());
    let mut lat = new_histogram();
    let mut dups = 0;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let body = "p".repeat(size);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => break,
        }
        let payload = serde_json::json!({"cid": format!("p-{n}"), "body": body}).to_string();
        n += 1;
        let t = Instant::now();
        match http
            .request(
                "POST",
                &format!("/v1/rooms/{room}/messages?{creds}"),
                Some(payload),
                Duration::from_secs(10),
            )
            .await
        {
            Ok(a) if a.status == 201 || a.status == 200 => {
                lat.saturating_record(t.elapsed().as_micros().max(1) as u64);
                if a.status == 200 {
                    dups += 1;
                }
            }
            Ok(a) => *errors.entry(format!("HTTP {}", a.status)).or_default() += 1,
            Err(_) => *errors.entry("transport".into()).or_default() += 1,
        }
    }
    (lat, dups, errors)
}

/// Runs the scenario. The steps: `owners`, `Publishers::start`, `fanout --bridge`
/// with the members grouped, `Publishers::finish`.
pub async fn run(args: CrossShardArgs, command: String) -> Result<CrossShardReport, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    let auth = harness::auth(&args.auth)?;
    let target = harness::target(&args.url).await?;
    let prefix = args.room_prefix();
    let mut http = HttpClient::for_target(&target);
    let (room_owners, home_owners, nodes) = owners(&args, &mut http, &prefix).await?;
    let of = classify(
        &room_owners.iter().map(|o| o.id).collect::<Vec<_>>(),
        &home_owners,
    );
    let targets = match args.direct {
        true => Some(
            direct_targets(&home_owners, &nodes)
                .await
                .map_err(BenchError::Failed)?,
        ),
        false => None,
    };
    let mut notes = Vec::new();
    let publishers = Publishers::start(&args, &auth, &mut http, &nodes, &mut notes).await?;
    let groups = Groups {
        names: vec!["local".into(), "bridged".into()],
        of,
    };
    let result = fanout::run_grouped(args.fanout(&prefix), command, Some(groups), targets).await;
    let stats = publishers.finish().await;
    let (fanout, mut groups) = result?;
    let bridged = groups.pop().unwrap_or_default();
    let local = groups.pop().unwrap_or_default();
    if local.members == 0 || bridged.members == 0 {
        notes.push(format!(
            "one group is empty ({} local, {} bridged): with one node every member is local; \
             with few members the split may be lopsided",
            local.members, bridged.members
        ));
    }
    notes.push(
        "local and bridged are decided from the router's ring at the start; a ring change \
         during the run is not followed"
            .into(),
    );
    if args.direct {
        notes.push(
            "members connected directly to their home room's owner; the router only answered \
             owner lookups"
                .into(),
        );
    }
    notes.push(
        "server CPU and RSS above are the --url's (the router's); the nodes' are on their own \
         /metrics"
            .into(),
    );
    Ok(CrossShardReport {
        scenario: "cross-shard".into(),
        room_owners,
        local,
        bridged,
        http_publish: (args.http_publishers > 0).then_some(stats),
        fanout,
        notes,
    })
}

fn lookup_failed(e: anyhow::Error) -> BenchError {
    BenchError::Failed(e.context("owner lookup"))
}

/// Who owns what, by the names `fanout --bridge` uses: each room's owner, each member's
/// home room's owner, and every node seen (id → address).
async fn owners(
    args: &CrossShardArgs,
    http: &mut HttpClient,
    prefix: &str,
) -> Result<(Vec<Owner>, Vec<Vec<u64>>, BTreeMap<u64, String>), BenchError> {
    let mut room_owners = Vec::with_capacity(args.rooms);
    let mut home_owners = Vec::with_capacity(args.rooms);
    let mut nodes: BTreeMap<u64, String> = BTreeMap::new();
    for r in 0..args.rooms {
        let room = format!("{prefix}-{r}");
        let o = owner(http, &room).await.map_err(lookup_failed)?;
        nodes.insert(o.id, o.addr.clone());
        let mut homes = Vec::with_capacity(args.members);
        for m in 0..args.members {
            let h = owner(http, &format!("{room}-home-{m}"))
                .await
                .map_err(lookup_failed)?;
            nodes.insert(h.id, h.addr.clone());
            homes.push(h.id);
        }
        room_owners.push(o);
        home_owners.push(homes);
    }
    Ok((room_owners, home_owners, nodes))
}

/// The HTTP publishers (`--http-publishers`), each posting to a room of its own on a node
/// that does not own it.
struct Publishers {
    tasks: Vec<tokio::task::JoinHandle<PublisherOutcome>>,
    posted_to: Vec<String>,
    stop: watch::Sender<bool>,
    started: Instant,
}

impl Publishers {
    async fn start(
        args: &CrossShardArgs,
        auth: &Auth,
        http: &mut HttpClient,
        nodes: &BTreeMap<u64, String>,
        notes: &mut Vec<String>,
    ) -> Result<Publishers, BenchError> {
        let (stop, stop_rx) = watch::channel(false);
        let (mut tasks, mut posted_to) = (Vec::new(), Vec::new());
        let prefix = args.room_prefix();
        for p in 0..args.http_publishers {
            let room = format!("{prefix}-http-{p}");
            let o = owner(http, &room).await.map_err(lookup_failed)?;
            let Some((_, addr)) = nodes.iter().find(|(id, _)| **id != o.id) else {
                notes.push("only one node is known: HTTP publishers were not started".into());
                break;
            };
            let Ok(node) = addr.parse::<SocketAddr>() else {
                notes.push(format!(
                    "node address {addr:?} is not host:port; publishers skipped"
                ));
                break;
            };
            posted_to.push(addr.clone());
            tasks.push(tokio::spawn(publisher(
                node,
                room,
                auth.credentials(&format!("{}-http-{p}", args.user_prefix))
                    .map_err(BenchError::Config)?,
                args.http_rate,
                args.size,
                stop_rx.clone(),
            )));
        }
        Ok(Publishers {
            tasks,
            posted_to,
            stop,
            started: Instant::now(),
        })
    }

    /// Stops the publishers and sums what they did.
    async fn finish(self) -> HttpPublishStats {
        let _ = self.stop.send(true);
        let wall = self.started.elapsed().as_secs_f64();
        let mut stats = HttpPublishStats {
            publishers: self.tasks.len(),
            posted_to: self.posted_to,
            ..Default::default()
        };
        let mut lat = new_histogram();
        for t in self.tasks {
            if let Some(Ok((h, d, e))) = harness::within(Duration::from_secs(15), t).await {
                let _ = lat.add(&h);
                stats.duplicates += d;
                report::add_counts(&mut stats.errors, &e);
            }
        }
        stats.published = lat.len();
        stats.latency_us = LatencySummary::from_histogram(&lat);
        stats.publishes_per_s = if wall > 0.0 {
            stats.published as f64 / wall
        } else {
            0.0
        };
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_local_when_their_home_shares_the_rooms_owner() {
        let of = classify(&[1, 2], &[vec![1, 2, 3], vec![2, 2]]);
        assert_eq!(of, vec![0, 1, 1, 0, 0]);
    }

    #[test]
    fn direct_connections_go_to_host_port_addresses_only() {
        for (addr, url) in [
            ("127.0.0.1:7101", "ws://127.0.0.1:7101/ws"),
            (
                "chat-node-2.internal:7001",
                "ws://chat-node-2.internal:7001/ws",
            ),
            ("[::1]:7001", "ws://[::1]:7001/ws"),
        ] {
            assert_eq!(node_ws_url(addr).as_deref(), Ok(url));
        }
        for addr in [
            "",
            "127.0.0.1",
            ":7001",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:+80",
            "127.0.0.1:http",
            "::1:7001",
            "[nope]:7001",
            "ws://127.0.0.1:7001",
            "127.0.0.1:7001/ws",
            "host/x:7001",
            "user@host:7001",
            "a b:7001",
        ] {
            let e = node_ws_url(addr).expect_err(addr);
            assert!(e.contains("not host:port"), "{addr}: {e}");
        }
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        let args = crate::args::parse::<CrossShardArgs>;
        assert_eq!(args(&[]).validate(), Ok(()));
        for (flags, needle) in [
            (vec!["--members", "0"], "--members"),
            (vec!["--rate", "0"], "--rate"),
            (vec!["--http-rate", "0"], "--http-rate"),
            (vec!["--http-publishers", "5000"], "--http-publishers"),
            (vec!["--room-prefix", "a b"], "--room-prefix"),
        ] {
            let e = args(&flags).validate().expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }
}
