//! Network partitions, for real: a router and three chat-nodes, each node in its own network
//! namespace (`support/netns.rs`), under `chat-bench rebalance` load judged by the CQL store.
//!
//! - A node cut off from Redis while its clients can still reach it: its lease lapses, it
//!   fences its rooms (nothing it queued is stored, its clients are closed with 4001), the
//!   others take its rooms once its writes are over, and when the link heals it registers
//!   again and takes them back. Nothing acked is lost, nothing is stored twice, no member
//!   misses a stored message.
//! - Clients cut off from a node while Redis still reaches it: the node keeps its rooms and
//!   its lease; its clients cannot reach it, retry through the router, and resume when the
//!   link heals, with the same guarantees.
//!
//! `CHAT_FAULT_REPEAT=N` repeats each partition N times in one run (one every 15 s), for
//! measured samples; the reports are printed (`-- --nocapture`).

mod support;

use std::time::Duration;

use chat_bench::harness::Outcome as _;
use chat_bench::rebalance::RebalanceArgs;
use support::netns::{http_json, NetnsCluster, NetnsOptions};
use support::*;

const ROOMS: usize = 9;
/// The whole scenario, start-up included.
const WHOLE_RUN: Duration = Duration::from_secs(240);

/// Partitions per run: 1, or `CHAT_FAULT_REPEAT`.
fn repeat() -> u32 {
    std::env::var("CHAT_FAULT_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

fn args(c: &NetnsCluster, room_prefix: &str, extra: &[&str]) -> RebalanceArgs {
    let n = repeat();
    let line = format!(
        "--url {} --rooms {ROOMS} --members 3 --rate 4 --duration {} --fault-at 2 \
         --fault-repeat {n} --fault-every 15 --dead-after 2 --drain 40",
        c.url(),
        14 + (n - 1) * 15
    );
    rebalance_cql_args(&line, room_prefix, extra)
}

async fn cluster(tag: &str) -> NetnsCluster {
    let mut opts = NetnsOptions::new(tag, 3, KEYSPACE);
    // The wait after a departed owner is the store timeout: short, so the test is.
    opts.node_args = vec!["--store-timeout".into(), "2s".into()];
    NetnsCluster::start(opts).await
}

async fn node_metric(c: &NetnsCluster, id: u16, name: &str) -> f64 {
    let addr = c.node(id).addr;
    let mut http = chat_bench::http::HttpClient::new(addr, addr.to_string());
    let answer = http
        .request("GET", "/metrics", None, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("metrics of node {id}: {e}"));
    String::from_utf8_lossy(&answer.body)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs the load through `repeat()` cuts of node `victim`'s link named by `cut`/`heal`, each
/// `secs` long, and checks what every partition must show: each cut and heal ran, and the
/// victim's clients were cut off and all resumed.
async fn partitioned(
    c: &NetnsCluster,
    what: &str,
    victim: u16,
    (cut, heal): (String, String),
    secs: &str,
) -> chat_bench::rebalance::RebalanceReport {
    let prefix = prefix_with_a_room_on(&what.replace(' ', "-"), ROOMS, &[1, 2, 3], victim);
    let extra = [
        "--cut-command",
        &cut,
        "--heal-command",
        &heal,
        "--cut-secs",
        secs,
    ];
    let r = chat_bench::rebalance::run(args(c, &prefix, &extra), format!("test {what}"))
        .await
        .expect("run");
    let md = r.to_markdown();
    assert_eq!(r.faults.len() as u32, repeat(), "{md}");
    for f in &r.faults {
        assert!(
            f.inject_error.is_none() && f.restore_error.is_none(),
            "{md}"
        );
        assert!(
            f.clients_cut_off > 0,
            "the victim's clients were cut off: {md}"
        );
        assert!(f.end_to_all_resumed_s.is_some(), "{md}");
    }
    println!("{md}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_is_fenced_and_nothing_is_lost_or_stored_twice() {
    tokio::time::timeout(WHOLE_RUN, async {
        let c = cluster("redis-cut").await;
        let victim = 2u16;
        let links = (
            c.cut_backend_command(victim),
            c.heal_backend_command(victim),
        );
        let r = partitioned(&c, "node cut off from redis", victim, links, "5").await;
        assert_guarantees_after_losing(&r, Some(victim));
        // It noticed, and fenced itself, instead of serving on.
        assert!(node_metric(&c, victim, "chat_node_lease_lost_total").await >= 1.0);
        let ready = http_json(c.node(victim).addr, "/readyz", Duration::from_secs(5)).await;
        assert!(
            matches!(&ready, Some((200, _))),
            "registered again after the heal: {ready:?}"
        );
    })
    .await
    .expect("the scenario finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cut_off_from_a_node_resume_when_it_heals_and_nothing_moves() {
    tokio::time::timeout(WHOLE_RUN, async {
        let c = cluster("client-cut").await;
        let victim = 2u16;
        let links = (
            c.cut_clients_command(victim),
            c.heal_clients_command(victim),
        );
        let r = partitioned(&c, "clients cut off from a node", victim, links, "4").await;
        // The node kept its lease and its rooms: nothing it delivered went unstored.
        assert_guarantees_after_losing(&r, None);
        assert_eq!(
            node_metric(&c, victim, "chat_node_lease_lost_total").await,
            0.0,
            "{}",
            r.to_markdown()
        );
    })
    .await
    .expect("the scenario finished in time");
}
