//! `history` against real processes (a router, three chat-nodes, the real Redis and CQL
//! server): every full walk returns exactly the seeded ids; rooms never written and bad
//! room names give clear results, not hangs.

mod support;

use chat_bench::harness::Outcome as _;
use chat_bench::history::HistoryArgs;
use chat_bench::BenchError;
use support::*;

fn args(url: &str, extra: &[&str]) -> HistoryArgs {
    let line = format!(
        "--url {url} --rooms 4 --messages 230 --limit 50 --readers 3 --duration 3 --quiet \
         --room-prefix {}",
        unique("hist")
    );
    parse_line(&line, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_histories_walk_back_exactly_both_ways() {
    let c = TestCluster::start("hist", 3).await;
    let r = chat_bench::history::run(args(&c.url(), &[]), "test".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert_eq!(r.seeding.published, 4 * 230, "{md}");
    assert_eq!(r.seeding.duplicates, 0, "{md}");
    let g = &r.reading;
    assert!(g.walks_ok >= 2, "{md}");
    assert_eq!(g.walks_mismatched, 0, "{md}");
    assert_eq!(g.walks_failed, 0, "{md}");
    assert!(g.errors.is_empty(), "{md}");
    assert!(g.walks_newest_first > 0 && g.walks_oldest_first > 0, "{md}");
    // 230 messages at 50 a page: 5 pages per walk.
    assert!(g.pages >= 5 * g.walks_ok, "{md}");
    assert_eq!(g.page_latency_us.count, g.pages, "{md}");
    // The timeline covers the 3 s of reading and holds every page.
    let t = &r.timeline;
    let json = r.to_json();
    assert!(t.len() >= 3, "{json}");
    assert_eq!(t.iter().map(|p| p.pages).sum::<u64>(), g.pages, "{json}");
    assert_eq!(t.iter().map(|p| p.errors).sum::<u64>(), 0, "{json}");
    assert!(
        t.iter().all(|p| p.pages == 0 || p.page_p99_us > 0),
        "{json}"
    );
    let svg = r.chart();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    println!("{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_rooms_and_bad_names_give_clear_answers() {
    let c = TestCluster::start("hist-empty", 3).await;
    // Rooms nobody wrote: every walk is one empty page that matches the empty seed.
    let r = chat_bench::history::run(args(&c.url(), &["--messages", "0"]), "test".into())
        .await
        .expect("run");
    let md = r.to_markdown();
    assert_eq!(r.seeding.published, 0, "{md}");
    assert!(r.reading.walks_ok > 0, "{md}");
    assert_eq!(
        r.reading.walks_mismatched + r.reading.walks_failed,
        0,
        "{md}"
    );
    assert_eq!(r.reading.messages, 0, "{md}");
    assert_eq!(
        r.reading.pages,
        r.reading.walks_ok + r.reading.walks_incomplete,
        "{md}"
    );
    // A room name the protocol does not allow is refused before anything is sent.
    let err = chat_bench::history::run(
        args(&c.url(), &["--room-prefix", "no/such room"]),
        "test".into(),
    )
    .await
    .expect_err("bad room name");
    match err {
        BenchError::Config(m) => assert!(m.contains("--room-prefix"), "{m}"),
        other => panic!("expected a config error, got {other}"),
    }
}
