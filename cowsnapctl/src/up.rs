//! `cowsnapctl up [NAME...]` attaches the configured disks that are not attached,
//! `cowsnapctl down [NAME...]` detaches them, `cowsnapctl config` checks the file, and
//! the hidden `cowsnapctl systemd-generator` turns each disk's `schedule` into a
//! drop-in of its backup timer (installed as a systemd generator by
//! `scripts/install.sh`).
//!
//! Every name and the whole file are checked before any disk is touched. Then each disk
//! is handled on its own: one that fails (origin missing after `--wait`, attach
//! refused) is reported and the others still go up or down; the exit status is 1 when
//! any failed.

use crate::attach::{self, AttachArgs};
use crate::config::{Config, ConfigArg, DiskConfig};
use crate::detach::{self, DetachArgs};
use crate::Dirs;
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Arguments of `up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Disks to attach (default: every configured disk).
    pub names: Vec<String>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Wait this long for a disk's origin to appear (a /dev/disk/by-id link that udev
    /// has not made yet at boot), e.g. 30s; 0 = don't wait.
    #[arg(long, value_name = "DURATION", default_value = "0")]
    pub wait: String,
}

/// Arguments of `down`.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Disks to detach (default: every configured disk that is attached).
    pub names: Vec<String>,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Arguments of `config`.
#[derive(Debug, clap::Args)]
pub struct ConfigCheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the checked configuration, defaults applied, as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The `attach` a configured disk gets.
fn attach_args(d: &DiskConfig) -> AttachArgs {
    AttachArgs {
        name: Some(d.name.clone()),
        via: d.via.clone(),
        read_only: d.read_only,
        io_engine: d.io_engine.clone(),
        direct_io: d
            .direct_io
            .map(|on| if on { "on" } else { "off" }.to_string()),
        container: d.container.clone(),
        chunk_size: d.chunk_size.clone(),
        connections: d.connections,
        listen: d.listen.clone(),
        tls: crate::attach::TcpSecurity {
            tls_creds: d.tls_creds.clone(),
            tls_verify_peer: d.tls_verify_peer,
            insecure_tcp: d.insecure_tcp,
        },
        ..AttachArgs::new(d.path.clone())
    }
}

/// Wait (bounded) for `path` to exist.
fn wait_for(path: &Path, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `cowsnapctl up [NAME...]`.
pub fn up(dirs: &Dirs, a: UpArgs) -> Result<i32> {
    let wait = crate::parse::parse_duration(&a.wait)?;
    if wait > Duration::from_secs(600) {
        bail!("invalid --wait {:?}: at most 10m", a.wait);
    }
    let cfg = Config::load(&a.config.config)?;
    let disks = cfg.select(&a.names)?;
    if disks.is_empty() {
        eprintln!("no disk is configured in {}", cfg.file.display());
        return Ok(0);
    }
    let mut failed = 0;
    for d in disks {
        let paths = dirs.paths(&d.name);
        if let Some(s) = attach::daemon_status(&paths) {
            if Path::new(&s.origin) != d.path
                && std::fs::canonicalize(&d.path).ok().as_deref() != Some(Path::new(&s.origin))
            {
                eprintln!(
                    "{}: attached, but from {} (configured: {}); leaving it",
                    d.name,
                    s.origin,
                    d.path.display()
                );
                failed += 1;
            } else {
                eprintln!("{}: already attached", d.name);
            }
            continue;
        }
        if !wait_for(&d.path, wait) {
            eprintln!(
                "{}: unable to attach: {} does not exist{}",
                d.name,
                d.path.display(),
                if wait.is_zero() {
                    String::new()
                } else {
                    format!(" (waited {})", a.wait)
                }
            );
            failed += 1;
            continue;
        }
        if let Err(e) = attach::run(dirs, attach_args(d)) {
            eprintln!("{}: {e:#}", d.name);
            failed += 1;
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `cowsnapctl down [NAME...]`: detach (cancelling a running backup, refusing a
/// mounted device).
pub fn down(dirs: &Dirs, a: DownArgs) -> Result<i32> {
    let cfg = Config::load(&a.config.config)?;
    let named = !a.names.is_empty();
    let disks = cfg.select(&a.names)?;
    let mut failed = 0;
    for d in disks {
        let paths = dirs.paths(&d.name);
        let attached = attach::daemon_status(&paths).is_some()
            || paths.attach_record().exists()
            || attach::read_pid(&paths).is_some_and(cowsnap_nbd::attach::pid_alive);
        if !attached {
            if named {
                eprintln!("{}: not attached", d.name);
            }
            continue;
        }
        let r = detach::run(
            dirs,
            DetachArgs {
                name: d.name.clone(),
                force: false,
                cancel_backup: true,
            },
        );
        if let Err(e) = r {
            eprintln!("{}: {e:#}", d.name);
            failed += 1;
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `cowsnapctl config [--json]`: check the file, show what it configures.
pub fn check(a: ConfigCheckArgs) -> Result<i32> {
    let cfg = Config::load(&a.config.config)?;
    // A schedule is systemd's to parse: ask it where it is installed.
    let mut bad = 0;
    for d in cfg.disks.values() {
        if let Some(s) = &d.schedule {
            if let Err(e) = check_calendar(s) {
                eprintln!("{}: disk {:?}: {e:#}", cfg.file.display(), d.name);
                bad += 1;
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
    } else {
        for d in cfg.disks.values() {
            println!(
                "{}: {} via {}{}{}",
                d.name,
                d.path.display(),
                d.via,
                d.repository
                    .as_deref()
                    .map(|r| format!(", backs up to {r}"))
                    .unwrap_or_default(),
                d.schedule
                    .as_deref()
                    .map(|s| format!(" on {s:?}"))
                    .unwrap_or_default()
            );
        }
        println!(
            "{}: {} disk(s){}",
            cfg.file.display(),
            cfg.disks.len(),
            if bad == 0 { ", ok" } else { "" }
        );
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

/// Check a calendar expression with `systemd-analyze calendar` when it exists.
fn check_calendar(s: &str) -> Result<()> {
    let out = match std::process::Command::new("systemd-analyze")
        .args(["calendar", "--", s])
        .output()
    {
        Ok(o) => o,
        Err(_) => return Ok(()), // no systemd here: nothing to check against
    };
    if out.status.success() {
        return Ok(());
    }
    let why = String::from_utf8_lossy(&out.stderr);
    Err(anyhow!(
        "invalid schedule {s:?}: {}",
        why.lines()
            .next()
            .unwrap_or("refused by systemd-analyze calendar")
    ))
}

/// Arguments of the generator (systemd passes three directories).
#[derive(Debug, clap::Args)]
pub struct GeneratorArgs {
    /// Where generated units go (systemd's "normal" directory).
    pub normal_dir: PathBuf,
    /// systemd's "early" directory (unused).
    pub early_dir: Option<PathBuf>,
    /// systemd's "late" directory (unused).
    pub late_dir: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// The drop-in giving disk `d`'s backup timer its schedule.
pub fn timer_dropin(d: &DiskConfig) -> Option<String> {
    let s = d.schedule.as_deref()?;
    Some(format!(
        "# Generated by cowsnapctl systemd-generator from the schedule of disk {:?}.\n\
         [Timer]\nOnCalendar=\nOnCalendar={s}\n",
        d.name
    ))
}

/// `cowsnapctl systemd-generator NORMAL [EARLY LATE]`: for each configured disk with a
/// schedule, `NORMAL/cowsnap-backup@NAME.timer.d/50-schedule.conf`. A missing file
/// generates nothing; a bad one fails (systemd logs the reason) and generates nothing.
pub fn generator(a: GeneratorArgs) -> Result<i32> {
    if !a.config.config.exists() {
        return Ok(0);
    }
    let cfg = Config::load(&a.config.config)?;
    for d in cfg.disks.values() {
        let Some(text) = timer_dropin(d) else {
            continue;
        };
        let dir = a
            .normal_dir
            .join(format!("cowsnap-backup@{}.timer.d", d.name));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("unable to create {}", dir.display()))?;
        let p = dir.join("50-schedule.conf");
        let mut f = std::fs::File::create(&p)
            .with_context(|| format!("unable to create {}", p.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("unable to write {}", p.display()))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_disk_attaches_with_its_settings() {
        let cfg = Config::parse(
            Path::new("/c.toml"),
            "[disk.pg]\npath = \"/dev/disk/by-id/x\"\nvia = \"nbd\"\nconnections = 2\n\
             container = \"ram:1G\"\nchunk-size = \"128K\"\nread-only = true\n\
             io-engine = \"sync\"\n",
        )
        .unwrap();
        let a = attach_args(cfg.disk("pg").unwrap());
        assert_eq!(a.path, Path::new("/dev/disk/by-id/x"));
        assert_eq!(a.name.as_deref(), Some("pg"));
        assert_eq!((a.via.as_str(), a.connections), ("nbd", Some(2)));
        assert_eq!(a.container.as_deref(), Some("ram:1G"));
        assert_eq!(a.chunk_size.as_deref(), Some("128K"));
        assert!(a.read_only);
        assert_eq!(a.io_engine, "sync");
        assert_eq!(a.direct_io, None);
        let cfg = Config::parse(
            Path::new("/c.toml"),
            "[disk.pg]\npath = \"/dev/x\"\ndirect-io = false\n",
        )
        .unwrap();
        assert_eq!(
            attach_args(cfg.disk("pg").unwrap()).direct_io.as_deref(),
            Some("off")
        );
    }

    #[test]
    fn the_generator_writes_a_timer_dropin_per_scheduled_disk() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("c.toml");
        std::fs::write(
            &conf,
            "[defaults]\nrepository = \"repo:/r\"\n[disk.a]\npath = \"/a\"\nschedule = \"*-*-* 02:30\"\n\
             [disk.b]\npath = \"/b\"\n",
        )
        .unwrap();
        let out = d.path().join("gen");
        let r = generator(GeneratorArgs {
            normal_dir: out.clone(),
            early_dir: None,
            late_dir: None,
            config: ConfigArg {
                config: conf.clone(),
            },
        })
        .unwrap();
        assert_eq!(r, 0);
        let text =
            std::fs::read_to_string(out.join("cowsnap-backup@a.timer.d/50-schedule.conf")).unwrap();
        assert!(
            text.contains("[Timer]\nOnCalendar=\nOnCalendar=*-*-* 02:30\n"),
            "{text}"
        );
        assert!(!out.join("cowsnap-backup@b.timer.d").exists());
        // A bad file fails and writes nothing.
        std::fs::write(&conf, "[disk.a]\npath = 3\n").unwrap();
        let out2 = d.path().join("gen2");
        assert!(generator(GeneratorArgs {
            normal_dir: out2.clone(),
            early_dir: None,
            late_dir: None,
            config: ConfigArg { config: conf },
        })
        .is_err());
        assert!(!out2.exists());
    }
}
