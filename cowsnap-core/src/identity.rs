//! The identity of one disk, kept in its state directory as `identity.json`: a lineage
//! id (random 128-bit hex) and, for a disk that was restored from a backup, the
//! generation it came from.
//!
//! A restored disk always gets a new lineage: change tracking recorded under another
//! lineage is never used for it (the change log resets itself when the lineage in its
//! header differs from this file), and its tracking starts relative to the generation
//! it was restored from, so its first incremental backup is relative to that one.

use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the identity inside a state directory.
pub const IDENTITY_FILE: &str = "identity.json";

/// Where a restored disk came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredFrom {
    /// Repository directory.
    pub repo: String,
    /// Generation id.
    pub generation: String,
}

/// A disk's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Lineage id: 32 lowercase hex digits.
    pub lineage: String,
    /// The generation this disk was restored from, if any.
    #[serde(default)]
    pub restored_from: Option<RestoredFrom>,
}

/// The identity file of a state directory.
pub fn identity_path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// A fresh random lineage id.
pub fn new_lineage() -> Result<String> {
    fsutil::random_hex(16)
}

impl Identity {
    /// Load the identity of the disk whose state lives in `state_dir`, creating a new
    /// lineage (and the directory) if there is none yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Identity> {
        let path = identity_path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| crate::err!(Corrupt, "unable to parse {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity {
                    lineage: new_lineage()?,
                    restored_from: None,
                };
                id.save(state_dir)?;
                Ok(id)
            }
            Err(e) => Err(crate::Error::io(
                format!("unable to read {}", path.display()),
                e,
            )),
        }
    }

    /// Give the disk of `state_dir` a new lineage that records where it was restored
    /// from, replacing any identity it had.
    pub fn create_restored(state_dir: &Path, repo: &str, generation: &str) -> Result<Identity> {
        let id = Identity {
            lineage: new_lineage()?,
            restored_from: Some(RestoredFrom {
                repo: repo.to_string(),
                generation: generation.to_string(),
            }),
        };
        id.save(state_dir)?;
        Ok(id)
    }

    /// Write the identity atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(state_dir)
            .ctx(|| format!("unable to create state directory {}", state_dir.display()))?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| crate::err!(InvalidInput, "unable to encode the identity: {e}"))?;
        fsutil::write_atomic(&identity_path(state_dir), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_or_create_is_stable_and_restore_changes_lineage() {
        let d = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(d.path()).unwrap();
        assert_eq!(a.lineage.len(), 32);
        let b = Identity::load_or_create(d.path()).unwrap();
        assert_eq!(a, b);
        let r = Identity::create_restored(d.path(), "/repo", "G1").unwrap();
        assert_ne!(r.lineage, a.lineage);
        let c = Identity::load_or_create(d.path()).unwrap();
        assert_eq!(c, r);
        assert_eq!(c.restored_from.unwrap().generation, "G1");
    }
}
