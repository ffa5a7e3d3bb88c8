//! Interrupt mode: virtio devices signal through MSI-X instead of being polled.
//!
//! The guest enables its local APIC, points the device's first MSI-X table entry at
//! itself with vector 48, enables MSI-X, and gives every queue that entry. The CPL0
//! handler (in the entry stub) counts each interrupt and ends it; the main loop then looks
//! at the rings only when the count moved, and every 10 ms for smoltcp's timers.

use core::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::transport::pci::bus::{BarInfo, ConfigurationAccess, DeviceFunction, PciRoot};

/// The vector virtio MSI-X messages carry (the entry stub's MSI_VECTOR).
pub const VECTOR: u32 = 48;
const LAPIC: usize = crate::lapic::BASE;
const CAP_MSIX: u8 = 0x11;
const CAP_VENDOR: u8 = 0x09;
const VIRTIO_COMMON_CFG: u8 = 1;

extern "C" {
    /// Incremented by the entry stub's MSI handler.
    static msi_count: AtomicU64;
}

/// Interrupts taken so far.
pub fn count() -> u64 {
    // SAFETY: the entry stub defines `msi_count` as an aligned quadword that only its
    // handler changes, with a locked increment.
    unsafe { msi_count.load(Ordering::Acquire) }
}

/// Enables the local APIC and interrupts at CPL3 (IOPL 3 allows `sti` there).
pub fn enable() {
    crate::lapic::enable();
    // SAFETY: `sti` only sets IF (through the entry stub's #GP handler where the
    // hypervisor ignores IOPL); the MSI handler it lets in touches only `msi_count` and
    // the APIC.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) }
}

/// A device's virtio common configuration, once its MSI-X entry 0 is set up.
pub struct Msix {
    common: *mut u8,
}

/// Finds the MSI-X table and the virtio common configuration of `df`, points table entry 0
/// at this CPU with [`VECTOR`], and enables MSI-X.
pub fn setup<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    cam: &mut C,
    df: DeviceFunction,
) -> Option<Msix> {
    let mut table = None;
    let mut common = None;
    let mut control_at = None;
    for cap in root.capabilities(df) {
        match cap.id {
            CAP_MSIX => {
                let bir_offset = cam.read_word(df, cap.offset + 4);
                table = Some((bir_offset & 7, bir_offset & !7));
                control_at = Some(cap.offset);
            }
            CAP_VENDOR if (cap.private_header >> 8) as u8 == VIRTIO_COMMON_CFG => {
                let bar = cam.read_word(df, cap.offset + 4) & 0xff;
                let offset = cam.read_word(df, cap.offset + 8);
                common = Some((bar, offset));
            }
            _ => {}
        }
    }
    let mut bar = |index: u32| match root.bar_info(df, index as u8).ok().flatten()? {
        BarInfo::Memory { address, size, .. } if address != 0 => {
            crate::paging::map_mmio(address, size).ok()?;
            Some(address as usize)
        }
        _ => None,
    };
    let (tbar, toffset) = table?;
    let (cbar, coffset) = common?;
    let table = (bar(tbar)? + toffset as usize) as *mut u32;
    let common = (bar(cbar)? + coffset as usize) as *mut u8;
    // SAFETY: the table lies in the device's memory BAR, identity-mapped (uncached, by the
    // entry stub or `map_mmio` above);
    // entry 0 is address low, address high, data, vector control.
    unsafe {
        table.write_volatile(LAPIC as u32);
        table.add(1).write_volatile(0);
        table.add(2).write_volatile(VECTOR);
        table.add(3).write_volatile(0);
    }
    let control_at = control_at?;
    let dword = cam.read_word(df, control_at);
    cam.write_word(df, control_at, dword | 1 << 31);
    Some(Msix { common })
}

impl Msix {
    /// Gives queue `queue` MSI-X entry 0; false if the device refused.
    pub fn assign_queue(&self, queue: u16) -> bool {
        // SAFETY: the common configuration lies in the device's BAR, identity-mapped;
        // queue_select is the u16 at 22 and queue_msix_vector the u16 at 26.
        unsafe {
            self.common.add(22).cast::<u16>().write_volatile(queue);
            let vector = self.common.add(26).cast::<u16>();
            vector.write_volatile(0);
            vector.read_volatile() == 0
        }
    }
}
