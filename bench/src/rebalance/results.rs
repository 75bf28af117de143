//! What a `rebalance` run reports: the JSON report's types, its Markdown and its chart,
//! and the verdict (PASS when the store that was judged could be read and shows nothing
//! wrong). Rendering only: the run fills the figures in.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{BridgedStats, CommandOutcome, Correctness, Disagreement};
use crate::chart::{latency_panel, Chart, Mark, Panel, Series};
use crate::harness::{Outcome, RunFacts};
use crate::report::{self, map_or_none, LatencySummary};
use crate::BenchError;

/// The faults asked for, as configured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultConfig {
    /// `pause` or `cut`.
    pub kind: String,
    pub target: String,
    pub first_at_s: f64,
    pub every_s: f64,
    pub repeat: u32,
    pub length_s: f64,
}

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
    /// `--dead-after`; 0 when disabled.
    pub dead_after_s: f64,
    pub faults: Option<FaultConfig>,
    pub cql_nodes: Vec<String>,
    pub cql_keyspace: Option<String>,
    /// `--bridged`: members connect with home rooms of their own and join their room over
    /// the socket.
    pub bridged: bool,
    pub room_prefix: String,
    pub user_prefix: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Disruption {
    /// Members that lost their connection (or had a join refused) at least once.
    pub clients_disconnected: u64,
    /// Disruption episodes (a member's loss until it was resumed), all members.
    pub disconnections: u64,
    /// Of those, before --command or the first fault started (should be 0).
    pub disconnections_before_command: u64,
    /// Connections members dropped as dead (`--dead-after`: no frame arrived while sends
    /// waited for their ack), each followed by a reconnect.
    pub stalled_reconnects: u64,
    /// Members that dropped at least one connection as dead.
    pub clients_stalled: u64,
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

/// One injected fault and what it cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultReport {
    /// 1 for the first.
    pub number: u32,
    /// `pause` or `cut`.
    pub kind: String,
    pub target: String,
    /// Seconds after sending started at which it began (`kill -STOP`, the cut started).
    pub started_at_s: f64,
    /// When it ended: SIGCONT sent, or the heal command returned. `None` if never undone.
    pub ended_at_s: Option<f64>,
    /// Undone before its time because the run ended early.
    pub early: bool,
    /// Members with a disruption that began in this fault's window (from its start until
    /// the next fault's start, or the end of the run).
    pub clients_cut_off: u64,
    pub disconnections: u64,
    /// Connections dropped as dead in the window.
    pub stalled_reconnects: u64,
    /// Seconds from its end until every member was joined and caught up, had seen a
    /// message at least as new as every ack given before that end, and had every send made
    /// before that end answered. `None` when that did not happen before the next fault or
    /// the end of the drain.
    pub end_to_all_resumed_s: Option<f64>,
    pub inject_error: Option<String>,
    pub restore_error: Option<String>,
    /// `cut` only: the cut and heal commands' outcomes.
    pub cut: Option<CommandOutcome>,
    pub heal: Option<CommandOutcome>,
}

/// Reading the rooms back at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadBack {
    /// Rows and pages read through the history API at --url.
    pub history_rows: u64,
    pub history_pages: u64,
    /// Why the history could not be read completely, if it could not.
    pub history_error: Option<String>,
    /// Rows and buckets read straight from the CQL store (with --cql-nodes).
    pub cql_rows: Option<u64>,
    pub cql_buckets: Option<u64>,
    pub cql_error: Option<String>,
    /// Where the history and CQL disagree; `None` unless both were read completely.
    pub disagreement: Option<Disagreement>,
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

/// The streams as members saw them on the wire (the store's verdict is `correctness`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStats {
    pub received: u64,
    pub duplicates: u64,
    /// Ids that arrived not above the last id the member had seen (stored or not).
    pub out_of_order: u64,
    pub misrouted: u64,
}

/// Everything one `rebalance` run reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RebalanceReport {
    #[serde(flatten)]
    pub run: RunFacts,
    pub started_unix_ms: u64,
    /// `PASS` when the store judged was read and shows no failure, else `FAIL`.
    pub verdict: String,
    pub config: RebalanceConfig,
    pub external_command: Option<CommandOutcome>,
    /// Each injected fault, in order.
    pub faults: Vec<FaultReport>,
    /// `--bridged` only: how many members were bridged at the start.
    pub bridged: Option<BridgedStats>,
    pub disruption: Disruption,
    pub sends: SendStats,
    pub stream: StreamStats,
    pub correctness: Correctness,
    pub read_back: ReadBack,
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
    /// command's and faults' `started_at_s` are on the same clock).
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
    /// Of the connections lost, those the member dropped as dead (`--dead-after`).
    pub stalled_reconnects: u64,
    /// Disruptions that ended in this second (the member rejoined and caught up).
    pub resumes: u64,
}

impl RebalanceReport {
    /// The store that was judged could be read, and shows no failure.
    pub fn pass(&self) -> bool {
        self.correctness.clean() && self.store_error().is_none()
    }

    /// Why the store that was judged (CQL when asked for, else the history API) could not
    /// be read completely.
    pub fn store_error(&self) -> Option<&str> {
        let rb = &self.read_back;
        if self.config.cql_nodes.is_empty() {
            rb.history_error.as_deref()
        } else {
            rb.cql_error.as_deref()
        }
    }

    /// One line saying why the run failed, for stderr.
    pub fn failure_line(&self) -> String {
        let mut parts: Vec<String> = self
            .correctness
            .failures()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if let Some(e) = self.store_error() {
            parts.push(format!(
                "the store ({}) could not be read: {e}",
                self.correctness.judged_by
            ));
        }
        format!("rebalance FAIL: {}", parts.join(", "))
    }

    /// The timeline as an SVG chart: ack latency, acks/s and members, with the command's
    /// run and each fault shaded and the end of sending marked.
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
        for f in &self.faults {
            let length = c.faults.as_ref().map_or(0.0, |x| x.length_s);
            marks.push(Mark {
                label: format!("{} {}", f.kind, f.number),
                from: f.started_at_s,
                to: Some(f.ended_at_s.unwrap_or(f.started_at_s + length)),
            });
        }
        marks.push(Mark {
            label: "sending ends".into(),
            from: c.duration_s,
            to: None,
        });
        let mut changes = Vec::new();
        if let Some(x) = &self.external_command {
            changes.push(format!("--command at {} s: {}", x.started_at_s, x.command));
        }
        if let Some(f) = &c.faults {
            changes.push(format!(
                "{} × {} {} s ({}) from {} s",
                f.repeat, f.kind, f.length_s, f.target, f.first_at_s
            ));
        }
        if changes.is_empty() {
            changes.push("no --command, no faults".into());
        }
        Chart {
            title: format!(
                "chat-bench rebalance: {} rooms × {} members × {} msg/s",
                c.rooms, c.members, c.rate_per_member
            ),
            subtitle: format!(
                "{} · git {} · {}",
                c.url,
                self.run.git_rev,
                changes.join(" · ")
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
                Panel::new(
                    "sends acked per second",
                    vec![Series::of("acks/s", "#2ca02c", t, at, |p| p.acks as f64)],
                ),
                Panel::new(
                    "members",
                    vec![
                        Series::of("joined", "#9467bd", t, at, |p| p.members_joined as f64),
                        Series::of("disconnections/s", "#d62728", t, at, |p| {
                            p.disconnections as f64
                        }),
                        Series::of("stalled/s", "#ff7f0e", t, at, |p| {
                            p.stalled_reconnects as f64
                        }),
                        Series::of("resumes/s", "#17becf", t, at, |p| p.resumes as f64),
                    ],
                ),
            ],
            marks,
        }
        .to_svg()
    }

    /// The command's run, the faults' table and the bridged members, as configured.
    fn changes_md(&self, o: &mut String) {
        use std::fmt::Write as _;
        let c = &self.config;
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
            None if c.faults.is_none() => {
                let _ = writeln!(o, "No command, no faults: a plain resume-capable run.\n");
            }
            None => {}
        }
        let opt_s = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2} s"));
        if let Some(f) = &c.faults {
            let _ = writeln!(
                o,
                "Faults: {} × {} of {} s ({}), from {} s{}\n",
                f.repeat,
                f.kind,
                f.length_s,
                f.target,
                f.first_at_s,
                if f.repeat > 1 {
                    format!(", every {} s", f.every_s)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(
                o,
                "| fault | started | ended | clients cut off | disconnections | stalled reconnects | end → all resumed | problems |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
            for x in &self.faults {
                let mut problems: Vec<String> = Vec::new();
                if let Some(e) = &x.inject_error {
                    problems.push(format!("inject: {e}"));
                }
                if let Some(e) = &x.restore_error {
                    problems.push(format!("undo: {e}"));
                }
                if x.early {
                    problems.push("undone early".into());
                }
                let _ = writeln!(
                    o,
                    "| {} {} | {:.2} s | {} | {} | {} | {} | {} | {} |",
                    x.kind,
                    x.number,
                    x.started_at_s,
                    opt_s(x.ended_at_s),
                    x.clients_cut_off,
                    x.disconnections,
                    x.stalled_reconnects,
                    opt_s(x.end_to_all_resumed_s),
                    if problems.is_empty() {
                        "none".into()
                    } else {
                        problems.join("; ")
                    }
                );
            }
            let _ = writeln!(o);
        }
        if let Some(b) = &self.bridged {
            let _ = writeln!(
                o,
                "Bridged: {} of {} members connect through a home room owned by another node \
                 than their room's owner and join their room over the socket (ring of {} at \
                 the start, {} owner lookups in {:.2} s).\n",
                b.bridged, b.members, b.ring_size, b.owner_lookups, b.lookup_s
            );
        }
    }

    /// The results table's rows: the store's verdict first, then what members lived through.
    fn rows(&self) -> Vec<(&'static str, String)> {
        let (d, s, k, rb) = (
            &self.disruption,
            &self.sends,
            &self.correctness,
            &self.read_back,
        );
        let opt_s = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2} s"));
        let disagreement = match &rb.disagreement {
            Some(x) => format!(
                "{} only in the history, {} only in CQL, {} differing",
                x.history_only, x.cql_only, x.differing
            ),
            None => "not compared".into(),
        };
        vec![
            ("**acked_lost**", k.acked_lost.to_string()),
            ("**stored_twice**", k.stored_twice.to_string()),
            (
                "**gaps** (members with gaps)",
                format!("{} ({})", k.gaps, k.members_with_gaps),
            ),
            (
                "**out_of_order** (members)",
                format!("{} ({})", k.out_of_order, k.members_out_of_order),
            ),
            (
                "**unknown_ids** (members)",
                format!("{} ({})", k.unknown_ids, k.members_with_unknown_ids),
            ),
            (
                "stored after a member's last received (tail)",
                k.unreceived_tail.to_string(),
            ),
            ("ids in two rows", k.ids_reused.to_string()),
            (
                "acked pairs checked / stored messages judged",
                format!("{} / {}", k.acked_checked, k.stored_messages),
            ),
            (
                "history rows (pages)",
                format!("{} ({})", rb.history_rows, rb.history_pages),
            ),
            (
                "CQL rows (buckets)",
                match (rb.cql_rows, rb.cql_buckets) {
                    (Some(r), Some(b)) => format!("{r} ({b})"),
                    _ => "not read".into(),
                },
            ),
            ("history vs CQL", disagreement),
            ("duplicates received", self.stream.duplicates.to_string()),
            (
                "wire order: ids not above the last seen",
                self.stream.out_of_order.to_string(),
            ),
            ("misrouted", self.stream.misrouted.to_string()),
            (
                "clients disconnected / episodes",
                format!("{} / {}", d.clients_disconnected, d.disconnections),
            ),
            (
                "stalled reconnects (clients)",
                format!("{} ({})", d.stalled_reconnects, d.clients_stalled),
            ),
            (
                "episodes before the command or first fault",
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
        ]
    }

    /// Why the store could not be read, examples of each failure, gaps by member, the
    /// history's disagreements with CQL, the warnings and the notes.
    fn details_md(&self, o: &mut String, judged: &str) {
        use std::fmt::Write as _;
        let (k, rb) = (&self.correctness, &self.read_back);
        if let Some(e) = self.store_error() {
            let _ = writeln!(o, "\n**The store ({judged}) could not be read:** {e}");
        }
        if !k.examples.is_empty() {
            let _ = writeln!(o, "\nExamples:");
            for (kind, items) in k.examples.kinds() {
                for i in items {
                    let _ = writeln!(o, "- {kind}: {i}");
                }
            }
        }
        if !k.gaps_by_member.is_empty() {
            let _ = writeln!(o, "\nGaps by member (first {MEMBERS_LISTED}):");
            for g in k.gaps_by_member.iter().take(MEMBERS_LISTED) {
                let _ = writeln!(
                    o,
                    "- {} (room {}): {} missing, ids {}..={}",
                    g.user, g.room, g.gaps, g.first_missing, g.last_missing
                );
            }
        }
        if let Some(x) = rb.disagreement.as_ref().filter(|x| x.any()) {
            let _ = writeln!(o, "\nHistory vs CQL:");
            for e in &x.examples {
                let _ = writeln!(o, "- {e}");
            }
        }
        for (title, items) in [("Warnings", &self.warnings), ("Notes", &self.notes)] {
            if !items.is_empty() {
                let _ = writeln!(o, "\n{title}:");
                for i in items {
                    let _ = writeln!(o, "- {i}");
                }
            }
        }
    }
}

impl Outcome for RebalanceReport {
    fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.config;
        let d = &self.disruption;
        let s = &self.sends;
        let k = &self.correctness;
        let mut o = String::new();
        report::title_md(
            &mut o,
            &format!("rebalance: {}", self.verdict),
            &self.run.command,
        );
        let _ = writeln!(
            o,
            "git `{}` · nproc {} · {} · {} rooms × {} members at {} msg/s each, {} B bodies, \
             {} s of sending, drain up to {} s, dead after {}\n",
            self.run.git_rev,
            self.run.nproc,
            c.url,
            c.rooms,
            c.members,
            c.rate_per_member,
            c.body_bytes,
            c.duration_s,
            c.drain_s,
            if c.dead_after_s > 0.0 {
                format!("{} s of silence", c.dead_after_s)
            } else {
                "never (--dead-after 0)".into()
            }
        );
        self.changes_md(&mut o);
        let judged = match k.judged_by.as_str() {
            "cql" => "the CQL store",
            _ => "the history API",
        };
        let _ = writeln!(o, "Judged by {judged}, read back after the drain.\n");
        report::metric_table(&mut o, self.rows());
        let _ = writeln!(o);
        report::latency_table(
            &mut o,
            &[
                ("resume (loss → caught up)", &d.resume_us),
                ("rejoin (loss → joined)", &d.rejoin_us),
                ("ack (first send → ack)", &s.ack_latency_us),
            ],
        );
        self.details_md(&mut o, judged);
        o
    }

    fn svg(&self) -> Option<String> {
        Some(self.chart())
    }

    fn verdict(&self) -> Result<(), BenchError> {
        if self.pass() {
            Ok(())
        } else {
            Err(crate::harness::failed(self.failure_line()))
        }
    }
}

/// Members listed by name in the Markdown's gaps section (the JSON lists all).
const MEMBERS_LISTED: usize = 10;
