//! The `rebalance` scenario: rooms × members sending through a URL (normally a router)
//! while the planner changes the cluster under them (`--command`: add a node, `kill -9` one,
//! a rolling restart), and what that cost: who was disconnected, how long until everyone
//! had resumed, and whether the guarantees held (nothing acked lost, one stored message per
//! `cid`, no gap in any member's stream).
//!
//! Clients behave as PROTOCOL.md asks: on 4001 / 4002 / 1001 / an abrupt end, or a refused
//! upgrade (421, 502, 503), they reconnect with backoff and `since` = the last id they saw,
//! and resend every unacked send with the same `cid`. Sends are generated on schedule
//! whether or not the member is connected (a user keeps typing) and queue until it is.
//!
//! This module owns the member state machine, the run's timeline and the final accounting.
//! The accounting ([`account`]) is a pure function of what members saw and what the
//! history API returned, so it is unit-tested with synthetic data. Every phase has a
//! deadline; the only addresses used are `--url` and the planner's own command.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::args::seconds;
use crate::auth::{Auth, AuthArgs};
use crate::chart::{latency_panel, Chart, Mark, Panel, Series};
use crate::client::{self, Incoming, Target, WsWrite};
use crate::http::{self, HistoryEntry, HttpClient};
use crate::payload::FrameView;
use crate::report::{self, close_label, map_or_none, new_histogram, LatencySummary};
use crate::timeline::Seconds;
use crate::BenchError;

/// Options of `chat-bench rebalance`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 when every acked message was found in the room's history (acked_lost = 0); \
1 when acked_lost > 0 (the report says FAIL), when the history could not be read to \
verify it, or when the members could not all connect at the start; 64 for bad arguments. \
Warnings (reported, exit 0): stored_twice (a cid stored under two ids), gaps (a member \
missed a stored message after its join point), duplicates, out_of_order, sends unanswered \
at the end, clients that had not resumed by the end of the drain, a --command that failed \
or timed out.")]
pub struct RebalanceArgs {
    /// WebSocket URL of a router (or node); history is read through the same host:port.
    #[arg(long, env = "CHAT_BENCH_URL", default_value = "ws://127.0.0.1:7000")]
    pub url: String,
    /// Number of rooms.
    #[arg(long, default_value_t = 12)]
    pub rooms: usize,
    /// Members per room; each is its own connection, sender and receiver.
    #[arg(long, default_value_t = 4)]
    pub members: usize,
    /// Messages per second each member sends, evenly paced.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of sending (the command runs inside this window).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Shell command run with `sh -c` mid-run (e.g. start a node, `kill -9` one). Its output
    /// goes to a file whose tail is in the report; background processes it starts should
    /// redirect their own output.
    #[arg(long)]
    pub command: Option<String>,
    /// Seconds after sending starts at which --command runs.
    #[arg(long, default_value_t = 10.0)]
    pub command_at: f64,
    /// Seconds --command may run before it is killed.
    #[arg(long, default_value_t = 60.0)]
    pub command_timeout: f64,
    /// Longest wait, in seconds, after sending stops for every client to be resumed and
    /// caught up and every send acked.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Seconds one connection attempt may take (TCP + upgrade + joined).
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// A send with no ack or error after this many seconds is resent with the same cid.
    #[arg(long, default_value_t = 5.0)]
    pub resend_after: f64,
    /// Largest reconnect backoff in seconds (it starts at 0.1 s and doubles).
    #[arg(long, default_value_t = 2.0)]
    pub max_backoff: f64,
    /// Seconds allowed for reading back every room's history at the end.
    #[arg(long, default_value_t = 60.0)]
    pub history_timeout: f64,
    /// Users are `<prefix>-<room>-<member>`.
    #[arg(long, default_value = "rb")]
    pub user_prefix: String,
    /// Rooms are `<prefix>-<room>`; defaults to `rebalance-<unix seconds>` (fresh rooms).
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write the per-second timeline (acks/s and ack latency, members joined,
    /// disconnections and resumes, with --command's run shaded) as an SVG chart to this
    /// file. The JSON report carries the same numbers as `timeline`.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// File descriptors: the machine allows 20,000 per process; leave room for the rest.
const MAX_CONNECTIONS: usize = 10_000;
/// The node's default per-connection send limit is 100/s.
const MAX_RATE: f64 = 100.0;
const MAX_BODY: usize = 4096;
const CONNECT_CONCURRENCY: usize = 64;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A send refused with a "retry later" code is resent after this long.
const RETRY_LATER: Duration = Duration::from_millis(500);
const WAKE: Duration = Duration::from_millis(50);
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const OUTPUT_TAIL: usize = 4000;
const MAX_EXAMPLES: usize = 10;
const HISTORY_LIMIT: u32 = 1000;

impl RebalanceArgs {
    pub fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "rebalance")
    }

    /// Checks every limit; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.rooms == 0 {
            return Err("--rooms must be at least 1".into());
        }
        if self.members == 0 {
            return Err("--members must be at least 1".into());
        }
        let conns = self.rooms.saturating_mul(self.members);
        if conns > MAX_CONNECTIONS {
            return Err(format!(
                "--rooms × --members is {conns}; at most {MAX_CONNECTIONS} connections"
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(format!(
                "--rate must be in (0, {MAX_RATE}] messages per second"
            ));
        }
        if !(1..=MAX_BODY).contains(&self.size) {
            return Err(format!("--size must be between 1 and {MAX_BODY} bytes"));
        }
        seconds("duration", self.duration, true)?;
        seconds("command-at", self.command_at, false)?;
        seconds("command-timeout", self.command_timeout, true)?;
        seconds("drain", self.drain, false)?;
        seconds("connect-timeout", self.connect_timeout, true)?;
        seconds("resend-after", self.resend_after, true)?;
        seconds("max-backoff", self.max_backoff, true)?;
        seconds("history-timeout", self.history_timeout, true)?;
        if let Some(c) = &self.command {
            if c.trim().is_empty() {
                return Err("--command must not be empty".into());
            }
            if self.command_at >= self.duration {
                return Err(format!(
                    "--command-at ({} s) must be before the end of sending (--duration {} s)",
                    self.command_at, self.duration
                ));
            }
        }
        let last_user = format!(
            "{}-{}-{}",
            self.user_prefix,
            self.rooms - 1,
            self.members - 1
        );
        crate::args::check_user_prefix(last_user)?;
        let last_room = format!("{}-{}", self.room_prefix(), self.rooms - 1);
        crate::args::check_room_prefix(last_room)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Accounting: pure, unit-tested.

/// What one member ended up with, as the accounting needs it.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    pub room: usize,
    pub user: String,
    /// The room's head when the member first joined (0 for an empty room); `None` if it
    /// never joined. Every stored message after it must reach the member.
    pub join_point: Option<u64>,
    /// Ids received (live or replayed), each once.
    pub received: HashSet<u64>,
    /// Acks: cid → id.
    pub acked: BTreeMap<String, u64>,
}

/// The verdict on the guarantees.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Correctness {
    /// Acked (cid → id) pairs whose id is not in the room's history under that cid. Must be 0.
    pub acked_lost: u64,
    /// Extra stored copies: a (user, cid) of this run stored under more than one id.
    pub stored_twice: u64,
    /// Stored messages after a member's join point that it never received (live or
    /// replayed), summed over members.
    pub gaps: u64,
    /// Members with at least one gap.
    pub members_with_gaps: u64,
    /// Ids members received that the history does not hold (delivered, never stored: only
    /// expected around a crash, and never acked).
    pub delivered_not_stored: u64,
    /// Messages read back over the HTTP API, all rooms.
    pub history_messages: u64,
    pub history_pages: u64,
    /// Acked pairs checked.
    pub acked_checked: u64,
    /// Up to ten examples of each problem, for a human to follow up.
    pub examples: Vec<String>,
}

/// Checks every member's acks and stream against its room's history (oldest first).
pub fn account(histories: &[Vec<HistoryEntry>], members: &[MemberView]) -> Correctness {
    let mut c = Correctness::default();
    let example = |c: &mut Correctness, s: String| {
        if c.examples.len() < MAX_EXAMPLES {
            c.examples.push(s);
        }
    };
    let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
    let mut by_id: Vec<HashMap<u64, &HistoryEntry>> = Vec::with_capacity(histories.len());
    for (room, h) in histories.iter().enumerate() {
        c.history_messages += h.len() as u64;
        by_id.push(h.iter().map(|e| (e.id, e)).collect());
        let mut copies: HashMap<(&str, &str), u64> = HashMap::new();
        for e in h.iter().filter(|e| users.contains(e.from.as_str())) {
            *copies.entry((&e.from, &e.cid)).or_default() += 1;
        }
        for ((from, cid), n) in copies {
            if n > 1 {
                c.stored_twice += n - 1;
                example(
                    &mut c,
                    format!("room {room}: {from}/{cid} stored {n} times"),
                );
            }
        }
    }
    let empty = HashMap::new();
    for m in members {
        let stored = by_id.get(m.room).unwrap_or(&empty);
        for (cid, id) in &m.acked {
            c.acked_checked += 1;
            let ok = stored
                .get(id)
                .is_some_and(|e| e.cid == *cid && e.from == m.user);
            if !ok {
                c.acked_lost += 1;
                example(
                    &mut c,
                    format!("{}: {cid} acked as {id}, not in the history", m.user),
                );
            }
        }
        for id in &m.received {
            if !stored.contains_key(id) {
                c.delivered_not_stored += 1;
            }
        }
        if let Some(jp) = m.join_point {
            let missing = histories
                .get(m.room)
                .map(|h| {
                    h.iter()
                        .filter(|e| e.id > jp && !m.received.contains(&e.id))
                        .count() as u64
                })
                .unwrap_or(0);
            if missing > 0 {
                c.gaps += missing;
                c.members_with_gaps += 1;
                example(
                    &mut c,
                    format!("{}: missed {missing} stored messages", m.user),
                );
            }
        }
    }
    c
}

// ---------------------------------------------------------------------------------------
// The member state machine.

/// What the run shares with every member.
struct Shared {
    base: Instant,
    /// Ns since base of the first scheduled send; `u64::MAX` until set.
    start_ns: AtomicU64,
    end_ns: AtomicU64,
    period_ns: u64,
    joined_once: AtomicU64,
    finishing: AtomicBool,
    // Progress counters.
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    disconnects: AtomicU64,
    connected: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A member's live state the coordinator polls to decide when the drain is complete.
#[derive(Default)]
struct Live {
    /// Joined and caught up, with no disruption open.
    settled: AtomicBool,
    pending: AtomicU64,
    last_seen: AtomicU64,
    max_acked: AtomicU64,
}

/// One disruption: from losing the connection (or a refused join) to being joined again
/// and caught up to the head the new owner reported.
#[derive(Debug, Clone, Copy)]
struct Episode {
    at_ns: u64,
    rejoined_ns: Option<u64>,
    resumed_ns: Option<u64>,
}

struct Pending {
    first_sent_ns: Option<u64>,
    /// When it was last written on the current session (None: not on this session).
    last_sent: Option<Instant>,
    retry_at: Option<Instant>,
}

/// What a member hands back at the end.
#[derive(Debug, Default)]
struct MemberOutcome {
    view: MemberView,
    duplicates: u64,
    out_of_order: u64,
    misrouted: u64,
    sent: u64,
    attempts: u64,
    /// Sends written at least once.
    first_attempts: u64,
    ack_duplicates: u64,
    ack_id_changed: u64,
    rejected: u64,
    unanswered: u64,
    errors: BTreeMap<String, u64>,
    closes: BTreeMap<String, u64>,
    refusals: BTreeMap<String, u64>,
    sessions: u64,
    episodes: Vec<Episode>,
    /// `(ns since base when the ack arrived, first send to ack in µs)` per acked send.
    acks: Vec<(u64, u64)>,
    /// Ns since base of each time the member became joined, and stopped being joined
    /// while the bench was not finishing: the `members_joined` gauge of the timeline.
    joined_ns: Vec<u64>,
    left_ns: Vec<u64>,
    gave_up: Option<String>,
}

struct MemberPlan {
    shared: Arc<Shared>,
    live: Arc<Live>,
    target: Arc<Target>,
    permits: Arc<Semaphore>,
    index: usize,
    room: usize,
    room_name: String,
    user: String,
    auth: Arc<Auth>,
    size: usize,
    connect_timeout: Duration,
    resend_after: Duration,
    max_backoff: Duration,
    finish: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

enum Ev {
    Frame(bytes::Bytes),
    Closed(u16),
}

async fn read_session(mut reader: client::Reader, tx: mpsc::Sender<Ev>) {
    loop {
        let ev = match reader.next().await {
            Ok(Incoming::Data(b)) => Ev::Frame(b),
            Ok(Incoming::Close(code)) => Ev::Closed(code),
            Ok(_) => continue,
            Err(_) => Ev::Closed(1006),
        };
        let last = matches!(ev, Ev::Closed(_));
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}

/// How a session ended.
enum SessionEnd {
    /// The bench is finishing: the member is done.
    Done,
    /// The server closed or refused; reconnect and resume.
    Lost(String),
}

/// Error codes after which a send is retried later with the same cid (PROTOCOL.md).
fn retry_later(code: &str) -> bool {
    matches!(
        code,
        "rate_limited"
            | "overloaded"
            | "store_unavailable"
            | "room_moved"
            | "node_unavailable"
            | "going_away"
            | "internal"
    )
}

/// Codes that, without a cid, mean the connection no longer serves the room: reconnect.
fn resume_needed(code: &str) -> bool {
    matches!(
        code,
        "room_moved" | "node_unavailable" | "going_away" | "store_unavailable" | "internal"
    )
}

struct Member {
    p: MemberPlan,
    out: MemberOutcome,
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
    last_seen: u64,
    /// Head reported by the current session's `joined`, until the member has seen it.
    catch_up_to: Option<u64>,
    joined: bool,
    /// The current (or last) session got its `joined`.
    reached_joined: bool,
    /// Index into `out.episodes` of the open disruption.
    open_episode: Option<usize>,
}

impl Member {
    fn cid(&self, seq: u64) -> String {
        format!("m{}-{seq}", self.p.index)
    }

    fn publish(&self) {
        // Settled also means every send due by the end of sending exists: until this
        // member's first wake after the end, its last sends may not be scheduled yet, and
        // the drain must not end before they are sent and answered.
        let end = self.p.shared.end_ns.load(Relaxed);
        let all_scheduled = end != u64::MAX && self.next_seq >= self.due_by(end);
        let settled = self.joined
            && self.catch_up_to.is_none()
            && self.open_episode.is_none()
            && all_scheduled;
        self.p.live.settled.store(settled, Relaxed);
        self.p
            .live
            .pending
            .store(self.pending.len() as u64, Relaxed);
        self.p.live.last_seen.store(self.last_seen, Relaxed);
    }

    fn disrupted(&mut self, label: String, is_close: bool) {
        let now = self.p.shared.now_ns();
        if is_close {
            *self.out.closes.entry(label).or_default() += 1;
        } else {
            *self.out.refusals.entry(label).or_default() += 1;
        }
        if self.open_episode.is_none() && self.out.view.join_point.is_some() {
            self.p.shared.disconnects.fetch_add(1, Relaxed);
            self.out.episodes.push(Episode {
                at_ns: now,
                rejoined_ns: None,
                resumed_ns: None,
            });
            self.open_episode = Some(self.out.episodes.len() - 1);
        }
        if self.joined {
            self.out.left_ns.push(now);
        }
        self.joined = false;
        self.catch_up_to = None;
        self.publish();
    }

    fn maybe_caught_up(&mut self) {
        if let Some(h) = self.catch_up_to {
            if self.last_seen >= h {
                self.catch_up_to = None;
            }
        }
        if self.joined && self.catch_up_to.is_none() {
            if let Some(i) = self.open_episode.take() {
                self.out.episodes[i].resumed_ns = Some(self.p.shared.now_ns());
            }
        }
    }

    /// Sends every pending message that is due on this session.
    async fn flush(&mut self, ws: &mut WsWrite) -> bool {
        if !self.joined {
            return true;
        }
        let now = Instant::now();
        let now_ns = self.p.shared.now_ns();
        let mut due = Vec::new();
        for (&seq, p) in &self.pending {
            let go = match (p.last_sent, p.retry_at) {
                (None, _) => true,
                (Some(_), Some(t)) => t <= now,
                (Some(t), None) => now.duration_since(t) >= self.p.resend_after,
            };
            if go {
                due.push(seq);
            }
        }
        for seq in due {
            let frame = serde_json::json!({
                "type": "send",
                "room": self.p.room_name,
                "cid": self.cid(seq),
                "body": body(self.p.size, self.p.index, seq),
            });
            let mut bytes = frame.to_string().into_bytes();
            if client::send_text(ws, &mut bytes).await.is_err() {
                return false;
            }
            self.out.attempts += 1;
            if let Some(p) = self.pending.get_mut(&seq) {
                if p.first_sent_ns.is_none() {
                    self.out.first_attempts += 1;
                }
                p.last_sent = Some(now);
                p.retry_at = None;
                p.first_sent_ns.get_or_insert(now_ns);
            }
        }
        true
    }

    /// How many sends this member's schedule asks for by `t` (ns since base), `t` capped at
    /// the end of sending; 0 before sending starts.
    fn due_by(&self, t: u64) -> u64 {
        let start = self.p.shared.start_ns.load(Relaxed);
        let end = self.p.shared.end_ns.load(Relaxed);
        if start == u64::MAX {
            return 0;
        }
        let now = t.min(end);
        if now < start {
            return 0;
        }
        // Each member has its own phase within the period so sends are spread out.
        let members_phase = (self.p.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            % self.p.shared.period_ns.max(1);
        let t = now - start;
        if t < members_phase {
            return 0;
        }
        (t - members_phase) / self.p.shared.period_ns.max(1) + 1
    }

    /// Creates the sends the schedule asks for by now (whether connected or not).
    fn schedule(&mut self) {
        let due = self.due_by(self.p.shared.now_ns());
        while self.next_seq < due {
            self.pending.insert(
                self.next_seq,
                Pending {
                    first_sent_ns: None,
                    last_sent: None,
                    retry_at: None,
                },
            );
            self.next_seq += 1;
            self.out.sent += 1;
            self.p.shared.sent.fetch_add(1, Relaxed);
        }
    }

    fn on_frame(&mut self, bytes: &[u8]) -> Option<String> {
        let Some(v) = FrameView::parse(bytes) else {
            return self.on_owned(bytes);
        };
        self.on_view(&v, bytes)
    }

    fn on_owned(&mut self, bytes: &[u8]) -> Option<String> {
        let o = crate::payload::OwnedView::parse(bytes)?;
        let v = o.as_view();
        self.on_view(&v, bytes)
    }

    /// Handles one frame; `Some(reason)` when the session must be dropped and resumed.
    fn on_view(&mut self, v: &FrameView<'_>, raw: &[u8]) -> Option<String> {
        let in_room = v.room == Some(self.p.room_name.as_str());
        match v.kind {
            "joined" if in_room => {
                let head = serde_json::from_slice::<common::ServerFrame>(raw)
                    .ok()
                    .and_then(|f| match f {
                        common::ServerFrame::Joined { head, .. } => head.map(|h| h.0),
                        _ => None,
                    })
                    .unwrap_or(0);
                if self.out.view.join_point.is_none() {
                    self.out.view.join_point = Some(head);
                    self.last_seen = self.last_seen.max(head);
                    self.p.shared.joined_once.fetch_add(1, Relaxed);
                }
                if !self.joined {
                    self.out.joined_ns.push(self.p.shared.now_ns());
                }
                self.joined = true;
                self.reached_joined = true;
                if let Some(i) = self.open_episode {
                    self.out.episodes[i].rejoined_ns = Some(self.p.shared.now_ns());
                }
                self.catch_up_to = (head > self.last_seen).then_some(head);
                // Everything not acked goes out again on this session, same cid.
                for p in self.pending.values_mut() {
                    p.last_sent = None;
                    p.retry_at = None;
                }
                self.maybe_caught_up();
                None
            }
            "message" => {
                let id = v.id.and_then(|s| s.parse::<u64>().ok());
                match id {
                    Some(id) if in_room => {
                        self.p.shared.received.fetch_add(1, Relaxed);
                        if !self.out.view.received.insert(id) {
                            self.out.duplicates += 1;
                        } else if id <= self.last_seen {
                            self.out.out_of_order += 1;
                        }
                        self.last_seen = self.last_seen.max(id);
                        self.maybe_caught_up();
                    }
                    _ => self.out.misrouted += 1,
                }
                None
            }
            "ack" => {
                let (Some(cid), Some(id)) = (v.cid, v.id.and_then(|s| s.parse::<u64>().ok()))
                else {
                    return None;
                };
                let Some(seq) = self.seq_of(cid) else {
                    self.out.misrouted += 1;
                    return None;
                };
                if v.duplicate {
                    self.out.ack_duplicates += 1;
                }
                match self.out.view.acked.get(cid) {
                    Some(&prev) if prev != id => self.out.ack_id_changed += 1,
                    Some(_) => {}
                    None => {
                        self.out.view.acked.insert(cid.to_owned(), id);
                        self.p.shared.acked.fetch_add(1, Relaxed);
                    }
                }
                let max = self.p.live.max_acked.load(Relaxed).max(id);
                self.p.live.max_acked.store(max, Relaxed);
                if let Some(p) = self.pending.remove(&seq) {
                    if let Some(t) = p.first_sent_ns {
                        let now = self.p.shared.now_ns();
                        self.out.acks.push((now, now.saturating_sub(t) / 1000));
                    }
                }
                None
            }
            "error" => {
                let code = v.code.unwrap_or("unknown").to_owned();
                *self.out.errors.entry(code.clone()).or_default() += 1;
                match v.cid.and_then(|c| self.seq_of(c)) {
                    Some(seq) => {
                        if retry_later(&code) {
                            if let Some(p) = self.pending.get_mut(&seq) {
                                p.retry_at = Some(Instant::now() + RETRY_LATER);
                            }
                        } else if self.pending.remove(&seq).is_some() {
                            self.out.rejected += 1;
                        }
                        None
                    }
                    None if resume_needed(&code) => Some(format!("error {code}")),
                    None => None,
                }
            }
            _ => None,
        }
    }

    fn seq_of(&self, cid: &str) -> Option<u64> {
        let rest = cid.strip_prefix('m')?;
        let (who, seq) = rest.split_once('-')?;
        (who.parse::<usize>().ok()? == self.p.index)
            .then(|| seq.parse().ok())
            .flatten()
    }

    /// One connection: connect with `since`, then run until it is lost or the bench ends.
    async fn session(&mut self, ws_query: String) -> SessionEnd {
        // A refused attempt is not a working session: the backoff keeps growing.
        self.reached_joined = false;
        let connected = {
            let Ok(_permit) = self.p.permits.acquire().await else {
                return SessionEnd::Done;
            };
            client::connect_query(&self.p.target, &ws_query, self.p.connect_timeout).await
        };
        let (rd, mut ws) = match connected {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("{e:#}");
                // "upgrade refused: HTTP 503 Service Unavailable" → "HTTP 503".
                let label: String = match msg.find("HTTP ") {
                    Some(i) => msg[i..].chars().take(8).collect(),
                    None => msg.chars().take(60).collect(),
                };
                if !self.p.shared.finishing.load(Relaxed) {
                    self.disrupted(label.clone(), false);
                }
                return SessionEnd::Lost(label);
            }
        };
        self.out.sessions += 1;
        let (reader, mut control) = client::reader(rd);
        let (tx, mut events) = mpsc::channel(1024);
        let read_task: JoinHandle<()> = tokio::spawn(read_session(reader, tx));
        self.p.shared.connected.fetch_add(1, Relaxed);
        let mut wake = tokio::time::interval(WAKE);
        wake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finish = self.p.finish.clone();
        let mut stop = self.p.stop.clone();
        let joined_by = tokio::time::Instant::now() + self.p.connect_timeout;
        let end = loop {
            tokio::select! {
                biased;
                _ = flag(&mut stop) => break SessionEnd::Done,
                _ = flag(&mut finish) => {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(500),
                        client::send_close(&mut ws, 1000, "bench done"),
                    ).await;
                    break SessionEnd::Done;
                }
                // Events before control frames: when the reader ends, its close code is
                // queued before its control sender is dropped.
                ev = events.recv() => match ev {
                    Some(Ev::Frame(b)) => {
                        if let Some(reason) = self.on_frame(&b) {
                            break SessionEnd::Lost(reason);
                        }
                    }
                    Some(Ev::Closed(code)) => break SessionEnd::Lost(close_label(code)),
                    None => break SessionEnd::Lost(close_label(1006)),
                },
                c = control.recv() => match c {
                    Some(f) => {
                        if ws.write_frame(f).await.is_err() {
                            break SessionEnd::Lost("write failed".into());
                        }
                    }
                    None => {
                        let label = match events.try_recv() {
                            Ok(Ev::Closed(code)) => close_label(code),
                            _ => close_label(1006),
                        };
                        break SessionEnd::Lost(label);
                    }
                },
                _ = wake.tick() => {
                    if !self.joined && tokio::time::Instant::now() > joined_by {
                        break SessionEnd::Lost("no joined frame".into());
                    }
                    self.schedule();
                    if !self.flush(&mut ws).await {
                        break SessionEnd::Lost("write failed".into());
                    }
                }
            }
            self.publish();
        };
        read_task.abort();
        self.p.shared.connected.fetch_sub(1, Relaxed);
        // A close the bench asked for is not a disruption.
        if let SessionEnd::Lost(label) = &end {
            if !self.p.shared.finishing.load(Relaxed) {
                let is_close = label.starts_with(|c: char| c.is_ascii_digit())
                    || label.starts_with("error")
                    || label == "no joined frame"
                    || label == "write failed";
                self.disrupted(label.clone(), is_close);
            }
        }
        end
    }

    async fn run(mut self) -> MemberOutcome {
        let mut backoff = FIRST_BACKOFF;
        let mut stop = self.p.stop.clone();
        let mut finish = self.p.finish.clone();
        // Deterministic jitter per member, so reconnects do not arrive in lockstep.
        let jitter = 1.0 + (self.p.index % 10) as f64 / 20.0;
        loop {
            if *self.p.stop.borrow() || *self.p.finish.borrow() {
                break;
            }
            let since = if self.out.view.join_point.is_some() {
                format!("&since={}", self.last_seen)
            } else {
                String::new()
            };
            // Signed per attempt, so a resumed session never carries an expired token.
            let creds = match self.p.auth.credentials(&self.p.user) {
                Ok(c) => c,
                Err(e) => {
                    self.out.gave_up = Some(format!("signing a token: {e}"));
                    break;
                }
            };
            let query = format!("room={}&{creds}{since}", self.p.room_name);
            match self.session(query).await {
                SessionEnd::Done => break,
                SessionEnd::Lost(label) => {
                    if self.out.view.join_point.is_none() && permanent_refusal(&label) {
                        self.out.gave_up = Some(label);
                        break;
                    }
                    if self.reached_joined {
                        // The last session worked: this loss is a new event.
                        backoff = FIRST_BACKOFF;
                    }
                }
            }
            self.schedule();
            let wait = backoff.mul_f64(jitter);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = flag(&mut stop) => break,
                _ = flag(&mut finish) => break,
            }
            backoff = (backoff * 2).min(self.p.max_backoff);
        }
        self.out.unanswered = self.pending.len() as u64;
        self.out.view.room = self.p.room;
        self.out.view.user = self.p.user.clone();
        self.joined = false;
        self.publish();
        self.out
    }
}

/// Refusals no retry fixes (bad user, auth, forbidden).
fn permanent_refusal(label: &str) -> bool {
    ["HTTP 400", "HTTP 401", "HTTP 403", "HTTP 404", "HTTP 405"]
        .iter()
        .any(|p| label.starts_with(p))
}

fn body(size: usize, index: usize, seq: u64) -> String {
    let mut b = format!("rb {index} {seq} ");
    while b.len() < size {
        b.push('x');
    }
    b.truncate(size);
    b
}

async fn flag(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

// ---------------------------------------------------------------------------------------
// The external command.

/// What `--command` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommandOutcome {
    pub command: String,
    /// Seconds after sending started.
    pub started_at_s: f64,
    pub duration_s: f64,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub error: Option<String>,
    /// The last bytes of its stdout and stderr (interleaved).
    pub output_tail: String,
}

impl CommandOutcome {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && self.error.is_none()
    }
}

/// Runs `sh -c command` with its output in a temporary file (not a pipe: a background
/// process it starts would hold a pipe open forever), killed after `timeout`.
pub fn run_command(command: &str, timeout: Duration) -> CommandOutcome {
    let mut out = CommandOutcome {
        command: command.to_owned(),
        ..Default::default()
    };
    let started = Instant::now();
    let path = std::env::temp_dir().join(format!(
        "chat-bench-command-{}-{}.log",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&path)?;
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        loop {
            if let Some(status) = child.try_wait()? {
                out.exit_code = status.code();
                return Ok(());
            }
            if started.elapsed() >= timeout {
                out.timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    if let Err(e) = result {
        out.error = Some(e.to_string());
    }
    out.duration_s = started.elapsed().as_secs_f64();
    if let Ok(bytes) = std::fs::read(&path) {
        let from = bytes.len().saturating_sub(OUTPUT_TAIL);
        out.output_tail = String::from_utf8_lossy(&bytes[from..]).into_owned();
    }
    let _ = std::fs::remove_file(&path);
    out
}

// ---------------------------------------------------------------------------------------
// The report.

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebalanceConfig {
    pub url: String,
    pub rooms: usize,
    pub members: usize,
    pub rate_per_member: f64,
    pub body_bytes: usize,
    pub duration_s: f64,
    pub command_at_s: f64,
    pub drain_s: f64,
    pub resend_after_s: f64,
    pub room_prefix: String,
    pub user_prefix: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Disruption {
    /// Members that lost their connection (or had a join refused) at least once.
    pub clients_disconnected: u64,
    /// Disruption episodes (a member's loss until it was resumed), all members.
    pub disconnections: u64,
    /// Of those, before --command started (should be 0).
    pub disconnections_before_command: u64,
    /// Episodes not resumed by the end of the drain.
    pub not_resumed: u64,
    /// Every disrupted client had resumed (rejoined and caught up) by the end of the drain.
    pub all_resumed: bool,
    /// Seconds from the command's start until the last disrupted client had resumed;
    /// `None` without a command, without disruptions, or if some never resumed.
    pub command_to_all_resumed_s: Option<f64>,
    /// Seconds from the command's start until the last disconnection.
    pub command_to_last_disconnect_s: Option<f64>,
    /// Per episode: loss to rejoined (the `joined` frame).
    pub rejoin_us: LatencySummary,
    /// Per episode: loss to caught up (every message up to the new `joined` head seen).
    pub resume_us: LatencySummary,
    /// Close codes received (and other ways a session ended), all members.
    pub closes: BTreeMap<String, u64>,
    /// Connect attempts refused, by reason (e.g. `HTTP 502`).
    pub refusals: BTreeMap<String, u64>,
    /// Connections opened, all members (initial ones included).
    pub sessions: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SendStats {
    /// Distinct sends (cids) the schedule created.
    pub sent: u64,
    /// Frames written, resends included.
    pub attempts: u64,
    /// attempts - first sends: retries with the same cid.
    pub resends: u64,
    /// Distinct cids acked.
    pub acked: u64,
    pub ack_duplicates: u64,
    /// A cid acked under two different ids (idempotence broken on the wire).
    pub ack_id_changed: u64,
    /// Refused with a do-not-retry code.
    pub rejected: u64,
    /// Neither acked nor finally refused by the end of the drain.
    pub unanswered: u64,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// First send to ack, retries and disruption included.
    pub ack_latency_us: LatencySummary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStats {
    pub received: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
}

/// Everything one `rebalance` run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RebalanceReport {
    pub scenario: String,
    pub command: String,
    pub git_rev: String,
    pub nproc: usize,
    pub started_unix_ms: u64,
    /// `PASS` when acked_lost is 0 and the history could be read, else `FAIL`.
    pub verdict: String,
    pub config: RebalanceConfig,
    pub external_command: Option<CommandOutcome>,
    pub disruption: Disruption,
    pub sends: SendStats,
    pub stream: StreamStats,
    pub correctness: Correctness,
    /// Why the history could not be verified, if it could not.
    pub history_error: Option<String>,
    /// The drain ended with every client settled and every send answered.
    pub drained: bool,
    pub bench_cpu_percent: Option<f64>,
    pub bench_saturated: bool,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    /// Per second from the first scheduled send to the end of the drain: what a planner
    /// reads the disruption's size and length from.
    pub timeline: Vec<RebalancePoint>,
}

/// One second of a `rebalance` run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RebalancePoint {
    /// Seconds since the first scheduled send, at the start of this second (the
    /// command's `started_at_s` is on the same clock).
    pub t_s: f64,
    /// Sends acked in this second (the ack that settled a pending send).
    pub acks: u64,
    /// First send to ack of those acks, in µs (resends and disruption included).
    pub ack_p50_us: u64,
    pub ack_p99_us: u64,
    pub ack_max_us: u64,
    /// Members joined to their room at the end of this second.
    pub members_joined: u64,
    /// Disruptions that began in this second (a member lost its connection or a join was
    /// refused), as counted in `disruption.disconnections`.
    pub disconnections: u64,
    /// Disruptions that ended in this second (the member rejoined and caught up).
    pub resumes: u64,
}

// Per-second counts of the timeline.
const ACKS: usize = 0;
const JOINS: usize = 1;
const LEAVES: usize = 2;
const DISCONNECTS: usize = 3;
const RESUMES: usize = 4;

/// The timeline from what the members recorded, `start_ns..end_ns` (ns since base). Built
/// after the run from timestamps the members keep anyway, so it costs the run nothing.
fn timeline(outcomes: &[MemberOutcome], start_ns: u64, end_ns: u64) -> Vec<RebalancePoint> {
    let sec = |ns: u64| (ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
    let mut s = Seconds::<5>::default();
    for o in outcomes {
        for &(at, us) in &o.acks {
            s.count(sec(at), ACKS, 1);
            s.latency(sec(at), us);
        }
        for &at in &o.joined_ns {
            s.count(sec(at), JOINS, 1);
        }
        for &at in &o.left_ns {
            s.count(sec(at), LEAVES, 1);
        }
        for e in &o.episodes {
            s.count(sec(e.at_ns), DISCONNECTS, 1);
            if let Some(r) = e.resumed_ns {
                s.count(sec(r), RESUMES, 1);
            }
        }
    }
    let n = end_ns.saturating_sub(start_ns).div_ceil(1_000_000_000) as usize;
    s.extend_to(n);
    let joined = s.running(JOINS, Some(LEAVES));
    s.iter()
        .take(n)
        .map(|(i, x)| {
            let l = x.latency();
            RebalancePoint {
                t_s: i as f64,
                acks: x.counts[ACKS],
                ack_p50_us: l.p50,
                ack_p99_us: l.p99,
                ack_max_us: l.max,
                members_joined: joined[i].max(0) as u64,
                disconnections: x.counts[DISCONNECTS],
                resumes: x.counts[RESUMES],
            }
        })
        .collect()
}

impl RebalanceReport {
    pub fn pass(&self) -> bool {
        self.correctness.acked_lost == 0 && self.history_error.is_none()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The timeline as an SVG chart: ack latency, acks/s and members, with the command's
    /// run shaded and the end of sending marked.
    pub fn chart(&self) -> String {
        let t = &self.timeline;
        let at = |p: &RebalancePoint| p.t_s;
        let c = &self.config;
        let mut marks = Vec::new();
        if let Some(cmd) = &self.external_command {
            marks.push(Mark {
                label: "--command".into(),
                from: cmd.started_at_s,
                to: Some(cmd.started_at_s + cmd.duration_s),
            });
        }
        marks.push(Mark {
            label: "sending ends".into(),
            from: c.duration_s,
            to: None,
        });
        Chart {
            title: format!(
                "chat-bench rebalance: {} rooms × {} members × {} msg/s",
                c.rooms, c.members, c.rate_per_member
            ),
            subtitle: format!(
                "{} · git {} · {}",
                c.url,
                self.git_rev,
                self.external_command
                    .as_ref()
                    .map_or("no --command".to_owned(), |x| format!(
                        "--command at {} s: {}",
                        x.started_at_s, x.command
                    ))
            ),
            x_label: "seconds since the first scheduled send".into(),
            panels: vec![
                latency_panel(
                    "ack latency (ms)",
                    t,
                    at,
                    |p| p.acks > 0,
                    [|p| p.ack_p50_us, |p| p.ack_p99_us, |p| p.ack_max_us],
                ),
                Panel {
                    y_label: "sends acked per second".into(),
                    series: vec![Series::of("acks/s", "#2ca02c", t, at, |p| p.acks as f64)],
                },
                Panel {
                    y_label: "members".into(),
                    series: vec![
                        Series::of("joined", "#9467bd", t, at, |p| p.members_joined as f64),
                        Series::of("disconnections/s", "#d62728", t, at, |p| {
                            p.disconnections as f64
                        }),
                        Series::of("resumes/s", "#17becf", t, at, |p| p.resumes as f64),
                    ],
                },
            ],
            marks,
        }
        .to_svg()
    }

    pub fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.config;
        let d = &self.disruption;
        let s = &self.sends;
        let k = &self.correctness;
        let mut o = String::new();
        report::title_md(
            &mut o,
            &format!("rebalance: {}", self.verdict),
            &self.command,
        );
        let _ = writeln!(
            o,
            "git `{}` · nproc {} · {} · {} rooms × {} members at {} msg/s each, {} B bodies, \
             {} s of sending, drain up to {} s\n",
            self.git_rev,
            self.nproc,
            c.url,
            c.rooms,
            c.members,
            c.rate_per_member,
            c.body_bytes,
            c.duration_s,
            c.drain_s
        );
        match &self.external_command {
            Some(x) => {
                let _ = writeln!(
                    o,
                    "Command at {:.1} s (ran {:.2} s, exit {}{}):\n```\n{}\n```",
                    x.started_at_s,
                    x.duration_s,
                    x.exit_code.map_or("none".into(), |c| c.to_string()),
                    if x.timed_out { ", TIMED OUT" } else { "" },
                    x.command
                );
                if !x.output_tail.trim().is_empty() {
                    let _ = writeln!(o, "Output tail:\n```\n{}\n```", x.output_tail.trim_end());
                }
                if let Some(e) = &x.error {
                    let _ = writeln!(o, "Command error: {e}");
                }
                let _ = writeln!(o);
            }
            None => {
                let _ = writeln!(o, "No command: a plain resume-capable run.\n");
            }
        }
        let opt_s = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2} s"));
        let rows: Vec<(&str, String)> = vec![
            ("**acked_lost**", k.acked_lost.to_string()),
            ("stored_twice", k.stored_twice.to_string()),
            (
                "gaps (members with gaps)",
                format!("{} ({})", k.gaps, k.members_with_gaps),
            ),
            ("duplicates received", self.stream.duplicates.to_string()),
            ("out of order", self.stream.out_of_order.to_string()),
            ("misrouted", self.stream.misrouted.to_string()),
            ("delivered, not stored", k.delivered_not_stored.to_string()),
            (
                "acked pairs checked / history messages (pages)",
                format!(
                    "{} / {} ({})",
                    k.acked_checked, k.history_messages, k.history_pages
                ),
            ),
            (
                "clients disconnected / episodes",
                format!("{} / {}", d.clients_disconnected, d.disconnections),
            ),
            (
                "episodes before the command",
                d.disconnections_before_command.to_string(),
            ),
            (
                "all resumed",
                format!("{} ({} not resumed)", d.all_resumed, d.not_resumed),
            ),
            (
                "command start → last disconnect",
                opt_s(d.command_to_last_disconnect_s),
            ),
            (
                "command start → all resumed",
                opt_s(d.command_to_all_resumed_s),
            ),
            ("closes", map_or_none(&d.closes)),
            ("connect refusals", map_or_none(&d.refusals)),
            ("sessions", d.sessions.to_string()),
            (
                "sent / acked / unanswered / rejected",
                format!(
                    "{} / {} / {} / {}",
                    s.sent, s.acked, s.unanswered, s.rejected
                ),
            ),
            (
                "attempts / resends / duplicate acks / ack id changed",
                format!(
                    "{} / {} / {} / {}",
                    s.attempts, s.resends, s.ack_duplicates, s.ack_id_changed
                ),
            ),
            ("errors by code", map_or_none(&s.errors)),
            ("received", self.stream.received.to_string()),
            ("drained", self.drained.to_string()),
            (
                "bench CPU (% of one core)",
                report::bench_cpu_cell(self.bench_cpu_percent, self.bench_saturated),
            ),
        ];
        report::metric_table(&mut o, rows);
        let _ = writeln!(o);
        report::latency_table(
            &mut o,
            &[
                ("resume (loss → caught up)", &d.resume_us),
                ("rejoin (loss → joined)", &d.rejoin_us),
                ("ack (first send → ack)", &s.ack_latency_us),
            ],
        );
        if let Some(e) = &self.history_error {
            let _ = writeln!(o, "\n**History could not be verified:** {e}");
        }
        for (title, items) in [
            ("Examples", &k.examples),
            ("Warnings", &self.warnings),
            ("Notes", &self.notes),
        ] {
            if !items.is_empty() {
                let _ = writeln!(o, "\n{title}:");
                for i in items {
                    let _ = writeln!(o, "- {i}");
                }
            }
        }
        o
    }
}

fn summary(samples: impl IntoIterator<Item = u64>) -> LatencySummary {
    let mut h = new_histogram();
    for v in samples {
        h.saturating_record(v.max(1));
    }
    LatencySummary::from_histogram(&h)
}

// ---------------------------------------------------------------------------------------
// The run.

/// Runs the scenario. Bad arguments are `Config`; a run whose members could not connect at
/// the start is `Failed`. The caller turns a report that does not [`pass`] into exit 1.
///
/// [`pass`]: RebalanceReport::pass
pub async fn run(args: RebalanceArgs, command: String) -> Result<RebalanceReport, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    let auth = Arc::new(Auth::from_args(&args.auth).map_err(BenchError::Config)?);
    let target = Arc::new(
        Target::resolve(&args.url)
            .await
            .map_err(|e| BenchError::Config(format!("--url: {e:#}")))?,
    );
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let room_prefix = args.room_prefix();
    let total = args.rooms * args.members;
    let mut notes = vec![report::current_load_note()];
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < total as u64 + 64 => notes.push(format!(
            "the open-file limit ({limit}) is below the {total} connections asked for"
        )),
        Ok(_) => {}
        Err(e) => notes.push(format!("cannot raise the open-file limit: {e}")),
    }
    let shared = Arc::new(Shared {
        base: Instant::now(),
        start_ns: AtomicU64::new(u64::MAX),
        end_ns: AtomicU64::new(u64::MAX),
        period_ns: (1e9 / args.rate) as u64,
        joined_once: AtomicU64::new(0),
        finishing: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        received: AtomicU64::new(0),
        disconnects: AtomicU64::new(0),
        connected: AtomicU64::new(0),
    });
    let (finish_tx, finish_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut lives = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for index in 0..total {
        let (room, member) = (index / args.members, index % args.members);
        let live = Arc::new(Live::default());
        lives.push(live.clone());
        let m = Member {
            p: MemberPlan {
                shared: shared.clone(),
                live,
                target: target.clone(),
                permits: permits.clone(),
                index,
                room,
                room_name: format!("{room_prefix}-{room}"),
                user: format!("{}-{room}-{member}", args.user_prefix),
                auth: auth.clone(),
                size: args.size,
                connect_timeout: Duration::from_secs_f64(args.connect_timeout),
                resend_after: Duration::from_secs_f64(args.resend_after),
                max_backoff: Duration::from_secs_f64(args.max_backoff),
                finish: finish_rx.clone(),
                stop: stop_rx.clone(),
            },
            out: MemberOutcome::default(),
            pending: BTreeMap::new(),
            next_seq: 0,
            last_seen: 0,
            catch_up_to: None,
            joined: false,
            reached_joined: false,
            open_episode: None,
        };
        tasks.push(tokio::spawn(m.run()));
    }
    let (progress_stop, progress_rx) = watch::channel(false);
    if !args.quiet {
        tokio::spawn(progress(shared.clone(), total, progress_rx));
    }

    // Everyone joins before sending starts; members that cannot are a failed run.
    let connect_deadline = Instant::now()
        + Duration::from_secs_f64(args.connect_timeout * 2.0)
        + Duration::from_millis(20 * total as u64);
    while shared.joined_once.load(Relaxed) < total as u64 && Instant::now() < connect_deadline {
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let joined = shared.joined_once.load(Relaxed);
    if joined < total as u64 {
        let _ = stop_tx.send(true);
        let _ = progress_stop.send(true);
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for t in tasks {
            if let Ok(Ok(o)) = tokio::time::timeout(Duration::from_secs(2), t).await {
                if o.view.join_point.is_none() {
                    let why = o
                        .gave_up
                        .or_else(|| o.refusals.keys().next_back().cloned())
                        .or_else(|| o.closes.keys().next_back().cloned())
                        .unwrap_or_else(|| "no joined frame in time".into());
                    *reasons.entry(why).or_default() += 1;
                }
            }
        }
        return Err(BenchError::Failed(anyhow::anyhow!(
            "only {joined} of {total} members joined: {}",
            map_or_none(&reasons)
        )));
    }

    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| u64::try_from(t.duration_since(shared.base).as_nanos()).unwrap_or(0);
    shared.end_ns.store(ns(end), Relaxed);
    shared.start_ns.store(ns(start), Relaxed);
    let cpu0 = report::self_cpu_seconds();
    let t0 = Instant::now();

    let mut command_outcome = None;
    let mut command_start_ns = None;
    if let Some(cmd) = args.command.clone() {
        let at = start + Duration::from_secs_f64(args.command_at);
        tokio::time::sleep_until(at.into()).await;
        command_start_ns = Some(shared.now_ns());
        if !args.quiet {
            eprintln!("[rebalance] running: {cmd}");
        }
        let timeout = Duration::from_secs_f64(args.command_timeout);
        let started_at_s = at.duration_since(start).as_secs_f64();
        let mut out = tokio::task::spawn_blocking(move || run_command(&cmd, timeout))
            .await
            .unwrap_or_else(|e| CommandOutcome {
                error: Some(format!("command task: {e}")),
                ..Default::default()
            });
        out.started_at_s = started_at_s;
        if !args.quiet {
            eprintln!(
                "[rebalance] command ended: exit {:?}{} after {:.2} s",
                out.exit_code,
                if out.timed_out { " (timed out)" } else { "" },
                out.duration_s
            );
        }
        command_outcome = Some(out);
    }
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = report::self_cpu_seconds();
    let t1 = Instant::now();

    // Drain: every member joined, caught up to its room's newest acked id, nothing pending.
    // A command that outlived the sending window gets the whole drain after it ends.
    let drain_deadline = Instant::now().max(end) + Duration::from_secs_f64(args.drain);
    let mut drained = false;
    loop {
        let mut max_acked = vec![0u64; args.rooms];
        for (i, l) in lives.iter().enumerate() {
            let r = i / args.members;
            max_acked[r] = max_acked[r].max(l.max_acked.load(Relaxed));
        }
        let done = lives.iter().enumerate().all(|(i, l)| {
            l.settled.load(Relaxed)
                && l.pending.load(Relaxed) == 0
                && l.last_seen.load(Relaxed) >= max_acked[i / args.members]
        });
        if done {
            drained = true;
            break;
        }
        if Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finish_ns = shared.now_ns();
    shared.finishing.store(true, Relaxed);
    let _ = finish_tx.send(true);
    let mut outcomes = Vec::with_capacity(total);
    let close_deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    let mut lost_tasks = 0;
    for mut t in tasks {
        match tokio::time::timeout_at(close_deadline, &mut t).await {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(_)) => lost_tasks += 1,
            Err(_) => {
                let _ = stop_tx.send(true);
                match tokio::time::timeout(Duration::from_secs(1), &mut t).await {
                    Ok(Ok(o)) => outcomes.push(o),
                    _ => {
                        t.abort();
                        lost_tasks += 1;
                    }
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = progress_stop.send(true);

    // Read every room's history back through the same URL.
    let mut history_error = None;
    let mut histories = Vec::with_capacity(args.rooms);
    let mut pages = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.history_timeout);
    let mut http = HttpClient::for_target(&target);
    let reader_user = format!("{}-reader", args.user_prefix);
    let reader_creds = auth
        .credentials(&reader_user)
        .map_err(|e| BenchError::Failed(anyhow::anyhow!("signing a token: {e}")))?;
    for r in 0..args.rooms {
        let room = format!("{room_prefix}-{r}");
        match http::read_history(&mut http, &room, &reader_creds, HISTORY_LIMIT, deadline).await {
            Ok((h, p)) => {
                histories.push(h);
                pages += p;
            }
            Err(e) => {
                history_error = Some(format!("{e:#}"));
                histories.push(Vec::new());
            }
        }
    }

    let views: Vec<MemberView> = outcomes.iter().map(|o| o.view.clone()).collect();
    let mut correctness = account(&histories, &views);
    correctness.history_pages = pages;

    // Disruption figures.
    let mut d = Disruption {
        all_resumed: true,
        ..Default::default()
    };
    let mut resume = Vec::new();
    let mut rejoin = Vec::new();
    let mut last_resumed = 0u64;
    let mut last_disconnect = 0u64;
    let mut sends = SendStats::default();
    let mut stream = StreamStats::default();
    let mut ack_us = Vec::new();
    let mut first_attempts = 0;
    for o in &outcomes {
        if !o.episodes.is_empty() {
            d.clients_disconnected += 1;
        }
        d.sessions += o.sessions;
        for e in &o.episodes {
            d.disconnections += 1;
            if command_start_ns.is_none_or(|c| e.at_ns < c) && args.command.is_some() {
                d.disconnections_before_command += 1;
            }
            last_disconnect = last_disconnect.max(e.at_ns);
            if let Some(r) = e.rejoined_ns {
                rejoin.push(r.saturating_sub(e.at_ns) / 1000);
            }
            match e.resumed_ns {
                Some(r) => {
                    resume.push(r.saturating_sub(e.at_ns) / 1000);
                    last_resumed = last_resumed.max(r);
                }
                None => {
                    d.not_resumed += 1;
                    d.all_resumed = false;
                }
            }
        }
        for (k, v) in &o.closes {
            *d.closes.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.refusals {
            *d.refusals.entry(k.clone()).or_default() += v;
        }
        sends.sent += o.sent;
        sends.attempts += o.attempts;
        first_attempts += o.first_attempts;
        sends.acked += o.view.acked.len() as u64;
        sends.ack_duplicates += o.ack_duplicates;
        sends.ack_id_changed += o.ack_id_changed;
        sends.rejected += o.rejected;
        sends.unanswered += o.unanswered;
        for (k, v) in &o.errors {
            *sends.errors.entry(k.clone()).or_default() += v;
        }
        ack_us.extend(o.acks.iter().map(|a| a.1));
        stream.received += o.view.received.len() as u64;
        stream.duplicates += o.duplicates;
        stream.out_of_order += o.out_of_order;
        stream.misrouted += o.misrouted;
    }
    sends.resends = sends.attempts.saturating_sub(first_attempts);
    sends.ack_latency_us = summary(ack_us);
    d.resume_us = summary(resume);
    d.rejoin_us = summary(rejoin);
    if let Some(c) = command_start_ns {
        if d.disconnections > 0 {
            d.command_to_last_disconnect_s = Some(last_disconnect.saturating_sub(c) as f64 / 1e9);
            if d.all_resumed {
                d.command_to_all_resumed_s = Some(last_resumed.saturating_sub(c) as f64 / 1e9);
            }
        }
    }

    let bench_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) / t1.duration_since(t0).as_secs_f64() * 100.0),
        _ => None,
    };
    let nproc = report::nproc();
    let bench_saturated = bench_cpu.is_some_and(|c| report::is_saturated(c, nproc));
    let mut warnings = Vec::new();
    let k = &correctness;
    if k.stored_twice > 0 {
        warnings.push(format!(
            "{} cids were stored more than once (see PROTOCOL.md \"Known limit during a ring change\")",
            k.stored_twice
        ));
    }
    if k.gaps > 0 {
        warnings.push(format!(
            "{} stored messages never reached {} members (gaps)",
            k.gaps, k.members_with_gaps
        ));
    }
    if stream.duplicates > 0 || stream.out_of_order > 0 {
        warnings.push(format!(
            "members received {} duplicates and {} messages out of order",
            stream.duplicates, stream.out_of_order
        ));
    }
    if sends.unanswered > 0 {
        warnings.push(format!(
            "{} sends had no ack at the end of the drain",
            sends.unanswered
        ));
    }
    if sends.ack_id_changed > 0 {
        warnings.push(format!(
            "{} cids were acked under two different ids",
            sends.ack_id_changed
        ));
    }
    if !d.all_resumed {
        warnings.push(format!(
            "{} disruptions had not resumed by the end of the drain",
            d.not_resumed
        ));
    }
    if d.disconnections_before_command > 0 {
        warnings.push(format!(
            "{} disconnections happened before the command ran",
            d.disconnections_before_command
        ));
    }
    if let Some(c) = &command_outcome {
        if !c.ok() {
            warnings.push("the command failed or timed out (see its output tail)".into());
        }
    }
    if !drained {
        warnings.push(format!(
            "the drain ended after {} s with clients not settled or sends unanswered",
            args.drain
        ));
    }
    if bench_saturated {
        notes.push(format!(
            "load generator saturated: the bench used {:.0}% of one core on {nproc} cores",
            bench_cpu.unwrap_or_default()
        ));
    }
    if lost_tasks > 0 {
        notes.push(format!(
            "{lost_tasks} member tasks did not stop in time; their counts are missing"
        ));
    }
    if k.delivered_not_stored > 0 {
        notes.push(format!(
            "{} deliveries were of messages the history does not hold: delivered by a \
             node before it stored them and then lost with it; never acked, and resent by \
             their senders with the same cid",
            k.delivered_not_stored
        ));
    }
    let mut r = RebalanceReport {
        scenario: "rebalance".into(),
        command,
        git_rev: report::git_rev(),
        nproc,
        started_unix_ms,
        verdict: String::new(),
        config: RebalanceConfig {
            url: args.url.clone(),
            rooms: args.rooms,
            members: args.members,
            rate_per_member: args.rate,
            body_bytes: args.size,
            duration_s: args.duration,
            command_at_s: args.command_at,
            drain_s: args.drain,
            resend_after_s: args.resend_after,
            room_prefix,
            user_prefix: args.user_prefix.clone(),
        },
        external_command: command_outcome,
        disruption: d,
        sends,
        stream,
        correctness,
        history_error,
        drained,
        bench_cpu_percent: bench_cpu,
        bench_saturated,
        warnings,
        notes,
        timeline: timeline(&outcomes, ns(start), finish_ns),
    };
    r.verdict = if r.pass() { "PASS" } else { "FAIL" }.into();
    Ok(r)
}

/// One progress line per second on stderr.
async fn progress(shared: Arc<Shared>, total: usize, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = flag(&mut stop) => return,
        }
        eprintln!(
            "[{:>7.1}s rebalance] connected {}/{total}  sent {}  acked {}  received {}  disruptions {}",
            shared.base.elapsed().as_secs_f64(),
            shared.connected.load(Relaxed),
            shared.sent.load(Relaxed),
            shared.acked.load(Relaxed),
            shared.received.load(Relaxed),
            shared.disconnects.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn args(extra: &[&str]) -> RebalanceArgs {
        crate::args::parse(extra)
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(args(&[]).validate(), Ok(()));
        assert_eq!(
            args(&["--command", "true", "--command-at", "1"]).validate(),
            Ok(())
        );
        assert!(args(&[]).room_prefix().starts_with("rebalance-"));
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        for (flags, needle) in [
            (vec!["--rooms", "0"], "--rooms"),
            (vec!["--members", "0"], "--members"),
            (vec!["--rooms", "1000", "--members", "100"], "--rooms"),
            (vec!["--rate", "0"], "--rate"),
            (vec!["--rate", "1000"], "--rate"),
            (vec!["--rate", "NaN"], "--rate"),
            (vec!["--size", "0"], "--size"),
            (vec!["--size", "5000"], "--size"),
            (vec!["--duration", "0"], "--duration"),
            (vec!["--drain=-1"], "--drain"),
            (vec!["--command-at=-1"], "--command-at"),
            (vec!["--command-timeout", "0"], "--command-timeout"),
            (vec!["--connect-timeout", "0"], "--connect-timeout"),
            (vec!["--resend-after", "0"], "--resend-after"),
            (vec!["--max-backoff", "inf"], "--max-backoff"),
            (vec!["--history-timeout", "0"], "--history-timeout"),
            (vec!["--command", "  "], "--command"),
            (
                vec![
                    "--command",
                    "true",
                    "--command-at",
                    "40",
                    "--duration",
                    "30",
                ],
                "--command-at",
            ),
            (vec!["--user-prefix", "a b"], "--user-prefix"),
            (vec!["--room-prefix", "r/1"], "--room-prefix"),
        ] {
            let e = args(&flags).validate().expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    fn entry(id: u64, from: &str, cid: &str) -> HistoryEntry {
        HistoryEntry {
            id,
            from: from.into(),
            cid: cid.into(),
        }
    }

    fn member(
        room: usize,
        user: &str,
        jp: Option<u64>,
        rx: &[u64],
        acks: &[(&str, u64)],
    ) -> MemberView {
        MemberView {
            room,
            user: user.into(),
            join_point: jp,
            received: rx.iter().copied().collect(),
            acked: acks.iter().map(|(c, i)| (c.to_string(), *i)).collect(),
        }
    }

    #[test]
    fn clean_run_accounts_nothing() {
        let h = vec![
            vec![entry(10, "a", "m0-0"), entry(11, "b", "m1-0")],
            vec![entry(20, "c", "m2-0")],
        ];
        let m = vec![
            member(0, "a", Some(0), &[10, 11], &[("m0-0", 10)]),
            member(0, "b", Some(0), &[10, 11], &[("m1-0", 11)]),
            member(1, "c", Some(0), &[20], &[("m2-0", 20)]),
        ];
        let c = account(&h, &m);
        assert_eq!(
            (c.acked_lost, c.stored_twice, c.gaps, c.delivered_not_stored),
            (0, 0, 0, 0),
            "{c:?}"
        );
        assert_eq!(c.acked_checked, 3);
        assert_eq!(c.history_messages, 3);
        assert!(c.examples.is_empty());
    }

    #[test]
    fn lost_acks_twice_stored_gaps_and_phantoms_are_counted() {
        let h = vec![vec![
            // Before b joined (its join point is 10): not a gap for b.
            entry(9, "x", "old"),
            entry(10, "a", "m0-0"),
            // m0-1 stored twice (a retry after an owner change).
            entry(12, "a", "m0-1"),
            entry(13, "a", "m0-1"),
            entry(14, "b", "m1-0"),
            // Another user's cid that happens to repeat: not ours, not counted.
            entry(15, "stranger", "z"),
            entry(16, "stranger", "z"),
        ]];
        let m = vec![
            // a: m0-2 acked as 17 but not stored; 99 delivered but never stored.
            member(
                0,
                "a",
                Some(0),
                &[9, 10, 12, 13, 14, 15, 16, 99],
                &[("m0-0", 10), ("m0-1", 12), ("m0-2", 17)],
            ),
            // b: joined at 10, missed 13 and 16.
            member(0, "b", Some(10), &[12, 14, 15], &[("m1-0", 14)]),
            // An ack whose id holds another cid counts as lost too.
            member(0, "c", None, &[], &[("m2-0", 14)]),
        ];
        let c = account(&h, &m);
        assert_eq!(c.acked_lost, 2, "{c:?}");
        assert_eq!(c.stored_twice, 1, "{c:?}");
        assert_eq!(c.gaps, 2, "{c:?}");
        assert_eq!(c.members_with_gaps, 1);
        assert_eq!(c.delivered_not_stored, 1);
        assert_eq!(c.acked_checked, 5);
        assert!(c.examples.iter().any(|e| e.contains("m0-2")), "{c:?}");
    }

    #[test]
    fn a_member_of_a_missing_room_history_loses_its_acks() {
        let c = account(&[], &[member(0, "a", Some(0), &[5], &[("m0-0", 5)])]);
        assert_eq!((c.acked_lost, c.delivered_not_stored, c.gaps), (1, 1, 0));
    }

    #[test]
    fn command_outcome_records_status_output_and_timeout() {
        let ok = run_command("echo hello; echo oops >&2", Duration::from_secs(10));
        assert_eq!(ok.exit_code, Some(0));
        assert!(ok.ok());
        assert!(ok.output_tail.contains("hello") && ok.output_tail.contains("oops"));
        let bad = run_command("exit 3", Duration::from_secs(10));
        assert_eq!(bad.exit_code, Some(3));
        assert!(!bad.ok());
        let slow = run_command("sleep 5", Duration::from_millis(200));
        assert!(slow.timed_out && !slow.ok(), "{slow:?}");
        assert!(slow.duration_s < 4.0);
        // A background child holding stdout does not keep the bench waiting.
        let bg = run_command("sleep 3 & echo started", Duration::from_secs(10));
        assert_eq!(bg.exit_code, Some(0));
        assert!(bg.duration_s < 2.5, "{bg:?}");
    }

    async fn test_member(index: usize) -> Member {
        let (_, finish) = watch::channel(false);
        let (_, stop) = watch::channel(false);
        Member {
            p: MemberPlan {
                shared: Arc::new(Shared {
                    base: Instant::now(),
                    start_ns: AtomicU64::new(u64::MAX),
                    end_ns: AtomicU64::new(u64::MAX),
                    period_ns: 1_000_000_000,
                    joined_once: AtomicU64::new(0),
                    finishing: AtomicBool::new(false),
                    sent: AtomicU64::new(0),
                    acked: AtomicU64::new(0),
                    received: AtomicU64::new(0),
                    disconnects: AtomicU64::new(0),
                    connected: AtomicU64::new(0),
                }),
                live: Arc::new(Live::default()),
                target: Arc::new(Target::resolve("ws://127.0.0.1:9").await.expect("target")),
                permits: Arc::new(Semaphore::new(1)),
                index,
                room: 0,
                room_name: "r-0".into(),
                user: "u".into(),
                auth: Arc::new(Auth::Dev),
                size: 8,
                connect_timeout: Duration::from_secs(1),
                resend_after: Duration::from_secs(5),
                max_backoff: Duration::from_secs(1),
                finish,
                stop,
            },
            out: MemberOutcome::default(),
            pending: BTreeMap::new(),
            next_seq: 0,
            last_seen: 0,
            catch_up_to: None,
            joined: false,
            reached_joined: false,
            open_episode: None,
        }
    }

    fn pend(m: &mut Member, seq: u64) {
        m.pending.insert(
            seq,
            Pending {
                first_sent_ns: Some(1),
                last_sent: Some(Instant::now()),
                retry_at: None,
            },
        );
    }

    /// A loss, a refused retry, a rejoin whose `head` is ahead, the replay up to it: one
    /// episode, resumed only once caught up; unacked sends are due again on the new session.
    #[tokio::test]
    async fn member_resumes_through_a_loss_and_accounts_the_episode() {
        let mut m = test_member(7).await;
        let f = |s: &str| m_frame(s);
        assert!(m
            .on_frame(&f(r#"{"type":"joined","room":"r-0","head":"100"}"#))
            .is_none());
        assert_eq!(m.out.view.join_point, Some(100));
        assert!(m.joined && m.catch_up_to.is_none());
        m.on_frame(&f(r#"{"type":"message","room":"r-0","id":"101","from":"u","cid":"m7-0","body":"x","ts":1}"#));
        pend(&mut m, 0);
        pend(&mut m, 1);
        m.on_frame(&f(
            r#"{"type":"ack","room":"r-0","cid":"m7-0","id":"101","duplicate":false}"#,
        ));
        assert_eq!(m.out.view.acked.get("m7-0"), Some(&101));
        assert!(!m.pending.contains_key(&0) && m.pending.contains_key(&1));
        // A refused send is retried later; a do-not-retry refusal is final.
        m.on_frame(&f(
            r#"{"type":"error","code":"room_moved","message":"x","cid":"m7-1","room":"r-0"}"#,
        ));
        assert!(m.pending[&1].retry_at.is_some());
        pend(&mut m, 2);
        m.on_frame(&f(
            r#"{"type":"error","code":"body_too_long","message":"x","cid":"m7-2"}"#,
        ));
        assert!(!m.pending.contains_key(&2));
        assert_eq!(m.out.rejected, 1);
        // Without a cid, room_moved means this connection no longer serves the room.
        assert!(m
            .on_frame(&f(
                r#"{"type":"error","code":"room_moved","message":"x","room":"r-0"}"#
            ))
            .is_some());
        m.disrupted(close_label(4001), true);
        m.disrupted("HTTP 502".into(), false);
        assert_eq!(
            m.out.episodes.len(),
            1,
            "one episode for a loss and its refusals"
        );
        assert_eq!(m.out.refusals.get("HTTP 502"), Some(&1));
        // Rejoined with a head beyond what was seen: not resumed until the replay reaches it.
        m.on_frame(&f(r#"{"type":"joined","room":"r-0","head":"103"}"#));
        assert!(m.out.episodes[0].rejoined_ns.is_some());
        assert!(m.out.episodes[0].resumed_ns.is_none());
        assert!(
            m.pending[&1].last_sent.is_none(),
            "unacked sends go out again"
        );
        m.on_frame(&f(
            r#"{"type":"message","room":"r-0","id":"102","from":"v","cid":"c","body":"x","ts":1}"#,
        ));
        assert!(m.out.episodes[0].resumed_ns.is_none());
        m.on_frame(&f(
            r#"{"type":"message","room":"r-0","id":"103","from":"v","cid":"d","body":"x","ts":1}"#,
        ));
        assert!(m.out.episodes[0].resumed_ns.is_some());
        // A replayed duplicate and another room's message are counted, not kept.
        m.on_frame(&f(
            r#"{"type":"message","room":"r-0","id":"103","from":"v","cid":"d","body":"x","ts":1}"#,
        ));
        m.on_frame(&f(
            r#"{"type":"message","room":"r-9","id":"104","from":"v","cid":"e","body":"x","ts":1}"#,
        ));
        assert_eq!((m.out.duplicates, m.out.misrouted), (1, 1));
        assert_eq!(m.out.view.received.len(), 3);
        // The same cid acked under another id is flagged.
        m.on_frame(&f(
            r#"{"type":"ack","room":"r-0","cid":"m7-0","id":"999","duplicate":true}"#,
        ));
        assert_eq!((m.out.ack_id_changed, m.out.ack_duplicates), (1, 1));
    }

    #[test]
    fn only_lost_acks_or_an_unread_history_fail_the_run() {
        let mut r = RebalanceReport::default();
        r.correctness.stored_twice = 3;
        r.correctness.gaps = 2;
        r.sends.unanswered = 1;
        assert!(r.pass(), "warnings do not fail a run");
        r.correctness.acked_lost = 1;
        assert!(!r.pass());
        r.correctness.acked_lost = 0;
        r.history_error = Some("HTTP 500".into());
        assert!(!r.pass());
        r.verdict = "FAIL".into();
        let md = r.to_markdown();
        assert!(md.contains("rebalance: FAIL") && md.contains("History could not be verified"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["correctness"]["acked_lost"], 0);
        assert_eq!(json["correctness"]["stored_twice"], 3);
        assert_eq!(json["sends"]["unanswered"], 1);
    }

    #[test]
    fn timeline_buckets_acks_members_and_disruptions_by_second() {
        const S: u64 = 1_000_000_000;
        let start = 5 * S;
        // Both joined before the start; b is lost at 2.5 s, rejoins at 3.2 s, resumes at
        // 3.4 s; a's acks straddle the loss.
        let a = MemberOutcome {
            acks: vec![(start + S / 2, 1_000), (start + 3 * S, 9_000)],
            joined_ns: vec![S],
            ..Default::default()
        };
        let b = MemberOutcome {
            acks: vec![(start + S / 3, 3_000)],
            joined_ns: vec![2 * S, start + 3 * S + S / 5],
            left_ns: vec![start + 2 * S + S / 2],
            episodes: vec![Episode {
                at_ns: start + 2 * S + S / 2,
                rejoined_ns: Some(start + 3 * S + S / 5),
                resumed_ns: Some(start + 3 * S + 2 * S / 5),
            }],
            ..Default::default()
        };
        // The drain ended 4.5 s after the start: five seconds, the last one partial.
        let t = timeline(&[a, b], start, start + 4 * S + S / 2);
        let col = |f: fn(&RebalancePoint) -> u64| t.iter().map(f).collect::<Vec<_>>();
        assert_eq!(col(|p| p.t_s as u64), [0, 1, 2, 3, 4]);
        assert_eq!(col(|p| p.acks), [2, 0, 0, 1, 0]);
        assert_eq!(col(|p| p.members_joined), [2, 2, 1, 2, 2]);
        assert_eq!(col(|p| p.disconnections), [0, 0, 1, 0, 0]);
        assert_eq!(col(|p| p.resumes), [0, 0, 0, 1, 0]);
        assert!((990..=1010).contains(&t[0].ack_p50_us), "{:?}", t[0]);
        assert!((2_980..=3_020).contains(&t[0].ack_max_us), "{:?}", t[0]);
        assert_eq!(t[1].ack_p99_us, 0);

        let r = RebalanceReport {
            timeline: t,
            external_command: Some(CommandOutcome {
                command: "kill -9 <pid>".into(),
                started_at_s: 2.0,
                duration_s: 0.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let svg = r.chart();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 7);
        assert!(svg.contains("kill -9 &lt;pid&gt;") && svg.contains("--command"));
        assert_eq!(
            svg.matches(r##"fill="#ffd54f""##).count(),
            3,
            "one band per panel"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["timeline"][2]["members_joined"], 1);
        assert_eq!(json["timeline"][2]["disconnections"], 1);
    }

    fn m_frame(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn cids_round_trip_and_codes_classify() {
        assert!(retry_later("room_moved") && retry_later("rate_limited"));
        assert!(!retry_later("bad_json") && !retry_later("not_joined"));
        assert!(resume_needed("room_moved") && !resume_needed("rate_limited"));
        assert!(permanent_refusal("HTTP 401") && !permanent_refusal("HTTP 503"));
        assert_eq!(body(10, 3, 7), "rb 3 7 xxx");
        assert_eq!(body(3, 3, 7).len(), 3);
    }
}
