//! Logging set-up shared by both binaries (`cowsnap-nbd`, `cowsnapctl`): env_logger,
//! in the journal's format when stderr is the journal.
//!
//! systemd connects a service's stderr to the journal with a stream socket and sets
//! `JOURNAL_STREAM=DEV:INO` (decimal `st_dev` and `st_ino` of that socket, see
//! systemd.exec(5)). Only when stderr still is that socket (a child whose stderr went
//! to a file inherits the variable too, so the variable alone proves nothing) each
//! record is written as `<N>message`: N is the syslog priority (error 3, warning 4,
//! info 6, debug and trace 7), which the journal takes as the entry's priority, and no
//! timestamp (the journal stamps each entry). Every line of a multi-line message gets
//! the prefix, since the journal makes each line an entry. Otherwise (a terminal, a
//! log file, a pipe) the format is env_logger's with millisecond timestamps.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

/// The environment variable systemd sets for services whose output goes to the journal.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`) names the file `dev`/`ino`.
pub fn journal_stream_matches(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.and_then(|v| v.trim().split_once(':')) else {
        return false;
    };
    matches!((d.parse::<u64>(), i.parse::<u64>()), (Ok(d), Ok(i)) if d == dev && i == ino)
}

/// Whether `fd` is the journal stream `journal_stream` names.
pub fn fd_is_journal<F: AsFd>(fd: F, journal_stream: Option<&str>) -> bool {
    if journal_stream.is_none() {
        return false;
    }
    // The fd is borrowed, so it stays open for the call.
    match nix::sys::stat::fstat(fd.as_fd().as_raw_fd()) {
        #[allow(clippy::unnecessary_cast)] // dev_t and ino_t are u64 here, not everywhere
        Ok(st) => journal_stream_matches(journal_stream, st.st_dev as u64, st.st_ino as u64),
        Err(_) => false,
    }
}

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    let v = std::env::var(JOURNAL_STREAM).ok();
    fd_is_journal(std::io::stderr(), v.as_deref())
}

/// The syslog priority of a log level.
pub fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// `message` as journal stream lines: `<N>` before each line, one newline at the end.
pub fn journal_line(priority: u8, message: &str) -> String {
    let prefix = format!("<{priority}>");
    let mut out = String::with_capacity(message.len() + 4);
    for line in message.split('\n') {
        out.push_str(&prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Set up env_logger (filter from `RUST_LOG`, else `default_filter`): into `log_file`
/// (appended, today's format) when given, else to stderr in the journal's format when
/// stderr is the journal, today's format otherwise. Returns whether the journal format
/// was chosen. A second call changes nothing.
pub fn init(default_filter: &str, log_file: Option<&Path>) -> std::io::Result<bool> {
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    let journal = match log_file {
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("unable to open log file {}: {e}", p.display()),
                    )
                })?;
            b.target(env_logger::Target::Pipe(Box::new(f)));
            false
        }
        None => stderr_is_journal(),
    };
    if journal {
        b.format(|buf, rec| {
            let line = journal_line(syslog_priority(rec.level()), &rec.args().to_string());
            buf.write_all(line.as_bytes())
        });
    } else {
        b.format_timestamp_millis();
    }
    let _ = b.try_init();
    Ok(journal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn journal_stream_must_name_the_same_file() {
        assert!(journal_stream_matches(Some("64768:123456"), 64768, 123456));
        assert!(journal_stream_matches(
            Some("64768:123456\n"),
            64768,
            123456
        ));
        assert!(!journal_stream_matches(Some("64768:123457"), 64768, 123456));
        assert!(!journal_stream_matches(Some("64769:123456"), 64768, 123456));
        assert!(!journal_stream_matches(None, 64768, 123456));
        for bad in [
            "", ":", "64768", "64768:", ":123456", "x:1", "1:y", "-1:1", "0x10:1",
        ] {
            assert!(!journal_stream_matches(Some(bad), 0x10, 1), "{bad:?}");
        }
    }

    #[test]
    fn a_file_descriptor_is_the_journal_only_if_dev_and_ino_match() {
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let (dev, ino) = (m.dev(), m.ino());
        assert!(fd_is_journal(&f, Some(&format!("{dev}:{ino}"))));
        assert!(!fd_is_journal(&f, Some(&format!("{dev}:{}", ino + 1))));
        assert!(!fd_is_journal(&f, None));
        let other = tempfile::tempfile().unwrap();
        assert!(!fd_is_journal(&other, Some(&format!("{dev}:{ino}"))));
    }

    #[test]
    fn syslog_priorities_and_prefixes() {
        assert_eq!(syslog_priority(log::Level::Error), 3);
        assert_eq!(syslog_priority(log::Level::Warn), 4);
        assert_eq!(syslog_priority(log::Level::Info), 6);
        assert_eq!(syslog_priority(log::Level::Debug), 7);
        assert_eq!(syslog_priority(log::Level::Trace), 7);
        assert_eq!(journal_line(6, "listening"), "<6>listening\n");
        assert_eq!(journal_line(3, "a\nb"), "<3>a\n<3>b\n");
        assert_eq!(journal_line(4, ""), "<4>\n");
    }
}
