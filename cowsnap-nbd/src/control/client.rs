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
        Self::over(s, p, timeout)
    }

    /// [`Client::connect`] that never waits to connect: a daemon that does not accept
    /// (stopped, hung) fills its listen backlog, and a blocking connect would then wait
    /// for as long as it stays so. This one fails at once (`EAGAIN`) instead. For
    /// callers that must not be held by one daemon (the metrics exporter).
    pub fn connect_nowait(path: &Path, timeout: Duration) -> Result<Client, ControlError> {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let p = path.display().to_string();
        let not_running = |source: std::io::Error| ControlError::NotRunning {
            path: p.clone(),
            source,
        };
        let addr = UnixAddr::new(path).map_err(|e| not_running(e.into()))?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| not_running(e.into()))?;
        // A unix-socket connect completes or fails at once; EAGAIN means the backlog
        // is full (the daemon is not accepting).
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).map_err(|e| not_running(e.into()))?;
        let s = UnixStream::from(fd);
        s.set_nonblocking(false)
            .map_err(|source| ControlError::Io {
                path: p.clone(),
                source,
            })?;
        Self::over(s, p, timeout)
    }

    fn over(s: UnixStream, p: String, timeout: Duration) -> Result<Client, ControlError> {
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
        self.send_line(line)?;
        self.read_line()
    }

    /// Send a request without reading its reply (a step of `group_backup`, whose
    /// replies come later; see [`Client::receive`]).
    pub fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        self.send_line(&encode_request(req))
    }

    /// Read the next reply: the fields on success.
    pub fn receive(&mut self) -> Result<Map<String, Value>, ControlError> {
        let line = self.read_line()?;
        decode_reply(&line)
    }

    /// Bound every later read by `timeout` instead of the one given at connect.
    pub fn set_read_timeout(&mut self, timeout: Duration) -> Result<(), ControlError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn send_line(&mut self, line: &str) -> Result<(), ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        self.writer.write_all(&buf).map_err(io)
    }

    fn read_line(&mut self) -> Result<String, ControlError> {
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
    use std::time::Instant;

    #[test]
    fn connect_nowait_fails_at_once_on_a_daemon_that_does_not_accept() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.ctl");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t0 = Instant::now();
        let mut held = Vec::new();
        let err = loop {
            match Client::connect_nowait(&path, Duration::from_secs(1)) {
                Ok(c) => held.push(c),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        assert!(
            !held.is_empty(),
            "connections are queued until the backlog is full"
        );
        assert!(matches!(err, ControlError::NotRunning { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // a queued connection that is never answered times out on its read
        let t1 = Instant::now();
        assert!(matches!(held[0].status(), Err(ControlError::Io { .. })));
        assert!(t1.elapsed() < Duration::from_secs(5));
        // no socket at all
        let missing = d.path().join("none.ctl");
        assert!(matches!(
            Client::connect_nowait(&missing, Duration::from_secs(1)),
            Err(ControlError::NotRunning { .. })
        ));
    }
}
