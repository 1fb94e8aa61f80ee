//! Gathering a [`Sample`]: every disk attached in the run directory is asked for its
//! status over its control socket, and every `--repo` contributes its last scan.
//!
//! Design notes
//! - A scrape is bounded in time: the daemons are asked in parallel, at most
//!   [`PARALLEL`] at once, each on a connection that never waits to connect
//!   (`Client::connect_nowait`: a stopped daemon's full backlog fails at once) and whose
//!   reads and writes time out after the daemon timeout. A daemon that does not answer
//!   in time is `cowsnap_up 0`; the others are still shown. Worst case for N disks:
//!   ceil(N / PARALLEL) × 2 × timeout.
//! - Repositories are never scanned by a scrape: a scanner thread per `--repo` scans
//!   at start and then every refresh interval ([`RepoScanner`]), reading only metadata
//!   and only the indexes of new generations (`repo::UsageCache`); a scrape copies the
//!   last result.

use super::exposition::{DiskSample, RepoSample, RepoScan, Sample};
use cowsnap_core::repo::{Repo, UsageCache};
use cowsnap_nbd::control::Client;
use cowsnap_nbd::paths::DiskPaths;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Daemons asked at once.
pub const PARALLEL: usize = 16;

fn ask(paths: &DiskPaths, timeout: Duration) -> Option<cowsnap_nbd::control::StatusInfo> {
    let r = Client::connect_nowait(&paths.ctl_socket(), timeout).and_then(|mut c| c.status());
    match r {
        Ok(s) => Some(s),
        Err(e) => {
            log::info!("disk {:?}: {e}", paths.name);
            None
        }
    }
}

/// Ask every disk in `names` (in parallel, bounded) for its status.
pub fn disks(dirs: &crate::Dirs, names: &[String], timeout: Duration) -> Vec<DiskSample> {
    let mut out = Vec::with_capacity(names.len());
    for batch in names.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|n| {
                    let paths = dirs.paths(n);
                    (n, s.spawn(move || ask(&paths, timeout)))
                })
                .collect();
            for (n, h) in handles {
                out.push(DiskSample {
                    name: n.clone(),
                    status: h.join().ok().flatten(),
                });
            }
        });
    }
    out
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One repository's scans: the cache of per-generation figures and the last result.
pub struct RepoScanner {
    dir: PathBuf,
    cache: Mutex<UsageCache>,
    last: Mutex<Option<RepoScan>>,
}

impl RepoScanner {
    /// A scanner of the repository at `dir` (nothing is read yet).
    pub fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(RepoScanner {
            dir,
            cache: Mutex::new(UsageCache::new()),
            last: Mutex::new(None),
        })
    }

    /// Scan now and keep the result.
    pub fn scan(&self) {
        let t0 = Instant::now();
        let usage = {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            Repo::open(&self.dir)
                .and_then(|r| cache.scan(&r))
                .map_err(|e| e.to_string())
        };
        if let Err(e) = &usage {
            log::warn!("{e}");
        }
        let scan = RepoScan {
            usage,
            at_unix: now_unix(),
            took: t0.elapsed(),
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(scan);
    }

    /// Scan now and then every `every`, in a thread of its own, for the process's life.
    pub fn spawn(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("repo-scan".into())
            .spawn(move || loop {
                me.scan();
                std::thread::sleep(every);
            })
            .map(|_| ())
    }

    /// The last result, as a scrape shows it.
    pub fn sample(&self) -> RepoSample {
        RepoSample {
            repo: self.dir.display().to_string(),
            scan: self
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// One whole sample: the attached disks (asked now) and the repositories' last scans.
pub fn sample(dirs: &crate::Dirs, repos: &[Arc<RepoScanner>], timeout: Duration) -> Sample {
    let t0 = Instant::now();
    let names = crate::status::attached_names(dirs);
    let disks = disks(dirs, &names, timeout);
    Sample {
        disks,
        repos: repos.iter().map(|r| r.sample()).collect(),
        collect_time: t0.elapsed(),
    }
}
