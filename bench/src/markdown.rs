//! Writing reports as Markdown: the cells, tables, titles and notes every scenario's report
//! shares, and when the load generator counts as the bottleneck.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::latency::LatencySummary;

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

/// Label for a received close code: `"4000 slow_consumer"`.
pub fn close_label(code: u16) -> String {
    match common::CloseCode::from_code(code) {
        Some(c) => format!("{code} {}", c.as_str()),
        None if code == 1006 => "1006 abnormal".to_owned(),
        None => code.to_string(),
    }
}
