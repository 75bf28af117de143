//! The `churn` scenario: a connect/disconnect storm. C connection slots each connect, join
//! a room, optionally send one message and wait for its ack, live a seeded random lifetime,
//! close, and reconnect, for a fixed duration. The mean lifetime is C / `--rate`, so the
//! slots together reconnect at about `--rate` per second.
//!
//! It answers what `connections` cannot: does a node keep up with sessions that come and go
//! (connect latency under churn, join failures, unexpected close codes), are sends still
//! acked, and does memory come back when connections end (RSS before, at the end of the
//! storm, and after the last close plus `--settle`). Lifetimes come from a seeded generator
//! so two runs with the same flags offer the same schedule.
//!
//! One process (C is bounded by its open-file limit); every slot's loop is bounded by the
//! duration, the connect and ack timeouts and the close grace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::args::seconds_ok;
use crate::auth::{Auth, AuthArgs};
use crate::chart::{Chart, Panel, Series};
use crate::client::{ConnectOptions, Target};
use crate::harness::{self, CpuMeter, Outcome, Progress, RunFacts};
use crate::idle::{self, SendOutcome};
use crate::report::{self, close_label, map_or_none, new_histogram, LatencySummary};
use crate::servers::{self, ServerFigures, Watched};
use crate::timeline::Seconds;
use crate::workers::{self, validate_spread, Limits};
use crate::BenchError;

/// Options of `chat-bench churn`.
#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// WebSocket URL of a node or router (path defaults to /ws); repeatable, rooms are
    /// spread over them.
    #[arg(
        long = "url",
        env = "CHAT_BENCH_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:7001"
    )]
    pub urls: Vec<String>,
    /// A server whose `/metrics` to sample (`http://host:port`); repeatable. Default: each
    /// --url's own host and port.
    #[arg(
        long = "metrics-url",
        env = "CHAT_BENCH_METRICS_URL",
        value_delimiter = ','
    )]
    pub metrics_urls: Vec<String>,
    /// Connection slots kept busy (C).
    #[arg(long, env = "CHAT_BENCH_CONNECTIONS", default_value_t = 200)]
    pub connections: usize,
    /// Target churn: reconnects per second over all slots (mean lifetime = C / rate).
    #[arg(long, env = "CHAT_BENCH_CHURN_RATE", default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of churn.
    #[arg(long, env = "CHAT_BENCH_DURATION", default_value_t = 30.0)]
    pub duration: f64,
    /// Rooms the slots join (slot s joins room s mod rooms).
    #[arg(long, env = "CHAT_BENCH_ROOMS", default_value_t = 10)]
    pub rooms: usize,
    /// After each join, send one message and wait for its ack.
    #[arg(long, env = "CHAT_BENCH_SEND")]
    pub send: bool,
    /// Seed of the lifetimes and start offsets.
    #[arg(long, env = "CHAT_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Bind to 127.0.0.1..127.0.0.K in turn (loopback targets only); 1 = no binding.
    #[arg(long, env = "CHAT_BENCH_SOURCE_ADDRESSES", default_value_t = 1)]
    pub source_addresses: usize,
    /// Bind to these local addresses in turn instead; repeatable or comma-separated.
    #[arg(long = "source-address", value_delimiter = ',')]
    pub source_address_list: Vec<IpAddr>,
    /// Seconds one connection may take to connect and be joined.
    #[arg(long, env = "CHAT_BENCH_CONNECT_TIMEOUT", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds a send may wait for its ack.
    #[arg(long, env = "CHAT_BENCH_ACK_TIMEOUT", default_value_t = 5.0)]
    pub ack_timeout: f64,
    /// Seconds after the last close before the final metrics sample.
    #[arg(long, env = "CHAT_BENCH_SETTLE", default_value_t = 3.0)]
    pub settle: f64,
    #[arg(long, env = "CHAT_BENCH_USER_PREFIX", default_value = "churn")]
    pub user_prefix: String,
    /// Rooms are named `<prefix>-<i>`; defaults to `churn-<unix seconds>`.
    #[arg(long, env = "CHAT_BENCH_ROOM_PREFIX")]
    pub room_prefix: Option<String>,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "CHAT_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Also write the Markdown report to this file.
    #[arg(long, env = "CHAT_BENCH_MARKDOWN")]
    pub markdown: Option<PathBuf>,
    /// Write connects/s, disconnects/s and connect latency per second as an SVG chart.
    #[arg(long, env = "CHAT_BENCH_CHART")]
    pub chart: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, env = "CHAT_BENCH_QUIET")]
    pub quiet: bool,
}

const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Longest a connection open at the end waits for the end-of-storm sample.
const RELEASE_WAIT: Duration = Duration::from_secs(15);

impl ChurnArgs {
    fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "churn")
    }

    fn sources(&self) -> Vec<IpAddr> {
        workers::sources(&self.source_address_list, self.source_addresses)
    }

    /// Mean lifetime of a connection, in seconds.
    pub fn mean_lifetime(&self) -> f64 {
        self.connections as f64 / self.rate
    }

    pub fn validate(&self, limits: Limits) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 100_000.0) {
            return Err("--rate must be in (0, 100000] reconnects per second".into());
        }
        for (name, v, positive) in [
            ("duration", self.duration, true),
            ("connect-timeout", self.connect_timeout, true),
            ("ack-timeout", self.ack_timeout, true),
            ("settle", self.settle, false),
        ] {
            // churn's message has always been worded this way; kept unchanged.
            if !seconds_ok(v, positive) {
                return Err(format!("--{name} must be a number of seconds in range"));
            }
        }
        if self.mean_lifetime() * 2.0 > self.duration {
            return Err(format!(
                "--rate {} with --connections {} gives a mean lifetime of {:.1} s, so fewer than \
                 two lifetimes fit in --duration {}: raise --rate or --duration",
                self.rate,
                self.connections,
                self.mean_lifetime(),
                self.duration
            ));
        }
        if self.rooms == 0 {
            return Err("--rooms must be at least 1".into());
        }
        // One process; each slot holds one socket at a time.
        validate_spread(
            &self.urls,
            self.connections,
            1,
            self.source_addresses,
            &self.source_address_list,
            limits,
        )
        .map_err(|e| {
            e.replace("--processes 1 gives", "--connections gives")
                .replace(
                    "use --processes",
                    "lower --connections; churn runs in one process, so not",
                )
        })?;
        crate::args::check_user_prefix(format!("{}-{}", self.user_prefix, self.connections))?;
        crate::args::check_room_prefix(format!("{}-{}", self.room_prefix(), self.rooms))?;
        Auth::from_args(&self.auth)?;
        Ok(())
    }
}

/// SplitMix64: a tiny seeded generator, enough for lifetimes (no crate for it).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A slot's generator: independent streams per slot from one seed.
pub fn slot_rng(seed: u64, slot: usize) -> SplitMix64 {
    let mut r = SplitMix64::new(seed ^ (slot as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64();
    r
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnPoint {
    /// Seconds since the start of the churn (bucket start).
    pub t_s: f64,
    pub connects: u64,
    pub disconnects: u64,
    pub failures: u64,
    pub connect_p50_us: u64,
    pub connect_p99_us: u64,
    pub connect_max_us: u64,
}

// Per-second counts of the timeline.
const CONNECTS: usize = 0;
const DISCONNECTS: usize = 1;
const FAILURES: usize = 2;

/// What every slot adds to.
struct Tally {
    started: tokio::time::Instant,
    /// Connects (with their latency), disconnects and failures by second.
    seconds: Mutex<Seconds<3>>,
    stats: Mutex<Stats>,
}

#[derive(Debug, Default)]
struct Stats {
    attempts: u64,
    connects: u64,
    /// Closed by the bench at the end of a lifetime during the run.
    disconnects: u64,
    close_unanswered: u64,
    /// Connections still open at the end of the run, closed then.
    final_closes: u64,
    failures: BTreeMap<String, u64>,
    server_closes: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    sends: u64,
    acks: u64,
    rejected: BTreeMap<String, u64>,
    unanswered: BTreeMap<String, u64>,
    connect_hist: Option<Histogram<u64>>,
    ack_hist: Option<Histogram<u64>>,
}

impl Tally {
    /// Adds to the second the run is in now.
    fn second(&self, f: impl FnOnce(&mut Seconds<3>, usize)) {
        let i = self.started.elapsed().as_secs() as usize;
        if let Ok(mut s) = self.seconds.lock() {
            f(&mut s, i);
        }
    }

    fn stats(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

struct SlotPlan {
    tally: Arc<Tally>,
    targets: Arc<Vec<Target>>,
    auth: Arc<Auth>,
    sources: Arc<Vec<IpAddr>>,
    room_prefix: Arc<str>,
    user_prefix: Arc<str>,
    rooms: usize,
    send: bool,
    seed: u64,
    mean: Duration,
    end: tokio::time::Instant,
    connect_timeout: Duration,
    ack_timeout: Duration,
    /// Set once the end-of-storm metrics are sampled: connections open at `end` stay open
    /// until then, so that sample sees them.
    release: watch::Receiver<bool>,
}

async fn slot(p: Arc<SlotPlan>, slot: usize) {
    let mut rng = slot_rng(p.seed, slot);
    let room_index = slot % p.rooms;
    let room = format!("{}-{room_index}", p.room_prefix);
    let user = format!("{}-{slot}", p.user_prefix);
    let target = &p.targets[room_index % p.targets.len()];
    let source = (!p.sources.is_empty()).then(|| p.sources[slot % p.sources.len()]);
    // Spread the first connects over one mean lifetime: the steady rate from the start.
    let first = p.tally.started + p.mean.mul_f64(rng.unit());
    tokio::time::sleep_until(first.min(p.end)).await;
    let mut generation = 0u64;
    while tokio::time::Instant::now() < p.end {
        generation += 1;
        p.tally.stats(|s| s.attempts += 1);
        let opts = match p.auth.credentials(&user) {
            Ok(credentials) => ConnectOptions {
                credentials,
                source,
                recv_buffer: None,
            },
            Err(e) => {
                p.tally.stats(|s| *s.failures.entry(e).or_default() += 1);
                return;
            }
        };
        let mut j = match idle::connect_joined(target, &room, &opts, p.connect_timeout).await {
            Ok(j) => j,
            Err(kind) => {
                p.tally.second(|s, i| s.count(i, FAILURES, 1));
                p.tally.stats(|s| *s.failures.entry(kind).or_default() += 1);
                // Back off before retrying, so a refusing server is not hammered.
                let pause = p.mean.min(Duration::from_secs(1)) / 2;
                tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(p.end)).await;
                continue;
            }
        };
        let us = j.connect_us.max(1);
        p.tally.second(|s, i| {
            s.count(i, CONNECTS, 1);
            s.latency(i, us);
        });
        p.tally.stats(|s| {
            s.connects += 1;
            if let Some(h) = s.connect_hist.as_mut() {
                h.saturating_record(us);
            }
        });
        if p.send {
            let cid = format!("c{slot}-{generation}");
            let mut errors = BTreeMap::new();
            let outcome =
                idle::send_and_wait_ack(&mut j, &room, &cid, "churn", p.ack_timeout, &mut errors)
                    .await;
            p.tally.stats(|s| {
                s.sends += 1;
                report::add_counts(&mut s.errors, &errors);
                match outcome {
                    SendOutcome::Acked { micros } => {
                        s.acks += 1;
                        if let Some(h) = s.ack_hist.as_mut() {
                            h.saturating_record(micros.max(1));
                        }
                    }
                    SendOutcome::Rejected(code) => *s.rejected.entry(code).or_default() += 1,
                    SendOutcome::NoAnswer(why) => *s.unanswered.entry(why).or_default() += 1,
                }
            });
        }
        let life = p.mean.mul_f64(0.5 + rng.unit());
        let mut live = idle::hold(j);
        let until = (tokio::time::Instant::now() + life).min(p.end);
        let by_server = live.wait_until(until).await;
        let at_end = tokio::time::Instant::now() >= p.end;
        if at_end && !by_server {
            let mut release = p.release.clone();
            let _ = tokio::time::timeout(RELEASE_WAIT, release.wait_for(|r| *r)).await;
        }
        let end = live.finish(CLOSE_GRACE).await;
        p.tally.stats(|s| {
            if let Some(e) = &end {
                report::add_counts(&mut s.errors, &e.errors);
            }
            if by_server {
                let label = end
                    .as_ref()
                    .map_or_else(|| close_label(1006), |e| e.close.clone());
                *s.server_closes.entry(label).or_default() += 1;
            } else if at_end {
                s.final_closes += 1;
            } else {
                s.disconnects += 1;
                if end.is_none() {
                    s.close_unanswered += 1;
                }
            }
        });
        if by_server || !at_end {
            p.tally.second(|s, i| s.count(i, DISCONNECTS, 1));
        }
    }
}

/// Everything one `churn` run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnReport {
    #[serde(flatten)]
    pub run: RunFacts,
    pub load_average: Option<String>,
    pub started_unix_ms: u64,
    pub urls: Vec<String>,
    pub auth: String,
    pub connections: usize,
    pub target_rate: f64,
    pub mean_lifetime_s: f64,
    pub duration_s: f64,
    pub rooms: usize,
    pub send: bool,
    pub seed: u64,
    pub source_addresses: Vec<String>,
    pub attempts: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub connects_per_s: f64,
    pub disconnects_per_s: f64,
    /// Connections open at the end of the run, closed then (not counted as churn).
    pub final_closes: u64,
    pub close_unanswered: u64,
    pub join_failures: BTreeMap<String, u64>,
    /// Closes (or drops) the server initiated, by close label.
    pub server_closes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub sends: u64,
    pub acks: u64,
    pub rejected: BTreeMap<String, u64>,
    pub unanswered: BTreeMap<String, u64>,
    pub connect_latency_us: LatencySummary,
    pub ack_latency_us: LatencySummary,
    pub bench_cpu_percent: Option<f64>,
    pub bench_saturated: bool,
    pub servers: Vec<ServerFigures>,
    /// Σ RSS after the last close + settle minus before the churn.
    pub rss_retained_bytes: Option<i64>,
    pub timeline: Vec<ChurnPoint>,
    pub notes: Vec<String>,
}

impl ChurnReport {
    /// Connects/disconnects per second and connect latency over the run.
    pub fn chart(&self) -> String {
        let pts = |f: &dyn Fn(&ChurnPoint) -> f64| -> Vec<(f64, f64)> {
            self.timeline.iter().map(|p| (p.t_s, f(p))).collect()
        };
        Chart {
            title: format!(
                "chat-bench churn: {} slots, target {}/s",
                self.connections, self.target_rate
            ),
            subtitle: format!(
                "git {} · load average at start {} · {}",
                self.run.git_rev,
                self.load_average.as_deref().unwrap_or("n/a"),
                self.urls.join(", ")
            ),
            x_label: "seconds since the start of the churn".into(),
            marks: Vec::new(),
            panels: vec![
                Panel::new(
                    "per second",
                    vec![
                        Series {
                            name: "connects".into(),
                            color: "#1f77b4",
                            points: pts(&|p| p.connects as f64),
                        },
                        Series {
                            name: "disconnects".into(),
                            color: "#ff7f0e",
                            points: pts(&|p| p.disconnects as f64),
                        },
                        Series {
                            name: "failures".into(),
                            color: "#d62728",
                            points: pts(&|p| p.failures as f64),
                        },
                    ],
                ),
                Panel::new(
                    "connect latency (ms)",
                    vec![
                        Series {
                            name: "p50".into(),
                            color: "#2ca02c",
                            points: pts(&|p| p.connect_p50_us as f64 / 1000.0),
                        },
                        Series {
                            name: "p99".into(),
                            color: "#9467bd",
                            points: pts(&|p| p.connect_p99_us as f64 / 1000.0),
                        },
                        Series {
                            name: "max".into(),
                            color: "#8c564b",
                            points: pts(&|p| p.connect_max_us as f64 / 1000.0),
                        },
                    ],
                ),
            ],
        }
        .to_svg()
    }
}

impl Outcome for ChurnReport {
    fn to_markdown(&self) -> String {
        let mut out = String::new();
        report::title_md(&mut out, "churn", &self.run.command);
        out.push_str(&format!(
            "git `{}` · nproc {} · load average at start {} · {} slots, target {} reconnects/s \
             (mean lifetime {:.2} s) for {} s, {} rooms, {} · seed {} · {}\n\n",
            self.run.git_rev,
            self.run.nproc,
            self.load_average.as_deref().unwrap_or("n/a"),
            self.connections,
            self.target_rate,
            self.mean_lifetime_s,
            self.duration_s,
            self.rooms,
            if self.send {
                "one acked send per session"
            } else {
                "no sends"
            },
            self.seed,
            self.auth
        ));
        let rows = [
            (
                "connects / disconnects (per s)",
                format!(
                    "{} / {} ({:.1}/s / {:.1}/s; target {}/s)",
                    self.connects,
                    self.disconnects,
                    self.connects_per_s,
                    self.disconnects_per_s,
                    self.target_rate
                ),
            ),
            ("attempts", self.attempts.to_string()),
            ("join failures", map_or_none(&self.join_failures)),
            ("closed by the server", map_or_none(&self.server_closes)),
            ("error frames", map_or_none(&self.errors)),
            ("sends / acks", format!("{} / {}", self.sends, self.acks)),
            ("sends rejected", map_or_none(&self.rejected)),
            ("sends unanswered", map_or_none(&self.unanswered)),
            (
                "closes unanswered / open at the end",
                format!("{} / {}", self.close_unanswered, self.final_closes),
            ),
            (
                "server RSS kept after the storm",
                report::opt_mib(self.rss_retained_bytes),
            ),
            (
                "bench CPU (% of one core)",
                report::bench_cpu_cell(self.bench_cpu_percent, self.bench_saturated),
            ),
        ];
        report::metric_table(&mut out, rows);
        out.push('\n');
        report::latency_table_ms(
            &mut out,
            &[
                ("connect (TCP + upgrade + joined)", &self.connect_latency_us),
                ("send to ack", &self.ack_latency_us),
            ],
        );
        out.push('\n');
        servers::table(&mut out, &self.servers, "at the end of the storm");
        report::notes_md(&mut out, &self.notes);
        out
    }

    fn svg(&self) -> Option<String> {
        Some(self.chart())
    }
}

pub async fn run(args: ChurnArgs, command: String) -> Result<ChurnReport, BenchError> {
    args.validate(Limits::of_this_machine())
        .map_err(BenchError::Config)?;
    let load_average = report::load_average();
    let started_unix_ms = harness::unix_ms();
    let nofile_note = harness::raise_open_files(args.connections, "slots");
    let auth = Arc::new(harness::auth(&args.auth)?);
    let mut targets = Vec::new();
    for u in &args.urls {
        targets.push(harness::target(u).await?);
    }
    let sources = args.sources();
    let watched = Watched::resolve(servers::metrics_urls(&args.urls, &args.metrics_urls)).await;
    let before = watched.sample().await;
    let started = tokio::time::Instant::now();
    let end = started + Duration::from_secs_f64(args.duration);
    let tally = Arc::new(Tally {
        started,
        seconds: Mutex::new(Seconds::default()),
        stats: Mutex::new(Stats {
            connect_hist: Some(new_histogram()),
            ack_hist: Some(new_histogram()),
            ..Default::default()
        }),
    });
    let (release_tx, release_rx) = watch::channel(false);
    let plan = Arc::new(SlotPlan {
        tally: tally.clone(),
        targets: Arc::new(targets),
        auth: auth.clone(),
        sources: Arc::new(sources.clone()),
        room_prefix: Arc::from(args.room_prefix()),
        user_prefix: Arc::from(args.user_prefix.as_str()),
        rooms: args.rooms,
        send: args.send,
        seed: args.seed,
        mean: Duration::from_secs_f64(args.mean_lifetime()),
        end,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
        ack_timeout: Duration::from_secs_f64(args.ack_timeout),
        release: release_rx,
    });
    let cpu = CpuMeter::start();
    let mut slots = tokio::task::JoinSet::new();
    for s in 0..args.connections {
        slots.spawn(slot(plan.clone(), s));
    }
    let progress = Progress::start(args.quiet, progress_line(tally.clone()));
    tokio::time::sleep_until(end).await;
    drop(progress);
    let bench_cpu_percent = cpu.percent();
    let loaded = watched.sample().await;
    let _ = release_tx.send(true);
    // Every slot ends within its current step's bound after `end`.
    let bound = tokio::time::Instant::now()
        + Duration::from_secs_f64(args.connect_timeout + args.ack_timeout)
        + CLOSE_GRACE * 2
        + Duration::from_secs(5);
    let stuck = loop {
        match tokio::time::timeout_at(bound, slots.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break 0,
            Err(_) => {
                let n = slots.len();
                slots.abort_all();
                break n;
            }
        }
    };
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after = watched.sample().await;

    let mut r = ChurnReport {
        run: RunFacts::new("churn", command),
        load_average,
        started_unix_ms,
        urls: args.urls.clone(),
        auth: auth.describe().into(),
        connections: args.connections,
        target_rate: args.rate,
        mean_lifetime_s: args.mean_lifetime(),
        duration_s: args.duration,
        rooms: args.rooms,
        send: args.send,
        seed: args.seed,
        source_addresses: sources.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    counts(&mut r, &tally, args.duration);
    r.bench_cpu_percent = bench_cpu_percent;
    r.bench_saturated = r
        .bench_cpu_percent
        .is_some_and(|c| report::is_saturated(c, r.run.nproc));
    r.servers = servers::figures(&watched.servers, &before, &loaded, &after);
    r.rss_retained_bytes = servers::rss_retained(&r.servers);

    r.notes = notes(&args, &r, nofile_note, stuck);
    Ok(r)
}

/// The progress line: connects, disconnects, failures, server closes and acks so far.
fn progress_line(tally: Arc<Tally>) -> impl FnMut() -> String + Send {
    move || {
        let Ok(s) = tally.stats.lock() else {
            return "[churn] counts unavailable".into();
        };
        format!(
            "[{:>6.1}s churn] connects {}  disconnects {}  failures {}  server closes {}  acks {}/{}",
            tally.started.elapsed().as_secs_f64(),
            s.connects,
            s.disconnects,
            s.failures.values().sum::<u64>(),
            s.server_closes.values().sum::<u64>(),
            s.acks,
            s.sends
        )
    }
}

/// What the slots tallied, into the report: counts, latencies, rates and the timeline.
fn counts(r: &mut ChurnReport, tally: &Tally, duration: f64) {
    if let Ok(mut s) = tally.stats.lock() {
        r.attempts = s.attempts;
        r.connects = s.connects;
        r.disconnects = s.disconnects;
        r.final_closes = s.final_closes;
        r.close_unanswered = s.close_unanswered;
        r.join_failures = std::mem::take(&mut s.failures);
        r.server_closes = std::mem::take(&mut s.server_closes);
        r.errors = std::mem::take(&mut s.errors);
        r.sends = s.sends;
        r.acks = s.acks;
        r.rejected = std::mem::take(&mut s.rejected);
        r.unanswered = std::mem::take(&mut s.unanswered);
        if let Some(h) = &s.connect_hist {
            r.connect_latency_us = LatencySummary::from_histogram(h);
        }
        if let Some(h) = &s.ack_hist {
            r.ack_latency_us = LatencySummary::from_histogram(h);
        }
    }
    // Connects count as they happen within the run; so do the churn disconnects.
    r.connects_per_s = r.connects as f64 / duration;
    let server_closed: u64 = r.server_closes.values().sum();
    r.disconnects_per_s = (r.disconnects + server_closed) as f64 / duration;
    if let Ok(s) = tally.seconds.lock() {
        r.timeline = s
            .iter()
            .filter(|(i, _)| (*i as f64) < duration)
            .map(|(i, x)| {
                let l = x.latency();
                ChurnPoint {
                    t_s: i as f64,
                    connects: x.counts[CONNECTS],
                    disconnects: x.counts[DISCONNECTS],
                    failures: x.counts[FAILURES],
                    connect_p50_us: l.p50,
                    connect_p99_us: l.p99,
                    connect_max_us: l.max,
                }
            })
            .collect();
    }
}

/// What a reader of the report must know about how the run went.
fn notes(
    args: &ChurnArgs,
    r: &ChurnReport,
    nofile_note: Option<String>,
    stuck: usize,
) -> Vec<String> {
    let mut notes = vec![report::load_note(r.load_average.as_deref(), r.run.nproc)];
    notes.extend(nofile_note);
    if r.bench_saturated {
        notes.push(format!(
            "load generator saturated ({:.0}% of one core on {} cores): the rates and latency \
             measure the bench as much as the servers",
            r.bench_cpu_percent.unwrap_or_default(),
            r.run.nproc
        ));
    }
    if r.connects_per_s < args.rate * 0.8 {
        notes.push(format!(
            "the churn fell short of its target ({:.1}/s of {}/s): connects took longer than \
             the lifetimes allow, failed, or the bench was the limit",
            r.connects_per_s, args.rate
        ));
    }
    notes.push(
        "disconnects/s counts the bench's closes at the end of each lifetime plus closes the \
         server initiated; the connections still open at the end are closed then and counted \
         apart"
            .into(),
    );
    notes.push(
        "server RSS: before the churn, at its end (all slots connected or reconnecting), and \
         after the last close plus --settle; a kept difference after the storm is memory that \
         did not come back (allocator retention included)"
            .into(),
    );
    if stuck > 0 {
        notes.push(format!(
            "{stuck} slots did not stop in time and were aborted"
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::flags;
    fn args(extra: &[&str]) -> ChurnArgs {
        crate::args::parse(extra)
    }

    const LIMITS: Limits = Limits {
        nofile_hard: 20_000,
        ports_per_source: 28_232,
    };

    #[test]
    fn defaults_validate_and_bad_flags_are_named() {
        assert_eq!(args(&[]).validate(LIMITS), Ok(()));
        for (flags, needle) in [
            (vec!["--connections", "0"], "--connections"),
            (vec!["--rate", "0"], "--rate"),
            (vec!["--duration", "0"], "--duration"),
            (vec!["--ack-timeout", "0"], "--ack-timeout"),
            // 200 slots at 1/s: 200 s lifetimes do not fit in 30 s.
            (vec!["--rate", "1"], "--rate"),
            (vec!["--rooms", "0"], "--rooms"),
            (flags("--connections 30000 --rate 10000"), "--connections"),
            (vec!["--source-addresses", "300"], "--source-addresses"),
            (vec!["--jwt-ttl", "0"], "--jwt-ttl"),
        ] {
            let e = args(&flags).validate(LIMITS).expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn seeded_lifetimes_repeat_and_differ_per_slot() {
        let a: Vec<u64> = (0..5).map(|_| slot_rng(7, 3).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(slot_rng(7, 3).next_u64(), slot_rng(7, 4).next_u64());
        assert_ne!(slot_rng(7, 3).next_u64(), slot_rng(8, 3).next_u64());
        let mut r = SplitMix64::new(1);
        let xs: Vec<f64> = (0..10_000).map(|_| r.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.48..0.52).contains(&mean), "{mean}");
    }

    #[test]
    fn report_and_chart_render() {
        let mut r = ChurnReport {
            run: RunFacts::new("churn", String::new()),
            connects: 100,
            disconnects: 90,
            connects_per_s: 10.0,
            disconnects_per_s: 9.0,
            timeline: vec![
                ChurnPoint {
                    t_s: 0.0,
                    connects: 10,
                    connect_p99_us: 3000,
                    ..Default::default()
                },
                ChurnPoint {
                    t_s: 1.0,
                    connects: 12,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        r.server_closes.insert("4003 token_expired".into(), 2);
        let md = r.to_markdown();
        assert!(md.contains("100 / 90 (10.0/s / 9.0/s"), "{md}");
        assert!(md.contains("4003 token_expired: 2"), "{md}");
        let svg = r.chart();
        assert_eq!(svg.matches("<polyline").count(), 6);
    }
}
