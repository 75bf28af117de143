//! Redis failing under a cluster whose members are all bridged: a router and three
//! chat-nodes, `chat-bench rebalance --bridged` load (every member connected through a home
//! room on another node than its room's owner, so every frame crosses Redis), judged by
//! the CQL store.
//!
//! - **Redis frozen** (SIGSTOP for 3 s, longer than the 1 s membership TTL): every lease
//!   lapses, every node fences all its rooms (nothing it queued is stored, its connections
//!   are closed) and registers again once Redis answers.
//! - **Redis restarted empty** (`deploy/local/servers.sh stop redis`, then `start redis`; the
//!   local Redis keeps nothing on disk), under a membership TTL the restart fits in: the
//!   leases are still valid when Redis is back, so what fences every node is its key having
//!   vanished (its next renewal finds nothing to renew), not the clock. Meanwhile the first
//!   nodes to register again see the others' rooms as theirs, while those others still
//!   hold valid leases: the case "one owner at a time" must survive.
//!
//! In both, nothing acked is lost, nothing is stored twice, no member misses a stored
//! message or sees the store's order broken, every client resumes and every send is
//! answered. Ids delivered but never stored (never acked: their senders resend them) may
//! come from any node, since every node was fenced.
//!
//! Its own test binary because it freezes and restarts the shared local Redis: its tests
//! run one at a time, and Redis is continued and started again whatever happens. From a
//! worktree other than the checkout that started the servers, point `CHAT_STATE_DIR` at that
//! checkout's `deploy/local/.state`.

mod support;

use std::process::Command;
use std::time::Duration;

use chat_bench::harness::Outcome as _;
use chat_bench::rebalance::{RebalanceArgs, RebalanceReport};
use support::*;

const SERVERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/servers.sh");
const NODES: [u16; 3] = [1, 2, 3];
const ROOMS: usize = 6;
const MEMBERS: usize = 3;
/// The whole scenario, start-up and read-back included.
const WHOLE_RUN: Duration = Duration::from_secs(240);

/// The tests share one Redis.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `servers.sh ARGS`; its success and stdout (its log lines go to the test's stderr).
fn servers(args: &[&str]) -> (bool, String) {
    let out = Command::new("bash")
        .arg(SERVERS)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {SERVERS} {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The pid the local Redis runs as now (it changes on every restart), from `servers.sh env`.
fn redis_pid() -> u32 {
    let (ok, env) = servers(&["env"]);
    assert!(ok, "servers.sh env failed");
    env.lines()
        .find_map(|l| l.strip_prefix("export CHAT_REDIS_PID="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "servers.sh env names no running Redis of ours (is CHAT_STATE_DIR the \
                 servers' state directory?):\n{env}"
            )
        })
}

/// The shared local Redis for one test: running when taken, and continued and started
/// again when dropped, whatever the test did to it.
struct SharedRedis {
    pid: u32,
}

impl SharedRedis {
    fn take() -> SharedRedis {
        assert!(
            std::env::var("CHAT_REDIS_PID").is_ok_and(|p| !p.trim().is_empty()),
            "CHAT_REDIS_PID is not set: this test freezes and restarts the local Redis that \
             deploy/local/servers.sh runs (eval \"$(deploy/local/servers.sh env)\" or \
             deploy/local/test.sh)"
        );
        let (ok, _) = servers(&["start", "redis"]);
        assert!(ok, "servers.sh start redis failed");
        SharedRedis { pid: redis_pid() }
    }
}

impl Drop for SharedRedis {
    fn drop(&mut self) {
        // Still the Redis it was (not restarted, its pid not reused): it may be stopped.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("redis-server") {
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid.to_string()])
                .status();
        }
        let (ok, _) = servers(&["start", "redis"]);
        if !ok {
            eprintln!(
                "redis_faults: could not start the local Redis again: run {SERVERS} start redis"
            );
        }
    }
}

/// The state letter of /proc/PID/stat (`T` when stopped).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = stat.rsplit_once(") ").expect("stat format").1;
    after.chars().next().expect("state")
}

fn args(url: &str, room_prefix: &str, extra: &[&str]) -> RebalanceArgs {
    let line = format!(
        "--url {url} --bridged --rooms {ROOMS} --members {MEMBERS} --rate 4 --duration 14 \
         --dead-after 2 --drain 45"
    );
    rebalance_cql_args(&line, room_prefix, extra)
}

/// `ttl`: the membership TTL, [`TTL`] when `None`.
async fn cluster(tag: &str, ttl: Option<&str>) -> TestCluster {
    let opts = ClusterOptions {
        // The wait after a departed owner is the store timeout: short, so the test is.
        node_args: vec!["--store-timeout".into(), "2s".into()],
        ttl: ttl.map(str::to_owned),
        logs: true,
    };
    TestCluster::start_with(tag, NODES.len() as u16, opts).await
}

/// The restart test's membership TTL: `servers.sh stop redis && servers.sh start redis`
/// takes about 2 s here, and a lease stays valid for 90% of the TTL after its last renewal
/// (every TTL/4), so with 8 s it outlives the outage with room to spare on a loaded machine.
const RESTART_TTL: &str = "8s";

/// What both faults must leave behind: the guarantees, judged by CQL, with every member
/// bridged, every node fenced and back, and every member resumed.
async fn assert_survived(c: &TestCluster, r: &RebalanceReport) {
    let md = r.to_markdown();
    assert_eq!(r.correctness.judged_by, "cql", "{md}");
    assert_guarantees_after_losing_any(r, &NODES);
    assert_eq!(r.sends.rejected, 0, "no send was refused for good: {md}");
    // Every member was bridged at the start.
    let total = (ROOMS * MEMBERS) as u64;
    let b = r
        .bridged
        .as_ref()
        .expect("--bridged reports the members bridged");
    assert_eq!(
        (b.members, b.bridged, b.ring_size),
        (total, total, 3),
        "{md}"
    );
    // Every node lost its lease and fenced itself, so every connection (each lives on
    // its home room's node) was closed and resumed.
    for id in NODES {
        let lost = c.node_metric(id, "chat_node_lease_lost_total").await;
        assert!(lost >= 1.0, "node {id} never lost its lease ({lost}): {md}");
    }
    assert_eq!(r.disruption.clients_disconnected, total, "{md}");
    assert_eq!(r.disruption.disconnections_before_command, 0, "{md}");
    // And the cluster is whole again.
    c.wait_ring_size(NODES.len()).await;
    for id in NODES {
        wait_http_ok(c.nodes[&id].addr, "/readyz").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_past_the_ttl_fences_every_node_and_bridged_members_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = SharedRedis::take();
    tokio::time::timeout(WHOLE_RUN, async {
        let c = cluster("redis-frozen", None).await;
        let prefix = unique("rf-frozen");
        let pid = redis.pid.to_string();
        let r = chat_bench::rebalance::run(
            args(
                &c.url(),
                &prefix,
                &["--pause-pid", &pid, "--pause-secs", "3", "--fault-at", "3"],
            ),
            "test redis frozen".into(),
        )
        .await
        .expect("run");
        let md = r.to_markdown();
        assert_ne!(proc_state(redis.pid), 'T', "Redis was continued: {md}");
        let [f] = r.faults.as_slice() else {
            panic!("one fault: {md}")
        };
        assert!(
            f.inject_error.is_none() && f.restore_error.is_none() && !f.early,
            "{md}"
        );
        let ended = f.ended_at_s.expect("continued");
        assert!((3.0..4.5).contains(&(ended - f.started_at_s)), "{md}");
        assert!(f.end_to_all_resumed_s.is_some(), "{md}");
        assert_survived(&c, &r).await;
        println!("{md}");
    })
    .await
    .expect("the scenario finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_fences_every_node_and_bridged_members_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = SharedRedis::take();
    tokio::time::timeout(WHOLE_RUN, async {
        let c = cluster("redis-restart", Some(RESTART_TTL)).await;
        let prefix = unique("rf-restart");
        let script = sh_quote(SERVERS);
        let restart = format!("bash {script} stop redis && bash {script} start redis");
        let r = chat_bench::rebalance::run(
            args(
                &c.url(),
                &prefix,
                &["--command", &restart, "--command-at", "3"],
            ),
            "test redis restarted empty".into(),
        )
        .await
        .expect("run");
        let md = r.to_markdown();
        let x = r.external_command.as_ref().expect("the restart ran");
        assert!(x.ok(), "{md}");
        assert_ne!(redis_pid(), redis.pid, "Redis runs as a new process: {md}");
        assert!(r.disruption.command_to_all_resumed_s.is_some(), "{md}");
        assert!(
            x.duration_s < 5.0,
            "the restart must fit well inside the {RESTART_TTL} TTL for the leases to outlive \
             it: {md}"
        );
        assert_survived(&c, &r).await;
        // Each node was fenced because its key was gone, not because its lease ran out.
        for id in NODES {
            let log = c.node_log(id);
            assert!(
                log.contains("membership key vanished from redis"),
                "node {id} did not find its key gone (its lease lapsed by the clock \
                 instead?): {md}"
            );
        }
        println!("{md}");
    })
    .await
    .expect("the scenario finished in time");
}
