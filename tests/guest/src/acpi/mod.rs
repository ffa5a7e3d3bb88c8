//! Finding and validating the ACPI tables the guest needs.
//!
//! From the RSDP (`start_info.rsdp_paddr`) through the XSDT (RSDP revision 2+)
//! or RSDT (revision 0, or a bad XSDT) to the MADT, which gives the processors
//! (their count and APIC IDs), and the FADT, which gives the power-off and
//! reset registers. The FADT points to the DSDT, which is scanned for the
//! `\_S5` sleep type and for the event register of a Generic Event Device,
//! where the VMM signals the power button.
//!
//! Tables come from the VMM and are not trusted: every signature, length and
//! checksum is checked before a table is used, lengths are capped, and memory
//! is only reached through [`PhysMem`], which decides what may be read.

mod aml;
mod fadt;
mod madt;

use core::fmt;

pub use fadt::{reset_writes, Fadt, Gas, RegWrite};
pub use madt::{ApicIds, MAX_CPUS};

use crate::bytes::{u32_at, u64_at, u8_at};
use crate::text::Printable;

/// Read access to guest-physical memory.
pub trait PhysMem {
    /// The `len` bytes at physical address `addr`, or `None` if that range
    /// must not be read.
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// Size of the common header of every system description table.
pub const HEADER_SIZE: usize = 36;
/// Longest table read; real ones are a few KiB.
pub const MAX_TABLE_LEN: usize = 1 << 20;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_SIZE: usize = 20;
const RSDP_V2_SIZE: usize = 36;
const RSDP_MAX_SIZE: usize = 4096;

/// What the guest takes from ACPI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Enabled processors in the first valid MADT, if there is one.
    pub cpus: Option<u32>,
    /// Their APIC IDs, in MADT order.
    pub apic_ids: ApicIds,
    /// The first valid FADT.
    pub fadt: Option<Fadt>,
    /// Physical address of the Generic Event Device's event register (one
    /// byte, read-to-clear; [`GED_EVENT_POWER_BUTTON`] is the power button),
    /// from the DSDT of the first valid FADT.
    pub power_button: Option<u64>,
    /// Physical address of the PCI hot-plug registers (see
    /// [`aml::pci_hotplug_registers`]), from the same DSDT.
    pub pci_hotplug: Option<u64>,
    /// Base of the PCI ECAM window for segment 0, bus 0 onwards, from the
    /// first valid MCFG.
    pub ecam: Option<u64>,
}

/// Event register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// Event register bit: PCI slots changed (read the hot-plug registers).
pub const GED_EVENT_PCI_HOTPLUG: u8 = 1 << 1;

/// A problem with one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `rsdp_paddr` is 0: the VMM passed no ACPI tables.
    NoRsdp,
    /// The table's memory may not be read.
    Unreadable {
        /// Table name.
        table: Signature,
        /// Physical address.
        addr: u64,
    },
    /// The signature is not the one expected.
    BadSignature {
        /// Expected table name.
        table: Signature,
        /// Physical address.
        addr: u64,
    },
    /// The length field is too small or too large.
    BadLength {
        /// Table name.
        table: Signature,
        /// Physical address.
        addr: u64,
        /// The length field.
        len: u32,
    },
    /// The bytes do not sum to zero.
    BadChecksum {
        /// Table name.
        table: Signature,
        /// Physical address.
        addr: u64,
    },
}

/// A table's name: its signature, or what it was expected to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature(pub [u8; 4]);

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Printable(&self.0), f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRsdp => f.write_str("no RSDP (rsdp_paddr is 0)"),
            Self::Unreadable { table, addr } => write!(f, "{table} at {addr:#x} is not readable"),
            Self::BadSignature { table, addr } => write!(f, "no {table} signature at {addr:#x}"),
            Self::BadLength { table, addr, len } => {
                write!(f, "{table} at {addr:#x} has bad length {len}")
            }
            Self::BadChecksum { table, addr } => write!(f, "{table} at {addr:#x} has bad checksum"),
        }
    }
}

/// Reads the tables reachable from the RSDP at `rsdp_paddr`.
///
/// An unusable RSDP or root table is an error; a bad table listed in the root
/// table is reported to `warn` and skipped.
pub fn parse(
    mem: &impl PhysMem,
    rsdp_paddr: u64,
    mut warn: impl FnMut(Error),
) -> Result<Tables, Error> {
    let root = root_table(mem, rsdp_paddr, &mut warn)?;
    let mut tables = Tables::default();
    for addr in root.entries() {
        let header = match read_header(mem, addr, None) {
            Ok(header) => header,
            Err(e) => {
                warn(e);
                continue;
            }
        };
        let wanted = match &header.signature.0 {
            b"APIC" => tables.cpus.is_none(),
            b"FACP" => tables.fadt.is_none(),
            b"MCFG" => tables.ecam.is_none(),
            _ => false,
        };
        if !wanted {
            continue;
        }
        let table = match read_body(mem, &header) {
            Ok(table) => table,
            Err(e) => {
                warn(e);
                continue;
            }
        };
        if header.signature.0 == *b"APIC" {
            let (cpus, ids) = madt::enabled_cpus(table);
            tables.cpus = Some(cpus);
            tables.apic_ids = ids;
        } else if header.signature.0 == *b"MCFG" {
            tables.ecam = mcfg_segment0(table);
        } else {
            let mut fadt = Fadt::parse(table);
            if let Some(aml) = dsdt_aml(mem, fadt.dsdt, &mut warn) {
                fadt.s5 = aml::s5_sleep_types(aml);
                tables.power_button = aml::ged_event_register(aml).map(|(base, _)| base);
                tables.pci_hotplug = aml::pci_hotplug_registers(aml).map(|(base, _)| base);
            }
            tables.fadt = Some(fadt);
        }
    }
    Ok(tables)
}

/// The AML body of the DSDT at `addr` (the table without its header), if
/// there is one and it is valid.
fn dsdt_aml<'m>(
    mem: &'m impl PhysMem,
    addr: u64,
    warn: &mut impl FnMut(Error),
) -> Option<&'m [u8]> {
    if addr == 0 {
        return None;
    }
    match load_table(mem, addr, *b"DSDT") {
        Ok(dsdt) => dsdt.get(HEADER_SIZE..),
        Err(e) => {
            warn(e);
            None
        }
    }
}

/// The XSDT or RSDT.
struct Root<'a> {
    table: &'a [u8],
    entry_size: usize,
}

impl Root<'_> {
    fn entries(&self) -> impl Iterator<Item = u64> + '_ {
        self.table[HEADER_SIZE..]
            .chunks_exact(self.entry_size)
            .filter_map(|e| match e.len() {
                8 => u64_at(e, 0),
                _ => u32_at(e, 0).map(u64::from),
            })
    }
}

fn root_table<'m>(
    mem: &'m impl PhysMem,
    rsdp_paddr: u64,
    warn: &mut impl FnMut(Error),
) -> Result<Root<'m>, Error> {
    let rsdp_name = Signature(*b"RSDP");
    if rsdp_paddr == 0 {
        return Err(Error::NoRsdp);
    }
    let unreadable = Error::Unreadable {
        table: rsdp_name,
        addr: rsdp_paddr,
    };
    let v1 = mem.read(rsdp_paddr, RSDP_V1_SIZE).ok_or(unreadable)?;
    if v1[..8] != RSDP_SIGNATURE[..] {
        return Err(Error::BadSignature {
            table: rsdp_name,
            addr: rsdp_paddr,
        });
    }
    let bad_checksum = Error::BadChecksum {
        table: rsdp_name,
        addr: rsdp_paddr,
    };
    if checksum(v1) != 0 {
        return Err(bad_checksum);
    }
    let rsdt = u32_at(v1, 16).map_or(0, u64::from);
    if u8_at(v1, 15).unwrap_or(0) >= 2 {
        match xsdt_address(mem, rsdp_paddr) {
            Ok(0) => {}
            Ok(xsdt) => match load_table(mem, xsdt, *b"XSDT") {
                Ok(table) => {
                    return Ok(Root {
                        table,
                        entry_size: 8,
                    })
                }
                Err(e) if rsdt != 0 => warn(e),
                Err(e) => return Err(e),
            },
            Err(e) if rsdt != 0 => warn(e),
            Err(e) => return Err(e),
        }
    }
    let table = load_table(mem, rsdt, *b"RSDT")?;
    Ok(Root {
        table,
        entry_size: 4,
    })
}

/// The XSDT address from a revision 2+ RSDP, after checking its extended checksum.
fn xsdt_address(mem: &impl PhysMem, rsdp_paddr: u64) -> Result<u64, Error> {
    let table = Signature(*b"RSDP");
    let addr = rsdp_paddr;
    let v2 = mem
        .read(addr, RSDP_V2_SIZE)
        .ok_or(Error::Unreadable { table, addr })?;
    let len = u32_at(v2, 20).unwrap_or(0);
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    if !(RSDP_V2_SIZE..=RSDP_MAX_SIZE).contains(&size) {
        return Err(Error::BadLength { table, addr, len });
    }
    let full = mem
        .read(addr, size)
        .ok_or(Error::Unreadable { table, addr })?;
    if checksum(full) != 0 {
        return Err(Error::BadChecksum { table, addr });
    }
    Ok(u64_at(v2, 24).unwrap_or(0))
}

/// A table's address, signature and length, before its body is read.
struct Header {
    addr: u64,
    signature: Signature,
    len: usize,
}

fn read_header(mem: &impl PhysMem, addr: u64, expected: Option<[u8; 4]>) -> Result<Header, Error> {
    let name = Signature(expected.unwrap_or(*b"????"));
    let header = mem
        .read(addr, HEADER_SIZE)
        .ok_or(Error::Unreadable { table: name, addr })?;
    let signature = Signature([header[0], header[1], header[2], header[3]]);
    if expected.is_some_and(|e| e != signature.0) {
        return Err(Error::BadSignature { table: name, addr });
    }
    let len = u32_at(header, 4).unwrap_or(0);
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    if !(HEADER_SIZE..=MAX_TABLE_LEN).contains(&size) {
        return Err(Error::BadLength {
            table: signature,
            addr,
            len,
        });
    }
    Ok(Header {
        addr,
        signature,
        len: size,
    })
}

fn read_body<'m>(mem: &'m impl PhysMem, header: &Header) -> Result<&'m [u8], Error> {
    let (table, addr) = (header.signature, header.addr);
    let bytes = mem
        .read(addr, header.len)
        .ok_or(Error::Unreadable { table, addr })?;
    if checksum(bytes) != 0 {
        return Err(Error::BadChecksum { table, addr });
    }
    Ok(bytes)
}

/// Reads and validates the table with signature `expected` at `addr`.
fn load_table(mem: &impl PhysMem, addr: u64, expected: [u8; 4]) -> Result<&[u8], Error> {
    read_body(mem, &read_header(mem, addr, Some(expected))?)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

#[cfg(test)]
mod tests;

/// The ECAM base of segment 0 starting at bus 0 in a validated MCFG: after
/// the header and 8 reserved bytes come 16-byte entries `{ u64 base; u16
/// segment; u8 start_bus; u8 end_bus; u32 reserved }`.
fn mcfg_segment0(table: &[u8]) -> Option<u64> {
    table
        .get(HEADER_SIZE + 8..)?
        .chunks_exact(16)
        .find(|e| u16::from_le_bytes([e[8], e[9]]) == 0 && e[10] == 0)
        .and_then(|e| u64_at(e, 0))
}
