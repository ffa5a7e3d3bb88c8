//! ACPI PCI hot-plug: the registers through which the DSDT's AML learns which slots changed
//! and ejects a device the guest has let go of.
//!
//! The VMM marks a slot in `PCIU` (a device arrived) or `PCID` (the VMM asks for its
//! removal) and raises the GED's [`crate::acpi::GED_EVENT_PCI_HOTPLUG`] event. The GED's
//! `_EVT` method reads both (a read clears them) and notifies each marked slot's ACPI device:
//! "device check" for an arrival, "eject request" for a removal. The guest's hot-plug driver
//! (Linux's acpiphp) scans the slot, or stops the device's driver and runs the slot's `_EJ0`,
//! which writes the slot's bit to `B0EJ`: then the function leaves the PCI bus at once and the
//! VMM is told (an eventfd) to release the device and its backend.
//!
//! Four little-endian 32-bit registers, one bit per slot of bus 0:
//!
//! | offset | name   | read                          | write                |
//! |--------|--------|-------------------------------|----------------------|
//! | 0      | `PCIU` | slots that arrived; clears    | ignored              |
//! | 4      | `PCID` | slots to remove; clears       | ignored              |
//! | 8      | `B0EJ` | 0                             | ejects the set slots |
//! | 12     | `PSEG` | selected PCI segment (only 0) | ignored              |

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{PciBus, PciDevice};
use crate::BusDevice;

/// Offset of the register of slots that arrived.
pub const PCIU_OFFSET: u64 = 0;
/// Offset of the register of slots whose removal the VMM asks for.
pub const PCID_OFFSET: u64 = 4;
/// Offset of the eject register.
pub const B0EJ_OFFSET: u64 = 8;
/// Offset of the segment selector.
pub const PSEG_OFFSET: u64 = 12;
/// Length of the register block.
pub const HOTPLUG_LEN: u64 = 16;

/// The hot-plug register block of PCI segment 0.
pub struct PciHotplug {
    up: u32,
    down: u32,
    bus: Arc<Mutex<PciBus>>,
    ejected: Vec<Ejected>,
    eject_evt: EventFd,
}

/// A function the guest ejected, and the slot it was in: the function itself names the
/// device, since its slot may be taken again before the VMM looks.
pub type Ejected = (u8, Arc<Mutex<dyn PciDevice>>);

/// Slots with news the guest has not read: `(up, down)` bitmaps (saved with the VM).
pub type Pending = (u32, u32);

impl PciHotplug {
    /// Registers for `bus`, with `pending` news; `eject_evt` is signalled when the guest ejects.
    pub fn new(bus: Arc<Mutex<PciBus>>, eject_evt: EventFd, pending: Pending) -> Self {
        PciHotplug {
            up: pending.0,
            down: pending.1,
            bus,
            ejected: Vec::new(),
            eject_evt,
        }
    }

    /// News the guest has not read yet.
    pub fn pending(&self) -> Pending {
        (self.up, self.down)
    }

    /// Marks `slot` as arrived (the caller then raises the GED event).
    pub fn arrived(&mut self, slot: u8) {
        self.up |= bit(slot);
        self.down &= !bit(slot);
    }

    /// Asks the guest to let go of the device in `slot` (the caller then raises the GED
    /// event).
    pub fn request_removal(&mut self, slot: u8) {
        self.down |= bit(slot);
        self.up &= !bit(slot);
    }

    /// Functions the guest ejected since the last call: they are off the bus already.
    pub fn take_ejected(&mut self) -> Vec<Ejected> {
        std::mem::take(&mut self.ejected)
    }

    fn eject(&mut self, slots: u32) {
        let mut bus = self.bus.lock().expect("PCI lock poisoned");
        for slot in 1..32u8 {
            if slots & bit(slot) == 0 {
                continue;
            }
            if let Some(function) = bus.remove(slot) {
                self.down &= !bit(slot);
                self.ejected.push((slot, function));
            }
        }
        drop(bus);
        if !self.ejected.is_empty() {
            if let Err(e) = self.eject_evt.write(1) {
                log::error!("PCI hot-plug: cannot report an ejected device: {e}");
            }
        }
    }
}

fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            PCIU_OFFSET => std::mem::take(&mut self.up),
            PCID_OFFSET => std::mem::take(&mut self.down),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != B0EJ_OFFSET {
            return;
        }
        let mut bytes = [0u8; 4];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        self.eject(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::tests::function;
    use crate::Bus;

    fn read32(h: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        h.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn news_read_once_and_eject_takes_the_function_off_the_bus() {
        let mmio = Arc::new(Bus::new());
        let bus = Arc::new(Mutex::new(PciBus::new(mmio.clone())));
        let (f, bar) = function(0xc000_0000, 0x5a);
        let slot = bus
            .lock()
            .unwrap()
            .add(f.clone(), f.clone(), bar, None)
            .unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut h = PciHotplug::new(bus.clone(), evt.try_clone().unwrap(), (0, 0));

        h.arrived(slot);
        assert_eq!(h.pending(), (1 << slot, 0));
        assert_eq!(read32(&mut h, PCIU_OFFSET), 1 << slot);
        assert_eq!(read32(&mut h, PCIU_OFFSET), 0, "a read clears");

        h.request_removal(slot);
        assert_eq!(read32(&mut h, PCID_OFFSET), 1 << slot);
        // An eject of an empty slot, or of the host bridge, does nothing.
        h.write(B0EJ_OFFSET, &(1u32 << 7 | 1).to_le_bytes());
        assert!(h.take_ejected().is_empty());
        assert!(evt.read().is_err(), "nothing to report");

        h.write(B0EJ_OFFSET, &(1u32 << slot).to_le_bytes());
        let ejected = h.take_ejected();
        assert_eq!(ejected.len(), 1);
        assert_eq!(ejected[0].0, slot);
        assert!(
            std::ptr::addr_eq(Arc::as_ptr(&ejected[0].1), Arc::as_ptr(&f)),
            "the ejected function itself comes back"
        );
        assert_eq!(evt.read().unwrap(), 1);
        let mut byte = [0u8; 1];
        assert!(!mmio.read(0xc000_0000, &mut byte), "its BAR is gone");
        assert!(h.take_ejected().is_empty());
        assert_eq!(read32(&mut h, PSEG_OFFSET), 0);
    }
}
