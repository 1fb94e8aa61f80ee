//! Where a disk's files live, and how disk names are made.
//!
//! One daemon serves one disk, named NAME. Its files:
//!
//! | path | what |
//! |---|---|
//! | `RUN_DIR/NAME.nbd` | NBD unix socket (0600) |
//! | `RUN_DIR/NAME.ctl` | control socket, JSON lines (0600) |
//! | `RUN_DIR/NAME.pid` | daemon pid |
//! | `RUN_DIR/NAME.lock` | held (flock) by the daemon for its life; see [`crate::name_lock`] |
//! | `RUN_DIR/NAME.attach.json` | how `cowsnapctl attach` exposed the disk |
//! | `RUN_DIR/NAME.origin.json` | the daemon's origin and its identity (`attached::OriginRecord`) |
//! | `RUN_DIR/NAME.fuse/` | nbdfuse mount point (`--via fuse`) |
//! | `STATE_DIR/NAME/` | the disk's state (`cowsnap_core::disk_state`): `identity.json`, `changelog.bin`, `origin.seal`, `fill.state`, `fill.origin` |
//! | `STATE_DIR/NAME.log` | daemon log when started by `cowsnapctl` |
//!
//! RUN_DIR defaults to `/run/cowsnap` (`COWSNAP_RUN_DIR`), mode 0700; STATE_DIR to
//! `/var/lib/cowsnap` (`COWSNAP_STATE_DIR`).

use std::path::{Path, PathBuf};

/// Default run directory (sockets, pid files, attach records).
pub const DEFAULT_RUN_DIR: &str = "/run/cowsnap";
/// Default state directory (change logs, daemon logs).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cowsnap";
/// Environment variable overriding the run directory.
pub const ENV_RUN_DIR: &str = "COWSNAP_RUN_DIR";
/// Environment variable overriding the state directory.
pub const ENV_STATE_DIR: &str = "COWSNAP_STATE_DIR";
/// Longest disk name.
pub const MAX_NAME_LEN: usize = 64;

/// The files of one disk.
#[derive(Debug, Clone)]
pub struct DiskPaths {
    /// Disk name.
    pub name: String,
    /// Run directory.
    pub run_dir: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
}

impl DiskPaths {
    /// Paths of disk `name` under the given directories.
    pub fn new(name: &str, run_dir: &Path, state_dir: &Path) -> Self {
        DiskPaths {
            name: name.to_string(),
            run_dir: run_dir.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
        }
    }
    fn run(&self, suffix: &str) -> PathBuf {
        self.run_dir.join(format!("{}{suffix}", self.name))
    }
    /// NBD unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        self.run(".nbd")
    }
    /// Control socket.
    pub fn ctl_socket(&self) -> PathBuf {
        self.run(".ctl")
    }
    /// Pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.run(".pid")
    }
    /// Name lock, held by the daemon for its life ([`crate::name_lock`]).
    pub fn lock_file(&self) -> PathBuf {
        self.run(".lock")
    }
    /// Attach record.
    pub fn attach_record(&self) -> PathBuf {
        self.run(".attach.json")
    }
    /// nbdfuse mount point.
    pub fn fuse_dir(&self) -> PathBuf {
        self.run(".fuse")
    }
    /// The id N of the daemon's ublk device `/dev/ublkbN` (`--ublk`).
    pub fn ublk_file(&self) -> PathBuf {
        self.run(".ublk")
    }
    /// nbdfuse pid file.
    pub fn fuse_pid_file(&self) -> PathBuf {
        self.run(".fuse.pid")
    }
    /// The disk's own state directory: change log (`changelog.bin`), identity
    /// (`identity.json`, lineage), live-restore fill state (`fill.state`) and, while
    /// no daemon serves it, the origin seal (`origin.seal`).
    pub fn disk_state_dir(&self) -> PathBuf {
        self.state_dir.join(&self.name)
    }
    /// Live-restore fill state.
    pub fn fill_state(&self) -> PathBuf {
        self.disk_state_dir()
            .join(cowsnap_core::disk_state::FILL_STATE_FILE)
    }
    /// Daemon log written when `cowsnapctl` starts the daemon.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join(format!("{}.log", self.name))
    }
    /// The NBD URI of the disk's export.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.name,
            self.nbd_socket().display()
        )
    }
}

/// The path in a container spec: `file:PATH:SIZE` or `dev:PATH` (`ram:` has none).
pub fn container_path(spec: &str) -> Option<&str> {
    match spec.split_once(':')? {
        ("file", rest) => rest.rsplit_once(':').map(|(p, _)| p),
        ("dev", p) => Some(p),
        _ => None,
    }
    .filter(|p| !p.is_empty())
}

/// The path in a backup target spec: `file:PATH`, `dev:PATH` or `repo:DIR`; none for
/// `repo:s3://…` (an object store, no local path).
pub fn target_path(spec: &str) -> Option<&str> {
    match spec.split_once(':')? {
        ("repo", p) if p.starts_with(cowsnap_core::repo::object::SCHEME) => None,
        ("file" | "dev" | "repo", p) if !p.is_empty() => Some(p),
        _ => None,
    }
}

/// A repository spec `repo:DIR` or `repo:DIR@GEN` → (DIR, GEN). The split is at the
/// last `@` with something on both sides: `repo:X@` names the directory `X@` and no
/// generation (the newest), as does `repo:@X` the directory `@X`.
pub fn parse_repo_spec(spec: &str) -> cowsnap_core::Result<(PathBuf, Option<String>)> {
    let rest = spec.strip_prefix("repo:").ok_or_else(|| {
        cowsnap_core::err!(
            InvalidInput,
            "invalid repository {spec:?}: expected repo:DIR or repo:DIR@GEN"
        )
    })?;
    if rest.is_empty() {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "invalid repository {spec:?}: empty directory"
        ));
    }
    Ok(match rest.rsplit_once('@') {
        Some((d, g)) if !g.is_empty() && !d.is_empty() => (PathBuf::from(d), Some(g.to_string())),
        _ => (PathBuf::from(rest), None),
    })
}

/// A container spec with its path made absolute against this process's working
/// directory (the daemon works in `/`); specs without a path come back unchanged.
pub fn absolute_container(spec: &str) -> std::io::Result<String> {
    let Some(p) = container_path(spec) else {
        return Ok(spec.to_string());
    };
    let abs = std::path::absolute(p)?;
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let tail = &rest[p.len()..];
    Ok(format!("{kind}:{}{tail}", abs.display()))
}

/// A disk must hold at least one 512-byte sector and a whole number of them: a block
/// device made of it (loop, nbd) would hide a partial last sector.
pub fn check_disk_size(size: u64) -> cowsnap_core::Result<()> {
    if size == 0 {
        return Err(cowsnap_core::err!(InvalidInput, "it is empty (0 bytes)"));
    }
    if !size.is_multiple_of(512) {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "its size ({size} bytes) is not a multiple of 512: a block device of it would \
             hide the last {} bytes; grow it to {} bytes (truncate -s) or shrink it",
            size % 512,
            size.div_ceil(512) * 512
        ));
    }
    Ok(())
}

/// Check a disk name: 1..=64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> cowsnap_core::Result<()> {
    if name.is_empty() {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "a disk name must not be empty"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "disk name {name:?} is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "disk name {name:?} must not start with '.' or '-'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(cowsnap_core::err!(
            InvalidInput,
            "disk name {name:?} contains {c:?} (allowed: letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// A disk name derived from a device or file path: its base name with every other
/// character replaced by `_` (`/dev/sdb` → `sdb`, `/srv/my disk.img` → `my_disk.img`).
pub fn derive_name(path: &Path) -> String {
    let base = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = s.trim_start_matches(['.', '-']);
    s = trimmed.to_string();
    s.truncate(MAX_NAME_LEN);
    if s.is_empty() {
        s = "disk".to_string();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_paths() {
        assert_eq!(container_path("file:/a:b/c.cow:64M"), Some("/a:b/c.cow"));
        assert_eq!(container_path("dev:/dev/sdc1"), Some("/dev/sdc1"));
        assert_eq!(container_path("ram:64M"), None);
        assert_eq!(container_path("file::64M"), None);
        assert_eq!(target_path("repo:r"), Some("r"));
        assert_eq!(target_path("repo:s3://bkt/p"), None);
        assert_eq!(target_path("file:"), None);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute_container("file:x.cow:1G").unwrap(),
            format!("file:{}:1G", cwd.join("x.cow").display())
        );
        assert_eq!(absolute_container("dev:/dev/x").unwrap(), "dev:/dev/x");
        assert_eq!(absolute_container("ram:1G").unwrap(), "ram:1G");
    }

    #[test]
    fn repo_specs() {
        let p = |s: &str| parse_repo_spec(s).unwrap();
        assert_eq!(p("repo:/r"), (PathBuf::from("/r"), None));
        assert_eq!(p("repo:/r@G1"), (PathBuf::from("/r"), Some("G1".into())));
        assert_eq!(p("repo:/a@b@G"), (PathBuf::from("/a@b"), Some("G".into())));
        // Nothing after the `@`: a directory name, no generation.
        assert_eq!(p("repo:X@"), (PathBuf::from("X@"), None));
        assert_eq!(p("repo:@X"), (PathBuf::from("@X"), None));
        assert!(parse_repo_spec("repo:").is_err());
        assert!(parse_repo_spec("file:/x")
            .unwrap_err()
            .to_string()
            .contains("expected repo:DIR"));
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(derive_name(Path::new("/dev/sdb")), "sdb");
        assert_eq!(derive_name(Path::new("/dev/mapper/vg0-data")), "vg0-data");
        assert_eq!(derive_name(Path::new("/srv/my disk.img")), "my_disk.img");
        assert_eq!(derive_name(Path::new("/tmp/.hidden")), "hidden");
        assert_eq!(derive_name(Path::new("/tmp/ä.img")), "_.img");
        assert_eq!(derive_name(Path::new("/")), "disk");
        let long = format!("/x/{}", "a".repeat(100));
        assert_eq!(derive_name(Path::new(&long)).len(), MAX_NAME_LEN);
        for p in ["/dev/sdb", "/srv/my disk.img", "/tmp/.hidden", "/", "/x/-y"] {
            assert!(validate_name(&derive_name(Path::new(p))).is_ok(), "{p}");
        }
    }

    #[test]
    fn name_validation() {
        assert!(validate_name("sdb").is_ok());
        assert!(validate_name("disk-1.img_2").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(".x").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn paths_and_uri() {
        let p = DiskPaths::new("d1", Path::new("/run/x"), Path::new("/var/y"));
        assert_eq!(p.nbd_socket(), Path::new("/run/x/d1.nbd"));
        assert_eq!(p.ctl_socket(), Path::new("/run/x/d1.ctl"));
        assert_eq!(p.disk_state_dir(), Path::new("/var/y/d1"));
        assert_eq!(p.fill_state(), Path::new("/var/y/d1/fill.state"));
        assert_eq!(p.uri(), "nbd+unix:///d1?socket=/run/x/d1.nbd");
    }
}
