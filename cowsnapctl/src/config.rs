//! The configuration file (`/etc/cowsnap/cowsnap.toml`, `--config`, `COWSNAP_CONFIG`):
//! which disks `cowsnapctl up` attaches and how, where `cowsnapctl backup NAME` without
//! `--to` backs them up, on what schedule (the systemd generator turns it into timer
//! settings) and which restore points the scheduled backup keeps.
//!
//! ```toml
//! [defaults]                       # every key of a disk, inherited where a disk has none
//! repository = "repo:/var/backups/cowsnap"
//! schedule = "daily"               # systemd OnCalendar= expression
//! retention = { keep-daily = 7, keep-weekly = 4 }
//!
//! [disk.pgdata]
//! path = "/dev/disk/by-id/ata-SAMSUNG_1234"
//! container = "file:/var/lib/cowsnap/pgdata.cow:8G"
//! freeze = "/var/lib/postgresql"
//! ```
//!
//! The whole file is checked before anything is done with it: unknown keys, wrong
//! types, bad sizes, names, specs and combinations are errors naming the file, the line
//! and the column. A disk's `retention` replaces the default's whole (rules are not
//! merged one by one: a disk that says `keep-daily = 30` keeps nothing weekly unless it
//! says so). Whether the origin exists is not checked here: `up` checks it per disk, so
//! one missing disk does not stop the others.

use anyhow::{anyhow, bail, Result};
use cowsnap_core::repo::retention::RetentionPolicy;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where the configuration is read without `--config`.
pub const DEFAULT_CONFIG: &str = "/etc/cowsnap/cowsnap.toml";
/// Environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "COWSNAP_CONFIG";
/// A configuration file larger than this is refused (it is a hand-written file).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `--config` for the commands that read the file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, value_name = "PATH", env = ENV_CONFIG, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// One disk's keys as written (all optional: `[defaults]` has the same keys).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawDisk {
    path: Option<Spanned<String>>,
    repository: Option<Spanned<String>>,
    container: Option<Spanned<String>>,
    chunk_size: Option<Spanned<String>>,
    via: Option<Spanned<String>>,
    connections: Option<Spanned<u32>>,
    read_only: Option<bool>,
    io_engine: Option<Spanned<String>>,
    direct_io: Option<Spanned<toml::Value>>,
    listen: Option<Spanned<Vec<String>>>,
    tls_creds: Option<Spanned<String>>,
    tls_verify_peer: Option<bool>,
    insecure_tcp: Option<bool>,
    freeze: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    retention: Option<Spanned<RetentionPolicy>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: Option<RawDisk>,
    #[serde(default)]
    disk: BTreeMap<Spanned<String>, RawDisk>,
}

/// One configured disk, checked and with the defaults applied.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskConfig {
    /// Disk name (the `[disk.NAME]` key).
    pub name: String,
    /// The origin: a stable path such as `/dev/disk/by-id/...`, or a file.
    pub path: PathBuf,
    /// `repo:DIR` of scheduled backups (`backup NAME` without `--to`).
    pub repository: Option<String>,
    /// Default backup container.
    pub container: Option<String>,
    /// Tracking chunk size as written (e.g. "64K").
    pub chunk_size: Option<String>,
    /// auto, nbd, fuse or none.
    pub via: String,
    /// Kernel NBD connections (`via = "nbd"` only).
    pub connections: Option<u32>,
    /// Serve read-only.
    pub read_only: bool,
    /// auto, uring or sync.
    pub io_engine: String,
    /// O_DIRECT for a backup's bulk I/O on block devices (`--direct-io on|off`);
    /// `None`: the daemon's default (on).
    pub direct_io: Option<bool>,
    /// TCP listeners (tcp:ADDR:PORT), with `tls_creds` or `insecure_tcp`.
    pub listen: Vec<String>,
    /// TLS credentials directory of the TCP listeners (`--tls-creds`).
    pub tls_creds: Option<PathBuf>,
    /// Require client certificates (`--tls-verify-peer`).
    pub tls_verify_peer: bool,
    /// Serve TCP without TLS (`--insecure-tcp`).
    pub insecure_tcp: bool,
    /// Mount point frozen around a scheduled backup's instant.
    pub freeze: Option<PathBuf>,
    /// systemd `OnCalendar=` expression of scheduled backups.
    pub schedule: Option<String>,
    /// Restore points a scheduled backup keeps (`prune --disk NAME` after it).
    pub retention: Option<RetentionPolicy>,
}

/// The configuration file, checked.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// Disks by name.
    pub disks: BTreeMap<String, DiskConfig>,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// An error at a span of the file.
struct Located<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Located<'_> {
    fn err(&self, span: std::ops::Range<usize>, msg: impl std::fmt::Display) -> anyhow::Error {
        let (l, c) = line_col(self.text, span.start);
        anyhow!("{}: line {l}, column {c}: {msg}", self.file.display())
    }
}

fn pick<T: Clone>(disk: &Option<Spanned<T>>, def: &Option<Spanned<T>>) -> Option<Spanned<T>> {
    disk.clone().or_else(|| def.clone())
}

fn one_of(
    at: &Located,
    v: &Option<Spanned<String>>,
    key: &str,
    allowed: &[&str],
) -> Result<String> {
    match v {
        None => Ok("auto".into()),
        Some(s) if allowed.contains(&s.get_ref().as_str()) => Ok(s.get_ref().clone()),
        Some(s) => Err(at.err(
            s.span(),
            format!(
                "invalid {key} {:?}: expected one of {}",
                s.get_ref(),
                allowed.join(", ")
            ),
        )),
    }
}

/// Resolve one `[disk.NAME]` against `[defaults]`.
fn resolve(at: &Located, name: &Spanned<String>, d: &RawDisk, def: &RawDisk) -> Result<DiskConfig> {
    let n = name.get_ref();
    cowsnap_nbd::paths::validate_name(n)
        .map_err(|e| at.err(name.span(), format!("invalid disk name: {e}")))?;
    let path = match &d.path {
        Some(p) => p,
        None => {
            return Err(at.err(
                name.span(),
                format!("disk {n:?} has no path (e.g. path = \"/dev/disk/by-id/...\")"),
            ))
        }
    };
    if !Path::new(path.get_ref()).is_absolute() {
        return Err(at.err(
            path.span(),
            format!(
                "invalid path {:?}: give an absolute path (a stable one: /dev/disk/by-id/...)",
                path.get_ref()
            ),
        ));
    }
    let via = one_of(
        at,
        &pick(&d.via, &def.via),
        "via",
        &["auto", "ublk", "nbd", "fuse", "nbdfuse", "none"],
    )?;
    let io_engine = one_of(
        at,
        &pick(&d.io_engine, &def.io_engine),
        "io-engine",
        &["auto", "uring", "sync"],
    )?;
    let direct_io = match pick(&d.direct_io, &def.direct_io) {
        None => None,
        Some(v) => Some(match v.get_ref() {
            toml::Value::Boolean(b) => *b,
            toml::Value::String(x) if x == "on" => true,
            toml::Value::String(x) if x == "off" => false,
            other => {
                return Err(at.err(
                    v.span(),
                    format!("invalid direct-io {other}: expected \"on\", \"off\", true or false"),
                ))
            }
        }),
    };
    let chunk_size = pick(&d.chunk_size, &def.chunk_size);
    if let Some(c) = &chunk_size {
        crate::parse::parse_size(c.get_ref())
            .and_then(|b| Ok(cowsnap_core::engine::check_chunk_size(b)?))
            .map_err(|e| at.err(c.span(), format!("invalid chunk-size: {e:#}")))?;
    }
    let container = pick(&d.container, &def.container);
    if let Some(c) = &container {
        // The spec only: its file, device and memory are attach's to check (a
        // generator runs before /var is mounted).
        cowsnap_core::container::parse_spec(c.get_ref())
            .map_err(|e| at.err(c.span(), format!("invalid container: {e}")))?;
        if let Some(p) = cowsnap_nbd::paths::container_path(c.get_ref()) {
            if !Path::new(p).is_absolute() {
                return Err(at.err(
                    c.span(),
                    format!("invalid container {:?}: give an absolute path", c.get_ref()),
                ));
            }
        }
    }
    let connections = pick(&d.connections, &def.connections);
    if let Some(c) = &connections {
        let max = crate::attach::MAX_NBD_CONNECTIONS;
        if via != "nbd" {
            return Err(at.err(
                c.span(),
                format!("connections needs via = \"nbd\" (disk {n:?} uses {via})"),
            ));
        }
        if !(1..=max).contains(c.get_ref()) {
            return Err(at.err(
                c.span(),
                format!("invalid connections {}: 1 to {max}", c.get_ref()),
            ));
        }
    }
    let listen = pick(&d.listen, &def.listen);
    let tls_creds = pick(&d.tls_creds, &def.tls_creds);
    let tls_verify_peer = d.tls_verify_peer.or(def.tls_verify_peer).unwrap_or(false);
    let insecure_tcp = d.insecure_tcp.or(def.insecure_tcp).unwrap_or(false);
    if let Some(l) = &listen {
        crate::attach::check_listen(l.get_ref()).map_err(|e| at.err(l.span(), format!("{e:#}")))?;
    }
    if let Some(t) = &tls_creds {
        if !Path::new(t.get_ref()).is_absolute() {
            return Err(at.err(
                t.span(),
                format!(
                    "invalid tls-creds {:?}: give an absolute directory",
                    t.get_ref()
                ),
            ));
        }
    }
    cowsnap_nbd::cli::check_tcp_security(
        listen
            .as_ref()
            .map(|l| l.get_ref().as_slice())
            .unwrap_or(&[]),
        tls_creds.as_ref().map(|t| Path::new(t.get_ref())),
        tls_verify_peer,
        insecure_tcp,
    )
    .map_err(|e| {
        let span = match (&listen, &tls_creds) {
            (Some(l), _) => l.span(),
            (None, Some(t)) => t.span(),
            _ => name.span(),
        };
        // The flags' names as the file spells them.
        let msg = format!("{e:#}")
            .replace("--tls-creds", "tls-creds")
            .replace("--tls-verify-peer", "tls-verify-peer")
            .replace("--insecure-tcp", "insecure-tcp")
            .replace("--listen", "listen");
        at.err(span, format!("disk {n:?}: {msg}"))
    })?;
    let repository = pick(&d.repository, &def.repository);
    if let Some(r) = &repository {
        let bad = |why: &str| {
            at.err(
                r.span(),
                format!("invalid repository {:?}: {why}", r.get_ref()),
            )
        };
        if !r.get_ref().starts_with("repo:") {
            return Err(bad("expected repo:DIR"));
        }
        match cowsnap_nbd::paths::parse_repo_spec(r.get_ref()) {
            Ok((dir, None)) if dir.is_absolute() => {}
            Ok((_, None)) => return Err(bad("give an absolute directory")),
            Ok((_, Some(_))) => return Err(bad("a repository, without @GEN")),
            Err(e) => return Err(bad(&e.to_string())),
        }
    }
    let freeze = pick(&d.freeze, &def.freeze);
    if let Some(f) = &freeze {
        if !Path::new(f.get_ref()).is_absolute() {
            return Err(at.err(
                f.span(),
                format!(
                    "invalid freeze {:?}: give the absolute mount point",
                    f.get_ref()
                ),
            ));
        }
    }
    let schedule = pick(&d.schedule, &def.schedule);
    if let Some(s) = &schedule {
        let v = s.get_ref();
        if v.trim().is_empty() || v.len() > 256 || v.chars().any(|c| c.is_control()) {
            return Err(at.err(
                s.span(),
                format!(
                    "invalid schedule {v:?}: expected a systemd calendar expression on one \
                     line (e.g. \"daily\", \"*-*-* 02:30\")"
                ),
            ));
        }
    }
    let retention = pick(&d.retention, &def.retention);
    if let Some(r) = &retention {
        if r.get_ref().keeps_nothing() {
            return Err(at.err(
                r.span(),
                "a retention that keeps nothing: give at least one keep-* rule above 0 \
                 (prune never deletes every restore point of a disk)",
            ));
        }
    }
    if schedule.is_some() && repository.is_none() {
        return Err(at.err(
            name.span(),
            format!("disk {n:?} has a schedule but no repository to back up into"),
        ));
    }
    Ok(DiskConfig {
        name: n.clone(),
        path: PathBuf::from(path.get_ref()),
        repository: repository.map(|r| r.into_inner()),
        container: container.map(|c| c.into_inner()),
        chunk_size: chunk_size.map(|c| c.into_inner()),
        via,
        connections: connections.map(|c| c.into_inner()),
        read_only: d.read_only.or(def.read_only).unwrap_or(false),
        io_engine,
        direct_io,
        listen: listen.map(|l| l.into_inner()).unwrap_or_default(),
        tls_creds: tls_creds.map(|t| PathBuf::from(t.into_inner())),
        tls_verify_peer,
        insecure_tcp,
        freeze: freeze.map(|f| PathBuf::from(f.into_inner())),
        schedule: schedule.map(|s| s.into_inner()),
        retention: retention.map(|r| r.into_inner()),
    })
}

impl Config {
    /// Parse and check `text`, read from `file` (named in errors).
    pub fn parse(file: &Path, text: &str) -> Result<Config> {
        let raw: RawFile = toml::from_str(text).map_err(|e| match e.span() {
            Some(sp) => {
                let (l, c) = line_col(text, sp.start);
                anyhow!("{}: line {l}, column {c}: {}", file.display(), e.message())
            }
            None => anyhow!("{}: {}", file.display(), e.message()),
        })?;
        let at = Located { file, text };
        let def = raw.defaults.unwrap_or_default();
        if let Some(p) = &def.path {
            return Err(at.err(
                p.span(),
                "path belongs in a [disk.NAME] table, not in [defaults]",
            ));
        }
        let mut disks = BTreeMap::new();
        let mut by_path: BTreeMap<PathBuf, String> = BTreeMap::new();
        for (name, d) in &raw.disk {
            let dc = resolve(&at, name, d, &def)?;
            if let Some(other) = by_path.insert(dc.path.clone(), dc.name.clone()) {
                return Err(at.err(
                    name.span(),
                    format!(
                        "disk {:?} has the path of disk {other:?} ({})",
                        dc.name,
                        dc.path.display()
                    ),
                ));
            }
            disks.insert(dc.name.clone(), dc);
        }
        Ok(Config {
            file: file.to_path_buf(),
            disks,
        })
    }

    /// Read and check the file.
    pub fn load(file: &Path) -> Result<Config> {
        let meta = std::fs::metadata(file)
            .map_err(|e| anyhow!("unable to read the configuration {}: {e}", file.display()))?;
        if meta.len() > MAX_CONFIG_BYTES {
            bail!(
                "unable to read the configuration {}: {} bytes (at most {MAX_CONFIG_BYTES})",
                file.display(),
                meta.len()
            );
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow!("unable to read the configuration {}: {e}", file.display()))?;
        Config::parse(file, &text)
    }

    /// The disks named (all, in name order, when `names` is empty); an unknown name is
    /// an error naming the configured ones, before anything is done.
    pub fn select(&self, names: &[String]) -> Result<Vec<&DiskConfig>> {
        if names.is_empty() {
            return Ok(self.disks.values().collect());
        }
        names
            .iter()
            .map(|n| {
                self.disks.get(n).ok_or_else(|| {
                    anyhow!(
                        "no disk {n:?} in {} (configured: {})",
                        self.file.display(),
                        if self.disks.is_empty() {
                            "none".to_string()
                        } else {
                            self.disks.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    )
                })
            })
            .collect()
    }

    /// The one disk `name`.
    pub fn disk(&self, name: &str) -> Result<&DiskConfig> {
        Ok(self.select(&[name.to_string()])?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/cowsnap/cowsnap.toml"), text)
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("accepted"))
    }

    const GOOD: &str = r#"
[defaults]
repository = "repo:/var/backups/cowsnap"
schedule = "daily"
retention = { keep-daily = 7, keep-weekly = 4 }
chunk-size = "64K"

[disk.pgdata]
path = "/dev/disk/by-id/ata-X"
container = "file:/var/lib/cowsnap/pgdata.cow:8G"
freeze = "/var/lib/postgresql"

[disk.wal]
path = "/dev/disk/by-id/ata-Y"
via = "fuse"
schedule = "*-*-* *:00/15"
retention = { keep-last = 48 }
"#;

    #[test]
    fn defaults_apply_and_a_disk_overrides_them() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.disks.len(), 2);
        let pg = &c.disks["pgdata"];
        assert_eq!(pg.path, Path::new("/dev/disk/by-id/ata-X"));
        assert_eq!(pg.repository.as_deref(), Some("repo:/var/backups/cowsnap"));
        assert_eq!(pg.schedule.as_deref(), Some("daily"));
        assert_eq!(pg.chunk_size.as_deref(), Some("64K"));
        assert_eq!(pg.via, "auto");
        assert_eq!(pg.freeze.as_deref(), Some(Path::new("/var/lib/postgresql")));
        let r = pg.retention.as_ref().unwrap();
        assert_eq!((r.keep_daily, r.keep_weekly), (Some(7), Some(4)));
        let wal = &c.disks["wal"];
        assert_eq!(wal.via, "fuse");
        assert_eq!(wal.schedule.as_deref(), Some("*-*-* *:00/15"));
        // The disk's retention replaces the default's whole.
        let r = wal.retention.as_ref().unwrap();
        assert_eq!((r.keep_last, r.keep_daily), (Some(48), None));
        assert_eq!(wal.container, None);
        assert_eq!(c.select(&[]).unwrap().len(), 2);
        assert_eq!(c.select(&["wal".into()]).unwrap()[0].name, "wal");
        let e = format!("{:#}", c.select(&["nope".into()]).unwrap_err());
        assert!(
            e.contains("no disk \"nope\"") && e.contains("pgdata, wal"),
            "{e}"
        );
    }

    #[test]
    fn tcp_listeners_need_tls_or_insecure_tcp() {
        let c = parse(
            "[defaults]\ntls-creds = \"/etc/cowsnap/tls\"\n[disk.a]\npath = \"/x\"\n\
             listen = [\"tcp:127.0.0.1:10809\"]\ntls-verify-peer = true\n",
        )
        .unwrap();
        let a = &c.disks["a"];
        assert_eq!(a.listen, ["tcp:127.0.0.1:10809"]);
        assert_eq!(a.tls_creds.as_deref(), Some(Path::new("/etc/cowsnap/tls")));
        assert!(a.tls_verify_peer && !a.insecure_tcp);
        let c = parse("[disk.a]\npath = \"/x\"\nlisten = [\"tcp:[::1]:1\"]\ninsecure-tcp = true\n")
            .unwrap();
        assert!(c.disks["a"].insecure_tcp && c.disks["a"].tls_creds.is_none());
        for (text, want) in [
            (
                "[disk.a]\npath = \"/x\"\nlisten = [\"tcp:127.0.0.1:1\"]\n",
                "line 3, column 10: disk \"a\": unable to listen on tcp:127.0.0.1:1: NBD over TCP needs TLS: give tls-creds",
            ),
            (
                "[disk.a]\npath = \"/x\"\nlisten = [\"127.0.0.1:1\"]\ninsecure-tcp = true\n",
                "invalid --listen",
            ),
            (
                "[disk.a]\npath = \"/x\"\ntls-creds = \"/t\"\n",
                "TLS is for TCP listeners",
            ),
            (
                "[disk.a]\npath = \"/x\"\nlisten = [\"tcp:127.0.0.1:1\"]\ntls-creds = \"t\"\n",
                "give an absolute directory",
            ),
            (
                "[disk.a]\npath = \"/x\"\nlisten = [\"tcp:127.0.0.1:1\"]\ntls-creds = \"/t\"\ninsecure-tcp = true\n",
                "invalid insecure-tcp",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn an_empty_file_configures_no_disk() {
        assert!(parse("").unwrap().disks.is_empty());
    }

    /// Each bad file is refused with the line of the offending key.
    #[test]
    fn errors_name_the_line() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[disk.a]\npath = \"/x\"\nchunk-size = \"63K\"\n",
                "line 3",
                "chunk-size",
            ),
            (
                "[disk.a]\npath = \"/x\"\nvia = \"iscsi\"\n",
                "line 3",
                "invalid via",
            ),
            ("[disk.a]\n\npath = \"relative\"\n", "line 3", "absolute"),
            ("[disk.a]\npath = \"/x\"\ncolour = 1\n", "line 3", "colour"),
            (
                "[disk.a]\npath = \"/x\"\nconnections = 4\n",
                "line 3",
                "connections needs",
            ),
            (
                "[disk.a]\npath = \"/x\"\nvia = \"nbd\"\nconnections = 99\n",
                "line 4",
                "1 to 16",
            ),
            (
                "[disk.a]\npath = \"/x\"\nrepository = \"/srv/r\"\n",
                "line 3",
                "repo:DIR",
            ),
            (
                "[disk.a]\npath = \"/x\"\nrepository = \"repo:/r@G\"\n",
                "line 3",
                "without @GEN",
            ),
            (
                "[disk.a]\npath = \"/x\"\ncontainer = \"ram:\"\n",
                "line 3",
                "container",
            ),
            (
                "[disk.a]\npath = \"/x\"\ncontainer = \"file:rel.cow:1G\"\n",
                "line 3",
                "absolute",
            ),
            ("\n\n[disk.a]\nvia = \"fuse\"\n", "line 3", "has no path"),
            (
                "[disk.\"a b\"]\npath = \"/x\"\n",
                "line 1",
                "invalid disk name",
            ),
            (
                "[disk.a]\npath = \"/x\"\n[disk.b]\npath = \"/x\"\n",
                "line 3",
                "has the path of disk \"a\"",
            ),
            (
                "[disk.a]\npath = \"/x\"\nschedule = \"daily\"\n",
                "line 1",
                "no repository",
            ),
            (
                "[disk.a]\npath = \"/x\"\nretention = { keep-daily = 0 }\n",
                "line 3",
                "keeps nothing",
            ),
            (
                "[disk.a]\npath = \"/x\"\nretention = { keep-dayly = 3 }\n",
                "line 3",
                "keep-dayly",
            ),
            ("[defaults]\npath = \"/x\"\n", "line 2", "[disk.NAME]"),
            (
                "[disk.a]\npath = \"/x\"\nread-only = \"yes\"\n",
                "line 3",
                "bool",
            ),
            (
                "[disk.a]\npath = \"/x\"\ndirect-io = \"maybe\"\n",
                "line 3",
                "invalid direct-io",
            ),
            (
                "[disk.a]\npath = \"/x\"\ndirect-io = 1\n",
                "line 3",
                "invalid direct-io",
            ),
            (
                "[disk.a]\npath = \"/x\"\npath = \"/y\"\n",
                "line 3",
                "duplicate",
            ),
            ("[disk.a\npath = \"/x\"\n", "line 1", ""),
            (
                "[disk.a]\npath = \"/x\"\nschedule = \"\"\n",
                "line 3",
                "invalid schedule",
            ),
        ];
        for (text, line, what) in cases {
            let e = err(text);
            assert!(
                e.starts_with("/etc/cowsnap/cowsnap.toml: ")
                    && e.contains(line)
                    && e.contains(what),
                "for {text:?}: {e}"
            );
        }
    }

    #[test]
    fn direct_io_is_inherited_and_takes_on_off_or_a_bool() {
        let c = parse(
            "[defaults]\ndirect-io = \"off\"\n\
             [disk.a]\npath = \"/a\"\n\
             [disk.b]\npath = \"/b\"\ndirect-io = true\n\
             [disk.c]\npath = \"/c\"\ndirect-io = \"on\"\n",
        )
        .unwrap();
        assert_eq!(c.disks["a"].direct_io, Some(false));
        assert_eq!(c.disks["b"].direct_io, Some(true));
        assert_eq!(c.disks["c"].direct_io, Some(true));
        let c = parse("[disk.a]\npath = \"/a\"\n").unwrap();
        assert_eq!(c.disks["a"].direct_io, None, "unset: the daemon's default");
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab\n", 99), (2, 1));
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let e = format!(
            "{:#}",
            Config::load(Path::new("/nonexistent/cowsnap.toml")).unwrap_err()
        );
        assert!(
            e.contains("unable to read the configuration /nonexistent/cowsnap.toml"),
            "{e}"
        );
    }
}
