//! Just enough of the i8042 keyboard controller for the guest to reset the machine: the
//! "pulse reset line" command (0xFE at port 0x64), which Linux tries on reboot.

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

const CMD_RESET: u8 = 0xfe;

/// The i8042 at ports 0x60-0x64 (placed with base 0x60, length 5).
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data waiting and input buffer empty, so guests never wait on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET) {
            if let Err(e) = self.reset_evt.write(1) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET]);
        assert!(evt.read().is_err(), "data port must not reset");
        dev.write(4, &[0x20]);
        assert!(evt.read().is_err());
        dev.write(4, &[CMD_RESET]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
