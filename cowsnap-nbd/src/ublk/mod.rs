//! The daemon's ublk server (`--ublk`): the export as the block device `/dev/ublkbN`
//! of the kernel's ublk driver (`ublk_drv`, Linux 6.0+: ioctl-encoded commands where
//! the driver takes them (6.3+), the plain numbers of 6.0–6.2 otherwise), served by the
//! same [`Export`] the NBD and FUSE servers use.
//! No socket, no loop device, no second process: the driver hands each request to a
//! queue thread over io_uring and the thread calls the engine.
//!
//! Built on the `io-uring` crate with our own command layer ([`abi`], [`ctrl`],
//! [`queue`]) rather than the `libublk` crate: the commands are few, the crate is
//! already a dependency of the engine, and this keeps the daemon's dependencies small.
//!
//! Set-up ([`UblkServer::start`]): ADD_DEV on `/dev/ublk-control` (the driver picks
//! the id N; `queues` × `depth` tags, `MAX_IO` bytes each), SET_PARAMS (512-byte
//! logical and 4 KiB physical blocks, the size, a volatile write cache with FUA, so
//! the block layer sends FLUSH for an fsync and FUA for a forced write; discard and
//! write-zeroes limits when the export honours them; read-only when it is), open
//! `/dev/ublkcN` (once, shared by the queues), start one thread per queue which maps
//! its descriptors and fetches every tag, then START_DEV (which returns once every
//! tag is fetched and `/dev/ublkbN` exists). A failure at any step undoes the earlier
//! ones.
//!
//! Semantics ([`dispatch`]): a WRITE is committed only after [`Export::write`]
//! returned (the engine has preserved what a running backup still needs and applied
//! the write); a FUA write is an engine FUA write; FLUSH is [`Export::flush`], so an
//! fsync in a filesystem on `/dev/ublkbN` reaches the origin's stable storage before
//! it returns. DISCARD is a trim and WRITE_ZEROES a zero (NOUNMAP keeps the blocks).
//!
//! Tear-down ([`UblkServer::stop`], at daemon shutdown): STOP_DEV (the disk goes
//! away; outstanding fetches end with ABORT and the queue threads exit), close the
//! char device, DEL_DEV. The daemon refuses to stop while the disk is mounted only in
//! so far as `cowsnapctl detach` checks mounts first.
//!
//! Daemon death: we do not set `UBLK_F_USER_RECOVERY`. When the daemon dies the
//! kernel closes `/dev/ublkcN`, the driver aborts the device (I/O fails with EIO, the
//! disk is removed), like a FUSE mount whose server died; everything acknowledged had
//! already gone through the engine. The device id stays taken until DEL_DEV, which
//! `cowsnapctl detach`/`attach` do from the attach record ([`ctrl::remove`]).
//! Recovery (a new daemon taking over the same `/dev/ublkbN`) is not offered: like
//! `--via fuse`, `cowsnapctl restart` refuses and asks for detach + attach.

pub mod abi;
pub mod ctrl;
pub mod dispatch;
pub mod queue;

use abi::{attr, param_type, DevInfo, ParamBasic, ParamDiscard, Params};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::export::Export;
use dispatch::Limits;
use queue::{Queue, QueueSpec};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each tag's buffer: the largest request (512 KiB).
pub const MAX_IO: usize = 512 * 1024;
/// Default queues (threads).
pub const DEFAULT_QUEUES: u16 = 4;
/// Most queues accepted.
pub const MAX_QUEUES: u16 = 16;
/// Default tags per queue.
pub const DEFAULT_DEPTH: u16 = 32;
/// Most tags per queue accepted (buffers: queues × depth × 512 KiB of address space,
/// touched only as used).
pub const MAX_DEPTH: u16 = 128;
/// Most helper threads per queue accepted.
pub const MAX_HELPERS: u8 = 8;
/// Largest discard / write-zeroes request in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Queue layout.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Queues (threads), 1..=[`MAX_QUEUES`].
    pub queues: u16,
    /// Tags per queue, 1..=[`MAX_DEPTH`].
    pub depth: u16,
    /// Helper threads per queue, 0..=[`MAX_HELPERS`] ([`queue::HELPERS`] by default).
    pub helpers: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
            helpers: queue::HELPERS,
        }
    }
}

/// The parameters for a disk of `size` bytes (a multiple of 512) with `caps`.
pub fn params_for(size: u64, caps: cowsnap_core::export::ExportCaps) -> Params {
    let mut attrs = attr::VOLATILE_CACHE | attr::FUA;
    if caps.read_only {
        attrs |= attr::READ_ONLY;
    }
    let mut p = Params {
        len: abi::PARAMS_LEN as u32,
        types: param_type::BASIC,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: (MAX_IO / 512) as u32,
            chunk_sectors: 0,
            dev_sectors: size / 512,
            virt_boundary_mask: 0,
        },
        discard: ParamDiscard::default(),
    };
    let trim = caps.trim && !caps.read_only;
    let zeroes = caps.zeroes && !caps.read_only;
    if trim || zeroes {
        p.types |= param_type::DISCARD;
        p.discard = ParamDiscard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: if trim { MAX_DISCARD_SECTORS } else { 0 },
            max_write_zeroes_sectors: if zeroes { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

/// A started ublk device.
pub struct UblkServer {
    id: u32,
    ctrl: Mutex<Control>,
    cdev: Mutex<Option<Arc<File>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    live: Arc<AtomicUsize>,
    stopped: Mutex<bool>,
}

use ctrl::Control;

fn wait_for(path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !Path::new(path).exists() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

impl UblkServer {
    /// Create, configure and start a device serving `export`.
    pub fn start(export: Arc<dyn Export>, opts: Options, name: &str) -> Result<Arc<UblkServer>> {
        let queues = opts.queues.clamp(1, MAX_QUEUES);
        let depth = opts.depth.clamp(1, MAX_DEPTH);
        let helpers = opts.helpers.min(MAX_HELPERS);
        let mut ctrl = Control::open()?;
        let info = ctrl.add(DevInfo {
            nr_hw_queues: queues,
            queue_depth: depth,
            max_io_buf_bytes: MAX_IO as u32,
            flags: abi::flags::CMD_IOCTL_ENCODE,
            ..Default::default()
        })?;
        let id = info.dev_id;
        let enc = ctrl.encoding();
        let server = Arc::new(UblkServer {
            id,
            ctrl: Mutex::new(ctrl),
            cdev: Mutex::new(None),
            workers: Mutex::new(Vec::new()),
            live: Arc::new(AtomicUsize::new(0)),
            stopped: Mutex::new(false),
        });
        match server.bring_up(export, info, enc, helpers, name) {
            Ok(()) => Ok(server),
            Err(e) => {
                server.stop();
                Err(e)
            }
        }
    }

    fn bring_up(
        &self,
        export: Arc<dyn Export>,
        info: DevInfo,
        enc: abi::Encoding,
        helpers: u8,
        name: &str,
    ) -> Result<()> {
        let (size, caps) = (export.size(), export.caps());
        let id = self.id;
        let lock =
            |what: &str| cowsnap_core::err!(Io, "unable to {what} ublk device {id}: poisoned");
        self.ctrl
            .lock()
            .map_err(|_| lock("configure"))?
            .set_params(id, &params_for(size, caps))?;
        let cpath = abi::char_path(id);
        if !wait_for(&cpath, Duration::from_secs(5)) {
            return Err(cowsnap_core::err!(
                Io,
                "unable to find {cpath} after adding the device"
            ));
        }
        let cdev = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&cpath)
                .map_err(|e| Error::io(format!("unable to open {cpath}"), e))?,
        );
        *self.cdev.lock().map_err(|_| lock("open"))? = Some(cdev.clone());
        let limits = Limits {
            size,
            max_io: info.max_io_buf_bytes.min(MAX_IO as u32) as usize,
            read_only: caps.read_only,
        };
        let (tx, rx) = crossbeam_channel::bounded::<Result<()>>(usize::from(info.nr_hw_queues));
        for q_id in 0..info.nr_hw_queues {
            let spec = QueueSpec {
                q_id,
                depth: info.queue_depth,
                cdev: cdev.clone(),
                limits,
                enc,
                helpers,
            };
            let exp = export.clone();
            let tx = tx.clone();
            let live = self.live.clone();
            live.fetch_add(1, Ordering::SeqCst);
            let h = std::thread::Builder::new()
                .name(format!("ublk-q{q_id}"))
                .spawn(move || {
                    let q = Queue::new(spec).and_then(|mut q| q.fetch_all().map(|_| q));
                    match q {
                        Ok(q) => {
                            let _ = tx.send(Ok(()));
                            let n = q.run(exp.as_ref());
                            log::debug!("ublk queue {q_id}: done after {n} requests");
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            match h {
                Ok(h) => self.workers.lock().map_err(|_| lock("start"))?.push(h),
                Err(e) => {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(Error::io("unable to start a ublk queue thread", e));
                }
            }
        }
        drop(tx);
        drop(cdev);
        for _ in 0..info.nr_hw_queues {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(cowsnap_core::err!(
                        Io,
                        "unable to start ublk device {id}: a queue did not get ready"
                    ))
                }
            }
        }
        self.ctrl.lock().map_err(|_| lock("start"))?.start(id)?;
        let bpath = abi::block_path(id);
        if !wait_for(&bpath, Duration::from_secs(5)) {
            return Err(cowsnap_core::err!(
                Io,
                "unable to find {bpath} after starting it"
            ));
        }
        log::info!(
            "ublk: {name} served as {bpath} ({} queues × {} tags, {} KiB requests, {} commands{})",
            info.nr_hw_queues,
            info.queue_depth,
            limits.max_io / 1024,
            match enc {
                abi::Encoding::Ioctl => "ioctl-encoded",
                abi::Encoding::Legacy => "plain",
            },
            if caps.read_only { ", read-only" } else { "" }
        );
        Ok(())
    }

    /// The device id N.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn device(&self) -> String {
        abi::block_path(self.id)
    }

    /// Queue threads still serving.
    pub fn live_queues(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// STOP_DEV, wait up to 5 s for the queues, close the char device, DEL_DEV.
    /// Idempotent.
    pub fn stop(&self) {
        match self.stopped.lock() {
            Ok(mut s) if !*s => *s = true,
            _ => return,
        }
        let id = self.id;
        if let Ok(mut c) = self.ctrl.lock() {
            if let Err(e) = c.stop(id) {
                log::debug!("ublk: {e}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.live_queues() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.live_queues() > 0 {
            log::warn!(
                "ublk: {} queue(s) of device {id} did not end; leaving the device for \
                 cowsnapctl detach --force",
                self.live_queues()
            );
            return;
        }
        if let Ok(mut ws) = self.workers.lock() {
            for h in ws.drain(..) {
                let _ = h.join();
            }
        }
        if let Ok(mut c) = self.cdev.lock() {
            *c = None;
        }
        if let Ok(mut c) = self.ctrl.lock() {
            match c.delete(id) {
                Ok(()) => log::info!("ublk: removed {}", abi::block_path(id)),
                Err(e) => log::warn!("ublk: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap_core::export::ExportCaps;

    const RW: ExportCaps = ExportCaps {
        read_only: false,
        trim: true,
        zeroes: true,
        fast_zero: false,
        multi_conn: true,
    };

    #[test]
    fn params_describe_the_disk_and_its_cache() {
        let p = params_for(10 << 30, RW);
        assert_eq!(p.len, 60);
        assert_eq!(p.types, param_type::BASIC | param_type::DISCARD);
        assert_eq!(p.basic.dev_sectors, (10u64 << 30) / 512);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert!(p.basic.physical_bs_shift >= p.basic.logical_bs_shift);
        // the driver refuses max_sectors above max_io_buf_bytes / 512
        assert_eq!(p.basic.max_sectors as usize * 512, MAX_IO);
        // a volatile cache with FUA: fsync arrives as FLUSH, forced writes as FUA
        assert_eq!(p.basic.attrs, attr::VOLATILE_CACHE | attr::FUA);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert!(p.discard.discard_granularity > 0);
        assert!(p.discard.max_discard_sectors > 0 && p.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn params_of_read_only_and_limited_exports() {
        let p = params_for(1 << 20, ExportCaps::READ_ONLY_IMAGE);
        assert_eq!(p.basic.attrs & attr::READ_ONLY, attr::READ_ONLY);
        assert_eq!(p.types, param_type::BASIC);

        let p = params_for(1 << 20, ExportCaps { trim: false, ..RW });
        assert_eq!(p.types, param_type::BASIC | param_type::DISCARD);
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert!(p.discard.max_write_zeroes_sectors > 0);
        assert!(p.discard.discard_granularity > 0);
    }
}
