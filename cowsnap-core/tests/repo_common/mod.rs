//! Shared helpers for the repository and restore tests: synthetic disks and a
//! minimal drainer that drives a `Target` the way the engine does.
#![allow(dead_code)]

use cowsnap_core::changelog::{ChangeLog, Cut};
use cowsnap_core::repo::{open_target, RepoTargetParams};
use cowsnap_core::target::{Scope, SnapshotInfo, TargetSummary};
use std::path::Path;

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

/// Back `disk` up into `repo` the way the drainer does: granules in reverse order,
/// skipping granules with no changed bit when the scope is `Changed`.
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
        },
        TCS,
    )
    .unwrap();
    let g = t.granule_chunks() as usize;
    let scope = t.scope(cut).unwrap();
    t.begin(&info(disk, lineage, cut.map(|c| c.seq_next).unwrap_or(0)))
        .unwrap();
    let gbytes = g * TCS as usize;
    let ngran = disk.len().div_ceil(gbytes);
    let mut handed = 0u64;
    for gi in (0..ngran).rev() {
        let off = gi * gbytes;
        let end = (off + gbytes).min(disk.len());
        if let (Scope::Changed, Some(cut)) = (&scope, cut) {
            let c0 = off / TCS as usize;
            let c1 = end.div_ceil(TCS as usize);
            if !cut.changed[c0..c1].any() {
                continue;
            }
        }
        t.write(off as u64, &disk[off..end]).unwrap();
        handed += (end - off) as u64;
    }
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
