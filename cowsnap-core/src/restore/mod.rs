//! Restore a generation onto a file or a block device (offline), or serve it while it
//! fills ([`live::FillingIo`]).
//!
//! Every chunk is checked against its blake3 hash before it is written; a mismatch
//! fails the restore naming the chunk and the offset. Zero chunks become holes on a
//! freshly truncated file and explicit zeros (BLKZEROOUT) on a device. The destination
//! is fsynced at the end. The repository lock is held shared throughout, so a prune
//! cannot remove the generation's chunks mid-restore.

pub mod fill_state;
pub mod generation_export;
pub mod group;
pub mod live;

use crate::blockio::{self, BlockIo, OpenSpec};
use crate::changelog::ChangeLog;
use crate::error::{IoContext, Result};
use crate::fsutil::hex;
use crate::identity::Identity;
use crate::repo::{FixedIndex, Repo, ZERO_HASH};
use serde::Serialize;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Chunk readers of a restore from an object-store repository (each holds one chunk
/// and one request in flight).
const OBJECT_READERS: usize = 8;

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// Generation restored.
    pub generation: String,
    /// Its disk name.
    pub disk: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunks with data written (each verified).
    pub chunks_data: u64,
    /// Zero chunks.
    pub chunks_zero: u64,
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// Open (or create) a restore destination for a disk of `size` bytes: a regular file
/// is created or truncated to `size` (so it starts as one hole); a block device must
/// hold at least `size` bytes. Returns the I/O handle and whether it reads as zeros.
pub fn open_destination(dest: &Path, size: u64) -> Result<(std::sync::Arc<dyn BlockIo>, bool)> {
    let is_blk = std::fs::metadata(dest)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_blk {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)
            .ctx(|| format!("unable to create {}", dest.display()))?;
        f.set_len(size)
            .ctx(|| format!("unable to size {} to {size} bytes", dest.display()))?;
    }
    let io = blockio::open(&OpenSpec {
        path: dest.to_path_buf(),
        read_only: false,
        exclusive: true,
        engine: blockio::IoEngine::Auto,
        direct: false,
    })?;
    if io.size() < size {
        return Err(crate::err!(
            NoSpace,
            "unable to restore onto {}: it holds {} bytes, the disk needs {size}",
            dest.display(),
            io.size()
        ));
    }
    Ok((io, !is_blk))
}

fn restore_chunk(
    repo: &Repo,
    idx: &FixedIndex,
    i: u64,
    io: &dyn BlockIo,
    reads_zero: bool,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>> {
    let off = i * idx.chunk_size as u64;
    let len = idx.chunk_len(i);
    let h = idx.hash(i);
    if *h == ZERO_HASH {
        if !reads_zero {
            io.write_zeroes(off, len as u64, true)?;
        }
        return Ok(None);
    }
    repo.store().read_into(h, len, buf).map_err(|e| {
        e.with_context(format!(
            "unable to restore generation {} at offset {off} (chunk {})",
            idx.generation,
            hex(h)
        ))
    })?;
    io.write_at(buf, off)?;
    // sent on to the disk at once, while the next chunks are read: the final fsync then
    // finds little left instead of the whole disk
    io.start_writeback(off, len as u64);
    Ok(Some(len))
}

/// A piece of a restore: one data chunk, or zero chunks `a..b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Data(u64),
    Zeros(u64, u64),
}

/// The pieces of chunks `first..`: each data chunk, and the zero runs between them
/// in pieces of at most 1 GiB (so progress moves): O(data), whatever the disk size.
fn pieces(idx: &FixedIndex, first: u64) -> Vec<Piece> {
    let n = idx.chunk_count();
    let most = ((1u64 << 30) / u64::from(idx.chunk_size.max(1))).max(1);
    let mut out = Vec::new();
    let zeros = |out: &mut Vec<Piece>, mut a: u64, b: u64| {
        while a < b {
            let e = b.min(a.saturating_add(most));
            out.push(Piece::Zeros(a, e));
            a = e;
        }
    };
    let mut pos = first;
    for run in idx.data_runs_in(first, n) {
        zeros(&mut out, pos, run.start);
        out.extend(run.clone().map(Piece::Data));
        pos = run.end;
    }
    zeros(&mut out, pos, n);
    out
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Create (or replace) the marker saying `dest` is not a complete restore.
fn write_marker(marker: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut m = std::fs::File::create(marker)
        .ctx(|| format!("unable to create marker {}", marker.display()))?;
    m.write_all(text.as_bytes())
        .and_then(|_| m.sync_all())
        .ctx(|| format!("unable to write marker {}", marker.display()))?;
    crate::fsutil::fsync_dir(parent_dir(marker))
}

/// Restore generation `gen` (an id, a unique prefix or a disk name; `None` = the newest
/// when the repository holds one disk) of the repository at `repo_dir` onto `dest`.
/// `progress(done_bytes, total_bytes)` is called as chunks land.
///
/// An interrupted restore never leaves a destination that looks whole: a file gets
/// the marker `DEST.incomplete` (as `file:` backup targets do) before it is created or
/// truncated, removed only after the data is fsynced, and kept with the reason on
/// failure; a block device has its first chunk zeroed first and written last.
pub fn restore_to(
    repo_dir: &Path,
    gen: Option<&str>,
    dest: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreReport> {
    let started = Instant::now();
    let repo = Repo::open(repo_dir)?;
    let _lock = repo.lock(false)?;
    let g = repo.resolve(gen)?;
    let idx = repo.load_index(&g)?;
    let is_blk = std::fs::metadata(dest)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let marker = (!is_blk).then(|| crate::target::raw::incomplete_marker(dest));
    if let Some(m) = &marker {
        write_marker(
            m,
            &format!(
                "cowsnap: restore of generation {} in progress; {} is not complete\n",
                g.id,
                dest.display()
            ),
        )?;
    }
    match restore_body(&repo, &g, &idx, dest, is_blk, progress, started) {
        Ok(rep) => {
            if let Some(m) = &marker {
                std::fs::remove_file(m).ctx(|| format!("unable to remove {}", m.display()))?;
                crate::fsutil::fsync_dir(parent_dir(m))?;
            }
            Ok(rep)
        }
        Err(e) => {
            let left = match &marker {
                Some(m) => {
                    let _ = write_marker(
                        m,
                        &format!(
                            "cowsnap: restore of generation {} onto {} failed; it is not complete: {e}\n",
                            g.id,
                            dest.display()
                        ),
                    );
                    format!("; {} marks it incomplete", m.display())
                }
                None => "; its first chunk is left zeroed".to_string(),
            };
            Err(e.with_context(format!(
                "unable to restore generation {} onto {}{left}",
                g.id,
                dest.display()
            )))
        }
    }
}

fn restore_body(
    repo: &Repo,
    g: &crate::repo::GenerationInfo,
    idx: &FixedIndex,
    dest: &Path,
    is_blk: bool,
    progress: &(dyn Fn(u64, u64) + Sync),
    started: Instant,
) -> Result<RestoreReport> {
    let (io, reads_zero) = open_destination(dest, g.disk_size)?;
    let n = idx.chunk_count();
    // A device: chunk 0 (partition table, superblocks) is zeroed now and written last.
    let first = u64::from(is_blk && n > 0);
    if first == 1 {
        io.write_zeroes(0, idx.chunk_len(0) as u64, false)?;
        io.flush()?;
    }
    let pieces = pieces(idx, first);
    let next = AtomicUsize::new(0);
    let done_bytes = AtomicU64::new(0);
    let data_chunks = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_err: Mutex<Option<crate::Error>> = Mutex::new(None);
    // An object store's reads wait on the network, not a CPU: more in flight. On a
    // directory, four times the CPUs, at least 8 (on 2 CPUs 8 beat 4 in one paired
    // run and tied in another, BENCHMARKS.md): a worker mostly waits for its chunk file
    // to be read (cold cache), so more reads in flight keep the repository's disk busy
    // while the others verify (blake3) and decompress.
    let workers = match repo.is_object() {
        true => OBJECT_READERS,
        false => std::thread::available_parallelism()
            .map(|p| p.get() * 4)
            .unwrap_or(8)
            .clamp(8, 16),
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                // one chunk buffer per worker, reused for every chunk it restores
                let mut buf = Vec::new();
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(&piece) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let r = match piece {
                        Piece::Data(i) => restore_chunk(repo, idx, i, &*io, reads_zero, &mut buf)
                            .map(|d| (d.is_some(), idx.chunk_len(i) as u64)),
                        Piece::Zeros(a, b) => {
                            let cs = u64::from(idx.chunk_size);
                            let len = b.saturating_mul(cs).min(g.disk_size) - a * cs;
                            match reads_zero {
                                true => Ok((false, len)),
                                false => io.write_zeroes(a * cs, len, true).map(|_| (false, len)),
                            }
                        }
                    };
                    match r {
                        Ok((data, len)) => {
                            if data {
                                data_chunks.fetch_add(1, Ordering::Relaxed);
                            }
                            let t = done_bytes.fetch_add(len, Ordering::Relaxed) + len;
                            progress(t, g.disk_size);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let mut fe = first_err.lock().unwrap_or_else(|p| p.into_inner());
                            if fe.is_none() {
                                *fe = Some(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        log::debug!("{e}");
        return Err(e);
    }
    io.flush()
        .map_err(|e| e.with_context(format!("unable to flush {}", dest.display())))?;
    let mut data_chunks = data_chunks.into_inner();
    if first == 1 {
        if restore_chunk(repo, idx, 0, &*io, false, &mut Vec::new())?.is_some() {
            data_chunks += 1;
        }
        io.flush()
            .map_err(|e| e.with_context(format!("unable to flush {}", dest.display())))?;
        progress(g.disk_size, g.disk_size);
    }
    let bytes_written = idx.data_bytes();
    Ok(RestoreReport {
        generation: g.id.clone(),
        disk: g.disk.clone(),
        disk_size: g.disk_size,
        chunks_data: data_chunks,
        chunks_zero: n - data_chunks,
        bytes_written,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Give the disk whose state lives in `state_dir` the identity of a disk restored from
/// `generation`: a new lineage recording where it came from, and change tracking
/// relative to that generation (so its first incremental backup is relative to it).
pub fn init_restored_state(
    state_dir: &Path,
    repo_dir: &Path,
    generation: &str,
    disk_size: u64,
    tracking_chunk: u32,
) -> Result<Identity> {
    let id = Identity::create_restored(state_dir, &repo_dir.display().to_string(), generation)?;
    let cl = ChangeLog::open_in(state_dir, disk_size, tracking_chunk)?;
    cl.reset_relative_to(generation)?;
    Ok(id)
}
