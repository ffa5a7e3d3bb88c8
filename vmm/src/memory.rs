//! Guest RAM: its ranges around the PCI hole, its backing (anonymous or memfd), and the
//! memory map the guest is told about (e820 / PVH).

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::*;

/// Guest memory as baton uses it everywhere (with the bitmap of pages devices wrote).
pub type GuestMemory = devices::virtio::GuestMemory;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More memory than the host has.
    #[error("Memory size {requested} MiB exceeds the host's {available} MiB of RAM and swap")]
    TooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host RAM plus swap, MiB.
        available: u64,
    },
    /// memfd creation or sizing failed.
    #[error("Cannot create shared memory for guest RAM")]
    Memfd(#[source] std::io::Error),
    /// mmap failed.
    #[error("Cannot map guest RAM")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the regions.
    #[error("Cannot assemble guest RAM regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// /proc/meminfo unreadable.
    #[error("Cannot read host memory size from /proc/meminfo")]
    MemInfo(#[source] std::io::Error),
}

/// The guest-physical RAM ranges for `size` bytes: below the 3 GiB hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MEM_32BIT_RESERVED_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(RAM_64BIT_START), size - low));
    }
    ranges
}

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820_RAM or E820_RESERVED.
    pub kind: u32,
}

/// The memory map for a guest with `size` bytes of RAM.
pub fn memory_map(size: u64) -> Vec<MapEntry> {
    let ranges = ram_ranges(size);
    let low_end = ranges[0].1;
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MapEntry {
            addr: ACPI_START,
            size: ACPI_SIZE,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIGH_RAM_START {
        map.push(MapEntry {
            addr: HIGH_RAM_START,
            size: low_end - HIGH_RAM_START,
            kind: E820_RAM,
        });
    }
    // Linux only trusts an MCFG window that the firmware also reserves.
    map.push(MapEntry {
        addr: PCI_MMCONFIG_START,
        size: PCI_MMCONFIG_SIZE,
        kind: E820_RESERVED,
    });
    if let Some(&(start, len)) = ranges.get(1) {
        map.push(MapEntry {
            addr: start.0,
            size: len,
            kind: E820_RAM,
        });
    }
    map
}

/// Host RAM plus swap in bytes, from /proc/meminfo.
fn host_memory() -> Result<u64, Error> {
    let info = std::fs::read_to_string("/proc/meminfo").map_err(Error::MemInfo)?;
    let kib = |key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((kib("MemTotal:") + kib("SwapTotal:")) * 1024)
}

fn memfd(size: u64) -> Result<File, Error> {
    // SAFETY: the name is a NUL-terminated literal; the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(c"baton-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::Memfd)?;
    Ok(file)
}

/// Creates guest RAM of `size` bytes, shared (memfd-backed) or private. Memory is mapped
/// lazily, so this costs the same for any size.
pub fn create(size: u64, shared: bool) -> Result<GuestMemory, Error> {
    let available = host_memory()?;
    if size > available {
        return Err(Error::TooLarge {
            requested: size >> 20,
            available: available >> 20,
        });
    }
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len = len as usize;
        let mapping = if shared {
            let file = memfd(len as u64)?;
            MmapRegion::build(
                Some(FileOffset::new(file, 0)),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
        } else {
            MmapRegion::build(
                None,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(Error::Mmap)?;
        regions.push(GuestRegionMmap::new(mapping, start).expect("RAM ranges never overflow"));
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
}

/// Guest RAM for `size` bytes on shared memory another baton handed over (a local
/// migration): one descriptor per RAM range, in order, each at least that range's size.
pub fn from_fds(size: u64, fds: Vec<std::os::fd::OwnedFd>) -> Result<GuestMemory, Error> {
    let ranges = ram_ranges(size);
    if fds.len() != ranges.len() {
        return Err(Error::Memfd(std::io::Error::other(format!(
            "{} memory descriptors for {} RAM ranges",
            fds.len(),
            ranges.len()
        ))));
    }
    let mut regions = Vec::new();
    for ((start, len), fd) in ranges.into_iter().zip(fds) {
        let file = File::from(fd);
        let actual = file.metadata().map_err(Error::Memfd)?.len();
        if actual < len {
            return Err(Error::Memfd(std::io::Error::other(format!(
                "a memory descriptor of {actual} bytes for a RAM range of {len}"
            ))));
        }
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(Error::Mmap)?;
        regions.push(GuestRegionMmap::new(mapping, start).expect("RAM ranges never overflow"));
    }
    GuestMemoryMmap::from_regions(regions).map_err(Error::Regions)
}

/// The shared-memory descriptor behind each RAM range, in order; None if memory is private.
pub fn fds(mem: &GuestMemory) -> Option<Vec<std::os::fd::BorrowedFd<'_>>> {
    use std::os::fd::AsFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| r.file_offset().map(|f| f.file().as_fd()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_is_one_range() {
        let r = ram_ranges(512 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 512 << 20)]);
        let map = memory_map(512 << 20);
        assert_eq!(ram_total(&map), (512 << 20) - (HIGH_RAM_START - EBDA_START));
        assert!(map.iter().all(|e| e.addr + e.size <= 1 << 32));
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let size = 5u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r[0], (GuestAddress(0), MEM_32BIT_RESERVED_START));
        assert_eq!(r[1], (GuestAddress(RAM_64BIT_START), size - (3 << 30)));
        let map = memory_map(size);
        assert_eq!(ram_total(&map), size - (HIGH_RAM_START - EBDA_START));
        // No RAM entry reaches into the hole or the device area.
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(e.addr + e.size <= MEM_32BIT_RESERVED_START || e.addr >= RAM_64BIT_START);
        }
        // Entries are sorted and disjoint.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
        }
    }

    #[test]
    fn exactly_three_gib_has_no_high_range() {
        assert_eq!(ram_ranges(3 << 30).len(), 1);
        assert_eq!(ram_ranges((3 << 30) + 4096).len(), 2);
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let err = create(1 << 50, false).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    }

    #[test]
    fn shared_memory_is_file_backed() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mem = create(32 << 20, true).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_some()));
        let mem = create(32 << 20, false).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
