//! The 8250 UART at 0x3f8 (ttyS0), emulated by vm-superio.
//!
//! Output goes to whatever writer the VMM supplies (stdout, a file, a socket fan-out); input is
//! pushed in by the VMM with [`Serial::enqueue_input`].

use std::io::Write;

use crate::{BusDevice, Trigger};

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
