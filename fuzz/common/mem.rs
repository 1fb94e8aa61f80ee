// A memory export for the NBD targets. Every call checks the contract the protocol
// edge promises an export: ranges inside the disk, nothing data-changing on a
// read-only export. A broken promise panics, which the fuzzer reports.

use cowsnap_core::export::{Export, ExportCaps, Extent, ZeroFlags};
use std::sync::{Arc, Mutex};

pub struct Mem {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Mem {
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Mem {
            data: Mutex::new(vec![0; size]),
            read_only,
        })
    }
    fn range(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let size = self.size();
        let end = off.checked_add(len).expect("range overflows");
        assert!(end <= size, "range {off}+{len} past the end ({size})");
        off as usize..end as usize
    }
    fn writable(&self) {
        assert!(
            !self.read_only,
            "data-changing request reached a read-only export"
        );
    }
}

impl Export for Mem {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn caps(&self) -> ExportCaps {
        ExportCaps {
            read_only: self.read_only,
            trim: true,
            zeroes: true,
            fast_zero: true,
            multi_conn: true,
        }
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> cowsnap_core::Result<()> {
        let r = self.range(off, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8], _fua: bool) -> cowsnap_core::Result<()> {
        self.writable();
        let r = self.range(off, data.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> cowsnap_core::Result<()> {
        Ok(())
    }
    fn trim(&self, off: u64, len: u64, _fua: bool) -> cowsnap_core::Result<()> {
        self.writable();
        let r = self.range(off, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn zero(&self, off: u64, len: u64, _f: ZeroFlags) -> cowsnap_core::Result<()> {
        self.writable();
        let r = self.range(off, len);
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn block_status(&self, off: u64, len: u64) -> cowsnap_core::Result<Vec<Extent>> {
        let r = self.range(off, len);
        // 4 KiB blocks, data or zero, none past the request.
        let d = self.data.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = r.start;
        while pos < r.end {
            let end = ((pos / 4096 + 1) * 4096).min(r.end);
            let zero = d[pos..end].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(e) if e.zero == zero => e.len += (end - pos) as u64,
                _ => out.push(Extent {
                    len: (end - pos) as u64,
                    hole: zero,
                    zero,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

/// A server with a writable export "disk" (also the default export "") and a
/// read-only one "ro"; one worker per connection.
pub fn server() -> Arc<cowsnap_nbd::nbd::server::Server> {
    let s = cowsnap_nbd::nbd::server::Server::new();
    let disk = Mem::new(MEM_SIZE, false);
    s.set_export("disk", disk.clone(), "a fuzzed disk");
    s.set_export("", disk, "");
    s.set_export("ro", Mem::new(MEM_SIZE, true), "read-only");
    s.set_threads_per_connection(1);
    s
}

/// Export size: small, and not a multiple of 4096 (a short last block).
pub const MEM_SIZE: usize = 64 * 1024 + 1000;
