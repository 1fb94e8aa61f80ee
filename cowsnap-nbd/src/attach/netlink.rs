//! The kernel NBD client over generic netlink (family "nbd", see the kernel's
//! `include/uapi/linux/nbd-netlink.h`).
//!
//! `connect` resolves the family id with `CTRL_CMD_GETFAMILY`, then sends
//! `NBD_CMD_CONNECT` with the size, block size, server (transmission) flags, dead
//! connection timeout and the sockets, nested as
//! `NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD } ... }`. The kernel answers with a
//! message carrying `NBD_ATTR_INDEX` (the N of `/dev/nbdN`) and then an ACK.
//! `disconnect` sends `NBD_CMD_DISCONNECT` with the index.
//!
//! Several sockets make several connections (the server advertises `CAN_MULTI_CONN`:
//! one origin, so a flush on any connection covers the writes completed on all).
//! `reconfigure` (`NBD_CMD_RECONFIGURE` with `INDEX` and `SOCKETS`) hands a running
//! device new sockets: the kernel puts each in the place of a connection it has
//! marked dead (one whose server went away), and leaves live ones alone; the number of
//! connections is fixed at `connect`. While every connection is dead, each new request
//! waits up to the dead connection timeout for a reconnect, then fails with EIO;
//! requests that were in flight on a dead connection are sent again on a new one when
//! the block layer's timer next looks at them (every 30 s without a request timeout).
//!
//! No request timeout (`NBD_ATTR_TIMEOUT`) is set by default: while a backup runs,
//! writes may be held or throttled for longer than any fixed timeout, and the kernel
//! would fail them. Netlink headers and attributes are in host byte order.

use cowsnap_core::error::{Error, Result};
use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Generic netlink protocol number.
pub const NETLINK_GENERIC: i32 = 16;
/// `GENL_ID_CTRL`: the controller family.
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 4;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 1 << 15;

/// `NBD_GENL_FAMILY_NAME`.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const NBD_GENL_VERSION: u8 = 1;
/// `NBD_ATTR_INDEX` (u32).
pub const NBD_ATTR_INDEX: u16 = 1;
/// `NBD_ATTR_SIZE_BYTES` (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// `NBD_ATTR_TIMEOUT` (u64, seconds).
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// `NBD_ATTR_SERVER_FLAGS` (u64).
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_ATTR_CLIENT_FLAGS` (u64).
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// `NBD_ATTR_SOCKETS` (nested).
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64, seconds).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// `NBD_SOCK_ITEM` (nested).
pub const NBD_SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD` (u32).
pub const NBD_SOCK_FD: u16 = 1;
/// `NBD_CMD_CONNECT`.
pub const NBD_CMD_CONNECT: u8 = 1;
/// `NBD_CMD_DISCONNECT`.
pub const NBD_CMD_DISCONNECT: u8 = 2;
/// `NBD_CMD_RECONFIGURE`.
pub const NBD_CMD_RECONFIGURE: u8 = 3;

/// What `NBD_CMD_CONNECT` carries.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// `/dev/nbdN` to use; `None` lets the kernel pick (or create) one.
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// NBD transmission flags from the handshake.
    pub server_flags: u64,
    /// Request timeout in seconds (`None`: not sent).
    pub timeout: Option<u64>,
    /// How long the kernel waits for a reconnect after a connection dies, seconds.
    pub dead_conn_timeout: u64,
    /// Connected sockets, already in the transmission phase.
    pub fds: Vec<RawFd>,
}

/// Append one attribute, padded to 4 bytes.
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Append a nested attribute holding `inner` (already a sequence of attributes).
pub fn put_nested(buf: &mut Vec<u8>, ty: u16, inner: &[u8]) {
    put_attr(buf, ty | NLA_F_NESTED, inner);
}

/// A whole generic netlink message: nlmsghdr + genlmsghdr + attributes.
pub fn genl_message(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[u8],
) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    m.push(cmd);
    m.push(version);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(attrs);
    m
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn build_getfamily(seq: u32, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    put_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &n);
    genl_message(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1, &a)
}

/// `NBD_CMD_CONNECT`.
pub fn build_connect(family: u16, seq: u32, p: &ConnectParams) -> Vec<u8> {
    let mut a = Vec::new();
    if let Some(i) = p.index {
        put_attr(&mut a, NBD_ATTR_INDEX, &i.to_ne_bytes());
    }
    put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &p.size.to_ne_bytes());
    put_attr(
        &mut a,
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &p.block_size.to_ne_bytes(),
    );
    put_attr(&mut a, NBD_ATTR_SERVER_FLAGS, &p.server_flags.to_ne_bytes());
    if let Some(t) = p.timeout {
        put_attr(&mut a, NBD_ATTR_TIMEOUT, &t.to_ne_bytes());
    }
    put_attr(
        &mut a,
        NBD_ATTR_DEAD_CONN_TIMEOUT,
        &p.dead_conn_timeout.to_ne_bytes(),
    );
    put_sockets(&mut a, &p.fds);
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
        &a,
    )
}

/// `NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD } ... }`.
fn put_sockets(a: &mut Vec<u8>, fds: &[RawFd]) {
    let mut socks = Vec::new();
    for fd in fds {
        let mut item = Vec::new();
        put_attr(&mut item, NBD_SOCK_FD, &(*fd as u32).to_ne_bytes());
        put_nested(&mut socks, NBD_SOCK_ITEM, &item);
    }
    put_nested(a, NBD_ATTR_SOCKETS, &socks);
}

/// `NBD_CMD_RECONFIGURE` of `/dev/nbd<index>`: new sockets for its dead connections,
/// and the dead connection timeout again when `dead_conn_timeout` is given.
pub fn build_reconfigure(
    family: u16,
    seq: u32,
    index: u32,
    dead_conn_timeout: Option<u64>,
    fds: &[RawFd],
) -> Vec<u8> {
    let mut a = Vec::new();
    put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
    if let Some(t) = dead_conn_timeout {
        put_attr(&mut a, NBD_ATTR_DEAD_CONN_TIMEOUT, &t.to_ne_bytes());
    }
    put_sockets(&mut a, fds);
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_RECONFIGURE,
        NBD_GENL_VERSION,
        &a,
    )
}

/// `NBD_CMD_DISCONNECT` of `/dev/nbd<index>`.
pub fn build_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut a = Vec::new();
    put_attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
        &a,
    )
}

/// Attributes of one message: (type without flags, payload).
pub type Attrs = Vec<(u16, Vec<u8>)>;

/// One parsed netlink message.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// NLMSG_ERROR with 0: acknowledgement.
    Ack,
    /// NLMSG_ERROR with a negative errno.
    Error(i32),
    /// NLMSG_DONE.
    Done,
    /// A generic netlink message: its attributes (type without flags, payload).
    Genl(Vec<(u16, Vec<u8>)>),
}

fn bad(msg: &str) -> Error {
    cowsnap_core::err!(Corrupt, "unable to parse a netlink reply: {msg}")
}

/// Parse the attributes in `b`.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, Vec<u8>)>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return Err(bad("attribute length out of bounds"));
        }
        out.push((ty, b[4..len].to_vec()));
        let padded = (len + 3) & !3;
        b = &b[padded.min(b.len())..];
    }
    Ok(out)
}

/// Split a datagram into messages.
pub fn parse_messages(mut b: &[u8]) -> Result<Vec<Reply>> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return Err(bad("message length out of bounds"));
        }
        let body = &b[16..len];
        out.push(match ty {
            NLMSG_ERROR => {
                if body.len() < 4 {
                    return Err(bad("short error message"));
                }
                let e = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                if e == 0 {
                    Reply::Ack
                } else {
                    Reply::Error(-e)
                }
            }
            NLMSG_DONE => Reply::Done,
            _ => {
                if body.len() < 4 {
                    return Err(bad("short generic netlink message"));
                }
                Reply::Genl(parse_attrs(&body[4..])?)
            }
        });
        let padded = (len + 3) & !3;
        b = &b[padded.min(b.len())..];
    }
    Ok(out)
}

/// A generic netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Open and bind.
    pub fn open() -> Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(|e| Error::io("unable to open a generic netlink socket", e.into()))?;
        // Port id 0: the kernel assigns one; no multicast groups.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| Error::io("unable to bind a generic netlink socket", e.into()))?;
        Ok(GenlSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Send one message and collect replies until an ACK, an error or a DONE.
    pub fn request(&mut self, msg: &[u8], what: &str) -> Result<Vec<Attrs>> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty())
            .map_err(|e| Error::io(format!("unable to {what}"), e.into()))?;
        let mut genl = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| Error::io(format!("unable to {what}"), e.into()))?;
            let acked_only_on_request =
                msg.len() >= 8 && u16::from_ne_bytes([msg[6], msg[7]]) & NLM_F_ACK == 0;
            for m in parse_messages(&buf[..n])? {
                match m {
                    Reply::Ack | Reply::Done => return Ok(genl),
                    Reply::Error(e) => {
                        return Err(Error::io(
                            format!("unable to {what}"),
                            std::io::Error::from_raw_os_error(e),
                        ))
                    }
                    Reply::Genl(a) => {
                        genl.push(a);
                        if acked_only_on_request {
                            return Ok(genl);
                        }
                    }
                }
            }
        }
    }

    /// The id of generic netlink family `name`.
    pub fn family_id(&mut self, name: &str) -> Result<u16> {
        let seq = self.next_seq();
        let what = format!("resolve the generic netlink family {name:?} (is the module loaded?)");
        let replies = self.request(&build_getfamily(seq, name), &what)?;
        family_id_from(&replies).ok_or_else(|| {
            cowsnap_core::err!(NotFound, "unable to {what}: no family id in the reply")
        })
    }
}

/// CTRL_ATTR_FAMILY_ID from GETFAMILY replies.
pub fn family_id_from(replies: &[Attrs]) -> Option<u16> {
    replies.iter().flatten().find_map(|(t, p)| {
        (*t == CTRL_ATTR_FAMILY_ID && p.len() >= 2).then(|| u16::from_ne_bytes([p[0], p[1]]))
    })
}

/// NBD_ATTR_INDEX from CONNECT replies.
pub fn index_from(replies: &[Attrs]) -> Option<u32> {
    replies.iter().flatten().find_map(|(t, p)| {
        (*t == NBD_ATTR_INDEX && p.len() >= 4).then(|| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
    })
}

/// Configure a kernel NBD device; returns its index (`/dev/nbd<index>`).
pub fn connect(p: &ConnectParams) -> Result<u32> {
    let mut s = GenlSocket::open()?;
    let fam = s.family_id(NBD_GENL_FAMILY_NAME)?;
    let seq = s.next_seq();
    let replies = s.request(&build_connect(fam, seq, p), "connect the kernel NBD device")?;
    match (index_from(&replies), p.index) {
        (Some(i), _) => Ok(i),
        (None, Some(i)) => Ok(i),
        (None, None) => Err(cowsnap_core::err!(
            Corrupt,
            "unable to connect the kernel NBD device: the kernel did not say which index it used"
        )),
    }
}

/// Give the dead connections of `/dev/nbd<index>` new sockets (already in the
/// transmission phase). The kernel takes as many as it has dead connections; sockets
/// beyond that are not used (the caller closes them).
pub fn reconfigure(index: u32, dead_conn_timeout: Option<u64>, fds: &[RawFd]) -> Result<()> {
    let mut s = GenlSocket::open()?;
    let fam = s.family_id(NBD_GENL_FAMILY_NAME)?;
    let seq = s.next_seq();
    s.request(
        &build_reconfigure(fam, seq, index, dead_conn_timeout, fds),
        &format!("reconnect /dev/nbd{index}"),
    )?;
    Ok(())
}

/// Whether `/dev/nbd<index>` is configured (connected or waiting for a reconnect):
/// the kernel shows `/sys/block/nbdN/pid` from connect until the configuration is
/// released (disconnect, or the last connection and opener gone).
pub fn is_configured(index: u32) -> bool {
    std::path::Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// Disconnect `/dev/nbd<index>`.
pub fn disconnect(index: u32) -> Result<()> {
    let mut s = GenlSocket::open()?;
    let fam = s.family_id(NBD_GENL_FAMILY_NAME)?;
    let seq = s.next_seq();
    s.request(
        &build_disconnect(fam, seq, index),
        &format!("disconnect /dev/nbd{index}"),
    )?;
    Ok(())
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    #[test]
    fn getfamily_bytes() {
        let m = build_getfamily(7, "nbd");
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            28, 0, 0, 0,      // nlmsg_len = 16 + 4 + 8
            0x10, 0,          // GENL_ID_CTRL
            1, 0,             // NLM_F_REQUEST
            7, 0, 0, 0,       // seq
            0, 0, 0, 0,       // pid
            3, 1, 0, 0,       // CTRL_CMD_GETFAMILY, version 1
            8, 0, 2, 0,       // nla_len 8, CTRL_ATTR_FAMILY_NAME
            b'n', b'b', b'd', 0,
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn connect_bytes() {
        let p = ConnectParams {
            index: None,
            size: 1 << 30,
            block_size: 512,
            server_flags: 0x4d,
            timeout: None,
            dead_conn_timeout: 60,
            fds: vec![7],
        };
        let m = build_connect(0x1a, 2, &p);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            84, 0, 0, 0,          // 16 + 4 + 4*12 + 16
            0x1a, 0,              // family
            5, 0,                 // REQUEST | ACK
            2, 0, 0, 0,           // seq
            0, 0, 0, 0,
            1, 1, 0, 0,           // NBD_CMD_CONNECT, version 1
            12, 0, 2, 0,  0, 0, 0, 0x40, 0, 0, 0, 0,   // SIZE_BYTES = 1 GiB
            12, 0, 3, 0,  0, 2, 0, 0, 0, 0, 0, 0,      // BLOCK_SIZE_BYTES = 512
            12, 0, 5, 0,  0x4d, 0, 0, 0, 0, 0, 0, 0,   // SERVER_FLAGS
            12, 0, 8, 0,  60, 0, 0, 0, 0, 0, 0, 0,     // DEAD_CONN_TIMEOUT
            16, 0, 7, 0x80,       // SOCKETS | NLA_F_NESTED
            12, 0, 1, 0x80,       //   SOCK_ITEM | NLA_F_NESTED
            8, 0, 1, 0, 7, 0, 0, 0, //   SOCK_FD = 7
        ];
        assert_eq!(m, want);

        let p2 = ConnectParams {
            index: Some(3),
            timeout: Some(30),
            fds: vec![7, 9],
            ..p
        };
        let m = build_connect(0x1a, 3, &p2);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(&m[20..28], &[8, 0, 1, 0, 3, 0, 0, 0]); // INDEX first
                                                           // two socket items, 28 bytes of SOCKETS attribute in all
        assert_eq!(&m[m.len() - 28..m.len() - 24], &[28, 0, 7, 0x80]);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let types: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(types, vec![1, 2, 3, 5, 4, 8, 7]);
        let socks = parse_attrs(&attrs[6].1).unwrap();
        assert_eq!(socks.len(), 2);
        assert_eq!(
            parse_attrs(&socks[1].1).unwrap(),
            vec![(1, vec![9, 0, 0, 0])]
        );
    }

    #[test]
    fn reconfigure_bytes() {
        let m = build_reconfigure(0x1a, 5, 2, Some(90), &[11, 12]);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            68, 0, 0, 0,          // 16 + 4 + 8 + 12 + 28
            0x1a, 0,              // family
            5, 0,                 // REQUEST | ACK
            5, 0, 0, 0,           // seq
            0, 0, 0, 0,
            3, 1, 0, 0,           // NBD_CMD_RECONFIGURE, version 1
            8, 0, 1, 0,  2, 0, 0, 0,                   // INDEX = 2
            12, 0, 8, 0,  90, 0, 0, 0, 0, 0, 0, 0,     // DEAD_CONN_TIMEOUT = 90
            28, 0, 7, 0x80,       // SOCKETS | NLA_F_NESTED
            12, 0, 1, 0x80,       //   SOCK_ITEM | NLA_F_NESTED
            8, 0, 1, 0, 11, 0, 0, 0, //   SOCK_FD = 11
            12, 0, 1, 0x80,
            8, 0, 1, 0, 12, 0, 0, 0, //   SOCK_FD = 12
        ];
        assert_eq!(m, want);
        // without the timeout: only INDEX and SOCKETS
        let m = build_reconfigure(0x1a, 6, 0, None, &[3]);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let types: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(types, vec![NBD_ATTR_INDEX, NBD_ATTR_SOCKETS]);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
    }

    #[test]
    fn connect_with_four_sockets() {
        let p = ConnectParams {
            index: None,
            size: 4096,
            block_size: 4096,
            server_flags: 0x1,
            timeout: None,
            dead_conn_timeout: 60,
            fds: vec![20, 21, 22, 23],
        };
        let m = build_connect(0x1a, 9, &p);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let (_, socks) = attrs.iter().find(|a| a.0 == NBD_ATTR_SOCKETS).unwrap();
        let items = parse_attrs(socks).unwrap();
        let fds: Vec<u32> = items
            .iter()
            .map(|(t, p)| {
                assert_eq!(*t, NBD_SOCK_ITEM);
                let inner = parse_attrs(p).unwrap();
                assert_eq!(inner.len(), 1);
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1[..4].try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![20, 21, 22, 23]);
    }

    #[test]
    fn disconnect_bytes() {
        let m = build_disconnect(0x1a, 4, 5);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            28, 0, 0, 0, 0x1a, 0, 5, 0, 4, 0, 0, 0, 0, 0, 0, 0,
            2, 1, 0, 0,
            8, 0, 1, 0, 5, 0, 0, 0,
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn parses_replies() {
        // a genl reply with NBD_ATTR_INDEX = 2, then an ACK, in one datagram
        let mut d = Vec::new();
        let mut a = Vec::new();
        put_attr(&mut a, NBD_ATTR_INDEX, &2u32.to_ne_bytes());
        d.extend(genl_message(0x1a, 0, 2, NBD_CMD_CONNECT, 1, &a));
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&0i32.to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        d.extend(&err);
        let msgs = parse_messages(&d).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1], Reply::Ack);
        let Reply::Genl(g) = &msgs[0] else { panic!() };
        assert_eq!(index_from(std::slice::from_ref(g)), Some(2));

        let mut e = err.clone();
        e[16..20].copy_from_slice(&(-libc::EBUSY).to_ne_bytes());
        assert_eq!(parse_messages(&e).unwrap(), vec![Reply::Error(libc::EBUSY)]);

        let mut f = Vec::new();
        put_attr(&mut f, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        put_attr(&mut f, CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes());
        let fm = genl_message(GENL_ID_CTRL, 0, 1, 1, 2, &f);
        let Reply::Genl(g) = &parse_messages(&fm).unwrap()[0] else {
            panic!()
        };
        assert_eq!(family_id_from(std::slice::from_ref(g)), Some(0x1a));

        // garbage never panics
        assert!(parse_messages(&[0xff; 20]).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        assert!(parse_messages(&[1, 2, 3]).unwrap().is_empty());
    }

    #[test]
    fn socket_opens_without_module() {
        // The generic netlink socket works on any Linux; the nbd family may be absent.
        let mut s = GenlSocket::open().unwrap();
        let ctrl = s.family_id("nlctrl").unwrap();
        assert_eq!(ctrl, GENL_ID_CTRL);
        if !std::path::Path::new("/sys/module/nbd").exists() {
            let e = s.family_id("nbd").unwrap_err();
            assert!(e.to_string().contains("nbd"), "{e}");
        }
    }
}
