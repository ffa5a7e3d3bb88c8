//! Device memory above 4 GiB: the entry stub identity-maps the first 4 GiB;
//! a BAR the firmware or VMM put higher (Cloud Hypervisor and baton place
//! 64-bit BARs there, as may QEMU's firmware) is identity-mapped here, on
//! demand, in uncached 2 MiB pages.
//!
//! The page tables are user-accessible and writable (see `crate::entry`), so
//! this CPL3 code fills them directly. Only entries that were not present
//! change, and processors do not cache those, so no TLB flush is needed.

use core::sync::atomic::{compiler_fence, Ordering};

/// Present, writable, user-accessible table pointer.
const TABLE: u64 = 0x07;
/// Present, writable, user-accessible, uncached 2 MiB page.
const PAGE_MMIO: u64 = 0x9f;
const PRESENT: u64 = 1;
const PAGE_2M: u64 = 1 << 21;
/// What the entry stub maps already.
const MAPPED_BY_ENTRY: u64 = 1 << 32;
/// Identity mapping needs canonical lower-half addresses.
const LIMIT: u64 = 1 << 47;
/// Page-table pages for mappings made here (each PD maps 1 GiB).
const POOL_PAGES: usize = 16;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut POOL: [Table; POOL_PAGES] = [const { Table([0; 512]) }; POOL_PAGES];
static mut POOL_USED: usize = 0;

extern "C" {
    /// The entry stub's top-level table (`crate::entry`).
    static mut pml4: [u64; 512];
}

/// Why a range cannot be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Past the lower half of the address space.
    TooHigh,
    /// The page-table pool is used up.
    NoTables,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::TooHigh => "above the identity-mappable half of the address space",
            Error::NoTables => "no page-table pages left",
        })
    }
}

/// Identity-maps `[addr, addr + len)` as device memory, if it is not yet.
pub fn map_mmio(addr: u64, len: u64) -> Result<(), Error> {
    let end = addr.checked_add(len.max(1)).ok_or(Error::TooHigh)?;
    if end <= MAPPED_BY_ENTRY {
        return Ok(());
    }
    if end > LIMIT {
        return Err(Error::TooHigh);
    }
    let mut page = addr.max(MAPPED_BY_ENTRY) & !(PAGE_2M - 1);
    while page < end {
        // SAFETY: one CPU maps (the boot CPU, which alone drives devices), so
        // nothing else writes the tables at the same time; `pml4` and the pool
        // are page-aligned tables that the CPU walks through the identity map
        // (their virtual addresses are their physical ones).
        unsafe {
            let pdpt = next_table(&raw mut pml4, (page >> 39) as usize & 511)?;
            let pd = next_table(pdpt, (page >> 30) as usize & 511)?;
            let entry = (pd as *mut u64).add((page >> 21) as usize & 511);
            if core::ptr::read_volatile(entry) & PRESENT == 0 {
                compiler_fence(Ordering::SeqCst);
                core::ptr::write_volatile(entry, page | PAGE_MMIO);
            }
        }
        page += PAGE_2M;
    }
    compiler_fence(Ordering::SeqCst);
    Ok(())
}

/// The table entry `index` of `table` points to, made from the pool if absent.
///
/// # Safety
/// `table` is a live page table of this guest, written by no one else now.
unsafe fn next_table(table: *mut [u64; 512], index: usize) -> Result<*mut [u64; 512], Error> {
    // SAFETY: in bounds (index < 512); the caller vouches for the table.
    let entry = unsafe { (table as *mut u64).add(index) };
    // SAFETY: as above.
    let value = unsafe { core::ptr::read_volatile(entry) };
    if value & PRESENT != 0 {
        return Ok((value & 0x000f_ffff_ffff_f000) as *mut [u64; 512]);
    }
    // SAFETY: the pool is only touched here, by one CPU (see `map_mmio`).
    let fresh = unsafe {
        let used = POOL_USED;
        if used == POOL_PAGES {
            return Err(Error::NoTables);
        }
        POOL_USED = used + 1;
        (&raw mut POOL[used].0)
    };
    compiler_fence(Ordering::SeqCst);
    // SAFETY: `entry` is valid (above); the new table is zeroed (static, never
    // handed out before) and page-aligned.
    unsafe { core::ptr::write_volatile(entry, fresh as u64 | TABLE) };
    Ok(fresh)
}
