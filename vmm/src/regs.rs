//! The boot-time register state of a vCPU: segments and control registers for the entry
//! mode, the boot page tables and GDT, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::Entry;
use crate::layout::*;
use crate::memory::GuestMemory;

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM register ioctl failed.
    #[error("Cannot set vCPU {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Writing the GDT or page tables failed.
    #[error("Cannot write boot page tables or GDT to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot GDT: null, 32-bit code (0x08), 64-bit code (0x10, Linux's __BOOT_CS),
/// data (0x18, __BOOT_DS), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE32_SELECTOR: u16 = 0x08;
const CODE64_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;
/// Stack for the 64-bit Linux entry: grows down from the end of the page after the zero page
/// (the zero page's 4 KiB end at 0x8000; the page tables start at 0x9000).
const BOOT_STACK: u64 = 0x8ff0;

/// A GDT descriptor from flags (access byte in bits 0-7, flags nibble in 12-15), base, limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register state equivalent to loading `selector` from `GDT`.
fn segment(selector: u16) -> kvm_segment {
    let e = GDT[usize::from(selector >> 3)];
    let base = ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000);
    let raw_limit = ((e & 0xffff) | ((e >> 32) & 0x000f_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and identity page tables mapping the first 4 GiB with 2 MiB pages.
fn write_boot_tables(mem: &GuestMemory) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(Error::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(Error::Write)?;
    let pdpt = PML4_START + 0x1000;
    let pd = PML4_START + 0x2000;
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_START))
        .map_err(Error::Write)?;
    let mut pds = vec![0u8; 4 * 0x1000];
    for (i, chunk) in pds.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    for i in 0..4u64 {
        mem.write_obj((pd + i * 0x1000) | 0x3, GuestAddress(pdpt + 8 * i))
            .map_err(Error::Write)?;
    }
    mem.write_slice(&pds, GuestAddress(pd))
        .map_err(Error::Write)
}

/// The special registers for `entry`, starting from KVM's defaults in `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: Entry) -> kvm_sregs {
    let code = match entry {
        Entry::Pvh { .. } => CODE32_SELECTOR,
        Entry::Linux64 { .. } => CODE64_SELECTOR,
    };
    sregs.cs = segment(code);
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    match entry {
        Entry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Linux64 { .. } => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// The general registers for `entry`.
pub fn boot_regs(entry: Entry) -> kvm_regs {
    match entry {
        Entry::Pvh { rip } => kvm_regs {
            rip,
            rbx: PVH_INFO_START,
            rflags: 0x2,
            ..Default::default()
        },
        Entry::Linux64 { rip } => kvm_regs {
            rip,
            rsi: ZERO_PAGE_START,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rflags: 0x2,
            ..Default::default()
        },
    }
}

/// Puts the boot vCPU in the state `entry` expects.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: Entry) -> Result<(), Error> {
    write_boot_tables(mem)?;
    let sregs = vcpu.get_sregs().map_err(|e| Error::Kvm("sregs", e))?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(|e| Error::Kvm("sregs", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| Error::Kvm("regs", e))
}

/// FPU, MSRs and LAPIC state every vCPU starts with.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("FPU", e))?;

    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLE_WB,
            ..Default::default()
        },
    ])
    .expect("two MSR entries fit");
    vcpu.set_msrs(&msrs).map_err(|e| Error::Kvm("MSRs", e))?;

    // LINT0 delivers the PIC's ExtINT and LINT1 NMIs, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(|e| Error::Kvm("LAPIC", e))?;
    set_lvt(&mut lapic.regs, 0x350, 0x7);
    set_lvt(&mut lapic.regs, 0x360, 0x4);
    vcpu.set_lapic(&lapic).map_err(|e| Error::Kvm("LAPIC", e))
}

fn set_lvt(regs: &mut [std::os::raw::c_char], offset: usize, delivery_mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (delivery_mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(CODE64_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment(CODE32_SELECTOR);
        assert_eq!((cs32.l, cs32.db, cs32.g), (0, 1, 1));
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.type_, ds.db, ds.base), (0x3, 1, 0));
        let tr = segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }

    #[test]
    fn boot_tables_do_not_overlap() {
        let gdt_end = BOOT_GDT_START + std::mem::size_of_val(&GDT) as u64;
        assert!(BOOT_IDT_START >= gdt_end, "IDT inside the GDT");
        const { assert!(BOOT_IDT_START + 8 <= PVH_INFO_START) };
        const { assert!(BOOT_STACK > ZERO_PAGE_START + 0x1000 && BOOT_STACK < PML4_START) };
    }

    #[test]
    fn entry_modes() {
        let s = boot_sregs(kvm_sregs::default(), Entry::Pvh { rip: 0x100000 });
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.selector, CODE32_SELECTOR);
        let s = boot_sregs(kvm_sregs::default(), Entry::Linux64 { rip: 0x1000000 });
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, CODE64_SELECTOR);
        assert_eq!(boot_regs(Entry::Pvh { rip: 5 }).rbx, PVH_INFO_START);
        assert_eq!(boot_regs(Entry::Linux64 { rip: 5 }).rsi, ZERO_PAGE_START);
    }

    #[test]
    fn lvt_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350 + 2] = 1; // a mask bit above the delivery mode stays
        set_lvt(&mut regs, 0x350, 0x7);
        assert_eq!(regs[0x351] as u8, 0x7);
        assert_eq!(regs[0x352] as u8, 1);
    }
}
