//! What a repository holds, for monitoring: generations per disk, bytes stored, and the
//! logical bytes its generations reference — from metadata only, never chunk data.
//!
//! Design notes
//! - Bytes stored are the sizes of the chunk files (directory entries and `stat`, no
//!   chunk is opened). Logical bytes are, summed over every complete generation, the
//!   bytes of the disk its index maps to a stored chunk (zero chunks are not stored and
//!   do not count). Their ratio is what deduplication and compression save together.
//! - An index is read in pieces (`index::summarize`) and held only as its data runs
//!   (O(data), whatever the disk size). Generations
//!   are immutable once published, so a [`UsageCache`] keeps each one's figures by id
//!   and a rescan reads only the indexes of new generations; ids that are gone (pruned)
//!   are dropped, so the cache holds at most one entry per existing generation.
//! - No repository lock is taken: a scan only reads, and a backup or prune running
//!   meanwhile shows as slightly old figures in the next scan, not as an error. A
//!   generation whose index is damaged is counted as a generation, its logical bytes
//!   as unknown (`damaged_indexes`).

use super::Repo;
use crate::error::Result;
use std::collections::{BTreeMap, HashMap};

/// One disk's generations in a repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Complete generations.
    pub generations: u64,
    /// Unix time (s) of the newest generation's snapshot instant.
    pub newest_unix: u64,
    /// Logical bytes its generations reference.
    pub logical_bytes: u64,
}

/// A repository's figures at one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoUsage {
    /// Per disk name.
    pub disks: BTreeMap<String, DiskUsage>,
    /// Complete generations, all disks.
    pub generations: u64,
    /// Chunk files in the store.
    pub chunk_files: u64,
    /// Bytes of the chunk files.
    pub stored_bytes: u64,
    /// Logical bytes every generation references (see the module notes).
    pub logical_bytes: u64,
    /// Generations whose index could not be read (their logical bytes are missing).
    pub damaged_indexes: u64,
}

impl RepoUsage {
    /// Logical bytes per stored byte (0 for an empty store).
    pub fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// Per-generation figures kept between scans.
#[derive(Debug, Default)]
pub struct UsageCache {
    logical: HashMap<String, u64>,
}

impl UsageCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Generations whose figures are cached.
    pub fn len(&self) -> usize {
        self.logical.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.logical.is_empty()
    }

    /// Scan `repo`, reading only the indexes of generations not seen before.
    pub fn scan(&mut self, repo: &Repo) -> Result<RepoUsage> {
        let gens = repo.list()?;
        let mut u = RepoUsage::default();
        let mut seen = HashMap::with_capacity(gens.len());
        for g in &gens {
            let logical = match self.logical.get(&g.id) {
                Some(&b) => Some(b),
                None => match repo.load_index(g) {
                    Ok(i) => Some(i.summary().data_bytes),
                    Err(e) => {
                        log::warn!("{e}");
                        None
                    }
                },
            };
            let d = u.disks.entry(g.disk.clone()).or_default();
            d.generations += 1;
            d.newest_unix = d.newest_unix.max(g.created_unix);
            u.generations += 1;
            match logical {
                Some(b) => {
                    d.logical_bytes += b;
                    u.logical_bytes += b;
                    seen.insert(g.id.clone(), b);
                }
                None => u.damaged_indexes += 1,
            }
        }
        // pruned generations leave the cache
        self.logical = seen;
        let (files, bytes) = repo.store().usage()?;
        u.chunk_files = files;
        u.stored_bytes = bytes;
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;

    #[test]
    fn usage_counts_generations_bytes_and_dedup_and_caches_by_id() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        // 4 chunks: two equal data chunks, one zero chunk, one distinct
        let mut img = vec![0u8; 4 * 4096];
        img[..4096].fill(1);
        img[4096..8192].fill(1);
        img[12288..].fill(2);
        make_gen(&repo, "g1", &img);
        make_gen(&repo, "g2", &img);
        let mut c = UsageCache::new();
        let u = c.scan(&repo).unwrap();
        assert_eq!(u.generations, 2);
        assert_eq!(u.disks["d"].generations, 2);
        assert_eq!(
            u.logical_bytes,
            2 * 3 * 4096,
            "three data chunks per generation"
        );
        assert_eq!(u.chunk_files, 2, "two distinct data chunks stored");
        let stored: u64 = repo.store().walk().unwrap().iter().map(|f| f.2).sum();
        assert_eq!(u.stored_bytes, stored);
        assert!((u.dedup_ratio() - u.logical_bytes as f64 / stored as f64).abs() < 1e-9);
        assert!(
            u.dedup_ratio() > 3.0,
            "six logical chunks over two small files"
        );
        assert_eq!(c.len(), 2);

        // A cached generation's index is not read again: damage it and rescan.
        std::fs::write(repo.index_path("g1"), b"garbage").unwrap();
        assert_eq!(c.scan(&repo).unwrap().logical_bytes, u.logical_bytes);
        // A fresh cache reads it and reports it damaged, still counting the generation.
        let u2 = UsageCache::new().scan(&repo).unwrap();
        assert_eq!((u2.generations, u2.damaged_indexes), (2, 1));
        assert_eq!(u2.logical_bytes, 3 * 4096);

        // A pruned generation leaves the cache.
        std::fs::remove_file(repo.meta_path("g2")).unwrap();
        let u3 = c.scan(&repo).unwrap();
        assert_eq!(u3.generations, 1);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn an_empty_repository_has_no_ratio() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        let u = UsageCache::new().scan(&repo).unwrap();
        assert_eq!(u, RepoUsage::default());
        assert_eq!(u.dedup_ratio(), 0.0);
    }
}
