//! Just enough AML for three objects: the sleep type for "soft off" (`\_S5`),
//! the event register of the Generic Event Device (`ACPI0013`) and the PCI
//! hot-plug registers (the `PCST` region).
//!
//! A full AML interpreter is far beyond this guest. These scans find the one
//! encoding each object is given in practice, as simple OS loaders do, and
//! give up on anything else (the caller then uses a default, or goes without).
//!
//! * Firmware declares `\_S5` as `Name (_S5, Package () { SLP_TYPa, SLP_TYPb,
//!   ... })`, which DSDTs encode as `NameOp '_S5_' PackageOp PkgLength
//!   NumElements <integers>`.
//! * A hardware-reduced platform's Generic Event Device has
//!   `Name (_HID, "ACPI0013")` and either, in its `_CRS` resource template, a
//!   `Memory32Fixed` descriptor for the event register, or (as baton's, whose
//!   `_CRS` holds only its interrupt because Linux's GED driver refuses anything
//!   else) an `OperationRegion` in `SystemMemory` that its `_EVT` reads. The
//!   scan takes the first such descriptor, or else the first such region,
//!   within [`GED_SEARCH_WINDOW`] bytes after the string and before the next
//!   `Device` opcode; a GED that lists them before `_HID` is not recognised.
//! * baton's DSDT declares its PCI hot-plug registers as `OperationRegion
//!   (PCST, SystemMemory, base, 16)`, laid out `PCIU`, `PCID`, `B0EJ`,
//!   `PSEG` (32 bits each), which its `_EVT` and slot `_EJ0` methods use; the
//!   scan takes the first region so named.

const NAME_OP: u8 = 0x08;
const ROOT_CHAR: u8 = b'\\';
const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;

/// `"ACPI0013"`, the Generic Event Device's hardware ID, as an AML String:
/// StringPrefix, the characters, NUL.
const GED_HID: &[u8] = b"\x0dACPI0013\x00";
/// A Memory32Fixed resource descriptor's header: large item 0x06 (tag byte
/// 0x86) and its 16-bit length, 9. Then one info byte (bit 0: writable), the
/// base (u32, at offset 4) and the length (u32, at offset 8).
const MEMORY32_FIXED: &[u8] = &[0x86, 0x09, 0x00];
/// ExtOpPrefix DeviceOp: the start of the next device, where the search stops.
const DEVICE_OP: &[u8] = &[0x5b, 0x82];
/// ExtOpPrefix OpRegionOp, then a NameSeg, the region space, offset and length.
const OP_REGION_OP: &[u8] = &[0x5b, 0x80];
/// The name of the PCI hot-plug register region.
const PCI_HOTPLUG_REGION: &[u8] = b"PCST";
/// The `SystemMemory` region space.
const SYSTEM_MEMORY: u8 = 0x00;
const QWORD_PREFIX: u8 = 0x0e;
/// How far after the GED's `_HID` string its event register's descriptor may start.
pub const GED_SEARCH_WINDOW: usize = 512;
/// Addresses a 32-bit descriptor may reach.
const LIMIT_32: u64 = 1 << 32;

/// SLP_TYP is a 3-bit field.
const SLP_TYP_MASK: u64 = 0x7;

/// `(SLP_TYPa, SLP_TYPb)` from the first `Name (_S5, Package ...)` in an AML
/// body (the DSDT without its header). SLP_TYPb is SLP_TYPa if absent.
pub fn s5_sleep_types(aml: &[u8]) -> Option<(u8, u8)> {
    let at = aml.windows(4).enumerate().find_map(|(i, w)| {
        let named = (i >= 1 && aml[i - 1] == NAME_OP)
            || (i >= 2 && aml[i - 1] == ROOT_CHAR && aml[i - 2] == NAME_OP);
        (w == b"_S5_" && named).then_some(i + 4)
    })?;
    let rest = aml.get(at..)?;
    if *rest.first()? != PACKAGE_OP {
        return None;
    }
    // PkgLength: bits 7-6 of the lead byte count the bytes that follow it.
    let pkg_length_bytes = 1 + usize::from(rest.get(1)? >> 6);
    let mut elements = rest.get(1 + pkg_length_bytes + 1..)?;
    let a = integer(&mut elements)?;
    let b = integer(&mut elements).unwrap_or(a);
    Some((a, b))
}

/// Decodes one AML integer constant, advancing past it; masked to SLP_TYP.
fn integer(aml: &mut &[u8]) -> Option<u8> {
    u8::try_from(wide_integer(aml)? & SLP_TYP_MASK).ok()
}

/// `(base, length)` of the Generic Event Device's event register: the first
/// `Memory32Fixed` descriptor after an AML String `"ACPI0013"` in an AML body
/// (see the module documentation for how far it looks). `None` if there is
/// none, or it is truncated, empty, at address 0 or runs past 4 GiB. If the
/// string occurs more than once, the first occurrence that yields a register
/// wins.
pub fn ged_event_register(aml: &[u8]) -> Option<(u64, u32)> {
    (0..aml.len())
        .filter(|&i| aml[i..].starts_with(GED_HID))
        .find_map(|i| {
            let start = i + GED_HID.len();
            memory32_fixed_after(aml, start).or_else(|| system_memory_region_after(aml, start))
        })
}

/// The first `OperationRegion (NAME, SystemMemory, base, length)` in the window after
/// `start`, before the next device, with integer constants for base and length.
fn system_memory_region_after(aml: &[u8], start: usize) -> Option<(u64, u32)> {
    region_at(aml, in_this_device(aml, start, OP_REGION_OP)?)
}

/// `(base, length)` of the first `OperationRegion (PCST, SystemMemory, ...)`
/// with integer constants for base and length, if it lies below 4 GiB.
pub fn pci_hotplug_registers(aml: &[u8]) -> Option<(u64, u32)> {
    let mut needle = [0u8; 6];
    needle[..2].copy_from_slice(OP_REGION_OP);
    needle[2..].copy_from_slice(PCI_HOTPLUG_REGION);
    let at = find(aml, &needle)?;
    region_at(aml, at)
}

/// The SystemMemory region whose `OperationRegion` opcode starts at `at`.
fn region_at(aml: &[u8], at: usize) -> Option<(u64, u32)> {
    // OpRegionOp (2), NameSeg (4), RegionSpace (1), then two integer terms.
    let mut rest = aml.get(at + 6..)?;
    if *rest.first()? != SYSTEM_MEMORY {
        return None;
    }
    rest = &rest[1..];
    let base = wide_integer(&mut rest)?;
    let len = u32::try_from(wide_integer(&mut rest)?).ok()?;
    let end = base.checked_add(u64::from(len))?;
    (base != 0 && len != 0 && end <= LIMIT_32).then_some((base, len))
}

/// Decodes one AML integer constant whole, advancing past it.
fn wide_integer(aml: &mut &[u8]) -> Option<u64> {
    let (&op, rest) = aml.split_first()?;
    let (value, size) = match op {
        ZERO_OP => (0, 0),
        ONE_OP => (1, 0),
        BYTE_PREFIX => (u64::from(*rest.first()?), 1),
        WORD_PREFIX => (u64::from(crate::bytes::u16_at(rest, 0)?), 2),
        DWORD_PREFIX => (u64::from(crate::bytes::u32_at(rest, 0)?), 4),
        QWORD_PREFIX => (crate::bytes::u64_at(rest, 0)?, 8),
        _ => return None,
    };
    *aml = &rest[size..];
    Some(value)
}

/// Where `needle` first starts within [`GED_SEARCH_WINDOW`] bytes after `start`, before the
/// next device, as an index into `aml`.
fn in_this_device(aml: &[u8], start: usize, needle: &[u8]) -> Option<usize> {
    let window = aml.get(start..)?;
    let window = &window[..window.len().min(GED_SEARCH_WINDOW)];
    let at = find(window, needle)?;
    if find(window, DEVICE_OP).is_some_and(|device| device < at) {
        return None;
    }
    Some(start + at)
}

fn memory32_fixed_after(aml: &[u8], start: usize) -> Option<(u64, u32)> {
    // The descriptor may run past the window, but not past the AML.
    let descriptor = aml.get(in_this_device(aml, start, MEMORY32_FIXED)?..)?;
    let base = crate::bytes::u32_at(descriptor, 4)?;
    let len = crate::bytes::u32_at(descriptor, 8)?;
    let end = u64::from(base) + u64::from(len);
    (base != 0 && len != 0 && end <= LIMIT_32).then_some((u64::from(base), len))
}

/// Where `needle` first starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
