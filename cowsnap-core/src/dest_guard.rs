//! Destinations that are somebody's live data: the one check every command that writes
//! somewhere runs first (backup targets, containers, offline and live restore
//! destinations).
//!
//! # Design notes
//!
//! The check works on identities, never on path strings:
//! - a regular file is `(st_dev, st_ino)` (a symlink, another spelling or a hard link
//!   is the same file); a block device is its `st_rdev` (any device node for it);
//!   a path that does not exist yet is its canonical parent plus its name.
//! - *Equality*: a loop device is the same storage as its backing file or device (read
//!   from the loop device with `LOOP_GET_STATUS64`: device and inode, so a deleted or
//!   unreachable backing path still counts; the `backing_file` path in sysfs as a
//!   fallback). Two loop devices on one file are the same storage too.
//! - *Containment*: a partition is part of the disk that holds it
//!   (`/sys/dev/block/M:m/partition`, the parent directory's `dev`); a device-mapper or
//!   md device is part of each of its `slaves`.
//! - Two things overlap when one's equality class meets the other's *upward closure*
//!   (itself, what contains it, what equals those, transitively): a disk and its
//!   partitions overlap, a loop device and its backing file overlap, a partition of a
//!   loop device and the loop's backing file overlap, but two partitions of one disk
//!   do not.
//!
//! A [`DestGuard`] holds the protected things with the reason each is protected
//! (the origin of an attached disk, a mounted block device, swap, this backup's own
//! container); [`DestGuard::check`] refuses a destination that overlaps any of them,
//! and one that another program holds exclusively (a block device opened `O_EXCL`,
//! which includes mounted ones and every cowsnap origin; a regular file under an
//! exclusive `flock`, which every cowsnap daemon holds on a file origin). The check
//! opens nothing for writing. Callers run it after every other validation and right
//! before they open the destination; the window between the two is a race this check
//! does not close (the daemon's own `O_EXCL`/`flock` on its origin stays the last line).
//!
//! Which disks are attached is not known here (it needs the run directory and the
//! control protocol): `cowsnap_nbd::attached` fills the guard with them.

use crate::error::Result;
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// One storage object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// A regular file (or anything that is not a block device): device and inode.
    File {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
    /// A block device: `st_rdev`.
    Block(u64),
    /// A path that does not exist (canonical parent + name).
    Missing(PathBuf),
}

impl Node {
    /// The identity of `path` (following symlinks); a missing path gets its canonical
    /// spelling so that two spellings of one future file still meet.
    pub fn of(path: &Path) -> Node {
        match std::fs::metadata(path) {
            Ok(m) => Node::of_meta(&m),
            Err(_) => Node::Missing(canonical_missing(path)),
        }
    }

    fn of_meta(m: &std::fs::Metadata) -> Node {
        if m.file_type().is_block_device() {
            Node::Block(m.rdev())
        } else {
            Node::File {
                dev: m.dev(),
                ino: m.ino(),
            }
        }
    }
}

fn canonical_missing(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or(abs.clone()),
        _ => abs,
    }
}

fn major_minor(rdev: u64) -> String {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// The kernel's view of block devices and loop devices, read once per guard.
#[derive(Debug, Default, Clone)]
pub struct BlockTopology {
    /// (loop device, its backing file or device).
    loops: Vec<(Node, Node)>,
    sys_root: PathBuf,
}

// struct loop_info64 (linux/loop.h): 232 bytes.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// What a bound loop device is backed by: from `LOOP_GET_STATUS64` (device and inode)
/// on `/dev/NAME`, else from the backing file path in sysfs.
fn loop_backing(sys_dev: &Path, name: &str) -> Option<Node> {
    let dev_node = Path::new("/dev").join(name);
    if let Ok(f) = std::fs::File::open(&dev_node) {
        // SAFETY: LoopInfo64 is plain data; all-zero is a valid value.
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is valid while `f` lives; LOOP_GET_STATUS64 writes one
        // loop_info64 through the pointer, which points at a live, aligned LoopInfo64.
        let r = unsafe {
            libc::ioctl(
                f.as_raw_fd(),
                LOOP_GET_STATUS64,
                &mut info as *mut LoopInfo64,
            )
        };
        if r == 0 {
            // The backing object is a block device when its inode lives on devtmpfs
            // and names a device node; resolve the path to tell.
            let by_path = std::fs::read_to_string(sys_dev.join("loop/backing_file"))
                .ok()
                .and_then(|p| std::fs::metadata(p.trim_end()).ok());
            if let Some(m) = by_path {
                if m.dev() == info.lo_device && m.ino() == info.lo_inode {
                    return Some(Node::of_meta(&m));
                }
            }
            return Some(Node::File {
                dev: info.lo_device,
                ino: info.lo_inode,
            });
        }
    }
    let p = std::fs::read_to_string(sys_dev.join("loop/backing_file")).ok()?;
    std::fs::metadata(p.trim_end())
        .ok()
        .map(|m| Node::of_meta(&m))
}

impl BlockTopology {
    /// Read the loop devices from `/sys/block`.
    pub fn read() -> BlockTopology {
        let mut t = BlockTopology {
            loops: Vec::new(),
            sys_root: PathBuf::from("/sys"),
        };
        let Ok(rd) = std::fs::read_dir("/sys/block") else {
            return t;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let sys = e.path();
            if !sys.join("loop").is_dir() {
                continue;
            }
            let Some(rdev) = read_dev(&sys.join("dev")) else {
                continue;
            };
            if let Some(b) = loop_backing(&sys, &name) {
                t.loops.push((Node::Block(rdev), b));
            }
        }
        t
    }

    /// A topology with no devices at all (unit tests of files only).
    pub fn empty() -> BlockTopology {
        BlockTopology::default()
    }

    /// Add a loop device by hand (tests).
    pub fn add_loop(&mut self, dev: Node, backing: Node) {
        self.loops.push((dev, backing));
    }

    /// Equality class of `n`: itself, loop devices on it, what a loop device is backed
    /// by, transitively.
    pub fn equal(&self, n: &Node) -> HashSet<Node> {
        let mut out = HashSet::new();
        let mut todo = vec![n.clone()];
        while let Some(x) = todo.pop() {
            if !out.insert(x.clone()) {
                continue;
            }
            for (l, b) in &self.loops {
                if *l == x {
                    todo.push(b.clone());
                }
                if *b == x {
                    todo.push(l.clone());
                }
            }
        }
        out
    }

    /// Block devices that directly contain block device `rdev`: the disk of a
    /// partition, the slaves of a device-mapper / md device.
    fn containers(&self, rdev: u64) -> Vec<Node> {
        if self.sys_root.as_os_str().is_empty() {
            return Vec::new();
        }
        let sys = self.sys_root.join("dev/block").join(major_minor(rdev));
        let mut out = Vec::new();
        if sys.join("partition").exists() {
            if let Some(d) = std::fs::canonicalize(&sys)
                .ok()
                .and_then(|c| c.parent().map(|p| p.join("dev")))
                .and_then(|p| read_dev(&p))
            {
                out.push(Node::Block(d));
            }
        }
        if let Ok(rd) = std::fs::read_dir(sys.join("slaves")) {
            for e in rd.flatten() {
                if let Some(d) = read_dev(&e.path().join("dev")) {
                    out.push(Node::Block(d));
                }
            }
        }
        out
    }

    /// Upward closure of `n`: everything that equals it or contains it, transitively.
    pub fn up(&self, n: &Node) -> HashSet<Node> {
        let mut out = HashSet::new();
        let mut todo = vec![n.clone()];
        while let Some(x) = todo.pop() {
            if out.contains(&x) || out.len() > 4096 {
                continue;
            }
            for e in self.equal(&x) {
                if let Node::Block(r) = e {
                    todo.extend(self.containers(r));
                }
                out.insert(e);
            }
        }
        out
    }
}

fn read_dev(p: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some(libc::makedev(a.parse().ok()?, b.parse().ok()?))
}

/// How a destination meets a protected thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// The same storage.
    Same,
    /// The destination contains it (a disk holding a protected partition).
    Contains,
    /// The destination is part of it (a partition of a protected disk).
    PartOf,
}

/// How `a` meets `b`, if at all.
pub fn overlap(topo: &BlockTopology, a: &Node, b: &Node) -> Option<Overlap> {
    let ea = topo.equal(a);
    if ea.contains(b) {
        return Some(Overlap::Same);
    }
    let eb = topo.equal(b);
    if !topo.up(a).is_disjoint(&eb) {
        return Some(Overlap::PartOf);
    }
    if !topo.up(b).is_disjoint(&ea) {
        return Some(Overlap::Contains);
    }
    None
}

#[derive(Clone)]
struct Entry {
    path: PathBuf,
    node: Node,
    what: String,
}

/// The protected things, and the check against them.
#[derive(Clone)]
pub struct DestGuard {
    topo: BlockTopology,
    entries: Vec<Entry>,
    probe_exclusive: bool,
}

impl DestGuard {
    /// A guard that knows the machine's loop devices and protects every mounted block
    /// device and active swap area; add attached origins with [`DestGuard::protect`].
    pub fn new() -> DestGuard {
        let mut g = DestGuard {
            topo: BlockTopology::read(),
            entries: Vec::new(),
            probe_exclusive: true,
        };
        g.protect_mounts();
        g
    }

    /// A guard over `topo` that protects nothing yet and probes nothing (tests).
    pub fn with_topology(topo: BlockTopology) -> DestGuard {
        DestGuard {
            topo,
            entries: Vec::new(),
            probe_exclusive: false,
        }
    }

    /// Protect `path` (whatever it resolves to now), described by `what`
    /// (`the origin of attached disk "b"`).
    pub fn protect(&mut self, path: &Path, what: impl Into<String>) {
        self.entries.push(Entry {
            path: path.to_path_buf(),
            node: Node::of(path),
            what: what.into(),
        });
    }

    /// Protect a known identity (recorded earlier, e.g. by a daemon that may not answer).
    pub fn protect_node(&mut self, path: &Path, node: Node, what: impl Into<String>) {
        self.entries.push(Entry {
            path: path.to_path_buf(),
            node,
            what: what.into(),
        });
    }

    fn protect_mounts(&mut self) {
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            for (rdev, source, at) in mounted_block_devices(&mi) {
                self.protect_node(
                    Path::new(&source),
                    Node::Block(rdev),
                    format!("mounted on {at}"),
                );
            }
        }
        if let Ok(sw) = std::fs::read_to_string("/proc/swaps") {
            for l in sw.lines().skip(1) {
                if let Some(p) = l.split_whitespace().next() {
                    let p = unescape_octal(p);
                    self.protect(Path::new(&p), "in use as swap");
                }
            }
        }
    }

    /// Refuse `dest` when it is, contains or is part of anything protected, or when
    /// another program holds it exclusively. The error reads "`dest` is the origin of
    /// attached disk "b"" (the caller prefixes "unable to ...: ").
    pub fn check(&self, dest: &Path) -> Result<()> {
        let d = Node::of(dest);
        for e in &self.entries {
            let Some(how) = overlap(&self.topo, &d, &e.node) else {
                continue;
            };
            let dp = dest.display();
            let via = if e.path == dest {
                String::new()
            } else {
                format!(" ({})", e.path.display())
            };
            let why = match how {
                Overlap::Same => format!("{dp} is {}{via}", e.what),
                Overlap::Contains => {
                    format!("{dp} contains {}, which is {}", e.path.display(), e.what)
                }
                Overlap::PartOf => {
                    format!("{dp} is part of {}, which is {}", e.path.display(), e.what)
                }
            };
            return Err(crate::err!(Busy, "{why}"));
        }
        if self.probe_exclusive {
            probe_exclusive(dest)?;
        }
        Ok(())
    }
}

impl Default for DestGuard {
    fn default() -> Self {
        DestGuard::new()
    }
}

/// Refuse a block device another program opened exclusively (mounted, a cowsnap
/// origin, a device-mapper member) and a regular file under another program's
/// exclusive `flock` (a cowsnap daemon's file origin). Opens read-only; writes nothing.
pub fn probe_exclusive(dest: &Path) -> Result<()> {
    let Ok(m) = std::fs::metadata(dest) else {
        return Ok(()); // does not exist yet: nobody holds it
    };
    let dp = dest.display();
    if m.file_type().is_block_device() {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dest)
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(crate::err!(
                Busy,
                "{dp} is in use (another program holds it exclusively: mounted, served, or part of another device)"
            )),
            Err(_) => Ok(()), // the real open reports it
        }
    } else if m.is_file() {
        let Ok(f) = std::fs::File::open(dest) else {
            return Ok(());
        };
        // SAFETY: flock on a valid fd owned by `f`; released when `f` is closed.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(crate::err!(
                Busy,
                "{dp} is locked by another program (a cowsnap daemon serving it as an origin?)"
            ));
        }
        Ok(())
    } else {
        Ok(())
    }
}

/// The path a backup target spec writes to: `file:PATH` and `dev:PATH` (a repository
/// `repo:DIR` is a directory of new files, not one destination).
pub fn target_path(spec: &str) -> Option<PathBuf> {
    match spec.split_once(':') {
        Some(("file" | "dev", p)) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => None,
    }
}

/// The path a container spec writes to: `file:PATH:SIZE` and `dev:PATH`.
pub fn container_path(spec: &str) -> Option<PathBuf> {
    match spec.split_once(':') {
        Some(("file", rest)) => rest
            .rsplit_once(':')
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        Some(("dev", p)) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => None,
    }
}

pub use crate::mountinfo::unescape_octal;

/// Block devices in `mountinfo` text: (rdev, mount source, mount point). Mounts of
/// major 0 (tmpfs, FUSE, overlay, btrfs subvolume ids) are not block devices.
pub fn mounted_block_devices(mountinfo: &str) -> Vec<(u64, String, String)> {
    crate::mountinfo::parse(mountinfo)
        .into_iter()
        .filter_map(|m| {
            let rdev = m.block_rdev()?;
            let source = if m.source.is_empty() { m.dev } else { m.source };
            Some((rdev, source, m.mount_point))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn files_by_identity_not_spelling() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.img");
        touch(&a);
        let link = d.path().join("hard");
        std::fs::hard_link(&a, &link).unwrap();
        let sym = d.path().join("sym");
        std::os::unix::fs::symlink(&a, &sym).unwrap();
        let other = d.path().join("b.img");
        touch(&other);
        let mut g = DestGuard::with_topology(BlockTopology::empty());
        g.protect(&a, "the origin of attached disk \"a\"");
        for p in [
            a.clone(),
            link.clone(),
            sym.clone(),
            d.path().join("sub/../a.img"),
        ] {
            std::fs::create_dir_all(d.path().join("sub")).unwrap();
            let e = g.check(&p).unwrap_err().to_string();
            assert!(e.contains("is the origin of attached disk \"a\""), "{e}");
        }
        g.check(&other).unwrap();
        g.check(&d.path().join("new.img")).unwrap();
    }

    #[test]
    fn missing_paths_meet_by_canonical_spelling() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("x")).unwrap();
        let mut g = DestGuard::with_topology(BlockTopology::empty());
        g.protect(&d.path().join("c.img"), "the container of this backup");
        let e = g.check(&d.path().join("x/../c.img")).unwrap_err();
        assert!(e.to_string().contains("container"), "{e}");
        g.check(&d.path().join("x/c.img")).unwrap();
    }

    #[test]
    fn loops_partitions_and_siblings() {
        // Synthetic sysfs: loop 7:0 backed by file F, partitions 259:1 and 259:2 of it.
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let disk = sys.join("devices/virtual/block/loop0");
        for (p, dev) in [("", "7:0"), ("loop0p1", "259:1"), ("loop0p2", "259:2")] {
            let dir = disk.join(p);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
            if !p.is_empty() {
                std::fs::write(dir.join("partition"), "1\n").unwrap();
            }
            std::fs::create_dir_all(sys.join("dev/block")).unwrap();
            std::os::unix::fs::symlink(&dir, sys.join("dev/block").join(dev)).unwrap();
        }
        let f = Node::File { dev: 1, ino: 2 };
        let l = Node::Block(libc::makedev(7, 0));
        let l2 = Node::Block(libc::makedev(7, 9));
        let p1 = Node::Block(libc::makedev(259, 1));
        let p2 = Node::Block(libc::makedev(259, 2));
        let mut t = BlockTopology {
            loops: Vec::new(),
            sys_root: sys,
        };
        t.add_loop(l.clone(), f.clone());
        t.add_loop(l2.clone(), f.clone());
        assert_eq!(overlap(&t, &f, &l), Some(Overlap::Same));
        assert_eq!(overlap(&t, &l2, &l), Some(Overlap::Same));
        assert_eq!(overlap(&t, &p1, &l), Some(Overlap::PartOf));
        assert_eq!(overlap(&t, &l, &p1), Some(Overlap::Contains));
        assert_eq!(overlap(&t, &f, &p2), Some(Overlap::Contains));
        assert_eq!(overlap(&t, &p2, &f), Some(Overlap::PartOf));
        assert_eq!(
            overlap(&t, &p1, &p2),
            None,
            "sibling partitions are disjoint"
        );
        assert_eq!(overlap(&t, &f, &Node::File { dev: 1, ino: 3 }), None);
    }

    #[test]
    fn spec_paths() {
        assert_eq!(target_path("file:/x.img"), Some(PathBuf::from("/x.img")));
        assert_eq!(target_path("dev:/dev/sdb"), Some(PathBuf::from("/dev/sdb")));
        assert_eq!(target_path("repo:/r"), None);
        assert_eq!(target_path("file:"), None);
        assert_eq!(
            container_path("file:/a:b.cow:1G"),
            Some(PathBuf::from("/a:b.cow"))
        );
        assert_eq!(
            container_path("dev:/dev/sdc1"),
            Some(PathBuf::from("/dev/sdc1"))
        );
        assert_eq!(container_path("ram:64M"), None);
        assert_eq!(container_path("file:1G"), None);
    }

    #[test]
    fn mountinfo_block_devices() {
        let mi = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 7:3 / /mnt/my\\040disk rw,relatime shared:50 - ext4 /dev/loop3 rw
30 22 0:26 / /tmp rw - tmpfs tmpfs rw
";
        let m = mounted_block_devices(mi);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].0, libc::makedev(7, 3));
        assert_eq!(m[1].1, "/dev/loop3");
        assert_eq!(m[1].2, "/mnt/my disk");
    }

    #[test]
    fn flocked_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.img");
        touch(&a);
        probe_exclusive(&a).unwrap();
        let f = std::fs::File::open(&a).unwrap();
        // SAFETY: flock on a valid fd owned by `f`.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0);
        let e = probe_exclusive(&a).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        drop(f);
        probe_exclusive(&a).unwrap();
    }
}
