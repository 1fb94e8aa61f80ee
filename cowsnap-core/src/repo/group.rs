//! Consistency groups in a repository: several disks' generations taken at one
//! snapshot instant (see `backup::group`).
//!
//! # Design notes
//!
//! A group has no file of its own: it is derived from its members' metadata. Each
//! member generation carries `group: {id, disks}` ([`GroupRef`]), `disks` being every
//! disk of the group. A group is a *restore point* (complete) when each of its disks
//! holds exactly one published generation carrying its id; otherwise it is incomplete
//! (a member failed to publish, or a prune of an older version removed one) and its
//! members stay what they always are as well: valid single-disk generations.
//!
//! Why no group record: a record written by the coordinator would need the coordinator
//! to live until the last member is published (a coordinator dying in between would
//! leave a record naming generations that never appear, or members without a record),
//! while member metadata is published atomically by each member's own writer. Remote
//! repositories later prefer per-writer objects for the same reason: no object is
//! written by two parties.
//!
//! - `disks` is the union of what every member says plus the members' own disks (they
//!   agree unless metadata was edited by hand): a group is never called complete on a
//!   smaller list than any member recorded.
//! - A disk holding two generations with the group's id (only by hand-editing) makes
//!   the group inconsistent: listed, never a restore point.
//! - The group's instant is its members' (they share it); the earliest `created_unix`
//!   among them is shown.
//!
//! # Resolving `repo:DIR@SPEC` ([`resolve`])
//!
//! In order: a generation id; a group id; a disk name (its newest generation); a prefix
//! of exactly one generation id or group id. Group ids and generation ids are drawn the
//! same way (UTC time in ms and 32 random bits), so an id naming both is practically
//! impossible; should one ever do, the id (and any prefix of it) names the generation,
//! the older meaning of `@ID`, and the group cannot be named: its members are still
//! restored one by one.

use super::generation::GroupRef;
use super::{GenerationInfo, Listed, Repo};
use crate::error::Result;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One member generation of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    /// Disk name.
    pub disk: String,
    /// Generation id.
    pub generation: String,
    /// Disk size in bytes.
    pub disk_size: u64,
}

/// A consistency group as the repository holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// Group id.
    pub id: String,
    /// The snapshot instant (RFC 3339 UTC), from the members.
    pub created: String,
    /// The snapshot instant, seconds since the epoch.
    pub created_unix: u64,
    /// Every disk of the group, sorted.
    pub disks: Vec<String>,
    /// The published member generations, sorted by disk (then id).
    pub members: Vec<GroupMember>,
    /// Disks of the group holding no generation of it.
    pub missing: Vec<String>,
    /// Disks holding more than one generation of it (the group is then no restore point).
    pub conflicting: Vec<String>,
    /// Every disk has exactly one generation of the group: a restore point.
    pub complete: bool,
}

impl GroupInfo {
    /// "complete", "incomplete (missing: disk a, disk b)" or "inconsistent (disk a has
    /// several generations of it)".
    pub fn status(&self) -> String {
        if self.complete {
            return "complete".into();
        }
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            let m: Vec<String> = self.missing.iter().map(|d| format!("disk {d}")).collect();
            parts.push(format!("incomplete (missing: {})", m.join(", ")));
        }
        if !self.conflicting.is_empty() {
            let m: Vec<String> = self
                .conflicting
                .iter()
                .map(|d| format!("disk {d}"))
                .collect();
            parts.push(format!(
                "inconsistent ({} with several generations of it)",
                m.join(", ")
            ));
        }
        parts.join(", ")
    }

    /// The generation of `disk` in the group (the first one if it is conflicting).
    pub fn member_of(&self, disk: &str) -> Option<&GroupMember> {
        self.members.iter().find(|m| m.disk == disk)
    }
}

/// The groups `gens` (a repository's generations) belong to, sorted by id.
pub fn groups_of(gens: &[GenerationInfo]) -> Vec<GroupInfo> {
    let mut by_id: BTreeMap<&str, Vec<&GenerationInfo>> = BTreeMap::new();
    for g in gens {
        if let Some(r) = &g.group {
            by_id.entry(r.id.as_str()).or_default().push(g);
        }
    }
    by_id
        .into_iter()
        .map(|(id, members)| build(id, &members))
        .collect()
}

fn build(id: &str, gens: &[&GenerationInfo]) -> GroupInfo {
    let mut disks: BTreeSet<String> = BTreeSet::new();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for g in gens {
        if let Some(GroupRef { disks: d, .. }) = &g.group {
            disks.extend(d.iter().cloned());
        }
        disks.insert(g.disk.clone());
        *count.entry(g.disk.as_str()).or_default() += 1;
    }
    let mut members: Vec<GroupMember> = gens
        .iter()
        .map(|g| GroupMember {
            disk: g.disk.clone(),
            generation: g.id.clone(),
            disk_size: g.disk_size,
        })
        .collect();
    members.sort_by(|a, b| (&a.disk, &a.generation).cmp(&(&b.disk, &b.generation)));
    let missing: Vec<String> = disks
        .iter()
        .filter(|d| !count.contains_key(d.as_str()))
        .cloned()
        .collect();
    let conflicting: Vec<String> = count
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(d, _)| d.to_string())
        .collect();
    // `gens` is never empty: a group exists because a generation names it.
    let first = gens.iter().min_by_key(|g| (g.created_unix, &g.id));
    GroupInfo {
        id: id.to_string(),
        created: first.map(|g| g.created.clone()).unwrap_or_default(),
        created_unix: first.map_or(0, |g| g.created_unix),
        disks: disks.into_iter().collect(),
        complete: missing.is_empty() && conflicting.is_empty(),
        members,
        missing,
        conflicting,
    }
}

/// Every group of the repository, sorted by id.
pub fn list(repo: &Repo) -> Result<Vec<GroupInfo>> {
    Ok(groups_of(&repo.list()?))
}

/// What `repo:DIR@SPEC` names.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// One generation.
    Generation(GenerationInfo),
    /// A consistency group (complete or not: the caller decides what it accepts).
    Group(GroupInfo),
}

/// Resolve a spec that may name a group (see the module notes for the order): a
/// generation id, a group id, a disk name, a unique prefix of either id, or `None` (the
/// newest generation when the repository holds one disk).
pub fn resolve(repo: &Repo, spec: Option<&str>) -> Result<Resolved> {
    resolve_listed(&repo.list_all()?, spec, repo.dir())
}

/// [`resolve_in`] over a [`Listed`], refusing a spec or a pick that a generation whose
/// metadata cannot be read could change ([`Listed::check_spec`], [`Listed::check_pick`]).
pub fn resolve_listed(listed: &Listed, spec: Option<&str>, dir: &Path) -> Result<Resolved> {
    listed.check_spec(spec, dir)?;
    let r = resolve_in(&listed.generations, spec, dir)?;
    if let Resolved::Generation(g) = &r {
        listed.check_pick(spec, g, dir)?;
    }
    Ok(r)
}

/// [`resolve`] over the generations `all` of the repository at `dir`.
pub fn resolve_in(all: &[GenerationInfo], spec: Option<&str>, dir: &Path) -> Result<Resolved> {
    let Some(s) = spec else {
        return super::resolve_in(all, None, dir).map(Resolved::Generation);
    };
    if let Some(g) = all.iter().find(|g| g.id == s) {
        return Ok(Resolved::Generation(g.clone()));
    }
    let groups = groups_of(all);
    if let Some(gr) = groups.iter().find(|gr| gr.id == s) {
        return Ok(Resolved::Group(gr.clone()));
    }
    if let Some(g) = all.iter().rev().find(|g| g.disk == s) {
        return Ok(Resolved::Generation(g.clone()));
    }
    let gens: Vec<&GenerationInfo> = all.iter().filter(|g| g.id.starts_with(s)).collect();
    // A group id that is also a generation id names the generation.
    let grps: Vec<&GroupInfo> = groups
        .iter()
        .filter(|gr| gr.id.starts_with(s) && !all.iter().any(|g| g.id == gr.id))
        .collect();
    let dir = dir.display();
    match (gens.as_slice(), grps.as_slice()) {
        ([g], []) => Ok(Resolved::Generation((*g).clone())),
        ([], [gr]) => Ok(Resolved::Group((*gr).clone())),
        ([], []) => Err(crate::err!(
            NotFound,
            "unable to find generation or group {s:?} in repository {dir}"
        )),
        (g, gr) => Err(crate::err!(
            InvalidInput,
            "unable to pick a generation: {s:?} matches {} generation(s) and {} group(s) in {dir}; give more of the id",
            g.len(),
            gr.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testutil::make_gen;

    /// A generation `id` of `disk`, in group `group` of `disks` if given.
    fn gen(repo: &Repo, id: &str, disk: &str, group: Option<(&str, &[&str])>) -> GenerationInfo {
        let mut g = make_gen(repo, id, &[disk.len() as u8; 4096]);
        g.disk = disk.into();
        g.created_unix = 1000 + id.len() as u64;
        g.created = format!("t{id}");
        g.group = group.map(|(gid, disks)| GroupRef {
            id: gid.into(),
            disks: disks.iter().map(|d| d.to_string()).collect(),
        });
        g.write(&repo.meta_path(id)).unwrap();
        g
    }

    fn repo() -> (tempfile::TempDir, Repo) {
        let t = tempfile::tempdir().unwrap();
        let r = Repo::open_or_create(t.path(), 4096).unwrap();
        (t, r)
    }

    #[test]
    fn a_generation_whose_metadata_cannot_be_read_is_never_picked_around() {
        let (_t, r) = repo();
        for id in [
            "20261201T000000.000Z-01",
            "20261203T000000.000Z-02",
            "20261203T120000.000Z-03",
        ] {
            gen(&r, id, "d", None);
        }
        let (old, mid, new) = (
            "20261201T000000.000Z-01",
            "20261203T000000.000Z-02",
            "20261203T120000.000Z-03",
        );
        // healthy: the newest
        assert_eq!(r.resolve(None).unwrap().id, new);
        // the newest's metadata is torn: "the newest" and "disk d" are refused, not
        // answered with the one before it
        std::fs::write(r.meta_path(new), b"{ torn").unwrap();
        for spec in [None, Some("d")] {
            let e = r.resolve(spec).unwrap_err().to_string();
            assert!(
                e.contains(&format!("generation {new}, newer than {mid}")),
                "{e}"
            );
            let e = resolve(&r, spec).unwrap_err().to_string();
            assert!(e.contains("cannot be read"), "{e}");
        }
        // naming it, or a prefix only it matches, says why it cannot be used; a prefix
        // matching it and another is ambiguous
        for spec in [new, "20261203T12"] {
            let e = r.resolve(Some(spec)).unwrap_err().to_string();
            assert!(e.contains("its metadata cannot be read"), "{e}");
        }
        let e = r.resolve(Some("20261203T")).unwrap_err().to_string();
        assert!(e.contains("cannot be read"), "{e}");
        // an older one named, or a prefix only it matches, still resolves
        assert_eq!(r.resolve(Some(mid)).unwrap().id, mid);
        assert_eq!(r.resolve(Some("20261201")).unwrap().id, old);
        // an unreadable generation older than the newest changes nothing
        gen(&r, new, "d", None);
        std::fs::write(r.meta_path(old), b"{ torn").unwrap();
        assert_eq!(r.resolve(None).unwrap().id, new);
        assert_eq!(r.resolve(Some("d")).unwrap().id, new);
    }

    #[test]
    fn complete_and_incomplete_groups_are_derived_from_the_members() {
        let (_t, r) = repo();
        let ab: &[&str] = &["a", "b"];
        gen(&r, "g1-a", "a", Some(("G1", ab)));
        gen(&r, "g1-b", "b", Some(("G1", ab)));
        gen(&r, "g2-a", "a", Some(("G2", ab))); // b failed to publish
        gen(&r, "solo", "a", None);
        let gs = list(&r).unwrap();
        assert_eq!(gs.len(), 2);
        let g1 = &gs[0];
        assert_eq!(g1.id, "G1");
        assert!(g1.complete);
        assert_eq!(g1.status(), "complete");
        assert_eq!(g1.disks, ["a", "b"]);
        let m: Vec<(&str, &str)> = g1
            .members
            .iter()
            .map(|m| (m.disk.as_str(), m.generation.as_str()))
            .collect();
        assert_eq!(m, [("a", "g1-a"), ("b", "g1-b")]);
        assert_eq!(g1.created_unix, 1004);
        assert_eq!(g1.created, "tg1-a");
        let g2 = &gs[1];
        assert!(!g2.complete);
        assert_eq!(g2.missing, ["b"]);
        assert_eq!(g2.status(), "incomplete (missing: disk b)");
        assert_eq!(g2.member_of("a").unwrap().generation, "g2-a");
        assert!(g2.member_of("b").is_none());
    }

    #[test]
    fn members_disagreeing_on_disks_or_doubled_never_make_a_restore_point() {
        let (_t, r) = repo();
        // a says the group is {a, b}; b says {a, b, c}: c is missing.
        gen(&r, "x-a", "a", Some(("X", &["a", "b"])));
        gen(&r, "x-b", "b", Some(("X", &["a", "b", "c"])));
        // Two generations of disk a in group Y.
        gen(&r, "y-a1", "a", Some(("Y", &["a", "b"])));
        gen(&r, "y-a2", "a", Some(("Y", &["a", "b"])));
        gen(&r, "y-b", "b", Some(("Y", &["a", "b"])));
        let gs = list(&r).unwrap();
        assert_eq!(gs[0].disks, ["a", "b", "c"]);
        assert_eq!(gs[0].missing, ["c"]);
        assert!(!gs[0].complete);
        assert_eq!(gs[1].conflicting, ["a"]);
        assert!(gs[1].missing.is_empty());
        assert!(!gs[1].complete);
        assert!(
            gs[1].status().starts_with("inconsistent"),
            "{}",
            gs[1].status()
        );
    }

    fn name(r: Resolved) -> String {
        match r {
            Resolved::Generation(g) => format!("gen {}", g.id),
            Resolved::Group(g) => format!("group {}", g.id),
        }
    }

    #[test]
    fn resolve_names_generations_groups_disks_and_prefixes() {
        let (_t, r) = repo();
        let ab: &[&str] = &["a", "b"];
        gen(&r, "20261206T1-a", "a", Some(("20261206T1-G", ab)));
        gen(&r, "20261206T1-b", "b", Some(("20261206T1-G", ab)));
        gen(&r, "20261206T2-a", "a", None);
        let res = |s: &str| resolve(&r, Some(s)).map(name);
        assert_eq!(res("20261206T1-a").unwrap(), "gen 20261206T1-a");
        assert_eq!(res("20261206T1-G").unwrap(), "group 20261206T1-G");
        assert_eq!(
            res("20261206T1-").unwrap_err().kind(),
            crate::ErrorKind::InvalidInput
        );
        let e = res("20261206T1").unwrap_err().to_string();
        assert!(e.contains("2 generation(s) and 1 group(s)"), "{e}");
        assert_eq!(
            res("20261206T1-g").unwrap_err().kind(),
            crate::ErrorKind::NotFound
        );
        assert_eq!(res("a").unwrap(), "gen 20261206T2-a");
        assert_eq!(res("b").unwrap(), "gen 20261206T1-b");
        assert_eq!(res("20261206T2").unwrap(), "gen 20261206T2-a");
        // A unique prefix of a group id.
        gen(&r, "zz-a", "a", Some(("ZZ-group", &["a"])));
        assert_eq!(res("ZZ").unwrap(), "group ZZ-group");
        // Several disks: no default.
        assert!(resolve(&r, None).is_err());
    }

    #[test]
    fn an_id_naming_a_generation_and_a_group_names_the_generation() {
        let (_t, r) = repo();
        let ab: &[&str] = &["a", "b"];
        gen(&r, "same", "c", None);
        gen(&r, "m-a", "a", Some(("same", ab)));
        gen(&r, "m-b", "b", Some(("same", ab)));
        assert_eq!(name(resolve(&r, Some("same")).unwrap()), "gen same");
        // And a prefix of it too, rather than calling it ambiguous.
        assert_eq!(name(resolve(&r, Some("sa")).unwrap()), "gen same");
    }

    #[test]
    fn a_group_id_given_where_one_generation_is_needed_names_the_members() {
        let (_t, r) = repo();
        let ab: &[&str] = &["a", "b"];
        gen(&r, "m-a", "a", Some(("G", ab)));
        gen(&r, "m-b", "b", Some(("G", ab)));
        let e = r.resolve(Some("G")).unwrap_err().to_string();
        assert!(e.contains("\"G\" is a consistency group"), "{e}");
        assert!(e.contains("m-a (a), m-b (b)"), "{e}");
        let e = r.resolve(Some("H")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    }
}
