//! `cowsnapctl status`: one line per attached disk, or JSON.

use crate::attach::{daemon_status_checked, read_pid};
use crate::parse::{human_bytes, human_secs};
use crate::Dirs;
use anyhow::{bail, Result};
use cowsnap_nbd::attach::AttachRecord;
use cowsnap_nbd::control::{BackupStatus, StatusInfo};
use cowsnap_nbd::paths;
use std::collections::BTreeSet;

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this disk.
    pub name: Option<String>,
    /// Print JSON (an object for one NAME, else an array).
    #[arg(long)]
    pub json: bool,
}

/// Names with a control socket or an attach record in the run dir.
pub fn attached_names(dirs: &Dirs) -> Vec<String> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(&dirs.run_dir) {
        for e in rd.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            for suf in [".ctl", ".attach.json"] {
                if let Some(n) = f.strip_suffix(suf) {
                    if paths::validate_name(n).is_ok() {
                        out.insert(n.to_string());
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// One line about a backup.
pub fn backup_line(b: &BackupStatus) -> String {
    let pct = if b.chunks_in_scope > 0 {
        b.chunks_copied as f64 * 100.0 / b.chunks_in_scope as f64
    } else {
        0.0
    };
    let mut s = format!(
        "backup #{} {} {pct:.0}% ({}/{} chunks, {} preserved; container high-water {}/{} slots; \
         {} holds {}ms; {} throttled {}ms)",
        b.id,
        b.state,
        b.chunks_copied,
        b.chunks_in_scope,
        b.chunks_preserved,
        b.container_high_water,
        b.container_slots,
        b.holds,
        b.hold_time_ms,
        b.throttled_writes,
        b.throttle_delay_ms
    );
    if let Some(e) = &b.error {
        s.push_str(&format!(": {e}"));
    }
    s
}

/// Live-restore progress, when the disk is being filled from a repository.
fn fill_line(s: &StatusInfo) -> String {
    match &s.fill {
        None => String::new(),
        Some(f) if f.complete => "  restore complete".into(),
        Some(f) => format!(
            "  restoring {}/{} chunks{}",
            f.done,
            f.total,
            f.error
                .as_ref()
                .map(|e| format!(" (stopped: {e})"))
                .unwrap_or_default()
        ),
    }
}

/// The snapshot export, when one is served.
pub fn snapshot_line(s: &cowsnap_nbd::control::SnapshotStatus) -> String {
    let f = &s.figures;
    let mut l = format!(
        "snapshot {} {} age {}  {}  container {}/{} slots (high-water {}), {} preserved; \
         {} throttled {}ms",
        s.export,
        s.state,
        human_secs(s.age_s),
        s.uri,
        f.container_used,
        f.container_slots,
        f.container_high_water,
        f.chunks_preserved,
        f.throttled_writes,
        f.throttle_delay_ms
    );
    if let Some(g) = &s.dirty_bitmap {
        l.push_str(&format!(
            "; dirty bitmap qemu:dirty-bitmap:{g} ({} chunks changed)",
            s.dirty_chunks
        ));
    }
    if let Some(e) = &s.error {
        l.push_str(&format!(": {e}"));
    }
    l
}

fn line(name: &str, rec: Option<&AttachRecord>, st: Option<&StatusInfo>) -> String {
    let via = rec.map(|r| r.via.to_string()).unwrap_or_else(|| "-".into());
    let dev = rec
        .and_then(|r| r.device.clone())
        .unwrap_or_else(|| "-".into());
    match st {
        None => format!("{name}  via {via}  {dev}  daemon not responding"),
        Some(s) => {
            let io = &s.stats;
            format!(
                "{name}  {}{}  via {via}  {dev}  up {}  reads {} ({})  writes {} ({})  conns {}  {}",
                human_bytes(s.size),
                if s.read_only { " ro" } else { "" },
                human_secs(s.uptime_s),
                io.reads,
                human_bytes(io.bytes_read),
                io.writes,
                human_bytes(io.bytes_written),
                s.connections,
                s.backup
                    .as_ref()
                    .map(backup_line)
                    .unwrap_or_else(|| "no backup".into())
            ) + &fill_line(s)
                + &s
                    .snapshot
                    .as_ref()
                    .map(|x| format!("\n  {}", snapshot_line(x)))
                    .unwrap_or_default()
        }
    }
}

pub fn run(dirs: &Dirs, a: StatusArgs) -> Result<i32> {
    let names = match &a.name {
        Some(n) => {
            paths::validate_name(n)?;
            vec![n.clone()]
        }
        None => {
            if let Err(e) = std::fs::read_dir(&dirs.run_dir) {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    bail!(
                        "unable to list the attached disks: permission denied on {} \
                         (it belongs to the user that attached them, usually root)",
                        dirs.run_dir.display()
                    );
                }
            }
            attached_names(dirs)
        }
    };
    let mut rows = Vec::new();
    let mut bad = 0;
    for n in &names {
        let paths = dirs.paths(n);
        let rec = AttachRecord::load(&paths.attach_record()).ok().flatten();
        let st = daemon_status_checked(&paths)?;
        if rec.is_none() && st.is_none() {
            if a.name.is_some() {
                bail!(
                    "no disk named {n:?} is attached (nothing in {})",
                    dirs.run_dir.display()
                );
            }
            continue;
        }
        if st.is_none() {
            bad += 1;
        }
        rows.push((n.clone(), rec, st, read_pid(&paths)));
    }
    if a.json {
        let arr: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, rec, st, pid)| {
                serde_json::json!({
                    "name": n,
                    "via": rec.as_ref().map(|r| r.via),
                    "device": rec.as_ref().and_then(|r| r.device.clone()),
                    "uri": st.as_ref().map(|s| s.uri.clone()).or(rec.as_ref().map(|r| r.uri.clone())),
                    "pid": st.as_ref().map(|s| s.pid as i32).or(*pid),
                    "responding": st.is_some(),
                    "backup": st.as_ref().and_then(|s| s.backup.clone()),
                    "fill": st.as_ref().and_then(|s| s.fill.clone()),
                    "snapshot": st.as_ref().and_then(|s| s.snapshot.clone()),
                    "lineage": st.as_ref().and_then(|s| s.lineage.clone()),
                    "attach": rec,
                    "daemon": st,
                })
            })
            .collect();
        if a.name.is_some() {
            println!("{}", serde_json::to_string_pretty(&arr[0])?);
        } else {
            println!("{}", serde_json::to_string_pretty(&arr)?);
        }
    } else if rows.is_empty() {
        eprintln!("no disks attached (run dir {})", dirs.run_dir.display());
    } else {
        for (n, rec, st, _) in &rows {
            println!("{}", line(n, rec.as_ref(), st.as_ref()));
        }
    }
    Ok(if bad > 0 { 1 } else { 0 })
}
