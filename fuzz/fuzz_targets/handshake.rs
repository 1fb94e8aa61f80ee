//! The fixed-newstyle handshake: `handshake::negotiate` reads the client's bytes from
//! the input and writes its replies to a socket that a background thread drains.
//! When negotiation succeeds the session must describe a real export consistently.
#![no_main]

#[path = "../common/mem.rs"]
mod mem;

use cowsnap_nbd::nbd::handshake::{self, End};
use cowsnap_nbd::nbd::proto::*;
use cowsnap_nbd::nbd::server::Server;
use cowsnap_nbd::nbd::stream::Stream;
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

struct Fixture {
    server: Arc<Server>,
    /// Replies go here; the peer end is read and discarded by a thread.
    sink: UnixStream,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (sink, mut peer) = UnixStream::pair().expect("socketpair");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
        });
        Fixture {
            server: mem::server(),
            sink,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut rd = Cursor::new(data);
    let mut wr = Stream::Unix(f.sink.try_clone().expect("dup"));
    match handshake::negotiate(&f.server, &mut rd, &mut wr) {
        Ok(s) => {
            let e = f.server.export(&s.name).expect("session names an export");
            assert_eq!(e.export.size(), s.entry.export.size());
            let caps = s.entry.export.caps();
            assert_eq!(s.tflags, transmission_flags(&caps, s.structured));
            assert!(
                !s.base_allocation || s.structured,
                "meta context without structured replies"
            );
            assert_eq!(s.tflags & TF_READ_ONLY != 0, caps.read_only);
        }
        Err(End::Closed(why)) => assert!(!why.is_empty()),
        Err(End::Io(e)) => panic!("socket error on an in-memory handshake: {e}"),
    }
    // Never reads past the input.
    assert!(rd.position() as usize <= data.len());
});
