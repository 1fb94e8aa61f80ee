//! The arguments of `cowsnapctl backup`, shared by the one-disk path (`backup.rs`) and
//! the group coordinator (`group.rs`).

use crate::freeze;
use crate::parse::parse_duration;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Disk name; several names back them up as one consistency group (one snapshot
    /// instant for all, one restore point; repository targets only).
    #[arg(required = true, num_args = 1.., value_name = "NAME")]
    pub names: Vec<String>,
    /// Target: file:PATH (raw image), dev:PATH (block device) or repo:DIR. Without
    /// it, the disk's repository in the configuration file, incremental, with its
    /// freeze mount point, then its retention applied (see `config`).
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub config: crate::config::ConfigArg,
    /// Only chunks changed since the last backup (repository targets).
    #[arg(long)]
    pub incremental: bool,
    /// Container for preserved originals (ram:SIZE, file:PATH:SIZE, dev:PATH).
    #[arg(long)]
    pub container: Option<String>,
    /// Freeze this filesystem around the snapshot instant (FIFREEZE/FITHAW): the
    /// mount point of a filesystem on one of the disks' devices. Repeatable: all are
    /// frozen before the instant and thawed after it.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Vec<PathBuf>,
    /// Thaw after this long at most; if the snapshot instant was not reached by then,
    /// the backup fails (at most 10s).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub freeze_timeout: String,
    /// Wait for this long without writes before the snapshot (default 3s; 0 = don't).
    #[arg(long, value_name = "DURATION")]
    pub quiesce_idle: Option<String>,
    /// Fail if no idle window came within this long.
    #[arg(long, value_name = "DURATION", default_value = "80s")]
    pub quiesce_timeout: String,
    /// Copy these byte ranges first: OFFSET:LENGTH,... (sizes like 64M allowed).
    #[arg(long)]
    pub priority: Option<String>,
    /// Read-side rate limit in bytes per second (e.g. 100M).
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Read and store free space too: do not learn the free space of the filesystem on
    /// the disk (otherwise stored as zeros without being read). Holes of a sparse
    /// origin file are zeros and are never read.
    #[arg(long)]
    pub all_blocks: bool,
    /// Run this shell command before the snapshot (e.g. a database CHECKPOINT); if it
    /// fails or outlives --hook-timeout, the backup fails before anything is paused.
    /// Its exit status and first output lines are recorded in the generation's notes.
    #[arg(long, value_name = "CMD")]
    pub pre_snapshot: Option<String>,
    /// Run this shell command after the snapshot instant, whatever happened (also when
    /// the backup failed); recorded in the notes like --pre-snapshot.
    #[arg(long, value_name = "CMD")]
    pub post_snapshot: Option<String>,
    /// Kill a hook (its whole process group) that runs longer than this.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub hook_timeout: String,
    /// Several disks: the longest the writes of any disk may stay paused waiting for
    /// the group's instant; past it the group snapshot fails and every disk resumes
    /// untouched (at most 10s).
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub pause_limit: String,
    /// Print JSON event lines (also the default when stdout is not a terminal).
    #[arg(long)]
    pub json: bool,
}

impl BackupArgs {
    /// Whether this backup goes through the group coordinator (several disks, several
    /// mount points to freeze, or hooks) rather than the one-disk request.
    pub fn coordinated(&self) -> bool {
        self.names.len() > 1
            || self.freeze.len() > 1
            || self.pre_snapshot.is_some()
            || self.post_snapshot.is_some()
    }
}

/// The quiesce idle window, its timeout and the freeze bound from the flags
/// `--quiesce-idle` (default 3 s, or 0 with a freeze), `--quiesce-timeout`,
/// `--freeze-timeout` (more than 0, at most [`freeze::MAX_FREEZE`]).
pub(crate) fn instant_settings(
    quiesce_idle: Option<&str>,
    quiesce_timeout: &str,
    freeze: bool,
    freeze_timeout: &str,
) -> Result<(Duration, Duration, Duration)> {
    let timeout = parse_duration(quiesce_timeout)?;
    let idle = match (quiesce_idle, freeze) {
        (Some(s), _) => parse_duration(s)?,
        (None, true) => Duration::ZERO,
        (None, false) => Duration::from_secs(3),
    };
    let bound = parse_duration(freeze_timeout)?;
    if bound.is_zero() || bound > freeze::MAX_FREEZE {
        bail!(
            "invalid --freeze-timeout {freeze_timeout:?}: give more than 0 and at most {}s",
            freeze::MAX_FREEZE.as_secs()
        );
    }
    Ok((idle, timeout, bound))
}
