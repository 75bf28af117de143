//! One room's owner task; the commands the rest of the node sends rooms are in `cmd.rs`.
//!
//! [`run`] is the driver of a room: it first asks the cluster for the room's [`Grant`]
//! (`RoomOwnership::acquire`) and refuses everything queued if the room is not this node's
//! to serve; only then does it load the room from the store (its head, recent window and the
//! cids of the dedupe window) and hand it to [`core::RoomCore`], the state machine that
//! decides everything else. The driver owns the I/O: it feeds the core commands, store
//! results and wake-ups with the current time (taken per command, since a process pause can
//! fall between two), performs the store writes and replays the core asks for in spawned
//! tasks that report back on bounded channels, and removes the room from the registry when
//! it is idle or done. It makes no decision about ordering, acks or the fence itself, except
//! one: a write whose grant lapsed before it reached the store is not made.

mod cmd;
mod core;
mod ctx;
mod dedupe;

use std::sync::Arc;
use std::time::Duration;

use common::id::now_ms;
use common::{metrics as m, ErrorCode, MessageId, RoomId, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

pub use self::cmd::{
    Accepted, Reply, RoomCmd, RoomPresence, Source, StateChange, PRESENCE_LIST_MAX,
};
use self::core::{Action, Loaded, NotStored, RoomCore};
use self::ctx::ActiveRoomGuard;
pub use self::ctx::RoomCtx;
use crate::frames::Out;
use crate::hooks::RoomHook;
use crate::outbound::ConnHandle;
use crate::ownership::{Grant, Refusal};
use crate::store::{HistoryQuery, HookCursor, PageFrom, RoomState, StoreError};

/// Messages per store read when replaying to a joiner.
const REPLAY_PAGE: usize = 500;
/// Commands handled per wake-up before the task checks its other inputs.
const COMMANDS_PER_WAKE: usize = 256;

/// A store write's result, on its way back to the room.
struct Persisted {
    batch: Vec<common::ChatMessage>,
    result: Result<(), NotStored>,
}

/// Who is in the room now, asked of the room's own task (for webhook deliveries); nobody
/// if it does not answer within a second.
fn online_now(room: mpsc::WeakSender<RoomCmd>) -> crate::hooks::Online {
    Arc::new(move || {
        let room = room.clone();
        Box::pin(async move {
            let Some(tx) = room.upgrade() else {
                return Vec::new();
            };
            let (reply, answer) = oneshot::channel();
            if tx.try_send(RoomCmd::Presence { reply }).is_err() {
                return Vec::new();
            }
            drop(tx);
            match tokio::time::timeout(Duration::from_secs(1), answer).await {
                Ok(Ok(RoomPresence { users, .. })) => users,
                _ => Vec::new(),
            }
        })
    })
}

/// What a command forwarded to a room's next task resolves with.
pub(crate) type Forwarded = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How a room's task leaves the registry that started it: the registry hands each task
/// its seat, so a room never imports the registry.
pub(crate) trait Seat: Send + Sync {
    /// Removes the room's entry if it is still this task's (`generation`) and
    /// `still_idle()` holds while the registry's lock is held.
    fn vacate(&self, room: &RoomId, generation: u64, still_idle: &mut dyn FnMut() -> bool) -> bool;
    /// Delivers a command that reached a closing room to the room's next task.
    fn forward(self: Arc<Self>, room: RoomId, cmd: RoomCmd) -> Forwarded;
}

/// Runs a room until it is idle (no members, nothing to persist) past the idle timeout, or
/// handed over, or fenced.
pub(crate) async fn run(
    id: RoomId,
    generation: u64,
    seat: Arc<dyn Seat>,
    ctx: Arc<RoomCtx>,
    mut rx: mpsc::Receiver<RoomCmd>,
    self_tx: mpsc::WeakSender<RoomCmd>,
) {
    let _active = ActiveRoomGuard::new();
    // Ownership before anything else: a room that is not ours must not even be loaded, or
    // its recent window and dedupe state could predate the real owner's writes.
    let asked = Instant::now();
    let acquired = ctx.ownership.acquire(&id).await;
    metrics::histogram!(m::ROOM_ACQUIRE_SECONDS).record(asked.elapsed().as_secs_f64());
    let grant = match acquired {
        Ok(grant) => grant,
        Err(refusal) => {
            let (reason, code, message, owner) = match refusal {
                Refusal::Moved { owner } => (
                    "moved",
                    ErrorCode::RoomMoved,
                    "another node owns this room; reconnect through the router",
                    owner,
                ),
                Refusal::Unavailable => (
                    "unavailable",
                    ErrorCode::RoomUnavailable,
                    "the room is between owners; retry shortly (with the same cid)",
                    None,
                ),
            };
            metrics::counter!(m::ROOM_ACQUIRE_REFUSED, "reason" => reason).increment(1);
            tracing::debug!(room = %id, reason, ?owner, "room not acquired");
            seat.vacate(&id, generation, &mut || true);
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                cmd.refuse_with_owner(&id, code, message, owner.as_deref());
            }
            return;
        }
    };
    let (loaded, cursor) = match load(&id, &ctx, &grant).await {
        Ok(loaded) => loaded,
        Err(e) => {
            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
            tracing::warn!(room = %id, error = %e, "room activation failed");
            seat.vacate(&id, generation, &mut || true);
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                cmd.refuse(
                    &id,
                    ErrorCode::StoreUnavailable,
                    "store unavailable; join again later",
                );
            }
            return;
        }
    };
    let head = loaded.newest.last().map_or(MessageId(0), |m| m.id);
    let hook = ctx.hooks.as_ref().filter(|h| h.applies_to(&id)).map(|h| {
        Arc::new(RoomHook::start(
            h.clone(),
            ctx.store.clone(),
            id.clone(),
            grant.clone(),
            cursor,
            head,
            online_now(self_tx.clone()),
        ))
    });
    let mut core = RoomCore::new(id, ctx.clone(), grant.clone(), loaded, Instant::now());
    let (persist_tx, mut persist_rx) = mpsc::channel::<Persisted>(1);
    let (saved_tx, mut saved_rx) = mpsc::channel::<Result<(), NotStored>>(1);
    let mut idle_since: Option<Instant> = None;
    // The core's next deadline (handoff flush, grant expiry); one timer, reset only when the
    // deadline moves, so a busy room does not register a timer per wake-up.
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        while let Some(action) = core.poll_action(Instant::now()) {
            match action {
                Action::Persist(batch) => spawn_persist(
                    &ctx,
                    core.id(),
                    &grant,
                    hook.clone(),
                    batch,
                    persist_tx.clone(),
                ),
                Action::SaveState(state) => {
                    spawn_save_state(&ctx, core.id(), &grant, state, saved_tx.clone())
                }
                Action::Replay { conn, since, upto } => {
                    spawn_replay(&ctx, core.id(), conn, since, upto, self_tx.clone())
                }
            }
        }
        if core.is_ended() {
            seat.vacate(core.id(), generation, &mut || true);
            rx.close();
            // What was queued meanwhile is answered by the core: `room_moved` (with the
            // owner when known) or `going_away`.
            while let Ok(cmd) = rx.try_recv() {
                core.handle(cmd, Instant::now());
            }
            break;
        }
        // A room whose webhook deliveries are behind stays: it is the one delivering them.
        // On shutdown the next owner delivers them, from the cursor in the store.
        let idle = core.is_idle()
            && (ctx.shutdown.is_cancelled() || hook.as_ref().is_none_or(|h| h.is_idle()));
        if idle && idle_since.is_none() {
            idle_since = Some(Instant::now());
        } else if !idle {
            idle_since = None;
        }
        let idle_deadline = idle_since.map(|t| {
            if ctx.shutdown.is_cancelled() {
                t
            } else {
                t + ctx.config.room_idle_timeout
            }
        });
        let wake = core.poll_timeout();
        if wake != armed {
            if let Some(at) = wake {
                timer.as_mut().reset(at);
            }
            armed = wake;
        }
        tokio::select! {
            biased;
            Some(p) = persist_rx.recv() => core.on_persisted(p.batch, p.result, Instant::now()),
            Some(result) = saved_rx.recv() => core.on_state_saved(result, Instant::now()),
            () = async {
                match &hook {
                    Some(h) => h.idle_changed().await,
                    None => std::future::pending().await,
                }
            } => {}
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                step(&mut core, cmd);
                for _ in 1..COMMANDS_PER_WAKE {
                    match rx.try_recv() {
                        Ok(cmd) => step(&mut core, cmd),
                        Err(_) => break,
                    }
                }
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                core.on_timeout(Instant::now());
            }
            _ = async { tokio::time::sleep_until(idle_deadline.unwrap_or_else(Instant::now)).await },
                if idle_deadline.is_some() =>
            {
                // Exit only if nobody can have queued a command for us: checked under the
                // registry lock, so a concurrent lookup either sees us gone or sees a
                // non-empty inbox.
                if seat.vacate(core.id(), generation, &mut || rx.is_empty()) {
                    rx.close();
                    let mut leftovers = Vec::new();
                    while let Ok(cmd) = rx.try_recv() {
                        leftovers.push(cmd);
                    }
                    for cmd in leftovers {
                        seat.clone().forward(core.id().clone(), cmd).await;
                    }
                    break;
                }
                idle_since = None;
            }
            _ = ctx.shutdown.cancelled(), if !ctx.shutdown.is_cancelled() => {
                // Re-evaluate the idle deadline with shutdown's zero timeout.
            }
        }
    }
    tracing::debug!(room = %core.id(), "room closed");
}

/// Hands one command to the core with the time it is handled at (not the time its batch of
/// commands was taken from the inbox: a pause can fall between two of them).
fn step(core: &mut RoomCore, cmd: RoomCmd) {
    let now = Instant::now();
    let accepted = core.accepted();
    match cmd {
        RoomCmd::ReplayDone { conn_id, ok } => core.on_replay_done(conn_id, ok, now),
        cmd => core.handle(cmd, now),
    }
    if core.accepted() != accepted {
        // From accepting the message to having enqueued it for every member.
        metrics::histogram!(m::FANOUT_SECONDS).record(now.elapsed().as_secs_f64());
    }
}

/// Reads what a room needs to start: its newest messages (head and recent window) and the
/// client message ids of the dedupe window that those do not cover, so retries after an
/// owner change or restart are still recognised. Unless this incarnation wrote the head,
/// the room was someone else's (another node, or this node before a restart or a lapse):
/// the store is fenced above the head first, so a write that owner still had on its way
/// can never land behind what this node serves (see `MessageStore::fence`).
async fn load(
    id: &RoomId,
    ctx: &Arc<RoomCtx>,
    grant: &Grant,
) -> Result<(Loaded, Option<HookCursor>), StoreError> {
    let cfg = &ctx.config;
    let read = |q: HistoryQuery| within(cfg.store_timeout, ctx.store.read(id, q));
    let hooked = ctx.hooks.as_ref().is_some_and(|h| h.applies_to(id));
    let (newest, state, cursor) = tokio::join!(
        read(HistoryQuery {
            after: None,
            before: None,
            limit: cfg.recent_per_room,
            from: PageFrom::Newest,
        }),
        within(cfg.store_timeout, ctx.store.room_state(id)),
        async {
            if hooked {
                within(cfg.store_timeout, ctx.store.hook_cursor(id)).await
            } else {
                Ok(None)
            }
        }
    );
    let (newest, state, cursor) = (newest?, state?, cursor?);
    let now = now_ms();
    let expires_in = state
        .expires_at
        .map(|at| Duration::from_millis(at.saturating_sub(now)));
    let head = newest.last().map_or(MessageId(0), |m| m.id);
    if !grant.minted_here(head, cfg.node_id) {
        // An empty room's late writes were minted recently: within the dedupe window (a
        // retry re-persists a failed message under its id) plus the writes' own timeouts.
        let window = cfg.dedupe_window + cfg.store_timeout * 2 + Duration::from_secs(60);
        within(cfg.store_timeout, ctx.store.fence(id, head, window))
            .await
            .inspect_err(|_| {
                metrics::counter!(m::STORE_ERRORS, "op" => "fence").increment(1);
            })?;
    }
    let window_start =
        MessageId::first_at(now_ms().saturating_sub(cfg.dedupe_window.as_millis() as u64));
    let mut older = Vec::new();
    if let Some(first) = newest.first() {
        if newest.len() >= cfg.recent_per_room && first.id > window_start {
            older = read(HistoryQuery {
                after: Some(MessageId(window_start.0.saturating_sub(1))),
                before: Some(first.id),
                limit: cfg.dedupe_max_per_room,
                from: PageFrom::Newest,
            })
            .await?;
        }
    }
    let loaded = Loaded {
        newest,
        older,
        state,
        expires_in,
    };
    Ok((loaded, cursor))
}

/// A store call that has not answered within `timeout` has failed.
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

/// Writes the room's lifecycle state and reports back, with the same grant checks as a
/// message write.
fn spawn_save_state(
    ctx: &Arc<RoomCtx>,
    room: &RoomId,
    grant: &Grant,
    state: RoomState,
    tx: mpsc::Sender<Result<(), NotStored>>,
) {
    let ctx = ctx.clone();
    let room = room.clone();
    let grant = grant.clone();
    ctx.tracker.clone().spawn(
        async move {
            let result = if !grant.is_valid() {
                Err(NotStored::Fenced)
            } else {
                let saved = ctx.store.set_room_state(&room, state, &grant);
                match within(ctx.config.store_timeout, saved).await {
                    Ok(()) => Ok(()),
                    Err(StoreError::Fenced) => Err(NotStored::Fenced),
                    Err(e) => {
                        metrics::counter!(m::STORE_ERRORS, "op" => "append").increment(1);
                        tracing::warn!(%room, error = %e, "saving the room's state failed");
                        Err(NotStored::Store)
                    }
                }
            };
            let _ = tx.send(result).await;
        }
        .instrument(tracing::Span::current()),
    );
}

/// Writes one batch (the core keeps one in flight, so batches grow under load) and reports
/// back. The grant is checked again right before the write: time passes between the core
/// asking and this task running, and a write after the lease lapsed could land after the
/// next owner loaded the room.
fn spawn_persist(
    ctx: &Arc<RoomCtx>,
    room: &RoomId,
    grant: &Grant,
    hook: Option<Arc<RoomHook>>,
    batch: Vec<common::ChatMessage>,
    tx: mpsc::Sender<Persisted>,
) {
    let ctx = ctx.clone();
    let room = room.clone();
    let grant = grant.clone();
    ctx.tracker.clone().spawn(async move {
        let result = if !grant.is_valid() {
            metrics::counter!(m::FENCED, "op" => "persist").increment(1);
            tracing::info!(%room, messages = batch.len(), "grant lapsed before the write: not written");
            Err(NotStored::Fenced)
        } else {
            let started = Instant::now();
            let append = ctx.store.append(&room, &batch, &grant);
            let written = async {
                match &hook {
                    Some(hook) => hook.persist(ctx.store.as_ref(), append, &batch).await,
                    None => append.await,
                }
            };
            let result = within(ctx.config.store_timeout, written).await;
            metrics::histogram!(m::STORE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            if let Err(e @ (StoreError::Unavailable(_) | StoreError::Timeout)) = &result {
                metrics::counter!(m::STORE_ERRORS, "op" => "append").increment(1);
                ctx.mark_store_failed();
                tracing::warn!(%room, error = %e, messages = batch.len(), "store write failed");
            }
            match result {
                Ok(()) => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let cids: Vec<&str> = batch.iter().map(|m| m.cid.as_str()).collect();
                        tracing::debug!(messages = batch.len(), ?cids, "stored");
                    }
                    Ok(())
                }
                // Lapsed between the stamp and the send: nothing more was sent.
                Err(StoreError::Fenced) => {
                    metrics::counter!(m::FENCED, "op" => "persist").increment(1);
                    Err(NotStored::Fenced)
                }
                Err(_) => Err(NotStored::Store),
            }
        };
        let _ = tx.send(Persisted { batch, result }).await;
    }.instrument(tracing::Span::current()));
}

/// Serves a joiner the stored messages in `(since, upto]`, page by page, waiting on its
/// queue (this one client may be slow; the room is not), then tells the room.
fn spawn_replay(
    ctx: &Arc<RoomCtx>,
    room: &RoomId,
    conn: Arc<ConnHandle>,
    since: MessageId,
    upto: MessageId,
    done: mpsc::WeakSender<RoomCmd>,
) {
    let ctx = ctx.clone();
    let room = room.clone();
    ctx.tracker.clone().spawn(
        async move {
            let mut after = since;
            let mut replayed = 0u64;
            let ok = loop {
                // One page at a time per connection, across its rooms.
                let Some(_turn) = conn.replay_turn().await else {
                    return;
                };
                let q = HistoryQuery {
                    after: Some(after),
                    before: Some(MessageId(upto.0 + 1)),
                    limit: REPLAY_PAGE,
                    from: PageFrom::Oldest,
                };
                let page =
                    match tokio::time::timeout(ctx.config.store_timeout, ctx.store.read(&room, q))
                        .await
                    {
                        Ok(Ok(page)) => page,
                        Ok(Err(e)) => {
                            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                            tracing::warn!(%room, error = %e, "replay read failed");
                            break false;
                        }
                        Err(_) => {
                            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                            tracing::warn!(%room, "replay read timed out");
                            break false;
                        }
                    };
                let Some(last) = page.last() else { break true };
                after = last.id;
                let full = page.len() == REPLAY_PAGE;
                replayed += page.len() as u64;
                let frames = page
                    .iter()
                    .map(|msg| bytes::Bytes::from(ServerFrame::encode_message(msg)))
                    .collect();
                // Only the encoded page waits on the client, not the messages as well.
                drop(page);
                if !conn.deliver_wait(Out::Frames(frames)).await {
                    return;
                }
                if !full {
                    break true;
                }
            };
            metrics::counter!(m::MESSAGES_REPLAYED).increment(replayed);
            if let Some(tx) = done.upgrade() {
                let _ = tx
                    .send(RoomCmd::ReplayDone {
                        conn_id: conn.id,
                        ok,
                    })
                    .await;
            }
        }
        .instrument(tracing::Span::current()),
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use common::{ClientMsgId, UserId};

    use super::core::tests::NoStore;
    use super::*;
    use crate::config::Config;
    use crate::ownership::RoomOwnership;
    use crate::registry::Registry;
    use crate::store::BoxFuture;

    struct Refusing(Refusal);

    impl RoomOwnership for Refusing {
        fn acquire<'a>(&'a self, _room: &'a RoomId) -> BoxFuture<'a, Result<Grant, Refusal>> {
            let refusal = self.0.clone();
            Box::pin(async move { Err(refusal) })
        }

        fn owner_elsewhere(&self, _room: &RoomId) -> Option<String> {
            None
        }
    }

    /// Queues a join and an HTTP send for a room this node may not serve; returns what each
    /// got once the room task has ended.
    async fn refused(refusal: Refusal) -> (ServerFrame, Result<Accepted, ErrorCode>) {
        let ctx = Arc::new(RoomCtx::new(
            Arc::new(Config::for_tests()),
            Arc::new(NoStore),
            CancellationToken::new(),
            Arc::new(Refusing(refusal)),
        ));
        let registry = Registry::new(ctx.clone());
        let room = RoomId::new("elsewhere").expect("room");
        let (conn, mut out) = ConnHandle::new(
            1,
            UserId::new("alice").expect("user"),
            8,
            CancellationToken::new(),
        );
        let (tx, answer) = oneshot::channel();
        let join = RoomCmd::Join {
            conn: Arc::new(conn),
            since: None,
        };
        let send = RoomCmd::Send {
            from: UserId::new("bob").expect("user"),
            cid: ClientMsgId::new("c1").expect("cid"),
            body: "hello".into(),
            reply: Reply::Http(tx),
            source: Source::Http,
        };
        // Both are queued before the new room task first runs (current-thread runtime).
        assert!(registry.handle(&room).try_send(join).is_ok());
        assert!(registry.handle(&room).try_send(send).is_ok());
        ctx.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), ctx.tracker.wait())
            .await
            .expect("the room task ends");
        assert!(registry.is_empty(), "the room removed itself");
        let frame = match out.try_recv() {
            Ok(Out::Frame(b)) => serde_json::from_slice(&b).expect("a server frame"),
            other => panic!("expected one frame, got {other:?}"),
        };
        (frame, answer.await.expect("answered"))
    }

    #[tokio::test]
    async fn a_room_another_node_owns_is_refused_with_its_owner_and_never_loaded() {
        let (frame, http) = refused(Refusal::Moved {
            owner: Some("10.0.0.9:7001".into()),
        })
        .await;
        match frame {
            ServerFrame::Error { code, owner, .. } => {
                assert_eq!(code, ErrorCode::RoomMoved);
                assert_eq!(owner.as_deref(), Some("10.0.0.9:7001"));
            }
            other => panic!("expected room_moved, got {other:?}"),
        }
        assert_eq!(http, Err(ErrorCode::RoomMoved));
    }

    #[tokio::test]
    async fn a_room_between_owners_is_refused_as_unavailable() {
        let (frame, http) = refused(Refusal::Unavailable).await;
        assert!(
            matches!(
                frame,
                ServerFrame::Error {
                    code: ErrorCode::RoomUnavailable,
                    owner: None,
                    ..
                }
            ),
            "{frame:?}"
        );
        assert_eq!(http, Err(ErrorCode::RoomUnavailable));
    }
}
