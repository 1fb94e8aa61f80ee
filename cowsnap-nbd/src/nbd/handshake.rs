//! Fixed-newstyle negotiation: greeting, client flags, then options until the client
//! picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! Design notes
//! - Every option payload is read in full before it is answered, so the stream stays
//!   in step whatever the option; payloads larger than [`proto::MAX_OPTION_LEN`] are
//!   refused with NBD_REP_ERR_TOO_BIG, and beyond [`proto::MAX_OPTION_DISCARD`] the
//!   connection is dropped.
//! - Unknown client flags, a bad option magic, or an unknown export name in
//!   NBD_OPT_EXPORT_NAME (which has no error reply) end the connection.
//! - TLS ([`Tls`]): where none is configured (the unix socket, `--insecure-tcp`)
//!   STARTTLS is refused with NBD_REP_ERR_POLICY. Where it is required (a TCP listener
//!   with `--tls-creds`), every option but STARTTLS and ABORT is answered
//!   NBD_REP_ERR_TLS_REQD until TLS is up, and NBD_OPT_EXPORT_NAME (which has no error
//!   reply) ends the connection. STARTTLS is answered NBD_REP_ACK, then the connection
//!   switches to TLS ([`Wire::start_tls`]) and the options go on inside it, from a
//!   clean state (nothing could be negotiated before); a second STARTTLS gets
//!   NBD_REP_ERR_INVALID.
//! - EXTENDED_HEADERS and every unknown option get NBD_REP_ERR_UNSUP.
//! - The meta-context selection (`base:allocation`, an export's dirty bitmap
//!   `qemu:dirty-bitmap:NAME` when [`Export::dirty_bitmap`] names one, or nothing) is
//!   remembered from the last NBD_OPT_SET_META_CONTEXT and needs structured replies.
//!   A dirty bitmap is selected for the export named in that SET; choosing another
//!   export afterwards drops it. Any other `qemu:dirty-bitmap:` name (or a query for an
//!   export without one) matches no context, which is not an error (the spec's rule
//!   for unknown contexts). LIST answers `qemu:` and `qemu:dirty-bitmap:` queries too.

use super::proto::{self, *};
use cowsnap_core::export::Export;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// One named export.
#[derive(Clone)]
pub struct ExportEntry {
    /// What it serves.
    pub export: Arc<dyn Export>,
    /// Shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// What negotiation needs of a server: its exports, by name and all of them. Passed
/// in, so that negotiation does not depend on the server that runs it.
pub trait ExportLookup {
    /// The export called `name`, if any.
    fn export(&self, name: &str) -> Option<ExportEntry>;
    /// All exports, by name.
    fn export_list(&self) -> Vec<(String, ExportEntry)>;
}

/// What the negotiation agreed on.
pub struct Session {
    /// The export chosen.
    pub entry: ExportEntry,
    /// Its name.
    pub name: String,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected.
    pub base_allocation: bool,
    /// The export's dirty bitmap selected (context id `DIRTY_BITMAP_ID`).
    pub dirty_bitmap: bool,
    /// Transmission flags sent.
    pub tflags: u16,
}

impl Session {
    /// Some meta context is selected (`base:allocation`, the dirty bitmap or both):
    /// BLOCK_STATUS is allowed (`proto::ExportView::meta_context_selected`).
    pub fn meta_context_selected(&self) -> bool {
        self.base_allocation || self.dirty_bitmap
    }
}

/// Why negotiation ended without a session.
#[derive(Debug)]
pub enum End {
    /// The client aborted or disconnected, or broke the protocol; close quietly.
    Closed(String),
    /// A socket error.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            End::Closed("client closed the connection during the handshake".into())
        } else {
            End::Io(e)
        }
    }
}

/// TLS on a connection, as negotiation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Not offered: STARTTLS gets NBD_REP_ERR_POLICY.
    Off,
    /// Required: only STARTTLS and ABORT are answered until TLS is up.
    Required,
    /// Up: the options travel inside TLS.
    Active,
}

/// The connection negotiation runs on.
pub trait Wire: Read + Write {
    /// Switch to TLS, right after the NBD_REP_ACK of NBD_OPT_STARTTLS was written:
    /// from then on reads and writes go through the TLS session.
    fn start_tls(&mut self) -> io::Result<()>;
}

fn reply(w: &mut impl Write, opt: u32, rtype: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&encode_option_reply(opt, rtype, data))
}

fn discard(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 8192];
    while n > 0 {
        let k = (n as usize).min(scratch.len());
        r.read_exact(&mut scratch[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Whether the queries of a LIST (`list`) or SET select the dirty bitmap `bitmap`.
fn dirty_hit(queries: &[Vec<u8>], list: bool, bitmap: &str) -> bool {
    let full = format!("{DIRTY_BITMAP_PREFIX}{bitmap}");
    if list && queries.is_empty() {
        return true;
    }
    queries.iter().any(|q| {
        q.as_slice() == full.as_bytes()
            || (list
                && (q.as_slice() == b"qemu:" || q.as_slice() == DIRTY_BITMAP_PREFIX.as_bytes()))
    })
}

fn lookup(server: &dyn ExportLookup, name: &[u8]) -> Option<(String, ExportEntry)> {
    let name = std::str::from_utf8(name).ok()?;
    server.export(name).map(|e| (name.to_string(), e))
}

/// Run the handshake on a fresh connection: client bytes from `rd`, replies to `wr`.
pub fn negotiate(
    server: &dyn ExportLookup,
    rd: &mut impl Read,
    wr: &mut impl Write,
) -> Result<Session, End> {
    negotiate_io(server, &mut Both { rd, wr }, Tls::Off)
}

/// A reader and a writer as one stream.
struct Both<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
}

impl<R: Read, W> Read for Both<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rd.read(buf)
    }
}

impl<R: Read, W: Write> Wire for Both<'_, R, W> {
    fn start_tls(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl<R, W: Write> Write for Both<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wr.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.wr.flush()
    }
}

/// Run the handshake on a fresh connection (`io`: the socket, buffered for reading;
/// `tls`: [`Tls::Off`] or [`Tls::Required`]).
pub(crate) fn negotiate_io(
    server: &dyn ExportLookup,
    io: &mut impl Wire,
    mut tls: Tls,
) -> Result<Session, End> {
    io.write_all(&greeting())?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !CLIENT_KNOWN != 0 {
        return Err(End::Closed(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    // the dirty bitmap selected, for the export named in the SET
    let mut dirty: Option<Vec<u8>> = None;
    loop {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        io.read_exact(&mut hb)?;
        let h = parse_option_header(&hb).map_err(|e| End::Closed(format!("option: {e}")))?;
        if h.len > MAX_OPTION_LEN {
            if h.len > MAX_OPTION_DISCARD || h.option == OPT_EXPORT_NAME {
                return Err(End::Closed(format!(
                    "option {} payload of {} bytes is too large",
                    h.option, h.len
                )));
            }
            discard(io, h.len as u64)?;
            reply(io, h.option, REP_ERR_TOO_BIG, b"option payload too large")?;
            continue;
        }
        let mut data = vec![0u8; h.len as usize];
        io.read_exact(&mut data)?;
        if tls == Tls::Required && !matches!(h.option, OPT_STARTTLS | OPT_ABORT) {
            if h.option == OPT_EXPORT_NAME {
                return Err(End::Closed(
                    "NBD_OPT_EXPORT_NAME without TLS, which this listener requires".into(),
                ));
            }
            reply(
                io,
                h.option,
                REP_ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match h.option {
            OPT_EXPORT_NAME => {
                let Some((name, entry)) = lookup(server, &data) else {
                    return Err(End::Closed(format!(
                        "unknown export {:?} in NBD_OPT_EXPORT_NAME",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let tflags = transmission_flags(&entry.export.caps(), structured);
                io.write_all(&export_name_reply(entry.export.size(), tflags, no_zeroes))?;
                let dirty_bitmap = dirty.as_deref() == Some(name.as_bytes());
                return Ok(Session {
                    entry,
                    name,
                    structured,
                    base_allocation,
                    dirty_bitmap,
                    tflags,
                });
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK does not matter.
                let _ = reply(io, h.option, REP_ACK, &[]);
                return Err(End::Closed("client sent NBD_OPT_ABORT".into()));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(io, h.option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for (name, e) in server.export_list() {
                    reply(
                        io,
                        h.option,
                        REP_SERVER,
                        &rep_server(name.as_bytes(), e.description.as_bytes()),
                    )?;
                }
                reply(io, h.option, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    reply(
                        io,
                        h.option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    )?;
                    continue;
                }
                match tls {
                    Tls::Off => reply(
                        io,
                        h.option,
                        REP_ERR_POLICY,
                        b"TLS is not configured on this server",
                    )?,
                    Tls::Active => reply(io, h.option, REP_ERR_INVALID, b"TLS is already active")?,
                    Tls::Required => {
                        reply(io, h.option, REP_ACK, &[])?;
                        io.flush()?;
                        io.start_tls()?;
                        tls = Tls::Active;
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        io,
                        h.option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    structured = true;
                    reply(io, h.option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(InvalidOption(why)) => {
                        reply(io, h.option, REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                let Some((name, entry)) = lookup(server, &req.name) else {
                    reply(io, h.option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let tflags = transmission_flags(&entry.export.caps(), structured);
                reply(
                    io,
                    h.option,
                    REP_INFO,
                    &info_export(entry.export.size(), tflags),
                )?;
                if req.infos.contains(&INFO_NAME) {
                    reply(
                        io,
                        h.option,
                        REP_INFO,
                        &info_string(INFO_NAME, name.as_bytes()),
                    )?;
                }
                if req.infos.contains(&INFO_DESCRIPTION) && !entry.description.is_empty() {
                    reply(
                        io,
                        h.option,
                        REP_INFO,
                        &info_string(INFO_DESCRIPTION, entry.description.as_bytes()),
                    )?;
                }
                reply(
                    io,
                    h.option,
                    REP_INFO,
                    &info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD),
                )?;
                reply(io, h.option, REP_ACK, &[])?;
                if h.option == OPT_GO {
                    let dirty_bitmap = dirty.as_deref() == Some(name.as_bytes());
                    return Ok(Session {
                        entry,
                        name,
                        structured,
                        base_allocation,
                        dirty_bitmap,
                        tflags,
                    });
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = h.option == OPT_LIST_META_CONTEXT;
                if !structured {
                    reply(
                        io,
                        h.option,
                        REP_ERR_INVALID,
                        b"meta contexts need structured replies first",
                    )?;
                    continue;
                }
                let req = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(InvalidOption(why)) => {
                        reply(io, h.option, REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                let Some((_, entry)) = lookup(server, &req.name) else {
                    reply(io, h.option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let hit = match_meta_queries(&req.queries, list);
                if hit {
                    reply(
                        io,
                        h.option,
                        REP_META_CONTEXT,
                        &rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    )?;
                }
                let bitmap = entry
                    .export
                    .dirty_bitmap()
                    .filter(|b| dirty_hit(&req.queries, list, b));
                if let Some(b) = &bitmap {
                    reply(
                        io,
                        h.option,
                        REP_META_CONTEXT,
                        &rep_meta_context(DIRTY_BITMAP_ID, &format!("{DIRTY_BITMAP_PREFIX}{b}")),
                    )?;
                }
                if !list {
                    base_allocation = hit;
                    dirty = bitmap.map(|_| req.name.clone());
                }
                reply(io, h.option, REP_ACK, &[])?;
            }
            other => {
                let msg = if other == proto::OPT_EXTENDED_HEADERS {
                    "extended headers are not supported".to_string()
                } else {
                    format!("option {other} is not supported")
                };
                reply(io, other, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}
