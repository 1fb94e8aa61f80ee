//! `cowsnapctl backup NAME1 NAME2 … --to repo:DIR`: one snapshot instant for several
//! disks (a consistency group), whatever daemons serve them; also the path of a
//! one-disk backup with hooks or several mount points to freeze.
//!
//! The coordinator holds one control connection per disk and drives every daemon
//! through the steps of `group_backup` (the protocol table is in
//! `cowsnap_core::backup::group`):
//!
//! 1. everything is checked (names, target, containers, mount points, flags) and the
//!    pre-snapshot hook runs — a failing or hanging hook fails the backup here,
//!    before anything is paused;
//! 2. `group_backup` to every daemon; each opens its target and container and answers
//!    `prepared`;
//! 3. the `--freeze` mount points are frozen (each bounded by its watchdog);
//! 4. `group_pause` to every daemon; each stops its writes (in-flight ones finish)
//!    and answers `paused` — from the first `paused` on, the daemons count down the
//!    pause limit themselves;
//! 5. `group_go` to every daemon: each takes its instant and resumes;
//! 6. thaw, then the post-snapshot hook (it runs whenever the pre-snapshot hook ran);
//! 7. follow every backup until each is `ready` (its data copied), then
//!    `group_commit` (with the post hook's note) to every daemon, and wait for each to
//!    be `complete`.
//!
//! Any failure before step 7's commit — a daemon refusing or dying, a timeout, a
//! thaw that came too late, an interrupt — sends `group_abort` to every other daemon
//! and closes the connections; each daemon resumes its writes (if paused) and
//! publishes nothing. A daemon that loses the coordinator's connection does the same
//! by itself.

use crate::backup_args::{instant_settings, BackupArgs};
use crate::parse::{check_target, human_bytes, parse_duration};
use crate::{freeze, hooks, progress, Dirs};
use anyhow::{anyhow, bail, Context, Result};
use cowsnap_core::backup::group::MAX_PAUSE_LIMIT;
use cowsnap_core::backup::BackupState;
use cowsnap_core::repo::generation::GroupRef;
use cowsnap_nbd::control::{BackupParams, BackupStatus, Client, Request};
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a daemon may take to open its target and container (a repository's parent
/// index is read then).
const PREPARE_WAIT: Duration = Duration::from_secs(300);

/// A daemon's reply fields.
type ReplyFields = serde_json::Map<String, serde_json::Value>;

/// One disk of the group and its daemon's connection.
struct Member {
    name: String,
    cl: Client,
    /// The job id once the instant is taken.
    id: Option<u64>,
    /// The reply to `group_go`, once this member took its instant.
    went: Option<serde_json::Map<String, serde_json::Value>>,
    /// Sent `group_commit`.
    committed: bool,
    last: Option<BackupStatus>,
}

/// What the command reports at the end (the JSON `result` line's fields).
#[derive(Debug, Serialize)]
struct GroupReport {
    group: Option<String>,
    target: String,
    /// The longest time any disk's writes were paused, µs (from the daemons' figures).
    pause_us: u64,
    /// Upper bound of any disk's pause seen by the coordinator, µs: from sending
    /// `group_pause` to the last `group_go` reply (no disk can be paused outside it).
    pause_bound_us: u64,
    /// The pause limit, ms.
    pause_limit_ms: u64,
    frozen_ms: Option<u64>,
    notes: Vec<String>,
    disks: Vec<MemberReport>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct MemberReport {
    name: String,
    state: Option<BackupState>,
    generation: Option<String>,
    bytes_copied: u64,
    instant_pause_us: u64,
    error: Option<String>,
}

/// Send `group_abort` to every member still in the protocol (best effort: a dead one
/// aborts by itself when its connection closes, which dropping the clients does).
fn abort_all(members: &mut [Member], why: &str) {
    for m in members.iter_mut() {
        if m.committed {
            continue;
        }
        let _ = m.cl.set_read_timeout(Duration::from_secs(5));
        let _ = m.cl.send(&Request::GroupAbort {
            why: why.to_string(),
        });
    }
}

/// Read one step's reply from every member; the first failure is returned with the
/// disk's name.
fn receive_all(
    members: &mut [Member],
    within: Duration,
    what: &str,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let deadline = Instant::now() + within;
    let mut out = Vec::with_capacity(members.len());
    for m in members.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        m.cl.set_read_timeout(left)
            .map_err(|e| anyhow!("disk {}: {e}", m.name))?;
        let r = m.cl.receive().map_err(|e| match e {
            cowsnap_nbd::control::ControlError::Daemon(msg) => {
                anyhow!("disk {} refused to {what}: {msg}", m.name)
            }
            e => anyhow!("disk {} did not {what}: {e}", m.name),
        })?;
        out.push(r);
    }
    Ok(out)
}

/// The `group_go` replies: every member's is read (those that took their instant are
/// recorded in `went`, so a failure can undo exactly those); the first failure is
/// returned.
fn receive_went(members: &mut [Member], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut first = None;
    for m in members.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = m.cl.set_read_timeout(left).and_then(|_| m.cl.receive());
        match r {
            Ok(reply) => m.went = Some(reply),
            Err(e) => {
                let e = match e {
                    cowsnap_nbd::control::ControlError::Daemon(msg) => {
                        anyhow!("disk {} refused to take its instant: {msg}", m.name)
                    }
                    e => anyhow!("disk {} did not take its instant: {e}", m.name),
                };
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn send_all(members: &mut [Member], req: &Request, what: &str) -> Result<()> {
    for m in members.iter_mut() {
        m.cl.send(req)
            .map_err(|e| anyhow!("unable to {what} disk {}: {e}", m.name))?;
    }
    Ok(())
}

/// `--pause-limit`: more than 0, at most [`MAX_PAUSE_LIMIT`].
pub fn pause_limit(given: &str) -> Result<Duration> {
    let pause = parse_duration(given)?;
    if pause.is_zero() || pause > MAX_PAUSE_LIMIT {
        bail!(
            "invalid --pause-limit {given:?}: give more than 0 and at most {}s",
            MAX_PAUSE_LIMIT.as_secs()
        );
    }
    Ok(pause)
}

/// The checked flags of a group backup.
struct Flags {
    pause_limit: Duration,
    hook_timeout: Duration,
    idle: Duration,
    quiesce_timeout: Duration,
    freeze_bound: Duration,
}

/// Check the flags of a group backup.
fn check_flags(a: &BackupArgs, target: &str) -> Result<Flags> {
    check_target(target)?;
    let mut seen = std::collections::BTreeSet::new();
    for n in &a.names {
        cowsnap_nbd::paths::validate_name(n)?;
        if !seen.insert(n) {
            bail!("disk {n:?} is named twice");
        }
    }
    if a.names.len() > 1 && !target.starts_with("repo:") {
        bail!(
            "a backup of several disks needs a repository target (--to repo:DIR): the disks' \
             generations form one restore point there"
        );
    }
    if a.incremental && !target.starts_with("repo:") {
        bail!("--incremental needs a repository target (--to repo:DIR)");
    }
    if a.names.len() > 1 {
        if let Some(q) = &a.quiesce_idle {
            if !parse_duration(q)?.is_zero() {
                bail!(
                    "--quiesce-idle applies to one disk only: several disks pause together for \
                     at most --pause-limit instead"
                );
            }
        }
        if let Some(c) = &a.container {
            if !c.starts_with("ram:") {
                bail!(
                    "--container {c:?} would be shared by {} disks: give ram:SIZE, or give each \
                     disk its own container when attaching it",
                    a.names.len()
                );
            }
        }
        if a.priority.is_some() {
            bail!("--priority names byte ranges of one disk: not with several disks");
        }
    }
    // one disk without a freeze waits for the idle window as a plain backup does;
    // several disks pause together for at most the pause limit instead
    let (idle, quiesce_timeout, freeze_bound) = instant_settings(
        a.quiesce_idle.as_deref(),
        &a.quiesce_timeout,
        !a.freeze.is_empty() || a.names.len() > 1,
        &a.freeze_timeout,
    )?;
    Ok(Flags {
        pause_limit: pause_limit(&a.pause_limit)?,
        hook_timeout: hooks::check_timeout(parse_duration(&a.hook_timeout)?, &a.hook_timeout)?,
        idle,
        quiesce_timeout,
        freeze_bound,
    })
}

/// Run `backup` for `a.names` as one group.
pub fn run(dirs: &Dirs, a: &BackupArgs) -> Result<i32> {
    let target = a.to.clone().unwrap_or_default();
    let Flags {
        pause_limit,
        hook_timeout,
        idle,
        quiesce_timeout,
        freeze_bound,
    } = check_flags(a, &target)?;
    let rate_limit = a
        .rate_limit
        .as_deref()
        .map(crate::parse::parse_size)
        .transpose()?;
    let priority = a
        .priority
        .as_deref()
        .map(crate::parse::parse_ranges)
        .transpose()?
        .unwrap_or_default();
    let container = crate::parse::absolute_container(a.container.as_deref())?;
    let to = crate::parse::absolute_target(&target)?;
    let mut names = a.names.clone();
    names.sort();
    let group = (names.len() > 1)
        .then(|| -> Result<GroupRef> {
            Ok(GroupRef {
                id: cowsnap_core::repo::generation::new_generation_id()?,
                disks: names.clone(),
            })
        })
        .transpose()?;

    // Every daemon answers, and every check passes, before anything runs.
    let mut members = connect_all(dirs, &names)?;
    let base = BackupParams {
        to: to.clone(),
        container,
        incremental: a.incremental,
        priority,
        rate_limit,
        quiesce_idle_ms: idle.as_millis() as u64,
        quiesce_timeout_ms: quiesce_timeout.as_millis() as u64,
        all_blocks: a.all_blocks,
        notes: Vec::new(),
        group: group.clone(),
        key_file: crate::key::key_file_for_daemon()?,
    };
    crate::key::check_backup_target(&base.to)?;
    for m in &members {
        let own = cowsnap_nbd::attached::OwnDisk {
            name: &m.name,
            origin: None,
            default_container: None,
        };
        cowsnap_nbd::attached::check_backup(&dirs.run_dir, &own, &base)?;
    }
    let mountpoints = mountpoints_of(dirs, &mut members, &a.freeze)?;

    let interrupted = crate::signals::block_and_watch()?;
    let hook_env = vec![
        ("COWSNAP_DISKS", names.join(" ")),
        ("COWSNAP_TARGET", target.clone()),
    ];
    let mut notes = Vec::new();
    if let Some(cmd) = &a.pre_snapshot {
        let o = hooks::run("pre-snapshot", cmd, &hook_env, hook_timeout)?;
        eprintln!("{}", o.note());
        if !o.ok() {
            bail!(
                "unable to back up {}: the {}; nothing was paused or changed",
                names.join(", "),
                o.note()
            );
        }
        notes.push(o.note());
    }
    let mut params = base;
    params.notes = notes.clone();

    let pause_limit_ms = pause_limit.as_millis() as u64;
    let started = snapshot_instant(
        &mut members,
        &|| Request::GroupBackup {
            params: params.clone(),
            pause_limit_ms,
        },
        pause_limit,
        &mountpoints,
        freeze_bound,
        &interrupted,
    );
    // the post-snapshot hook runs whenever the pre-snapshot one ran (or none was given)
    let mut late_notes = Vec::new();
    if let Some(cmd) = &a.post_snapshot {
        let mut env = hook_env.clone();
        env.push((
            "COWSNAP_RESULT",
            if started.is_ok() { "ok" } else { "failed" }.to_string(),
        ));
        match hooks::run("post-snapshot", cmd, &env, hook_timeout) {
            Ok(o) => {
                eprintln!("{}", o.note());
                late_notes.push(o.note());
            }
            Err(e) => {
                eprintln!("cowsnapctl: {e:#}");
                late_notes.push(format!("post-snapshot hook: {e:#}"));
            }
        }
    }
    let (frozen_ms, pause_bound) = match started {
        Ok(f) => f,
        Err(e) => {
            abort_all(&mut members, &format!("{e:#}"));
            drop(members);
            return Err(e);
        }
    };
    notes.extend(late_notes.iter().cloned());
    follow(
        &mut members,
        &target,
        group.as_ref(),
        (pause_limit, pause_bound),
        frozen_ms,
        notes,
        late_notes,
        a.json,
        &interrupted,
    )
}

/// One control connection per disk; a disk without a daemon that answers fails here.
fn connect_all(dirs: &Dirs, names: &[String]) -> Result<Vec<Member>> {
    let mut members = Vec::with_capacity(names.len());
    for n in names {
        let paths = dirs.paths(n);
        let cl = Client::connect(&paths.ctl_socket(), Duration::from_secs(60)).map_err(|e| {
            anyhow!("disk {n:?} is not attached or its daemon does not answer: {e}")
        })?;
        members.push(Member {
            name: n.clone(),
            cl,
            id: None,
            went: None,
            committed: false,
            last: None,
        });
    }
    Ok(members)
}

/// The `--freeze` mount points, each a filesystem on one of the members' devices.
fn mountpoints_of(
    dirs: &Dirs,
    members: &mut [Member],
    freeze: &[std::path::PathBuf],
) -> Result<Vec<freeze::Mountpoint>> {
    let mut mountpoints: Vec<freeze::Mountpoint> = Vec::new();
    for f in freeze {
        let mut why = Vec::new();
        let mut found = None;
        for m in members.iter_mut() {
            match freeze::disk_mountpoint(&dirs.paths(&m.name), &mut m.cl, &m.name, f) {
                Ok(mp) => {
                    found = Some(mp);
                    break;
                }
                Err(e) => why.push(format!("{}: {e:#}", m.name)),
            }
        }
        let mp = found.ok_or_else(|| {
            anyhow!(
                "unable to freeze {}: it is not a filesystem on any of the disks ({})",
                f.display(),
                why.join("; ")
            )
        })?;
        if mountpoints.iter().any(|p| p.path == mp.path) {
            bail!("--freeze {} is given twice", mp.path.display());
        }
        mountpoints.push(mp);
    }
    Ok(mountpoints)
}

/// `cowsnapctl snapshot NAME1 NAME2 …`: one snapshot instant for several disks, each
/// served as its own export (steps 2–5 of a group backup; each is released on its own
/// with `release`). Returns every member's snapshot status and the coordinator's bound
/// on the pause. On a failure nothing stays paused and no snapshot of this command
/// stays exported.
pub fn snapshot_group(
    dirs: &Dirs,
    names: &[String],
    freeze: &[std::path::PathBuf],
    freeze_bound: Duration,
    pause_limit: Duration,
    params: &cowsnap_nbd::control::SnapshotParams,
) -> Result<(Vec<(String, ReplyFields)>, Duration)> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        cowsnap_nbd::paths::validate_name(n)?;
        if !seen.insert(n) {
            bail!("disk {n:?} is named twice");
        }
    }
    if names.len() > 1 && params.export.is_some() {
        bail!("--export names one export: not with several disks (each is served as NAME@snap)");
    }
    let mut members = connect_all(dirs, names)?;
    let mountpoints = mountpoints_of(dirs, &mut members, freeze)?;
    let interrupted = crate::signals::block_and_watch()?;
    let pause_limit_ms = pause_limit.as_millis() as u64;
    let r = snapshot_instant(
        &mut members,
        &|| Request::GroupSnapshot {
            params: params.clone(),
            pause_limit_ms,
        },
        pause_limit,
        &mountpoints,
        freeze_bound,
        &interrupted,
    );
    match r {
        Ok((_, bound)) => Ok((
            members
                .into_iter()
                .map(|m| (m.name, m.went.unwrap_or_default()))
                .collect(),
            bound,
        )),
        Err(e) => {
            // members that did not take their instant gave up by themselves when told or
            // when the connection closes; the ones that did are released here
            abort_all(&mut members, &format!("{e:#}"));
            for m in members.iter_mut().filter(|m| m.went.is_some()) {
                let _ = m.cl.set_read_timeout(Duration::from_secs(30));
                // the abort line's error reply comes first
                let _ = m.cl.receive();
                if let Err(re) = m.cl.call(&Request::Release { commit: false }) {
                    eprintln!(
                        "cowsnapctl: unable to release the snapshot of {}: {re}",
                        m.name
                    );
                }
            }
            Err(e)
        }
    }
}

/// Steps 2–5: prepare, freeze, pause, go, thaw. Returns how long the filesystems were
/// frozen (if any were). On error the caller aborts every member.
fn snapshot_instant(
    members: &mut [Member],
    request: &dyn Fn() -> Request,
    pause_limit: Duration,
    mountpoints: &[freeze::Mountpoint],
    freeze_bound: Duration,
    interrupted: &AtomicBool,
) -> Result<(Option<u64>, Duration)> {
    let names = || {
        members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let all = names();
    for m in members.iter_mut() {
        m.cl.send(&request())
            .map_err(|e| anyhow!("unable to start the snapshot of {}: {e}", m.name))?;
    }
    receive_all(members, PREPARE_WAIT, "prepare its snapshot")
        .with_context(|| format!("unable to back up {all}"))?;
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted before the snapshot instant; nothing was changed");
    }
    let mut watchdogs = Vec::new();
    for mp in mountpoints {
        match freeze::freeze(mp, freeze_bound) {
            Ok(w) => watchdogs.push((mp, w)),
            Err(e) => {
                for (_, w) in watchdogs {
                    w.finish();
                }
                return Err(e.context(format!("unable to back up {all}")));
            }
        }
    }
    // from the pause on, this thread runs ahead of the disks' users (back to 0 after)
    let _ = cowsnap_core::thread_prio::set_thread_nice(cowsnap_core::thread_prio::INSTANT_NICE);
    let t_pause = Instant::now();
    let step = send_all(members, &Request::GroupPause, "pause")
        .and_then(|_| receive_all(members, pause_limit, "pause its writes"))
        .and_then(|_| send_all(members, &Request::GroupGo, "take the instant of"))
        .and_then(|_| receive_went(members, Duration::from_secs(30)));
    let pause_seen = t_pause.elapsed();
    let _ = cowsnap_core::thread_prio::set_thread_nice(0);
    // thawed at once, on success and on failure alike
    let mut frozen_ms = None;
    let mut thaw_problem = None;
    for (mp, w) in watchdogs {
        match w.finish() {
            freeze::Outcome::Held { frozen_for } => {
                frozen_ms = Some(frozen_ms.unwrap_or(0).max(frozen_for.as_millis() as u64));
            }
            freeze::Outcome::Expired { bound, .. } => {
                thaw_problem.get_or_insert(format!(
                    "the snapshot instant was not reached within {} ms of freezing {} \
                     (--freeze-timeout); it was thawed then",
                    bound.as_millis(),
                    mp.path.display()
                ));
            }
            freeze::Outcome::ThawFailed(e) => {
                thaw_problem.get_or_insert(format!(
                    "unable to thaw {} ({e}): it was not frozen any more at the snapshot instant",
                    mp.path.display()
                ));
            }
        }
    }
    step.with_context(|| {
        format!(
            "unable to take one snapshot instant for {all} ({} ms after the pause began)",
            pause_seen.as_millis()
        )
    })?;
    for m in members.iter_mut() {
        m.id = m
            .went
            .as_ref()
            .and_then(|r| r.get("id"))
            .and_then(|v| v.as_u64());
    }
    if let Some(why) = thaw_problem {
        bail!("unable to back up {all}: {why}; the images would not be consistent");
    }
    Ok((frozen_ms, pause_seen))
}

/// Step 7: follow every backup; commit all once all are `ready`; report.
#[allow(clippy::too_many_arguments)]
fn follow(
    members: &mut [Member],
    target: &str,
    group: Option<&GroupRef>,
    (pause_limit, pause_bound): (Duration, Duration),
    frozen_ms: Option<u64>,
    notes: Vec<String>,
    late_notes: Vec<String>,
    json_flag: bool,
    interrupted: &AtomicBool,
) -> Result<i32> {
    let json = json_flag || !std::io::stdout().is_terminal();
    let label = match group {
        Some(g) => format!("group {} ({})", g.id, g.disks.join(", ")),
        None => members[0].name.clone(),
    };
    if json {
        progress::set_json("backup");
        progress::emit(&progress::event_with(
            "started",
            "backup",
            &serde_json::json!({
                "group": group.map(|g| g.id.clone()),
                "disks": members.iter().map(|m| serde_json::json!({"name": m.name, "id": m.id})).collect::<Vec<_>>(),
                "target": target,
                "frozen_ms": frozen_ms,
            }),
        ));
    } else {
        eprintln!("snapshot instant of {label} taken; copying");
    }
    let mut limit = progress::RateLimit::new(progress::INTERVAL);
    let mut failure: Option<String> = None;
    let mut canceled = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && failure.is_none() {
            canceled = true;
            failure = Some("interrupted".into());
        }
        let mut all_ready = true;
        let mut all_done = true;
        for m in members.iter_mut() {
            let st =
                m.cl.set_read_timeout(Duration::from_secs(60))
                    .and_then(|_| m.cl.call(&Request::BackupStatus))
                    .map_err(|e| format!("lost the daemon of {} during the backup: {e}", m.name))
                    .and_then(|r| {
                        r.get("backup")
                            .cloned()
                            .map(serde_json::from_value::<BackupStatus>)
                            .transpose()
                            .map_err(|e| format!("unable to understand {}'s status: {e}", m.name))
                    });
            match st {
                Ok(Some(b)) if Some(b.id) == m.id => {
                    if b.state == BackupState::Failed && failure.is_none() {
                        failure = Some(format!(
                            "the backup of {} failed: {}",
                            m.name,
                            b.error.clone().unwrap_or_default()
                        ));
                    }
                    all_ready &= b.state == BackupState::Ready;
                    all_done &= b.state.is_finished();
                    m.last = Some(b);
                }
                Ok(_) => {
                    failure.get_or_insert(format!(
                        "the daemon of {} no longer reports this backup",
                        m.name
                    ));
                    all_ready = false;
                }
                Err(e) => {
                    failure.get_or_insert(e);
                    all_ready = false;
                }
            }
        }
        if let Some(why) = &failure {
            abort_all(members, why);
            // wait (bounded) for every reachable member to end, for the report
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30)
                && members.iter_mut().any(|m| {
                    m.cl.call(&Request::BackupStatus)
                        .ok()
                        .and_then(|r| r.get("backup").cloned())
                        .and_then(|b| serde_json::from_value::<BackupStatus>(b).ok())
                        .is_some_and(|b| !b.state.is_finished())
                })
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let rep = report(
                members,
                target,
                group,
                (pause_limit, pause_bound),
                frozen_ms,
                &notes,
                Some(why),
            );
            if json {
                progress::emit(&progress::result_event("backup", false, &rep));
            }
            // a failure after some members were told to commit (their daemon's commit
            // itself failed, or a daemon died in between) leaves an incomplete group
            let published: Vec<&str> = members
                .iter()
                .filter(|m| m.committed)
                .filter(|m| {
                    m.last
                        .as_ref()
                        .is_some_and(|b| b.state == BackupState::Complete)
                })
                .map(|m| m.name.as_str())
                .collect();
            let outcome = if published.is_empty() {
                "nothing was published".to_string()
            } else {
                format!(
                    "the group is incomplete: generations were published for {} only (each \
                     a correct backup of its own disk; `list` marks the group incomplete)",
                    published.join(", ")
                )
            };
            if canceled {
                eprintln!("cowsnapctl: backup of {label} cancelled; {outcome}");
                return Ok(130);
            }
            bail!("backup of {label} to {target} failed: {why}; {outcome}");
        }
        if all_ready && !members.iter().all(|m| m.committed) {
            for m in members.iter_mut() {
                m.cl.call(&Request::GroupCommit {
                    notes: late_notes.clone(),
                })
                .map_err(|e| anyhow!("unable to commit the backup of {}: {e}", m.name))?;
                m.committed = true;
            }
        }
        if all_done {
            break;
        }
        if json && limit.ready(Instant::now()) {
            let copied: u64 = members
                .iter()
                .filter_map(|m| m.last.as_ref())
                .map(|b| b.bytes_copied)
                .sum();
            progress::emit(&serde_json::json!({
                "event": "progress",
                "command": "backup",
                "bytes_copied": copied,
                "disks": members.iter().map(|m| serde_json::json!({
                    "name": m.name,
                    "state": m.last.as_ref().map(|b| b.state),
                    "bytes_copied": m.last.as_ref().map_or(0, |b| b.bytes_copied),
                })).collect::<Vec<_>>(),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rep = report(
        members,
        target,
        group,
        (pause_limit, pause_bound),
        frozen_ms,
        &notes,
        None,
    );
    if json {
        progress::emit(&progress::result_event("backup", true, &rep));
    } else {
        println!(
            "backup of {label} to {target} complete: writes paused for at most {:.1} ms \
             (limit {} ms){}",
            rep.pause_us as f64 / 1000.0,
            pause_limit.as_millis(),
            frozen_ms
                .map(|f| format!(", filesystems frozen for {f} ms"))
                .unwrap_or_default()
        );
        for d in &rep.disks {
            println!(
                "  {}: generation {}, {} read, paused {:.1} ms",
                d.name,
                d.generation.as_deref().unwrap_or("-"),
                human_bytes(d.bytes_copied),
                d.instant_pause_us as f64 / 1000.0
            );
        }
        for n in &rep.notes {
            println!("note: {n}");
        }
    }
    Ok(0)
}

fn report(
    members: &[Member],
    target: &str,
    group: Option<&GroupRef>,
    (pause_limit, pause_bound): (Duration, Duration),
    frozen_ms: Option<u64>,
    notes: &[String],
    error: Option<&String>,
) -> GroupReport {
    let disks: Vec<MemberReport> = members
        .iter()
        .map(|m| MemberReport {
            name: m.name.clone(),
            state: m.last.as_ref().map(|b| b.state),
            generation: m.last.as_ref().and_then(|b| b.generation.clone()),
            bytes_copied: m.last.as_ref().map_or(0, |b| b.bytes_copied),
            instant_pause_us: m.last.as_ref().map_or(0, |b| b.instant_pause_us),
            error: m.last.as_ref().and_then(|b| b.error.clone()),
        })
        .collect();
    let mut all_notes = notes.to_vec();
    for m in members {
        if let Some(b) = &m.last {
            all_notes.extend(
                b.notes
                    .iter()
                    .filter(|n| !notes.contains(n))
                    .map(|n| format!("{}: {n}", m.name)),
            );
        }
    }
    GroupReport {
        group: group.map(|g| g.id.clone()),
        target: target.to_string(),
        pause_us: disks.iter().map(|d| d.instant_pause_us).max().unwrap_or(0),
        pause_bound_us: pause_bound.as_micros() as u64,
        pause_limit_ms: pause_limit.as_millis() as u64,
        frozen_ms,
        notes: all_notes,
        disks,
        error: error.cloned(),
    }
}
