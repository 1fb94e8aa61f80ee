//! Repository commands: `list`, `verify` (`--repair`), `prune`, `restore` (offline, or
//! `--live`: the destination is attached at once and filled from the repository while
//! in use) and `abandon` (give up an interrupted live restore, unpinning its generation).

use crate::attach::{self, AttachArgs};
use crate::parse::human_bytes;
use crate::progress::{self, Reporter, Unit};
use crate::Dirs;
use anyhow::{anyhow, bail, Result};
use cowsnap_core::origin_seal;
use cowsnap_core::repo::{self, Repo, RetentionPolicy};
use cowsnap_core::restore;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `repo:DIR[@GEN]` → (DIR, GEN) ([`cowsnap_nbd::paths::parse_repo_spec`]).
pub fn parse_repo_spec(spec: &str) -> Result<(PathBuf, Option<String>)> {
    Ok(cowsnap_nbd::paths::parse_repo_spec(spec)?)
}

/// Arguments of `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The repository: repo:DIR.
    pub repo: String,
    /// List the consistency groups only (id, instant, members, complete or which disks
    /// are missing); with --json an array of groups.
    #[arg(long)]
    pub groups: bool,
    /// Print JSON: an array of generations (a member of a group carries
    /// "group": {"id", "disks"}), or with --groups an array of groups.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl list repo:DIR [--groups]`.
pub fn list(a: ListArgs) -> Result<i32> {
    let (dir, gen) = parse_repo_spec(&a.repo)?;
    if gen.is_some() {
        bail!("list takes repo:DIR without @GEN");
    }
    let gens = repo::list(&dir)?;
    let groups = repo::group::groups_of(&gens);
    if a.json {
        if a.groups {
            println!("{}", serde_json::to_string_pretty(&groups)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&gens)?);
        }
        return Ok(0);
    }
    if !a.groups {
        print_generations(&gens, !groups.is_empty());
        if groups.is_empty() {
            return Ok(0);
        }
        println!();
    }
    print_groups(&groups);
    Ok(0)
}

/// The generations table; with `group_column`, a GROUP column (the group id, `*` after
/// it when the group is not complete) before the parent.
fn print_generations(gens: &[repo::GenerationInfo], group_column: bool) {
    let group_head = if group_column {
        format!("{:<35} ", "GROUP")
    } else {
        String::new()
    };
    println!(
        "{:<34} {:<14} {:<11} {:>10} {:>10} {:>10}  {group_head}parent",
        "GENERATION", "DISK", "KIND", "SIZE", "READ", "NEW"
    );
    let complete: std::collections::HashSet<String> = repo::group::groups_of(gens)
        .into_iter()
        .filter(|g| g.complete)
        .map(|g| g.id)
        .collect();
    for g in gens {
        let group = if group_column {
            let cell = match &g.group {
                Some(r) if complete.contains(&r.id) => r.id.clone(),
                Some(r) => format!("{}*", r.id),
                None => "-".into(),
            };
            format!("{cell:<35} ")
        } else {
            String::new()
        };
        println!(
            "{:<34} {:<14} {:<11} {:>10} {:>10} {:>10}  {group}{}",
            g.id,
            g.disk,
            format!("{:?}", g.kind).to_lowercase(),
            human_bytes(g.disk_size),
            human_bytes(g.stats.bytes_read),
            human_bytes(g.stats.bytes_stored_new),
            g.parent.as_deref().unwrap_or("-")
        );
    }
    if complete.len() < repo::group::groups_of(gens).len() {
        println!("(* the group is not complete: see GROUP below)");
    }
}

/// The groups: a line per group (id, instant, status), a line per member.
fn print_groups(groups: &[repo::GroupInfo]) {
    println!("{:<34} {:<26} STATUS", "GROUP", "CREATED");
    for gr in groups {
        println!("{:<34} {:<26} {}", gr.id, gr.created, gr.status());
        for m in &gr.members {
            println!("  {:<14} {}", m.disk, m.generation);
        }
    }
}

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The repository: repo:DIR.
    pub repo: String,
    /// Only this generation (id, unique prefix or disk name), or every member of this
    /// consistency group (its id); the same as repo:DIR@G.
    #[arg(long)]
    pub generation: Option<String>,
    /// After verifying, store a healthy copy of each damaged or missing chunk where one
    /// exists (stored afresh meanwhile, or found in a --from source), which makes every
    /// generation referencing it whole again; report what could not be repaired.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: where to look for healthy data (repeatable): the disk's origin or
    /// an image or device holding its data, or the name of an attached disk (its
    /// origin). Read only; only bytes hashing to the damaged chunk are used.
    #[arg(long, value_name = "PATH|NAME", requires = "repair")]
    pub from: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A `--from` value: an existing path, else the origin of the attached disk so named.
fn repair_source(dirs: &Dirs, v: &str) -> Result<PathBuf> {
    let p = Path::new(v);
    if p.exists() {
        return std::path::absolute(p).map_err(|e| anyhow!("unable to resolve {v}: {e}"));
    }
    if cowsnap_nbd::paths::validate_name(v).is_ok() {
        if let Some(st) = attach::daemon_status(&dirs.paths(v)) {
            return Ok(PathBuf::from(st.origin));
        }
    }
    bail!("unable to use --from {v}: no such file, and no attached disk has that name")
}

/// `cowsnapctl verify repo:DIR [--repair [--from PATH|NAME]...]`: exit 1 if any chunk
/// is missing or corrupt (with --repair: if any generation is still damaged after it).
/// Damaged chunks are moved to DIR/quarantine as they are found.
pub fn verify(dirs: &Dirs, a: VerifyArgs) -> Result<i32> {
    if a.json {
        progress::set_json("verify");
    }
    let (dir, gen) = parse_repo_spec(&a.repo)?;
    let gen = a.generation.or(gen);
    let sources = a
        .from
        .iter()
        .map(|v| repair_source(dirs, v))
        .collect::<Result<Vec<_>>>()?;
    let pr = Reporter::new("verify", Unit::Chunks, a.json);
    let progress =
        |phase: repo::VerifyPhase, done, total| pr.update_phase(Some(phase.as_str()), done, total);
    let rep = if a.repair {
        repo::verify_repair_with_progress(&dir, gen.as_deref(), &sources, &progress)
    } else {
        repo::verify_with_progress(&dir, gen.as_deref(), &progress)
    }?;
    pr.result(rep.ok, &rep);
    if a.json {
        return Ok(if rep.ok { 0 } else { 1 });
    }
    for p in &rep.problems {
        match p.offset {
            Some(o) => eprintln!(
                "generation {}: chunk {} at offset {o}: {} ({})",
                p.generation,
                p.chunk.as_deref().unwrap_or("-"),
                p.problem,
                p.detail
            ),
            None => match p.chunk.as_deref() {
                Some(c) => eprintln!(
                    "generation {}: chunk {c}: {} ({})",
                    p.generation, p.problem, p.detail
                ),
                // the index or the metadata itself
                None => eprintln!("generation {}: {} ({})", p.generation, p.problem, p.detail),
            },
        }
    }
    if !rep.quarantined.is_empty() {
        eprintln!(
            "{} damaged chunk(s) moved to {}: the next backup holding their data stores them afresh",
            rep.quarantined.len(),
            dir.join("quarantine").display()
        );
    }
    if let Some(rr) = &rep.repair {
        for c in &rr.chunks_repaired {
            println!("repaired chunk {} from {}", c.chunk, c.from);
        }
        for g in &rr.generations {
            if g.whole {
                println!(
                    "generation {}: whole again ({} damaged offset(s) repaired)",
                    g.generation, g.repaired
                );
            } else {
                let offs: Vec<String> = g
                    .damaged
                    .iter()
                    .map(|o| o.map_or("index".to_string(), |o| o.to_string()))
                    .collect();
                println!(
                    "generation {}: still damaged at offset(s) {}: no healthy copy of the data{}",
                    g.generation,
                    offs.join(", "),
                    if rr.sources.is_empty() {
                        " (give --from with the disk or an image of it)".to_string()
                    } else {
                        format!(" in the repository or {}", rr.sources.join(", "))
                    }
                );
            }
        }
    }
    println!(
        "{} generation(s), {} chunk(s) / {} checked: {}",
        rep.generations.len(),
        rep.chunks_checked,
        human_bytes(rep.bytes_checked),
        match (&rep.repair, rep.ok) {
            (None, true) => "all good".to_string(),
            (None, false) => format!("{} problem(s)", rep.problems.len()),
            (Some(_), true) if rep.problems.is_empty() => "all good".to_string(),
            (Some(rr), true) => format!(
                "{} problem(s), all repaired ({} chunk(s))",
                rep.problems.len(),
                rr.chunks_repaired.len()
            ),
            (Some(rr), false) => format!(
                "{} problem(s), {} chunk(s) repaired, {} not repairable",
                rep.problems.len(),
                rr.chunks_repaired.len(),
                rr.chunks_unrepaired.len()
            ),
        }
    );
    Ok(if rep.ok { 0 } else { 1 })
}

/// The retention rules of `prune`. The flags carry the names of [`RetentionPolicy`]'s
/// fields (`--keep-daily` is `keep-daily`), so a configuration file can hold the same
/// policy.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(id = "retention", required = true, multiple = true)]
pub struct RetentionArgs {
    /// Keep the N newest generations of each disk.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest generation of each of the N newest hours that hold one (local
    /// time).
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest generation of each of the N newest days that hold one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest generation of each of the N newest ISO weeks that hold one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest generation of each of the N newest months that hold one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest generation of each of the N newest years that hold one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// The same as --keep-last N (kept for compatibility).
    #[arg(long, value_name = "N", conflicts_with = "keep_last")]
    pub keep: Option<u32>,
}

impl From<RetentionArgs> for RetentionPolicy {
    fn from(a: RetentionArgs) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: a.keep_last.or(a.keep),
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
        }
    }
}

/// Arguments of `prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The repository: repo:DIR, or repo:s3://BUCKET[/PREFIX] (there generations are
    /// removed, but no chunk: the unreferenced ones are counted and left in place).
    pub repo: String,
    /// Which generations of each disk to keep: any generation a rule keeps is kept.
    /// Generations an unfinished live restore needs are kept too (see `abandon`).
    #[command(flatten)]
    pub policy: RetentionArgs,
    /// Prune only this disk's generations (those of other disks are kept).
    #[arg(long, value_name = "NAME")]
    pub disk: Option<String>,
    /// Say what would be removed and freed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl prune repo:DIR --keep-last N --keep-daily N ... [--disk NAME] [--dry-run]`.
pub fn prune(a: PruneArgs) -> Result<i32> {
    // The core prune reports no counts (yet): a spinner on a terminal, the result line
    // with --json.
    let spin = Reporter::spinner("prune", a.json);
    let (dir, gen) = parse_repo_spec(&a.repo)?;
    if gen.is_some() {
        bail!("prune takes repo:DIR without @GEN (use --disk NAME to prune one disk)");
    }
    let policy = RetentionPolicy::from(a.policy);
    if policy.keeps_nothing() {
        bail!(
            "unable to prune {}: every --keep-* given is 0, so the policy keeps nothing (prune never deletes every restore point of a disk)",
            dir.display()
        );
    }
    let opts = repo::PruneOptions {
        disk: a.disk,
        dry_run: a.dry_run,
        ..repo::PruneOptions::new(policy)
    };
    let rep = repo::prune(&dir, &opts)?;
    if a.json {
        progress::emit(&progress::result_event("prune", true, &rep));
        return Ok(0);
    }
    spin.finish();
    let would = if rep.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for g in &rep.generations {
        println!(
            "{} {} {} {} {}",
            if g.keep { "keep" } else { "remove" },
            g.generation,
            g.disk,
            g.created,
            if g.reasons.is_empty() {
                "-".to_string()
            } else {
                g.reasons.join(", ")
            }
        );
    }
    for s in &rep.stale_pins_removed {
        println!("{would} pin {s}");
    }
    for p in &rep.pinned {
        println!("kept {}: pinned by {}", p.generation, p.pinned_by);
    }
    println!(
        "{would} {} generation(s), kept {}; {} chunk(s) freed ({}){}",
        rep.removed_generations.len(),
        rep.kept_generations.len(),
        rep.chunks_removed,
        human_bytes(rep.bytes_freed),
        match (rep.dry_run, rep.leftovers_removed) {
            (_, 0) => String::new(),
            (true, n) => format!("; {n} leftover file(s) would go"),
            (false, n) => format!("; {n} leftover file(s) removed"),
        }
    );
    if let Some(g) = rep.grace_secs {
        if rep.chunks_unreferenced > 0 {
            println!(
                "{} unreferenced chunk(s) ({}) younger than the grace period ({g} s) left for a later prune",
                rep.chunks_unreferenced,
                human_bytes(rep.bytes_unreferenced)
            );
        }
        if !rep.chunks_collected {
            println!(
                "the sweep ran out of its time window and stopped early; a later prune goes on"
            );
        }
    }
    if rep.quarantined_files > 0 {
        println!(
            "{} damaged chunk file(s) kept as evidence in {} (not needed by any generation; delete them when done)",
            rep.quarantined_files,
            dir.join("quarantine").display()
        );
    }
    Ok(0)
}

/// Arguments of `abandon`.
#[derive(Debug, clap::Args)]
pub struct AbandonArgs {
    /// Name of the disk whose interrupted live restore is given up.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl abandon NAME`: give up an interrupted live restore. Its generation is
/// no longer pinned (prune may delete it); the destination keeps partial data and is
/// refused by `attach` until a new `restore` overwrites it. Refused while the disk's
/// daemon runs.
pub fn abandon(dirs: &Dirs, a: AbandonArgs) -> Result<i32> {
    cowsnap_nbd::paths::validate_name(&a.name)
        .map_err(|e| anyhow!("unable to abandon the live restore of {:?}: {e}", a.name))?;
    let paths = dirs.paths(&a.name);
    let running = attach::daemon_status(&paths)
        .map(|s| s.pid as i32)
        .or_else(|| attach::read_pid(&paths).filter(|&pid| daemon_alive(pid)));
    if let Some(pid) = running {
        bail!(
            "unable to abandon the live restore of {:?}: its daemon (pid {pid}) is running; detach it first (cowsnapctl detach {})",
            a.name,
            a.name
        );
    }
    let r = restore::live::abandon(&paths.fill_state())?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "abandoned the live restore of {:?} from generation {} at {}/{} chunk(s){}; its destination holds partial data",
            a.name,
            r.generation,
            r.done,
            r.total,
            match &r.pin_removed {
                Some(p) => format!(", pin {p} removed"),
                None => String::new(),
            }
        );
    }
    Ok(0)
}

/// Arguments of `restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// What to restore: repo:DIR[@GEN] (GEN: id, unique prefix or disk name; default:
    /// the newest generation when the repository holds one disk), or repo:DIR@GROUP (a
    /// consistency group's id: every disk of the group; a generation with the same id
    /// wins).
    pub source: String,
    /// Destination: a file (created or truncated) or a block device. For a group:
    /// NAME1=PATH1,NAME2=PATH2,... naming every disk of the group once (with --live each
    /// disk is attached under its NAME).
    #[arg(long, value_name = "PATH|NAME=PATH,...")]
    pub to: PathBuf,
    /// Attach the destination at once and fill it in the background; reads of chunks
    /// not restored yet fetch them first.
    #[arg(long)]
    pub live: bool,
    /// With --live: disk name (default: derived from the destination; for a group the
    /// NAMEs of --to).
    #[arg(long)]
    pub name: Option<String>,
    /// With --live and a group: attach each disk as PREFIX followed by its NAME (e.g.
    /// `r1-` gives r1-pgdata), so the group can be restored beside the attached
    /// originals.
    #[arg(long, value_name = "PREFIX")]
    pub name_prefix: Option<String>,
    /// With --live: how to expose the disk.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ublk", "nbd", "fuse", "nbdfuse", "none"])]
    pub via: String,
    /// With --live: once attached, wait until the background fill has restored every
    /// chunk (progress on a terminal); a fill that stops on an error exits non-zero.
    /// The disk is usable meanwhile; interrupting the wait leaves it attached and
    /// filling.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl restore`.
pub fn restore(dirs: &Dirs, a: RestoreArgs) -> Result<i32> {
    if a.json && !a.live {
        progress::set_json("restore");
    }
    if a.wait && !a.live {
        bail!("--wait waits for a live restore's fill: it needs --live (a restore without --live returns when done)");
    }
    let (dir, gen) = parse_repo_spec(&a.source)?;
    // Absolute: a live restore records it and resumes from it, in another directory.
    let dir = match repo::object::is_s3(&dir) {
        true => dir,
        false => std::path::absolute(&dir)
            .map_err(|e| anyhow!("unable to resolve {}: {e}", dir.display()))?,
    };
    let repo = Repo::open(&dir)?;
    let listed = repo.list_all()?;
    let g = match repo::group::resolve_listed(&listed, gen.as_deref(), &dir)? {
        repo::Resolved::Generation(g) => g,
        repo::Resolved::Group(gr) => {
            drop(repo);
            return restore_group(dirs, &a, &dir, &listed.generations, &gr);
        }
    };
    drop(repo);
    let action = format!("restore generation {} onto {}", g.id, a.to.display());
    if a.name_prefix.is_some() {
        bail!("unable to {action}: --name-prefix is for a consistency group; give --name for one disk");
    }
    if a.to
        .to_str()
        .is_some_and(restore::group::looks_like_destinations)
    {
        bail!(
            "unable to {action}: NAME=PATH destinations are for a consistency group, and {} is one generation (of disk {:?}); give --to PATH (a file whose name holds '=': --to ./{})",
            g.id,
            g.disk,
            a.to.display()
        );
    }
    if a.live {
        // Everything is validated before the destination is created or truncated.
        let name = match &a.name {
            Some(n) => n.clone(),
            None => cowsnap_nbd::paths::derive_name(
                &std::fs::canonicalize(&a.to).unwrap_or_else(|_| a.to.clone()),
            ),
        };
        cowsnap_nbd::paths::validate_name(&name)
            .map_err(|e| anyhow!("unable to {action}: invalid --name: {e}"))?;
        let resume = check_live_name(dirs, &name, &g.id, &a.to, &action, "--name")?;
        cowsnap_nbd::attached::check_destination(&dirs.run_dir, None, &a.to, &action)?;
        start_live_onto(dirs, &a, &dir, &g, &name, &a.to, resume)?;
        if a.wait {
            wait_filled(dirs, &[name])?;
        }
        return Ok(0);
    }
    cowsnap_nbd::attached::check_destination(&dirs.run_dir, None, &a.to, &action)?;
    reset_tracking_of_origin(dirs, &a.to, &g.id, "an offline restore")?;
    // After the lines above may have printed, so the bar does not run through them.
    let pr = Reporter::new("restore", Unit::Bytes, a.json);
    let progress = |done: u64, total: u64| pr.update(done, total);
    let rep = restore::restore_to(&dir, Some(&g.id), &a.to, &progress)?;
    pr.result(true, &rep);
    if !a.json {
        println!(
            "restored generation {} of {:?} ({}) to {}",
            g.id,
            g.disk,
            human_bytes(g.disk_size),
            a.to.display()
        );
    }
    Ok(0)
}

/// Before a live restore of generation `gen` onto `dest` under `name`: refuse a name
/// already attached, or with an interrupted live restore of another generation pending.
/// Returns whether an interrupted live restore of `gen` under `name` is to be resumed.
/// Writes nothing.
fn check_live_name(
    dirs: &Dirs,
    name: &str,
    gen: &str,
    dest: &Path,
    action: &str,
    other_name: &str,
) -> Result<bool> {
    if let Some(s) = attach::daemon_status(&dirs.paths(name)) {
        bail!(
            "unable to {action}: a disk named {name:?} is already attached (origin {}, \
             daemon pid {}); detach it first or choose another {other_name}",
            s.origin,
            s.pid
        );
    }
    let pending = restore::live::read_fill_state(&dirs.paths(name).fill_state())?
        .filter(|(_, complete)| !complete);
    match pending {
        // A live restore under this name was interrupted: resume it, never truncate
        // what it already filled.
        Some((pgen, _)) if pgen == gen => Ok(true),
        Some((pgen, _)) => bail!(
            "unable to {action}: an interrupted live restore of generation {pgen} is pending under the name \
             {name:?}: resume it (cowsnapctl attach {} --name {name}) or choose another {other_name}",
            dest.display()
        ),
        None => Ok(false),
    }
}

/// Start the live restore of `g` onto `dest` under `name`, everything having been
/// checked: reset the tracking of a detached disk whose origin it is, create or
/// truncate the destination (unless resuming), attach.
fn start_live_onto(
    dirs: &Dirs,
    a: &RestoreArgs,
    dir: &Path,
    g: &repo::GenerationInfo,
    name: &str,
    dest: &Path,
    resume: bool,
) -> Result<()> {
    reset_tracking_of_origin(dirs, dest, &g.id, "a live restore")?;
    if resume {
        eprintln!("resuming the interrupted live restore of {name:?}");
    } else {
        let (d, _) = restore::open_destination(dest, g.disk_size)?;
        drop(d);
    }
    eprintln!(
        "restoring generation {} of {:?} ({}) on the fly onto {}",
        g.id,
        g.disk,
        human_bytes(g.disk_size),
        dest.display()
    );
    attach::run(
        dirs,
        AttachArgs {
            name: Some(name.to_string()),
            via: a.via.clone(),
            json: a.json,
            restore_from: Some(format!("repo:{}@{}", dir.display(), g.id)),
            ..AttachArgs::new(dest.to_path_buf())
        },
    )
}

/// `restore --live --wait`: poll the daemons of `names` (their control sockets, every
/// 20 ms) until each fill is complete. Fails when a fill stops on an error or a daemon
/// goes away; the disks stay as they are.
fn wait_filled(dirs: &Dirs, names: &[String]) -> Result<()> {
    let pr = Reporter::new("restore", Unit::Chunks, false);
    loop {
        let (mut done, mut total, mut complete) = (0, 0, true);
        for name in names {
            let paths = dirs.paths(name);
            let Some(s) = attach::daemon_status_checked(&paths)? else {
                // a daemon too busy to answer in time is asked again; one that is gone
                // ends the wait
                if attach::read_pid(&paths).is_some_and(daemon_alive) {
                    complete = false;
                    continue;
                }
                bail!(
                    "the daemon of {name:?} is gone before its restore was complete; \
                     attaching the destination again under that name resumes the fill"
                );
            };
            let Some(f) = s.fill else { continue };
            if let Some(e) = f.error {
                bail!(
                    "the restore of {name:?} stopped at {}/{} chunks: {e}; the disk stays \
                     attached (cowsnapctl status {name})",
                    f.done,
                    f.total
                );
            }
            done += f.done;
            total += f.total;
            complete &= f.complete;
        }
        pr.update(done, total);
        if complete {
            pr.finish();
            if names.len() == 1 {
                eprintln!("restore of {:?} complete", names[0]);
            } else {
                eprintln!("restore of {} complete", names.join(", "));
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cowsnapctl restore repo:DIR@GROUP --to NAME=PATH,... [--live]`: every check on
/// every member (the mapping, each destination, with --live each name) before any
/// destination is touched; then each member in turn.
fn restore_group(
    dirs: &Dirs,
    a: &RestoreArgs,
    dir: &Path,
    all: &[repo::GenerationInfo],
    gr: &repo::GroupInfo,
) -> Result<i32> {
    let what = format!("unable to restore group {}", gr.id);
    if !gr.complete {
        // The plan refuses it, naming the missing disks.
        restore::group::plan(gr, all, &[])?;
    }
    let to = a.to.to_str().unwrap_or_default();
    if !restore::group::looks_like_destinations(to) {
        bail!(
            "{what}: it holds {} disks ({}), so --to names a destination for each: --to {}",
            gr.disks.len(),
            gr.disks.join(", "),
            restore::group::destinations_hint(gr)
        );
    }
    if a.name.is_some() {
        bail!(
            "{what}: --name is for one generation; with a group each disk is attached under the NAME given in --to NAME=PATH (with --name-prefix in front)"
        );
    }
    if a.name_prefix.is_some() && !a.live {
        bail!("{what}: --name-prefix names attached disks: it needs --live");
    }
    let live_name = |disk: &str| format!("{}{disk}", a.name_prefix.as_deref().unwrap_or(""));
    let dests = restore::group::parse_destinations(to).map_err(|e| anyhow!("{what}: {e}"))?;
    let plan = restore::group::plan(gr, all, &dests)?;
    let mut resume = Vec::new();
    for m in &plan.members {
        let action = format!(
            "restore disk {} of group {} onto {}",
            m.generation.disk,
            gr.id,
            m.dest.display()
        );
        if a.live {
            let name = &live_name(&m.generation.disk);
            cowsnap_nbd::paths::validate_name(name)
                .map_err(|e| anyhow!("unable to {action}: {e}"))?;
            resume.push(check_live_name(
                dirs,
                name,
                &m.generation.id,
                &m.dest,
                &action,
                "NAME",
            )?);
        }
        cowsnap_nbd::attached::check_destination(&dirs.run_dir, None, &m.dest, &action)?;
    }
    if a.live {
        let mut attached: Vec<String> = Vec::new();
        for (m, &res) in plan.members.iter().zip(&resume) {
            let name = &live_name(&m.generation.disk);
            if let Err(e) = start_live_onto(dirs, a, dir, &m.generation, name, &m.dest, res) {
                let left: Vec<String> = plan
                    .members
                    .iter()
                    .skip(attached.len() + 1)
                    .map(|m| live_name(&m.generation.disk))
                    .collect();
                bail!(
                    "{what}: disk {name} failed: {e:#}{}{}",
                    if attached.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; attached and restoring already: {} (cowsnapctl detach NAME to stop)",
                            attached.join(", ")
                        )
                    },
                    if left.is_empty() {
                        String::new()
                    } else {
                        format!("; not started: {}", left.join(", "))
                    }
                );
            }
            attached.push(name.clone());
        }
        if a.wait {
            wait_filled(dirs, &attached)?;
        }
        return Ok(0);
    }
    for m in &plan.members {
        reset_tracking_of_origin(dirs, &m.dest, &m.generation.id, "an offline restore")?;
    }
    let pr = Reporter::new("restore", Unit::Bytes, a.json);
    let progress = |done: u64, total: u64| pr.update(done, total);
    let reps = restore::group::restore_group(dir, &plan, &progress)?;
    // The result line: `group` and per member the single restore's report plus its
    // `destination`.
    let members: Vec<serde_json::Value> = plan
        .members
        .iter()
        .zip(&reps)
        .map(|(m, r)| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("destination".into(), m.dest.display().to_string().into());
            }
            v
        })
        .collect();
    pr.result(
        true,
        &serde_json::json!({ "group": gr.id, "members": members }),
    );
    if !a.json {
        for (m, r) in plan.members.iter().zip(&reps) {
            println!(
                "restored generation {} of {:?} ({}) to {}",
                r.generation,
                r.disk,
                human_bytes(r.disk_size),
                m.dest.display()
            );
        }
        println!(
            "restored group {} ({} disks, one instant: {})",
            gr.id,
            reps.len(),
            gr.created
        );
    }
    Ok(0)
}

/// A restore is about to write onto `dest`: if it is the sealed origin of a detached
/// disk (any name in the state directory, matched by the origin's identity), that
/// disk's seal is invalidated first, so its next incremental reads everything and says
/// why. Fails (before anything is written) when a seal cannot be rewritten.
fn reset_tracking_of_origin(dirs: &Dirs, dest: &Path, gen: &str, what: &str) -> Result<()> {
    let Ok(target) = origin_seal::observe(dest) else {
        return Ok(()); // does not exist yet (or is no disk): nobody's origin
    };
    for sdir in origin_seal::disks_sealed_on(&dirs.state_dir, &target) {
        let name = sdir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let why = format!("{what} of generation {gen} was written onto the origin");
        origin_seal::invalidate(&sdir, &why).map_err(|e| {
            anyhow!("unable to reset the change tracking of disk {name:?} (the destination is its origin): {e}")
        })?;
        eprintln!(
            "{} is the origin of disk {name:?}: its change tracking is reset, its next incremental backup reads everything",
            dest.display()
        );
    }
    Ok(())
}

/// Whether `pid` is a live (not zombie) cowsnap-nbd process.
fn daemon_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (comm) STATE ...": comm may hold spaces and parentheses; the state follows
    // the last ')'.
    let Some((head, tail)) = stat.rsplit_once(')') else {
        return false;
    };
    let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("");
    comm.starts_with("cowsnap-nbd") && !tail.trim_start().starts_with(['Z', 'X'])
}
