//! COM1, a 16550-compatible UART at I/O port 0x3f8, polled.
//!
//! No interrupts: the guest checks the line status register, and every check
//! is a VM exit, so output waits for "transmitter empty" once per FIFO load
//! (16 bytes) when the UART has FIFOs, and input is polled about once a
//! millisecond by [`crate::shell`].

use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::io::{inb, outb};

const BASE: u16 = 0x3f8;
const DATA: u16 = BASE; // THR on write, RBR on read; DLL with DLAB
const IER: u16 = BASE + 1; // DLM with DLAB
const IIR_FCR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
/// Enable the FIFOs and clear both.
const FCR_FIFO_ON: u8 = 0x07;
const IIR_FIFOS_ENABLED: u8 = 0xc0;
/// DTR and RTS; OUT2 stays off, which keeps the UART's IRQ line quiet.
const MCR_DTR_RTS: u8 = 0x03;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// 115200 baud.
const DIVISOR: u16 = 1;
const FIFO_DEPTH: usize = 16;

/// Bytes that may be written after one "transmitter empty": 1 until `init`
/// finds FIFOs.
static TX_BURST: AtomicUsize = AtomicUsize::new(1);

/// Sets 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(IER, 0);
    outb(LCR, LCR_DLAB);
    let [lo, hi] = DIVISOR.to_le_bytes();
    outb(DATA, lo);
    outb(IER, hi);
    outb(LCR, LCR_8N1);
    outb(IIR_FCR, FCR_FIFO_ON);
    outb(MCR, MCR_DTR_RTS);
    // An 8250 without FIFOs reports none; then every byte waits for THR empty.
    let burst = if inb(IIR_FCR) & IIR_FIFOS_ENABLED == IIR_FIFOS_ENABLED {
        FIFO_DEPTH
    } else {
        1
    };
    TX_BURST.store(burst, Ordering::Relaxed);
}

/// Writes bytes, waiting for room as needed.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(TX_BURST.load(Ordering::Relaxed)) {
        while inb(LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        for &b in chunk {
            outb(DATA, b);
        }
    }
}

/// A received byte, if one is waiting.
pub fn read_byte() -> Option<u8> {
    (inb(LSR) & LSR_DATA_READY != 0).then(|| inb(DATA))
}

/// COM1 as a [`fmt::Write`] sink; writing never fails.
pub struct Com1;

impl fmt::Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Runs one of the [`baton_test_guest::protocol`] line writers on COM1.
pub fn emit(line: impl FnOnce(&mut Com1) -> fmt::Result) {
    // Com1 never returns an error, and formatting our own values cannot fail.
    let _ = line(&mut Com1);
}
