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
    let node = TestNode::start_on(Config::for_tests(), store.clone()).await;
    let addr = node.addr;
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
        http_get(addr, "/readyz").await.0 == 503
    })
    .await;

    store.down.store(false, Ordering::SeqCst);
    eventually("readyz green again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    // The retry with the same cid is stored once and acked.
    c.send_text("outage", "during", "not stored").await;
    let (cid, during_id, _) = c.ack().await;
    assert_eq!(cid, "during");
    assert!(during_id > before_id);
    let (status, body) = http_get(addr, "/v1/rooms/outage/messages?user=x").await;
    assert_eq!(status, 200);
    let cids = message_fields(&json(&body), "cid");
    assert_eq!(cids, vec!["before", "during"]);
    node.stop().await;
}
