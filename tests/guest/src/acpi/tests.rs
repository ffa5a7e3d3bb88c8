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
    assert_eq!(tables.apic_ids.as_slice(), [0, 1, 300]);
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
    assert_eq!(madt::enabled_cpus(&t).0, 1);
    let mut overlong = local_apic(1, 1);
    overlong[1] = 200;
    let t = madt(&[&local_apic(0, 1), &overlong]);
    assert_eq!(madt::enabled_cpus(&t).0, 1);
    assert_eq!(madt::enabled_cpus(&t).1.as_slice(), [0]);
    assert_eq!(madt::enabled_cpus(&t[..10]).0, 0);
}

#[test]
fn madt_keeps_the_first_apic_ids_and_counts_all() {
    let cpus: Vec<Vec<u8>> = (0..300).map(|id| local_x2apic(id, 1)).collect();
    let cpus: Vec<&[u8]> = cpus.iter().map(Vec::as_slice).collect();
    let (count, ids) = madt::enabled_cpus(&madt(&cpus));
    assert_eq!(count, 300);
    assert_eq!(ids.as_slice().len(), MAX_CPUS);
    assert_eq!(ids.as_slice()[255], 255);
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

// The Generic Event Device, in AML as a DSDT declares it.

const GED_BASE: u32 = 0xfed1_0000;

/// `prefix PkgLength body`, with a one- or two-byte PkgLength.
fn pkg(prefix: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    if body.len() + 1 < 64 {
        out.push((body.len() + 1) as u8);
    } else {
        let len = body.len() + 2;
        assert!(len < 1 << 12);
        out.extend_from_slice(&[0x40 | (len & 0xf) as u8, (len >> 4) as u8]);
    }
    out.extend_from_slice(body);
    out
}

fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
    [&[0x08][..], seg, value].concat()
}

fn string(s: &[u8]) -> Vec<u8> {
    [&[0x0d][..], s, &[0]].concat()
}

fn device(seg: &[u8; 4], objects: &[&[u8]]) -> Vec<u8> {
    pkg(&[0x5b, 0x82], &[&seg[..], &objects.concat()].concat())
}

/// `ResourceTemplate () { descriptors }`: a Buffer ending in an End Tag.
fn resource_template(descriptors: &[&[u8]]) -> Vec<u8> {
    let bytes = [descriptors.concat(), vec![0x79, 0x00]].concat();
    pkg(&[0x11], &[&[0x0a, bytes.len() as u8][..], &bytes].concat())
}

/// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`
fn interrupt(gsi: u32) -> Vec<u8> {
    [&[0x89, 0x06, 0x00, 0x03, 0x01][..], &gsi.to_le_bytes()].concat()
}

/// `Memory32Fixed (ReadWrite, base, len)`
fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    [
        &[0x86, 0x09, 0x00, 0x01][..],
        &base.to_le_bytes(),
        &len.to_le_bytes(),
    ]
    .concat()
}

/// `Device (GED_)` with `_HID`, `_UID`, the given `_CRS` and what reads the
/// register: `OperationRegion`, `Field` and `_EVT`.
fn ged(crs: &[&[u8]]) -> Vec<u8> {
    ged_reading(crs, &op_region(GED_BASE))
}

/// `OperationRegion (GDST, SystemMemory, base, 0x10)`
fn op_region(base: u32) -> Vec<u8> {
    named_region(b"GDST", base)
}

/// `OperationRegion (name, SystemMemory, base, 0x10)` with a DWord base.
fn named_region(name: &[u8; 4], base: u32) -> Vec<u8> {
    [
        &[0x5b, 0x80][..],
        name,
        b"\x00\x0c",
        &base.to_le_bytes(),
        &[0x0a, 0x10],
    ]
    .concat()
}

/// [`ged`] with `region` as its operation region (or none, when empty).
fn ged_reading(crs: &[&[u8]], region: &[u8]) -> Vec<u8> {
    let field = pkg(&[0x5b, 0x81], b"GDST\x01GDAT\x08");
    // Method (_EVT, 1) { Local0 = GDAT; If (Local0 & One) { Notify (PWRB, 0x80) } }
    let notify = pkg(&[0xa0], b"\x7b\x60\x01\x00\x86PWRB\x0a\x80");
    let evt = pkg(&[0x14], &[&b"_EVT\x01\x70GDAT\x60"[..], &notify].concat());
    device(
        b"GED_",
        &[
            &name(b"_HID", &string(b"ACPI0013")),
            &name(b"_UID", &[0x00]),
            &name(b"_CRS", &resource_template(crs)),
            region,
            &field,
            &evt,
        ],
    )
}

/// `Device (PWRB) { Name (_HID, EISAID ("PNP0C0C")) }`
fn power_button_device() -> Vec<u8> {
    device(b"PWRB", &[&name(b"_HID", &[0x0c, 0x41, 0xd0, 0x0c, 0x0c])])
}

/// `Scope (\_SB) { devices }`
fn sb_scope(devices: &[&[u8]]) -> Vec<u8> {
    pkg(&[0x10], &[&b"\\_SB_"[..], &devices.concat()].concat())
}

/// The DSDT body baton builds: `\_S5`, then the GED (its `_CRS` only its interrupt, its
/// register an operation region) and the power button.
fn ged_aml() -> Vec<u8> {
    let ged = ged(&[&interrupt(5)]);
    [
        &b"\x08_S5_\x12\x04\x01\x0a\x05"[..],
        &sb_scope(&[&ged, &power_button_device()]),
    ]
    .concat()
}

#[test]
fn ged_register_from_dsdt_via_dsdt_field() {
    let mut mem = hw_reduced_machine();
    mem.put(DSDT, &dsdt(&ged_aml()));
    let (tables, warnings) = parse_all(&mem, RSDP);
    let tables = tables.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(tables.power_button, Some(u64::from(GED_BASE)));
    assert_eq!(tables.fadt.unwrap().s5, Some((5, 5)));
}

#[test]
fn ged_register_from_dsdt_via_x_dsdt_field() {
    let mut mem = Mem::new();
    mem.put(RSDP, &rsdp(2, 0, ROOT));
    mem.put(ROOT, &xsdt(&[FADT]));
    mem.put(FADT, &fadt(legacy_fadt));
    mem.put(DSDT, &dsdt(&ged_aml()));
    let tables = parse_all(&mem, RSDP).0.unwrap();
    assert_eq!(tables.power_button, Some(u64::from(GED_BASE)));
}

#[test]
fn no_ged_no_power_button() {
    // A DSDT without a GED.
    let tables = parse_all(&hw_reduced_machine(), RSDP).0.unwrap();
    assert_eq!(tables.power_button, None);
    // No FADT, hence no DSDT.
    let mut mem = hw_reduced_machine();
    mem.put(DSDT, &dsdt(&ged_aml()));
    mem.put(ROOT, &xsdt(&[MADT]));
    assert_eq!(parse_all(&mem, RSDP).0.unwrap().power_button, None);
    // A DSDT with a bad checksum is not scanned.
    mem.put(ROOT, &xsdt(&[FADT, MADT]));
    mem.0[DSDT as usize + HEADER_SIZE] ^= 1;
    let (tables, warnings) = parse_all(&mem, RSDP);
    assert_eq!(tables.unwrap().power_button, None);
    assert!(matches!(warnings[..], [Error::BadChecksum { .. }]));
}

#[test]
fn ged_register_variants() {
    use aml::ged_event_register as scan;
    let found = Some((u64::from(GED_BASE), 0x10));
    let memory = memory32_fixed(GED_BASE, 0x10);
    assert_eq!(scan(&ged_aml()), found);
    // The Memory32Fixed alone, right after the string.
    let bare = [string(b"ACPI0013"), memory.clone()].concat();
    assert_eq!(scan(&bare), found);
    // Nothing at all.
    assert_eq!(scan(b""), None);
    assert_eq!(scan(&memory), None);
    // The string must be exactly "ACPI0013", as an AML String.
    let longer = [string(b"ACPI00130"), memory.clone()].concat();
    assert_eq!(scan(&longer), None);
    let no_prefix = [&b"ACPI0013\x00"[..], &memory].concat();
    assert_eq!(scan(&no_prefix), None);
    // The descriptor wins over the region.
    let both = ged_reading(&[&memory32_fixed(0xfed3_0000, 4)], &op_region(GED_BASE));
    assert_eq!(scan(&both), Some((0xfed3_0000, 4)));
    // Regression: baton's _CRS lists only the interrupt (Linux refused the GED
    // otherwise); the register is the region its _EVT reads.
    assert_eq!(scan(&ged(&[&interrupt(5)])), found);
    // A region elsewhere than in system memory is not the register.
    let io = [&b"\x5b\x80GDST\x01\x0b"[..], &[0x00, 0x06], &[0x0a, 0x10]].concat();
    assert_eq!(scan(&ged_reading(&[&interrupt(5)], &io)), None);
    // A GED with neither: the next device's descriptor or region is not taken.
    let other = device(
        b"RTC_",
        &[
            &name(b"_CRS", &resource_template(&[&memory])),
            &op_region(0xfed4_0000),
        ],
    );
    let bare_ged = ged_reading(&[&interrupt(5)], &[]);
    let aml = sb_scope(&[&bare_ged, &other]);
    assert_eq!(scan(&aml), None);
    // ... but a later GED's is.
    let second = ged(&[&memory32_fixed(0xfed2_0000, 1)]);
    let aml = sb_scope(&[&bare_ged, &other, &second]);
    assert_eq!(scan(&aml), Some((0xfed2_0000, 1)));
    // _CRS before _HID: the descriptor comes before the string.
    let crs_first = device(
        b"GED_",
        &[
            &name(b"_CRS", &resource_template(&[&memory])),
            &name(b"_HID", &string(b"ACPI0013")),
        ],
    );
    assert_eq!(scan(&crs_first), None);
    // The descriptor header must start within the window (and fit in it).
    let gap = |n: usize| [string(b"ACPI0013"), vec![0xa3; n], memory.clone()].concat();
    assert_eq!(scan(&gap(aml::GED_SEARCH_WINDOW - 3)), found);
    assert_eq!(scan(&gap(aml::GED_SEARCH_WINDOW - 2)), None);
    assert_eq!(scan(&gap(4096)), None);
    // Malformed registers.
    for (base, len) in [(0, 0x10), (GED_BASE, 0), (0xffff_fff8, 0x10)] {
        let aml = [string(b"ACPI0013"), memory32_fixed(base, len)].concat();
        assert_eq!(scan(&aml), None, "{base:#x} {len:#x}");
    }
    let aml = [string(b"ACPI0013"), memory32_fixed(0xffff_fff0, 0x10)].concat();
    assert_eq!(scan(&aml), Some((0xffff_fff0, 0x10)));
}

#[test]
fn ged_register_truncated() {
    let aml = [string(b"ACPI0013"), memory32_fixed(GED_BASE, 0x10)].concat();
    for len in 0..aml.len() {
        assert_eq!(aml::ged_event_register(&aml[..len]), None, "{len}");
    }
    // A truncated DSDT: the GED's region is cut off in its length.
    let full = ged_aml();
    let cut = full.windows(2).position(|w| w == [0x5b, 0x80]).unwrap() + 13;
    assert_eq!(aml::ged_event_register(&full[..cut]), None);
    assert!(aml::ged_event_register(&full[..cut + 1]).is_some());
    let region = [string(b"ACPI0013"), op_region(GED_BASE)].concat();
    for len in 0..region.len() {
        assert_eq!(aml::ged_event_register(&region[..len]), None, "{len}");
    }
    assert!(aml::ged_event_register(&region).is_some());
}

#[test]
fn ged_scan_survives_garbage() {
    // A fixed pseudo-random sequence, seeded with the pieces the scan looks for.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: [&[u8]; 4] = [
        b"\x0dACPI0013\x00",
        &[0x86, 0x09, 0x00],
        &[0x5b, 0x82],
        &[0xff; 4],
    ];
    for _ in 0..2000 {
        let len = (next() % 700) as usize;
        let mut aml = Vec::with_capacity(len + 16);
        while aml.len() < len {
            let r = next();
            if r % 8 == 0 {
                aml.extend_from_slice(pieces[(r >> 8) as usize % pieces.len()]);
            } else {
                aml.push(r as u8);
            }
        }
        if let Some((base, len)) = aml::ged_event_register(&aml) {
            assert!(base != 0 && len != 0 && base + u64::from(len) <= 1 << 32);
        }
        let _ = aml::s5_sleep_types(&aml);
    }
}

#[test]
fn mcfg_gives_segment0_ecam() {
    const MCFG: u64 = 0x6000;
    let mut mem = hw_reduced_machine();
    mem.put(ROOT, &xsdt(&[FADT, MADT, MCFG]));
    let mut body = vec![0u8; 8];
    // Segment 1 first (skipped), then segment 0 from bus 0.
    for (base, segment) in [(0xb000_0000u64, 1u16), (0xe000_0000, 0)] {
        body.extend_from_slice(&base.to_le_bytes());
        body.extend_from_slice(&segment.to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    mem.put(MCFG, &table(b"MCFG", &body));
    let (tables, warnings) = parse_all(&mem, RSDP);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(tables.unwrap().ecam, Some(0xe000_0000));
    // No MCFG: no ECAM.
    let (tables, _) = parse_all(&hw_reduced_machine(), RSDP);
    assert_eq!(tables.unwrap().ecam, None);
}

/// `OperationRegion (PCST, SystemMemory, base, 0x10)`
fn hotplug_region(base: u32) -> Vec<u8> {
    named_region(b"PCST", base)
}

#[test]
fn pci_hotplug_registers_from_the_pcst_region() {
    let hotplug = pkg(
        &[0x10],
        &[&b"\\\x2e_SB_PCI0"[..], &hotplug_region(0xfeb0_1000)].concat(),
    );
    let aml = [ged_aml(), hotplug].concat();
    assert_eq!(aml::pci_hotplug_registers(&aml), Some((0xfeb0_1000, 0x10)));
    let mut mem = hw_reduced_machine();
    mem.put(DSDT, &dsdt(&aml));
    let tables = parse_all(&mem, RSDP).0.unwrap();
    assert_eq!(tables.pci_hotplug, Some(0xfeb0_1000));
    assert_eq!(
        tables.power_button,
        Some(u64::from(GED_BASE)),
        "GED found too"
    );
    // Only the region so named, in SystemMemory, below 4 GiB and not at 0.
    assert_eq!(aml::pci_hotplug_registers(&ged_aml()), None);
    assert_eq!(aml::pci_hotplug_registers(&hotplug_region(0)), None);
    let mut io = hotplug_region(0x1000);
    io[6] = 0x01;
    assert_eq!(aml::pci_hotplug_registers(&io), None, "SystemIO");
    let truncated = hotplug_region(0xfeb0_1000);
    assert_eq!(aml::pci_hotplug_registers(&truncated[..9]), None);
}
