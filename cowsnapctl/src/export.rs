//! `cowsnapctl export`, `mount` and `umount`: a repository generation served read-only
//! by its own daemon (`cowsnap-nbd --generation`), exposed through the attach paths,
//! and mounted to get files back.
//!
//! `export` is `attach` with a generation instead of an origin: the same name lock,
//! daemon start, attach record and device set-up (`attach::run_named`), so `detach NAME`
//! stops it like any disk. `mount` checks everything first (the mount point is an empty
//! directory and not a mount point, the repository and generation exist, the flags),
//! then exports, finds the filesystem (the whole device when it holds one, else a
//! partition from the partition table read by `partx`, exposed as a read-only
//! loop device over that byte range), and mounts it read-only without replaying any
//! journal: ext2/3/4 `ro,noload`, XFS `ro,norecovery,nouuid` (the original filesystem
//! may be mounted on this host with the same UUID), anything else `ro`. What it set up
//! is recorded in `RUN_DIR/NAME.mount.json` as it goes, so `umount MOUNTPOINT` undoes
//! exactly that (also after a `mount` that was killed half-way); a failing `mount` undoes
//! its own steps before it returns.

use crate::attach::{self, AttachArgs};
use crate::mount_record::{record_path, MountRecord};
use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::repo::{GenerationInfo, Repo};
use cowsnap_nbd::attach::Via;
use cowsnap_nbd::paths;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Arguments of `export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The restore point: repo:DIR@GEN (an id, a unique prefix or a disk name; without
    /// @GEN the newest when the repository holds one disk).
    pub source: String,
    /// Name of the export (default: the disk's name and the generation's last 8 hex
    /// digits, e.g. db-1a2b3c4d).
    #[arg(long)]
    pub name: Option<String>,
    /// How to expose it: kernel nbd, the daemon's FUSE file + loop device, nbdfuse +
    /// loop device, or only the NBD URI.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ublk", "nbd", "fuse", "nbdfuse", "none"])]
    pub via: String,
    /// Also listen on TCP (tcp:ADDR:PORT). Repeatable. Needs --tls-creds (or
    /// --insecure-tcp).
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    #[command(flatten)]
    pub tls: attach::TcpSecurity,
    /// Memory for decompressed chunks kept for reuse by the daemon (default 64M).
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Print {name, device, uri, pid, via} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `mount`.
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The restore point: repo:DIR@GEN.
    pub source: String,
    /// An empty directory to mount it on.
    pub mountpoint: PathBuf,
    /// Mount partition N of the restore point's partition table (default: the whole
    /// device if it holds a filesystem, else its only partition).
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// Name of the export behind the mount (default as for export).
    #[arg(long)]
    pub name: Option<String>,
    /// How to expose the export: kernel nbd, the daemon's FUSE file + loop device, or
    /// nbdfuse + loop device.
    #[arg(long, default_value = "auto", value_parser = ["auto", "ublk", "nbd", "fuse", "nbdfuse"])]
    pub via: String,
    /// Memory for decompressed chunks kept for reuse by the daemon (default 64M).
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
}

/// Arguments of `umount`.
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// Where `cowsnapctl mount` mounted a restore point.
    pub mountpoint: PathBuf,
}

/// `repo:DIR[@GEN]` → the absolute `repo:DIR@ID` and the generation (validated: the
/// repository opens and the generation exists).
pub(crate) fn resolve(source: &str) -> Result<(String, GenerationInfo)> {
    let (dir, gen) = paths::parse_repo_spec(source)?;
    if cowsnap_core::repo::object::is_s3(&dir) {
        // the exporter's pin needs a flock: refused before anything is started
        return Err(cowsnap_core::repo::object::unsupported("export from", &dir).into());
    }
    let dir = std::path::absolute(&dir)
        .with_context(|| format!("unable to resolve {}", dir.display()))?;
    let repo = Repo::open(&dir)?;
    let g = repo.resolve(gen.as_deref())?;
    Ok((format!("repo:{}@{}", dir.display(), g.id), g))
}

fn default_name(g: &GenerationInfo) -> String {
    let tail = g.id.rsplit('-').next().unwrap_or(&g.id);
    let mut disk: String = g.disk.chars().take(paths::MAX_NAME_LEN - 9).collect();
    if disk.is_empty() || paths::validate_name(&disk).is_err() {
        disk = "export".into();
    }
    format!("{disk}-{tail}")
}

fn export_attach_args(
    spec: &str,
    via: &str,
    listen: Vec<String>,
    cache: Option<String>,
    json: bool,
) -> AttachArgs {
    AttachArgs {
        via: via.to_string(),
        read_only: true,
        listen,
        json,
        generation: Some(spec.to_string()),
        cache_size: cache,
        ..AttachArgs::new(PathBuf::from(spec))
    }
}

fn check_cache(c: &Option<String>) -> Result<()> {
    if let Some(c) = c {
        let n = crate::parse::parse_size(c)?;
        if !(1 << 20..=16 << 30).contains(&n) {
            bail!("invalid --cache-size {c}: 1M to 16G");
        }
    }
    Ok(())
}

/// `cowsnapctl export`.
pub fn export(dirs: &Dirs, mut a: ExportArgs) -> Result<()> {
    let (spec, g) = resolve(&a.source)?;
    let name = a.name.clone().unwrap_or_else(|| default_name(&g));
    paths::validate_name(&name).map_err(|e| anyhow!("invalid --name: {e}"))?;
    attach::check_listen(&a.listen)?;
    a.tls.check(&a.listen)?;
    check_cache(&a.cache_size)?;
    let via = attach::parse_via(&a.via);
    let mut args = export_attach_args(&spec, &a.via, a.listen, a.cache_size, a.json);
    args.tls = a.tls;
    attach::run_named(dirs, &args, Path::new(&spec), &name, via, None)?;
    Ok(())
}

/// Run a tool; its stdout, or an error naming it with its stderr.
fn tool(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("unable to {what}: unable to run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "unable to {what}: {} failed ({}): {}",
            cmd.get_program().to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `blkid -p -o export` of `dev` as key/value pairs (empty when blkid finds nothing).
fn probe(dev: &str) -> Vec<(String, String)> {
    let Ok(out) = Command::new("blkid")
        .args(["-p", "-o", "export", dev])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// One partition of a partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number (the suffix of its node name).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

/// The partitions in `partx -g -r -o NR,START,SECTORS` output (512-byte sectors).
pub fn parse_partx(out: &str) -> Vec<Partition> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|w| w.parse::<u64>().ok());
            let (Some(Some(nr)), Some(Some(start)), Some(Some(sectors))) =
                (f.next(), f.next(), f.next())
            else {
                return None;
            };
            Some(Partition {
                number: u32::try_from(nr).ok()?,
                start: start.checked_mul(512)?,
                size: sectors.checked_mul(512)?,
            })
        })
        .collect()
}

/// Which partition to mount: `want`, else the only one; an error lists them.
pub fn pick_partition(parts: &[Partition], want: Option<u32>) -> Result<Partition> {
    let list = || {
        parts
            .iter()
            .map(|p| {
                format!(
                    "{} ({} at {})",
                    p.number,
                    crate::parse::human_bytes(p.size),
                    p.start
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match want {
        Some(n) => parts
            .iter()
            .find(|p| p.number == n)
            .cloned()
            .ok_or_else(|| anyhow!("there is no partition {n}; the partitions are: {}", list())),
        None => match parts {
            [] => bail!("no filesystem and no partitions found"),
            [p] => Ok(p.clone()),
            _ => bail!(
                "the restore point has {} partitions: {}; choose one with --partition N",
                parts.len(),
                list()
            ),
        },
    }
}

/// Mount options that never write and never replay a journal.
pub fn mount_options(fstype: &str) -> &'static str {
    match fstype {
        "ext2" | "ext3" | "ext4" => "ro,noload",
        "xfs" => "ro,norecovery,nouuid",
        _ => "ro",
    }
}

fn is_mount_point(p: &Path) -> Result<bool> {
    let s = p.display().to_string();
    Ok(cowsnap_core::mountinfo::read()?
        .iter()
        .any(|e| e.mount_point == s))
}

fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    let mp = std::fs::canonicalize(p)
        .map_err(|e| anyhow!("unable to use mount point {}: {e}", p.display()))?;
    if !mp.is_dir() {
        bail!(
            "unable to use mount point {}: not a directory",
            mp.display()
        );
    }
    if is_mount_point(&mp)? {
        bail!(
            "unable to use mount point {}: something is mounted there already",
            mp.display()
        );
    }
    let mut rd = std::fs::read_dir(&mp)
        .map_err(|e| anyhow!("unable to use mount point {}: {e}", mp.display()))?;
    if rd.next().is_some() {
        bail!(
            "unable to use mount point {}: it is not empty",
            mp.display()
        );
    }
    Ok(mp)
}

/// `cowsnapctl mount`.
pub fn mount(dirs: &Dirs, a: MountArgs) -> Result<()> {
    let mr = mount_quiet(dirs, &a)?;
    let mp = &mr.mountpoint;
    eprintln!(
        "mounted {}{} ({}, {}) on {mp} read-only; export {}; undo with: cowsnapctl umount {mp}",
        mr.source,
        mr.partition
            .map(|n| format!(" partition {n}"))
            .unwrap_or_default(),
        mr.fstype.as_deref().unwrap_or("?"),
        mr.options.as_deref().unwrap_or("?"),
        mr.name,
    );
    println!("{mp}");
    Ok(())
}

/// `mount` without its messages: what it set up (undo it with [`undo`]); a failure
/// undoes its own steps.
pub(crate) fn mount_quiet(dirs: &Dirs, a: &MountArgs) -> Result<MountRecord> {
    let mp = check_mountpoint(&a.mountpoint)?;
    let (spec, g) = resolve(&a.source)?;
    let name = a.name.clone().unwrap_or_else(|| default_name(&g));
    paths::validate_name(&name).map_err(|e| anyhow!("invalid --name: {e}"))?;
    if a.partition == Some(0) {
        bail!("invalid --partition 0: partitions are numbered from 1");
    }
    check_cache(&a.cache_size)?;
    if let Some(r) = find_record(dirs, &mp)? {
        bail!(
            "{} is already used by the mount of {} (export {}); cowsnapctl umount {} first",
            mp.display(),
            r.source,
            r.name,
            mp.display()
        );
    }
    let rpath = record_path(dirs, &name);
    if MountRecord::load(&rpath)?.is_some() {
        bail!(
            "export {name:?} already has a mount record ({}); choose another --name or umount it",
            rpath.display()
        );
    }
    let via = attach::parse_via(&a.via);
    if via == Via::None {
        bail!("mount needs a device: --via ublk, nbd, fuse or nbdfuse");
    }
    let mut args = export_attach_args(&spec, &a.via, Vec::new(), a.cache_size.clone(), false);
    args.quiet = true;
    let rec = attach::run_named(dirs, &args, Path::new(&spec), &name, via, None)?;
    let mut mr = MountRecord {
        name: name.clone(),
        mountpoint: mp.display().to_string(),
        source: spec.clone(),
        device: rec.device.clone(),
        partition: None,
        part_loop: None,
        fstype: None,
        options: None,
        mounted: false,
    };
    let r = mount_steps(a, &mut mr, &rpath);
    if let Err(e) = r {
        if let Err(e2) = undo(dirs, &mr, &rpath) {
            eprintln!("cowsnapctl: cleanup: {e2:#}");
        }
        return Err(e.context(format!("unable to mount {spec} on {}", mp.display())));
    }
    Ok(mr)
}

fn mount_steps(a: &MountArgs, mr: &mut MountRecord, rpath: &Path) -> Result<()> {
    mr.save(rpath)?;
    let dev = mr
        .device
        .clone()
        .ok_or_else(|| anyhow!("the export has no device"))?;
    let whole = probe(&dev);
    let fs_whole = get(&whole, "TYPE").is_some() && get(&whole, "PTTYPE").is_none();
    let target = if fs_whole {
        if let Some(n) = a.partition {
            bail!(
                "--partition {n}: the restore point has no partition table, it holds a {} filesystem",
                get(&whole, "TYPE").unwrap_or("?")
            );
        }
        dev.clone()
    } else {
        let table = tool(
            Command::new("partx").args(["-g", "-r", "-o", "NR,START,SECTORS", &dev]),
            "read the partition table",
        )
        .map_err(|e| {
            if a.partition.is_none() && get(&whole, "PTTYPE").is_none() {
                anyhow!("no filesystem and no partition table found on the restore point")
            } else {
                e
            }
        })?;
        let p = pick_partition(&parse_partx(&table), a.partition)?;
        mr.partition = Some(p.number);
        let lo = tool(
            Command::new("losetup").args([
                "-r",
                "-f",
                "--show",
                "-o",
                &p.start.to_string(),
                "--sizelimit",
                &p.size.to_string(),
                &dev,
            ]),
            &format!("set up a loop device for partition {}", p.number),
        )?
        .trim()
        .to_string();
        mr.part_loop = Some(lo.clone());
        mr.save(rpath)?;
        lo
    };
    let kv = probe(&target);
    let fstype = get(&kv, "TYPE")
        .ok_or_else(|| anyhow!("no filesystem found on {target}"))?
        .to_string();
    let opts = mount_options(&fstype);
    mr.fstype = Some(fstype.clone());
    mr.options = Some(opts.to_string());
    mr.save(rpath)?;
    tool(
        Command::new("mount")
            .args(["-t", &fstype, "-o", opts, &target])
            .arg(&mr.mountpoint),
        &format!("mount {target} ({fstype}) on {}", mr.mountpoint),
    )?;
    mr.mounted = true;
    mr.save(rpath)?;
    Ok(())
}

/// Undo what `mr` records: unmount, the partition's loop device, the export, the record.
pub(crate) fn undo(dirs: &Dirs, mr: &MountRecord, rpath: &Path) -> Result<()> {
    let mut mr = mr.clone();
    let mp = PathBuf::from(&mr.mountpoint);
    if is_mount_point(&mp)? {
        tool(
            Command::new("umount").arg(&mp),
            &format!("unmount {}", mp.display()),
        )?;
    }
    mr.mounted = false;
    if let Some(lo) = &mr.part_loop {
        if Path::new(lo).exists() && cowsnap_nbd::attach::fuse::loop_backing(lo).is_some() {
            tool(
                Command::new("losetup").args(["-d", lo]),
                &format!("remove loop device {lo}"),
            )?;
        }
    }
    mr.part_loop = None;
    if rpath.exists() {
        mr.save(rpath)?;
    }
    let attached = dirs.paths(&mr.name).attach_record().exists()
        || attach::daemon_status(&dirs.paths(&mr.name)).is_some();
    if attached {
        crate::detach::run(
            dirs,
            crate::detach::DetachArgs {
                name: mr.name.clone(),
                force: false,
                cancel_backup: false,
            },
        )?;
    }
    let _ = std::fs::remove_file(rpath);
    Ok(())
}

/// The mount record whose mount point is `mp`.
fn find_record(dirs: &Dirs, mp: &Path) -> Result<Option<MountRecord>> {
    let Ok(rd) = std::fs::read_dir(&dirs.run_dir) else {
        return Ok(None);
    };
    for e in rd.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if !f.ends_with(".mount.json") {
            continue;
        }
        if let Some(r) = MountRecord::load(&e.path())? {
            if Path::new(&r.mountpoint) == mp {
                return Ok(Some(r));
            }
        }
    }
    Ok(None)
}

/// `cowsnapctl umount`.
pub fn umount(dirs: &Dirs, a: UmountArgs) -> Result<()> {
    let mp = std::fs::canonicalize(&a.mountpoint)
        .or_else(|_| std::path::absolute(&a.mountpoint))
        .with_context(|| format!("unable to resolve {}", a.mountpoint.display()))?;
    let Some(mr) = find_record(dirs, &mp)? else {
        bail!(
            "nothing is mounted on {} by cowsnapctl mount (no record in {})",
            mp.display(),
            dirs.run_dir.display()
        );
    };
    undo(dirs, &mr, &record_path(dirs, &mr.name))?;
    eprintln!("unmounted {} from {}", mr.source, mp.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_from_partx() {
        let p = parse_partx("1 2048 16384\n2 18432 40960\njunk\n");
        assert_eq!(
            p,
            vec![
                Partition {
                    number: 1,
                    start: 2048 * 512,
                    size: 16384 * 512
                },
                Partition {
                    number: 2,
                    start: 18432 * 512,
                    size: 40960 * 512
                }
            ]
        );
        assert_eq!(pick_partition(&p, Some(2)).unwrap().number, 2);
        let e = pick_partition(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("2 partitions") && e.contains("--partition"),
            "{e}"
        );
        assert!(pick_partition(&p, Some(3)).is_err());
        assert_eq!(pick_partition(&p[..1], None).unwrap().number, 1);
        assert!(pick_partition(&[], None).is_err());
    }

    #[test]
    fn options_never_replay_a_journal() {
        assert_eq!(mount_options("ext4"), "ro,noload");
        assert_eq!(mount_options("xfs"), "ro,norecovery,nouuid");
        assert_eq!(mount_options("vfat"), "ro");
    }
}
