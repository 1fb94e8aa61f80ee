//! Repository commands: `list`, `verify`, `prune` and `restore` (offline, or `--live`:
//! the destination is attached at once and filled from the repository while in use).

use crate::attach::{self, AttachArgs};
use crate::parse::human_bytes;
use crate::Dirs;
use anyhow::{anyhow, bail, Result};
use cowsnap_core::repo::{self, Repo};
use cowsnap_core::restore;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// `repo:DIR[@GEN]` → (DIR, GEN).
pub fn parse_repo_spec(spec: &str) -> Result<(PathBuf, Option<String>)> {
    let rest = spec
        .strip_prefix("repo:")
        .ok_or_else(|| anyhow!("invalid repository {spec:?}: expected repo:DIR or repo:DIR@GEN"))?;
    if rest.is_empty() {
        bail!("invalid repository {spec:?}: empty directory");
    }
    Ok(match rest.rsplit_once('@') {
        Some((d, g)) if !g.is_empty() && !d.is_empty() => (PathBuf::from(d), Some(g.to_string())),
        _ => (PathBuf::from(rest), None),
    })
}

/// Arguments of `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The repository: repo:DIR.
    pub repo: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl list repo:DIR`.
pub fn list(a: ListArgs) -> Result<i32> {
    let (dir, gen) = parse_repo_spec(&a.repo)?;
    if gen.is_some() {
        bail!("list takes repo:DIR without @GEN");
    }
    let gens = repo::list(&dir).map_err(|e| anyhow!("{e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&gens)?);
        return Ok(0);
    }
    println!(
        "{:<34} {:<14} {:<11} {:>10} {:>10} {:>10}  parent",
        "GENERATION", "DISK", "KIND", "SIZE", "READ", "NEW"
    );
    for g in &gens {
        println!(
            "{:<34} {:<14} {:<11} {:>10} {:>10} {:>10}  {}",
            g.id,
            g.disk,
            format!("{:?}", g.kind).to_lowercase(),
            human_bytes(g.disk_size),
            human_bytes(g.stats.bytes_read),
            human_bytes(g.stats.bytes_stored_new),
            g.parent.as_deref().unwrap_or("-")
        );
    }
    Ok(0)
}

/// Arguments of `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The repository: repo:DIR.
    pub repo: String,
    /// Only this generation (id, unique prefix or disk name).
    #[arg(long)]
    pub generation: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl verify repo:DIR`: exit 1 if any chunk is missing or corrupt.
pub fn verify(a: VerifyArgs) -> Result<i32> {
    let (dir, gen) = parse_repo_spec(&a.repo)?;
    let gen = a.generation.or(gen);
    let rep = repo::verify(&dir, gen.as_deref()).map_err(|e| anyhow!("{e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        for p in &rep.problems {
            match p.offset {
                Some(o) => eprintln!(
                    "generation {}: chunk {} at offset {o}: {} ({})",
                    p.generation,
                    p.chunk.as_deref().unwrap_or("-"),
                    p.problem,
                    p.detail
                ),
                None => eprintln!(
                    "generation {}: chunk {}: {} ({})",
                    p.generation,
                    p.chunk.as_deref().unwrap_or("-"),
                    p.problem,
                    p.detail
                ),
            }
        }
        println!(
            "{} generation(s), {} chunk(s) / {} checked: {}",
            rep.generations.len(),
            rep.chunks_checked,
            human_bytes(rep.bytes_checked),
            if rep.ok {
                "all good".to_string()
            } else {
                format!("{} problem(s)", rep.problems.len())
            }
        );
    }
    Ok(if rep.ok { 0 } else { 1 })
}

/// Arguments of `prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The repository: repo:DIR.
    pub repo: String,
    /// Generations to keep per disk (the newest).
    #[arg(long)]
    pub keep: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl prune repo:DIR --keep N`.
pub fn prune(a: PruneArgs) -> Result<i32> {
    let (dir, _) = parse_repo_spec(&a.repo)?;
    if a.keep == 0 {
        bail!("--keep must be at least 1 (prune never deletes every restore point of a disk)");
    }
    let rep = repo::prune(&dir, a.keep).map_err(|e| anyhow!("{e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "removed {} generation(s), kept {}; {} chunk(s) freed ({})",
            rep.removed_generations.len(),
            rep.kept_generations.len(),
            rep.chunks_removed,
            human_bytes(rep.bytes_freed)
        );
    }
    Ok(0)
}

/// Arguments of `restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// What to restore: repo:DIR[@GEN] (GEN: id, unique prefix or disk name; default:
    /// the newest generation when the repository holds one disk).
    pub source: String,
    /// Destination: a file (created or truncated) or a block device.
    #[arg(long)]
    pub to: PathBuf,
    /// Attach the destination at once and fill it in the background; reads of chunks
    /// not restored yet fetch them first.
    #[arg(long)]
    pub live: bool,
    /// With --live: disk name (default: derived from the destination).
    #[arg(long)]
    pub name: Option<String>,
    /// With --live: how to expose the disk.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nbd", "fuse", "none"])]
    pub via: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cowsnapctl restore`.
pub fn restore(dirs: &Dirs, a: RestoreArgs) -> Result<i32> {
    let (dir, gen) = parse_repo_spec(&a.source)?;
    // Absolute: a live restore records it and resumes from it, in another directory.
    let dir = std::path::absolute(&dir)
        .map_err(|e| anyhow!("unable to resolve {}: {e}", dir.display()))?;
    let repo = Repo::open(&dir).map_err(|e| anyhow!("{e}"))?;
    let g = repo.resolve(gen.as_deref()).map_err(|e| anyhow!("{e}"))?;
    drop(repo);
    if is_mounted_dev(&a.to) {
        bail!("unable to restore onto {}: it is mounted", a.to.display());
    }
    if a.live {
        let name = match &a.name {
            Some(n) => n.clone(),
            None => cowsnap_nbd::config::derive_name(
                &std::fs::canonicalize(&a.to).unwrap_or_else(|_| a.to.clone()),
            ),
        };
        let pending = restore::live::read_fill_state(&dirs.paths(&name).fill_state())
            .map_err(|e| anyhow!("{e}"))?
            .filter(|(_, complete)| !complete);
        if let Some((pgen, _)) = pending {
            // A live restore under this name was interrupted: resume it, never
            // truncate what it already filled.
            if pgen != g.id {
                bail!(
                    "an interrupted live restore of generation {pgen} is pending under the name \
                     {name:?}: resume it (cowsnapctl attach {} --name {name}) or choose another --name",
                    a.to.display()
                );
            }
            eprintln!("resuming the interrupted live restore of {name:?}");
        } else {
            let (dest, _) =
                restore::open_destination(&a.to, g.disk_size).map_err(|e| anyhow!("{e}"))?;
            drop(dest);
        }
        eprintln!(
            "restoring generation {} of {:?} ({}) on the fly onto {}",
            g.id,
            g.disk,
            human_bytes(g.disk_size),
            a.to.display()
        );
        attach::run(
            dirs,
            AttachArgs {
                path: a.to.clone(),
                name: Some(name),
                via: a.via.clone(),
                nbd_device: None,
                read_only: false,
                listen: Vec::new(),
                io_engine: "auto".into(),
                container: None,
                chunk_size: None,
                max_connections: None,
                json: a.json,
                restore_from: Some(format!("repo:{}@{}", dir.display(), g.id)),
            },
        )?;
        return Ok(0);
    }
    let tty = std::io::stderr().is_terminal() && !a.json;
    let bar = if tty {
        let b = indicatif::ProgressBar::new(g.disk_size);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let progress = |done: u64, _total: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    };
    let rep =
        restore::restore_to(&dir, Some(&g.id), &a.to, &progress).map_err(|e| anyhow!("{e}"))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
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

/// Whether `p` is a block device with a mounted filesystem on it.
fn is_mounted_dev(p: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(m) = std::fs::metadata(p) else {
        return false;
    };
    if !m.file_type().is_block_device() {
        return false;
    }
    let rdev = m.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().nth(2) == Some(&format!("{maj}:{min}")))
        })
        .unwrap_or(false)
}
