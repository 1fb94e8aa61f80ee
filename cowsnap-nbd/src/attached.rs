//! Which disks are attached: every daemon in a run directory, and what of theirs must
//! never be a destination. Feeds [`cowsnap_core::dest_guard::DestGuard`].
//!
//! A disk counts when its daemon is alive, found by any of:
//! - its control socket answers `status` (origin, default container, running backup);
//! - its origin record `RUN_DIR/NAME.origin.json` ([`OriginRecord`], written by the
//!   daemon once it holds the origin: the path and its identity, device and inode or
//!   rdev) names a pid that is alive and a daemon of that name — this needs no answer
//!   from the daemon, so a busy or hung daemon still counts;
//! - `NAME.pid` or the attach record names a live daemon of that name: its
//!   `--origin` is read from `/proc/PID/cmdline` (relative to `/proc/PID/cwd`).
//!
//! Files of a dead daemon (the pid is gone, a zombie, or another program now) do not
//! count, so leftovers never block forever. For a live disk its exposed device
//! (`/dev/nbdN`, the loop device and the nbdfuse file) is protected too: writing there
//! overwrites the disk just the same.

use crate::attach::{pid_alive, pid_zombie, AttachRecord};
use crate::control::{Client, StatusInfo};
use crate::paths::DiskPaths;
use cowsnap_core::backup::BackupParams;
use cowsnap_core::dest_guard::{container_path, target_path, DestGuard, Node};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for a daemon's `status` before relying on its files.
const STATUS_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a daemon records about its origin in `RUN_DIR/NAME.origin.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginRecord {
    /// Daemon pid.
    pub pid: u32,
    /// Origin path as served (absolute when cowsnapctl started the daemon).
    pub origin: String,
    /// Canonical origin path at start.
    pub canonical: String,
    /// Block device: its rdev; else 0.
    pub rdev: u64,
    /// Regular file: st_dev.
    pub dev: u64,
    /// Regular file: st_ino.
    pub ino: u64,
}

impl OriginRecord {
    /// The record of `origin` for this process.
    pub fn of(origin: &Path) -> std::io::Result<OriginRecord> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(origin)?;
        let blk = m.file_type().is_block_device();
        Ok(OriginRecord {
            pid: std::process::id(),
            origin: origin.display().to_string(),
            canonical: std::fs::canonicalize(origin)?.display().to_string(),
            rdev: if blk { m.rdev() } else { 0 },
            dev: if blk { 0 } else { m.dev() },
            ino: if blk { 0 } else { m.ino() },
        })
    }

    /// The recorded identity.
    pub fn node(&self) -> Node {
        if self.rdev != 0 {
            Node::Block(self.rdev)
        } else {
            Node::File {
                dev: self.dev,
                ino: self.ino,
            }
        }
    }

    /// Write atomically (temp + rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Read one; `None` when missing or unreadable.
    pub fn load(path: &Path) -> Option<OriginRecord> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// A daemon's origin record on disk, removed on drop (if it is still this process's).
pub struct OriginRecordFile(PathBuf);

impl OriginRecordFile {
    /// Write the record of `origin` for disk `paths`.
    pub fn write(paths: &DiskPaths, origin: &Path) -> std::io::Result<OriginRecordFile> {
        let p = origin_record_path(paths);
        OriginRecord::of(origin)
            .and_then(|r| r.save(&p))
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("unable to write {}: {e}", p.display()))
            })?;
        Ok(OriginRecordFile(p))
    }
}

impl Drop for OriginRecordFile {
    fn drop(&mut self) {
        if OriginRecord::load(&self.0).is_some_and(|r| r.pid == std::process::id()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Path of a disk's origin record.
pub fn origin_record_path(paths: &DiskPaths) -> PathBuf {
    paths.run_dir.join(format!("{}.origin.json", paths.name))
}

/// Disk names that have any file in `run_dir`.
pub fn names(run_dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        for suffix in [".pid", ".ctl", ".attach.json", ".origin.json", ".nbd"] {
            if let Some(n) = f.strip_suffix(suffix) {
                if crate::paths::validate_name(n).is_ok() {
                    out.insert(n.to_string());
                }
            }
        }
    }
    out
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    for (i, a) in args.iter().enumerate() {
        if a == flag {
            return args.get(i + 1).cloned();
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_string());
        }
    }
    None
}

/// `pid` is alive, not a zombie, and a daemon serving `name`.
fn daemon_of(pid: u32, name: &str) -> bool {
    pid > 0
        && pid_alive(pid as i32)
        && !pid_zombie(pid as i32)
        && arg_value(&cmdline(pid), "--name").as_deref() == Some(name)
}

/// A path as a process sees it: relative paths against its working directory.
fn resolve_for(pid: u32, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() {
        return p;
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd.join(p),
        Err(_) => p,
    }
}

/// Add everything of the disks attached under `run_dir` to `g`: origins, exposed
/// devices, default containers, running backups' targets and containers. `skip` is a
/// disk whose daemon is the caller (it adds its own).
pub fn protect_attached(g: &mut DestGuard, run_dir: &Path, skip: Option<&str>) {
    for name in names(run_dir) {
        if Some(name.as_str()) == skip {
            continue;
        }
        let paths = DiskPaths::new(&name, run_dir, Path::new("/"));
        protect_disk(g, &paths);
    }
}

fn protect_disk(g: &mut DestGuard, paths: &DiskPaths) {
    let name = &paths.name;
    let origin_what = format!("the origin of attached disk {name:?}");
    let mut live = false;
    let st: Option<StatusInfo> = Client::connect(&paths.ctl_socket(), STATUS_TIMEOUT)
        .and_then(|mut c| c.status())
        .ok()
        .filter(|s| s.name == *name);
    if let Some(st) = &st {
        live = true;
        g.protect(&resolve_for(st.pid, &st.origin), origin_what.clone());
        if let Some(p) = st.container.as_deref().and_then(container_path) {
            g.protect(
                &resolve_for(st.pid, &p.display().to_string()),
                format!("the container of attached disk {name:?}"),
            );
        }
        if let Some(b) = st.backup.as_ref().filter(|b| !b.state.is_finished()) {
            if let Some(p) = target_path(&b.target) {
                g.protect(&p, format!("the target of the running backup of {name:?}"));
            }
            if let Some(p) = container_path(&b.container) {
                g.protect(
                    &p,
                    format!("the container of the running backup of {name:?}"),
                );
            }
        }
    }
    if let Some(rec) = OriginRecord::load(&origin_record_path(paths)) {
        if daemon_of(rec.pid, name) {
            live = true;
            g.protect_node(Path::new(&rec.canonical), rec.node(), origin_what.clone());
            g.protect(Path::new(&rec.canonical), origin_what.clone());
        }
    }
    let attach = AttachRecord::load(&paths.attach_record()).ok().flatten();
    let pid_file = std::fs::read_to_string(paths.pid_file())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    for pid in [pid_file, attach.as_ref().map(|r| r.pid)]
        .into_iter()
        .flatten()
    {
        if daemon_of(pid, name) {
            live = true;
            if let Some(o) = arg_value(&cmdline(pid), "--origin") {
                g.protect(&resolve_for(pid, &o), origin_what.clone());
            }
        }
    }
    if !live {
        log::debug!("disk {name:?}: no live daemon; its leftover files are ignored");
        return;
    }
    if let Some(r) = attach {
        let what = format!("the device of attached disk {name:?}");
        for d in [r.device.as_deref(), r.loop_device.as_deref()]
            .into_iter()
            .flatten()
        {
            g.protect(Path::new(d), what.clone());
        }
        if let Some(m) = &r.fuse_mount {
            g.protect(&m.join("disk"), what.clone());
        }
    }
}

/// A guard protecting mounted block devices, swap and everything attached under
/// `run_dir` (except `skip`'s, which the caller adds).
pub fn guard(run_dir: &Path, skip: Option<&str>) -> DestGuard {
    let mut g = DestGuard::new();
    protect_attached(&mut g, run_dir, skip);
    g
}

/// Check a destination that is about to be written (a restore, a live restore's
/// destination): "unable to `action`: `dest` is the origin of attached disk "b"".
/// `skip`: the caller's own disk name, when the caller is that disk's daemon.
pub fn check_destination(
    run_dir: &Path,
    skip: Option<&str>,
    dest: &Path,
    action: &str,
) -> cowsnap_core::Result<()> {
    guard(run_dir, skip)
        .check(dest)
        .map_err(|e| e.with_context(format!("unable to {action}")))
}

/// What the backing-up disk itself contributes (known to its own daemon).
#[derive(Debug, Clone, Default)]
pub struct OwnDisk<'a> {
    /// The disk name.
    pub name: &'a str,
    /// Its origin, when the caller is its daemon (else found in the run directory).
    pub origin: Option<&'a Path>,
    /// Its default container, when known.
    pub default_container: Option<&'a str>,
}

/// Check a backup's target and container before either is opened: neither may be
/// anything protected, nor each other, nor this disk's origin or default container.
pub fn check_backup(
    run_dir: &Path,
    own: &OwnDisk<'_>,
    p: &BackupParams,
) -> cowsnap_core::Result<()> {
    let target = target_path(&p.to);
    let cspec = p.container.as_deref().or(own.default_container);
    let container = cspec.and_then(container_path);
    if target.is_none() && container.is_none() {
        return Ok(());
    }
    let skip = own.origin.map(|_| own.name);
    let mut base = guard(run_dir, skip);
    if let Some(o) = own.origin {
        base.protect(o, format!("the origin of attached disk {:?}", own.name));
    }
    if let Some(d) = own.default_container.and_then(container_path) {
        if container.as_ref() != Some(&d) {
            base.protect(&d, format!("the container of attached disk {:?}", own.name));
        }
    }
    if let Some(t) = &target {
        let mut g = base.clone();
        if let Some(c) = &container {
            g.protect(c, "the container of this backup");
        }
        g.check(t).map_err(|e| {
            e.with_context(format_args!("unable to back up {:?} to {}", own.name, p.to))
        })?;
    }
    if let (Some(c), Some(spec)) = (&container, cspec) {
        let mut g = base;
        if let Some(t) = &target {
            g.protect(t, "the target of this backup");
        }
        g.check(c).map_err(|e| {
            e.with_context(format_args!(
                "unable to use container {spec} for the backup of {:?}",
                own.name
            ))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_run_dir_files() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "a.pid",
            "b.ctl",
            "c.attach.json",
            "d.origin.json",
            ".a.pid.tmp",
            "e.fuse",
            "bad name.pid",
        ] {
            std::fs::write(d.path().join(f), "").unwrap();
        }
        let n: Vec<String> = names(d.path()).into_iter().collect();
        assert_eq!(n, ["a", "b", "c", "d"]);
        assert!(names(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn command_line_values() {
        let a: Vec<String> = ["x", "--name", "d1", "--origin=/o", "--run-dir"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(arg_value(&a, "--name").as_deref(), Some("d1"));
        assert_eq!(arg_value(&a, "--origin").as_deref(), Some("/o"));
        assert_eq!(arg_value(&a, "--run-dir"), None);
        assert_eq!(arg_value(&a, "--state-dir"), None);
    }

    #[test]
    fn origin_record_roundtrip_and_liveness() {
        let d = tempfile::tempdir().unwrap();
        let origin = d.path().join("o.img");
        std::fs::write(&origin, b"data").unwrap();
        let paths = DiskPaths::new("o", d.path(), d.path());
        let mut rec = OriginRecord::of(&origin).unwrap();
        rec.save(&origin_record_path(&paths)).unwrap();
        assert_eq!(
            OriginRecord::load(&origin_record_path(&paths)),
            Some(rec.clone())
        );
        assert!(matches!(rec.node(), Node::File { .. }));
        // This test process is alive but is not a daemon named "o": the record is a
        // leftover and protects nothing; neither does a dead pid.
        let mut g = DestGuard::with_topology(Default::default());
        protect_attached(&mut g, d.path(), None);
        g.check(&origin).unwrap();
        rec.pid = u32::MAX / 2;
        rec.save(&origin_record_path(&paths)).unwrap();
        let mut g = DestGuard::with_topology(Default::default());
        protect_attached(&mut g, d.path(), None);
        g.check(&origin).unwrap();
    }

    #[test]
    fn a_backup_never_targets_its_own_container() {
        let d = tempfile::tempdir().unwrap();
        let own = OwnDisk {
            name: "x",
            origin: None,
            default_container: None,
        };
        let t = d.path().join("t.img");
        let p = BackupParams {
            to: format!("file:{}", t.display()),
            container: Some(format!("file:{}:4M", t.display())),
            ..Default::default()
        };
        let e = check_backup(d.path(), &own, &p).unwrap_err().to_string();
        assert!(e.contains("is the container of this backup"), "{e}");
        let p = BackupParams {
            to: format!("file:{}", t.display()),
            container: Some(format!("dev:{}", d.path().join("c").display())),
            ..Default::default()
        };
        check_backup(d.path(), &own, &p).unwrap();
        // The disk's default container is protected when another one is used.
        let own = OwnDisk {
            default_container: Some("dev:/nonexistent/c"),
            ..own
        };
        let p = BackupParams {
            to: "file:/nonexistent/c".into(),
            container: Some("ram:1M".into()),
            ..Default::default()
        };
        let e = check_backup(d.path(), &own, &p).unwrap_err().to_string();
        assert!(e.contains("the container of attached disk \"x\""), "{e}");
    }
}
