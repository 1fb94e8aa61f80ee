//! Shared helpers for the repository and restore tests: synthetic disks, and backups
//! of them through the real drainer (`cowsnap_core::drain::Drainer`).
#![allow(dead_code)]

use cowsnap_core::blockio::{self, IoEngine, OpenSpec};
use cowsnap_core::changelog::{ChangeLog, Cut};
use cowsnap_core::chunk_map::{ChunkMap, Geometry};
use cowsnap_core::container::ram::RamContainer;
use cowsnap_core::drain::Drainer;
use cowsnap_core::repo::{open_target, RepoTargetParams};
use cowsnap_core::snapshot::Snapshot;
use cowsnap_core::target::{Scope, SnapshotInfo, TargetSummary};
use cowsnap_core::throttle::ThrottleConfig;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Tracking chunk size used by the tests.
pub const TCS: u32 = 64 * 1024;

pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E3779B97F4A7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// A disk image of `size` bytes: per 64 KiB, a mix of random, compressible text and zeros.
pub fn synth_disk(size: usize, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; size];
    let mut s = seed;
    for (i, c) in d.chunks_mut(TCS as usize).enumerate() {
        match splitmix(&mut s) % 8 {
            0 => {} // zeros
            1..=2 => {
                let line = format!("row {i} of seed {seed}: some compressible text\n");
                for (j, b) in c.iter_mut().enumerate() {
                    *b = line.as_bytes()[j % line.len()];
                }
            }
            _ => fill_random(c, &mut s),
        }
    }
    d
}

pub fn fill_random(c: &mut [u8], s: &mut u64) {
    for w in c.chunks_mut(8) {
        let v = splitmix(s).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// Overwrite `len` bytes at `off` with random data, marking the change log first.
pub fn scribble(disk: &mut [u8], cl: Option<&ChangeLog>, off: usize, len: usize, seed: u64) {
    if let Some(cl) = cl {
        cl.mark(off as u64, len as u64).unwrap();
    }
    let mut s = seed;
    fill_random(&mut disk[off..off + len], &mut s);
}

pub fn info(disk: &[u8], lineage: &str, seq: u64) -> SnapshotInfo {
    SnapshotInfo {
        disk: "d".into(),
        disk_size: disk.len() as u64,
        chunk_size: TCS,
        created_unix: 1_795_649_252,
        lineage: lineage.into(),
        seq_next: seq,
        seq_lowest_unacked: seq,
    }
}

/// Result of a simulated backup.
pub struct Backup {
    pub summary: TargetSummary,
    pub scope_changed: bool,
    pub bytes_handed: u64,
}

/// Back `disk` up into `repo` through the real drainer, as a backup job does after its
/// instant: the target's scope decides the chunk map (the cut widened to granules, or
/// everything), and every granule is queued as a priority range, last first, so the
/// target receives its writes out of disk order.
pub fn backup(
    repo: &Path,
    name: &str,
    disk: &[u8],
    cut: Option<&Cut>,
    lineage: &str,
    incremental: bool,
) -> Backup {
    let mut t = open_target(
        repo,
        RepoTargetParams {
            disk_name: name.into(),
            incremental,
            key: None,
        },
        TCS,
    )
    .unwrap();
    let g = u64::from(t.granule_chunks());
    let scope = t.scope(cut).unwrap();
    t.begin(&info(disk, lineage, cut.map(|c| c.seq_next).unwrap_or(0)))
        .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), disk).unwrap();
    let mut spec = OpenSpec::origin(file.path());
    spec.engine = IoEngine::Sync;
    let origin = blockio::open(&spec).unwrap();
    let geo = Geometry::new(disk.len() as u64, TCS).unwrap();
    let bits = match (&scope, cut) {
        (Scope::Changed, Some(c)) => Some(&c.changed[..]),
        _ => None,
    };
    let snap = Snapshot::new(
        ChunkMap::new(geo, g, bits),
        Box::new(RamContainer::new(u64::from(TCS), TCS).unwrap()),
        ThrottleConfig::default(),
    );
    let gbytes = g * u64::from(TCS);
    let ngran = (disk.len() as u64).div_ceil(gbytes);
    let ranges: Vec<(u64, u64)> = (0..ngran).rev().map(|gi| (gi * gbytes, gbytes)).collect();
    snap.add_priority(&ranges);
    Drainer::new(&*origin, &snap, &mut *t, None).run().unwrap();
    let handed = snap.stats.bytes_copied.load(Ordering::Relaxed);
    let summary = t.commit().unwrap();
    Backup {
        summary,
        scope_changed: matches!(scope, Scope::Changed),
        bytes_handed: handed,
    }
}

/// Back up with the change log: begin a cut, back up, commit the cut.
pub fn backup_tracked(repo: &Path, name: &str, disk: &[u8], cl: &ChangeLog) -> Backup {
    let cut = cl.begin_generation().unwrap();
    let b = backup(repo, name, disk, Some(&cut), cl.lineage(), true);
    cl.commit_generation(&cut, b.summary.generation.as_deref().unwrap())
        .unwrap();
    b
}

pub fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

pub fn restore_bytes(repo: &Path, gen: &str, dir: &Path) -> Vec<u8> {
    let dest = dir.join(format!("restore-{gen}.img"));
    cowsnap_core::restore::restore_to(repo, Some(gen), &dest, &|_, _| {}).unwrap();
    let b = std::fs::read(&dest).unwrap();
    std::fs::remove_file(&dest).unwrap();
    b
}
