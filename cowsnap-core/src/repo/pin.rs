//! Pins: generations that an unfinished live restore or a running export still needs.
//!
//! A live restore fills its destination from one generation, possibly over days and
//! across daemon restarts; the half-filled destination already holds acknowledged
//! writes, so it can only ever complete from that generation. The repository lock a
//! running fill holds is not enough (a killed daemon holds nothing), so the fill
//! records a pin in the repository itself:
//!
//! ```text
//! DIR/pins/<generation>.<8 hex>.json   {"generation","disk","destination","state","host","created"}
//! ```
//!
//! written atomically (temp → fsync → rename → fsync dir) under the shared repository
//! lock before the fill's state file exists, and removed once the fill state says
//! "complete" (or when the restore is abandoned). Prune keeps every pinned generation
//! and says so. A pin whose fill state is on this host and is gone, complete, abandoned
//! or of another generation pins nothing any more: prune removes it and says so. A
//! pin file that cannot be parsed still pins the generation its name starts with.
//!
//! On an object-store repository a pin is the object `PREFIX/pins/<generation>.<8 hex>.json`
//! (one PUT, atomic), named by its URL (`s3://BUCKET/PREFIX/pins/…`) wherever a path is
//! kept; there is no lock to write it under. Instead, once the pin landed the
//! generation's metadata must still be there (else the pin is deleted again and the
//! restore refused), and every prune lists the pins again after its clock probe and
//! keeps the index and chunks of a pinned generation even if it is tombstoned (a prune
//! that had listed the pins before the pin landed may have removed it): see
//! ARCHITECTURE, "A pin and a tombstone". Exports from an object store (which need a
//! `flock` on their pin) are refused.
//!
//! An export (`kind: "export"`, a read-only NBD export of a generation) pins its
//! generation for as long as it serves it. The exporter holds a shared `flock` on its
//! pin file from before the repository lock is released until it removes the pin at a
//! clean stop. A dead exporter holds nothing, so on the same host a pin file that
//! [`stale_reason`] can lock exclusively (non-blocking) pins nothing: prune holds the
//! exclusive repository lock while it looks, and an exporter pins only under the shared
//! one, so no exporter can be between "pin written" and "pin locked" meanwhile.

use super::generation::valid_id;
use super::Repo;
use crate::error::{IoContext, Result};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Who holds a pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The pinned generation.
    pub generation: String,
    /// Name of the disk being restored.
    pub disk: String,
    /// The destination being filled.
    pub destination: String,
    /// The fill state file (`STATE/NAME/fill.state`).
    pub state: String,
    /// Host of the restoring daemon.
    pub host: String,
    /// When the restore started, RFC 3339 UTC.
    pub created: String,
    /// Who pins: a live restore (the default, also for pins written before kinds
    /// existed) or an export.
    #[serde(default)]
    pub kind: PinKind,
    /// The pinning process (exports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// What holds a pin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinKind {
    /// A live restore's fill (`state` names its fill state).
    #[default]
    LiveRestore,
    /// A read-only export of the generation; the exporter holds a `flock` on the pin.
    Export,
}

/// A pin found in the repository.
#[derive(Debug, Clone)]
pub struct PinFile {
    /// `DIR/pins/<generation>.<hex>.json`.
    pub path: PathBuf,
    /// The pinned generation (from the file name).
    pub generation: String,
    /// Its content; `None` when it cannot be read (it still pins).
    pub pin: Option<Pin>,
}

impl PinFile {
    /// "live restore of NAME to PATH", for messages.
    pub fn describe(&self) -> String {
        match &self.pin {
            Some(p) if p.kind == PinKind::Export => format!(
                "export {} (pid {}, started {}{})",
                p.disk,
                p.pid.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                p.created,
                if p.host.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", p.host)
                }
            ),
            Some(p) => format!(
                "live restore of {} to {} (started {}{})",
                p.disk,
                p.destination,
                p.created,
                if p.host.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", p.host)
                }
            ),
            None => format!("unreadable pin {}", self.path.display()),
        }
    }
}

/// This host's name ("" if unknown).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn pins_dir(repo: &Repo) -> PathBuf {
    repo.dir().join("pins")
}

/// Record `pin` in the repository (the caller holds the repository lock). Returns the
/// pin file's path.
pub fn create(repo: &Repo, pin: &Pin) -> Result<PathBuf> {
    if !valid_id(&pin.generation) {
        return Err(crate::err!(
            InvalidInput,
            "unable to pin generation {:?}: not a generation id",
            pin.generation
        ));
    }
    let dir = pins_dir(repo);
    let name = format!("{}.{}.json", pin.generation, fsutil::random_hex(4)?);
    let json = serde_json::to_vec_pretty(pin)
        .map_err(|e| crate::err!(InvalidInput, "unable to encode pin: {e}"))?;
    if let Some(r) = &repo.remote {
        // One PUT (atomic); the path is the object's URL.
        let key = format!("pins/{name}");
        r.put(&key, json)?;
        // Then the generation must still be published: its metadata was read before
        // the pin landed, and a prune that listed the pins before may have removed it
        // meanwhile. Published after the pin landed means any later unpublishing is
        // younger than the pin, so every prune that could collect its chunks lists
        // the pin (see ARCHITECTURE, "A pin and a tombstone").
        let meta = format!("generations/{}.json", pin.generation);
        if !r.exists(&meta)? {
            r.delete(&key)?;
            return Err(crate::err!(
                NotFound,
                "unable to pin generation {} in {}: it was removed by a prune meanwhile",
                pin.generation,
                r.url()
            ));
        }
        return Ok(dir.join(name));
    }
    std::fs::create_dir_all(&dir).ctx(|| format!("unable to create {}", dir.display()))?;
    let path = dir.join(name);
    fsutil::write_atomic(&path, &json)?;
    fsutil::fsync_dir(repo.dir())?;
    Ok(path)
}

/// The object-store repository URL and the key (relative to it) of a pin given as
/// `s3://BUCKET[/PREFIX]/pins/NAME`.
fn object_pin(path: &Path) -> Option<(&str, &str)> {
    let url = super::object::s3_url(path)?;
    let at = url.rfind("/pins/")?;
    Some((&url[..at], &url[at + 1..]))
}

/// Whether the pin at `path` (a file, or an object's URL) still exists; an object store
/// that cannot be asked says "no" (the caller pins again: a second pin is harmless).
pub fn exists(path: &Path) -> bool {
    match object_pin(path) {
        Some((url, key)) => super::object::ObjectRepo::open(url)
            .and_then(|r| r.exists(key))
            .unwrap_or(false),
        None => path.exists(),
    }
}

/// Remove a pin file or object (a missing one is fine).
pub fn remove(path: &Path) -> Result<()> {
    if let Some((url, key)) = object_pin(path) {
        return super::object::ObjectRepo::open(url)?.delete(key);
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(crate::Error::io(
                format!("unable to remove pin {}", path.display()),
                e,
            ))
        }
    }
    if let Some(d) = path.parent() {
        fsutil::fsync_dir(d)?;
    }
    Ok(())
}

/// Every pin in the repository.
pub fn list(repo: &Repo) -> Result<Vec<PinFile>> {
    let dir = pins_dir(repo);
    let mut out = Vec::new();
    if let Some(r) = &repo.remote {
        for (key, len) in r.list("pins/")? {
            let Some(name) = key.strip_prefix("pins/").filter(|n| !n.contains('/')) else {
                continue;
            };
            let Some(generation) = pin_generation(name) else {
                continue;
            };
            let pin = match len > 1 << 20 {
                true => None,
                // Removed meanwhile (a fill completed): it pins nothing.
                false => match r.get(&key)? {
                    None => continue,
                    Some(b) => serde_json::from_slice::<Pin>(&b)
                        .ok()
                        .filter(|p| p.generation == generation),
                },
            };
            out.push(PinFile {
                path: dir.join(name),
                generation,
                pin,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        return Ok(out);
    }
    for ent in crate::fsutil::dir_entries(&dir)? {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(generation) = pin_generation(&name) else {
            continue;
        };
        let pin = match std::fs::read(ent.path()) {
            // Removed meanwhile (a fill completed): it pins nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            r => r
                .ok()
                .and_then(|b| serde_json::from_slice::<Pin>(&b).ok())
                .filter(|p| p.generation == generation),
        };
        out.push(PinFile {
            path: ent.path(),
            generation,
            pin,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The generation a pin file name `<generation>.<hex>.json` pins.
fn pin_generation(name: &str) -> Option<String> {
    name.strip_suffix(".json")
        .and_then(|s| s.rsplit_once('.'))
        .map(|(g, _)| g.to_string())
        .filter(|g| valid_id(g) && !name.starts_with('.'))
}

/// Why a pin no longer pins anything, if that can be known from here: its fill state
/// is on this host and is gone, finished (complete or abandoned) or of another
/// generation.
///
/// An export's pin is stale when it is on this host and nobody holds its `flock`
/// (the exporter died or stopped without removing it).
pub fn stale_reason(p: &PinFile) -> Option<String> {
    let pin = p.pin.as_ref()?;
    if pin.kind == PinKind::Export {
        if pin.host != host_name() || !unlocked(&p.path) {
            return None;
        }
        return Some(format!(
            "its exporter (pid {}) no longer holds it",
            pin.pid.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
        ));
    }
    if pin.host != host_name() || pin.state.is_empty() {
        return None;
    }
    match crate::restore::fill_state::read_fill_state(Path::new(&pin.state)) {
        Ok(None) => Some(format!("its fill state {} is gone", pin.state)),
        Ok(Some((g, _))) if g != pin.generation => Some(format!(
            "its fill state {} now belongs to generation {g}",
            pin.state
        )),
        Ok(Some((_, true))) => Some(format!(
            "its fill state {} says the restore finished",
            pin.state
        )),
        _ => None,
    }
}

/// Whether nobody holds a `flock` on `path` (an exclusive non-blocking lock succeeds;
/// it is released at once). Any error — the file gone, no permission — says "held", so
/// a pin is never called stale by mistake.
fn unlocked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: plain syscall on a valid fd owned by `f`; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r == 0
}

/// Take a shared `flock` on a pin file, held while the returned file is open: the
/// exporter's proof of life (see [`stale_reason`]).
pub fn hold(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ctx(|| format!("unable to open pin {}", path.display()))?;
    // SAFETY: plain syscall on a valid fd owned by `f`; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    if r != 0 {
        return Err(crate::Error::io(
            format!("unable to lock pin {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// A live restore's pin of generation `g` on disk `d`, for tests.
#[cfg(test)]
pub(crate) fn restore_pin(g: &str, host: &str, state: &str) -> Pin {
    Pin {
        generation: g.into(),
        disk: "d".into(),
        destination: "/dev/x".into(),
        state: state.into(),
        host: host.into(),
        created: String::new(),
        kind: PinKind::LiveRestore,
        pid: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On an object store a pin is confirmed against the generation's metadata after
    /// it landed: a generation unpublished meanwhile is refused and leaves no pin.
    #[test]
    fn an_object_pin_of_a_removed_generation_is_refused() {
        use crate::repo::testutil::{in_memory, meta, stage};
        let repo = in_memory(4);
        stage(&repo, "a", &[1u8; 8192]);
        repo.write_meta(&meta("a", "d", 8192, 1000)).unwrap();
        let p = create(&repo, &restore_pin("a", "", "")).unwrap();
        assert!(
            p.display().to_string().contains("/pins/a."),
            "{}",
            p.display()
        );
        assert_eq!(list(&repo).unwrap().len(), 1);
        // a prune unpublishes it (tombstone, then the metadata) before the next pin
        let r = repo.remote().unwrap().clone();
        r.put("generations/a.removed", Vec::new()).unwrap();
        r.delete("generations/a.json").unwrap();
        let e = create(&repo, &restore_pin("a", "", "")).unwrap_err();
        assert!(
            e.to_string().contains("removed by a prune meanwhile"),
            "{e}"
        );
        assert_eq!(list(&repo).unwrap().len(), 1, "the refused pin is gone");
    }

    #[test]
    fn an_export_pin_is_stale_once_nobody_holds_it() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 65536).unwrap();
        let g = "20261206T120000.000Z-0123abcd";
        let path = create(
            &repo,
            &Pin {
                generation: g.into(),
                disk: "x".into(),
                destination: String::new(),
                state: String::new(),
                host: host_name(),
                created: String::new(),
                kind: PinKind::Export,
                pid: Some(1),
            },
        )
        .unwrap();
        let held = hold(&path).unwrap();
        let pins = list(&repo).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].pin.as_ref().unwrap().kind, PinKind::Export);
        assert!(
            pins[0].describe().starts_with("export x (pid 1"),
            "{}",
            pins[0].describe()
        );
        assert_eq!(stale_reason(&pins[0]), None);
        drop(held);
        let why = stale_reason(&pins[0]).unwrap();
        assert!(why.contains("no longer holds it"), "{why}");
        // An old pin without a kind is a live restore's.
        let old = br#"{"generation":"20261206T120000.000Z-0123abcd","disk":"d","destination":"/x","state":"","host":"","created":""}"#;
        let p: Pin = serde_json::from_slice(old).unwrap();
        assert_eq!(p.kind, PinKind::LiveRestore);
    }
}
