//! A hostile driver, for the `chaos` command: it takes over the entropy device with rings
//! of its own and posts descriptor chains no honest driver would, then an available index
//! far past the ring. A sound device uses (returns) every chain without crashing, and asks
//! for a reset once the ring is impossible.

extern crate alloc;

use alloc::alloc::{alloc_zeroed, dealloc, Layout};

use virtio_drivers::transport::pci::bus::{DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::hal::IdentityHal;
use crate::time::Clock;

const SIZE: u16 = 8;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const VERSION_1: u64 = 1 << 32;

/// What happened.
pub struct Report {
    /// Malformed chains posted.
    pub posted: u16,
    /// Chains the device returned.
    pub used: u16,
    /// Whether the device asked for a reset after the runaway index.
    pub needs_reset: bool,
}

/// Rings and a data page, page-aligned, freed on drop.
struct Memory {
    base: *mut u8,
    layout: Layout,
}

impl Memory {
    fn new() -> Option<Self> {
        let layout = Layout::from_size_align(4 * 4096, 4096).ok()?;
        // SAFETY: a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        (!base.is_null()).then_some(Memory { base, layout })
    }

    fn addr(&self, page: usize) -> u64 {
        self.base as u64 + page as u64 * 4096
    }

    fn write<T>(&self, page: usize, offset: usize, value: T) {
        // SAFETY: inside the allocation (every caller stays within its page), and the
        // device only reads these rings; volatile so the writes are not elided.
        unsafe {
            self.base
                .add(page * 4096 + offset)
                .cast::<T>()
                .write_volatile(value)
        }
    }

    fn read_u16(&self, page: usize, offset: usize) -> u16 {
        // SAFETY: inside the allocation; the device writes the used ring concurrently.
        unsafe {
            self.base
                .add(page * 4096 + offset)
                .cast::<u16>()
                .read_volatile()
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, self.layout) }
    }
}

const DESC: usize = 0;
const AVAIL: usize = 1;
const USED: usize = 2;
const DATA: usize = 3;

fn descriptor(m: &Memory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = usize::from(i) * 16;
    m.write(DESC, at, addr);
    m.write(DESC, at + 8, len);
    m.write(DESC, at + 12, flags);
    m.write(DESC, at + 14, next);
}

/// Runs the hostile driver against the device at `df`, then resets it.
pub fn run(
    root: &mut PciRoot<MmioCam<'static>>,
    df: DeviceFunction,
    clock: &Clock,
) -> Result<Report, &'static str> {
    let mut t = PciTransport::new::<IdentityHal, _>(root, df).map_err(|_| "no transport")?;
    let m = Memory::new().ok_or("out of memory")?;
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(VERSION_1);
    let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    t.set_status(ok);
    t.queue_set(
        0,
        u32::from(SIZE),
        m.addr(DESC),
        m.addr(AVAIL),
        m.addr(USED),
    );
    t.set_status(ok | DeviceStatus::DRIVER_OK);

    let data = m.addr(DATA);
    // A loop (0 -> 1 -> 0), memory that does not exist, a zero length, a buffer the
    // device may not write, and a `next` outside the table.
    descriptor(&m, 0, data, 64, NEXT | WRITE, 1);
    descriptor(&m, 1, data, 64, NEXT | WRITE, 0);
    descriptor(&m, 2, 0xffff_ffff_0000, 4096, WRITE, 0);
    descriptor(&m, 3, data, 0, WRITE, 0);
    descriptor(&m, 4, data, 64, 0, 0);
    descriptor(&m, 5, data, 64, NEXT | WRITE, 200);
    let heads = [0u16, 2, 3, 4, 5];
    for (slot, head) in heads.iter().enumerate() {
        m.write(AVAIL, 4 + 2 * slot, *head);
    }
    let posted = heads.len() as u16;
    m.write(AVAIL, 2, posted);
    t.notify(0);
    let deadline = clock.now() + clock.ticks(2000);
    while m.read_u16(USED, 2) != posted && clock.now() < deadline {
        core::hint::spin_loop();
    }
    let used = m.read_u16(USED, 2);

    // An available index 1000 entries past a ring of 8.
    m.write(AVAIL, 2, posted.wrapping_add(1000));
    t.notify(0);
    let deadline = clock.now() + clock.ticks(2000);
    let mut needs_reset = false;
    while !needs_reset && clock.now() < deadline {
        needs_reset = t.get_status().contains(DeviceStatus::DEVICE_NEEDS_RESET);
    }
    t.set_status(DeviceStatus::empty());
    Ok(Report {
        posted,
        used,
        needs_reset,
    })
}
