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
//! There is no lock (see `repo::object`), so backups on other hosts run during the
//! prune. Steps 1, 3 (pins are objects `PREFIX/pins/…`) and 4 are the same;
//! step 5 follows the rules of `repo::gc` instead: probe the store's clock; mark also
//! the indexes of the generations removed now, of generations removed (tombstoned)
//! less than the grace period ago or pinned (the pins listed again after the probe),
//! and of indexes without metadata younger than it;
//! unpublish each removed generation (its tombstone `generations/<id>.removed`, then
//! its metadata; the index stays for the grace period: a running incremental may be
//! taking its hashes); sweep, one page of the listing of `chunks/` at a time, the unmarked chunks
//! last modified more than the grace period before the probe; then remove what is
//! older than the grace period and no longer in use (tombstoned indexes and their
//! tombstones, indexes of killed backups, their start probes). All of it must happen
//! within an eighth of the grace period of the probe, each page's deletes within a
//! round of its listing; past that the prune stops (`chunks_collected` false) and a
//! later one goes on. Unmarked chunks still too young are counted
//! (`chunks_unreferenced`, `bytes_unreferenced`).

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
    /// Whether every collectable chunk was considered: false when a prune on an object
    /// store ran out of its time window before the end of the listing (a later prune goes on).
    pub chunks_collected: bool,
    /// Object stores: chunks nothing in use references that were left in place, being
    /// younger than the grace period (or met after a page's time was up).
    pub chunks_unreferenced: u64,
    /// Their bytes.
    pub bytes_unreferenced: u64,
    /// Object stores: the repository's grace period in seconds (see `repo::gc`).
    pub grace_secs: Option<u64>,
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
    prune_repo(&repo, opts)
}

/// [`prune`] of an opened repository (its policy checked).
pub(crate) fn prune_repo(repo: &Repo, opts: &PruneOptions) -> Result<PruneReport> {
    let dir = repo.dir();
    let _lock = repo.lock(true)?;
    let mut rep = PruneReport {
        chunks_collected: true,
        dry_run: opts.dry_run,
        disk: opts.disk.clone(),
        ..Default::default()
    };
    let listed = repo.list_all()?;
    // A generation whose metadata cannot be read would be neither kept nor removed,
    // and its chunks collected as garbage under its index: nothing is deleted.
    if let Some(u) = listed.unreadable.first() {
        return Err(crate::err!(
            Corrupt,
            "unable to prune {}: the metadata of generation {} cannot be read ({}); its chunks could be collected as garbage, so nothing is deleted ({} such generation(s)). Run cowsnapctl verify; to drop the generation, move its files (generations/{}.json and .idx) out of the repository",
            dir.display(),
            u.id,
            u.why,
            listed.unreadable.len(),
            u.id
        ));
    }
    let all = listed.generations;
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
    for p in pin::list(repo)? {
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
        if !opts.dry_run {
            for p in &stale {
                if let Some(name) = p.path.file_name() {
                    r.delete(&format!("pins/{}", name.to_string_lossy()))?;
                }
            }
        }
        return prune_object(repo, r, live, opts, rep);
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
    // Leftovers: indexes without metadata, temporary files (no backup runs now). An
    // index is removed only when its metadata is known to be absent: a metadata file
    // that cannot be looked up (an I/O error) keeps its index.
    if let Ok(rd) = std::fs::read_dir(&gdir) {
        for ent in rd {
            let ent = ent.ctx(|| format!("unable to list {}", gdir.display()))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let stray = name.starts_with(".tmp-")
                || name.strip_suffix(".idx").is_some_and(|id| {
                    valid_id(id) && matches!(repo.meta_path(id).try_exists(), Ok(false))
                });
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

/// The deleting half of [`prune`] on an object store, with no lock while backups on
/// other hosts run (rules P1 to P5 of `repo::gc`): probe the store's clock, mark what
/// is in use (`live`: the kept generations' chunks), unpublish the removed generations
/// behind tombstones, sweep unmarked chunks older than the grace period a page
/// of the listing at a time, and remove leftovers older than it. A dry run probes the clock (one object
/// written and deleted) and counts without deleting.
fn prune_object(
    repo: &Repo,
    r: &super::object::ObjectRepo,
    mut live: HashSet<[u8; 32]>,
    opts: &PruneOptions,
    mut rep: PruneReport,
) -> Result<PruneReport> {
    let grace = repo.grace();
    rep.grace_secs = Some((grace.millis() / 1000) as u64);
    let probe = format!("gc/probe-{}", fsutil::random_hex(8)?);
    let now = r.probe(&probe)?;
    let t0 = std::time::Instant::now();
    let res = prune_object_at(repo, r, &mut live, opts, &mut rep, now, t0);
    if let Err(e) = r.delete(&probe) {
        log::warn!("{e} (a later prune removes it)");
    }
    res.map(|()| rep)
}

/// Chunks listed a round of the sweep (S3's page: one request).
const SWEEP_PAGE: usize = 1000;

/// What one listing of `generations/`, `writers/` and `gc/` says, against the store
/// time `now` (see [`prune_object`]).
#[derive(Debug, Default, PartialEq)]
struct GenObjects {
    /// Indexes still in use though unpublished: tombstoned or without metadata, and
    /// younger than the grace period.
    in_use: Vec<String>,
    /// Objects older than the grace period to delete, in this order (an index before
    /// its tombstone).
    leftovers: Vec<String>,
}

/// Sort the objects of `generations/`, `writers/` and `gc/` (names and store times)
/// into indexes in use and leftovers, at the store time `now`. `removing`: the
/// generations this prune removes (their indexes stay, in use). `pinned`: generations
/// a pin listed after those names names; an unpublished (tombstoned) index of one is
/// in use whatever its age (rule P2'), so neither it nor its tombstone is a leftover.
fn classify(
    listed: &[super::object::Listed],
    removing: &HashSet<&str>,
    pinned: &HashSet<String>,
    grace: super::gc::Grace,
    now: i64,
) -> GenObjects {
    let mut out = GenObjects::default();
    let by_name: BTreeMap<&str, i64> = listed
        .iter()
        .map(|l| (l.name.as_str(), l.modified_ms))
        .collect();
    for l in listed {
        let name = l.name.as_str();
        if let Some(id) = name
            .strip_prefix("generations/")
            .and_then(|n| n.strip_suffix(".idx"))
        {
            if by_name.contains_key(format!("generations/{id}.json").as_str())
                || removing.contains(id)
            {
                continue; // published (kept, or removed now: in use for the grace)
            }
            // in use from its tombstone's time if it has one, else from its own
            let since = by_name
                .get(format!("generations/{id}.removed").as_str())
                .copied()
                .unwrap_or(l.modified_ms);
            if grace.in_use(since, now) || pinned.contains(id) {
                out.in_use.push(id.to_string());
            } else {
                out.leftovers.push(name.to_string());
            }
        } else if let Some(id) = name
            .strip_prefix("generations/")
            .and_then(|n| n.strip_suffix(".removed"))
        {
            let json = by_name.contains_key(format!("generations/{id}.json").as_str());
            // once its index has gone (listed as a leftover above, and sorted first)
            let idx_in_use = by_name
                .get(format!("generations/{id}.idx").as_str())
                .is_some_and(|_| out.in_use.iter().any(|u| u == id));
            if !json && !removing.contains(id) && !idx_in_use && !grace.in_use(l.modified_ms, now) {
                out.leftovers.push(name.to_string());
            }
        } else if (name.starts_with("writers/") || name.starts_with("gc/probe-"))
            && !grace.in_use(l.modified_ms, now)
        {
            out.leftovers.push(name.to_string());
        }
    }
    // every index before its tombstone
    out.leftovers.sort_by_key(|n| n.ends_with(".removed"));
    out
}

fn prune_object_at(
    repo: &Repo,
    r: &super::object::ObjectRepo,
    live: &mut HashSet<[u8; 32]>,
    opts: &PruneOptions,
    rep: &mut PruneReport,
    now: i64,
    t0: std::time::Instant,
) -> Result<()> {
    let grace = repo.grace();
    let window = grace.sweep_window();
    let too_slow = |what: &str| {
        crate::err!(
            Io,
            "unable to prune {}: {what} took longer than an eighth of the grace period ({} s); stopped, a later prune goes on",
            r.url(),
            grace.millis() / 1000
        )
    };
    // Mark (P2): besides the kept generations, the indexes of the generations removed
    // now, of tombstoned ones and of unpublished ones younger than the grace period.
    let mut listed = r.list_meta("generations/")?;
    listed.extend(r.list_meta("writers/")?);
    listed.extend(r.list_meta("gc/")?);
    // The pins again, listed after the probe and after `generations/` (P2'): a live
    // restore that pinned its generation while an earlier prune, which had listed the
    // pins before, removed it keeps that generation's chunks for as long as it pins it.
    let pinned: HashSet<String> = pin::list(repo)?
        .into_iter()
        .filter(|p| pin::stale_reason(p).is_none())
        .map(|p| p.generation)
        .collect();
    let removing: HashSet<&str> = rep.removed_generations.iter().map(|s| s.as_str()).collect();
    let objs = classify(&listed, &removing, &pinned, grace, now);
    for id in removing
        .iter()
        .copied()
        .chain(objs.in_use.iter().map(|s| s.as_str()))
    {
        let name = format!("generations/{id}.idx");
        let Some(b) = r.get(&name)? else { continue };
        let idx = super::FixedIndex::decode(&b, &format!("{}/{name}", r.url())).map_err(|e| {
            e.with_context(format!(
                "unable to prune {}: index {name} may be in use but is unreadable; nothing deleted",
                r.url()
            ))
        })?;
        live.extend(idx.data().map(|(_, h)| *h));
    }
    rep.leftovers_removed = objs.leftovers.len() as u64;

    // Unpublish (P3): the tombstone, then the metadata.
    if !opts.dry_run {
        for id in &rep.removed_generations {
            if t0.elapsed() > window {
                return Err(too_slow("unpublishing"));
            }
            r.put(&format!("generations/{id}.removed"), Vec::new())?;
            r.delete(&format!("generations/{id}.json"))?;
        }
    }

    // Sweep (P4), a page of the listing (one request) at a time.
    rep.chunks_collected = true;
    let mut after: Option<String> = None;
    loop {
        if t0.elapsed() > window {
            rep.chunks_collected = false;
            break;
        }
        let listed_at = std::time::Instant::now();
        let page = r.list_page("chunks/", after.as_deref(), SWEEP_PAGE)?;
        for c in &page {
            let Some(h) = c.name.rsplit('/').next().and_then(fsutil::parse_hash) else {
                continue;
            };
            if live.contains(&h) {
                rep.chunks_kept += 1;
                continue;
            }
            if !grace.collectable(c.modified_ms, now) || listed_at.elapsed() > grace.round() {
                rep.chunks_unreferenced += 1;
                rep.bytes_unreferenced += c.size;
                continue;
            }
            if !opts.dry_run {
                r.delete_within(&c.name, grace.request_timeout())?;
            }
            rep.chunks_removed += 1;
            rep.bytes_freed += c.size;
        }
        if page.len() < SWEEP_PAGE {
            break;
        }
        after = page.iter().map(|c| c.name.clone()).max();
    }

    // Leftovers older than the grace period (P5).
    if !opts.dry_run {
        for name in &objs.leftovers {
            r.delete(name)?;
        }
    }
    Ok(())
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

    #[test]
    fn a_generation_whose_metadata_cannot_be_read_stops_prune_and_fails_verify() {
        let (t, repo) = fixture();
        // d31's index is whole; its metadata is damaged (a torn write, a bad sector)
        std::fs::write(repo.meta_path("d31"), b"{\"id\": \"d31\", torn").unwrap();
        let before = tree(t.path());
        for o in [opts(daily(1)), opts(daily(30))] {
            let e = prune(t.path(), &o).unwrap_err();
            assert!(
                e.to_string().contains("generation d31 cannot be read"),
                "{e}"
            );
            assert_eq!(
                tree(t.path()),
                before,
                "a refused prune changed the repository"
            );
        }
        let v = crate::repo::verify(t.path(), None).unwrap();
        assert!(!v.ok);
        assert!(
            v.problems
                .iter()
                .any(|p| p.generation == "d31" && p.problem == "metadata"),
            "{:?}",
            v.problems
        );
        // once the damaged generation is moved out, prune works again
        let aside = tempfile::tempdir().unwrap();
        for f in [repo.meta_path("d31"), repo.index_path("d31")] {
            std::fs::rename(&f, aside.path().join(f.file_name().unwrap())).unwrap();
        }
        prune(t.path(), &opts(daily(1))).unwrap();
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

/// Garbage collection on an object store (in memory, grace period 4 s: the store's
/// clock is this host's), with backups interleaved adversarially.
#[cfg(test)]
mod object_tests {
    use super::*;
    use crate::repo::object::Listed;
    use crate::repo::testutil::{in_memory, meta, reopen, stage};
    use std::time::Duration;

    const GRACE: u64 = 4;

    fn past_grace() {
        std::thread::sleep(Duration::from_millis(GRACE * 1000 + 200));
    }

    /// An image of `n` 4 KiB chunks, chunk k filled with `seed + k`.
    fn img(seed: u8, n: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|k| vec![seed.wrapping_add(k); 4096])
            .collect()
    }

    fn publish(repo: &Repo, id: &str, disk: &str, created: u64, image: &[u8]) {
        stage(repo, id, image);
        repo.write_meta(&meta(id, disk, image.len() as u64, created))
            .unwrap();
    }

    fn names(repo: &Repo, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = repo
            .remote()
            .unwrap()
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    }

    fn chunk_names(repo: &Repo) -> Vec<String> {
        names(repo, "chunks/")
    }

    /// Every chunk of generation `id`'s index is in the store.
    fn whole(repo: &Repo, id: &str) -> bool {
        let g = repo
            .list()
            .unwrap()
            .into_iter()
            .find(|g| g.id == id)
            .unwrap();
        let idx = repo.load_index(&g).unwrap();
        let r = reopen(repo);
        let all = idx.data().all(|(_, h)| r.store().contains(h));
        all
    }

    fn keep1() -> PruneOptions {
        PruneOptions {
            time_zone: TimeZone::UTC,
            ..PruneOptions::keep_last(1)
        }
    }

    /// [`keep1`] as a dry run.
    fn keep1_dry() -> PruneOptions {
        PruneOptions {
            dry_run: true,
            ..keep1()
        }
    }

    #[test]
    fn garbage_is_collected_only_after_the_grace_period() {
        let repo = in_memory(GRACE);
        publish(&repo, "a", "d", 1000, &img(1, 3)); // chunks 1 2 3
        publish(&repo, "b", "d", 2000, &img(3, 3)); // chunks 3 4 5
                                                    // a backup killed after its index (chunks 50..52), one killed before it (60),
                                                    // and the start probe a crashed backup left
        stage(&repo, "k1", &img(50, 3));
        repo.store()
            .insert(
                &crate::repo::chunk_store::chunk_hash(&[60; 4096]),
                &[60; 4096],
            )
            .unwrap();
        repo.remote()
            .unwrap()
            .put("writers/k1", Vec::new())
            .unwrap();
        assert_eq!(chunk_names(&repo).len(), 9);

        let rep = prune_repo(&repo, &keep1()).unwrap();
        assert_eq!(rep.removed_generations, ["a"]);
        assert_eq!(rep.grace_secs, Some(GRACE));
        assert!(rep.chunks_collected);
        assert_eq!((rep.chunks_removed, rep.leftovers_removed), (0, 0));
        // a's index stays behind its tombstone; nothing else went
        assert_eq!(
            names(&repo, "generations/"),
            [
                "generations/a.idx",
                "generations/a.removed",
                "generations/b.idx",
                "generations/b.json",
                "generations/k1.idx"
            ]
        );
        assert_eq!(chunk_names(&repo).len(), 9);
        assert_eq!(names(&repo, "gc/"), Vec::<String>::new(), "the probe stays");

        past_grace();
        let before = (chunk_names(&repo), names(&repo, "generations/"));
        let dry = prune_repo(&repo, &keep1_dry()).unwrap();
        assert_eq!((chunk_names(&repo), names(&repo, "generations/")), before);
        let rep = prune_repo(&repo, &keep1()).unwrap();
        assert_eq!(
            (dry.chunks_removed, dry.leftovers_removed),
            (rep.chunks_removed, rep.leftovers_removed)
        );
        assert!(rep.removed_generations.is_empty());
        // a's own chunks 1 2, k1's 50 51 52, and 60
        assert_eq!(rep.chunks_removed, 6, "{rep:?}");
        assert_eq!(rep.leftovers_removed, 4, "{rep:?}"); // a.idx a.removed k1.idx writers/k1
        assert_eq!(
            names(&repo, "generations/"),
            ["generations/b.idx", "generations/b.json"]
        );
        assert!(names(&repo, "writers/").is_empty());
        assert_eq!(chunk_names(&repo).len(), 3);
        assert!(whole(&repo, "b"));
    }

    /// An incremental takes its parent's hashes unread; a prune removes the parent
    /// between the backup's start and its publish. The tombstone keeps the parent's
    /// chunks for the grace period, the backup publishes within a quarter of it, and
    /// afterwards its generation holds them.
    #[test]
    fn a_parent_pruned_mid_backup_keeps_its_chunks() {
        let host1 = in_memory(GRACE);
        publish(&host1, "a", "d", 1000, &img(1, 4));
        let host2 = reopen(&host1);
        host2.writer_begin("x").unwrap();
        let parent = host2
            .list()
            .unwrap()
            .into_iter()
            .find(|g| g.id == "a")
            .unwrap();
        let pidx = host2.load_index(&parent).unwrap();
        // meanwhile: a newer generation of d, and a prune that removes a
        publish(&host1, "c", "d", 2000, &img(100, 4));
        let host3 = reopen(&host1);
        let rep = prune_repo(&host3, &keep1()).unwrap();
        assert_eq!(rep.removed_generations, ["a"]);
        // the incremental: the parent's chunks 0..2, one new chunk
        let new = vec![200u8; 4096];
        let hn = crate::repo::chunk_store::chunk_hash(&new);
        host2.store().insert(&hn, &new).unwrap();
        let mut hashes: Vec<[u8; 32]> = pidx.data().map(|(_, h)| *h).collect();
        hashes[3] = hn;
        let idx = crate::repo::FixedIndex::from_hashes("x", 4096, 4 * 4096, &hashes).unwrap();
        host2.writer_before_publish().unwrap();
        host2.write_index(&idx).unwrap();
        host2.write_meta(&meta("x", "e", 4 * 4096, 3000)).unwrap();
        host2.writer_after_publish("x").unwrap();
        host2.writer_end("x");
        // a prune right away, and one after the grace period
        prune_repo(&host3, &keep1()).unwrap();
        assert!(whole(&host1, "x"));
        past_grace();
        let rep = prune_repo(&host3, &keep1()).unwrap();
        assert!(whole(&host1, "x"));
        assert!(whole(&host1, "c"));
        assert_eq!(rep.chunks_removed, 1, "a's chunk 3 only: {rep:?}");
    }

    /// A chunk listed as present but older than half the grace period is written
    /// again, not reused unwritten; if a prune that listed it before deletes it
    /// after, the backup notices before it publishes.
    #[test]
    fn a_stale_chunk_is_written_again_and_checked_before_publishing() {
        let host1 = in_memory(GRACE);
        let data = vec![7u8; 4096];
        let h = crate::repo::chunk_store::chunk_hash(&data);
        host1.store().insert(&h, &data).unwrap();
        let key = format!("chunks/{:02x}/{}", h[0], fsutil::hex(&h));
        let r = host1.remote().unwrap().clone();
        let old = r.modified(&key).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(GRACE * 500 + 100));

        let host2 = reopen(&host1);
        host2.writer_begin("y").unwrap();
        assert!(matches!(
            host2.store().insert(&h, &data).unwrap(),
            crate::repo::chunk_store::Insert::Reused
        ));
        assert!(
            r.modified(&key).unwrap().unwrap() > old,
            "not written again"
        );
        host2.writer_before_publish().unwrap();
        host2.writer_end("y");

        // the race: the refresh lands between a prune's listing and its delete
        std::thread::sleep(Duration::from_millis(GRACE * 500 + 100));
        let host3 = reopen(&host1);
        host3.writer_begin("z").unwrap();
        host3.store().insert(&h, &data).unwrap();
        r.delete(&key).unwrap(); // the prune's delete
        let e = host3.writer_before_publish().unwrap_err();
        assert!(
            e.to_string().contains("deleted by a concurrent prune"),
            "{e}"
        );
        host3.writer_end("z");
        assert!(names(&host3, "writers/").is_empty());

        // a new chunk PUT right after the listing: an old copy a prune listed before
        // our listing may be deleted only now, so it is checked too
        let host4 = reopen(&host1);
        host4.writer_begin("n").unwrap();
        let fresh = vec![8u8; 4096];
        let hf = crate::repo::chunk_store::chunk_hash(&fresh);
        assert!(matches!(
            host4.store().insert(&hf, &fresh).unwrap(),
            crate::repo::chunk_store::Insert::New(_)
        ));
        r.delete(&format!("chunks/{:02x}/{}", hf[0], fsutil::hex(&hf)))
            .unwrap();
        let e = host4.writer_before_publish().unwrap_err();
        assert!(
            e.to_string().contains("deleted by a concurrent prune"),
            "{e}"
        );
    }

    /// A chunk written recently by another backup is reused unwritten.
    #[test]
    fn a_recent_chunk_is_reused_unwritten() {
        let host1 = in_memory(GRACE);
        let data = vec![9u8; 4096];
        let h = crate::repo::chunk_store::chunk_hash(&data);
        host1.store().insert(&h, &data).unwrap();
        let r = host1.remote().unwrap().clone();
        let host2 = reopen(&host1);
        host2.writer_begin("w").unwrap();
        let before = r.requests();
        host2.store().insert(&h, &data).unwrap();
        // one listing, no PUT
        assert_eq!(r.requests() - before, 1);
        assert_eq!(host2.store().writer_check_refreshed().unwrap(), 0);
    }

    /// A backup that publishes later than a quarter of the grace period after its
    /// start unpublishes again and fails.
    #[test]
    fn a_backup_that_overruns_unpublishes_again() {
        let repo = in_memory(GRACE);
        repo.writer_begin("late").unwrap();
        std::thread::sleep(Duration::from_millis(GRACE * 250 + 100));
        stage(&repo, "late", &img(1, 2));
        repo.write_meta(&meta("late", "d", 2 * 4096, 1)).unwrap();
        let e = repo.writer_after_publish("late").unwrap_err();
        assert!(e.to_string().contains("unpublished again"), "{e}");
        assert!(repo.list().unwrap().is_empty());
        // in time: published
        repo.writer_begin("ok").unwrap();
        publish(&repo, "ok", "d", 2, &img(1, 2));
        repo.writer_after_publish("ok").unwrap();
        assert_eq!(repo.list().unwrap().len(), 1);
    }

    /// A live restore pins generation `a` just as a prune that listed the pins before
    /// removes it (the pin lands after that listing, the tombstone after the pin). The
    /// fill may last longer than the grace period: every later prune sees the pin and
    /// keeps the tombstoned generation's index and chunks until the pin goes.
    #[test]
    fn a_pin_keeps_a_tombstoned_generations_chunks() {
        let host1 = in_memory(GRACE);
        publish(&host1, "a", "d", 1000, &img(1, 3)); // chunks 1 2 3
        publish(&host1, "c", "d", 2000, &img(100, 3));
        let rep = prune_repo(&host1, &keep1()).unwrap();
        assert_eq!(rep.removed_generations, ["a"]);
        // the restore's pin, PUT after that prune listed the pins
        let pin = crate::repo::pin::restore_pin("a", "elsewhere", "");
        let r = host1.remote().unwrap().clone();
        r.put("pins/a.0123abcd.json", serde_json::to_vec(&pin).unwrap())
            .unwrap();
        // the fill outlasts the grace period; prunes run meanwhile
        past_grace();
        let host2 = reopen(&host1);
        let rep = prune_repo(&host2, &keep1()).unwrap();
        assert!(rep.chunks_collected);
        assert_eq!(rep.chunks_removed, 0, "{rep:?}");
        assert!(names(&host1, "generations/").contains(&"generations/a.idx".to_string()));
        let b = r.get("generations/a.idx").unwrap().unwrap();
        let idx = crate::repo::FixedIndex::decode(&b, "a.idx").unwrap();
        assert!(idx.data().all(|(_, h)| host2.store().contains(h)));
        // the fill completes and unpins: the next prune collects a
        r.delete("pins/a.0123abcd.json").unwrap();
        let rep = prune_repo(&host2, &keep1()).unwrap();
        assert_eq!(rep.chunks_removed, 3, "{rep:?}");
        assert_eq!(
            names(&host1, "generations/"),
            ["generations/c.idx", "generations/c.json"]
        );
        assert!(whole(&host1, "c"));
    }

    /// A pin whose fill state on this host is gone pins nothing: prune removes the
    /// object (as it says), and collects the generation.
    #[test]
    fn a_stale_pin_is_removed() {
        let repo = in_memory(GRACE);
        publish(&repo, "a", "d", 1000, &img(1, 2));
        publish(&repo, "c", "d", 2000, &img(100, 2));
        let pin = crate::repo::pin::restore_pin(
            "a",
            &crate::repo::pin::host_name(),
            "/nonexistent/cowsnap-test/fill.state",
        );
        let r = repo.remote().unwrap().clone();
        r.put("pins/a.0123abcd.json", serde_json::to_vec(&pin).unwrap())
            .unwrap();
        let dry = prune_repo(&repo, &keep1_dry()).unwrap();
        assert_eq!(dry.stale_pins_removed.len(), 1, "{dry:?}");
        assert_eq!(names(&repo, "pins/").len(), 1, "a dry run removes nothing");
        let rep = prune_repo(&repo, &keep1()).unwrap();
        assert_eq!(rep.stale_pins_removed.len(), 1, "{rep:?}");
        assert_eq!(rep.removed_generations, ["a"]);
        assert!(names(&repo, "pins/").is_empty());
    }

    fn l(name: &str, t: i64) -> Listed {
        Listed {
            name: name.into(),
            size: 0,
            modified_ms: t,
        }
    }

    #[test]
    fn unpublished_objects_are_in_use_for_the_grace_period() {
        let g = crate::repo::gc::Grace::from_secs(100);
        let now = 1_000_000;
        let old = now - 100_001;
        let young = now - 99_000;
        let listed = [
            l("generations/a.idx", old),
            l("generations/a.json", old),
            l("generations/b.idx", old), // tombstoned long ago
            l("generations/b.removed", old),
            l("generations/c.idx", old), // tombstoned recently
            l("generations/c.removed", young),
            l("generations/d.idx", young), // a backup about to publish
            l("generations/e.idx", old),   // a killed backup's
            l("generations/f.removed", old), // its index already gone
            l("generations/g.idx", old),   // removed by this prune
            l("generations/g.json", old),
            l("writers/h", old),
            l("writers/i", young),
            l("gc/probe-1", old),
            l("generations/j.idx", old), // tombstoned long ago, but pinned
            l("generations/j.removed", old),
        ];
        let removing: HashSet<&str> = ["g"].into_iter().collect();
        let pinned: HashSet<String> = ["j".to_string(), "a".to_string()].into_iter().collect();
        let o = classify(&listed, &removing, &pinned, g, now);
        assert_eq!(o.in_use, ["c", "d", "j"]);
        assert_eq!(
            o.leftovers,
            [
                "generations/b.idx",
                "generations/e.idx",
                "writers/h",
                "gc/probe-1",
                "generations/b.removed",
                "generations/f.removed"
            ]
        );
    }
}
