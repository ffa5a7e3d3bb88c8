//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT, MADT and MCFG.
//!
//! The tables are built as byte blobs at fixed guest addresses ([`build`] is pure, so the
//! contents and checksums are unit-tested) and then copied into guest memory.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use devices::pci::hotplug::HOTPLUG_LEN;

use crate::layout::*;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"BATON ";
const OEM_TABLE_ID: [u8; 8] = *b"BATONVMM";
const OEM_REVISION: u32 = 1;

/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables do not fit the space reserved for them.
    #[error("ACPI tables need {0} bytes, more than the {ACPI_SIZE} reserved")]
    TooLarge(u64),
    /// Guest memory write failed.
    #[error("Cannot write ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The tables and where each goes.
pub struct Tables {
    /// (guest address, bytes) of every table, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Guest address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        self.blobs[0].0
    }

    /// Copies the tables into guest memory.
    pub fn write(&self, mem: &GuestMemory) -> Result<(), Error> {
        for (addr, bytes) in &self.blobs {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(Error::Write)?;
        }
        Ok(())
    }
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    item.to_aml_bytes(&mut v);
    v
}

/// The DSDT of a VM whose 64-bit device window starts at `window64`.
fn dsdt(window64: u64) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Each object is serialised within one statement: the AML builders borrow temporaries.
    dsdt.append_slice(&aml_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&devices::acpi::S5_SLEEP_TYPE]),
    )));

    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(PCI_CONFIG_PORT as u16, PCI_CONFIG_PORT as u16, 1, 8),
                    &aml::AddressSpace::new_io(0u16, (PCI_CONFIG_PORT - 1) as u16, None),
                    &aml::AddressSpace::new_io((PCI_CONFIG_PORT + 8) as u16, 0xffffu16, None),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        MEM_32BIT_DEVICES_START as u32,
                        (MEM_32BIT_DEVICES_START + MEM_32BIT_DEVICES_SIZE - 1) as u32,
                        None,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        window64,
                        window64 + MEM_64BIT_DEVICES_SIZE - 1,
                        None,
                    ),
                ]),
            ),
        ],
    )));

    // Motherboard resources: the ECAM window, so Linux trusts MCFG, and the registers of the
    // GED and of PCI hot-plug.
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(
                        false,
                        PCI_MMCONFIG_START as u32,
                        PCI_MMCONFIG_SIZE as u32,
                    ),
                    &aml::Memory32Fixed::new(
                        true,
                        ACPI_GED_START as u32,
                        devices::acpi::GED_LEN as u32,
                    ),
                    &aml::Memory32Fixed::new(true, PCI_HOTPLUG_START as u32, HOTPLUG_LEN as u32),
                ]),
            ),
        ],
    )));

    dsdt.append_slice(&pci_hotplug());

    // The power button and PCI hot-plug: the GED interrupts, its _EVT reads (and so clears)
    // the event byte and notifies the button device, or has the PCI slots notified.
    let power_button = devices::acpi::GED_EVENT_POWER_BUTTON;
    let pci_changed = devices::acpi::GED_EVENT_PCI_HOTPLUG;
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            // Only the interrupt: Linux's GED driver takes every resource of its _CRS for
            // one and refuses the device otherwise. Its registers are a motherboard resource.
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    ACPI_GED_IRQ,
                )]),
            ),
            &aml::OpRegion::new(
                "GDST".into(),
                aml::OpRegionSpace::SystemMemory,
                &(ACPI_GED_START as usize),
                &(devices::acpi::GED_LEN as usize),
            ),
            &aml::Field::new(
                "GDST".into(),
                aml::FieldAccessType::Byte,
                aml::FieldLockRule::NoLock,
                aml::FieldUpdateRule::Preserve,
                vec![aml::FieldEntry::Named(*b"GDAT", 8)],
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &aml::Store::new(&aml::Local(0), &aml::Path::new("GDAT")),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::ZERO, &aml::Local(0), &power_button),
                            &power_button,
                        ),
                        vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                    ),
                    &aml::If::new(
                        &aml::Equal::new(
                            &aml::And::new(&aml::ZERO, &aml::Local(0), &pci_changed),
                            &pci_changed,
                        ),
                        vec![&aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![])],
                    ),
                ],
            ),
        ],
    )));
    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )));

    dsdt.append_slice(&aml_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                    &aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8),
                ]),
            ),
        ],
    )));
    dsdt
}

/// Notify value asking the OS to check a device (here: a slot that may have a new one).
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notify value asking the OS to let go of a device and eject it.
const NOTIFY_EJECT_REQUEST: u8 = 3;

/// ACPI name of the slot device for PCI device `slot` of bus 0.
fn slot_name(slot: u8) -> String {
    format!("SL{slot:02X}")
}

/// ACPI PCI hot-plug of bus 0 (see `devices::pci::hotplug` for the registers), in the
/// scope of `\_SB_.PCI0`:
/// - `PCST`, the register block, and its fields `PCIU`, `PCID`, `B0EJ`, `PSEG`;
/// - `SLxx`, one device per slot 1-31, with `_ADR`, `_SUN` and `_EJ0`, which writes the
///   slot's bit to `B0EJ`; Linux's acpiphp registers a hot-plug slot for each;
/// - `PCNT`, which the GED's `_EVT` calls: it reads (and so clears) `PCIU` and `PCID` and
///   notifies each slot named in them: "device check" for an arrival, "eject request" for a
///   removal.
fn pci_hotplug() -> Vec<u8> {
    let slots: Vec<u8> = (1..devices::pci::DEVICES_PER_BUS as u8).collect();
    let mut body = aml_bytes(&aml::OpRegion::new(
        "PCST".into(),
        aml::OpRegionSpace::SystemMemory,
        &(PCI_HOTPLUG_START as usize),
        &(HOTPLUG_LEN as usize),
    ));
    body.extend(aml_bytes(&aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    )));
    body.extend(aml_bytes(&aml::Mutex::new("BLCK".into(), 0)));
    body.extend(aml_bytes(&aml::Method::new(
        "PCEJ".into(),
        1,
        true,
        vec![
            &aml::Acquire::new("BLCK".into(), 0xffff),
            &aml::ShiftLeft::new(&aml::Path::new("B0EJ"), &aml::ONE, &aml::Arg(0)),
            &aml::Release::new("BLCK".into()),
        ],
    )));
    let names: Vec<String> = slots.iter().map(|&s| slot_name(s)).collect();
    let paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let bits: Vec<u32> = slots.iter().map(|&s| 1u32 << s).collect();
    let ands_up: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &aml::Local(0), b))
        .collect();
    let ands_down: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &aml::Local(1), b))
        .collect();
    let notify_up: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &NOTIFY_DEVICE_CHECK))
        .collect();
    let notify_down: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &NOTIFY_EJECT_REQUEST))
        .collect();
    let mut ifs = Vec::new();
    for i in 0..slots.len() {
        ifs.push(aml::If::new(&ands_up[i], vec![&notify_up[i]]));
        ifs.push(aml::If::new(&ands_down[i], vec![&notify_down[i]]));
    }
    let (pciu, pcid) = (aml::Path::new("PCIU"), aml::Path::new("PCID"));
    let read_up = aml::Store::new(&aml::Local(0), &pciu);
    let read_down = aml::Store::new(&aml::Local(1), &pcid);
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let release = aml::Release::new("BLCK".into());
    let mut pcnt: Vec<&dyn Aml> = vec![&acquire, &read_up, &read_down, &release];
    pcnt.extend(ifs.iter().map(|i| i as &dyn Aml));
    body.extend(aml_bytes(&aml::Method::new("PCNT".into(), 0, true, pcnt)));
    let sun = aml::Path::new("_SUN");
    for (&slot, name) in slots.iter().zip(&names) {
        let eject = aml::MethodCall::new("PCEJ".into(), vec![&sun]);
        body.extend(aml_bytes(&aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &(u32::from(slot) << 16)),
                &aml::Name::new("_SUN".into(), &slot),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&eject]),
            ],
        )));
    }
    let raw = RawAml(body);
    aml_bytes(&aml::Scope::new("\\_SB_.PCI0".into(), vec![&raw]))
}

/// AML already encoded, to nest in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: a later issue adds a control-method power button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = SCI_IRQ.into();
    fadt.sleep_control_reg = io_register(ACPI_PM_PORT + devices::acpi::SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_register(ACPI_PM_PORT + devices::acpi::SLEEP_STATUS_OFFSET);
    fadt.reset_reg = io_register(ACPI_PM_PORT + devices::acpi::RESET_OFFSET);
    fadt.reset_value = devices::acpi::RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"BATONVMM").into();
    aml_bytes(&fadt.finalize())
}

fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        // Processor Local APIC: uid, APIC id, flags (enabled).
        madt.append_slice(&[MADT_LOCAL_APIC, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![MADT_IOAPIC, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // LINT1 of every processor (uid 0xff) is the NMI line.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_MMCONFIG_START, 0, 0, 0);
    aml_bytes(&mcfg)
}

/// Builds every table for a VM with `cpus` vCPUs and `ram` bytes of RAM, laid out from
/// [`ACPI_START`].
pub fn build(cpus: u8, ram: u64) -> Result<Tables, Error> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut blobs = Vec::new();
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next = align(addr + bytes.len() as u64);
        blobs.push((addr, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(mem_64bit_devices_start(ram)).as_slice().to_vec());
    let fadt_addr = place(fadt(dsdt_addr));
    let madt_addr = place(madt(cpus).as_slice().to_vec());
    let mcfg_addr = place(mcfg());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = place(aml_bytes(&xsdt));
    if next - ACPI_START > ACPI_SIZE {
        return Err(Error::TooLarge(next - ACPI_START));
    }
    blobs.insert(0, (rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    Ok(Tables { blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn table<'a>(t: &'a Tables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
        t.blobs
            .iter()
            .find(|(_, b)| &b[0..4] == sig)
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)))
    }

    #[test]
    fn rsdp_points_to_xsdt_listing_tables() {
        let t = build(4, 256 << 20).unwrap();
        let (rsdp_addr, rsdp) = (t.blobs[0].0, &t.blobs[0].1);
        assert_eq!(rsdp_addr, ACPI_START);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[0..20]));
        assert!(checksum_ok(rsdp));
        let (xsdt_addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let mut sigs: Vec<&[u8]> = entries
            .iter()
            .map(|a| &t.blobs.iter().find(|(addr, _)| addr == a).unwrap().1[0..4])
            .collect();
        sigs.sort();
        assert_eq!(sigs, vec![b"APIC", b"FACP", b"MCFG"]);
    }

    #[test]
    fn every_table_has_valid_length_and_checksum() {
        let t = build(16, 256 << 20).unwrap();
        for (addr, b) in t.blobs.iter().skip(1) {
            assert_eq!(
                u32_at(b, 4) as usize,
                b.len(),
                "length of table at {addr:#x}"
            );
            assert!(
                checksum_ok(b),
                "checksum of {}",
                String::from_utf8_lossy(&b[0..4])
            );
            assert!(*addr + b.len() as u64 <= ACPI_START + ACPI_SIZE);
        }
        // No two tables overlap.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = build(5, 256 << 20).unwrap();
        let (_, madt) = table(&t, b"APIC");
        assert_eq!(u32_at(madt, 36), APIC_START as u32);
        let mut off = 44;
        let mut apic_ids = Vec::new();
        let mut ioapics = 0;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                MADT_LOCAL_APIC => {
                    assert_eq!(madt[off + 4] & 1, 1, "enabled");
                    apic_ids.push(madt[off + 3]);
                }
                MADT_IOAPIC => {
                    ioapics += 1;
                    assert_eq!(u32_at(madt, off + 4), IOAPIC_START as u32);
                }
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(apic_ids, vec![0, 1, 2, 3, 4]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_our_registers() {
        let t = build(1, 256 << 20).unwrap();
        let (_, fadt) = table(&t, b"FACP");
        let (dsdt_addr, dsdt) = table(&t, b"DSDT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        // RESET_REG (GAS at 116): system I/O at our reset port; RESET_VALUE at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(
            u64_at(fadt, 120),
            ACPI_PM_PORT + devices::acpi::RESET_OFFSET
        );
        assert_eq!(fadt[128], devices::acpi::RESET_VALUE);
        // SLEEP_CONTROL_REG (GAS at 244).
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), ACPI_PM_PORT);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        // The power button's GED: its _HID string and its register window.
        assert!(dsdt.windows(9).any(|w| w == b"ACPI0013\0"));
        let mut fixed = vec![0x86, 0x09, 0x00, 0x01];
        fixed.extend_from_slice(&(ACPI_GED_START as u32).to_le_bytes());
        assert!(dsdt.windows(8).any(|w| w == fixed.as_slice()));
    }

    /// Regression: Linux refused the GED ("unable to parse the _CRS record") while its _CRS
    /// also held its register window.
    #[test]
    fn ged_resources_are_only_its_interrupt() {
        let t = build(1, 256 << 20).unwrap();
        let (_, dsdt) = table(&t, b"DSDT");
        let ged = dsdt.windows(4).position(|w| w == b"GED_").expect("GED_");
        let crs = ged
            + dsdt[ged..]
                .windows(4)
                .position(|w| w == b"_CRS")
                .expect("_CRS");
        // _CRS, BufferOp, PkgLength, BytePrefix, size, then the resource data.
        assert_eq!(dsdt[crs + 4], 0x11, "a buffer");
        let data = &dsdt[crs + 8..crs + 8 + usize::from(dsdt[crs + 7])];
        // One extended interrupt descriptor (0x89, 6 bytes: flags, count 1, the GSI), then
        // the end tag.
        assert_eq!(data[0], 0x89);
        assert_eq!(&data[1..3], &[6, 0]);
        assert_eq!(data[4], 1);
        assert_eq!(u32_at(data, 5), ACPI_GED_IRQ);
        assert_eq!(data[9], 0x79, "end tag right after the interrupt");
    }

    #[test]
    fn mcfg_covers_bus_zero_ecam() {
        let t = build(1, 256 << 20).unwrap();
        let (_, mcfg) = table(&t, b"MCFG");
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), PCI_MMCONFIG_START);
        assert_eq!(&mcfg[54..56], &[0, 0], "buses 0..=0");
    }
}
