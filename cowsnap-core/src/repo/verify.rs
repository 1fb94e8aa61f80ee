//! Verification: re-read and re-hash every chunk the chosen generations reference.
//! Each distinct chunk is read once; a problem is reported for every generation and
//! offset that references it. A damaged chunk is moved to the quarantine as it is
//! found (see `chunk_store`), so the next backup holding its data stores it afresh.
//!
//! # Repair
//!
//! [`verify_repair`] then looks for a healthy copy of each damaged or missing chunk.
//! Chunks are named by the blake3 hash of their data, so any bytes hashing to the name
//! are that chunk:
//! 1. the store itself: a backup may have stored the data afresh meanwhile;
//! 2. each source given (the live disk's origin, a device or an image of the disk):
//!    the bytes at every offset where a damaged generation had the chunk are read
//!    (read only, one chunk at a time) and hashed; a match is stored.
//!
//! One stored copy heals every generation that references the hash. Afterwards each
//! affected generation is reported whole again or still damaged, with its offsets; the
//! report is `ok` only if every selected generation is whole. An unreadable index
//! cannot be repaired. The repository lock is held shared throughout (like a backup).
//!
//! # Progress
//!
//! The `_with_progress` variants call `progress(phase, done, total)` as they go:
//! [`Phase::Verify`] once per index entry (`total`: the entries of every selected
//! generation, from their metadata, so known before any index is read; an index that
//! cannot be read counts all its entries at once), then [`Phase::Repair`] once per
//! damaged chunk. `done` never goes back within a phase. The callback runs on the
//! verifying thread between chunks: it must be cheap (a counter, a rate-limited print).

use super::chunk_store::is_damage;
use super::Repo;
use crate::error::{IoContext, Result};
use crate::fsutil::hex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyProblem {
    /// Generation id.
    pub generation: String,
    /// Byte offset in the disk (`None`: the index itself).
    pub offset: Option<u64>,
    /// Chunk hash (hex).
    pub chunk: Option<String>,
    /// "missing", "corrupt", "index" or "metadata" (the generation's metadata cannot
    /// be read; its index is not checked).
    pub problem: String,
    /// Details.
    pub detail: String,
}

/// A chunk `verify --repair` stored again.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RepairedChunk {
    /// Chunk hash (hex).
    pub chunk: String,
    /// Where the healthy copy came from: "repository" or "PATH at offset N".
    pub from: String,
}

/// Outcome of a repair for one generation that had problems.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GenerationRepair {
    /// Generation id.
    pub generation: String,
    /// Whole after the repair.
    pub whole: bool,
    /// Offsets (index entries) repaired.
    pub repaired: u64,
    /// Offsets still damaged (`None`: the index itself).
    pub damaged: Vec<Option<u64>>,
}

/// What `verify --repair` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Sources searched for healthy copies.
    pub sources: Vec<String>,
    /// Chunks stored again.
    pub chunks_repaired: Vec<RepairedChunk>,
    /// Distinct chunks with no healthy copy found.
    pub chunks_unrepaired: Vec<String>,
    /// Each generation that had a problem.
    pub generations: Vec<GenerationRepair>,
}

/// Outcome of a verification.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Generations checked.
    pub generations: Vec<String>,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
    /// Index entries checked (zero chunks included).
    pub entries_checked: u64,
    /// Bytes of chunk data hashed.
    pub bytes_checked: u64,
    /// Problems, by generation and offset (as found, before any repair).
    pub problems: Vec<VerifyProblem>,
    /// Damaged chunk files moved to the quarantine by this run.
    pub quarantined: Vec<String>,
    /// With `--repair`: what was repaired and what was not.
    pub repair: Option<RepairReport>,
    /// No problems (with `--repair`: none left after it).
    pub ok: bool,
}

/// What a verification is doing when it reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Re-hashing chunks; counted in index entries.
    Verify,
    /// Looking for healthy copies; counted in damaged chunks.
    Repair,
}

impl Phase {
    /// "verify" or "repair".
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Verify => "verify",
            Phase::Repair => "repair",
        }
    }
}

/// Progress callback of a verification: `(phase, done, total)`.
pub type VerifyProgress<'a> = &'a dyn Fn(Phase, u64, u64);

fn no_progress(_: Phase, _: u64, _: u64) {}

/// Verify one generation or every member of a group (`Some(spec)`, resolved like
/// restore's, see [`super::group::resolve`]) or all of them.
pub fn verify(dir: &Path, generation: Option<&str>) -> Result<VerifyReport> {
    verify_with_progress(dir, generation, &no_progress)
}

/// [`verify`], reporting progress (see the module notes).
pub fn verify_with_progress(
    dir: &Path,
    generation: Option<&str>,
    progress: VerifyProgress,
) -> Result<VerifyReport> {
    let repo = Repo::open(dir)?;
    let _lock = repo.lock(false)?;
    Ok(run(&repo, generation, progress)?.0)
}

/// A damaged chunk and every place it is referenced.
struct Damaged {
    len: usize,
    refs: Vec<(String, u64)>,
}

/// Index entries of generation `g` according to its metadata.
fn entries_of(g: &super::GenerationInfo) -> u64 {
    match u64::from(g.chunk_size) {
        0 => 0,
        c => g.disk_size.div_ceil(c),
    }
}

fn run(
    repo: &Repo,
    generation: Option<&str>,
    progress: VerifyProgress,
) -> Result<(VerifyReport, BTreeMap<[u8; 32], Damaged>)> {
    let listed = repo.list_all()?;
    let mut rep = VerifyReport::default();
    // a whole-repository verify reports generations it cannot read (a named one, or a
    // pick one could change, is refused by the resolution)
    if generation.is_none() {
        for u in &listed.unreadable {
            rep.problems.push(VerifyProblem {
                generation: u.id.clone(),
                offset: None,
                chunk: None,
                problem: "metadata".into(),
                detail: u.why.clone(),
            });
        }
    }
    let gens = match generation {
        Some(s) => match super::group::resolve_listed(&listed, Some(s), repo.dir())? {
            super::Resolved::Generation(g) => vec![g],
            // Every member present (of an incomplete group too: they are generations).
            super::Resolved::Group(gr) => listed
                .generations
                .into_iter()
                .filter(|g| g.group.as_ref().is_some_and(|r| r.id == gr.id))
                .collect(),
        },
        None => listed.generations,
    };
    let total: u64 = gens.iter().map(entries_of).sum();
    let mut done = 0u64;
    progress(Phase::Verify, 0, total);
    let mut damaged: BTreeMap<[u8; 32], Damaged> = BTreeMap::new();
    let mut seen: HashMap<[u8; 32], Option<(String, String)>> = HashMap::new();
    for g in &gens {
        rep.generations.push(g.id.clone());
        let idx = match repo.load_index_from_store(g) {
            Ok(i) => i,
            Err(e) => {
                rep.problems.push(VerifyProblem {
                    generation: g.id.clone(),
                    offset: None,
                    chunk: None,
                    problem: "index".into(),
                    detail: e.to_string(),
                });
                done = done.saturating_add(entries_of(g)).min(total);
                progress(Phase::Verify, done, total);
                continue;
            }
        };
        // The data chunks; the zero chunks between them count as checked at once, so
        // the cost follows the data, not the disk size.
        let mut pos = 0u64;
        for (i, h) in idx.data() {
            rep.entries_checked += i + 1 - pos;
            // An index longer than its metadata says stretches the total, never `done`
            // past it.
            done += i + 1 - pos;
            pos = i + 1;
            progress(Phase::Verify, done, total.max(done));
            let len = idx.chunk_len(i);
            let res = seen.entry(*h).or_insert_with(|| {
                rep.chunks_checked += 1;
                match repo.store().read_no_quarantine(h, len) {
                    Ok(d) => {
                        rep.bytes_checked += d.len() as u64;
                        None
                    }
                    Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                        Some(("missing".into(), e.to_string()))
                    }
                    Err(e) if is_damage(&e) => {
                        match repo.store().quarantine_damaged(h, len) {
                            Ok(Some(q)) => {
                                rep.quarantined.push(q.display().to_string());
                                Some((
                                    "corrupt".into(),
                                    format!("{e}; moved to quarantine ({})", q.display()),
                                ))
                            }
                            Ok(None) => None, // healthy again (a backup replaced it)
                            Err(qe) => Some(("corrupt".into(), format!("{e}; {qe}"))),
                        }
                    }
                    Err(e) => Some(("unreadable".into(), e.to_string())),
                }
            });
            if let Some((problem, detail)) = res {
                let off = i * idx.chunk_size as u64;
                rep.problems.push(VerifyProblem {
                    generation: g.id.clone(),
                    offset: Some(off),
                    chunk: Some(hex(h)),
                    problem: problem.clone(),
                    detail: detail.clone(),
                });
                damaged
                    .entry(*h)
                    .or_insert(Damaged {
                        len,
                        refs: Vec::new(),
                    })
                    .refs
                    .push((g.id.clone(), off));
            }
        }
        let rest = idx.chunk_count().saturating_sub(pos);
        if rest > 0 {
            rep.entries_checked += rest;
            done += rest;
            progress(Phase::Verify, done, total.max(done));
        }
    }
    progress(Phase::Verify, total.max(done), total.max(done));
    rep.ok = rep.problems.is_empty();
    Ok((rep, damaged))
}

/// A source of healthy data for [`verify_repair`].
struct Source {
    name: String,
    file: std::fs::File,
    size: u64,
}

fn open_source(p: &Path) -> Result<Source> {
    let file = std::fs::File::open(p).ctx(|| format!("unable to open {}", p.display()))?;
    // Block devices report 0 in metadata: seek to the end instead.
    let size = {
        use std::io::Seek;
        let mut f = &file;
        f.seek(std::io::SeekFrom::End(0))
            .ctx(|| format!("unable to size {}", p.display()))?
    };
    Ok(Source {
        name: p.display().to_string(),
        file,
        size,
    })
}

/// Verify like [`verify`], then repair what can be repaired from the store and from
/// `sources` (files or devices holding the disk's data, read only). See the module
/// notes. Every source is opened before anything is touched.
pub fn verify_repair(
    dir: &Path,
    generation: Option<&str>,
    sources: &[PathBuf],
) -> Result<VerifyReport> {
    verify_repair_with_progress(dir, generation, sources, &no_progress)
}

/// [`verify_repair`], reporting progress (see the module notes).
pub fn verify_repair_with_progress(
    dir: &Path,
    generation: Option<&str>,
    sources: &[PathBuf],
    progress: VerifyProgress,
) -> Result<VerifyReport> {
    if super::object::is_s3(dir) {
        return Err(super::object::unsupported("repair", dir));
    }
    let repo = Repo::open(dir)?;
    let srcs = sources
        .iter()
        .map(|p| open_source(p))
        .collect::<Result<Vec<_>>>()?;
    let _lock = repo.lock(false)?;
    let (mut rep, damaged) = run(&repo, generation, progress)?;
    let to_repair = damaged.len() as u64;
    progress(Phase::Repair, 0, to_repair);
    let mut rr = RepairReport {
        sources: srcs.iter().map(|s| s.name.clone()).collect(),
        ..Default::default()
    };
    let mut healed: HashMap<[u8; 32], bool> = HashMap::new();
    let mut buf = Vec::new();
    for (h, d) in &damaged {
        let mut from = None;
        if repo.store().read_no_quarantine(h, d.len).is_ok() {
            from = Some("repository".to_string());
        }
        'search: for s in &srcs {
            let mut offs: Vec<u64> = d.refs.iter().map(|(_, o)| *o).collect();
            offs.sort_unstable();
            offs.dedup();
            for off in offs {
                if from.is_some() {
                    break 'search;
                }
                if off.checked_add(d.len as u64).is_none_or(|e| e > s.size) {
                    continue;
                }
                buf.resize(d.len, 0);
                if let Err(e) = s.file.read_exact_at(&mut buf, off) {
                    log::warn!("unable to read {} at offset {off}: {e}", s.name);
                    continue;
                }
                if repo.store().hash(&buf) == *h {
                    repo.store().insert(h, &buf).map_err(|e| {
                        e.with_context(format!("unable to repair chunk {}", hex(h)))
                    })?;
                    from = Some(format!("{} at offset {off}", s.name));
                }
            }
        }
        // Trust only what reads back.
        let ok = from.is_some() && repo.store().read_no_quarantine(h, d.len).is_ok();
        match (ok, from) {
            (true, Some(f)) => rr.chunks_repaired.push(RepairedChunk {
                chunk: hex(h),
                from: f,
            }),
            _ => rr.chunks_unrepaired.push(hex(h)),
        }
        healed.insert(*h, ok);
        progress(Phase::Repair, healed.len() as u64, to_repair);
    }
    repo.store().sync_dirs()?;
    let mut by_gen: BTreeMap<String, GenerationRepair> = BTreeMap::new();
    for p in &rep.problems {
        let e = by_gen
            .entry(p.generation.clone())
            .or_insert_with(|| GenerationRepair {
                generation: p.generation.clone(),
                whole: true,
                repaired: 0,
                damaged: Vec::new(),
            });
        let fixed = p
            .chunk
            .as_deref()
            .and_then(crate::fsutil::parse_hash)
            .is_some_and(|h| healed.get(&h).copied().unwrap_or(false));
        if fixed {
            e.repaired += 1;
        } else {
            e.whole = false;
            e.damaged.push(p.offset);
        }
    }
    rr.generations = by_gen.into_values().collect();
    rep.ok = rr.generations.iter().all(|g| g.whole);
    rep.repair = Some(rr);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;

    fn data(seed: u8, n: usize) -> Vec<u8> {
        let mut x = seed as u64 * 0x9e37_79b9 + 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn flip(p: &Path) {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        b[n - 10] ^= 0x55;
        std::fs::write(p, b).unwrap();
    }

    #[test]
    fn verify_quarantines_and_repair_heals_from_a_source_or_says_it_cannot() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        // g1 and g2 share chunk 1 (offset 4096); chunk 2 only in g1.
        let mut img1 = data(1, 3 * 4096 + 100);
        let mut img2 = img1.clone();
        img2[..4096].copy_from_slice(&data(9, 4096));
        img2[8192..12288].copy_from_slice(&data(10, 4096));
        make_gen(&repo, "20260101T000000.000Z-00000001", &img1);
        make_gen(&repo, "20260101T000001.000Z-00000002", &img2);
        let shared = crate::repo::chunk_store::chunk_hash(&img1[4096..8192]);
        let only1 = crate::repo::chunk_store::chunk_hash(&img1[8192..12288]);
        flip(&repo.store().path_of(&shared));
        flip(&repo.store().path_of(&only1));
        let rep = verify(d.path(), None).unwrap();
        assert!(!rep.ok);
        assert_eq!(rep.quarantined.len(), 2);
        assert_eq!(rep.problems.len(), 3, "{:?}", rep.problems);
        assert!(!repo.store().contains(&shared));
        // A second verify sees them missing (quarantined), not corrupt.
        let rep = verify(d.path(), None).unwrap();
        assert!(rep.problems.iter().all(|p| p.problem == "missing"));
        assert!(rep.problems[0].detail.contains("quarantine"));
        // Repair with a source holding g1's data except chunk 2 (changed since).
        img1[8192] ^= 1;
        let src = d.path().join("disk.img");
        std::fs::write(&src, &img1).unwrap();
        let rep = verify_repair(d.path(), None, std::slice::from_ref(&src)).unwrap();
        assert!(!rep.ok);
        let rr = rep.repair.unwrap();
        assert_eq!(rr.chunks_repaired.len(), 1);
        assert!(rr.chunks_repaired[0].from.contains("offset 4096"));
        assert_eq!(rr.chunks_unrepaired, vec![hex(&only1)]);
        let g1 = &rr.generations[0];
        assert!(!g1.whole);
        assert_eq!(g1.damaged, vec![Some(8192)]);
        assert_eq!(g1.repaired, 1);
        assert!(rr.generations[1].whole);
        verify(d.path(), Some("20260101T000001.000Z-00000002"))
            .map(|r| assert!(r.ok))
            .unwrap();
        // With the right data the last one heals too; everything verifies.
        img1[8192] ^= 1;
        std::fs::write(&src, &img1).unwrap();
        let rep = verify_repair(d.path(), None, &[src]).unwrap();
        assert!(rep.ok, "{:?}", rep.repair);
        assert!(verify(d.path(), None).unwrap().ok);
        // A source that does not exist is refused before anything is touched.
        assert!(verify_repair(d.path(), None, &[d.path().join("nope")]).is_err());
    }

    #[test]
    fn progress_counts_every_entry_once_and_never_goes_back() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        // 3 whole chunks + a partial one, twice: 8 entries.
        let img = data(3, 3 * 4096 + 100);
        make_gen(&repo, "20260101T000000.000Z-00000001", &img);
        make_gen(&repo, "20260101T000001.000Z-00000002", &img);
        let seen = std::cell::RefCell::new(Vec::new());
        let rep = verify_with_progress(d.path(), None, &|p, done, total| {
            seen.borrow_mut().push((p, done, total))
        })
        .unwrap();
        assert!(rep.ok);
        let seen = seen.into_inner();
        assert_eq!(seen.first(), Some(&(Phase::Verify, 0, 8)));
        assert_eq!(seen.last(), Some(&(Phase::Verify, 8, 8)));
        assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "{seen:?}");
        assert!(seen.iter().all(|&(_, done, total)| done <= total));
        // With --repair and nothing damaged: the repair phase has nothing to do.
        let seen = std::cell::RefCell::new(Vec::new());
        verify_repair_with_progress(d.path(), None, &[], &|p, done, total| {
            seen.borrow_mut().push((p, done, total))
        })
        .unwrap();
        assert_eq!(seen.into_inner().last(), Some(&(Phase::Repair, 0, 0)));
    }

    #[test]
    fn a_group_spec_verifies_every_member_and_only_them() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(d.path(), 4096).unwrap();
        let grp = crate::repo::GroupRef {
            id: "G".into(),
            disks: vec!["a".into(), "b".into()],
        };
        for (id, disk, seed, grp) in [
            ("ga", "a", 1, Some(grp.clone())),
            ("gb", "b", 2, Some(grp)),
            ("solo", "a", 3, None),
        ] {
            let mut g = make_gen(&repo, id, &data(seed, 2 * 4096));
            g.disk = disk.into();
            g.group = grp;
            g.write(&repo.meta_path(id)).unwrap();
        }
        let rep = verify(d.path(), Some("G")).unwrap();
        assert_eq!(rep.generations, ["ga", "gb"]);
        assert!(rep.ok);
        // Damage in b's member is found through the group.
        let h = crate::repo::chunk_store::chunk_hash(&data(2, 2 * 4096)[4096..]);
        flip(&repo.store().path_of(&h));
        let rep = verify(d.path(), Some("G")).unwrap();
        assert!(!rep.ok);
        assert_eq!(rep.problems[0].generation, "gb");
        assert_eq!(rep.problems[0].offset, Some(4096));
    }
}
