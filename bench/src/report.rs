//! The numbers a run produces: per-sender sequence accounting (loss, duplicates,
//! reordering) and the fanout-shaped `Report` other scenarios reuse (its Markdown is in
//! `fanout.rs`). It hands on, for the scenarios that import them from here, the latency
//! summaries (`latency.rs`), the machine's facts (`machine.rs`) and the Markdown cells
//! (`markdown.rs`).
//!
//! Everything here is pure; it never touches the network, so the accounting rules are
//! unit-tested directly.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::harness::RunFacts;
pub use crate::latency::{new_histogram, summary, LatencySummary, HIST_MAX_US};
pub use crate::machine::*;
pub use crate::markdown::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Outcome;

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
