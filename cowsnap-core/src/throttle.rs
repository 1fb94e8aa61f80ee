//! Writer throttling and the drainer's read-side rate limit.
//!
//! Design notes
//! - Only writers that need a *new* container slot are throttled (their chunk is still
//!   pending). Writers hitting done or out-of-scope chunks never reach this module.
//! - Below the high watermark (default 75 % of the slots) there is no delay. Above it
//!   the delay grows linearly with the fill level the container would have after the
//!   allocation, up to `max_delay_ms` (default 50 ms) when that allocation fills the
//!   container: with 75 % / 50 ms, a write that takes the container to 99 % sleeps
//!   about 48 ms. A full container makes the writer wait for a free slot instead
//!   (see `container::SlotPool`); the backup never fails because the container filled.
//! - The rate limiter is a plain "bytes since start / rate" pacer: before a read the
//!   drainer sleeps until the bytes read so far, this read included, are due. The
//!   drainer also caps its batches at a quarter second's worth of the rate.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Throttle tuning, fixed per engine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThrottleConfig {
    /// Fill level (0..1) above which writers needing a slot are slowed.
    pub high_watermark: f64,
    /// Fill level (0..1) above which the drainer drains the container first.
    pub low_watermark: f64,
    /// Delay at a full container, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            high_watermark: 0.75,
            low_watermark: 0.25,
            max_delay_ms: 50,
        }
    }
}

impl ThrottleConfig {
    /// The delay for a writer about to take one more slot while `used` of `slots`
    /// are in use. Zero below the high watermark.
    pub fn delay_for(&self, used: u64, slots: u64) -> Duration {
        if slots == 0 {
            return Duration::ZERO;
        }
        let fill = (used.saturating_add(1)) as f64 / slots as f64;
        let high = self.high_watermark.clamp(0.0, 1.0);
        if fill <= high {
            return Duration::ZERO;
        }
        let span = (1.0 - high).max(f64::EPSILON);
        let frac = ((fill - high) / span).min(1.0);
        Duration::from_micros((frac * self.max_delay_ms as f64 * 1000.0) as u64)
    }

    /// Whether the drainer should empty the container first.
    pub fn drain_container_first(&self, used: u64, slots: u64) -> bool {
        slots > 0 && used as f64 >= self.low_watermark * slots as f64 && used > 0
    }
}

/// Paces the drainer's origin reads to `rate` bytes per second.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl RateLimiter {
    /// A limiter for `rate` bytes per second (must be > 0).
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate: rate.max(1),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Account for `n` bytes about to be read, sleeping until they are due.
    /// Returns the time slept.
    pub fn take(&mut self, n: u64) -> Duration {
        self.bytes = self.bytes.saturating_add(n);
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let now = self.start.elapsed();
        if due > now {
            let d = due - now;
            std::thread::sleep(d);
            d
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_delay_below_high_watermark() {
        let c = ThrottleConfig::default();
        assert_eq!(c.delay_for(0, 100), Duration::ZERO);
        assert_eq!(c.delay_for(74, 100), Duration::ZERO);
        assert!(c.delay_for(75, 100) > Duration::ZERO);
    }

    #[test]
    fn delay_grows_to_max_at_full() {
        let c = ThrottleConfig::default();
        let d98 = c.delay_for(98, 100); // -> 99 % after allocation
        assert!(d98 > Duration::from_millis(45) && d98 < Duration::from_millis(50));
        assert_eq!(c.delay_for(99, 100), Duration::from_millis(50));
        assert!(c.delay_for(80, 100) < c.delay_for(90, 100));
        // tiny container: the last slot is throttled the most
        assert_eq!(c.delay_for(2, 4), Duration::ZERO);
        assert_eq!(c.delay_for(3, 4), Duration::from_millis(50));
    }

    #[test]
    fn drain_first_above_low_watermark() {
        let c = ThrottleConfig::default();
        assert!(!c.drain_container_first(0, 4));
        assert!(c.drain_container_first(1, 4));
        assert!(!c.drain_container_first(24, 100));
        assert!(c.drain_container_first(25, 100));
    }

    #[test]
    fn rate_limiter_paces() {
        let mut r = RateLimiter::new(10 * 1024 * 1024);
        let t = Instant::now();
        for _ in 0..3 {
            r.take(1024 * 1024);
        }
        // three MiB are due after 0.3 s
        assert!(t.elapsed() >= Duration::from_millis(290));
    }
}
