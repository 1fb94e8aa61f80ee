//! Restore of a consistency group (`repo:DIR@GROUP`): every member disk onto its own
//! destination, given as `NAME=PATH,NAME=PATH` (NAME: a disk of the group).
//!
//! # Order of work
//!
//! 1. [`plan`] checks everything that can be checked without writing: the group is
//!    complete (an incomplete one is refused naming its missing disks), every disk of
//!    the group is named exactly once and no other name is given, and no two
//!    destinations are the same storage or overlap (by identity, as
//!    `dest_guard` sees them: a loop device and its backing file, a disk and its
//!    partition). The caller adds its own checks of each destination (attached origins,
//!    mounted devices) before it writes anything, so a refused restore changes nothing.
//! 2. [`restore_group`] takes the repository lock shared for the whole run (so a prune
//!    waits until every member is restored), checks each member generation is still
//!    there, then restores the members one after the other with [`super::restore_to`]
//!    (each already uses up to 4 threads; several disks at once would only compete for
//!    the same repository disk). A failure stops the run and says which destinations
//!    are restored, which one is incomplete (marked as `restore_to` marks it) and which
//!    were not started.

use super::{restore_to, RestoreReport};
use crate::dest_guard::{overlap, BlockTopology, Node, Overlap};
use crate::error::Result;
use crate::repo::{GenerationInfo, GroupInfo, Repo};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One member to restore.
#[derive(Debug, Clone)]
pub struct MemberPlan {
    /// The member generation.
    pub generation: GenerationInfo,
    /// Where it goes.
    pub dest: PathBuf,
}

/// A checked group restore: every member with its destination, in the group's disk
/// order.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    /// The group.
    pub group: GroupInfo,
    /// Its members.
    pub members: Vec<MemberPlan>,
}

/// Whether `s` has the form `NAME=...` with NAME a possible disk name (a path such as
/// `/x/a=b` or `./a=b` does not).
pub fn looks_like_destinations(s: &str) -> bool {
    s.split_once('=').is_some_and(|(n, _)| {
        !n.is_empty()
            && !n.starts_with(['.', '-'])
            && n.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_')
    })
}

/// Parse `NAME=PATH,NAME=PATH` (paths cannot hold a comma here).
pub fn parse_destinations(s: &str) -> Result<Vec<(String, PathBuf)>> {
    s.split(',')
        .map(|part| match part.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
            _ => Err(crate::err!(
                InvalidInput,
                "invalid destination {part:?}: expected NAME=PATH (in NAME1=PATH1,NAME2=PATH2)"
            )),
        })
        .collect()
}

/// `NAME=PATH,…` for the disks of `group`, as a hint in messages.
pub fn destinations_hint(group: &GroupInfo) -> String {
    group
        .disks
        .iter()
        .map(|d| format!("{d}=PATH"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Check a group restore (see the module notes, step 1) with the machine's block
/// topology. `all`: the repository's generations.
pub fn plan(
    group: &GroupInfo,
    all: &[GenerationInfo],
    dests: &[(String, PathBuf)],
) -> Result<GroupPlan> {
    plan_with_topology(group, all, dests, &BlockTopology::read())
}

/// [`plan`] over a given block topology (tests).
pub fn plan_with_topology(
    group: &GroupInfo,
    all: &[GenerationInfo],
    dests: &[(String, PathBuf)],
    topo: &BlockTopology,
) -> Result<GroupPlan> {
    let what = format!("unable to restore group {}", group.id);
    if !group.complete {
        let present: Vec<String> = group
            .members
            .iter()
            .map(|m| format!("{} ({})", m.generation, m.disk))
            .collect();
        return Err(crate::err!(
            InvalidInput,
            "{what}: it is {}, so it is no restore point; its members are single-disk generations and can be restored one by one: {}",
            group.status(),
            present.join(", ")
        ));
    }
    let mut seen = BTreeSet::new();
    for (name, _) in dests {
        if !group.disks.contains(name) {
            return Err(crate::err!(
                InvalidInput,
                "{what}: disk {name:?} is not in the group (its disks: {}); give --to {}",
                group.disks.join(", "),
                destinations_hint(group)
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(crate::err!(
                InvalidInput,
                "{what}: disk {name:?} is given more than one destination"
            ));
        }
    }
    let unnamed: Vec<&str> = group
        .disks
        .iter()
        .filter(|d| !seen.contains(d.as_str()))
        .map(|d| d.as_str())
        .collect();
    if !unnamed.is_empty() {
        return Err(crate::err!(
            InvalidInput,
            "{what}: no destination for disk(s) {}; every disk of the group needs one: --to {}",
            unnamed.join(", "),
            destinations_hint(group)
        ));
    }
    let nodes: Vec<Node> = dests.iter().map(|(_, p)| Node::of(p)).collect();
    for i in 0..dests.len() {
        for j in i + 1..dests.len() {
            let (a, pa) = (&dests[i].0, dests[i].1.display());
            let (b, pb) = (&dests[j].0, dests[j].1.display());
            let why = match overlap(topo, &nodes[i], &nodes[j]) {
                None => continue,
                Some(Overlap::Same) => format!(
                    "the destinations of disks {a} ({pa}) and {b} ({pb}) are the same storage"
                ),
                Some(Overlap::Contains) => {
                    format!("the destination of disk {a} ({pa}) contains that of disk {b} ({pb})")
                }
                Some(Overlap::PartOf) => {
                    format!("the destination of disk {a} ({pa}) is part of that of disk {b} ({pb})")
                }
            };
            return Err(crate::err!(InvalidInput, "{what}: {why}"));
        }
    }
    let mut members = Vec::new();
    for disk in &group.disks {
        let m = group.member_of(disk).ok_or_else(|| {
            crate::err!(NotFound, "{what}: disk {disk:?} has no generation in it")
        })?;
        let generation = all
            .iter()
            .find(|g| g.id == m.generation)
            .cloned()
            .ok_or_else(|| crate::err!(NotFound, "{what}: generation {} is gone", m.generation))?;
        let dest = dests
            .iter()
            .find(|(n, _)| n == disk)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| crate::err!(InvalidInput, "{what}: no destination for {disk}"))?;
        members.push(MemberPlan { generation, dest });
    }
    Ok(GroupPlan {
        group: group.clone(),
        members,
    })
}

/// Restore every member of a checked plan (see the module notes, step 2).
/// `progress(done, total)` counts bytes over all members together.
pub fn restore_group(
    repo_dir: &Path,
    plan: &GroupPlan,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Vec<RestoreReport>> {
    let what = format!("unable to restore group {}", plan.group.id);
    let repo = Repo::open(repo_dir)?;
    let _lock = repo.lock(false)?;
    let all = repo.list()?;
    for m in &plan.members {
        if !all.iter().any(|g| g.id == m.generation.id) {
            return Err(crate::err!(
                NotFound,
                "{what}: generation {} of disk {} is gone from {}; nothing was written",
                m.generation.id,
                m.generation.disk,
                repo_dir.display()
            ));
        }
    }
    let total: u64 = plan
        .members
        .iter()
        .map(|m| m.generation.disk_size)
        .fold(0, u64::saturating_add);
    let mut before = 0u64;
    let mut reports = Vec::new();
    for (k, m) in plan.members.iter().enumerate() {
        let at = before;
        let r = restore_to(repo_dir, Some(&m.generation.id), &m.dest, &|done, _| {
            progress(at.saturating_add(done), total)
        });
        match r {
            Ok(rep) => reports.push(rep),
            Err(e) => {
                let done: Vec<String> = plan.members[..k]
                    .iter()
                    .map(|m| format!("{} onto {}", m.generation.disk, m.dest.display()))
                    .collect();
                let left: Vec<String> = plan.members[k + 1..]
                    .iter()
                    .map(|m| format!("{} ({})", m.generation.disk, m.dest.display()))
                    .collect();
                return Err(e.with_context(format!(
                    "{what}: disk {} failed{}{}",
                    m.generation.disk,
                    if done.is_empty() {
                        String::new()
                    } else {
                        format!("; restored already: {}", done.join(", "))
                    },
                    if left.is_empty() {
                        String::new()
                    } else {
                        format!("; not started: {}", left.join(", "))
                    }
                )));
            }
        }
        before = before.saturating_add(m.generation.disk_size);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;
    use crate::repo::GroupRef;

    fn fixture(
        complete: bool,
    ) -> (
        tempfile::TempDir,
        Repo,
        GroupInfo,
        Vec<GenerationInfo>,
        Vec<Vec<u8>>,
    ) {
        let t = tempfile::tempdir().unwrap();
        let repo = Repo::open_or_create(&t.path().join("repo"), 4096).unwrap();
        let disks = ["a", "b", "c"];
        let mut imgs = Vec::new();
        for (k, d) in disks.iter().enumerate() {
            if !complete && *d == "c" {
                continue;
            }
            let img: Vec<u8> = (0..3 * 4096 + 512)
                .map(|i| (i as u8).wrapping_mul(k as u8 + 3))
                .collect();
            let id = format!("m-{d}");
            let mut g = make_gen(&repo, &id, &img);
            g.disk = d.to_string();
            g.group = Some(GroupRef {
                id: "G".into(),
                disks: disks.iter().map(|s| s.to_string()).collect(),
            });
            g.write(&repo.meta_path(&id)).unwrap();
            imgs.push(img);
        }
        let all = repo.list().unwrap();
        let gr = crate::repo::group::list(&repo).unwrap().remove(0);
        (t, repo, gr, all, imgs)
    }

    fn dests(t: &Path, names: &[&str]) -> Vec<(String, PathBuf)> {
        names
            .iter()
            .map(|n| (n.to_string(), t.join(format!("{n}.img"))))
            .collect()
    }

    fn files(t: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(t)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn destinations_parse_and_paths_are_told_apart() {
        let v = parse_destinations("a=/x/a.img,b=b.img").unwrap();
        assert_eq!(
            v,
            [
                ("a".to_string(), PathBuf::from("/x/a.img")),
                ("b".to_string(), PathBuf::from("b.img"))
            ]
        );
        assert!(parse_destinations("a=/x,b").is_err());
        assert!(parse_destinations("=x").is_err());
        assert!(parse_destinations("a=").is_err());
        assert!(looks_like_destinations("a=/x"));
        assert!(looks_like_destinations("vm-1.data=/x"));
        assert!(!looks_like_destinations("/x/a=b"));
        assert!(!looks_like_destinations("./a=b"));
        assert!(!looks_like_destinations("/x/a.img"));
    }

    #[test]
    fn a_plan_refuses_every_bad_mapping_before_anything_is_written() {
        let (t, _repo, gr, all, _) = fixture(true);
        let p = t.path();
        let topo = BlockTopology::empty();
        let err = |d: Vec<(String, PathBuf)>| {
            plan_with_topology(&gr, &all, &d, &topo)
                .unwrap_err()
                .to_string()
        };
        let e = err(dests(p, &["a", "b"]));
        assert!(
            e.contains("no destination for disk(s) c") && e.contains("a=PATH,b=PATH,c=PATH"),
            "{e}"
        );
        let e = err(dests(p, &["a", "b", "c", "d"]));
        assert!(e.contains("disk \"d\" is not in the group"), "{e}");
        let e = err(dests(p, &["a", "b", "c", "a"]));
        assert!(
            e.contains("disk \"a\" is given more than one destination"),
            "{e}"
        );
        // Two spellings of one file.
        let mut d = dests(p, &["a", "b", "c"]);
        std::fs::write(&d[1].1, b"x").unwrap();
        d[2].1 = p.join(".").join("b.img");
        let e = err(d.clone());
        assert!(e.contains("disks b") && e.contains("same storage"), "{e}");
        // A hard link is the same file too.
        std::fs::hard_link(&d[1].1, p.join("link.img")).unwrap();
        d[2].1 = p.join("link.img");
        assert!(err(d).contains("same storage"));
        assert_eq!(
            files(p),
            ["b.img", "link.img", "repo"],
            "a refused plan wrote something"
        );

        let ok = plan_with_topology(&gr, &all, &dests(p, &["c", "a", "b"]), &topo).unwrap();
        let order: Vec<&str> = ok
            .members
            .iter()
            .map(|m| m.generation.id.as_str())
            .collect();
        assert_eq!(order, ["m-a", "m-b", "m-c"]);
        assert_eq!(ok.members[2].dest, p.join("c.img"));
    }

    #[test]
    fn an_incomplete_group_is_refused_naming_the_missing_disk() {
        let (t, _repo, gr, all, _) = fixture(false);
        let e = plan_with_topology(
            &gr,
            &all,
            &dests(t.path(), &["a", "b"]),
            &BlockTopology::empty(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("incomplete (missing: disk c)"), "{e}");
        assert!(e.contains("m-a (a)"), "{e}");
    }

    #[test]
    fn every_member_is_restored_bit_exact() {
        let (t, repo, gr, all, imgs) = fixture(true);
        let d = dests(t.path(), &["a", "b", "c"]);
        let pl = plan_with_topology(&gr, &all, &d, &BlockTopology::empty()).unwrap();
        let last = std::sync::Mutex::new((0, 0));
        let reps = restore_group(repo.dir(), &pl, &|done, total| {
            *last.lock().unwrap() = (done, total);
        })
        .unwrap();
        assert_eq!(reps.len(), 3);
        for ((_, p), img) in d.iter().zip(&imgs) {
            assert!(std::fs::read(p).unwrap() == *img, "{} differs", p.display());
        }
        let total = 3 * imgs[0].len() as u64;
        assert_eq!(*last.lock().unwrap(), (total, total));
    }
}
