//! Prune: decide per disk which generations a [`RetentionPolicy`] keeps, delete the
//! others, then mark-and-sweep the chunk store.
//!
//! # Order of work
//!
//! 1. Refuse a policy that keeps nothing before the repository is even opened.
//! 2. Open the repository and take its lock exclusively (also for `--dry-run`): it
//!    waits for running backups, restores and verifies (which hold it shared) and makes
//!    new ones wait, so the sweep can never delete a chunk a running backup has just
//!    stored or decided to reuse, and a dry run sees what a real run would.
//! 3. Decide, without writing anything: a `--disk` that holds no generation is refused;
//!    each selected disk's generations go through [`retention::select`] in the host's
//!    time zone (or the one given); generations of other disks are kept untouched;
//!    pinned generations (an unfinished live restore needs them, see `pin`) are kept
//!    whatever the policy says, with who pins them as a reason. Pins that provably pin
//!    nothing any more are noted for removal. Last, a complete consistency group (see
//!    `group`) is kept whole: if any member is kept, for whatever reason, every member
//!    is ("kept with group ID"), so a prune never turns a restore point of several
//!    disks into loose generations. `--disk` therefore removes no member of a complete
//!    group spanning other disks (those members are kept as "other disk"); a prune of
//!    every disk removes such a group when no rule keeps any of its members. Prune
//!    removes no generation by name, so no single member can be asked for.
//! 4. Mark: load the index of every kept generation of every disk. One that cannot be
//!    read aborts the prune here, before anything is deleted, since its chunks cannot
//!    be known. So a refused or failed prune has changed nothing.
//! 5. Unless it is a dry run: remove the stale pins, then each removed generation's
//!    metadata before its index (a crash mid-prune leaves an incomplete generation,
//!    ignored and cleaned up by the next prune, never a listed one with no index), then
//!    leftovers (indexes without metadata, temporary files: no backup runs now), then
//!    sweep every chunk no kept generation references. A dry run counts the leftovers
//!    and the chunks and bytes the sweep would free, and deletes nothing.
//!
//! The quarantine (damaged chunks kept as evidence) is never touched; its size is
//! reported.
//!
//! # On an object store
//!
//! There is no lock (see `repo::object`), so a backup on another host may run during
//! the prune. Steps 1, 3 (pins are objects `PREFIX/pins/…`) and 4 are the
//! same; step 5 deletes each removed generation's metadata object (the unpublish)
//! before its index, and nothing else: no chunk (a running backup may have decided to
//! reuse an unreferenced one, or be taking its parent's hashes from a generation
//! removed now) and no index without metadata (a running backup's, about to be
//! published). That is safe with any number of concurrent backups: no chunk is ever
//! deleted, and a backup that loaded a removed parent's index already holds every hash
//! it takes from it. The chunks no kept generation references are counted and left in
//! place (`chunks_collected` false, `chunks_unreferenced`, `bytes_unreferenced`).

use super::generation::valid_id;
use super::retention::{self, Candidate, RetentionPolicy};
use super::{group, pin, GenerationInfo, Repo};
use crate::error::{IoContext, Result};
use crate::fsutil;
use jiff::tz::TimeZone;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

/// What to prune and how.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Which generations of each selected disk to keep.
    pub policy: RetentionPolicy,
    /// Only this disk's generations are pruned (others are kept); `None`: every disk.
    pub disk: Option<String>,
    /// Decide and count, delete nothing.
    pub dry_run: bool,
    /// The time zone of the policy's periods (the host's by default).
    pub time_zone: TimeZone,
}

impl PruneOptions {
    /// Prune every disk with `policy`, for real, in the host's time zone.
    pub fn new(policy: RetentionPolicy) -> PruneOptions {
        PruneOptions {
            policy,
            disk: None,
            dry_run: false,
            time_zone: TimeZone::system(),
        }
    }

    /// Keep the newest `n` generations of every disk (`--keep N`).
    pub fn keep_last(n: u32) -> PruneOptions {
        PruneOptions::new(RetentionPolicy {
            keep_last: Some(n),
            ..Default::default()
        })
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Nothing was deleted: the figures say what a real run would delete.
    pub dry_run: bool,
    /// The disk pruning was restricted to, if any.
    pub disk: Option<String>,
    /// Every generation in the repository, oldest first, with its decision.
    pub generations: Vec<GenerationDecision>,
    /// Generations deleted.
    pub removed_generations: Vec<String>,
    /// Generations kept (of every disk), sorted.
    pub kept_generations: Vec<String>,
    /// Incomplete generations and stray temporary files removed.
    pub leftovers_removed: u64,
    /// Chunks deleted.
    pub chunks_removed: u64,
    /// Bytes freed by deleted chunks.
    pub bytes_freed: u64,
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Generations kept only because a live restore pins them.
    pub pinned: Vec<KeptPinned>,
    /// Pins removed because they pin nothing any more, with the reason.
    pub stale_pins_removed: Vec<String>,
    /// Files in the quarantine (damaged chunks kept as evidence).
    pub quarantined_files: u64,
    /// Whether unreferenced chunks were deleted (counted in `chunks_removed`): false on
    /// an object store, which this prune does not collect chunks from.
    pub chunks_collected: bool,
    /// Chunks no kept generation references that were left in place (object store).
    pub chunks_unreferenced: u64,
    /// Their bytes.
    pub bytes_unreferenced: u64,
}

/// The decision on one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationDecision {
    /// Generation id.
    pub generation: String,
    /// Disk name.
    pub disk: String,
    /// Creation time in the policy's time zone, RFC 3339 with offset.
    pub created: String,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Kept (true) or removed.
    pub keep: bool,
    /// Why it is kept: the rules that keep it ("last 1", "daily 2026-12-05", ...), "pinned
    /// by ...", "other disk, not pruned", or "kept with group ID"; empty when removed.
    pub reasons: Vec<String>,
}

/// A generation prune kept because a live restore pins it.
#[derive(Debug, Clone, Serialize)]
pub struct KeptPinned {
    /// Generation id.
    pub generation: String,
    /// "live restore of NAME to PATH (started ...)".
    pub pinned_by: String,
    /// The pin file.
    pub pin: String,
}

/// The reason given for generations of disks `--disk` did not select.
pub const OTHER_DISK: &str = "other disk, not pruned";

/// The reason given for a member of a complete group kept because another member is:
/// "kept with group ID".
pub const KEPT_WITH_GROUP: &str = "kept with group";

/// Apply `opts` to the repository at `dir`: delete the generations its policy does not
/// keep and the chunks no kept generation references (or, with `dry_run`, only say so).
pub fn prune(dir: &Path, opts: &PruneOptions) -> Result<PruneReport> {
    if opts.policy.keeps_nothing() {
        return Err(crate::err!(
            InvalidInput,
            "unable to prune {}: the retention policy keeps nothing (prune never deletes every restore point of a disk; keep at least 1 of some kind)",
            dir.display()
        ));
    }
    let repo = Repo::open(dir)?;
    let _lock = repo.lock(true)?;
    let mut rep = PruneReport {
        chunks_collected: true,
        dry_run: opts.dry_run,
        disk: opts.disk.clone(),
        ..Default::default()
    };
    let all = repo.list()?;
    if let Some(d) = &opts.disk {
        if !all.iter().any(|g| &g.disk == d) {
            let disks: BTreeSet<&str> = all.iter().map(|g| g.disk.as_str()).collect();
            return Err(crate::err!(
                NotFound,
                "unable to prune disk {d:?} in {}: the repository holds no generation of it (disks: {})",
                dir.display(),
                if disks.is_empty() {
                    "none".to_string()
                } else {
                    disks.into_iter().collect::<Vec<_>>().join(", ")
                }
            ));
        }
    }

    // Decide.
    let mut pins = Vec::new();
    let mut stale = Vec::new();
    for p in pin::list(&repo)? {
        match pin::stale_reason(&p) {
            Some(why) => {
                rep.stale_pins_removed
                    .push(format!("{} ({why})", p.path.display()));
                stale.push(p);
            }
            None => pins.push(p),
        }
    }
    let mut by_disk: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, g) in all.iter().enumerate() {
        by_disk.entry(g.disk.as_str()).or_default().push(i);
    }
    let tz = &opts.time_zone;
    let mut decisions: Vec<Option<GenerationDecision>> = vec![None; all.len()];
    let decision = |g: &GenerationInfo, keep: bool, reasons: Vec<String>| GenerationDecision {
        generation: g.id.clone(),
        disk: g.disk.clone(),
        created: retention::local_time(g.created_unix, tz),
        created_unix: g.created_unix,
        keep,
        reasons,
    };
    for (disk, idxs) in &by_disk {
        if opts.disk.as_deref().is_some_and(|d| d != *disk) {
            for &i in idxs {
                decisions[i] = Some(decision(&all[i], true, vec![OTHER_DISK.to_string()]));
            }
            continue;
        }
        let cands: Vec<Candidate> = idxs
            .iter()
            .map(|&i| Candidate {
                id: &all[i].id,
                created_unix: all[i].created_unix,
            })
            .collect();
        let verdicts = retention::select(&cands, &opts.policy, tz);
        for (&i, v) in idxs.iter().zip(verdicts) {
            let g = &all[i];
            let mut reasons = v.reasons;
            for p in pins.iter().filter(|p| p.generation == g.id) {
                reasons.push(format!("pinned by {}", p.describe()));
                if !v.keep {
                    rep.pinned.push(KeptPinned {
                        generation: g.id.clone(),
                        pinned_by: p.describe(),
                        pin: p.path.display().to_string(),
                    });
                }
            }
            decisions[i] = Some(decision(g, !reasons.is_empty(), reasons));
        }
    }
    let mut decisions: Vec<GenerationDecision> = decisions.into_iter().flatten().collect();
    debug_assert_eq!(decisions.len(), all.len());
    keep_groups_whole(&all, &mut decisions);
    rep.generations = decisions;

    // Mark: every kept index loads, or nothing is deleted.
    let mut live: HashSet<[u8; 32]> = HashSet::new();
    for (g, d) in all.iter().zip(&rep.generations) {
        if !d.keep {
            rep.removed_generations.push(g.id.clone());
            continue;
        }
        let idx = repo.load_index(g).map_err(|e| {
            e.with_context(format!(
                "unable to prune {}: generation {} is kept but its index is unreadable; nothing deleted",
                dir.display(),
                g.id
            ))
        })?;
        live.extend(idx.data().map(|(_, h)| *h));
        rep.kept_generations.push(g.id.clone());
    }
    rep.kept_generations.sort();

    if let Some(r) = &repo.remote {
        return prune_object(r, live, opts, rep);
    }

    // Delete the generations.
    let gdir = dir.join("generations");
    if !opts.dry_run {
        for p in &stale {
            pin::remove(&p.path)?;
        }
        for id in &rep.removed_generations {
            remove_if_exists(&repo.meta_path(id))?;
            remove_if_exists(&repo.index_path(id))?;
        }
    }
    // Leftovers: indexes without metadata, temporary files (no backup runs now).
    if let Ok(rd) = std::fs::read_dir(&gdir) {
        for ent in rd {
            let ent = ent.ctx(|| format!("unable to list {}", gdir.display()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let stray = name.starts_with(".tmp-")
                || name
                    .strip_suffix(".idx")
                    .is_some_and(|id| valid_id(id) && !repo.meta_path(id).exists());
            if stray {
                if !opts.dry_run {
                    remove_if_exists(&ent.path())?;
                }
                rep.leftovers_removed += 1;
            }
        }
    }
    if !opts.dry_run {
        fsutil::fsync_dir(&gdir)?;
    }

    // Sweep.
    let mut dirs = HashSet::new();
    for (hash, path, len) in repo.store().walk()? {
        let garbage = match hash {
            Some(h) => !live.contains(&h),
            None => true,
        };
        if garbage {
            if !opts.dry_run {
                remove_if_exists(&path)?;
                if let Some(p) = path.parent() {
                    dirs.insert(p.to_path_buf());
                }
            }
            if hash.is_some() {
                rep.chunks_removed += 1;
                rep.bytes_freed += len;
            } else {
                rep.leftovers_removed += 1;
            }
        } else {
            rep.chunks_kept += 1;
        }
    }
    for d in dirs {
        fsutil::fsync_dir(&d)?;
    }
    rep.quarantined_files = repo.store().quarantined()?.len() as u64;
    Ok(rep)
}

/// The deleting half of [`prune`] on an object store: each removed generation's
/// metadata object (the unpublish) before its index. No chunk is deleted and no index
/// without metadata is touched: without a lock, either may belong to a backup running
/// on another host (a chunk it decided to reuse, an index it is about to publish). The
/// chunks no kept generation references are counted ([`PruneReport::chunks_unreferenced`]).
fn prune_object(
    r: &super::object::ObjectRepo,
    live: HashSet<[u8; 32]>,
    opts: &PruneOptions,
    mut rep: PruneReport,
) -> Result<PruneReport> {
    rep.chunks_collected = false;
    if !opts.dry_run {
        for id in &rep.removed_generations {
            r.delete(&format!("generations/{id}.json"))?;
            r.delete(&format!("generations/{id}.idx"))?;
        }
    }
    let (kept, unreferenced, bytes) = count_chunks(&r.list("chunks/")?, &live);
    rep.chunks_kept = kept;
    rep.chunks_unreferenced = unreferenced;
    rep.bytes_unreferenced = bytes;
    Ok(rep)
}

/// Over a listing of `chunks/` (names, sizes): the chunks `live` holds, and the
/// others with their bytes. Names that are no chunk's are not counted.
fn count_chunks(listing: &[(String, u64)], live: &HashSet<[u8; 32]>) -> (u64, u64, u64) {
    let (mut kept, mut unreferenced, mut bytes) = (0, 0, 0);
    for (name, len) in listing {
        let Some(h) = name.rsplit('/').next().and_then(fsutil::parse_hash) else {
            continue;
        };
        if live.contains(&h) {
            kept += 1;
        } else {
            unreferenced += 1;
            bytes += len;
        }
    }
    (kept, unreferenced, bytes)
}

/// A complete group is kept or removed whole: when any member is kept (by a rule, a
/// pin, or because `--disk` leaves its disk alone), every member is, with the reason
/// "kept with group ID". Members of incomplete groups are single-disk generations.
/// `decisions[i]` is the decision on `all[i]`.
fn keep_groups_whole(all: &[GenerationInfo], decisions: &mut [GenerationDecision]) {
    for gr in group::groups_of(all).iter().filter(|gr| gr.complete) {
        let idxs: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, g)| g.group.as_ref().is_some_and(|r| r.id == gr.id))
            .map(|(i, _)| i)
            .collect();
        if !idxs.iter().any(|&i| decisions[i].keep) {
            continue;
        }
        for &i in &idxs {
            if !decisions[i].keep {
                decisions[i].keep = true;
                decisions[i]
                    .reasons
                    .push(format!("{KEPT_WITH_GROUP} {}", gr.id));
            }
        }
    }
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::Error::io(
            format!("unable to remove {}", p.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    const DAY: u64 = 86400;
    /// 2026-12-01T12:00:00Z.
    const T0: u64 = 1_796_126_400;

    /// A generation `id` of `disk` made at `created_unix` holding `img`.
    fn gen(repo: &Repo, id: &str, disk: &str, created_unix: u64, img: &[u8]) {
        let mut g = make_gen(repo, id, img);
        g.disk = disk.into();
        g.created_unix = created_unix;
        g.write(&repo.meta_path(id)).unwrap();
    }

    /// An image of `n` 4 KiB chunks, chunk k filled with `seed + k` (so images share
    /// chunks when their seeds overlap).
    fn img(seed: u8, n: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|k| vec![seed.wrapping_add(k); 4096])
            .collect()
    }

    /// Every file under `dir` with its content.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    out.insert(
                        p.strip_prefix(dir).unwrap().into(),
                        std::fs::read(&p).unwrap(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn object_store_chunks_are_counted_against_the_mark() {
        let h = |b: u8| [b; 32];
        let name = |b: u8| format!("chunks/{:02x}/{}", b, fsutil::hex(&h(b)));
        let listing = vec![
            (name(1), 100),
            (name(2), 200),
            (name(3), 300),
            ("chunks/zz/not-a-chunk".to_string(), 999),
            (format!("chunks/01/{}.tmp", fsutil::hex(&h(1))), 999),
        ];
        let live: HashSet<[u8; 32]> = [h(2), h(9)].into_iter().collect();
        assert_eq!(count_chunks(&listing, &live), (1, 2, 400));
        assert_eq!(count_chunks(&listing, &HashSet::new()), (0, 3, 600));
        assert_eq!(count_chunks(&[], &live), (0, 0, 0));
    }

    fn opts(policy: RetentionPolicy) -> PruneOptions {
        PruneOptions {
            time_zone: TimeZone::UTC,
            ..PruneOptions::new(policy)
        }
    }

    fn daily(n: u32) -> RetentionPolicy {
        RetentionPolicy {
            keep_daily: Some(n),
            ..Default::default()
        }
    }

    /// Disk "d": two generations on each of days 0..3; disk "e": one a day on 0..2,
    /// sharing chunks with "d"; an index without metadata and a temporary file.
    fn fixture() -> (tempfile::TempDir, Repo) {
        let t = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(t.path(), 4096).unwrap();
        for day in 0..4u64 {
            for h in 0..2u64 {
                let id = format!("d{day}{h}");
                gen(
                    &repo,
                    &id,
                    "d",
                    T0 + day * DAY + h * 3600,
                    &img(10 * day as u8 + h as u8 * 5, 3),
                );
            }
        }
        for day in 0..3u64 {
            gen(
                &repo,
                &format!("e{day}"),
                "e",
                T0 + day * DAY,
                &img(10 * day as u8, 2),
            );
        }
        std::fs::copy(repo.index_path("d00"), repo.index_path("x-orphan")).unwrap();
        std::fs::write(repo.dir().join("generations/.tmp-junk"), b"x").unwrap();
        drop(repo.lock(false).unwrap()); // as any backup would have
        (t, repo)
    }

    fn ids(v: &[String]) -> Vec<&str> {
        v.iter().map(|s| s.as_str()).collect()
    }

    #[test]
    fn a_dry_run_decides_as_a_real_run_and_changes_nothing() {
        let (t, repo) = fixture();
        let before = tree(t.path());
        let dry = prune(
            t.path(),
            &PruneOptions {
                dry_run: true,
                ..opts(daily(2))
            },
        )
        .unwrap();
        assert_eq!(tree(t.path()), before, "a dry run changed the repository");
        assert!(dry.dry_run);
        assert_eq!(
            ids(&dry.removed_generations),
            ["d00", "d01", "d10", "d11", "d20", "d30", "e0"]
        );
        assert_eq!(ids(&dry.kept_generations), ["d21", "d31", "e1", "e2"]);
        let d31 = dry
            .generations
            .iter()
            .find(|g| g.generation == "d31")
            .unwrap();
        assert_eq!(d31.reasons, ["daily 2026-12-04"]);
        assert_eq!(d31.created, "2026-12-04T13:00:00+00:00");
        assert!(dry
            .generations
            .iter()
            .filter(|g| !g.keep)
            .all(|g| g.reasons.is_empty()));
        assert_eq!(dry.leftovers_removed, 2);
        assert!(dry.chunks_removed > 0 && dry.bytes_freed > 0);

        let real = prune(t.path(), &opts(daily(2))).unwrap();
        assert!(!real.dry_run);
        assert_eq!(real.removed_generations, dry.removed_generations);
        assert_eq!(real.kept_generations, dry.kept_generations);
        assert_eq!(real.leftovers_removed, dry.leftovers_removed);
        assert_eq!(real.chunks_removed, dry.chunks_removed);
        assert_eq!(real.bytes_freed, dry.bytes_freed);
        assert_eq!(real.chunks_kept, dry.chunks_kept);
        let left: Vec<String> = repo.list().unwrap().into_iter().map(|g| g.id).collect();
        assert_eq!(ids(&left), ["d21", "d31", "e1", "e2"]);
        assert!(!repo.index_path("x-orphan").exists());
        assert_eq!(repo.store().walk().unwrap().len() as u64, real.chunks_kept);
        let v = crate::repo::verify(t.path(), None).unwrap();
        assert!(v.ok, "{:?}", v.problems);
        // Nothing more to do.
        let again = prune(t.path(), &opts(daily(2))).unwrap();
        assert!(again.removed_generations.is_empty());
        assert_eq!((again.chunks_removed, again.leftovers_removed), (0, 0));
    }

    #[test]
    fn disk_restricts_the_pruning_and_keeps_the_other_disks_chunks() {
        let (t, repo) = fixture();
        let o = PruneOptions {
            disk: Some("d".into()),
            ..opts(RetentionPolicy {
                keep_last: Some(1),
                ..Default::default()
            })
        };
        let rep = prune(t.path(), &o).unwrap();
        assert_eq!(rep.disk.as_deref(), Some("d"));
        assert_eq!(
            ids(&rep.removed_generations),
            ["d00", "d01", "d10", "d11", "d20", "d21", "d30"]
        );
        assert_eq!(ids(&rep.kept_generations), ["d31", "e0", "e1", "e2"]);
        for g in rep.generations.iter().filter(|g| g.disk == "e") {
            assert_eq!(g.reasons, [OTHER_DISK]);
        }
        // e0's chunks are d00's: still there.
        let v = crate::repo::verify(t.path(), None).unwrap();
        assert!(v.ok, "{:?}", v.problems);
        assert_eq!(repo.list().unwrap().len(), 4);
    }

    #[test]
    fn refused_commands_change_nothing() {
        let (t, _repo) = fixture();
        let lock = t.path().join("lock");
        let _ = std::fs::remove_file(&lock);
        let before = tree(t.path());
        let e = prune(t.path(), &opts(daily(0))).unwrap_err();
        assert!(e.to_string().contains("keeps nothing"), "{e}");
        assert_eq!(tree(t.path()), before);
        assert!(
            !lock.exists(),
            "the lock file was created for a refused policy"
        );

        let o = PruneOptions {
            disk: Some("nosuch".into()),
            ..opts(daily(1))
        };
        let e = prune(t.path(), &o).unwrap_err();
        assert!(e.to_string().contains("disks: d, e"), "{e}");
        let _ = std::fs::remove_file(&lock);
        assert_eq!(
            tree(t.path()),
            before,
            "an unknown disk changed the repository"
        );
    }

    #[test]
    fn an_unreadable_kept_index_aborts_before_anything_is_deleted() {
        let (t, repo) = fixture();
        std::fs::write(repo.index_path("d31"), b"garbage").unwrap();
        let before = tree(t.path());
        let e = prune(t.path(), &opts(daily(1))).unwrap_err();
        assert!(e.to_string().contains("generation d31 is kept"), "{e}");
        assert_eq!(tree(t.path()), before);
    }

    /// Generation `id` of `disk` on day `day`, member of group `gid` of `disks` if given.
    fn member(repo: &Repo, id: &str, disk: &str, day: u64, grp: Option<(&str, &[&str])>) {
        let mut g = make_gen(repo, id, &img(day as u8 * 7 + disk.len() as u8, 2));
        g.disk = disk.into();
        g.created_unix = T0 + day * DAY;
        g.group = grp.map(|(gid, d)| crate::repo::GroupRef {
            id: gid.into(),
            disks: d.iter().map(|s| s.to_string()).collect(),
        });
        g.write(&repo.meta_path(id)).unwrap();
    }

    fn reasons<'a>(rep: &'a PruneReport, id: &str) -> &'a [String] {
        &rep.generations
            .iter()
            .find(|g| g.generation == id)
            .unwrap()
            .reasons
    }

    fn last(n: u32) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: Some(n),
            ..Default::default()
        }
    }

    /// Disks a and b: complete groups G1 (day 0) and G2 (day 1), then a alone (day 2).
    fn group_fixture() -> (tempfile::TempDir, Repo) {
        let t = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(t.path(), 4096).unwrap();
        let ab: &[&str] = &["a", "b"];
        member(&repo, "a1", "a", 0, Some(("G1", ab)));
        member(&repo, "b1", "b", 0, Some(("G1", ab)));
        member(&repo, "a2", "a", 1, Some(("G2", ab)));
        member(&repo, "b2", "b", 1, Some(("G2", ab)));
        member(&repo, "a3", "a", 2, None);
        (t, repo)
    }

    #[test]
    fn a_complete_group_is_kept_whole_when_a_rule_keeps_one_member() {
        let (t, repo) = group_fixture();
        // keep-last 1 keeps a3 (a) and b2 (b); b2 keeps a2 with it; G1 goes whole.
        let rep = prune(t.path(), &opts(last(1))).unwrap();
        assert_eq!(ids(&rep.kept_generations), ["a2", "a3", "b2"]);
        assert_eq!(ids(&rep.removed_generations), ["a1", "b1"]);
        assert_eq!(reasons(&rep, "a2"), ["kept with group G2"]);
        assert_eq!(reasons(&rep, "b2"), ["last 1"]);
        let gs = crate::repo::group::list(&repo).unwrap();
        assert_eq!(gs.len(), 1);
        assert!(gs[0].complete, "{:?}", gs[0]);
        let v = crate::repo::verify(t.path(), None).unwrap();
        assert!(v.ok, "{:?}", v.problems);
    }

    #[test]
    fn prune_of_one_disk_removes_no_member_of_a_complete_group() {
        let (t, repo) = group_fixture();
        let o = PruneOptions {
            disk: Some("a".into()),
            ..opts(last(1))
        };
        let rep = prune(t.path(), &o).unwrap();
        assert!(rep.removed_generations.is_empty(), "{rep:?}");
        assert_eq!(reasons(&rep, "a1"), ["kept with group G1"]);
        assert_eq!(reasons(&rep, "b1"), [OTHER_DISK]);
        assert!(crate::repo::group::list(&repo)
            .unwrap()
            .iter()
            .all(|g| g.complete));
    }

    #[test]
    fn members_of_an_incomplete_group_are_pruned_one_by_one() {
        let t = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(t.path(), 4096).unwrap();
        // Group I of a, b and c: c never published.
        let abc: &[&str] = &["a", "b", "c"];
        member(&repo, "ai", "a", 0, Some(("I", abc)));
        member(&repo, "bi", "b", 0, Some(("I", abc)));
        member(&repo, "a3", "a", 2, None);
        let rep = prune(t.path(), &opts(last(1))).unwrap();
        assert_eq!(ids(&rep.kept_generations), ["a3", "bi"]);
        assert_eq!(ids(&rep.removed_generations), ["ai"]);
    }
}
