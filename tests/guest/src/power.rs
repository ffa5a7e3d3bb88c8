//! Powering off and resetting, by the register writes the ACPI module chose,
//! and the events of the GED (power button, PCI hot-plug), in the event
//! register the ACPI module found.

use baton_test_guest::acpi::{self, Fadt, RegWrite};

use crate::io::{outb, outl, outw};
use crate::phys::IdentityMap;
use crate::time::Clock;

/// How long the machine gets to go away before the guest reports failure.
const GRACE_MS: u64 = 1000;
/// Pause between reset methods, so the first one that works is the one used.
const RESET_STEP_MS: u64 = 100;

/// Enters ACPI S5. Returns (after a grace period) only if the machine is still on.
pub fn poweroff(fadt: Option<&Fadt>, mem: &IdentityMap, clock: &Clock) {
    if let Some(fadt) = fadt {
        for write in fadt.poweroff_writes().into_iter().flatten() {
            execute(write, mem);
        }
    }
    clock.delay_ms(GRACE_MS);
}

/// Resets the machine. Returns (after a grace period) only if it did not reset.
pub fn reboot(fadt: Option<&Fadt>, mem: &IdentityMap, clock: &Clock) {
    for write in acpi::reset_writes(fadt).into_iter().flatten() {
        execute(write, mem);
        clock.delay_ms(RESET_STEP_MS);
    }
    clock.delay_ms(GRACE_MS);
}

/// The Generic Event Device's event register: one read-to-clear byte of MMIO.
pub struct GedEvents {
    addr: u64,
}

impl GedEvents {
    /// The register at `addr`; `None` if the guest may not access that byte.
    pub fn new(addr: u64, mem: &IdentityMap) -> Option<Self> {
        mem.may_access(addr, 1).then_some(Self { addr })
    }

    /// Reads the pending events, which clears them (a VM exit, so not too
    /// often): `acpi::GED_EVENT_*` bits.
    pub fn take(&self) -> u8 {
        let ptr = self.addr as usize as *const u8;
        // SAFETY: `new` checked that the byte is below 4 GiB (identity-mapped,
        // so the load cannot fault), not address 0 and outside the guest image
        // (no Rust object is there); a volatile load of one byte is how a
        // device register is read, and reading it has no effect on memory
        // this program uses.
        unsafe { core::ptr::read_volatile(ptr) }
    }
}

fn execute(write: RegWrite, mem: &IdentityMap) {
    match write {
        RegWrite::Io { port, bytes, value } => match bytes {
            1 => outb(port, value as u8),
            2 => outw(port, value as u16),
            _ => outl(port, value as u32),
        },
        RegWrite::Memory { addr, bytes, value } => {
            let len = usize::from(bytes);
            if !len.is_power_of_two() || addr % u64::from(bytes) != 0 || !mem.may_access(addr, len)
            {
                return;
            }
            let ptr = addr as usize;
            // SAFETY: the register is below 4 GiB (identity-mapped, so the
            // store cannot fault), outside the guest image (no Rust object is
            // there) and naturally aligned; a volatile store of its width is
            // how device registers are written.
            unsafe {
                match bytes {
                    1 => core::ptr::write_volatile(ptr as *mut u8, value as u8),
                    2 => core::ptr::write_volatile(ptr as *mut u16, value as u16),
                    4 => core::ptr::write_volatile(ptr as *mut u32, value as u32),
                    _ => core::ptr::write_volatile(ptr as *mut u64, value),
                }
            }
        }
    }
}
