//! The `rebalance` oracle reads what the cluster stored: against a router and two real
//! chat-nodes writing to the real CQL server, a run with `--cql-nodes`/`--cql-keyspace` is
//! judged by the rows it reads straight from the keyspace (every acked send is one row, and
//! the history API returns the same rows), and a row added over CQL for an existing
//! (sender, cid) between the load and the read-back is caught as stored twice.

mod support;

use std::time::Duration;

use chat_bench::harness::Outcome as _;
use chat_bench::rebalance::{self, RebalanceArgs};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use support::*;

const ROOMS: usize = 4;
const MEMBERS: usize = 2;

fn args(url: &str, room_prefix: &str) -> RebalanceArgs {
    let line =
        format!("--url {url} --rooms {ROOMS} --members {MEMBERS} --rate 4 --duration 3 --drain 30");
    rebalance_cql_args(&line, room_prefix, &[])
}

async fn session() -> Session {
    let nodes: Vec<String> = cql_nodes().split(',').map(str::to_owned).collect();
    tokio::time::timeout(WAIT, SessionBuilder::new().known_nodes(&nodes).build())
        .await
        .expect("CQL connect in time")
        .expect("CQL connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cql_oracle_reads_every_row_the_cluster_stored() {
    let c = TestCluster::start("cql-oracle", 2).await;
    let prefix = unique("rb-cql");
    let r = rebalance::run(args(&c.url(), &prefix), "test cql oracle".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert_rebalance_guarantees(&r);
    assert_eq!(r.correctness.judged_by, "cql", "{md}");
    let rb = &r.read_back;
    assert!(rb.cql_error.is_none(), "{md}");
    // Fresh rooms: every row is one of this run's sends, each acked once.
    assert_eq!(rb.cql_rows, Some(r.sends.acked), "{md}");
    assert_eq!(r.sends.acked, r.sends.sent, "{md}");
    assert_eq!(r.correctness.stored_messages, r.sends.acked, "{md}");
    assert!(rb.cql_buckets.is_some_and(|b| b >= ROOMS as u64), "{md}");
    assert_eq!(rb.history_rows, r.sends.acked, "{md}");
    let d = rb.disagreement.as_ref().expect("both sources compared");
    assert!(!d.any(), "{md}");
    println!("{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_row_for_an_acked_cid_is_caught_as_stored_twice() {
    let c = TestCluster::start("cql-twice", 1).await;
    let prefix = unique("rb-cql-twice");
    let load = rebalance::load(args(&c.url(), &prefix), "test stored twice".into())
        .await
        .expect("load");
    let (room, user, cid, id) = load
        .acks()
        .map(|(r, u, c, i)| (r, u.to_owned(), c.to_owned(), i))
        .min_by_key(|a| a.3)
        .expect("an acked send");

    // The row's bucket, read from the room's bucket index.
    let s = session().await;
    let q = |cql: &str| cql.replace("KS", KEYSPACE);
    let buckets: Vec<i64> = s
        .query_unpaged(
            q("SELECT bucket FROM KS.room_buckets WHERE room = ?"),
            (&room,),
        )
        .await
        .expect("buckets")
        .into_rows_result()
        .expect("rows")
        .rows::<(i64,)>()
        .expect("typed")
        .map(|r| r.expect("row").0)
        .collect();
    let exists = |bucket: i64, id: u64| {
        let (s, room, cql) = (
            &s,
            &room,
            q("SELECT id FROM KS.messages WHERE room = ? AND bucket = ? AND id = ?"),
        );
        async move {
            let id = i64::try_from(id).expect("id fits");
            s.query_unpaged(cql, (room, bucket, id))
                .await
                .expect("lookup")
                .into_rows_result()
                .expect("rows")
                .rows_num()
                == 1
        }
    };
    let mut bucket = None;
    for b in buckets {
        if exists(b, id).await {
            bucket = Some(b);
        }
    }
    let bucket = bucket.expect("the acked row is in one of the room's buckets");
    // A second copy, as a retry on a second owner would store it, under the next id that is
    // free in that bucket.
    let mut copy = id + 1;
    while exists(bucket, copy).await {
        copy += 1;
    }
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    tokio::time::timeout(
        Duration::from_secs(10),
        s.query_unpaged(
            q(
                "INSERT INTO KS.messages (room, bucket, id, sender, cid, body, ts) \
               VALUES (?, ?, ?, ?, ?, ?, ?)",
            ),
            (
                &room,
                bucket,
                i64::try_from(copy).expect("id fits"),
                &user,
                &cid,
                "copy",
                ts,
            ),
        ),
    )
    .await
    .expect("insert in time")
    .expect("insert");

    let r = rebalance::judge(load).await;
    let md = r.to_markdown();
    let k = &r.correctness;
    assert_eq!(r.verdict, "FAIL", "{md}");
    assert!(!r.pass());
    assert_eq!(k.judged_by, "cql", "{md}");
    assert_eq!(k.stored_twice, 1, "{md}");
    assert_eq!(
        k.examples.stored_twice,
        [format!(
            "room {}: {user}/{cid} stored as ids [{id}, {copy}]",
            room.rsplit('-').next().expect("room index"),
        )],
        "{md}"
    );
    // Nobody received the copy: each member of its room has it as a gap, or (if it is
    // after the last message the member received) as its tail.
    assert_eq!(k.gaps + k.unreceived_tail, MEMBERS as u64, "{md}");
    assert_eq!(
        (k.acked_lost, k.out_of_order, k.unknown_ids),
        (0, 0, 0),
        "{md}"
    );
    assert_eq!(r.read_back.cql_rows, Some(r.sends.acked + 1), "{md}");
    assert!(
        r.failure_line().contains("stored_twice 1"),
        "{}",
        r.failure_line()
    );
    println!("{md}");
}
