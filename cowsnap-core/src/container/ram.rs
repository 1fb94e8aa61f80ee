//! `ram:SIZE`: slots in memory, each allocated on first use and kept for reuse, so an
//! idle backup costs no memory and a busy one at most SIZE.
//!
//! The slot table itself grows with use too (the slot pool hands out the lowest
//! slots first), so a large container costs nothing until it fills. Every allocation
//! is fallible: running out of memory fails the write of the slot (which drops the
//! snapshot, never the daemon).

use super::{check_slot, Container, SlotIdx};
use crate::error::{Error, Result};
use std::sync::{Mutex, PoisonError, RwLock};

/// Slots in RAM.
pub struct RamContainer {
    slot_size: u32,
    slots: u64,
    table: RwLock<Vec<Mutex<Vec<u8>>>>,
    size: u64,
}

fn no_memory(what: String) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(libc::ENOMEM))
}

impl RamContainer {
    /// A container of `size` bytes (rounded down to whole slots).
    pub fn new(size: u64, slot_size: u32) -> Result<Self> {
        let n = size / u64::from(slot_size.max(1));
        if n == 0 {
            return Err(crate::err!(
                InvalidInput,
                "unable to create container ram:{size}: smaller than one {slot_size}-byte slot"
            ));
        }
        if usize::try_from(n).is_err() {
            return Err(crate::err!(
                InvalidInput,
                "unable to create container ram:{size}: too large"
            ));
        }
        Ok(RamContainer {
            slot_size,
            slots: n,
            table: RwLock::new(Vec::new()),
            size,
        })
    }

    /// Grow the slot table to hold `slot` (doubling, at most the capacity).
    fn grow(&self, slot: SlotIdx) -> Result<()> {
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let need = slot.0 as usize + 1; // slot < slots, which fits usize
        if t.len() >= need {
            return Ok(());
        }
        let want = (t.len() * 2).max(need).max(64).min(self.slots as usize);
        let have = t.len();
        t.try_reserve_exact(want - have).map_err(|_| {
            no_memory(format!(
                "unable to grow the slot table of container ram:{} to {want} slots",
                self.size
            ))
        })?;
        t.resize_with(want, || Mutex::new(Vec::new()));
        Ok(())
    }

    /// Slots in the table now (for tests).
    #[cfg(test)]
    fn table_len(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Container for RamContainer {
    fn slot_size(&self) -> u32 {
        self.slot_size
    }
    fn slots(&self) -> u64 {
        self.slots
    }
    fn write_slot(&self, slot: SlotIdx, data: &[u8]) -> Result<()> {
        check_slot(self, slot, data.len())?;
        loop {
            let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
            let Some(m) = t.get(slot.0 as usize) else {
                drop(t);
                self.grow(slot)?;
                continue;
            };
            let mut s = m.lock().unwrap_or_else(PoisonError::into_inner);
            let ss = self.slot_size as usize;
            if s.len() != ss {
                let have = s.len();
                s.try_reserve_exact(ss.saturating_sub(have)).map_err(|_| {
                    no_memory(format!(
                        "unable to allocate {slot} of container ram:{}",
                        self.size
                    ))
                })?;
                s.resize(ss, 0);
            }
            s[..data.len()].copy_from_slice(data);
            return Ok(());
        }
    }
    fn read_slot(&self, slot: SlotIdx, buf: &mut [u8]) -> Result<()> {
        check_slot(self, slot, buf.len())?;
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let empty = Mutex::new(Vec::new());
        let s = t
            .get(slot.0 as usize)
            .unwrap_or(&empty)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.len() < buf.len() {
            return Err(crate::err!(
                NotFound,
                "unable to read container ram:{}: {slot} was never written",
                self.size
            ));
        }
        buf.copy_from_slice(&s[..buf.len()]);
        Ok(())
    }
    fn describe(&self) -> String {
        format!("ram:{}", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance_ram() {
        let c = RamContainer::new(4 * 65536 + 100, 65536).unwrap();
        assert_eq!(c.slots(), 4);
        super::super::conformance::run(&c);
    }

    #[test]
    fn slot_table_grows_with_use() {
        // 4 TiB of 64 KiB slots: 64 Mi slots, none allocated up front
        let c = RamContainer::new(4 << 40, 65536).unwrap();
        assert_eq!(c.slots(), 64 << 20);
        assert_eq!(c.table_len(), 0);
        c.write_slot(SlotIdx(0), &[7u8; 100]).unwrap();
        assert_eq!(c.table_len(), 64);
        c.write_slot(SlotIdx(100), &[8u8; 100]).unwrap();
        assert_eq!(c.table_len(), 128);
        let mut b = [0u8; 100];
        c.read_slot(SlotIdx(100), &mut b).unwrap();
        assert_eq!(b, [8u8; 100]);
        assert!(c.read_slot(SlotIdx(5000), &mut b).is_err(), "never written");
    }
}
