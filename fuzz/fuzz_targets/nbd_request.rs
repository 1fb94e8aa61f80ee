//! NBD transmission requests at the protocol edge: `proto::parse_request` and
//! `proto::validate` on a stream of 28-byte headers against an export view taken
//! from the input, plus `proto::descriptors` on arbitrary extents.
//!
//! Input: 12 bytes of view (size u64 BE, tflags u16 BE, structured,
//! meta_context_selected), then request headers back to back; a trailing partial
//! header must be refused.
#![no_main]

use cowsnap_core::export::Extent;
use cowsnap_nbd::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((v, rest)) = data.split_first_chunk::<12>() else {
        assert!(parse_request(data).is_err());
        return;
    };
    let view = ExportView {
        size: u64::from_be_bytes(v[..8].try_into().unwrap()),
        tflags: u16::from_be_bytes([v[8], v[9]]),
        structured: v[10] & 1 != 0,
        meta_context_selected: v[11] & 1 != 0,
    };
    for b in rest.chunks(REQUEST_LEN) {
        let r = match parse_request(b) {
            Ok(r) => r,
            Err(WireError::Truncated) => {
                assert!(b.len() < REQUEST_LEN);
                continue;
            }
            Err(WireError::BadMagic(m)) => {
                assert_ne!(m, REQUEST_MAGIC as u64);
                continue;
            }
        };
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(
            &encode_request(&r)[..],
            b,
            "request header does not round-trip"
        );
        check(&r, &view);
    }
    // The tail of the input doubles as block-status extents for `descriptors`.
    let extents: Vec<Extent> = rest
        .chunks_exact(9)
        .map(|c| Extent {
            len: u64::from_be_bytes(c[..8].try_into().unwrap()),
            hole: c[8] & 1 != 0,
            zero: c[8] & 2 != 0,
        })
        .collect();
    let len = view.size as u32;
    for req_one in [false, true] {
        let d = descriptors(&extents, len, req_one);
        let total: u64 = d.iter().map(|x| x.len as u64).sum();
        assert!(total <= len as u64, "descriptors run past the request");
        assert!(d.iter().all(|x| x.len > 0), "empty descriptor");
        assert!(d.iter().all(|x| x.flags & !(STATE_HOLE | STATE_ZERO) == 0));
        assert!(!req_one || d.len() <= 1);
        let chunk = block_status_chunk(1, BASE_ALLOCATION_ID, &d);
        assert_eq!(chunk.len(), CHUNK_HEADER_LEN + 4 + 8 * d.len());
    }
});

/// What `validate` promises the export: only known commands and flags, nothing
/// data-changing on a read-only export, in-range non-empty ranges, bounded payloads.
fn check(r: &Request, v: &ExportView) {
    let res = validate(r, v);
    let Ok(()) = res else {
        let e = res.unwrap_err();
        assert!([EINVAL, EPERM, ENOSPC].contains(&e), "unexpected errno {e}");
        return;
    };
    assert!(matches!(
        r.cmd,
        CMD_READ
            | CMD_WRITE
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ));
    let write_like = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    assert!(
        !(write_like && v.tflags & TF_READ_ONLY != 0),
        "write on a read-only export"
    );
    if r.cmd == CMD_BLOCK_STATUS {
        assert!(v.structured && v.meta_context_selected);
    }
    if r.flags & CMD_FLAG_DF != 0 {
        assert!(r.cmd == CMD_READ && v.tflags & TF_SEND_DF != 0);
    }
    if r.flags & CMD_FLAG_FAST_ZERO != 0 {
        assert!(r.cmd == CMD_WRITE_ZEROES && v.tflags & TF_SEND_FAST_ZERO != 0);
    }
    if r.cmd != CMD_FLUSH {
        assert!(r.len > 0, "empty range accepted");
        let end = r.offset.checked_add(r.len as u64).expect("range overflows");
        assert!(end <= v.size, "range past the end accepted");
    }
    if matches!(r.cmd, CMD_READ | CMD_WRITE) {
        assert!(r.len <= MAX_PAYLOAD, "payload over the limit accepted");
    }
}
