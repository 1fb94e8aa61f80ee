//! The NBD wire format: constants, and pure functions that parse requests and options
//! from byte slices and encode replies into bytes. Nothing here does I/O, so every
//! path (truncated, oversized, garbage input) is unit-tested directly.
//!
//! All integers on the wire are big-endian. References are to the NBD protocol
//! document (`doc/proto.md` of the reference implementation).

/// "NBDMAGIC": first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle greeting magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after NBD_OPT_EXPORT_NAME may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle understood.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands.
pub const CLIENT_KNOWN: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
#[allow(missing_docs)]
pub const OPT_ABORT: u32 = 2;
#[allow(missing_docs)]
pub const OPT_LIST: u32 = 3;
#[allow(missing_docs)]
pub const OPT_STARTTLS: u32 = 5;
#[allow(missing_docs)]
pub const OPT_INFO: u32 = 6;
#[allow(missing_docs)]
pub const OPT_GO: u32 = 7;
#[allow(missing_docs)]
pub const OPT_STRUCTURED_REPLY: u32 = 8;
#[allow(missing_docs)]
pub const OPT_LIST_META_CONTEXT: u32 = 9;
#[allow(missing_docs)]
pub const OPT_SET_META_CONTEXT: u32 = 10;
#[allow(missing_docs)]
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
#[allow(missing_docs)]
pub const REP_SERVER: u32 = 2;
#[allow(missing_docs)]
pub const REP_INFO: u32 = 3;
#[allow(missing_docs)]
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
#[allow(missing_docs)]
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
#[allow(missing_docs)]
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
#[allow(missing_docs)]
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
#[allow(missing_docs)]
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
#[allow(missing_docs)]
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
#[allow(missing_docs)]
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
#[allow(missing_docs)]
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
#[allow(missing_docs)]
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
#[allow(missing_docs)]
pub const INFO_NAME: u16 = 1;
#[allow(missing_docs)]
pub const INFO_DESCRIPTION: u16 = 2;
#[allow(missing_docs)]
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
#[allow(missing_docs)]
pub const TF_READ_ONLY: u16 = 1 << 1;
#[allow(missing_docs)]
pub const TF_SEND_FLUSH: u16 = 1 << 2;
#[allow(missing_docs)]
pub const TF_SEND_FUA: u16 = 1 << 3;
#[allow(missing_docs)]
pub const TF_ROTATIONAL: u16 = 1 << 4;
#[allow(missing_docs)]
pub const TF_SEND_TRIM: u16 = 1 << 5;
#[allow(missing_docs)]
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
#[allow(missing_docs)]
pub const TF_SEND_DF: u16 = 1 << 7;
#[allow(missing_docs)]
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
#[allow(missing_docs)]
pub const TF_SEND_CACHE: u16 = 1 << 10;
#[allow(missing_docs)]
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
#[allow(missing_docs)]
pub const CMD_WRITE: u16 = 1;
#[allow(missing_docs)]
pub const CMD_DISC: u16 = 2;
#[allow(missing_docs)]
pub const CMD_FLUSH: u16 = 3;
#[allow(missing_docs)]
pub const CMD_TRIM: u16 = 4;
#[allow(missing_docs)]
pub const CMD_CACHE: u16 = 5;
#[allow(missing_docs)]
pub const CMD_WRITE_ZEROES: u16 = 6;
#[allow(missing_docs)]
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
#[allow(missing_docs)]
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
#[allow(missing_docs)]
pub const CMD_FLAG_DF: u16 = 1 << 2;
#[allow(missing_docs)]
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
#[allow(missing_docs)]
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
#[allow(missing_docs)]
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
#[allow(missing_docs)]
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
#[allow(missing_docs)]
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
#[allow(missing_docs)]
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Block status flags of `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
#[allow(missing_docs)]
pub const STATE_ZERO: u32 = 1 << 1;

/// NBD errors (values are fixed by the protocol, equal to Linux's).
pub const EPERM: u32 = 1;
#[allow(missing_docs)]
pub const EIO: u32 = 5;
#[allow(missing_docs)]
pub const ENOMEM: u32 = 12;
#[allow(missing_docs)]
pub const EINVAL: u32 = 22;
#[allow(missing_docs)]
pub const ENOSPC: u32 = 28;
#[allow(missing_docs)]
pub const EOVERFLOW: u32 = 75;
#[allow(missing_docs)]
pub const ENOTSUP: u32 = 95;
#[allow(missing_docs)]
pub const ESHUTDOWN: u32 = 108;

/// The meta context every export serves, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id of `base:allocation` on the wire.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Prefix of QEMU's dirty-bitmap meta contexts (`qemu:dirty-bitmap:NAME`), served by
/// exports that have a dirty bitmap (a snapshot export).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// Context id of the dirty bitmap on the wire.
pub const DIRTY_BITMAP_ID: u32 = 2;
/// Flag of a dirty extent in the dirty-bitmap context (QEMU's value).
pub const STATE_DIRTY: u32 = 1;

/// Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
pub const MIN_BLOCK: u32 = 1;
#[allow(missing_docs)]
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ/WRITE payload accepted.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted; larger ones are refused (ERR_TOO_BIG) or, past
/// [`MAX_OPTION_DISCARD`], end the connection.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest option payload the server still reads and throws away.
pub const MAX_OPTION_DISCARD: u32 = 1 << 20;
/// Longest export name or context query accepted (the protocol's limit).
pub const MAX_STRING: usize = 4096;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of a client option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Something on the wire the protocol does not allow; the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A magic number was wrong.
    BadMagic(u64),
    /// Fewer bytes than the structure needs.
    Truncated,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            WireError::Truncated => write!(f, "truncated message"),
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Payload length that follows.
    pub len: u32,
}

/// Parse a 16-byte option header.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, WireError> {
    let magic = be64(b, 0).ok_or(WireError::Truncated)?;
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be32(b, 8).ok_or(WireError::Truncated)?,
        len: be32(b, 12).ok_or(WireError::Truncated)?,
    })
}

/// An option reply: magic, option, type, length, data.
pub fn encode_option_reply(option: u32, rtype: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&rtype.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An option that the payload did not describe correctly: answer NBD_REP_ERR_INVALID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

/// NBD_OPT_INFO / NBD_OPT_GO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (raw bytes; UTF-8 is not required by the protocol).
    pub name: Vec<u8>,
    /// Requested NBD_INFO types.
    pub infos: Vec<u16>,
}

/// Parse the payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn parse_info_request(d: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let n = be32(d, 0).ok_or(InvalidOption("payload shorter than the name length"))? as usize;
    if n > MAX_STRING {
        return Err(InvalidOption("export name too long"));
    }
    let name = d
        .get(4..4 + n)
        .ok_or(InvalidOption("export name runs past the payload"))?;
    let count = be16(d, 4 + n).ok_or(InvalidOption("missing information request count"))? as usize;
    let rest = &d[4 + n + 2..];
    if rest.len() != count * 2 {
        return Err(InvalidOption(
            "information request count does not match the payload",
        ));
    }
    let infos = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest {
        name: name.to_vec(),
        infos,
    })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: Vec<u8>,
    /// Queries (context names or namespace prefixes).
    pub queries: Vec<Vec<u8>>,
}

/// Parse the payload of NBD_OPT_{LIST,SET}_META_CONTEXT.
pub fn parse_meta_request(d: &[u8]) -> Result<MetaRequest, InvalidOption> {
    let n = be32(d, 0).ok_or(InvalidOption("payload shorter than the name length"))? as usize;
    if n > MAX_STRING {
        return Err(InvalidOption("export name too long"));
    }
    let name = d
        .get(4..4 + n)
        .ok_or(InvalidOption("export name runs past the payload"))?;
    let count = be32(d, 4 + n).ok_or(InvalidOption("missing query count"))? as usize;
    let mut at = 4 + n + 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let l = be32(d, at).ok_or(InvalidOption("query count exceeds the payload"))? as usize;
        if l > MAX_STRING {
            return Err(InvalidOption("query too long"));
        }
        let q = d
            .get(at + 4..at + 4 + l)
            .ok_or(InvalidOption("query runs past the payload"))?;
        queries.push(q.to_vec());
        at += 4 + l;
    }
    if at != d.len() {
        return Err(InvalidOption("trailing bytes after the queries"));
    }
    Ok(MetaRequest {
        name: name.to_vec(),
        queries,
    })
}

/// Contexts answering a LIST query (`list`) or a SET query (exact names only).
/// An empty query list on LIST means "all contexts".
pub fn match_meta_queries(queries: &[Vec<u8>], list: bool) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q.as_slice() == BASE_ALLOCATION.as_bytes() || (list && q.as_slice() == b"base:"))
}

/// NBD_REP_INFO payload for NBD_INFO_EXPORT.
pub fn info_export(size: u64, tflags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..].copy_from_slice(&tflags.to_be_bytes());
    b
}

/// NBD_REP_INFO payload for NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..].copy_from_slice(&max.to_be_bytes());
    b
}

/// NBD_REP_INFO payload for NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
pub fn info_string(kind: u16, s: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s);
    b
}

/// NBD_REP_SERVER payload: name length, name, description.
pub fn rep_server(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(description);
    b
}

/// NBD_REP_META_CONTEXT payload: context id, name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zeros unless NO_ZEROES.
pub fn export_name_reply(size: u64, tflags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub cmd: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (payload length for WRITE).
    pub len: u32,
}

/// Parse a 28-byte request header.
pub fn parse_request(b: &[u8]) -> Result<Request, WireError> {
    if b.len() < REQUEST_LEN {
        return Err(WireError::Truncated);
    }
    let magic = be32(b, 0).ok_or(WireError::Truncated)?;
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: be16(b, 4).ok_or(WireError::Truncated)?,
        cmd: be16(b, 6).ok_or(WireError::Truncated)?,
        cookie: be64(b, 8).ok_or(WireError::Truncated)?,
        offset: be64(b, 16).ok_or(WireError::Truncated)?,
        len: be32(b, 24).ok_or(WireError::Truncated)?,
    })
}

/// Encode a request header (used by tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, rtype: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&rtype.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Header (chunk header + offset) of a single OFFSET_DATA chunk carrying `len` bytes,
/// flagged DONE.
pub fn offset_data_header(cookie: u64, offset: u64, len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len + 8,
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A complete NBD_REPLY_TYPE_ERROR chunk (flagged DONE) with a message.
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    // The message length is 16-bit; keep it short anyway, cut at a character boundary
    // (the message is UTF-8 on the wire).
    let mut end = msg.len().min(1024);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// One `base:allocation` descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Length (> 0).
    pub len: u32,
    /// STATE_HOLE | STATE_ZERO.
    pub flags: u32,
}

/// A complete NBD_REPLY_TYPE_BLOCK_STATUS chunk (flagged DONE).
pub fn block_status_chunk(cookie: u64, context: u32, d: &[Descriptor]) -> Vec<u8> {
    block_status_chunk_part(cookie, context, d, true)
}

/// An NBD_REPLY_TYPE_BLOCK_STATUS chunk, flagged DONE when `done` (the last of a reply
/// with one chunk per selected meta context).
pub fn block_status_chunk_part(cookie: u64, context: u32, d: &[Descriptor], done: bool) -> Vec<u8> {
    let len = 4 + 8 * d.len();
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    b.extend_from_slice(&chunk_header(
        if done { REPLY_FLAG_DONE } else { 0 },
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    b.extend_from_slice(&context.to_be_bytes());
    for x in d {
        b.extend_from_slice(&x.len.to_be_bytes());
        b.extend_from_slice(&x.flags.to_be_bytes());
    }
    b
}

/// Turn export extents into wire descriptors for a request at `len` bytes: lengths
/// clamped to 32 bits, none empty, none past the request, only the first with REQ_ONE.
pub fn descriptors(
    extents: &[cowsnap_core::export::Extent],
    len: u32,
    req_one: bool,
) -> Vec<Descriptor> {
    let flagged = extents.iter().map(|e| {
        (
            e.len,
            if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 },
        )
    });
    flag_descriptors(flagged, len, req_one)
}

/// [`descriptors`] for the dirty-bitmap context: [`STATE_DIRTY`] on dirty extents.
pub fn dirty_descriptors(
    extents: &[cowsnap_core::export::DirtyExtent],
    len: u32,
    req_one: bool,
) -> Vec<Descriptor> {
    let flagged = extents
        .iter()
        .map(|e| (e.len, if e.dirty { STATE_DIRTY } else { 0 }));
    flag_descriptors(flagged, len, req_one)
}

/// Wire descriptors from (length, flags) pairs, with the rules of [`descriptors`].
fn flag_descriptors(
    extents: impl Iterator<Item = (u64, u32)>,
    len: u32,
    req_one: bool,
) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let mut left = len as u64;
    for (elen, flags) in extents {
        if left == 0 {
            break;
        }
        let l = elen.min(left);
        if l == 0 {
            continue;
        }
        // Merge with the previous descriptor when the state is the same.
        match out.last_mut() {
            Some(Descriptor { len: pl, flags: pf })
                if *pf == flags && (*pl as u64) + l <= u32::MAX as u64 =>
            {
                *pl += l as u32;
            }
            _ => out.push(Descriptor {
                len: l as u32,
                flags,
            }),
        }
        left -= l;
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Everything the edge needs to validate a request.
#[derive(Debug, Clone, Copy)]
pub struct ExportView {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags sent to the client.
    pub tflags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Some meta context is selected (`base:allocation`, the export's
    /// `qemu:dirty-bitmap:…`, or both): BLOCK_STATUS is allowed.
    /// [`Session::meta_context_selected`](crate::nbd::handshake::Session::meta_context_selected).
    pub meta_context_selected: bool,
}

/// Check a request against the export and what was negotiated, before anything is
/// executed. `Err(errno)` is the reply; for WRITE the payload must still be consumed.
pub fn validate(r: &Request, v: &ExportView) -> Result<(), u32> {
    let allowed = match r.cmd {
        CMD_READ => {
            CMD_FLAG_FUA
                | if v.tflags & TF_SEND_DF != 0 {
                    CMD_FLAG_DF
                } else {
                    0
                }
        }
        CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => {
            CMD_FLAG_FUA
                | CMD_FLAG_NO_HOLE
                | if v.tflags & TF_SEND_FAST_ZERO != 0 {
                    CMD_FLAG_FAST_ZERO
                } else {
                    0
                }
        }
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_CACHE if v.tflags & TF_SEND_CACHE != 0 => CMD_FLAG_FUA,
        _ => return Err(EINVAL),
    };
    if r.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let write_like = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if write_like && v.tflags & TF_READ_ONLY != 0 {
        return Err(EPERM);
    }
    match r.cmd {
        CMD_TRIM if v.tflags & TF_SEND_TRIM == 0 => return Err(EINVAL),
        CMD_WRITE_ZEROES if v.tflags & TF_SEND_WRITE_ZEROES == 0 => return Err(EINVAL),
        CMD_BLOCK_STATUS if !(v.structured && v.meta_context_selected) => return Err(EINVAL),
        CMD_FLUSH => return Ok(()),
        _ => {}
    }
    if r.len == 0 {
        return Err(EINVAL);
    }
    if matches!(r.cmd, CMD_READ | CMD_WRITE) && r.len > MAX_PAYLOAD {
        return Err(EINVAL);
    }
    let end = r.offset.checked_add(r.len as u64);
    if !matches!(end, Some(e) if e <= v.size) {
        return Err(if write_like { ENOSPC } else { EINVAL });
    }
    Ok(())
}

/// The NBD error for a library error.
pub fn errno_of(e: &cowsnap_core::Error) -> u32 {
    match e.errno() {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::EOPNOTSUPP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Transmission flags for an export with these capabilities.
pub fn transmission_flags(caps: &cowsnap_core::export::ExportCaps, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
    if caps.read_only {
        f |= TF_READ_ONLY;
    } else {
        if caps.trim {
            f |= TF_SEND_TRIM;
        }
        if caps.zeroes {
            f |= TF_SEND_WRITE_ZEROES;
            if caps.fast_zero {
                f |= TF_SEND_FAST_ZERO;
            }
        }
    }
    if structured {
        f |= TF_SEND_DF;
    }
    if caps.multi_conn {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap_core::export::{ExportCaps, Extent};
    use proptest::prelude::*;

    fn rw_view() -> ExportView {
        ExportView {
            size: 1 << 20,
            tflags: transmission_flags(
                &ExportCaps {
                    read_only: false,
                    trim: true,
                    zeroes: true,
                    fast_zero: true,
                    multi_conn: true,
                },
                true,
            ),
            structured: true,
            meta_context_selected: true,
        }
    }

    fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            cmd,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(&greeting()[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&greeting()[16..], &[0, 3]);
    }

    #[test]
    fn request_roundtrip_and_known_bytes() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 0x0102_0304_0506_0708, 0x1000);
        let b = encode_request(&r);
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8,
                0, 0, 0x10, 0
            ]
        );
        assert_eq!(parse_request(&b), Ok(r));
    }

    #[test]
    fn request_truncated_and_bad_magic() {
        let b = encode_request(&req(CMD_READ, 0, 0, 512));
        for n in 0..REQUEST_LEN {
            assert_eq!(parse_request(&b[..n]), Err(WireError::Truncated));
        }
        let mut bad = b;
        bad[0] ^= 0xff;
        assert!(matches!(parse_request(&bad), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn simple_and_structured_reply_bytes() {
        assert_eq!(
            simple_reply(22, 0xAABB),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xAA, 0xBB]
        );
        assert_eq!(
            offset_data_header(1, 512, 4096),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 8, 0, 0, 0,
                0, 0, 0, 2, 0
            ]
        );
        // A long message is cut at a character boundary: still UTF-8.
        let long = "é".repeat(600);
        let cut = error_chunk(2, EIO, &long);
        let text = &cut[CHUNK_HEADER_LEN + 6..];
        assert_eq!(text.len(), 1024);
        assert!(std::str::from_utf8(text).is_ok());
        let long = format!("x{}", "é".repeat(600));
        let cut = error_chunk(2, EIO, &long);
        assert_eq!(cut.len() - CHUNK_HEADER_LEN - 6, 1023);
        assert!(std::str::from_utf8(&cut[CHUNK_HEADER_LEN + 6..]).is_ok());
        let e = error_chunk(2, EINVAL, "no");
        assert_eq!(
            e,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 8, 0, 0, 0,
                22, 0, 2, b'n', b'o'
            ]
        );
        let bs = block_status_chunk(
            3,
            1,
            &[Descriptor {
                len: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(
            bs,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 12, 0, 0, 0,
                1, 0, 0, 0x10, 0, 0, 0, 0, 3
            ]
        );
    }

    #[test]
    fn option_reply_bytes() {
        let b = encode_option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(
            b,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let i = info_export(1 << 30, TF_HAS_FLAGS | TF_SEND_FLUSH);
        assert_eq!(i, [0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 5]);
        let bs = info_block_size(1, 4096, 32 << 20);
        assert_eq!(bs, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
    }

    #[test]
    fn option_header_parsing() {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 9
            })
        );
        assert_eq!(parse_option_header(&b[..15]), Err(WireError::Truncated));
        b[0] = 0;
        assert!(matches!(
            parse_option_header(&b),
            Err(WireError::BadMagic(_))
        ));
    }

    fn info_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_parsing() {
        let d = info_payload(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: b"disk".to_vec(),
                infos: vec![INFO_NAME, INFO_BLOCK_SIZE]
            })
        );
        for n in 0..d.len() {
            assert!(parse_info_request(&d[..n]).is_err(), "prefix {n}");
        }
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        // name length far past the payload
        let mut huge = d;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_err());
        assert_eq!(
            parse_info_request(&info_payload(b"", &[])).unwrap().name,
            b""
        );
    }

    fn meta_payload(name: &[u8], qs: &[&[u8]]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(qs.len() as u32).to_be_bytes());
        for q in qs {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn meta_request_parsing_and_matching() {
        let d = meta_payload(b"x", &[b"base:", b"qemu:dirty-bitmap:a"]);
        let m = parse_meta_request(&d).unwrap();
        assert_eq!(m.queries.len(), 2);
        assert!(match_meta_queries(&m.queries, true));
        assert!(!match_meta_queries(&m.queries, false));
        assert!(match_meta_queries(&[], true));
        assert!(!match_meta_queries(&[], false));
        assert!(match_meta_queries(&[b"base:allocation".to_vec()], false));
        assert!(!match_meta_queries(&[b"x-nosuch:".to_vec()], true));
        for n in 0..d.len() {
            assert!(parse_meta_request(&d[..n]).is_err(), "prefix {n}");
        }
        let mut huge_count = meta_payload(b"", &[]);
        huge_count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge_count).is_err());
    }

    #[test]
    fn validation_rules() {
        let v = rw_view();
        assert_eq!(validate(&req(CMD_READ, 0, 0, 512), &v), Ok(()));
        assert_eq!(
            validate(&req(CMD_READ, 0, (1 << 20) - 511, 512), &v),
            Err(EINVAL)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, (1 << 20) - 511, 512), &v),
            Err(ENOSPC)
        );
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, 0, u64::MAX, 512), &v),
            Err(ENOSPC)
        );
        assert_eq!(validate(&req(CMD_READ, 1 << 10, 0, 512), &v), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &v), Ok(()));
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_DF, 0, 512), &v),
            Err(EINVAL)
        );
        assert_eq!(validate(&req(99, 0, 0, 512), &v), Err(EINVAL));
        assert_eq!(validate(&req(CMD_CACHE, 0, 0, 512), &v), Ok(()));
        assert_eq!(validate(&req(CMD_CACHE, 0, 1 << 20, 512), &v), Err(EINVAL));
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &v),
            Err(EINVAL)
        );
        assert_eq!(validate(&req(CMD_FLUSH, 0, 0, 0), &v), Ok(()));
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &v),
            Ok(())
        );
        let mut no_meta = v;
        no_meta.meta_context_selected = false;
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &no_meta),
            Err(EINVAL)
        );
        let mut ro = v;
        ro.tflags |= TF_READ_ONLY;
        assert_eq!(validate(&req(CMD_WRITE, 0, 0, 512), &ro), Err(EPERM));
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, 512), &ro), Err(EPERM));
        assert_eq!(validate(&req(CMD_READ, 0, 0, 512), &ro), Ok(()));
    }

    #[test]
    fn descriptor_clamping() {
        let ex = [
            Extent {
                len: 100,
                hole: false,
                zero: false,
            },
            Extent {
                len: 50,
                hole: false,
                zero: false,
            },
            Extent {
                len: 1 << 40,
                hole: true,
                zero: true,
            },
        ];
        assert_eq!(
            descriptors(&ex, 1000, false),
            vec![
                Descriptor { len: 150, flags: 0 },
                Descriptor { len: 850, flags: 3 }
            ]
        );
        assert_eq!(descriptors(&ex, 1000, true).len(), 1);
        assert_eq!(descriptors(&ex, 10, false)[0].len, 10);
    }

    #[test]
    fn transmission_flag_rules() {
        let caps = ExportCaps {
            read_only: true,
            trim: true,
            zeroes: true,
            fast_zero: true,
            multi_conn: true,
        };
        let f = transmission_flags(&caps, false);
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(f & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_DF), 0);
        let caps = ExportCaps {
            read_only: false,
            fast_zero: false,
            ..caps
        };
        let f = transmission_flags(&caps, true);
        assert_ne!(f & TF_SEND_DF, 0);
        assert_eq!(f & TF_SEND_FAST_ZERO, 0);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_request(&b);
            let _ = parse_option_header(&b);
            let _ = parse_info_request(&b);
            let _ = parse_meta_request(&b);
        }

        #[test]
        fn any_request_roundtrips(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, cmd, cookie, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
            // validation never panics and never accepts a range past the end
            if validate(&r, &rw_view()).is_ok() && cmd != CMD_FLUSH {
                prop_assert!(offset.checked_add(len as u64).is_some_and(|e| e <= 1 << 20));
            }
        }

        #[test]
        fn info_roundtrip(name in proptest::collection::vec(any::<u8>(), 0..64),
                          infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let p = parse_info_request(&info_payload(&name, &infos)).unwrap();
            prop_assert_eq!(p.name, name);
            prop_assert_eq!(p.infos, infos);
        }
    }
}
