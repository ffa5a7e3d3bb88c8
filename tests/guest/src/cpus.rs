//! The other processors: started at boot, then each counting in a CPL3 loop.
//!
//! For every AP in the MADT the boot CPU allocates a [`CpuBlock`] (GDT, TSS,
//! stack pointers) and a kernel and a user stack, and records the block under
//! the AP's APIC ID in [`AP_BLOCKS`]. It copies the entry stub's real-mode
//! trampoline to a free page below 1 MiB, sends every AP an INIT, waits
//! 10 ms, then sends two STARTUP IPIs for that page (the classic sequence),
//! and waits for the APs' counters to move. Each AP runs the trampoline and
//! the entry stub's AP path (see [`crate::entry`]) at CPL0, which finds its
//! block by its APIC ID and drops to CPL3 in [`ap_main`].
//!
//! CPU index 0 is the boot CPU, whose counter the main loop increments; index
//! `i` > 0 is the `i`th AP in MADT order. Only the owner writes a counter,
//! each on its own cache line. APs never allocate (the heap has no lock) and
//! never print, except when they panic.

extern crate alloc;

use alloc::alloc::{alloc, Layout};
use alloc::boxed::Box;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use baton_test_guest::acpi::MAX_CPUS;
use baton_test_guest::protocol;
use baton_test_guest::smp::{self as plan, GDT_ENTRIES, SEGMENTS, TSS_SIZE};
use baton_test_guest::start_info;

use crate::lapic;
use crate::serial::emit;
use crate::time::Clock;

/// Each AP's CPL0 stack: exception frames and the #GP handler only.
const KERNEL_STACK: usize = 16 << 10;
/// Each AP's CPL3 stack.
const USER_STACK: usize = 64 << 10;
/// How long an AP has to show up, from the first STARTUP IPI.
const START_TIMEOUT_MS: u64 = 1000;
/// Between the INIT and the first STARTUP IPI (Intel SDM, "MP Initialization").
const INIT_DELAY_MS: u64 = 10;
/// Between the two STARTUP IPIs (at least 200 µs).
const STARTUP_DELAY_MS: u64 = 1;

/// What an AP's CPL0 start-up code reads: its GDT and the operand of `lgdt`
/// that loads it, its TSS, its stacks and its CPU index. The entry stub uses
/// the field offsets (`BLOCK_*`).
#[repr(C, align(64))]
pub struct CpuBlock {
    gdt: [u64; GDT_ENTRIES],
    _pad: [u16; 3],
    /// `lgdt` operand: limit, then base (so the base is 8-byte aligned).
    gdt_limit: u16,
    gdt_base: u64,
    rsp0: u64,
    user_rsp: u64,
    index: u64,
    tss: [u8; TSS_SIZE],
}

/// Offset of the `lgdt` operand in a [`CpuBlock`].
pub const BLOCK_GDT_PTR: usize = core::mem::offset_of!(CpuBlock, gdt_limit);
/// Offset of the CPL0 stack top.
pub const BLOCK_RSP0: usize = core::mem::offset_of!(CpuBlock, rsp0);
/// Offset of the CPL3 stack top.
pub const BLOCK_USER_RSP: usize = core::mem::offset_of!(CpuBlock, user_rsp);
/// Offset of the CPU index.
pub const BLOCK_INDEX: usize = core::mem::offset_of!(CpuBlock, index);

/// xAPIC IDs are 8 bits.
const APIC_IDS: usize = 256;

/// Each AP's [`CpuBlock`] address by APIC ID; 0 for an APIC ID not being
/// started (whose CPU then halts). Read by the entry stub's AP path.
pub static AP_BLOCKS: [AtomicU64; APIC_IDS] = [const { AtomicU64::new(0) }; APIC_IDS];

#[repr(align(64))]
struct Counter(AtomicU64);

/// Each CPU's loop counter, by CPU index, a cache line each.
static COUNTERS: [Counter; MAX_CPUS] = [const { Counter(AtomicU64::new(0)) }; MAX_CPUS];

/// CPU indexes: the boot CPU and every AP in the MADT (up to [`MAX_CPUS`]).
static SLOTS: AtomicUsize = AtomicUsize::new(1);

extern "C" {
    // From the entry stub; only their addresses are used, or, for `gdt`,
    // its first segment descriptors.
    static gdt: [u64; SEGMENTS];
    static ap_trampoline: u8;
    static ap_trampoline_end: u8;
}

/// Counts one more main-loop iteration of the boot CPU.
pub fn tick_boot_cpu() {
    let c = &COUNTERS[0].0;
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// CPU indexes in use (at least 1).
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed)
}

/// Copies the counters of CPU indexes `0..out.len()` into `out`.
pub fn counts(out: &mut [u64]) {
    for (o, c) in out.iter_mut().zip(&COUNTERS) {
        *o = c.0.load(Ordering::Relaxed);
    }
}

/// Whether CPU `index` is running (its counter moved).
pub fn running(index: usize) -> bool {
    COUNTERS
        .get(index)
        .is_some_and(|c| c.0.load(Ordering::Relaxed) != 0)
}

/// An AP's life at CPL3, from the entry stub: count forever, and run the
/// memory dirtier when it is this CPU's job.
pub extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    let counter = &COUNTERS[index].0;
    let mut n = 0u64;
    loop {
        n = n.wrapping_add(1);
        counter.store(n, Ordering::Relaxed);
        crate::dirtier::step(index);
    }
}

/// Starts the APs among `apic_ids` (the MADT's, in order) and waits for them
/// until a deadline, printing a warning for each one that did not start.
/// `memmap` is the PVH memory map; `avoid` is the boot information still in
/// use, which the trampoline must not overwrite.
pub fn start(clock: &Clock, apic_ids: &[u32], memmap: &[u8], avoid: &[Range<u64>]) {
    let boot_cpu = lapic::id();
    let aps = || plan::aps(apic_ids, boot_cpu).take(MAX_CPUS - 1);
    SLOTS.store(1 + aps().count(), Ordering::Relaxed);
    if aps().next().is_none() {
        return;
    }
    if !apic_ids.contains(&boot_cpu) {
        // Not an xAPIC at 0xfee0_0000 (x2APIC mode?): the IPIs could reach this CPU.
        let problem = format_args!("the boot CPU's APIC ID {boot_cpu} is not in the MADT");
        emit(|w| protocol::warning(w, "smp", &problem));
        return;
    }
    let Some(page) = plan::trampoline_page(start_info::memmap(memmap), avoid) else {
        emit(|w| protocol::warning(w, "smp", &"no free page below 1 MiB for the start-up code"));
        return;
    };
    copy_trampoline(page);

    for (i, apic_id) in aps().enumerate() {
        if let Err(problem) = prepare(i + 1, apic_id) {
            emit(|w| cannot_start(w, i + 1, apic_id, problem));
            if matches!(problem, Problem::NoMemory) {
                break;
            }
        }
    }
    // (CPU index, APIC ID) of the APs that got a block.
    let targets = || {
        let has_block = |id: u32| AP_BLOCKS[id as usize].load(Ordering::Relaxed) != 0;
        let reachable = |&(_, id): &(usize, u32)| plan::icr_destination(id).is_some();
        let indexed = aps().enumerate().map(|(i, id)| (i + 1, id));
        indexed
            .filter(reachable)
            .filter(move |&(_, id)| has_block(id))
    };
    if targets().next().is_none() {
        return;
    }
    let send = |low: u32| {
        for (index, apic_id) in targets() {
            let high = plan::icr_destination(apic_id).expect("a reachable APIC ID");
            if !lapic::send_ipi(high, low) && !running(index) {
                emit(|w| cannot_start(w, index, apic_id, Problem::Unsent));
            }
        }
    };
    lapic::enable();
    send(plan::ICR_INIT);
    clock.delay_ms(INIT_DELAY_MS);
    let deadline = clock.now() + clock.ticks(START_TIMEOUT_MS);
    send(plan::icr_startup(page));
    clock.delay_ms(STARTUP_DELAY_MS);
    // A second STARTUP IPI, as the SDM asks; a CPU that already started ignores it.
    send(plan::icr_startup(page));
    while clock.now() < deadline && !targets().all(|(index, _)| running(index)) {
        core::hint::spin_loop();
    }
    for (index, apic_id) in targets().filter(|&(index, _)| !running(index)) {
        let problem = format_args!("cpu {index} (apic id {apic_id}) did not start");
        emit(|w| protocol::warning(w, "smp", &problem));
    }
}

/// Why an AP is not started.
#[derive(Clone, Copy, Debug)]
enum Problem {
    /// Its APIC ID is one an xAPIC cannot send to.
    Unreachable,
    /// The heap has no room for its stacks.
    NoMemory,
    /// The local APIC kept the IPI pending.
    Unsent,
}

impl core::fmt::Display for Problem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Unreachable => "its APIC ID is beyond xAPIC reach",
            Self::NoMemory => "no memory for its stacks",
            Self::Unsent => "the local APIC did not send the IPI",
        })
    }
}

fn cannot_start(
    w: &mut impl core::fmt::Write,
    index: usize,
    apic_id: u32,
    problem: Problem,
) -> core::fmt::Result {
    let problem = format_args!("cpu {index} (apic id {apic_id}) cannot be started: {problem}");
    protocol::warning(w, "smp", &problem)
}

fn copy_trampoline(page: u64) {
    let start = &raw const ap_trampoline;
    let len = (&raw const ap_trampoline_end as usize) - start as usize;
    assert!(
        len as u64 <= plan::PAGE_SIZE,
        "the trampoline fits in a page"
    );
    // SAFETY: `page` is a page of RAM below 1 MiB (identity-mapped and
    // writable) that holds no boot information still in use and no Rust
    // object (the image starts at 1 MiB); the trampoline is `len` bytes of
    // the image's read-only data.
    unsafe { core::ptr::copy_nonoverlapping(start, page as usize as *mut u8, len) }
}

/// Allocates CPU `index`'s block and stacks and publishes them for `apic_id`.
fn prepare(index: usize, apic_id: u32) -> Result<(), Problem> {
    let slot = plan::icr_destination(apic_id)
        .and_then(|_| AP_BLOCKS.get(apic_id as usize))
        .ok_or(Problem::Unreachable)?;
    let stacks = Layout::from_size_align(KERNEL_STACK + USER_STACK, 4096).expect("valid layout");
    // SAFETY: a non-zero size.
    let stack = unsafe { alloc(stacks) } as u64;
    if stack == 0 {
        return Err(Problem::NoMemory);
    }
    // SAFETY: `gdt` is the entry stub's GDT, whose first SEGMENTS entries
    // nothing writes after boot (their accessed bits are preset).
    let segments = unsafe { gdt };
    let mut block = Box::new(CpuBlock {
        gdt: [0; GDT_ENTRIES],
        _pad: [0; 3],
        gdt_limit: (GDT_ENTRIES * 8 - 1) as u16,
        gdt_base: 0,
        rsp0: stack + KERNEL_STACK as u64,
        user_rsp: stack + (KERNEL_STACK + USER_STACK) as u64,
        index: index as u64,
        tss: plan::tss(stack + KERNEL_STACK as u64),
    });
    block.gdt = plan::gdt(segments, &raw const block.tss as u64);
    block.gdt_base = &raw const block.gdt as u64;
    // Leaked: the AP uses it for as long as the machine runs.
    let block = Box::leak(block);
    slot.store(&raw mut *block as u64, Ordering::Release);
    Ok(())
}
