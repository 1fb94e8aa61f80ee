//! `cowsnapctl backup`: quiesce (fsfreeze and/or an idle window), start the backup in
//! the daemon, follow it to the end with a progress bar or JSON event lines
//! ([`crate::progress`]: `started`, `progress`, then `result` with the final status).
//!
//! SIGINT, SIGTERM and SIGHUP are blocked for the whole command and read by a
//! dedicated thread, so no signal can end the process while a filesystem is frozen.
//! `--freeze` accepts only the mount point of a filesystem on this disk's device, and
//! every freeze is bounded by a watchdog ([`crate::freeze`]): if the snapshot instant
//! was not reached while frozen, the backup is cancelled and the command fails. An
//! interrupt after the snapshot cancels the backup in the daemon.

use crate::parse::{check_target, human_bytes, parse_ranges, parse_size};
use crate::status::backup_line;
use crate::{freeze, progress, Dirs};
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::backup::BackupState;
use cowsnap_nbd::control::{self, BackupParams, BackupStatus, Client, Request};
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the backup's progress is asked for (the end is reported at once).
const POLL: Duration = Duration::from_millis(100);

use crate::backup_args::instant_settings;
pub use crate::backup_args::BackupArgs;

/// A progress line: the common fields ([`progress::progress_event`]) and the daemon's
/// status (its `elapsed_ms` is the backup's own).
fn progress_line(b: &BackupStatus, total: u64) -> serde_json::Value {
    let mut v = progress::event_with("progress", "backup", b);
    let common = progress::progress_event(
        "backup",
        None,
        b.bytes_copied,
        total.max(b.bytes_copied),
        progress::Unit::Bytes,
        Duration::from_millis(b.elapsed_ms),
    );
    if let (Some(o), serde_json::Value::Object(m)) = (v.as_object_mut(), common) {
        for (k, val) in m {
            if k != "elapsed_ms" {
                o.insert(k, val);
            }
        }
    }
    v
}

/// `cowsnapctl backup NAME`: with `--to` as given; without it, as the configuration
/// file says (the scheduled backup of `cowsnap-backup@NAME.service`).
pub fn run(dirs: &Dirs, mut a: BackupArgs) -> Result<i32> {
    let mut retention = None;
    if a.to.is_none() && a.names.len() > 1 {
        bail!(
            "a backup of several disks needs --to repo:DIR (the configuration file gives \
             each disk its own repository)"
        );
    }
    let name = a.names[0].clone();
    if a.to.is_none() {
        let cfg = crate::config::Config::load(&a.config.config)?;
        let d = cfg.disk(&name)?;
        let repo = d.repository.clone().ok_or_else(|| {
            anyhow!(
                "no --to given and disk {:?} has no repository in {}",
                name,
                cfg.file.display()
            )
        })?;
        eprintln!(
            "backing up {} to {repo} as {} says{}",
            name,
            cfg.file.display(),
            d.freeze
                .as_ref()
                .filter(|_| a.freeze.is_empty())
                .map(|f| format!(" (freezing {})", f.display()))
                .unwrap_or_default()
        );
        a.to = Some(repo);
        a.incremental = true;
        if a.freeze.is_empty() {
            a.freeze.extend(d.freeze.clone());
        }
        retention = d.retention.clone();
    }
    let code = if a.coordinated() {
        crate::group::run(dirs, &a)?
    } else {
        run_to(dirs, &a)?
    };
    if let (0, Some(policy), Some(to)) = (code, retention, &a.to) {
        apply_retention(&name, to, &policy)?;
    }
    Ok(code)
}

/// After a successful configured backup: prune the disk's generations by its policy.
/// Its lines go to stderr, so a `--json` result stays the last line of stdout.
fn apply_retention(
    name: &str,
    to: &str,
    policy: &cowsnap_core::repo::retention::RetentionPolicy,
) -> Result<()> {
    let (dir, _) = cowsnap_nbd::paths::parse_repo_spec(to)?;
    let opts = cowsnap_core::repo::prune::PruneOptions {
        disk: Some(name.to_string()),
        ..cowsnap_core::repo::prune::PruneOptions::new(policy.clone())
    };
    let rep = cowsnap_core::repo::prune(&dir, &opts).with_context(|| {
        format!("the backup of {name} is complete, but its retention could not be applied")
    })?;
    for d in rep.generations.iter().filter(|d| d.disk == name && !d.keep) {
        eprintln!(
            "retention of {name}: removed {} ({})",
            d.generation, d.created
        );
    }
    eprintln!(
        "retention of {name}: removed {} generation(s), kept {}; {} chunk(s) freed ({})",
        rep.removed_generations.len(),
        rep.generations
            .iter()
            .filter(|d| d.disk == name && d.keep)
            .count(),
        rep.chunks_removed,
        human_bytes(rep.bytes_freed)
    );
    if let (Some(g), n) = (rep.grace_secs, rep.chunks_unreferenced) {
        if n > 0 || !rep.chunks_collected {
            eprintln!(
                "retention of {name}: {n} unreferenced chunk(s) younger than the grace period ({g} s) left for a later prune{}",
                if rep.chunks_collected { "" } else { "; the sweep ran out of time and stopped early" }
            );
        }
    }
    Ok(())
}

fn run_to(dirs: &Dirs, a: &BackupArgs) -> Result<i32> {
    let name = a.names[0].as_str();
    let target = a.to.clone().unwrap_or_default();
    check_target(&target)?;
    if a.incremental && !target.starts_with("repo:") {
        bail!("--incremental needs a repository target (--to repo:DIR)");
    }
    let (idle, timeout, freeze_bound) = instant_settings(
        a.quiesce_idle.as_deref(),
        &a.quiesce_timeout,
        !a.freeze.is_empty(),
        &a.freeze_timeout,
    )?;
    let priority = a
        .priority
        .as_deref()
        .map(parse_ranges)
        .transpose()?
        .unwrap_or_default();
    let rate_limit = a.rate_limit.as_deref().map(parse_size).transpose()?;
    let container = crate::parse::absolute_container(a.container.as_deref())?;
    let to = crate::parse::absolute_target(&target)?;
    let paths = dirs.paths(name);
    cowsnap_nbd::paths::validate_name(name)?;
    let mut cl =
        Client::connect(&paths.ctl_socket(), timeout + Duration::from_secs(60)).map_err(|e| {
            match &e {
                control::ControlError::NotRunning { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    anyhow!(
                        "unable to back up {}: permission denied on {} (the daemon's files \
                         belong to the user that attached it, usually root)",
                        name,
                        paths.ctl_socket().display()
                    )
                }
                _ => anyhow!(
                    "disk {:?} is not attached or its daemon does not answer: {e}",
                    name
                ),
            }
        })?;
    let mountpoint = match a.freeze.first() {
        Some(m) => Some(freeze::disk_mountpoint(&paths, &mut cl, name, m)?),
        None => None,
    };

    // Signals: blocked here, read by a thread (also inherited by the progress thread).
    let interrupted = crate::signals::block_and_watch()?;

    let params = BackupParams {
        to,
        container,
        incremental: a.incremental,
        priority,
        rate_limit,
        quiesce_idle_ms: idle.as_millis() as u64,
        quiesce_timeout_ms: timeout.as_millis() as u64,
        all_blocks: a.all_blocks,
        key_file: crate::key::key_file_for_daemon()?,
        ..Default::default()
    };
    crate::key::check_backup_target(&params.to)?;
    // Early, for a clear error before any freeze; the daemon checks again before it
    // opens anything (it also knows the disk's default container).
    let own = cowsnap_nbd::attached::OwnDisk {
        name,
        origin: None,
        default_container: None,
    };
    cowsnap_nbd::attached::check_backup(&dirs.run_dir, &own, &params)?;
    let (started, frozen) = call_frozen(
        &mut cl,
        mountpoint.as_ref(),
        freeze_bound,
        &Request::Backup { params },
    )?;
    let frozen_ms = match frozen {
        Frozen::No => None,
        Frozen::Held(ms) => Some(ms),
        Frozen::Broken(why) => {
            if let Ok(m) = &started {
                let id = m.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
                cancel_and_wait(&mut cl, id);
                bail!(
                    "unable to back up {}: {why}; backup #{id} was cancelled, its image \
                     would not be consistent",
                    name
                );
            }
            let said = match started {
                Err(control::ControlError::Daemon(msg)) => msg,
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            };
            bail!("unable to back up {}: {why}; the daemon said: {said}", name);
        }
    };
    let id = match started {
        Ok(m) => m.get("id").and_then(|v| v.as_u64()).unwrap_or(0),
        Err(control::ControlError::Daemon(msg)) => bail!("backup of {} failed: {msg}", name),
        Err(e) => bail!("backup of {} failed: {e}", name),
    };
    let json = a.json || !std::io::stdout().is_terminal();
    if json {
        progress::set_json("backup");
        progress::emit(&progress::event_with(
            "started",
            "backup",
            &serde_json::json!({ "id": id, "name": name, "target": target, "frozen_ms": frozen_ms }),
        ));
    } else if let (Some(ms), Some(mp)) = (frozen_ms, &mountpoint) {
        eprintln!(
            "froze {} for {ms} ms around the snapshot instant",
            mp.path.display()
        );
    }
    let bar = if json {
        None
    } else {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}\n  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        Some(pb)
    };
    let mut cancel_sent = false;
    let mut wait_ok = true;
    let mut limit = progress::RateLimit::new(progress::INTERVAL);
    loop {
        if interrupted.load(Ordering::SeqCst) && !cancel_sent {
            cancel_sent = true;
            if let Some(pb) = &bar {
                pb.println("interrupted: cancelling the backup");
            } else {
                eprintln!("interrupted: cancelling the backup");
            }
            if let Err(e) = cl.call(&Request::Cancel) {
                eprintln!("cowsnapctl: unable to cancel: {e}");
            }
        }
        // the daemon answers when the backup ends or after POLL; an older daemon
        // without backup_wait gets backup_status and the client sleeps instead
        let asked = Instant::now();
        let m = match wait_ok {
            true => cl
                .call(&Request::BackupWait {
                    timeout_ms: POLL.as_millis() as u64,
                })
                .ok(),
            false => None,
        };
        let m = match m {
            Some(m) => m,
            None => {
                wait_ok = false;
                cl.call(&Request::BackupStatus)
                    .map_err(|e| anyhow!("lost the daemon of {} during the backup: {e}", name))?
            }
        };
        let b: Option<BackupStatus> = m
            .get("backup")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| anyhow!("unable to understand the backup status: {e}"))?;
        let Some(b) = b else {
            bail!("the daemon of {} reports no backup", name);
        };
        if b.id != id && id != 0 {
            bail!("backup #{id} was replaced by #{} in the daemon", b.id);
        }
        let total = b
            .chunks_in_scope
            .saturating_mul(u64::from(b.chunk_size))
            .min(b.disk_size.max(1));
        if let Some(pb) = &bar {
            pb.set_length(total.max(b.bytes_copied));
            pb.set_position(b.bytes_copied);
            pb.set_message(format!(
                "container {}/{} slots (high-water {})  holds {}  throttled {} ({} ms)",
                b.container_used,
                b.container_slots,
                b.container_high_water,
                b.holds,
                b.throttled_writes,
                b.throttle_delay_ms
            ));
        }
        match b.state {
            BackupState::Complete => {
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                if json {
                    progress::emit(&progress::result_event("backup", true, &b));
                } else {
                    println!(
                        "backup of {} to {} complete: {} in {}; {}",
                        name,
                        target,
                        human_bytes(b.bytes_copied),
                        crate::parse::human_secs(b.elapsed_ms / 1000),
                        backup_line(&b)
                    );
                    println!(
                        "scope {}: {} read, {} free space, {} discarded and {} holes stored as zeros unread",
                        human_bytes(b.bytes_in_scope),
                        human_bytes(b.bytes_copied),
                        human_bytes(b.bytes_excluded_free),
                        human_bytes(b.bytes_excluded_discarded),
                        human_bytes(b.bytes_excluded_zero)
                    );
                    if let Some(io) = &b.repo_io {
                        println!("{}", repo_io_line(io));
                    }
                    for n in &b.notes {
                        println!("note: {n}");
                    }
                }
                return Ok(if cancel_sent { 130 } else { 0 });
            }
            BackupState::Failed => {
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                let msg = b.error.clone().unwrap_or_else(|| b.state.to_string());
                if json {
                    progress::emit(&progress::result_event("backup", false, &b));
                }
                if cancel_sent {
                    eprintln!("cowsnapctl: backup of {} cancelled: {msg}", name);
                    return Ok(130);
                }
                bail!("backup of {} to {} failed: {msg}", name, target);
            }
            BackupState::Quiescing | BackupState::Running | BackupState::Ready => {
                if json && limit.ready(Instant::now()) {
                    progress::emit(&progress_line(&b, total));
                }
            }
        }
        // a daemon that answered early (an older one, or a quiescing backup) is not
        // asked again at once
        std::thread::sleep(POLL.saturating_sub(asked.elapsed()));
    }
}

/// The object-store line of a finished backup: where the parent's index came from,
/// index bytes fetched, store requests.
fn repo_io_line(io: &cowsnap_core::repo::cache::RepoIo) -> String {
    let parent = match io.parent_index.as_str() {
        "" => "no parent index".to_string(),
        from => format!("parent index from {from}"),
    };
    let mut s = format!(
        "repository: {parent}; index: {} from cache, fetched {} ({} bytes); {} store requests",
        io.index_cache_hits, io.indexes_fetched, io.index_bytes_fetched, io.store_requests
    );
    if io.index_cache_invalid > 0 {
        s.push_str(&format!(
            "; {} cached index(es) failed validation and were fetched again",
            io.index_cache_invalid
        ));
    }
    s
}

/// The daemon's answer to a request.
pub(crate) type Reply =
    std::result::Result<serde_json::Map<String, serde_json::Value>, control::ControlError>;

/// How a freeze around the snapshot instant went.
pub(crate) enum Frozen {
    /// No freeze asked for.
    No,
    /// Frozen for this many ms and the instant was inside the freeze.
    Held(u64),
    /// The instant cannot be called consistent: why.
    Broken(String),
}

/// Send `req` (which replies after its snapshot instant), inside a freeze of `mp` when
/// given (bounded by `bound`, thawed on success and on error alike).
pub(crate) fn call_frozen(
    cl: &mut Client,
    mp: Option<&freeze::Mountpoint>,
    bound: Duration,
    req: &Request,
) -> Result<(Reply, Frozen)> {
    let Some(mp) = mp else {
        return Ok((cl.call(req), Frozen::No));
    };
    let wd = freeze::freeze(mp, bound)?;
    let r = cl.call(req);
    // Thawed here, on success and on error alike (or already by the watchdog).
    let f = match wd.finish() {
        freeze::Outcome::Held { frozen_for } => Frozen::Held(frozen_for.as_millis() as u64),
        freeze::Outcome::Expired { bound, thaw_error } => Frozen::Broken(format!(
            "the snapshot instant was not reached within {} ms of freezing {} \
             (--freeze-timeout); it was thawed then{}",
            bound.as_millis(),
            mp.path.display(),
            thaw_error
                .map(|e| format!(" (thaw: {e})"))
                .unwrap_or_default()
        )),
        freeze::Outcome::ThawFailed(e) => Frozen::Broken(format!(
            "unable to thaw {} ({e}): it was not frozen any more at the snapshot instant",
            mp.path.display()
        )),
    };
    Ok((r, f))
}

/// Cancel backup `id` and wait (bounded) until the daemon says it has ended.
fn cancel_and_wait(cl: &mut Client, id: u64) {
    if let Err(e) = cl.call(&Request::Cancel) {
        eprintln!("cowsnapctl: unable to cancel backup #{id}: {e}");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let ended = cl
            .call(&Request::BackupStatus)
            .ok()
            .and_then(|m| m.get("backup").cloned())
            .and_then(|b| serde_json::from_value::<BackupStatus>(b).ok())
            .is_none_or(|b| b.id != id || b.state.is_finished());
        if ended {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("cowsnapctl: backup #{id} did not end within 60 s of being cancelled");
}

#[cfg(test)]
mod repo_io_tests {
    use super::repo_io_line;
    use cowsnap_core::repo::cache::RepoIo;

    #[test]
    fn repo_io_lines() {
        let io = RepoIo {
            parent_index: "cache".into(),
            index_cache_hits: 1,
            store_requests: 23,
            ..RepoIo::default()
        };
        assert_eq!(
            repo_io_line(&io),
            "repository: parent index from cache; index: 1 from cache, fetched 0 (0 bytes); 23 store requests"
        );
        let io = RepoIo {
            parent_index: "store".into(),
            index_cache_invalid: 1,
            indexes_fetched: 1,
            index_bytes_fetched: 4912,
            store_requests: 25,
            ..RepoIo::default()
        };
        let l = repo_io_line(&io);
        assert!(
            l.starts_with(
                "repository: parent index from store; index: 0 from cache, fetched 1 (4912 bytes)"
            ),
            "{l}"
        );
        assert!(
            l.ends_with("1 cached index(es) failed validation and were fetched again"),
            "{l}"
        );
        assert!(repo_io_line(&RepoIo::default()).starts_with("repository: no parent index;"));
    }
}
