//! Persistent changed-chunk tracking, stamped with the disk's lineage.
//!
//! # Design notes
//!
//! File layout (one file per disk, `changelog.bin` in the state directory):
//!
//! ```text
//! 0        4096-byte header (ChangeLogHeader, #[repr(C)], blake3 checksum)
//! 4096     region 0 } one of them is C, the "current" bits (one per tracking chunk,
//! 4096+R   region 1 } LSB first, u64 LE words), the other P, the bits of a cut whose
//!                     backup is still running, or all zeros (the spare)
//! ```
//! (`R` = bitmap bytes rounded up to 4096.) The header's `active` field (version 2)
//! says which region is C; version 1 files (no such field) have C in region 0.
//!
//! Invariant: every chunk written since the generation named `relative_to` has its
//! bit set in C, or in P while the header's `IN_GENERATION` flag is set. Tracking
//! therefore never under-reports; after a crash it may over-report.
//!
//! - `mark` (write path): a lock-free check of an in-memory atomic copy of C that only
//!   holds bits already durable on disk. Only the first write to a chunk since the
//!   last cut queues its bit and waits for a group commit: one thread at a time writes
//!   the 4 KiB bitmap blocks holding every queued bit, `fdatasync`s once, and then
//!   publishes the bits in memory and wakes the waiters. A concurrent mark of the same
//!   chunk therefore cannot return before the bit is durable, and concurrent first
//!   writes share one fdatasync.
//! - `begin_generation` (writes paused by the caller) does no bitmap I/O: the other
//!   region is the spare, all zeros on disk, so one fsynced header write with
//!   `IN_GENERATION` and `active` flipped makes the old C the cut's P and the spare the
//!   new, empty C. A crash before that write leaves the old header (C = old C), after
//!   it C ∪ P = old C. The pause costs one 4 KiB write and one fdatasync at any disk
//!   size. The spare is zeroed (fsync) outside the pause: by `commit`/`abort` once P
//!   is no longer needed, and at `open`. Only when it is not known to be zero (a
//!   failed zeroing), or a previous cut was neither committed nor aborted, does the
//!   instant write bitmaps (the slow path: P := C ∪ P, then C := 0).
//! - `commit_generation`: header `relative_to = gen`, `IN_GENERATION` cleared (one
//!   fsynced header write). P is ignored from then on, and zeroed.
//! - `abort_generation`: C |= P written and fsynced, then the flag is cleared, then P
//!   is zeroed.
//! - Locks: `inner` (state, and every write to C) before `spare` (whether the spare
//!   is known to be zero on disk). The spare is zeroed holding `spare` alone, so
//!   first writes to chunks (which take `inner`) do not wait for it; `active` changes
//!   only with both held, so under `spare` the spare region is fixed.
//! - `open`: a pending P is merged into C (crash during a backup). A header that is
//!   torn, of another disk size, chunk size or lineage resets tracking to "untrusted"
//!   (`relative_to = None`): the next incremental backup falls back to a full read.
//! - `distrust(reason)`: the same reset, asked for by the daemon when the origin cannot
//!   be proven unchanged since the tracking was recorded (`origin_seal`). The reason of
//!   an untrusted log is kept in the header (bytes 280..536, checksummed when not
//!   empty) until a generation is committed, so a restart before the next backup does
//!   not lose it.
//! - Sequence numbers: `mark`/`mark_seq` hand out increasing numbers. `mark_seq` also
//!   records the write as in flight until `ack(seq)`; the lowest unacknowledged number
//!   is the lowest in flight, or `seq_next` when nothing is. Callers that use `mark`
//!   (no `ack`) are treated as acknowledged at once: at a quiesced snapshot instant
//!   `seq_lowest_unacked == seq_next`. `seq_next` is persisted on every header write;
//!   after an unclean shutdown it is bumped by 2^32 so numbers never repeat.

use crate::bitmap::{
    from_le_bytes as bytes_to_words, to_le_bytes as words_to_bytes, words_for, AtomicBitmap,
};
use crate::error::{Error, IoContext, Result};
use crate::identity::Identity;
use crate::ondisk::{Decoder, Encoder};
use bitvec::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard};

/// File name of the change log inside a state directory.
pub const CHANGELOG_FILE: &str = "changelog.bin";

const MAGIC: [u8; 8] = *b"CSNPCL01";
/// The change log version written: 2 (the `active` field).
pub const VERSION: u32 = 2;
/// The change log versions read: 1 and 2.
pub const READ_VERSIONS: &[u32] = &[1, VERSION];
const HEADER_SIZE: usize = 4096;
const BLOCK: u64 = 4096;
const FLAG_DIRTY: u32 = 1;
const FLAG_IN_GENERATION: u32 = 2;
const FLAG_TRUSTED: u32 = 4;

/// The on-disk header of the change log: its fields in order, little endian
/// ([`crate::ondisk`]), padded to 4096 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct ChangeLogHeader {
    magic: [u8; 8],
    version: u32,
    flags: u32,
    disk_size: u64,
    chunk_size: u32,
    /// Which region (0 or 1) is C; version 1 wrote 0 here.
    active: u32,
    nbits: u64,
    seq_next: u64,
    seq_lowest_unacked: u64,
    lineage: [u8; 64],
    relative_to: [u8; 128],
    checksum: [u8; 32],
    /// Why tracking is untrusted (NUL-padded text; all zeros when none). Covered by the
    /// checksum only when not empty, so headers written before it existed stay valid.
    reason: [u8; REASON_LEN],
    reserved: [u8; HEADER_SIZE - 8 - 4 - 4 - 8 - 4 - 4 - 8 - 8 - 8 - 64 - 128 - 32 - REASON_LEN],
}

const REASON_LEN: usize = 256;
/// Where the reason starts: after the fields before it.
const REASON_AT: usize = 8 + 4 + 4 + 8 + 4 + 4 + 8 + 8 + 8 + 64 + 128 + 32;
const _: () = assert!(REASON_AT == 280, "the reason is at bytes 280..536");

/// `s` cut to at most `n` bytes on a character boundary.
fn truncate_utf8(s: &str, n: usize) -> &str {
    let mut end = s.len().min(n);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The header checksum: of the body, and of the reason when there is one.
fn header_sum(body: &[u8], reason: &[u8]) -> blake3::Hash {
    if reason.iter().all(|&b| b == 0) {
        blake3::hash(body)
    } else {
        let mut h = blake3::Hasher::new();
        h.update(body);
        h.update(reason);
        h.finalize()
    }
}

const _: () = assert!(std::mem::size_of::<ChangeLogHeader>() == HEADER_SIZE);

fn put_str<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let b = s.as_bytes();
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl ChangeLogHeader {
    /// The fields before the checksum, in order (what the checksum covers).
    fn encode_body(&self, e: &mut Encoder) {
        e.bytes(&self.magic)
            .u32(self.version)
            .u32(self.flags)
            .u64(self.disk_size)
            .u32(self.chunk_size)
            .u32(self.active)
            .u64(self.nbits)
            .u64(self.seq_next)
            .u64(self.seq_lowest_unacked)
            .bytes(&self.lineage)
            .bytes(&self.relative_to);
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new(HEADER_SIZE);
        self.encode_body(&mut e);
        let sum = header_sum(e.written(), &self.reason);
        e.bytes(sum.as_bytes()).bytes(&self.reason);
        e.finish(HEADER_SIZE)
    }

    fn decode(b: &[u8]) -> Option<ChangeLogHeader> {
        if b.len() < HEADER_SIZE {
            return None;
        }
        let mut d = Decoder::new(b);
        let magic = d.array()?;
        if magic != MAGIC {
            return None;
        }
        let (version, flags, disk_size, chunk_size, active) =
            (d.u32()?, d.u32()?, d.u64()?, d.u32()?, d.u32()?);
        let (nbits, seq_next, seq_lowest_unacked) = (d.u64()?, d.u64()?, d.u64()?);
        let lineage = d.array()?;
        let relative_to = d.array()?;
        let body = d.read();
        let checksum: [u8; 32] = d.array()?;
        let reason: [u8; REASON_LEN] = d.array()?;
        if header_sum(body, &reason).as_bytes()[..] != checksum {
            return None;
        }
        Some(ChangeLogHeader {
            magic,
            version,
            flags,
            disk_size,
            chunk_size,
            active,
            nbits,
            seq_next,
            seq_lowest_unacked,
            lineage,
            relative_to,
            checksum,
            reason,
            reserved: [0; HEADER_SIZE - REASON_AT - REASON_LEN],
        })
    }
}

/// What a snapshot takes from the change log at its instant.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    /// Tracking chunks changed since the generation named by `relative_to`.
    pub changed: BitVec<u64, Lsb0>,
    /// Generation the bits are relative to; `None` when tracking cannot be trusted.
    pub relative_to: Option<String>,
    /// Lineage id of the disk the bits were recorded for.
    pub lineage: String,
    /// Next change sequence number at the snapshot instant.
    pub seq_next: u64,
    /// Lowest sequence number not yet acknowledged at the snapshot instant.
    pub seq_lowest_unacked: u64,
    /// Why tracking was reset when the change log was opened (when it was).
    pub reset_reason: Option<String>,
}

/// State of the change log, for status output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeLogStatus {
    /// Lineage id.
    pub lineage: String,
    /// Generation the tracking is relative to (`None`: untrusted).
    pub relative_to: Option<String>,
    /// Chunks marked changed (current set, plus a running cut's).
    pub changed_chunks: u64,
    /// Tracking chunk size.
    pub chunk_size: u32,
    /// Whether a cut is outstanding (a backup running).
    pub in_generation: bool,
    /// Why tracking was reset at open, if it was.
    pub reset_reason: Option<String>,
    /// Next sequence number.
    pub seq_next: u64,
}

struct Inner {
    relative_to: Option<String>,
    /// An outstanding cut (its bits are on disk in region P, and the caller's
    /// [`Cut`]): how many chunks it holds.
    cut_ones: Option<u64>,
    reset_reason: Option<String>,
}

/// The region that is not C.
struct Spare {
    /// It holds an outstanding cut's bits (P).
    holds_cut: bool,
    /// It is known to be all zeros on disk.
    zeroed: bool,
}

/// Bits waiting for the group commit of `mark`.
#[derive(Default)]
struct MarkQueue {
    /// Word index → bits not yet written.
    queued: BTreeMap<usize, u64>,
    /// Tickets handed out so far.
    next_ticket: u64,
    /// Every ticket up to this one has been written (or failed).
    done_ticket: u64,
    /// A thread is writing a batch.
    leader: bool,
    /// Recent failed batches: (first ticket, last ticket, message).
    failures: Vec<(u64, u64, String)>,
}

/// Chunks written since the last acknowledged generation.
pub struct ChangeLog {
    path: PathBuf,
    file: File,
    lineage: String,
    disk_size: u64,
    chunk_size: u32,
    nbits: u64,
    region_len: u64,
    /// Region C, bits that are durable on disk. Replaced whole (write lock, O(1)) at
    /// a snapshot instant; read-locked by everything else.
    durable: RwLock<AtomicBitmap>,
    /// Bits set in `durable` (kept by the writers of `durable`, all under `inner`).
    durable_ones: AtomicU64,
    nwords: usize,
    /// Which region is C (0 or 1). Changed only with `inner` and `spare` held.
    active: AtomicU32,
    inner: Mutex<Inner>,
    spare: Mutex<Spare>,
    queue: Mutex<MarkQueue>,
    queue_cv: Condvar,
    seq_next: AtomicU64,
    inflight: Mutex<BTreeSet<u64>>,
    /// The header says "closed cleanly" ([`ChangeLog::close`]); the next bitmap write
    /// marks it dirty again first.
    closed: AtomicBool,
    /// Tests: every sync fails (an fsync error of the change-log file).
    #[cfg(any(test, feature = "test-hooks"))]
    pub(crate) fail_syncs: AtomicBool,
    /// Tests: bytes written to the file so far.
    #[cfg(test)]
    bytes_written: AtomicU64,
}

fn ones_in(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn region_len_for(nbits: u64) -> u64 {
    (words_for(nbits) as u64 * 8).div_ceil(BLOCK).max(1) * BLOCK
}

/// Clear the bits past `nbits` in the last word: they stand for no chunk (a damaged
/// file may have them set).
fn clear_padding(words: &mut [u64], nbits: u64) {
    let tail = nbits % 64;
    if let (Some(last), true) = (words.last_mut(), tail != 0) {
        *last &= (1u64 << tail) - 1;
    }
}

impl ChangeLog {
    /// Open (or create) the change log of a disk at `path`. The lineage comes from the
    /// identity (`identity.json`) in the same directory, created if missing.
    pub fn open(path: &Path, disk_size: u64, chunk_size: u32) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let id = Identity::load_or_create(dir)?;
        Self::open_with_lineage(path, disk_size, chunk_size, &id.lineage)
    }

    /// Open (or create) the change log at `path` for a disk of the given lineage.
    pub fn open_with_lineage(
        path: &Path,
        disk_size: u64,
        chunk_size: u32,
        lineage: &str,
    ) -> Result<Self> {
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(crate::err!(
                InvalidInput,
                "unable to open change log {}: chunk size {chunk_size} is not a power of two",
                path.display()
            ));
        }
        let nbits = disk_size.div_ceil(chunk_size as u64);
        let region_len = region_len_for(nbits);
        let nwords = words_for(nbits);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx(|| format!("unable to open change log {}", path.display()))?;
        let mut hbuf = vec![0u8; HEADER_SIZE];
        let flen = file
            .metadata()
            .ctx(|| format!("unable to stat change log {}", path.display()))?
            .len();
        let hdr = if flen >= HEADER_SIZE as u64 {
            file.read_exact_at(&mut hbuf, 0)
                .ctx(|| format!("unable to read change log {}", path.display()))?;
            ChangeLogHeader::decode(&hbuf)
        } else {
            None
        };
        let mut words = vec![0u64; nwords];
        let mut relative_to = None;
        let mut seq_next = 0;
        let mut reset_reason = None;
        let mut active = 0u32;
        // What the file holds already need not be written again: C when no cut was
        // merged into it, the spare when it reads as zeros (both, in a new file).
        let mut c_on_disk = flen == 0;
        let mut spare_zero_on_disk = flen == 0;
        let reason = match &hdr {
            None if flen == 0 => Some("new change log".to_string()),
            None => Some("change log header unreadable".to_string()),
            Some(h) if !READ_VERSIONS.contains(&h.version) => {
                Some(format!("unknown version {}", h.version))
            }
            Some(h) if h.active > 1 || (h.version == 1 && h.active != 0) => {
                Some("change log header names no bitmap region".to_string())
            }
            Some(h) if h.disk_size != disk_size => Some(format!(
                "disk size changed from {} to {disk_size}",
                h.disk_size
            )),
            Some(h) if h.chunk_size != chunk_size => Some(format!(
                "chunk size changed from {} to {chunk_size}",
                h.chunk_size
            )),
            Some(h) if get_str(&h.lineage) != lineage => {
                Some("the disk has a new lineage (restored or replaced)".to_string())
            }
            Some(_) if flen < HEADER_SIZE as u64 + 2 * region_len => {
                Some("change log truncated".to_string())
            }
            Some(_) => None,
        };
        if let (Some(h), None) = (&hdr, &reason) {
            active = h.active;
            let at = |r: u32| HEADER_SIZE as u64 + u64::from(r) * region_len;
            let mut buf = vec![0u8; region_len as usize];
            file.read_exact_at(&mut buf, at(active))
                .ctx(|| format!("unable to read change log {}", path.display()))?;
            words = bytes_to_words(&buf, nwords);
            if h.flags & FLAG_IN_GENERATION != 0 {
                file.read_exact_at(&mut buf, at(1 - active))
                    .ctx(|| format!("unable to read change log {}", path.display()))?;
                for (w, p) in words.iter_mut().zip(bytes_to_words(&buf, nwords)) {
                    *w |= p;
                }
            } else {
                c_on_disk = true;
                file.read_exact_at(&mut buf, at(1 - active))
                    .ctx(|| format!("unable to read change log {}", path.display()))?;
                spare_zero_on_disk = buf.iter().all(|&b| b == 0);
            }
            clear_padding(&mut words, nbits);
            if h.flags & FLAG_TRUSTED != 0 {
                let r = get_str(&h.relative_to);
                relative_to = (!r.is_empty()).then_some(r);
            }
            if relative_to.is_none() {
                // Untrusted since an earlier start: keep saying why.
                let r = get_str(&h.reason);
                reset_reason = (!r.is_empty()).then_some(r);
            }
            seq_next = h.seq_next;
            if h.flags & FLAG_DIRTY != 0 {
                seq_next = seq_next.saturating_add(1 << 32);
            }
        } else if let Some(r) = &reason {
            if flen != 0 {
                log::warn!(
                    "change log {}: {r}; tracking reset, next incremental reads everything",
                    path.display()
                );
                reset_reason = Some(r.clone());
            }
        }
        let cl = ChangeLog {
            path: path.to_path_buf(),
            file,
            lineage: lineage.to_string(),
            disk_size,
            chunk_size,
            nbits,
            region_len,
            durable: RwLock::new(AtomicBitmap::from_words(words.clone())),
            durable_ones: AtomicU64::new(ones_in(&words)),
            nwords,
            active: AtomicU32::new(active),
            inner: Mutex::new(Inner {
                relative_to,
                cut_ones: None,
                reset_reason,
            }),
            spare: Mutex::new(Spare {
                holds_cut: false,
                zeroed: false,
            }),
            queue: Mutex::new(MarkQueue::default()),
            queue_cv: Condvar::new(),
            seq_next: AtomicU64::new(seq_next),
            inflight: Mutex::new(BTreeSet::new()),
            closed: AtomicBool::new(false),
            #[cfg(any(test, feature = "test-hooks"))]
            fail_syncs: AtomicBool::new(false),
            #[cfg(test)]
            bytes_written: AtomicU64::new(0),
        };
        cl.file
            .set_len(HEADER_SIZE as u64 + 2 * region_len)
            .ctx(|| format!("unable to size change log {}", path.display()))?;
        // Persist the merged bits first (a reset's zeros, or C ∪ P of an unfinished
        // cut), then a header without IN_GENERATION, then make the spare all zeros.
        // A clean reopen writes the header only: C is on disk as read, and a spare
        // already zero (a fresh file's, or one zeroed after the last commit) is left.
        if !c_on_disk {
            cl.write_region(cl.region_at(active), &words)?;
            cl.sync()?;
        }
        {
            let inner = cl.lock_inner();
            cl.write_header(&inner, FLAG_DIRTY)?;
        }
        if spare_zero_on_disk {
            cl.lock_spare().zeroed = true;
        } else {
            cl.zero_spare()?;
        }
        Ok(cl)
    }

    /// Open the change log of the disk whose state lives in `state_dir`.
    pub fn open_in(state_dir: &Path, disk_size: u64, chunk_size: u32) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .ctx(|| format!("unable to create state directory {}", state_dir.display()))?;
        Self::open(&state_dir.join(CHANGELOG_FILE), disk_size, chunk_size)
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn durable(&self) -> RwLockReadGuard<'_, AtomicBitmap> {
        self.durable.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Region `r` as it is on disk.
    fn read_region(&self, r: u32) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; self.region_len as usize];
        self.file
            .read_exact_at(&mut buf, self.region_at(r))
            .ctx(|| format!("unable to read change log {}", self.path.display()))?;
        let mut words = bytes_to_words(&buf, self.nwords);
        clear_padding(&mut words, self.nbits);
        Ok(words)
    }

    fn lock_spare(&self) -> std::sync::MutexGuard<'_, Spare> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Byte offset of region `r` (0 or 1).
    fn region_at(&self, r: u32) -> u64 {
        HEADER_SIZE as u64 + u64::from(r) * self.region_len
    }

    /// Byte offset of C.
    fn current_at(&self) -> u64 {
        self.region_at(self.active.load(Ordering::SeqCst))
    }

    fn pwrite(&self, bytes: &[u8], at: u64) -> Result<()> {
        #[cfg(test)]
        self.bytes_written
            .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        self.file
            .write_all_at(bytes, at)
            .ctx(|| format!("unable to write change log {}", self.path.display()))
    }

    /// Make the spare region all zeros on disk (fsynced), unless it is known to be or
    /// holds a cut (one begun since the caller let go of `inner`). Takes `spare`
    /// alone, so marks go on meanwhile (they write C); `active` cannot change while
    /// `spare` is held.
    fn zero_spare(&self) -> Result<()> {
        let mut spare = self.lock_spare();
        if spare.zeroed || spare.holds_cut {
            return Ok(());
        }
        let spare_region = 1 - self.active.load(Ordering::SeqCst);
        self.write_region(self.region_at(spare_region), &vec![0u64; self.nwords])?;
        self.sync()?;
        spare.zeroed = true;
        Ok(())
    }

    /// Tests in other crates (feature `test-hooks`): make every sync of the change-log
    /// file fail with EIO from now on (`true`), or work again (`false`).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn set_fail_syncs(&self, fail: bool) {
        self.fail_syncs.store(fail, Ordering::SeqCst);
    }

    fn sync(&self) -> Result<()> {
        #[cfg(any(test, feature = "test-hooks"))]
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(Error::io(
                format!("unable to sync change log {}", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.file
            .sync_data()
            .ctx(|| format!("unable to sync change log {}", self.path.display()))
    }

    fn write_region(&self, at: u64, words: &[u64]) -> Result<()> {
        self.pwrite(&words_to_bytes(words, self.region_len as usize), at)
    }

    fn write_header(&self, inner: &Inner, extra_flags: u32) -> Result<()> {
        let mut flags = extra_flags;
        if inner.relative_to.is_some() {
            flags |= FLAG_TRUSTED;
        }
        if inner.cut_ones.is_some() {
            flags |= FLAG_IN_GENERATION;
        }
        let seq_next = self.seq_next.load(Ordering::SeqCst);
        let h = ChangeLogHeader {
            magic: MAGIC,
            version: VERSION,
            flags,
            disk_size: self.disk_size,
            chunk_size: self.chunk_size,
            active: self.active.load(Ordering::SeqCst),
            nbits: self.nbits,
            seq_next,
            seq_lowest_unacked: self.lowest_unacked(seq_next),
            lineage: put_str(&self.lineage),
            relative_to: put_str(inner.relative_to.as_deref().unwrap_or("")),
            checksum: [0; 32],
            reason: match (&inner.relative_to, &inner.reset_reason) {
                (None, Some(r)) => put_str(truncate_utf8(r, REASON_LEN)),
                _ => [0; REASON_LEN],
            },
            reserved: [0; HEADER_SIZE - REASON_AT - REASON_LEN],
        };
        self.pwrite(&h.encode(), 0)?;
        self.sync()?;
        self.closed
            .store(extra_flags & FLAG_DIRTY == 0, Ordering::SeqCst);
        Ok(())
    }

    fn lowest_unacked(&self, seq_next: u64) -> u64 {
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        inflight.first().copied().unwrap_or(seq_next)
    }

    fn current_words(&self) -> Vec<u64> {
        self.durable().to_words()
    }

    /// The disk's lineage id.
    pub fn lineage(&self) -> &str {
        &self.lineage
    }

    /// The generation the tracking is relative to (`None`: untrusted).
    pub fn relative_to(&self) -> Option<String> {
        self.lock_inner().relative_to.clone()
    }

    /// Tracking chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// State for status output.
    pub fn status(&self) -> ChangeLogStatus {
        let inner = self.lock_inner();
        let changed = self.durable_ones.load(Ordering::SeqCst) + inner.cut_ones.unwrap_or(0);
        ChangeLogStatus {
            lineage: self.lineage.clone(),
            relative_to: inner.relative_to.clone(),
            changed_chunks: changed,
            chunk_size: self.chunk_size,
            in_generation: inner.cut_ones.is_some(),
            reset_reason: inner.reset_reason.clone(),
            seq_next: self.seq_next.load(Ordering::Relaxed),
        }
    }

    /// Record that `off..off+len` is about to change; persisted before returning.
    pub fn mark(&self, off: u64, len: u64) -> Result<()> {
        self.persist_bits(off, len)?;
        self.seq_next.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Like [`ChangeLog::mark`], and returns the write's sequence number, which stays
    /// unacknowledged until [`ChangeLog::ack`] is called with it.
    pub fn mark_seq(&self, off: u64, len: u64) -> Result<u64> {
        self.persist_bits(off, len)?;
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.seq_next.fetch_add(1, Ordering::SeqCst);
        inflight.insert(seq);
        Ok(seq)
    }

    /// The write numbered `seq` (from [`ChangeLog::mark_seq`]) is finished.
    pub fn ack(&self, seq: u64) {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&seq);
    }

    fn persist_bits(&self, off: u64, len: u64) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            // a change after close: the header says "not closed cleanly" again before
            // a sequence number is handed out or a bit persisted
            let inner = self.lock_inner();
            if self.closed.load(Ordering::SeqCst) {
                self.write_header(&inner, FLAG_DIRTY)?;
            }
        }
        if len == 0 || self.nbits == 0 {
            return Ok(());
        }
        let cs = self.chunk_size as u64;
        let first = off / cs;
        let last = (off.saturating_add(len - 1) / cs).min(self.nbits - 1);
        if first > last {
            return Ok(());
        }
        let durable = self.durable();
        if durable.all(first..last + 1) {
            return Ok(());
        }
        // Group commit: queue the bits under a ticket; one thread at a time (the
        // leader) writes everything queued so far with a single fdatasync, and every
        // waiter whose ticket that covered returns.
        let mut q = self.lock_queue();
        for c in first..=last {
            if !durable.get(c) {
                *q.queued.entry((c / 64) as usize).or_insert(0) |= 1 << (c % 64);
            }
        }
        drop(durable);
        q.next_ticket += 1;
        let mine = q.next_ticket;
        loop {
            if q.done_ticket >= mine {
                return match q.failures.iter().find(|f| f.0 <= mine && mine <= f.1) {
                    Some(f) => Err(crate::err!(Io, "{}", f.2)),
                    None => Ok(()),
                };
            }
            if q.leader {
                q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            q.leader = true;
            let batch = std::mem::take(&mut q.queued);
            let from = q.done_ticket + 1;
            let upto = q.next_ticket;
            drop(q);
            let r = self.write_bits(&batch);
            q = self.lock_queue();
            q.leader = false;
            q.done_ticket = upto;
            if let Err(e) = r {
                if q.failures.len() >= 64 {
                    q.failures.remove(0);
                }
                q.failures.push((from, upto, e.to_string()));
            }
            self.queue_cv.notify_all();
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, MarkQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write the bitmap blocks holding `batch` (word index → bits), fdatasync, then
    /// publish the bits in memory.
    fn write_bits(&self, batch: &BTreeMap<usize, u64>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // The state lock keeps cuts (which rewrite region C) out while we write.
        let _inner = self.lock_inner();
        let durable = self.durable();
        let words_per_block = (BLOCK / 8) as usize;
        let mut blocks: Vec<usize> = batch.keys().map(|i| i / words_per_block).collect();
        blocks.dedup();
        for b in blocks {
            let start = b * words_per_block;
            let end = (start + words_per_block).min(self.nwords);
            let mut block: Vec<u64> = (start..end).map(|w| durable.word(w)).collect();
            for (i, m) in batch.range(start..end) {
                block[i - start] |= m;
            }
            let bytes = words_to_bytes(&block, block.len() * 8);
            self.pwrite(&bytes, self.current_at() + start as u64 * 8)?;
        }
        self.sync()?;
        for (i, m) in batch {
            let before = durable.or_word(*i, *m);
            self.durable_ones
                .fetch_add(u64::from((m & !before).count_ones()), Ordering::SeqCst);
        }
        Ok(())
    }

    /// At a snapshot instant (writes are paused by the caller): hand out the changed set
    /// and start a fresh one.
    pub fn begin_generation(&self) -> Result<Cut> {
        let mut inner = self.lock_inner();
        let mut spare = self.lock_spare();
        let cur = self.active.load(Ordering::SeqCst);
        let fresh = || AtomicBitmap::zeroed(self.nwords);
        let cut_words = if inner.cut_ones.is_some() {
            // A previous cut was neither committed nor aborted: keep its bits too. Its
            // P is the other region and there is no empty one: P := C ∪ P, then C := 0
            // (a crash in between leaves C ∪ P ⊇ both).
            let mut words = self.read_region(1 - cur)?;
            for (w, c) in words.iter_mut().zip(self.current_words()) {
                *w |= c;
            }
            self.write_region(self.region_at(1 - cur), &words)?;
            self.sync()?;
            inner.cut_ones = Some(ones_in(&words));
            self.write_region(self.region_at(cur), &vec![0u64; self.nwords])?;
            self.sync()?;
            *self.durable.write().unwrap_or_else(|p| p.into_inner()) = fresh();
            self.durable_ones.store(0, Ordering::SeqCst);
            words
        } else {
            if !spare.zeroed {
                // The spare's zeroing failed or has not run: do it now, in the pause.
                self.write_region(self.region_at(1 - cur), &vec![0u64; self.nwords])?;
                self.sync()?;
                spare.zeroed = true;
            }
            // The flip: C becomes P, the zeroed spare becomes C.
            inner.cut_ones = Some(self.durable_ones.load(Ordering::SeqCst));
            self.active.store(1 - cur, Ordering::SeqCst);
            if let Err(e) = self.write_header(&inner, FLAG_DIRTY) {
                // Whichever header is on disk, C ∪ P holds every bit; go on writing
                // marks to the old C, which both headers cover.
                self.active.store(cur, Ordering::SeqCst);
                inner.cut_ones = None;
                return Err(e);
            }
            spare.holds_cut = true;
            spare.zeroed = false;
            // The old C's bits become the cut without a copy; the new C starts empty.
            let old = std::mem::replace(
                &mut *self.durable.write().unwrap_or_else(|p| p.into_inner()),
                fresh(),
            );
            self.durable_ones.store(0, Ordering::SeqCst);
            old.into_words()
        };
        drop(spare);
        let seq_next = self.seq_next.load(Ordering::SeqCst);
        let mut changed: BitVec<u64, Lsb0> = BitVec::from_vec(cut_words);
        changed.truncate(self.nbits as usize);
        Ok(Cut {
            changed,
            relative_to: inner.relative_to.clone(),
            lineage: self.lineage.clone(),
            seq_next,
            seq_lowest_unacked: self.lowest_unacked(seq_next),
            reset_reason: inner.reset_reason.clone(),
        })
    }

    /// The backup of `cut` is committed as generation `gen`: forget its bits.
    pub fn commit_generation(&self, _cut: &Cut, gen: &str) -> Result<()> {
        let mut inner = self.lock_inner();
        if inner.cut_ones.is_none() {
            return Err(crate::err!(
                InvalidInput,
                "unable to commit generation {gen} to the change log: no backup is running"
            ));
        }
        let old = (inner.relative_to.take(), inner.cut_ones.take());
        inner.relative_to = Some(gen.to_string());
        if let Err(e) = self.write_header(&inner, FLAG_DIRTY) {
            inner.relative_to = old.0;
            inner.cut_ones = old.1;
            return Err(e);
        }
        inner.reset_reason = None;
        self.release_spare(inner);
        Ok(())
    }

    /// P is no longer needed (no cut outstanding, the header says so): zero it for the
    /// next instant. A failure only costs that instant the zeroing (it is logged).
    fn release_spare(&self, inner: std::sync::MutexGuard<'_, Inner>) {
        self.lock_spare().holds_cut = false;
        drop(inner);
        if let Err(e) = self.zero_spare() {
            let e: Error = e;
            log::warn!("{e}; the next snapshot instant zeroes the spare bitmap itself");
        }
    }

    /// The backup of `cut` failed: keep its bits for the next one.
    pub fn abort_generation(&self, cut: &Cut) -> Result<()> {
        let mut inner = self.lock_inner();
        if inner.cut_ones.is_none() {
            return Ok(());
        }
        // C |= P, P as on disk (what a crash would merge), and the caller's cut too.
        let mut words = self.read_region(1 - self.active.load(Ordering::SeqCst))?;
        for (i, (w, c)) in words.iter_mut().zip(self.current_words()).enumerate() {
            *w |= c | cut.changed.as_raw_slice().get(i).copied().unwrap_or(0);
        }
        clear_padding(&mut words, self.nbits);
        self.write_region(self.current_at(), &words)?;
        self.sync()?;
        self.durable().store_words(&words);
        self.durable_ones.store(ones_in(&words), Ordering::SeqCst);
        inner.cut_ones = None;
        self.write_header(&inner, FLAG_DIRTY)?;
        self.release_spare(inner);
        Ok(())
    }

    /// Stop trusting the tracking: the next incremental backup reads everything and
    /// says `reason` (persisted in the header, so it survives a restart). Used when
    /// the origin cannot be proven unchanged since the tracking was recorded.
    pub fn distrust(&self, reason: &str) -> Result<()> {
        let mut inner = self.lock_inner();
        log::warn!(
            "change log {}: {reason}; tracking reset, next incremental reads everything",
            self.path.display()
        );
        inner.relative_to = None;
        inner.reset_reason = Some(reason.to_string());
        self.write_header(&inner, FLAG_DIRTY)
    }

    /// Forget all tracking and make it relative to generation `gen` (a disk freshly
    /// restored from `gen`: its content is exactly that generation's).
    pub fn reset_relative_to(&self, gen: &str) -> Result<()> {
        let mut inner = self.lock_inner();
        inner.cut_ones = None;
        inner.relative_to = Some(gen.to_string());
        self.write_region(self.current_at(), &vec![0u64; self.nwords])?;
        self.sync()?;
        self.durable().clear();
        self.durable_ones.store(0, Ordering::SeqCst);
        inner.reset_reason = None;
        self.write_header(&inner, FLAG_DIRTY)?;
        self.release_spare(inner);
        Ok(())
    }
}

impl ChangeLog {
    /// Record a clean stop: the header loses its dirty flag, so the next open does not
    /// treat the sequence numbers as possibly reused. For owners that cannot rely on
    /// `Drop` (the log is shared by threads that outlive the shutdown). Call it once
    /// nothing writes to the disk any more; a change recorded afterwards marks the
    /// header dirty again before it is persisted. Dropping the log does the same.
    pub fn close(&self) -> Result<()> {
        let inner = self.lock_inner();
        self.write_header(&inner, 0)
    }
}

impl Drop for ChangeLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            let e: Error = e;
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u32 = 65536;

    fn ones(c: &Cut) -> Vec<usize> {
        c.changed.iter_ones().collect()
    }

    #[test]
    fn bits_past_the_last_chunk_are_ignored() {
        // Found by fuzzing (fuzz/fuzz_targets/changelog.rs): set padding bits in the
        // last bitmap word were counted as changed chunks (64 of 34).
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 34 * CS as u64;
        drop(ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], HEADER_SIZE as u64).unwrap();
        drop(f);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(cl.status().changed_chunks, 34);
        assert_eq!(cl.begin_generation().unwrap().changed.count_ones(), 34);
    }

    #[test]
    fn header_is_pinned() {
        let h = ChangeLogHeader {
            magic: MAGIC,
            version: VERSION,
            flags: FLAG_TRUSTED,
            disk_size: 1 << 20,
            chunk_size: CS,
            active: 1,
            nbits: 16,
            seq_next: 7,
            seq_lowest_unacked: 7,
            lineage: put_str("ab"),
            relative_to: put_str("g"),
            checksum: [0; 32],
            reason: [0; REASON_LEN],
            reserved: [0; HEADER_SIZE - REASON_AT - REASON_LEN],
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_SIZE);
        assert_eq!(&b[..16], b"CSNPCL01\x02\0\0\0\x04\0\0\0");
        assert_eq!(&b[16..24], &(1u64 << 20).to_le_bytes());
        assert_eq!(&b[28..32], &1u32.to_le_bytes(), "active region");
        assert_eq!(&b[56..59], b"ab\0");
        assert_eq!(&b[120..122], b"g\0");
        let d = ChangeLogHeader::decode(&b).unwrap();
        assert_eq!(d.seq_next, 7);
        assert_eq!(d.active, 1);
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(ChangeLogHeader::decode(&bad).is_none());
    }

    /// A header as an earlier version wrote it.
    fn header_v1(flags: u32, size: u64, nbits: u64, lineage: &str, rel: &str) -> Vec<u8> {
        ChangeLogHeader {
            magic: MAGIC,
            version: 1,
            flags,
            disk_size: size,
            chunk_size: CS,
            active: 0,
            nbits,
            seq_next: 3,
            seq_lowest_unacked: 3,
            lineage: put_str(lineage),
            relative_to: put_str(rel),
            checksum: [0; 32],
            reason: [0; REASON_LEN],
            reserved: [0; HEADER_SIZE - REASON_AT - REASON_LEN],
        }
        .encode()
    }

    #[test]
    fn a_clean_reopen_writes_the_header_only_and_a_dirty_spare_is_zeroed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 300_000 * CS as u64;
        let region = region_len_for(300_000);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(
            cl.bytes_written.load(Ordering::SeqCst),
            HEADER_SIZE as u64,
            "a new log: its regions are zeros already"
        );
        cl.mark(CS as u64 * 3, 1).unwrap();
        let cut = cl.begin_generation().unwrap();
        cl.commit_generation(&cut, "G1").unwrap();
        cl.mark(CS as u64 * 9, 1).unwrap();
        drop(cl);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(cl.bytes_written.load(Ordering::SeqCst), HEADER_SIZE as u64);
        assert_eq!(cl.relative_to().as_deref(), Some("G1"));
        let active = cl.active.load(Ordering::SeqCst);
        drop(cl);
        // a spare left dirty (its zeroing failed, or a crash before it): zeroed at open
        let spare_at = HEADER_SIZE as u64 + u64::from(1 - active) * region;
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 8], spare_at).unwrap();
        drop(f);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(
            cl.bytes_written.load(Ordering::SeqCst),
            HEADER_SIZE as u64 + region
        );
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![9]);
        drop(cut);
        drop(cl);
        // that region became C at the instant above, with nothing marked since: the
        // open zeroed it on disk, so a crash now cannot bring back its garbage
        let mut buf = vec![0u8; region as usize];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut buf, spare_at)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn the_instant_writes_only_the_header_and_the_regions_alternate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 300_000 * CS as u64; // 300000 bits: regions of 40 KiB
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        let instant = |cl: &ChangeLog| {
            let before = cl.bytes_written.load(Ordering::SeqCst);
            let cut = cl.begin_generation().unwrap();
            let n = cl.bytes_written.load(Ordering::SeqCst) - before;
            (cut, n)
        };
        cl.mark(0, 1).unwrap();
        cl.mark(CS as u64 * 299_999, 1).unwrap();
        let (cut, n) = instant(&cl);
        assert_eq!(
            n, HEADER_SIZE as u64,
            "only the header is written at the instant"
        );
        assert_eq!(ones(&cut), vec![0, 299_999]);
        cl.mark(CS as u64 * 5, 1).unwrap();
        cl.commit_generation(&cut, "G1").unwrap();
        cl.mark(CS as u64 * 6, 1).unwrap();
        let (cut, n) = instant(&cl);
        assert_eq!(n, HEADER_SIZE as u64);
        assert_eq!(ones(&cut), vec![5, 6]);
        cl.mark(CS as u64 * 7, 1).unwrap();
        // crash during the second backup: C is region 0 again, P region 1
        std::mem::forget(cl);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(cl.relative_to().as_deref(), Some("G1"));
        let (cut, _) = instant(&cl);
        assert_eq!(ones(&cut), vec![5, 6, 7]);
        cl.abort_generation(&cut).unwrap();
        cl.mark(CS as u64 * 8, 1).unwrap();
        let (cut, n) = instant(&cl);
        assert_eq!(
            n, HEADER_SIZE as u64,
            "abort zeroes the spare for the next instant"
        );
        assert_eq!(ones(&cut), vec![5, 6, 7, 8]);
        // a cut neither committed nor aborted: the next instant keeps both (slow path)
        cl.mark(CS as u64 * 9, 1).unwrap();
        let (cut, n) = instant(&cl);
        assert!(n > HEADER_SIZE as u64);
        assert_eq!(ones(&cut), vec![5, 6, 7, 8, 9]);
        cl.mark(CS as u64 * 10, 1).unwrap();
        std::mem::forget(cl);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(
            ones(&cl.begin_generation().unwrap()),
            vec![5, 6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn a_failed_sync_at_the_instant_loses_no_bit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 64 * CS as u64;
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        cl.mark(0, 1).unwrap();
        cl.fail_syncs.store(true, Ordering::SeqCst);
        assert!(cl.begin_generation().is_err());
        cl.fail_syncs.store(false, Ordering::SeqCst);
        cl.mark(CS as u64 * 3, 1).unwrap();
        assert_eq!(ones(&cl.begin_generation().unwrap()), vec![0, 3]);
        cl.mark(CS as u64 * 4, 1).unwrap();
        std::mem::forget(cl);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(ones(&cl.begin_generation().unwrap()), vec![0, 3, 4]);
    }

    #[test]
    fn a_version_1_log_opens_with_its_bits_and_its_cut() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 128 * CS as u64;
        let region = region_len_for(128);
        let mut file = header_v1(FLAG_TRUSTED | FLAG_IN_GENERATION, size, 128, "l", "G0");
        file.resize(HEADER_SIZE + 2 * region as usize, 0);
        file[HEADER_SIZE] = 0b10; // C: chunk 1
        file[HEADER_SIZE + region as usize + 1] = 0b1; // P: chunk 8
        std::fs::write(&p, &file).unwrap();
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(cl.relative_to().as_deref(), Some("G0"));
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![1, 8]);
        cl.commit_generation(&cut, "G1").unwrap();
        drop(cl);
        let b = std::fs::read(&p).unwrap();
        assert_eq!(
            &b[8..12],
            &VERSION.to_le_bytes(),
            "rewritten as the current version"
        );
        // a version 1 header naming region 1 is not a version 1 header
        let mut bad = header_v1(FLAG_TRUSTED, size, 128, "l", "G0");
        bad[28] = 1;
        let body = bad[..REASON_AT - 32].to_vec();
        let sum = header_sum(&body, &[0; REASON_LEN]);
        bad[REASON_AT - 32..REASON_AT].copy_from_slice(sum.as_bytes());
        bad.resize(HEADER_SIZE + 2 * region as usize, 0);
        std::fs::write(&p, &bad).unwrap();
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert!(cl.relative_to().is_none());
        assert!(cl.status().reset_reason.unwrap().contains("region"));
    }

    #[test]
    fn marks_survive_a_crash_and_cut_semantics() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 100 * CS as u64 + 123;
        {
            let cl = ChangeLog::open(&p, size, CS).unwrap();
            assert!(cl.relative_to().is_none());
            cl.mark(0, 1).unwrap();
            cl.mark(5 * CS as u64 - 1, 2).unwrap(); // chunks 4 and 5
            cl.mark(size - 1, 1).unwrap(); // last chunk (100)
                                           // simulate a crash: leak without the clean-close header write
            std::mem::forget(cl);
        }
        let cl = ChangeLog::open(&p, size, CS).unwrap();
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![0, 4, 5, 100]);
        assert_eq!(cut.changed.len(), 101);
        assert!(cut.relative_to.is_none());
        assert_eq!(cut.lineage, cl.lineage());
        cl.mark(CS as u64 * 7, 10).unwrap();
        cl.commit_generation(&cut, "G1").unwrap();
        drop(cl);
        let cl = ChangeLog::open(&p, size, CS).unwrap();
        assert_eq!(cl.relative_to().as_deref(), Some("G1"));
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![7]);
        assert_eq!(cut.relative_to.as_deref(), Some("G1"));
        cl.mark(CS as u64 * 9, 1).unwrap();
        cl.abort_generation(&cut).unwrap();
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![7, 9]);
        cl.mark(CS as u64 * 11, 1).unwrap();
        // crash during the backup: the reopened log has the union
        std::mem::forget(cl);
        let cl = ChangeLog::open(&p, size, CS).unwrap();
        let seq = cl.status().seq_next;
        assert!(seq >= 1 << 32, "seq_next bumped after an unclean stop");
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), vec![7, 9, 11]);
        assert_eq!(cut.relative_to.as_deref(), Some("G1"));
    }

    #[test]
    fn close_is_a_clean_stop_and_a_later_change_undoes_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        let size = 16 * CS as u64;
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        cl.mark(0, 1).unwrap();
        cl.close().unwrap();
        let seq = cl.status().seq_next;
        // still shared (as in the daemon): no Drop, yet the stop counts as clean
        let again = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert_eq!(again.status().seq_next, seq, "no bump after close");
        std::mem::forget(again);
        // a change after close makes the header dirty again before it is persisted
        cl.mark(CS as u64, 1).unwrap();
        std::mem::forget(cl);
        let cl = ChangeLog::open_with_lineage(&p, size, CS, "l").unwrap();
        assert!(
            cl.status().seq_next >= 1 << 32,
            "bumped: not closed after the change"
        );
        assert_eq!(ones(&cl.begin_generation().unwrap()), vec![0, 1]);
    }

    #[test]
    fn mismatch_resets_to_untrusted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        {
            let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
            let cut = cl.begin_generation().unwrap();
            cl.commit_generation(&cut, "G1").unwrap();
            cl.mark(0, 1).unwrap();
        }
        {
            let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
            assert_eq!(cl.relative_to().as_deref(), Some("G1"));
        }
        {
            let cl = ChangeLog::open(&p, 1 << 25, CS).unwrap();
            assert!(cl.relative_to().is_none());
            assert!(cl.status().reset_reason.unwrap().contains("disk size"));
            let cut = cl.begin_generation().unwrap();
            cl.commit_generation(&cut, "G2").unwrap();
        }
        {
            let cl = ChangeLog::open(&p, 1 << 25, CS * 2).unwrap();
            assert!(cl.relative_to().is_none());
            let cut = cl.begin_generation().unwrap();
            cl.commit_generation(&cut, "G3").unwrap();
        }
        // new lineage (restore): untrusted until reset_relative_to
        Identity::create_restored(d.path(), "/r", "G0").unwrap();
        let cl = ChangeLog::open(&p, 1 << 25, CS * 2).unwrap();
        assert!(cl.relative_to().is_none());
        cl.reset_relative_to("G0").unwrap();
        drop(cl);
        let cl = ChangeLog::open(&p, 1 << 25, CS * 2).unwrap();
        assert_eq!(cl.relative_to().as_deref(), Some("G0"));
        // torn header
        drop(cl);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"X", 20).unwrap();
        let cl = ChangeLog::open(&p, 1 << 25, CS * 2).unwrap();
        assert!(cl.relative_to().is_none());
    }

    #[test]
    fn distrust_reason_survives_a_restart_until_a_commit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(CHANGELOG_FILE);
        {
            let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
            let cut = cl.begin_generation().unwrap();
            cl.commit_generation(&cut, "G1").unwrap();
            cl.mark(0, 1).unwrap();
            cl.distrust("the origin was modified while detached")
                .unwrap();
            assert!(cl.relative_to().is_none());
        }
        // a clean close and a crash both keep the reason
        let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
        assert!(cl.relative_to().is_none());
        let why = cl.status().reset_reason.unwrap();
        assert!(why.contains("modified while detached"), "{why}");
        std::mem::forget(cl);
        let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
        let cut = cl.begin_generation().unwrap();
        assert!(cut.relative_to.is_none());
        assert!(cut
            .reset_reason
            .as_deref()
            .unwrap()
            .contains("modified while detached"));
        cl.commit_generation(&cut, "G2").unwrap();
        drop(cl);
        let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
        assert_eq!(cl.relative_to().as_deref(), Some("G2"));
        assert!(cl.status().reset_reason.is_none());
        // a long reason with multi-byte characters is cut on a character boundary
        cl.distrust(&"é".repeat(300)).unwrap();
        drop(cl);
        let cl = ChangeLog::open(&p, 1 << 24, CS).unwrap();
        assert_eq!(cl.status().reset_reason.unwrap(), "é".repeat(128));
    }

    #[test]
    fn seq_numbers_track_unacked() {
        let d = tempfile::tempdir().unwrap();
        let cl = ChangeLog::open(&d.path().join("c"), 1 << 20, CS).unwrap();
        let a = cl.mark_seq(0, 10).unwrap();
        let b = cl.mark_seq(0, 10).unwrap();
        assert_eq!(b, a + 1);
        cl.ack(b);
        let cut = cl.begin_generation().unwrap();
        assert_eq!(cut.seq_next, b + 1);
        assert_eq!(cut.seq_lowest_unacked, a);
        cl.ack(a);
        cl.abort_generation(&cut).unwrap();
        let cut = cl.begin_generation().unwrap();
        assert_eq!(cut.seq_lowest_unacked, cut.seq_next);
    }

    #[test]
    fn concurrent_marks() {
        let d = tempfile::tempdir().unwrap();
        let cl = std::sync::Arc::new(ChangeLog::open(&d.path().join("c"), 1 << 26, 4096).unwrap());
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let cl = cl.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        cl.mark((i * 4 + t) * 4096 * 7 % (1 << 26), 4096).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mut expect: Vec<usize> = (0..4u64)
            .flat_map(|t| (0..200u64).map(move |i| ((i * 4 + t) * 7 % (1 << 14)) as usize))
            .collect();
        expect.sort();
        expect.dedup();
        std::mem::forget(std::sync::Arc::try_unwrap(cl).ok().unwrap());
        let cl = ChangeLog::open(&d.path().join("c"), 1 << 26, 4096).unwrap();
        let cut = cl.begin_generation().unwrap();
        assert_eq!(ones(&cut), expect);
    }
}
