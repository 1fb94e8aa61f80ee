//! A connected client socket (unix or TCP), with the few operations the server needs.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

/// A client connection.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain socket.
    Unix(UnixStream),
    /// TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shut down one or both directions (wakes a thread blocked in `read`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// Read timeout (applies to every handle on the socket).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Write timeout (applies to every handle on the socket).
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Ask for a larger send buffer (a 1 MiB read reply then leaves in fewer
    /// round trips with the client). Best effort: the kernel caps it at wmem_max.
    pub fn set_send_buffer(&self, bytes: usize) {
        use nix::sys::socket::{setsockopt, sockopt::SndBuf};
        let v = bytes.min(i32::MAX as usize);
        let _ = match self {
            Stream::Unix(s) => setsockopt(s, SndBuf, &v),
            Stream::Tcp(s) => setsockopt(s, SndBuf, &v),
        };
    }

    /// Write `head` then `data` with as few syscalls as possible (writev).
    pub fn write_two(&mut self, head: &[u8], data: &[u8]) -> io::Result<()> {
        let (mut h, mut d) = (0usize, 0usize);
        while h < head.len() {
            let n = if d < data.len() {
                self.write_vectored(&[IoSlice::new(&head[h..]), IoSlice::new(&data[d..])])
            } else {
                self.write(&head[h..])
            };
            match n {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let from_head = n.min(head.len() - h);
                    h += from_head;
                    d += n - from_head;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.write_all(&data[d..])
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_two_delivers_both_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut a = Stream::Unix(a);
        let head = vec![1u8; 20];
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let mut got = vec![0u8; 20 + d2.len()];
            b.read_exact(&mut got).unwrap();
            got
        });
        a.write_two(&head, &data).unwrap();
        let got = t.join().unwrap();
        assert_eq!(&got[..20], &head[..]);
        assert_eq!(&got[20..], &data[..]);
    }
}
