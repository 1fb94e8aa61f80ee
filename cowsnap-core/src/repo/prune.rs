//! Prune: keep the newest `keep` generations of each disk, delete the others, then
//! mark-and-sweep the chunk store.
//!
//! The whole run holds the repository lock exclusively: it waits for running backups,
//! restores and verifies (which hold it shared) and makes new ones wait, so the sweep
//! can never delete a chunk a running backup has just stored or decided to reuse.
//! Every kept index must load before anything is swept: a kept generation whose index
//! cannot be read aborts the prune, since its chunks cannot be known. Metadata is
//! removed before the index, so a crash mid-prune leaves an incomplete generation
//! (ignored, cleaned up by the next prune), never a listed one with no index.
//!
//! Pinned generations (an unfinished live restore needs them, see `pin`) are kept
//! whatever `keep` says, and reported with who pins them; pins that provably pin
//! nothing any more are removed first and reported. The quarantine (damaged chunks
//! kept as evidence) is never touched; its size is reported.

use super::generation::valid_id;
use super::{pin, Repo};
use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// What a prune did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Generations deleted.
    pub removed_generations: Vec<String>,
    /// Generations kept.
    pub kept_generations: Vec<String>,
    /// Incomplete generations and stray temporary files removed.
    pub leftovers_removed: u64,
    /// Chunks deleted.
    pub chunks_removed: u64,
    /// Bytes freed by deleted chunks.
    pub bytes_freed: u64,
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Generations kept only because a live restore pins them.
    pub pinned: Vec<KeptPinned>,
    /// Pins removed because they pin nothing any more, with the reason.
    pub stale_pins_removed: Vec<String>,
    /// Files in the quarantine (damaged chunks kept as evidence).
    pub quarantined_files: u64,
}

/// A generation prune kept because a live restore pins it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptPinned {
    /// Generation id.
    pub generation: String,
    /// "live restore of NAME to PATH (started ...)".
    pub pinned_by: String,
    /// The pin file.
    pub pin: String,
}

/// Keep the newest `keep` generations per disk and collect unreferenced chunks.
pub fn prune(dir: &Path, keep: usize) -> Result<PruneReport> {
    let repo = Repo::open(dir)?;
    let _lock = repo.lock(true)?;
    let mut rep = PruneReport::default();
    let mut pins = Vec::new();
    for p in pin::list(&repo)? {
        match pin::stale_reason(&p) {
            Some(why) => {
                pin::remove(&p.path)?;
                rep.stale_pins_removed
                    .push(format!("{} ({why})", p.path.display()));
            }
            None => pins.push(p),
        }
    }
    let all = repo.list()?;
    let mut by_disk: BTreeMap<&str, Vec<&super::GenerationInfo>> = BTreeMap::new();
    for g in &all {
        by_disk.entry(g.disk.as_str()).or_default().push(g);
    }
    let mut kept = Vec::new();
    for gens in by_disk.values() {
        let cut = gens.len().saturating_sub(keep);
        for g in &gens[..cut] {
            let by: Vec<&pin::PinFile> = pins.iter().filter(|p| p.generation == g.id).collect();
            if !by.is_empty() {
                for p in by {
                    rep.pinned.push(KeptPinned {
                        generation: g.id.clone(),
                        pinned_by: p.describe(),
                        pin: p.path.display().to_string(),
                    });
                }
                kept.push(*g);
                continue;
            }
            remove_if_exists(&repo.meta_path(&g.id))?;
            remove_if_exists(&repo.index_path(&g.id))?;
            rep.removed_generations.push(g.id.clone());
        }
        kept.extend(gens[cut..].iter().copied());
    }
    // Leftovers: indexes without metadata, temporary files (no backup runs now).
    let gdir = dir.join("generations");
    if let Ok(rd) = std::fs::read_dir(&gdir) {
        for ent in rd {
            let ent = ent.ctx(|| format!("unable to list {}", gdir.display()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let stray = name.starts_with(".tmp-")
                || name
                    .strip_suffix(".idx")
                    .is_some_and(|id| valid_id(id) && !repo.meta_path(id).exists());
            if stray {
                remove_if_exists(&ent.path())?;
                rep.leftovers_removed += 1;
            }
        }
    }
    fsutil::fsync_dir(&gdir)?;
    // Mark.
    let mut live: HashSet<[u8; 32]> = HashSet::new();
    for g in &kept {
        let idx = repo.load_index(g).map_err(|e| {
            e.with_context(format!(
                "unable to prune {}: generation {} is kept but its index is unreadable; no chunk deleted",
                dir.display(),
                g.id
            ))
        })?;
        live.extend(idx.hashes.iter().copied());
        rep.kept_generations.push(g.id.clone());
    }
    // Sweep.
    let mut dirs = HashSet::new();
    for (hash, path, len) in repo.store().walk()? {
        let garbage = match hash {
            Some(h) => !live.contains(&h),
            None => true,
        };
        if garbage {
            remove_if_exists(&path)?;
            if hash.is_some() {
                rep.chunks_removed += 1;
                rep.bytes_freed += len;
            } else {
                rep.leftovers_removed += 1;
            }
            if let Some(p) = path.parent() {
                dirs.insert(p.to_path_buf());
            }
        } else {
            rep.chunks_kept += 1;
        }
    }
    for d in dirs {
        fsutil::fsync_dir(&d)?;
    }
    rep.quarantined_files = repo.store().quarantined()?.len() as u64;
    rep.kept_generations.sort();
    Ok(rep)
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(
            format!("unable to remove {}", p.display()),
            e,
        )),
    }
}
