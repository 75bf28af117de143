//! The `fanout` scenario: `rooms × members` connections, every member sending at a paced
//! rate into its room, every member receiving everything its room carries.
//!
//! It owns the run's timeline (connect, warmup, measured window, drain, close), one reader
//! and one writer task per connection, the live progress line, and the assembly of the
//! final [`Report`]. Readers and writers keep their counts locally or in shared atomics and
//! batch latency samples into sharded histograms, so the bench adds little per message.
//! Every phase has a deadline; every task ends by itself or at the hard stop; the only
//! addresses it connects to are the `--url` target and the per-connection targets its
//! caller names ([`run_grouped`], e.g. `cross-shard --direct`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{interval_at, sleep_until, MissedTickBehavior};

use crate::args::seconds;
use crate::auth::{Auth, AuthArgs};
use crate::chart::{latency_panel, Chart, Panel, Series};
use crate::client::{self, ControlRx, Incoming, Reader, Target, WsWrite};
use crate::cluster_cost::{ClusterCost, ClusterCostArgs, ClusterSample, Probe};
use crate::harness::{self, flag, CpuMeter, Progress, RunFacts};
use crate::metrics_scrape::{self, ServerSample};
use crate::payload::{
    decode_body, parse_cid, FrameView, OwnedView, SendFrameEncoder, BODY_HEADER_LEN, MAX_SENDER,
};
use crate::report::{
    self, close_label, new_histogram, LatencySummary, Report, RunConfig, SeqOutcome, SeqTracker,
    TimelinePoint, MAX_TRACKED_SEQ,
};
use crate::BenchError;

/// Options of `chat-bench fanout`. `Default` is for scenarios that run a fanout of their
/// own (it is not the command line's defaults: they name every field that matters).
#[derive(Debug, Clone, Default, Args)]
pub struct FanoutArgs {
    /// WebSocket URL of a node or router (the path defaults to /ws).
    #[arg(long, env = "CHAT_BENCH_URL", default_value = "ws://127.0.0.1:7001")]
    pub url: String,
    /// Number of rooms.
    #[arg(long, env = "CHAT_BENCH_ROOMS", default_value_t = 10)]
    pub rooms: usize,
    /// Members per room; each is its own connection, sender and receiver.
    #[arg(long, env = "CHAT_BENCH_MEMBERS", default_value_t = 10)]
    pub members: usize,
    /// Messages per second each member sends, evenly paced.
    #[arg(long, env = "CHAT_BENCH_RATE", default_value_t = 1.0)]
    pub rate: f64,
    /// Body size in bytes; at least 39 (the header receivers decode).
    #[arg(long, env = "CHAT_BENCH_SIZE", default_value_t = 128)]
    pub size: usize,
    /// Measured seconds of sending, after the warmup.
    #[arg(long, env = "CHAT_BENCH_DURATION", default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds of sending before measuring starts.
    #[arg(long, env = "CHAT_BENCH_WARMUP", default_value_t = 5.0)]
    pub warmup: f64,
    /// Longest wait, in seconds, for outstanding deliveries and acks after sending stops.
    #[arg(long, env = "CHAT_BENCH_DRAIN", default_value_t = 2.0)]
    pub drain: f64,
    /// Users are named `<prefix>-<room index>-<member index>`.
    #[arg(long, env = "CHAT_BENCH_USER_PREFIX", default_value = "bench")]
    pub user_prefix: String,
    /// Rooms are named `<prefix>-<room index>`; defaults to `bench-<unix seconds>` so each
    /// run starts with empty rooms.
    #[arg(long, env = "CHAT_BENCH_ROOM_PREFIX")]
    pub room_prefix: Option<String>,
    /// Connection attempts (TCP + upgrade + join) in flight at once.
    #[arg(long, env = "CHAT_BENCH_CONNECT_CONCURRENCY", default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Connect each member to a room of its own (`<room>-home-<member>`) and join the bench
    /// room over the socket: against a cluster, members whose home room lands on another
    /// node than the bench room are bridged through Redis (cross-shard).
    #[arg(long, env = "CHAT_BENCH_BRIDGE")]
    pub bridge: bool,
    /// Seconds one connection may take to connect and be joined.
    #[arg(long, env = "CHAT_BENCH_CONNECT_TIMEOUT", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Connections that may fail before the run is abandoned (exit status 1).
    #[arg(long, env = "CHAT_BENCH_MAX_CONNECT_FAILURES", default_value_t = 0)]
    pub max_connect_failures: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "CHAT_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long, env = "CHAT_BENCH_MARKDOWN")]
    pub markdown: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long, env = "CHAT_BENCH_QUIET")]
    pub quiet: bool,
    /// Write the per-second timeline (e2e p50/p99/max, sends/s and deliveries/s) as an SVG
    /// chart to this file. The JSON report carries the same numbers as `timeline`.
    #[arg(long, env = "CHAT_BENCH_CHART")]
    pub chart: Option<PathBuf>,
    /// Be the nodes' webhook endpoint at this address (start them with `--webhook-url
    /// http://ADDR/hook`): reports distinct deliveries per second of the window and their
    /// lag from the message's timestamp, and waits up to --drain more for them to arrive.
    #[arg(long, env = "CHAT_BENCH_WEBHOOK_SINK")]
    pub webhook_sink: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// What the run costs the whole cluster (Redis, the nodes' bus, server CPU); reported
    /// with --bridge or when any of these is given.
    #[command(flatten)]
    pub cost: ClusterCostArgs,
}

const MAX_CONNECTIONS: usize = 200_000;
const MAX_RATE: f64 = 10_000.0;
const MAX_SIZE: usize = 16 << 20;
/// A send that leaves later than this after its scheduled time is counted as late.
const LATE_THRESHOLD: Duration = Duration::from_millis(5);
/// Gaps one receiver remembers (see `SeqTracker`).
const MAX_GAPS_PER_RECEIVER: usize = 4096;
/// Latency samples a reader buffers before taking a histogram lock.
const LAT_BATCH: usize = 256;
const LAT_FLUSH_NS: u64 = 250_000_000;
const HIST_SHARDS: usize = 16;
/// After the bench sends its close frames, how long servers get to answer them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Delay between the last join and the first send, so every writer is scheduled in time.
const START_DELAY: Duration = Duration::from_millis(200);

impl FanoutArgs {
    pub fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "bench")
    }

    /// Checks every limit; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.rooms == 0 || self.members == 0 {
            return Err("--rooms and --members must be at least 1".into());
        }
        let conns = self.rooms.saturating_mul(self.members);
        if conns > MAX_CONNECTIONS || conns as u64 > MAX_SENDER {
            return Err(format!(
                "--rooms × --members is {conns}; at most {MAX_CONNECTIONS} connections"
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(format!(
                "--rate must be in (0, {MAX_RATE}] messages per second"
            ));
        }
        if !(BODY_HEADER_LEN..=MAX_SIZE).contains(&self.size) {
            return Err(format!(
                "--size must be between {BODY_HEADER_LEN} and {MAX_SIZE} bytes"
            ));
        }
        seconds("duration", self.duration, true)?;
        seconds("warmup", self.warmup, false)?;
        seconds("drain", self.drain, false)?;
        seconds("connect-timeout", self.connect_timeout, true)?;
        if self.rate * (self.warmup + self.duration) + 1.0 >= MAX_TRACKED_SEQ as f64 {
            return Err("--rate × (--warmup + --duration) is too large".into());
        }
        if !(1..=10_000).contains(&self.connect_concurrency) {
            return Err("--connect-concurrency must be between 1 and 10000".into());
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
        Auth::from_args(&self.auth)?;
        self.cost.validate()?;
        Ok(())
    }

    /// Whether the report carries the cluster's cost.
    fn wants_cost(&self) -> bool {
        self.bridge || self.cost.requested()
    }
}

/// `ts` (ns since base) falls in the measured window `[start, end)`. Senders and receivers
/// apply the same rule to the same timestamp, so expected and delivered counts agree.
fn in_window(ts: u64, start: u64, end: u64) -> bool {
    ts >= start && ts < end
}

fn ns_since(base: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// State every task of the run shares.
struct Shared {
    base: Instant,
    members: usize,
    /// Window bounds in ns since `base`; `u64::MAX` until the coordinator sets them.
    measure_start_ns: AtomicU64,
    send_end_ns: AtomicU64,
    /// Set when the bench starts closing: closes after this are ours, not the server's.
    finishing: AtomicBool,
    // Live counters for the progress line (all phases).
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    closes: AtomicU64,
    open: AtomicU64,
    // Measured-window counters; also decide when the drain is complete.
    sent_measured: AtomicU64,
    expected_measured: AtomicU64,
    delivered_measured: AtomicU64,
    answered_measured: AtomicU64,
    writers_done: AtomicU64,
    sends_late: AtomicU64,
    sends_skipped: AtomicU64,
    send_failures: AtomicU64,
    e2e: Vec<Mutex<Histogram<u64>>>,
    ack: Vec<Mutex<Histogram<u64>>>,
    /// e2e samples since the last progress line.
    live: Mutex<Histogram<u64>>,
    /// e2e samples since the last timeline point.
    interval: Mutex<Histogram<u64>>,
    /// Per-group accounting when the caller asked for it ([`run_grouped`]).
    groups: Option<GroupState>,
}

/// Connection groups a caller wants reported separately (e.g. `cross-shard`: members local
/// to the room's owner vs bridged): `of[i]` is the group of connection `i` (`room ×
/// members + member`), an index into `names`.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    pub names: Vec<String>,
    pub of: Vec<usize>,
}

/// One group's share of a run: deliveries expected by and made to its members, and their
/// end-to-end latency.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GroupResult {
    pub name: String,
    pub members: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub e2e_latency_us: LatencySummary,
}

/// Group counters. The e2e histogram is locked per delivery: groups are for runs sized to
/// study a cluster's paths, not for the largest fan-outs.
struct GroupState {
    names: Vec<String>,
    of: Vec<usize>,
    e2e: Vec<Mutex<Histogram<u64>>>,
    expected: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
}

impl GroupState {
    fn new(g: Groups) -> GroupState {
        let each = |f: fn() -> _| g.names.iter().map(|_| f()).collect();
        GroupState {
            e2e: g
                .names
                .iter()
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
            expected: each(|| AtomicU64::new(0)),
            delivered: each(|| AtomicU64::new(0)),
            names: g.names,
            of: g.of,
        }
    }

    /// Each group's share, with `sizes[k]` joined members in group `k`.
    fn results(&self, sizes: &[u64]) -> Vec<GroupResult> {
        self.names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let expected = self.expected[k].load(Relaxed);
                let delivered = self.delivered[k].load(Relaxed);
                GroupResult {
                    name: name.clone(),
                    members: sizes.get(k).copied().unwrap_or(0),
                    expected_deliveries: expected,
                    delivered,
                    lost: expected.saturating_sub(delivered),
                    e2e_latency_us: self.e2e[k]
                        .lock()
                        .map(|h| LatencySummary::from_histogram(&h))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

impl Shared {
    fn new(members: usize) -> Self {
        let shards = || {
            (0..HIST_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect()
        };
        Shared {
            base: Instant::now(),
            members,
            measure_start_ns: AtomicU64::new(u64::MAX),
            send_end_ns: AtomicU64::new(u64::MAX),
            finishing: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            open: AtomicU64::new(0),
            sent_measured: AtomicU64::new(0),
            expected_measured: AtomicU64::new(0),
            delivered_measured: AtomicU64::new(0),
            answered_measured: AtomicU64::new(0),
            writers_done: AtomicU64::new(0),
            sends_late: AtomicU64::new(0),
            sends_skipped: AtomicU64::new(0),
            send_failures: AtomicU64::new(0),
            e2e: shards(),
            ack: shards(),
            live: Mutex::new(new_histogram()),
            interval: Mutex::new(new_histogram()),
            groups: None,
        }
    }

    fn now_ns(&self) -> u64 {
        ns_since(self.base, Instant::now())
    }

    fn window(&self) -> (u64, u64) {
        (
            self.measure_start_ns.load(Relaxed),
            self.send_end_ns.load(Relaxed),
        )
    }
}

fn merged(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut out = new_histogram();
    for s in shards {
        if let Ok(h) = s.lock() {
            // Same bounds everywhere; saturating values were clamped when recorded.
            let _ = out.add(&*h);
        }
    }
    out
}

/// Send times of one sender's recent messages, so its reader can time their acks.
struct AckRing {
    mask: u64,
    /// `seq + 1` of the message in each slot (0 = empty).
    seqs: Box<[AtomicU64]>,
    sent_ns: Box<[AtomicU64]>,
    /// Sequence numbers sent inside the measured window: `first..=last`.
    first_measured: AtomicU64,
    last_measured: AtomicU64,
}

impl AckRing {
    /// Holds about eight seconds of sends (64 to 4096 slots).
    fn new(rate: f64) -> Self {
        let slots = ((rate * 8.0) as usize).clamp(64, 4096).next_power_of_two();
        let zeros = || (0..slots).map(|_| AtomicU64::new(0)).collect();
        AckRing {
            mask: slots as u64 - 1,
            seqs: zeros(),
            sent_ns: zeros(),
            first_measured: AtomicU64::new(u64::MAX),
            last_measured: AtomicU64::new(0),
        }
    }

    fn slot(&self, seq: u64) -> usize {
        (seq & self.mask) as usize
    }

    fn record(&self, seq: u64, sent_ns: u64) {
        let i = self.slot(seq);
        self.sent_ns[i].store(sent_ns, Relaxed);
        self.seqs[i].store(seq + 1, Release);
    }

    fn sent_at(&self, seq: u64) -> Option<u64> {
        let i = self.slot(seq);
        if self.seqs[i].load(Acquire) != seq + 1 {
            return None;
        }
        let t = self.sent_ns[i].load(Relaxed);
        // Re-check: the slot may have been reused while we read it.
        (self.seqs[i].load(Acquire) == seq + 1).then_some(t)
    }

    fn mark_measured(&self, seq: u64) {
        if self.first_measured.load(Relaxed) == u64::MAX {
            self.first_measured.store(seq, Relaxed);
        }
        self.last_measured.store(seq, Release);
    }

    fn is_measured(&self, seq: u64) -> bool {
        let last = self.last_measured.load(Acquire);
        let first = self.first_measured.load(Relaxed);
        first != u64::MAX && seq >= first && seq <= last
    }
}

/// What one reader counted; merged into the report at the end.
#[derive(Debug, Default)]
struct ReaderStats {
    delivered: u64,
    duplicated: u64,
    out_of_order: u64,
    unclassified: u64,
    misrouted: u64,
    undecodable: u64,
    id_regressions: u64,
    acks: u64,
    ack_duplicates: u64,
    rejected: u64,
    gap_overflow: u64,
    errors: BTreeMap<String, u64>,
    close: Option<String>,
}

/// Latency samples waiting to be recorded under a histogram lock.
struct LatBatch {
    e2e: Vec<u64>,
    ack: Vec<u64>,
    last_flush_ns: u64,
}

impl LatBatch {
    fn flush(&mut self, shared: &Shared, shard: usize) {
        if !self.e2e.is_empty() {
            if let Ok(mut h) = shared.e2e[shard].lock() {
                for &v in &self.e2e {
                    h.saturating_record(v);
                }
            }
            if let Ok(mut h) = shared.live.lock() {
                for &v in &self.e2e {
                    h.saturating_record(v);
                }
            }
            if let Ok(mut h) = shared.interval.lock() {
                for &v in &self.e2e {
                    h.saturating_record(v);
                }
            }
            self.e2e.clear();
        }
        if !self.ack.is_empty() {
            if let Ok(mut h) = shared.ack[shard].lock() {
                for &v in &self.ack {
                    h.saturating_record(v);
                }
            }
            self.ack.clear();
        }
    }
}

struct ReaderTask {
    shared: Arc<Shared>,
    ring: Arc<AckRing>,
    room: usize,
    room_name: Arc<str>,
    me: u32,
    shard: usize,
    tracker: SeqTracker,
    last_id: u64,
    lat: LatBatch,
    stats: ReaderStats,
    joined: Option<oneshot::Sender<Result<(), String>>>,
    /// Counted in `Shared::open` (joined and not yet ended).
    open: bool,
}

impl ReaderTask {
    async fn run(
        mut self,
        mut reader: Reader,
        mut hard_stop: watch::Receiver<bool>,
    ) -> ReaderStats {
        loop {
            let incoming = tokio::select! {
                biased;
                r = reader.next() => r,
                _ = flag(&mut hard_stop) => break,
            };
            let finishing = self.shared.finishing.load(Relaxed);
            match incoming {
                Ok(Incoming::Data(bytes)) => {
                    self.on_frame(&bytes);
                }
                Ok(Incoming::Fragment) => self.stats.undecodable += 1,
                Ok(Incoming::Other) => {}
                Ok(Incoming::Close(code)) => {
                    self.ended(close_label(code), finishing);
                    break;
                }
                Err(e) => {
                    let label = close_label(1006);
                    if let Some(tx) = self.joined.take() {
                        let _ = tx.send(Err(format!("connection failed before joined: {e}")));
                    }
                    self.ended(label, finishing);
                    break;
                }
            }
        }
        if self.open {
            self.shared.open.fetch_sub(1, Relaxed);
        }
        self.lat.flush(&self.shared, self.shard);
        self.stats.gap_overflow = self.tracker.overflowed;
        self.stats
    }

    fn ended(&mut self, label: String, finishing: bool) {
        if let Some(tx) = self.joined.take() {
            let _ = tx.send(Err(format!("closed before joined: {label}")));
        }
        if !finishing {
            self.shared.closes.fetch_add(1, Relaxed);
            self.stats.close = Some(label);
        }
    }

    fn on_frame(&mut self, bytes: &[u8]) {
        let now_ns = self.shared.now_ns();
        match FrameView::parse(bytes) {
            Some(v) => self.on_view(&v, now_ns),
            None => match OwnedView::parse(bytes) {
                Some(o) => self.on_view(&o.as_view(), now_ns),
                None => self.stats.undecodable += 1,
            },
        }
        if self.lat.e2e.len() >= LAT_BATCH
            || self.lat.ack.len() >= LAT_BATCH
            || now_ns.saturating_sub(self.lat.last_flush_ns) >= LAT_FLUSH_NS
        {
            self.lat.flush(&self.shared, self.shard);
            self.lat.last_flush_ns = now_ns;
        }
    }

    fn on_view(&mut self, v: &FrameView<'_>, now_ns: u64) {
        match v.kind {
            "message" => self.on_message(v, now_ns),
            "ack" => self.on_ack(v, now_ns),
            "error" => self.on_error(v),
            "joined" if v.room == Some(&*self.room_name) => {
                if let Some(tx) = self.joined.take() {
                    let _ = tx.send(Ok(()));
                    self.open = true;
                    self.shared.open.fetch_add(1, Relaxed);
                }
            }
            // Presence and leave notices are expected and carry nothing to measure.
            _ => {}
        }
    }

    fn on_message(&mut self, v: &FrameView<'_>, now_ns: u64) {
        let Some(h) = v.body.and_then(|b| decode_body(b.as_bytes())) else {
            self.stats.undecodable += 1;
            return;
        };
        let members = self.shared.members;
        let first = self.room * members;
        let sender = h.sender as usize;
        if v.room != Some(&*self.room_name) || !(first..first + members).contains(&sender) {
            self.stats.misrouted += 1;
            return;
        }
        self.shared.received.fetch_add(1, Relaxed);
        let outcome = self.tracker.observe(sender - first, h.seq);
        let (start, end) = self.shared.window();
        if !in_window(h.sent_ns, start, end) {
            return;
        }
        if let Some(id) = v.id.and_then(|s| s.parse::<u64>().ok()) {
            if id <= self.last_id {
                self.stats.id_regressions += 1;
            }
            self.last_id = self.last_id.max(id);
        }
        match outcome {
            SeqOutcome::Duplicate => {
                self.stats.duplicated += 1;
                return;
            }
            SeqOutcome::Late => self.stats.out_of_order += 1,
            SeqOutcome::Unknown => self.stats.unclassified += 1,
            SeqOutcome::InOrder => {}
        }
        self.stats.delivered += 1;
        self.shared.delivered_measured.fetch_add(1, Relaxed);
        let e2e_us = now_ns.saturating_sub(h.sent_ns) / 1_000;
        if let Some(g) = &self.shared.groups {
            if let Some(&k) = g.of.get(self.me as usize) {
                g.delivered[k].fetch_add(1, Relaxed);
                if let Ok(mut hist) = g.e2e[k].lock() {
                    hist.saturating_record(e2e_us);
                }
            }
        }
        self.lat.e2e.push(e2e_us);
    }

    fn on_ack(&mut self, v: &FrameView<'_>, now_ns: u64) {
        let Some(seq) = v.cid.and_then(|c| parse_cid(c, self.me)) else {
            // An ack for a cid this connection never sent.
            self.stats.misrouted += 1;
            return;
        };
        if !self.ring.is_measured(seq) {
            return;
        }
        self.stats.acks += 1;
        if v.duplicate {
            self.stats.ack_duplicates += 1;
        }
        self.shared.answered_measured.fetch_add(1, Relaxed);
        if let Some(sent) = self.ring.sent_at(seq) {
            self.lat.ack.push(now_ns.saturating_sub(sent) / 1_000);
        }
    }

    fn on_error(&mut self, v: &FrameView<'_>) {
        let code = v.code.unwrap_or("unknown");
        self.shared.errors.fetch_add(1, Relaxed);
        match self.stats.errors.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                self.stats.errors.insert(code.to_owned(), 1);
            }
        }
        if let Some(seq) = v.cid.and_then(|c| parse_cid(c, self.me)) {
            if self.ring.is_measured(seq) {
                self.stats.rejected += 1;
                self.shared.answered_measured.fetch_add(1, Relaxed);
            }
        } else if let Some(tx) = self.joined.take() {
            let _ = tx.send(Err(format!("error before joined: {code}")));
        }
    }
}

/// The schedule and identity of one writer.
struct WriterPlan {
    shared: Arc<Shared>,
    ring: Arc<AckRing>,
    room_name: Arc<str>,
    me: u32,
    size: usize,
    first_tick: Instant,
    period: Duration,
    measure_start: Instant,
    send_end: Instant,
    /// Joined members of this room: deliveries each measured send should produce.
    room_members: u64,
    /// The same, per group (empty without groups).
    group_members: Vec<u64>,
}

/// Sends on schedule until `send_end`, forwarding owed control frames all along; then keeps
/// answering pings until `finish`, closes with 1000, and ends. Counts go to `Shared`.
async fn write_loop(
    plan: WriterPlan,
    mut ws: WsWrite,
    mut control: ControlRx,
    mut finish: watch::Receiver<bool>,
    mut hard_stop: watch::Receiver<bool>,
) {
    let shared = &plan.shared;
    let (start_ns, end_ns) = shared.window();
    let mut enc = SendFrameEncoder::new(&plan.room_name, plan.me, plan.size);
    let mut ticker = interval_at(plan.first_tick.into(), plan.period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let period_ns = plan.period.as_nanos().max(1);
    let mut prev: Option<Instant> = None;
    let mut seq: u64 = 0;
    let mut alive = true;
    loop {
        tokio::select! {
            biased;
            c = control.recv() => match c {
                Some(f) => {
                    if ws.write_frame(f).await.is_err() {
                        alive = false;
                        break;
                    }
                }
                // The reader ended: the connection is gone.
                None => {
                    alive = false;
                    break;
                }
            },
            sched = ticker.tick() => {
                let sched = sched.into_std();
                if sched >= plan.send_end {
                    break;
                }
                let now = Instant::now();
                let counts = sched >= plan.measure_start;
                if let Some(p) = prev {
                    let missed = (sched.saturating_duration_since(p).as_nanos() / period_ns)
                        .saturating_sub(1);
                    if counts && missed > 0 {
                        shared.sends_skipped.fetch_add(missed as u64, Relaxed);
                    }
                }
                prev = Some(sched);
                if counts && now.saturating_duration_since(sched) > LATE_THRESHOLD {
                    shared.sends_late.fetch_add(1, Relaxed);
                }
                let sent_ns = ns_since(shared.base, now);
                let measured = in_window(sent_ns, start_ns, end_ns);
                if measured {
                    plan.ring.mark_measured(seq);
                }
                plan.ring.record(seq, sent_ns);
                if client::send_text(&mut ws, enc.encode(seq, sent_ns)).await.is_err() {
                    shared.send_failures.fetch_add(1, Relaxed);
                    alive = false;
                    break;
                }
                seq += 1;
                shared.sent.fetch_add(1, Relaxed);
                if measured {
                    shared.sent_measured.fetch_add(1, Relaxed);
                    shared.expected_measured.fetch_add(plan.room_members, Relaxed);
                    if let Some(g) = &shared.groups {
                        for (k, n) in plan.group_members.iter().enumerate() {
                            g.expected[k].fetch_add(*n, Relaxed);
                        }
                    }
                }
            }
        }
    }
    shared.writers_done.fetch_add(1, Relaxed);
    if !alive {
        return;
    }
    let finished = client::forward_control(&mut ws, &mut control, async {
        tokio::select! {
            _ = flag(&mut finish) => true,
            _ = flag(&mut hard_stop) => false,
        }
    });
    if finished.await == Some(true) {
        let _ = client::send_close(&mut ws, 1000, "bench done").await;
    }
}

/// A joined connection waiting for the start.
struct Ready {
    index: usize,
    /// Microseconds from the start of the connect to `joined`.
    connect_us: u64,
    room: usize,
    ws: WsWrite,
    control: ControlRx,
    ring: Arc<AckRing>,
    reader: JoinHandle<ReaderStats>,
}

struct ConnectPlan {
    shared: Arc<Shared>,
    target: Arc<Target>,
    /// Where each connection goes instead of `target` (indexed like [`Groups::of`]).
    targets: Option<Vec<Arc<Target>>>,
    room_names: Arc<Vec<Arc<str>>>,
    user_prefix: Arc<str>,
    auth: Arc<Auth>,
    rate: f64,
    bridge: bool,
    timeout: Duration,
    hard_stop: watch::Receiver<bool>,
    abandon: Arc<AtomicBool>,
}

async fn connect_one(plan: Arc<ConnectPlan>, index: usize) -> Result<Ready, String> {
    let members = plan.shared.members;
    let (room, member) = (index / members, index % members);
    if plan.abandon.load(Relaxed) {
        return Err("not attempted: too many failures".into());
    }
    let room_name = plan.room_names[room].clone();
    let user = format!("{}-{room}-{member}", plan.user_prefix);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let home = format!("{room_name}-home-{member}");
    let query_room: &str = if plan.bridge { &home } else { &room_name };
    let opts = client::ConnectOptions {
        credentials: plan.auth.credentials(&user)?,
        ..Default::default()
    };
    let target = match &plan.targets {
        Some(t) => t.get(index).ok_or("no target for this connection")?,
        None => &plan.target,
    };
    let (rd, mut ws) = client::connect_as(target, query_room, &opts, plan.timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    if plan.bridge {
        // The reader signals `joined` only for the bench room, so this join is what the
        // connect waits for.
        let mut join = serde_json::to_vec(&common::ClientFrame::Join {
            room: common::RoomId::new(room_name.to_string()).map_err(|e| e.to_string())?,
            since: None,
        })
        .map_err(|e| e.to_string())?;
        client::send_text(&mut ws, &mut join)
            .await
            .map_err(|e| format!("join {room_name}: {e}"))?;
    }
    let (reader, control) = client::reader(rd);
    let ring = Arc::new(AckRing::new(plan.rate));
    let (joined_tx, joined_rx) = oneshot::channel();
    let task = ReaderTask {
        shared: plan.shared.clone(),
        ring: ring.clone(),
        room,
        room_name,
        me: index as u32,
        shard: index % HIST_SHARDS,
        tracker: SeqTracker::new(members, MAX_GAPS_PER_RECEIVER),
        last_id: 0,
        lat: LatBatch {
            e2e: Vec::with_capacity(LAT_BATCH),
            ack: Vec::with_capacity(LAT_BATCH),
            last_flush_ns: 0,
        },
        stats: ReaderStats::default(),
        joined: Some(joined_tx),
        open: false,
    };
    let reader = tokio::spawn(task.run(reader, plan.hard_stop.clone()));
    let outcome = match tokio::time::timeout_at(deadline, joined_rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(reason))) => Err(reason),
        Ok(Err(_)) => Err("reader ended before joined".to_owned()),
        Err(_) => Err("no joined frame before the connect timeout".to_owned()),
    };
    match outcome {
        Ok(()) => Ok(Ready {
            index,
            connect_us: started.elapsed().as_micros() as u64,
            room,
            ws,
            control,
            ring,
            reader,
        }),
        Err(e) => {
            reader.abort();
            Err(e)
        }
    }
}

/// The progress line: phase, send and delivery rates, live p99, errors, closes, open
/// connections.
fn progress_line(shared: Arc<Shared>, total: usize) -> impl FnMut() -> String + Send {
    let (mut last_sent, mut last_recv, mut last_at) = (0u64, 0u64, Instant::now());
    move || {
        let now = Instant::now();
        let dt = now.duration_since(last_at).as_secs_f64().max(1e-3);
        last_at = now;
        let sent = shared.sent.load(Relaxed);
        let recv = shared.received.load(Relaxed);
        let p99 = match shared.live.lock() {
            Ok(mut h) => {
                let v = (!h.is_empty()).then(|| h.value_at_quantile(0.99));
                h.reset();
                v
            }
            Err(_) => None,
        };
        let (start, end) = shared.window();
        let t = ns_since(shared.base, now);
        let phase = if start == u64::MAX {
            "connect"
        } else if t < start {
            "warmup"
        } else if t < end {
            "measure"
        } else {
            "drain"
        };
        let line = format!(
            "[{:>7.1}s {phase:<7}] sent {:>8.0}/s  delivered {:>9.0}/s  p99 {:>9}  errors {}  closes {}  open {}/{total}",
            t as f64 / 1e9,
            (sent - last_sent) as f64 / dt,
            (recv - last_recv) as f64 / dt,
            p99.map_or_else(|| "-".to_owned(), |us| format!("{:.3} ms", us as f64 / 1000.0)),
            shared.errors.load(Relaxed),
            shared.closes.load(Relaxed),
            shared.open.load(Relaxed),
        );
        (last_sent, last_recv) = (sent, recv);
        line
    }
}

/// Runs the scenario and writes the report. Losses are results, not failures; only bad
/// arguments and too many connect failures are errors.
pub async fn run(args: FanoutArgs, command: String) -> Result<Report, BenchError> {
    run_grouped(args, command, None, None).await.map(|(r, _)| r)
}

/// [`run`], with deliveries and e2e latency also reported per group of connections, and
/// with `targets`, connection `i` (`room × members + member`) opened to `targets[i]`
/// instead of `--url` (which still serves the owner lookups and the server metrics).
///
/// The steps: `Setup::prepare`, `connect_all`, `start_sending`, `measure`,
/// `drain`, `close`, `assemble`.
pub async fn run_grouped(
    args: FanoutArgs,
    command: String,
    groups: Option<Groups>,
    targets: Option<Vec<Arc<Target>>>,
) -> Result<(Report, Vec<GroupResult>), BenchError> {
    let total = args.rooms * args.members;
    if let Some(t) = targets.as_ref().filter(|t| t.len() != total) {
        return Err(harness::failed(format!(
            "{} connection targets for {total} connections",
            t.len()
        )));
    }
    let setup = Setup::prepare(&args, targets.is_some()).await?;
    let mut shared = Shared::new(args.members);
    shared.groups = groups.map(GroupState::new);
    let shared = Arc::new(shared);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (finish_tx, finish_rx) = watch::channel(false);
    let progress = Progress::start(args.quiet, progress_line(shared.clone(), total));
    let plan = Arc::new(ConnectPlan {
        shared: shared.clone(),
        target: setup.target.clone(),
        targets,
        room_names: Arc::new(
            (0..args.rooms)
                .map(|r| Arc::from(format!("{}-{r}", setup.room_prefix)))
                .collect(),
        ),
        user_prefix: Arc::from(args.user_prefix.as_str()),
        auth: Arc::new(harness::auth(&args.auth)?),
        rate: args.rate,
        bridge: args.bridge,
        timeout: Duration::from_secs_f64(args.connect_timeout),
        hard_stop: stop_rx.clone(),
        abandon: Arc::new(AtomicBool::new(false)),
    });
    let connected = connect_all(&args, &plan, &stop_tx).await?;
    let running = start_sending(&args, &plan, connected.ready, finish_rx, stop_rx);
    if let Some(sink) = &setup.sink {
        sink.set_window(running.measure_start, running.send_end);
    }
    let mut window = measure(&setup, &running).await;
    window.drained = drain(&args, &shared, &setup, &running).await;
    let closed = close(&shared, running, &finish_tx, &stop_tx).await;
    drop(progress);
    Ok(assemble(
        &args,
        command,
        setup,
        &shared,
        connected.outcome,
        window,
        closed,
    ))
}

/// What a run settles before its first connection.
struct Setup {
    started_unix_ms: u64,
    load_average: Option<String>,
    room_prefix: String,
    target: Arc<Target>,
    /// Which nodes, Redis and processes the cost accounting samples: settled before any
    /// connection, so its owner lookups stay out of the measured window.
    probe: Option<Probe>,
    sink: Option<crate::webhook_sink::Sink>,
    fd_note: Option<String>,
    direct: bool,
}

impl Setup {
    async fn prepare(args: &FanoutArgs, direct: bool) -> Result<Setup, BenchError> {
        args.validate().map_err(BenchError::Config)?;
        let load_average = report::load_average();
        let sink = match args.webhook_sink {
            Some(addr) => Some(
                crate::webhook_sink::Sink::start(addr)
                    .await
                    .map_err(|e| BenchError::Config(format!("--webhook-sink {addr}: {e}")))?,
            ),
            None => None,
        };
        let target = Arc::new(harness::target(&args.url).await?);
        let probe = match args.wants_cost() {
            true => Some(
                Probe::prepare(&args.cost, &target)
                    .await
                    .map_err(BenchError::Config)?,
            ),
            false => None,
        };
        let fd_note = harness::raise_open_files(args.rooms * args.members, "connections asked for");
        if let Some(n) = &fd_note {
            eprintln!("chat-bench: {n}");
        }
        Ok(Setup {
            started_unix_ms: harness::unix_ms(),
            load_average,
            room_prefix: args.room_prefix(),
            target,
            probe,
            sink,
            fd_note,
            direct,
        })
    }
}

/// The connect phase's outcome, as the report carries it.
struct ConnectOutcome {
    attempted: u64,
    failed: u64,
    failures: BTreeMap<String, u64>,
    phase_s: f64,
    latency: Histogram<u64>,
}

struct Connected {
    ready: Vec<Ready>,
    outcome: ConnectOutcome,
}

/// Connects and joins every member, bounded in concurrency and time; more failures than
/// `--max-connect-failures` abandon the run.
async fn connect_all(
    args: &FanoutArgs,
    plan: &Arc<ConnectPlan>,
    stop: &watch::Sender<bool>,
) -> Result<Connected, BenchError> {
    let total = args.rooms * args.members;
    let permits = Arc::new(Semaphore::new(args.connect_concurrency));
    let started = Instant::now();
    let mut connects = JoinSet::new();
    for index in 0..total {
        let (plan, permits) = (plan.clone(), permits.clone());
        connects.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| "connect limiter closed".to_owned())?;
            connect_one(plan, index).await
        });
    }
    let mut ready = Vec::with_capacity(total);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed = 0u64;
    while let Some(res) = connects.join_next().await {
        let reason = match res {
            Ok(Ok(r)) => {
                ready.push(r);
                continue;
            }
            Ok(Err(reason)) => reason,
            Err(e) => format!("connect task: {e}"),
        };
        failed += 1;
        *failures.entry(reason).or_default() += 1;
        if failed > args.max_connect_failures {
            plan.abandon.store(true, Relaxed);
        }
    }
    let phase_s = started.elapsed().as_secs_f64();
    if failed > args.max_connect_failures {
        plan.shared.finishing.store(true, Relaxed);
        for r in &mut ready {
            let _ = client::send_close(&mut r.ws, 1000, "bench abandoned").await;
            r.reader.abort();
        }
        let _ = stop.send(true);
        let reasons = failures
            .iter()
            .map(|(k, v)| format!("{v}× {k}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(harness::failed(format!(
            "{failed} of {total} connections failed (allowed: {}): {reasons}",
            args.max_connect_failures
        )));
    }
    let mut latency = new_histogram();
    for r in &ready {
        let _ = latency.record(r.connect_us.max(1));
    }
    ready.sort_by_key(|r| r.index);
    Ok(Connected {
        ready,
        outcome: ConnectOutcome {
            attempted: total as u64,
            failed,
            failures,
            phase_s,
            latency,
        },
    })
}

/// The writers and readers at work, and the schedule they follow.
struct Running {
    measure_start: Instant,
    send_end: Instant,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<ReaderStats>>,
    timeline: JoinHandle<Vec<TimelinePoint>>,
    timeline_stop: watch::Sender<bool>,
    /// Joined members per group.
    group_sizes: Vec<u64>,
}

/// Starts every joined member's writer. Each starts at its own phase within the first
/// period, so sends are spread evenly instead of arriving in bursts.
fn start_sending(
    args: &FanoutArgs,
    plan: &ConnectPlan,
    ready: Vec<Ready>,
    finish: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> Running {
    let shared = &plan.shared;
    let groups = shared.groups.as_ref().map_or(0, |g| g.expected.len());
    let mut per_room = vec![0u64; args.rooms];
    let mut group_members = vec![vec![0u64; groups]; args.rooms];
    let mut group_sizes = vec![0u64; groups];
    for r in &ready {
        per_room[r.room] += 1;
        if let Some(&k) = shared.groups.as_ref().and_then(|g| g.of.get(r.index)) {
            group_members[r.room][k] += 1;
            group_sizes[k] += 1;
        }
    }
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let start = Instant::now() + START_DELAY;
    let measure_start = start + Duration::from_secs_f64(args.warmup);
    let send_end = measure_start + Duration::from_secs_f64(args.duration);
    let ns = |t: Instant| ns_since(shared.base, t);
    shared.measure_start_ns.store(ns(measure_start), Relaxed);
    shared.send_end_ns.store(ns(send_end), Relaxed);
    let (timeline_stop, timeline_rx) = watch::channel(false);
    let timeline = tokio::spawn(timeline(
        shared.clone(),
        start,
        (measure_start, send_end),
        timeline_rx,
    ));
    let n = ready.len();
    let mut writers = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for (k, r) in ready.into_iter().enumerate() {
        let offset = period.mul_f64(k as f64 / n.max(1) as f64);
        let writer = WriterPlan {
            shared: shared.clone(),
            ring: r.ring,
            room_name: plan.room_names[r.room].clone(),
            me: r.index as u32,
            size: args.size,
            first_tick: start + offset,
            period,
            measure_start,
            send_end,
            room_members: per_room[r.room],
            group_members: group_members[r.room].clone(),
        };
        let (finish, stop) = (finish.clone(), stop.clone());
        writers.push(tokio::spawn(write_loop(
            writer, r.ws, r.control, finish, stop,
        )));
        readers.push(r.reader);
    }
    Running {
        measure_start,
        send_end,
        writers,
        readers,
        timeline,
        timeline_stop,
        group_sizes,
    }
}

/// What the measured window cost, sampled at its edges: the bench's CPU, the server's
/// metrics and the cluster's cost; and whether the drain after it ended complete.
struct Window {
    bench_cpu: Option<f64>,
    drained: bool,
    server: [(ServerSample, Option<String>); 2],
    server_wall_s: f64,
    cluster: [Option<ClusterSample>; 2],
}

async fn measure(setup: &Setup, running: &Running) -> Window {
    let sample = || async {
        tokio::join!(
            metrics_scrape::sample(&setup.target, SCRAPE_TIMEOUT),
            cluster_sample(setup.probe.as_ref())
        )
    };
    sleep_until(running.measure_start.into()).await;
    let cpu = CpuMeter::start();
    let (srv0, cluster0) = sample().await;
    let s0 = Instant::now();
    sleep_until(running.send_end.into()).await;
    let bench_cpu = cpu.percent();
    let (srv1, cluster1) = sample().await;
    Window {
        bench_cpu,
        drained: false,
        server: [srv0, srv1],
        server_wall_s: s0.elapsed().as_secs_f64(),
        cluster: [cluster0, cluster1],
    }
}

/// Waits until everything expected arrived and every send was answered, or `--drain`
/// passed; then for webhooks, which trail the acks, until they stop arriving (up to
/// `--drain` again). True when the first wait ended complete.
async fn drain(args: &FanoutArgs, shared: &Shared, setup: &Setup, running: &Running) -> bool {
    let writers = running.writers.len() as u64;
    let deadline = running.send_end + Duration::from_secs_f64(args.drain);
    let drained = harness::wait_until(deadline, Duration::from_millis(20), || {
        shared.writers_done.load(Relaxed) == writers
            && shared.delivered_measured.load(Relaxed) >= shared.expected_measured.load(Relaxed)
            && shared.answered_measured.load(Relaxed) >= shared.sent_measured.load(Relaxed)
    })
    .await;
    if let Some(sink) = &setup.sink {
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain);
        let mut last = (sink.unique(), Instant::now());
        while Instant::now() < deadline && last.1.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = sink.unique();
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
    }
    drained
}

/// What the readers handed back at the close.
struct Closed {
    readers: Vec<ReaderStats>,
    lost_tasks: u64,
    timeline: Vec<TimelinePoint>,
    writers: u64,
    group_sizes: Vec<u64>,
}

/// Asks every writer to send 1000, gives servers [`CLOSE_GRACE`] to answer, then stops the
/// rest. A writer still running is stuck on a full socket; its counts are in `shared`.
async fn close(
    shared: &Shared,
    running: Running,
    finish: &watch::Sender<bool>,
    stop: &watch::Sender<bool>,
) -> Closed {
    let _ = running.timeline_stop.send(true);
    let timeline = harness::within(Duration::from_secs(2), running.timeline)
        .await
        .and_then(Result::ok)
        .unwrap_or_default();
    shared.finishing.store(true, Relaxed);
    let _ = finish.send(true);
    let writers = running.writers.len() as u64;
    let (readers, lost_tasks) = harness::collect(running.readers, CLOSE_GRACE, stop).await;
    for mut h in running.writers {
        if harness::within(Duration::from_millis(100), &mut h)
            .await
            .is_none()
        {
            h.abort();
        }
    }
    Closed {
        readers,
        lost_tasks,
        timeline,
        writers,
        group_sizes: running.group_sizes,
    }
}

/// The report from what every step recorded.
fn assemble(
    args: &FanoutArgs,
    command: String,
    setup: Setup,
    shared: &Shared,
    connects: ConnectOutcome,
    window: Window,
    closed: Closed,
) -> (Report, Vec<GroupResult>) {
    let mut r = Report {
        run: RunFacts::new("fanout", command),
        started_unix_ms: setup.started_unix_ms,
        load_average: setup.load_average,
        timeline: closed.timeline,
        config: RunConfig {
            url: args.url.clone(),
            rooms: args.rooms,
            members: args.members,
            rate_per_member: args.rate,
            body_bytes: args.size,
            warmup_s: args.warmup,
            duration_s: args.duration,
            drain_s: args.drain,
            room_prefix: setup.room_prefix,
            user_prefix: args.user_prefix.clone(),
            connect_concurrency: args.connect_concurrency,
            bridge: args.bridge,
            direct: setup.direct,
        },
        ..Default::default()
    };
    let c = &mut r.connections;
    c.attempted = connects.attempted;
    c.joined = closed.writers;
    c.failed = connects.failed;
    c.failures = connects.failures;
    c.connect_phase_s = connects.phase_s;
    c.connects_per_second = if connects.phase_s > 0.0 {
        c.joined as f64 / connects.phase_s
    } else {
        0.0
    };
    let m = &mut r.messages;
    m.target_sends = (closed.writers as f64 * args.rate * args.duration).round() as u64;
    m.sent = shared.sent_measured.load(Relaxed);
    m.sends_late = shared.sends_late.load(Relaxed);
    m.late_threshold_ms = LATE_THRESHOLD.as_secs_f64() * 1000.0;
    m.sends_skipped = shared.sends_skipped.load(Relaxed);
    m.send_failures = shared.send_failures.load(Relaxed);
    m.expected_deliveries = shared.expected_measured.load(Relaxed);
    let mut gap_overflow = 0;
    for s in &closed.readers {
        m.delivered += s.delivered;
        m.duplicated += s.duplicated;
        m.out_of_order += s.out_of_order;
        m.unclassified += s.unclassified;
        m.misrouted += s.misrouted;
        m.undecodable += s.undecodable;
        m.id_regressions += s.id_regressions;
        m.acks += s.acks;
        m.ack_duplicates += s.ack_duplicates;
        m.rejected += s.rejected;
        gap_overflow += s.gap_overflow;
        report::add_counts(&mut m.errors, &s.errors);
        if let Some(c) = &s.close {
            *r.connections.closes.entry(c.clone()).or_default() += 1;
        }
    }
    m.lost = m.expected_deliveries.saturating_sub(m.delivered);
    m.missing_acks = m.sent.saturating_sub(m.acks + m.rejected);
    r.e2e_latency_us = LatencySummary::from_histogram(&merged(&shared.e2e));
    r.ack_latency_us = LatencySummary::from_histogram(&merged(&shared.ack));
    r.connect_latency_us = LatencySummary::from_histogram(&connects.latency);
    let window_s = args.duration;
    r.throughput.window_s = window_s;
    r.throughput.sends_per_s = r.messages.sent as f64 / window_s;
    r.throughput.deliveries_per_s = r.messages.delivered as f64 / window_s;
    r.bench.cpu_percent = window.bench_cpu;
    r.bench_saturated = window
        .bench_cpu
        .is_some_and(|c| report::is_saturated(c, r.run.nproc));
    let [(srv0, srv0_err), (srv1, srv1_err)] = &window.server;
    r.server.cpu_percent = metrics_scrape::cpu_percent(srv0, srv1, window.server_wall_s);
    let rss = |s: &ServerSample| s.resident_bytes.map(|b| b as u64);
    r.server.rss_bytes_before = rss(srv0);
    r.server.rss_bytes_after = rss(srv1);
    if let (Some(probe), [Some(a), Some(b)]) = (&setup.probe, &window.cluster) {
        let mut cost = ClusterCost::between(a, b, r.messages.acks, r.messages.delivered);
        cost.notes.splice(0..0, probe.notes.iter().cloned());
        r.cluster_cost = Some(cost);
    }
    r.webhook = setup.sink.as_ref().map(|s| s.summary(window_s));
    let mut notes = vec![report::load_note(r.load_average.as_deref(), r.run.nproc)];
    notes.extend(setup.fd_note);
    notes.extend(run_notes(
        args,
        &r,
        window.drained,
        gap_overflow,
        closed.lost_tasks,
    ));
    notes.extend(server_notes(
        &window,
        srv0_err.as_ref().or(srv1_err.as_ref()),
    ));
    r.notes = notes;
    let groups = shared
        .groups
        .as_ref()
        .map(|g| g.results(&closed.group_sizes))
        .unwrap_or_default();
    (r, groups)
}

/// What a reader of the report must know about how the run went.
fn run_notes(
    args: &FanoutArgs,
    r: &Report,
    drained: bool,
    gap_overflow: u64,
    lost_tasks: u64,
) -> Vec<String> {
    let m = &r.messages;
    let (lost, rejected) = (m.lost, m.rejected);
    let (sent, skipped, late) = (m.sent, m.sends_skipped, m.sends_late);
    let mut notes = Vec::new();
    if r.bench_saturated {
        notes.push(format!(
            "load generator saturated: the bench used {:.0}% of one core on {} cores; \
             latency and throughput may reflect the bench, not the server",
            r.bench.cpu_percent.unwrap_or_default(),
            r.run.nproc
        ));
    }
    if skipped > 0 || late * 100 > sent {
        notes.push(format!(
            "senders fell behind schedule: {skipped} sends skipped, {late} late; \
             the offered load was lower than asked"
        ));
    }
    if lost > 0 && rejected > 0 {
        notes.push(format!(
            "up to {} of the {lost} lost deliveries belong to the {rejected} sends the \
             server rejected with an error frame",
            rejected * args.members as u64
        ));
    }
    if lost > 0 && !drained {
        notes.push(format!(
            "the drain ended after {} s with deliveries or acks outstanding",
            args.drain
        ));
    }
    let closed: u64 = r.connections.closes.values().sum();
    if closed > 0 {
        notes.push(format!(
            "{closed} connections were closed by the server during the run (see closes \
             received); they sent and received nothing after that"
        ));
    }
    let failed = r.connections.failed;
    if failed > 0 {
        notes.push(format!(
            "{failed} connections failed and were left out (allowed by --max-connect-failures)"
        ));
    }
    if gap_overflow > 0 {
        notes.push(format!(
            "sequence gap tracking overflowed ({gap_overflow} gaps): duplicates and late \
             arrivals past that point are counted as unclassified"
        ));
    }
    if lost_tasks > 0 {
        notes.push(format!(
            "{lost_tasks} reader tasks did not stop in time; their counts are missing"
        ));
    }
    notes
}

/// How far the server's figures can be trusted.
fn server_notes(window: &Window, error: Option<&String>) -> Vec<String> {
    let mut notes = Vec::new();
    let [(srv0, _), (srv1, _)] = &window.server;
    let wall = window.server_wall_s;
    if let (Some(a), Some(b)) = (srv0.cpu_seconds, srv1.cpu_seconds) {
        if a.fract() == 0.0 && b.fract() == 0.0 && wall > 0.0 {
            // metrics-process exports the counter as whole seconds.
            notes.push(format!(
                "server CPU comes from a whole-second {} counter: ±{:.0}% of one core over \
                 this {wall:.1} s window; a longer --duration narrows it",
                metrics_scrape::CPU_SECONDS,
                100.0 / wall
            ));
        }
    }
    if let Some(e) = error {
        notes.push(format!("server metrics n/a: {e}"));
    } else if srv0.cpu_seconds.is_none() {
        notes.push(format!(
            "server metrics n/a: /metrics has no {}",
            metrics_scrape::CPU_SECONDS
        ));
    }
    notes
}

async fn cluster_sample(probe: Option<&Probe>) -> Option<ClusterSample> {
    match probe {
        Some(p) => Some(ClusterSample::take(p).await),
        None => None,
    }
}

/// One timeline point per second from the first send until the close: the e2e latency of
/// the measured-window messages (warmup ones are not timed) received in that second (as
/// readers flush them, at most 250 ms late) and the sends and deliveries made in it.
async fn timeline(
    shared: Arc<Shared>,
    start: Instant,
    (measure_start, send_end): (Instant, Instant),
    mut stop: watch::Receiver<bool>,
) -> Vec<TimelinePoint> {
    let mut out = Vec::new();
    sleep_until(start.into()).await;
    if let Ok(mut h) = shared.interval.lock() {
        h.reset();
    }
    let mut tick = interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut last_sent, mut last_recv) = (shared.sent.load(Relaxed), shared.received.load(Relaxed));
    let mut last_at = start;
    // Bounded by the stop signal; the cap is a second guard (a day of points).
    while out.len() < 86_400 {
        tokio::select! {
            _ = tick.tick() => {}
            _ = flag(&mut stop) => break,
        }
        let now = Instant::now();
        let dt = now.duration_since(last_at).as_secs_f64().max(1e-3);
        let (sent, recv) = (shared.sent.load(Relaxed), shared.received.load(Relaxed));
        let (p50, p99, max, n) = match shared.interval.lock() {
            Ok(mut h) => {
                let v = if h.is_empty() {
                    (0, 0, 0, 0)
                } else {
                    (
                        h.value_at_quantile(0.5),
                        h.value_at_quantile(0.99),
                        h.max(),
                        h.len(),
                    )
                };
                h.reset();
                v
            }
            Err(_) => (0, 0, 0, 0),
        };
        let phase = if last_at < measure_start {
            "warmup"
        } else if last_at < send_end {
            "measure"
        } else {
            "drain"
        };
        out.push(TimelinePoint {
            t_s: now.duration_since(start).as_secs_f64(),
            phase: phase.into(),
            sends_per_s: (sent - last_sent) as f64 / dt,
            deliveries_per_s: (recv - last_recv) as f64 / dt,
            e2e_p50_us: p50,
            e2e_p99_us: p99,
            e2e_max_us: max,
            e2e_samples: n,
        });
        (last_sent, last_recv, last_at) = (sent, recv, now);
    }
    out
}

/// The timeline as an SVG chart: latency on top, throughput below.
pub fn chart(r: &Report) -> String {
    let t = &r.timeline;
    let at = |p: &TimelinePoint| p.t_s;
    let c = &r.config;
    Chart {
        title: format!(
            "chat-bench fanout: {} rooms × {} members × {} msg/s",
            c.rooms, c.members, c.rate_per_member
        ),
        subtitle: format!(
            "{} · git {} · load average at start {} · warmup {} s, measured {} s",
            c.url,
            r.run.git_rev,
            r.load_average.as_deref().unwrap_or("n/a"),
            c.warmup_s,
            c.duration_s
        ),
        x_label: "seconds since the first send".into(),
        marks: Vec::new(),
        panels: vec![
            // Latency is measured inside the measured window only.
            latency_panel(
                "end-to-end latency (ms)",
                t,
                at,
                |p| p.e2e_samples > 0,
                [|p| p.e2e_p50_us, |p| p.e2e_p99_us, |p| p.e2e_max_us],
            ),
            Panel::new(
                "messages per second",
                vec![
                    Series::of("deliveries/s", "#2ca02c", t, at, |p| p.deliveries_per_s),
                    Series::of("sends/s", "#9467bd", t, at, |p| p.sends_per_s),
                ],
            ),
        ],
    }
    .to_svg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::flags;
    fn args(extra: &[&str]) -> FanoutArgs {
        crate::args::parse(extra)
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(args(&[]).validate(), Ok(()));
        assert!(args(&["--room-prefix", "x"]).room_prefix() == "x");
        assert!(args(&[]).room_prefix().starts_with("bench-"));
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        for (flags, needle) in [
            (vec!["--rooms", "0"], "--rooms"),
            (vec!["--rate", "0"], "--rate"),
            (vec!["--rate", "NaN"], "--rate"),
            (vec!["--size", "10"], "--size"),
            (vec!["--duration", "0"], "--duration"),
            (vec!["--warmup=-1"], "--warmup"),
            (vec!["--user-prefix", "a b"], "--user-prefix"),
            (vec!["--room-prefix", "r/1"], "--room-prefix"),
            (vec!["--connect-concurrency", "0"], "--connect-concurrency"),
            (flags("--rooms 1000 --members 1000"), "--rooms"),
        ] {
            let e = args(&flags).validate().expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn window_rule_is_half_open() {
        assert!(!in_window(9, 10, 20));
        assert!(in_window(10, 10, 20));
        assert!(in_window(19, 10, 20));
        assert!(!in_window(20, 10, 20));
    }

    #[test]
    fn ack_ring_times_recent_sends_only() {
        let ring = AckRing::new(1.0);
        assert_eq!(ring.mask, 63);
        ring.record(5, 500);
        assert_eq!(ring.sent_at(5), Some(500));
        assert_eq!(ring.sent_at(6), None);
        ring.record(5 + 64, 900);
        assert_eq!(ring.sent_at(5), None, "slot reused");
        assert_eq!(ring.sent_at(69), Some(900));
        assert!(!ring.is_measured(0));
        ring.mark_measured(3);
        ring.mark_measured(4);
        assert!(!ring.is_measured(2));
        assert!(ring.is_measured(3) && ring.is_measured(4));
        assert!(!ring.is_measured(5));
    }

    #[test]
    fn reader_accounts_loss_duplicates_order_and_isolation() {
        use crate::payload::{encode_body, BodyHeader};
        let shared = Arc::new(Shared::new(3));
        shared.measure_start_ns.store(100, Relaxed);
        shared.send_end_ns.store(1_000_000_000_000, Relaxed);
        let ring = Arc::new(AckRing::new(10.0));
        let (tx, _rx) = oneshot::channel();
        let mut t = ReaderTask {
            shared: shared.clone(),
            ring: ring.clone(),
            room: 1,
            room_name: Arc::from("bench-1"),
            me: 4,
            shard: 0,
            tracker: SeqTracker::new(3, 64),
            last_id: 0,
            lat: LatBatch {
                e2e: Vec::new(),
                ack: Vec::new(),
                last_flush_ns: 0,
            },
            stats: ReaderStats::default(),
            joined: Some(tx),
            open: false,
        };
        let msg = |room: &str, id: u64, sender: u32, seq: u64, ts: u64| {
            let body = encode_body(
                BodyHeader {
                    sender,
                    seq,
                    sent_ns: ts,
                },
                48,
            );
            format!(
                r#"{{"type":"message","room":"{room}","id":"{id}","from":"u","cid":"{sender}-{seq}","body":"{body}","ts":1}}"#
            )
        };
        t.on_frame(br#"{"type":"joined","room":"bench-1"}"#);
        assert!(t.joined.is_none());
        // Sender 3 (local 0): 0, 2, 1 (late), 2 again (duplicate).
        t.on_frame(msg("bench-1", 10, 3, 0, 200).as_bytes());
        t.on_frame(msg("bench-1", 12, 3, 2, 200).as_bytes());
        t.on_frame(msg("bench-1", 11, 3, 1, 200).as_bytes());
        t.on_frame(msg("bench-1", 13, 3, 2, 200).as_bytes());
        // Warmup message: tracked, not counted.
        t.on_frame(msg("bench-1", 14, 5, 0, 50).as_bytes());
        // Another room's message and a sender outside this room.
        t.on_frame(msg("bench-0", 15, 0, 0, 200).as_bytes());
        t.on_frame(msg("bench-1", 16, 0, 0, 200).as_bytes());
        t.on_frame(b"not json");
        t.on_frame(br#"{"type":"message","room":"bench-1","id":"17","from":"u","cid":"c","body":"hi","ts":1}"#);
        // Acks and errors for our own sends (sender 4).
        ring.record(0, 150);
        ring.mark_measured(0);
        ring.record(1, 160);
        ring.mark_measured(1);
        t.on_frame(br#"{"type":"ack","room":"bench-1","cid":"4-0","id":"20","duplicate":false}"#);
        t.on_frame(br#"{"type":"error","code":"rate_limited","message":"slow","cid":"4-1"}"#);
        t.on_frame(br#"{"type":"ack","room":"bench-1","cid":"9-0","id":"21"}"#);
        t.on_frame(br#"{"type":"presence","room":"bench-1","user":"u","event":"join"}"#);
        let s = &t.stats;
        assert_eq!(s.delivered, 3);
        assert_eq!(s.out_of_order, 1);
        assert_eq!(s.duplicated, 1);
        // Id 11 arrived after 12.
        assert_eq!(s.id_regressions, 1);
        assert_eq!(s.misrouted, 3);
        assert_eq!(s.undecodable, 2);
        assert_eq!(s.acks, 1);
        assert_eq!(s.rejected, 1);
        assert_eq!(s.errors.get("rate_limited"), Some(&1));
        assert_eq!(shared.delivered_measured.load(Relaxed), 3);
        assert_eq!(shared.answered_measured.load(Relaxed), 2);
        assert_eq!(t.lat.e2e.len(), 3);
        assert_eq!(t.lat.ack.len(), 1);
    }
}

/// The fanout report as Markdown and its chart (the report's fields are in `report.rs`).
mod markdown {
    use std::fmt::Write as _;

    use super::chart;
    use crate::harness::Outcome;
    use crate::report::*;

    impl Outcome for Report {
        /// The Markdown report: a header with the command, revision and machine, a results
        /// table, a latency table and the notes.
        fn to_markdown(&self) -> String {
            let c = &self.config;
            let m = &self.messages;
            let mut out = String::new();
            title_md(&mut out, &self.run.scenario, &self.run.command);
            let _ = writeln!(
                out,
                "git `{}` · nproc {} · {} rooms × {} members at {} msg/s each, {} B bodies, \
                 {} s warmup + {} s measured\n",
                self.run.git_rev,
                self.run.nproc,
                c.rooms,
                c.members,
                c.rate_per_member,
                c.body_bytes,
                c.warmup_s,
                c.duration_s
            );
            let rows: Vec<(&str, String)> = vec![
                (
                    "connections joined / attempted",
                    format!(
                        "{} / {}",
                        self.connections.joined, self.connections.attempted
                    ),
                ),
                ("connect failures", map_or_none(&self.connections.failures)),
                (
                    "connect rate (joined/s)",
                    format!(
                        "{:.0} ({:.2} s for the connect phase)",
                        self.connections.connects_per_second, self.connections.connect_phase_s
                    ),
                ),
                ("closes received", map_or_none(&self.connections.closes)),
                ("sent / target", format!("{} / {}", m.sent, m.target_sends)),
                (
                    "sends late / skipped",
                    format!(
                        "{} (> {} ms) / {}",
                        m.sends_late, m.late_threshold_ms, m.sends_skipped
                    ),
                ),
                ("send failures", m.send_failures.to_string()),
                ("expected deliveries", m.expected_deliveries.to_string()),
                ("delivered (unique)", m.delivered.to_string()),
                ("lost", m.lost.to_string()),
                ("duplicated", m.duplicated.to_string()),
                ("out of order", m.out_of_order.to_string()),
                ("misrouted", m.misrouted.to_string()),
                ("undecodable", m.undecodable.to_string()),
                ("message id regressions", m.id_regressions.to_string()),
                (
                    "acks / rejected / missing",
                    format!("{} / {} / {}", m.acks, m.rejected, m.missing_acks),
                ),
                ("duplicate acks", m.ack_duplicates.to_string()),
                ("errors by code", map_or_none(&m.errors)),
                (
                    "throughput sends/s",
                    format!("{:.1}", self.throughput.sends_per_s),
                ),
                (
                    "throughput deliveries/s",
                    format!("{:.1}", self.throughput.deliveries_per_s),
                ),
                (
                    "bench CPU (% of one core)",
                    bench_cpu_cell(self.bench.cpu_percent, self.bench_saturated),
                ),
                (
                    "server CPU (% of one core)",
                    opt_pct(self.server.cpu_percent),
                ),
                (
                    "server RSS before / after",
                    format!(
                        "{} / {}",
                        opt_mib(self.server.rss_bytes_before),
                        opt_mib(self.server.rss_bytes_after)
                    ),
                ),
            ];
            metric_table(&mut out, rows);
            let _ = writeln!(out);
            latency_table(
                &mut out,
                &[
                    ("end-to-end", &self.e2e_latency_us),
                    ("ack", &self.ack_latency_us),
                    ("connect", &self.connect_latency_us),
                ],
            );
            if let Some(c) = &self.cluster_cost {
                c.to_markdown(&mut out);
            }
            if let Some(w) = &self.webhook {
                w.to_markdown(&mut out);
            }
            notes_md(&mut out, &self.notes);
            out
        }

        fn svg(&self) -> Option<String> {
            Some(chart(self))
        }
    }
}
