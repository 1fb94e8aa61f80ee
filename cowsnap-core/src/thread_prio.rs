//! The nice value of the calling thread (Linux: `setpriority(PRIO_PROCESS, tid)` acts on
//! one thread). The drainer runs at +10 so the disk's users come first; the steps of a
//! group's snapshot instant run at [`INSTANT_NICE`] so that, on a busy machine, the
//! writes of every disk stay paused for as short a time as the scheduler allows.

/// The nice value of the threads that take a group's snapshot instant (needs
/// CAP_SYS_NICE; without it the value stays as it was).
pub const INSTANT_NICE: i32 = -10;

/// Set the calling thread's nice value. Failure (no permission) is returned, not fatal.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    let tid = nix::unistd::gettid();
    // SAFETY: setpriority takes integers only and touches no memory of ours; on Linux
    // PRIO_PROCESS with a thread id changes that thread's nice value.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t, nice) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn thread_nice() -> i32 {
    let tid = nix::unistd::gettid();
    // SAFETY: as above; errno is cleared first because -1 is also a valid nice value.
    unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid.as_raw() as libc::id_t)
    }
}

/// Runs `f` at nice `nice`, then puts the thread's old value back.
pub fn with_thread_nice<T>(nice: i32, f: impl FnOnce() -> T) -> T {
    let old = thread_nice();
    let changed = set_thread_nice(nice).is_ok();
    let r = f();
    if changed {
        let _ = set_thread_nice(old);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_is_per_thread_and_restored() {
        let before = thread_nice();
        std::thread::spawn(|| {
            let b = thread_nice();
            let inside = with_thread_nice(b + 5, thread_nice);
            assert_eq!(inside, (b + 5).min(19));
            assert_eq!(thread_nice(), b);
        })
        .join()
        .unwrap();
        assert_eq!(thread_nice(), before);
    }
}
