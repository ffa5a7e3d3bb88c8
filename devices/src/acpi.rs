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
