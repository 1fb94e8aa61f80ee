//! The control protocol (JSON lines): `control::decode_request` on what a client
//! sends, `control::decode_reply` on what a daemon answers, and the encoders they
//! pair with. A request that decodes must re-encode as one line that decodes to the
//! same request; an error reply must carry its message back unchanged.
#![no_main]

use cowsnap_nbd::control::{self, ControlError, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The daemon answers a line that is not UTF-8 without decoding it.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(req) = control::decode_request(line) {
        let enc = control::encode_request(&req);
        assert!(!enc.contains('\n'), "encoded request spans lines: {enc:?}");
        let again = control::decode_request(&enc).expect("an encoded request decodes");
        assert_eq!(format!("{req:?}"), format!("{again:?}"));
        if let Request::Backup { params } = &req {
            // The container sizes the daemon would parse.
            if let Some(c) = &params.container {
                if let Some(size) = c.rsplit(':').next() {
                    let _ = cowsnap_core::container::parse_size(size);
                }
            }
        }
        let ok = control::ok_reply(&req);
        assert!(!ok.contains('\n'));
        control::decode_reply(&ok).expect("an ok reply decodes");
    }
    match control::decode_reply(line) {
        Ok(m) => assert!(!m.contains_key("ok") && !m.contains_key("v")),
        Err(ControlError::Daemon(_)) | Err(ControlError::Protocol(_)) => {}
        Err(e) => panic!("decode_reply gave an I/O error: {e}"),
    }
    let err = control::error_reply(line);
    assert!(!err.contains('\n'), "error reply spans lines");
    match control::decode_reply(&err) {
        Err(ControlError::Daemon(m)) => assert_eq!(m, line),
        other => panic!("error reply did not decode as an error: {other:?}"),
    }
});
