//! The PVH boot ABI's `struct hvm_start_info` and its memory map.
//!
//! The loader passes the structure's physical address in `%ebx`. Layout
//! (Xen `public/arch-x86/hvm/start_info.h`, all little-endian):
//!
//! | offset | field              | since      |
//! |--------|--------------------|------------|
//! | 0      | magic `0x336ec578` | version 0  |
//! | 4      | version            | version 0  |
//! | 8      | flags              | version 0  |
//! | 12     | nr_modules         | version 0  |
//! | 16     | modlist_paddr u64  | version 0  |
//! | 24     | cmdline_paddr u64  | version 0  |
//! | 32     | rsdp_paddr u64     | version 0  |
//! | 40     | memmap_paddr u64   | version 1  |
//! | 48     | memmap_entries u32 | version 1  |
//! | 52     | reserved u32       | version 1  |
//!
//! Memory map entries are `{ u64 addr; u64 size; u32 type; u32 reserved }`.

use core::fmt;

use crate::bytes::{u32_at, u64_at};

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Bytes of a version 1 `hvm_start_info`; read this many.
pub const SIZE: usize = 56;
/// Bytes of a version 0 `hvm_start_info`, which has no memory map.
pub const SIZE_V0: usize = 40;
/// Bytes of one memory map entry.
pub const MEMMAP_ENTRY_SIZE: usize = 24;
/// Memory map entries beyond this many are ignored (real maps have a handful).
pub const MAX_MEMMAP_ENTRIES: usize = 128;
/// Memory map type of usable RAM.
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// Longest command line read; a missing NUL ends it here.
pub const MAX_CMDLINE: usize = 4096;

/// The fields of `hvm_start_info` the guest uses. Zero means absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartInfo {
    /// Structure version.
    pub version: u32,
    /// Physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version 1).
    pub memmap_paddr: u64,
    /// Entries in the memory map (version 1).
    pub memmap_entries: u32,
}

impl StartInfo {
    /// Bytes to read at `memmap_paddr`, capped at [`MAX_MEMMAP_ENTRIES`].
    pub fn memmap_len(&self) -> usize {
        let entries = usize::try_from(self.memmap_entries).unwrap_or(usize::MAX);
        entries.min(MAX_MEMMAP_ENTRIES) * MEMMAP_ENTRY_SIZE
    }
}

/// Why `hvm_start_info` could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than a version 0 structure.
    TooShort,
    /// Not the PVH magic: not booted through PVH, or a bad pointer.
    BadMagic(u32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => f.write_str("too short"),
            Self::BadMagic(m) => write!(f, "bad magic {m:#x}"),
        }
    }
}

/// Parses the structure from its first [`SIZE`] (or at least [`SIZE_V0`]) bytes.
pub fn parse(bytes: &[u8]) -> Result<StartInfo, Error> {
    let field32 = |off| u32_at(bytes, off).ok_or(Error::TooShort);
    let field64 = |off| u64_at(bytes, off).ok_or(Error::TooShort);
    let magic = field32(0)?;
    if magic != MAGIC {
        return Err(Error::BadMagic(magic));
    }
    let version = field32(4)?;
    let mut info = StartInfo {
        version,
        cmdline_paddr: field64(24)?,
        rsdp_paddr: field64(32)?,
        ..StartInfo::default()
    };
    if version >= 1 {
        if let (Some(paddr), Some(entries)) = (u64_at(bytes, 40), u32_at(bytes, 48)) {
            info.memmap_paddr = paddr;
            info.memmap_entries = entries;
        }
    }
    Ok(info)
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type: 1 RAM, 2 reserved, 3 ACPI, 4 NVS, ...
    pub kind: u32,
}

/// The entries in a memory map; a trailing partial entry is ignored.
pub fn memmap(bytes: &[u8]) -> impl Iterator<Item = MemmapEntry> + '_ {
    bytes.chunks_exact(MEMMAP_ENTRY_SIZE).filter_map(|e| {
        Some(MemmapEntry {
            addr: u64_at(e, 0)?,
            size: u64_at(e, 8)?,
            kind: u32_at(e, 16)?,
        })
    })
}

/// Total size of the RAM entries in a memory map.
pub fn ram_bytes(memmap_bytes: &[u8]) -> u64 {
    memmap(memmap_bytes)
        .filter(|e| e.kind == MEMMAP_TYPE_RAM)
        .fold(0u64, |sum, e| sum.saturating_add(e.size))
}

/// The bytes before the first NUL (all of them if there is none).
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_info(version: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&[0; 8]); // flags, nr_modules
        b.extend_from_slice(&0u64.to_le_bytes()); // modlist
        b.extend_from_slice(&0x2000u64.to_le_bytes()); // cmdline
        b.extend_from_slice(&0xf0000u64.to_le_bytes()); // rsdp
        b.extend_from_slice(&0x3000u64.to_le_bytes()); // memmap
        b.extend_from_slice(&3u32.to_le_bytes()); // entries
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }

    fn entry(addr: u64, size: u64, kind: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }

    #[test]
    fn parses_version_1() {
        let info = parse(&start_info(1)).unwrap();
        assert_eq!(
            info,
            StartInfo {
                version: 1,
                cmdline_paddr: 0x2000,
                rsdp_paddr: 0xf0000,
                memmap_paddr: 0x3000,
                memmap_entries: 3,
            }
        );
        assert_eq!(info.memmap_len(), 72);
    }

    #[test]
    fn version_0_has_no_memmap() {
        let info = parse(&start_info(0)).unwrap();
        assert_eq!((info.memmap_paddr, info.memmap_entries), (0, 0));
        let info = parse(&start_info(1)[..SIZE_V0]).unwrap();
        assert_eq!(info.memmap_entries, 0);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(&[0; 56]), Err(Error::BadMagic(0)));
        assert_eq!(parse(&start_info(1)[..30]), Err(Error::TooShort));
        assert_eq!(parse(&[]), Err(Error::TooShort));
    }

    #[test]
    fn huge_entry_count_is_capped() {
        let info = StartInfo {
            memmap_entries: u32::MAX,
            ..StartInfo::default()
        };
        assert_eq!(info.memmap_len(), MAX_MEMMAP_ENTRIES * MEMMAP_ENTRY_SIZE);
    }

    #[test]
    fn sums_ram_only() {
        let mut map = entry(0, 0x9fc00, 1);
        map.extend(entry(0x9fc00, 0x400, 2));
        map.extend(entry(0x100000, 0x1ff00000, 1));
        map.extend(entry(0xfeff_c000, 0x4000, 2));
        map.extend(&[1, 2, 3]); // partial entry
        assert_eq!(ram_bytes(&map), 0x9fc00 + 0x1ff00000);
        assert_eq!(memmap(&map).count(), 4);
        assert_eq!(ram_bytes(&entry(0, u64::MAX, 1).repeat(2)), u64::MAX);
    }

    #[test]
    fn cmdline_ends_at_nul() {
        assert_eq!(until_nul(b"a=1 b=2\0junk"), b"a=1 b=2");
        assert_eq!(until_nul(b"no nul"), b"no nul");
        assert_eq!(until_nul(b"\0"), b"");
    }
}
