//! `cross-shard` against real processes (a router, three chat-nodes, the real Redis and CQL
//! server): with three nodes both groups, local and bridged, have members, and neither
//! loses anything; HTTP publishes to a non-owner node are forwarded and answered.

mod support;

use chat_bench::cross_shard::CrossShardArgs;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_bridged_members_both_receive_everything() {
    let c = TestCluster::start("xshard", 3).await;
    let url = c.url();
    // Names chosen so that both groups have members: fanout --bridge homes member m of room
    // r in `<prefix>-<r>-home-<m>`.
    let ids = [1, 2, 3];
    let prefix = unique_where("xs", |p| {
        let room = owner_in_ring(&ids, &format!("{p}-0"));
        let homes: Vec<u16> = (0..12)
            .map(|m| owner_in_ring(&ids, &format!("{p}-0-home-{m}")))
            .collect();
        homes.contains(&room) && homes.iter().any(|h| *h != room)
    });
    let args: CrossShardArgs = parse_args(&[
        "--url",
        &url,
        "--rooms",
        "2",
        "--members",
        "12",
        "--rate",
        "2",
        "--warmup",
        "1",
        "--duration",
        "3",
        "--drain",
        "10",
        "--http-publishers",
        "2",
        "--http-rate",
        "5",
        "--quiet",
        "--room-prefix",
        &prefix,
    ]);
    let r = chat_bench::cross_shard::run(args, "test".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert!(r.local.members > 0 && r.bridged.members > 0, "{md}");
    assert_eq!(r.local.members + r.bridged.members, 24, "{md}");
    for g in [&r.local, &r.bridged] {
        assert!(g.expected_deliveries > 0, "{md}");
        assert_eq!(g.lost, 0, "{}: {md}", g.name);
        assert_eq!(g.delivered, g.expected_deliveries, "{md}");
        assert_eq!(g.e2e_latency_us.count, g.delivered, "{md}");
    }
    let m = &r.fanout.messages;
    assert_eq!(m.lost, 0, "{md}");
    assert_eq!(m.delivered, r.local.delivered + r.bridged.delivered, "{md}");
    let h = r.http_publish.as_ref().expect("publishers ran");
    assert_eq!(h.publishers, 2, "{md}");
    assert!(h.published > 0, "{md}");
    assert!(h.errors.is_empty(), "{md}");
    assert_eq!(h.posted_to.len(), 2, "{md}");
    println!("{md}");
}
