//! The control protocol between `cowsnapctl` and a disk's daemon: JSON lines over the
//! unix socket `RUN_DIR/NAME.ctl`.
//!
//! Every request is one line `{"v":1,"cmd":"<command>", ...}`; every reply is one line
//! `{"v":1,"ok":true, ...}` or `{"v":1,"ok":false,"error":"..."}`. A client may send
//! several requests on one connection; the daemon answers them in order. A line that
//! is not JSON, has no or another version, names an unknown command or is longer than
//! [`MAX_LINE`] gets an error reply; the daemon keeps serving.
//!
//! | cmd | fields | reply fields |
//! |---|---|---|
//! | `status` | | [`StatusInfo`] |
//! | `flush` | | |
//! | `shutdown` | | (the daemon exits after replying) |
//! | `backup` | `params`: [`BackupParams`] | `id` |
//! | `backup_status` | | `backup`: [`BackupStatus`] or null |
//! | `priority` | `ranges`: `[[offset, length], ...]` | |
//! | `cancel` | | |
//!
//! New fields may be added to requests and replies within version 1; readers ignore
//! fields they do not know. An incompatible change bumps `v`.

pub use cowsnap_core::backup::{BackupParams, BackupStatus};
use cowsnap_core::engine::IoStats;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Protocol version spoken by this build.
pub const VERSION: u64 = 1;
/// Longest request or reply line in bytes.
pub const MAX_LINE: usize = 1 << 20;

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
    /// Copy these byte ranges next.
    Priority {
        /// (offset, length) pairs in bytes.
        ranges: Vec<(u64, u64)>,
    },
    /// Cancel the running backup.
    Cancel,
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

/// Serialize a request as one line (without the newline): `{"v":1,"cmd":...}`.
pub fn encode_request(req: &Request) -> String {
    let body = serde_json::to_string(req).unwrap_or_else(|_| "{}".into());
    prefix_fields(&format!("\"v\":{VERSION}"), &body)
}

/// `{PREFIX,<fields of obj>}` for a serialized JSON object `obj`.
fn prefix_fields(prefix: &str, obj: &str) -> String {
    let inner = obj
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or("");
    if inner.is_empty() {
        format!("{{{prefix}}}")
    } else {
        format!("{{{prefix},{inner}}}")
    }
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
    serde_json::from_value(v.clone()).map_err(|e| format!("bad request: {e}"))
}

/// A successful reply carrying `data`'s fields (an object; `()` gives none; anything
/// else is put under "data").
pub fn ok_reply<T: Serialize>(data: &T) -> String {
    let prefix = format!("\"v\":{VERSION},\"ok\":true");
    match serde_json::to_value(data) {
        Ok(Value::Object(m)) => prefix_fields(&prefix, &Value::Object(m).to_string()),
        Ok(Value::Null) => prefix_fields(&prefix, "{}"),
        Ok(other) => prefix_fields(&prefix, &serde_json::json!({ "data": other }).to_string()),
        Err(e) => error_reply(&format!("unable to encode the reply: {e}")),
    }
}

/// An error reply.
pub fn error_reply(msg: &str) -> String {
    format!(
        "{{\"v\":{VERSION},\"ok\":false,\"error\":{}}}",
        Value::String(msg.to_string())
    )
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

/// A connection to one daemon's control socket.
pub struct Client {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect; `timeout` bounds every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ControlError> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|source| ControlError::NotRunning {
            path: p.clone(),
            source,
        })?;
        let io = |source| ControlError::Io {
            path: p.clone(),
            source,
        };
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        let w = s.try_clone().map_err(io)?;
        Ok(Client {
            path: p.clone(),
            reader: BufReader::new(s),
            writer: w,
        })
    }

    /// Send a raw line and read the raw reply line (for tests and debugging).
    pub fn raw(&mut self, line: &str) -> Result<String, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        self.writer.write_all(&buf).map_err(io)?;
        let mut reply = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut reply)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                ),
            });
        }
        String::from_utf8(reply).map_err(|e| ControlError::Protocol(e.to_string()))
    }

    /// Send a request; the reply's fields on success.
    pub fn call(&mut self, req: &Request) -> Result<Map<String, Value>, ControlError> {
        let line = self.raw(&encode_request(req))?;
        decode_reply(&line)
    }

    /// `status`, typed.
    pub fn status(&mut self) -> Result<StatusInfo, ControlError> {
        let m = self.call(&Request::Status)?;
        serde_json::from_value(Value::Object(m)).map_err(|e| ControlError::Protocol(e.to_string()))
    }
}

/// One request on a fresh connection.
pub fn call(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Map<String, Value>, ControlError> {
    Client::connect(path, timeout)?.call(req)
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
            },
        });
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
}
