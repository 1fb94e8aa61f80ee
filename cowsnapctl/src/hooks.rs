//! `backup --pre-snapshot CMD` / `--post-snapshot CMD`: commands run around the
//! snapshot instant (e.g. `psql -c CHECKPOINT`).
//!
//! A hook runs as `/bin/sh -c CMD` in a process group of its own, with stdin from
//! /dev/null and its output (stdout and stderr together) captured: the first
//! [`KEEP_LINES`] lines, each cut at [`KEEP_LINE_BYTES`], are kept for the
//! generation's notes; the rest is read and dropped, so a chatty hook neither blocks
//! nor grows memory. Every hook is bounded by `--hook-timeout`: at the deadline its
//! whole process group gets SIGKILL and the hook counts as failed. The environment
//! tells the hook where it runs: `COWSNAP_HOOK` (`pre-snapshot` or `post-snapshot`),
//! `COWSNAP_DISKS` (the disk names, space-separated), `COWSNAP_TARGET`, and for the
//! post-snapshot hook `COWSNAP_RESULT` (`ok` when the instant was taken, `failed`
//! otherwise).

use anyhow::{anyhow, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines of a hook's output kept for the notes.
pub const KEEP_LINES: usize = 5;
/// Bytes of each kept line.
pub const KEEP_LINE_BYTES: usize = 200;
/// The longest `--hook-timeout`.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

/// How a hook ended.
#[derive(Debug, Clone)]
pub struct HookOutcome {
    /// `pre-snapshot` or `post-snapshot`.
    pub which: &'static str,
    /// The command as given.
    pub command: String,
    /// Exit code; `None` when killed (timeout) or ended by a signal.
    pub code: Option<i32>,
    /// The hook ran past the timeout and was killed.
    pub timed_out: bool,
    /// How long it ran.
    pub elapsed: Duration,
    /// The first lines of its output.
    pub head: Vec<String>,
}

impl HookOutcome {
    /// Exited 0 within the bound.
    pub fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// The note recorded in the generation and shown to the user.
    pub fn note(&self) -> String {
        let how = match (self.timed_out, self.code) {
            (true, _) => format!(
                "was killed after {} ms (hook timeout)",
                self.elapsed.as_millis()
            ),
            (false, Some(c)) => format!("exited {c} after {} ms", self.elapsed.as_millis()),
            (false, None) => format!(
                "was ended by a signal after {} ms",
                self.elapsed.as_millis()
            ),
        };
        let out = if self.head.is_empty() {
            String::from(" (no output)")
        } else {
            format!(": {}", self.head.join(" | "))
        };
        format!("{} hook `{}` {how}{out}", self.which, self.command)
    }
}

/// Run one hook with `env`, bounded by `timeout`.
pub fn run(
    which: &'static str,
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<HookOutcome> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("COWSNAP_HOOK", which)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("unable to run the {which} hook `{command}`"))?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // stdout and stderr are read by a thread each; lines go through one channel
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        readers.push(spawn_reader(BufReader::new(o), tx.clone()));
    }
    if let Some(e) = child.stderr.take() {
        readers.push(spawn_reader(BufReader::new(e), tx.clone()));
    }
    drop(tx);
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .with_context(|| format!("unable to wait for the {which} hook"))?
        {
            break st;
        }
        if t0.elapsed() >= timeout {
            timed_out = true;
            // the whole group: a shell's children too
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            break child
                .wait()
                .with_context(|| format!("unable to wait for the killed {which} hook"))?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = t0.elapsed();
    // A grandchild that kept the pipes open would hold the readers: the group was
    // killed on timeout; otherwise give the readers a moment and go on without them.
    let mut head = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if head.len() < KEEP_LINES {
                    head.push(line);
                }
            }
            Err(_) => break,
        }
    }
    drop(readers);
    Ok(HookOutcome {
        which,
        command: command.to_string(),
        code: if timed_out { None } else { status.code() },
        timed_out,
        elapsed,
        head,
    })
}

fn spawn_reader<R: std::io::Read + Send + 'static>(
    mut r: BufReader<R>,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut sent = 0usize;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // lines are read whole but bounded: a line without newline ends at 64 KiB
            match (&mut r).take(64 << 10).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if sent < KEEP_LINES {
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end();
                let cut = cut_at(line, KEEP_LINE_BYTES);
                if !cut.is_empty() && tx.send(cut).is_ok() {
                    sent += 1;
                }
            }
        }
    })
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut_at(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Check a `--hook-timeout` value.
pub fn check_timeout(t: Duration, given: &str) -> Result<Duration> {
    if t.is_zero() || t > MAX_HOOK_TIMEOUT {
        return Err(anyhow!(
            "invalid --hook-timeout {given:?}: give more than 0 and at most {}s",
            MAX_HOOK_TIMEOUT.as_secs()
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_reports_its_exit_code_and_first_lines() {
        let o = run(
            "pre-snapshot",
            "for i in 1 2 3 4 5 6 7; do echo line$i; done; echo err >&2; exit 3",
            &[],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(o.code, Some(3));
        assert!(!o.ok() && !o.timed_out);
        assert!(o.head.len() <= KEEP_LINES);
        assert!(o.head.iter().any(|l| l == "line1"), "{:?}", o.head);
        assert!(o.note().contains("exited 3"), "{}", o.note());
    }

    #[test]
    fn a_hanging_hook_is_killed_with_its_children() {
        let t0 = Instant::now();
        let o = run(
            "pre-snapshot",
            "sleep 30 & sleep 30; echo never",
            &[],
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(o.timed_out && !o.ok());
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(o.note().contains("killed"), "{}", o.note());
    }

    #[test]
    fn hooks_see_their_environment_and_long_lines_are_cut() {
        let o = run(
            "post-snapshot",
            "echo \"$COWSNAP_HOOK $COWSNAP_DISKS\"; head -c 5000 /dev/zero | tr '\\0' x",
            &[("COWSNAP_DISKS", "a b".into())],
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(o.ok());
        assert!(
            o.head.contains(&"post-snapshot a b".to_string()),
            "{:?}",
            o.head
        );
        assert!(o.head.iter().all(|l| l.len() <= KEEP_LINE_BYTES + 3));
        assert_eq!(cut_at("ééé", 3), "é…");
    }
}
