//! The daemon's own FUSE server (`--fuse-mount DIR`): the export as the one file
//! `DIR/disk`, read and written by the same [`Export`] the NBD server uses — no NBD
//! socket and no second process in the way. `cowsnapctl attach --via fuse` then puts a
//! loop device with direct I/O on that file.
//!
//! Two transports, one set of handlers ([`handle`], [`read_into`]): FUSE over io_uring
//! ([`uring`], protocol 7.42) when the kernel offers it and `--fuse-uring` allows, and
//! plain `/dev/fuse` otherwise, described here.
//!
//! Plain `/dev/fuse` protocol ([`abi`], 7.31): the daemon opens `/dev/fuse`, mounts
//! with `mount(2)` (`fd=N,rootmode=40000,user_id=0,group_id=0,allow_other,
//! default_permissions`: it runs as root, no fusermount), and clones the descriptor
//! (`FUSE_DEV_IOC_CLONE`) for each of `threads` workers. Each worker reads one request
//! at a time into its own buffer (1 MiB + header: `max_write` and `max_pages` ask for
//! 1 MiB requests), calls the export and writes the reply; so memory is bounded by
//! `threads` × 2 MiB and requests in flight by `threads`.
//!
//! Semantics: the file is opened with `FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES`
//! (no page cache of its own; the loop device's direct I/O arrives as `READ`/`WRITE`,
//! several in flight with `FUSE_ASYNC_DIO`). A `WRITE` is answered only after
//! `Export::write` returned — the engine has preserved what a running backup still
//! needs and applied the write; an `O_DSYNC`/`O_SYNC` write is a FUA write. `FSYNC`
//! and `FLUSH` are `Export::flush` (the origin's stable storage before the reply).
//! `FALLOCATE` with `PUNCH_HOLE` is a write-zeroes that may deallocate, with
//! `ZERO_RANGE` one that keeps the blocks; other modes only within the size. The size
//! never changes: `SETATTR` of another size, mode or owner is `EPERM`. A read-only
//! export refuses opening for writing (`EROFS`).
//!
//! If the daemon dies, the kernel closes its `/dev/fuse` descriptors and aborts the
//! connection: every later access fails (`ENOTCONN`, the loop device `EIO`), and what
//! was acknowledged had already gone through the engine. A clean stop ([`FuseServer::
//! stop`]) detaches loop devices on the file, unmounts (lazily when still busy), and
//! waits a bounded time for the workers.

pub mod abi;
pub mod uring;

use abi::{op, Attr, InHeader, IN_HEADER, OUT_HEADER};
use cowsnap_core::error::{Error, Result};
use cowsnap_core::export::{Export, ZeroFlags};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The largest READ/WRITE payload asked for (`max_write`, `max_pages` × 4 KiB).
pub const MAX_IO: usize = 1 << 20;
/// Default number of worker threads.
pub const DEFAULT_THREADS: usize = 8;
/// Most worker threads accepted.
pub const MAX_THREADS: usize = 32;
/// The file's name inside the mount.
pub const FILE_NAME: &str = "disk";

const ROOT_INO: u64 = 1;
const FILE_INO: u64 = 2;
/// How long the kernel may cache names and attributes (nothing changes them).
const VALID_SECS: u64 = 3600;

/// Whether requests come over FUSE over io_uring (`--fuse-uring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UringMode {
    /// io_uring when the kernel offers it (`/sys/module/fuse/parameters/enable_uring`
    /// is Y), plain `/dev/fuse` otherwise.
    Auto,
    /// io_uring, or refuse to mount.
    On,
    /// Plain `/dev/fuse` only.
    Off,
}

/// The system-wide switch of FUSE over io_uring (root may write Y; never changed here).
pub const ENABLE_URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether the running kernel offers FUSE over io_uring to new mounts.
pub fn kernel_offers_uring() -> bool {
    std::fs::read_to_string(ENABLE_URING_PARAM).is_ok_and(|s| s.trim() == "Y")
}

/// What is shared by the workers.
struct Shared {
    export: Arc<dyn Export>,
    size: u64,
    read_only: bool,
    time: u64,
    uid: u32,
    gid: u32,
    /// Ask for FUSE over io_uring at INIT.
    want_uring: bool,
    /// Set once INIT is answered: whether io_uring was negotiated.
    init: (Mutex<Option<bool>>, Condvar),
    /// Requests answered over `/dev/fuse` and over io_uring (added by each worker
    /// when it ends).
    served_dev: std::sync::atomic::AtomicU64,
    served_uring: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn init_done(&self, uring: bool) {
        if let Ok(mut g) = self.init.0.lock() {
            *g = Some(uring);
            self.init.1.notify_all();
        }
    }

    /// Wait up to `t` for INIT: `Some(io_uring negotiated)`, `None` on time-out.
    fn wait_init(&self, t: Duration) -> Option<bool> {
        let g = self.init.0.lock().ok()?;
        let (g, _) = self.init.1.wait_timeout_while(g, t, |v| v.is_none()).ok()?;
        *g
    }
}

impl Shared {
    fn attr(&self, ino: u64) -> Option<Attr> {
        let (mode, nlink, size) = match ino {
            ROOT_INO => (libc::S_IFDIR | 0o755, 2, 0),
            FILE_INO if self.read_only => (libc::S_IFREG | 0o400, 1, self.size),
            FILE_INO => (libc::S_IFREG | 0o600, 1, self.size),
            _ => return None,
        };
        Some(Attr {
            ino,
            size,
            time: self.time,
            mode,
            nlink,
            uid: self.uid,
            gid: self.gid,
        })
    }
}

/// A mounted FUSE server.
pub struct FuseServer {
    mount_dir: PathBuf,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    live: Arc<AtomicUsize>,
    /// Whether requests come over io_uring (set once INIT is answered).
    uring: std::sync::atomic::AtomicBool,
    shared: Arc<Shared>,
}

nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);

fn open_dev() -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(|e| Error::io("unable to open /dev/fuse (is the fuse module loaded?)", e))
}

/// A new `/dev/fuse` descriptor attached to the session of `session`.
fn clone_dev(session: i32) -> Result<File> {
    let f = open_dev()?;
    let mut s = session as u32;
    // SAFETY: both descriptors are open /dev/fuse files (`session` is kept open by the
    // caller); the ioctl reads one u32 (the session's fd) from `s`, which lives across
    // the call.
    unsafe { fuse_dev_ioc_clone(f.as_raw_fd(), &mut s) }
        .map_err(|e| Error::io("unable to clone the /dev/fuse descriptor", e.into()))?;
    Ok(f)
}

impl FuseServer {
    /// Mount `export` as `mount_dir/disk` (creating `mount_dir`) and start `threads`
    /// workers (on io_uring queues when `uring` allows and the kernel offers it).
    /// Refuses a directory that is already a mount point, and `UringMode::On` when the
    /// kernel does not offer FUSE over io_uring.
    pub fn mount(
        export: Arc<dyn Export>,
        mount_dir: &Path,
        threads: usize,
        uring: UringMode,
        name: &str,
    ) -> Result<Arc<FuseServer>> {
        let threads = threads.clamp(1, MAX_THREADS);
        let offered = kernel_offers_uring();
        if uring == UringMode::On && !offered {
            return Err(cowsnap_core::err!(
                Unsupported,
                "unable to serve FUSE over io_uring (--fuse-uring on): the kernel does not \
                 offer it ({ENABLE_URING_PARAM} is not Y; a kernel with \
                 CONFIG_FUSE_IO_URING, and as root: echo Y > {ENABLE_URING_PARAM})"
            ));
        }
        let want_uring = offered && uring != UringMode::Off;
        if is_mounted(mount_dir) {
            return Err(cowsnap_core::err!(
                Busy,
                "unable to mount {}: something is mounted there already (a FUSE mount left \
                 by a daemon that died? cowsnapctl detach NAME --force, or umount it)",
                mount_dir.display()
            ));
        }
        std::fs::create_dir_all(mount_dir)
            .map_err(|e| Error::io(format!("unable to create {}", mount_dir.display()), e))?;
        let read_only = export.caps().read_only;
        let shared = Arc::new(Shared {
            size: export.size(),
            export,
            read_only,
            time: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            want_uring,
            init: (Mutex::new(None), Condvar::new()),
            served_dev: Default::default(),
            served_uring: Default::default(),
        });
        let dev = open_dev()?;
        let opts = format!(
            "fd={},rootmode=40000,user_id={},group_id={},allow_other,default_permissions",
            dev.as_raw_fd(),
            shared.uid,
            shared.gid
        );
        use nix::mount::MsFlags;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(
            Some(format!("cowsnap:{name}").as_str()),
            mount_dir,
            Some("fuse.cowsnap"),
            flags,
            Some(opts.as_str()),
        )
        .map_err(|e| {
            Error::io(
                format!("unable to mount FUSE on {}", mount_dir.display()),
                e.into(),
            )
        })?;
        let server = Arc::new(FuseServer {
            mount_dir: mount_dir.to_path_buf(),
            workers: Mutex::new(Vec::new()),
            live: Arc::new(AtomicUsize::new(0)),
            uring: std::sync::atomic::AtomicBool::new(false),
            shared: shared.clone(),
        });
        // With io_uring, the /dev/fuse readers only see INIT, FORGET, INTERRUPT and
        // what comes before the queues are registered: one is enough.
        let plain = if want_uring { 1 } else { threads };
        let dev_raw = dev.as_raw_fd();
        let started = (|| -> Result<()> {
            server.spawn_plain(&shared, Some(dev), dev_raw, plain, 0)?;
            if !want_uring {
                return Ok(());
            }
            match shared.wait_init(Duration::from_secs(10)) {
                Some(true) => match server.spawn_uring(&shared, dev_raw, threads) {
                    Ok(()) => {
                        server.uring.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                    // Until every queue has an entry, the kernel sends everything
                    // over /dev/fuse: plain workers serve it all.
                    Err(e) if uring == UringMode::Auto => {
                        log::warn!("FUSE: {e}; serving over /dev/fuse");
                        server.spawn_plain(&shared, None, dev_raw, threads - plain, plain)
                    }
                    Err(e) => Err(e),
                },
                Some(false) if uring == UringMode::On => Err(cowsnap_core::err!(
                    Unsupported,
                    "unable to serve FUSE over io_uring (--fuse-uring on): the kernel did \
                     not offer it at INIT"
                )),
                Some(false) => {
                    log::info!("FUSE: io_uring not offered at INIT; plain /dev/fuse");
                    server.spawn_plain(&shared, None, dev_raw, threads - plain, plain)
                }
                None => Err(cowsnap_core::err!(
                    Io,
                    "unable to mount FUSE on {}: the kernel sent no INIT within 10 s",
                    mount_dir.display()
                )),
            }
        })();
        if let Err(e) = started {
            server.stop();
            return Err(e);
        }
        log::info!(
            "FUSE: {} served at {}/{FILE_NAME} ({threads} workers, {})",
            name,
            mount_dir.display(),
            if server.uses_uring() {
                "io_uring"
            } else {
                "/dev/fuse"
            }
        );
        Ok(server)
    }

    /// Whether requests come over io_uring.
    pub fn uses_uring(&self) -> bool {
        self.uring.load(Ordering::SeqCst)
    }

    /// Start `n` `/dev/fuse` readers (the first on `first` if given, the others on
    /// clones of `session`), named from `base`.
    fn spawn_plain(
        &self,
        shared: &Arc<Shared>,
        first: Option<File>,
        session: i32,
        n: usize,
        base: usize,
    ) -> Result<()> {
        let mut fds: Vec<File> = first.into_iter().collect();
        while fds.len() < n {
            fds.push(clone_dev(session)?);
        }
        for (i, f) in fds.into_iter().enumerate() {
            let sh = shared.clone();
            self.spawn(format!("fuse-{}", base + i), move || worker(&sh, f))?;
        }
        Ok(())
    }

    /// Start the io_uring queue threads on a clone of `session` (all rings are
    /// created before the first thread starts).
    fn spawn_uring(&self, shared: &Arc<Shared>, session: i32, threads: usize) -> Result<()> {
        let queues = uring::possible_cpus()?;
        let rings = uring::plan(queues, threads)
            .into_iter()
            .map(uring::QueueThread::new)
            .collect::<Result<Vec<_>>>()?;
        let fd = Arc::new(clone_dev(session)?);
        for (i, ring) in rings.into_iter().enumerate() {
            let sh = shared.clone();
            let fd = fd.clone();
            self.spawn(format!("fuse-uring-{i}"), move || ring.run(&sh, &fd))?;
        }
        Ok(())
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let mut ws = self
            .workers
            .lock()
            .map_err(|_| cowsnap_core::err!(Io, "unable to start FUSE workers: poisoned"))?;
        let live = self.live.clone();
        live.fetch_add(1, Ordering::SeqCst);
        let h = std::thread::Builder::new().name(name).spawn(move || {
            f();
            live.fetch_sub(1, Ordering::SeqCst);
        });
        match h {
            Ok(h) => {
                ws.push(h);
                Ok(())
            }
            Err(e) => {
                self.live.fetch_sub(1, Ordering::SeqCst);
                Err(Error::io("unable to start a FUSE worker", e))
            }
        }
    }

    /// The file's path.
    pub fn file(&self) -> PathBuf {
        self.mount_dir.join(FILE_NAME)
    }

    /// Workers still serving (0 once the connection is gone).
    pub fn live_workers(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Detach loop devices on the file, unmount (lazily if busy), wait up to 5 s for
    /// the workers, remove the mount directory. Idempotent.
    pub fn stop(&self) {
        let file = self.file();
        for lo in loops_on(&file) {
            match std::process::Command::new("losetup")
                .arg("-d")
                .arg(&lo)
                .stdin(std::process::Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => log::info!("FUSE: detached {lo}"),
                Ok(o) => log::warn!(
                    "FUSE: unable to detach {lo}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => log::warn!("FUSE: unable to run losetup -d {lo}: {e}"),
            }
        }
        if is_mounted(&self.mount_dir) {
            // losetup -d lets go asynchronously: retry a busy unmount for a moment.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match nix::mount::umount2(&self.mount_dir, nix::mount::MntFlags::empty()) {
                    Ok(()) => {
                        log::info!("FUSE: unmounted {}", self.mount_dir.display());
                        break;
                    }
                    Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        log::warn!(
                            "FUSE: unable to unmount {} ({e}); unmounting lazily: users of \
                             the file get errors once this daemon exits",
                            self.mount_dir.display()
                        );
                        let _ =
                            nix::mount::umount2(&self.mount_dir, nix::mount::MntFlags::MNT_DETACH);
                        break;
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.live_workers() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(mut ws) = self.workers.lock() {
            if self.live_workers() == 0 && !ws.is_empty() {
                for h in ws.drain(..) {
                    let _ = h.join();
                }
                log::info!(
                    "FUSE: requests answered: {} over io_uring, {} over /dev/fuse",
                    self.shared.served_uring.load(Ordering::Relaxed),
                    self.shared.served_dev.load(Ordering::Relaxed)
                );
            }
        }
        let _ = std::fs::remove_dir(&self.mount_dir);
    }
}

/// Whether `dir` is a mount point (by /proc/self/mountinfo).
fn is_mounted(dir: &Path) -> bool {
    let d = dir.to_string_lossy();
    cowsnap_core::mountinfo::read()
        .map(|ms| ms.iter().any(|m| m.mount_point == d))
        .unwrap_or(false)
}

/// Loop devices whose backing file is `file` (`/sys/block/loopN/loop/backing_file`).
pub fn loops_on(file: &Path) -> Vec<String> {
    let want = file.to_string_lossy();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with("loop") {
                continue;
            }
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.trim() == want {
                    out.push(format!("/dev/{n}"));
                }
            }
        }
    }
    out
}

/// One worker: read a request, answer it, until the connection ends.
fn worker(sh: &Shared, dev: File) {
    let mut served = 0u64;
    serve_dev(sh, dev, &mut served);
    sh.served_dev.fetch_add(served, Ordering::Relaxed);
}

fn serve_dev(sh: &Shared, mut dev: File, served: &mut u64) {
    let mut req = vec![0u8; MAX_IO + 4096];
    let mut rep: Vec<u8> = Vec::with_capacity(OUT_HEADER + MAX_IO);
    loop {
        let n = match dev.read(&mut req) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                // interrupted, or a request aborted while being read: read again
                Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
                // unmounted or aborted
                Some(libc::ENODEV) => return,
                _ => {
                    log::error!("FUSE: unable to read a request: {e}");
                    return;
                }
            },
        };
        let Some(h) = InHeader::parse(&req[..n]) else {
            log::error!("FUSE: a malformed request of {n} bytes; stopping this worker");
            return;
        };
        *served += 1;
        let (arg, data) = abi::split_body(h.opcode, &req[IN_HEADER..n]);
        rep.clear();
        rep.resize(OUT_HEADER, 0);
        let err = match handle(sh, &h, arg, data, &mut rep) {
            Handled::Reply => 0,
            Handled::Error(e) => {
                rep.truncate(OUT_HEADER);
                -e
            }
            Handled::NoReply => continue,
            Handled::Destroy => {
                rep.truncate(OUT_HEADER);
                abi::out_header(h.unique, 0, 0, &mut rep);
                let _ = dev.write(&rep);
                return;
            }
        };
        let body_len = rep.len() - OUT_HEADER;
        abi::out_header(h.unique, err, body_len, &mut rep);
        let written = dev.write(&rep);
        if h.opcode == op::INIT {
            // the kernel has taken the reply (or refused it): the io_uring queues
            // may register now
            sh.init_done(err == 0 && written.is_ok() && init_granted_uring(&rep));
        }
        if let Err(e) = written {
            match e.raw_os_error() {
                // the request was interrupted or the connection aborted meanwhile
                Some(libc::ENOENT) => {}
                Some(libc::ENODEV) => return,
                _ => log::warn!("FUSE: unable to reply to request {}: {e}", h.opcode),
            }
        }
    }
}

/// Whether an INIT reply (header and `fuse_init_out`) grants FUSE over io_uring.
fn init_granted_uring(rep: &[u8]) -> bool {
    let b = &rep[OUT_HEADER.min(rep.len())..];
    let word = |o: usize| {
        b.get(o..o + 4)
            .and_then(|x| x.try_into().ok())
            .map(u32::from_ne_bytes)
            .unwrap_or(0)
    };
    word(12) & abi::init::INIT_EXT != 0 && word(32) & abi::init::OVER_IO_URING_FLAGS2 != 0
}

enum Handled {
    Reply,
    Error(i32),
    NoReply,
    Destroy,
}

fn errno_of(e: &Error, what: &str) -> Handled {
    log::warn!("FUSE: {what}: {e}");
    Handled::Error(e.errno())
}

/// What a READ asks for, within the file and `room`: (offset, bytes).
fn read_span(
    sh: &Shared,
    h: &InHeader,
    arg: &[u8],
    room: usize,
) -> std::result::Result<(u64, usize), i32> {
    let Some((off, size)) = abi::read_in(arg) else {
        return Err(libc::EINVAL);
    };
    if h.nodeid != FILE_INO {
        return Err(libc::EISDIR);
    }
    let n = (size as u64)
        .min(sh.size.saturating_sub(off))
        .min(room.min(MAX_IO) as u64) as usize;
    Ok((off, n))
}

/// Answer a READ into `dst` (the reply's payload): the bytes read, or an errno.
fn read_into(
    sh: &Shared,
    h: &InHeader,
    arg: &[u8],
    dst: &mut [u8],
) -> std::result::Result<usize, i32> {
    let (off, n) = read_span(sh, h, arg, dst.len())?;
    if n > 0 {
        if let Err(e) = sh.export.read(off, &mut dst[..n]) {
            log::warn!("FUSE: read: {e}");
            return Err(e.errno());
        }
    }
    Ok(n)
}

/// Answer one request: `arg` is the op's header (the kernel's first argument), `data`
/// what follows it (LOOKUP's name, WRITE's data); the reply's body is appended to
/// `rep` (which holds the out header's room).
fn handle(sh: &Shared, h: &InHeader, arg: &[u8], data: &[u8], rep: &mut Vec<u8>) -> Handled {
    use Handled::*;
    let inval = Error(libc::EINVAL);
    match h.opcode {
        op::INIT => {
            let Some(i) = abi::InitIn::parse(arg) else {
                return inval;
            };
            if i.major < abi::KERNEL_VERSION {
                log::error!("FUSE: kernel protocol {}.{} is too old", i.major, i.minor);
                return Error(libc::EPROTO);
            }
            let mut want = abi::init::ASYNC_READ
                | abi::init::BIG_WRITES
                | abi::init::ASYNC_DIO
                | abi::init::PARALLEL_DIROPS
                | abi::init::MAX_PAGES;
            // FUSE over io_uring: protocol 7.42 and FUSE_OVER_IO_URING in flags2,
            // only when the kernel offered it (it does when enable_uring is Y).
            let uring = sh.want_uring
                && i.major == abi::KERNEL_VERSION
                && i.minor >= abi::URING_MINOR
                && i.flags & abi::init::INIT_EXT != 0
                && i.flags2 & abi::init::OVER_IO_URING_FLAGS2 != 0;
            if uring {
                want |= abi::init::INIT_EXT;
            }
            let top = if uring {
                abi::URING_MINOR
            } else {
                abi::KERNEL_MINOR
            };
            abi::InitOut {
                major: abi::KERNEL_VERSION,
                minor: if i.major > abi::KERNEL_VERSION {
                    top
                } else {
                    i.minor.min(top)
                },
                max_readahead: i.max_readahead,
                flags: i.flags & want,
                max_background: 128,
                congestion_threshold: 96,
                max_write: MAX_IO as u32,
                time_gran: 1_000_000_000,
                max_pages: (MAX_IO / 4096) as u16,
                flags2: if uring {
                    abi::init::OVER_IO_URING_FLAGS2
                } else {
                    0
                },
            }
            .encode(rep);
            Reply
        }
        op::LOOKUP => {
            if h.nodeid == ROOT_INO && abi::name(data) == FILE_NAME.as_bytes() {
                if let Some(a) = sh.attr(FILE_INO) {
                    abi::entry_out(&a, VALID_SECS, rep);
                    return Reply;
                }
            }
            Error(libc::ENOENT)
        }
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT => NoReply,
        op::GETATTR => match sh.attr(h.nodeid) {
            Some(a) => {
                abi::attr_out(&a, VALID_SECS, rep);
                Reply
            }
            None => Error(libc::ENOENT),
        },
        op::SETATTR => {
            let Some((valid, size)) = abi::setattr_in(arg) else {
                return inval;
            };
            let Some(a) = sh.attr(h.nodeid) else {
                return Error(libc::ENOENT);
            };
            if valid & (abi::FATTR_MODE | abi::FATTR_UID | abi::FATTR_GID) != 0
                || (valid & abi::FATTR_SIZE != 0 && (h.nodeid != FILE_INO || size != sh.size))
            {
                return Error(libc::EPERM);
            }
            // times: accepted and not kept (they are the mount's)
            abi::attr_out(&a, VALID_SECS, rep);
            Reply
        }
        op::OPEN => {
            let Some(flags) = abi::open_flags(arg) else {
                return inval;
            };
            match h.nodeid {
                FILE_INO => {}
                ROOT_INO => return Error(libc::EISDIR),
                _ => return Error(libc::ENOENT),
            }
            if sh.read_only && flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                return Error(libc::EROFS);
            }
            abi::open_out(
                abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES,
                rep,
            );
            Reply
        }
        op::READ => {
            let n = match read_span(sh, h, arg, MAX_IO) {
                Ok((_, n)) => n,
                Err(e) => return Error(e),
            };
            rep.resize(OUT_HEADER + n, 0);
            match read_into(sh, h, arg, &mut rep[OUT_HEADER..]) {
                Ok(_) => Reply,
                Err(e) => Error(e),
            }
        }
        op::WRITE => {
            let Some((off, flags, data)) = abi::write_in(arg, data) else {
                return inval;
            };
            if h.nodeid != FILE_INO {
                return Error(libc::EISDIR);
            }
            if sh.read_only {
                return Error(libc::EROFS);
            }
            if off >= sh.size && !data.is_empty() {
                return Error(libc::ENOSPC);
            }
            let n = (data.len() as u64).min(sh.size - off) as usize;
            let fua = flags & (libc::O_DSYNC | libc::O_SYNC) as u32 != 0;
            if n > 0 {
                if let Err(e) = sh.export.write(off, &data[..n], fua) {
                    return errno_of(&e, "write");
                }
            }
            abi::write_out(n as u32, rep);
            Reply
        }
        op::STATFS => {
            abi::statfs_out(sh.size, rep);
            Reply
        }
        op::RELEASE | op::RELEASEDIR | op::ACCESS | op::FSYNCDIR => Reply,
        op::FSYNC | op::FLUSH => {
            if !sh.read_only {
                if let Err(e) = sh.export.flush() {
                    return errno_of(&e, "flush");
                }
            }
            Reply
        }
        op::OPENDIR => {
            if h.nodeid != ROOT_INO {
                return Error(libc::ENOTDIR);
            }
            abi::open_out(0, rep);
            Reply
        }
        op::READDIR => {
            let Some((off, size)) = abi::read_in(arg) else {
                return inval;
            };
            let room = (size as usize).min(64 * 1024);
            let entries: [(u64, &[u8], u32); 3] = [
                (ROOT_INO, b".", libc::DT_DIR as u32),
                (ROOT_INO, b"..", libc::DT_DIR as u32),
                (FILE_INO, FILE_NAME.as_bytes(), libc::DT_REG as u32),
            ];
            for (i, (ino, name, kind)) in entries.iter().enumerate().skip(off as usize) {
                let used = rep.len() - OUT_HEADER;
                if !abi::dirent(*ino, i as u64 + 1, *kind, name, room - used, rep) {
                    break;
                }
            }
            Reply
        }
        op::FALLOCATE => {
            let Some((off, len, mode)) = abi::fallocate_in(arg) else {
                return inval;
            };
            if h.nodeid != FILE_INO {
                return Error(libc::EISDIR);
            }
            let end = off.checked_add(len);
            let inside = end.is_some_and(|e| e <= sh.size);
            if mode
                & !(abi::FALLOC_FL_KEEP_SIZE
                    | abi::FALLOC_FL_PUNCH_HOLE
                    | abi::FALLOC_FL_ZERO_RANGE)
                != 0
            {
                return Error(libc::EOPNOTSUPP);
            }
            let punch = mode & abi::FALLOC_FL_PUNCH_HOLE != 0;
            let zero = mode & abi::FALLOC_FL_ZERO_RANGE != 0;
            if !punch && !zero {
                // allocation: every byte exists already; growing is refused
                return if inside { Reply } else { Error(libc::EFBIG) };
            }
            if sh.read_only {
                return Error(libc::EROFS);
            }
            if !sh.export.caps().zeroes {
                return Error(libc::EOPNOTSUPP);
            }
            if punch && mode & abi::FALLOC_FL_KEEP_SIZE == 0 {
                return inval;
            }
            // Past the end there is nothing to zero.
            let len = len.min(sh.size.saturating_sub(off));
            if len == 0 {
                return Reply;
            }
            let flags = ZeroFlags {
                no_hole: zero,
                fast: false,
                fua: false,
            };
            match sh.export.zero(off, len, flags) {
                Ok(()) => Reply,
                Err(e) => errno_of(&e, "fallocate"),
            }
        }
        op::DESTROY => Destroy,
        _ => Error(libc::ENOSYS),
    }
}
