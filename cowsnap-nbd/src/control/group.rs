//! The daemon's side of the two rendezvous of a group backup's instant
//! (`cowsnap_core::backup::group`): reply on the coordinator's connection, then wait on
//! it for the next step, bounded in time. Anything but the expected step — another
//! command, `group_abort`, garbage, the connection closing, the time running out —
//! gives the backup up, and the engine resumes the writes.

use super::wire::{self, Request, MAX_LINE};
use cowsnap_core::backup::group::{InstantBarrier, PREPARED_WAIT};
use cowsnap_core::error::{Error, ErrorKind, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The coordinator's connection as the barrier of one member.
pub(super) struct ConnBarrier<'a> {
    reader: &'a mut BufReader<UnixStream>,
    writer: &'a mut UnixStream,
    pause_limit: Duration,
    /// When the writes were paused (for the reply).
    paused_at: Option<Instant>,
}

fn abandoned(why: String) -> Error {
    Error::new(
        ErrorKind::Canceled,
        format!("group backup abandoned: {why}; the writes resumed and nothing was published"),
    )
}

impl<'a> ConnBarrier<'a> {
    pub(super) fn new(
        reader: &'a mut BufReader<UnixStream>,
        writer: &'a mut UnixStream,
        pause_limit: Duration,
    ) -> Self {
        ConnBarrier {
            reader,
            writer,
            pause_limit,
            paused_at: None,
        }
    }

    fn reply(&mut self, phase: &str) -> Result<()> {
        let mut out = wire::ok_reply(&serde_json::json!({ "phase": phase })).into_bytes();
        out.push(b'\n');
        self.writer
            .write_all(&out)
            .and_then(|_| self.writer.flush())
            .map_err(|e| abandoned(format!("unable to tell the coordinator {phase:?}: {e}")))
    }

    /// Wait at most `within` for the next line and check it is `want`.
    fn expect(&mut self, want: &str, within: Duration) -> Result<()> {
        let sock = self.reader.get_ref();
        sock.set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .map_err(|e| abandoned(format!("unable to bound the wait for {want}: {e}")))?;
        let mut line = Vec::new();
        let r = (&mut *self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line);
        // the connection's later requests wait without a bound again
        let _ = self.reader.get_ref().set_read_timeout(None);
        match r {
            Ok(0) => return Err(abandoned("the coordinator closed the connection".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(abandoned(format!(
                    "no {want} within {} ms",
                    within.as_millis()
                )))
            }
            Err(e) => return Err(abandoned(format!("the connection failed: {e}"))),
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        match (wire::decode_request(&text), want) {
            (Ok(Request::GroupPause), "group_pause") | (Ok(Request::GroupGo), "group_go") => Ok(()),
            (Ok(Request::GroupAbort { why }), _) => {
                Err(abandoned(format!("the coordinator said: {why}")))
            }
            (Ok(other), _) => Err(abandoned(format!(
                "expected {want}, the coordinator sent {}",
                wire::encode_request(&other)
            ))),
            (Err(e), _) => Err(abandoned(format!("expected {want}: {e}"))),
        }
    }
}

impl InstantBarrier for ConnBarrier<'_> {
    fn prepared(&mut self) -> Result<()> {
        self.reply("prepared")?;
        self.expect("group_pause", PREPARED_WAIT)
    }

    fn paused(&mut self) -> Result<()> {
        self.paused_at = Some(Instant::now());
        self.reply("paused")?;
        let left = self
            .pause_limit
            .saturating_sub(self.paused_at.map_or(Duration::ZERO, |t| t.elapsed()));
        self.expect("group_go", left)
            .map_err(|e| e.with_context("writes were paused for the group's instant"))
    }
}
