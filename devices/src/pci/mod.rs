//! PCI segment 0: configuration space through ports 0xCF8/0xCFC and the ECAM window that MCFG
//! announces, with the host bridge at 00:00.0.
//!
//! Functions that do not exist read as all ones, as on real hardware, so guests enumerate
//! nothing there. Other functions (virtio devices) sit in slots 1 to 31, function 0; when the
//! guest moves one of their BARs, the bus moves the function on the MMIO bus too.

pub mod configuration;
mod host_bridge;
pub mod hotplug;
pub mod msix;

use std::sync::{Arc, Mutex, Weak};

pub use configuration::{Bar, BarKind, BarMove, Identity, PciConfiguration};
pub use host_bridge::HostBridge;

use crate::{Bus, BusDevice};

/// Devices per bus.
pub const DEVICES_PER_BUS: usize = 32;
/// Bytes of configuration space per function through ECAM.
pub const CONFIG_SPACE_SIZE: u64 = 4096;
/// Bytes of ECAM window per bus.
pub const ECAM_BUS_SIZE: u64 = CONFIG_SPACE_SIZE * 8 * DEVICES_PER_BUS as u64;

/// A PCI function's configuration space.
pub trait PciDevice: Send {
    /// Reads the 32-bit register at dword index `reg`.
    fn read_config(&self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within dword `reg`; returns a BAR the write moved.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove>;
    /// The bus moved BAR `mv.index` on the MMIO bus (notification addresses move with it).
    fn bar_moved(&mut self, _mv: &BarMove) {}
}

/// Errors placing a function on the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All 31 slots are taken.
    #[error("No free PCI slot: at most 31 devices")]
    NoSlot,
    /// The slot asked for is taken, or is no device slot.
    #[error("PCI slot {0} is taken or does not exist")]
    Taken(usize),
    /// Its BAR overlaps another device.
    #[error("Cannot map the device's BAR")]
    Bar(#[source] crate::BusError),
    /// The VM's MMIO bus is gone (the VM is being torn down).
    #[error("The VM's MMIO bus is gone")]
    NoBus,
}

/// A function and where its BARs live on the MMIO bus.
struct Slot {
    config: Arc<Mutex<dyn PciDevice>>,
    bars: Option<Arc<Mutex<dyn BusDevice>>>,
}

/// Bus 0 of segment 0.
pub struct PciBus {
    slots: Vec<Option<Slot>>,
    /// Weak: the MMIO bus holds the ECAM window, which holds this bus. A strong reference
    /// would make a cycle that keeps every device, its backend (a TAP) and the VM alive
    /// after the VM is dropped.
    mmio: Weak<Bus>,
}

impl PciBus {
    /// Bus 0 holding only the host bridge; BARs of later functions are mapped on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..DEVICES_PER_BUS).map(|_| None).collect();
        slots[0] = Some(Slot {
            config: Arc::new(Mutex::new(HostBridge::new())),
            bars: None,
        });
        PciBus {
            slots,
            mmio: Arc::downgrade(&mmio),
        }
    }

    /// Places a function with one memory BAR at `bar` in slot `at`, or in the first free
    /// slot if `at` is `None`; returns the slot. `bars` answers the guest's accesses to that
    /// BAR.
    pub fn add(
        &mut self,
        config: Arc<Mutex<dyn PciDevice>>,
        bars: Arc<Mutex<dyn BusDevice>>,
        bar: Bar,
        at: Option<u8>,
    ) -> Result<u8, PciError> {
        let slot = match at {
            Some(slot) => usize::from(slot),
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .ok_or(PciError::NoSlot)?,
        };
        if slot == 0 || self.slots.get(slot).is_none_or(Option::is_some) {
            return Err(PciError::Taken(slot));
        }
        self.mmio()
            .ok_or(PciError::NoBus)?
            .insert(bars.clone(), bar.addr, bar.size)
            .map_err(PciError::Bar)?;
        self.slots[slot] = Some(Slot {
            config,
            bars: Some(bars),
        });
        Ok(slot as u8)
    }

    /// Takes the function in `slot` off the bus and its BARs off the MMIO bus, and returns
    /// it; `None` if there is none (or it is the host bridge, which stays).
    pub fn remove(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let slot = usize::from(slot);
        if slot == 0 {
            return None;
        }
        let removed = self.slots.get_mut(slot).and_then(Option::take)?;
        if let (Some(bars), Some(mmio)) = (&removed.bars, self.mmio()) {
            mmio.remove_device(bars);
        }
        Some(removed.config)
    }

    /// Where a BAR of `size` bytes fits within `[base, base + window)` of the MMIO bus now
    /// (see [`Bus::free_range`]).
    pub fn free_range(&self, base: u64, window: u64, size: u64) -> Option<u64> {
        self.mmio()?.free_range(base, window, size)
    }

    /// The MMIO bus; `None` only while the VM is being torn down.
    fn mmio(&self) -> Option<Arc<Bus>> {
        self.mmio.upgrade()
    }

    fn slot(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        // Bus 0 only, function 0 of each slot.
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    fn read(&mut self, bus: u8, dev: u8, func: u8, offset: u64, data: &mut [u8]) {
        let value = self.slot(bus, dev, func).map_or(u32::MAX, |s| {
            s.config
                .lock()
                .expect("PCI function lock poisoned")
                .read_config((offset / 4) as usize)
        });
        copy_from_dword(value, offset, data);
    }

    fn write(&mut self, bus: u8, dev: u8, func: u8, offset: u64, data: &[u8]) {
        let Some(slot) = self.slot(bus, dev, func) else {
            return;
        };
        if (offset % 4) as usize + data.len() > 4 {
            return;
        }
        let mut config = slot.config.lock().expect("PCI function lock poisoned");
        let Some(mv) = config.write_config((offset / 4) as usize, offset % 4, data) else {
            return;
        };
        let Some(bars) = &slot.bars else {
            return;
        };
        // A guest may move a BAR anywhere, even onto another device: then it stays unmapped
        // until moved somewhere free.
        // The old range is this function's only if it was mapped there.
        let Some(mmio) = self.mmio() else {
            return;
        };
        mmio.remove(mv.old, bars);
        match mmio.insert(bars.clone(), mv.new, mv.size) {
            Ok(()) => config.bar_moved(&mv),
            Err(e) => log::warn!("PCI {dev:02x}.0: BAR {} not mapped: {e}", mv.index),
        }
    }
}

/// Copies the bytes of `value` at `offset % 4` into `data`, all ones past the dword.
fn copy_from_dword(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let start = (offset % 4) as usize;
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(start + i).copied().unwrap_or(0xff);
    }
}

/// Configuration access through ports 0xCF8 (address) and 0xCFC-0xCFF (data).
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    /// Port access to `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    /// (bus, device, function, register offset) of the current address, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, u64)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let dev = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = u64::from(self.address & 0xfc) + data_offset;
        Some((bus, dev, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => copy_from_dword(self.address, offset, data),
            _ => match self.target(offset - 4) {
                Some((b, d, f, reg)) => self
                    .bus
                    .lock()
                    .expect("PCI lock poisoned")
                    .read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().expect("length checked"))
            }
            0..=3 => {}
            _ => {
                if let Some((b, d, f, reg)) = self.target(offset - 4) {
                    self.bus
                        .lock()
                        .expect("PCI lock poisoned")
                        .write(b, d, f, reg, data);
                }
            }
        }
    }
}

/// Configuration access through the memory-mapped ECAM window.
pub struct PciEcam {
    bus: Arc<Mutex<PciBus>>,
}

impl PciEcam {
    /// ECAM access to `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciEcam { bus }
    }

    fn target(offset: u64) -> (u8, u8, u8, u64) {
        let bus = (offset / ECAM_BUS_SIZE) as u8;
        let dev = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        (bus, dev, func, offset & 0xfff)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = Self::target(offset);
        self.bus
            .lock()
            .expect("PCI lock poisoned")
            .read(b, d, f, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = Self::target(offset);
        self.bus
            .lock()
            .expect("PCI lock poisoned")
            .write(b, d, f, reg, data);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn host_bridge_visible_through_ports_and_ecam() {
        let bus = Arc::new(Mutex::new(PciBus::new(Arc::new(Bus::new()))));
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus);
        let mut d = [0u8; 4];

        io.write(0, &0x8000_0000u32.to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), host_bridge::ID);
        ecam.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), host_bridge::ID);

        // Class code: host bridge (06/00/00), read as the upper three bytes of dword 2.
        ecam.read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_0000);

        // An empty slot reads as all ones, by port and by ECAM, at any width.
        io.write(0, &(0x8000_0000u32 | (3 << 11)).to_le_bytes());
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut w = [0u8; 2];
        ecam.read((5 << 15) + 2, &mut w);
        assert_eq!(w, [0xff; 2]);

        // Address register reads back; disabled address reads all ones.
        io.write(0, &0x0000_0000u32.to_le_bytes());
        io.read(0, &mut d);
        assert_eq!(d, [0; 4]);
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    /// A function with one 32-bit memory BAR whose reads answer `tag`.
    pub(crate) struct Function {
        config: PciConfiguration,
        tag: u8,
    }

    impl PciDevice for Function {
        fn read_config(&self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
            self.config.write_reg(reg, offset, data)
        }
    }

    impl BusDevice for Function {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.tag);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// A function with one 4 KiB memory BAR at `addr` whose bytes all read as `tag`.
    pub(crate) fn function(addr: u64, tag: u8) -> (Arc<Mutex<Function>>, Bar) {
        let mut config = PciConfiguration::new(Identity {
            vendor: 0x1af4,
            device: 0x1044,
            class: [0xff, 0, 0],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        let bar = Bar {
            addr,
            size: 0x1000,
            kind: BarKind::Memory32,
        };
        config.add_bar(0, bar).unwrap();
        (Arc::new(Mutex::new(Function { config, tag })), bar)
    }

    #[test]
    fn moved_bars_follow_on_the_mmio_bus_and_never_take_anothers_range() {
        let mmio = Arc::new(Bus::new());
        let mut pci = PciBus::new(mmio.clone());
        let (a, bar_a) = function(0xc000_0000, 0xaa);
        let (b, bar_b) = function(0xc000_4000, 0xbb);
        assert_eq!(pci.add(a.clone(), a, bar_a, None).unwrap(), 1);
        assert_eq!(pci.add(b.clone(), b, bar_b, None).unwrap(), 2);
        let mut byte = [0u8; 1];
        let at = |addr: u64| {
            let mut byte = [0u8; 1];
            mmio.read(addr, &mut byte).then_some(byte[0])
        };
        // BAR 0 of 00:01.0 is dword 4; a size probe first, which moves nothing.
        pci.write(0, 1, 0, 0x10, &u32::MAX.to_le_bytes());
        assert_eq!(at(0xc000_0000), Some(0xaa));
        pci.write(0, 1, 0, 0x10, &0xc000_2000u32.to_le_bytes());
        assert_eq!((at(0xc000_0000), at(0xc000_2000)), (None, Some(0xaa)));
        // Onto 00:02.0's range: it stays there and 00:01.0 is unmapped...
        pci.write(0, 1, 0, 0x10, &0xc000_4000u32.to_le_bytes());
        assert_eq!((at(0xc000_2000), at(0xc000_4000)), (None, Some(0xbb)));
        // ...and moving 00:01.0 away again leaves 00:02.0 alone.
        pci.write(0, 1, 0, 0x10, &0xc000_8000u32.to_le_bytes());
        assert_eq!((at(0xc000_4000), at(0xc000_8000)), (Some(0xbb), Some(0xaa)));
        pci.read(0, 1, 0, 0x10, &mut byte);
    }

    #[test]
    fn functions_come_and_go_by_slot() {
        let mmio = Arc::new(Bus::new());
        let mut pci = PciBus::new(mmio.clone());
        let (a, bar_a) = function(0xc000_0000, 0xaa);
        let (b, bar_b) = function(0xc000_4000, 0xbb);
        assert_eq!(pci.add(a.clone(), a.clone(), bar_a, Some(5)).unwrap(), 5);
        assert!(matches!(
            pci.add(b.clone(), b.clone(), bar_b, Some(5)),
            Err(PciError::Taken(5))
        ));
        assert!(matches!(
            pci.add(b.clone(), b.clone(), bar_b, Some(0)),
            Err(PciError::Taken(0))
        ));
        assert!(matches!(
            pci.add(b.clone(), b.clone(), bar_b, Some(32)),
            Err(PciError::Taken(32))
        ));
        let vendor = |pci: &mut PciBus, dev: u8| {
            let mut id = [0u8; 2];
            pci.read(0, dev, 0, 0, &mut id);
            u16::from_le_bytes(id)
        };
        assert_eq!(vendor(&mut pci, 5), 0x1af4);
        let mut byte = [0u8; 1];
        assert!(mmio.read(0xc000_0000, &mut byte));
        assert!(pci.remove(0).is_none(), "the host bridge stays");
        assert!(pci.remove(5).is_some());
        assert!(pci.remove(5).is_none());
        assert_eq!(
            vendor(&mut pci, 5),
            0xffff,
            "an empty slot reads as all ones"
        );
        assert!(!mmio.read(0xc000_0000, &mut byte), "its BAR is unmapped");
        assert_eq!(pci.add(b.clone(), b, bar_b, None).unwrap(), 1);
    }
}
