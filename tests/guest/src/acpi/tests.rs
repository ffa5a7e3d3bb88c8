use super::*;

/// Guest memory from physical address 0, as a byte vector.
struct Mem(Vec<u8>);

impl Mem {
    fn new() -> Self {
        Self(vec![0; 0x10000])
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = addr as usize;
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

impl PhysMem for Mem {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        self.0.get(start..start.checked_add(len)?)
    }
}

const RSDP: u64 = 0x1000;
const ROOT: u64 = 0x2000;
const MADT: u64 = 0x3000;
const FADT: u64 = 0x4000;
const DSDT: u64 = 0x5000;

fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    bytes[at] = 0u8.wrapping_sub(checksum(bytes));
}

fn table(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER_SIZE + body.len()) as u32).to_le_bytes());
    t.push(2); // revision
    t.push(0); // checksum
    t.extend_from_slice(b"BATON BATONTST\x01\0\0\0TEST\x01\0\0\0");
    assert_eq!(t.len(), HEADER_SIZE);
    t.extend_from_slice(body);
    fix_checksum(&mut t, 9);
    t
}

fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(b"BATON ");
    r.push(revision);
    r.extend_from_slice(&rsdt.to_le_bytes());
    fix_checksum(&mut r, 8);
    if revision >= 2 {
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0; 4]);
        fix_checksum(&mut r, 32);
    }
    r
}

fn madt(entries: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0, 0, 0xe0, 0xfe, 1, 0, 0, 0];
    for e in entries {
        body.extend_from_slice(e);
    }
    table(b"APIC", &body)
}

fn local_apic(id: u8, flags: u32) -> Vec<u8> {
    let mut e = vec![0, 8, id, id];
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn local_x2apic(id: u32, flags: u32) -> Vec<u8> {
    let mut e = vec![9, 16, 0, 0];
    e.extend_from_slice(&id.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e.extend_from_slice(&id.to_le_bytes());
    e
}

fn gas(space: u8, bit_width: u8, access_size: u8, address: u64) -> [u8; 12] {
    let mut g = [0; 12];
    g[0] = space;
    g[1] = bit_width;
    g[3] = access_size;
    g[4..].copy_from_slice(&address.to_le_bytes());
    g
}

/// A 276-byte (ACPI 6) FADT body; `edit` sets fields by table offset.
fn fadt(edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut t = table(b"FACP", &[0; 276 - HEADER_SIZE]);
    edit(&mut t);
    fix_checksum(&mut t, 9);
    t
}

fn dsdt(aml: &[u8]) -> Vec<u8> {
    table(b"DSDT", aml)
}

fn hw_reduced_fadt(t: &mut [u8]) {
    t[40..44].copy_from_slice(&(DSDT as u32).to_le_bytes());
    t[112..116].copy_from_slice(&(fadt::HW_REDUCED_ACPI | fadt::RESET_REG_SUP).to_le_bytes());
    t[116..128].copy_from_slice(&gas(1, 8, 1, 0x3c0));
    t[128] = 0x42;
    t[244..256].copy_from_slice(&gas(1, 8, 1, 0x3c1));
}

fn legacy_fadt(t: &mut [u8]) {
    t[140..148].copy_from_slice(&DSDT.to_le_bytes());
    t[64..68].copy_from_slice(&0x604u32.to_le_bytes());
    t[112..116].copy_from_slice(&fadt::RESET_REG_SUP.to_le_bytes());
    t[116..128].copy_from_slice(&gas(1, 8, 1, 0xcf9));
    t[128] = 0x06;
}

fn xsdt(addrs: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = addrs.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"XSDT", &body)
}

fn rsdt(addrs: &[u32]) -> Vec<u8> {
    let body: Vec<u8> = addrs.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"RSDT", &body)
}

fn parse_all(mem: &Mem, rsdp: u64) -> (Result<Tables, Error>, Vec<Error>) {
    let mut warnings = Vec::new();
    let tables = parse(mem, rsdp, |e| warnings.push(e));
    (tables, warnings)
}

/// What a VMM like Cloud Hypervisor builds: RSDP 2, XSDT, hardware-reduced FADT.
fn hw_reduced_machine() -> Mem {
    let mut mem = Mem::new();
    mem.put(RSDP, &rsdp(2, 0, ROOT));
    mem.put(ROOT, &xsdt(&[FADT, MADT]));
    let cpus: Vec<Vec<u8>> = vec![
        local_apic(0, 1),
        local_apic(1, 1),
        local_apic(2, 0), // disabled
        local_apic(3, 2), // online capable only
        local_x2apic(300, 1),
        vec![1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0], // an I/O APIC
    ];
    let cpus: Vec<&[u8]> = cpus.iter().map(Vec::as_slice).collect();
    mem.put(MADT, &madt(&cpus));
    mem.put(FADT, &fadt(hw_reduced_fadt));
    // Name (_S5, Package (1) { 5 })
    mem.put(
        DSDT,
        &dsdt(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05]),
    );
    mem
}

#[test]
fn hw_reduced_xsdt() {
    let mem = hw_reduced_machine();
    let (tables, warnings) = parse_all(&mem, RSDP);
    let tables = tables.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(tables.cpus, Some(3));
    let fadt = tables.fadt.unwrap();
    assert_eq!(fadt.s5, Some((5, 5)));
    assert_eq!(
        fadt.poweroff_writes(),
        [
            Some(RegWrite::Io {
                port: 0x3c1,
                bytes: 1,
                value: (5 << 2) | (1 << 5)
            }),
            None
        ]
    );
    assert_eq!(
        reset_writes(Some(&fadt))[0],
        Some(RegWrite::Io {
            port: 0x3c0,
            bytes: 1,
            value: 0x42
        })
    );
}

#[test]
fn legacy_rsdt() {
    let mut mem = Mem::new();
    mem.put(RSDP, &rsdp(0, ROOT as u32, 0));
    mem.put(ROOT, &rsdt(&[MADT as u32, FADT as u32]));
    mem.put(MADT, &madt(&[&local_apic(0, 1)]));
    mem.put(FADT, &fadt(legacy_fadt));
    // Scope (\) { Name (\_S5, Package (4) { Zero, Zero, Zero, Zero }) } as QEMU writes it,
    // with a two-byte PkgLength for good measure.
    mem.put(
        DSDT,
        &dsdt(&[
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x46, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
        ]),
    );
    let (tables, warnings) = parse_all(&mem, RSDP);
    let tables = tables.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(tables.cpus, Some(1));
    let fadt = tables.fadt.unwrap();
    assert_eq!(fadt.s5, Some((0, 0)));
    assert_eq!(
        fadt.poweroff_writes(),
        [
            Some(RegWrite::Io {
                port: 0x604,
                bytes: 2,
                value: 1 << 13
            }),
            None
        ]
    );
    assert_eq!(
        reset_writes(Some(&fadt)),
        [
            Some(RegWrite::Io {
                port: 0xcf9,
                bytes: 1,
                value: 6
            }),
            Some(RegWrite::Io {
                port: 0x64,
                bytes: 1,
                value: 0xfe
            }),
            Some(RegWrite::Io {
                port: 0xcf9,
                bytes: 1,
                value: 6
            }),
        ]
    );
}

#[test]
fn no_s5_uses_default_sleep_type() {
    let mut mem = hw_reduced_machine();
    mem.put(DSDT, &dsdt(&[0x10, 0x05, b'\\', b'_', b'S', b'B', b'_']));
    let fadt = parse_all(&mem, RSDP).0.unwrap().fadt.unwrap();
    assert_eq!(fadt.s5, None);
    assert_eq!(
        fadt.poweroff_writes()[0],
        Some(RegWrite::Io {
            port: 0x3c1,
            bytes: 1,
            value: (5 << 2) | (1 << 5)
        })
    );
}

#[test]
fn no_fadt_resets_through_legacy_ports() {
    let writes = reset_writes(None);
    assert_eq!(writes[0], None);
    assert!(writes[1].is_some() && writes[2].is_some());
}

#[test]
fn bad_rsdp_is_an_error() {
    let mut mem = hw_reduced_machine();
    assert_eq!(parse_all(&mem, 0).0, Err(Error::NoRsdp));
    assert!(matches!(
        parse_all(&mem, 0xffff_fff0).0,
        Err(Error::Unreadable { .. })
    ));
    assert!(matches!(
        parse_all(&mem, RSDP + 1).0,
        Err(Error::BadSignature { .. })
    ));
    mem.0[RSDP as usize + 9] ^= 1; // OEM ID: breaks the checksum
    assert!(matches!(
        parse_all(&mem, RSDP).0,
        Err(Error::BadChecksum { .. })
    ));
}

#[test]
fn bad_xsdt_falls_back_to_rsdt() {
    let mut mem = hw_reduced_machine();
    mem.put(RSDP, &rsdp(2, 0x6000, ROOT));
    mem.put(0x6000, &rsdt(&[MADT as u32]));
    mem.0[ROOT as usize + 20] ^= 1; // breaks the XSDT checksum
    let (tables, warnings) = parse_all(&mem, RSDP);
    assert_eq!(tables.unwrap().cpus, Some(3));
    assert!(matches!(warnings[..], [Error::BadChecksum { .. }]));
}

#[test]
fn bad_tables_are_skipped_with_a_warning() {
    let mut mem = hw_reduced_machine();
    mem.0[MADT as usize + 40] ^= 1; // breaks the MADT checksum
    mem.put(FADT + 4, &u32::MAX.to_le_bytes()); // absurd FADT length
    let (tables, warnings) = parse_all(&mem, RSDP);
    assert_eq!(tables.unwrap(), Tables::default());
    assert_eq!(warnings.len(), 2, "{warnings:?}");
}

#[test]
fn root_entries_pointing_nowhere_are_skipped() {
    let mut mem = Mem::new();
    mem.put(RSDP, &rsdp(2, 0, ROOT));
    mem.put(ROOT, &xsdt(&[0, 0xdead_beef_0000, MADT]));
    mem.put(MADT, &madt(&[&local_apic(0, 1), &local_apic(1, 1)]));
    let (tables, warnings) = parse_all(&mem, RSDP);
    assert_eq!(tables.unwrap().cpus, Some(2));
    assert_eq!(warnings.len(), 2);
}

#[test]
fn madt_walk_stops_at_impossible_entries() {
    let zero_len = [0u8, 0, 0, 0];
    let t = madt(&[&local_apic(0, 1), &zero_len, &local_apic(1, 1)]);
    assert_eq!(madt::enabled_cpus(&t), 1);
    let mut overlong = local_apic(1, 1);
    overlong[1] = 200;
    let t = madt(&[&local_apic(0, 1), &overlong]);
    assert_eq!(madt::enabled_cpus(&t), 1);
    assert_eq!(madt::enabled_cpus(&t[..10]), 0);
}

#[test]
fn short_fadt_has_no_late_fields() {
    let t = table(b"FACP", &[0; 116 - HEADER_SIZE]);
    let f = Fadt::parse(&t);
    assert_eq!(
        (f.reset_reg, f.sleep_control_reg, f.x_pm1a_cnt_blk),
        (None, None, None)
    );
    assert_eq!(f.poweroff_writes(), [None, None]);
}

#[test]
fn gas_widths_and_spaces() {
    let g = Gas::parse(&gas(0, 32, 0, 0xfed0_0000), 0).unwrap();
    assert_eq!(
        g.write(7, 1),
        Some(RegWrite::Memory {
            addr: 0xfed0_0000,
            bytes: 4,
            value: 7
        })
    );
    let g = Gas::parse(&gas(1, 0, 2, 0x600), 0).unwrap();
    assert_eq!(
        g.write(7, 1),
        Some(RegWrite::Io {
            port: 0x600,
            bytes: 2,
            value: 7
        })
    );
    // No width given: the caller's default.
    let g = Gas::parse(&gas(1, 0, 0, 0x600), 0).unwrap();
    assert!(matches!(g.write(7, 1), Some(RegWrite::Io { bytes: 1, .. })));
    // Ports above 0xffff and unknown spaces are refused.
    assert_eq!(
        Gas::parse(&gas(1, 8, 1, 0x1_0000), 0).unwrap().write(1, 1),
        None
    );
    assert_eq!(
        Gas::parse(&gas(2, 8, 1, 0xcf8), 0).unwrap().write(1, 1),
        None
    );
    // Address 0 means absent.
    assert_eq!(Gas::parse(&gas(1, 8, 1, 0), 0), None);
}

#[test]
fn aml_s5_variants() {
    use aml::s5_sleep_types;
    assert_eq!(
        s5_sleep_types(b"\x08_S5_\x12\x06\x02\x0a\x07\x01"),
        Some((7, 1))
    );
    assert_eq!(
        s5_sleep_types(b"\x08_S5_\x12\x06\x02\x0b\x05\x00"),
        Some((5, 5))
    );
    // Not a Name declaration (e.g. a reference): ignored.
    assert_eq!(s5_sleep_types(b"\x70_S5_\x12\x06\x02\x00\x00"), None);
    // Truncated.
    assert_eq!(s5_sleep_types(b"\x08_S5_\x12"), None);
    assert_eq!(s5_sleep_types(b"\x08_S5_\x12\x06\x02\x0a"), None);
    assert_eq!(s5_sleep_types(b""), None);
}
