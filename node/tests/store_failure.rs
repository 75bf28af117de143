//! How the node handles a store that fails: no ack without a write, readiness red, resume
//! by itself. This drives the node's own handling with a store wrapper that can be told to
//! fail; the outage test against the real CQL server belongs with the ScyllaDB store.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chat_node::config::Config;
use chat_node::store::memory::MemoryStore;
use common::ErrorCode;
use support::faulty::Faulty;
use support::*;

#[tokio::test]
async fn a_failing_store_gets_errors_not_acks_and_the_node_resumes() {
    let store = Arc::new(Faulty::new(Arc::new(MemoryStore::new(1000))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(chat_node::run_with_store(
        Config::for_tests(),
        listener,
        shutdown.clone(),
        store.clone(),
    ));
    let mut c = Client::connect(addr, "/ws?room=outage&user=alice")
        .await
        .expect("connect");
    c.expect_joined().await;
    c.send_text("outage", "before", "stored").await;
    let (_, before_id, _) = c.ack().await;

    store.down.store(true, Ordering::SeqCst);
    c.send_text("outage", "during", "not stored").await;
    // Either the write fails (error after delivery) or the probe already marked the store
    // down (refused up front); both must be `store_unavailable` for this cid, never an ack.
    let code = loop {
        match c.frame().await {
            common::ServerFrame::Error { code, cid, .. } => {
                assert_eq!(cid.as_deref(), Some("during"));
                break code;
            }
            common::ServerFrame::Ack { cid, .. } => panic!("acked {cid} while the store was down"),
            _ => continue,
        }
    };
    assert_eq!(code, ErrorCode::StoreUnavailable);
    eventually("readyz red", || async {
        http(addr, "GET", "/readyz", None).await.0 == 503
    })
    .await;

    store.down.store(false, Ordering::SeqCst);
    eventually("readyz green again", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    // The retry with the same cid is stored once and acked.
    c.send_text("outage", "during", "not stored").await;
    let (cid, during_id, _) = c.ack().await;
    assert_eq!(cid, "during");
    assert!(during_id > before_id);
    let (status, body) = http(addr, "GET", "/v1/rooms/outage/messages?user=x", None).await;
    assert_eq!(status, 200);
    let cids: Vec<_> = json(&body)["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["cid"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(cids, vec!["before", "during"]);
    shutdown.cancel();
    task.await.expect("task").expect("run");
}
