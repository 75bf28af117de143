//! The core's hardest rules, with no network and no store: time is an input (tokio's paused
//! clock), members are bare outbound queues, and the store is one that panics if touched.

use std::time::Duration;

use chat_server::membership::Lease;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::Config;
use crate::ownership::{Refusal, RoomOwnership};
use crate::room::Accepted;
use crate::store::{BoxFuture, HistoryQuery, MessageStore, StoreFuture};

/// Where the test ownership says the room lives now.
const OWNER: &str = "10.0.0.2:7001";
const NEXT_OWNER: &str = "10.0.0.3:7001";
const TTL: Duration = Duration::from_secs(5);
const MARGIN: Duration = Duration::from_millis(500);

/// The core must never reach the store: every call panics. (The driver's tests use it
/// too, for paths that must not load the room.)
pub(in crate::room) struct NoStore;

impl MessageStore for NoStore {
    fn append<'a>(
        &'a self,
        _room: &'a RoomId,
        _batch: &'a [ChatMessage],
        _guard: &'a dyn crate::store::WriteGuard,
    ) -> StoreFuture<'a, ()> {
        panic!("the room core wrote to the store")
    }

    fn read<'a>(
        &'a self,
        _room: &'a RoomId,
        _query: HistoryQuery,
    ) -> StoreFuture<'a, Vec<ChatMessage>> {
        panic!("the room core read the store")
    }

    fn check(&self) -> StoreFuture<'_, ()> {
        panic!("the room core probed the store")
    }

    fn name(&self) -> &'static str {
        "none"
    }
}

/// Ownership that knows the room lives at [`OWNER`].
struct Elsewhere;

impl RoomOwnership for Elsewhere {
    fn acquire<'a>(&'a self, _room: &'a RoomId) -> BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async { Err(Refusal::Unavailable) })
    }

    fn owner_elsewhere(&self, _room: &RoomId) -> Option<String> {
        Some(OWNER.into())
    }
}

fn ctx_with(f: impl FnOnce(&mut Config)) -> Arc<RoomCtx> {
    let mut cfg = Config::for_tests();
    // Presence frames would interleave with what the tests look at; one test turns it on.
    cfg.presence = false;
    f(&mut cfg);
    Arc::new(RoomCtx::new(
        Arc::new(cfg),
        Arc::new(NoStore),
        CancellationToken::new(),
        Arc::new(Elsewhere),
    ))
}

fn ctx() -> Arc<RoomCtx> {
    ctx_with(|_| {})
}

fn room(name: &str) -> RoomId {
    RoomId::new(name).expect("room id")
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user id")
}

fn cid(c: &str) -> ClientMsgId {
    ClientMsgId::new(c).expect("cid")
}

/// A grant under a lease that began now and lapses `TTL - MARGIN` later.
fn leased() -> (Lease, Grant) {
    let lease = Lease::new();
    lease.begin(1, Instant::now(), TTL, MARGIN);
    let grant = Grant::new(lease.clone());
    (lease, grant)
}

/// A grant under a lease that lapses `TTL - MARGIN` from now (and is not ended early).
fn lapsing() -> Grant {
    leased().1
}

/// Room `a` under `grant`, on a fresh [`ctx`].
fn room_a(grant: Grant) -> (Arc<RoomCtx>, RoomCore) {
    let ctx = ctx();
    let a = new_room(&ctx, "a", grant);
    (ctx, a)
}

fn new_room(ctx: &Arc<RoomCtx>, name: &str, grant: Grant) -> RoomCore {
    RoomCore::new(
        room(name),
        ctx.clone(),
        grant,
        Loaded::default(),
        Instant::now(),
    )
}

/// Peers named `names` (conn ids 1, 2, … in order), each joined to `core` with no `since`;
/// nothing is read from their queues yet.
fn members<const N: usize>(core: &mut RoomCore, names: [&str; N]) -> [Peer; N] {
    let mut id = 0;
    names.map(|name| {
        id += 1;
        let peer = Peer::new(id, name);
        peer.join(core, None);
        peer
    })
}

/// A member's side: its handle, and the queue its writer would drain.
struct Peer {
    conn: Arc<ConnHandle>,
    rx: mpsc::Receiver<Out>,
}

impl Peer {
    fn new(id: u64, name: &str) -> Peer {
        Peer::with_queue(id, name, 64)
    }

    fn with_queue(id: u64, name: &str, cap: usize) -> Peer {
        let (conn, rx) = ConnHandle::new(id, user(name), cap, CancellationToken::new());
        Peer {
            conn: Arc::new(conn),
            rx,
        }
    }

    fn join(&self, core: &mut RoomCore, since: Option<MessageId>) {
        core.handle(
            RoomCmd::Join {
                conn: self.conn.clone(),
                since,
            },
            Instant::now(),
        );
    }

    fn send_cmd(&self, c: &str) -> RoomCmd {
        RoomCmd::Send {
            from: self.conn.user.clone(),
            cid: cid(c),
            body: format!("body of {c}"),
            reply: Reply::Conn(self.conn.clone()),
            source: Source::Ws,
        }
    }

    fn send(&self, core: &mut RoomCore, c: &str) {
        core.handle(self.send_cmd(c), Instant::now());
    }

    /// Everything enqueued for this connection since the last call, decoded.
    fn frames(&mut self) -> Vec<ServerFrame> {
        let mut out = Vec::new();
        while let Ok(item) = self.rx.try_recv() {
            match item {
                Out::Frame(b) | Out::Pong(b) => out.push(decode(&b)),
                Out::Frames(v) | Out::Shared(v) => out.extend(v.iter().map(decode)),
            }
        }
        out
    }

    fn close_code(&self) -> Option<CloseCode> {
        self.conn.close_code()
    }
}

/// An HTTP sender's command and where its answer arrives.
fn http_send(from: &str, c: &str) -> (RoomCmd, oneshot::Receiver<Result<Accepted, ErrorCode>>) {
    let (tx, rx) = oneshot::channel();
    let cmd = RoomCmd::Send {
        from: user(from),
        cid: cid(c),
        body: format!("body of {c}"),
        reply: Reply::Http(tx),
        source: Source::Http,
    };
    (cmd, rx)
}

fn decode(b: &Bytes) -> ServerFrame {
    serde_json::from_slice(b).expect("a server frame")
}

fn messages(frames: &[ServerFrame]) -> Vec<(String, MessageId)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message(m) => Some((m.cid.to_string(), m.id)),
            _ => None,
        })
        .collect()
}

fn message_ids(frames: &[ServerFrame]) -> Vec<MessageId> {
    messages(frames).into_iter().map(|(_, id)| id).collect()
}

fn acks(frames: &[ServerFrame]) -> Vec<(String, MessageId, bool)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Ack {
                cid, id, duplicate, ..
            } => Some((cid.to_string(), *id, *duplicate)),
            _ => None,
        })
        .collect()
}

/// `(code, cid, owner)` of every error frame.
fn errors(frames: &[ServerFrame]) -> Vec<(ErrorCode, Option<String>, Option<String>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Error {
                code, cid, owner, ..
            } => Some((*code, cid.clone(), owner.clone())),
            _ => None,
        })
        .collect()
}

fn moved(c: Option<&str>, owner: &str) -> (ErrorCode, Option<String>, Option<String>) {
    (
        ErrorCode::RoomMoved,
        c.map(str::to_owned),
        Some(owner.to_owned()),
    )
}

/// The batch the core asks to write now.
fn take_persist(core: &mut RoomCore) -> Vec<ChatMessage> {
    match core.poll_action(Instant::now()) {
        Some(Action::Persist(batch)) => batch,
        other => panic!("expected a persist, got {other:?}"),
    }
}

/// `peer` sends `first`, the core hands that batch to the store (returned: it is in flight),
/// `peer` sends `then` (accepted, not handed to the store yet); `peer`'s frames are read.
fn in_flight(
    core: &mut RoomCore,
    peer: &mut Peer,
    first: &[&str],
    then: &[&str],
) -> Vec<ChatMessage> {
    for c in first {
        peer.send(core, c);
    }
    let batch = take_persist(core);
    for c in then {
        peer.send(core, c);
    }
    peer.frames();
    batch
}

fn store_ok(core: &mut RoomCore, batch: Vec<ChatMessage>) {
    core.on_persisted(batch, Ok(()), Instant::now());
}

fn stored_message(name: &str, from: &str, c: &str, id: MessageId) -> ChatMessage {
    ChatMessage {
        room: room(name),
        id,
        from: user(from),
        cid: cid(c),
        body: format!("body of {c}"),
        ts: id.unix_ms(),
    }
}

// ----------------------------------------------------------------------------------------
// Ordering, acks, isolation.
// ----------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn members_see_one_order_and_acks_wait_for_the_store() {
    let ctx = ctx();
    let mut a = new_room(&ctx, "a", Grant::forever());
    let mut b = new_room(&ctx, "b", Grant::forever());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    let mut carol = Peer::new(3, "carol");
    carol.join(&mut b, None);
    alice.send(&mut a, "a1");
    bob.send(&mut a, "b1");
    alice.send(&mut a, "a2");
    carol.send(&mut b, "c1");

    let (af, bf) = (alice.frames(), bob.frames());
    let order = messages(&af);
    assert_eq!(
        order.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        ["a1", "b1", "a2"]
    );
    assert_eq!(messages(&bf), order, "both members see one order");
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1), "ids increase");
    assert!(
        acks(&af).is_empty() && acks(&bf).is_empty(),
        "no ack before the store"
    );
    assert!(af.iter().chain(&bf).all(|f| match f {
        ServerFrame::Message(m) => m.room.as_str() == "a",
        _ => true,
    }));

    let batch = take_persist(&mut a);
    assert_eq!(batch.len(), 3);
    assert!(
        a.poll_action(Instant::now()).is_none(),
        "one batch in flight at a time"
    );
    assert!(acks(&alice.frames()).is_empty());
    store_ok(&mut a, batch);
    assert_eq!(
        acks(&alice.frames()),
        [
            ("a1".to_owned(), order[0].1, false),
            ("a2".to_owned(), order[2].1, false)
        ]
    );
    assert_eq!(acks(&bob.frames()), [("b1".to_owned(), order[1].1, false)]);

    // Room b saw only its own message, and room a's members nothing of room b.
    let cf = carol.frames();
    assert_eq!(
        messages(&cf)
            .iter()
            .map(|(c, _)| c.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );
    assert_eq!(take_persist(&mut b).len(), 1);
    assert_eq!(ctx.pending(), 1, "room b's message is still pending");
}

#[tokio::test(start_paused = true)]
async fn a_member_that_cannot_keep_up_is_closed_and_the_others_get_everything() {
    let ctx = ctx();
    let mut a = new_room(&ctx, "a", Grant::forever());
    let mut alice = Peer::new(1, "alice");
    let slow = Peer::with_queue(2, "slow", 3);
    alice.join(&mut a, None);
    slow.join(&mut a, None);
    for i in 0..5 {
        alice.send(&mut a, &format!("m{i}"));
    }
    assert_eq!(slow.close_code(), Some(CloseCode::SlowConsumer));
    assert_eq!(messages(&alice.frames()).len(), 5);
    assert!(!a.members.contains_key(&2), "the slow member left the room");
}

// ----------------------------------------------------------------------------------------
// Dedupe.
// ----------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_resend_while_pending_is_stored_once_and_both_are_acked() {
    let (_, mut a) = room_a(Grant::forever());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    alice.send(&mut a, "x");
    alice.send(&mut a, "x");
    assert_eq!(messages(&bob.frames()).len(), 1, "delivered once");
    let batch = take_persist(&mut a);
    assert_eq!(batch.len(), 1, "persisted once");
    let id = batch[0].id;
    store_ok(&mut a, batch);
    assert!(a.poll_action(Instant::now()).is_none());
    assert_eq!(
        acks(&alice.frames()),
        [("x".to_owned(), id, false), ("x".to_owned(), id, true)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_resend_after_the_write_is_acked_at_once_with_the_same_id() {
    let (_, mut a) = room_a(Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    alice.send(&mut a, "x");
    let batch = take_persist(&mut a);
    let id = batch[0].id;
    store_ok(&mut a, batch);
    alice.frames();
    alice.send(&mut a, "x");
    let f = alice.frames();
    assert_eq!(acks(&f), [("x".to_owned(), id, true)]);
    assert!(messages(&f).is_empty(), "not delivered again");
    assert!(a.poll_action(Instant::now()).is_none(), "not stored again");
    // The same pair over HTTP is the same message.
    let (cmd, mut answer) = http_send("alice", "x");
    a.handle(cmd, Instant::now());
    assert_eq!(
        answer.try_recv().expect("answered"),
        Ok(Accepted {
            id,
            duplicate: true
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_a_store_failure_rewrites_the_same_id_without_delivering_again() {
    let (ctx, mut a) = room_a(Grant::forever());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    alice.send(&mut a, "x");
    let batch = take_persist(&mut a);
    let id = batch[0].id;
    a.on_persisted(batch, Err(NotStored::Store), Instant::now());
    let f = alice.frames();
    assert!(acks(&f).is_empty());
    assert_eq!(
        errors(&f),
        [(ErrorCode::StoreUnavailable, Some("x".to_owned()), None)]
    );
    assert_eq!(ctx.pending(), 0);
    assert_eq!(message_ids(&bob.frames()), [id]);

    // While the store is marked down the retry is refused up front.
    ctx.mark_store_failed();
    alice.send(&mut a, "x");
    assert_eq!(errors(&alice.frames())[0].0, ErrorCode::StoreUnavailable);
    assert!(a.poll_action(Instant::now()).is_none());
    ctx.set_store_healthy(true);

    alice.send(&mut a, "x");
    let batch = take_persist(&mut a);
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].id, id, "the same id is written again");
    assert!(
        messages(&bob.frames()).is_empty(),
        "and not delivered again"
    );
    store_ok(&mut a, batch);
    assert_eq!(acks(&alice.frames()), [("x".to_owned(), id, false)]);
}

// ----------------------------------------------------------------------------------------
// The `since` seam.
// ----------------------------------------------------------------------------------------

/// Alice sends `n` messages and the store takes them; returns them.
fn fill(a: &mut RoomCore, alice: &mut Peer, n: usize) -> Vec<ChatMessage> {
    let mut all = Vec::new();
    for i in 0..n {
        alice.send(a, &format!("m{i}"));
        let batch = take_persist(a);
        all.extend(batch.iter().cloned());
        store_ok(a, batch);
    }
    alice.frames();
    all
}

/// In room `a` on `ctx`, alice (conn 1) joins and sends `n` messages the store takes; then
/// bob (conn 2) joins with `since` = the `since`-th of them. Returns the room, alice, bob and
/// what alice sent.
fn bob_joins_after(
    ctx: &Arc<RoomCtx>,
    n: usize,
    since: usize,
) -> (RoomCore, Peer, Peer, Vec<ChatMessage>) {
    let mut a = new_room(ctx, "a", Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    let sent = fill(&mut a, &mut alice, n);
    let bob = Peer::new(2, "bob");
    bob.join(&mut a, Some(sent[since].id));
    (a, alice, bob, sent)
}

#[tokio::test(start_paused = true)]
async fn since_inside_the_recent_window_replays_the_missed_then_live() {
    let (mut a, alice, mut bob, sent) = bob_joins_after(&ctx(), 5, 1);
    assert!(
        a.poll_action(Instant::now()).is_none(),
        "no store read for the window"
    );
    alice.send(&mut a, "live");
    let f = bob.frames();
    assert!(matches!(&f[0], ServerFrame::Joined { head, .. } if *head == Some(sent[4].id)));
    let ids = message_ids(&f);
    assert_eq!(ids.len(), 4, "m2, m3, m4, then the live one: {ids:?}");
    assert_eq!(&ids[..3], &[sent[2].id, sent[3].id, sent[4].id]);
    assert!(ids[3] > sent[4].id);
}

/// Alice fills a room whose window holds 3; Bob joins with `since` = the first message.
fn older_than_the_window() -> (RoomCore, Peer, Peer, Vec<ChatMessage>) {
    let (mut a, alice, mut bob, sent) = bob_joins_after(&ctx_with(|c| c.recent_per_room = 3), 6, 0);
    match a.poll_action(Instant::now()) {
        Some(Action::Replay { conn, since, upto }) => {
            assert_eq!(conn.id, 2);
            assert_eq!(since, sent[0].id);
            assert_eq!(
                upto, sent[2].id,
                "the store serves up to the window's floor"
            );
        }
        other => panic!("expected a replay, got {other:?}"),
    }
    let f = bob.frames();
    assert_eq!(f.len(), 1, "only `joined` until the replay is done: {f:?}");
    (a, alice, bob, sent)
}

#[tokio::test(start_paused = true)]
async fn since_older_than_the_window_replays_from_the_store_with_live_messages_buffered() {
    let (mut a, alice, mut bob, sent) = older_than_the_window();
    alice.send(&mut a, "live1");
    assert!(bob.frames().is_empty(), "live messages wait for the replay");
    // What the replay task delivers: (since, floor] from the store.
    let page = sent[1..3]
        .iter()
        .map(|m| Bytes::from(ServerFrame::encode_message(m)))
        .collect();
    assert!(bob.conn.deliver(Out::Frames(page)));
    a.on_replay_done(2, true, Instant::now());
    alice.send(&mut a, "live2");
    let ids = message_ids(&bob.frames());
    let want: Vec<MessageId> = sent[1..].iter().map(|m| m.id).collect();
    assert_eq!(&ids[..5], &want[..], "stored part, then the window");
    assert_eq!(ids.len(), 7, "then both live messages: {ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "no gap, no duplicate");
}

#[tokio::test(start_paused = true)]
async fn a_failed_replay_answers_store_unavailable_and_removes_the_member() {
    let (mut a, alice, mut bob, _) = older_than_the_window();
    alice.send(&mut a, "live1");
    a.on_replay_done(2, false, Instant::now());
    let f = bob.frames();
    assert_eq!(errors(&f), [(ErrorCode::StoreUnavailable, None, None)]);
    assert!(messages(&f).is_empty(), "the buffer is not delivered");
    alice.send(&mut a, "live2");
    bob.send(&mut a, "b1");
    let f = bob.frames();
    assert!(messages(&f).is_empty());
    assert_eq!(errors(&f)[0].0, ErrorCode::NotJoined);
}

// ----------------------------------------------------------------------------------------
// Loading.
// ----------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_loaded_room_dedupes_stored_cids_and_mints_ids_above_its_head() {
    let ctx = ctx();
    // A previous owner whose clock was an hour ahead of this node's.
    let head = MessageId::first_at(now_ms() + 3_600_000);
    let older = MessageId::first_at(now_ms() + 3_500_000);
    let loaded = Loaded {
        newest: vec![stored_message("a", "alice", "x", head)],
        older: vec![stored_message("a", "alice", "w", older)],
        ..Loaded::default()
    };
    let mut a = RoomCore::new(
        room("a"),
        ctx.clone(),
        Grant::forever(),
        loaded,
        Instant::now(),
    );
    let [mut alice] = members(&mut a, ["alice"]);
    alice.send(&mut a, "x");
    alice.send(&mut a, "w");
    let f = alice.frames();
    assert!(matches!(&f[0], ServerFrame::Joined { head: h, .. } if *h == Some(head)));
    assert_eq!(
        acks(&f),
        [("x".to_owned(), head, true), ("w".to_owned(), older, true)]
    );
    assert!(a.poll_action(Instant::now()).is_none(), "nothing to write");
    alice.send(&mut a, "y");
    let batch = take_persist(&mut a);
    assert!(
        batch[0].id > head,
        "{:?} must follow the loaded head {head:?}",
        batch[0].id
    );
    assert_eq!(message_ids(&alice.frames()), [batch[0].id]);
}

// ----------------------------------------------------------------------------------------
// The lease: a room whose grant lapsed assigns nothing, delivers nothing, acks nothing.
// ----------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn after_the_lease_lapses_a_send_is_refused_with_nothing_assigned_or_stored() {
    let (ctx, mut a) = room_a(lapsing());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    alice.frames();
    bob.frames();
    let head = a.head;

    tokio::time::advance(TTL - MARGIN).await;
    alice.send(&mut a, "x");
    assert_eq!(errors(&alice.frames()), [moved(Some("x"), OWNER)]);
    assert!(bob.frames().is_empty(), "nothing delivered");
    assert_eq!(a.head, head, "no id assigned");
    assert!(!a.dedupe.contains(&dedupe::key(&user("alice"), &cid("x"))));
    assert!(
        a.poll_action(Instant::now()).is_none(),
        "nothing to persist"
    );
    assert_eq!(ctx.pending(), 0);
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert_eq!(bob.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended(), "nothing in flight: the room ends");

    // What is still queued when the driver drains the inbox is refused the same way.
    let mut carol = Peer::new(3, "carol");
    carol.join(&mut a, None);
    assert_eq!(errors(&carol.frames()), [moved(None, OWNER)]);
    assert_eq!(
        carol.close_code(),
        None,
        "a refused joiner was never a member"
    );
}

#[tokio::test(start_paused = true)]
async fn commands_queued_during_a_pause_are_all_refused() {
    let (_, mut a) = room_a(lapsing());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    let before = fill(&mut a, &mut alice, 1);
    bob.frames();
    let head = a.head;
    assert_eq!(head, before[0].id);

    // These arrive while the process is stopped; when it runs again the lease is over.
    let (http, mut answer) = http_send("dave", "h1");
    let mut carol = Peer::new(3, "carol");
    let queued = vec![
        alice.send_cmd("p1"),
        bob.send_cmd("p2"),
        RoomCmd::Join {
            conn: carol.conn.clone(),
            since: None,
        },
        http,
        alice.send_cmd("m0"),
    ];
    tokio::time::advance(TTL).await;
    for cmd in queued {
        a.handle(cmd, Instant::now());
    }
    assert_eq!(
        errors(&alice.frames()),
        [moved(Some("p1"), OWNER), moved(Some("m0"), OWNER)],
        "refused, even the duplicate of a stored message: only the owner answers it"
    );
    let bf = bob.frames();
    assert_eq!(errors(&bf), [moved(Some("p2"), OWNER)]);
    assert!(messages(&bf).is_empty());
    assert_eq!(errors(&carol.frames()), [moved(None, OWNER)]);
    assert_eq!(
        answer.try_recv().expect("answered"),
        Err(ErrorCode::RoomMoved)
    );
    assert_eq!(a.head, head);
    assert!(a.poll_action(Instant::now()).is_none());
    assert!(a.is_ended());
}

#[tokio::test(start_paused = true)]
async fn a_batch_in_flight_at_the_lapse_is_waited_for_and_not_acked() {
    let (ctx, mut a) = room_a(lapsing());
    let [mut alice, mut bob] = members(&mut a, ["alice", "bob"]);
    let batch = in_flight(&mut a, &mut alice, &["x"], &["y"]);
    bob.frames();

    tokio::time::advance(TTL - MARGIN).await;
    bob.send(&mut a, "z");
    assert_eq!(errors(&bob.frames()), [moved(Some("z"), OWNER)]);
    // y was accepted but not handed to the store: dropped, forgotten, answered.
    assert_eq!(errors(&alice.frames()), [moved(Some("y"), OWNER)]);
    assert!(!a.dedupe.contains(&dedupe::key(&user("alice"), &cid("y"))));
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert_eq!(bob.close_code(), Some(CloseCode::RoomMoved));
    assert!(
        a.poll_action(Instant::now()).is_none(),
        "no new write starts"
    );
    assert!(!a.is_ended(), "x is still in flight");
    assert_eq!(ctx.pending(), 1);

    // The store took x after all; the ack is still withheld.
    store_ok(&mut a, batch);
    let f = alice.frames();
    assert!(acks(&f).is_empty(), "no ack after the lapse: {f:?}");
    assert_eq!(errors(&f), [moved(Some("x"), OWNER)]);
    assert_eq!(ctx.pending(), 0);
    assert!(a.is_ended(), "ends once the write has come back");
}

#[tokio::test(start_paused = true)]
async fn a_write_that_returns_after_the_lapse_is_not_acked() {
    let (_, mut a) = room_a(lapsing());
    let [mut alice] = members(&mut a, ["alice"]);
    let batch = in_flight(&mut a, &mut alice, &["x", "x"], &[]);
    // Nothing happens in the room until the write returns, after the lapse.
    tokio::time::advance(TTL).await;
    store_ok(&mut a, batch);
    let f = alice.frames();
    assert!(acks(&f).is_empty());
    assert_eq!(
        errors(&f),
        [moved(Some("x"), OWNER), moved(Some("x"), OWNER)],
        "every waiter of the message is answered"
    );
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended());
}

#[tokio::test(start_paused = true)]
async fn a_write_the_driver_withheld_fences_the_room_whatever_the_lease_says_now() {
    let (_, mut a) = room_a(Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    let batch = in_flight(&mut a, &mut alice, &["x"], &[]);
    a.on_persisted(batch, Err(NotStored::Fenced), Instant::now());
    assert_eq!(errors(&alice.frames()), [moved(Some("x"), OWNER)]);
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended());
}

#[tokio::test(start_paused = true)]
async fn a_quiet_room_is_fenced_by_the_first_command_after_its_lease_ends() {
    let ctx = ctx();
    let (lease, grant) = leased();
    let mut a = new_room(&ctx, "a", grant);
    let [alice] = members(&mut a, ["alice"]);
    assert_eq!(a.poll_timeout(), None, "no timer per room for the lease");
    let expiry = lease.expires_at().expect("a lease that ends");
    tokio::time::advance(expiry - Instant::now()).await;
    // What the lease guard sends every room when the lease lapses.
    a.handle(handoff(Some(CloseCode::RoomMoved), None), Instant::now());
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended());

    // A lease ended outright fences at the next entry point.
    let (lease, grant) = leased();
    let mut b = new_room(&ctx, "b", grant);
    let bob = Peer::new(2, "bob");
    bob.join(&mut b, None);
    lease.end();
    assert!(b.poll_action(Instant::now()).is_none());
    assert_eq!(bob.close_code(), Some(CloseCode::RoomMoved));
    assert!(b.is_ended());
}

// ----------------------------------------------------------------------------------------
// Handoff.
// ----------------------------------------------------------------------------------------

fn handoff(close: Option<CloseCode>, owner: Option<&str>) -> RoomCmd {
    RoomCmd::Handoff {
        close,
        owner: owner.map(str::to_owned),
        owner_id: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_handoff_refuses_new_work_flushes_then_closes_4001_and_ends() {
    let (ctx, mut a) = room_a(Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    let first = in_flight(&mut a, &mut alice, &["x"], &["y"]);

    a.handle(
        handoff(Some(CloseCode::RoomMoved), Some(NEXT_OWNER)),
        Instant::now(),
    );
    let mut carol = Peer::new(3, "carol");
    carol.join(&mut a, None);
    assert_eq!(errors(&carol.frames()), [moved(None, NEXT_OWNER)]);
    alice.send(&mut a, "z");
    assert_eq!(errors(&alice.frames()), [moved(Some("z"), NEXT_OWNER)]);
    assert!(!a.is_ended());

    store_ok(&mut a, first);
    assert_eq!(acks(&alice.frames()).len(), 1, "x acked");
    assert_eq!(
        alice.close_code(),
        None,
        "members stay until the flush is done"
    );
    let second = take_persist(&mut a);
    assert_eq!(second.len(), 1, "y is still flushed");
    assert!(!a.is_ended());
    store_ok(&mut a, second);
    assert_eq!(acks(&alice.frames()).len(), 1, "y acked");
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended());
    assert_eq!(ctx.pending(), 0);

    // Commands queued behind the handoff are answered with the new owner.
    alice.send(&mut a, "w");
    assert_eq!(errors(&alice.frames()), [moved(Some("w"), NEXT_OWNER)]);
}

#[tokio::test(start_paused = true)]
async fn a_handoff_flush_that_misses_its_deadline_drops_what_is_left() {
    let ctx = ctx_with(|c| c.store_timeout = Duration::from_secs(1));
    let mut a = new_room(&ctx, "a", Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    let stuck = in_flight(&mut a, &mut alice, &["x"], &["y"]);
    let began = Instant::now();
    a.handle(
        handoff(Some(CloseCode::RoomMoved), Some(NEXT_OWNER)),
        Instant::now(),
    );
    assert_eq!(a.poll_timeout(), Some(began + Duration::from_secs(2)));

    tokio::time::advance(Duration::from_secs(2)).await;
    a.on_timeout(Instant::now());
    assert_eq!(errors(&alice.frames()), [moved(Some("y"), NEXT_OWNER)]);
    assert!(!a.dedupe.contains(&dedupe::key(&user("alice"), &cid("y"))));
    assert!(a.poll_action(Instant::now()).is_none(), "y is not written");
    assert_eq!(ctx.pending(), 1, "x is still in flight");
    assert!(!a.is_ended(), "a write in flight is waited for");
    assert_eq!(a.poll_timeout(), None);

    // The stuck write comes back (the driver bounds it by the store timeout).
    a.on_persisted(stuck, Err(NotStored::Store), Instant::now());
    assert_eq!(errors(&alice.frames())[0].0, ErrorCode::StoreUnavailable);
    assert_eq!(alice.close_code(), Some(CloseCode::RoomMoved));
    assert!(a.is_ended());
    assert_eq!(ctx.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_handoff_keeps_its_members_and_drops_at_its_deadline_with_going_away() {
    let (ctx, mut a) = room_a(Grant::forever());
    let [mut alice] = members(&mut a, ["alice"]);
    let batch = in_flight(&mut a, &mut alice, &["x"], &["y"]);
    a.handle(handoff(None, None), Instant::now());
    alice.send(&mut a, "z");
    assert_eq!(
        errors(&alice.frames()),
        [(ErrorCode::GoingAway, Some("z".to_owned()), None)]
    );

    tokio::time::advance(2 * ctx.config.store_timeout).await;
    a.on_timeout(Instant::now());
    assert_eq!(
        errors(&alice.frames()),
        [(ErrorCode::GoingAway, Some("y".to_owned()), None)]
    );
    store_ok(&mut a, batch);
    assert_eq!(acks(&alice.frames()).len(), 1, "x acked");
    assert!(
        !a.is_ended(),
        "a shutdown handoff stays until its members are gone"
    );
    assert_eq!(alice.close_code(), None);
    assert!(!a.is_idle());
    a.handle(
        RoomCmd::Leave {
            conn_id: 1,
            notify: false,
        },
        Instant::now(),
    );
    assert!(a.is_idle(), "then the driver drops it as idle");
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_lapses_during_a_handoff_fences_the_room() {
    let (_, mut a) = room_a(lapsing());
    let [mut alice] = members(&mut a, ["alice"]);
    let batch = in_flight(&mut a, &mut alice, &["x"], &[]);
    a.handle(handoff(None, None), Instant::now());
    tokio::time::advance(TTL).await;
    store_ok(&mut a, batch);
    let f = alice.frames();
    assert!(acks(&f).is_empty());
    assert_eq!(errors(&f), [moved(Some("x"), OWNER)]);
    assert_eq!(
        alice.close_code(),
        Some(CloseCode::RoomMoved),
        "fenced, not going_away"
    );
    assert!(a.is_ended());
}

#[tokio::test(start_paused = true)]
async fn presence_is_broadcast_to_the_other_members() {
    let ctx = ctx_with(|c| c.presence = true);
    let mut a = new_room(&ctx, "a", Grant::forever());
    let [mut alice, _bob] = members(&mut a, ["alice", "bob"]);
    a.handle(
        RoomCmd::Leave {
            conn_id: 2,
            notify: true,
        },
        Instant::now(),
    );
    let events: Vec<(String, PresenceEvent)> = alice
        .frames()
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::Presence { user, event, .. } => Some((user.to_string(), event)),
            _ => None,
        })
        .collect();
    assert_eq!(
        events,
        [
            ("bob".to_owned(), PresenceEvent::Join),
            ("bob".to_owned(), PresenceEvent::Leave)
        ]
    );
}
