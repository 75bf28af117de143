//! The node's rooms: finds a room's owner task, starting it on first use.
//!
//! One lock over one map, taken only to look a room up (connections keep the handles of
//! rooms they joined, so sends skip it). A room removes itself under this same lock when it
//! goes idle, which is what makes "look up, then send" race-free: see `room::run`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{metrics as m, ErrorCode, RoomId};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::room::{self, RoomCmd, RoomCtx};

struct Entry {
    generation: u64,
    tx: mpsc::Sender<RoomCmd>,
}

pub struct Registry {
    ctx: Arc<RoomCtx>,
    rooms: Mutex<HashMap<RoomId, Entry>>,
    generation: AtomicU64,
}

/// A cheap, cloneable way to reach a room's owner task.
#[derive(Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<RoomCmd>,
}

/// Why a command did not reach a room.
pub enum SendFailed {
    /// The room's inbox is full: answer `overloaded`.
    Full(RoomCmd),
    /// The room task has ended: look the room up again.
    Closed(RoomCmd),
}

impl RoomHandle {
    pub fn try_send(&self, cmd: RoomCmd) -> Result<(), SendFailed> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(c) => SendFailed::Full(c),
            mpsc::error::TrySendError::Closed(c) => SendFailed::Closed(c),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Registry {
    pub fn new(ctx: Arc<RoomCtx>) -> Arc<Registry> {
        Arc::new(Registry {
            ctx,
            rooms: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    pub fn ctx(&self) -> &Arc<RoomCtx> {
        &self.ctx
    }

    /// The room's handle, starting its owner task if it has none.
    pub fn handle(self: &Arc<Self>, room: &RoomId) -> RoomHandle {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = rooms.get(room) {
            if !e.tx.is_closed() {
                return RoomHandle { tx: e.tx.clone() };
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.ctx.config.room_inbox);
        rooms.insert(
            room.clone(),
            Entry {
                generation,
                tx: tx.clone(),
            },
        );
        drop(rooms);
        // At info, so the default filter keeps it: whatever the room and the store writes,
        // replays and webhook deliveries it starts log carries the node and the room. A root
        // span: the room outlives whichever request started it.
        let span = tracing::info_span!(parent: None, "room", node = self.ctx.config.node_id, %room);
        self.ctx.tracker.spawn(
            room::run(
                room.clone(),
                generation,
                self.clone(),
                self.ctx.clone(),
                rx,
                tx.downgrade(),
            )
            .instrument(span),
        );
        RoomHandle { tx }
    }

    /// Sends without waiting, looking the room up again once if its task had ended.
    pub fn try_dispatch(self: &Arc<Self>, room: &RoomId, cmd: RoomCmd) -> Result<(), RoomCmd> {
        let mut cmd = cmd;
        for _ in 0..2 {
            match self.handle(room).try_send(cmd) {
                Ok(()) => return Ok(()),
                Err(SendFailed::Full(c)) => {
                    metrics::counter!(m::ROOM_INBOX_FULL).increment(1);
                    return Err(c);
                }
                Err(SendFailed::Closed(c)) => cmd = c,
            }
        }
        Err(cmd)
    }

    /// Sends, waiting for inbox space; for commands that must arrive (leaves, handoffs,
    /// commands a closing room received).
    pub async fn dispatch(self: &Arc<Self>, room: &RoomId, cmd: RoomCmd) {
        let mut cmd = cmd;
        for _ in 0..3 {
            let tx = self.handle(room).tx;
            match tx.send(cmd).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(c)) => cmd = c,
            }
        }
        cmd.refuse(room, ErrorCode::Internal, "room restarting; retry");
    }

    /// Sends to the room only if it has a live owner task here (never starts one).
    pub async fn dispatch_existing(&self, room: &RoomId, cmd: RoomCmd) {
        let tx = self
            .rooms
            .lock()
            .ok()
            .and_then(|r| r.get(room).map(|e| e.tx.clone()));
        if let Some(tx) = tx {
            let _ = tx.send(cmd).await;
        }
    }

    /// Sends to the room only if it has a live owner task here; returns what resolves when
    /// that task has ended (its inbox closed).
    pub async fn dispatch_existing_then_ended(
        &self,
        room: &RoomId,
        cmd: RoomCmd,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let tx = self
            .rooms
            .lock()
            .ok()
            .and_then(|r| r.get(room).map(|e| e.tx.clone()))?;
        let _ = tx.send(cmd).await;
        Some(async move { tx.closed().await })
    }

    /// Removes the room's entry if it still belongs to `generation` and `still_idle()` holds
    /// while the lock is held.
    pub(crate) fn remove_if(
        &self,
        room: &RoomId,
        generation: u64,
        still_idle: impl FnOnce() -> bool,
    ) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        match rooms.get(room) {
            Some(e) if e.generation == generation => {
                if !still_idle() {
                    return false;
                }
                rooms.remove(room);
                true
            }
            // Already replaced or removed: this task is no longer the owner.
            _ => true,
        }
    }

    /// The rooms with a live owner task here.
    pub fn room_ids(&self) -> Vec<RoomId> {
        self.rooms
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.rooms.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A room task leaves the registry through this, not by knowing the registry.
impl room::Seat for Registry {
    fn vacate(&self, room: &RoomId, generation: u64, still_idle: &mut dyn FnMut() -> bool) -> bool {
        self.remove_if(room, generation, still_idle)
    }

    fn forward(self: Arc<Self>, room: RoomId, cmd: RoomCmd) -> room::Forwarded {
        Box::pin(async move { self.dispatch(&room, cmd).await })
    }
}
