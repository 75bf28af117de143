//! Test harness for scenarios that need a real cluster: a `chat-router` and `chat-node`
//! processes (built from this workspace into the same target directory), membership in the
//! real Redis under a prefix unique to the test, messages in the real CQL server. Addresses
//! are read from each process's JSON log (`--listen 127.0.0.1:0`); nothing waits by sleeping:
//! readiness is polled with a deadline. Children are killed by Drop guards.
//!
//! Scenarios run against one node use a standalone node ([`spawn_standalone_node`]) and the
//! real `chat-bench` binary ([`run_bench`]). Tests that call a scenario in-process parse its
//! flags with [`parse_args`].
//!
//! Tests fail loudly when `CHAT_REDIS_URL` or `CHAT_CQL_NODES` is unset, never skip.
#![allow(dead_code)]

pub mod netns;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chat_bench::client::Target;
use chat_bench::harness::Outcome as _;
use chat_bench::http::HttpClient;

/// Upper bound for anything a test waits for; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(60);
pub const KEYSPACE: &str = "t_chat_bench";
/// Short, so a killed node leaves the ring quickly.
pub const TTL: &str = "1s";

pub fn redis_url() -> String {
    match std::env::var("CHAT_REDIS_URL") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_REDIS_URL is not set: this test needs the real Redis \
             (eval \"$(deploy/local/servers.sh env)\" or deploy/local/test.sh)"
        ),
    }
}

pub fn cql_nodes() -> String {
    match std::env::var("CHAT_CQL_NODES") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_CQL_NODES is not set: this test needs the real CQL server \
             (eval \"$(deploy/local/servers.sh env)\" or deploy/local/test.sh)"
        ),
    }
}

/// A name no other test or earlier run uses.
pub fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    format!(
        "{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `chat-node` and `chat-router` beside `chat-bench`: `cargo test -p chat-bench` builds
/// only this package, so they are built here once per test binary (a no-op when current).
pub fn server_bins() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let bench = Path::new(env!("CARGO_BIN_EXE_chat-bench"));
        let dir = bench.parent().expect("the bench binary has a directory");
        let (profile, target_dir) = build_profile(dir);
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "chat-node", "-p", "chat-router"])
            .args(["--bin", "chat-node", "--bin", "chat-router"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace)
            .status()
            .expect("run cargo build for chat-node and chat-router");
        assert!(status.success(), "building chat-node/chat-router failed");
        let (node, router) = (dir.join("chat-node"), dir.join("chat-router"));
        assert!(
            node.exists() && router.exists(),
            "binaries missing after the build"
        );
        (node, router)
    })
}

/// The cargo profile and target directory that built the binaries in `bin_dir`
/// (`target/debug` is the `dev` profile), so other binaries are built the same way.
pub fn build_profile(bin_dir: &Path) -> (&str, &Path) {
    let profile = match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let target_dir = bin_dir.parent().expect("profile directory has a parent");
    (profile, target_dir)
}

/// Reads a child's output line by line on a thread until `find` returns something, and
/// hands that over; keeps draining afterwards so the child never blocks on a full pipe.
/// `None` when the output ended, or `timeout` passed, first.
pub fn find_in_output<T: Send + 'static>(
    output: impl Read + Send + 'static,
    timeout: Duration,
    mut find: impl FnMut(&str) -> Option<T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(output).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(found) = find(&line) {
                let _ = tx.send(found);
                break;
            }
        }
        for _ in lines {}
    });
    rx.recv_timeout(timeout).ok()
}

/// The bound address a server logs at startup (`fields.addr` of a JSON log line).
pub fn logged_addr(line: &str) -> Option<SocketAddr> {
    let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
    v["fields"]["addr"].as_str()?.parse().ok()
}

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Proc {
    /// Spawns `cmd` and reads its bound address from the JSON log (`fields.addr`).
    pub fn spawn(mut cmd: Command, what: &str) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        match find_in_output(stdout, WAIT, logged_addr) {
            Some(addr) => Proc { child, addr },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not log its address within {WAIT:?}");
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A router and nodes under one membership prefix.
pub struct TestCluster {
    pub prefix: String,
    pub nodes: BTreeMap<u16, Proc>,
    pub router: Proc,
    /// With [`ClusterOptions::logs`]: where each process's output goes.
    log_dir: Option<PathBuf>,
    /// `--membership-ttl` of every process.
    ttl: String,
}

/// How [`TestCluster::start_with`] starts its processes.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra flags for every node (e.g. `--store-timeout 2s`).
    pub node_args: Vec<String>,
    /// `--membership-ttl` of the nodes and the router instead of [`TTL`].
    pub ttl: Option<String>,
    /// Write each process's stdout and stderr to `<tmp>/<prefix>/<what>.log`, kept (and
    /// their place printed) when the test panics or `CHAT_TEST_KEEP_LOGS=1`, removed
    /// otherwise.
    pub logs: bool,
}

impl TestCluster {
    pub async fn start(tag: &str, nodes: u16) -> TestCluster {
        TestCluster::start_with(tag, nodes, ClusterOptions::default()).await
    }

    pub async fn start_with(tag: &str, nodes: u16, opts: ClusterOptions) -> TestCluster {
        let prefix = unique(&format!("t-bench-{tag}"));
        let ttl = opts.ttl.clone().unwrap_or_else(|| TTL.to_owned());
        let log_dir = opts.logs.then(|| {
            let dir = std::env::temp_dir().join(&prefix);
            std::fs::create_dir_all(&dir).expect("create the cluster's log directory");
            dir
        });
        let spawn = |cmd: Command, what: &str| match &log_dir {
            Some(dir) => {
                let (child, addr) = netns::spawn_logged(cmd, what, dir);
                Proc { child, addr }
            }
            None => Proc::spawn(cmd, what),
        };
        let mut started = BTreeMap::new();
        // One at a time: the first creates the schema alone.
        for id in 1..=nodes {
            let mut argv = node_argv(&prefix, id, &ttl);
            argv.extend(opts.node_args.iter().cloned());
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).env_remove("CHAT_LISTEN");
            started.insert(id, spawn(cmd, &format!("chat-node {id}")));
            wait_http_ok(started[&id].addr, "/readyz").await;
        }
        let (_, router_bin) = server_bins();
        let mut cmd = Command::new(router_bin);
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--redis-url", &redis_url(), "--redis-prefix", &prefix])
            .args(["--membership-ttl", &ttl])
            .env_remove("CHAT_LISTEN");
        let router = spawn(cmd, "chat-router");
        let c = TestCluster {
            prefix,
            nodes: started,
            router,
            log_dir,
            ttl,
        };
        c.wait_ring_size(usize::from(nodes)).await;
        c
    }

    /// Where the processes log, with [`ClusterOptions::logs`].
    pub fn log_dir(&self) -> Option<&Path> {
        self.log_dir.as_deref()
    }

    /// What node `id` has logged so far, with [`ClusterOptions::logs`].
    pub fn node_log(&self, id: u16) -> String {
        let dir = self.log_dir.as_ref().expect("a cluster started with logs");
        let path = dir.join(format!("chat-node-{id}.log"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The sum of every sample of metric `name` on node `id`'s `/metrics`.
    pub async fn node_metric(&self, id: u16, name: &str) -> f64 {
        let addr = self.nodes[&id].addr;
        let mut http = HttpClient::new(addr, addr.to_string());
        let answer = http
            .request("GET", "/metrics", None, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("metrics of node {id}: {e}"));
        metric_sum(&String::from_utf8_lossy(&answer.body), name)
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.router.addr)
    }

    /// The argv of node `id` in this cluster, for a test that starts it from a shell.
    pub fn node_argv(&self, id: u16) -> Vec<String> {
        node_argv(&self.prefix, id, &self.ttl)
    }

    /// Waits until the router's ring has `n` nodes.
    pub async fn wait_ring_size(&self, n: usize) {
        wait_json(self.router.addr, "/readyz", |v| {
            v["ring_size"].as_u64() == Some(n as u64)
        })
        .await
        .unwrap_or_else(|| panic!("the router's ring never reached {n} nodes"));
    }

    /// Owner node id of `room` in the router's ring.
    pub async fn owner(&self, room: &str) -> u16 {
        let v = get_json(self.router.addr, &format!("/v1/rooms/{room}/owner"))
            .await
            .expect("owner lookup");
        v["node"]["id"].as_u64().expect("owner id") as u16
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for p in self.nodes.values_mut() {
            p.kill9();
        }
        self.router.kill9();
        if let Some(dir) = &self.log_dir {
            let keep = std::env::var_os("CHAT_TEST_KEEP_LOGS").is_some_and(|v| v == "1");
            if std::thread::panicking() || keep {
                eprintln!(
                    "cluster {}: node and router logs kept in {}",
                    self.prefix,
                    dir.display()
                );
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// The sum of every sample of `name` (any labels) in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn node_argv(prefix: &str, id: u16, ttl: &str) -> Vec<String> {
    let (node_bin, _) = server_bins();
    [
        node_bin.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--log-format".into(),
        "json".into(),
        "--insecure-dev-auth".into(),
        "--node-id".into(),
        id.to_string(),
        "--redis-url".into(),
        redis_url(),
        "--redis-prefix".into(),
        prefix.into(),
        "--membership-ttl".into(),
        ttl.into(),
        "--cql-nodes".into(),
        cql_nodes(),
        "--cql-keyspace".into(),
        KEYSPACE.into(),
    ]
    .into()
}

pub fn spawn_node(prefix: &str, id: u16) -> Proc {
    let argv = node_argv(prefix, id, TTL);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_remove("CHAT_LISTEN");
    Proc::spawn(cmd, &format!("chat-node {id}"))
}

pub async fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let mut c = HttpClient::new(addr, addr.to_string());
    let a = c
        .request("GET", path, None, Duration::from_secs(5))
        .await
        .ok()?;
    if a.status != 200 {
        return None;
    }
    serde_json::from_slice(&a.body).ok()
}

pub async fn wait_http_ok(addr: SocketAddr, path: &str) {
    wait_json(addr, path, |_| true)
        .await
        .unwrap_or_else(|| panic!("{addr}{path} never answered 200"));
}

/// Polls `path` until it answers 200 with JSON for which `ok` holds; `None` after `WAIT`.
pub async fn wait_json(
    addr: SocketAddr,
    path: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Option<()> {
    let deadline = Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if get_json(addr, path).await.is_some_and(|v| ok(&v)) {
            return Some(());
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// Waits for `child` to exit within `timeout`, woken by its exit (a thread blocks in
/// `wait`), not by polling; past the deadline it is killed with SIGKILL. Returns its status
/// and whether it had to be killed.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let pid = child.id().to_string();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = s.spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            status
        });
        let killed = rx.recv_timeout(timeout).is_err();
        if killed {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let status = waiter
            .join()
            .expect("waiter thread")
            .expect("wait for the child");
        (status, killed)
    })
}

pub async fn target(url: &str) -> Target {
    Target::resolve(url).await.expect("target")
}

/// Quotes one argument for `sh`.
pub fn sh_quote(a: &str) -> String {
    format!("'{}'", a.replace('\'', r"'\''"))
}

/// The owner of `room` in a ring of nodes `ids` (the ring hashes node ids only, so a test
/// can tell in advance which rooms a given change moves).
pub fn owner_in_ring(ids: &[u16], room: &str) -> u16 {
    let ring = common::Ring::new(
        ids.iter().map(|&id| common::NodeInfo {
            id,
            addr: String::new(),
            started_at_ms: 0,
            incarnation: 0,
        }),
        common::ring::DEFAULT_VNODES,
    );
    ring.owner_id(room).expect("non-empty ring")
}

/// A fresh room prefix for `rooms` rooms (`<prefix>-<i>`) such that at least one room is
/// owned by `node` in a ring of `ids`: a test of a change to `node` then always has
/// clients to disrupt, instead of passing vacuously when the hash put none there.
pub fn prefix_with_a_room_on(what: &str, rooms: usize, ids: &[u16], node: u16) -> String {
    for _ in 0..1000 {
        let prefix = unique(what);
        if (0..rooms).any(|r| owner_in_ring(ids, &format!("{prefix}-{r}")) == node) {
            return prefix;
        }
    }
    panic!("no prefix puts one of {rooms} rooms on node {node}");
}

/// A fresh name (see [`unique`]) for which `pred` holds.
pub fn unique_where(what: &str, pred: impl Fn(&str) -> bool) -> String {
    for _ in 0..1000 {
        let name = unique(what);
        if pred(&name) {
            return name;
        }
    }
    panic!("no {what} name satisfies the test's condition");
}

/// A standalone chat-node process (its own membership prefix, so it owns every room),
/// killed when dropped.
pub struct StandaloneNode {
    pub addr: SocketAddr,
    child: Child,
}

impl StandaloneNode {
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for StandaloneNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes start one at a time, so the first one in a fresh keyspace creates the schema alone.
static SPAWN: Mutex<()> = Mutex::new(());

/// Starts a chat-node on port 0 with `auth` flags (`--insecure-dev-auth`, or
/// `--jwt-secret S`) against the real CQL store and Redis (its own membership prefix, so
/// it owns every room), and waits until `/readyz` answers 200.
pub fn spawn_standalone_node(auth: &[&str]) -> StandaloneNode {
    let bin = &server_bins().0;
    let _one_at_a_time = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(auth)
        .args(["--cql-nodes", &cql_nodes(), "--cql-keyspace", KEYSPACE])
        .env("CHAT_REDIS_URL", redis_url())
        .env("CHAT_REDIS_PREFIX", unique("bench-test"))
        .env("CHAT_MEMBERSHIP_TTL", "2s")
        .env_remove("CHAT_LISTEN")
        .env_remove("CHAT_INSECURE_DEV_AUTH")
        .env_remove("CHAT_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-node");
    let stdout = child.stdout.take().expect("stdout");
    let Some(addr) = find_in_output(stdout, WAIT, logged_addr) else {
        let _ = child.kill();
        panic!("chat-node did not log its address within {WAIT:?}");
    };
    let node = StandaloneNode { addr, child };
    let ready = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime to poll readiness")
        .block_on(wait_json(addr, "/readyz", |_| true));
    assert!(
        ready.is_some(),
        "chat-node at {addr} not ready within {WAIT:?}: {:?}",
        http_get(addr, "/readyz")
    );
    node
}

/// A plain HTTP/1.0 GET: status and body, or `None` if the server did not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// Runs `chat-bench ARGS --json FILE` to completion (killed and failed after `WAIT`) and
/// returns its exit status and the JSON report.
pub fn run_bench(args: &[&str]) -> (ExitStatus, serde_json::Value) {
    let dir = std::env::temp_dir().join(unique("chat-bench-test"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-bench");
    let (status, killed) = wait_or_kill(&mut child, WAIT * 2);
    assert!(
        !killed,
        "chat-bench {args:?} did not finish within {:?}",
        WAIT * 2
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("chat-bench {args:?} ({status}) wrote no report: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::from_str(&text).expect("the report is JSON");
    (status, report)
}

/// One scenario's arguments as a planner types them (without `chat-bench <scenario>`); a
/// later flag overrides an earlier one, so callers can change a default.
pub fn parse_args<A: clap::Args + clap::FromArgMatches>(argv: &[&str]) -> A {
    let matches = A::augment_args(clap::Command::new("chat-bench").args_override_self(true))
        .try_get_matches_from(std::iter::once("chat-bench").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("arguments {argv:?}: {e}"));
    A::from_arg_matches(&matches).unwrap_or_else(|e| panic!("arguments {argv:?}: {e}"))
}

/// [`parse_args`] with the flags written as one line (no value in it holds a space), then
/// `extra` (values that may).
pub fn parse_line<A: clap::Args + clap::FromArgMatches>(line: &str, extra: &[&str]) -> A {
    let mut v: Vec<&str> = line.split_whitespace().collect();
    v.extend_from_slice(extra);
    parse_args(&v)
}

/// `rebalance` flags for a cluster test: `line`, quiet, fresh rooms under `room_prefix`,
/// read back from the real CQL store, then `extra`.
pub fn rebalance_cql_args(
    line: &str,
    room_prefix: &str,
    extra: &[&str],
) -> chat_bench::rebalance::RebalanceArgs {
    parse_line(
        &format!(
            "{line} --quiet --room-prefix {room_prefix} --cql-nodes {} --cql-keyspace {KEYSPACE}",
            cql_nodes()
        ),
        extra,
    )
}

/// A `fanout` report of a clean run: every member joined, about `sent` sends (pacing may
/// shift one across a window edge), each delivered to all 5 members of its room once and
/// in order, and acked, with no error frame or close from the server.
pub fn assert_clean_fanout(r: &chat_bench::report::Report, joined: u64, sent: u64) {
    let m = &r.messages;
    assert_eq!(r.connections.joined, joined, "{r:#?}");
    assert!(m.sent.abs_diff(sent) <= sent / 10, "{r:#?}");
    assert_eq!(m.expected_deliveries, m.sent * 5);
    assert_eq!(m.delivered, m.expected_deliveries, "{r:#?}");
    let bad = (
        m.lost,
        m.duplicated,
        m.out_of_order,
        m.misrouted,
        m.undecodable,
    );
    assert_eq!(bad, (0, 0, 0, 0, 0), "{r:#?}");
    assert_eq!((m.id_regressions, m.missing_acks), (0, 0), "{r:#?}");
    assert_eq!(m.acks, m.sent, "{r:#?}");
    assert!(
        m.errors.is_empty() && r.connections.closes.is_empty(),
        "{r:#?}"
    );
    assert_eq!(r.e2e_latency_us.count, m.delivered);
}

/// The guarantees every `rebalance` run must show, whatever happened to the cluster, judged
/// from the store: nothing acked lost, no cid stored twice, no gap, nothing out of order or
/// unknown in any member's stream, no duplicate received, every send answered with its
/// first id, every disrupted client resumed.
pub fn assert_rebalance_guarantees(r: &chat_bench::rebalance::RebalanceReport) {
    assert_guarantees_after_losing(r, None);
}

/// [`assert_rebalance_guarantees`] for a run in which node `victim` crashed or was fenced:
/// ids it delivered first and never stored (never acked; their senders resent them) may be
/// unknown to the store, and only those.
pub fn assert_guarantees_after_losing(
    r: &chat_bench::rebalance::RebalanceReport,
    victim: Option<u16>,
) {
    assert_guarantees_unless_minted_by(r, "the lost node", |node| Some(node) == victim);
}

/// [`assert_rebalance_guarantees`] for a run in which every node may have been fenced (a
/// Redis outage lapses every lease): ids delivered first and never stored may have been
/// minted by any node of the cluster (`nodes`), and only by those. Everything else holds as
/// strictly as ever.
pub fn assert_guarantees_after_losing_any(
    r: &chat_bench::rebalance::RebalanceReport,
    nodes: &[u16],
) {
    assert_guarantees_unless_minted_by(r, "a node of the cluster", |node| nodes.contains(&node));
}

/// The guarantees, with ids unknown to the store allowed only when `may_lose` holds for the
/// node that minted them (`who` says which nodes those are, for the message).
fn assert_guarantees_unless_minted_by(
    r: &chat_bench::rebalance::RebalanceReport,
    who: &str,
    may_lose: impl Fn(u16) -> bool,
) {
    let md = r.to_markdown();
    let k = &r.correctness;
    assert_eq!(r.verdict, "PASS", "{md}");
    assert!(r.store_error().is_none(), "{md}");
    assert!(r.read_back.history_error.is_none(), "{md}");
    for (kind, n) in k.failures() {
        assert_eq!(n, 0, "{kind}: {md}");
    }
    for &id in &k.unknown_id_values {
        let node = common::MessageId(id).node();
        assert!(
            may_lose(node),
            "{id} is unknown to the store but was minted by node {node}, not {who}: {md}"
        );
    }
    assert_eq!(r.stream.duplicates, 0, "{md}");
    assert_eq!(r.sends.unanswered, 0, "{md}");
    assert_eq!(r.sends.ack_id_changed, 0, "{md}");
    assert!(r.sends.acked > 0, "{md}");
    assert_eq!(k.acked_checked, r.sends.acked, "{md}");
    assert!(r.disruption.all_resumed, "{md}");
    assert!(r.drained, "{md}");
}
