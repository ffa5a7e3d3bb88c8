//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT for 64-bit Linux boot (5 entries), then the empty boot IDT at 0x530
//! 0x0000_6000  PVH hvm_start_info, followed by its memory map and module list
//! 0x0000_7000  Linux boot_params (the zero page)
//! 0x0000_9000  identity page tables for 64-bit Linux boot (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line
//! 0x000e_0000  ACPI tables (RSDP first, where legacy scans look)       reserved
//! 0x0010_0000  kernel (1 MiB), RAM up to the PCI hole
//! 0xc000_0000  32-bit device MMIO (PCI BARs)                            3 GiB
//! 0xe000_0000  PCI ECAM, segment 0 bus 0 (MCFG)                         reserved
//! 0xfeb0_0000  ACPI Generic Event Device (power button, PCI hot-plug)
//! 0xfeb0_1000  ACPI PCI hot-plug registers
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 local APIC
//! 0xfffb_c000  KVM identity map page and TSS (3 pages)
//! 4 GiB        the rest of RAM
//! next GiB     64-bit device MMIO (PCI BARs of baton's devices)         16 GiB
//! ```

/// Start of the GDT used by 64-bit boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT used by 64-bit boot, after the five GDT entries.
pub const BOOT_IDT_START: u64 = 0x530;
/// PVH start_info.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PML4 of the boot page tables; PDPT and the PDs follow page by page.
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// End of the first, sub-640 KiB RAM range (the top 1 KiB is the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; RSDP at the start.
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Size of the region reserved for ACPI tables.
pub const ACPI_SIZE: u64 = HIGH_RAM_START - ACPI_START;

/// Start of the hole below 4 GiB where no RAM lives.
pub const MEM_32BIT_RESERVED_START: u64 = 0xc000_0000;
/// Start of 32-bit PCI BAR space.
pub const MEM_32BIT_DEVICES_START: u64 = MEM_32BIT_RESERVED_START;
/// Size of 32-bit PCI BAR space.
pub const MEM_32BIT_DEVICES_SIZE: u64 = 0x2000_0000;
/// PCI ECAM window for segment 0.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
/// One bus worth of ECAM (bus 0 only).
pub const PCI_MMCONFIG_SIZE: u64 = 0x10_0000;
/// ACPI Generic Event Device registers (power button).
pub const ACPI_GED_START: u64 = 0xfeb0_0000;
/// ACPI PCI hot-plug registers (slots that changed, eject).
pub const PCI_HOTPLUG_START: u64 = 0xfeb0_1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity map page (needs one page) just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's real-mode TSS (needs three pages).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// RAM above the hole starts here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Size of the 64-bit PCI BAR window.
pub const MEM_64BIT_DEVICES_SIZE: u64 = 16 << 30;

/// Start of the 64-bit PCI BAR window of a VM with `ram` bytes of RAM: the first GiB
/// boundary above RAM (which continues at 4 GiB past the hole). virtio BARs are 64-bit and
/// go here, above 4 GiB, as Cloud Hypervisor places them; the 32-bit window stays for BARs
/// a guest moves there, and for states saved before.
pub fn mem_64bit_devices_start(ram: u64) -> u64 {
    let top = RAM_64BIT_START + ram.saturating_sub(MEM_32BIT_RESERVED_START);
    top.next_multiple_of(1 << 30)
}

/// Port of the first serial port and its IRQ.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's IRQ (ISA IRQ 4, GSI 4).
pub const COM1_IRQ: u32 = 4;
/// i8042 ports 0x60-0x64.
pub const I8042_PORT: u64 = 0x60;
/// CMOS RTC.
pub const CMOS_PORT: u64 = 0x70;
/// ACPI sleep control/status/reset registers.
pub const ACPI_PM_PORT: u64 = 0x3c0;
/// PCI configuration address/data ports.
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
/// The GED's interrupt (GSI 5, edge, active high).
pub const ACPI_GED_IRQ: u32 = 5;
/// SCI interrupt announced in the FADT.
pub const SCI_IRQ: u16 = 9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_64_bit_window_starts_at_the_first_gib_above_ram() {
        const GIB: u64 = 1 << 30;
        assert_eq!(mem_64bit_devices_start(256 << 20), 4 * GIB);
        assert_eq!(mem_64bit_devices_start(3 * GIB), 4 * GIB);
        assert_eq!(mem_64bit_devices_start(4 * GIB), 5 * GIB);
        assert_eq!(mem_64bit_devices_start(5 * GIB + GIB / 2), 7 * GIB);
    }
}
