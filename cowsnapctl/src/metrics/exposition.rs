//! The exposition: what one scrape found (a [`Sample`]), encoded in the Prometheus
//! text format (0.0.4) by the `prometheus-client` crate, which names, escapes and
//! orders the lines (counters get their `_total` suffix there).
//!
//! Every series of a disk carries `disk="NAME"`, of a repository `repo="DIR"`. A disk
//! whose daemon did not answer has only `cowsnap_up 0`. Backup figures (container,
//! holds, throttle, progress) are those of the running or last backup since the
//! daemon started; the `cowsnap_last_backup_*` series are the last *successful* one,
//! remembered across daemon restarts (`0` when none is known, so an alert on its age
//! also fires for a disk never backed up).

use cowsnap_core::repo::RepoUsage;
use cowsnap_nbd::control::{HistogramSnapshot, StatusInfo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// One disk as a scrape found it.
#[derive(Debug, Clone)]
pub struct DiskSample {
    /// Disk name.
    pub name: String,
    /// The daemon's status; `None` when it did not answer in time.
    pub status: Option<StatusInfo>,
}

/// One repository's last scan.
#[derive(Debug, Clone)]
pub struct RepoSample {
    /// The repository directory, as shown in the `repo` label.
    pub repo: String,
    /// The last scan's result; `None` before the first scan finished.
    pub scan: Option<RepoScan>,
}

/// The result of scanning a repository.
#[derive(Debug, Clone)]
pub struct RepoScan {
    /// The figures, or why the scan failed.
    pub usage: Result<RepoUsage, String>,
    /// Unix time (s) the scan finished.
    pub at_unix: f64,
    /// How long it took.
    pub took: Duration,
}

/// Everything one exposition shows.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Attached disks, by name.
    pub disks: Vec<DiskSample>,
    /// Repositories given with `--repo`.
    pub repos: Vec<RepoSample>,
    /// How long asking the daemons took.
    pub collect_time: Duration,
}

/// The states a backup can be in, for `cowsnap_backup_state` ("idle": none since the
/// daemon started).
const BACKUP_STATES: [&str; 5] = ["idle", "quiescing", "running", "complete", "failed"];

type Labels = Vec<(&'static str, String)>;

enum Value<'a> {
    Counter(u64),
    Gauge(f64),
    Histogram(&'a HistogramSnapshot),
}

/// One metric family: its descriptor, then one series per row (none: not shown).
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, Value)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = rows.first() else {
        return Ok(());
    };
    let ty = match first {
        Value::Counter(_) => MetricType::Counter,
        Value::Gauge(_) => MetricType::Gauge,
        Value::Histogram(_) => MetricType::Histogram,
    };
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in rows {
        let mut s = m.encode_family(labels)?;
        match v {
            Value::Counter(c) => s.encode_counter::<NoLabelSet, _, u64>(c, None)?,
            Value::Gauge(g) => s.encode_gauge(g)?,
            Value::Histogram(h) => {
                let buckets: Vec<(f64, u64)> = h
                    .bounds_us
                    .iter()
                    .map(|&b| b as f64 / 1e6)
                    .chain([f64::INFINITY])
                    .zip(h.counts.iter().copied())
                    .collect();
                s.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, h.count(), &buckets, None)?
            }
        }
    }
    Ok(())
}

fn hist(h: Option<&HistogramSnapshot>) -> Option<Value<'_>> {
    h.filter(|h| h.is_valid()).map(Value::Histogram)
}

fn disk(name: &str) -> Labels {
    vec![("disk", name.to_string())]
}

fn secs_ms(ms: u64) -> f64 {
    ms as f64 / 1e3
}

impl Sample {
    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut reg = Registry::default();
        reg.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // writing into a String cannot fail; a collector error would be a bug here
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &reg) {
            log::error!("unable to encode the metrics: {e}");
        }
        out
    }

    fn up(&self) -> impl Iterator<Item = (&str, &StatusInfo)> {
        self.disks
            .iter()
            .filter_map(|d| d.status.as_ref().map(|s| (d.name.as_str(), s)))
    }

    /// Rows of `f` over every disk that answered.
    fn per_disk<'a>(
        &'a self,
        f: impl Fn(&'a StatusInfo) -> Option<Value<'a>>,
    ) -> Vec<(Labels, Value<'a>)> {
        self.up()
            .filter_map(|(n, s)| f(s).map(|v| (disk(n), v)))
            .collect()
    }

    fn encode_disks(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let up: Vec<_> = self
            .disks
            .iter()
            .map(|d| {
                (
                    disk(&d.name),
                    Value::Gauge(f64::from(u8::from(d.status.is_some()))),
                )
            })
            .collect();
        family(
            enc,
            "cowsnap_up",
            "Whether the disk's daemon answered this scrape (1) or not (0).",
            &up,
        )?;
        let info: Vec<_> = self
            .up()
            .map(|(n, s)| {
                let l = vec![
                    ("disk", n.to_string()),
                    ("origin", s.origin.clone()),
                    ("io_engine", s.io_engine.clone()),
                    ("read_only", s.read_only.to_string()),
                ];
                (l, Value::Gauge(1.0))
            })
            .collect();
        family(
            enc,
            "cowsnap_disk_info",
            "The disk's origin and settings (always 1).",
            &info,
        )?;
        let g = |v: u64| Some(Value::Gauge(v as f64));
        let c = |v: u64| Some(Value::Counter(v));
        family(
            enc,
            "cowsnap_disk_size_bytes",
            "Size of the disk.",
            &self.per_disk(|s| g(s.size)),
        )?;
        family(
            enc,
            "cowsnap_daemon_uptime_seconds",
            "Time since the disk's daemon started serving.",
            &self.per_disk(|s| g(s.uptime_s)),
        )?;
        family(
            enc,
            "cowsnap_nbd_connections",
            "NBD connections open now.",
            &self.per_disk(|s| g(s.connections)),
        )?;

        family(
            enc,
            "cowsnap_reads",
            "Read requests served.",
            &self.per_disk(|s| c(s.stats.reads)),
        )?;
        family(
            enc,
            "cowsnap_writes",
            "Write requests served.",
            &self.per_disk(|s| c(s.stats.writes)),
        )?;
        family(
            enc,
            "cowsnap_read_bytes",
            "Bytes read by requests.",
            &self.per_disk(|s| c(s.stats.bytes_read)),
        )?;
        family(
            enc,
            "cowsnap_written_bytes",
            "Bytes written by requests.",
            &self.per_disk(|s| c(s.stats.bytes_written)),
        )?;
        family(
            enc,
            "cowsnap_flushes",
            "Flush requests served.",
            &self.per_disk(|s| c(s.stats.flushes)),
        )?;
        family(
            enc,
            "cowsnap_trims",
            "Trim requests served.",
            &self.per_disk(|s| c(s.stats.trims)),
        )?;
        family(
            enc,
            "cowsnap_write_zeroes",
            "Write-zeroes requests served.",
            &self.per_disk(|s| c(s.stats.zeroes)),
        )?;
        family(
            enc,
            "cowsnap_io_errors",
            "Requests that failed.",
            &self.per_disk(|s| c(s.stats.errors)),
        )?;
        family(
            enc,
            "cowsnap_read_duration_seconds",
            "Service time of read requests in the engine.",
            &self.per_disk(|s| hist(s.latency.as_ref().map(|l| &l.read))),
        )?;
        family(
            enc,
            "cowsnap_write_duration_seconds",
            "Service time of write requests in the engine (holds and throttling included).",
            &self.per_disk(|s| hist(s.latency.as_ref().map(|l| &l.write))),
        )?;

        // backup state as a state set: one series per state, 1 for the current one
        let states: Vec<_> = self
            .up()
            .flat_map(|(n, s)| {
                let cur = s.backup.as_ref().map_or("idle", |b| b.state.as_str());
                BACKUP_STATES.iter().map(move |st| {
                    let l = vec![("disk", n.to_string()), ("state", st.to_string())];
                    (l, Value::Gauge(f64::from(u8::from(*st == cur))))
                })
            })
            .collect();
        family(
            enc,
            "cowsnap_backup_state",
            "State of the running or last backup since the daemon started (idle: none).",
            &states,
        )?;
        let b = |f: fn(&cowsnap_nbd::control::BackupStatus) -> f64| {
            self.per_disk(move |s| s.backup.as_ref().map(|b| Value::Gauge(f(b))))
        };
        family(
            enc,
            "cowsnap_backup_chunks_in_scope",
            "Chunks the running or last backup must copy.",
            &b(|b| b.chunks_in_scope as f64),
        )?;
        family(
            enc,
            "cowsnap_backup_chunks_copied",
            "Chunks the running or last backup has copied.",
            &b(|b| b.chunks_copied as f64),
        )?;
        family(
            enc,
            "cowsnap_backup_bytes_copied",
            "Bytes the running or last backup has handed to its target.",
            &b(|b| b.bytes_copied as f64),
        )?;
        family(enc, "cowsnap_backup_elapsed_seconds", "Time since the running or last backup's snapshot instant (its duration once finished).", &b(|b| secs_ms(b.elapsed_ms)))?;
        family(
            enc,
            "cowsnap_container_slots",
            "Slots of the running or last backup's container.",
            &b(|b| b.container_slots as f64),
        )?;
        family(
            enc,
            "cowsnap_container_used_slots",
            "Container slots in use now.",
            &b(|b| b.container_used as f64),
        )?;
        family(
            enc,
            "cowsnap_container_high_water_slots",
            "Most container slots in use at once during the running or last backup.",
            &b(|b| b.container_high_water as f64),
        )?;
        family(
            enc,
            "cowsnap_backup_held_writes",
            "Writes held while their chunk's original was preserved (running or last backup).",
            &b(|b| b.holds as f64),
        )?;
        family(
            enc,
            "cowsnap_backup_hold_seconds",
            "Total time writes were held (running or last backup).",
            &b(|b| secs_ms(b.hold_time_ms)),
        )?;
        family(
            enc,
            "cowsnap_backup_throttled_writes",
            "Writes slowed by the throttle (running or last backup).",
            &b(|b| b.throttled_writes as f64),
        )?;
        family(
            enc,
            "cowsnap_backup_throttle_delay_seconds",
            "Total throttle delay (running or last backup).",
            &b(|b| secs_ms(b.throttle_delay_ms)),
        )?;

        let when = self.per_disk(|s| {
            let t = s.last_success.as_ref().map_or(0, |l| l.finished_unix);
            Some(Value::Gauge(t as f64))
        });
        family(
            enc,
            "cowsnap_last_backup_success_timestamp_seconds",
            "Unix time the last successful backup completed (0: none known).",
            &when,
        )?;
        let last = |f: fn(&cowsnap_nbd::control::LastBackup) -> f64| {
            self.per_disk(move |s| s.last_success.as_ref().map(|l| Value::Gauge(f(l))))
        };
        family(
            enc,
            "cowsnap_last_backup_instant_timestamp_seconds",
            "Unix time of the last successful backup's snapshot instant.",
            &last(|l| l.instant_unix as f64),
        )?;
        family(
            enc,
            "cowsnap_last_backup_bytes",
            "Bytes the last successful backup handed to its target.",
            &last(|l| l.bytes_copied as f64),
        )?;
        family(
            enc,
            "cowsnap_last_backup_stored_bytes",
            "Bytes the last successful backup's target stored.",
            &last(|l| l.bytes_stored as f64),
        )?;
        family(
            enc,
            "cowsnap_last_backup_duration_seconds",
            "Duration of the last successful backup, instant to commit.",
            &last(|l| secs_ms(l.duration_ms)),
        )?;

        let fill = |f: fn(&cowsnap_nbd::control::FillInfo) -> f64| {
            self.per_disk(move |s| s.fill.as_ref().map(|x| Value::Gauge(f(x))))
        };
        family(
            enc,
            "cowsnap_restore_chunks_done",
            "Live restore: repository chunks restored so far.",
            &fill(|f| f.done as f64),
        )?;
        family(
            enc,
            "cowsnap_restore_chunks_total",
            "Live restore: repository chunks in all.",
            &fill(|f| f.total as f64),
        )?;
        family(
            enc,
            "cowsnap_restore_complete",
            "Live restore: every chunk is restored (1) or not (0).",
            &fill(|f| f64::from(u8::from(f.complete))),
        )?;
        family(
            enc,
            "cowsnap_restore_failed",
            "Live restore: the fill stopped with an error (1) or not (0).",
            &fill(|f| f64::from(u8::from(f.error.is_some()))),
        )?;

        let tracking = |key: &'static str| {
            self.per_disk(move |s| {
                let t = s.tracking.as_ref()?;
                match key {
                    "trusted" => Some(Value::Gauge(f64::from(u8::from(
                        t.get("relative_to").is_some_and(|v| !v.is_null()),
                    )))),
                    k => t.get(k)?.as_u64().map(|v| Value::Gauge(v as f64)),
                }
            })
        };
        family(
            enc,
            "cowsnap_changelog_dirty_chunks",
            "Chunks the change log marks changed since the last committed generation.",
            &tracking("changed_chunks"),
        )?;
        family(
            enc,
            "cowsnap_changelog_chunk_size_bytes",
            "Tracking chunk size of the change log.",
            &tracking("chunk_size"),
        )?;
        family(enc, "cowsnap_changelog_trusted", "Whether the change log is relative to a generation (1: the next incremental reads only changes).", &tracking("trusted"))?;
        Ok(())
    }

    fn encode_repos(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let repo = |r: &RepoSample| vec![("repo", r.repo.clone())];
        let up: Vec<_> = self
            .repos
            .iter()
            .map(|r| {
                let ok = r.scan.as_ref().is_some_and(|s| s.usage.is_ok());
                (repo(r), Value::Gauge(f64::from(u8::from(ok))))
            })
            .collect();
        family(
            enc,
            "cowsnap_repo_up",
            "Whether the repository's last scan succeeded (0 also before the first scan).",
            &up,
        )?;
        let scans: Vec<_> = self
            .repos
            .iter()
            .filter_map(|r| r.scan.as_ref().map(|s| (r, s)))
            .collect();
        let rows = |f: &dyn Fn(&RepoScan) -> f64| -> Vec<(Labels, Value)> {
            scans
                .iter()
                .map(|(r, s)| (repo(r), Value::Gauge(f(s))))
                .collect()
        };
        family(
            enc,
            "cowsnap_repo_scan_timestamp_seconds",
            "Unix time the repository's last scan finished.",
            &rows(&|s| s.at_unix),
        )?;
        family(
            enc,
            "cowsnap_repo_scan_duration_seconds",
            "How long the repository's last scan took.",
            &rows(&|s| s.took.as_secs_f64()),
        )?;
        let ok: Vec<_> = scans
            .iter()
            .filter_map(|(r, s)| s.usage.as_ref().ok().map(|u| (*r, u)))
            .collect();
        let urows = |f: &dyn Fn(&RepoUsage) -> f64| -> Vec<(Labels, Value)> {
            ok.iter()
                .map(|(r, u)| (repo(r), Value::Gauge(f(u))))
                .collect()
        };
        let per_disk = |f: &dyn Fn(&cowsnap_core::repo::DiskUsage) -> f64| -> Vec<(Labels, Value)> {
            ok.iter()
                .flat_map(|(r, u)| {
                    u.disks.iter().map(|(d, du)| {
                        (
                            vec![("repo", r.repo.clone()), ("disk", d.clone())],
                            Value::Gauge(f(du)),
                        )
                    })
                })
                .collect()
        };
        family(
            enc,
            "cowsnap_repo_generations",
            "Complete generations of each disk in the repository.",
            &per_disk(&|d| d.generations as f64),
        )?;
        family(
            enc,
            "cowsnap_repo_last_generation_timestamp_seconds",
            "Unix time of the snapshot instant of each disk's newest generation.",
            &per_disk(&|d| d.newest_unix as f64),
        )?;
        family(
            enc,
            "cowsnap_repo_disk_logical_bytes",
            "Bytes of data each disk's generations reference.",
            &per_disk(&|d| d.logical_bytes as f64),
        )?;
        family(
            enc,
            "cowsnap_repo_stored_bytes",
            "Bytes of the repository's chunk files.",
            &urows(&|u| u.stored_bytes as f64),
        )?;
        family(
            enc,
            "cowsnap_repo_chunk_files",
            "Chunk files in the repository.",
            &urows(&|u| u.chunk_files as f64),
        )?;
        family(
            enc,
            "cowsnap_repo_logical_bytes",
            "Bytes of data all generations reference (zero chunks excluded).",
            &urows(&|u| u.logical_bytes as f64),
        )?;
        family(enc, "cowsnap_repo_dedup_ratio", "Logical bytes referenced per byte stored (deduplication and compression together; 0 when empty).", &urows(&|u| u.dedup_ratio()))?;
        family(
            enc,
            "cowsnap_repo_damaged_indexes",
            "Generations whose index could not be read at the last scan.",
            &urows(&|u| u.damaged_indexes as f64),
        )?;
        Ok(())
    }
}

impl Collector for Sample {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_disks(&mut enc)?;
        self.encode_repos(&mut enc)?;
        family(
            &mut enc,
            "cowsnap_exporter_collect_seconds",
            "How long asking the disks' daemons took for this scrape.",
            &[(Vec::new(), Value::Gauge(self.collect_time.as_secs_f64()))],
        )
    }
}
