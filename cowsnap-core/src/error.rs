//! One error type for the library: a small kind, a context (what was being done, on
//! which path / offset / chunk) and an optional OS error. Messages read
//! `unable to <context>: <OS error>` so a user knows what to do next.
//!
//! The message is whole on its own: `Display` includes the OS error, and
//! `std::error::Error::source` returns nothing, so a chain printer (anyhow's `{:#}`)
//! shows it once. Every message the library makes is used as a plain string somewhere
//! (logs, control replies, a backup's recorded cause), which is why the OS error is in
//! `Display` rather than only in the chain. [`Error::os_error`] gives the OS error to
//! code that needs it.

use std::fmt;
use std::io;

/// What went wrong, coarsely: enough for a caller to pick an NBD errno or an exit path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O error from the operating system.
    Io,
    /// The caller passed something malformed (bad flag, bad spec, bad size).
    InvalidInput,
    /// An offset or length outside the device.
    OutOfRange,
    /// A write to something that refuses writes.
    ReadOnly,
    /// No space left (target full, write past the end of an export).
    NoSpace,
    /// Stored data does not match its checksum or format.
    Corrupt,
    /// The thing is in use (a backup already running, a device mounted).
    Busy,
    /// The operation is not supported here.
    Unsupported,
    /// The operation was cancelled (snapshot dropped, daemon shutting down).
    Canceled,
    /// Something that should exist does not.
    NotFound,
}

/// The library's error: kind + context + source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<io::Error>,
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error without an OS source.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by an OS error; the kind is derived from the errno.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::ReadOnly,
            Some(libc::EINVAL) => ErrorKind::InvalidInput,
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => ErrorKind::NotFound,
            Some(libc::EBUSY) => ErrorKind::Busy,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// The coarse kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What was being done.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The OS error behind this one, if any.
    pub fn os_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }

    /// The errno an NBD reply (or a C caller) should see for this error.
    pub fn errno(&self) -> i32 {
        if let Some(e) = self.source.as_ref().and_then(|s| s.raw_os_error()) {
            return e;
        }
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::InvalidInput | ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::Canceled => libc::ESHUTDOWN,
            ErrorKind::NotFound => libc::ENOENT,
        }
    }

    /// Prefix more context: `unable to <outer>: unable to <inner>: <source>`.
    pub fn with_context(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {}", self.context, s),
            None => write!(f, "{}", self.context),
        }
    }
}

/// No `source()`: the OS error is part of the message already (see the module notes).
impl std::error::Error for Error {}

/// Shorthand: `Err(err!(Kind, "fmt", args))`.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        $crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*))
    };
}

/// Attach context to an `io::Result`.
pub trait IoContext<T> {
    /// Map an `io::Error` into [`Error`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_source_then_kind() {
        let e = Error::io("write x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(err!(OutOfRange, "read at {}", 5).errno(), libc::EINVAL);
        assert_eq!(err!(ReadOnly, "w").errno(), libc::EPERM);
    }

    #[test]
    fn message_says_what_then_why() {
        let e = Error::io(
            "unable to open container \"/x\"",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "unable to open container \"/x\": No such file or directory (os error 2)"
        );
        assert_eq!(
            e.os_error().and_then(|s| s.raw_os_error()),
            Some(libc::ENOENT)
        );
        // A chain printer shows the OS error once.
        assert!(std::error::Error::source(&e).is_none());
    }
}
