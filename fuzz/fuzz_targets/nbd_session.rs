//! A whole NBD connection as the daemon serves it: the input is everything a client
//! sends (handshake, then transmission requests and payloads) over a socketpair;
//! `handshake::negotiate` then `transmission::serve` run on the other end against a
//! memory export that panics if a request reaches it out of range or writes a
//! read-only export. A thread sends the input and drains the replies.
#![no_main]

#[path = "../common/mem.rs"]
mod mem;

use cowsnap_nbd::nbd::handshake::{self, End};
use cowsnap_nbd::nbd::stream::Stream;
use cowsnap_nbd::nbd::transmission::{self, READ_BUF};
use libfuzzer_sys::fuzz_target;
use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Like a Rust binary's runtime (the daemon): writes to a closed socket fail
        // with EPIPE instead of killing the process.
        // SAFETY: setting SIGPIPE to SIG_IGN installs no handler code; it only changes
        // the disposition, before any other thread of this target writes to a socket.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let server = mem::server();
    let (server_end, mut client) = UnixStream::pair().expect("socketpair");
    let input = data.to_vec();
    let peer = std::thread::spawn(move || {
        // Send everything (the server may stop reading early), then read to EOF.
        let _ = client.write_all(&input);
        let _ = client.shutdown(Shutdown::Write);
        let mut buf = vec![0u8; 1 << 16];
        while matches!(client.read(&mut buf), Ok(n) if n > 0) {}
    });
    let s = Stream::Unix(server_end);
    let mut writer = s.try_clone().expect("dup");
    let mut reader = BufReader::with_capacity(READ_BUF, s);
    match handshake::negotiate(&server, &mut reader, &mut writer) {
        Ok(session) => {
            transmission::serve(1, session, reader, writer, 1).expect("serve");
        }
        Err(End::Closed(_)) | Err(End::Io(_)) => {
            let _ = writer.shutdown(Shutdown::Both);
        }
    }
    peer.join().expect("peer thread");
});
