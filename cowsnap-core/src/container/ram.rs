//! `ram:SIZE`: slots in memory, each allocated on first use and kept for reuse, so an
//! idle backup costs no memory and a busy one at most SIZE.

use super::{check_slot, Container, SlotIdx};
use crate::error::Result;
use std::sync::{Mutex, PoisonError};

/// Slots in RAM.
pub struct RamContainer {
    slot_size: u32,
    slots: Vec<Mutex<Vec<u8>>>,
    size: u64,
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
        let n = usize::try_from(n).map_err(|_| {
            crate::err!(
                InvalidInput,
                "unable to create container ram:{size}: too large"
            )
        })?;
        Ok(RamContainer {
            slot_size,
            slots: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            size,
        })
    }
}

impl Container for RamContainer {
    fn slot_size(&self) -> u32 {
        self.slot_size
    }
    fn slots(&self) -> u64 {
        self.slots.len() as u64
    }
    fn write_slot(&self, slot: SlotIdx, data: &[u8]) -> Result<()> {
        check_slot(self, slot, data.len())?;
        let mut s = self.slots[slot.0 as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.len() != self.slot_size as usize {
            s.resize(self.slot_size as usize, 0);
        }
        s[..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read_slot(&self, slot: SlotIdx, buf: &mut [u8]) -> Result<()> {
        check_slot(self, slot, buf.len())?;
        let s = self.slots[slot.0 as usize]
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
}
