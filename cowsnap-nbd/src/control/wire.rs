//! The wire form of the control protocol: request and reply types, and their
//! encoding as one JSON object per line. The envelope (`v`, `ok`, `error`) is a struct
//! with the payload flattened into it.

pub use cowsnap_core::backup::{
    BackupParams, BackupStatus, LastBackup, Released, SnapshotParams, SnapshotStatus,
};
use cowsnap_core::engine::IoStats;
pub use cowsnap_core::latency::{HistogramSnapshot, LatencySnapshot};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Protocol version spoken by this build.
pub const VERSION: u64 = 1;
/// Longest request or reply line in bytes.
pub const MAX_LINE: usize = 1 << 20;
/// Longest `backup_wait` the daemon honours, in milliseconds.
pub const MAX_WAIT_MS: u64 = 1000;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Describe the disk and its daemon.
    Status,
    /// Make every acknowledged write durable on the origin.
    Flush,
    /// Stop serving, flush, remove the sockets, exit.
    Shutdown,
    /// Start a backup; replies once the snapshot instant has passed.
    Backup {
        /// What to back up to and how.
        params: BackupParams,
    },
    /// Figures of the running or last backup.
    BackupStatus,
    /// Like `backup_status`, but the reply waits until the backup is finished or
    /// `timeout_ms` (at most [`MAX_WAIT_MS`]) has passed: the end is reported when it
    /// happens, not at the client's next poll.
    BackupWait {
        /// Longest wait in milliseconds.
        timeout_ms: u64,
    },
    /// Copy these byte ranges next.
    Priority {
        /// (offset, length) pairs in bytes.
        ranges: Vec<(u64, u64)>,
    },
    /// Cancel the running backup.
    Cancel,
    /// Start a backup as a member of a consistency group (see
    /// `cowsnap_core::backup::group`): replies `phase: "prepared"` once everything is
    /// open, then waits on this connection for `group_pause`, replies
    /// `phase: "paused"`, waits for `group_go` (at most `pause_limit_ms`), then
    /// replies `id` like `backup`. Anything else, or the connection closing, abandons
    /// the backup (writes resume, nothing is published).
    GroupBackup {
        /// What to back up to and how (`params.group` names the group).
        params: BackupParams,
        /// The longest time writes may stay paused waiting for `group_go`.
        pause_limit_ms: u64,
    },
    /// `snapshot` as a member of a consistency group: the steps of `group_backup`
    /// (`prepared`, `group_pause`, `paused`, `group_go`), then the reply of
    /// `snapshot`. No commit step: each snapshot is released on its own.
    GroupSnapshot {
        /// Export name, container, quiesce.
        params: SnapshotParams,
        /// The longest time writes may stay paused waiting for `group_go`.
        pause_limit_ms: u64,
    },
    /// The second step of `group_backup`: pause the writes now.
    GroupPause,
    /// The third step of `group_backup`: take the instant now.
    GroupGo,
    /// Publish this connection's group backup once its data is copied (state
    /// `ready`), adding `notes` to its generation.
    GroupCommit {
        /// Notes recorded in the generation (a post-snapshot hook's outcome).
        #[serde(default)]
        notes: Vec<String>,
    },
    /// Abandon this connection's group backup (at any step): nothing is published.
    GroupAbort {
        /// Why, recorded as the backup's error.
        why: String,
    },
    /// Take a snapshot and serve it read-only as an NBD export (pull mode); replies
    /// once it is served, with its [`SnapshotStatus`].
    Snapshot {
        /// Export name, container, quiesce.
        params: SnapshotParams,
    },
    /// End the snapshot export: remove it (its clients are disconnected), commit the
    /// change-log cut to a new pull generation (`commit`) or merge it back.
    Release {
        /// Commit the cut.
        #[serde(default)]
        commit: bool,
    },
}

/// I/O counters as carried over the control socket: the engine's own figures.
pub type IoCounters = IoStats;

/// Reply to `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Disk name.
    pub name: String,
    /// Origin path.
    pub origin: String,
    /// Size in bytes.
    pub size: u64,
    /// The export refuses writes.
    pub read_only: bool,
    /// "uring" or "sync".
    pub io_engine: String,
    /// Tracking chunk size in bytes.
    #[serde(default)]
    pub chunk_size: u32,
    /// NBD URI of the export.
    pub uri: String,
    /// TCP listen addresses, if any.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Daemon pid.
    pub pid: u32,
    /// Seconds since the daemon started serving.
    pub uptime_s: u64,
    /// NBD connections open now.
    pub connections: u64,
    /// I/O counters.
    pub stats: IoCounters,
    /// The default container for backups, if one was given at attach.
    #[serde(default)]
    pub container: Option<String>,
    /// The running or last backup.
    #[serde(default)]
    pub backup: Option<BackupStatus>,
    /// Lineage id of the disk (changes when a disk is restored from a backup).
    #[serde(default)]
    pub lineage: Option<String>,
    /// Change tracking: what incremental backups will be relative to.
    #[serde(default)]
    pub tracking: Option<serde_json::Value>,
    /// Live restore: the repository generation this disk is filled from.
    #[serde(default)]
    pub restored_from: Option<serde_json::Value>,
    /// Live restore: fill progress (`complete` is true once every chunk is restored).
    #[serde(default)]
    pub fill: Option<FillInfo>,
    /// Request service-time histograms (absent from daemons that predate them).
    #[serde(default)]
    pub latency: Option<LatencySnapshot>,
    /// The last backup that completed, remembered across daemon restarts (absent from
    /// daemons that predate it, `null` when none is known).
    #[serde(default)]
    pub last_success: Option<LastBackup>,
    /// The snapshot export (pull mode), if one is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
    /// A repository generation served instead of an origin (`cowsnapctl export`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportedGeneration>,
}

/// What an export of a repository generation serves, and what it read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportedGeneration {
    /// The repository directory.
    pub repository: String,
    /// The generation id.
    pub generation: String,
    /// The disk it is a backup of.
    pub disk: String,
    /// The pin that keeps the generation from prune (none after a clean stop began).
    #[serde(default)]
    pub pin: Option<String>,
    /// Chunks and bytes read from the repository, cache use.
    pub stats: cowsnap_core::restore::generation_export::ExportStats,
}

/// Live-restore fill progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FillInfo {
    /// Repository chunks restored so far.
    pub done: u64,
    /// Repository chunks in all.
    pub total: u64,
    /// Every chunk is restored: the disk no longer needs the repository.
    pub complete: bool,
    /// Why the fill stopped, if it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// A request on the wire: the version, then the request's own fields (`cmd`, ...).
#[derive(Serialize)]
struct RequestLine<'a> {
    v: u64,
    #[serde(flatten)]
    req: &'a Request,
}

/// A successful reply on the wire: the version, `ok`, then the payload's fields.
#[derive(Serialize)]
struct OkLine {
    v: u64,
    ok: bool,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

/// A failed reply on the wire.
#[derive(Serialize)]
struct ErrorLine<'a> {
    v: u64,
    ok: bool,
    error: &'a str,
}

/// Serialize a request as one line (without the newline): `{"v":1,"cmd":...}`.
pub fn encode_request(req: &Request) -> String {
    serde_json::to_string(&RequestLine { v: VERSION, req })
        .unwrap_or_else(|_| format!("{{\"v\":{VERSION}}}"))
}

/// Parse one request line; the error is the message for the error reply.
pub fn decode_request(line: &str) -> Result<Request, String> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| format!("malformed request (not JSON): {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "malformed request: expected a JSON object".to_string())?;
    match obj.get("v").and_then(Value::as_u64) {
        Some(VERSION) => {}
        Some(other) => {
            return Err(format!(
                "unsupported protocol version {other} (this daemon speaks {VERSION})"
            ))
        }
        None => return Err("malformed request: missing protocol version \"v\"".into()),
    }
    match obj.get("cmd") {
        Some(Value::String(_)) => {}
        _ => return Err("malformed request: missing \"cmd\"".into()),
    }
    serde_json::from_value(v).map_err(|e| format!("bad request: {e}"))
}

/// A successful reply carrying `data`'s fields (an object; `()` gives none; anything
/// else is put under "data").
pub fn ok_reply<T: Serialize>(data: &T) -> String {
    let fields = match serde_json::to_value(data) {
        Ok(Value::Object(m)) => m,
        Ok(Value::Null) => Map::new(),
        Ok(other) => Map::from_iter([("data".to_string(), other)]),
        Err(e) => return error_reply(&format!("unable to encode the reply: {e}")),
    };
    let line = OkLine {
        v: VERSION,
        ok: true,
        fields,
    };
    serde_json::to_string(&line)
        .unwrap_or_else(|e| error_reply(&format!("unable to encode the reply: {e}")))
}

/// An error reply.
pub fn error_reply(msg: &str) -> String {
    let line = ErrorLine {
        v: VERSION,
        ok: false,
        error: msg,
    };
    // A struct of a number, a bool and a string always serializes.
    serde_json::to_string(&line).unwrap_or_default()
}

/// What can go wrong talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens on the socket.
    #[error("no daemon answers on {path}: {source}")]
    NotRunning {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("unable to talk to the daemon on {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon's reply was not understood.
    #[error("unable to understand the daemon's reply: {0}")]
    Protocol(String),
    /// The daemon refused or failed the request.
    #[error("{0}")]
    Daemon(String),
}

/// Decode a reply line: its fields on success.
pub fn decode_reply(line: &str) -> Result<Map<String, Value>, ControlError> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| ControlError::Protocol(e.to_string()))?;
    let Value::Object(mut m) = v else {
        return Err(ControlError::Protocol("reply is not an object".into()));
    };
    match m.get("v").and_then(Value::as_u64) {
        Some(VERSION) => {}
        other => {
            return Err(ControlError::Protocol(format!(
                "reply has protocol version {other:?}, expected {VERSION}"
            )))
        }
    }
    match m.get("ok").and_then(Value::as_bool) {
        Some(true) => {
            m.remove("v");
            m.remove("ok");
            Ok(m)
        }
        Some(false) => Err(ControlError::Daemon(
            m.get("error")
                .and_then(Value::as_str)
                .unwrap_or("the daemon reported an error without a message")
                .to_string(),
        )),
        None => Err(ControlError::Protocol("reply has no \"ok\"".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(r: Request) {
        let line = encode_request(&r);
        assert!(line.starts_with("{\"v\":1,\"cmd\":"), "{line}");
        assert!(!line.contains('\n'));
        let back = decode_request(&line).unwrap();
        assert_eq!(encode_request(&back), line);
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(Request::Status);
        roundtrip(Request::Flush);
        roundtrip(Request::Shutdown);
        roundtrip(Request::BackupStatus);
        roundtrip(Request::BackupWait { timeout_ms: 100 });
        roundtrip(Request::Cancel);
        roundtrip(Request::Priority {
            ranges: vec![(0, 4096), (1 << 40, 65536)],
        });
        roundtrip(Request::Backup {
            params: BackupParams {
                to: "file:/tmp/x.img".into(),
                container: Some("ram:8M".into()),
                incremental: false,
                priority: vec![(0, 1)],
                rate_limit: Some(100 << 20),
                quiesce_idle_ms: 3000,
                quiesce_timeout_ms: 80000,
                all_blocks: true,
                notes: vec!["pre-snapshot hook `true` exited 0".into()],
                group: Some(cowsnap_core::repo::generation::GroupRef {
                    id: "20261206T000000.000Z-0123abcd".into(),
                    disks: vec!["a".into(), "b".into()],
                }),
                key_file: Some("/etc/cowsnap/backup.key".into()),
            },
        });
        roundtrip(Request::GroupBackup {
            params: BackupParams::default(),
            pause_limit_ms: 1000,
        });
        roundtrip(Request::GroupPause);
        roundtrip(Request::GroupGo);
        roundtrip(Request::GroupCommit {
            notes: vec!["n".into()],
        });
        roundtrip(Request::GroupAbort { why: "w".into() });
    }

    #[test]
    fn request_wire_form_is_stable() {
        assert_eq!(
            encode_request(&Request::Status),
            r#"{"v":1,"cmd":"status"}"#
        );
        assert_eq!(
            encode_request(&Request::Priority {
                ranges: vec![(1, 2)]
            }),
            r#"{"v":1,"cmd":"priority","ranges":[[1,2]]}"#
        );
        assert!(matches!(
            decode_request(r#"{"v":1,"cmd":"backup_status","extra":5}"#).unwrap(),
            Request::BackupStatus
        ));
        let b = decode_request(r#"{"v":1,"cmd":"backup","params":{"to":"file:/x"}}"#).unwrap();
        match b {
            Request::Backup { params } => {
                assert_eq!(params.to, "file:/x");
                assert_eq!(params.container, None);
                assert_eq!(params.quiesce_idle_ms, 0);
                assert!(
                    !params.all_blocks,
                    "an older client learns free space by default"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_explained() {
        let cases = [
            ("", "not JSON"),
            ("garbage\u{1}", "not JSON"),
            ("[1,2]", "JSON object"),
            (r#"{"cmd":"status"}"#, "missing protocol version"),
            (
                r#"{"v":2,"cmd":"status"}"#,
                "unsupported protocol version 2",
            ),
            (r#"{"v":1}"#, "missing \"cmd\""),
            (r#"{"v":1,"cmd":"explode"}"#, "unknown variant"),
            (r#"{"v":1,"cmd":"priority","ranges":"x"}"#, "bad request"),
        ];
        for (line, want) in cases {
            let e = decode_request(line).unwrap_err();
            assert!(e.contains(want), "{line:?} → {e:?}");
        }
    }

    #[test]
    fn data_replies_and_escapes() {
        assert_eq!(ok_reply(&5), r#"{"v":1,"ok":true,"data":5}"#);
        assert_eq!(
            error_reply("a \"b\"\n"),
            r#"{"v":1,"ok":false,"error":"a \"b\"\n"}"#
        );
        assert_eq!(
            encode_request(&Request::Cancel),
            r#"{"v":1,"cmd":"cancel"}"#
        );
    }

    #[test]
    fn replies_roundtrip() {
        let r = ok_reply(&serde_json::json!({"id": 7}));
        assert_eq!(r, r#"{"v":1,"ok":true,"id":7}"#);
        assert_eq!(decode_reply(&r).unwrap()["id"], 7);
        assert_eq!(ok_reply(&()), r#"{"v":1,"ok":true}"#);
        let e = error_reply("unable to x: y");
        assert_eq!(e, r#"{"v":1,"ok":false,"error":"unable to x: y"}"#);
        match decode_reply(&e) {
            Err(ControlError::Daemon(m)) => assert_eq!(m, "unable to x: y"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_reply(r#"{"v":9,"ok":true}"#),
            Err(ControlError::Protocol(_))
        ));
        assert!(matches!(
            decode_reply("nope"),
            Err(ControlError::Protocol(_))
        ));
        let st = StatusInfo {
            name: "d".into(),
            size: 5,
            stats: IoCounters {
                reads: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let m = decode_reply(&ok_reply(&st)).unwrap();
        let back: StatusInfo = serde_json::from_value(Value::Object(m)).unwrap();
        assert_eq!(back.name, "d");
        assert_eq!(back.stats.reads, 3);
        assert!(back.backup.is_none());
    }

    #[test]
    fn a_status_without_the_newer_fields_still_decodes() {
        // what a daemon without latency histograms and the last-backup record sends
        let old = r#"{"v":1,"ok":true,"name":"d","origin":"/x","size":4096,
            "read_only":false,"io_engine":"sync","uri":"nbd+unix:///d","pid":7,
            "uptime_s":3,"connections":0,"stats":{"reads":1,"writes":2,"bytes_read":512,
            "bytes_written":1024,"flushes":0,"trims":0,"zeroes":0,"errors":0},
            "backup":{"id":1,"state":"complete","error":null,"target":"repo:/r",
            "disk_size":4096,"chunk_size":65536,"chunks_in_scope":1,"chunks_copied":1,
            "chunks_preserved":0,"bytes_copied":4096,"container_slots":16,
            "container_used":0,"container_high_water":1,"holds":0,"hold_time_ms":0,
            "throttled_writes":0,"throttle_delay_ms":0,"elapsed_ms":5,
            "generation":"g","notes":[]}}"#
            .replace(['\n', ' '], "");
        let m = decode_reply(&old).unwrap();
        let st: StatusInfo = serde_json::from_value(Value::Object(m)).unwrap();
        assert!(st.latency.is_none() && st.last_success.is_none());
        assert_eq!(st.stats.writes, 2);
        assert_eq!(st.backup.unwrap().instant_unix, 0);

        // and the new fields round-trip
        let h = cowsnap_core::latency::LatencyHistogram::new();
        h.record(std::time::Duration::from_micros(300));
        let st = StatusInfo {
            latency: Some(LatencySnapshot {
                read: h.snapshot(),
                write: HistogramSnapshot::default(),
            }),
            last_success: Some(LastBackup {
                finished_unix: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = decode_reply(&ok_reply(&st)).unwrap();
        let back: StatusInfo = serde_json::from_value(Value::Object(m)).unwrap();
        assert_eq!(back.latency.unwrap().read.count(), 1);
        assert_eq!(back.last_success.unwrap().finished_unix, 9);
    }
}
