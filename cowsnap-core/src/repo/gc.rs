//! Garbage collection of an object-store repository shared by many writers, with no
//! lock and no conditional write: the rules backups and prune follow, as pure
//! functions of the store's clock (see docs/ARCHITECTURE.md, "Many hosts, one bucket",
//! for the argument that no acknowledged generation can lose a chunk).
//!
//! # The one parameter: the grace period `G`
//!
//! Fixed in the repository's `cowsnap-repo.json` (`gc_grace_secs`, chosen when the
//! repository is created, 1 day by default), so every backup and every prune follow
//! the same `G`. Every absolute time is a last-modified time the store gave an object
//! (a *probe*: an empty object PUT and read back), never a host's clock; a host's
//! monotonic clock only measures how long it has itself been doing something.
//!
//! # Writers (a backup)
//!
//! - W1 start: probe `writers/<id>` → `S` (removed again when the backup ends).
//! - W2 reuse: a chunk listed as present is reused unwritten only if its last-modified
//!   time is at least `S − G/2` ([`Grace::reusable`]); an older one is written again
//!   (same bytes, fresh time) — a *refresh*.
//! - W3 refresh check: before its index is written, a backup that refreshed chunks
//!   waits until [`Grace::refresh_wait`] has passed since the last refresh returned,
//!   one that PUT new chunks within that time of its listing of `chunks/` until it has
//!   passed since the listing; then it checks each of those chunks is there: one gone
//!   (a prune that listed an old copy before the PUT deleted it after) fails the
//!   backup, nothing published.
//! - W4 publish: index, metadata, then probe `writers/<id>` again → `E`; if
//!   `E > S + G/4` ([`Grace::published_in_time`]) the metadata is deleted again
//!   and the backup fails (its chunks may have been collected meanwhile).
//!
//! # Prune
//!
//! - P1 probe `gc/probe-<random>` → `N`; everything below must happen before its
//!   monotonic clock says [`Grace::sweep_window`] (`G/8`) has passed, or it stops.
//! - P2 mark: the chunks of kept generations, of generations removed now, of
//!   generations whose tombstone (`generations/<id>.removed`) is younger than `G`,
//!   and of indexes without metadata younger than `G` ([`Grace::in_use`]).
//! - P3 unpublish each removed generation: PUT its tombstone, then delete its metadata
//!   (its index stays, in use, for `G`).
//! - P4 sweep, one page of 1000 keys of `chunks/` at a time: list it (one request),
//!   delete each unmarked chunk
//!   last modified before `N − G` ([`Grace::collectable`]), every delete issued within
//!   [`Grace::round`] of that listing (the rest wait for a later prune) and bounded by
//!   [`Grace::request_timeout`].
//! - P5 leftovers older than `G`: tombstoned indexes and their tombstones, indexes
//!   without metadata, writer probes of crashed backups, probes of crashed prunes.

use std::time::Duration;

/// The grace period when a repository's configuration names none: 1 day.
pub const DEFAULT_GRACE_SECS: u64 = 86_400;
/// The shortest grace period a repository may be created with (tests use seconds).
pub const MIN_GRACE_SECS: u64 = 4;
/// The longest: 90 days.
pub const MAX_GRACE_SECS: u64 = 90 * 86_400;

/// The grace period `G` of a repository and the bounds derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    ms: i64,
}

impl Grace {
    /// `secs` seconds, clamped into [`MIN_GRACE_SECS`] ..= [`MAX_GRACE_SECS`].
    pub fn from_secs(secs: u64) -> Grace {
        let s = secs.clamp(MIN_GRACE_SECS, MAX_GRACE_SECS);
        // at most 90 days in ms: far from overflowing
        Grace {
            ms: s as i64 * 1000,
        }
    }

    /// `G` in milliseconds.
    pub fn millis(self) -> i64 {
        self.ms
    }

    /// W2: whether a chunk last modified at `modified` may be reused unwritten by a
    /// backup that started at `start`.
    pub fn reusable(self, modified: i64, start: i64) -> bool {
        modified >= start.saturating_sub(self.ms / 2)
    }

    /// W4: whether a backup that started at `start` and saw its metadata published by
    /// `end` was in time.
    pub fn published_in_time(self, start: i64, end: i64) -> bool {
        end <= start.saturating_add(self.ms / 4)
    }

    /// P2/P5: whether an object last modified at `modified` (a tombstone, an index
    /// without metadata) is still in use at `now`.
    pub fn in_use(self, modified: i64, now: i64) -> bool {
        modified > now.saturating_sub(self.ms)
    }

    /// P4: whether an unmarked chunk last modified at `modified` may be deleted by a
    /// prune whose probe said `now`.
    pub fn collectable(self, modified: i64, now: i64) -> bool {
        !self.in_use(modified, now)
    }

    /// P1: how long a prune may go on unpublishing and sweeping after its probe: `G/8`.
    pub fn sweep_window(self) -> Duration {
        Duration::from_millis((self.ms / 8) as u64)
    }

    /// P4: how long after listing a page its deletes may still be issued: `G/64`,
    /// at most 2 s (a page's deletes beyond that wait for a later prune).
    pub fn round(self) -> Duration {
        Duration::from_millis((self.ms / 64) as u64).min(Duration::from_secs(2))
    }

    /// P4: the longest a prune waits for one delete: `G/64`, from 200 ms to 3 s.
    /// (Short grace periods are for tests; with them the store must answer quickly.)
    pub fn request_timeout(self) -> Duration {
        Duration::from_millis((self.ms / 64) as u64)
            .clamp(Duration::from_millis(200), Duration::from_secs(3))
    }

    /// W3: how long after its last refresh a backup waits before it checks its
    /// refreshed chunks: a round, the delete issued at its end, and a margin as long.
    pub fn refresh_wait(self) -> Duration {
        self.round() + self.request_timeout() * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: i64 = 100_000; // 100 s

    fn g() -> Grace {
        Grace::from_secs(100)
    }

    #[test]
    fn bounds_are_clamped() {
        assert_eq!(Grace::from_secs(0).millis(), 4000);
        assert_eq!(
            Grace::from_secs(u64::MAX).millis(),
            MAX_GRACE_SECS as i64 * 1000
        );
        let day = Grace::from_secs(DEFAULT_GRACE_SECS);
        assert_eq!(day.round(), Duration::from_secs(2));
        assert_eq!(day.request_timeout(), Duration::from_secs(3));
        assert_eq!(day.sweep_window(), Duration::from_secs(10_800));
        assert_eq!(day.refresh_wait(), Duration::from_secs(8));
        for secs in [
            MIN_GRACE_SECS,
            4,
            60,
            3600,
            DEFAULT_GRACE_SECS,
            MAX_GRACE_SECS,
        ] {
            let g = Grace::from_secs(secs);
            assert!(g.refresh_wait() >= g.round() + g.request_timeout());
            // the wait fits well inside the publish bound from 4 s up
            if secs >= 4 {
                assert!(
                    g.refresh_wait().as_millis() * 2 < (g.millis() / 4) as u128,
                    "{secs}"
                );
            }
        }
        let short = Grace::from_secs(4);
        assert_eq!(short.round(), Duration::from_millis(62));
        assert_eq!(short.request_timeout(), Duration::from_millis(200));
    }

    /// The argument of the module docs, checked over a grid of times: a chunk a
    /// backup relies on is never collectable by a prune that cannot see the backup's
    /// generation. The prune's mark misses the generation only when the prune's probe
    /// `n` precedes the backup's publish end `e`.
    #[test]
    fn no_prune_that_misses_a_generation_may_collect_what_it_reuses() {
        let g = g();
        let step = G / 20;
        for s in (0..40).map(|k| k * step) {
            for modified in (-80..40).map(|k| k * step) {
                if !g.reusable(modified, s) {
                    continue; // written again instead (W2)
                }
                for e in (0..40).map(|k| s + k * step) {
                    if !g.published_in_time(s, e) {
                        continue; // unpublished again, failed (W4)
                    }
                    for n in (-40..80).map(|k| k * step) {
                        let misses_generation = n < e;
                        assert!(
                            !(misses_generation && g.collectable(modified, n)),
                            "s={s} modified={modified} e={e} n={n}"
                        );
                    }
                }
            }
        }
    }

    /// A chunk the backup wrote itself (last modified at or after its start) is not
    /// collectable by any prune that misses the generation either.
    #[test]
    fn a_backups_own_chunks_survive_until_it_publishes() {
        let g = g();
        let s = 1_000_000;
        let e = s + G / 4;
        assert!(g.published_in_time(s, e));
        assert!(!g.published_in_time(s, e + 1));
        for n in [s - G, s, s + G / 2, e - 1] {
            assert!(!g.collectable(s, n), "n={n}");
        }
        // long after: only then, and then the generation is visible to the prune
        assert!(g.collectable(s, s + G + 1));
    }

    /// A tombstone written at `t` keeps a removed generation's index in use for `G`:
    /// a backup that loaded it as its parent saw its metadata, so started (`s`) before
    /// the metadata was deleted, within the prune's window after the tombstone; it
    /// publishes before the `G` ends.
    #[test]
    fn a_tombstone_outlives_every_backup_that_saw_the_generation() {
        let g = g();
        let window = g.sweep_window().as_millis() as i64;
        for t in (0..20).map(|k| k * G / 10) {
            for s in (t - 2 * G..=t + window).step_by((G / 50) as usize) {
                let e = s + G / 4; // the latest publish W4 allows
                for n in (0..40).map(|k| t + k * G / 10) {
                    if n < e {
                        // a prune that misses the backup's generation
                        assert!(g.in_use(t, n), "t={t} s={s} n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn old_chunks_are_not_reused_unwritten() {
        let g = g();
        assert!(g.reusable(1000 - G / 2, 1000));
        assert!(!g.reusable(999 - G / 2, 1000));
        assert!(g.in_use(1, G));
        assert!(!g.in_use(0, G));
    }
}
