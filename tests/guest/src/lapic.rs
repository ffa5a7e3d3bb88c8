//! The boot CPU's local APIC, in xAPIC mode: its registers are memory at
//! 0xfee0_0000, which the entry stub maps uncached and user-accessible in
//! 2 MiB pages (an EOI through a 1 GiB mapping fails on the PVM-based KVM).
//! Every access is a VM exit.

/// The xAPIC's registers.
pub const BASE: usize = 0xfee0_0000;
const ID: usize = 0x20;
const SVR: usize = 0xf0;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// Software enable, with 0xff as the spurious vector.
const SVR_ENABLE: u32 = 0x1ff;
/// Polls of the ICR's delivery status before giving up on it.
const ICR_POLLS: u32 = 1000;

fn read(reg: usize) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped (uncached) for the guest and
    // `reg` is one of its 32-bit registers; reading it has no side effect on
    // memory Rust owns.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as for `read`; the writes done here (SVR, ICR) configure the
    // APIC or send IPIs, and touch no memory.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(value) }
}

/// Software-enables this CPU's local APIC (spurious vector register).
pub fn enable() {
    write(SVR, read(SVR) | SVR_ENABLE);
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Sends the IPI with ICR words `high` (destination) and `low` (the command);
/// false if the APIC still reports it pending after [`ICR_POLLS`] looks.
pub fn send_ipi(high: u32, low: u32) -> bool {
    write(ICR_HIGH, high);
    write(ICR_LOW, low);
    (0..ICR_POLLS).any(|_| read(ICR_LOW) & baton_test_guest::smp::ICR_PENDING == 0)
}
