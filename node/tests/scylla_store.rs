//! The CQL store against the real server: paging across bucket boundaries in both
//! directions (including long runs of empty buckets), idempotent re-appends, coalesced
//! reads, the schema's refusal of a different bucket width, and the takeover fence that
//! shadows an earlier owner's late write.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chat_node::store::scylla::{ScyllaConfig, ScyllaStore};
use chat_node::store::{HistoryQuery, MessageStore, PageFrom, Unguarded};
use common::{ChatMessage, ClientMsgId, MessageId, RoomId, UserId};
use scylla::statement::Consistency;
use support::*;

const MINUTE_MS: u64 = 60_000;

fn store_config(bucket: Duration) -> ScyllaConfig {
    ScyllaConfig {
        nodes: cql_nodes(),
        keyspace: keyspace(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: Consistency::LocalQuorum,
        bucket,
        max_inflight: 8,
        request_timeout: Duration::from_secs(10),
        message_ttl: Duration::ZERO,
    }
}

async fn store() -> ScyllaStore {
    fresh_keyspace().await;
    ScyllaStore::connect(&store_config(Duration::from_secs(60)))
        .await
        .expect("connect to the real CQL server")
}

/// One page of `room`'s history.
async fn read_page(s: &ScyllaStore, room: &RoomId, query: HistoryQuery) -> Vec<ChatMessage> {
    s.read(room, query).await.expect("read")
}

fn msg(room: &RoomId, unix_ms: u64, seq: u64) -> ChatMessage {
    let id = MessageId(MessageId::first_at(unix_ms).0 + seq);
    ChatMessage {
        room: room.clone(),
        id,
        from: UserId::new("writer").expect("user"),
        cid: ClientMsgId::new(format!("c{}", id.0)).expect("cid"),
        body: format!("at {unix_ms} #{seq}"),
        ts: unix_ms,
    }
}

fn q(
    after: Option<MessageId>,
    before: Option<MessageId>,
    limit: usize,
    from: PageFrom,
) -> HistoryQuery {
    HistoryQuery {
        after,
        before,
        limit,
        from,
    }
}

/// Messages in five 1-minute buckets with gaps of 1, 3 and 10,000 empty buckets between.
fn spread(room: &RoomId) -> Vec<ChatMessage> {
    let t0 = common::id::now_ms() - 30 * 24 * 60 * MINUTE_MS;
    let minutes = [0u64, 2, 6, 10_007, 10_008];
    let mut out = Vec::new();
    for m in minutes {
        for seq in 0..7 {
            out.push(msg(room, t0 + m * MINUTE_MS + 1000, seq));
        }
    }
    out
}

#[tokio::test]
async fn pages_walk_across_buckets_both_ways_without_gaps() {
    let s = store().await;
    let room = RoomId::new(format!("paging-{}", std::process::id())).expect("room");
    let all = spread(&room);
    // Appended in three batches, one of them spanning several buckets.
    s.append(&room, &all[..10], &Unguarded)
        .await
        .expect("append");
    s.append(&room, &all[10..30], &Unguarded)
        .await
        .expect("append");
    s.append(&room, &all[30..], &Unguarded)
        .await
        .expect("append");
    let ids: Vec<MessageId> = all.iter().map(|m| m.id).collect();

    // Newest first: pages of 4 walking back with `before`.
    let mut back = Vec::new();
    let mut before = None;
    loop {
        let page = read_page(&s, &room, q(None, before, 4, PageFrom::Newest)).await;
        assert!(
            page.windows(2).all(|w| w[0].id < w[1].id),
            "a page is oldest first"
        );
        let Some(first) = page.first() else { break };
        before = Some(first.id);
        back.splice(0..0, page.iter().map(|m| m.id));
    }
    assert_eq!(back, ids, "walking back visits every message once");

    // Oldest first: pages of 6 walking forward with `after`.
    let mut fwd = Vec::new();
    let mut after = Some(MessageId(0));
    loop {
        let page = read_page(&s, &room, q(after, None, 6, PageFrom::Oldest)).await;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        fwd.extend(page.iter().map(|m| m.id));
    }
    assert_eq!(fwd, ids, "walking forward visits every message once");

    // A window bounded on both sides, crossing the 10,000-bucket gap.
    let between = s
        .read(
            &room,
            q(Some(ids[20]), Some(ids[30]), 100, PageFrom::Oldest),
        )
        .await
        .expect("read");
    assert_eq!(
        between.iter().map(|m| m.id).collect::<Vec<_>>(),
        ids[21..30].to_vec()
    );
    let newest_between = read_page(
        &s,
        &room,
        q(Some(ids[20]), Some(ids[30]), 3, PageFrom::Newest),
    )
    .await;
    assert_eq!(
        newest_between.iter().map(|m| m.id).collect::<Vec<_>>(),
        ids[27..30].to_vec()
    );
    // Rows come back intact.
    assert_eq!(between[0], all[21]);
}

/// Any u64 is a valid cursor: the largest ones (above the 63 bits ids use, which the CQL
/// store keeps as bigint) page exactly as on the memory store.
#[tokio::test]
async fn cursors_past_every_id_give_the_memory_stores_page() {
    let s = store().await;
    let mem = chat_node::store::memory::MemoryStore::new(1000);
    let room = RoomId::new(format!("cursors-{}", std::process::id())).expect("room");
    let all = spread(&room);
    s.append(&room, &all, &Unguarded).await.expect("append");
    mem.append(&room, &all, &Unguarded).await.expect("append");
    let huge = [u64::MAX, 1 << 63, (1 << 63) - 1];
    let mut cases = Vec::new();
    for &h in &huge {
        cases.push(q(None, Some(MessageId(h)), 5, PageFrom::Newest));
        cases.push(q(Some(MessageId(h)), None, 5, PageFrom::Oldest));
        cases.push(q(
            Some(all[30].id),
            Some(MessageId(h)),
            50,
            PageFrom::Oldest,
        ));
        cases.push(q(
            Some(MessageId(h)),
            Some(MessageId(h)),
            5,
            PageFrom::Newest,
        ));
    }
    for case in cases {
        let label = format!(
            "after {:?} before {:?} {:?}",
            case.after, case.before, case.from
        );
        let cql = s.read(&room, case).await.expect("cql read");
        let memory = mem.read(&room, case).await.expect("memory read");
        assert_eq!(cql, memory, "{label}");
    }
    // And the newest page really is the newest messages, not nothing.
    let newest = s
        .read(
            &room,
            q(None, Some(MessageId(u64::MAX)), 5, PageFrom::Newest),
        )
        .await
        .expect("read");
    assert_eq!(newest, all[all.len() - 5..].to_vec());
}

#[tokio::test]
async fn re_appending_a_batch_stores_each_message_once() {
    let s = store().await;
    let room = RoomId::new(format!("idem-{}", std::process::id())).expect("room");
    let now = common::id::now_ms();
    let batch: Vec<_> = (0..5).map(|i| msg(&room, now, i)).collect();
    s.append(&room, &batch, &Unguarded).await.expect("append");
    s.append(&room, &batch[1..3], &Unguarded)
        .await
        .expect("retry");
    let got = read_page(&s, &room, q(None, None, 100, PageFrom::Newest)).await;
    assert_eq!(got, batch);
}

#[tokio::test]
async fn identical_concurrent_reads_are_answered_together() {
    let s = Arc::new(store().await);
    let room = RoomId::new(format!("coalesce-{}", std::process::id())).expect("room");
    let now = common::id::now_ms();
    let batch: Vec<_> = (0..50).map(|i| msg(&room, now, i)).collect();
    s.append(&room, &batch, &Unguarded).await.expect("append");
    let before = chat_server::telemetry::render();
    let coalesced = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with("chat_node_store_reads_coalesced_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let room = room.clone();
            tokio::spawn(async move { s.read(&room, q(None, None, 50, PageFrom::Newest)).await })
        })
        .collect();
    for r in reads {
        assert_eq!(r.await.expect("join").expect("read"), batch);
    }
    let after = chat_server::telemetry::render();
    assert!(
        coalesced(&after) > coalesced(&before),
        "20 identical reads at once shared at least one query"
    );
}

#[tokio::test]
async fn a_different_bucket_width_is_refused() {
    let _s = store().await;
    let err = match ScyllaStore::connect(&store_config(Duration::from_secs(3600))).await {
        Ok(_) => panic!("connected with a different bucket width"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--cql-bucket"), "{err}");
}

/// A write an earlier owner still had on its way when the room changed hands (a process
/// paused between its lease check and its write) carries a timestamp from before the new
/// owner's fence, so it is invisible when it lands: to the store's reads and to a plain CQL
/// `SELECT` alike. The new owner's own writes after the fence stay.
#[tokio::test]
async fn a_late_write_from_an_earlier_owner_is_shadowed_by_the_takeover_fence() {
    let s = store().await;
    let room = RoomId::new(format!("fence-{}", std::process::id())).expect("room");
    let now = common::id::now_ms();
    let head = msg(&room, now - 2_000, 0);
    s.append(&room, std::slice::from_ref(&head), &Unguarded)
        .await
        .expect("append the head");
    // The earlier owner minted this and checked its lease before the takeover; the write
    // itself only reaches the server afterwards, stamped with the time of the check.
    let late = msg(&room, now - 1_000, 0);
    let late_write_us = ((now - 1_000) * 1_000) as i64;

    s.fence(&room, head.id, Duration::from_secs(600))
        .await
        .expect("fence the room");

    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(cql_nodes())
        .build()
        .await
        .expect("connect to the CQL server");
    let ks = keyspace();
    let bucket = |ms: u64| (ms - ms % MINUTE_MS) as i64;
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.messages (room, bucket, id, sender, cid, body, ts) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP {late_write_us}"),
            (
                room.as_str(),
                bucket(late.id.unix_ms()),
                late.id.0 as i64,
                late.from.as_str(),
                late.cid.as_str(),
                late.body.as_str(),
                late.ts as i64,
            ),
        )
        .await
        .expect("the late write lands");
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.room_buckets (room, bucket) VALUES (?, ?)"),
            (room.as_str(), bucket(late.id.unix_ms())),
        )
        .await
        .expect("index its bucket");

    let mine = msg(&room, now, 5);
    s.append(&room, std::slice::from_ref(&mine), &Unguarded)
        .await
        .expect("the new owner's write");

    let read = read_page(&s, &room, q(None, None, 100, PageFrom::Oldest)).await;
    let ids: Vec<MessageId> = read.iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        [head.id, mine.id],
        "the late write is not in the history"
    );

    let mut raw = Vec::new();
    for b in [
        bucket(head.id.unix_ms()),
        bucket(late.id.unix_ms()),
        bucket(mine.id.unix_ms()),
    ] {
        let rows = session
            .query_unpaged(
                format!("SELECT id FROM {ks}.messages WHERE room = ? AND bucket = ?"),
                (room.as_str(), b),
            )
            .await
            .expect("select")
            .into_rows_result()
            .expect("rows");
        for r in rows.rows::<(i64,)>().expect("typed rows") {
            raw.push(r.expect("row").0);
        }
    }
    raw.sort_unstable();
    raw.dedup();
    assert_eq!(
        raw,
        [head.id.0 as i64, mine.id.0 as i64],
        "a plain SELECT does not see the late write either"
    );
}

/// A writer whose guard says no (its lease lapsed after the batch was stamped) sends
/// nothing: the answer is `Fenced` and the room's history is unchanged.
#[tokio::test]
async fn a_write_its_guard_refuses_is_not_sent() {
    struct No;
    impl chat_node::store::WriteGuard for No {
        fn may_write(&self) -> bool {
            false
        }
    }
    let s = store().await;
    let room = RoomId::new(format!("guarded-{}", std::process::id())).expect("room");
    let m = msg(&room, common::id::now_ms(), 0);
    let r = s.append(&room, std::slice::from_ref(&m), &No).await;
    assert!(
        matches!(r, Err(chat_node::store::StoreError::Fenced)),
        "{r:?}"
    );
    let read = read_page(&s, &room, q(None, None, 10, PageFrom::Oldest)).await;
    assert!(read.is_empty(), "{read:?}");
}
