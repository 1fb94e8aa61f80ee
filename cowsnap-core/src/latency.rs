//! Request service-time histograms: fixed buckets, lock-free, bounded memory.
//!
//! Design notes
//! - The bucket bounds are fixed at compile time ([`BOUNDS_US`], 10 µs to 30 s, roughly
//!   1-2.5-5 per decade) plus one overflow bucket, so a histogram is 21 atomic counters
//!   and a nanosecond sum, whatever the load: nothing grows.
//! - `record` is two relaxed `fetch_add`s (the bucket and the sum); readers never block
//!   writers. A [`HistogramSnapshot`] taken while requests complete may show a sum that
//!   runs a request ahead of or behind the buckets; the count is the buckets' total, so
//!   buckets and count always agree (which Prometheus requires of `+Inf` and `_count`).
//! - Buckets are stored non-cumulative (each request lands in exactly one); the exporter
//!   accumulates. The snapshot carries its bounds, so a reader never has to assume this
//!   build's buckets.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in microseconds (inclusive: a request of exactly 100 µs
/// lands in the 100 µs bucket). Longer requests land in the overflow bucket.
pub const BOUNDS_US: [u64; 20] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One counter per bound, then the overflow bucket.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    /// Sum of the recorded durations, ns (wraps after 584 years of service time).
    sum_ns: AtomicU64,
}

/// What a histogram held at one moment (also the control socket's wire form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, µs, ascending.
    pub bounds_us: Vec<u64>,
    /// Requests per bucket, not cumulative: one entry per bound, then the overflow.
    pub counts: Vec<u64>,
    /// Sum of the durations, ns.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// Requests recorded (the buckets' total).
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.saturating_add(c))
    }

    /// Whether the snapshot is well formed: one count per bound plus the overflow, and
    /// strictly ascending bounds (a reader checks what another build sent).
    pub fn is_valid(&self) -> bool {
        self.counts.len() == self.bounds_us.len() + 1
            && self.bounds_us.windows(2).all(|w| w[0] < w[1])
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record one request that took `d`.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        // the first bound >= us; BOUNDS_US.len() is the overflow bucket
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The current figures.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_us: BOUNDS_US.to_vec(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The engine's request service times (also the control socket's wire form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// READ requests, from the engine's entry to the origin read's completion.
    pub read: HistogramSnapshot,
    /// WRITE requests, from the engine's entry (the instant gate, preserving
    /// originals, throttling and holds included) to the origin write's completion.
    pub write: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::new();
        h.record(Duration::from_micros(0));
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(11));
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(3600));
        let s = h.snapshot();
        assert!(s.is_valid());
        assert_eq!(s.bounds_us, BOUNDS_US);
        assert_eq!(s.count(), 6);
        assert_eq!(s.counts[0], 2, "0 and 10 µs: the 10 µs bucket is inclusive");
        assert_eq!(s.counts[1], 1, "11 µs");
        assert_eq!(s.counts[3], 1, "100 µs");
        let i5ms = BOUNDS_US.iter().position(|&b| b == 5_000).unwrap();
        assert_eq!(s.counts[i5ms], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(s.counts[BOUNDS_US.len()], 1, "an hour overflows");
        assert_eq!(
            s.sum_ns,
            (10 + 11 + 100 + 3_000) * 1_000 + 3_600 * 1_000_000_000
        );
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let h = std::sync::Arc::new(LatencyHistogram::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.record(Duration::from_micros((i * 7 + t) % 2_000_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 40_000);
        assert_eq!(s.counts.len(), BOUNDS_US.len() + 1);
    }

    #[test]
    fn a_snapshot_from_elsewhere_is_checked() {
        let mut s = LatencyHistogram::new().snapshot();
        assert!(s.is_valid());
        s.counts.pop();
        assert!(!s.is_valid(), "a count missing");
        let s = HistogramSnapshot {
            bounds_us: vec![5, 5],
            counts: vec![0, 0, 0],
            sum_ns: 0,
        };
        assert!(!s.is_valid(), "bounds not ascending");
    }
}
