//! `chat-bench seed-suite`: the three load tests the earlier chat backends this product grew
//! out of passed (their write-ups' own load tests), run one after another with the `fanout` machinery, each ending
//! with a PASS/FAIL verdict and the figures it rests on.
//!
//! - (a) 100 clients × 10 msg/s in one room: nothing lost, duplicated or out of order, every
//!   send acked.
//! - (b) 10 rooms × 50 clients: no message reaches another room, nothing lost.
//! - (c) one slow client among 100 in one room: a member with a tiny receive buffer joins and
//!   then stops reading while 99 others run a `fanout`; it must be closed with 4000
//!   (slow_consumer), which it sees once it resumes reading at the end, and the 99 must
//!   receive everything.
//!
//! Verdicts are pure functions of the reports, so they are unit-tested without a server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::client::{self, Incoming, Target};
use crate::fanout::{self, FanoutArgs};
use crate::harness::{self, Outcome};
use crate::idle::{self, Joined};
use crate::report::{self, close_label, Report};
use crate::BenchError;

/// Options of `chat-bench seed-suite`.
#[derive(Debug, Clone, Args)]
pub struct SeedSuiteArgs {
    /// WebSocket URL of a node or router (the path defaults to /ws).
    #[arg(long, env = "CHAT_BENCH_URL", default_value = "ws://127.0.0.1:7001")]
    pub url: String,
    /// Measured seconds of each test, after its warmup.
    #[arg(long, env = "CHAT_BENCH_DURATION", default_value_t = 15.0)]
    pub duration: f64,
    /// Seconds of sending before each test starts measuring.
    #[arg(long, env = "CHAT_BENCH_WARMUP", default_value_t = 2.0)]
    pub warmup: f64,
    /// Longest wait, in seconds, for outstanding deliveries and acks after sending stops.
    #[arg(long, env = "CHAT_BENCH_DRAIN", default_value_t = 5.0)]
    pub drain: f64,
    /// Messages per second each member sends in test (b).
    #[arg(long, default_value_t = 2.0)]
    pub isolation_rate: f64,
    /// Messages per second each of the 99 readers sends in test (c).
    #[arg(long, default_value_t = 10.0)]
    pub slow_rate: f64,
    /// Body bytes in test (c): larger bodies fill the slow client's queue sooner.
    #[arg(long, default_value_t = 1000)]
    pub slow_size: usize,
    /// Receive buffer (SO_RCVBUF) of the slow client's socket, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub slow_recv_buffer: u32,
    /// After test (c), seconds the slow client reads (draining what was buffered) waiting
    /// for its close frame.
    #[arg(long, default_value_t = 30.0)]
    pub slow_close_wait: f64,
    /// Rooms are named `<prefix>-a-<i>`, `<prefix>-b-<i>`, `<prefix>-c-0`; defaults to
    /// `seed-<unix seconds>` so each run starts with empty rooms.
    #[arg(long, env = "CHAT_BENCH_ROOM_PREFIX")]
    pub room_prefix: Option<String>,
    /// Also write the combined report as JSON to this file.
    #[arg(long, env = "CHAT_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Also write the combined Markdown report to this file.
    #[arg(long, env = "CHAT_BENCH_MARKDOWN")]
    pub markdown: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long, env = "CHAT_BENCH_QUIET")]
    pub quiet: bool,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
}

/// One condition of a verdict, with the observed value as evidence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub observed: String,
    pub expected: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub checks: Vec<Check>,
}

impl Verdict {
    fn new(checks: Vec<Check>) -> Verdict {
        Verdict {
            pass: !checks.is_empty() && checks.iter().all(|c| c.ok),
            checks,
        }
    }
}

fn check(name: &str, observed: impl ToString, expected: &str, ok: bool) -> Check {
    Check {
        name: name.to_owned(),
        observed: observed.to_string(),
        expected: expected.to_owned(),
        ok,
    }
}

fn zero(name: &str, v: u64) -> Check {
    check(name, v, "0", v == 0)
}

/// Every connection joined and something was measured: without these a run with no
/// traffic would pass every other check.
fn ran(r: &Report) -> Vec<Check> {
    let c = &r.connections;
    vec![
        check(
            "connections joined",
            format!("{}/{}", c.joined, c.attempted),
            "all",
            c.attempted > 0 && c.joined == c.attempted,
        ),
        check(
            "sent (measured)",
            r.messages.sent,
            "> 0",
            r.messages.sent > 0,
        ),
    ]
}

/// (a) one room, 100 clients × 10 msg/s: zero loss, no duplicates, in order, every send acked.
pub fn verdict_load(r: &Report) -> Verdict {
    let m = &r.messages;
    let mut checks = ran(r);
    checks.extend([
        zero("lost", m.lost),
        zero("duplicated", m.duplicated),
        zero("out of order", m.out_of_order),
        check(
            "acked",
            format!("{}/{}", m.acks, m.sent),
            "every send",
            m.acks >= m.sent && m.missing_acks == 0 && m.rejected == 0,
        ),
    ]);
    Verdict::new(checks)
}

/// (b) 10 rooms × 50 clients: nothing crosses rooms, nothing lost.
pub fn verdict_isolation(r: &Report) -> Verdict {
    let mut checks = ran(r);
    checks.extend([
        zero("misrouted", r.messages.misrouted),
        zero("lost", r.messages.lost),
    ]);
    Verdict::new(checks)
}

/// What the slow client of test (c) saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SlowOutcome {
    /// Close code received, if a close frame arrived.
    pub close_code: Option<u16>,
    /// `"4000 slow_consumer"`, `"1006 abnormal"` (connection ended without a close frame),
    /// or `"none"` (still open at the deadline).
    pub close: String,
    /// Frames read after it resumed reading (what the node had buffered for it).
    pub frames_read_after_resume: u64,
    pub bytes_read_after_resume: u64,
    /// Seconds from resuming to the close (or to the deadline).
    pub read_s: f64,
    pub error: Option<String>,
}

/// (c) the slow one is closed with 4000; the other 99 lose nothing and are not closed.
pub fn verdict_slow(r: &Report, slow: &SlowOutcome) -> Verdict {
    let mut checks = vec![check(
        "slow client closed with",
        &slow.close,
        "4000 slow_consumer",
        slow.close_code == Some(4000),
    )];
    checks.extend(ran(r));
    let closed: u64 = r.connections.closes.values().sum();
    checks.extend([
        zero("lost (the others)", r.messages.lost),
        zero("others closed by the server", closed),
    ]);
    Verdict::new(checks)
}

/// One test of the suite.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub id: &'static str,
    pub title: String,
    pub verdict: Verdict,
    /// The run could not be carried out (e.g. connect failures).
    pub error: Option<String>,
    pub slow: Option<SlowOutcome>,
    pub report: Option<Report>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub scenario: &'static str,
    pub command: String,
    pub git_rev: String,
    pub url: String,
    pub started_unix_ms: u64,
    /// `/proc/loadavg` (1/5/15 min) when the suite started.
    pub load_average: Option<String>,
    pub pass: bool,
    pub tests: Vec<TestResult>,
}

fn pass_word(p: bool) -> &'static str {
    if p {
        "PASS"
    } else {
        "FAIL"
    }
}

impl Outcome for SuiteReport {
    fn to_markdown(&self) -> String {
        let mut s = String::new();
        let passed = self.tests.iter().filter(|t| t.verdict.pass).count();
        s += &format!(
            "# chat-bench seed-suite: {} ({passed}/{} passed)\n\n",
            pass_word(self.pass),
            self.tests.len()
        );
        s += &format!(
            "- command: `{}`\n- git revision: `{}`\n- target: `{}`\n- {}\n\n",
            self.command,
            self.git_rev,
            self.url,
            report::load_note(self.load_average.as_deref(), report::nproc())
        );
        for t in &self.tests {
            s += &format!(
                "## ({}) {}: {}\n\n",
                t.id,
                t.title,
                pass_word(t.verdict.pass)
            );
            if let Some(e) = &t.error {
                s += &format!("The run could not be carried out: {e}\n\n");
            }
            if !t.verdict.checks.is_empty() {
                s += "| check | observed | expected | |\n|---|---:|---:|---|\n";
                for c in &t.verdict.checks {
                    s += &format!(
                        "| {} | {} | {} | {} |\n",
                        c.name,
                        c.observed,
                        c.expected,
                        if c.ok { "ok" } else { "**FAIL**" }
                    );
                }
                s += "\n";
            }
            if let Some(r) = &t.report {
                let (m, c) = (&r.messages, &r.config);
                s += &format!(
                    "{} room(s) × {} members × {} msg/s × {} B, {} s measured after {} s warmup.\n\n",
                    c.rooms, c.members, c.rate_per_member, c.body_bytes, c.duration_s, c.warmup_s
                );
                s += "| sent | expected deliveries | delivered | lost | duplicated | out of order | misrouted | acks | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
                let errors: u64 = m.errors.values().sum();
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {errors} |\n\n",
                    m.sent,
                    m.expected_deliveries,
                    m.delivered,
                    m.lost,
                    m.duplicated,
                    m.out_of_order,
                    m.misrouted,
                    m.acks
                );
                let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
                let (e, a) = (&r.e2e_latency_us, &r.ack_latency_us);
                s += &format!(
                    "Latency (ms) end-to-end p50 {} / p99 {} / p99.9 {} / max {}; ack p50 {} / p99 {}. \
                     Throughput {:.0} sends/s, {:.0} deliveries/s. Server CPU {}, bench CPU {}.\n\n",
                    ms(e.p50), ms(e.p99), ms(e.p999), ms(e.max), ms(a.p50), ms(a.p99),
                    r.throughput.sends_per_s,
                    r.throughput.deliveries_per_s,
                    r.server.cpu_percent.map_or("n/a".into(), |p| format!("{p:.0}%")),
                    r.bench.cpu_percent.map_or("n/a".into(), |p| format!("{p:.0}%")),
                );
                if !r.connections.closes.is_empty() {
                    s += &format!("Closes received: {:?}\n\n", r.connections.closes);
                }
                for n in &r.notes {
                    s += &format!("- note: {n}\n");
                }
                if !r.notes.is_empty() {
                    s += "\n";
                }
            }
            if let Some(sl) = &t.slow {
                s += &format!(
                    "Slow client: closed `{}` after reading {} frames ({} bytes) in {:.1} s once it resumed{}.\n\n",
                    sl.close,
                    sl.frames_read_after_resume,
                    sl.bytes_read_after_resume,
                    sl.read_s,
                    sl.error.as_deref().map_or(String::new(), |e| format!("; {e}"))
                );
            }
        }
        s
    }

    fn verdict(&self) -> Result<(), BenchError> {
        if self.pass {
            return Ok(());
        }
        let failed: Vec<&str> = self
            .tests
            .iter()
            .filter(|t| !t.verdict.pass)
            .map(|t| t.id)
            .collect();
        Err(crate::harness::failed(format!(
            "seed suite failed: test(s) {}",
            failed.join(", ")
        )))
    }
}

impl SeedSuiteArgs {
    fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("isolation-rate", self.isolation_rate),
            ("slow-rate", self.slow_rate),
            ("slow-close-wait", self.slow_close_wait),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(format!("--{name} must be positive"));
            }
        }
        if self.slow_recv_buffer == 0 {
            return Err("--slow-recv-buffer must be positive".into());
        }
        Ok(())
    }

    /// The `fanout` arguments of one test; `fanout::FanoutArgs::validate` checks the rest.
    fn fanout(
        &self,
        rooms: usize,
        members: usize,
        rate: f64,
        size: usize,
        room_prefix: String,
    ) -> FanoutArgs {
        FanoutArgs {
            url: self.url.clone(),
            rooms,
            members,
            rate,
            size,
            duration: self.duration,
            warmup: self.warmup,
            drain: self.drain,
            user_prefix: "seed".into(),
            room_prefix: Some(room_prefix),
            connect_concurrency: 64,
            connect_timeout: 10.0,
            quiet: self.quiet,
            auth: self.auth.clone(),
            ..Default::default()
        }
    }
}

/// Runs a fanout test and turns its outcome into a result: a connect failure is a FAIL of
/// that test, not the end of the suite.
async fn fanout_test(
    id: &'static str,
    title: String,
    args: FanoutArgs,
    command: &str,
    judge: impl FnOnce(&Report) -> Verdict,
) -> Result<TestResult, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    eprintln!("chat-bench seed-suite: ({id}) {title}");
    let (verdict, error, report) = match fanout::run(args, command.to_owned()).await {
        Ok(r) => (judge(&r), None, Some(r)),
        Err(BenchError::Config(e)) => return Err(BenchError::Config(e)),
        Err(BenchError::Failed(e)) => (Verdict::default(), Some(format!("{e:#}")), None),
    };
    eprintln!("chat-bench seed-suite: ({id}) {}", pass_word(verdict.pass));
    Ok(TestResult {
        id,
        title,
        verdict,
        error,
        slow: None,
        report,
    })
}

/// The slow member: connected with a small receive buffer and joined, then left unread
/// (its write half is held, so the socket stays open and owed pongs have somewhere to go).
async fn slow_connect(
    target: &Target,
    room: &str,
    recv_buffer: u32,
    auth: &crate::auth::Auth,
) -> anyhow::Result<Joined> {
    let opts = client::ConnectOptions {
        credentials: auth.credentials("seed-slow").map_err(anyhow::Error::msg)?,
        source: None,
        recv_buffer: Some(recv_buffer),
    };
    idle::connect_joined(target, room, &opts, Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("slow client: {e}"))
}

/// Resumes reading until the close frame, the end of the connection or `wait`.
async fn slow_drain(mut slow: Joined, wait: Duration) -> SlowOutcome {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = SlowOutcome {
        close: "none".into(),
        ..Default::default()
    };
    loop {
        match tokio::time::timeout_at(deadline, slow.reader.next()).await {
            Err(_) => {
                out.error = Some(format!("no close within {} s", wait.as_secs_f64()));
                break;
            }
            Ok(Ok(Incoming::Data(b))) => {
                out.frames_read_after_resume += 1;
                out.bytes_read_after_resume += b.len() as u64;
            }
            Ok(Ok(Incoming::Close(code))) => {
                out.close_code = Some(code);
                out.close = close_label(code);
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                out.close = close_label(1006);
                out.error = Some(format!("connection ended without a close frame: {e}"));
                break;
            }
        }
    }
    out.read_s = started.elapsed().as_secs_f64();
    out
}

async fn slow_test(
    args: &SeedSuiteArgs,
    prefix: &str,
    command: &str,
) -> Result<TestResult, BenchError> {
    let title = "one slow client among 100 in one room".to_owned();
    let room_prefix = format!("{prefix}-c");
    let fargs = args.fanout(1, 99, args.slow_rate, args.slow_size, room_prefix.clone());
    fargs.validate().map_err(BenchError::Config)?;
    let target = harness::target(&args.url).await?;
    let failed = |e: String, title: String| TestResult {
        id: "c",
        title,
        verdict: Verdict::default(),
        error: Some(e),
        slow: None,
        report: None,
    };
    eprintln!("chat-bench seed-suite: (c) {title}");
    let auth = harness::auth(&args.auth)?;
    let slow = match slow_connect(
        &target,
        &format!("{room_prefix}-0"),
        args.slow_recv_buffer,
        &auth,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return Ok(failed(format!("{e:#}"), title)),
    };
    let report = match fanout::run(fargs, command.to_owned()).await {
        Ok(r) => r,
        Err(BenchError::Config(e)) => return Err(BenchError::Config(e)),
        Err(BenchError::Failed(e)) => return Ok(failed(format!("{e:#}"), title)),
    };
    let outcome = slow_drain(slow, Duration::from_secs_f64(args.slow_close_wait)).await;
    let verdict = verdict_slow(&report, &outcome);
    eprintln!("chat-bench seed-suite: (c) {}", pass_word(verdict.pass));
    Ok(TestResult {
        id: "c",
        title,
        verdict,
        error: None,
        slow: Some(outcome),
        report: Some(report),
    })
}

/// Runs (a), (b) and (c) in turn. Bad arguments are errors; failed tests are results.
pub async fn run(args: SeedSuiteArgs, command: String) -> Result<SuiteReport, BenchError> {
    args.validate().map_err(BenchError::Config)?;
    let load_average = report::load_average();
    let started_unix_ms = harness::unix_ms();
    let prefix = args
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("seed-{}", started_unix_ms / 1000));
    let mut tests = Vec::with_capacity(3);
    tests.push(
        fanout_test(
            "a",
            "100 clients × 10 msg/s in one room".into(),
            args.fanout(1, 100, 10.0, 128, format!("{prefix}-a")),
            &command,
            verdict_load,
        )
        .await?,
    );
    tests.push(
        fanout_test(
            "b",
            format!(
                "10 rooms × 50 clients × {} msg/s, isolated",
                args.isolation_rate
            ),
            args.fanout(10, 50, args.isolation_rate, 128, format!("{prefix}-b")),
            &command,
            verdict_isolation,
        )
        .await?,
    );
    tests.push(slow_test(&args, &prefix, &command).await?);
    Ok(SuiteReport {
        scenario: "seed-suite",
        command,
        git_rev: report::git_rev(),
        url: args.url.clone(),
        started_unix_ms,
        load_average,
        pass: tests.iter().all(|t| t.verdict.pass),
        tests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(rooms: usize, members: usize) -> Report {
        let mut r = Report::default();
        r.config.rooms = rooms;
        r.config.members = members;
        let n = (rooms * members) as u64;
        r.connections.attempted = n;
        r.connections.joined = n;
        r.messages.sent = 1000;
        r.messages.acks = 1000;
        r.messages.expected_deliveries = 1000 * members as u64;
        r.messages.delivered = 1000 * members as u64;
        r
    }

    fn failing(v: &Verdict) -> Vec<&str> {
        v.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn load_passes_only_when_perfect() {
        assert!(verdict_load(&good(1, 100)).pass);
        for (name, f) in [
            (
                "lost",
                (|r: &mut Report| r.messages.lost = 1) as fn(&mut Report),
            ),
            ("duplicated", |r| r.messages.duplicated = 2),
            ("out of order", |r| r.messages.out_of_order = 1),
            ("acked", |r| {
                r.messages.acks = 999;
                r.messages.missing_acks = 1;
            }),
            ("acked", |r| r.messages.rejected = 1),
            ("sent (measured)", |r| r.messages.sent = 0),
            ("connections joined", |r| r.connections.joined = 99),
        ] {
            let mut r = good(1, 100);
            f(&mut r);
            let v = verdict_load(&r);
            assert!(!v.pass, "{name}");
            assert_eq!(failing(&v), vec![name]);
        }
    }

    #[test]
    fn isolation_ignores_order_but_not_misrouting_or_loss() {
        let mut r = good(10, 50);
        r.messages.out_of_order = 3;
        assert!(verdict_isolation(&r).pass);
        r.messages.misrouted = 1;
        assert_eq!(failing(&verdict_isolation(&r)), vec!["misrouted"]);
        r.messages.misrouted = 0;
        r.messages.lost = 5;
        assert_eq!(failing(&verdict_isolation(&r)), vec!["lost"]);
    }

    #[test]
    fn slow_needs_4000_and_no_loss_for_the_others() {
        let r = good(1, 99);
        let closed = SlowOutcome {
            close_code: Some(4000),
            close: "4000 slow_consumer".into(),
            ..Default::default()
        };
        assert!(verdict_slow(&r, &closed).pass);
        let open = SlowOutcome {
            close: "none".into(),
            ..Default::default()
        };
        assert_eq!(
            failing(&verdict_slow(&r, &open)),
            vec!["slow client closed with"]
        );
        let normal = SlowOutcome {
            close_code: Some(1000),
            close: "1000".into(),
            ..Default::default()
        };
        assert!(!verdict_slow(&r, &normal).pass);
        let mut lossy = good(1, 99);
        lossy.messages.lost = 1;
        lossy
            .connections
            .closes
            .insert("4000 slow_consumer".into(), 1);
        assert_eq!(
            failing(&verdict_slow(&lossy, &closed)),
            vec!["lost (the others)", "others closed by the server"]
        );
    }

    #[test]
    fn empty_verdict_fails_and_markdown_names_each_test() {
        assert!(!Verdict::new(Vec::new()).pass);
        let suite = SuiteReport {
            scenario: "seed-suite",
            command: "chat-bench seed-suite".into(),
            git_rev: "abc".into(),
            url: "ws://x:1".into(),
            started_unix_ms: 0,
            load_average: Some("1.00 0.50 0.25".into()),
            pass: false,
            tests: vec![
                TestResult {
                    id: "a",
                    title: "load".into(),
                    verdict: verdict_load(&good(1, 100)),
                    error: None,
                    slow: None,
                    report: Some(good(1, 100)),
                },
                TestResult {
                    id: "c",
                    title: "slow".into(),
                    verdict: Verdict::default(),
                    error: Some("refused".into()),
                    slow: None,
                    report: None,
                },
            ],
        };
        let md = suite.to_markdown();
        assert!(
            md.contains("# chat-bench seed-suite: FAIL (1/2 passed)"),
            "{md}"
        );
        assert!(md.contains("## (a) load: PASS"), "{md}");
        assert!(md.contains("## (c) slow: FAIL"), "{md}");
        assert!(md.contains("could not be carried out: refused"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&suite.to_json()).expect("json");
        assert_eq!(json["tests"][0]["verdict"]["pass"], true);
        assert_eq!(json["pass"], false);
    }
}
