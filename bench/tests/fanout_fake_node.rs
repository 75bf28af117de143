//! Runs the whole `fanout` scenario against a minimal stand-in node on port 0, over real
//! sockets, to check the bench's own plumbing and accounting end to end: zero loss when
//! nothing is lost, and loss and duplicates reported when the stand-in injects them.
//!
//! The stand-in speaks just enough of protocol v1 (dev-auth query join, `send` → `message` to
//! every member + `ack`, `/metrics`) to drive the bench; it is not a test of the real node.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chat_bench::fanout::FanoutArgs;
use chat_bench::harness::Outcome as _;
use common::{ChatMessage, ClientFrame, ServerFrame};
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Default, Clone, Copy)]
struct Faults {
    /// Do not deliver messages whose id is a multiple of this (acks still sent).
    drop_every: Option<u64>,
    /// Deliver messages whose id is a multiple of this twice.
    dup_every: Option<u64>,
}

type Members = Vec<mpsc::UnboundedSender<Frame<'static>>>;

struct Fake {
    rooms: Mutex<HashMap<String, Members>>,
    next_id: AtomicU64,
    faults: Faults,
}

fn text(bytes: Vec<u8>) -> Frame<'static> {
    Frame::text(Payload::Owned(bytes))
}

async fn handle(
    fake: Arc<Fake>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/metrics" {
        let cpu = fake.next_id.load(Relaxed) as f64 / 1000.0;
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n\
             process_resident_memory_bytes 4194304\n"
        )))));
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let (Some(room), Some(user)) = (param("room"), param("user")) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing room or user")));
        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    let Ok((resp, fut)) = fastwebsockets::upgrade::upgrade(&mut req) else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    tokio::spawn(async move {
        let Ok(ws) = fut.await else { return };
        let (mut rd, mut wr) = ws.split(tokio::io::split);
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame<'static>>();
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let close = f.opcode == OpCode::Close;
                if wr.write_frame(f).await.is_err() || close {
                    break;
                }
            }
        });
        let joined = ServerFrame::Joined {
            room: common::RoomId::new(room.clone()).expect("room"),
            head: None,
            members: 1,
            users: None,
        };
        let _ = tx.send(text(joined.to_json()));
        fake.rooms
            .lock()
            .expect("lock")
            .entry(room.clone())
            .or_default()
            .push(tx.clone());
        let owe = tx.clone();
        let mut send_fn = move |f: Frame<'static>| {
            let _ = owe.send(f);
            std::future::ready(Ok::<(), Infallible>(()))
        };
        while let Ok(frame) = rd.read_frame(&mut send_fn).await {
            if frame.opcode == OpCode::Close {
                break;
            }
            if frame.opcode != OpCode::Text {
                continue;
            }
            let Ok(ClientFrame::Send { room: r, cid, body }) =
                ClientFrame::parse(&frame.payload, 1 << 20)
            else {
                continue;
            };
            let rooms = fake.rooms.lock().expect("lock");
            let id = fake.next_id.fetch_add(1, Relaxed) + 1;
            let msg = ChatMessage {
                room: r.clone(),
                id: common::MessageId(id),
                from: common::UserId::new(user.clone()).expect("user"),
                cid: cid.clone(),
                body,
                ts: 0,
            };
            let bytes = ServerFrame::encode_message(&msg);
            let f = fake.faults;
            let copies = if f.drop_every.is_some_and(|n| id % n == 0) {
                0
            } else if f.dup_every.is_some_and(|n| id % n == 0) {
                2
            } else {
                1
            };
            for m in rooms.get(r.as_str()).into_iter().flatten() {
                for _ in 0..copies {
                    let _ = m.send(text(bytes.clone()));
                }
            }
            let ack = ServerFrame::Ack {
                room: r,
                cid,
                id: common::MessageId(id),
                duplicate: false,
            };
            let _ = tx.send(text(ack.to_json()));
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}

async fn start_fake(faults: Faults) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = Arc::new(Fake {
        rooms: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        faults,
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let fake = fake.clone();
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(fake.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn args(addr: SocketAddr) -> FanoutArgs {
    let line = format!(
        "--url ws://{addr} --rooms 2 --members 5 --rate 20 --size 64 --warmup 0.5 --duration 2 \
         --drain 2 --quiet"
    );
    support::parse_line(&line, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_run_reports_no_loss() {
    let addr = start_fake(Faults::default()).await;
    let r = chat_bench::fanout::run(args(addr), "test".into())
        .await
        .expect("run");
    // 10 senders × 20/s × 2 s.
    support::assert_clean_fanout(&r, 10, 400);
    let m = &r.messages;
    assert_eq!(r.ack_latency_us.count, m.acks);
    assert!(r.e2e_latency_us.p50 > 0 && r.e2e_latency_us.p50 < 1_000_000);
    assert!(r.server.cpu_percent.is_some());
    assert_eq!(r.server.rss_bytes_after, Some(4_194_304));
    assert!(r.bench.cpu_percent.is_some());
    let md = r.to_markdown();
    assert!(md.contains("| lost | 0 |"), "{md}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_loss_and_duplicates_are_reported() {
    let addr = start_fake(Faults {
        drop_every: Some(10),
        dup_every: Some(7),
    })
    .await;
    let r = chat_bench::fanout::run(args(addr), "test".into())
        .await
        .expect("run");
    let m = &r.messages;
    assert_eq!(r.connections.joined, 10);
    // About a tenth of the messages reach nobody in their room of five.
    let lost_msgs = m.lost / 5;
    assert_eq!(m.lost % 5, 0, "{r:#?}");
    assert!(
        lost_msgs * 10 >= m.sent * 8 / 10 && lost_msgs * 10 <= m.sent * 12 / 10,
        "{r:#?}"
    );
    assert_eq!(m.delivered + m.lost, m.expected_deliveries);
    // Ids that are multiples of 7 but not 10 are delivered twice to five members.
    assert!(m.duplicated > 0 && m.duplicated % 5 == 0, "{r:#?}");
    assert_eq!(m.out_of_order, 0);
    assert_eq!(m.acks, m.sent, "acks still come for dropped messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_cost_reads_the_pids_it_is_given() {
    let addr = start_fake(Faults::default()).await;
    let mut a = args(addr);
    // The bench itself stands in for a server process: it is busy during the window.
    a.cost.server_pids = Some(format!("chat-router={}", std::process::id()));
    let r = chat_bench::fanout::run(a, "test".into())
        .await
        .expect("run");
    let c = r.cluster_cost.as_ref().expect("cluster cost asked for");
    assert_eq!(c.deliveries, r.messages.delivered);
    assert_eq!(c.room_messages, r.messages.acks);
    assert!((1.5..3.0).contains(&c.window_s), "{c:#?}");
    let p = c
        .processes
        .iter()
        .find(|p| p.name == "chat-router")
        .expect("the pid's row");
    assert_eq!(p.pid, Some(std::process::id()));
    assert!(p.cpu_s > 0.0, "{c:#?}");
    // The stand-in's /metrics has no bus counters: n/a, said so, not a failure.
    assert_eq!(c.bus, None);
    assert!(c.notes.iter().any(|n| n.contains("bus")), "{c:#?}");
    let md = r.to_markdown();
    assert!(
        md.contains("### Cluster cost over the measured window"),
        "{md}"
    );
    assert!(r.to_json().contains("\"cluster_cost\""));
}

#[tokio::test]
async fn unreachable_target_fails_with_connect_errors() {
    // Bind and drop to get a port nothing listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let err = chat_bench::fanout::run(args(addr), "test".into())
        .await
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(matches!(err, chat_bench::BenchError::Failed(_)), "{msg}");
    assert!(msg.contains("connections failed"), "{msg}");
}
