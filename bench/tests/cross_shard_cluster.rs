//! `cross-shard` against real processes (a router, three chat-nodes, the real Redis and CQL
//! server): with three nodes both groups, local and bridged, have members, and neither
//! loses anything; HTTP publishes to a non-owner node are forwarded and answered. With
//! `--direct` the members connect straight to their home room's owner: the same groups, as
//! lossless, and no WebSocket through the router.

mod support;

use std::time::Duration;

use chat_bench::cross_shard::CrossShardArgs;
use chat_bench::harness::Outcome as _;
use chat_bench::http::HttpClient;
use support::*;

/// A prefix whose room 0 has members of both groups in a 3-node ring: fanout --bridge homes
/// member m of room r in `<prefix>-<r>-home-<m>`.
fn prefix_with_both_groups() -> String {
    let ids = [1, 2, 3];
    unique_where("xs", |p| {
        let room = owner_in_ring(&ids, &format!("{p}-0"));
        let homes: Vec<u16> = (0..12)
            .map(|m| owner_in_ring(&ids, &format!("{p}-0-home-{m}")))
            .collect();
        homes.contains(&room) && homes.iter().any(|h| *h != room)
    })
}

/// Both groups have members, and every one of them received everything.
fn assert_both_groups_whole(r: &chat_bench::cross_shard::CrossShardReport, md: &str) {
    assert!(r.local.members > 0 && r.bridged.members > 0, "{md}");
    assert_eq!(r.local.members + r.bridged.members, 24, "{md}");
    for g in [&r.local, &r.bridged] {
        assert!(g.expected_deliveries > 0, "{md}");
        assert_eq!(g.lost, 0, "{}: {md}", g.name);
        assert_eq!(g.delivered, g.expected_deliveries, "{md}");
        assert_eq!(g.e2e_latency_us.count, g.delivered, "{md}");
    }
    assert_eq!(r.fanout.messages.lost, 0, "{md}");
}

/// The flags both tests share: 2 rooms × 12 members at 2/s, a short window, a long drain.
fn flags(url: &str, prefix: &str) -> String {
    format!(
        "--url {url} --rooms 2 --members 12 --rate 2 --warmup 1 --duration 3 --drain 10 \
         --quiet --room-prefix {prefix}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_bridged_members_both_receive_everything() {
    let c = TestCluster::start("xshard", 3).await;
    let url = c.url();
    let prefix = prefix_with_both_groups();
    let args: CrossShardArgs = parse_line(
        &format!("{} --http-publishers 2 --http-rate 5", flags(&url, &prefix)),
        &[],
    );
    let r = chat_bench::cross_shard::run(args, "test".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert_both_groups_whole(&r, &md);
    let m = &r.fanout.messages;
    assert_eq!(m.delivered, r.local.delivered + r.bridged.delivered, "{md}");
    let h = r.http_publish.as_ref().expect("publishers ran");
    assert_eq!(h.publishers, 2, "{md}");
    assert!(h.published > 0, "{md}");
    assert!(h.errors.is_empty(), "{md}");
    assert_eq!(h.posted_to.len(), 2, "{md}");
    println!("{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_members_bypass_the_router_and_receive_everything() {
    let c = TestCluster::start("xshard-direct", 3).await;
    let url = c.url();
    let prefix = prefix_with_both_groups();
    let args: CrossShardArgs = parse_line(&format!("{} --direct", flags(&url, &prefix)), &[]);
    let r = chat_bench::cross_shard::run(args, "test --direct".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert!(r.fanout.config.direct, "{md}");
    assert!(
        md.contains("members connected directly to their home room's owner"),
        "{md}"
    );
    assert_both_groups_whole(&r, &md);
    // Every member reached a node without the router: it opened no WebSocket, the nodes 24.
    let mut http = HttpClient::new(c.router.addr, c.router.addr.to_string());
    let metrics = http
        .request("GET", "/metrics", None, Duration::from_secs(5))
        .await
        .expect("router metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("chat_router_"), "router /metrics: {text}");
    assert_eq!(
        metric_sum(&text, common::metrics::ROUTER_WS_CONNECTIONS_OPENED),
        0.0,
        "{md}"
    );
    let mut opened = 0.0;
    for id in 1..=3 {
        opened += c.node_metric(id, common::metrics::CONNECTIONS_OPENED).await;
    }
    assert_eq!(opened, 24.0, "{md}");
    println!("{md}");
}
