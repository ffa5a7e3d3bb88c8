//! Starting the application processors (APs): the decisions and the bytes,
//! without the hardware.
//!
//! The boot CPU sends each AP listed in the MADT an INIT and then two
//! STARTUP IPIs through its xAPIC's interrupt command register (ICR). A
//! STARTUP IPI starts the AP in real mode at `CS:IP = (page >> 4):0`, so the
//! first instructions (the trampoline) are copied to a free page of RAM below
//! 1 MiB, chosen here from the memory map. Each AP then needs its own task
//! state segment (TSS, for its CPL0 stack) and a GDT that holds its
//! descriptor, since loading a TSS marks its descriptor busy: both are built
//! here as plain values.

use core::ops::Range;

use crate::start_info::{MemmapEntry, MEMMAP_TYPE_RAM};

/// Size of a page, and of the trampoline's page.
pub const PAGE_SIZE: u64 = 4096;
/// A STARTUP IPI's vector is the page number, 8 bits: the page lies below 1 MiB.
const STARTUP_LIMIT: u64 = 1 << 20;

/// ICR low word of an INIT IPI: delivery mode 101, level assert, physical
/// destination in the high word.
pub const ICR_INIT: u32 = 0x4500;
/// ICR low word of a STARTUP IPI, without the vector: delivery mode 110, level
/// assert.
pub const ICR_STARTUP: u32 = 0x4600;
/// ICR bit that stays set while the local APIC is still sending.
pub const ICR_PENDING: u32 = 1 << 12;

/// ICR low word of a STARTUP IPI that starts the AP at the page at `page`
/// (a page-aligned address below 1 MiB).
pub fn icr_startup(page: u64) -> u32 {
    ICR_STARTUP | ((page / PAGE_SIZE) & 0xff) as u32
}

/// ICR high word that sends to the xAPIC with `apic_id`; `None` for IDs an
/// xAPIC cannot address (255 is the broadcast ID).
pub fn icr_destination(apic_id: u32) -> Option<u32> {
    (apic_id < 0xff).then_some(apic_id << 24)
}

/// The highest page-aligned page of RAM below 1 MiB, other than page 0, that
/// overlaps none of `avoid` (the boot information still in use), for the
/// trampoline. Page 0 is left alone: it holds the real-mode interrupt table
/// by convention, and some loaders put boot data there.
pub fn trampoline_page(
    memmap: impl Iterator<Item = MemmapEntry>,
    avoid: &[Range<u64>],
) -> Option<u64> {
    let overlaps = |page: u64| {
        let page_end = page + PAGE_SIZE;
        avoid.iter().any(|r| r.start < page_end && page < r.end)
    };
    memmap
        .filter(|e| e.kind == MEMMAP_TYPE_RAM)
        .filter_map(|e| {
            let end = e.addr.saturating_add(e.size).min(STARTUP_LIMIT);
            let first = e.addr.next_multiple_of(PAGE_SIZE).max(PAGE_SIZE);
            let mut page = (end / PAGE_SIZE * PAGE_SIZE).checked_sub(PAGE_SIZE)?;
            while page >= first {
                if !overlaps(page) {
                    return Some(page);
                }
                page -= PAGE_SIZE;
            }
            None
        })
        .max()
}

/// The APIC IDs of the APs, in MADT order: every enabled processor but the
/// boot CPU. CPU index `i + 1` is the `i`th of them; index 0 is the boot CPU.
pub fn aps(apic_ids: &[u32], boot_cpu: u32) -> impl Iterator<Item = u32> + '_ {
    apic_ids.iter().copied().filter(move |&id| id != boot_cpu)
}

/// Bytes of a 64-bit TSS with no I/O permission bitmap.
pub const TSS_SIZE: usize = 104;

/// A 64-bit TSS whose CPL0 stack (RSP0) is `rsp0`, without interrupt stacks
/// and with the I/O bitmap beyond its limit (so IOPL alone decides).
pub fn tss(rsp0: u64) -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    t[4..12].copy_from_slice(&rsp0.to_le_bytes());
    t[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    t
}

/// The 16-byte system descriptor of an available 64-bit TSS at `base`.
pub fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = TSS_SIZE as u64 - 1;
    // Present, DPL 0, type 9: available 64-bit TSS.
    let access = 0x89;
    let low = limit | (base & 0xff_ffff) << 16 | access << 40 | ((base >> 24) & 0xff) << 56;
    [low, base >> 32]
}

/// Segment descriptors every GDT here starts with (null, kernel code and
/// data, user data and code), before the TSS descriptor.
pub const SEGMENTS: usize = 5;
/// Entries of an AP's GDT: the segments, then its TSS descriptor.
pub const GDT_ENTRIES: usize = SEGMENTS + 2;

/// An AP's GDT: the boot CPU's segment descriptors, then the AP's own TSS
/// descriptor at selector `8 * SEGMENTS`, as in the boot CPU's GDT.
pub fn gdt(segments: [u64; SEGMENTS], tss_base: u64) -> [u64; GDT_ENTRIES] {
    let mut g = [0u64; GDT_ENTRIES];
    g[..SEGMENTS].copy_from_slice(&segments);
    g[SEGMENTS..].copy_from_slice(&tss_descriptor(tss_base));
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(addr: u64, size: u64) -> MemmapEntry {
        MemmapEntry {
            addr,
            size,
            kind: MEMMAP_TYPE_RAM,
        }
    }

    #[test]
    fn trampoline_goes_high_in_low_ram() {
        // baton: RAM up to the EBDA at 0x9fc00, then reserved, then RAM from 1 MiB.
        let baton = [
            ram(0, 0x9fc00),
            MemmapEntry {
                addr: 0xe0000,
                size: 0x20000,
                kind: 2,
            },
            ram(0x10_0000, 511 << 20),
        ];
        assert_eq!(trampoline_page(baton.into_iter(), &[]), Some(0x9e000));
        // Boot information in use is skipped.
        let avoid = [0x9e800..0x9e900, 0x9d000..0x9d001];
        assert_eq!(trampoline_page(baton.into_iter(), &avoid), Some(0x9c000));
        // Nothing below 1 MiB but page 0, or RAM that is not page-aligned enough.
        assert_eq!(trampoline_page([ram(0, 0x1000)].into_iter(), &[]), None);
        assert_eq!(
            trampoline_page([ram(0x1800, 0x1000)].into_iter(), &[]),
            None
        );
        assert_eq!(
            trampoline_page([ram(0x1800, 0x1800)].into_iter(), &[]),
            Some(0x2000)
        );
        // RAM that runs across 1 MiB offers its pages below.
        assert_eq!(
            trampoline_page([ram(0x8_0000, 1 << 30)].into_iter(), &[]),
            Some(0xff000)
        );
        assert_eq!(
            trampoline_page([ram(0x10_0000, 1 << 30)].into_iter(), &[]),
            None
        );
        let reserved = MemmapEntry {
            kind: 2,
            ..ram(0, 0x9fc00)
        };
        assert_eq!(trampoline_page([reserved].into_iter(), &[]), None);
    }

    #[test]
    fn icr_words() {
        assert_eq!(icr_startup(0x9e000), 0x469e);
        assert_eq!(icr_destination(3), Some(0x0300_0000));
        assert_eq!(icr_destination(0xff), None);
        assert_eq!(icr_destination(300), None);
    }

    #[test]
    fn aps_skip_the_boot_cpu() {
        assert_eq!(aps(&[0, 1, 2, 3], 0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(aps(&[4, 2, 7], 2).collect::<Vec<_>>(), [4, 7]);
        assert_eq!(aps(&[], 0).count(), 0);
    }

    #[test]
    fn tss_and_its_descriptor() {
        let t = tss(0x1234_5678_9abc);
        assert_eq!(t[4..12], 0x1234_5678_9abcu64.to_le_bytes());
        assert_eq!(t[102..], [104, 0]);
        assert!(t[..4].iter().chain(&t[12..102]).all(|&b| b == 0));
        // The boot CPU's TSS descriptor in entry.rs, for a TSS at 0x0012_3450.
        assert_eq!(tss_descriptor(0x0012_3450), [0x0000_8912_3450_0067, 0]);
        assert_eq!(tss_descriptor(0x1_2345_6789), [0x2300_8945_6789_0067, 0x1]);
        let g = gdt([0, 1, 2, 3, 4], 0x0012_3450);
        assert_eq!(g, [0, 1, 2, 3, 4, 0x0000_8912_3450_0067, 0]);
    }
}
