//! The engine: the write path of one attached disk. Without a snapshot every request
//! passes straight to the origin. While a backup runs, a write to a chunk the backup
//! has not copied yet is held until the chunk's original is preserved in the container.
//!
//! (Skeleton: pass-through only. The snapshot write path lands with the CoW engine.)

use crate::blockio::BlockIo;
use crate::changelog::ChangeLog;
use crate::error::{ErrorKind, Result};
use crate::export::{Export, ExportCaps, Extent, ZeroFlags};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Engine settings fixed at attach time.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tracking chunk size in bytes: a power of two, 64 KiB by default.
    pub chunk_size: u32,
    /// Refuse data-changing requests.
    pub read_only: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: 64 * 1024,
            read_only: false,
        }
    }
}

/// I/O counters, as shown by `cowsnapctl status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct IoStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Trim requests.
    pub trims: u64,
    /// Write-zeroes requests.
    pub zeroes: u64,
    /// Requests that failed.
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
}

/// One attached disk's engine.
pub struct Engine {
    origin: Arc<dyn BlockIo>,
    cfg: EngineConfig,
    changelog: Option<Arc<ChangeLog>>,
    counters: Counters,
}

impl Engine {
    /// Build an engine over an opened origin.
    pub fn new(
        origin: Arc<dyn BlockIo>,
        cfg: EngineConfig,
        changelog: Option<Arc<ChangeLog>>,
    ) -> Result<Arc<Self>> {
        if !cfg.chunk_size.is_power_of_two() || cfg.chunk_size < 4096 {
            return Err(crate::err!(
                InvalidInput,
                "chunk size {} is not a power of two >= 4096",
                cfg.chunk_size
            ));
        }
        Ok(Arc::new(Engine {
            origin,
            cfg,
            changelog,
            counters: Counters::default(),
        }))
    }

    /// The origin.
    pub fn origin(&self) -> &Arc<dyn BlockIo> {
        &self.origin
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Snapshot of the I/O counters.
    pub fn stats(&self) -> IoStats {
        let c = &self.counters;
        IoStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            trims: c.trims.load(Ordering::Relaxed),
            zeroes: c.zeroes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    fn count_err<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn mark_changed(&self, off: u64, len: u64) -> Result<()> {
        match &self.changelog {
            Some(cl) => cl.mark(off, len),
            None => Ok(()),
        }
    }
}

impl Export for Engine {
    fn size(&self) -> u64 {
        self.origin.size()
    }
    fn caps(&self) -> ExportCaps {
        ExportCaps {
            read_only: self.cfg.read_only,
            trim: true,
            zeroes: true,
            fast_zero: self.origin.fast_zero(),
            multi_conn: true,
        }
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.count_err(self.origin.read_at(buf, off))
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "write to a read-only export"));
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let r = self
            .mark_changed(off, data.len() as u64)
            .and_then(|_| self.origin.write_at(data, off))
            .and_then(|_| if fua { self.origin.flush() } else { Ok(()) });
        self.count_err(r)
    }
    fn flush(&self) -> Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.count_err(self.origin.flush())
    }
    fn trim(&self, off: u64, len: u64, fua: bool) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "trim on a read-only export"));
        }
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        let r = self
            .mark_changed(off, len)
            .and_then(|_| self.origin.discard(off, len))
            .and_then(|_| if fua { self.origin.flush() } else { Ok(()) });
        self.count_err(r)
    }
    fn zero(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.cfg.read_only {
            return Err(crate::err!(ReadOnly, "write-zeroes on a read-only export"));
        }
        if flags.fast && !self.origin.fast_zero() {
            return Err(crate::err!(Unsupported, "fast zero not supported"));
        }
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        let r = self
            .mark_changed(off, len)
            .and_then(|_| self.origin.write_zeroes(off, len, !flags.no_hole))
            .and_then(|_| {
                if flags.fua {
                    self.origin.flush()
                } else {
                    Ok(())
                }
            });
        self.count_err(r)
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        crate::blockio::check_range(self.size(), off, len, "block status")
            .map_err(|e| e.with_context("unable to report block status"))?;
        let _ = ErrorKind::Io;
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
}
