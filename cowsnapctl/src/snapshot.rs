//! `cowsnapctl snapshot` and `cowsnapctl release`: pull mode. `snapshot` takes a
//! snapshot of an attached disk (quiesce and `--freeze` as `backup` does them, through
//! [`crate::backup::call_frozen`]) and the daemon serves it read-only as an NBD export
//! (`NAME@snap` by default) on the disk's socket and `--listen` addresses; the command
//! prints its URI. `release` removes the export (its clients are disconnected), with
//! `--commit` commits the change-log cut to a new pull generation (printed) so the
//! next snapshot's `qemu:dirty-bitmap:<id>` lists only what changed since, and frees
//! the container.

use crate::backup::{call_frozen, Frozen};
use crate::backup_args::instant_settings;
use crate::freeze::disk_mountpoint as freeze_target;
use crate::parse::human_bytes;
use crate::Dirs;
use anyhow::{anyhow, bail, Result};
use cowsnap_nbd::control::{self, Client, Released, Request, SnapshotParams, SnapshotStatus};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Disk name; several names take one snapshot instant for all of them (a
    /// consistency group), each served as its own NAME@snap.
    #[arg(required = true, num_args = 1.., value_name = "NAME")]
    pub names: Vec<String>,
    /// Container for preserved originals (ram:SIZE, file:PATH:SIZE, dev:PATH). It must
    /// hold every chunk first written while the snapshot is held; when it is full the
    /// snapshot fails (its reads get EIO) and the disk goes on.
    #[arg(long)]
    pub container: Option<String>,
    /// Export name (default NAME@snap).
    #[arg(long, value_name = "EXPORTNAME")]
    pub export: Option<String>,
    /// Freeze this filesystem around the snapshot instant (FIFREEZE/FITHAW): the
    /// mount point of a filesystem on one of the disks' devices. Repeatable.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Vec<PathBuf>,
    /// Several disks: the longest the writes of any disk may stay paused waiting for
    /// the group's instant (at most 10s); past it nothing is taken and every disk
    /// resumes.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub pause_limit: String,
    /// Thaw after this long at most; if the snapshot instant was not reached by then,
    /// the snapshot is released and the command fails (at most 10s).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub freeze_timeout: String,
    /// Wait for this long without writes before the snapshot (default 3s; 0 = don't).
    #[arg(long, value_name = "DURATION")]
    pub quiesce_idle: Option<String>,
    /// Fail if no idle window came within this long.
    #[arg(long, value_name = "DURATION", default_value = "80s")]
    pub quiesce_timeout: String,
    /// Print the snapshot's status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `release`.
#[derive(Debug, clap::Args)]
pub struct ReleaseArgs {
    /// Disk name (several: each disk's snapshot is released in turn).
    #[arg(required = true, num_args = 1.., value_name = "NAME")]
    pub names: Vec<String>,
    /// The copy of the snapshot is complete: commit the change-log cut to a new pull
    /// generation (printed), so the next snapshot's dirty bitmap is relative to it.
    /// Without it, change tracking is left as if the snapshot had not been taken.
    #[arg(long)]
    pub commit: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn connect(dirs: &Dirs, name: &str, timeout: Duration) -> Result<Client> {
    cowsnap_nbd::paths::validate_name(name)?;
    let paths = dirs.paths(name);
    Client::connect(&paths.ctl_socket(), timeout).map_err(|e| match &e {
        control::ControlError::NotRunning { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            anyhow!(
                "unable to reach disk {name:?}: permission denied on {} (the daemon's files \
                 belong to the user that attached it, usually root)",
                paths.ctl_socket().display()
            )
        }
        _ => anyhow!("disk {name:?} is not attached or its daemon does not answer: {e}"),
    })
}

fn daemon_msg(e: control::ControlError) -> String {
    match e {
        control::ControlError::Daemon(m) => m,
        e => e.to_string(),
    }
}

/// `cowsnapctl snapshot NAME1 NAME2 …`: one instant for all, through the group
/// coordinator.
fn snapshot_group(
    dirs: &Dirs,
    a: &SnapshotArgs,
    params: SnapshotParams,
    bound: Duration,
) -> Result<i32> {
    if a.quiesce_idle
        .as_deref()
        .is_some_and(|q| crate::parse::parse_duration(q).is_ok_and(|d| !d.is_zero()))
        && a.names.len() > 1
    {
        bail!(
            "--quiesce-idle applies to one disk only: several disks pause together for at \
             most --pause-limit instead"
        );
    }
    let pause_limit = crate::group::pause_limit(&a.pause_limit)?;
    let (members, pause_bound) =
        crate::group::snapshot_group(dirs, &a.names, &a.freeze, bound, pause_limit, &params)?;
    let mut out = Vec::new();
    for (name, m) in members {
        let st: SnapshotStatus = serde_json::from_value(serde_json::Value::Object(m))
            .map_err(|e| anyhow!("unable to understand the reply of {name}: {e}"))?;
        out.push((name, st));
    }
    if a.json {
        let v = serde_json::json!({
            "pause_bound_us": pause_bound.as_micros() as u64,
            "disks": out.iter().map(|(n, st)| {
                let mut v = serde_json::to_value(st).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), n.clone().into());
                }
                v
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for (n, st) in &out {
        println!("{n} {}", st.uri);
    }
    eprintln!(
        "one snapshot instant for {} (writes paused at most {:.1} ms); end them with: \
         cowsnapctl release {} [--commit]",
        a.names.join(", "),
        pause_bound.as_secs_f64() * 1000.0,
        a.names.join(" ")
    );
    Ok(0)
}

/// `cowsnapctl snapshot NAME`.
pub fn snapshot(dirs: &Dirs, a: SnapshotArgs) -> Result<i32> {
    let (idle, timeout, bound) = instant_settings(
        a.quiesce_idle.as_deref(),
        &a.quiesce_timeout,
        !a.freeze.is_empty() || a.names.len() > 1,
        &a.freeze_timeout,
    )?;
    let container = crate::parse::absolute_container(a.container.as_deref())?;
    let params = SnapshotParams {
        export: a.export.clone(),
        container,
        quiesce_idle_ms: idle.as_millis() as u64,
        quiesce_timeout_ms: timeout.as_millis() as u64,
    };
    if a.names.len() > 1 || a.freeze.len() > 1 {
        return snapshot_group(dirs, &a, params, bound);
    }
    let name = a.names[0].as_str();
    let mut cl = connect(dirs, name, timeout + Duration::from_secs(60))?;
    let paths = dirs.paths(name);
    let mountpoint = match a.freeze.first() {
        Some(m) => Some(freeze_target(&paths, &mut cl, name, m)?),
        None => None,
    };
    if mountpoint.is_some() {
        // no signal may end the command while the filesystem is frozen (the watchdog
        // thaws it in any case); they stay blocked until the command ends
        crate::signals::block()?;
    }
    let (r, frozen) = call_frozen(
        &mut cl,
        mountpoint.as_ref(),
        bound,
        &Request::Snapshot { params },
    )?;
    let frozen_ms = match frozen {
        Frozen::No => None,
        Frozen::Held(ms) => Some(ms),
        Frozen::Broken(why) => {
            if r.is_ok() {
                if let Err(e) = cl.call(&Request::Release { commit: false }) {
                    eprintln!("cowsnapctl: unable to release the snapshot: {e}");
                }
                bail!(
                    "unable to take a snapshot of {}: {why}; it was released, it would not \
                     be consistent",
                    name
                );
            }
            bail!(
                "unable to take a snapshot of {}: {why}; the daemon said: {}",
                name,
                r.err().map(daemon_msg).unwrap_or_default()
            );
        }
    };
    let m = r.map_err(|e| anyhow!("{}", daemon_msg(e)))?;
    let st: SnapshotStatus = serde_json::from_value(serde_json::Value::Object(m))
        .map_err(|e| anyhow!("unable to understand the daemon's reply: {e}"))?;
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("frozen_ms".into(), serde_json::json!(frozen_ms));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("{}", st.uri);
    for u in &st.tcp_uris {
        eprintln!("also served at {u}");
    }
    if let Some(ms) = frozen_ms {
        eprintln!("froze the filesystem for {ms} ms around the snapshot instant");
    }
    let f = &st.figures;
    eprintln!(
        "snapshot {} of {} served read-only; container {} ({} slots)",
        st.export, name, f.container, f.container_slots
    );
    if f.bytes_excluded_free + f.bytes_excluded_zero > 0 {
        eprintln!(
            "known zeros (reported as holes): {} free in the filesystem, {} holes of the origin",
            human_bytes(f.bytes_excluded_free),
            human_bytes(f.bytes_excluded_zero)
        );
    }
    match &st.dirty_bitmap {
        Some(g) => eprintln!(
            "dirty bitmap: qemu:dirty-bitmap:{g} ({} chunks of {} changed since {g})",
            st.dirty_chunks,
            human_bytes(u64::from(st.dirty_chunk_size))
        ),
        None => eprintln!("no dirty bitmap (no committed generation to compare with)"),
    }
    for n in &f.notes {
        eprintln!("note: {n}");
    }
    eprintln!("end it with: cowsnapctl release {} [--commit]", name);
    Ok(0)
}

/// `cowsnapctl release NAME... [--commit]`: each disk in turn; the exit status is 1
/// when any failed (each failure is reported).
pub fn release(dirs: &Dirs, a: ReleaseArgs) -> Result<i32> {
    if a.names.len() == 1 {
        return release_one(dirs, &a, &a.names[0]);
    }
    let mut code = 0;
    for n in &a.names {
        if let Err(e) = release_one(dirs, &a, n) {
            eprintln!("cowsnapctl: {e:#}");
            code = 1;
        }
    }
    Ok(code)
}

fn release_one(dirs: &Dirs, a: &ReleaseArgs, name: &str) -> Result<i32> {
    let mut cl = connect(dirs, name, Duration::from_secs(60))?;
    let m = cl
        .call(&Request::Release { commit: a.commit })
        .map_err(|e| anyhow!("{}", daemon_msg(e)))?;
    let rel: Released = m
        .get("released")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| anyhow!("unable to understand the daemon's reply: {e}"))?
        .ok_or_else(|| anyhow!("unable to understand the daemon's reply: no \"released\""))?;
    let closed = m
        .get("connections_closed")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "released": rel,
                "connections_closed": closed,
            }))?
        );
        return Ok(0);
    }
    match &rel.generation {
        Some(g) => {
            println!("{g}");
            eprintln!(
                "released snapshot {} of {} after {} s ({closed} connection(s) closed); \
                 committed as {g}: the next snapshot's dirty bitmap is qemu:dirty-bitmap:{g}",
                rel.export, name, rel.age_s
            );
        }
        None => eprintln!(
            "released snapshot {} of {} after {} s ({closed} connection(s) closed); change \
             tracking unchanged",
            rel.export, name, rel.age_s
        ),
    }
    Ok(0)
}
