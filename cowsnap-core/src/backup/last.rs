//! The disk's last successful backup, remembered across daemon restarts.
//!
//! Design notes
//! - Kept in the disk's state directory as `last-backup.json` ([`LAST_BACKUP_FILE`]),
//!   published atomically (temp, fsync, rename, fsync the directory) when a backup
//!   completes, before the job is shown as complete: whoever sees "complete" also sees
//!   the record. The change log's committed generation would only cover repository
//!   targets; this file covers every target kind.
//! - A read-only export has no state directory: the record then lives in memory only.
//! - A missing file means "no backup yet"; an unreadable or damaged one is logged and
//!   treated the same (it is a monitoring figure, never a reason to refuse serving).
//! - A failure to write it does not fail the backup (the target is committed): the
//!   job gets a note and the record is still updated in memory.

use super::BackupStatus;
use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name of the record in the disk's state directory.
pub const LAST_BACKUP_FILE: &str = "last-backup.json";

/// The last backup that completed (also the control socket's wire form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBackup {
    /// Job id (counted per daemon start).
    pub id: u64,
    /// The target spec.
    pub target: String,
    /// Generation id for repository targets.
    #[serde(default)]
    pub generation: Option<String>,
    /// Unix time (s) of the snapshot instant: the moment the image shows.
    pub instant_unix: u64,
    /// Unix time (s) at which the backup completed.
    pub finished_unix: u64,
    /// From the instant to the commit, ms.
    pub duration_ms: u64,
    /// Bytes handed to the target.
    pub bytes_copied: u64,
    /// Bytes the target reported as stored.
    #[serde(default)]
    pub bytes_stored: u64,
}

impl LastBackup {
    /// The record of a job that has just completed.
    pub fn from_status(st: &BackupStatus, finished_unix: u64) -> Self {
        LastBackup {
            id: st.id,
            target: st.target.clone(),
            generation: st.generation.clone(),
            instant_unix: st.instant_unix,
            finished_unix,
            duration_ms: st.elapsed_ms,
            bytes_copied: st.bytes_copied,
            bytes_stored: st.bytes_stored,
        }
    }
}

/// Where the record is kept, and its current value.
#[derive(Debug, Default)]
pub struct LastBackupRecord {
    path: Option<PathBuf>,
    cur: Mutex<Option<LastBackup>>,
}

impl LastBackupRecord {
    /// A record kept in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The record kept in `state_dir` (loaded now if the file exists).
    pub fn in_dir(state_dir: &Path) -> Self {
        let path = state_dir.join(LAST_BACKUP_FILE);
        let cur = match Self::load(&path) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("{e}; the last backup is unknown until the next one");
                None
            }
        };
        LastBackupRecord {
            path: Some(path),
            cur: Mutex::new(cur),
        }
    }

    fn load(path: &Path) -> Result<Option<LastBackup>> {
        let b = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("unable to read {}", path.display())),
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| crate::err!(Corrupt, "unable to parse {}: {e}", path.display()))
    }

    /// The last completed backup, if any is known.
    pub fn get(&self) -> Option<LastBackup> {
        super::lock(&self.cur).clone()
    }

    /// Remember `rec`: in memory always, on disk when the record has a file.
    pub fn set(&self, rec: LastBackup) -> Result<()> {
        *super::lock(&self.cur) = Some(rec.clone());
        let Some(path) = &self.path else {
            return Ok(());
        };
        let json = serde_json::to_vec_pretty(&rec)
            .map_err(|e| crate::err!(InvalidInput, "unable to encode the last backup: {e}"))?;
        fsutil::write_atomic(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_reopen_and_a_bad_file_is_no_record() {
        let d = tempfile::tempdir().unwrap();
        let r = LastBackupRecord::in_dir(d.path());
        assert_eq!(r.get(), None);
        let st = BackupStatus {
            id: 3,
            target: "repo:/r".into(),
            generation: Some("g1".into()),
            instant_unix: 1_700_000_000,
            elapsed_ms: 1500,
            bytes_copied: 4096,
            bytes_stored: 100,
            ..Default::default()
        };
        let rec = LastBackup::from_status(&st, 1_700_000_002);
        r.set(rec.clone()).unwrap();
        assert_eq!(LastBackupRecord::in_dir(d.path()).get(), Some(rec));

        std::fs::write(d.path().join(LAST_BACKUP_FILE), b"{garbage").unwrap();
        assert_eq!(LastBackupRecord::in_dir(d.path()).get(), None);

        let m = LastBackupRecord::in_memory();
        m.set(LastBackup::default()).unwrap();
        assert_eq!(m.get(), Some(LastBackup::default()));
    }

    #[test]
    fn an_unwritable_record_still_updates_memory() {
        let d = tempfile::tempdir().unwrap();
        let r = LastBackupRecord::in_dir(&d.path().join("missing-dir"));
        assert!(r.set(LastBackup::default()).is_err());
        assert_eq!(r.get(), Some(LastBackup::default()));
    }
}
