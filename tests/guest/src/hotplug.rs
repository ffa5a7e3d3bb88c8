//! PCI hot-plug as the DSDT's AML does it, without an AML interpreter: the
//! registers ACPI names `PCST` (see `baton_test_guest::acpi::aml`) say which
//! slots of bus 0 gained a device (`PCIU`) and which the VMM wants back
//! (`PCID`); writing a slot's bit to `B0EJ` ejects it, as the slot's `_EJ0`
//! method would.

use crate::phys::IdentityMap;

const PCIU: u64 = 0;
const PCID: u64 = 4;
const B0EJ: u64 = 8;
const LEN: usize = 16;

/// The hot-plug register block.
pub struct HotplugRegs {
    addr: u64,
}

impl HotplugRegs {
    /// The block at `addr`; `None` if the guest may not access it.
    pub fn new(addr: u64, mem: &IdentityMap) -> Option<Self> {
        (addr % 4 == 0 && mem.may_access(addr, LEN)).then_some(Self { addr })
    }

    fn read(&self, offset: u64) -> u32 {
        let ptr = (self.addr + offset) as usize as *const u32;
        // SAFETY: `new` checked that the block is below 4 GiB (identity-mapped,
        // so the load cannot fault), aligned, not at address 0 and outside the
        // guest image (no Rust object is there); a volatile 32-bit load is how
        // the register is read.
        unsafe { core::ptr::read_volatile(ptr) }
    }

    /// `(arrived, to remove)`: slot bitmaps, cleared by the read.
    pub fn take(&self) -> (u32, u32) {
        (self.read(PCIU), self.read(PCID))
    }

    /// Ejects the device in `slot`.
    pub fn eject(&self, slot: u8) {
        let ptr = (self.addr + B0EJ) as usize as *mut u32;
        // SAFETY: as in `read`; a volatile 32-bit store is how the register is
        // written, and it touches no memory this program uses.
        unsafe { core::ptr::write_volatile(ptr, 1u32 << (slot & 31)) }
    }
}
