//! Where a backup goes. The drainer hands a target whole granules (runs of tracking
//! chunks of the target's granule size) in any order; the target commits only after
//! its data is durable, and a target that is dropped or aborted says it is incomplete.
//!
//! Kinds and specs ([`open`]): `file:PATH` and `dev:PATH` ([`raw::RawImage`]), and
//! `repo:DIR` ([`crate::repo::RepoTarget`]). The repository target stays in `repo/`:
//! it is the repository's writer (chunk store, index, generation metadata, lock and
//! pins), built from the repository's crate-private parts; this module is where every
//! kind is named and opened.

pub mod raw;

use crate::aligned::AlignedBuf;
use crate::changelog::Cut;
use crate::chunk_map::Geometry;
use crate::error::Result;
use raw::RawImage;
use serde::Serialize;
use std::fs::File;

/// Open a backup target from its spec for the disk `disk_name` of `geo`.
/// `incremental` is only meaningful for repository targets; `direct` opens a `dev:`
/// block device O_DIRECT. `key` is an encrypted repository's (refused for other kinds).
pub fn open(
    spec: &str,
    geo: &Geometry,
    disk_name: &str,
    incremental: bool,
    direct: bool,
    key: Option<std::sync::Arc<crate::repo::crypt::RepoKey>>,
) -> Result<Box<dyn Target>> {
    let bad = |why: &str| {
        crate::err!(
            InvalidInput,
            "unable to open target {spec:?}: {why} (expected file:PATH, dev:PATH or repo:DIR)"
        )
    };
    let (kind, rest) = spec.split_once(':').ok_or_else(|| bad("no kind"))?;
    if rest.is_empty() {
        return Err(bad("empty path"));
    }
    if incremental && kind != "repo" {
        return Err(crate::err!(
            InvalidInput,
            "unable to open target {spec:?}: --incremental needs a repository target (repo:DIR)"
        ));
    }
    if key.is_some() && kind != "repo" {
        return Err(crate::err!(
            InvalidInput,
            "unable to open target {spec:?}: a key encrypts repositories only (repo:DIR)"
        ));
    }
    match kind {
        "file" => Ok(Box::new(RawImage::create_file(
            rest.as_ref(),
            geo.disk_size,
            geo.chunk_size,
        )?)),
        "dev" => Ok(Box::new(RawImage::open_device(
            rest.as_ref(),
            geo.disk_size,
            geo.chunk_size,
            direct,
        )?)),
        "repo" => crate::repo::open_target(
            rest.as_ref(),
            crate::repo::RepoTargetParams {
                disk_name: disk_name.to_string(),
                incremental,
                key,
            },
            geo.chunk_size,
        ),
        _ => Err(bad("unknown kind")),
    }
}

/// Facts about the snapshot a target stores.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Disk name.
    pub disk: String,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Tracking chunk size in bytes.
    pub chunk_size: u32,
    /// Seconds since the epoch at the snapshot instant.
    pub created_unix: u64,
    /// Lineage id of the disk.
    pub lineage: String,
    /// Next change sequence number at the instant.
    pub seq_next: u64,
    /// Lowest not-yet-acknowledged sequence number at the instant.
    pub seq_lowest_unacked: u64,
}

/// Which chunks a backup must read.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Every chunk.
    All,
    /// Only chunks whose bit is set in the change-log cut, widened to whole granules;
    /// the rest the target takes from its parent.
    Changed,
}

/// What a target reports after commit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetSummary {
    /// Generation id (repository targets).
    pub generation: Option<String>,
    /// Bytes written to the target medium.
    pub bytes_stored: u64,
    /// Notes for the user (e.g. "tracking not trusted: full read").
    pub notes: Vec<String>,
    /// Object-store repositories: index reads and store requests of the backup.
    pub repo_io: Option<crate::repo::cache::RepoIo>,
}

/// A backup destination.
pub trait Target: Send {
    /// Granule in tracking chunks (power of two): the drainer always hands over whole
    /// granules (the last one may be short at the end of the disk).
    fn granule_chunks(&self) -> u32;
    /// Whether the backup should cut the change log (the target records restore points
    /// that later incremental backups build on). `false` for targets that neither read
    /// the cut nor commit a generation (raw images): then no cut is taken, which keeps
    /// the change log as it is instead of clearing it at the instant and merging it back
    /// at the end — and spares the disk's writers from re-persisting the change bit of
    /// every chunk they touch during the backup (one fdatasync per group commit, slow
    /// while the backup loads the same disk). The default keeps the cut.
    fn uses_change_log(&self) -> bool {
        true
    }
    /// Before the instant (writes still run), with the generation the disk's change
    /// log is relative to now: do the I/O `scope` would need (a repository target
    /// resolves and loads its parent's index), so the instant itself does none. Only a
    /// preparation: `scope` checks it still matches the cut. Returns the scope
    /// `scope` is expected to give (so a full read's chunk map is made before the
    /// instant too); `scope` decides. The default does nothing and expects `All`.
    fn prepare(&mut self, relative_to: Option<&str>) -> Scope {
        let _ = relative_to;
        Scope::All
    }
    /// Whether the backup's bulk reads of a regular-file origin should bypass the page
    /// cache (O_DIRECT, where `EngineConfig::direct_io` allows it): for targets that
    /// take every byte through the drainer's buffer anyway (hashing, compressing), so
    /// the copy out of the page cache is saved and the machine's cache is left alone.
    /// The default (`false`) keeps the buffered reads, which in-kernel copies
    /// (`copy_from_file`) need.
    fn reads_file_origin_direct(&self) -> bool {
        false
    }
    /// Which chunks must be read; called once, at the snapshot instant, with the cut.
    fn scope(&mut self, cut: Option<&Cut>) -> Result<Scope>;
    /// Called once before any data, with facts about the snapshot.
    fn begin(&mut self, info: &SnapshotInfo) -> Result<()>;
    /// Store `data` (whole granules, `data.len()` a multiple of the chunk size except
    /// at the disk's end) at byte offset `off`.
    fn write(&mut self, off: u64, data: &[u8]) -> Result<()>;
    /// Whether the drainer should hand its batch buffers over (`write_owned`) instead
    /// of lending them (`write`). The default (`false`): lent.
    fn takes_buffers(&self) -> bool {
        false
    }
    /// [`Self::write`] of `data[..len]`, the buffer given away (a target that keeps
    /// the bytes for later work then needs no copy of them). Returns a buffer for the
    /// drainer's next batch: a recycled one, or an empty one; it may block until one
    /// is free, which is how such a target bounds its memory. Called only when
    /// `takes_buffers`; the default lends the buffer to `write` and gives it back.
    fn write_owned(&mut self, off: u64, data: AlignedBuf, len: usize) -> Result<AlignedBuf> {
        self.write(off, &data[..len])?;
        Ok(data)
    }
    /// Store the bytes `off..off+len` of `src`, the origin's own file, at the same
    /// offset, copied in the kernel (`copy_file_range`) instead of through the
    /// drainer's buffer. Whole chunks; asked only of targets whose granule is one
    /// chunk (the preserved chunks between two runs are `write`n one by one). The
    /// drainer calls it only for
    /// runs of chunks it holds busy marks on and that no writer preserved, so nothing
    /// changes those bytes of `src` during the call. `Ok(false)`: not stored (this
    /// target has no such path, or the kernel cannot copy between these files); the
    /// drainer then reads the range and calls `write` for it, which may rewrite bytes
    /// already copied. The default has no such path: a target that must see the
    /// bytes (hashing, compressing, holding back a header) keeps it.
    fn copy_from_file(&mut self, src: &File, off: u64, len: u64) -> Result<bool> {
        let _ = (src, off, len);
        Ok(false)
    }
    /// Store zeros over `off..off+len` (whole granules, like `write`): known zeros at
    /// the instant (free space, holes), handed over as a range so that a large,
    /// mostly empty disk costs what it holds. No default: a target must store them.
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()>;
    /// Record the consistency group of this backup and notes for the user (hooks'
    /// outcomes) with what `commit` publishes. Called before `begin` and again before
    /// `commit`. The default keeps nothing: a target without metadata (a raw image)
    /// has nowhere to put them, and the command shows them instead.
    fn annotate(&mut self, group: Option<&crate::repo::generation::GroupRef>, notes: &[String]) {
        let _ = (group, notes);
    }
    /// Make everything durable and mark the target complete.
    fn commit(self: Box<Self>) -> Result<TargetSummary>;
    /// Leave the target marked incomplete, with the reason.
    fn abort(self: Box<Self>, why: &str);
}
