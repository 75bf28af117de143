//! The numbers a run produces and how they are written: per-sender sequence accounting
//! (loss, duplicates, reordering), latency summaries, the `Report` with its JSON and
//! Markdown renderings, and the facts about the machine and revision a report must carry.
//!
//! Everything here is pure or reads only local process state (`/proc/self/stat`, `git`);
//! it never touches the network, so the accounting rules are unit-tested directly.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::harness::{Outcome, RunFacts};

/// Latency histograms record microseconds from 1 µs to 60 s at 3 significant digits.
pub const HIST_MAX_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// What one received message means for the sender's sequence, as seen by one receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The next sequence number, or a later one (the ones skipped are remembered as gaps).
    InOrder,
    /// A sequence number skipped earlier, arriving late: out of order, but not a duplicate.
    Late,
    /// Seen before.
    Duplicate,
    /// At or below the highest seen, but gap tracking overflowed so it cannot be told
    /// apart; counted as unique so loss is not overstated.
    Unknown,
}

/// Per-receiver accounting of every sender in its room.
///
/// Memory is one `u64` per sender plus a bounded set of gaps: messages a receiver has not
/// seen yet although a later one from the same sender arrived.
#[derive(Debug)]
pub struct SeqTracker {
    /// Per sender: highest sequence seen + 1 (0 = nothing seen yet).
    next: Vec<u64>,
    /// `(sender << 40) | seq` of skipped sequence numbers.
    gaps: HashSet<u64>,
    max_gaps: usize,
    /// Skipped sequence numbers that did not fit in `gaps`.
    pub overflowed: u64,
}

/// Sequence numbers must stay below this for the gap key; the bench validates it.
pub const MAX_TRACKED_SEQ: u64 = 1 << 40;

impl SeqTracker {
    pub fn new(senders: usize, max_gaps: usize) -> Self {
        SeqTracker {
            next: vec![0; senders],
            gaps: HashSet::new(),
            max_gaps,
            overflowed: 0,
        }
    }

    /// Records `seq` from local sender index `sender` (must be `< senders`).
    pub fn observe(&mut self, sender: usize, seq: u64) -> SeqOutcome {
        let Some(next) = self.next.get_mut(sender) else {
            return SeqOutcome::Unknown;
        };
        let key = |s: u64| ((sender as u64) << 40) | (s & (MAX_TRACKED_SEQ - 1));
        if seq >= *next {
            let skipped = seq - *next;
            if skipped > 0 {
                if self.gaps.len() as u64 + skipped <= self.max_gaps as u64 {
                    for s in *next..seq {
                        self.gaps.insert(key(s));
                    }
                } else {
                    self.overflowed += skipped;
                }
            }
            *next = seq + 1;
            SeqOutcome::InOrder
        } else if self.gaps.remove(&key(seq)) {
            SeqOutcome::Late
        } else if self.overflowed > 0 {
            SeqOutcome::Unknown
        } else {
            SeqOutcome::Duplicate
        }
    }
}

/// Latency percentiles in microseconds; all zero when `count` is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// How the run was configured, as recorded in the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunConfig {
    pub url: String,
    pub rooms: usize,
    pub members: usize,
    pub rate_per_member: f64,
    pub body_bytes: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    pub room_prefix: String,
    pub user_prefix: String,
    pub connect_concurrency: usize,
    /// Members joined the bench rooms over the socket from rooms of their own.
    pub bridge: bool,
    /// Members connected straight to nodes their caller named, not to `url`
    /// (`cross-shard --direct`).
    pub direct: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    /// Why connects failed, by reason.
    pub failures: BTreeMap<String, u64>,
    /// Wall time of the connect phase, first attempt to last `joined`.
    pub connect_phase_s: f64,
    /// `joined / connect_phase_s`: the connect rate reached with `--connect-concurrency`.
    pub connects_per_second: f64,
    /// Close codes received from the server before the bench started closing, e.g.
    /// `"4000 slow_consumer"`; `"1006 abnormal"` when the connection ended without one.
    pub closes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Messages {
    /// What the schedule asked for in the measured window: members × rate × duration.
    pub target_sends: u64,
    /// Sends written in the measured window.
    pub sent: u64,
    /// Sends that left more than `late_threshold_ms` after their scheduled time.
    pub sends_late: u64,
    pub late_threshold_ms: f64,
    /// Scheduled sends skipped because the sender fell more than one period behind.
    pub sends_skipped: u64,
    /// Connections whose write half failed while sending.
    pub send_failures: u64,
    /// Σ sent × members of the sender's room (every member, including the sender).
    pub expected_deliveries: u64,
    /// Unique measured messages received, over all receivers.
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Could not be classified as duplicate or late (gap tracking overflowed).
    pub unclassified: u64,
    /// Messages for another room, or from a sender not in the receiver's room.
    pub misrouted: u64,
    /// Frames that were not valid server frames, or messages whose body the bench did not
    /// write.
    pub undecodable: u64,
    /// A receiver saw a message id not greater than the previous one in its room.
    pub id_regressions: u64,
    pub acks: u64,
    pub ack_duplicates: u64,
    /// Measured sends answered by an error frame carrying their cid.
    pub rejected: u64,
    /// Measured sends with neither an ack nor an error by the end of the drain.
    pub missing_acks: u64,
    /// Error frames by code (all phases).
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Throughput {
    pub window_s: f64,
    pub sends_per_s: f64,
    pub deliveries_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    /// Percent of one core over the measured window (200 = two cores busy).
    pub cpu_percent: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerStats {
    /// From `process_cpu_seconds_total` at the start and end of the measured window.
    pub cpu_percent: Option<f64>,
    /// `process_resident_memory_bytes` at the start and end of the measured window.
    pub rss_bytes_before: Option<u64>,
    pub rss_bytes_after: Option<u64>,
}

/// One second of a run: what was sent and delivered in it and the e2e latency of what
/// arrived in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Seconds since the first scheduled send, at the end of this interval.
    pub t_s: f64,
    /// `warmup`, `measure` or `drain`, by the interval's start.
    pub phase: String,
    pub sends_per_s: f64,
    pub deliveries_per_s: f64,
    pub e2e_p50_us: u64,
    pub e2e_p99_us: u64,
    pub e2e_max_us: u64,
    pub e2e_samples: u64,
}

/// Everything one `fanout` run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunFacts,
    /// `/proc/loadavg` (1/5/15 min) when the run started: other processes share the cores.
    pub load_average: Option<String>,
    pub started_unix_ms: u64,
    pub config: RunConfig,
    pub connections: Connections,
    pub messages: Messages,
    pub e2e_latency_us: LatencySummary,
    /// From starting a connection (TCP connect) to its `joined` frame.
    pub connect_latency_us: LatencySummary,
    pub ack_latency_us: LatencySummary,
    pub throughput: Throughput,
    pub bench: Cpu,
    /// True when the bench used more than 90% of the machine's cores: its numbers then
    /// measure the load generator as much as the server.
    pub bench_saturated: bool,
    pub server: ServerStats,
    /// What the measured window cost the whole cluster (`--bridge` or any of the cluster
    /// cost options): Redis, the nodes' bus, every server process's CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_cost: Option<crate::cluster_cost::ClusterCost>,
    /// What the bench, as the webhook endpoint (`--webhook-sink`), received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<crate::webhook_sink::WebhookSummary>,
    pub notes: Vec<String>,
    /// Per-second sends, deliveries and e2e latency from the first send to the close.
    pub timeline: Vec<TimelinePoint>,
}

/// Above this share of all cores the load generator is reported as saturated.
pub const SATURATION_SHARE: f64 = 0.9;

pub fn is_saturated(cpu_percent: f64, nproc: usize) -> bool {
    cpu_percent > SATURATION_SHARE * 100.0 * nproc.max(1) as f64
}

/// `n/a`, or a percentage of one core: `12.3%`.
pub fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |p| format!("{p:.1}%"))
}

/// `n/a`, or a byte count in MiB: `12.3 MiB`. Signed, so a difference (memory kept after a
/// run) prints the same way as an absolute figure.
pub fn opt_mib(v: Option<impl Into<i128>>) -> String {
    v.map_or_else(
        || "n/a".to_owned(),
        |b| format!("{:.1} MiB", b.into() as f64 / 1_048_576.0),
    )
}

/// The bench CPU cell of every report: the percentage, flagged when the load generator was
/// the bottleneck (see [`is_saturated`]).
pub fn bench_cpu_cell(cpu_percent: Option<f64>, saturated: bool) -> String {
    format!(
        "{}{}",
        opt_pct(cpu_percent),
        if saturated {
            " (load generator saturated)"
        } else {
            ""
        }
    )
}

/// `k: v, k: v` for a table cell, or `none`.
pub fn map_or_none(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".to_owned();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Adds the counts of `from` into `into`, key by key.
pub fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Latency percentiles of `samples` (µs; 0 counts as 1).
pub fn summary(samples: impl IntoIterator<Item = u64>) -> LatencySummary {
    let mut h = new_histogram();
    for v in samples {
        h.saturating_record(v.max(1));
    }
    LatencySummary::from_histogram(&h)
}

/// A report's title and the command line that produced it, each followed by a blank line.
pub fn title_md(out: &mut String, title: &str, command: &str) {
    let _ = writeln!(out, "## chat-bench {title}\n");
    let _ = writeln!(out, "```\n{command}\n```\n");
}

/// A `| metric | value |` table.
pub fn metric_table<K: std::fmt::Display, V: std::fmt::Display>(
    out: &mut String,
    rows: impl IntoIterator<Item = (K, V)>,
) {
    let _ = writeln!(out, "| metric | value |\n|---|---|");
    for (k, v) in rows {
        let _ = writeln!(out, "| {k} | {v} |");
    }
}

/// The notes as a bulleted list after a blank line; nothing when there are none.
pub fn notes_md(out: &mut String, notes: &[String]) {
    if notes.is_empty() {
        return;
    }
    let _ = writeln!(out);
    for n in notes {
        let _ = writeln!(out, "- {n}");
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// `p50 | p90 | p99 | p99.9 | max | samples` in milliseconds; `n/a` without samples.
fn latency_cells(l: &LatencySummary) -> String {
    if l.count == 0 {
        "n/a | n/a | n/a | n/a | n/a | 0".to_owned()
    } else {
        format!(
            "{} | {} | {} | {} | {} | {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.count
        )
    }
}

/// A `| latency | p50 | p90 | p99 | p99.9 | max | samples |` table (fanout, history,
/// rebalance, cross-shard), each row named `<name> (ms)`.
pub fn latency_table(out: &mut String, rows: &[(&str, &LatencySummary)]) {
    latency_rows(out, "latency", " (ms)", rows);
}

/// The same table with the unit in the header, `| latency (ms) | ...`, and rows named as
/// given (connections, churn). Its reports were published with this layout, so it stays.
pub fn latency_table_ms(out: &mut String, rows: &[(&str, &LatencySummary)]) {
    latency_rows(out, "latency (ms)", "", rows);
}

fn latency_rows(out: &mut String, head: &str, unit: &str, rows: &[(&str, &LatencySummary)]) {
    let _ = writeln!(
        out,
        "| {head} | p50 | p90 | p99 | p99.9 | max | samples |\n|---|---|---|---|---|---|---|"
    );
    for (name, l) in rows {
        let _ = writeln!(out, "| {name}{unit} | {} |", latency_cells(l));
    }
}

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
        Some(crate::fanout::chart(self))
    }
}

/// Label for a received close code: `"4000 slow_consumer"`.
pub fn close_label(code: u16) -> String {
    match common::CloseCode::from_code(code) {
        Some(c) => format!("{code} {}", c.as_str()),
        None if code == 1006 => "1006 abnormal".to_owned(),
        None => code.to_string(),
    }
}

/// The fields of `/proc/<pid>/stat` the bench reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// The command name (field 2), without its parentheses.
    pub comm: String,
    /// User and system CPU time, in clock ticks (fields 14 and 15).
    pub utime: u64,
    pub stime: u64,
    /// When the process started, in clock ticks after boot (field 22): a pid whose
    /// `starttime` changed between two reads is another process.
    pub starttime: u64,
}

impl ProcStat {
    pub fn parse(stat: &str) -> Option<ProcStat> {
        // The command name is in parentheses and may itself contain spaces or ')': it runs
        // from the first '(' to the last ')'.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // `fields` starts at field 3 (state).
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        Some(ProcStat {
            comm,
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
        })
    }

    pub fn cpu_ticks(&self) -> u64 {
        self.utime + self.stime
    }
}

/// `utime + stime` in clock ticks from the contents of `/proc/<pid>/stat`.
pub fn parse_proc_stat(stat: &str) -> Option<u64> {
    ProcStat::parse(stat).map(|p| p.cpu_ticks())
}

/// The kernel's clock ticks per second for `/proc` times (`sysconf(_SC_CLK_TCK)`), read from
/// this process's auxiliary vector (`AT_CLKTCK`) without `unsafe`; 100, the value on every
/// common Linux architecture, when it cannot be read.
pub fn clock_ticks_per_second() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_value(&auxv, AT_CLKTCK))
            .filter(|&hz| hz > 0)
            .unwrap_or(100)
    })
}

const AT_CLKTCK: u64 = 17;

/// The value of entry `key` in an auxiliary vector: native-endian `(type, value)` pairs of
/// machine words, ended by type 0.
pub fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<u64> {
        let b: [u8; W] = b.try_into().ok()?;
        Some(usize::from_ne_bytes(b) as u64)
    };
    for pair in auxv.chunks_exact(2 * W) {
        let (k, v) = (word(&pair[..W])?, word(&pair[W..])?);
        if k == 0 {
            return None;
        }
        if k == key {
            return Some(v);
        }
    }
    None
}

/// CPU seconds this process has used so far (Linux; `None` elsewhere).
pub fn self_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_proc_stat(&stat).map(|ticks| ticks as f64 / clock_ticks_per_second() as f64)
}

/// `git rev-parse --short HEAD`, or `"unknown"`.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The machine's load average at this moment (`/proc/loadavg`: 1, 5 and 15 minutes), for
/// reports: other processes share the cores, and a busy machine skews every figure.
pub fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3).then(|| fields.join(" "))
}

/// `TcpExt: ListenOverflows` from `/proc/net/netstat`: SYNs this machine dropped because a
/// listener's accept queue was full. Each one costs the client a retransmit (1 s, then 3 s,
/// ...), which is what a bimodal connect latency usually is. Machine-wide: meaningful when
/// the servers run on the bench's machine.
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// The note every report carries about the load at its start.
pub fn load_note(load: Option<&str>, nproc: usize) -> String {
    match load {
        Some(l) => format!(
            "machine load average at the start (1/5/15 min): {l} on {nproc} cores; other \
             processes share them"
        ),
        None => "machine load average at the start: n/a (/proc/loadavg unreadable)".to_owned(),
    }
}

/// [`load_note`] for this machine, now.
pub fn current_load_note() -> String {
    load_note(load_average().as_deref(), nproc())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The command line as a shell would need it to run again.
pub fn command_line(args: impl IntoIterator<Item = String>) -> String {
    args.into_iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_is_clean() {
        let mut t = SeqTracker::new(2, 16);
        for s in 0..10 {
            assert_eq!(t.observe(0, s), SeqOutcome::InOrder);
            assert_eq!(t.observe(1, s), SeqOutcome::InOrder);
        }
        assert_eq!(t.overflowed, 0);
    }

    #[test]
    fn gaps_late_arrivals_and_duplicates() {
        let mut t = SeqTracker::new(2, 16);
        assert_eq!(t.observe(0, 0), SeqOutcome::InOrder);
        // 1 and 2 skipped.
        assert_eq!(t.observe(0, 3), SeqOutcome::InOrder);
        assert_eq!(t.observe(0, 2), SeqOutcome::Late);
        assert_eq!(t.observe(0, 2), SeqOutcome::Duplicate);
        assert_eq!(t.observe(0, 3), SeqOutcome::Duplicate);
        assert_eq!(t.observe(0, 0), SeqOutcome::Duplicate);
        // Senders are independent.
        assert_eq!(t.observe(1, 1), SeqOutcome::InOrder);
        assert_eq!(t.observe(1, 0), SeqOutcome::Late);
        assert_eq!(t.observe(0, 1), SeqOutcome::Late);
        // Unknown sender index.
        assert_eq!(t.observe(2, 0), SeqOutcome::Unknown);
    }

    #[test]
    fn overflow_makes_old_sequences_unknown() {
        let mut t = SeqTracker::new(1, 4);
        assert_eq!(t.observe(0, 10), SeqOutcome::InOrder);
        assert_eq!(t.overflowed, 10);
        assert_eq!(t.observe(0, 3), SeqOutcome::Unknown);
        assert_eq!(t.observe(0, 11), SeqOutcome::InOrder);
    }

    #[test]
    fn latency_summary() {
        let mut h = new_histogram();
        assert_eq!(LatencySummary::from_histogram(&h).count, 0);
        for v in 1..=1000 {
            h.record(v).expect("in range");
        }
        h.saturating_record(u64::MAX);
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 1001);
        assert!((495..=505).contains(&s.p50), "{s:?}");
        assert!((985..=995).contains(&s.p99), "{s:?}");
        assert!(s.max >= HIST_MAX_US, "{s:?}");
    }

    #[test]
    fn proc_stat_parsing() {
        let stat = "1234 (chat bench) S 1 1234 1234 0 -1 4194304 500 0 0 0 250 75 0 0 20 0 9 \
                    0 100 1000000 200 18446744073709551615";
        assert_eq!(parse_proc_stat(stat), Some(325));
        assert_eq!(parse_proc_stat("garbage"), None);
        if cfg!(target_os = "linux") {
            assert!(self_cpu_seconds().is_some());
        }
    }

    #[test]
    fn proc_stat_with_parentheses_and_spaces_in_the_name() {
        // A process may name itself anything, e.g. "a) (b" or ") S 1 2".
        let stat = "77 (x) S 1 2 ) y) R 1 77 77 0 -1 4194304 500 0 0 0 1234 56 0 0 20 0 9 \
                    0 987654 1000000 200 18446744073709551615";
        assert_eq!(
            ProcStat::parse(stat),
            Some(ProcStat {
                comm: "x) S 1 2 ) y".into(),
                utime: 1234,
                stime: 56,
                starttime: 987_654,
            })
        );
        assert_eq!(ProcStat::parse("77 (x) R 1 2 3"), None, "truncated");
        assert_eq!(ProcStat::parse("77 x R"), None, "no parentheses");
        if cfg!(target_os = "linux") {
            let own = std::fs::read_to_string("/proc/self/stat").expect("own stat");
            assert!(ProcStat::parse(&own).is_some(), "{own}");
        }
    }

    #[test]
    fn auxv_entries() {
        let words = |ws: &[usize]| -> Vec<u8> { ws.iter().flat_map(|w| w.to_ne_bytes()).collect() };
        let auxv = words(&[6, 4096, 17, 250, 0, 0, 17, 999]);
        assert_eq!(auxv_value(&auxv, 17), Some(250));
        assert_eq!(auxv_value(&auxv, 6), Some(4096));
        // Nothing after the terminating entry counts.
        assert_eq!(auxv_value(&words(&[0, 0, 17, 999]), 17), None);
        assert_eq!(auxv_value(&auxv[..5], 17), None);
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn machine_counters_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(listen_overflows().is_some());
            let load = load_average().expect("loadavg");
            assert_eq!(load.split(' ').count(), 3, "{load}");
            assert!(load_note(Some(&load), 2).contains(&load));
        }
        assert!(load_note(None, 2).contains("n/a"));
    }

    #[test]
    fn saturation_threshold() {
        assert!(!is_saturated(150.0, 2));
        assert!(is_saturated(185.0, 2));
        assert!(is_saturated(95.0, 1));
    }

    #[test]
    fn command_lines_are_quoted_for_the_shell() {
        let c = command_line(
            [
                "chat-bench",
                "fanout",
                "--url",
                "ws://127.0.0.1:7070",
                "--x",
                "a b",
                "it's",
            ]
            .map(String::from),
        );
        assert_eq!(
            c,
            r"chat-bench fanout --url ws://127.0.0.1:7070 --x 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn close_labels() {
        assert_eq!(close_label(4000), "4000 slow_consumer");
        assert_eq!(close_label(1006), "1006 abnormal");
        assert_eq!(close_label(4999), "4999");
    }

    #[test]
    fn report_renders_markdown_and_json() {
        let mut r = Report {
            run: RunFacts {
                scenario: "fanout".into(),
                command: "chat-bench fanout --rooms 2".into(),
                git_rev: "abc1234".into(),
                nproc: 2,
            },
            ..Default::default()
        };
        r.config.rooms = 2;
        r.config.members = 5;
        r.messages.sent = 100;
        r.messages.expected_deliveries = 500;
        r.messages.delivered = 498;
        r.messages.lost = 2;
        r.messages.errors.insert("rate_limited".into(), 3);
        r.connections.closes.insert(close_label(4000), 1);
        r.e2e_latency_us = LatencySummary {
            count: 498,
            p50: 1500,
            p90: 2000,
            p99: 3000,
            p999: 4000,
            max: 5000,
            mean: 1600.0,
        };
        r.bench.cpu_percent = Some(191.0);
        r.bench_saturated = true;
        r.notes.push("load generator saturated".into());
        let md = r.to_markdown();
        for needle in [
            "```\nchat-bench fanout --rooms 2\n```",
            "git `abc1234` · nproc 2",
            "| lost | 2 |",
            "| errors by code | rate_limited: 3 |",
            "| closes received | 4000 slow_consumer: 1 |",
            "| end-to-end (ms) | 1.500 | 2.000 | 3.000 | 4.000 | 5.000 | 498 |",
            "| ack (ms) | n/a |",
            "| server CPU (% of one core) | n/a |",
            "191.0% (load generator saturated)",
            "- load generator saturated",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["messages"]["lost"], 2);
        assert_eq!(json["e2e_latency_us"]["p99"], 3000);
        assert_eq!(json["server"]["cpu_percent"], serde_json::Value::Null);
        assert_eq!(json["bench_saturated"], true);
    }
}
