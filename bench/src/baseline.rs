//! `chat-bench baseline`: the ceiling of this machine. A bare fastwebsockets broadcast
//! server with no authentication, storage, history, membership checks or cluster: every
//! `send` a client writes becomes one `message` frame, serialized once and shared as `Bytes`,
//! queued to every client connected with the same `room` query, plus an `ack` to the sender.
//!
//! It speaks just enough of the node's protocol for `chat-bench fanout` to drive it unchanged
//! (`/ws?room=R&user=U`, a `joined` frame on connect, `message` and `ack` frames), so a
//! node's figures can be read as a fraction of it. Each client has one writer task behind a
//! bounded queue; a client whose queue is full is dropped (close 4000), never waited for.
//! `/metrics` answers this process's CPU and RSS so the report shows the server side too.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use clap::Args;
use fastwebsockets::{Frame, OpCode, Payload, Role};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::payload::FrameView;
use crate::BenchError;

/// Options of `chat-bench baseline`.
#[derive(Debug, Clone, Args)]
pub struct BaselineArgs {
    /// Address to listen on; port 0 picks a free port (printed on stderr).
    #[arg(long, env = "CHAT_BENCH_LISTEN", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Stops by itself after this many seconds (Ctrl-C stops it sooner).
    #[arg(long, env = "CHAT_BENCH_MAX_SECONDS", default_value_t = 600)]
    pub max_seconds: u64,
    /// Frames queued per client before it is dropped as a slow consumer (close 4000).
    #[arg(long, env = "CHAT_BENCH_QUEUE", default_value_t = 1024)]
    pub queue: usize,
}

/// Close code the node uses for a slow consumer; the baseline uses the same.
const SLOW_CONSUMER: u16 = 4000;
/// How long a dropped client gets to take its close frame before the socket is closed.
const KICK_GRACE: Duration = Duration::from_secs(30);
/// Largest `send` frame accepted (the bench's own limit on --size).
const MAX_FRAME: usize = 16 << 20;

enum Out {
    Data(Bytes),
    /// Pongs and the close echo the read half owes the client.
    Control(Frame<'static>),
}

struct Member {
    conn: u64,
    tx: mpsc::Sender<Out>,
    kick: Arc<watch::Sender<bool>>,
}

#[derive(Default)]
struct Room {
    next_id: u64,
    members: Vec<Member>,
}

struct Hub {
    rooms: Mutex<HashMap<String, Arc<Mutex<Room>>>>,
    next_conn: AtomicU64,
    queue: usize,
}

/// Runs the server on `args.listen` until Ctrl-C or `--max-seconds`.
pub async fn run(args: BaselineArgs) -> Result<(), BenchError> {
    if args.queue == 0 || args.queue > 1 << 20 {
        return Err(BenchError::Config(
            "--queue must be between 1 and 1048576".into(),
        ));
    }
    if args.max_seconds == 0 {
        return Err(BenchError::Config("--max-seconds must be positive".into()));
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let listener = TcpListener::bind(args.listen).await.map_err(|e| {
        BenchError::Failed(anyhow::anyhow!("cannot listen on {}: {e}", args.listen))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Failed(e.into()))?;
    eprintln!(
        "chat-bench baseline: listening on ws://{addr}/ws (stops on Ctrl-C or after {} s)",
        args.max_seconds
    );
    let max = Duration::from_secs(args.max_seconds);
    serve(listener, args.queue, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => eprintln!("chat-bench baseline: Ctrl-C, stopping"),
            _ = tokio::time::sleep(max) => eprintln!("chat-bench baseline: --max-seconds reached, stopping"),
        }
    })
    .await;
    Ok(())
}

/// Accepts connections on `listener` until `shutdown` resolves. Connections already open
/// keep running until their clients leave or the runtime ends.
pub async fn serve(listener: TcpListener, queue: usize, shutdown: impl Future<Output = ()>) {
    let hub = Arc::new(Hub {
        rooms: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(0),
        queue: queue.max(1),
    });
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(hub.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn metrics_text() -> String {
    let mut s = String::new();
    if let Some(cpu) = crate::report::self_cpu_seconds() {
        let _ = writeln!(s, "{} {cpu}", crate::metrics_scrape::CPU_SECONDS);
    }
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok());
    if let Some(pages) = rss {
        let _ = writeln!(
            s,
            "{} {}",
            crate::metrics_scrape::RESIDENT_BYTES,
            pages * 4096
        );
    }
    s
}

async fn handle(
    hub: Arc<Hub>,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/metrics" {
        return Ok(reply(StatusCode::OK, metrics_text()));
    }
    let query = req.uri().query().unwrap_or_default().to_owned();
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let (Some(room), Some(user)) = (param("room"), param("user")) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "missing room or user".into(),
        ));
    };
    let Ok((resp, fut)) = fastwebsockets::upgrade::upgrade(&mut req) else {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            "not a WebSocket upgrade".into(),
        ));
    };
    tokio::spawn(async move {
        if let Ok(ws) = fut.await {
            connection(hub, room, user, ws).await;
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}

async fn flag_set(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}

async fn connection(
    hub: Arc<Hub>,
    room: String,
    user: String,
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
) {
    // Back to the TcpStream so the halves split without a lock (as the bench client does).
    let Ok(parts) = ws
        .into_inner()
        .into_inner()
        .downcast::<TokioIo<TcpStream>>()
    else {
        return;
    };
    let (rd, wr) = parts.io.into_inner().into_split();
    let rd = Cursor::new(parts.read_buf).chain(rd);
    let (mut rd, mut wr) = fastwebsockets::after_handshake_split(rd, wr, Role::Server);
    let (tx, mut rx) = mpsc::channel::<Out>(hub.queue);
    let (kick_tx, kick_rx) = watch::channel(false);
    let kick = Arc::new(kick_tx);

    let mut writer_kick = kick_rx.clone();
    let writer = tokio::spawn(async move {
        loop {
            let out = tokio::select! {
                biased;
                _ = flag_set(&mut writer_kick) => break,
                o = rx.recv() => o,
            };
            let (frame, close) = match &out {
                Some(Out::Data(b)) => (Frame::text(Payload::Borrowed(b)), false),
                Some(Out::Control(f)) => (
                    Frame::new(true, f.opcode, None, Payload::Borrowed(&f.payload)),
                    f.opcode == OpCode::Close,
                ),
                None => return,
            };
            let write = wr.write_frame(frame);
            tokio::pin!(write);
            let res = tokio::select! {
                biased;
                r = &mut write => r,
                _ = flag_set(&mut writer_kick) => {
                    // Finish the frame already on the wire so the close that follows is
                    // well formed, if the client reads again soon enough.
                    match tokio::time::timeout(KICK_GRACE, &mut write).await {
                        Ok(Ok(())) => break,
                        _ => return,
                    }
                }
            };
            if res.is_err() || close {
                return;
            }
        }
        // Kicked: the queue is dropped; the close frame reaches the client once it reads
        // what its socket already holds, then the socket goes.
        let close = Frame::close(SLOW_CONSUMER, b"slow_consumer");
        let _ = tokio::time::timeout(KICK_GRACE, wr.write_frame(close)).await;
    });

    // JSON string literals of the names, escaped once.
    let room_json = serde_json::to_string(&room).unwrap_or_else(|_| "\"\"".into());
    let user_json = serde_json::to_string(&user).unwrap_or_else(|_| "\"\"".into());
    let conn = hub.next_conn.fetch_add(1, Relaxed);
    let joined = format!(r#"{{"type":"joined","room":{room_json}}}"#);
    let _ = tx.try_send(Out::Data(Bytes::from(joined)));
    // Joined under the map lock, so a room emptied at the same moment is not removed
    // with this member in it.
    let shared_room = {
        let mut rooms = hub.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let r = rooms.entry(room.clone()).or_default().clone();
        lock(&r).members.push(Member {
            conn,
            tx: tx.clone(),
            kick: kick.clone(),
        });
        r
    };

    let owe = tx.clone();
    let mut send_fn = move |f: Frame<'static>| {
        let _ = owe.try_send(Out::Control(f));
        std::future::ready(Ok::<(), Infallible>(()))
    };
    let mut reader_kick = kick_rx;
    loop {
        let frame = tokio::select! {
            biased;
            _ = flag_set(&mut reader_kick) => break,
            f = rd.read_frame(&mut send_fn) => f,
        };
        let Ok(frame) = frame else { break };
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text if frame.fin && frame.payload.len() <= MAX_FRAME => {}
            _ => continue,
        }
        let Some(v) = FrameView::parse(&frame.payload) else {
            continue;
        };
        let (true, Some(cid), Some(body)) = (v.kind == "send", v.cid, v.body) else {
            continue;
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Borrowed strings carry no JSON escapes, so they can be written back as they are.
        let id = {
            let mut r = lock(&shared_room);
            r.next_id += 1;
            let id = r.next_id;
            let mut msg = BytesMut::with_capacity(body.len() + cid.len() + 128);
            let _ = write!(
                msg,
                r#"{{"type":"message","room":{room_json},"id":"{id}","from":{user_json},"cid":"{cid}","body":"{body}","ts":{ts}}}"#
            );
            let msg = msg.freeze();
            r.members
                .retain(|m| match m.tx.try_send(Out::Data(msg.clone())) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let _ = m.kick.send(true);
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                });
            id
        };
        let ack = format!(
            r#"{{"type":"ack","room":{room_json},"cid":"{cid}","id":"{id}","duplicate":false}}"#
        );
        if tx.try_send(Out::Data(Bytes::from(ack))).is_err() {
            let _ = kick.send(true);
        }
    }
    {
        let mut rooms = hub.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = lock(&shared_room);
        r.members.retain(|m| m.conn != conn);
        if r.members.is_empty()
            && rooms
                .get(&room)
                .is_some_and(|x| Arc::ptr_eq(x, &shared_room))
        {
            rooms.remove(&room);
        }
    }
    drop(tx);
    drop(send_fn);
    let _ = writer.await;
}

fn lock(room: &Mutex<Room>) -> std::sync::MutexGuard<'_, Room> {
    room.lock().unwrap_or_else(|e| e.into_inner())
}
