//! The 8250 UART at 0x3f8 (ttyS0), emulated by vm-superio.
//!
//! Output goes to whatever writer the VMM supplies (stdout, a file, a socket fan-out); input is
//! pushed in by the VMM with [`Serial::enqueue_input`].

use std::io::Write;

use crate::{BusDevice, Trigger};

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// The layout's version ([`crate::Versioned`]).
    pub version: u32,
    /// Divisor latch, low and high bytes.
    pub divisor: [u8; 2],
    /// Interrupt enable.
    pub ier: u8,
    /// Interrupt identification.
    pub iir: u8,
    /// Line control.
    pub lcr: u8,
    /// Line status.
    pub lsr: u8,
    /// Modem control.
    pub mcr: u8,
    /// Modem status.
    pub msr: u8,
    /// Scratch.
    pub scr: u8,
    /// Bytes received and not yet read by the guest.
    pub input: Vec<u8>,
}

impl crate::Versioned for SerialState {
    const KIND: &'static str = "serial port";
    const VERSION: u32 = 1;
    fn version(&self) -> u32 {
        self.version
    }
}

/// The serial port as a bus device.
pub struct Serial {
    inner: vm_superio::Serial<Trigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: Trigger, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// A UART in the state `state`, raising `irq` and writing to `out`.
    pub fn from_state(
        irq: Trigger,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> Result<Self, crate::StateError> {
        crate::Versioned::check_version(state)?;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.divisor[0],
            baud_divisor_high: state.divisor[1],
            interrupt_enable: state.ier,
            interrupt_identification: state.iir,
            line_control: state.lcr,
            line_status: state.lsr,
            modem_control: state.mcr,
            modem_status: state.msr,
            scratch: state.scr,
            in_buffer: state.input.clone(),
        };
        let inner = vm_superio::Serial::from_state(&s, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| crate::StateError::Invalid(format!("serial port: {e:?}")))?;
        Ok(Serial { inner })
    }

    /// The registers and receive FIFO.
    pub fn state(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            version: <SerialState as crate::Versioned>::VERSION,
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            input: s.in_buffer,
        }
    }

    /// Queues bytes typed at the console; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        // A full FIFO is the guest not reading yet; the caller retries the rest later.
        match self.inner.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn irq() -> Trigger {
        Trigger::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
    }

    #[test]
    fn state_round_trips_and_other_versions_are_refused() {
        let mut serial = Serial::new(irq(), Box::new(std::io::sink()));
        serial.write(3, &[0x83]); // LCR: divisor latch on, 8 bits
        serial.write(0, &[0x0c]);
        serial.write(3, &[0x03]);
        serial.write(7, &[0x5a]);
        assert_eq!(serial.enqueue_input(b"ls\n"), 3);
        let saved = serial.state();
        assert_eq!(
            (
                saved.version,
                saved.divisor,
                saved.scr,
                saved.input.as_slice()
            ),
            (1, [0x0c, 0], 0x5a, &b"ls\n"[..])
        );
        let json = serde_json::to_string(&saved).expect("serialises");
        let back: SerialState = serde_json::from_str(&json).expect("parses");
        let restored =
            Serial::from_state(irq(), Box::new(std::io::sink()), &back).expect("restores");
        assert_eq!(restored.state(), saved);

        let e = Serial::from_state(
            irq(),
            Box::new(std::io::sink()),
            &SerialState {
                version: 3,
                ..saved
            },
        )
        .err()
        .expect("another version");
        assert_eq!(
            e.to_string(),
            "serial port state version 3 is not supported (this baton reads version 1)"
        );
    }
}
