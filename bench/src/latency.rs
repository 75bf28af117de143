//! Latency in microseconds: the histogram every scenario records into, its summary as
//! reports carry it, and the `[value, count]` pairs workers send their parent.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency histograms record microseconds from 1 µs to 60 s at 3 significant digits.
pub const HIST_MAX_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
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

/// Latency percentiles of `samples` (µs; 0 counts as 1).
pub fn summary(samples: impl IntoIterator<Item = u64>) -> LatencySummary {
    let mut h = new_histogram();
    for v in samples {
        h.saturating_record(v.max(1));
    }
    LatencySummary::from_histogram(&h)
}

/// A histogram as `[value, count]` pairs: each recorded bucket's highest equivalent value,
/// which lands in the same bucket when recorded into a histogram of the same bounds.
pub fn histogram_pairs(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect()
}

/// Adds `pairs` into `h`; values beyond its range are clamped (as the bench records them).
pub fn merge_pairs(h: &mut Histogram<u64>, pairs: &[[u64; 2]]) {
    for &[value, count] in pairs {
        h.saturating_record_n(value.max(1), count);
    }
}
