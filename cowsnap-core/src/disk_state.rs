//! A disk's persistent state at daemon start: which identity and change log it has,
//! whether its change tracking can be trusted, and, for a disk being restored on the
//! fly, the filling layer over the destination.
//!
//! The state directory of one disk (`STATE_DIR/NAME`) holds `identity.json` (lineage),
//! `changelog.bin`, while no daemon serves it `origin.seal`, and during a live restore
//! `fill.state` (one bit per repository chunk) and `fill.origin` (which destination
//! the fill belongs to).
//!
//! Rules, in the order [`open`] applies them:
//! - Whether the origin is proven unchanged since the last clean stop is decided from
//!   the seal before anything is created ([`check_origin_seal`]); the caller removes
//!   the seal later, just before anything can write to the origin.
//! - A restore (`restore_from`) whose fill state is missing or complete starts afresh:
//!   the directory is emptied, the disk gets a new lineage relative to the generation
//!   (exact by construction, so the seal does not matter) and `fill.origin` is written.
//!   A pending fill of this destination resumes; one of another destination is
//!   refused, so a fill never writes one disk's data onto another.
//! - Without `restore_from`, an existing fill state resumes from the generation the
//!   identity names.
//! - The change log is opened last; when the origin is not proven unchanged, tracking
//!   that claimed to be relative to a generation is distrusted, with the reason.

use crate::blockio::BlockIo;
use crate::changelog::ChangeLog;
use crate::error::{IoContext, Result};
use crate::identity::{Identity, RestoredFrom};
use crate::origin_seal;
use crate::repo::Repo;
use crate::restore::{self, live::FillingIo};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;

/// Live-restore fill state in a disk's state directory.
pub const FILL_STATE_FILE: &str = "fill.state";
/// The destination a live restore's fill state belongs to ([`origin_key`]).
pub const FILL_ORIGIN_FILE: &str = "fill.origin";

/// What [`open`] needs to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskStateOptions<'a> {
    /// Disk name (named in a repository pin).
    pub name: &'a str,
    /// The origin's path (the live restore's destination).
    pub origin: &'a Path,
    /// The disk's own state directory (`STATE_DIR/NAME`); created 0700 if missing.
    pub state_dir: &'a Path,
    /// Tracking chunk size.
    pub chunk_size: u32,
    /// Start a live restore from this repository directory and generation (`None`:
    /// the newest).
    pub restore_from: Option<(&'a Path, Option<&'a str>)>,
}

/// The disk's state, ready to serve.
pub struct DiskState {
    /// What the engine serves: the origin, or the filling layer over it.
    pub io: Arc<dyn BlockIo>,
    /// The filling layer during a live restore (also once complete: it then passes
    /// straight through).
    pub filling: Option<Arc<FillingIo>>,
    /// The disk's change log.
    pub changelog: Arc<ChangeLog>,
    /// The generation the disk was restored from, if any (from its identity).
    pub restored_from: Option<RestoredFrom>,
}

/// What identifies the destination of a live restore across restarts.
pub fn origin_key(origin: &Path) -> String {
    std::fs::canonicalize(origin)
        .unwrap_or_else(|_| origin.to_path_buf())
        .display()
        .to_string()
}

/// A fill state belongs to one destination: never fill another disk from it.
fn check_fill_origin(sdir: &Path, origin: &Path) -> Result<()> {
    let want = std::fs::read_to_string(sdir.join(FILL_ORIGIN_FILE)).unwrap_or_default();
    let have = origin_key(origin);
    if want != have {
        return Err(crate::err!(
            InvalidInput,
            "the state directory {} holds a live restore onto {:?}, not {have:?}: \
             attach under another --name, or remove that directory if the restore is abandoned",
            sdir.display(),
            want
        ));
    }
    Ok(())
}

fn create_private_dir(p: &Path) -> Result<()> {
    if p.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .ctx(|| format!("unable to create directory {}", p.display()))
}

/// Open the disk's state for serving `dest` (already open, writable); see the module
/// notes for the rules.
pub fn open(opts: &DiskStateOptions<'_>, dest: Arc<dyn BlockIo>) -> Result<DiskState> {
    let size = dest.size();
    let sdir = opts.state_dir;
    // Whether the seal proves the origin unchanged (the caller removes it later, before
    // the origin is served).
    let unproven = check_origin_seal(opts.origin, sdir);
    let mut fresh_restore = false;
    let fill_state = sdir.join(FILL_STATE_FILE);
    let mut filling = None;
    // Named in the repository's pin while the live restore is unfinished.
    let owner = restore::live::PinOwner {
        disk: opts.name.to_string(),
        destination: origin_key(opts.origin),
    };
    if let Some((dir, gen)) = opts.restore_from {
        let repo = Repo::open(dir)?;
        let g = repo.resolve(gen)?;
        if g.disk_size > size {
            return Err(crate::err!(
                InvalidInput,
                "unable to restore generation {} ({} bytes) onto {} ({size} bytes): too small",
                g.id,
                g.disk_size,
                opts.origin.display()
            ));
        }
        // A completed earlier restore under this name is not resumed: restoring again
        // (the same generation or another) starts afresh.
        let pending =
            restore::live::read_fill_state(&fill_state)?.is_some_and(|(_, complete)| !complete);
        if !pending {
            // A fresh restore: whatever state this name had belongs to another disk.
            if sdir.exists() {
                std::fs::remove_dir_all(sdir)
                    .ctx(|| format!("unable to reset {}", sdir.display()))?;
            }
            create_private_dir(sdir)?;
            restore::init_restored_state(sdir, dir, &g.id, size, opts.chunk_size)?;
            // Exact by construction: the content is the generation's, filled from now.
            fresh_restore = true;
            std::fs::write(sdir.join(FILL_ORIGIN_FILE), origin_key(opts.origin))
                .ctx(|| format!("unable to write {}", sdir.display()))?;
        }
        check_fill_origin(sdir, opts.origin)?;
        filling = Some(FillingIo::open_pinned(
            dest.clone(),
            dir,
            Some(&g.id),
            &fill_state,
            &owner,
        )?);
    } else if fill_state.exists() {
        check_fill_origin(sdir, opts.origin)?;
        let id = Identity::load_or_create(sdir)?;
        let from = id.restored_from.ok_or_else(|| {
            crate::err!(
                Corrupt,
                "{} holds a fill state but the identity names no repository",
                sdir.display()
            )
        })?;
        let f = FillingIo::open_pinned(
            dest.clone(),
            Path::new(&from.repo),
            Some(&from.generation),
            &fill_state,
            &owner,
        )
        .map_err(|e| e.with_context("unable to resume the live restore"))?;
        if !f.fill_status().complete {
            log::info!(
                "resuming the live restore of generation {} from {}",
                from.generation,
                from.repo
            );
        }
        filling = Some(f);
    }
    create_private_dir(sdir)?;
    let cl = ChangeLog::open_in(sdir, size, opts.chunk_size)
        .map_err(|e| e.with_context("unable to open the change log"))?;
    if let (false, Some(rel), Some(why)) = (fresh_restore, cl.relative_to(), unproven) {
        log::warn!("change tracking (relative to {rel}) is not trusted: {why}");
        cl.distrust(&why)
            .map_err(|e| e.with_context("unable to reset the change log"))?;
    }
    // The change log created the identity if there was none.
    let restored_from = Identity::load_or_create(sdir)?.restored_from;
    let io: Arc<dyn BlockIo> = match &filling {
        Some(f) => f.clone(),
        None => dest,
    };
    Ok(DiskState {
        io,
        filling,
        changelog: Arc::new(cl),
        restored_from,
    })
}

/// Check the origin seal of the state directory `sdir` against the origin as it is
/// now. `None`: the origin is proven to be the one tracked, unchanged since the last
/// clean stop; else why not.
pub fn check_origin_seal(origin: &Path, sdir: &Path) -> Option<String> {
    if !sdir.exists() {
        return Some("the disk has no state yet".into());
    }
    match origin_seal::read_seal(sdir) {
        Err(e) => Some(format!("the origin seal is unreadable ({e})")),
        Ok(None) => Some(
            "no origin seal: the disk was not detached cleanly (or its state predates origin \
             seals), so changes to the origin since its last daemon are unknown"
                .into(),
        ),
        Ok(Some(s)) => match origin_seal::observe(origin) {
            Err(e) => Some(format!("unable to examine the origin: {e}")),
            Ok(now) => s.check(&now).err(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockio::{self, OpenSpec};

    #[test]
    fn origin_seal_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("disk.img");
        std::fs::write(&origin, vec![0u8; 1 << 16]).unwrap();
        let sdir = dir.path().join("state");
        assert!(check_origin_seal(&origin, &sdir).is_some());
        std::fs::create_dir_all(&sdir).unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("no origin seal"), "{why}");
        let seal = |p: &Path| {
            origin_seal::write_seal(&sdir, p, origin_seal::observe_for_seal(p).unwrap()).unwrap()
        };
        seal(&origin);
        assert_eq!(check_origin_seal(&origin, &sdir), None);
        origin_seal::remove_seal(&sdir).unwrap();
        assert!(check_origin_seal(&origin, &sdir).is_some());
        seal(&origin);
        std::fs::write(&origin, vec![1u8; 1 << 16]).unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("modified while detached"), "{why}");
        let other = dir.path().join("other.img");
        std::fs::write(&other, vec![0u8; 1 << 16]).unwrap();
        seal(&origin);
        let why = check_origin_seal(&other, &sdir).unwrap();
        assert!(why.contains("another file"), "{why}");
        std::fs::write(origin_seal::seal_path(&sdir), b"{").unwrap();
        let why = check_origin_seal(&origin, &sdir).unwrap();
        assert!(why.contains("unreadable"), "{why}");
    }

    fn open_sync(path: &Path) -> Arc<dyn BlockIo> {
        blockio::open(&OpenSpec {
            exclusive: false,
            engine: blockio::IoEngine::Sync,
            ..OpenSpec::origin(path)
        })
        .unwrap()
    }

    #[test]
    fn plain_disk_gets_identity_and_change_log() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("disk.img");
        std::fs::write(&origin, vec![0u8; 1 << 20]).unwrap();
        let sdir = dir.path().join("state").join("d");
        let io = open_sync(&origin);
        let opts = DiskStateOptions {
            name: "d",
            origin: &origin,
            state_dir: &sdir,
            chunk_size: 65536,
            restore_from: None,
        };
        let st = open(&opts, io).unwrap();
        assert!(st.filling.is_none());
        assert!(st.restored_from.is_none());
        assert!(sdir.join(crate::identity::IDENTITY_FILE).exists());
        assert!(sdir.join(crate::changelog::CHANGELOG_FILE).exists());
        // A fill state of another destination is refused.
        std::fs::write(sdir.join(FILL_STATE_FILE), b"x").unwrap();
        std::fs::write(sdir.join(FILL_ORIGIN_FILE), "/elsewhere").unwrap();
        let io = open_sync(&origin);
        let e = open(&opts, io).err().unwrap().to_string();
        assert!(
            e.contains("holds a live restore onto \"/elsewhere\""),
            "{e}"
        );
    }
}
