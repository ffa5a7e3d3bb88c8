//! The hardware-reduced ACPI power registers: sleep control, sleep status and reset.
//!
//! The FADT points the guest at these ports (see the VMM's ACPI tables). Writing SLP_EN with
//! SLP_TYP 5 (S5, soft off) powers the VM off; writing [`RESET_VALUE`] to the reset register
//! reboots it. Both are reported on eventfds the VMM's control loop watches.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Offset of the sleep control register in the device's range.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// Length of the device's port range.
pub const PORT_LEN: u64 = 3;
/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of the S5 (soft off) state, also named by the DSDT's `_S5_` object.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;

/// The sleep/reset register block.
pub struct AcpiPm {
    exit_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPm {
    /// A block signalling `exit_evt` on power-off and `reset_evt` on reset.
    pub fn new(exit_evt: EventFd, reset_evt: EventFd) -> Self {
        AcpiPm {
            exit_evt,
            reset_evt,
        }
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            log::error!("ACPI: cannot signal {what}: {e}");
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 => {
                let sleep_type = (value >> 2) & 0x7;
                if sleep_type == S5_SLEEP_TYPE {
                    Self::signal(&self.exit_evt, "power-off");
                } else {
                    log::warn!("ACPI: guest asked for unsupported sleep state {sleep_type}");
                }
            }
            RESET_OFFSET if value == RESET_VALUE => Self::signal(&self.reset_evt, "reset"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_and_reset() {
        let exit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(exit.try_clone().unwrap(), reset.try_clone().unwrap());
        // S3 (sleep type 3) is not supported and must not power off.
        pm.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert!(exit.read().is_err());
        // SLP_TYP without SLP_EN does nothing.
        pm.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]);
        assert!(exit.read().is_err());
        pm.write(SLEEP_CONTROL_OFFSET, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.read().unwrap(), 1);
        pm.write(RESET_OFFSET, &[0x06]);
        assert!(reset.read().is_err());
        pm.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}

/// Event bit of the power button in the GED's event register.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Event bit of PCI hot-plug: slots changed (see [`crate::pci::hotplug`]).
pub const GED_EVENT_PCI_HOTPLUG: u8 = 1 << 1;
/// Length of the GED's MMIO register window.
pub const GED_LEN: u64 = 0x10;

/// A hardware-reduced ACPI Generic Event Device: the VMM records events and raises the GED
/// interrupt; the guest (the DSDT's `_EVT` method, or a polling guest) reads the event byte,
/// which clears it.
pub struct Ged {
    pending: u8,
    irq: crate::Trigger,
}

impl Ged {
    /// A GED raising `irq`.
    pub fn new(irq: crate::Trigger) -> Self {
        Ged { pending: 0, irq }
    }

    /// A GED with `pending` events not yet read by the guest (from a snapshot).
    pub fn with_pending(irq: crate::Trigger, pending: u8) -> Self {
        Ged { pending, irq }
    }

    /// Events not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// Records `event` and interrupts the guest.
    pub fn notify(&mut self, event: u8) -> std::io::Result<()> {
        self.pending |= event;
        vm_superio::Trigger::trigger(&self.irq)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod ged_tests {
    use super::*;

    #[test]
    fn event_is_read_once_and_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(crate::Trigger::new(irq.try_clone().unwrap()));
        let mut b = [0u8; 1];
        ged.read(0, &mut b);
        assert_eq!(b[0], 0);
        ged.notify(GED_EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        ged.read(0, &mut b);
        assert_eq!(b[0], GED_EVENT_POWER_BUTTON);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "read clears");
    }
}
