//! The fixed-newstyle handshake: `handshake::negotiate` reading the client's bytes
//! from the input and writing its replies to a counting sink, all in memory. When negotiation
//! succeeds the session must describe a real export consistently.
#![no_main]

#[path = "../common/mem.rs"]
mod mem;

use cowsnap_nbd::nbd::handshake::{self, End, ExportLookup};
use cowsnap_nbd::nbd::proto::*;
use cowsnap_nbd::nbd::server::Server;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Cursor, Write};
use std::sync::{Arc, OnceLock};

/// Counts what is written.
struct Sink(usize);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn server() -> &'static Arc<Server> {
    static S: OnceLock<Arc<Server>> = OnceLock::new();
    S.get_or_init(mem::server)
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let mut rd = Cursor::new(data);
    let mut wr = Sink(0);
    match handshake::negotiate(server.as_ref(), &mut rd, &mut wr) {
        Ok(s) => {
            let e = server.export(&s.name).expect("session names an export");
            assert_eq!(e.export.size(), s.entry.export.size());
            let caps = s.entry.export.caps();
            assert_eq!(s.tflags, transmission_flags(&caps, s.structured));
            assert!(
                !s.meta_context_selected() || s.structured,
                "meta context without structured replies"
            );
            assert_eq!(s.tflags & TF_READ_ONLY != 0, caps.read_only);
        }
        Err(End::Closed(why)) => assert!(!why.is_empty()),
        Err(End::Io(e)) => panic!("I/O error on an in-memory handshake: {e}"),
    }
    // The greeting always goes out; nothing is read past the input.
    assert!(wr.0 >= 18);
    assert!(rd.position() as usize <= data.len());
});
