//! A whole NBD connection as the daemon serves it: the input is everything a client
//! sends (handshake, then transmission requests and payloads). `Server::serve_stream`
//! serves one end of a socketpair exactly as an accepted connection (handshake,
//! transmission, one worker); this thread sends the input on the other end and reads
//! the replies until the server closes. The memory export panics if a request reaches
//! it out of range or changes a read-only export; a panic in any thread is a crash.
//! Run it with `-detect_leaks=0`: the connection's detached thread may still be
//! exiting when the next input starts, and the per-input leak check then reports its
//! thread-local storage.
#![no_main]

#[path = "../common/mem.rs"]
mod mem;

use cowsnap_nbd::nbd::stream::Stream;
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Like a Rust binary's runtime (the daemon): writes to a closed socket fail
        // with EPIPE instead of killing the process.
        // SAFETY: SIG_IGN installs no handler code; it only changes the disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let server = mem::server();
    let (server_end, client) = UnixStream::pair().expect("socketpair");
    server.serve_stream(Stream::Unix(server_end));
    // Send from a second thread so that neither side can block the other.
    let mut tx = client.try_clone().expect("dup");
    let input = data.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = tx.write_all(&input);
        let _ = tx.shutdown(Shutdown::Write);
    });
    let mut rx = client;
    let mut buf = vec![0u8; 1 << 16];
    while matches!(rx.read(&mut buf), Ok(n) if n > 0) {}
    sender.join().expect("sender thread");
    // The connection's thread closed the socket; wait until it has let go of the
    // server too, so that nothing of this input outlives it (else: a leak report).
    let until = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&server) > 1 {
        assert!(
            Instant::now() < until,
            "the connection thread did not finish after closing its socket"
        );
        std::thread::sleep(Duration::from_micros(20));
    }
});
