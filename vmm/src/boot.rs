//! Loading what the VM boots and the information handed to it: the kernel (ELF with a PVH
//! note, plain ELF vmlinux, or bzImage), the initramfs, the command line, and either the PVH
//! `hvm_start_info` or the Linux zero page, each with the memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use api::PayloadConfig;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::memory::{GuestMemory, MapEntry};

/// Errors loading the payload.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened.
    #[error("Cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The kernel file is neither format.
    #[error(
        "{0} is not a kernel baton can boot (an ELF with or without a PVH note, or a bzImage)"
    )]
    NotAKernel(PathBuf, #[source] linux_loader::loader::Error),
    /// A bzImage without a 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point (XLF_KERNEL_64)")]
    Not64Bit(PathBuf),
    /// The initramfs could not be read.
    #[error("Cannot read initramfs {0}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit in low memory next to the kernel.
    #[error(
        "Initramfs of {size} bytes does not fit in guest memory below {limit:#x} after the kernel"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("Cannot write boot information to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// Too many memory map entries for the zero page.
    #[error("Memory map has {0} entries, more than the zero page holds")]
    TooManyMapEntries(usize),
}

/// How the first vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, RBX = start_info.
    Pvh {
        /// Entry address.
        rip: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64 {
        /// Entry address.
        rip: u64,
    },
}

const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u32 = 1;
/// Offset of the memory map after start_info (start_info is 56 bytes).
const PVH_MEMMAP_OFFSET: u64 = 0x40;
/// The module list sits in the same page, after room for 128 memory-map entries.
const PVH_MODLIST_OFFSET: u64 = 0xc40;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
/// Initrd limit when the kernel states none (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

fn open_kernel(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| Error::OpenKernel(path.to_owned(), e))
}

/// Loads the kernel into guest memory; tries ELF first, then bzImage.
fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<(KernelLoaderResult, Entry), Error> {
    let mut file = open_kernel(path)?;
    let himem = Some(GuestAddress(HIGH_RAM_START));
    match Elf::load(mem, None, &mut file, himem) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Entry::Pvh { rip: addr.0 },
                _ => Entry::Linux64 {
                    rip: result.kernel_load.0,
                },
            };
            Ok((result, entry))
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| Error::OpenKernel(path.to_owned(), e))?;
            let result = BzImage::load(mem, None, &mut file, himem)
                .map_err(|e| Error::NotAKernel(path.to_owned(), e))?;
            let hdr = result
                .setup_header
                .expect("bzImage loader returns a header");
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::Not64Bit(path.to_owned()));
            }
            // The 64-bit entry is 0x200 past the start of the protected-mode code.
            let rip = result.kernel_load.0 + 0x200;
            Ok((result, Entry::Linux64 { rip }))
        }
        Err(e) => Err(Error::NotAKernel(path.to_owned(), e)),
    }
}

/// Places the initramfs at the top of low RAM (below `limit`); returns (address, size).
fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), Error> {
    let err = |e| Error::Initramfs(path.to_owned(), e);
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let low_end = mem
        .iter()
        .next()
        .map(|r| vm_memory::GuestMemoryRegion::last_addr(r).0 + 1)
        .unwrap_or(0);
    let top = low_end.min(limit + 1);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size > 0 => a,
        _ => return Err(Error::InitramfsTooLarge { size, limit: top }),
    };
    let mut data = Vec::with_capacity(size as usize);
    file.read_to_end(&mut data).map_err(err)?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(Error::Write)?;
    Ok((addr, size))
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), Error> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(Error::Write)
}

/// The PVH start_info page: start_info, memory map and module list, as bytes.
pub fn pvh_start_info(map: &[MapEntry], rsdp: u64, initramfs: Option<(u64, u64)>) -> Vec<u8> {
    let mut page = vec![0u8; 0x1000];
    let put32 = |p: &mut [u8], off: u64, v: u32| {
        p[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes())
    };
    let put64 = |p: &mut [u8], off: u64, v: u64| {
        p[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes())
    };
    put32(&mut page, 0, PVH_MAGIC);
    put32(&mut page, 4, PVH_VERSION);
    if let Some((addr, size)) = initramfs {
        put32(&mut page, 12, 1);
        put64(&mut page, 16, PVH_INFO_START + PVH_MODLIST_OFFSET);
        put64(&mut page, PVH_MODLIST_OFFSET, addr);
        put64(&mut page, PVH_MODLIST_OFFSET + 8, size);
    }
    put64(&mut page, 24, CMDLINE_START);
    put64(&mut page, 32, rsdp);
    put64(&mut page, 40, PVH_INFO_START + PVH_MEMMAP_OFFSET);
    put32(&mut page, 48, map.len() as u32);
    for (i, e) in map.iter().enumerate() {
        let off = PVH_MEMMAP_OFFSET + 24 * i as u64;
        put64(&mut page, off, e.addr);
        put64(&mut page, off + 8, e.size);
        put32(&mut page, off + 16, e.kind);
    }
    page
}

/// The Linux zero page for `hdr` (from a bzImage, or synthesized for an ELF vmlinux).
fn zero_page(
    hdr: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    map: &[MapEntry],
    rsdp: u64,
    initramfs: Option<(u64, u64)>,
) -> Result<boot_params, Error> {
    let mut params = boot_params::default();
    if let Some(hdr) = hdr {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyMapEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Loads the payload and writes the boot information; returns how to enter the guest.
pub fn load(
    mem: &GuestMemory,
    payload: &PayloadConfig,
    map: &[MapEntry],
    rsdp: u64,
) -> Result<Entry, Error> {
    let kernel = payload
        .kernel
        .as_deref()
        .expect("validated config has a kernel");
    let (result, entry) = load_kernel(mem, kernel)?;
    let limit = match result.setup_header {
        Some(hdr) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
        Some(_) => DEFAULT_INITRD_ADDR_MAX,
        None => MEM_32BIT_RESERVED_START - 1,
    };
    let initramfs = payload
        .initramfs
        .as_deref()
        .map(|p| load_initramfs(mem, p, result.kernel_end, limit))
        .transpose()?;
    let cmdline = payload.cmdline.as_deref().unwrap_or("");
    write_cmdline(mem, cmdline)?;
    match entry {
        Entry::Pvh { .. } => mem
            .write_slice(
                &pvh_start_info(map, rsdp, initramfs),
                GuestAddress(PVH_INFO_START),
            )
            .map_err(Error::Write)?,
        Entry::Linux64 { .. } => {
            let params = zero_page(result.setup_header, cmdline.len(), map, rsdp, initramfs)?;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(Error::Write)?;
        }
    }
    debug_assert!(GuestAddress(CMDLINE_START).unchecked_add(4096).0 < EBDA_START);
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn start_info_layout() {
        let map = memory::memory_map(5 << 30);
        let page = pvh_start_info(&map, ACPI_START, Some((0x100_0000, 0x2000)));
        assert_eq!(u32_at(&page, 0), PVH_MAGIC);
        assert_eq!(u32_at(&page, 12), 1, "one module");
        assert_eq!(u64_at(&page, 24), CMDLINE_START);
        assert_eq!(u64_at(&page, 32), ACPI_START);
        assert_eq!(u32_at(&page, 48) as usize, map.len());
        let memmap = (u64_at(&page, 40) - PVH_INFO_START) as usize;
        for (i, e) in map.iter().enumerate() {
            let off = memmap + 24 * i;
            assert_eq!(u64_at(&page, off), e.addr);
            assert_eq!(u64_at(&page, off + 8), e.size);
            assert_eq!(u32_at(&page, off + 16), e.kind);
        }
        let modlist = (u64_at(&page, 16) - PVH_INFO_START) as usize;
        assert!(
            modlist >= memmap + 24 * 128,
            "module list after a full memory map"
        );
        assert_eq!(u64_at(&page, modlist), 0x100_0000);
        assert_eq!(u64_at(&page, modlist + 8), 0x2000);
    }

    #[test]
    fn zero_page_has_map_cmdline_and_rsdp() {
        let map = memory::memory_map(1 << 30);
        let p = zero_page(None, 12, &map, ACPI_START, Some((0x3000_0000, 4096))).unwrap();
        assert_eq!(p.e820_entries as usize, map.len());
        let first = p.e820_table[0];
        assert_eq!({ first.size }, EBDA_START);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.hdr.type_of_loader, KERNEL_LOADER_OTHER);
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = memory::create(32 << 20, false).unwrap();
        let dir = std::env::temp_dir().join(format!("baton-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let err = load_kernel(&mem, &junk).unwrap_err();
        assert!(matches!(err, Error::NotAKernel(..)), "{err}");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(load_kernel(&mem, &empty).is_err());
        let err = load_kernel(&mem, &dir.join("missing")).unwrap_err();
        assert!(matches!(err, Error::OpenKernel(..)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
