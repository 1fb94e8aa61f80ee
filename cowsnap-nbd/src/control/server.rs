//! The daemon's side of the control socket: one thread per connection reads request
//! lines (at most [`MAX_LINE`] bytes; the rest of a longer one is skipped after its
//! error reply), answers each in order, and on `shutdown` replies, then calls the
//! daemon's stop hook.
//!
//! Handlers only call `Engine` methods that are safe concurrently with I/O (stats,
//! flush, start_backup, backup_status, backup_priority, cancel_backup). A backup
//! request is checked before anything is opened: its paths must be absolute (the
//! daemon works in `/`) and its target and container must not be somebody's live data
//! ([`crate::attached::check_backup`]).

use super::wire::{
    self, BackupParams, ExportedGeneration, FillInfo, IoCounters, Request, StatusInfo, MAX_LINE,
};
use crate::attached;
use crate::nbd::handshake::ExportLookup;
use crate::nbd::server::Server;
use crate::paths::{self, DiskPaths};
use cowsnap_core::backup::group::{CommitDecision, MAX_PAUSE_LIMIT};
use cowsnap_core::backup::Backups;
use cowsnap_core::changelog::ChangeLog;
use cowsnap_core::engine::Engine;
use cowsnap_core::export::Export;
use cowsnap_core::identity::RestoredFrom;
use cowsnap_core::restore::generation_export::GenerationExport;
use cowsnap_core::restore::live::FillingIo;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the control server answers about, and with what.
pub struct ControlServer {
    /// The disk's files (name, sockets, run directory).
    pub paths: DiskPaths,
    /// The origin path as served.
    pub origin: PathBuf,
    /// The export refuses writes.
    pub read_only: bool,
    /// `--listen` values, as given.
    pub listen: Vec<String>,
    /// The TCP listeners require TLS (`--tls-creds`): their URIs are `nbds://`.
    pub tls: bool,
    /// The disk's default container for backups.
    pub container: Option<String>,
    /// The engine serving the disk.
    pub engine: Arc<Engine>,
    /// The disk's backup jobs.
    pub backups: Arc<Backups>,
    /// The NBD server (for its connection count).
    pub server: Arc<Server>,
    /// When the daemon started serving.
    pub started: Instant,
    /// The disk's change log (none for a read-only export).
    pub changelog: Option<Arc<ChangeLog>>,
    /// The live restore's filling layer, if any.
    pub filling: Option<Arc<FillingIo>>,
    /// The generation served instead of an origin (`--generation`), if any.
    pub generation: Option<Arc<GenerationExport>>,
    /// The generation the disk was restored from, if any.
    pub restored_from: Option<RestoredFrom>,
    /// Called after the reply to `shutdown` is sent.
    pub on_shutdown: Box<dyn Fn() + Send + Sync>,
}

/// Paths in a backup request must be absolute: the daemon works in `/`, so a relative
/// one would land there, not where the caller meant.
fn check_request_paths(p: &BackupParams) -> Result<(), String> {
    let to = paths::target_path(&p.to);
    let c = p.container.as_deref().and_then(paths::container_path);
    for path in to.into_iter().chain(c) {
        if !Path::new(path).is_absolute() {
            return Err(format!(
                "unable to start the backup: the path {path:?} is relative \
                 (the daemon works in /); give an absolute path"
            ));
        }
    }
    Ok(())
}

impl ControlServer {
    /// Accept connections on `listener` in a thread of its own, one thread each.
    pub fn spawn(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            let me = self.clone();
                            if let Err(e) = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || me.serve_conn(s))
                            {
                                log::warn!("control: unable to start a connection thread: {e}");
                            }
                        }
                        Err(e) => log::warn!("control accept: {e}"),
                    }
                }
            })
            .map(|_| ())
    }

    /// Answer one control line (never panics on bad input); the flag says "stop after
    /// replying".
    pub fn handle_line(&self, line: &str) -> (String, bool) {
        match wire::decode_request(line) {
            Err(e) => {
                log::warn!("control: {e}");
                (wire::error_reply(&e), false)
            }
            Ok(req) => self.handle(req),
        }
    }

    /// Answer one request; the flag says "stop after replying".
    pub fn handle(&self, req: Request) -> (String, bool) {
        let fail = |e: &dyn std::fmt::Display| wire::error_reply(&e.to_string());
        match req {
            Request::Status => (wire::ok_reply(&self.status()), false),
            Request::Flush => match self.engine.flush() {
                Ok(()) => (wire::ok_reply(&()), false),
                Err(e) => (fail(&format!("unable to flush the origin: {e}")), false),
            },
            Request::Shutdown => (wire::ok_reply(&()), true),
            Request::Backup { mut params } => {
                if let Err(e) = self.check_backup_request(&mut params) {
                    return (fail(&e), false);
                }
                match self.backups.start(params) {
                    Ok(id) => (wire::ok_reply(&serde_json::json!({ "id": id })), false),
                    Err(e) => (fail(&e), false),
                }
            }
            Request::BackupStatus => (
                wire::ok_reply(&serde_json::json!({ "backup": self.backups.status() })),
                false,
            ),
            Request::BackupWait { timeout_ms } => {
                let t = Duration::from_millis(timeout_ms.min(wire::MAX_WAIT_MS));
                (
                    wire::ok_reply(&serde_json::json!({ "backup": self.backups.wait(t) })),
                    false,
                )
            }
            Request::Priority { ranges } => match self.backups.prioritize(&ranges) {
                Ok(()) => (wire::ok_reply(&()), false),
                Err(e) => (fail(&e), false),
            },
            Request::Cancel => match self.backups.cancel() {
                Ok(()) => (wire::ok_reply(&()), false),
                Err(e) => (fail(&e), false),
            },
            // the group steps need the connection: `serve_conn` answers them
            Request::GroupBackup { .. }
            | Request::GroupSnapshot { .. }
            | Request::GroupPause
            | Request::GroupGo
            | Request::GroupCommit { .. }
            | Request::GroupAbort { .. } => (
                fail(&"unable to take a group step: no group backup on this connection"),
                false,
            ),
            Request::Snapshot { params } => match self.snapshot(params) {
                Ok(st) => (wire::ok_reply(&st), false),
                Err(e) => {
                    log::warn!("{e}");
                    (fail(&e), false)
                }
            },
            Request::Release { commit } => match self.release(commit) {
                Ok(v) => (wire::ok_reply(&v), false),
                Err(e) => {
                    log::warn!("{e}");
                    (fail(&e), false)
                }
            },
        }
    }

    /// NBD URI of `export` on the disk's unix socket.
    fn export_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.paths.nbd_socket().display()
        )
    }

    /// NBD URIs of `export` on the `--listen` addresses (`tcp:HOST:PORT`).
    fn tcp_uris(&self, export: &str) -> Vec<String> {
        self.listen
            .iter()
            .filter_map(|l| l.strip_prefix("tcp:"))
            .map(|a| {
                let scheme = if self.tls { "nbds" } else { "nbd" };
                format!("{scheme}://{a}/{export}")
            })
            .collect()
    }

    /// The snapshot export's status with its URIs.
    fn snapshot_status(&self) -> Option<wire::SnapshotStatus> {
        self.backups.snapshot_export().map(|s| {
            let mut st = s.status();
            st.uri = self.export_uri(&st.export);
            st.tcp_uris = self.tcp_uris(&st.export);
            st
        })
    }

    /// `snapshot`: check the request, take the snapshot, publish the export.
    fn snapshot(&self, p: wire::SnapshotParams) -> Result<wire::SnapshotStatus, String> {
        self.snapshot_with(p, None)
    }

    /// [`Self::snapshot`], meeting a group's coordinator at `barrier` (see
    /// `group_snapshot`).
    fn snapshot_with(
        &self,
        mut p: wire::SnapshotParams,
        barrier: Option<&mut dyn cowsnap_core::backup::group::InstantBarrier>,
    ) -> Result<wire::SnapshotStatus, String> {
        let name = &self.paths.name;
        if self.generation.is_some() {
            return Err(format!(
                "unable to take a snapshot of {name:?}: it serves a generation of a \
                 repository, which does not change; export that generation instead"
            ));
        }
        let export = p.export.clone().unwrap_or_else(|| format!("{name}@snap"));
        check_export_name(&export)
            .map_err(|why| format!("unable to take a snapshot of {name:?}: {why}"))?;
        if self.server.export(&export).is_some() {
            return Err(format!(
                "unable to take a snapshot of {name:?}: the export name {export:?} is taken"
            ));
        }
        if p.container.is_none() {
            p.container = self.container.clone();
        }
        let as_backup = BackupParams {
            container: p.container.clone(),
            ..Default::default()
        };
        check_request_paths(&as_backup)
            .map_err(|e| e.replace("start the backup", "take the snapshot"))?;
        let own = attached::OwnDisk {
            name,
            origin: Some(&self.origin),
            default_container: self.container.as_deref(),
        };
        attached::check_backup(&self.paths.run_dir, &own, &as_backup).map_err(|e| e.to_string())?;
        let snap = self
            .backups
            .start_snapshot_coordinated(&export, &p, barrier)
            .map_err(|e| e.to_string())?;
        let desc = format!("snapshot of {name} (read-only)");
        self.server.set_export(&export, snap.clone(), &desc);
        let mut st = snap.status();
        st.uri = self.export_uri(&export);
        st.tcp_uris = self.tcp_uris(&export);
        log::info!("serving snapshot {export:?} at {}", st.uri);
        Ok(st)
    }

    /// `release`: check, remove the export (closing its connections), end it.
    fn release(&self, commit: bool) -> Result<serde_json::Value, String> {
        self.backups
            .check_release(commit)
            .map_err(|e| e.to_string())?;
        let Some(s) = self.backups.snapshot_export() else {
            return Err(format!(
                "unable to release a snapshot of {:?}: no snapshot is exported",
                self.paths.name
            ));
        };
        let export = s.export_name().to_string();
        let closed = self.server.remove_export_and_disconnect(&export);
        match self.backups.release_snapshot(commit) {
            Ok(r) => Ok(serde_json::json!({
                "released": r,
                "connections_closed": closed,
            })),
            Err(e) => {
                // a commit refused after all: serve it again, as it was
                if let Some(s) = self.backups.snapshot_export() {
                    self.server
                        .set_export(&export, s, &format!("snapshot of {}", self.paths.name));
                }
                Err(e.to_string())
            }
        }
    }

    /// The checks of a backup request, before anything is opened; fills in the disk's
    /// default container.
    pub(super) fn check_backup_request(&self, params: &mut BackupParams) -> Result<(), String> {
        if let Some(g) = &self.generation {
            return Err(format!(
                "unable to back up {:?}: it serves generation {} of a repository; \
                 that generation is a backup already",
                self.paths.name,
                g.generation().id
            ));
        }
        if params.container.is_none() {
            params.container = self.container.clone();
        }
        check_request_paths(params)?;
        log::info!("backup requested to {}", params.to);
        // Nothing is opened before the target and the container are checked.
        let own = attached::OwnDisk {
            name: &self.paths.name,
            origin: Some(&self.origin),
            default_container: self.container.as_deref(),
        };
        attached::check_backup(&self.paths.run_dir, &own, params).map_err(|e| {
            log::warn!("{e}");
            e.to_string()
        })
    }

    /// The `status` reply. Reads only what the daemon holds: it creates no file.
    pub fn status(&self) -> StatusInfo {
        StatusInfo {
            name: self.paths.name.clone(),
            origin: self.origin.display().to_string(),
            size: self.engine.size(),
            read_only: self.read_only,
            io_engine: self.engine.origin().engine_name().to_string(),
            chunk_size: self.engine.config().chunk_size,
            uri: self.paths.uri(),
            listen: self.listen.clone(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            connections: self.server.connections() as u64,
            stats: IoCounters::from(self.engine.stats()),
            container: self.container.clone(),
            backup: self.backups.status(),
            lineage: self.changelog.as_ref().map(|c| c.lineage().to_string()),
            tracking: self
                .changelog
                .as_ref()
                .and_then(|c| serde_json::to_value(c.status()).ok()),
            restored_from: self
                .restored_from
                .as_ref()
                .and_then(|r| serde_json::to_value(r).ok()),
            fill: self.filling.as_ref().map(|f| {
                let st = f.fill_status();
                FillInfo {
                    done: st.done,
                    total: st.total,
                    complete: st.complete,
                    error: st.error,
                }
            }),
            latency: Some(self.engine.latency()),
            last_success: self.backups.last_success(),
            snapshot: self.snapshot_status(),
            export: self.generation.as_ref().map(|g| ExportedGeneration {
                repository: g.repo_dir().display().to_string(),
                generation: g.generation().id.clone(),
                disk: g.generation().disk.clone(),
                pin: g.pin_path().map(|p| p.display().to_string()),
                stats: g.stats(),
            }),
        }
    }

    /// Serve one connection until it closes (or `shutdown` was answered). A group
    /// backup started on it and not yet committed is abandoned when it closes.
    pub fn serve_conn(&self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut member: Option<GroupMember> = None;
        self.serve_lines(&mut reader, &mut writer, &mut member);
        if let Some(m) = member {
            m.abandon(
                &self.backups,
                "the group's coordinator closed the connection",
            );
        }
    }

    fn serve_lines(
        &self,
        reader: &mut BufReader<UnixStream>,
        writer: &mut UnixStream,
        member: &mut Option<GroupMember>,
    ) {
        loop {
            let mut buf = Vec::new();
            let n = match (&mut *reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
            {
                Ok(n) => n,
                Err(e) => {
                    log::debug!("control connection: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            let too_long = buf.len() > MAX_LINE;
            let (reply, stop) = if too_long {
                (
                    wire::error_reply(&format!("request longer than {MAX_LINE} bytes")),
                    false,
                )
            } else {
                match std::str::from_utf8(&buf) {
                    Ok(s) if s.trim().is_empty() => continue,
                    Ok(s) => match wire::decode_request(s) {
                        Err(e) => {
                            log::warn!("control: {e}");
                            (wire::error_reply(&e), false)
                        }
                        Ok(Request::GroupBackup {
                            params,
                            pause_limit_ms,
                        }) => (
                            self.group_backup(params, pause_limit_ms, reader, writer, member),
                            false,
                        ),
                        Ok(Request::GroupSnapshot {
                            params,
                            pause_limit_ms,
                        }) => (
                            self.group_snapshot(params, pause_limit_ms, reader, writer),
                            false,
                        ),
                        Ok(Request::GroupCommit { notes }) => {
                            (group_decide(member, CommitDecision::Commit(notes)), false)
                        }
                        Ok(Request::GroupAbort { why }) => match member.take() {
                            Some(m) => {
                                m.abandon(&self.backups, &why);
                                (wire::ok_reply(&()), false)
                            }
                            None => (group_decide(member, CommitDecision::Abort(why)), false),
                        },
                        Ok(req) => self.handle(req),
                    },
                    Err(_) => (wire::error_reply("malformed request (not UTF-8)"), false),
                }
            };
            let mut out = reply.into_bytes();
            out.push(b'\n');
            if writer.write_all(&out).and_then(|_| writer.flush()).is_err() {
                return;
            }
            if stop {
                (self.on_shutdown)();
                return;
            }
            if too_long && !buf.ends_with(b"\n") && !skip_line(reader) {
                return;
            }
        }
    }

    /// `group_backup`: the member's side of the group protocol
    /// (`cowsnap_core::backup::group`). Writes the `prepared` and `paused` replies
    /// itself and returns the last one.
    fn group_backup(
        &self,
        mut params: BackupParams,
        pause_limit_ms: u64,
        reader: &mut BufReader<UnixStream>,
        writer: &mut UnixStream,
        member: &mut Option<GroupMember>,
    ) -> String {
        let fail = |e: &dyn std::fmt::Display| wire::error_reply(&e.to_string());
        if member.is_some() {
            return fail(&"unable to start a group backup: this connection has one already");
        }
        let limit = Duration::from_millis(pause_limit_ms);
        if limit.is_zero() || limit > MAX_PAUSE_LIMIT {
            return fail(&format!(
                "unable to start a group backup: pause limit {pause_limit_ms} ms is not in 1..={} ms",
                MAX_PAUSE_LIMIT.as_millis()
            ));
        }
        if let Err(e) = self.check_backup_request(&mut params) {
            return fail(&e);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut barrier = super::group::ConnBarrier::new(reader, writer, limit);
        let nice = cowsnap_core::thread_prio::thread_nice();
        let started = self.backups.start_coordinated(params, &mut barrier, rx);
        let _ = cowsnap_core::thread_prio::set_thread_nice(nice);
        match started {
            Ok(id) => {
                *member = Some(GroupMember { id, decide: tx });
                wire::ok_reply(&serde_json::json!({ "id": id }))
            }
            Err(e) => fail(&e),
        }
    }
}

impl ControlServer {
    /// `group_snapshot`: a snapshot export whose instant is one of a group's (the
    /// steps of `group_backup`; no commit step: each member is released on its own).
    fn group_snapshot(
        &self,
        params: wire::SnapshotParams,
        pause_limit_ms: u64,
        reader: &mut BufReader<UnixStream>,
        writer: &mut UnixStream,
    ) -> String {
        let limit = Duration::from_millis(pause_limit_ms);
        if limit.is_zero() || limit > MAX_PAUSE_LIMIT {
            return wire::error_reply(&format!(
                "unable to take a group snapshot: pause limit {pause_limit_ms} ms is not in 1..={} ms",
                MAX_PAUSE_LIMIT.as_millis()
            ));
        }
        let mut barrier = super::group::ConnBarrier::new(reader, writer, limit);
        let nice = cowsnap_core::thread_prio::thread_nice();
        let r = self.snapshot_with(params, Some(&mut barrier));
        let _ = cowsnap_core::thread_prio::set_thread_nice(nice);
        match r {
            Ok(st) => wire::ok_reply(&st),
            Err(e) => {
                log::warn!("{e}");
                wire::error_reply(&e)
            }
        }
    }
}

/// This connection's group backup: its job id and the way to its commit gate.
pub(super) struct GroupMember {
    id: u64,
    decide: std::sync::mpsc::Sender<CommitDecision>,
}

impl GroupMember {
    /// Abandon the backup: the gate's sender goes (a drained member aborts) and a
    /// running one is cancelled at once rather than copied to the end for nothing.
    fn abandon(self, backups: &Backups, why: &str) {
        let _ = self.decide.send(CommitDecision::Abort(why.to_string()));
        if let Some(st) = backups.status() {
            if st.id == self.id && !st.state.is_finished() {
                log::warn!("group backup {} abandoned: {why}", self.id);
                let _ = backups
                    .cancel_because(&format!("group backup abandoned: {why}; nothing published"));
            }
        }
    }
}

/// `group_commit` / `group_abort`: hand the decision to the connection's group backup.
fn group_decide(member: &mut Option<GroupMember>, d: CommitDecision) -> String {
    match member.take() {
        None => {
            wire::error_reply("unable to take a group step: no group backup on this connection")
        }
        Some(m) => match m.decide.send(d) {
            Ok(()) => wire::ok_reply(&()),
            Err(_) => wire::error_reply(&format!(
                "unable to decide group backup {}: it has ended already",
                m.id
            )),
        },
    }
}

/// An export name for a snapshot: 1 to 255 bytes of letters, digits and `._@:+-`, so
/// it goes into a URI as it is.
fn check_export_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 255 {
        return Err(format!(
            "the export name {n:?} must have 1 to 255 characters"
        ));
    }
    if let Some(c) = n
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._@:+-".contains(*c)))
    {
        return Err(format!(
            "the export name {n:?} has {c:?}; use letters, digits and ._@:+-"
        ));
    }
    Ok(())
}

/// Skip the rest of an oversized line; false when the connection should end (closed,
/// broken, or more than 64 × [`MAX_LINE`] without a newline).
fn skip_line(reader: &mut impl BufRead) -> bool {
    let mut skipped = 0u64;
    loop {
        let mut chunk = Vec::new();
        match reader.take(MAX_LINE as u64).read_until(b'\n', &mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => skipped += n as u64,
        }
        if chunk.ends_with(b"\n") {
            return true;
        }
        if skipped > 64 * MAX_LINE as u64 {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlError;
    use crate::test_support::file_engine;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn test_server(dir: &Path, stopped: Arc<AtomicBool>) -> ControlServer {
        let origin = dir.join("disk.img");
        let engine = file_engine(&origin, 4 << 20, 0, None);
        ControlServer {
            paths: DiskPaths::new("t1", dir, &dir.join("state")),
            origin,
            read_only: false,
            listen: Vec::new(),
            tls: false,
            container: None,
            backups: Arc::new(Backups::new(engine.clone())),
            engine,
            server: Server::new(),
            started: Instant::now(),
            changelog: None,
            filling: None,
            generation: None,
            restored_from: None,
            on_shutdown: Box::new(move || stopped.store(true, Ordering::SeqCst)),
        }
    }

    fn daemon_error(r: &str) -> String {
        match wire::decode_reply(r) {
            Err(ControlError::Daemon(m)) => m,
            other => panic!("{r} → {other:?}"),
        }
    }

    #[test]
    fn control_lines_get_replies() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_server(dir.path(), Arc::default());
        let (r, stop) = d.handle_line(r#"{"v":1,"cmd":"status"}"#);
        assert!(!stop);
        let m = wire::decode_reply(&r).unwrap();
        let st: StatusInfo = serde_json::from_value(serde_json::Value::Object(m)).unwrap();
        assert_eq!(st.name, "t1");
        assert_eq!(st.size, 4 << 20);
        assert_eq!(st.io_engine, "sync");
        assert!(st.uri.ends_with("t1.nbd"), "{}", st.uri);
        // A status creates nothing: no state directory, no identity.
        assert!(!dir.path().join("state").exists());

        d.engine.write(0, &[1u8; 4096], false).unwrap();
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"flush"}"#);
        assert!(wire::decode_reply(&r).is_ok());
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"status"}"#);
        let m = wire::decode_reply(&r).unwrap();
        assert_eq!(m["stats"]["writes"], 1);
        assert_eq!(m["stats"]["flushes"], 1);

        for (bad, want) in [
            ("hello", "not JSON"),
            ("{}", "missing protocol version"),
            (r#"{"v":1,"cmd":"nope"}"#, "unknown variant"),
            ("\u{0}\u{1}", "not JSON"),
        ] {
            let (r, stop) = d.handle_line(bad);
            assert!(!stop);
            let m = daemon_error(&r);
            assert!(m.contains(want), "{bad:?} → {m}");
        }
        let (r, stop) = d.handle_line(r#"{"v":1,"cmd":"shutdown"}"#);
        assert!(stop);
        assert!(wire::decode_reply(&r).is_ok());
    }

    #[test]
    fn connection_answers_in_order_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let d = Arc::new(test_server(dir.path(), stopped.clone()));
        let (a, b) = UnixStream::pair().unwrap();
        let t = {
            let d = d.clone();
            std::thread::spawn(move || d.serve_conn(b))
        };
        let mut w = a.try_clone().unwrap();
        let mut long = vec![b' '; MAX_LINE + 10];
        long.push(b'\n');
        w.write_all(b"{\"v\":1,\"cmd\":\"flush\"}\n\n").unwrap();
        w.write_all(&long).unwrap();
        w.write_all(b"{\"v\":1,\"cmd\":\"shutdown\"}\n").unwrap();
        let mut lines = BufReader::new(a).lines();
        let mut next = || lines.next().unwrap().unwrap();
        assert_eq!(next(), r#"{"v":1,"ok":true}"#);
        assert!(daemon_error(&next()).contains("request longer than"));
        assert_eq!(next(), r#"{"v":1,"ok":true}"#);
        t.join().unwrap();
        assert!(stopped.load(Ordering::SeqCst));
    }

    #[test]
    fn backup_errors_are_replies() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_server(dir.path(), Arc::default());
        // The target's directory does not exist: the backup fails, naming it.
        let (r, _) =
            d.handle_line(r#"{"v":1,"cmd":"backup","params":{"to":"file:/nonexistent/x"}}"#);
        let m = daemon_error(&r);
        assert!(m.contains("/nonexistent/x"), "{m}");
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"backup","params":{"to":"file:rel.img"}}"#);
        let m = daemon_error(&r);
        assert!(m.contains("is relative"), "{m}");
        let (r, _) = d.handle_line(r#"{"v":1,"cmd":"backup_status"}"#);
        let m = wire::decode_reply(&r).unwrap();
        assert!(m.contains_key("backup"));
    }

    #[test]
    fn backup_onto_its_own_origin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = test_server(dir.path(), Arc::default());
        let origin = dir.path().join("disk.img");
        std::fs::write(&origin, vec![7u8; 4 << 20]).unwrap();
        let link = dir.path().join("link.img");
        std::fs::hard_link(&origin, &link).unwrap();
        for req in [
            format!(
                r#"{{"v":1,"cmd":"backup","params":{{"to":"file:{}"}}}}"#,
                link.display()
            ),
            format!(
                r#"{{"v":1,"cmd":"backup","params":{{"to":"file:{}/x.img","container":"dev:{}"}}}}"#,
                dir.path().display(),
                origin.display()
            ),
        ] {
            let (r, _) = d.handle_line(&req);
            let m = daemon_error(&r);
            assert!(m.contains("is the origin of attached disk \"t1\""), "{m}");
        }
        assert_eq!(std::fs::read(&origin).unwrap(), vec![7u8; 4 << 20]);
        assert!(!dir.path().join("x.img").exists());
    }
}
