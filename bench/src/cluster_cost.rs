//! Cluster cost accounting: what one run's traffic cost the whole cluster, over the same
//! measured window as its deliveries. Redis's own counters (PUBLISH calls, network bytes and
//! CPU from `INFO`), every node's bus counters (`/metrics`) and the CPU time of the server
//! processes on this machine (`/proc/<pid>/stat`) are sampled at the window's start and end
//! ([`ClusterSample::take`]), and [`ClusterCost::between`] turns two samples into figures
//! per room message, per delivery and per 100k deliveries.
//!
//! It only reads: one `INFO` per sample on its own short-lived Redis connection (RESP spoken
//! here, a few lines, so the bench needs no Redis client), one `GET /metrics` per node, and
//! `/proc`. Every request is bounded in time and size; whatever cannot be read is "n/a" with
//! a note, never a failed run. It decides nothing about the run itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use common::metrics as m;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::Target;
use crate::http::HttpClient;
use crate::machine::{clock_ticks_per_second, ProcStat};
use crate::metrics_scrape;

/// Options shared by `fanout` and `cross-shard`.
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterCostArgs {
    /// The cluster's Redis (`redis://[[user]:password@]host[:port]`): its PUBLISH calls,
    /// commands, network bytes and CPU over the measured window are reported (`INFO`).
    /// Without it those figures are n/a.
    #[arg(long = "redis-url", env = "CHAT_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Server processes on this machine whose CPU time is read from /proc/PID/stat over the
    /// measured window: `name=PID,name=PID...` (a name containing "router" is the router;
    /// one named "redis" replaces Redis's own INFO cpu).
    #[arg(long, env = "CHAT_BENCH_SERVER_PIDS", value_name = "NAME=PID,...")]
    pub server_pids: Option<String>,
    /// Like --server-pids, from every DIR/*.pid file (named by the file name without .pid),
    /// e.g. deploy/local/.state of deploy/local/cluster.sh.
    #[arg(long, env = "CHAT_BENCH_PID_DIR", value_name = "DIR")]
    pub pid_dir: Option<PathBuf>,
}

impl ClusterCostArgs {
    /// Any source of cluster figures was given.
    pub fn requested(&self) -> bool {
        self.redis_url.is_some() || self.server_pids.is_some() || self.pid_dir.is_some()
    }

    /// Checks the syntax of every option; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.redis_url {
            RedisAddr::parse(url).map_err(|e| format!("--redis-url: {e}"))?;
        }
        if let Some(list) = &self.server_pids {
            parse_server_pids(list).map_err(|e| format!("--server-pids: {e}"))?;
        }
        Ok(())
    }
}

/// Longest wait for one Redis `INFO` or one node's `/metrics`.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// `INFO` with the sections the accounting needs is a few KiB; anything near this is wrong.
const MAX_REPLY: usize = 4 << 20;
/// Owner lookups spent finding every node of the router's ring.
const MAX_PROBES: usize = 256;
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the cluster's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisAddr {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl RedisAddr {
    /// `redis://[[user]:password@]host[:port][/db]`; the database does not matter (`INFO`
    /// is server-wide). No TLS and no percent-decoding.
    pub fn parse(url: &str) -> Result<RedisAddr, String> {
        let rest = url.strip_prefix("redis://").ok_or_else(|| {
            format!("{url:?} is not redis://host:port (rediss:// is not supported)")
        })?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (creds, hostport) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match creds {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (Some(c.to_owned()), None),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None => 6379,
        };
        Ok(RedisAddr {
            host: host.to_owned(),
            port,
            user,
            password,
        })
    }
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Bulk(Vec<u8>),
    Nil,
}

/// A command as a RESP array of bulk strings.
pub fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The first reply in `buf` and the bytes it took, `None` while incomplete. Only the kinds
/// `AUTH` and `INFO` answer with (simple string, error, bulk string) are accepted.
pub fn parse_reply(buf: &[u8], max: usize) -> Result<Option<(Reply, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 1024 {
            Err("no line end in the first KiB of the reply".into())
        } else {
            Ok(None)
        };
    };
    let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
    let after = eol + 2;
    match buf.first() {
        Some(b'+') => Ok(Some((Reply::Simple(line), after))),
        Some(b'-') => Ok(Some((Reply::Error(line), after))),
        Some(b'$') => {
            let len: i64 = line
                .parse()
                .map_err(|_| format!("bad bulk length {line:?}"))?;
            if len < 0 {
                return Ok(Some((Reply::Nil, after)));
            }
            let len = len as usize;
            if len > max {
                return Err(format!("reply of {len} bytes is over the {max}-byte limit"));
            }
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err("bulk string not ended by CRLF".into());
            }
            Ok(Some((
                Reply::Bulk(buf[after..after + len].to_vec()),
                after + len + 2,
            )))
        }
        Some(c) => Err(format!("unexpected reply type {:?}", *c as char)),
        None => Ok(None),
    }
}

/// The counters of one `INFO stats cpu commandstats`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisInfo {
    pub net_input_bytes: Option<u64>,
    pub net_output_bytes: Option<u64>,
    /// `used_cpu_sys + used_cpu_user`, seconds.
    pub cpu_s: Option<f64>,
    /// `calls=` of every `cmdstat_<command>` line (a command never called has no line).
    pub calls: BTreeMap<String, u64>,
}

impl RedisInfo {
    pub fn parse(text: &str) -> RedisInfo {
        let mut info = RedisInfo::default();
        let (mut sys, mut user) = (None, None);
        for line in text.lines() {
            let Some((key, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match key {
                "total_net_input_bytes" => info.net_input_bytes = value.parse().ok(),
                "total_net_output_bytes" => info.net_output_bytes = value.parse().ok(),
                "used_cpu_sys" => sys = value.parse::<f64>().ok(),
                "used_cpu_user" => user = value.parse::<f64>().ok(),
                _ => {
                    if let Some(cmd) = key.strip_prefix("cmdstat_") {
                        let calls = value
                            .split(',')
                            .find_map(|kv| kv.strip_prefix("calls="))
                            .and_then(|v| v.parse().ok());
                        if let Some(c) = calls {
                            info.calls.insert(cmd.to_owned(), c);
                        }
                    }
                }
            }
        }
        info.cpu_s = sys.zip(user).map(|(s, u)| s + u);
        info
    }
}

/// One `INFO` as read, with the bench's own bytes, which Redis counts too.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisSample {
    pub info: RedisInfo,
    /// Everything this sample sent (`AUTH`, `INFO`): all read, so counted, before `INFO`
    /// takes its figures.
    pub request_bytes: u64,
    /// The `INFO` reply: written after its figures were taken, so counted by the next one.
    pub reply_bytes: u64,
}

/// The commands the accounting itself sends, left out of the command counts.
const OWN_COMMANDS: [&str; 2] = ["info", "auth"];

async fn redis_sample(addr: &RedisAddr) -> Result<RedisSample, String> {
    tokio::time::timeout(SAMPLE_TIMEOUT, redis_sample_inner(addr))
        .await
        .map_err(|_| format!("INFO timed out after {} s", SAMPLE_TIMEOUT.as_secs()))?
}

async fn redis_sample_inner(addr: &RedisAddr) -> Result<RedisSample, String> {
    let mut stream = TcpStream::connect((addr.host.as_str(), addr.port))
        .await
        .map_err(|e| format!("connect {}:{}: {e}", addr.host, addr.port))?;
    let mut buf = Vec::with_capacity(16 << 10);
    let mut request_bytes = 0u64;
    if let Some(password) = &addr.password {
        let auth = match &addr.user {
            Some(u) => encode_command(&["AUTH", u, password]),
            None => encode_command(&["AUTH", password]),
        };
        request_bytes += auth.len() as u64;
        match roundtrip(&mut stream, &auth, &mut buf).await? {
            (Reply::Simple(_), _) => {}
            (Reply::Error(e), _) => return Err(format!("AUTH: {e}")),
            (other, _) => return Err(format!("AUTH: unexpected reply {other:?}")),
        }
    }
    // Redis 7 takes several sections at once; just these keep the reply to a few KiB.
    let info = encode_command(&["INFO", "stats", "cpu", "commandstats"]);
    request_bytes += info.len() as u64;
    match roundtrip(&mut stream, &info, &mut buf).await? {
        (Reply::Bulk(body), used) => Ok(RedisSample {
            info: RedisInfo::parse(&String::from_utf8_lossy(&body)),
            request_bytes,
            reply_bytes: used as u64,
        }),
        (Reply::Error(e), _) => Err(format!("INFO: {e}")),
        (other, _) => Err(format!("INFO: unexpected reply {other:?}")),
    }
}

/// Writes `request` and reads one reply into `buf` (cleared first).
async fn roundtrip(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(Reply, usize), String> {
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    buf.clear();
    loop {
        if let Some(r) = parse_reply(buf, MAX_REPLY)? {
            return Ok(r);
        }
        if buf.len() > MAX_REPLY + 1024 {
            return Err("reply too long".into());
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("Redis closed the connection".into());
        }
    }
}

/// A server process whose CPU time is read from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerProcess {
    pub name: String,
    pub pid: u32,
}

/// `name=PID,name=PID...`, names unique.
pub fn parse_server_pids(list: &str) -> Result<Vec<ServerProcess>, String> {
    let mut out: Vec<ServerProcess> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, pid) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=PID"))?;
        let name = name.trim();
        let pid: u32 = pid
            .trim()
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{item:?}: the pid is not a positive number"))?;
        if name.is_empty() {
            return Err(format!("{item:?} has no name"));
        }
        if out.iter().any(|p| p.name == name) {
            return Err(format!("{name:?} is named twice"));
        }
        out.push(ServerProcess {
            name: name.to_owned(),
            pid,
        });
    }
    if out.is_empty() {
        return Err("no name=PID given".into());
    }
    Ok(out)
}

/// Every `DIR/*.pid`, sorted by name; files that hold no pid are left out with a note.
fn read_pid_dir(dir: &Path, notes: &mut Vec<String>) -> Result<Vec<ServerProcess>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("--pid-dir {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pid"))
        else {
            continue;
        };
        match std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            Some(pid) if pid > 0 => out.push(ServerProcess {
                name: name.to_owned(),
                pid,
            }),
            _ => notes.push(format!("{} holds no pid: left out", path.display())),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if out.is_empty() {
        notes.push(format!("--pid-dir {}: no *.pid file", dir.display()));
    }
    Ok(out)
}

/// What to sample, settled once before the run.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub redis: Option<RedisAddr>,
    /// Nodes whose `/metrics` carry the bus counters: label and target.
    pub nodes: Vec<(String, Target)>,
    pub processes: Vec<ServerProcess>,
    /// What the setup could not do, for the report.
    pub notes: Vec<String>,
}

impl Probe {
    /// Reads the options (an unreadable `--pid-dir` is a configuration error) and learns
    /// the nodes: from the router at `target` when it is one (owner lookups until every node
    /// of its ring was seen), else `target` alone.
    pub async fn prepare(args: &ClusterCostArgs, target: &Target) -> Result<Probe, String> {
        args.validate()?;
        let mut notes = Vec::new();
        let redis = match &args.redis_url {
            Some(u) => Some(RedisAddr::parse(u)?),
            None => {
                notes.push("Redis figures n/a: no --redis-url".into());
                None
            }
        };
        let mut processes = match &args.server_pids {
            Some(list) => parse_server_pids(list)?,
            None => Vec::new(),
        };
        if let Some(dir) = &args.pid_dir {
            for p in read_pid_dir(dir, &mut notes)? {
                if processes.iter().any(|q| q.name == p.name) {
                    return Err(format!(
                        "--pid-dir: {:?} is also named in --server-pids",
                        p.name
                    ));
                }
                processes.push(p);
            }
        }
        for p in &processes {
            if let Err(e) = read_proc(p.pid) {
                notes.push(format!(
                    "{} (pid {}): {e}; its CPU is n/a (the pids must be of this machine)",
                    p.name, p.pid
                ));
            }
        }
        let nodes = match tokio::time::timeout(DISCOVERY_TIMEOUT, discover_nodes(target)).await {
            Ok(Ok((nodes, ring_size))) => {
                if (nodes.len() as u64) < ring_size {
                    notes.push(format!(
                        "found {} of the {ring_size} nodes in the router's ring in \
                         {MAX_PROBES} owner lookups: the bus counters are theirs only",
                        nodes.len()
                    ));
                }
                let mut out = Vec::new();
                for (id, addr) in nodes {
                    match Target::resolve(&format!("ws://{addr}")).await {
                        Ok(t) => out.push((format!("node {id} ({addr})"), t)),
                        Err(e) => notes.push(format!(
                            "node {id} address {addr:?} unusable ({e:#}): its bus counters \
                             are left out"
                        )),
                    }
                }
                out
            }
            Ok(Err(e)) => {
                notes.push(format!(
                    "bus counters from --url alone ({e}); a router's URL covers every node"
                ));
                vec![(format!("--url ({})", target.authority), target.clone())]
            }
            Err(_) => {
                notes.push("node discovery timed out: bus counters from --url alone".into());
                vec![(format!("--url ({})", target.authority), target.clone())]
            }
        };
        Ok(Probe {
            redis,
            nodes,
            processes,
            notes,
        })
    }
}

/// The nodes of the router's ring (id → address) and the ring's size, found by asking who
/// owns made-up rooms until every node has owned one (or [`MAX_PROBES`] lookups). An error
/// when `target` does not answer owner lookups (it is not a router).
async fn discover_nodes(target: &Target) -> Result<(BTreeMap<u64, String>, u64), String> {
    let mut http = HttpClient::for_target(target);
    let mut found = BTreeMap::new();
    let mut ring_size = 1;
    for i in 0..MAX_PROBES {
        let l = crate::owner::lookup(&mut http, &format!("cost-probe-{i}"))
            .await
            .map_err(|e| format!("{e:#}"))?;
        ring_size = l.ring_size.max(1);
        found.insert(l.owner.id, l.owner.addr);
        if found.len() as u64 >= ring_size {
            break;
        }
    }
    Ok((found, ring_size))
}

fn read_proc(pid: u32) -> Result<ProcStat, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    ProcStat::parse(&text).ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))
}

/// The bus counters of one node's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeBus {
    pub published: f64,
    pub received: f64,
}

/// One process's `/proc` read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcSample {
    pub name: String,
    pub pid: u32,
    pub stat: Result<ProcStat, String>,
}

/// The cluster's counters at one moment.
#[derive(Debug, Clone)]
pub struct ClusterSample {
    pub at: Instant,
    /// `None` without `--redis-url`.
    pub redis: Option<Result<RedisSample, String>>,
    pub nodes: Vec<(String, Result<NodeBus, String>)>,
    pub procs: Vec<ProcSample>,
    /// Clock ticks per second of the `/proc` times.
    pub hz: u64,
}

impl ClusterSample {
    /// Reads `/proc` first (instant), then Redis and every node at once; bounded by
    /// [`SAMPLE_TIMEOUT`] each.
    pub async fn take(probe: &Probe) -> ClusterSample {
        let at = Instant::now();
        let procs = probe
            .processes
            .iter()
            .map(|p| ProcSample {
                name: p.name.clone(),
                pid: p.pid,
                stat: read_proc(p.pid),
            })
            .collect();
        let redis = async {
            match &probe.redis {
                Some(a) => Some(redis_sample(a).await),
                None => None,
            }
        };
        let nodes = async {
            let mut set = JoinSet::new();
            for (i, (_, target)) in probe.nodes.iter().enumerate() {
                let target = target.clone();
                set.spawn(async move { (i, node_bus(&target).await) });
            }
            let mut got: Vec<Option<Result<NodeBus, String>>> = vec![None; probe.nodes.len()];
            while let Some(r) = set.join_next().await {
                if let Ok((i, bus)) = r {
                    got[i] = Some(bus);
                }
            }
            probe
                .nodes
                .iter()
                .zip(got)
                .map(|((name, _), bus)| {
                    (
                        name.clone(),
                        bus.unwrap_or_else(|| Err("sampling task failed".into())),
                    )
                })
                .collect()
        };
        let (redis, nodes) = tokio::join!(redis, nodes);
        ClusterSample {
            at,
            redis,
            nodes,
            procs,
            hz: clock_ticks_per_second(),
        }
    }
}

async fn node_bus(target: &Target) -> Result<NodeBus, String> {
    let text = metrics_scrape::fetch(target, SAMPLE_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    node_bus_from_text(&text)
}

fn node_bus_from_text(text: &str) -> Result<NodeBus, String> {
    // The exporter lists a counter only once it has counted something: a node that never
    // used the bus (a cluster of one) has none, which is 0. A /metrics without any node
    // metric is not a node's.
    if !text.lines().any(|l| l.starts_with("chat_node_")) {
        return Err("/metrics has no chat_node_* metric: not a chat node".into());
    }
    let get = |name: &str| metrics_scrape::metric_sum(text, name).unwrap_or(0.0);
    Ok(NodeBus {
        published: get(m::BUS_PUBLISHED),
        received: get(m::BUS_RECEIVED),
    })
}

/// Redis's share of the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RedisCost {
    pub publish_calls: u64,
    pub publish_per_room_message: Option<f64>,
    /// Every command but the accounting's own (`INFO`, `AUTH`).
    pub commands: u64,
    pub commands_per_room_message: Option<f64>,
    /// Calls per command in the window (those called at least once).
    pub command_calls: BTreeMap<String, u64>,
    /// `total_net_input_bytes` / `total_net_output_bytes` in the window, less the
    /// accounting's own requests and replies.
    pub net_input_bytes: u64,
    pub net_output_bytes: u64,
    pub input_bytes_per_delivery: Option<f64>,
    pub output_bytes_per_delivery: Option<f64>,
    /// `used_cpu_sys + used_cpu_user` in the window.
    pub cpu_s: Option<f64>,
}

/// One node's bus counters in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeBusCost {
    pub node: String,
    pub published: u64,
    pub received: u64,
}

/// The nodes' bus counters, summed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BusCost {
    pub nodes: Vec<NodeBusCost>,
    pub published: u64,
    pub received: u64,
    pub published_per_room_message: Option<f64>,
    pub received_per_room_message: Option<f64>,
}

/// One server process's CPU in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessCpu {
    pub name: String,
    /// `None` for Redis read from `INFO cpu`.
    pub pid: Option<u32>,
    pub cpu_s: f64,
    pub percent_of_core: f64,
    pub cpu_s_per_100k_deliveries: Option<f64>,
    /// Of all the server processes' CPU, when that is known.
    pub share: Option<f64>,
}

/// What the measured window cost the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterCost {
    pub window_s: f64,
    /// Sends accepted (acked) in the window.
    pub room_messages: u64,
    /// What the bench's members received of them.
    pub deliveries: u64,
    pub redis: Option<RedisCost>,
    pub bus: Option<BusCost>,
    /// Per process, from `/proc` (and Redis from `INFO cpu` unless a pid named `redis`).
    pub processes: Vec<ProcessCpu>,
    /// Σ of `processes`; `None` unless every given pid was read at both ends of the window.
    pub all_servers_cpu_s: Option<f64>,
    pub all_servers_cpu_s_per_100k_deliveries: Option<f64>,
    /// The router's (names containing "router") part of `all_servers_cpu_s`.
    pub router_share: Option<f64>,
    pub notes: Vec<String>,
}

fn ratio(n: f64, d: u64) -> Option<f64> {
    (d > 0).then(|| n / d as f64)
}

fn delta(a: u64, b: u64, what: &str, notes: &mut Vec<String>) -> Option<u64> {
    let d = b.checked_sub(a);
    if d.is_none() {
        notes.push(format!(
            "{what} went down during the window (a restart?): n/a"
        ));
    }
    d
}

fn redis_cost(
    a: &RedisSample,
    b: &RedisSample,
    messages: u64,
    deliveries: u64,
    notes: &mut Vec<String>,
) -> Option<RedisCost> {
    let (ai, bi) = (&a.info, &b.info);
    let (Some(in0), Some(in1), Some(out0), Some(out1)) = (
        ai.net_input_bytes,
        bi.net_input_bytes,
        ai.net_output_bytes,
        bi.net_output_bytes,
    ) else {
        notes.push("Redis INFO has no total_net_input_bytes / total_net_output_bytes".into());
        return None;
    };
    // The end sample's request was counted before it read the figures, the start sample's
    // reply after: both fall in the window but are the accounting's, not the cluster's.
    let net_input_bytes =
        delta(in0, in1, "Redis total_net_input_bytes", notes)?.saturating_sub(b.request_bytes);
    let net_output_bytes =
        delta(out0, out1, "Redis total_net_output_bytes", notes)?.saturating_sub(a.reply_bytes);
    let mut command_calls = BTreeMap::new();
    for (cmd, &n1) in &bi.calls {
        let n0 = ai.calls.get(cmd).copied().unwrap_or(0);
        let d = delta(n0, n1, &format!("Redis cmdstat_{cmd} calls"), notes)?;
        if d > 0 && !OWN_COMMANDS.contains(&cmd.as_str()) {
            command_calls.insert(cmd.clone(), d);
        }
    }
    let publish_calls = command_calls.get("publish").copied().unwrap_or(0);
    let commands: u64 = command_calls.values().sum();
    let cpu_s = match (ai.cpu_s, bi.cpu_s) {
        (Some(c0), Some(c1)) if c1 >= c0 => Some(c1 - c0),
        _ => None,
    };
    Some(RedisCost {
        publish_calls,
        publish_per_room_message: ratio(publish_calls as f64, messages),
        commands,
        commands_per_room_message: ratio(commands as f64, messages),
        command_calls,
        net_input_bytes,
        net_output_bytes,
        input_bytes_per_delivery: ratio(net_input_bytes as f64, deliveries),
        output_bytes_per_delivery: ratio(net_output_bytes as f64, deliveries),
        cpu_s,
    })
}

fn bus_cost(
    a: &ClusterSample,
    b: &ClusterSample,
    messages: u64,
    notes: &mut Vec<String>,
) -> Option<BusCost> {
    if b.nodes.is_empty() {
        return None;
    }
    let mut bus = BusCost::default();
    for ((name, s0), (_, s1)) in a.nodes.iter().zip(&b.nodes) {
        match (s0, s1) {
            (Ok(x), Ok(y)) if y.published >= x.published && y.received >= x.received => {
                let node = NodeBusCost {
                    node: name.clone(),
                    published: (y.published - x.published).round() as u64,
                    received: (y.received - x.received).round() as u64,
                };
                bus.published += node.published;
                bus.received += node.received;
                bus.nodes.push(node);
            }
            (Ok(_), Ok(_)) => {
                notes.push(format!(
                    "{name}: bus counters went down (a restart?): bus totals n/a"
                ));
                return None;
            }
            (Err(e), _) | (_, Err(e)) => {
                notes.push(format!("{name}: bus counters n/a ({e}): bus totals n/a"));
                return None;
            }
        }
    }
    bus.published_per_room_message = ratio(bus.published as f64, messages);
    bus.received_per_room_message = ratio(bus.received as f64, messages);
    Some(bus)
}

impl ClusterCost {
    /// The window from `a` to `b`, per `messages` (sends accepted in it) and `deliveries`
    /// (what the bench's members received of them).
    pub fn between(
        a: &ClusterSample,
        b: &ClusterSample,
        messages: u64,
        deliveries: u64,
    ) -> ClusterCost {
        let mut notes = Vec::new();
        let window_s = b.at.saturating_duration_since(a.at).as_secs_f64();
        let redis = match (&a.redis, &b.redis) {
            (Some(Ok(x)), Some(Ok(y))) => redis_cost(x, y, messages, deliveries, &mut notes),
            (Some(Err(e)), _) | (_, Some(Err(e))) => {
                notes.push(format!("Redis figures n/a: {e}"));
                None
            }
            _ => None,
        };
        let bus = bus_cost(a, b, messages, &mut notes);

        let per_100k = |cpu_s: f64| ratio(cpu_s * 100_000.0, deliveries);
        let pct = |cpu_s: f64| {
            if window_s > 0.0 {
                cpu_s / window_s * 100.0
            } else {
                0.0
            }
        };
        let mut processes = Vec::new();
        let mut all_read = !b.procs.is_empty();
        for (p0, p1) in a.procs.iter().zip(&b.procs) {
            let cpu_s = match (&p0.stat, &p1.stat) {
                (Ok(x), Ok(y)) if x.starttime == y.starttime && y.cpu_ticks() >= x.cpu_ticks() => {
                    Some((y.cpu_ticks() - x.cpu_ticks()) as f64 / b.hz.max(1) as f64)
                }
                (Ok(_), Ok(_)) => {
                    notes.push(format!(
                        "{} (pid {}) is another process at the end of the window: its CPU \
                         is n/a",
                        p0.name, p0.pid
                    ));
                    None
                }
                (Err(e), _) | (_, Err(e)) => {
                    notes.push(format!("{} CPU n/a: {e}", p0.name));
                    None
                }
            };
            match cpu_s {
                Some(c) => processes.push(ProcessCpu {
                    name: p0.name.clone(),
                    pid: Some(p0.pid),
                    cpu_s: c,
                    percent_of_core: pct(c),
                    cpu_s_per_100k_deliveries: per_100k(c),
                    share: None,
                }),
                None => all_read = false,
            }
        }
        if b.procs.is_empty() {
            notes.push(
                "CPU of the chat servers n/a: no --server-pids or --pid-dir (they must run on \
                 this machine)"
                    .into(),
            );
        }
        let redis_cpu = redis.as_ref().and_then(|r| r.cpu_s);
        if let Some(c) = redis_cpu.filter(|_| !processes.iter().any(|p| p.name == "redis")) {
            processes.push(ProcessCpu {
                name: "redis".into(),
                pid: None,
                cpu_s: c,
                percent_of_core: pct(c),
                cpu_s_per_100k_deliveries: per_100k(c),
                share: None,
            });
        } else if a.redis.is_some() && redis_cpu.is_none() {
            notes.push("Redis CPU n/a: INFO cpu missing or went down".into());
            all_read = false;
        }
        let all_servers_cpu_s = all_read.then(|| processes.iter().map(|p| p.cpu_s).sum::<f64>());
        if let Some(total) = all_servers_cpu_s.filter(|t| *t > 0.0) {
            for p in &mut processes {
                p.share = Some(p.cpu_s / total);
            }
        }
        let router: Vec<&ProcessCpu> = processes
            .iter()
            .filter(|p| p.name.contains("router"))
            .collect();
        let router_share = all_servers_cpu_s
            .filter(|t| *t > 0.0 && !router.is_empty())
            .map(|t| router.iter().map(|p| p.cpu_s).sum::<f64>() / t);
        ClusterCost {
            window_s,
            room_messages: messages,
            deliveries,
            redis,
            bus,
            all_servers_cpu_s_per_100k_deliveries: all_servers_cpu_s.and_then(per_100k),
            all_servers_cpu_s,
            router_share,
            processes,
            notes,
        }
    }

    /// Two short tables (traffic, CPU) under a heading, then the notes.
    pub fn to_markdown(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n### Cluster cost over the measured window\n\n{:.1} s, {} room messages \
             (sends accepted), {} deliveries to the bench's members.\n",
            self.window_s, self.room_messages, self.deliveries
        );
        let _ = writeln!(
            out,
            "| traffic | total | per room message | per delivery |\n|---|---|---|---|"
        );
        let row = |out: &mut String, name: &str, total: Option<u64>| {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} |",
                total.map_or_else(|| "n/a".into(), |t| t.to_string()),
                fmt_num(total.and_then(|t| ratio(t as f64, self.room_messages))),
                fmt_num(total.and_then(|t| ratio(t as f64, self.deliveries))),
            );
        };
        let r = self.redis.as_ref();
        row(out, "Redis PUBLISH calls", r.map(|r| r.publish_calls));
        row(
            out,
            "Redis commands (all but INFO, AUTH)",
            r.map(|r| r.commands),
        );
        row(out, "Redis bytes in", r.map(|r| r.net_input_bytes));
        row(out, "Redis bytes out", r.map(|r| r.net_output_bytes));
        let b = self.bus.as_ref();
        let nodes = b.map_or(0, |b| b.nodes.len());
        row(
            out,
            &format!("node bus published (Σ {nodes} nodes)"),
            b.map(|b| b.published),
        );
        row(
            out,
            &format!("node bus received (Σ {nodes} nodes)"),
            b.map(|b| b.received),
        );
        let _ = writeln!(
            out,
            "\n| server process | CPU-s | % of a core | CPU-s per 100k deliveries | share |\n\
             |---|---|---|---|---|"
        );
        for p in &self.processes {
            let name = match p.pid {
                Some(pid) => format!("{} (pid {pid})", p.name),
                None => format!("{} (INFO cpu)", p.name),
            };
            let _ = writeln!(
                out,
                "| {name} | {:.2} | {:.1}% | {} | {} |",
                p.cpu_s,
                p.percent_of_core,
                fmt_num(p.cpu_s_per_100k_deliveries),
                fmt_share(p.share)
            );
        }
        let total = self.all_servers_cpu_s;
        let _ = writeln!(
            out,
            "| **all servers** | {} | {} | {} | router {} |",
            total.map_or_else(|| "n/a".into(), |t| format!("{t:.2}")),
            total.filter(|_| self.window_s > 0.0).map_or_else(
                || "n/a".into(),
                |t| format!("{:.1}%", t / self.window_s * 100.0)
            ),
            fmt_num(self.all_servers_cpu_s_per_100k_deliveries),
            fmt_share(self.router_share)
        );
        crate::markdown::notes_md(out, &self.notes);
    }
}

/// `n/a`, or a ratio with about three significant digits.
fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

fn fmt_share(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |s| format!("{:.0}%", s * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Stats\r\n\
total_connections_received:12\r\n\
total_commands_processed:5000\r\n\
total_net_input_bytes:1000000\r\n\
total_net_output_bytes:3000000\r\n\
instantaneous_ops_per_sec:3\r\n\
\r\n\
# CPU\r\n\
used_cpu_sys:1.250000\r\n\
used_cpu_user:2.500000\r\n\
used_cpu_sys_children:0.000000\r\n\
used_cpu_sys_main_thread:1.200000\r\n\
\r\n\
# Commandstats\r\n\
cmdstat_publish:calls=4000,usec=8000,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
cmdstat_client|setname:calls=3,usec=2,usec_per_call=0.67,rejected_calls=0,failed_calls=0\r\n\
cmdstat_info:calls=7,usec=700,usec_per_call=100.00,rejected_calls=0,failed_calls=0\r\n\
cmdstat_broken:usec=1\r\n";

    #[test]
    fn info_text_is_parsed() {
        let i = RedisInfo::parse(INFO);
        assert_eq!(i.net_input_bytes, Some(1_000_000));
        assert_eq!(i.net_output_bytes, Some(3_000_000));
        assert_eq!(
            i.cpu_s,
            Some(3.75),
            "sys + user, not the children or main thread"
        );
        assert_eq!(i.calls.get("publish"), Some(&4000));
        assert_eq!(i.calls.get("client|setname"), Some(&3));
        assert_eq!(i.calls.get("info"), Some(&7));
        assert_eq!(i.calls.get("broken"), None);
        assert_eq!(RedisInfo::parse(""), RedisInfo::default());
    }

    #[test]
    fn bus_counters_not_yet_counted_are_zero() {
        let text = "# TYPE chat_node_connections gauge\nchat_node_connections 3\n\
                    chat_node_bus_received_total 12\n";
        assert_eq!(
            node_bus_from_text(text),
            Ok(NodeBus {
                published: 0.0,
                received: 12.0
            })
        );
        assert!(node_bus_from_text("process_cpu_seconds_total 1\n").is_err());
    }

    #[test]
    fn resp_replies() {
        let max = 1 << 20;
        assert_eq!(
            parse_reply(b"+OK\r\nrest", max),
            Ok(Some((Reply::Simple("OK".into()), 5)))
        );
        assert_eq!(
            parse_reply(b"-ERR unknown\r\n", max),
            Ok(Some((Reply::Error("ERR unknown".into()), 14)))
        );
        assert_eq!(
            parse_reply(b"$5\r\nab\r\nc\r\n", max),
            Ok(Some((Reply::Bulk(b"ab\r\nc".to_vec()), 11))),
            "a bulk string may hold CRLF"
        );
        assert_eq!(parse_reply(b"$-1\r\n", max), Ok(Some((Reply::Nil, 5))));
        assert_eq!(parse_reply(b"$5\r\nab", max), Ok(None), "incomplete");
        assert_eq!(parse_reply(b"$5", max), Ok(None));
        assert_eq!(parse_reply(b"", max), Ok(None));
        assert!(parse_reply(b"$9999999\r\n", max).is_err(), "over the limit");
        assert!(
            parse_reply(b"$2\r\nabXY", max).is_err(),
            "no CRLF after the bulk"
        );
        assert!(parse_reply(b":1\r\n", max).is_err());
        assert!(parse_reply(&[b'+'; 2000], max).is_err(), "no line end");
        assert_eq!(
            encode_command(&["INFO", "stats"]),
            b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n".to_vec()
        );
    }

    #[test]
    fn redis_urls() {
        let a = RedisAddr::parse("redis://127.0.0.1:6390").expect("plain");
        assert_eq!(
            (a.host.as_str(), a.port, a.user, a.password),
            ("127.0.0.1", 6390, None, None)
        );
        let a = RedisAddr::parse("redis://:s3cret@cache.internal/2").expect("password");
        assert_eq!((a.host.as_str(), a.port), ("cache.internal", 6379));
        assert_eq!((a.user, a.password.as_deref()), (None, Some("s3cret")));
        let a = RedisAddr::parse("redis://bench:pw@[::1]:7000").expect("user, v6");
        assert_eq!(
            (a.host.as_str(), a.port, a.user.as_deref()),
            ("::1", 7000, Some("bench"))
        );
        for bad in [
            "127.0.0.1:6390",
            "rediss://h:1",
            "redis://",
            "redis://h:x",
            "redis://[::1",
        ] {
            assert!(RedisAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_pid_lists() {
        assert_eq!(
            parse_server_pids("chat-node-1=10, chat-router=20,").expect("ok"),
            vec![
                ServerProcess {
                    name: "chat-node-1".into(),
                    pid: 10
                },
                ServerProcess {
                    name: "chat-router".into(),
                    pid: 20
                },
            ]
        );
        for bad in ["", "a", "a=0", "a=x", "=3", "a=1,a=2"] {
            assert!(parse_server_pids(bad).is_err(), "{bad:?}");
        }
        let args = ClusterCostArgs {
            server_pids: Some("x".into()),
            ..Default::default()
        };
        assert!(args.validate().expect_err("bad").contains("--server-pids"));
    }

    fn stat(ticks: u64, starttime: u64) -> Result<ProcStat, String> {
        Ok(ProcStat {
            comm: "chat-node".into(),
            utime: ticks / 2,
            stime: ticks - ticks / 2,
            starttime,
        })
    }

    fn redis(input: u64, output: u64, cpu: f64, publish: u64, get: u64) -> RedisSample {
        let mut calls = BTreeMap::from([("publish".to_owned(), publish), ("info".to_owned(), 9)]);
        if get > 0 {
            calls.insert("get".into(), get);
        }
        RedisSample {
            info: RedisInfo {
                net_input_bytes: Some(input),
                net_output_bytes: Some(output),
                cpu_s: Some(cpu),
                calls,
            },
            request_bytes: 40,
            reply_bytes: 3000,
        }
    }

    fn sample(
        at: Instant,
        procs: &[(&str, u64, u64)],
        r: RedisSample,
        bus: (f64, f64),
    ) -> ClusterSample {
        ClusterSample {
            at,
            redis: Some(Ok(r)),
            nodes: vec![
                (
                    "node 1".into(),
                    Ok(NodeBus {
                        published: bus.0,
                        received: bus.1,
                    }),
                ),
                (
                    "node 2".into(),
                    Ok(NodeBus {
                        published: 2.0 * bus.0,
                        received: 0.5 * bus.1,
                    }),
                ),
            ],
            procs: procs
                .iter()
                .enumerate()
                .map(|(i, (name, ticks, start))| ProcSample {
                    name: (*name).into(),
                    pid: 100 + i as u32,
                    stat: stat(*ticks, *start),
                })
                .collect(),
            hz: 100,
        }
    }

    #[test]
    fn cost_arithmetic() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(20);
        let a = sample(
            t0,
            &[("chat-node-1", 1000, 5), ("chat-router", 500, 6)],
            redis(10_000, 50_000, 1.0, 100, 0),
            (10.0, 20.0),
        );
        let b = sample(
            t1,
            &[("chat-node-1", 1600, 5), ("chat-router", 700, 6)],
            redis(10_000 + 200_040, 50_000 + 1_003_000, 3.0, 2100, 5),
            (110.0, 220.0),
        );
        let c = ClusterCost::between(&a, &b, 1000, 100_000);
        assert_eq!(c.window_s, 20.0);
        let r = c.redis.as_ref().expect("redis");
        assert_eq!(r.publish_calls, 2000);
        assert_eq!(r.publish_per_room_message, Some(2.0));
        assert_eq!(r.commands, 2005, "INFO left out");
        assert_eq!(r.command_calls.get("get"), Some(&5));
        assert_eq!(
            r.net_input_bytes, 200_000,
            "the end sample's request left out"
        );
        assert_eq!(
            r.net_output_bytes, 1_000_000,
            "the start sample's reply left out"
        );
        assert_eq!(r.input_bytes_per_delivery, Some(2.0));
        assert_eq!(r.output_bytes_per_delivery, Some(10.0));
        assert_eq!(r.cpu_s, Some(2.0));
        let bus = c.bus.as_ref().expect("bus");
        assert_eq!((bus.published, bus.received), (300, 300));
        assert_eq!(bus.published_per_room_message, Some(0.3));
        // 6 s + 2 s from /proc (100 ticks/s), 2 s of Redis from INFO.
        let names: Vec<&str> = c.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["chat-node-1", "chat-router", "redis"]);
        assert_eq!(c.processes[0].cpu_s, 6.0);
        assert_eq!(c.processes[0].percent_of_core, 30.0);
        assert_eq!(c.processes[0].cpu_s_per_100k_deliveries, Some(6.0));
        assert_eq!(c.processes[2].pid, None);
        assert_eq!(c.all_servers_cpu_s, Some(10.0));
        assert_eq!(c.all_servers_cpu_s_per_100k_deliveries, Some(10.0));
        assert_eq!(c.router_share, Some(0.2));
        assert_eq!(c.processes[0].share, Some(0.6));
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let mut md = String::new();
        c.to_markdown(&mut md);
        assert!(
            md.contains("| Redis PUBLISH calls | 2000 | 2.00 | 0.020 |"),
            "{md}"
        );
        assert!(
            md.contains("| **all servers** | 10.00 | 50.0% | 10.0 | router 20% |"),
            "{md}"
        );
    }

    #[test]
    fn what_cannot_be_known_is_na() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        // The node was restarted (another starttime), the router's pid vanished, Redis
        // restarted (counters went down), one node's /metrics failed at the end.
        let a = sample(
            t0,
            &[("chat-node-1", 1000, 5), ("chat-router", 500, 6)],
            redis(10_000, 50_000, 5.0, 100, 0),
            (10.0, 20.0),
        );
        let mut b = sample(
            t1,
            &[("chat-node-1", 1600, 9), ("chat-router", 700, 6)],
            redis(100, 500, 0.1, 3, 0),
            (110.0, 220.0),
        );
        b.procs[1].stat = Err("/proc/101/stat: No such file".into());
        b.nodes[1].1 = Err("GET /metrics timed out".into());
        let c = ClusterCost::between(&a, &b, 0, 0);
        assert_eq!(c.redis, None);
        assert_eq!(c.bus, None);
        assert!(c.processes.is_empty());
        assert_eq!(c.all_servers_cpu_s, None);
        assert_eq!(c.router_share, None);
        assert!(c.notes.len() >= 4, "{:?}", c.notes);
        let mut md = String::new();
        c.to_markdown(&mut md);
        assert!(
            md.contains("| Redis PUBLISH calls | n/a | n/a | n/a |"),
            "{md}"
        );

        // No pids, no Redis: nothing but the bus, and no division by zero deliveries.
        let mut a = sample(t0, &[], redis(0, 0, 0.0, 0, 0), (1.0, 1.0));
        let mut b = sample(t1, &[], redis(0, 0, 0.0, 0, 0), (2.0, 2.0));
        a.redis = None;
        b.redis = None;
        let c = ClusterCost::between(&a, &b, 10, 0);
        assert_eq!(c.all_servers_cpu_s, None);
        assert_eq!(c.bus.as_ref().map(|b| b.published), Some(3));
        assert_eq!(
            c.bus.as_ref().and_then(|b| b.published_per_room_message),
            Some(0.3)
        );
        assert!(
            c.notes.iter().any(|n| n.contains("--server-pids")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn a_pid_named_redis_replaces_info_cpu() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        let a = sample(t0, &[("redis", 100, 1)], redis(0, 0, 1.0, 0, 0), (0.0, 0.0));
        let b = sample(t1, &[("redis", 400, 1)], redis(0, 0, 9.0, 0, 0), (0.0, 0.0));
        let c = ClusterCost::between(&a, &b, 1, 1);
        assert_eq!(c.processes.len(), 1);
        assert_eq!(c.processes[0].cpu_s, 3.0);
        assert_eq!(c.all_servers_cpu_s, Some(3.0));
        assert_eq!(c.redis.as_ref().and_then(|r| r.cpu_s), Some(8.0));
    }

    #[tokio::test]
    async fn info_over_a_real_socket() {
        // A stand-in Redis on port 0 that answers one INFO after checking its request.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let want = encode_command(&["AUTH", "pw"]);
            let mut got = vec![0; want.len()];
            s.read_exact(&mut got).await.expect("auth");
            assert_eq!(got, want);
            s.write_all(b"+OK\r\n").await.expect("ok");
            let want = encode_command(&["INFO", "stats", "cpu", "commandstats"]);
            let mut got = vec![0; want.len()];
            s.read_exact(&mut got).await.expect("info");
            assert_eq!(got, want);
            // Split writes: the reader must assemble the bulk string.
            let reply = format!("${}\r\n{INFO}\r\n", INFO.len());
            let (x, y) = reply.as_bytes().split_at(7);
            s.write_all(x).await.expect("w");
            s.write_all(y).await.expect("w");
            reply.len()
        });
        let addr = RedisAddr::parse(&format!("redis://:pw@127.0.0.1:{port}")).expect("url");
        let s = redis_sample(&addr).await.expect("sample");
        let reply_len = server.await.expect("server");
        assert_eq!(s.info.calls.get("publish"), Some(&4000));
        assert_eq!(s.reply_bytes, reply_len as u64);
        assert_eq!(
            s.request_bytes,
            (encode_command(&["AUTH", "pw"]).len()
                + encode_command(&["INFO", "stats", "cpu", "commandstats"]).len())
                as u64
        );
    }

    #[test]
    fn pid_dirs() {
        let dir = std::env::temp_dir().join(format!("chat-bench-piddir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("chat-router.pid"), "42\n").expect("w");
        std::fs::write(dir.join("chat-node-1.pid"), "41").expect("w");
        std::fs::write(dir.join("stale.pid"), "").expect("w");
        std::fs::write(dir.join("chat-node-1.log"), "not a pid").expect("w");
        let mut notes = Vec::new();
        let got = read_pid_dir(&dir, &mut notes).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        let names: Vec<(&str, u32)> = got.iter().map(|p| (p.name.as_str(), p.pid)).collect();
        assert_eq!(names, [("chat-node-1", 41), ("chat-router", 42)]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(read_pid_dir(Path::new("/nonexistent/dir"), &mut notes).is_err());
    }
}
