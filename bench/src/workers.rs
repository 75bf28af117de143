//! Load generator processes: how a run is split over several `chat-bench` processes and
//! several local source addresses, and how those processes talk to the parent.
//!
//! Why processes: one process may hold at most `RLIMIT_NOFILE` open files (20,000 on the
//! machines this project runs on), one per connection. Why source addresses: a TCP client
//! address has ~28,000 ephemeral ports (`ip_local_port_range`), and on loopback every
//! 127.x.y.z is a usable local address with its own ports.
//!
//! The protocol is JSON lines over the child's pipes: the parent writes one [`WorkerPlan`]
//! line on the worker's stdin, then `close` when the hold is over (EOF means the same: a
//! worker never outlives its parent's interest); the worker writes [`WorkerEvent`] lines on
//! stdout (`ramped`, then `done` with its counts and its connect-latency histogram as
//! value/count pairs, and its per-second timeline). Its stderr is the parent's, for progress and errors. The assignment
//! of connections to workers and source addresses is a pure function of the global index,
//! so every process agrees on it without talking.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Stdio;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::auth::AuthArgs;
use crate::latency::{merge_pairs, new_histogram};
use crate::timeline::WireSecond;

/// The machine limits a plan is checked against (a parameter so tests fix them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nofile_hard: u64,
    pub ports_per_source: u64,
}

impl Limits {
    pub fn of_this_machine() -> Limits {
        Limits {
            nofile_hard: nofile_hard_limit(),
            ports_per_source: ephemeral_ports(),
        }
    }

    /// Connections one process may hold.
    pub fn per_process(&self) -> u64 {
        self.nofile_hard.saturating_sub(FD_RESERVE).max(1)
    }

    /// Connections one source address (or, unbound, one destination) may carry.
    pub fn per_source(&self) -> u64 {
        self.ports_per_source.saturating_sub(PORT_RESERVE).max(1)
    }
}

fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// Checks the shared settings of a plan: the URLs and the source addresses for `total`
/// connections held by `processes` processes. The message names the flag to change.
pub fn validate_spread(
    urls: &[String],
    total: usize,
    processes: usize,
    source_addresses: usize,
    source_list: &[IpAddr],
    limits: Limits,
) -> Result<(), String> {
    if urls.is_empty() {
        return Err("--url is required".into());
    }
    for u in urls {
        let uri: hyper::Uri = u.parse().map_err(|e| format!("--url {u:?}: {e}"))?;
        if !matches!(uri.scheme_str(), Some("ws") | Some("http")) || uri.host().is_none() {
            return Err(format!("--url {u:?} must look like ws://host:port"));
        }
    }
    if !(1..=MAX_PROCESSES).contains(&processes) {
        return Err(format!("--processes must be between 1 and {MAX_PROCESSES}"));
    }
    let per_process = total.div_ceil(processes) as u64;
    if per_process > limits.per_process() {
        return Err(format!(
            "--processes {processes} gives {per_process} connections per process, more than the \
             {} one process can hold (open-file hard limit {} minus {} for itself); use \
             --processes {} or more",
            limits.per_process(),
            limits.nofile_hard,
            FD_RESERVE,
            (total as u64).div_ceil(limits.per_process())
        ));
    }
    if source_list.is_empty() {
        if !(1..=254).contains(&source_addresses) {
            return Err("--source-addresses must be between 1 and 254".into());
        }
        if source_addresses > 1 {
            if let Some(u) = urls.iter().find(|u| !is_loopback_url(u)) {
                return Err(format!(
                    "--source-addresses binds to 127.0.0.x, which only reaches loopback \
                     targets, and --url {u} is not one; name local addresses with \
                     --source-address instead"
                ));
            }
        }
    }
    let sources = if source_list.is_empty() {
        source_addresses
    } else {
        source_list.len()
    };
    // Unbound, the kernel picks ports per destination; bound, per source address.
    let (lanes, what) = if source_list.is_empty() && source_addresses == 1 {
        (urls.len(), "destination (one source address)")
    } else {
        (sources, "source address")
    };
    let per_lane = total.div_ceil(lanes) as u64;
    if per_lane > limits.per_source() {
        return Err(format!(
            "--source-addresses: {per_lane} connections per {what} is more than its {} \
             ephemeral ports allow (less {} kept free); use --source-addresses {} or more",
            limits.ports_per_source,
            PORT_RESERVE,
            (total as u64).div_ceil(limits.per_source())
        ));
    }
    Ok(())
}

/// The local addresses to bind to in turn: `list` when given, else 127.0.0.1..127.0.0.K
/// for `k` above 1, else none (unbound).
pub fn sources(list: &[IpAddr], k: usize) -> Vec<IpAddr> {
    if !list.is_empty() {
        list.to_vec()
    } else if k > 1 {
        loopback_sources(k)
    } else {
        Vec::new()
    }
}

/// Most worker processes one run may start.
const MAX_PROCESSES: usize = 64;

/// The hidden subcommand a worker runs as.
pub const WORKER_SUBCOMMAND: &str = "__worker";

/// Open files a process keeps for itself (runtime, pipes, scrapes) beside its connections.
pub const FD_RESERVE: u64 = 1_000;
/// Ephemeral ports of one source address kept free for everything else on the machine.
pub const PORT_RESERVE: u64 = 250;

/// Which worker handles global connection `index`, and which source address it uses.
///
/// Connections go to workers in blocks of `sources` consecutive indices, so every worker
/// uses every source address and the ramp (index order) alternates between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub worker: usize,
    /// Index into the source address list (0 when there is none).
    pub source: usize,
}

pub fn assign(index: usize, processes: usize, sources: usize) -> Assignment {
    let sources = sources.max(1);
    Assignment {
        worker: (index / sources) % processes.max(1),
        source: index % sources,
    }
}

/// The source addresses `--source-addresses K` names: 127.0.0.1, 127.0.0.2, ... (K ≤ 254).
pub fn loopback_sources(k: usize) -> Vec<IpAddr> {
    (1..=k.min(254))
        .map(|i| IpAddr::from([127, 0, 0, i as u8]))
        .collect()
}

/// Connections each worker and each source address get out of `total`.
pub fn counts(total: usize, processes: usize, sources: usize) -> (Vec<u64>, Vec<u64>) {
    let mut per_worker = vec![0u64; processes.max(1)];
    let mut per_source = vec![0u64; sources.max(1)];
    // Closed form per block would do, but this is exact and cheap at bench sizes.
    for i in 0..total {
        let a = assign(i, processes, sources);
        per_worker[a.worker] += 1;
        per_source[a.source] += 1;
    }
    (per_worker, per_source)
}

/// The size of the local port range (`/proc/sys/net/ipv4/ip_local_port_range`), or the
/// common default (32768-60999) when it cannot be read.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
            let (lo, hi) = (it.next()??, it.next()??);
            (hi >= lo).then_some(hi - lo + 1)
        })
        .unwrap_or(28_232)
}

/// The hard open-file limit, which a process can raise its soft limit to.
pub fn nofile_hard_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard)
}

/// What a worker is asked to do: the `connections` slice it owns (by [`assign`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub worker: usize,
    pub processes: usize,
    pub urls: Vec<String>,
    pub connections: usize,
    /// Connections per second over all workers; connection `i` starts at `i / rate`.
    pub rate: f64,
    pub members: usize,
    pub room_prefix: String,
    pub user_prefix: String,
    pub sources: Vec<IpAddr>,
    pub connect_concurrency: usize,
    pub connect_timeout_s: f64,
    /// Longest the worker keeps its connections open without hearing `close`.
    pub max_hold_s: f64,
    pub auth: AuthArgs,
    /// Unix ms of second 0 of the run's timeline, so every worker's seconds line up with
    /// the parent's; without it (an older parent) a worker counts from its own start.
    #[serde(default)]
    pub timeline_origin_unix_ms: Option<u64>,
}

/// What a worker counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerResult {
    pub worker: usize,
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Connections the server closed (or dropped) while they were held, by close label.
    pub server_closes: BTreeMap<String, u64>,
    /// Error frames received while held, by code.
    pub errors: BTreeMap<String, u64>,
    /// Our closes the server echoed / did not echo within the grace.
    pub closed_cleanly: u64,
    pub close_unanswered: u64,
    /// Connect latency (µs) as `[value, count]` pairs of an hdrhistogram.
    pub connect_us: Vec<[u64; 2]>,
    /// Seconds from the worker's first attempt to its last `joined`.
    pub ramp_s: f64,
    /// The worker's CPU seconds over its ramp and over its whole life.
    pub ramp_cpu_s: Option<f64>,
    pub cpu_s: Option<f64>,
    /// The soft open-file limit it ran with, or why it could not raise it.
    pub nofile: String,
    /// Per second since the plan's `timeline_origin_unix_ms`: connects (count 0), failed
    /// attempts (count 1) and connect latency of the connects. Empty from an older worker.
    #[serde(default)]
    pub timeline: Vec<WireSecond>,
}

/// A line a worker writes on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    /// Every connection of the slice was attempted and is joined or failed.
    Ramped {
        worker: usize,
        joined: u64,
        failed: u64,
    },
    Done(WorkerResult),
    /// The worker could not run (bad plan, cannot start).
    Failed {
        worker: usize,
        message: String,
    },
}

impl WorkerEvent {
    pub fn to_line(&self) -> String {
        // Only strings, numbers and string-keyed maps: cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Merges the connect histograms of several workers.
pub fn merged_histogram(results: &[WorkerResult]) -> Histogram<u64> {
    let mut h = new_histogram();
    for r in results {
        merge_pairs(&mut h, &r.connect_us);
    }
    h
}

/// A running worker process and its pipes.
pub struct WorkerProc {
    pub worker: usize,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// Starts `chat-bench __worker` (this same binary) and hands it `plan`.
pub async fn spawn(plan: &WorkerPlan) -> anyhow::Result<WorkerProc> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg(WORKER_SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("worker stdin missing"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("worker stdout missing"))?;
    let mut line = serde_json::to_string(plan)?;
    line.push('\n');
    stdin.write_all(line.as_bytes()).await?;
    stdin.flush().await?;
    Ok(WorkerProc {
        worker: plan.worker,
        child,
        stdin: Some(stdin),
        lines: BufReader::new(stdout).lines(),
    })
}

impl WorkerProc {
    /// The next event, or `None` at EOF. Lines that are not events are skipped (a worker
    /// writes nothing else on stdout, but a stray line must not end the run).
    pub async fn next_event(&mut self) -> Option<WorkerEvent> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if let Ok(ev) = serde_json::from_str(&line) {
                return Some(ev);
            }
        }
    }

    /// Tells the worker to close its connections (a `close` line, then EOF).
    pub async fn close(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"close\n").await;
            let _ = stdin.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::histogram_pairs;

    #[test]
    fn every_worker_uses_every_source_evenly() {
        let (w, s) = counts(1000, 2, 4);
        assert_eq!(w, vec![500, 500]);
        assert_eq!(s, vec![250, 250, 250, 250]);
        // Each worker sees each source.
        for worker in 0..2 {
            let mut seen = [0u64; 4];
            for i in 0..1000 {
                let a = assign(i, 2, 4);
                if a.worker == worker {
                    seen[a.source] += 1;
                }
            }
            assert_eq!(seen, [125; 4], "worker {worker}");
        }
        assert_eq!(
            assign(5, 1, 1),
            Assignment {
                worker: 0,
                source: 0
            }
        );
        // Uneven splits differ by at most one block.
        let (w, s) = counts(7, 3, 2);
        assert_eq!(w.iter().sum::<u64>(), 7);
        assert_eq!(s, vec![4, 3]);
        assert_eq!(counts(3, 0, 0), (vec![3], vec![3]));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_url("ws://127.0.0.1:7000"));
        assert!(is_loopback_url("ws://127.9.0.1:7000/ws"));
        assert!(is_loopback_url("ws://localhost:7000"));
        assert!(is_loopback_url("ws://[::1]:7000"));
        assert!(!is_loopback_url("ws://10.1.1.1:7000"));
        assert!(!is_loopback_url("ws://example.com:7000"));
    }

    #[test]
    fn loopback_sources_count_from_one() {
        let s = loopback_sources(3);
        assert_eq!(
            s,
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
                .map(|a| a.parse::<IpAddr>().expect("ip"))
                .to_vec()
        );
        assert_eq!(loopback_sources(1000).len(), 254);
    }

    #[test]
    fn histograms_survive_the_pipe() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=5000u64 {
            a.record(v * 7).expect("record");
            b.record(v * 13 + 100_000).expect("record");
        }
        b.saturating_record(u64::MAX);
        let pa = WorkerResult {
            connect_us: histogram_pairs(&a),
            ..Default::default()
        };
        let pb = WorkerResult {
            connect_us: histogram_pairs(&b),
            ..Default::default()
        };
        // Through JSON, as over the pipe.
        let line = WorkerEvent::Done(pb.clone()).to_line();
        let WorkerEvent::Done(back) = serde_json::from_str(&line).expect("parse") else {
            panic!("not done: {line}");
        };
        assert_eq!(back, pb);
        let old: WorkerResult = serde_json::from_str(
            r#"{"worker":0,"attempted":1,"joined":1,
            "failed":0,"failures":{},"server_closes":{},"errors":{},"closed_cleanly":1,
            "close_unanswered":0,"connect_us":[[5,1]],"ramp_s":0.1,"ramp_cpu_s":null,
            "cpu_s":null,"nofile":"1024"}"#,
        )
        .expect("an older worker's done line");
        assert!(old.timeline.is_empty());
        let merged = merged_histogram(&[pa, back]);
        let mut direct = a.clone();
        direct.add(&b).expect("add");
        assert_eq!(merged.len(), 10_001);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                direct.value_at_quantile(q),
                "q {q}"
            );
        }
        assert_eq!(merged.max(), direct.max());
    }

    #[test]
    fn plan_and_events_round_trip() {
        let plan = WorkerPlan {
            worker: 1,
            processes: 2,
            urls: vec!["ws://127.0.0.1:7001".into()],
            connections: 10,
            rate: 100.0,
            members: 5,
            room_prefix: "r".into(),
            user_prefix: "u".into(),
            sources: loopback_sources(2),
            connect_concurrency: 8,
            connect_timeout_s: 5.0,
            max_hold_s: 60.0,
            auth: AuthArgs {
                jwt_secret: Some("s".into()),
                jwt_key: None,
                jwt_ttl: 60,
            },
            timeline_origin_unix_ms: Some(1_700_000_000_000),
        };
        let back: WorkerPlan =
            serde_json::from_str(&serde_json::to_string(&plan).expect("ser")).expect("de");
        assert_eq!(back, plan);
        // An older parent's plan, without the timeline origin, still reads.
        let mut old = serde_json::to_value(&plan).expect("ser");
        old.as_object_mut()
            .expect("object")
            .remove("timeline_origin_unix_ms");
        let back: WorkerPlan = serde_json::from_value(old).expect("de");
        assert_eq!(back.timeline_origin_unix_ms, None);
        for ev in [
            WorkerEvent::Ramped {
                worker: 1,
                joined: 4,
                failed: 1,
            },
            WorkerEvent::Failed {
                worker: 0,
                message: "x".into(),
            },
        ] {
            let line = ev.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<WorkerEvent>(&line).expect("de"), ev);
        }
        assert!(WorkerEvent::Ramped {
            worker: 0,
            joined: 0,
            failed: 0
        }
        .to_line()
        .contains(r#""event":"ramped""#));
    }
}
