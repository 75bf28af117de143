//! The `connections` scenario: ramp to N concurrent connections at a given rate, hold them,
//! close them, and report connect latency, the connect rate reached, failures by kind and
//! what each connection costs the servers in memory.
//!
//! The parent process only plans and reports: it starts `--processes` workers (this same
//! binary, hidden `__worker` subcommand, see [`crate::workers`]), each of which opens its
//! slice of the connections from its share of the `--source-addresses`, so a run is not
//! bound by one process's open-file limit or one address's ephemeral ports. The parent
//! samples the servers' `/metrics` before the ramp, at the end of the hold and after the
//! close (plus `--settle`), tells the workers to close, and merges their counts and
//! connect-latency histograms into one report.
//!
//! Every phase is bounded: the ramp by its schedule plus the connect timeout, the hold by
//! `--hold`, the close by a grace; workers close by themselves if the parent goes quiet.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Semaphore;

use crate::args::{seconds, MAX_SECONDS};
use crate::auth::{Auth, AuthArgs};
use crate::chart::{latency_panel, Chart, Panel, Series};
use crate::client::{ConnectOptions, Target};
use crate::harness::{self, unix_ms, Outcome, RunFacts};
use crate::idle::{self, Live};
use crate::report::{self, map_or_none, new_histogram, LatencySummary};
use crate::servers::{self, ServerFigures, Watched};
use crate::timeline::{second_of, Seconds};
use crate::workers::{self, validate_spread, Limits, WorkerEvent, WorkerPlan, WorkerResult};
use crate::BenchError;

/// Options of `chat-bench connections`.
#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// WebSocket URL of a node or router (path defaults to /ws). Repeat it to spread the
    /// rooms over several targets (e.g. several routers); room r goes to URL r mod count.
    #[arg(
        long = "url",
        env = "CHAT_BENCH_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:7001"
    )]
    pub urls: Vec<String>,
    /// A server whose `/metrics` to sample for CPU and RSS (`http://host:port`); repeat
    /// for every node behind a router. Default: each --url's own host and port.
    #[arg(
        long = "metrics-url",
        env = "CHAT_BENCH_METRICS_URL",
        value_delimiter = ','
    )]
    pub metrics_urls: Vec<String>,
    /// Connections to open in total.
    #[arg(long, env = "CHAT_BENCH_CONNECTIONS", default_value_t = 1000)]
    pub connections: usize,
    /// Target connect rate, in new connections per second over all processes.
    #[arg(long, env = "CHAT_BENCH_CONNECT_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold every connection open once the ramp is done.
    #[arg(long, env = "CHAT_BENCH_HOLD", default_value_t = 10.0)]
    pub hold: f64,
    /// Members per room: connection i joins room i / members.
    #[arg(long, env = "CHAT_BENCH_MEMBERS", default_value_t = 10)]
    pub members: usize,
    /// Load generator processes; each holds at most ~19,000 connections (open files).
    #[arg(long, env = "CHAT_BENCH_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// Bind connections to K loopback source addresses 127.0.0.1..127.0.0.K in turn, each
    /// with its own ~28,000 ephemeral ports. Loopback targets only; 1 = no binding.
    #[arg(long, env = "CHAT_BENCH_SOURCE_ADDRESSES", default_value_t = 1)]
    pub source_addresses: usize,
    /// Bind connections to these local addresses in turn instead (any reachable address
    /// of this machine); repeatable or comma-separated. Overrides --source-addresses.
    #[arg(long = "source-address", value_delimiter = ',')]
    pub source_address_list: Vec<IpAddr>,
    /// Connection attempts in flight at once, per process.
    #[arg(long, env = "CHAT_BENCH_CONNECT_CONCURRENCY", default_value_t = 512)]
    pub connect_concurrency: usize,
    /// Seconds one connection may take to connect and be joined.
    #[arg(long, env = "CHAT_BENCH_CONNECT_TIMEOUT", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds after the close before the last metrics sample (does memory come back?).
    #[arg(long, env = "CHAT_BENCH_SETTLE", default_value_t = 3.0)]
    pub settle: f64,
    /// Connections that may fail before the run exits with status 1 (the report is still
    /// written).
    #[arg(long, env = "CHAT_BENCH_MAX_CONNECT_FAILURES", default_value_t = 0)]
    pub max_connect_failures: u64,
    /// Users are named `<prefix>-<index>`.
    #[arg(long, env = "CHAT_BENCH_USER_PREFIX", default_value = "conn")]
    pub user_prefix: String,
    /// Rooms are named `<prefix>-<room index>`; defaults to `conn-<unix seconds>`.
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
    /// Write connections open, connects/s and connect latency per second of the ramp and
    /// hold as an SVG chart to this file. The JSON report carries them as `timeline`.
    #[arg(long, env = "CHAT_BENCH_CHART")]
    pub chart: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, env = "CHAT_BENCH_QUIET")]
    pub quiet: bool,
}

const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_RATE: f64 = 100_000.0;
/// How long the server gets to echo our close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Time for worker processes to start before their ramp deadline counts.
const START_GRACE: Duration = Duration::from_secs(20);

impl ConnectionsArgs {
    pub fn room_prefix(&self) -> String {
        crate::args::room_prefix(self.room_prefix.as_deref(), "conn")
    }

    pub fn sources(&self) -> Vec<IpAddr> {
        workers::sources(&self.source_address_list, self.source_addresses)
    }

    /// Checks every flag against `limits`; the message names the flag.
    pub fn validate(&self, limits: Limits) -> Result<(), String> {
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(format!(
                "--connections must be between 1 and {MAX_CONNECTIONS}"
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(format!(
                "--rate must be in (0, {MAX_RATE}] connections per second"
            ));
        }
        if self.connections as f64 / self.rate > MAX_SECONDS {
            return Err("--rate is too low: the ramp would take more than a day".into());
        }
        seconds("hold", self.hold, false)?;
        seconds("connect-timeout", self.connect_timeout, true)?;
        seconds("settle", self.settle, false)?;
        if self.members == 0 {
            return Err("--members must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.connect_concurrency) {
            return Err("--connect-concurrency must be between 1 and 10000".into());
        }
        validate_spread(
            &self.urls,
            self.connections,
            self.processes,
            self.source_addresses,
            &self.source_address_list,
            limits,
        )?;
        crate::args::check_user_prefix(format!("{}-{}", self.user_prefix, self.connections - 1))?;
        crate::args::check_room_prefix(format!("{}-{}", self.room_prefix(), self.connections))?;
        for m in &self.metrics_urls {
            let ok = m
                .parse::<hyper::Uri>()
                .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if !ok {
                return Err(format!(
                    "--metrics-url {m:?} must look like http://host:port"
                ));
            }
        }
        Auth::from_args(&self.auth)?;
        Ok(())
    }
}

/// Everything one `connections` run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionsReport {
    #[serde(flatten)]
    pub run: RunFacts,
    /// `/proc/loadavg` (1/5/15 min) when the run started.
    pub load_average: Option<String>,
    pub started_unix_ms: u64,
    pub urls: Vec<String>,
    pub auth: String,
    pub target_connections: u64,
    pub target_rate: f64,
    pub hold_s: f64,
    pub members_per_room: usize,
    pub processes: usize,
    pub source_addresses: Vec<String>,
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Server-side closes (or drops) during the hold, by close label.
    pub server_closes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub closed_cleanly: u64,
    pub close_unanswered: u64,
    /// From the first attempt to the last worker's last `joined`.
    pub ramp_s: f64,
    /// `joined / ramp_s`.
    pub achieved_rate: f64,
    pub connect_latency_us: LatencySummary,
    /// Per worker: joined, failed, its own ramp seconds.
    pub workers: Vec<WorkerSummary>,
    /// All workers' CPU over the ramp, as percent of one core over the ramp's wall time.
    pub bench_ramp_cpu_percent: Option<f64>,
    pub bench_saturated: bool,
    pub servers: Vec<ServerFigures>,
    /// Σ RSS growth of the servers from before the ramp to the end of the hold, per joined
    /// connection.
    pub rss_per_connection_bytes: Option<f64>,
    /// Σ RSS after the close + settle minus before the ramp.
    pub rss_retained_bytes: Option<i64>,
    /// SYNs this machine dropped on full accept queues during the ramp (see
    /// `report::listen_overflows`).
    pub listen_overflows_during_ramp: Option<u64>,
    pub notes: Vec<String>,
    /// Per second from the start of the ramp to the end of the hold, all workers merged.
    pub timeline: Vec<ConnectionsPoint>,
    /// `--max-connect-failures`: more failures make the run fail (not in the JSON).
    #[serde(skip)]
    pub max_connect_failures: u64,
}

/// One second of a `connections` run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConnectionsPoint {
    /// Seconds since the ramp started, at the start of this second.
    pub t_s: f64,
    /// Connections joined by the end of this second. Closes by the server during the hold
    /// are not timed (the workers see them at the close): they are in `server_closes`.
    pub connections_open: u64,
    /// Connections that got their `joined` in this second.
    pub connects: u64,
    /// Attempts that failed in this second.
    pub failures: u64,
    /// Connect latency (TCP connect to `joined`) of this second's connects, in µs.
    pub connect_p50_us: u64,
    pub connect_p99_us: u64,
    pub connect_max_us: u64,
}

// Per-second counts a worker sends (see `WorkerResult::timeline`).
const CONNECTS: usize = 0;
const FAILURES: usize = 1;

/// The worker's `Instant` for the parent's timeline origin (same machine, same clock), or
/// its own start without one.
fn timeline_origin(origin_unix_ms: Option<u64>, own_start: Instant) -> Instant {
    origin_unix_ms
        .and_then(|ms| {
            let ago = Duration::from_millis(unix_ms().saturating_sub(ms));
            Instant::now().checked_sub(ago)
        })
        .unwrap_or(own_start)
}

/// The workers' seconds merged, through `until` (the end of the hold).
fn timeline(results: &[WorkerResult], until: Duration) -> Vec<ConnectionsPoint> {
    let mut s = Seconds::<2>::default();
    for w in results {
        s.merge_wire(&w.timeline);
    }
    s.extend_to(until.as_secs_f64().ceil() as usize);
    let open = s.running(CONNECTS, None);
    s.iter()
        .map(|(i, x)| {
            let l = x.latency();
            ConnectionsPoint {
                t_s: i as f64,
                connections_open: open[i].max(0) as u64,
                connects: x.counts[CONNECTS],
                failures: x.counts[FAILURES],
                connect_p50_us: l.p50,
                connect_p99_us: l.p99,
                connect_max_us: l.max,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerSummary {
    pub worker: usize,
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub ramp_s: f64,
    pub ramp_cpu_s: Option<f64>,
    pub nofile: String,
}

impl ConnectionsReport {
    /// Connections open, connects/s and connect latency per second of the ramp and hold.
    pub fn chart(&self) -> String {
        let t = &self.timeline;
        let at = |p: &ConnectionsPoint| p.t_s;
        Chart {
            title: format!(
                "chat-bench connections: {} at {}/s over {} processes, hold {} s",
                self.target_connections, self.target_rate, self.processes, self.hold_s
            ),
            subtitle: format!(
                "git {} · load average at start {} · {}",
                self.run.git_rev,
                self.load_average.as_deref().unwrap_or("n/a"),
                self.urls.join(", ")
            ),
            x_label: "seconds since the start of the ramp".into(),
            panels: vec![
                Panel::new(
                    "connections",
                    vec![Series::of("open", "#9467bd", t, at, |p| {
                        p.connections_open as f64
                    })],
                ),
                Panel::new(
                    "per second",
                    vec![
                        Series::of("connects", "#2ca02c", t, at, |p| p.connects as f64),
                        Series::of("failures", "#8c564b", t, at, |p| p.failures as f64),
                    ],
                ),
                latency_panel(
                    "connect latency (ms)",
                    t,
                    at,
                    |p| p.connects > 0,
                    [
                        |p| p.connect_p50_us,
                        |p| p.connect_p99_us,
                        |p| p.connect_max_us,
                    ],
                ),
            ],
            marks: Vec::new(),
        }
        .to_svg()
    }
}

impl Outcome for ConnectionsReport {
    fn to_markdown(&self) -> String {
        let mut out = String::new();
        report::title_md(&mut out, "connections", &self.run.command);
        out.push_str(&format!(
            "git `{}` · nproc {} · load average at start {} · {} connections at {} /s, held {} s, \
             {} per room · {} process(es) · source addresses: {} · {}\n\n",
            self.run.git_rev,
            self.run.nproc,
            self.load_average.as_deref().unwrap_or("n/a"),
            self.target_connections,
            self.target_rate,
            self.hold_s,
            self.members_per_room,
            self.processes,
            if self.source_addresses.is_empty() {
                "default (unbound)".to_owned()
            } else {
                self.source_addresses.join(", ")
            },
            self.auth,
        ));
        let per_conn = self.rss_per_connection_bytes.map_or_else(
            || "n/a".to_owned(),
            |b| format!("{:.1} KiB ({b:.0} B)", b / 1024.0),
        );
        let rows = [
            (
                "joined / attempted",
                format!("{} / {}", self.joined, self.attempted),
            ),
            ("connect failures", map_or_none(&self.failures)),
            (
                "connect rate reached (joined/s)",
                format!(
                    "{:.0} of {} asked ({:.2} s ramp)",
                    self.achieved_rate, self.target_rate, self.ramp_s
                ),
            ),
            (
                "closed by the server during the hold",
                map_or_none(&self.server_closes),
            ),
            ("error frames", map_or_none(&self.errors)),
            (
                "our closes echoed / unanswered",
                format!("{} / {}", self.closed_cleanly, self.close_unanswered),
            ),
            ("server RSS per connection", per_conn),
            (
                "SYNs dropped on full accept queues (this machine, during the ramp)",
                self.listen_overflows_during_ramp
                    .map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
            ),
            (
                "server RSS kept after close",
                report::opt_mib(self.rss_retained_bytes),
            ),
            (
                "bench CPU during the ramp (% of one core, all processes)",
                report::bench_cpu_cell(self.bench_ramp_cpu_percent, self.bench_saturated),
            ),
        ];
        report::metric_table(&mut out, rows);
        out.push('\n');
        report::latency_table_ms(
            &mut out,
            &[("connect (TCP + upgrade + joined)", &self.connect_latency_us)],
        );
        out.push('\n');
        servers::table(&mut out, &self.servers, "held");
        out.push_str("\n| worker | attempted | joined | failed | ramp s | ramp CPU s | open files |\n|---|---|---|---|---|---|---|\n");
        for w in &self.workers {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} | {} | {} |\n",
                w.worker,
                w.attempted,
                w.joined,
                w.failed,
                w.ramp_s,
                w.ramp_cpu_s
                    .map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}")),
                w.nofile
            ));
        }
        report::notes_md(&mut out, &self.notes);
        out
    }

    fn svg(&self) -> Option<String> {
        Some(self.chart())
    }

    fn verdict(&self) -> Result<(), BenchError> {
        if self.failed > self.max_connect_failures {
            return Err(crate::harness::failed(format!(
                "{} of {} connections failed (allowed: {}): {}",
                self.failed,
                self.attempted,
                self.max_connect_failures,
                report::map_or_none(&self.failures)
            )));
        }
        Ok(())
    }
}

/// Runs the scenario from the parent: plan, start workers, sample, merge. `Err(Failed)`
/// only when the run could not be carried out; failures beyond the allowance are reported
/// and then turned into exit status 1 by the report's verdict. The steps:
/// `start_workers`, `ramp`, the hold, `collect_workers`, `assemble`.
pub async fn run(args: ConnectionsArgs, command: String) -> Result<ConnectionsReport, BenchError> {
    args.validate(Limits::of_this_machine())
        .map_err(BenchError::Config)?;
    let load_average = report::load_average();
    let started_unix_ms = unix_ms();
    let watched = Watched::resolve(servers::metrics_urls(&args.urls, &args.metrics_urls)).await;
    let auth = harness::auth(&args.auth)?;
    let before = watched.sample().await;
    let overflows0 = report::listen_overflows();
    let ramp_deadline =
        Duration::from_secs_f64(args.connections as f64 / args.rate + args.connect_timeout)
            + START_GRACE;
    let started = Instant::now();
    let mut procs = start_workers(&args, ramp_deadline).await?;
    let mut problems = ramp(&args, &mut procs, ramp_deadline).await;
    let overflows1 = report::listen_overflows();
    if !args.quiet {
        eprintln!(
            "chat-bench connections: {}/{} workers ramped in {:.2} s; holding {} s",
            args.processes - problems.len().min(args.processes),
            args.processes,
            started.elapsed().as_secs_f64(),
            args.hold
        );
    }
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let hold_end = Instant::now();
    let loaded = watched.sample().await;
    let results = collect_workers(&mut procs, &mut problems).await;
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after = watched.sample().await;
    let mut r = ConnectionsReport {
        run: RunFacts::new("connections", command),
        load_average,
        started_unix_ms,
        urls: args.urls.clone(),
        auth: auth.describe().into(),
        target_connections: args.connections as u64,
        target_rate: args.rate,
        hold_s: args.hold,
        members_per_room: args.members,
        processes: args.processes,
        source_addresses: args.sources().iter().map(ToString::to_string).collect(),
        max_connect_failures: args.max_connect_failures,
        servers: servers::figures(&watched.servers, &before, &loaded, &after),
        listen_overflows_during_ramp: overflows0.zip(overflows1).map(|(a, b)| b.saturating_sub(a)),
        timeline: timeline(&results, hold_end.duration_since(started)),
        ..Default::default()
    };
    assemble(&mut r, &results);
    r.notes = notes(&args, &r, problems);
    Ok(r)
}

/// Starts the worker processes, each with its plan; the parent's start is the timeline's
/// origin for all of them.
async fn start_workers(
    args: &ConnectionsArgs,
    ramp_deadline: Duration,
) -> Result<Vec<workers::WorkerProc>, BenchError> {
    let origin_unix_ms = unix_ms();
    let mut procs = Vec::with_capacity(args.processes);
    for w in 0..args.processes {
        let plan = WorkerPlan {
            worker: w,
            processes: args.processes,
            urls: args.urls.clone(),
            connections: args.connections,
            rate: args.rate,
            members: args.members,
            room_prefix: args.room_prefix(),
            user_prefix: args.user_prefix.clone(),
            sources: args.sources(),
            connect_concurrency: args.connect_concurrency,
            connect_timeout_s: args.connect_timeout,
            max_hold_s: ramp_deadline.as_secs_f64() + args.hold + 60.0,
            auth: args.auth.clone(),
            timeline_origin_unix_ms: Some(origin_unix_ms),
        };
        let p = workers::spawn(&plan)
            .await
            .map_err(|e| harness::failed(format!("starting worker {w}: {e:#}")))?;
        procs.push(p);
    }
    Ok(procs)
}

/// Waits for every worker to report `ramped` (or fail) before the deadline; what went wrong,
/// one line a worker.
async fn ramp(
    args: &ConnectionsArgs,
    procs: &mut [workers::WorkerProc],
    ramp_deadline: Duration,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + ramp_deadline;
    let mut problems = Vec::new();
    for p in procs {
        match tokio::time::timeout_at(deadline, p.next_event()).await {
            Ok(Some(WorkerEvent::Ramped {
                worker,
                joined,
                failed,
            })) => {
                if !args.quiet {
                    eprintln!("chat-bench connections: worker {worker} ramped: {joined} joined, {failed} failed");
                }
            }
            Ok(Some(WorkerEvent::Failed { worker, message })) => {
                problems.push(format!("worker {worker}: {message}"))
            }
            Ok(Some(WorkerEvent::Done(_))) | Ok(None) => problems.push(format!(
                "worker {} ended before its ramp was done",
                p.worker
            )),
            Err(_) => problems.push(format!(
                "worker {} did not finish its ramp within {:.0} s",
                p.worker,
                ramp_deadline.as_secs_f64()
            )),
        }
    }
    problems
}

/// Tells every worker to close its connections and collects what each reports.
async fn collect_workers(
    procs: &mut [workers::WorkerProc],
    problems: &mut Vec<String>,
) -> Vec<WorkerResult> {
    for p in procs.iter_mut() {
        p.close().await;
    }
    let done_deadline = tokio::time::Instant::now() + CLOSE_GRACE + Duration::from_secs(30);
    let mut results = Vec::with_capacity(procs.len());
    for p in procs {
        loop {
            let problem = match tokio::time::timeout_at(done_deadline, p.next_event()).await {
                Ok(Some(WorkerEvent::Done(r))) => {
                    results.push(r);
                    break;
                }
                Ok(Some(WorkerEvent::Ramped { .. })) => continue,
                Ok(Some(WorkerEvent::Failed { worker, message })) => {
                    format!("worker {worker}: {message}")
                }
                Ok(None) => format!("worker {} ended without its counts", p.worker),
                Err(_) => format!("worker {} did not report after the close", p.worker),
            };
            problems.push(problem);
            break;
        }
        if harness::within(Duration::from_secs(5), p.child.wait())
            .await
            .is_none()
        {
            let _ = p.child.start_kill();
        }
    }
    results
}

/// The workers' counts merged into the report.
fn assemble(r: &mut ConnectionsReport, results: &[WorkerResult]) {
    let mut ramp_cpu = Some(0.0);
    for w in results {
        r.attempted += w.attempted;
        r.joined += w.joined;
        r.failed += w.failed;
        report::add_counts(&mut r.failures, &w.failures);
        report::add_counts(&mut r.server_closes, &w.server_closes);
        report::add_counts(&mut r.errors, &w.errors);
        r.closed_cleanly += w.closed_cleanly;
        r.close_unanswered += w.close_unanswered;
        r.ramp_s = r.ramp_s.max(w.ramp_s);
        ramp_cpu = ramp_cpu.zip(w.ramp_cpu_s).map(|(a, b)| a + b);
        r.workers.push(WorkerSummary {
            worker: w.worker,
            attempted: w.attempted,
            joined: w.joined,
            failed: w.failed,
            ramp_s: w.ramp_s,
            ramp_cpu_s: w.ramp_cpu_s,
            nofile: w.nofile.clone(),
        });
    }
    r.achieved_rate = if r.ramp_s > 0.0 {
        r.joined as f64 / r.ramp_s
    } else {
        0.0
    };
    r.connect_latency_us = LatencySummary::from_histogram(&workers::merged_histogram(results));
    r.bench_ramp_cpu_percent = ramp_cpu
        .filter(|_| r.ramp_s > 0.0 && !results.is_empty())
        .map(|c| c / r.ramp_s * 100.0);
    r.bench_saturated = r
        .bench_ramp_cpu_percent
        .is_some_and(|c| report::is_saturated(c, r.run.nproc));
    r.rss_per_connection_bytes = servers::rss_per_connection(&r.servers, r.joined);
    r.rss_retained_bytes = servers::rss_retained(&r.servers);
}

/// What a reader of the report must know about how the run went.
fn notes(args: &ConnectionsArgs, r: &ConnectionsReport, problems: Vec<String>) -> Vec<String> {
    let mut notes = vec![report::load_note(r.load_average.as_deref(), r.run.nproc)];
    notes.extend(problems);
    if let Some(n) = r.listen_overflows_during_ramp.filter(|n| *n > 0) {
        notes.push(format!(
            "this machine dropped {n} SYNs on full accept queues during the ramp \
             (TcpExt ListenOverflows, machine-wide): each costs its client a 1 s (then 3 s) \
             retransmit, which shows as a second mode in connect latency; lower \
             --connect-concurrency or raise the servers' listen backlog"
        ));
    }
    if r.rss_retained_bytes.is_some_and(|b| b > 0)
        || r.rss_per_connection_bytes.is_some_and(|b| b < 1024.0)
    {
        notes.push(
            "servers keep freed memory for reuse (RSS does not fall after the close, and a \
             repeat run on the same processes grows it little): measure memory per \
             connection on freshly started servers"
                .into(),
        );
    }
    if r.bench_saturated {
        notes.push(format!(
            "load generator saturated during the ramp ({:.0}% of one core on {} cores): the \
             connect rate and latency measure the bench as much as the servers",
            r.bench_ramp_cpu_percent.unwrap_or_default(),
            r.run.nproc
        ));
    }
    if r.achieved_rate < args.rate * 0.9 && r.joined > 0 {
        notes.push(format!(
            "the ramp fell behind its schedule ({:.0}/s of {}/s asked): connects in flight were \
             capped at --connect-concurrency {} per process, or the servers or the bench were \
             the limit",
            r.achieved_rate, args.rate, args.connect_concurrency
        ));
    }
    notes.push(
        "RSS per connection is Σ over the scraped servers of (RSS at the end of the hold − \
         RSS before the ramp) / joined connections: it includes the rooms the connections \
         created and whatever the allocator keeps, not only per-socket state"
            .into(),
    );
    let closed: u64 = r.server_closes.values().sum();
    if closed > 0 {
        notes.push(format!(
            "{closed} connections were closed by the server while held (see closed by the server)"
        ));
    }
    if r.failed > args.max_connect_failures {
        notes.push(format!(
            "{} connections failed, more than --max-connect-failures {}: exit status 1",
            r.failed, args.max_connect_failures
        ));
    }
    notes
}

/// Runs a worker: reads its plan from stdin, opens its slice on schedule, reports
/// `ramped`, holds until `close` (or EOF, or `max_hold_s`), closes and reports `done`.
pub async fn run_worker() -> Result<(), BenchError> {
    let stdin = tokio::io::stdin();
    let mut lines = tokio::io::BufReader::new(stdin).lines();
    let plan_line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| BenchError::Config("worker: no plan on stdin within 30 s".into()))?
        .map_err(|e| BenchError::Config(format!("worker: reading the plan: {e}")))?
        .ok_or_else(|| BenchError::Config("worker: stdin closed before the plan".into()))?;
    let plan: WorkerPlan = serde_json::from_str(&plan_line)
        .map_err(|e| BenchError::Config(format!("worker: bad plan: {e}")))?;
    let emit = |ev: WorkerEvent| println!("{}", ev.to_line());
    let result = match worker_body(&plan, &mut lines, &emit).await {
        Ok(r) => r,
        Err(message) => {
            emit(WorkerEvent::Failed {
                worker: plan.worker,
                message: message.clone(),
            });
            return Err(BenchError::Failed(anyhow::anyhow!(message)));
        }
    };
    emit(WorkerEvent::Done(result));
    Ok(())
}

async fn worker_body(
    plan: &WorkerPlan,
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    emit: &impl Fn(WorkerEvent),
) -> Result<WorkerResult, String> {
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n.to_string(),
        Err(e) => format!("cannot raise: {e}"),
    };
    let auth = Arc::new(Auth::from_args(&plan.auth)?);
    let mut targets = Vec::with_capacity(plan.urls.len());
    for u in &plan.urls {
        targets.push(Arc::new(
            Target::resolve(u)
                .await
                .map_err(|e| format!("--url {u}: {e:#}"))?,
        ));
    }
    let cpu0 = report::self_cpu_seconds();
    let nsources = plan.sources.len();
    let mine: Vec<usize> = (0..plan.connections)
        .filter(|&i| workers::assign(i, plan.processes, nsources).worker == plan.worker)
        .collect();
    let permits = Arc::new(Semaphore::new(plan.connect_concurrency));
    let timeout = Duration::from_secs_f64(plan.connect_timeout_s);
    let t0 = tokio::time::Instant::now();
    let first = Instant::now();
    let origin = timeline_origin(plan.timeline_origin_unix_ms, first);
    let last_joined_ns = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for &i in &mine {
        // The schedule is global: connection i starts at i / rate.
        let at = t0 + Duration::from_secs_f64(i as f64 / plan.rate);
        tokio::time::sleep_until(at).await;
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "connect limiter closed".to_owned())?;
        let room_index = i / plan.members;
        let target = targets[room_index % targets.len()].clone();
        let room = format!("{}-{room_index}", plan.room_prefix);
        let user = format!("{}-{i}", plan.user_prefix);
        let source = (nsources > 0)
            .then(|| plan.sources[workers::assign(i, plan.processes, nsources).source]);
        let auth = auth.clone();
        let last = last_joined_ns.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let attempt = async {
                let credentials = auth.credentials(&user)?;
                let opts = ConnectOptions {
                    credentials,
                    source,
                    recv_buffer: None,
                };
                let j = idle::connect_joined(&target, &room, &opts, timeout).await?;
                last.fetch_max(first.elapsed().as_nanos() as u64, Relaxed);
                let us = j.connect_us;
                Ok::<(u64, Live), String>((us, idle::hold(j)))
            };
            // When it ended, for the timeline: tasks are collected only after the ramp.
            let r = attempt.await;
            (Instant::now(), r)
        });
    }
    let mut out = WorkerResult {
        worker: plan.worker,
        attempted: mine.len() as u64,
        nofile,
        ..Default::default()
    };
    let mut hist = new_histogram();
    let mut seconds = Seconds::<2>::default();
    let mut live = Vec::with_capacity(mine.len());
    // Every task ends within its connect timeout; the outer bound is a safety net.
    let drain_deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(drain_deadline, tasks.join_next()).await {
            Ok(Some(Ok((at, Ok((us, l)))))) => {
                hist.saturating_record(us.max(1));
                let i = second_of(origin, at);
                seconds.count(i, CONNECTS, 1);
                seconds.latency(i, us);
                live.push(l);
            }
            Ok(Some(Ok((at, Err(kind))))) => {
                seconds.count(second_of(origin, at), FAILURES, 1);
                out.failed += 1;
                *out.failures.entry(kind).or_default() += 1;
            }
            Ok(Some(Err(e))) => {
                seconds.count(second_of(origin, Instant::now()), FAILURES, 1);
                out.failed += 1;
                *out.failures
                    .entry(format!("connect task: {e}"))
                    .or_default() += 1;
            }
            Ok(None) => break,
            Err(_) => {
                let n = tasks.len() as u64;
                tasks.abort_all();
                out.failed += n;
                *out.failures
                    .entry("connect task stuck past its timeout".into())
                    .or_default() += n;
                break;
            }
        }
    }
    out.joined = live.len() as u64;
    out.ramp_s = last_joined_ns.load(Relaxed) as f64 / 1e9;
    out.ramp_cpu_s = cpu0.zip(report::self_cpu_seconds()).map(|(a, b)| b - a);
    emit(WorkerEvent::Ramped {
        worker: plan.worker,
        joined: out.joined,
        failed: out.failed,
    });

    // Hold until the parent says close (or goes away), within the plan's bound.
    let _ = tokio::time::timeout(Duration::from_secs_f64(plan.max_hold_s), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "close" {
                break;
            }
        }
    })
    .await;
    close_all(live, &mut out).await;
    out.connect_us = crate::latency::histogram_pairs(&hist);
    out.timeline = seconds.to_wire();
    out.cpu_s = report::self_cpu_seconds();
    Ok(out)
}

/// Closes every held connection (those the server already closed are counted as such)
/// and counts how each close went.
async fn close_all(live: Vec<Live>, out: &mut WorkerResult) {
    let mut closing = Vec::with_capacity(live.len());
    for l in live {
        if !l.ended_by_server() {
            closing.push(l);
        } else if let Some(end) = l.finish(Duration::ZERO).await {
            *out.server_closes.entry(end.close).or_default() += 1;
            report::add_counts(&mut out.errors, &end.errors);
        }
    }
    for l in &mut closing {
        l.request_close();
    }
    let mut finishing = tokio::task::JoinSet::new();
    for l in closing {
        finishing.spawn(l.finish(CLOSE_GRACE));
    }
    while let Some(res) = finishing.join_next().await {
        match res {
            Ok(Some(end)) => {
                out.closed_cleanly += 1;
                report::add_counts(&mut out.errors, &end.errors);
            }
            _ => out.close_unanswered += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::flags;
    fn args(extra: &[&str]) -> ConnectionsArgs {
        crate::args::parse(extra)
    }

    const LIMITS: Limits = Limits {
        nofile_hard: 20_000,
        ports_per_source: 28_232,
    };

    #[test]
    fn defaults_validate() {
        assert_eq!(args(&[]).validate(LIMITS), Ok(()));
        assert!(args(&[]).sources().is_empty());
        assert_eq!(args(&["--source-addresses", "3"]).sources().len(), 3);
        let a = args(&flags(
            "--url ws://127.0.0.1:1,ws://127.0.0.1:2 --url ws://127.0.0.1:3",
        ));
        assert_eq!(a.urls.len(), 3);
    }

    #[test]
    fn plans_that_cannot_work_name_their_flag() {
        for (flags, needle) in [
            (vec!["--connections", "0"], "--connections"),
            (vec!["--rate", "0"], "--rate"),
            (vec!["--rate", "inf"], "--rate"),
            (vec!["--hold=-1"], "--hold"),
            (vec!["--members", "0"], "--members"),
            (vec!["--connect-timeout", "0"], "--connect-timeout"),
            (vec!["--connect-concurrency", "0"], "--connect-concurrency"),
            (vec!["--processes", "0"], "--processes"),
            (vec!["--processes", "65"], "--processes"),
            // 40,000 in one process: over the open-file limit.
            (
                flags("--connections 40000 --source-addresses 2"),
                "--processes",
            ),
            // 40,000 over 3 processes but one source address: over its ports.
            (
                flags("--connections 40000 --processes 3"),
                "--source-addresses",
            ),
            (vec!["--source-addresses", "0"], "--source-addresses"),
            (vec!["--source-addresses", "255"], "--source-addresses"),
            (
                flags("--url ws://10.0.0.5:7001 --source-addresses 2"),
                "--source-addresses",
            ),
            (vec!["--url", "http//x"], "--url"),
            (vec!["--metrics-url", "ws://127.0.0.1:1"], "--metrics-url"),
            (vec!["--user-prefix", "a b"], "--user-prefix"),
            (vec!["--room-prefix", "r/1"], "--room-prefix"),
            (vec!["--jwt-secret", ""], "--jwt-secret"),
            (vec!["--jwt-ttl", "0"], "--jwt-ttl"),
            (vec!["--settle", "NaN"], "--settle"),
        ] {
            let e = args(&flags).validate(LIMITS).expect_err(needle);
            assert!(e.contains(needle), "{flags:?}: {e}");
        }
    }

    #[test]
    fn plans_within_the_limits_pass() {
        for flags in [
            flags("--connections 40000 --processes 3 --source-addresses 2"),
            flags("--connections 19000 --source-addresses 1"),
            // Two destinations unbound: 2 × 20,000 ports.
            flags("--connections 40000 --processes 3 --url ws://127.0.0.1:1,ws://127.0.0.1:2"),
            // An explicit list may name non-loopback addresses.
            flags("--url ws://10.0.0.5:7001 --source-address 10.0.0.9,10.0.0.10"),
        ] {
            assert_eq!(args(&flags).validate(LIMITS), Ok(()), "{flags:?}");
        }
    }

    #[test]
    fn report_renders() {
        let mut r = ConnectionsReport {
            run: RunFacts::new("connections", "chat-bench connections".into()),
            load_average: Some("0.50 0.40 0.30".into()),
            joined: 10,
            attempted: 11,
            failed: 1,
            rss_per_connection_bytes: Some(6758.0),
            ..Default::default()
        };
        r.failures.insert("upgrade refused: HTTP 401".into(), 1);
        let md = r.to_markdown();
        for needle in [
            "load average at start 0.50 0.40 0.30",
            "| joined / attempted | 10 / 11 |",
            "upgrade refused: HTTP 401: 1",
            "6.6 KiB (6758 B)",
        ] {
            assert!(md.contains(needle), "{needle:?} in\n{md}");
        }
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["failures"]["upgrade refused: HTTP 401"], 1);
    }

    #[test]
    fn workers_timelines_merge_by_second_through_the_hold() {
        // Two workers' seconds, as they arrive over the pipe.
        let worker = |connects: &[(usize, u64)], failed_at: Option<usize>| {
            let mut s = Seconds::<2>::default();
            for &(i, us) in connects {
                s.count(i, CONNECTS, 1);
                s.latency(i, us);
            }
            if let Some(i) = failed_at {
                s.count(i, FAILURES, 1);
            }
            let line = serde_json::to_string(&WorkerEvent::Done(WorkerResult {
                timeline: s.to_wire(),
                ..Default::default()
            }))
            .expect("ser");
            match serde_json::from_str(&line).expect("de") {
                WorkerEvent::Done(r) => r,
                other => panic!("{other:?}"),
            }
        };
        let a = worker(&[(0, 1_000), (0, 2_000), (1, 4_000)], None);
        let b = worker(&[(0, 3_000), (2, 8_000)], Some(1));
        // The hold ended 4.2 s after the start of the ramp.
        let t = timeline(&[a, b], Duration::from_millis(4_200));
        let col = |f: fn(&ConnectionsPoint) -> u64| t.iter().map(f).collect::<Vec<_>>();
        assert_eq!(col(|p| p.connects), [3, 1, 1, 0, 0]);
        assert_eq!(col(|p| p.failures), [0, 1, 0, 0, 0]);
        assert_eq!(col(|p| p.connections_open), [3, 4, 5, 5, 5]);
        assert!((1_990..=2_010).contains(&t[0].connect_p50_us), "{:?}", t[0]);
        assert!((7_950..=8_050).contains(&t[2].connect_max_us), "{:?}", t[2]);
        assert_eq!(t[4].connect_p99_us, 0);

        let r = ConnectionsReport {
            timeline: t,
            ..Default::default()
        };
        let svg = r.chart();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["timeline"][1]["connections_open"], 4);
    }
}
