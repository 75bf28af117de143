//! Per-second tallies of a run for its `timeline` (JSON) and `--chart` (SVG): counts of
//! events and a latency histogram per second, by the second each event happened in
//! (seconds since an origin the scenario chooses).
//!
//! Bucketing by event time, not by when a tally is flushed or merged, is what lets the
//! scenarios keep the hot path cheap: a task keeps its own [`Seconds`] or [`Batch`] and
//! hands it over in bulk (history's readers), a worker process sends its seconds to the
//! parent over the pipe ([`WireSecond`], `connections`), or the seconds are built after
//! the run from timestamps the members already kept (`rebalance`). Merging is exact: counts
//! add and histograms add.
//!
//! Nothing here does I/O; the bucketing and merging are unit-tested directly.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::latency::HIST_MAX_US;
use crate::latency::{histogram_pairs, merge_pairs};

/// Seconds kept; a longer run keeps its first hour (as `churn` does).
pub const MAX_SECONDS: usize = 3600;

/// Per-second latency histograms keep 2 significant digits (1%): ~20 KiB per second with
/// samples instead of ~140 KiB at the whole-run histograms' 3, which is plenty for a chart.
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 2).expect("constant histogram bounds are valid")
}

/// One second: `K` event counts (their meaning is the scenario's) and, when any were
/// recorded, the latencies of what completed in it.
#[derive(Debug, Clone)]
pub struct Second<const K: usize> {
    pub counts: [u64; K],
    pub latency: Option<Histogram<u64>>,
}

impl<const K: usize> Default for Second<K> {
    fn default() -> Self {
        Second {
            counts: [0; K],
            latency: None,
        }
    }
}

/// `(p50, p99, max, samples)` of a second's latencies in microseconds; zeros without any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SecondLatency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub samples: u64,
}

impl<const K: usize> Second<K> {
    pub fn latency(&self) -> SecondLatency {
        match &self.latency {
            Some(h) if !h.is_empty() => SecondLatency {
                p50: h.value_at_quantile(0.5),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
                samples: h.len(),
            },
            _ => SecondLatency::default(),
        }
    }

    fn record(&mut self, us: u64, n: u64) {
        self.latency
            .get_or_insert_with(second_histogram)
            .saturating_record_n(us.max(1), n);
    }
}

/// A run's seconds, index = whole seconds since the origin.
#[derive(Debug, Clone)]
pub struct Seconds<const K: usize> {
    seconds: Vec<Second<K>>,
}

impl<const K: usize> Default for Seconds<K> {
    fn default() -> Self {
        Seconds {
            seconds: Vec::new(),
        }
    }
}

impl<const K: usize> Seconds<K> {
    /// Second `i`, created (with every second before it) on first use; `None` past
    /// [`MAX_SECONDS`].
    fn at(&mut self, i: usize) -> Option<&mut Second<K>> {
        if i >= MAX_SECONDS {
            return None;
        }
        if self.seconds.len() <= i {
            self.seconds.resize_with(i + 1, Second::default);
        }
        self.seconds.get_mut(i)
    }

    /// Adds `n` to count `k` of second `i`.
    pub fn count(&mut self, i: usize, k: usize, n: u64) {
        if let Some(c) = self.at(i).and_then(|s| s.counts.get_mut(k)) {
            *c += n;
        }
    }

    /// Records one latency (µs) in second `i`.
    pub fn latency(&mut self, i: usize, us: u64) {
        if let Some(s) = self.at(i) {
            s.record(us, 1);
        }
    }

    /// Makes sure seconds `0..n` exist, so quiet seconds (a hold) appear as zeros.
    pub fn extend_to(&mut self, n: usize) {
        if n > 0 {
            let _ = self.at(n - 1);
        }
    }

    /// Adds `other` second by second.
    pub fn merge(&mut self, other: &Seconds<K>) {
        for (i, o) in other.seconds.iter().enumerate() {
            let Some(s) = self.at(i) else { break };
            for (a, b) in s.counts.iter_mut().zip(o.counts) {
                *a += b;
            }
            if let Some(h) = &o.latency {
                let mine = s.latency.get_or_insert_with(second_histogram);
                // Same bounds on both sides: `add` cannot fail.
                let _ = mine.add(h);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seconds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seconds.is_empty()
    }

    /// `(second index, second)` in order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Second<K>)> {
        self.seconds.iter().enumerate()
    }

    /// Running total of count `up` minus count `down` at the end of each second: a gauge
    /// (members joined, connections open) from its transitions.
    pub fn running(&self, up: usize, down: Option<usize>) -> Vec<i64> {
        let count = |s: &Second<K>, k: usize| s.counts.get(k).copied().unwrap_or(0) as i64;
        let mut level = 0i64;
        self.seconds
            .iter()
            .map(|s| {
                level += count(s, up) - down.map_or(0, |d| count(s, d));
                level
            })
            .collect()
    }

    /// Seconds with anything in them, for a pipe.
    pub fn to_wire(&self) -> Vec<WireSecond> {
        self.iter()
            .filter(|(_, s)| s.counts.iter().any(|&c| c > 0) || s.latency.is_some())
            .map(|(i, s)| WireSecond {
                second: i as u64,
                counts: s.counts.to_vec(),
                latency_us: s.latency.as_ref().map(histogram_pairs).unwrap_or_default(),
            })
            .collect()
    }

    /// Adds seconds read from a pipe; counts beyond `K` are ignored.
    pub fn merge_wire(&mut self, wire: &[WireSecond]) {
        for w in wire {
            let Some(s) = usize::try_from(w.second).ok().and_then(|i| self.at(i)) else {
                continue;
            };
            for (a, b) in s.counts.iter_mut().zip(&w.counts) {
                *a += b;
            }
            if !w.latency_us.is_empty() {
                merge_pairs(
                    s.latency.get_or_insert_with(second_histogram),
                    &w.latency_us,
                );
            }
        }
    }
}

/// One second as a worker sends it to its parent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireSecond {
    /// Whole seconds since the origin the parent gave.
    pub second: u64,
    pub counts: Vec<u64>,
    /// Latency (µs) as `[value, count]` pairs, as `connect_us` is sent.
    pub latency_us: Vec<[u64; 2]>,
}

/// The second `at` falls in, counted from `origin`; moments before it count in second 0.
pub fn second_of(origin: Instant, at: Instant) -> usize {
    at.saturating_duration_since(origin).as_secs() as usize
}

/// [`Seconds`] that several tasks add to through [`Batch`]es.
#[derive(Debug)]
pub struct SharedSeconds<const K: usize> {
    pub origin: Instant,
    seconds: Mutex<Seconds<K>>,
}

impl<const K: usize> SharedSeconds<K> {
    pub fn new(origin: Instant) -> Arc<Self> {
        Arc::new(SharedSeconds {
            origin,
            seconds: Mutex::new(Seconds::default()),
        })
    }

    /// A copy of what the batches handed over so far.
    pub fn snapshot(&self) -> Seconds<K> {
        self.seconds.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Latencies a batch holds before it takes the lock.
const BATCH: usize = 256;

/// One task's pending additions to a [`SharedSeconds`]: the lock is taken once per second
/// the task was busy in (or per [`BATCH`] samples), and when the batch is dropped, so a
/// task that ends or is aborted loses nothing.
pub struct Batch<const K: usize> {
    into: Arc<SharedSeconds<K>>,
    second: usize,
    counts: [u64; K],
    latencies: Vec<u64>,
}

impl<const K: usize> Batch<K> {
    pub fn new(into: Arc<SharedSeconds<K>>) -> Self {
        Batch {
            into,
            second: 0,
            counts: [0; K],
            latencies: Vec::new(),
        }
    }

    fn move_to(&mut self, at: Instant) {
        let i = second_of(self.into.origin, at);
        if i != self.second {
            self.flush();
            self.second = i;
        }
    }

    /// Adds `n` to count `k` at `at`.
    pub fn count(&mut self, at: Instant, k: usize, n: u64) {
        self.move_to(at);
        if let Some(c) = self.counts.get_mut(k) {
            *c += n;
        }
    }

    /// Records a latency (µs) that completed at `at`.
    pub fn latency(&mut self, at: Instant, us: u64) {
        self.move_to(at);
        self.latencies.push(us);
        if self.latencies.len() >= BATCH {
            self.flush();
        }
    }

    /// Hands everything pending to the shared seconds.
    pub fn flush(&mut self) {
        if self.latencies.is_empty() && self.counts.iter().all(|&c| c == 0) {
            return;
        }
        if let Ok(mut s) = self.into.seconds.lock() {
            for (k, &n) in self.counts.iter().enumerate() {
                if n > 0 {
                    s.count(self.second, k, n);
                }
            }
            for &us in &self.latencies {
                s.latency(self.second, us);
            }
        }
        self.counts = [0; K];
        self.latencies.clear();
    }
}

impl<const K: usize> Drop for Batch<K> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn events_land_in_their_second_and_gauges_run() {
        let mut s = Seconds::<2>::default();
        s.count(0, 0, 5);
        s.count(2, 0, 1);
        s.count(2, 1, 3);
        s.count(MAX_SECONDS, 0, 1);
        s.count(1, 7, 1);
        for us in [100, 200, 300, 10_000] {
            s.latency(1, us);
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.running(0, Some(1)), vec![5, 5, 3]);
        assert_eq!(s.running(0, None), vec![5, 5, 6]);
        let l = s.iter().nth(1).map(|(_, x)| x.latency()).expect("second 1");
        assert_eq!(l.samples, 4);
        assert!((198..=202).contains(&l.p50), "{l:?}");
        assert!((9_900..=10_100).contains(&l.max), "{l:?}");
        assert_eq!(
            s.iter().next().map(|(_, x)| x.latency()),
            Some(SecondLatency::default())
        );
        s.extend_to(6);
        assert_eq!(s.len(), 6);
        assert_eq!(s.running(0, Some(1)).last(), Some(&3));
    }

    #[test]
    fn merging_adds_by_second_directly_and_through_the_pipe() {
        let mut a = Seconds::<2>::default();
        let mut b = Seconds::<2>::default();
        a.count(0, 0, 1);
        a.latency(0, 1_000);
        b.count(0, 0, 2);
        b.count(3, 1, 1);
        b.latency(3, 5_000);
        b.latency(0, 3_000);

        let mut direct = a.clone();
        direct.merge(&b);
        // Through JSON, as a worker sends it.
        let line = serde_json::to_string(&b.to_wire()).expect("ser");
        let wire: Vec<WireSecond> = serde_json::from_str(&line).expect("de");
        assert_eq!(wire.len(), 2, "empty seconds are not sent: {line}");
        let mut piped = a.clone();
        piped.merge_wire(&wire);

        for m in [&direct, &piped] {
            assert_eq!(m.len(), 4);
            let secs: Vec<_> = m.iter().map(|(_, s)| (s.counts, s.latency())).collect();
            assert_eq!(secs[0].0, [3, 0]);
            assert_eq!(secs[0].1.samples, 2);
            assert!((2_980..=3_020).contains(&secs[0].1.max), "{:?}", secs[0]);
            assert_eq!(secs[1].0, [0, 0]);
            assert_eq!(secs[3].0, [0, 1]);
            assert_eq!(secs[3].1.samples, 1);
        }
    }

    #[test]
    fn batches_flush_per_second_and_on_drop() {
        let origin = Instant::now();
        let shared = SharedSeconds::<1>::new(origin);
        let mut b = Batch::new(shared.clone());
        // Before the origin counts as second 0.
        b.count(origin - Duration::from_millis(10), 0, 1);
        b.latency(origin + Duration::from_millis(500), 40);
        assert!(
            shared.snapshot().is_empty(),
            "nothing flushed within a second"
        );
        b.latency(origin + Duration::from_millis(2_100), 70);
        let s = shared.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!(s.iter().next().map(|(_, x)| x.counts), Some([1]));
        // Many samples in one second are flushed in batches of BATCH.
        for _ in 0..BATCH {
            b.latency(origin + Duration::from_millis(2_200), 80);
        }
        assert_eq!(shared.snapshot().len(), 3);
        b.count(origin + Duration::from_millis(2_300), 0, 1);
        drop(b);
        let s = shared.snapshot();
        let two = s
            .iter()
            .nth(2)
            .map(|(_, x)| (x.counts, x.latency().samples));
        assert_eq!(two, Some(([1], BATCH as u64 + 1)));
    }
}
