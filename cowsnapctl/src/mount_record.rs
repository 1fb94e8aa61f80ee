//! What `cowsnapctl mount` set up (`RUN_DIR/NAME.mount.json`): read by `umount` to undo
//! it and by `detach` to refuse taking the export away from under a mount.

use crate::Dirs;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What `mount` set up, in `RUN_DIR/NAME.mount.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// The export's name.
    pub name: String,
    /// The mount point (absolute, canonical).
    pub mountpoint: String,
    /// repo:DIR@ID.
    pub source: String,
    /// The exported device.
    pub device: Option<String>,
    /// The partition mounted, if any.
    pub partition: Option<u32>,
    /// The loop device over that partition's byte range.
    pub part_loop: Option<String>,
    /// The filesystem type mounted.
    pub fstype: Option<String>,
    /// Mount options used.
    pub options: Option<String>,
    /// Whether the mount was made.
    pub mounted: bool,
}

/// `RUN_DIR/NAME.mount.json`.
pub fn record_path(dirs: &Dirs, name: &str) -> PathBuf {
    dirs.run_dir.join(format!("{name}.mount.json"))
}

impl MountRecord {
    /// Write the record atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        cowsnap_core::fsutil::write_atomic(path, &json)?;
        Ok(())
    }

    /// The record of export `name`, if it has one.
    pub fn load(path: &Path) -> Result<Option<MountRecord>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("unable to parse mount record {}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!("unable to read {}: {e}", path.display())),
        }
    }
}
