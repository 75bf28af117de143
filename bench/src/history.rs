//! The `history` scenario: the read path. It seeds rooms with a known set of messages over
//! the HTTP API (each `POST` answered 201/200, i.e. durable), then runs concurrent readers
//! that walk each room's whole history page by page for a fixed time, newest-first with
//! `before=` and oldest-first with `after=`, alternately, and checks every complete walk
//! returns exactly the seeded ids in order.
//!
//! It reports pages/s, messages/s and page latency from the client's side (request written
//! to body read), errors by HTTP status, and walks that matched or did not. Every phase has
//! a deadline; it connects only to `--url`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::seconds;
use crate::auth::AuthArgs;
use crate::chart::{latency_panel, Chart, Panel, Series};
use crate::client::Target;
use crate::harness::{self, CpuMeter, Outcome, RunFacts};
use crate::http::{HistoryPage, HttpClient};
use crate::report::{self, map_or_none, new_histogram, LatencySummary};
use crate::timeline::{Batch, Seconds, SharedSeconds};
use crate::BenchError;

/// Options of `chat-bench history`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Exit status: 0 when the run completed, even with errors or mismatched walks (they are \
results, in the report); 1 when seeding failed; 64 for bad arguments.")]
pub struct HistoryArgs {
    /// URL of a router or node (ws:// or http://); the HTTP API is on the same port.
    #[arg(long, env = "CHAT_BENCH_URL", default_value = "ws://127.0.0.1:7000")]
    pub url: String,
    /// Rooms to seed and read.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Messages seeded per room (0: read rooms that were never written).
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Body size of seeded messages, in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Publishes in flight at once while seeding.
    #[arg(long, default_value_t = 16)]
    pub seed_concurrency: usize,
    /// Longest time, in seconds, the seeding may take.
    #[arg(long, default_value_t = 300.0)]
    pub seed_timeout: f64,
    /// Concurrent readers, each on its own keep-alive connection.
    #[arg(long, default_value_t = 8)]
    pub readers: usize,
    /// `limit` of each page (1-1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Seconds of reading.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds one page request may take before it counts as an error.
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    /// The user that seeds and reads (dev auth, or the `sub` of its signed token).
    #[arg(long, default_value = "hist")]
    pub user: String,
    /// Rooms are `<prefix>-<room>`; defaults to `history-<unix seconds>` (fresh rooms).
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write pages/s and page latency per second of the reading as an SVG chart to this
    /// file. The JSON report carries them as `timeline`.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub auth: AuthArgs,
}

impl HistoryArgs {
    pub fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "history")
    }

    /// Checks every limit; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        // Every duration here must be positive.
        let secs = |name: &str, v: f64| seconds(name, v, true);
        if !(1..=10_000).contains(&self.rooms) {
            return Err("--rooms must be between 1 and 10000".into());
        }
        if self.messages > 1_000_000 {
            return Err("--messages must be at most 1000000 per room".into());
        }
        if !(1..=4096).contains(&self.size) {
            return Err("--size must be between 1 and 4096 bytes".into());
        }
        if !(1..=1000).contains(&self.seed_concurrency) {
            return Err("--seed-concurrency must be between 1 and 1000".into());
        }
        if !(1..=1000).contains(&self.readers) {
            return Err("--readers must be between 1 and 1000".into());
        }
        if !(1..=1000).contains(&self.limit) {
            return Err("--limit must be between 1 and 1000".into());
        }
        secs("duration", self.duration)?;
        secs("seed-timeout", self.seed_timeout)?;
        secs("request-timeout", self.request_timeout)?;
        common::UserId::new(self.user.clone())
            .map_err(|e| format!("--user is not a valid user id: {e}"))?;
        let last_room = format!("{}-{}", self.room_prefix(), self.rooms - 1);
        crate::args::check_room_prefix(last_room)?;
        Ok(())
    }
}

/// Which way a walk pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `before=`: newest page first.
    NewestFirst,
    /// `after=`: oldest page first.
    OldestFirst,
}

/// Compares one complete walk with what was seeded; `None` when they match.
pub fn walk_mismatch(walked: &[u64], expected: &[u64]) -> Option<String> {
    if walked == expected {
        return None;
    }
    let first_diff = walked
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(walked.len().min(expected.len()));
    Some(format!(
        "{} ids walked, {} seeded; first difference at position {first_diff}",
        walked.len(),
        expected.len()
    ))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryConfig {
    pub url: String,
    pub rooms: usize,
    pub messages_per_room: usize,
    pub body_bytes: usize,
    pub readers: usize,
    pub limit: u32,
    pub duration_s: f64,
    pub room_prefix: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Seeding {
    pub published: u64,
    pub duplicates: u64,
    /// Refusals retried (with the same cid), by status.
    pub retries: BTreeMap<String, u64>,
    pub seconds: f64,
    pub publishes_per_s: f64,
    pub latency_us: LatencySummary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Reading {
    pub pages: u64,
    pub messages: u64,
    pub pages_per_s: f64,
    pub messages_per_s: f64,
    /// Failed page requests by HTTP status (`"transport"` when no answer came).
    pub errors: BTreeMap<String, u64>,
    pub walks_ok: u64,
    /// Complete walks whose ids differ from the seeded ids.
    pub walks_mismatched: u64,
    /// Walks abandoned on an error.
    pub walks_failed: u64,
    /// Walks cut off by the end of the run (not checked).
    pub walks_incomplete: u64,
    pub walks_newest_first: u64,
    pub walks_oldest_first: u64,
    pub page_latency_us: LatencySummary,
    pub mismatch_examples: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryReport {
    #[serde(flatten)]
    pub run: RunFacts,
    pub started_unix_ms: u64,
    pub config: HistoryConfig,
    pub seeding: Seeding,
    pub reading: Reading,
    pub bench_cpu_percent: Option<f64>,
    pub bench_saturated: bool,
    pub notes: Vec<String>,
    /// Per second of the reading phase, all readers together.
    pub timeline: Vec<HistoryPoint>,
}

/// One second of the reading phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Seconds since reading started, at the start of this second.
    pub t_s: f64,
    /// Pages read (answered 200 with a history body) in this second.
    pub pages: u64,
    /// Page requests that failed in this second (any kind, see `reading.errors`).
    pub errors: u64,
    /// Latency of this second's pages, in µs.
    pub page_p50_us: u64,
    pub page_p99_us: u64,
    pub page_max_us: u64,
}

// Per-second counts of the timeline.
const PAGES: usize = 0;
const ERRORS: usize = 1;

fn timeline(s: &Seconds<2>) -> Vec<HistoryPoint> {
    s.iter()
        .map(|(i, x)| {
            let l = x.latency();
            HistoryPoint {
                t_s: i as f64,
                pages: x.counts[PAGES],
                errors: x.counts[ERRORS],
                page_p50_us: l.p50,
                page_p99_us: l.p99,
                page_max_us: l.max,
            }
        })
        .collect()
}

impl HistoryReport {
    /// Pages/s and page latency per second of the reading.
    pub fn chart(&self) -> String {
        let t = &self.timeline;
        let at = |p: &HistoryPoint| p.t_s;
        let c = &self.config;
        Chart {
            title: format!(
                "chat-bench history: {} readers, {} rooms × {} messages, limit {}",
                c.readers, c.rooms, c.messages_per_room, c.limit
            ),
            subtitle: format!("{} · git {}", c.url, self.run.git_rev),
            x_label: "seconds since reading started".into(),
            panels: vec![
                latency_panel(
                    "page latency (ms)",
                    t,
                    at,
                    |p| p.pages > 0,
                    [|p| p.page_p50_us, |p| p.page_p99_us, |p| p.page_max_us],
                ),
                Panel::new(
                    "per second",
                    vec![
                        Series::of("pages", "#2ca02c", t, at, |p| p.pages as f64),
                        Series::of("errors", "#8c564b", t, at, |p| p.errors as f64),
                    ],
                ),
            ],
            marks: Vec::new(),
        }
        .to_svg()
    }
}

impl Outcome for HistoryReport {
    fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.config;
        let s = &self.seeding;
        let r = &self.reading;
        let mut o = String::new();
        report::title_md(&mut o, "history", &self.run.command);
        let _ = writeln!(
            o,
            "git `{}` · nproc {} · {} · {} rooms × {} messages of {} B, {} readers, limit {}, \
             {} s of reading\n",
            self.run.git_rev,
            self.run.nproc,
            c.url,
            c.rooms,
            c.messages_per_room,
            c.body_bytes,
            c.readers,
            c.limit,
            c.duration_s
        );
        let rows: Vec<(&str, String)> = vec![
            (
                "seeded (duplicates)",
                format!("{} ({})", s.published, s.duplicates),
            ),
            (
                "seeding",
                format!("{:.1} s, {:.0} publishes/s", s.seconds, s.publishes_per_s),
            ),
            ("seed retries", map_or_none(&s.retries)),
            ("pages", r.pages.to_string()),
            ("pages/s", format!("{:.1}", r.pages_per_s)),
            ("messages/s", format!("{:.0}", r.messages_per_s)),
            ("errors by status", map_or_none(&r.errors)),
            (
                "walks ok / mismatched / failed / cut off",
                format!(
                    "{} / {} / {} / {}",
                    r.walks_ok, r.walks_mismatched, r.walks_failed, r.walks_incomplete
                ),
            ),
            (
                "walks newest-first / oldest-first",
                format!("{} / {}", r.walks_newest_first, r.walks_oldest_first),
            ),
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
                ("page", &r.page_latency_us),
                ("seed publish", &s.latency_us),
            ],
        );
        for e in &r.mismatch_examples {
            let _ = writeln!(o, "\n- mismatch: {e}");
        }
        report::notes_md(&mut o, &self.notes);
        o
    }

    fn svg(&self) -> Option<String> {
        Some(self.chart())
    }
}

/// Seeds every room; returns each room's ids in ascending order.
async fn seed(
    args: &HistoryArgs,
    creds: &str,
    target: &Target,
    rooms: &[String],
    out: &mut Seeding,
) -> anyhow::Result<Vec<Vec<u64>>> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.seed_timeout);
    let jobs: Arc<Vec<(usize, usize)>> = Arc::new(
        (0..args.messages)
            .flat_map(|i| (0..rooms.len()).map(move |r| (r, i)))
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(Mutex::new(vec![
        Vec::with_capacity(args.messages);
        rooms.len()
    ]));
    let rooms = Arc::new(rooms.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..args.seed_concurrency.min(jobs.len().max(1)) {
        let (jobs, next, failed, ids, rooms) = (
            jobs.clone(),
            next.clone(),
            failed.clone(),
            ids.clone(),
            rooms.clone(),
        );
        let mut http = HttpClient::for_target(target);
        let creds = creds.to_owned();
        let body = "s".repeat(args.size);
        tasks.push(tokio::spawn(async move {
            let mut lat = new_histogram();
            let mut retries: BTreeMap<String, u64> = BTreeMap::new();
            let mut dups = 0u64;
            loop {
                let j = next.fetch_add(1, Relaxed) as usize;
                let Some(&(r, i)) = jobs.get(j) else { break };
                if failed.load(Relaxed) {
                    break;
                }
                let path = format!("/v1/rooms/{}/messages?{creds}", rooms[r]);
                let payload =
                    serde_json::json!({"cid": format!("h-{i}"), "body": body}).to_string();
                let mut backoff = Duration::from_millis(100);
                let id = loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        failed.store(true, Relaxed);
                        return Err(anyhow::anyhow!("seeding did not finish in time"));
                    }
                    let t = Instant::now();
                    match http
                        .request("POST", &path, Some(payload.clone()), left)
                        .await
                    {
                        Ok(a) if a.status == 201 || a.status == 200 => {
                            lat.saturating_record(t.elapsed().as_micros().max(1) as u64);
                            if a.status == 200 {
                                dups += 1;
                            }
                            let v: serde_json::Value = serde_json::from_slice(&a.body)?;
                            let id = v["id"]
                                .as_str()
                                .and_then(|s| s.parse::<u64>().ok())
                                .ok_or_else(|| anyhow::anyhow!("publish answer without id"))?;
                            break id;
                        }
                        Ok(a) if crate::client::status_retried(a.status) => {
                            *retries.entry(format!("HTTP {}", a.status)).or_default() += 1;
                        }
                        Ok(a) => {
                            failed.store(true, Relaxed);
                            return Err(anyhow::anyhow!(
                                "publish to {} answered HTTP {}: {}",
                                rooms[r],
                                a.status,
                                String::from_utf8_lossy(&a.body)
                            ));
                        }
                        Err(_) => {
                            *retries.entry("transport".into()).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                };
                if let Ok(mut g) = ids.lock() {
                    g[r].push(id);
                }
            }
            Ok((lat, retries, dups))
        }));
    }
    let mut lat = new_histogram();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok((h, retries, dups))) => {
                let _ = lat.add(&h);
                out.duplicates += dups;
                for (k, v) in retries {
                    *out.retries.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("seed task: {e}"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.published = lat.len();
    out.publishes_per_s = if out.seconds > 0.0 {
        out.published as f64 / out.seconds
    } else {
        0.0
    };
    out.latency_us = LatencySummary::from_histogram(&lat);
    let mut ids = ids
        .lock()
        .map_err(|_| anyhow::anyhow!("seed ids lock poisoned"))?
        .clone();
    for v in &mut ids {
        v.sort_unstable();
        v.dedup();
    }
    Ok(ids)
}

#[derive(Default)]
struct ReaderOut {
    pages: u64,
    messages: u64,
    errors: BTreeMap<String, u64>,
    ok: u64,
    mismatched: u64,
    failed: u64,
    incomplete: u64,
    newest_first: u64,
    oldest_first: u64,
    examples: Vec<String>,
    lat: Option<Histogram<u64>>,
}

enum WalkEnd {
    Done(Vec<u64>),
    Failed,
    Cut,
}

struct Walker<'a> {
    http: HttpClient,
    /// `user=U` or `token=JWT`.
    creds: &'a str,
    limit: u32,
    timeout: Duration,
    end: Instant,
    out: ReaderOut,
    lat: Histogram<u64>,
    /// Pages and errors per second; flushes itself when the reader ends.
    seconds: Batch<2>,
}

impl Walker<'_> {
    async fn walk(&mut self, room: &str, dir: Direction) -> WalkEnd {
        let mut ids: Vec<u64> = Vec::new();
        let mut cursor: Option<u64> = None;
        loop {
            if Instant::now() >= self.end {
                return WalkEnd::Cut;
            }
            let bound = match (dir, cursor) {
                (Direction::NewestFirst, Some(c)) => format!("&before={c}"),
                (Direction::OldestFirst, Some(c)) => format!("&after={c}"),
                (Direction::OldestFirst, None) => "&after=0".to_owned(),
                (Direction::NewestFirst, None) => String::new(),
            };
            let path = format!(
                "/v1/rooms/{room}/messages?{}&limit={}{bound}",
                self.creds, self.limit
            );
            let t = Instant::now();
            let answer = self.http.request("GET", &path, None, self.timeout).await;
            let done = Instant::now();
            if !matches!(&answer, Ok(a) if a.status == 200) {
                self.seconds.count(done, ERRORS, 1);
            }
            let page = match answer {
                Ok(a) if a.status == 200 => match serde_json::from_slice::<HistoryPage>(&a.body) {
                    Ok(p) => p,
                    Err(_) => {
                        self.seconds.count(done, ERRORS, 1);
                        *self.out.errors.entry("bad body".into()).or_default() += 1;
                        return WalkEnd::Failed;
                    }
                },
                Ok(a) => {
                    *self
                        .out
                        .errors
                        .entry(format!("HTTP {}", a.status))
                        .or_default() += 1;
                    return WalkEnd::Failed;
                }
                Err(_) => {
                    *self.out.errors.entry("transport".into()).or_default() += 1;
                    return WalkEnd::Failed;
                }
            };
            let us = done.duration_since(t).as_micros().max(1) as u64;
            self.lat.saturating_record(us);
            self.seconds.count(done, PAGES, 1);
            self.seconds.latency(done, us);
            self.out.pages += 1;
            self.out.messages += page.messages.len() as u64;
            let more = page.has_more && !page.messages.is_empty();
            let page_ids: Vec<u64> = page.messages.iter().map(|m| m.id).collect();
            match dir {
                Direction::OldestFirst => {
                    cursor = page_ids.last().copied().or(cursor);
                    ids.extend(page_ids);
                }
                Direction::NewestFirst => {
                    cursor = page_ids.first().copied().or(cursor);
                    // Pages come oldest first within the page; walk backwards.
                    let mut older = page_ids;
                    older.extend_from_slice(&ids);
                    ids = older;
                }
            }
            if !more {
                return WalkEnd::Done(ids);
            }
        }
    }
}

/// `--readers` readers walking the rooms until `--duration` from `t0` passes: what they
/// read, and by second.
async fn read(
    args: &HistoryArgs,
    creds: &str,
    target: &Target,
    rooms: Arc<Vec<String>>,
    expected: Arc<Vec<Vec<u64>>>,
    t0: Instant,
) -> (Reading, Arc<SharedSeconds<2>>) {
    let end = t0 + Duration::from_secs_f64(args.duration);
    let seconds = SharedSeconds::<2>::new(t0);
    let mut tasks = Vec::new();
    for k in 0..args.readers {
        let (rooms, expected) = (rooms.clone(), expected.clone());
        let http = HttpClient::for_target(target);
        let creds = creds.to_owned();
        let (limit, timeout) = (args.limit, Duration::from_secs_f64(args.request_timeout));
        let seconds = Batch::new(seconds.clone());
        tasks.push(tokio::spawn(async move {
            let mut w = Walker {
                http,
                creds: &creds,
                limit,
                timeout,
                end,
                out: ReaderOut::default(),
                lat: new_histogram(),
                seconds,
            };
            let mut n = k;
            while Instant::now() < end {
                let r = n % rooms.len();
                // Readers start on different rooms and alternate directions.
                let dir = if (n / rooms.len() + k) % 2 == 0 {
                    Direction::NewestFirst
                } else {
                    Direction::OldestFirst
                };
                n += 1;
                match w.walk(&rooms[r], dir).await {
                    WalkEnd::Done(ids) => {
                        match dir {
                            Direction::NewestFirst => w.out.newest_first += 1,
                            Direction::OldestFirst => w.out.oldest_first += 1,
                        }
                        match walk_mismatch(&ids, &expected[r]) {
                            None => w.out.ok += 1,
                            Some(e) => {
                                w.out.mismatched += 1;
                                if w.out.examples.len() < 5 {
                                    w.out.examples.push(format!("{} ({dir:?}): {e}", rooms[r]));
                                }
                            }
                        }
                    }
                    WalkEnd::Failed => {
                        w.out.failed += 1;
                        // Do not spin on a failing endpoint.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    WalkEnd::Cut => w.out.incomplete += 1,
                }
            }
            w.out.lat = Some(w.lat);
            w.out
        }));
    }
    let mut reading = Reading::default();
    let mut lat = new_histogram();
    let hard = tokio::time::Instant::now()
        + Duration::from_secs_f64(args.duration + args.request_timeout + 5.0);
    for mut t in tasks {
        let o = match tokio::time::timeout_at(hard, &mut t).await {
            Ok(Ok(o)) => o,
            _ => {
                t.abort();
                continue;
            }
        };
        reading.pages += o.pages;
        reading.messages += o.messages;
        report::add_counts(&mut reading.errors, &o.errors);
        reading.walks_ok += o.ok;
        reading.walks_mismatched += o.mismatched;
        reading.walks_failed += o.failed;
        reading.walks_incomplete += o.incomplete;
        reading.walks_newest_first += o.newest_first;
        reading.walks_oldest_first += o.oldest_first;
        reading.mismatch_examples.extend(o.examples);
        if let Some(h) = o.lat {
            let _ = lat.add(&h);
        }
    }
    reading.page_latency_us = LatencySummary::from_histogram(&lat);
    (reading, seconds)
}

/// Runs the scenario.
pub async fn run(args: HistoryArgs, command: String) -> Result<HistoryReport, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    // One token for the run (its --jwt-ttl must cover the run).
    let creds = harness::auth(&args.auth)?
        .credentials(&args.user)
        .map_err(BenchError::Config)?;
    let target = harness::target(&args.url).await?;
    let started_unix_ms = harness::unix_ms();
    let load = report::current_load_note();
    let prefix = args.room_prefix();
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("{prefix}-{r}")).collect();
    let mut seeding = Seeding::default();
    if !args.quiet && args.messages > 0 {
        eprintln!(
            "[history] seeding {} rooms × {} messages",
            args.rooms, args.messages
        );
    }
    let expected = seed(&args, &creds, &target, &rooms, &mut seeding)
        .await
        .map_err(|e| BenchError::Failed(e.context("seeding")))?;
    let expected = Arc::new(expected);
    if !args.quiet {
        eprintln!("[history] reading for {} s", args.duration);
    }

    let cpu = CpuMeter::start();
    let t0 = Instant::now();
    let (mut reading, seconds) = read(&args, &creds, &target, Arc::new(rooms), expected, t0).await;
    let bench_cpu = cpu.percent();
    let wall = t0.elapsed().as_secs_f64();
    let mut per_second = seconds.snapshot();
    per_second.extend_to(wall.ceil() as usize);
    reading.pages_per_s = reading.pages as f64 / wall;
    reading.messages_per_s = reading.messages as f64 / wall;
    reading.mismatch_examples.truncate(10);
    let nproc = report::nproc();
    let bench_saturated = bench_cpu.is_some_and(|c| report::is_saturated(c, nproc));
    let mut notes = vec![load];
    if bench_saturated {
        notes.push(format!(
            "load generator saturated: the bench used {:.0}% of one core on {nproc} cores",
            bench_cpu.unwrap_or_default()
        ));
    }
    if args.messages == 0 {
        notes.push(
            "--messages 0: the rooms were never written; every walk must be one empty page".into(),
        );
    }
    if reading.walks_ok + reading.walks_mismatched == 0 {
        notes.push("no walk completed: raise --duration or lower --messages".into());
    }
    notes.push(
        "page latency is measured by the client: request written to body read, through the \
         --url (a router adds a hop)"
            .into(),
    );
    Ok(HistoryReport {
        run: RunFacts::new("history", command),
        started_unix_ms,
        config: HistoryConfig {
            url: args.url.clone(),
            rooms: args.rooms,
            messages_per_room: args.messages,
            body_bytes: args.size,
            readers: args.readers,
            limit: args.limit,
            duration_s: args.duration,
            room_prefix: prefix,
        },
        seeding,
        reading,
        bench_cpu_percent: bench_cpu,
        bench_saturated,
        notes,
        timeline: timeline(&per_second),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn args(extra: &[&str]) -> HistoryArgs {
        crate::args::parse(extra)
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        assert_eq!(args(&[]).validate(), Ok(()));
        assert_eq!(args(&["--messages", "0"]).validate(), Ok(()));
        for (flags, needle) in [
            (vec!["--rooms", "0"], "--rooms"),
            (vec!["--messages", "2000000"], "--messages"),
            (vec!["--size", "0"], "--size"),
            (vec!["--seed-concurrency", "0"], "--seed-concurrency"),
            (vec!["--readers", "0"], "--readers"),
            (vec!["--limit", "0"], "--limit"),
            (vec!["--limit", "1001"], "--limit"),
            (vec!["--duration", "0"], "--duration"),
            (vec!["--seed-timeout", "NaN"], "--seed-timeout"),
            (vec!["--request-timeout", "0"], "--request-timeout"),
            (vec!["--user", "a b"], "--user"),
            (vec!["--room-prefix", "bad room"], "--room-prefix"),
        ] {
            let e = args(&flags).validate().expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn readers_seconds_become_the_timeline_and_chart() {
        let t0 = Instant::now();
        let shared = SharedSeconds::<2>::new(t0);
        // Two readers, each with its own batch, as in a run.
        for offset_ms in [0u64, 300] {
            let mut b = Batch::new(shared.clone());
            for (ms, us) in [(100, 1_000), (900, 3_000), (2_500, 20_000)] {
                let at = t0 + Duration::from_millis(ms + offset_ms);
                b.count(at, PAGES, 1);
                b.latency(at, us);
            }
            b.count(t0 + Duration::from_millis(1_500), ERRORS, 1);
        }
        let mut s = shared.snapshot();
        s.extend_to(4);
        let t = timeline(&s);
        let col = |f: fn(&HistoryPoint) -> u64| t.iter().map(f).collect::<Vec<_>>();
        // Reader 2's page at 1.2 s falls in second 1.
        assert_eq!(col(|p| p.pages), [3, 1, 2, 0]);
        assert_eq!(col(|p| p.errors), [0, 2, 0, 0]);
        assert!((2_980..=3_020).contains(&t[0].page_max_us), "{:?}", t[0]);
        assert!((19_800..=20_200).contains(&t[2].page_p50_us), "{:?}", t[2]);
        let r = HistoryReport {
            timeline: t,
            ..Default::default()
        };
        let svg = r.chart();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 5);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["timeline"][2]["pages"], 2);
    }

    #[test]
    fn walks_are_compared_exactly() {
        assert_eq!(walk_mismatch(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(walk_mismatch(&[], &[]), None);
        let e = walk_mismatch(&[1, 3], &[1, 2, 3]).expect("short");
        assert!(
            e.contains("2 ids walked, 3 seeded") && e.contains("position 1"),
            "{e}"
        );
        let e = walk_mismatch(&[1, 2, 3, 4], &[1, 2, 3]).expect("long");
        assert!(e.contains("position 3"), "{e}");
        assert!(walk_mismatch(&[2, 1], &[1, 2]).is_some());
    }
}
