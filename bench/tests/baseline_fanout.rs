//! Runs `chat-bench baseline` in-process on port 0 and drives it with a short `fanout`:
//! the bare broadcast server must be a lossless, ordered, isolated target for the same
//! client code the node is measured with.

mod support;

use chat_bench::fanout::FanoutArgs;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The baseline on port 0 with per-member queues of `queue` frames: its address, the sender
/// that stops it, and its task.
async fn start_baseline(
    queue: usize,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(chat_bench::baseline::serve(listener, queue, async {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_baseline_loses_nothing() {
    let (addr, stop_tx, server) = start_baseline(1024).await;
    let url = format!("ws://{addr}");
    let line = format!(
        "--url {url} --rooms 2 --members 5 --rate 5 --warmup 0.5 --duration 2 --drain 2 --quiet"
    );
    let args: FanoutArgs = support::parse_line(&line, &[]);
    let r = chat_bench::fanout::run(args, "test".into())
        .await
        .expect("run");
    // 10 senders × 5/s × 2 s.
    support::assert_clean_fanout(&r, 10, 100);
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
    let (addr, stop_tx, server) = start_baseline(8).await;
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
