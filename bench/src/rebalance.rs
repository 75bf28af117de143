//! The `rebalance` scenario: rooms × members sending through a URL (normally a router)
//! while the cluster changes under them (`--command`: add a node, `kill -9` one, a rolling
//! restart) or the bench injects faults itself (`--pause-pid`: SIGSTOP a process and
//! SIGCONT it; `--cut-command` / `--heal-command`: a partition), and what that cost: who was
//! disconnected, how long until everyone had resumed, and whether the guarantees held,
//! judged from the store read back at the end.
//!
//! Clients behave as PROTOCOL.md asks and as a real client does: on 4001 / 4002 / 1001 / an
//! abrupt end, a refused upgrade that is not final (421, 429, 500, 502, 503), or a socket that delivered nothing for
//! `--dead-after` seconds while sends wait for their ack, they reconnect with backoff and
//! `since` = the last id they saw, and resend every unacked send with the same `cid`. Sends
//! are generated on schedule whether or not the member is connected (a user keeps typing)
//! and queue until it is.
//!
//! This module owns the member state machine and the run's timeline; [`results`] is the
//! report it fills in (JSON, Markdown, chart). The oracle ([`oracle`]) is a pure function
//! of what members saw and what the store returned; [`store`] reads the rooms back;
//! [`faults`] injects and always undoes the faults; [`bridged`] decides `--bridged`'s home
//! rooms and joins. A member's retry, resume or give-up after an error frame or a refused
//! upgrade is `common`'s code table's decision ([`client::retry`]). Every
//! phase has a deadline; the only addresses used are `--url`, `--cql-nodes` and the
//! planner's own commands and pid.

pub mod bridged;
pub mod faults;
pub mod oracle;
pub mod results;
pub mod store;

use std::collections::{BTreeMap, HashSet};
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
use crate::client::{self, Incoming, Target, WsWrite};
use crate::harness::{self, CpuMeter, Progress, RunFacts};
use crate::http::HttpClient;
use crate::payload::FrameView;
use crate::report::{self, close_label, map_or_none};
use crate::timeline::Seconds;
use crate::BenchError;
use bridged::{join_refusal, HomeSearch, JoinRefusal, SharedJoin};
use faults::{FaultAction, FaultPlan, FaultRecord, FaultRunner};
pub use oracle::{account, compare, Correctness, Disagreement, MemberView, StoredRow};
pub use results::*;

/// Options of `chat-bench rebalance`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 when the store, read back after the drain, shows nothing wrong (the report \
says PASS); 1 when it shows acked_lost (an acked cid not stored under its acked id), \
stored_twice (a sender's cid stored under two ids), gaps (a stored message after a \
member's join point, up to the last one it received, that it never received) or \
out_of_order (a member received stored messages in another order than the store's); also 1 \
when the store could not be read, \
when the members could not all connect at the start, or when the run was interrupted \
(SIGINT, SIGTERM: a paused process is continued and a cut healed first); 64 for bad \
arguments. The store judged is CQL when --cql-nodes and --cql-keyspace are given, else the \
history API at --url. Warnings (reported, exit 0): unknown_ids (a member received an id \
the store does not hold: delivered by a node that crashed or was fenced before storing it, \
never acked), the history API and CQL disagree, \
duplicates received, sends unanswered at the end, clients that had not resumed by the end \
of the drain or after a fault, a --command, cut or heal that failed or timed out.")]
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
    /// Seconds --command (and each --cut-command / --heal-command) may run before it is
    /// killed.
    #[arg(long, default_value_t = 60.0)]
    pub command_timeout: f64,
    /// A member whose socket delivered no frame for this many seconds while it has unacked
    /// sends on it treats the connection as dead, as a real client does: drops it,
    /// reconnects through --url with the usual backoff, rejoins with `since` = the last id
    /// it saw and resends every unacked send with the same cid. 0 disables it.
    #[arg(long, default_value_t = 10.0)]
    pub dead_after: f64,
    /// Fault: SIGSTOP this process at each fault time and SIGCONT it --pause-secs later
    /// (e.g. a node's pid). It is always continued, also when the run fails or is
    /// interrupted.
    #[arg(long)]
    pub pause_pid: Option<u32>,
    /// Seconds each --pause-pid pause lasts.
    #[arg(long)]
    pub pause_secs: Option<f64>,
    /// Fault: a partition. Run this with `sh -c` at each fault time (e.g. `ip link set
    /// veth-x down`), and --heal-command --cut-secs later.
    #[arg(long)]
    pub cut_command: Option<String>,
    /// Undoes --cut-command (e.g. `ip link set veth-x up`); always run after a cut, also
    /// when the run fails or is interrupted.
    #[arg(long)]
    pub heal_command: Option<String>,
    /// Seconds each cut lasts, from the start of --cut-command to the start of
    /// --heal-command.
    #[arg(long)]
    pub cut_secs: Option<f64>,
    /// Seconds after sending starts at which the first fault starts [default: --command-at].
    #[arg(long)]
    pub fault_at: Option<f64>,
    /// Number of faults, each --fault-every after the previous one's start; all must end
    /// within --duration.
    #[arg(long, default_value_t = 1)]
    pub fault_repeat: u32,
    /// Seconds from one fault's start to the next one's (needed with --fault-repeat > 1;
    /// longer than the fault).
    #[arg(long)]
    pub fault_every: Option<f64>,
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
    /// Seconds allowed for reading every room back at the end, from each source (the
    /// history API, CQL).
    #[arg(long, default_value_t = 60.0)]
    pub history_timeout: f64,
    /// CQL contact points (`host:port`, comma-separated) of the store the cluster writes
    /// to: the rooms are also read back straight from it, and judged by it. Needs
    /// --cql-keyspace.
    #[arg(long, value_delimiter = ',')]
    pub cql_nodes: Vec<String>,
    /// The cluster's keyspace (the node's --cql-keyspace); read at QUORUM.
    #[arg(long)]
    pub cql_keyspace: Option<String>,
    /// Bridge every member: each connects with a home room of its own
    /// (`<room>-home-<member>`, or a later candidate), owned by another node than its room
    /// whenever the ring has more than one (chosen at the start from the router's
    /// `/v1/rooms/{room}/owner`, so --url must be a router), joins its room over the socket
    /// and sends there, so every frame of it crosses Redis. On every reconnect it connects
    /// with its home room again and rejoins its room with `since`; a join refused with a
    /// retry-later code is sent again after a backoff. Home rooms are not sent to.
    #[arg(long)]
    pub bridged: bool,
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
    /// disconnections, stalled reconnects and resumes, with --command's run and each fault
    /// shaded) as an SVG chart to this file. The JSON report carries the same numbers as `timeline`.
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
const HISTORY_LIMIT: u32 = 1000;
/// How a session dropped as dead (`--dead-after`) is labelled in `closes`.
const STALLED: &str = "stalled";

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
        seconds("dead-after", self.dead_after, false)?;
        self.check_faults()?;
        match (self.cql_nodes.is_empty(), &self.cql_keyspace) {
            (true, None) => {}
            (false, None) => return Err("--cql-nodes needs --cql-keyspace".into()),
            (true, Some(_)) => return Err("--cql-keyspace needs --cql-nodes".into()),
            (false, Some(ks)) => {
                if !store::valid_keyspace(ks) {
                    return Err(format!(
                        "--cql-keyspace {ks:?} is not a plain CQL identifier (a letter, then \
                         letters, digits or _, at most 48)"
                    ));
                }
                if let Some(n) = self.cql_nodes.iter().find(|n| !host_port(n)) {
                    return Err(format!("--cql-nodes: {n:?} is not host:port"));
                }
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
        if self.bridged {
            let longest_home =
                bridged::home_candidate(&last_room, self.members - 1, bridged::HOME_CANDIDATES - 1);
            crate::args::check_room_prefix(longest_home)?;
        }
        crate::args::check_room_prefix(last_room)?;
        Ok(())
    }

    /// The fault flags: complete, consistent and fitting in --duration.
    fn check_faults(&self) -> Result<(), String> {
        let pause = self.pause_pid.is_some() || self.pause_secs.is_some();
        let cut =
            self.cut_command.is_some() || self.heal_command.is_some() || self.cut_secs.is_some();
        if pause && cut {
            return Err(
                "--pause-pid and --cut-command cannot be combined: one kind of fault \
                        per run"
                    .into(),
            );
        }
        let length = if pause {
            match (self.pause_pid, self.pause_secs) {
                (Some(0), _) => return Err("--pause-pid must be a process id, not 0".into()),
                (Some(_), Some(n)) => {
                    seconds("pause-secs", n, true)?;
                    n
                }
                (Some(_), None) => return Err("--pause-pid needs --pause-secs".into()),
                (None, _) => return Err("--pause-secs needs --pause-pid".into()),
            }
        } else if cut {
            let nonempty = |flag: &str, v: &Option<String>| match v {
                Some(c) if c.trim().is_empty() => Err(format!("--{flag} must not be empty")),
                Some(_) => Ok(()),
                None => Err(format!(
                    "--cut-command, --heal-command and --cut-secs go together: --{flag} is \
                     missing"
                )),
            };
            nonempty("cut-command", &self.cut_command)?;
            nonempty("heal-command", &self.heal_command)?;
            let Some(n) = self.cut_secs else {
                return Err("--cut-command, --heal-command and --cut-secs go together: \
                            --cut-secs is missing"
                    .into());
            };
            seconds("cut-secs", n, true)?;
            n
        } else {
            if self.fault_at.is_some() || self.fault_every.is_some() || self.fault_repeat != 1 {
                return Err(
                    "--fault-at, --fault-repeat and --fault-every need a fault: --pause-pid \
                     or --cut-command"
                        .into(),
                );
            }
            return Ok(());
        };
        let at = self.fault_at.unwrap_or(self.command_at);
        seconds("fault-at", at, false)?;
        if self.fault_repeat == 0 {
            return Err("--fault-repeat must be at least 1".into());
        }
        let every = match (self.fault_repeat, self.fault_every) {
            (_, Some(e)) => {
                seconds("fault-every", e, true)?;
                if e <= length {
                    return Err(format!(
                        "--fault-every ({e} s) must be longer than each fault ({length} s)"
                    ));
                }
                e
            }
            (1, None) => 0.0,
            (_, None) => return Err("--fault-repeat above 1 needs --fault-every".into()),
        };
        let end = at + f64::from(self.fault_repeat - 1) * every + length;
        if end > self.duration {
            return Err(format!(
                "--fault-repeat {} × --fault-every {every} s from --fault-at {at} s, each \
                 lasting {length} s, ends at {end} s: after the end of sending (--duration {} s)",
                self.fault_repeat, self.duration
            ));
        }
        Ok(())
    }

    /// The faults asked for (after [`validate`](Self::validate)).
    pub fn fault_plan(&self) -> Option<FaultPlan> {
        let (action, length) = match (&self.pause_pid, &self.cut_command, &self.heal_command) {
            (Some(pid), _, _) => (FaultAction::Pause { pid: *pid }, self.pause_secs?),
            (None, Some(cut), Some(heal)) => (
                FaultAction::Cut {
                    cut: cut.clone(),
                    heal: heal.clone(),
                },
                self.cut_secs?,
            ),
            _ => return None,
        };
        Some(FaultPlan {
            action,
            first_at: Duration::from_secs_f64(self.fault_at.unwrap_or(self.command_at)),
            every: Duration::from_secs_f64(self.fault_every.unwrap_or(0.0)),
            repeat: self.fault_repeat,
            length: Duration::from_secs_f64(length),
            command_timeout: Duration::from_secs_f64(self.command_timeout),
        })
    }
}

/// `host:port` with a port number.
fn host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
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
    stalled: AtomicU64,
    connected: AtomicU64,
}

impl Shared {
    fn new(rate: f64) -> Shared {
        let zero = || AtomicU64::new(0);
        Shared {
            base: Instant::now(),
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            period_ns: (1e9 / rate) as u64,
            joined_once: zero(),
            finishing: AtomicBool::new(false),
            sent: zero(),
            acked: zero(),
            received: zero(),
            disconnects: zero(),
            stalled: zero(),
            connected: zero(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A member's live state the coordinator polls to decide when the drain is complete and
/// when the members have recovered from a fault.
struct Live {
    /// Joined and caught up, with no disruption open, and every send due by the end of
    /// sending scheduled.
    settled: AtomicBool,
    /// Joined and caught up, with no disruption open.
    resumed: AtomicBool,
    pending: AtomicU64,
    /// Ns since base when the oldest unanswered send was created; `u64::MAX` if none.
    oldest_pending_ns: AtomicU64,
    last_seen: AtomicU64,
    max_acked: AtomicU64,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            settled: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            pending: AtomicU64::new(0),
            oldest_pending_ns: AtomicU64::new(u64::MAX),
            last_seen: AtomicU64::new(0),
            max_acked: AtomicU64::new(0),
        }
    }
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
    /// Ns since base when the schedule created it.
    created_ns: u64,
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
    /// Ns since base of each connection dropped as dead (`--dead-after`).
    stalled_ns: Vec<u64>,
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
    /// `--bridged`: the room this member connects with; `room_name` is then joined over
    /// the socket.
    home: Option<String>,
    user: String,
    auth: Arc<Auth>,
    size: usize,
    connect_timeout: Duration,
    resend_after: Duration,
    /// `--dead-after`; `None` when disabled.
    dead_after: Option<Duration>,
    max_backoff: Duration,
    finish: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

enum Ev {
    Frame(bytes::Bytes),
    /// A ping, pong or other frame without data: the socket is alive.
    Control,
    Closed(u16),
}

async fn read_session(mut reader: client::Reader, tx: mpsc::Sender<Ev>) {
    loop {
        let ev = match reader.next().await {
            Ok(Incoming::Data(b)) => Ev::Frame(b),
            Ok(Incoming::Close(code)) => Ev::Closed(code),
            Ok(_) => Ev::Control,
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

/// After an error frame with `code`: whether the member tries again, a send with the same
/// cid or, without a cid, its join by reconnecting. Decided by `common`'s table
/// ([`client::retry`]): everything but do-not-retry. `room_unavailable` comes with the cid
/// of every send queued at a room that could not be acquired (nothing was stored: resend),
/// or without one for the upgrade's own join refused after the upgrade (PROTOCOL.md: close,
/// reconnect, join again with the same `since`).
fn tries_again(code: &str) -> bool {
    client::retry(code) != common::Retry::DoNotRetry
}

struct Member {
    p: MemberPlan,
    out: MemberOutcome,
    /// Ids received, for `out.view.received` to hold each once.
    seen: HashSet<u64>,
    /// Since when the current session has had sends written on it waiting for an answer
    /// with no frame arriving; `None` while nothing waits.
    silent_since: Option<Instant>,
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
    /// `--bridged`: the room's join over the socket, across sessions.
    join: Option<SharedJoin>,
}

impl Member {
    fn new(p: MemberPlan, join: Option<SharedJoin>) -> Member {
        Member {
            p,
            out: MemberOutcome::default(),
            seen: HashSet::new(),
            silent_since: None,
            pending: BTreeMap::new(),
            next_seq: 0,
            last_seen: 0,
            catch_up_to: None,
            joined: false,
            reached_joined: false,
            open_episode: None,
            join,
        }
    }

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
        let resumed = self.joined && self.catch_up_to.is_none() && self.open_episode.is_none();
        self.p.live.resumed.store(resumed, Relaxed);
        self.p
            .live
            .pending
            .store(self.pending.len() as u64, Relaxed);
        // Sequence numbers are created in order, so the first pending is the oldest.
        let oldest = self
            .pending
            .values()
            .next()
            .map_or(u64::MAX, |p| p.created_ns);
        self.p.live.oldest_pending_ns.store(oldest, Relaxed);
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

    /// The label of a session dropped as dead.
    fn stalled_label(&self) -> String {
        format!(
            "{STALLED} (no frame in {} s)",
            self.p.dead_after.unwrap_or_default().as_secs_f64()
        )
    }

    /// A frame (of any kind) arrived at `now`: sends still waiting on this session wait
    /// from now on.
    fn heard(&mut self, now: Instant) {
        self.silent_since = self
            .pending
            .values()
            .any(|p| p.last_sent.is_some())
            .then_some(now);
    }

    /// The session counts as dead: sends written on it have waited `--dead-after` with no
    /// frame arriving.
    fn stalled(&self, now: Instant) -> bool {
        match (self.p.dead_after, self.silent_since) {
            (Some(d), Some(since)) => {
                now.saturating_duration_since(since) >= d
                    && self.pending.values().any(|p| p.last_sent.is_some())
            }
            _ => false,
        }
    }

    /// Sends every pending message that is due on this session; `Err(label)` when the
    /// session must be dropped (a write failed, or blocked for `--dead-after`).
    async fn flush(&mut self, ws: &mut WsWrite) -> Result<(), String> {
        if !self.joined {
            return Ok(());
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
            let write = client::send_text(ws, &mut bytes);
            let written = match self.p.dead_after {
                // A peer that stopped reading fills the socket's buffers and the write
                // waits: that is a dead connection too.
                Some(d) => match tokio::time::timeout(d, write).await {
                    Ok(r) => r.is_ok(),
                    Err(_) => return Err(self.stalled_label()),
                },
                None => write.await.is_ok(),
            };
            if !written {
                return Err("write failed".into());
            }
            self.silent_since.get_or_insert(now);
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
        Ok(())
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
        let now = self.p.shared.now_ns();
        let due = self.due_by(now);
        while self.next_seq < due {
            self.pending.insert(
                self.next_seq,
                Pending {
                    created_ns: now,
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
        if v.room.is_some() && v.room == self.p.home.as_deref() {
            return self.on_home(v);
        }
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
                if let Some(j) = &mut self.join {
                    j.joined();
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
                        if !self.seen.insert(id) {
                            self.out.duplicates += 1;
                        } else {
                            self.out.view.received.push(id);
                            if id <= self.last_seen {
                                self.out.out_of_order += 1;
                            }
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
                        if tries_again(&code) {
                            if let Some(p) = self.pending.get_mut(&seq) {
                                p.retry_at = Some(Instant::now() + RETRY_LATER);
                            }
                        } else if self.pending.remove(&seq).is_some() {
                            self.out.rejected += 1;
                        }
                        None
                    }
                    None if self.join.is_some() && in_room => self.join_refused(&code),
                    None if tries_again(&code) => Some(format!("error {code}")),
                    None => None,
                }
            }
            _ => None,
        }
    }

    /// A frame of the home room (`--bridged`): nothing to account, since nothing is sent
    /// there; an error refusing it (its join after the upgrade) means reconnecting.
    fn on_home(&mut self, v: &FrameView<'_>) -> Option<String> {
        let code = v.code.filter(|_| v.kind == "error" && v.cid.is_none())?;
        *self.out.errors.entry(code.to_owned()).or_default() += 1;
        tries_again(code).then(|| format!("error {code} (home room)"))
    }

    /// `--bridged`: the room's join was refused (or its replay failed, and the member is no
    /// longer in the room). Joins again after a backoff, or reconnects, as the code says.
    fn join_refused(&mut self, code: &str) -> Option<String> {
        match join_refusal(code)? {
            JoinRefusal::Reconnect => Some(format!("error {code}")),
            JoinRefusal::JoinAgain => {
                if let Some(j) = &mut self.join {
                    j.refused(Instant::now());
                }
                self.disrupted(format!("join refused: {code}"), false);
                None
            }
        }
    }

    /// The `/ws` query of a new session: the home room with `--bridged` (the room is joined
    /// over the socket, with its own `since`), else the room with `since` = the last id seen
    /// once joined before.
    fn query(&self, creds: &str) -> String {
        match &self.p.home {
            Some(home) => format!("room={home}&{creds}"),
            None if self.out.view.join_point.is_some() => {
                format!("room={}&{creds}&since={}", self.p.room_name, self.last_seen)
            }
            None => format!("room={}&{creds}", self.p.room_name),
        }
    }

    /// The `join` of the room over the socket (`--bridged`), with `since` = the last id
    /// seen once joined before.
    fn join_frame(&self) -> Vec<u8> {
        let mut f = serde_json::json!({"type": "join", "room": self.p.room_name});
        if self.out.view.join_point.is_some() {
            f["since"] = self.last_seen.to_string().into();
        }
        f.to_string().into_bytes()
    }

    /// Writes the room's join if it is due (`--bridged`); `Err(label)` when the session must
    /// be dropped.
    async fn join_if_due(&mut self, ws: &mut WsWrite) -> Result<(), String> {
        let now = Instant::now();
        match &self.join {
            Some(j) if j.due(now) => {}
            _ => return Ok(()),
        }
        let mut frame = self.join_frame();
        let write = client::send_text(ws, &mut frame);
        let written = match self.p.dead_after {
            Some(d) => match tokio::time::timeout(d, write).await {
                Ok(r) => r.is_ok(),
                Err(_) => return Err(self.stalled_label()),
            },
            None => write.await.is_ok(),
        };
        if !written {
            return Err("write failed".into());
        }
        if let Some(j) = &mut self.join {
            j.sent(now);
        }
        Ok(())
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
        self.silent_since = None;
        if let Some(j) = &mut self.join {
            j.new_session();
        }
        let (reader, mut control) = client::reader(rd);
        let (tx, mut events) = mpsc::channel(1024);
        let read_task: JoinHandle<()> = tokio::spawn(read_session(reader, tx));
        self.p.shared.connected.fetch_add(1, Relaxed);
        let mut wake = tokio::time::interval(WAKE);
        wake.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut finish = self.p.finish.clone();
        let mut stop = self.p.stop.clone();
        let joined_by = tokio::time::Instant::now() + self.p.connect_timeout;
        // With --bridged the room's join goes out on the first tick, which is at once.
        let end = loop {
            tokio::select! {
                biased;
                _ = harness::flag(&mut stop) => break SessionEnd::Done,
                _ = harness::flag(&mut finish) => {
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
                        let reason = self.on_frame(&b);
                        self.heard(Instant::now());
                        if let Some(reason) = reason {
                            break SessionEnd::Lost(reason);
                        }
                    }
                    Some(Ev::Control) => self.heard(Instant::now()),
                    Some(Ev::Closed(code)) => break SessionEnd::Lost(close_label(code)),
                    None => break SessionEnd::Lost(close_label(1006)),
                },
                c = control.recv() => match c {
                    Some(f) => {
                        let write = ws.write_frame(f);
                        let written = match self.p.dead_after {
                            Some(d) => tokio::time::timeout(d, write).await.ok(),
                            None => Some(write.await),
                        };
                        match written {
                            Some(Ok(())) => {}
                            Some(Err(_)) => break SessionEnd::Lost("write failed".into()),
                            None => break SessionEnd::Lost(self.stalled_label()),
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
                    // A bridged join is bounded per attempt: refusals re-send it.
                    let unanswered = match &self.join {
                        Some(j) => j.unanswered(Instant::now(), self.p.connect_timeout),
                        None => !self.joined && tokio::time::Instant::now() > joined_by,
                    };
                    if unanswered {
                        break SessionEnd::Lost("no joined frame".into());
                    }
                    if let Err(label) = self.join_if_due(&mut ws).await {
                        break SessionEnd::Lost(label);
                    }
                    if self.stalled(Instant::now()) {
                        break SessionEnd::Lost(self.stalled_label());
                    }
                    self.schedule();
                    if let Err(label) = self.flush(&mut ws).await {
                        break SessionEnd::Lost(label);
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
                let stalled = label.starts_with(STALLED);
                if stalled {
                    self.out.stalled_ns.push(self.p.shared.now_ns());
                    self.p.shared.stalled.fetch_add(1, Relaxed);
                }
                let is_close = label.starts_with(|c: char| c.is_ascii_digit())
                    || label.starts_with("error")
                    || label == "no joined frame"
                    || label == "write failed"
                    || stalled;
                self.disrupted(label.clone(), is_close);
            }
        }
        end
    }

    async fn run(mut self) -> MemberOutcome {
        let mut backoff = FIRST_BACKOFF;
        let mut stop = self.p.stop.clone();
        let mut finish = self.p.finish.clone();
        let jitter = member_jitter(self.p.index);
        loop {
            if *self.p.stop.borrow() || *self.p.finish.borrow() {
                break;
            }
            // Signed per attempt, so a resumed session never carries an expired token.
            let creds = match self.p.auth.credentials(&self.p.user) {
                Ok(c) => c,
                Err(e) => {
                    self.out.gave_up = Some(format!("signing a token: {e}"));
                    break;
                }
            };
            let query = self.query(&creds);
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
                _ = harness::flag(&mut stop) => break,
                _ = harness::flag(&mut finish) => break,
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

/// Deterministic jitter per member (a factor of 1 to 1.45 on every backoff), so reconnects
/// and rejoins do not arrive in lockstep.
fn member_jitter(index: usize) -> f64 {
    1.0 + (index % 10) as f64 / 20.0
}

/// Refusals no retry fixes (bad user, auth, forbidden, room ended): an upgrade refused
/// with a status `common`'s table gives only to do-not-retry codes.
fn permanent_refusal(label: &str) -> bool {
    label
        .strip_prefix("HTTP ")
        .and_then(|s| s.get(..3)?.parse().ok())
        .is_some_and(client::refusal_is_final)
}

fn body(size: usize, index: usize, seq: u64) -> String {
    let mut b = format!("rb {index} {seq} ");
    while b.len() < size {
        b.push('x');
    }
    b.truncate(size);
    b
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
// The timeline, from what the members recorded.

// Per-second counts of the timeline.
const ACKS: usize = 0;
const JOINS: usize = 1;
const LEAVES: usize = 2;
const DISCONNECTS: usize = 3;
const RESUMES: usize = 4;
const STALLS: usize = 5;

/// The timeline from what the members recorded, `start_ns..end_ns` (ns since base). Built
/// after the run from timestamps the members keep anyway, so it costs the run nothing.
fn timeline(outcomes: &[MemberOutcome], start_ns: u64, end_ns: u64) -> Vec<RebalancePoint> {
    let sec = |ns: u64| (ns.saturating_sub(start_ns) / 1_000_000_000) as usize;
    let mut s = Seconds::<6>::default();
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
        for &at in &o.stalled_ns {
            s.count(sec(at), STALLS, 1);
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
                stalled_reconnects: x.counts[STALLS],
                resumes: x.counts[RESUMES],
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The run.

/// Runs the scenario: [`load`], then [`judge`]. Bad arguments are `Config`; a run whose
/// members could not connect at the start, or that was interrupted (SIGINT, SIGTERM), is
/// `Failed`. An interrupted run undoes its open fault before it returns. The caller turns a
/// report that does not [`pass`] into exit 1.
///
/// [`pass`]: RebalanceReport::pass
pub async fn run(args: RebalanceArgs, command: String) -> Result<RebalanceReport, BenchError> {
    let body = async {
        let l = load(args, command).await?;
        Ok(judge(l).await)
    };
    tokio::select! {
        r = body => r,
        sig = interrupted() => Err(BenchError::Failed(anyhow::anyhow!(
            "interrupted by {sig}: run stopped, any open fault undone, no report"
        ))),
    }
}

/// Resolves on SIGINT or SIGTERM with the signal's name; never if they cannot be watched.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// When the members had recovered from one fault (see [`FaultReport::end_to_all_resumed_s`]).
#[derive(Debug, Clone, Default)]
struct Recovery {
    /// Per room, the newest id acked when the fault ended.
    acked_by_end: Vec<u64>,
    recovered_ns: Option<u64>,
    /// The next fault started first: not measured.
    overtaken: bool,
}

/// Samples every ended fault's recovery from the members' live state.
fn watch_recoveries(
    recoveries: &mut Vec<Recovery>,
    records: &[FaultRecord],
    lives: &[Arc<Live>],
    args: &RebalanceArgs,
    now_ns: u64,
) {
    for (i, rec) in records.iter().enumerate() {
        let Some(end) = rec.restored_ns else { continue };
        if recoveries.len() <= i {
            recoveries.push(Recovery {
                acked_by_end: max_acked_by_room(lives, args),
                ..Default::default()
            });
        }
        let w = &mut recoveries[i];
        if w.recovered_ns.is_some() || w.overtaken {
            continue;
        }
        if records.get(i + 1).is_some() {
            w.overtaken = true;
            continue;
        }
        let all = lives.iter().enumerate().all(|(j, l)| {
            l.resumed.load(Relaxed)
                && l.oldest_pending_ns.load(Relaxed) > end
                && l.last_seen.load(Relaxed) >= w.acked_by_end[j / args.members]
        });
        if all {
            w.recovered_ns = Some(now_ns);
        }
    }
}

/// The owner lookups of `--bridged` may take this long, plus 10 ms per member.
const HOME_LOOKUP_BOUND: Duration = Duration::from_secs(30);

/// `--bridged`: where the members' connections live, as the router said at the start.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BridgedStats {
    pub members: u64,
    /// Members whose home room is owned by another node than their room: every frame of
    /// theirs in the room crosses Redis. All of them whenever the ring has two nodes or
    /// more (see `bridged::HOME_CANDIDATES`).
    pub bridged: u64,
    /// Nodes in the router's ring at the start.
    pub ring_size: u64,
    /// Owner lookups made to choose the home rooms, and the seconds they took.
    pub owner_lookups: u64,
    pub lookup_s: f64,
}

/// Chooses every member's home room (by member index) from the router's owner lookups.
async fn choose_homes(
    target: &Target,
    room_prefix: &str,
    rooms: usize,
    members: usize,
) -> anyhow::Result<(Vec<String>, BridgedStats)> {
    let started = Instant::now();
    let mut http = HttpClient::for_target(target);
    let mut stats = BridgedStats {
        members: (rooms * members) as u64,
        ..Default::default()
    };
    let mut homes = Vec::with_capacity(rooms * members);
    for r in 0..rooms {
        let room = format!("{room_prefix}-{r}");
        let shared = crate::cross_shard::lookup(&mut http, &room).await?;
        stats.owner_lookups += 1;
        stats.ring_size = stats.ring_size.max(shared.ring_size);
        for m in 0..members {
            let mut search = HomeSearch::new(&room, m, shared.owner.id, shared.ring_size);
            let home = loop {
                let candidate = search.candidate();
                let owner = crate::cross_shard::lookup(&mut http, &candidate).await?;
                stats.owner_lookups += 1;
                if let Some(home) = search.observe(owner.owner.id) {
                    break home;
                }
            };
            stats.bridged += u64::from(home.bridged);
            homes.push(home.room);
        }
    }
    stats.lookup_s = started.elapsed().as_secs_f64();
    Ok((homes, stats))
}

/// What the load phase hands the oracle: what every member saw, and what happened.
pub struct Load {
    args: RebalanceArgs,
    command: String,
    auth: Arc<Auth>,
    target: Arc<Target>,
    room_prefix: String,
    started_unix_ms: u64,
    base_start_ns: u64,
    finish_ns: u64,
    outcomes: Vec<MemberOutcome>,
    lost_tasks: u64,
    command_outcome: Option<CommandOutcome>,
    command_start_ns: Option<u64>,
    fault_records: Vec<FaultRecord>,
    recoveries: Vec<Recovery>,
    drained: bool,
    bench_cpu: Option<f64>,
    bridged: Option<BridgedStats>,
    notes: Vec<String>,
}

impl Load {
    /// Every acked send: `(room, user, cid, id)`.
    pub fn acks(&self) -> impl Iterator<Item = (String, &str, &str, u64)> + '_ {
        self.outcomes.iter().flat_map(move |o| {
            let room = format!("{}-{}", self.room_prefix, o.view.room);
            o.view
                .acked
                .iter()
                .map(move |(cid, id)| (room.clone(), o.view.user.as_str(), cid.as_str(), *id))
        })
    }
}

/// What a run settles before its first member connects.
struct Prepared {
    auth: Arc<Auth>,
    target: Arc<Target>,
    plan: Option<FaultPlan>,
    started_unix_ms: u64,
    room_prefix: String,
    notes: Vec<String>,
    /// `--bridged`: every member's home room, by member index.
    homes: Vec<String>,
    bridged: Option<BridgedStats>,
}

/// Checks the flags and the pid to pause, and chooses the home rooms (`--bridged`).
async fn prepare(args: &RebalanceArgs) -> Result<Prepared, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    let auth = Arc::new(harness::auth(&args.auth)?);
    let target = Arc::new(harness::target(&args.url).await?);
    let plan = args.fault_plan();
    if let Some(FaultAction::Pause { pid }) = plan.as_ref().map(|p| &p.action) {
        if *pid == std::process::id() {
            return Err(BenchError::Config(
                "--pause-pid is the bench's own process".into(),
            ));
        }
        faults::signal(*pid, "0")
            .map_err(|e| BenchError::Config(format!("--pause-pid {pid}: {e}")))?;
    }
    let started_unix_ms = harness::unix_ms();
    let room_prefix = args.room_prefix();
    let total = args.rooms * args.members;
    let mut notes = vec![report::current_load_note()];
    notes.extend(harness::raise_open_files(total, "connections asked for"));
    let (mut homes, mut bridged) = (Vec::new(), None);
    if args.bridged {
        let bound = HOME_LOOKUP_BOUND + Duration::from_millis(10 * total as u64);
        let (chosen, stats) = harness::within(
            bound,
            choose_homes(&target, &room_prefix, args.rooms, args.members),
        )
        .await
        .unwrap_or_else(|| Err(anyhow::anyhow!("not done within {bound:?}")))
        .map_err(|e| {
            BenchError::Failed(e.context("choosing the home rooms (--bridged; is --url a router?)"))
        })?;
        if !args.quiet {
            eprintln!(
                "[rebalance] --bridged: {} of {} members have their home room on another node                  (ring of {}; {} owner lookups in {:.2} s)",
                stats.bridged, stats.members, stats.ring_size, stats.owner_lookups, stats.lookup_s
            );
        }
        (homes, bridged) = (chosen, Some(stats));
    }
    Ok(Prepared {
        auth,
        target,
        plan,
        started_unix_ms,
        room_prefix,
        notes,
        homes,
        bridged,
    })
}

/// Starts every member's task; each keeps its live state where the coordinator polls it.
fn spawn_members(
    args: &RebalanceArgs,
    p: &Prepared,
    shared: &Arc<Shared>,
    finish: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> (Vec<Arc<Live>>, Vec<JoinHandle<MemberOutcome>>) {
    let total = args.rooms * args.members;
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let dead_after = (args.dead_after > 0.0).then(|| Duration::from_secs_f64(args.dead_after));
    let max_backoff = Duration::from_secs_f64(args.max_backoff);
    let mut lives = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for index in 0..total {
        let (room, member) = (index / args.members, index % args.members);
        let live = Arc::new(Live::default());
        lives.push(live.clone());
        let plan = MemberPlan {
            shared: shared.clone(),
            live,
            target: p.target.clone(),
            permits: permits.clone(),
            index,
            room,
            room_name: format!("{}-{room}", p.room_prefix),
            home: p.homes.get(index).cloned(),
            user: format!("{}-{room}-{member}", args.user_prefix),
            auth: p.auth.clone(),
            size: args.size,
            connect_timeout: Duration::from_secs_f64(args.connect_timeout),
            resend_after: Duration::from_secs_f64(args.resend_after),
            dead_after,
            max_backoff,
            finish: finish.clone(),
            stop: stop.clone(),
        };
        let join = args
            .bridged
            .then(|| SharedJoin::new(FIRST_BACKOFF, max_backoff, member_jitter(index)));
        tasks.push(tokio::spawn(Member::new(plan, join).run()));
    }
    (lives, tasks)
}

/// Waits until every member has joined once: members that cannot are a failed run (with
/// why, by reason).
async fn all_joined(
    args: &RebalanceArgs,
    shared: &Shared,
    tasks: Vec<JoinHandle<MemberOutcome>>,
    stop: &watch::Sender<bool>,
) -> Result<Vec<JoinHandle<MemberOutcome>>, BenchError> {
    let total = (args.rooms * args.members) as u64;
    let deadline = Instant::now()
        + Duration::from_secs_f64(args.connect_timeout * 2.0)
        + Duration::from_millis(20 * total);
    harness::wait_until(deadline, Duration::from_millis(20), || {
        shared.joined_once.load(Relaxed) >= total || tasks.iter().any(|t| t.is_finished())
    })
    .await;
    let joined = shared.joined_once.load(Relaxed);
    if joined >= total {
        return Ok(tasks);
    }
    let _ = stop.send(true);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        if let Some(Ok(o)) = harness::within(Duration::from_secs(2), t).await {
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
    Err(harness::failed(format!(
        "only {joined} of {total} members joined: {}",
        map_or_none(&reasons)
    )))
}

/// The cluster changes of a run: `--command` in its own task and the faults on their own
/// thread, so each fault's recovery is sampled from the members' live state while they run.
struct Changes {
    command: Option<JoinHandle<(u64, CommandOutcome)>>,
    faults: Option<FaultRunner>,
    recoveries: Vec<Recovery>,
}

impl Changes {
    fn start(
        args: &RebalanceArgs,
        shared: &Arc<Shared>,
        plan: Option<FaultPlan>,
        start: Instant,
    ) -> Result<Changes, BenchError> {
        let command = args.command.clone().map(|cmd| {
            let at = start + Duration::from_secs_f64(args.command_at);
            let timeout = Duration::from_secs_f64(args.command_timeout);
            let (shared, quiet) = (shared.clone(), args.quiet);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let start_ns = shared.now_ns();
                if !quiet {
                    eprintln!("[rebalance] running: {cmd}");
                }
                let mut out = tokio::task::spawn_blocking(move || run_command(&cmd, timeout))
                    .await
                    .unwrap_or_else(|e| CommandOutcome {
                        error: Some(format!("command task: {e}")),
                        ..Default::default()
                    });
                out.started_at_s = at.duration_since(start).as_secs_f64();
                if !quiet {
                    eprintln!(
                        "[rebalance] command ended: exit {:?}{} after {:.2} s",
                        out.exit_code,
                        if out.timed_out { " (timed out)" } else { "" },
                        out.duration_s
                    );
                }
                (start_ns, out)
            })
        });
        let faults = match plan {
            Some(p) => {
                if !args.quiet {
                    eprintln!(
                        "[rebalance] {} × {} of {:?} ({}) from {:?}",
                        p.repeat,
                        p.action.kind(),
                        p.length,
                        p.action.target(),
                        p.first_at
                    );
                }
                Some(
                    FaultRunner::start(p, shared.base, start)
                        .map_err(|e| harness::failed(format!("starting the fault thread: {e}")))?,
                )
            }
            None => None,
        };
        Ok(Changes {
            command,
            faults,
            recoveries: Vec::new(),
        })
    }

    fn sample(&mut self, shared: &Shared, lives: &[Arc<Live>], args: &RebalanceArgs) {
        if let Some(f) = &self.faults {
            let now = shared.now_ns();
            watch_recoveries(&mut self.recoveries, &f.records(), lives, args, now);
        }
    }

    /// The command and the last heal have ended (each is bounded by --command-timeout).
    fn done(&self) -> bool {
        self.command.as_ref().is_none_or(|t| t.is_finished())
            && self.faults.as_ref().is_none_or(|f| f.is_done())
    }

    /// What `--command` did, and when it started (ns since base).
    async fn command_outcome(
        &mut self,
        args: &RebalanceArgs,
    ) -> (Option<CommandOutcome>, Option<u64>) {
        let Some(task) = self.command.take() else {
            return (None, None);
        };
        match task.await {
            Ok((at, out)) => (Some(out), Some(at)),
            Err(e) => {
                let out = CommandOutcome {
                    command: args.command.clone().unwrap_or_default(),
                    error: Some(format!("command task: {e}")),
                    ..Default::default()
                };
                (Some(out), None)
            }
        }
    }
}

/// Per room, the newest id acked to any of its members.
fn max_acked_by_room(lives: &[Arc<Live>], args: &RebalanceArgs) -> Vec<u64> {
    let mut acked = vec![0u64; args.rooms];
    for (i, l) in lives.iter().enumerate() {
        let r = i / args.members;
        acked[r] = acked[r].max(l.max_acked.load(Relaxed));
    }
    acked
}

/// The load: members join, send on schedule through the command and the faults, and drain.
/// Every fault is undone before it returns (or when it is dropped). The steps:
/// `prepare`, `spawn_members`, `all_joined`, the sending window with its `Changes`,
/// the drain, and collecting the members' outcomes.
pub async fn load(args: RebalanceArgs, command: String) -> Result<Load, BenchError> {
    let p = prepare(&args).await?;
    let total = args.rooms * args.members;
    let shared = Arc::new(Shared::new(args.rate));
    let (finish_tx, finish_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (lives, tasks) = spawn_members(&args, &p, &shared, finish_rx, stop_rx);
    let progress = Progress::start(args.quiet, progress_line(shared.clone(), total));
    let tasks = all_joined(&args, &shared, tasks, &stop_tx).await?;

    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| u64::try_from(t.duration_since(shared.base).as_nanos()).unwrap_or(0);
    shared.end_ns.store(ns(end), Relaxed);
    shared.start_ns.store(ns(start), Relaxed);
    let cpu = CpuMeter::start();
    let mut changes = Changes::start(&args, &shared, p.plan, start)?;
    let mut tick = tokio::time::interval(WAKE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sending_ends = tokio::time::sleep_until(end.into());
    tokio::pin!(sending_ends);
    loop {
        tokio::select! {
            _ = &mut sending_ends => break,
            _ = tick.tick() => changes.sample(&shared, &lives, &args),
        }
    }
    let bench_cpu = cpu.percent();
    // A command that outlived the sending window, or a heal still running, is waited for
    // and gets the whole drain after it ends.
    while !changes.done() {
        tick.tick().await;
        changes.sample(&shared, &lives, &args);
    }
    let (command_outcome, command_start_ns) = changes.command_outcome(&args).await;

    // Drain: every member joined, caught up to its room's newest acked id, nothing pending.
    let drain_deadline = Instant::now().max(end) + Duration::from_secs_f64(args.drain);
    let drained = loop {
        changes.sample(&shared, &lives, &args);
        let max_acked = max_acked_by_room(&lives, &args);
        let done = lives.iter().enumerate().all(|(i, l)| {
            l.settled.load(Relaxed)
                && l.pending.load(Relaxed) == 0
                && l.last_seen.load(Relaxed) >= max_acked[i / args.members]
        });
        if done || Instant::now() >= drain_deadline {
            break done;
        }
        tick.tick().await;
    };
    // The drain's last state is the last chance for a fault's recovery to be seen.
    changes.sample(&shared, &lives, &args);
    let fault_records = changes
        .faults
        .take()
        .map(FaultRunner::finish)
        .unwrap_or_default();
    let finish_ns = shared.now_ns();
    shared.finishing.store(true, Relaxed);
    let _ = finish_tx.send(true);
    let (outcomes, lost_tasks) = harness::collect(tasks, CLOSE_GRACE, &stop_tx).await;
    drop(progress);
    Ok(Load {
        base_start_ns: ns(start),
        args,
        command,
        auth: p.auth,
        target: p.target,
        room_prefix: p.room_prefix,
        started_unix_ms: p.started_unix_ms,
        finish_ns,
        outcomes,
        lost_tasks,
        command_outcome,
        command_start_ns,
        fault_records,
        recoveries: changes.recoveries,
        drained,
        bench_cpu,
        bridged: p.bridged,
        notes: p.notes,
    })
}

/// The oracle's side: reads every room back (history API, and CQL when asked), judges what
/// the members saw against it, and writes the report. The steps: `read_back`, the
/// oracle's `account`, `Tally::of` for what members lived through, `fault_reports`,
/// `warnings`.
pub async fn judge(load: Load) -> RebalanceReport {
    let args = &load.args;
    let rooms: Vec<String> = (0..args.rooms)
        .map(|r| format!("{}-{r}", load.room_prefix))
        .collect();
    let (history, cql) = read_back(args, &load.auth, &load.target, &rooms).await;
    let views: Vec<MemberView> = load.outcomes.iter().map(|o| o.view.clone()).collect();
    let correctness = match &cql {
        Some(c) => account("cql", &c.rooms, &views),
        None => account("history", &history.rooms, &views),
    };
    let read_back = ReadBack {
        history_rows: history.rows(),
        history_pages: history.units,
        history_error: history.error.clone(),
        cql_rows: cql.as_ref().map(|c| c.rows()),
        cql_buckets: cql.as_ref().map(|c| c.units),
        cql_error: cql.as_ref().and_then(|c| c.error.clone()),
        disagreement: match &cql {
            Some(c) if c.error.is_none() && history.error.is_none() => {
                Some(compare(&history.rooms, &c.rooms))
            }
            _ => None,
        },
    };
    let tally = Tally::of(&load);
    let plan = args.fault_plan();
    let faults = fault_reports(&load, &tally.per_fault, plan.as_ref());
    let nproc = report::nproc();
    let bench_saturated = load
        .bench_cpu
        .is_some_and(|c| report::is_saturated(c, nproc));
    let mut r = RebalanceReport {
        run: RunFacts::new("rebalance", load.command.clone()),
        started_unix_ms: load.started_unix_ms,
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
            dead_after_s: args.dead_after,
            faults: plan.as_ref().map(|p| FaultConfig {
                kind: p.action.kind().into(),
                target: p.action.target(),
                first_at_s: p.first_at.as_secs_f64(),
                every_s: p.every.as_secs_f64(),
                repeat: p.repeat,
                length_s: p.length.as_secs_f64(),
            }),
            cql_nodes: args.cql_nodes.clone(),
            cql_keyspace: args.cql_keyspace.clone(),
            bridged: args.bridged,
            room_prefix: load.room_prefix.clone(),
            user_prefix: args.user_prefix.clone(),
        },
        external_command: load.command_outcome.clone(),
        faults,
        bridged: load.bridged.clone(),
        disruption: tally.disruption,
        sends: tally.sends,
        stream: tally.stream,
        correctness,
        read_back,
        drained: load.drained,
        bench_cpu_percent: load.bench_cpu,
        bench_saturated,
        warnings: Vec::new(),
        notes: load.notes.clone(),
        timeline: timeline(&load.outcomes, load.base_start_ns, load.finish_ns),
    };
    warnings(&mut r, &load, cql.is_some(), plan.as_ref());
    r.verdict = if r.pass() { "PASS" } else { "FAIL" }.into();
    r
}

/// Every room read back through the history API at `--url` and, with `--cql-nodes`, from
/// the CQL store; each within `--history-timeout`.
async fn read_back(
    args: &RebalanceArgs,
    auth: &Auth,
    target: &Target,
    rooms: &[String],
) -> (store::Reading, Option<store::Reading>) {
    let timeout = Duration::from_secs_f64(args.history_timeout);
    let mut http = HttpClient::for_target(target);
    let history = match auth.credentials(&format!("{}-reader", args.user_prefix)) {
        Ok(creds) => {
            let deadline = tokio::time::Instant::now() + timeout;
            store::read_history(&mut http, rooms, &creds, HISTORY_LIMIT, deadline).await
        }
        Err(e) => store::Reading {
            rooms: vec![Vec::new(); rooms.len()],
            error: Some(format!("signing a token: {e}")),
            ..Default::default()
        },
    };
    let cql = match &args.cql_keyspace {
        Some(ks) if !args.cql_nodes.is_empty() => {
            let deadline = tokio::time::Instant::now() + timeout;
            Some(store::read_cql(&args.cql_nodes, ks, rooms, deadline).await)
        }
        _ => None,
    };
    (history, cql)
}

/// What the members lived through, summed: disruptions, sends and streams, and per fault
/// `(clients cut off, disconnections, stalled reconnects)` in its window.
struct Tally {
    disruption: Disruption,
    sends: SendStats,
    stream: StreamStats,
    per_fault: Vec<(u64, u64, u64)>,
}

impl Tally {
    fn of(load: &Load) -> Tally {
        let records = &load.fault_records;
        let first_change_ns = load
            .command_start_ns
            .into_iter()
            .chain(records.first().map(|f| f.started_ns))
            .min();
        let changed = load.args.command.is_some() || !records.is_empty();
        let mut d = Disruption {
            all_resumed: true,
            ..Default::default()
        };
        let (mut resume, mut rejoin, mut ack_us) = (Vec::new(), Vec::new(), Vec::new());
        let (mut last_resumed, mut last_disconnect) = (0u64, 0u64);
        let mut sends = SendStats::default();
        let mut stream = StreamStats::default();
        let mut first_attempts = 0;
        // The fault whose window (its start until the next one's) holds `at`.
        let fault_of = |at: u64| records.iter().rposition(|f| f.started_ns <= at);
        let mut per_fault = vec![(0u64, 0u64, 0u64); records.len()];
        for o in &load.outcomes {
            d.clients_disconnected += u64::from(!o.episodes.is_empty());
            d.clients_stalled += u64::from(!o.stalled_ns.is_empty());
            d.stalled_reconnects += o.stalled_ns.len() as u64;
            d.sessions += o.sessions;
            let mut cut_by: HashSet<usize> = HashSet::new();
            for e in &o.episodes {
                d.disconnections += 1;
                if changed && first_change_ns.is_none_or(|c| e.at_ns < c) {
                    d.disconnections_before_command += 1;
                }
                if let Some(f) = fault_of(e.at_ns) {
                    per_fault[f].1 += 1;
                    cut_by.insert(f);
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
            for f in cut_by {
                per_fault[f].0 += 1;
            }
            for f in o.stalled_ns.iter().filter_map(|&at| fault_of(at)) {
                per_fault[f].2 += 1;
            }
            report::add_counts(&mut d.closes, &o.closes);
            report::add_counts(&mut d.refusals, &o.refusals);
            sends.sent += o.sent;
            sends.attempts += o.attempts;
            first_attempts += o.first_attempts;
            sends.acked += o.view.acked.len() as u64;
            sends.ack_duplicates += o.ack_duplicates;
            sends.ack_id_changed += o.ack_id_changed;
            sends.rejected += o.rejected;
            sends.unanswered += o.unanswered;
            report::add_counts(&mut sends.errors, &o.errors);
            ack_us.extend(o.acks.iter().map(|a| a.1));
            stream.received += o.view.received.len() as u64;
            stream.duplicates += o.duplicates;
            stream.out_of_order += o.out_of_order;
            stream.misrouted += o.misrouted;
        }
        sends.resends = sends.attempts.saturating_sub(first_attempts);
        sends.ack_latency_us = report::summary(ack_us);
        d.resume_us = report::summary(resume);
        d.rejoin_us = report::summary(rejoin);
        if let Some(c) = load.command_start_ns.filter(|_| d.disconnections > 0) {
            d.command_to_last_disconnect_s = Some(last_disconnect.saturating_sub(c) as f64 / 1e9);
            if d.all_resumed {
                d.command_to_all_resumed_s = Some(last_resumed.saturating_sub(c) as f64 / 1e9);
            }
        }
        Tally {
            disruption: d,
            sends,
            stream,
            per_fault,
        }
    }
}

/// Each injected fault, what it cost and how soon the members recovered from it.
fn fault_reports(
    load: &Load,
    per_fault: &[(u64, u64, u64)],
    plan: Option<&FaultPlan>,
) -> Vec<FaultReport> {
    let secs = |ns: u64| ns.saturating_sub(load.base_start_ns) as f64 / 1e9;
    load.fault_records
        .iter()
        .zip(per_fault)
        .enumerate()
        .map(
            |(i, (f, &(cut_off, disconnections, stalled)))| FaultReport {
                number: f.index + 1,
                kind: plan.map_or("", |p| p.action.kind()).into(),
                target: plan.map(|p| p.action.target()).unwrap_or_default(),
                started_at_s: secs(f.started_ns),
                ended_at_s: f.restored_ns.map(secs),
                early: f.early,
                clients_cut_off: cut_off,
                disconnections,
                stalled_reconnects: stalled,
                end_to_all_resumed_s: match (f.restored_ns, load.recoveries.get(i)) {
                    (Some(end), Some(r)) => {
                        r.recovered_ns.map(|t| t.saturating_sub(end) as f64 / 1e9)
                    }
                    _ => None,
                },
                inject_error: f.inject_error.clone(),
                restore_error: f.restore_error.clone(),
                cut: f.cut.clone(),
                heal: f.heal.clone(),
            },
        )
        .collect()
}

/// The report's warnings (and the notes that go with them), from its figures.
fn warnings(r: &mut RebalanceReport, load: &Load, cql_read: bool, plan: Option<&FaultPlan>) {
    let mut w = Vec::new();
    let k = &r.correctness;
    for (kind, n) in k.failures() {
        if n > 0 {
            w.push(format!("FAIL: {kind} = {n} (see the examples)"));
        }
    }
    if let Some(x) = r.read_back.disagreement.as_ref().filter(|x| x.any()) {
        w.push(format!(
            "the history API and the CQL store disagree: {} rows only in the history, {} \
             only in CQL, {} differing",
            x.history_only, x.cql_only, x.differing
        ));
    }
    if let Some(e) = r.read_back.history_error.as_ref().filter(|_| cql_read) {
        w.push(format!(
            "the history API could not be read (the run was judged by CQL): {e}"
        ));
    }
    let (s, d) = (&r.sends, &r.disruption);
    if r.stream.duplicates > 0 {
        w.push(format!(
            "members received {} duplicates",
            r.stream.duplicates
        ));
    }
    if s.unanswered > 0 {
        w.push(format!(
            "{} sends had no ack at the end of the drain",
            s.unanswered
        ));
    }
    if s.ack_id_changed > 0 {
        w.push(format!(
            "{} cids were acked under two different ids",
            s.ack_id_changed
        ));
    }
    if !d.all_resumed {
        w.push(format!(
            "{} disruptions had not resumed by the end of the drain",
            d.not_resumed
        ));
    }
    if d.disconnections_before_command > 0 {
        w.push(format!(
            "{} disconnections happened before the command or the first fault",
            d.disconnections_before_command
        ));
    }
    if r.external_command.as_ref().is_some_and(|c| !c.ok()) {
        w.push("the command failed or timed out (see its output tail)".into());
    }
    for f in &r.faults {
        if let Some(e) = &f.inject_error {
            w.push(format!("{} {}: injecting failed: {e}", f.kind, f.number));
        }
        if let Some(e) = &f.restore_error {
            w.push(format!("{} {}: undoing failed: {e}", f.kind, f.number));
        }
        if f.end_to_all_resumed_s.is_none() {
            w.push(format!(
                "{} {}: the members had not all resumed and caught up before the next fault \
                 or the end of the drain",
                f.kind, f.number
            ));
        }
    }
    if let Some(p) = plan.filter(|p| load.fault_records.len() < p.repeat as usize) {
        w.push(format!(
            "only {} of {} faults ran",
            load.fault_records.len(),
            p.repeat
        ));
    }
    let notes = &mut r.notes;
    if let Some(b) = &r.bridged {
        if b.bridged < b.members {
            let why = if b.ring_size <= 1 {
                "the ring had one node at the start"
            } else {
                "no candidate home room was owned by another node"
            };
            w.push(format!(
                "--bridged: only {} of {} members were bridged ({why})",
                b.bridged, b.members
            ));
        }
        notes.push(
            "--bridged: home rooms were chosen from the router's ring at the start; a ring \
             change during the run is not followed"
                .into(),
        );
    }
    if !r.drained {
        w.push(format!(
            "the drain ended after {} s with clients not settled or sends unanswered",
            load.args.drain
        ));
    }
    if r.bench_saturated {
        notes.push(format!(
            "load generator saturated: the bench used {:.0}% of one core on {} cores",
            r.bench_cpu_percent.unwrap_or_default(),
            r.run.nproc
        ));
    }
    if load.lost_tasks > 0 {
        notes.push(format!(
            "{} member tasks did not stop in time; their counts are missing",
            load.lost_tasks
        ));
    }
    if k.unreceived_tail > 0 {
        notes.push(format!(
            "{} stored messages came after the last message some member received (not \
             gaps: those members had not caught up when the run ended)",
            k.unreceived_tail
        ));
    }
    r.warnings = w;
}

/// The progress line: members connected, sends, acks, messages received, disruptions.
fn progress_line(shared: Arc<Shared>, total: usize) -> impl FnMut() -> String + Send {
    move || {
        format!(
            "[{:>7.1}s rebalance] connected {}/{total}  sent {}  acked {}  received {}  disruptions {}  stalled {}",
            shared.base.elapsed().as_secs_f64(),
            shared.connected.load(Relaxed),
            shared.sent.load(Relaxed),
            shared.acked.load(Relaxed),
            shared.received.load(Relaxed),
            shared.disconnects.load(Relaxed),
            shared.stalled.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::flags;
    use crate::harness::Outcome;
    fn args(extra: &[&str]) -> RebalanceArgs {
        crate::args::parse(extra)
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(args(&[]).validate(), Ok(()));
        assert_eq!(
            args(&flags("--command true --command-at 1")).validate(),
            Ok(())
        );
        assert!(args(&[]).room_prefix().starts_with("rebalance-"));
        assert_eq!(args(&[]).dead_after, 10.0);
        assert_eq!(args(&[]).fault_plan(), None);
        for ok in [
            flags("--pause-pid 123 --pause-secs 5"),
            flags("--pause-pid 123 --pause-secs 5 --fault-at 2 --fault-repeat 3 --fault-every 8"),
            flags("--cut-command down --heal-command up --cut-secs 3"),
            flags("--cql-nodes 127.0.0.1:9042,db:9042 --cql-keyspace chat"),
            vec!["--dead-after", "0"],
            vec!["--bridged"],
        ] {
            assert_eq!(args(&ok).validate(), Ok(()), "{ok:?}");
        }
        assert!(!args(&[]).bridged);
        // Home rooms are longer than the rooms: a prefix that fits only without them.
        let long = "p".repeat(118);
        assert_eq!(args(&["--room-prefix", &long]).validate(), Ok(()));
        let e = args(&["--room-prefix", &long, "--bridged"])
            .validate()
            .expect_err("home rooms too long");
        assert!(e.contains("--room-prefix"), "{e}");
        // The first fault defaults to --command-at; repeats follow --fault-every.
        let p = args(&flags("--pause-pid 123 --pause-secs 5 --command-at 4"))
            .fault_plan()
            .expect("plan");
        assert_eq!(p.action, FaultAction::Pause { pid: 123 });
        assert_eq!((p.first_at, p.repeat), (Duration::from_secs(4), 1));
        assert_eq!(p.length, Duration::from_secs(5));
        let p = args(&flags("--cut-command down --heal-command up --cut-secs 2 --fault-at 1 --fault-repeat 3 --fault-every 9"))
        .fault_plan()
        .expect("plan");
        assert_eq!(p.action.kind(), "cut");
        assert_eq!(p.end(), Duration::from_secs(21));
        assert_eq!(
            args(&flags("--cql-nodes a:1,b:2 --cql-keyspace k")).cql_nodes,
            ["a:1", "b:2"]
        );
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        for (flags, needle) in [
            (vec!["--rooms", "0"], "--rooms"),
            (vec!["--members", "0"], "--members"),
            (flags("--rooms 1000 --members 100"), "--rooms"),
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
                flags("--command true --command-at 40 --duration 30"),
                "--command-at",
            ),
            (vec!["--user-prefix", "a b"], "--user-prefix"),
            (vec!["--room-prefix", "r/1"], "--room-prefix"),
            (vec!["--dead-after=-1"], "--dead-after"),
            (vec!["--pause-pid", "12"], "--pause-secs"),
            (vec!["--pause-secs", "3"], "--pause-pid"),
            (flags("--pause-pid 0 --pause-secs 3"), "--pause-pid"),
            (flags("--pause-pid 12 --pause-secs 0"), "--pause-secs"),
            (
                flags(
                    "--pause-pid 12 --pause-secs 3 --cut-command x --heal-command y --cut-secs 3",
                ),
                "--pause-pid and --cut-command",
            ),
            (flags("--cut-command x --cut-secs 3"), "--heal-command"),
            (flags("--heal-command y --cut-secs 3"), "--cut-command"),
            (flags("--cut-command x --heal-command y"), "--cut-secs"),
            (
                vec![
                    "--cut-command",
                    " ",
                    "--heal-command",
                    "y",
                    "--cut-secs",
                    "1",
                ],
                "--cut-command",
            ),
            (vec!["--fault-at", "3"], "--fault-at"),
            (vec!["--fault-repeat", "2"], "--fault-repeat"),
            (vec!["--fault-every", "2"], "--fault-every"),
            (
                flags("--pause-pid 12 --pause-secs 3 --fault-repeat 0"),
                "--fault-repeat",
            ),
            (
                flags("--pause-pid 12 --pause-secs 3 --fault-repeat 2"),
                "--fault-every",
            ),
            (
                flags("--pause-pid 12 --pause-secs 3 --fault-repeat 2 --fault-every 3"),
                "--fault-every",
            ),
            (
                flags("--pause-pid 12 --pause-secs 3 --fault-at=-1"),
                "--fault-at",
            ),
            // 10 + 2 × 8 + 5 = 31 s > 30 s of sending.
            (
                flags("--pause-pid 12 --pause-secs 5 --fault-repeat 3 --fault-every 8"),
                "--duration",
            ),
            (
                flags("--pause-pid 12 --pause-secs 25 --fault-at 6"),
                "--duration",
            ),
            (vec!["--cql-nodes", "127.0.0.1:9042"], "--cql-keyspace"),
            (vec!["--cql-keyspace", "chat"], "--cql-nodes"),
            (
                flags("--cql-nodes 127.0.0.1 --cql-keyspace chat"),
                "--cql-nodes",
            ),
            (
                flags("--cql-nodes 127.0.0.1:9042 --cql-keyspace chat-x"),
                "--cql-keyspace",
            ),
        ] {
            let e = args(&flags).validate().expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
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
        let plan = MemberPlan {
            shared: Arc::new(Shared::new(1.0)),
            live: Arc::new(Live::default()),
            target: Arc::new(Target::resolve("ws://127.0.0.1:9").await.expect("target")),
            permits: Arc::new(Semaphore::new(1)),
            index,
            room: 0,
            room_name: "r-0".into(),
            home: None,
            user: "u".into(),
            auth: Arc::new(Auth::Dev),
            size: 8,
            connect_timeout: Duration::from_secs(1),
            resend_after: Duration::from_secs(5),
            dead_after: Some(Duration::from_secs(10)),
            max_backoff: Duration::from_secs(1),
            finish,
            stop,
        };
        Member::new(plan, None)
    }

    /// [`test_member`] with `--bridged`: home room `r-0-home-0`.
    async fn bridged_member(index: usize) -> Member {
        let mut m = test_member(index).await;
        m.p.home = Some("r-0-home-0".into());
        m.join = Some(SharedJoin::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            1.0,
        ));
        m
    }

    fn pend(m: &mut Member, seq: u64) {
        m.pending.insert(
            seq,
            Pending {
                created_ns: 1,
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
        assert_eq!(
            m.out.view.received,
            [101, 102, 103],
            "each once, in arrival order"
        );
        // The same cid acked under another id is flagged.
        m.on_frame(&f(
            r#"{"type":"ack","room":"r-0","cid":"m7-0","id":"999","duplicate":true}"#,
        ));
        assert_eq!((m.out.ack_id_changed, m.out.ack_duplicates), (1, 1));
    }

    /// `--bridged`: sessions connect with the home room and join the room over the socket
    /// (with `since` once joined before); the home room's frames are ignored, a refusal of
    /// its join reconnects; the room's join refused with a retry-later code goes out again
    /// after a backoff on the same session, one that says reconnect drops the session.
    #[tokio::test]
    async fn a_bridged_member_rejoins_its_room_over_the_socket() {
        let mut m = bridged_member(7).await;
        let f = |s: &str| m_frame(s);
        assert_eq!(m.query("user=u"), "room=r-0-home-0&user=u");
        let join = |m: &Member| -> serde_json::Value {
            serde_json::from_slice(&m.join_frame()).expect("json")
        };
        assert_eq!(join(&m), serde_json::json!({"type": "join", "room": "r-0"}));
        assert!(m.join.as_ref().is_some_and(|j| j.due(Instant::now())));
        m.join.as_mut().expect("bridged").sent(Instant::now());
        // The home room's joined, presence and messages change nothing.
        for frame in [
            r#"{"type":"joined","room":"r-0-home-0"}"#,
            r#"{"type":"presence","room":"r-0-home-0","user":"x","event":"join"}"#,
            r#"{"type":"message","room":"r-0-home-0","id":"5","from":"x","cid":"c","body":"b","ts":1}"#,
        ] {
            assert!(m.on_frame(&f(frame)).is_none(), "{frame}");
        }
        assert!(!m.joined && m.out.view.received.is_empty());
        assert_eq!(m.out.misrouted, 0, "the home room is not another room");
        // The room's join refused while Redis is away: joined again later, same session.
        assert!(m
            .on_frame(&f(
                r#"{"type":"error","code":"node_unavailable","message":"x","room":"r-0"}"#
            ))
            .is_none());
        let j = m.join.as_ref().expect("bridged");
        assert!(matches!(j.state(), bridged::JoinState::RetryAt(_)));
        assert_eq!(
            m.out.refusals.get("join refused: node_unavailable"),
            Some(&1)
        );
        assert!(
            m.out.episodes.is_empty(),
            "not an episode before the first join"
        );
        m.join.as_mut().expect("bridged").sent(Instant::now());
        m.on_frame(&f(r#"{"type":"joined","room":"r-0","head":"100"}"#));
        assert!(m.joined && m.out.view.join_point == Some(100));
        assert_eq!(
            m.join.as_ref().map(|j| j.state()),
            Some(bridged::JoinState::Joined)
        );
        m.on_frame(&f(
            r#"{"type":"message","room":"r-0","id":"101","from":"u","cid":"m7-0","body":"x","ts":1}"#,
        ));
        // A reconnect: the home room again, and the room's join carries `since`.
        assert_eq!(m.query("user=u"), "room=r-0-home-0&user=u");
        assert_eq!(
            join(&m),
            serde_json::json!({"type": "join", "room": "r-0", "since": "101"})
        );
        // A replay that failed: no longer in the room, an episode, joined again later.
        pend(&mut m, 0);
        assert!(m
            .on_frame(&f(
                r#"{"type":"error","code":"store_unavailable","message":"x","room":"r-0"}"#
            ))
            .is_none());
        assert!(!m.joined && m.out.episodes.len() == 1);
        m.on_frame(&f(r#"{"type":"joined","room":"r-0","head":"101"}"#));
        assert!(m.joined && m.out.episodes[0].resumed_ns.is_some());
        assert!(
            m.pending[&0].last_sent.is_none(),
            "unacked sends go out again"
        );
        // room_moved for the room, or any refusal of the home room: reconnect.
        for frame in [
            r#"{"type":"error","code":"room_moved","message":"x","room":"r-0","owner":"a:1"}"#,
            r#"{"type":"error","code":"room_unavailable","message":"x","room":"r-0-home-0"}"#,
            r#"{"type":"error","code":"room_moved","message":"x","room":"r-0-home-0"}"#,
        ] {
            assert!(m.on_frame(&f(frame)).is_some(), "{frame}");
        }
        // A send's own error is the send's business, as without --bridged.
        m.on_frame(&f(
            r#"{"type":"error","code":"room_unavailable","message":"x","cid":"m7-0","room":"r-0"}"#,
        ));
        assert!(m.pending[&0].retry_at.is_some() && m.out.rejected == 0);
        // Without --bridged the query carries the room and `since`.
        let mut plain = test_member(1).await;
        assert_eq!(plain.query("user=u"), "room=r-0&user=u");
        plain.on_frame(&f(r#"{"type":"joined","room":"r-0","head":"9"}"#));
        assert_eq!(plain.query("user=u"), "room=r-0&user=u&since=9");
    }

    #[test]
    fn every_store_failure_and_an_unread_store_fail_the_run() {
        let mut r = RebalanceReport::default();
        r.sends.unanswered = 1;
        r.stream.duplicates = 2;
        r.read_back.disagreement = Some(Disagreement {
            cql_only: 1,
            ..Default::default()
        });
        assert!(r.pass(), "warnings do not fail a run");
        let mut u = r.clone();
        u.correctness.unknown_ids = 3;
        assert!(
            u.pass(),
            "ids delivered but never stored are reported, not failed"
        );
        for set in [
            |c: &mut Correctness| c.acked_lost = 1,
            |c: &mut Correctness| c.stored_twice = 1,
            |c: &mut Correctness| c.gaps = 1,
            |c: &mut Correctness| c.out_of_order = 1,
        ] {
            let mut x = r.clone();
            set(&mut x.correctness);
            assert!(!x.pass(), "{:?}", x.correctness);
            assert!(x.failure_line().starts_with("rebalance FAIL: "));
        }
        // Judged by the history API: its failure fails the run, a CQL error is not read.
        let mut h = r.clone();
        h.read_back.history_error = Some("HTTP 500".into());
        assert!(!h.pass());
        h.correctness.judged_by = "history".into();
        assert!(h
            .failure_line()
            .contains("the store (history) could not be read: HTTP 500"));
        // Judged by CQL: its failure fails the run; the history's only warns.
        let mut q = r.clone();
        q.config.cql_nodes = vec!["127.0.0.1:9042".into()];
        q.read_back.history_error = Some("HTTP 500".into());
        assert!(q.pass());
        q.read_back.cql_error = Some("timed out".into());
        assert!(!q.pass());
        q.verdict = "FAIL".into();
        q.correctness.judged_by = "cql".into();
        q.correctness.stored_twice = 3;
        q.bridged = Some(BridgedStats {
            members: 6,
            bridged: 6,
            ring_size: 3,
            owner_lookups: 11,
            lookup_s: 0.05,
        });
        let md = q.to_markdown();
        assert!(md.contains("rebalance: FAIL") && md.contains("could not be read:** timed out"));
        assert!(
            md.contains("Bridged: 6 of 6 members connect through a home room"),
            "{md}"
        );
        assert!(md.contains("Judged by the CQL store"));
        let json: serde_json::Value = serde_json::from_str(&q.to_json()).expect("json");
        assert_eq!(json["correctness"]["stored_twice"], 3);
        assert_eq!(json["correctness"]["judged_by"], "cql");
        assert_eq!(json["read_back"]["cql_error"], "timed out");
        assert_eq!(json["read_back"]["disagreement"]["cql_only"], 1);
        assert_eq!(json["sends"]["unanswered"], 1);
        assert_eq!(json["bridged"]["bridged"], 6);
        assert_eq!(json["bridged"]["ring_size"], 3);
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
        assert_eq!(svg.matches("<polyline").count(), 8);
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

    /// A socket is dead once sends written on it have waited --dead-after with no frame;
    /// any frame restarts the wait, and with nothing waiting silence is fine.
    #[tokio::test]
    async fn a_silent_socket_with_sends_waiting_is_dead_after_the_limit() {
        let mut m = test_member(3).await;
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!m.stalled(at(100)), "nothing written, nothing waits");
        // A send written at t0 on this session.
        pend(&mut m, 0);
        m.silent_since = Some(t0);
        assert!(!m.stalled(at(9)));
        assert!(m.stalled(at(10)));
        // A frame at 8 s (say another member's message): the wait starts again.
        m.heard(at(8));
        assert!(!m.stalled(at(17)) && m.stalled(at(18)));
        // Its ack: nothing waits, so silence is not death.
        m.pending.clear();
        m.heard(at(9));
        assert_eq!(m.silent_since, None);
        assert!(!m.stalled(at(60)));
        // Sends created while not joined (never written) do not count either.
        m.pending.insert(
            1,
            Pending {
                created_ns: 1,
                first_sent_ns: None,
                last_sent: None,
                retry_at: None,
            },
        );
        m.heard(at(9));
        assert!(!m.stalled(at(60)));
        // Disabled with --dead-after 0.
        pend(&mut m, 2);
        m.silent_since = Some(t0);
        m.p.dead_after = None;
        assert!(!m.stalled(at(1000)));
        m.p.dead_after = Some(Duration::from_secs(10));
        assert!(m.stalled(at(1000)));
        assert_eq!(m.stalled_label(), "stalled (no frame in 10 s)");
    }

    #[test]
    fn a_fault_counts_as_recovered_once_every_member_is_back_and_caught_up() {
        // Two rooms of one member each.
        let lives: Vec<Arc<Live>> = (0..2).map(|_| Arc::new(Live::default())).collect();
        let set = |l: &Live, resumed: bool, oldest: u64, seen: u64, acked: u64| {
            l.resumed.store(resumed, Relaxed);
            l.oldest_pending_ns.store(oldest, Relaxed);
            l.last_seen.store(seen, Relaxed);
            l.max_acked.store(acked, Relaxed);
        };
        set(&lives[0], true, u64::MAX, 50, 50);
        set(&lives[1], false, 900, 10, 70);
        let ended = FaultRecord {
            started_ns: 100,
            restored_ns: Some(1_000),
            ..Default::default()
        };
        let mut w = Vec::new();
        let two_rooms = args(&flags("--rooms 2 --members 1"));
        let sample = |w: &mut Vec<Recovery>, now: u64, records: &[FaultRecord]| {
            watch_recoveries(w, records, &lives, &two_rooms, now);
        };
        // Still open: nothing to watch.
        sample(&mut w, 500, &[FaultRecord::default()]);
        assert!(w.is_empty());
        sample(&mut w, 1_050, std::slice::from_ref(&ended));
        assert_eq!(
            w[0].acked_by_end,
            [50, 70],
            "the acks given by the fault's end"
        );
        assert_eq!(w[0].recovered_ns, None);
        // Back, but a send made during the fault is unanswered and 70 not yet seen.
        set(&lives[1], true, 900, 69, 80);
        sample(&mut w, 1_100, std::slice::from_ref(&ended));
        assert_eq!(w[0].recovered_ns, None);
        // Caught up to 70; its oldest send is one made after the end.
        set(&lives[1], true, 1_200, 70, 80);
        sample(&mut w, 1_300, std::slice::from_ref(&ended));
        assert_eq!(w[0].recovered_ns, Some(1_300));
        sample(&mut w, 1_400, std::slice::from_ref(&ended));
        assert_eq!(w[0].recovered_ns, Some(1_300), "kept");
        // A fault overtaken by the next one before recovery is not measured.
        let mut w = Vec::new();
        set(&lives[1], false, 900, 10, 80);
        let next = FaultRecord {
            index: 1,
            started_ns: 2_000,
            ..Default::default()
        };
        sample(&mut w, 2_100, &[ended.clone(), next]);
        assert!(w[0].overtaken && w[0].recovered_ns.is_none());
    }

    #[test]
    fn each_fault_is_a_span_on_the_chart_and_a_row_of_the_report() {
        let r = RebalanceReport {
            config: RebalanceConfig {
                duration_s: 30.0,
                faults: Some(FaultConfig {
                    kind: "pause".into(),
                    target: "pid 42".into(),
                    first_at_s: 5.0,
                    every_s: 10.0,
                    repeat: 2,
                    length_s: 3.0,
                }),
                ..Default::default()
            },
            faults: vec![
                FaultReport {
                    number: 1,
                    kind: "pause".into(),
                    started_at_s: 5.0,
                    ended_at_s: Some(8.0),
                    clients_cut_off: 4,
                    stalled_reconnects: 4,
                    end_to_all_resumed_s: Some(1.5),
                    ..Default::default()
                },
                FaultReport {
                    number: 2,
                    kind: "pause".into(),
                    started_at_s: 15.0,
                    ended_at_s: None,
                    restore_error: Some("kill -CONT 42: no such process".into()),
                    ..Default::default()
                },
            ],
            timeline: vec![RebalancePoint::default(); 3],
            ..Default::default()
        };
        let svg = r.chart();
        assert!(svg.contains("pause 1") && svg.contains("pause 2"), "{svg}");
        assert_eq!(
            svg.matches(r##"fill="#ffd54f""##).count(),
            6,
            "two bands per panel"
        );
        let md = r.to_markdown();
        assert!(
            md.contains("Faults: 2 × pause of 3 s (pid 42), from 5 s, every 10 s"),
            "{md}"
        );
        assert!(
            md.contains("| pause 1 | 5.00 s | 8.00 s | 4 | 0 | 4 | 1.50 s | none |"),
            "{md}"
        );
        assert!(md.contains("undo: kill -CONT 42: no such process"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["faults"][0]["end_to_all_resumed_s"], 1.5);
        assert_eq!(json["faults"][1]["ended_at_s"], serde_json::Value::Null);
        assert_eq!(json["config"]["faults"]["repeat"], 2);
    }

    #[test]
    fn cids_round_trip_and_codes_classify() {
        assert!(tries_again("room_moved") && tries_again("rate_limited"));
        assert!(tries_again("room_unavailable"));
        assert!(!tries_again("bad_json") && !tries_again("not_joined"));
        assert!(permanent_refusal("HTTP 401") && permanent_refusal("HTTP 410 Gone"));
        assert!(!permanent_refusal("HTTP 503") && !permanent_refusal("connect timed out"));
        assert_eq!(body(10, 3, 7), "rb 3 7 xxx");
        assert_eq!(body(3, 3, 7).len(), 3);
    }
}
