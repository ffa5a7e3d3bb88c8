//! The few CPU instructions the guest uses outside the entry stub: port I/O,
//! CPUID, RDTSC.
//!
//! All run at CPL3. Port I/O runs directly thanks to IOPL 3 or, on the
//! PVM-based KVM, through the entry stub's #GP handler (see [`crate::entry`]);
//! either way each access is a VM exit, so callers keep them rare.

use core::arch::asm;
use core::arch::x86_64::{__cpuid, CpuidResult};

// SAFETY (for every port access below): IOPL 3 permits `in`/`out` at CPL3,
// and where the hypervisor ignores it the entry stub's #GP handler performs
// the access and resumes after the instruction with all other registers
// intact. The guest drives no DMA-capable device through ports, so port I/O
// cannot change memory Rust owns. The stub's handler only recognises the
// `%dx` forms written here; do not let the compiler choose others.

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: see above.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: see above.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: see above.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: see above; only `al` is written.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Executes CPUID for `leaf` (subleaf 0).
pub fn cpuid(leaf: u32) -> CpuidResult {
    // `__cpuid` is an unsafe fn in older Rust (the workspace MSRV is 1.85)
    // and a safe one in newer.
    #[allow(unused_unsafe)]
    // SAFETY: every x86-64 CPU has CPUID; it only writes the four result
    // registers.
    unsafe {
        __cpuid(leaf)
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is allowed at CPL3 (the stub leaves CR4.TSD clear) and only
    // writes `edx:eax`.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}
