//! The quiesce step: wait for a window without data-changing requests, then hold the
//! instant gate exclusively.
//!
//! The idle check runs twice: before taking the gate (cheap, lets writers run) and
//! again under it, since a write may have started and ended between the two.

use super::job::Job;
use super::BackupParams;
use crate::engine::{Engine, ExclusiveGate};
use crate::error::Result;
use std::time::{Duration, Instant};

/// Quiesce timeout when the params say 0.
pub const DEFAULT_QUIESCE_TIMEOUT_MS: u64 = 80_000;

/// Wait for an idle window (if asked) and take the gate exclusively.
pub(super) fn quiesce<'e>(
    engine: &'e Engine,
    job: &Job,
    p: &BackupParams,
) -> Result<ExclusiveGate<'e>> {
    if p.quiesce_idle_ms == 0 {
        return Ok(engine.pause_writes());
    }
    let idle = Duration::from_millis(p.quiesce_idle_ms);
    let timeout = Duration::from_millis(if p.quiesce_timeout_ms == 0 {
        DEFAULT_QUIESCE_TIMEOUT_MS
    } else {
        p.quiesce_timeout_ms
    });
    let t0 = Instant::now();
    loop {
        if job.is_canceled() {
            return Err(crate::err!(
                Canceled,
                "backup canceled while waiting for the disk to become idle"
            ));
        }
        let (since, inflight) = engine.idle_for();
        if inflight == 0 && since >= idle {
            let g = engine.pause_writes();
            // under the gate nothing is in flight; did a write slip in?
            if engine.idle_for().0 >= idle {
                return Ok(g);
            }
        }
        if t0.elapsed() >= timeout {
            return Err(crate::err!(
                Busy,
                "unable to start the backup of {:?}: the disk was never idle for {} ms within {} ms \
                 (writes kept coming); nothing was changed — retry, or lower the idle time",
                engine.config().name,
                idle.as_millis(),
                timeout.as_millis()
            ));
        }
        let wait = idle
            .saturating_sub(since)
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        std::thread::sleep(wait);
    }
}
