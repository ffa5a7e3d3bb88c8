//! One virtio-blk request: a 16-byte header the driver wrote, data in either direction, and
//! a status byte the device writes last.

use std::alloc::Layout;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::virtio::{GuestMemory, MemSlice};

/// Bytes per sector, the unit of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Largest request served; bigger ones get an I/O error.
const MAX_REQUEST: usize = 16 << 20;
/// Alignment of the bounce buffer (enough for O_DIRECT).
const ALIGN: usize = 4096;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Bytes of the get-id answer.
const ID_LEN: usize = 20;

/// The image behind a device.
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    pub sectors: u64,
    pub readonly: bool,
    pub direct: bool,
    pub serial: String,
}

/// An aligned buffer that grows to the largest request seen.
#[derive(Default)]
pub struct Bounce {
    buf: Option<(std::ptr::NonNull<u8>, usize)>,
}

// SAFETY: the buffer is plain heap memory owned by this value.
unsafe impl Send for Bounce {}

impl Bounce {
    /// `len` bytes of aligned scratch memory (rounded up to the alignment).
    fn get(&mut self, len: usize) -> &mut [u8] {
        let want = len.div_ceil(ALIGN).max(1) * ALIGN;
        if self.buf.is_none_or(|(_, cap)| cap < want) {
            self.free();
            let layout = Layout::from_size_align(want, ALIGN).expect("aligned size fits");
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc(layout) };
            let ptr = std::ptr::NonNull::new(ptr)
                .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
            self.buf = Some((ptr, want));
        }
        let (ptr, _) = self.buf.expect("allocated above");
        // SAFETY: the allocation holds at least `want >= len` bytes, and `&mut self` makes
        // this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) }
    }

    fn free(&mut self) {
        if let Some((ptr, cap)) = self.buf.take() {
            let layout = Layout::from_size_align(cap, ALIGN).expect("was allocated with it");
            // SAFETY: allocated in `get` with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.free();
    }
}

/// Runs the request in `chain`; returns the bytes written to device-writable buffers.
pub fn execute(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    disk: &Disk,
    bounce: &mut Bounce,
) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) =
        (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    else {
        return 0;
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        // Nowhere to put a status: nothing can be reported.
        return 0;
    }
    let Ok(mut status_writer) = writer.split_at(writable - 1) else {
        return 0;
    };
    let header = (
        reader.read_obj::<u32>(),
        reader.read_obj::<u32>(),
        reader.read_obj::<u64>(),
    );
    let (status, data_len) = match header {
        (Ok(kind), Ok(_), Ok(sector)) => run(kind, sector, &mut reader, &mut writer, disk, bounce),
        _ => (S_IOERR, 0),
    };
    match status_writer.write_obj(status) {
        Ok(()) => data_len as u32 + 1,
        Err(_) => 0,
    }
}

/// The byte range of `len` bytes at `sector`, if it lies inside the image.
fn range(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len as u64)?;
    (end <= disk.sectors * SECTOR_SIZE && len <= MAX_REQUEST).then_some(start)
}

fn run(
    kind: u32,
    sector: u64,
    reader: &mut Reader<'_, MemSlice<'_>>,
    writer: &mut Writer<'_, MemSlice<'_>>,
    disk: &Disk,
    bounce: &mut Bounce,
) -> (u8, usize) {
    match kind {
        T_IN => {
            let len = writer.available_bytes();
            let Some(offset) = range(disk, sector, len) else {
                return (S_IOERR, 0);
            };
            let buf = bounce.get(aligned_len(disk, len));
            if read_full(&disk.file, buf, offset).is_err() || writer.write_all(&buf[..len]).is_err()
            {
                return (S_IOERR, 0);
            }
            (S_OK, len)
        }
        T_OUT => {
            let len = reader.available_bytes();
            if disk.readonly {
                return (S_IOERR, 0);
            }
            let Some(offset) = range(disk, sector, len) else {
                return (S_IOERR, 0);
            };
            let buf = bounce.get(len);
            if reader.read_exact(buf).is_err() || disk.file.write_all_at(buf, offset).is_err() {
                return (S_IOERR, 0);
            }
            (S_OK, 0)
        }
        T_FLUSH => match disk.file.sync_data() {
            Ok(()) => (S_OK, 0),
            Err(_) => (S_IOERR, 0),
        },
        T_GET_ID => {
            let mut id = [0u8; ID_LEN];
            let n = disk.serial.len().min(ID_LEN);
            id[..n].copy_from_slice(&disk.serial.as_bytes()[..n]);
            let len = writer.available_bytes().min(ID_LEN);
            match writer.write_all(&id[..len]) {
                Ok(()) => (S_OK, len),
                Err(_) => (S_IOERR, 0),
            }
        }
        _ => (S_UNSUPP, 0),
    }
}

/// O_DIRECT reads whole sectors; the guest asks for whole sectors too, but round up anyway.
fn aligned_len(disk: &Disk, len: usize) -> usize {
    if disk.direct {
        len.div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize
    } else {
        len
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Past the end of a file that shrank: zeros, as a sparse image reads.
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(sectors: u64) -> Disk {
        let file = tempfile();
        file.set_len(sectors * SECTOR_SIZE).unwrap();
        Disk {
            file,
            sectors,
            readonly: false,
            direct: false,
            serial: "disk0".into(),
        }
    }

    fn tempfile() -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("baton-blk-test-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn ranges_stay_inside_the_image() {
        let d = disk(8);
        assert_eq!(range(&d, 0, 4096), Some(0));
        assert_eq!(range(&d, 7, 512), Some(3584));
        assert_eq!(range(&d, 7, 513), None);
        assert_eq!(range(&d, 8, 0), Some(4096));
        assert_eq!(range(&d, u64::MAX, 1), None, "sector * 512 overflows");
        assert_eq!(range(&d, u64::MAX / 512, 512), None, "end overflows");
    }

    mod chains {
        use super::*;
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::QueueOwnedT;
        use vm_memory::{Bytes, GuestAddress};

        const HDR: u64 = 0x10_0000;
        const DATA: u64 = 0x20_0000;
        const STATUS: u64 = 0x30_0000;

        fn mem() -> GuestMemory {
            GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
        }

        fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
            RawDescriptor::from(Descriptor::new(addr, len, if write { 2 } else { 0 }, 0))
        }

        /// Runs one request built from `descs`; returns (bytes reported, status byte).
        fn run(
            mem: &GuestMemory,
            disk: &Disk,
            kind: u32,
            sector: u64,
            descs: &[RawDescriptor],
        ) -> (u32, u8) {
            mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            let mock = MockSplitQueue::new(mem, 16);
            let chain = mock.build_desc_chain(descs).unwrap();
            let _ = mock
                .create_queue::<virtio_queue::Queue>()
                .unwrap()
                .iter(mem);
            let n = execute(mem, chain, disk, &mut Bounce::default());
            (n, mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        #[test]
        fn well_formed_read_and_write() {
            let mem = mem();
            let disk = disk(8);
            mem.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
            let out = [d(HDR, 16, false), d(DATA, 1024, false), d(STATUS, 1, true)];
            assert_eq!(run(&mem, &disk, T_OUT, 2, &out), (1, S_OK));
            mem.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
            let inn = [d(HDR, 16, false), d(DATA, 1024, true), d(STATUS, 1, true)];
            assert_eq!(run(&mem, &disk, T_IN, 2, &inn), (1025, S_OK));
            let mut back = [0u8; 1024];
            mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
            assert_eq!(back, [0x5a; 1024]);
        }

        #[test]
        fn malformed_requests_get_an_error_status_or_nothing() {
            let mem = mem();
            let disk = disk(8);
            let inn = [d(HDR, 16, false), d(DATA, 1024, true), d(STATUS, 1, true)];
            // Past the end of the image.
            assert_eq!(run(&mem, &disk, T_IN, 7, &inn), (1, S_IOERR));
            // Unknown request type.
            assert_eq!(run(&mem, &disk, 77, 0, &inn), (1, S_UNSUPP));
            // A header too short to hold a request.
            let short = [d(HDR, 4, false), d(STATUS, 1, true)];
            assert_eq!(run(&mem, &disk, T_IN, 0, &short), (1, S_IOERR));
            // No writable byte for the status: nothing can be reported.
            assert_eq!(run(&mem, &disk, T_IN, 0, &[d(HDR, 16, false)]).0, 0);
            // Data outside guest memory.
            let outside = [
                d(HDR, 16, false),
                d(0xffff_0000_0000, 512, true),
                d(STATUS, 1, true),
            ];
            assert_eq!(run(&mem, &disk, T_IN, 0, &outside).0, 0);
            // Zero-length data.
            let empty = [d(HDR, 16, false), d(DATA, 0, true), d(STATUS, 1, true)];
            assert_eq!(run(&mem, &disk, T_IN, 0, &empty), (1, S_OK));
            // Writes to a read-only image.
            let ro = Disk {
                readonly: true,
                ..disk
            };
            let out = [d(HDR, 16, false), d(DATA, 512, false), d(STATUS, 1, true)];
            assert_eq!(run(&mem, &ro, T_OUT, 0, &out), (1, S_IOERR));
        }
    }

    #[test]
    fn bounce_buffer_is_aligned_and_grows() {
        let mut b = Bounce::default();
        assert_eq!(b.get(10).len(), 10);
        let p = b.get(100).as_ptr() as usize;
        assert_eq!(p % ALIGN, 0);
        assert_eq!(b.get(3 * ALIGN + 1).len(), 3 * ALIGN + 1);
        assert_eq!(b.get(0).len(), 0);
    }
}
