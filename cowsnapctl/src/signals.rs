//! SIGINT, SIGTERM and SIGHUP while a command holds something a signal must not leave
//! behind (a frozen filesystem, paused disks): blocked for the whole command (threads
//! started later inherit the mask), and optionally read by a thread that only sets a
//! flag the command polls.

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn set() -> SigSet {
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs
}

/// Block the three signals in this thread (and the threads it starts from now on).
pub fn block() -> Result<()> {
    set().thread_block().context("unable to block signals")
}

/// [`block`], and a thread that sets the returned flag when one of them arrives.
pub fn block_and_watch() -> Result<Arc<AtomicBool>> {
    let sigs = set();
    sigs.thread_block().context("unable to block signals")?;
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        while sigs.wait().is_ok() {
            f.store(true, Ordering::SeqCst);
        }
    });
    Ok(flag)
}
