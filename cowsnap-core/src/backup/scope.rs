//! What a backup need not read, learned right after the snapshot instant and before
//! the drainer starts: ranges whose content in the image is known to be zeros.
//!
//! Design notes
//! - Holes of a sparse origin file (SEEK_DATA/SEEK_HOLE on the live origin, queried in
//!   windows of [`HOLE_WINDOW`] bytes so a fragmented file cannot grow one list without
//!   bound). Querying the live origin after the instant is sound because of how
//!   [`ChunkMap::mark_zero`](crate::chunk_map::ChunkMap::mark_zero) picks chunks: only
//!   whole granules still pending, not busy and without a preserved chunk become zero,
//!   and a write reaches the origin only after its chunk stopped being pending — so a
//!   granule marked zero was not written since the instant, and a hole seen now was a
//!   hole then. Works for full and incremental scopes alike.
//! - Free space of the filesystem on the disk (full backups only): the filesystem's
//!   own allocation metadata read *as of the instant*, through
//!   [`Snapshot::read_view`] (before the drainer, so every chunk is still held by the
//!   snapshot). An incremental's scope leaves unchanged chunks out of the snapshot, so
//!   their metadata cannot be read as of the instant there: free space is learned in
//!   full backups only, and the output says so.
//! - Chunks discarded (trim or write-zeroes of the whole chunk) before the instant and
//!   not written since, as the engine knew them at the instant (`discard.rs`: since the
//!   daemon started, in memory): zeros in the image, so not read. This is what makes a
//!   trim count on a block device, which has no holes to ask for. Marked after the
//!   free space (a chunk both free and discarded counts as free) and before the holes (a
//!   trim of a file origin punches a hole: it counts as discarded). Sound for the same
//!   reason as holes: `mark_zero` skips any granule written since the instant.
//!   `--all-blocks` reads them too.
//! - Anything unknown (no filesystem found, unsupported features, damaged metadata, a
//!   journal that cannot be read) means: back up every block, and say why in the
//!   backup's notes. `--all-blocks` (`BackupParams::all_blocks`) turns the free-space
//!   exclusion off; holes are still not read (they are zeros, as they always were).
//! - Writers run meanwhile; they preserve into the container as usual (the drainer
//!   has not started, so a slow probe can fill the container and hold writers until
//!   it ends: the probe reads metadata only — bitmaps, b-trees, the journal).

use super::job::Job;
use crate::blockio::BlockIo;
use crate::error::Result;
use crate::freespace::Probe;
use crate::paged_bits::PagedBits;
use crate::snapshot::Snapshot;
use std::sync::atomic::Ordering;

/// Bytes of origin asked for its holes at once.
pub const HOLE_WINDOW: u64 = 1 << 30;

/// Mark what need not be read in `snap` as known zeros and record the figures.
/// `full`: the scope is every chunk (free space can then be learned). Never fails the
/// backup: whatever cannot be learned is read.
pub(super) fn exclude_known_zeros(
    origin: &dyn BlockIo,
    snap: &Snapshot,
    job: &Job,
    full: bool,
    all_blocks: bool,
    discarded: Option<&PagedBits>,
) {
    if all_blocks {
        job.note(
            "--all-blocks: free space of the filesystem and discarded chunks are read and stored"
                .into(),
        );
    } else if full {
        match probe_fs(origin, snap) {
            Ok(found) => {
                let bytes = mark_ranges(snap, &found.ranges);
                snap.stats.excluded_free.fetch_add(bytes, Ordering::Relaxed);
                let mut n = format!(
                    "{}: {} free, {} of it excluded (stored as zeros)",
                    found.fs,
                    crate::bytes::human(found.free_bytes),
                    crate::bytes::human(bytes)
                );
                if let Some(why) = found.caveat {
                    n.push_str(&format!("; {why}"));
                }
                job.note(n);
            }
            Err(why) => job.note(format!(
                "free space not known ({why}): every block is read but holes of the origin"
            )),
        }
    } else {
        job.note("free space is learned in full backups only".into());
    }
    if let Some(d) = discarded {
        let bytes = mark_runs(snap, d);
        snap.stats
            .excluded_discarded
            .fetch_add(bytes, Ordering::Relaxed);
        if bytes > 0 {
            job.note(format!(
                "{} discarded (trim or write-zeroes of whole chunks, not written since) \
                 excluded (stored as zeros); discards from before the daemon started are \
                 not known and are read",
                crate::bytes::human(bytes)
            ));
        }
    }
    match holes(origin, snap) {
        Ok(bytes) => {
            snap.stats
                .excluded_holes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        Err(e) => job.note(format!(
            "holes of the origin not known ({e}): they are read"
        )),
    }
}

/// Mark the chunks of the holes of `origin`; returns the bytes marked. A hole running
/// across windows is split at the window edge, which loses nothing: windows are
/// multiples of every granule (chunk sizes are powers of two up to 64 MiB).
pub(super) fn holes(origin: &dyn BlockIo, snap: &Snapshot) -> Result<u64> {
    let size = snap.geometry().disk_size;
    let mut marked = 0;
    let mut off = 0;
    while off < size {
        let len = HOLE_WINDOW.min(size - off);
        let Some(data) = origin.data_ranges(off, len)? else {
            return Ok(0);
        };
        let mut holes = Vec::new();
        let mut at = off;
        for (a, b) in data {
            if a > at {
                holes.push((at, a));
            }
            at = at.max(b);
        }
        if at < off + len {
            holes.push((at, off + len));
        }
        marked += mark_ranges(snap, &holes);
        off += len;
    }
    Ok(marked)
}

/// Mark the runs of ones of `plane` (a bit per chunk) as zeros; returns the bytes that
/// became zero.
fn mark_runs(snap: &Snapshot, plane: &PagedBits) -> u64 {
    let n = plane.len().min(snap.geometry().nchunks as usize);
    let mut bytes = 0;
    let mut at = 0;
    while let Some(a) = plane.first(at..n, true) {
        let b = plane.first(a..n, false).unwrap_or(n);
        bytes += snap.map.mark_zero(a as u64, b as u64);
        at = b;
    }
    bytes
}

/// Mark the whole chunks inside the byte ranges `[a, b)` as zeros; returns the bytes
/// that became zero.
fn mark_ranges(snap: &Snapshot, ranges: &[(u64, u64)]) -> u64 {
    let geo = *snap.geometry();
    let cs = u64::from(geo.chunk_size);
    let mut bytes = 0;
    for &(a, b) in ranges {
        let b = b.min(geo.disk_size);
        if a >= b {
            continue;
        }
        let first = a.div_ceil(cs);
        let end = if b == geo.disk_size {
            geo.nchunks
        } else {
            b / cs
        };
        if first >= end {
            continue;
        }
        bytes += snap.map.mark_zero(first, end);
    }
    bytes
}

/// Free space found in the filesystem on the disk.
struct FsFree {
    fs: &'static str,
    ranges: Vec<(u64, u64)>,
    free_bytes: u64,
    caveat: Option<String>,
}

/// Read the filesystem's free space as of the instant.
fn probe_fs(origin: &dyn BlockIo, snap: &Snapshot) -> std::result::Result<FsFree, String> {
    let size = snap.geometry().disk_size;
    let mut read = |off: u64, buf: &mut [u8]| snap.read_view(origin, buf, off);
    match crate::freespace::probe(&mut read, size) {
        Ok(Probe::Free {
            fs,
            ranges,
            free_bytes,
            caveat,
        }) => Ok(FsFree {
            fs,
            ranges,
            free_bytes,
            caveat,
        }),
        Ok(Probe::Unknown { why }) => Err(why),
        Err(e) => Err(format!("reading the filesystem failed: {e}")),
    }
}
