//! Running one backup: the snapshot instant, the drainer thread, and the end (commit or
//! abort of the target and of the change-log cut, uninstalling the snapshot).

use super::group::{CommitDecision, CommitGate, InstantBarrier, COMMIT_WAIT};
use super::job::Job;
use super::last::{LastBackup, LastBackupRecord};
use super::quiesce::quiesce;
use super::BackupParams;
use crate::changelog::Cut;
use crate::chunk_map::{ChunkMap, Geometry};
use crate::container::{self, Container};
use crate::drain::Drainer;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::export::Export;
use crate::snapshot::Snapshot;
use crate::target::{self, Scope, SnapshotInfo, Target};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Open what `p` names (unless given), quiesce, take the snapshot instant and start the
/// drainer thread. Returns right after the instant. A group member (`coord`) meets the
/// coordinator at the barrier before pausing and before the instant, and publishes
/// only when the gate says so (see `group.rs`).
pub(super) fn start(
    engine: &Arc<Engine>,
    job: &Arc<Job>,
    last: &Arc<LastBackupRecord>,
    p: BackupParams,
    target: Option<Box<dyn Target>>,
    container: Option<Box<dyn Container>>,
    coord: Option<(&mut dyn InstantBarrier, CommitGate)>,
) -> Result<()> {
    let (mut barrier, commit_gate) = match coord {
        Some((b, g)) => (Some(b), Some(g)),
        None => (None, None),
    };
    let cfg = engine.config();
    let geo = Geometry::new(engine.size(), cfg.chunk_size)?;
    let container = match container {
        Some(c) => {
            container::check_slot_size(&*c, geo.chunk_size)?;
            c
        }
        None => container::open_for_disk(
            p.container.as_deref(),
            cfg.default_container.as_deref(),
            geo.chunk_size,
        )?,
    };
    let mut target = match target {
        Some(t) => t,
        None => {
            let key = match &p.key_file {
                Some(f) => Some(crate::repo::crypt::RepoKey::load(f)?),
                None => None,
            };
            target::open(&p.to, &geo, &cfg.name, p.incremental, cfg.direct_io, key)?
        }
    };
    // the parent's index is loaded now, while writes run, not under the pause
    let mut expect = Scope::All;
    if let Some(cl) = engine.changelog() {
        if target.uses_change_log() {
            expect = target.prepare(cl.relative_to().as_deref());
        }
    }
    // A backup that reads everything has its chunk map made now too (the planes are
    // O(disk size) to fill); an incremental's depends on the cut, made at the instant.
    let granule = u64::from(target.granule_chunks().max(1));
    let mut full_map = (matches!(expect, Scope::All) && granule.is_power_of_two())
        .then(|| ChunkMap::new(geo, granule, None));
    target.annotate(p.group.as_ref(), &p.notes);
    if let Some(b) = barrier.as_mut() {
        if let Err(e) = b.prepared() {
            target.abort(&e.to_string());
            return Err(e);
        }
    }
    let gate = match quiesce(engine, job, &p) {
        Ok(g) => g,
        Err(e) => {
            target.abort(&e.to_string());
            return Err(e);
        }
    };
    // the pause counts from here: no data-changing request is in flight (a group
    // member's includes the wait for the other disks of its group)
    let paused_at = std::time::Instant::now();
    if let Some(b) = barrier.as_mut() {
        // the group's other disks pause too; nothing has been changed yet
        if let Err(e) = b.paused() {
            drop(gate);
            target.abort(&e.to_string());
            return Err(e);
        }
    }
    // ---- the snapshot instant: no data-changing request is in flight ----
    let changelog = engine.changelog();
    let cut: Option<Cut> = match changelog {
        Some(cl) if target.uses_change_log() => match cl.begin_generation() {
            Ok(c) => Some(c),
            Err(e) => {
                job.note(format!("change tracking unavailable ({e}): full backup"));
                None
            }
        },
        _ => None,
    };
    let scope = match target.scope(cut.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            drop(gate);
            end_generation(engine, job, cut.as_ref(), None);
            let e = e.with_context("unable to start the backup");
            target.abort(&e.to_string());
            return Err(e);
        }
    };
    if !granule.is_power_of_two() {
        drop(gate);
        end_generation(engine, job, cut.as_ref(), None);
        let e = crate::err!(
            InvalidInput,
            "unable to start the backup: target granule {granule} is not a power of two"
        );
        target.abort(&e.to_string());
        return Err(e);
    }
    let bits = match (&scope, &cut) {
        (Scope::All, _) => None,
        (Scope::Changed, Some(c)) => Some(&c.changed[..]),
        (Scope::Changed, None) => {
            job.note("no change set available: every chunk is read".into());
            None
        }
    };
    let map = match (bits, full_map.take()) {
        (None, Some(m)) => m,
        (bits, _) => ChunkMap::new(geo, granule, bits),
    };
    // chunks discarded before the instant and not written since (a copy: writers
    // after the instant change the live plane, not this one)
    let discarded = (!p.all_blocks).then(|| engine.discarded_at_instant(&gate));
    let snap = Arc::new(Snapshot::new(map, container, cfg.throttle));
    let created_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    gate.install(snap.clone());
    // ---- writers run again; pending chunks are now preserved before changing ----
    let pause_us = paused_at.elapsed().as_micros() as u64;
    job.run(snap.clone());
    job.update(|st| {
        st.instant_pause_us = pause_us;
        st.instant_unix = created_unix;
    });
    // a cancel that raced with the instant (it saw no snapshot yet)
    if job.is_canceled() {
        snap.fail("backup canceled");
    }
    // A repository target that falls back to a full read says why in its own note.
    if p.incremental && matches!(scope, Scope::All) && !p.to.starts_with("repo:") {
        job.note("this target takes full backups only: incremental ignored".into());
    }
    let info = SnapshotInfo {
        disk: cfg.name.clone(),
        disk_size: geo.disk_size,
        chunk_size: geo.chunk_size,
        created_unix,
        lineage: changelog
            .map(|c| c.lineage().to_string())
            .unwrap_or_default(),
        seq_next: cut.as_ref().map_or(0, |c| c.seq_next),
        seq_lowest_unacked: cut.as_ref().map_or(0, |c| c.seq_lowest_unacked),
    };
    if let Err(e) = target.begin(&info) {
        let e = e.with_context("unable to start the backup");
        snap.fail(e.to_string());
        finish(
            engine,
            job,
            last,
            &snap,
            Err(e.to_string()),
            target,
            cut,
            None,
        );
        return Err(e);
    }
    snap.add_priority(&p.priority);
    let engine2 = engine.clone();
    let job2 = job.clone();
    let snap2 = snap.clone();
    let last2 = last.clone();
    let rate = p.rate_limit;
    let full = matches!(scope, Scope::All);
    let all_blocks = p.all_blocks;
    let direct_io = engine.config().direct_io;
    let spawned = std::thread::Builder::new()
        .name("cowsnap-drain".into())
        .spawn(move || {
            lower_thread_priority();
            // a panic in the drainer must not leave writers held: it fails the
            // snapshot like any other drain error
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                super::scope::exclude_known_zeros(
                    &**engine2.origin(),
                    &snap2,
                    &job2,
                    full,
                    all_blocks,
                    discarded.as_ref(),
                );
                // the bulk reads bypass the page cache where the origin is a block
                // device, or a plain file read by a target that takes every byte
                // through the buffer (drain.rs notes); anything else reads the origin
                // as served
                let origin = &**engine2.origin();
                let opened = match direct_io {
                    false => Ok(None),
                    true if origin.is_block_device() => origin.open_direct_reader(),
                    true if target.reads_file_origin_direct() => {
                        crate::blockio::open_direct_file_reader(origin)
                    }
                    true => Ok(None),
                };
                let direct = opened.unwrap_or_else(|e| {
                    log::warn!("{e}; the backup reads the origin through the page cache");
                    None
                });
                if direct.is_some() {
                    log::info!(
                        "backup of {}: reading the origin with O_DIRECT",
                        engine2.config().name
                    );
                }
                let reader = direct.as_ref().unwrap_or(engine2.origin());
                Drainer::new(&**reader, &snap2, &mut *target, rate).run()
            }));
            let res = match res {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the drainer stopped unexpectedly (internal error)".into()),
            };
            finish(
                &engine2,
                &job2,
                &last2,
                &snap2,
                res,
                target,
                cut,
                commit_gate,
            );
        });
    if let Err(e) = spawned {
        let e = Error::io("unable to start the drainer thread", e);
        snap.fail(e.to_string());
        engine.uninstall(&snap);
        job.settle(&snap);
        return Err(e);
    }
    Ok(())
}

/// The drainer is background work: give the CPU to the disk's users first (nice +10
/// for this thread only). Failure is harmless and ignored.
fn lower_thread_priority() {
    if let Err(e) = crate::thread_prio::set_thread_nice(10) {
        log::debug!("unable to lower the drainer's priority: {e}");
    }
}

/// Commit the change-log cut as `generation`, or merge it back (`None`).
fn end_generation(engine: &Engine, job: &Job, cut: Option<&Cut>, generation: Option<&str>) {
    let (Some(cl), Some(cut)) = (engine.changelog(), cut) else {
        return;
    };
    let r = match generation {
        Some(g) => cl.commit_generation(cut, g),
        None => cl.abort_generation(cut),
    };
    if let Err(e) = r {
        job.note(format!("change log not updated: {e}"));
    }
}

/// A drained group member: wait for the coordinator's decision (`ready` meanwhile).
/// The notes of a commit are added to the target; anything else is the reason to abort.
fn await_group_commit(
    job: &Job,
    target: &mut dyn Target,
    gate: &CommitGate,
) -> std::result::Result<(), String> {
    job.update(|st| st.state = super::BackupState::Ready);
    let t0 = std::time::Instant::now();
    loop {
        if job.is_canceled() {
            return Err("backup canceled while waiting for the group's commit".into());
        }
        match gate.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(CommitDecision::Commit(notes)) => {
                target.annotate(None, &notes);
                return Ok(());
            }
            Ok(CommitDecision::Abort(why)) => return Err(why),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if t0.elapsed() < COMMIT_WAIT => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "the group's commit did not come within {} s of this disk's data being copied",
                    COMMIT_WAIT.as_secs()
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(
                    "the group was abandoned (its coordinator went away, or another disk of \
                     the group failed): nothing published"
                        .into(),
                )
            }
        }
    }
}

/// The end of a job: commit or abort the target and the cut, uninstall the snapshot,
/// then publish the state. A group member (`gate`) commits only when the group says so.
#[allow(clippy::too_many_arguments)]
fn finish(
    engine: &Engine,
    job: &Job,
    last: &LastBackupRecord,
    snap: &Arc<Snapshot>,
    res: std::result::Result<(), String>,
    mut target: Box<dyn Target>,
    cut: Option<Cut>,
    gate: Option<CommitGate>,
) {
    let res = match (res, &gate) {
        (Ok(()), Some(g)) => await_group_commit(job, &mut *target, g),
        (r, _) => r,
    };
    // the state is published last, after the snapshot is gone, so a caller that
    // sees "complete"/"failed" can start the next backup at once
    let outcome: std::result::Result<(), String> = match res {
        Ok(()) => match target.commit() {
            Ok(summary) => {
                end_generation(engine, job, cut.as_ref(), summary.generation.as_deref());
                job.update(|st| {
                    st.generation = summary.generation;
                    st.notes.extend(summary.notes);
                    st.bytes_stored = summary.bytes_stored;
                    st.repo_io = summary.repo_io;
                });
                Ok(())
            }
            Err(e) => {
                end_generation(engine, job, cut.as_ref(), None);
                Err(e
                    .with_context("unable to commit the backup target")
                    .to_string())
            }
        },
        Err(e) => {
            // the drainer's error, or the first cause recorded by the snapshot
            let why = snap.failure().unwrap_or(e);
            snap.fail(why.clone());
            end_generation(engine, job, cut.as_ref(), None);
            target.abort(&why);
            Err(why)
        }
    };
    // every waiter was released (fail) or nothing is pending (complete)
    engine.uninstall(snap);
    job.settle(snap);
    match outcome {
        Ok(()) => {
            // recorded before "complete" is published: whoever sees it sees the record
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if let Err(e) = last.set(LastBackup::from_status(&job.status(), now)) {
                log::warn!("{e}");
                job.note(format!("the last backup's record was not saved: {e}"));
            }
            job.complete()
        }
        Err(why) => job.fail(why),
    }
    let st = job.status();
    log::info!(
        "backup {} {}: {} chunks copied, {} preserved, {} ms{}",
        st.id,
        st.state,
        st.chunks_copied,
        st.chunks_preserved,
        st.elapsed_ms,
        st.error.map(|e| format!(": {e}")).unwrap_or_default()
    );
}
