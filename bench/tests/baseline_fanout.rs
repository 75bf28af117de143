//! Runs `chat-bench baseline` in-process on port 0 and drives it with a short `fanout`:
//! the bare broadcast server must be a lossless, ordered, isolated target for the same
//! client code the node is measured with.

mod support;

use chat_bench::fanout::FanoutArgs;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_baseline_loses_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(chat_bench::baseline::serve(listener, 1024, async {
        let _ = stop_rx.await;
    }));
    let url = format!("ws://{addr}");
    let args: FanoutArgs = support::parse_args(&[
        "--url",
        &url,
        "--rooms",
        "2",
        "--members",
        "5",
        "--rate",
        "5",
        "--warmup",
        "0.5",
        "--duration",
        "2",
        "--drain",
        "2",
        "--quiet",
    ]);
    let r = chat_bench::fanout::run(args, "test".into())
        .await
        .expect("run");
    let m = &r.messages;
    assert_eq!(r.connections.joined, 10, "{r:#?}");
    // 10 senders × 5/s × 2 s; pacing may shift a send across a window edge.
    assert!((90..=110).contains(&m.sent), "{r:#?}");
    assert_eq!(m.expected_deliveries, m.sent * 5);
    assert_eq!(m.delivered, m.expected_deliveries, "{r:#?}");
    assert_eq!(
        (
            m.lost,
            m.duplicated,
            m.out_of_order,
            m.misrouted,
            m.undecodable,
            m.id_regressions
        ),
        (0, 0, 0, 0, 0, 0),
        "{r:#?}"
    );
    assert_eq!(m.acks, m.sent, "{r:#?}");
    assert_eq!(m.missing_acks, 0);
    assert!(
        m.errors.is_empty() && r.connections.closes.is_empty(),
        "{r:#?}"
    );
    assert_eq!(r.e2e_latency_us.count, m.delivered);
    // The baseline answers /metrics with its (here: this test process's) CPU and RSS.
    assert!(r.server.cpu_percent.is_some(), "{r:#?}");
    assert!(r.server.rss_bytes_after.is_some_and(|b| b > 0), "{r:#?}");
    let _ = stop_tx.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("baseline stops when asked")
        .expect("baseline task");
}

#[tokio::test]
async fn baseline_rejects_upgrade_without_room_or_user() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(chat_bench::baseline::serve(listener, 8, async {
        let _ = stop_rx.await;
    }));
    let target = chat_bench::client::Target::resolve(&format!("ws://{addr}"))
        .await
        .expect("target");
    let err = chat_bench::client::connect(&target, "r", "", std::time::Duration::from_secs(5))
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("400"), "{err:#}");
    let _ = stop_tx.send(());
    let _ = server.await;
}
