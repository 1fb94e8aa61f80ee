//! The client side of the control socket, used by `cowsnapctl` and the daemon itself
//! (to see whether another daemon answers).

use super::wire::{decode_reply, encode_request, ControlError, Request, StatusInfo, MAX_LINE};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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
