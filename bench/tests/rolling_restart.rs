//! A rolling restart of the local cluster under load, the way an SRE upgrades production
//! (deploy/OPERATIONS.md, "Upgrades: rolling restart"): the README's `deploy/local/cluster.sh`
//! (router, three supervised nodes, the real Redis and CQL server) carries
//! `chat-bench rebalance` traffic while `deploy/local/rolling-restart.sh`, the planner's
//! `--command`, restarts every node in turn. Nothing acked may be lost, no cid stored twice,
//! no member's stream may have a gap, and every client must resume.
//!
//! The cluster runs the debug build (`CHAT_BUILD_PROFILE`) from this test's target directory
//! on ports 7400-7403 (below the ephemeral range, so no other test's port 0 can take them),
//! with its own Redis prefix and the bench tests' keyspace.

mod support;

use chat_bench::harness::Outcome as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::*;

const ROUTER_PORT: u16 = 7400;
const NODE_BASE_PORT: u16 = 7401;

fn local_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local")
        .join(name)
}

/// `deploy/local/cluster.sh` in its own process group; on drop it gets SIGTERM (it stops
/// its nodes and router gracefully, not the shared servers) and, past a deadline, the
/// whole group gets SIGKILL.
struct LocalCluster {
    child: Child,
    dir: PathBuf,
}

impl LocalCluster {
    fn start() -> LocalCluster {
        let (node, _router) = server_bins();
        let (profile, target_dir) = build_profile(node.parent().expect("binary directory"));
        let dir = std::env::temp_dir().join(unique("rolling-restart"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        // Fail early and clearly when the servers are missing.
        let (redis, cql) = (redis_url(), cql_nodes());
        let mut child = Command::new(local_script("cluster.sh"))
            .env("CHAT_REDIS_URL", redis)
            .env("CHAT_CQL_NODES", cql)
            .env("CHAT_KEEP_SERVERS", "1")
            .env("CHAT_BUILD_PROFILE", profile)
            .env("CARGO_TARGET_DIR", target_dir)
            .env("CHAT_ROUTER_PORT", ROUTER_PORT.to_string())
            .env("CHAT_NODE_BASE_PORT", NODE_BASE_PORT.to_string())
            .env("CHAT_CLUSTER_DIR", &dir)
            .env("CHAT_REDIS_PREFIX", unique("t-rolling"))
            .env("CHAT_CQL_KEYSPACE", KEYSPACE)
            .env_remove("CHAT_LISTEN")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start deploy/local/cluster.sh");
        let stdout = child.stdout.take().expect("stdout");
        let cluster = LocalCluster { child, dir };
        // cluster.sh bounds each of its own waits (60 s per process); this covers them all.
        let ready = find_in_output(stdout, WAIT * 5, |line| {
            line.starts_with("[cluster] ready").then_some(())
        });
        if ready.is_none() {
            panic!(
                "deploy/local/cluster.sh did not print `[cluster] ready`; logs in {}",
                cluster.dir.display()
            );
        }
        cluster
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        wait_or_kill(&mut self.child, WAIT);
        // Whatever is left of the group (nothing, normally).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_no_acked_message() {
    let cluster = LocalCluster::start();
    let command = format!(
        "CHAT_CLUSTER_DIR={} CHAT_ROUTER_PORT={ROUTER_PORT} CHAT_NODE_BASE_PORT={NODE_BASE_PORT} \
         CHAT_RESTART_PAUSE=1 {}",
        sh_quote(&cluster.dir.display().to_string()),
        sh_quote(&local_script("rolling-restart.sh").display().to_string())
    );
    let url = format!("ws://127.0.0.1:{ROUTER_PORT}");
    let prefix = unique("rb-rolling");
    let r = chat_bench::rebalance::run(
        parse_args(&[
            "--url",
            &url,
            "--rooms",
            "12",
            "--members",
            "3",
            "--rate",
            "4",
            "--duration",
            "15",
            "--command-at",
            "2",
            "--command-timeout",
            "180",
            "--drain",
            "30",
            "--quiet",
            "--room-prefix",
            &prefix,
            "--command",
            &command,
        ]),
        "test rolling restart".into(),
    )
    .await
    .expect("run");
    let md = r.to_markdown();
    assert_rebalance_guarantees(&r);
    let x = r.external_command.as_ref().expect("the restart ran");
    assert!(x.ok(), "rolling-restart.sh succeeded: {md}");
    assert!(
        x.output_tail.contains("restarted 3 nodes"),
        "every node was restarted: {md}"
    );
    // Every node owned some of the 12 rooms at some point, so the restart disrupted clients:
    // closed with 1001 by the stopping node, and with 4001 when it took its rooms back.
    assert!(r.disruption.clients_disconnected > 0, "{md}");
    assert!(
        r.disruption.closes.keys().any(|k| k.starts_with("1001")),
        "clients of a stopping node were closed with going_away: {md}"
    );
    println!("{md}");
}
