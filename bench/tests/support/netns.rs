//! Real network partitions for fault tests: a cluster whose `chat-node` processes each run in
//! their own Linux network namespace, reached from the root namespace (where the
//! `chat-router`, the test's clients and the real Redis and CQL server live) over veth pairs
//! that a test cuts and heals with `ip link set <dev> down|up`, the way a partition would.
//!
//! It owns, per cluster: the namespaces, veth pairs and the route that claims the cluster's
//! address block; the child processes; the TCP relays (in this process) that carry each
//! node's Redis traffic across its backend link and its CQL traffic from its own loopback to
//! the real server; the log files. Every one of them is removed on Drop, also while a test
//! panics (the logs are then kept and their place printed), and leftovers of crashed runs
//! (names carrying a dead pid: namespaces and the nodes still in them, links, claims, log
//! directories and the router recorded there) are removed at start.
//! It must not touch anything it did not create: not the shared Redis or CQL server, not
//! another process's namespaces, links or routes (only names and routes of dead pids are
//! cleaned), not the root namespace's other routes; and it judges nothing about the product
//! (fencing, ownership): tests do.
//!
//! Layout of one node `k` (1-based) in a cluster whose block is `10.X.Y.0/24`:
//! - client link `10.X.Y.(8(k-1)+0)/30`: root end `.+1`, namespace end `.+2`. The node
//!   listens on `.+2` and advertises it, so the router and test clients reach it through this
//!   link only.
//! - backend link `10.X.Y.(8(k-1)+4)/30`: root end `.+5` (a relay to the real Redis listens
//!   there; the node gets `--redis-url redis://10.X.Y.(+5):port`), namespace end `.+6`.
//! - CQL: the driver connects to the address the server advertises (127.0.0.1 for the local
//!   Cassandra), so a relay listens on the namespace's own loopback at each contact point of
//!   `CHAT_CQL_NODES` and connects to the real server from the root namespace. This path
//!   does not cross the veths: the store stays reachable through every cut (on purpose;
//!   these partitions are about Redis and clients).
//!
//! Names and addresses, chosen so that concurrent test binaries (and concurrent clusters in
//! one binary) cannot collide:
//! - every name starts with the cluster's stem `cnh<pid, 7 digits><seq, 1 base-36 char>`;
//!   namespaces are `<stem>-<id>`, root-side devices `<stem><id:02>cr` / `<stem><id:02>br`
//!   and their peers `...cn` / `...bn` (15 bytes, the kernel's limit). The pid makes them
//!   unique between processes and tells, after a crash, whose they were; the sequence
//!   number (mod 36) tells apart the clusters of one process (37 alive at once would
//!   collide, and `ip` would fail loudly).
//! - the block is a free `/24` in `10.0.0.0/8`: the first candidate is derived from the pid
//!   and sequence number, the first one that overlaps no IPv4 route of the root namespace is
//!   taken and claimed with `unreachable 10.X.Y.0/24 proto 213 metric <pid>`, all under an
//!   exclusive `flock` on `/run/chat-netns-harness.lock`, so two binaries never pick the same
//!   block. The claim route also keeps a cut link's traffic from leaking to the default
//!   route: while a root end is down, new connections from the root namespace to that node
//!   fail with EHOSTUNREACH, established ones hang (no RST), as across a dead link.
//!
//! Switching namespaces is done only on dedicated threads that end right after (never on a
//! tokio or blocking-pool thread, which would carry the namespace into later tasks), through
//! `rustix`'s safe `setns` wrapper. Tests need root and `ip` (iproute2); without them they
//! fail loudly, they never skip.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs as _};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chat_bench::http::HttpClient;

use super::{cql_nodes, logged_addr, redis_url, server_bins, unique, WAIT};

/// Routing protocol number that marks the harness's block claims (unassigned in
/// `/etc/iproute2/rt_protos`); the claim's metric is the owner's pid.
const CLAIM_PROTO: &str = "213";
const LOCK_FILE: &str = "/run/chat-netns-harness.lock";
const NETNS_DIR: &str = "/run/netns";
const NAME_PREFIX: &str = "cnh";
/// In a cluster's log directory: `<router pid> <membership prefix>`.
const ROUTER_RECORD: &str = "router.pid";
/// Nodes per cluster: a `/24` holds 32 pairs of `/30`s.
pub const MAX_NODES: u16 = 32;

/// What a test asks for.
#[derive(Debug, Clone)]
pub struct NetnsOptions {
    /// Part of the Redis membership prefix, to tell clusters apart in Redis.
    pub tag: String,
    /// Nodes `1..=nodes`, at most [`MAX_NODES`].
    pub nodes: u16,
    /// CQL keyspace the nodes write to.
    pub keyspace: String,
    /// `--membership-ttl` of every node and the router.
    pub membership_ttl: String,
    /// Appended to every node's arguments (must not repeat a flag the harness sets).
    pub node_args: Vec<String>,
    /// Appended to the router's arguments.
    pub router_args: Vec<String>,
}

impl NetnsOptions {
    pub fn new(tag: &str, nodes: u16, keyspace: &str) -> NetnsOptions {
        NetnsOptions {
            tag: tag.into(),
            nodes,
            keyspace: keyspace.into(),
            membership_ttl: "1s".into(),
            node_args: Vec::new(),
            router_args: Vec::new(),
        }
    }
}

/// One node in its namespace.
pub struct NetnsNode {
    pub id: u16,
    /// The namespace's name (`ip netns exec <netns> ...` runs a command beside the node).
    pub netns: String,
    /// Where the node listens and what it advertises: its end of the client link.
    pub addr: SocketAddr,
    /// The relay to the real Redis on the root end of the backend link, as the node sees it.
    pub redis_relay: SocketAddr,
    /// Root-side device of the client link.
    pub client_dev: String,
    /// Root-side device of the backend link.
    pub backend_dev: String,
    child: Option<Child>,
}

impl NetnsNode {
    /// The chat-node's pid (`ip netns exec` execs in place), e.g. for SIGSTOP.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

/// A router in the root namespace and nodes in their own namespaces; see the module doc.
pub struct NetnsCluster {
    /// Redis key prefix of the cluster's membership.
    pub prefix: String,
    stem: String,
    block: Ipv4Addr,
    claimed: bool,
    nodes: BTreeMap<u16, NetnsNode>,
    /// Namespaces created, removed on drop (a node's entry appears once it is started).
    netns: Vec<String>,
    /// Root-side devices created (deleting one end of a veth deletes the pair).
    devs: Vec<String>,
    router: Option<Child>,
    router_addr: Option<SocketAddr>,
    relays: Option<Relays>,
    log_dir: PathBuf,
}

/// The names and block of a cluster, to check after it is dropped that nothing is left.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub stem: String,
    pub block: Ipv4Addr,
}

impl Footprint {
    /// Namespaces, links and routes of this cluster that still exist.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out: Vec<String> = list_netns()
            .into_iter()
            .chain(list_links())
            .filter(|n| n.starts_with(&self.stem))
            .collect();
        let block = u32::from(self.block);
        out.extend(
            list_routes()
                .into_iter()
                .filter(|r| {
                    r["dst"]
                        .as_str()
                        .and_then(parse_prefix)
                        .is_some_and(|p| overlaps_block(p, block))
                })
                .map(|r| format!("route {r}")),
        );
        out
    }
}

impl NetnsCluster {
    /// Creates the namespaces and links, starts the relays, then the nodes one at a time
    /// (each ready before the next: the first creates the schema alone) and the router, and
    /// waits until the router's ring holds every node.
    pub async fn start(opts: NetnsOptions) -> NetnsCluster {
        require_root_and_ip();
        assert!(
            (1..=MAX_NODES).contains(&opts.nodes),
            "a netns cluster has 1..={MAX_NODES} nodes, not {}",
            opts.nodes
        );
        let (redis, cql) = (redis_url(), cql_nodes());
        let redis_target = RedisTarget::parse(&redis);
        let cql_points = loopback_contact_points(&cql);
        server_bins();

        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let stem = format!(
            "{NAME_PREFIX}{pid:07}{}",
            char::from_digit(seq % 36, 36).expect("a base-36 digit")
        );
        let log_dir = std::env::temp_dir().join(&stem);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir).expect("create the cluster's log directory");
        let mut c = NetnsCluster {
            prefix: unique(&format!("t-netns-{}", opts.tag)),
            stem,
            block: Ipv4Addr::UNSPECIFIED,
            claimed: false,
            nodes: BTreeMap::new(),
            netns: Vec::new(),
            devs: Vec::new(),
            router: None,
            router_addr: None,
            relays: None,
            log_dir,
        };
        {
            let _lock = HarnessLock::take();
            clean_dead_leftovers();
            c.block = free_block(pid, seq);
            ip_ok(&c.claim_route_args("add"));
            c.claimed = true;
            for id in 1..=opts.nodes {
                c.create_links(id);
            }
        }

        let relays = c.relays.insert(Relays::start());
        let mut redis_relays = BTreeMap::new();
        for id in 1..=opts.nodes {
            let netns = format!("{}-{id}", c.stem);
            let at = SocketAddr::V4(SocketAddrV4::new(block_addr(c.block, id, 5), 0));
            redis_relays.insert(id, relays.listen_root(at, redis_target.addr));
            for &point in &cql_points {
                relays.listen_in_netns(&netns, point, point);
            }
        }

        let ttl = opts.membership_ttl.as_str();
        for id in 1..=opts.nodes {
            let relay = redis_relays[&id];
            let netns = c.netns_name(id);
            let listen = SocketAddr::V4(SocketAddrV4::new(c.addr(id, 2), 0));
            let (node_bin, _) = server_bins();
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &netns])
                .arg(node_bin)
                .args(["--listen", &listen.to_string(), "--log-format", "json"])
                .args(["--insecure-dev-auth", "--node-id", &id.to_string()])
                .args(["--redis-url", &redis_target.url_via(relay)])
                .args(["--redis-prefix", &c.prefix, "--membership-ttl", ttl])
                .args(["--cql-nodes", &cql, "--cql-keyspace", &opts.keyspace])
                .args(&opts.node_args);
            let (child, addr) = spawn_logged(cmd, &format!("chat-node {id}"), &c.log_dir);
            c.nodes.insert(
                id,
                NetnsNode {
                    id,
                    netns,
                    addr,
                    redis_relay: relay,
                    client_dev: c.dev(id, "cr"),
                    backend_dev: c.dev(id, "br"),
                    child: Some(child),
                },
            );
            assert_eq!(
                addr.ip(),
                listen.ip(),
                "chat-node {id} logged an address off its client link"
            );
            // `ip netns exec` execs in place: the child's pid is the node's (SIGSTOP tests).
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.node(id).pid()))
                .unwrap_or_default();
            assert_eq!(
                comm.trim(),
                "chat-node",
                "node {id}'s child is not the chat-node process itself"
            );
            let ready = eventually(WAIT, || async move {
                http_json(addr, "/readyz", Duration::from_secs(2))
                    .await
                    .is_some_and(|(status, _)| status == 200)
            })
            .await;
            assert!(
                ready,
                "chat-node {id} at {addr} (netns {}) not ready within {WAIT:?}; log in {}",
                c.netns_name(id),
                c.log_dir.display()
            );
        }

        let (_, router_bin) = server_bins();
        let mut cmd = Command::new(router_bin);
        cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--redis-url", &redis, "--redis-prefix", &c.prefix])
            .args(["--membership-ttl", ttl])
            .args(&opts.router_args);
        let (router, addr) = spawn_logged(cmd, "chat-router", &c.log_dir);
        // The router lives in the root namespace, where no name marks it as ours: this
        // record lets the next run stop it if this process dies without dropping `c`.
        let record = format!("{} {}\n", router.id(), c.prefix);
        c.router = Some(router);
        std::fs::write(c.log_dir.join(ROUTER_RECORD), record).expect("record the router's pid");
        c.router_addr = Some(addr);
        c.wait_ring_size(usize::from(opts.nodes)).await;
        c
    }

    pub fn router_addr(&self) -> SocketAddr {
        self.router_addr.expect("the router is started")
    }

    /// `ws://` URL of the router.
    pub fn url(&self) -> String {
        format!("ws://{}", self.router_addr())
    }

    pub fn node(&self, id: u16) -> &NetnsNode {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    pub fn node_ids(&self) -> Vec<u16> {
        self.nodes.keys().copied().collect()
    }

    /// Where the node logs (stdout and stderr of `chat-node <id>` / `chat-router`).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn footprint(&self) -> Footprint {
        Footprint {
            stem: self.stem.clone(),
            block: self.block,
        }
    }

    /// Cuts node `id` off Redis: its connections to the relay hang, new ones fail.
    pub fn cut_backend(&self, id: u16) {
        run_sh(&self.cut_backend_command(id));
    }

    pub fn heal_backend(&self, id: u16) {
        run_sh(&self.heal_backend_command(id));
    }

    /// Cuts node `id` off the router and every client in the root namespace.
    pub fn cut_clients(&self, id: u16) {
        run_sh(&self.cut_clients_command(id));
    }

    pub fn heal_clients(&self, id: u16) {
        run_sh(&self.heal_clients_command(id));
    }

    /// Shell commands doing the same, for `chat-bench rebalance --cut-command ...`.
    pub fn cut_backend_command(&self, id: u16) -> String {
        link_command(&self.node(id).backend_dev, "down")
    }

    pub fn heal_backend_command(&self, id: u16) -> String {
        link_command(&self.node(id).backend_dev, "up")
    }

    pub fn cut_clients_command(&self, id: u16) -> String {
        link_command(&self.node(id).client_dev, "down")
    }

    pub fn heal_clients_command(&self, id: u16) -> String {
        link_command(&self.node(id).client_dev, "up")
    }

    /// A TCP connect from inside node `id`'s namespace (a dedicated thread switched into
    /// it), bounded by `timeout`; `Ok` when it completed.
    pub async fn connect_from_node(
        &self,
        id: u16,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<()> {
        let netns = self.node(id).netns.clone();
        in_netns_async(&netns, move || {
            TcpStream::connect_timeout(&to, timeout).map(drop)
        })
        .await
        .and_then(|r| r)
    }

    /// Waits until the router's ring has `n` nodes.
    pub async fn wait_ring_size(&self, n: usize) {
        let router = self.router_addr();
        let ok = eventually(WAIT, || async move {
            http_json(router, "/readyz", Duration::from_secs(2))
                .await
                .is_some_and(|(_, v)| v["ring_size"].as_u64() == Some(n as u64))
        })
        .await;
        assert!(ok, "the router's ring never reached {n} nodes in {WAIT:?}");
    }

    /// Owner node id of `room` in the router's ring.
    pub async fn owner(&self, room: &str) -> u16 {
        let path = format!("/v1/rooms/{room}/owner");
        let (_, v) = http_json(self.router_addr(), &path, Duration::from_secs(5))
            .await
            .expect("owner lookup through the router");
        v["node"]["id"]
            .as_u64()
            .and_then(|id| u16::try_from(id).ok())
            .unwrap_or_else(|| panic!("owner lookup answered {v}"))
    }

    fn netns_name(&self, id: u16) -> String {
        format!("{}-{id}", self.stem)
    }

    /// `<stem><id:02><kind>`: `cr`/`cn` client link root/namespace end, `br`/`bn` backend.
    fn dev(&self, id: u16, kind: &str) -> String {
        let name = format!("{}{id:02}{kind}", self.stem);
        debug_assert!(name.len() <= 15, "interface name {name} is too long");
        name
    }

    fn addr(&self, id: u16, offset: u8) -> Ipv4Addr {
        block_addr(self.block, id, offset)
    }

    fn claim_route_args(&self, verb: &str) -> Vec<String> {
        [
            "route",
            verb,
            "unreachable",
            &format!("{}/24", self.block),
            "proto",
            CLAIM_PROTO,
            "metric",
            &std::process::id().to_string(),
        ]
        .map(str::to_owned)
        .into()
    }

    fn create_links(&mut self, id: u16) {
        let netns = self.netns_name(id);
        ip_ok(&["netns", "add", &netns]);
        self.netns.push(netns.clone());
        ip_ok(&["-n", &netns, "link", "set", "lo", "up"]);
        for (kind, offset) in [("c", 0u8), ("b", 4)] {
            let (root, inner) = (
                self.dev(id, &format!("{kind}r")),
                self.dev(id, &format!("{kind}n")),
            );
            ip_ok(&[
                "link", "add", &root, "type", "veth", "peer", "name", &inner, "netns", &netns,
            ]);
            self.devs.push(root.clone());
            let root_addr = format!("{}/30", self.addr(id, offset + 1));
            let inner_addr = format!("{}/30", self.addr(id, offset + 2));
            ip_ok(&["addr", "add", &root_addr, "dev", &root]);
            ip_ok(&["-n", &netns, "addr", "add", &inner_addr, "dev", &inner]);
            ip_ok(&["link", "set", "dev", &root, "up"]);
            ip_ok(&["-n", &netns, "link", "set", "dev", &inner, "up"]);
        }
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        // Processes first (a SIGSTOPped one dies of SIGKILL too), then the relays (their
        // sockets hold the namespaces), then the links, namespaces and the claim.
        if let Some(mut r) = self.router.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        drop(self.relays.take());
        for netns in &self.netns {
            kill_netns_pids(netns);
        }
        for dev in &self.devs {
            ip_quiet(&["link", "del", "dev", dev]);
        }
        for netns in &self.netns {
            ip_quiet(&["netns", "del", netns]);
        }
        if self.claimed {
            let args = self.claim_route_args("del");
            ip_quiet(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        if std::thread::panicking() {
            eprintln!(
                "netns cluster {}: node and router logs kept in {}",
                self.stem,
                self.log_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// Polls `check` every 50 ms until it holds (true) or `within` passed (false).
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// GET `path` within `timeout`: status and JSON body (also for 503s, which carry one).
pub async fn http_json(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Option<(u16, serde_json::Value)> {
    let mut c = HttpClient::new(addr, addr.to_string());
    let a = c.request("GET", path, None, timeout).await.ok()?;
    Some((a.status, serde_json::from_slice(&a.body).ok()?))
}

fn require_root_and_ip() {
    assert!(
        rustix::process::geteuid().is_root(),
        "netns tests need root (network namespaces and veth pairs); run them as root"
    );
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("`ip -V` failed ({}): iproute2 is needed", o.status),
        Err(e) => panic!("`ip` (iproute2) is needed for netns tests and was not found: {e}"),
    }
}

/// Address `offset` (0-7) of node `id`'s eight in `block`.
fn block_addr(block: Ipv4Addr, id: u16, offset: u8) -> Ipv4Addr {
    let [a, b, c, _] = block.octets();
    let base = u8::try_from((id - 1) * 8).expect("at most 32 nodes");
    Ipv4Addr::new(a, b, c, base + offset)
}

fn link_command(dev: &str, state: &str) -> String {
    format!("ip link set dev {dev} {state}")
}

fn run_sh(command: &str) {
    let out = Command::new("sh")
        .args(["-c", command])
        .output()
        .unwrap_or_else(|e| panic!("run `{command}`: {e}"));
    assert!(
        out.status.success(),
        "`{command}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip ARGS` and panics with its error when it fails.
fn ip_ok<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    ip(&args).unwrap_or_else(|e| panic!("`ip {}` failed: {e}", args.join(" ")))
}

/// For teardown: never panics (Drop may run while a test panics), reports what failed.
fn ip_quiet(args: &[&str]) {
    if let Err(e) = ip(args) {
        // A device is already gone when its pair's other end or its namespace went first.
        if !e.contains("Cannot find device") {
            eprintln!("netns cleanup: `ip {}` failed: {e}", args.join(" "));
        }
    }
}

fn ip_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = ip(&full).unwrap_or_default();
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&text).unwrap_or_default()
}

fn list_netns() -> Vec<String> {
    ip_json(&["netns", "list"])
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

fn list_links() -> Vec<String> {
    ip_json(&["link", "show"])
        .iter()
        .filter_map(|v| v["ifname"].as_str().map(str::to_owned))
        .collect()
}

fn list_routes() -> Vec<serde_json::Value> {
    ip_json(&["-4", "route", "show", "table", "all"])
}

fn kill_netns_pids(netns: &str) {
    for pid in ip(&["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// The pid a harness name carries (`cnh` + 7 digits), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(NAME_PREFIX)?.get(..7)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())?
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what crashed runs left: namespaces (and the processes still in them), links and
/// claims whose pid is dead. A live pid's things are never touched (if a pid was reused
/// they stay until it is free again). Runs under the harness lock.
fn clean_dead_leftovers() {
    // Routers of dead runs, recorded in their log directories (`<tmp>/<stem>`); a pid is
    // killed only if it still runs chat-router with that run's unique membership prefix.
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dead_run = owner_pid(&name).is_some_and(|p| !pid_alive(p));
        if name.len() != NAME_PREFIX.len() + 8 || !dead_run {
            continue;
        }
        let record = std::fs::read_to_string(entry.path().join(ROUTER_RECORD)).unwrap_or_default();
        if let Some((pid, prefix)) = record.trim().split_once(' ') {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let ours = args.first().is_some_and(|a| a.ends_with(b"/chat-router"))
                && args.contains(&prefix.as_bytes());
            if ours {
                eprintln!("netns harness: stopping chat-router {pid} left by a dead run");
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
    for netns in list_netns() {
        if owner_pid(&netns).is_some_and(|p| !pid_alive(p)) {
            eprintln!("netns harness: removing namespace {netns} left by a dead run");
            kill_netns_pids(&netns);
            ip_quiet(&["netns", "del", &netns]);
        }
    }
    for dev in list_links() {
        // `ip -j link` names a veth end without its `@peer`.
        if owner_pid(&dev).is_some_and(|p| !pid_alive(p)) {
            eprintln!("netns harness: removing link {dev} left by a dead run");
            ip_quiet(&["link", "del", "dev", &dev]);
        }
    }
    for route in ip_json(&["-4", "route", "show", "proto", CLAIM_PROTO]) {
        let (Some(dst), Some(pid)) = (route["dst"].as_str(), route["metric"].as_u64()) else {
            continue;
        };
        let Ok(pid) = u32::try_from(pid) else {
            continue;
        };
        if route["type"].as_str() == Some("unreachable") && !pid_alive(pid) {
            eprintln!("netns harness: removing block claim {dst} left by dead pid {pid}");
            let metric = pid.to_string();
            ip_quiet(&[
                "route",
                "del",
                "unreachable",
                dst,
                "proto",
                CLAIM_PROTO,
                "metric",
                &metric,
            ]);
        }
    }
}

/// A `/24` of 10.0.0.0/8 that overlaps no IPv4 route of the root namespace (main, local and
/// every other table), starting from a candidate derived from `pid` and `seq`.
fn free_block(pid: u32, seq: u32) -> Ipv4Addr {
    let taken: Vec<(u32, u32)> = list_routes()
        .iter()
        .filter_map(|r| parse_prefix(r["dst"].as_str()?))
        .collect();
    let start = pid.wrapping_mul(37).wrapping_add(seq) % 65536;
    for i in 0..65536 {
        let n = (start + i) % 65536;
        let block = u32::from(Ipv4Addr::new(10, 0, 0, 0)) | (n << 8);
        if !taken.iter().any(|&p| overlaps_block(p, block)) {
            return Ipv4Addr::from(block);
        }
    }
    panic!("no /24 in 10.0.0.0/8 is free of routes in the root namespace");
}

/// Whether the prefix (network, length) and the `/24` at `block` share an address.
fn overlaps_block((net, len): (u32, u32), block: u32) -> bool {
    let bits = len.min(24);
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    net & mask == block & mask
}

/// `a.b.c.d[/len]` as (network, length); `default` is not a prefix worth avoiding.
fn parse_prefix(dst: &str) -> Option<(u32, u32)> {
    let (addr, len) = match dst.split_once('/') {
        Some((a, l)) => (a, l.parse().ok()?),
        None => (dst, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    Some((u32::from(addr), len))
}

/// An exclusive `flock` that serializes choosing blocks and cleaning leftovers between
/// every process using this harness (released when dropped).
struct HarnessLock(File);

impl HarnessLock {
    fn take() -> HarnessLock {
        let file = File::options()
            .create(true)
            .append(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("flock {LOCK_FILE}: {e}"));
        HarnessLock(file)
    }
}

impl Drop for HarnessLock {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(&self.0, rustix::fs::FlockOperation::Unlock);
    }
}

/// Moves the calling thread into network namespace `netns` for the rest of its life.
fn enter_netns(netns: &str) -> std::io::Result<()> {
    let ns = File::open(Path::new(NETNS_DIR).join(netns))?;
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// Runs `f` on a new thread inside `netns` and waits for it (quick things only: it blocks).
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let netns = netns.to_owned();
    std::thread::spawn(move || enter_netns(&netns).map(|()| f()))
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
}

/// Like [`in_netns`], awaiting the thread instead of blocking on it.
async fn in_netns_async<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(enter_netns(&netns).map(|()| f()));
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
}

/// TCP relays, run by a current-thread runtime on one thread of the root namespace (so the
/// upstream side always connects from there). Dropping it stops that runtime on its thread,
/// which closes every listener and relayed connection before Drop returns.
struct Relays {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relays {
    fn start() -> Relays {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the relays");
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-relays".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                drop(rt);
            })
            .expect("spawn the relay thread");
        Relays {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Relays connections accepted on `at` (root namespace; port 0 picks one) to `upstream`;
    /// returns the bound address.
    fn listen_root(&self, at: SocketAddr, upstream: SocketAddr) -> SocketAddr {
        let listener = std::net::TcpListener::bind(at)
            .unwrap_or_else(|e| panic!("bind the relay to {upstream} on {at}: {e}"));
        let bound = listener.local_addr().expect("the relay's address");
        self.serve(listener, upstream);
        bound
    }

    /// Relays connections accepted on `at` inside `netns` to `upstream` (from the root
    /// namespace).
    fn listen_in_netns(&self, netns: &str, at: SocketAddr, upstream: SocketAddr) {
        let listener = in_netns(netns, move || std::net::TcpListener::bind(at))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("bind the relay to {upstream} on {at} in {netns}: {e}"));
        self.serve(listener, upstream);
    }

    fn serve(&self, listener: std::net::TcpListener, upstream: SocketAddr) {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        self.handle.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return eprintln!("relay to {upstream}: {e}"),
            };
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    // Out of descriptors or similar: give it a moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let connect = tokio::net::TcpStream::connect(upstream);
                    let Ok(Ok(mut out)) =
                        tokio::time::timeout(Duration::from_secs(5), connect).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = out.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                });
            }
        });
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where `CHAT_REDIS_URL` points, and how to write the same URL through a relay.
struct RedisTarget {
    /// `redis://` plus userinfo (`user:pass@`), if any.
    head: String,
    addr: SocketAddr,
    /// The path (database), if any.
    tail: String,
}

impl RedisTarget {
    fn parse(url: &str) -> RedisTarget {
        let rest = url.strip_prefix("redis://").unwrap_or_else(|| {
            panic!("CHAT_REDIS_URL={url}: the netns harness relays plain redis:// URLs only")
        });
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let hostport = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:6379")
        };
        let addr = hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("CHAT_REDIS_URL={url}: cannot resolve {hostport}"));
        RedisTarget {
            head: format!("redis://{userinfo}"),
            addr,
            tail: tail.to_owned(),
        }
    }

    fn url_via(&self, relay: SocketAddr) -> String {
        format!("{}{relay}{}", self.head, self.tail)
    }
}

/// `CHAT_CQL_NODES` as addresses; each must be on loopback, where a namespace can have a
/// relay of its own (the server must advertise the same address, as the local one does).
fn loopback_contact_points(nodes: &str) -> Vec<SocketAddr> {
    let points: Vec<SocketAddr> = nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let addr = n
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.find(SocketAddr::is_ipv4))
                .unwrap_or_else(|| panic!("CHAT_CQL_NODES: cannot resolve {n} (host:port)"));
            assert!(
                addr.ip().is_loopback(),
                "CHAT_CQL_NODES: {n} is not on loopback; the netns harness relays CQL from each \
                 namespace's own loopback to the server, so it supports loopback servers only"
            );
            addr
        })
        .collect();
    assert!(!points.is_empty(), "CHAT_CQL_NODES names no server");
    points
}

/// Spawns `cmd` with every `CHAT_*` variable removed (flags say everything), its stdout and
/// stderr written to `<log_dir>/<what>.log`, and waits for the address it logs.
pub fn spawn_logged(mut cmd: Command, what: &str, log_dir: &Path) -> (Child, SocketAddr) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHAT_") {
            cmd.env_remove(k);
        }
    }
    let path = log_dir.join(format!("{}.log", what.replace(' ', "-")));
    let log = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let stderr = log.try_clone().expect("clone the log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = log;
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if let Some(addr) = logged_addr(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    match rx.recv_timeout(WAIT) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not log its address within {WAIT:?}; see {}",
                path.display()
            );
        }
    }
}
