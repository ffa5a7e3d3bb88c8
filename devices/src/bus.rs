//! Address-range dispatch for port I/O and MMIO exits.
//!
//! vCPU threads look up the device covering an address and call it with the offset into its
//! range. Ranges never overlap; insertion checks that.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a [`Bus`]. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus, or is empty.
    #[error("Bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping device ranges.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let overlap = BusError::Overlap { base, len };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(overlap.clone())?;
        let mut devices = self.devices.write().expect("bus lock poisoned");
        let before = devices.range(..end).next_back();
        if let Some((&b, &(l, _))) = before {
            if b + l > base {
                return Err(overlap);
            }
        }
        devices.insert(base, (len, device));
        Ok(())
    }

    /// Removes `device` from the range starting at `base`, if it is there (another device
    /// there stays).
    pub fn remove(&self, base: u64, device: &Arc<Mutex<dyn BusDevice>>) {
        let mut devices = self.devices.write().expect("bus lock poisoned");
        if devices
            .get(&base)
            .is_some_and(|(_, d)| Arc::ptr_eq(d, device))
        {
            devices.remove(&base);
        }
    }

    /// Removes every range `device` occupies.
    pub fn remove_device(&self, device: &Arc<Mutex<dyn BusDevice>>) {
        let mut devices = self.devices.write().expect("bus lock poisoned");
        devices.retain(|_, (_, d)| !Arc::ptr_eq(d, device));
    }

    /// The lowest `size` bytes, aligned to `size` (a power of two), that no device occupies
    /// within `[base, base + window)`; `None` if there is no such gap.
    pub fn free_range(&self, base: u64, window: u64, size: u64) -> Option<u64> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let end = base.checked_add(window)?;
        let devices = self.devices.read().expect("bus lock poisoned");
        let mut candidate = base.checked_next_multiple_of(size)?;
        // Ranges that start below the window may still reach into it.
        let first = devices
            .range(..base)
            .next_back()
            .map(|(&b, _)| b)
            .unwrap_or(base);
        for (&b, &(l, _)) in devices.range(first..end) {
            if candidate.checked_add(size)? <= b {
                break;
            }
            let past = b.saturating_add(l);
            if past > candidate {
                candidate = past.checked_next_multiple_of(size)?;
            }
        }
        (candidate.checked_add(size)? <= end).then_some(candidate)
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let devices = self.devices.read().expect("bus lock poisoned");
        let (&base, (len, dev)) = devices.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (addr - base, dev.clone()))
    }

    /// Dispatches a read; returns false when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock poisoned").read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x10, 8).unwrap();
        assert!(bus.insert(dev.clone(), 0x17, 2).is_err());
        assert!(bus.insert(dev.clone(), 0x08, 9).is_err());
        assert!(bus.insert(dev.clone(), 0x20, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x18, 1).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x13, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x19, &mut b));
        assert!(!bus.read(0x0f, &mut b));
        assert!(bus.write(0x18, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0, 7)]);

        // Removing checks whose range it is.
        let other: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.remove(0x10, &other);
        assert!(bus.read(0x13, &mut b), "another device's range stays");
        let dev: Arc<Mutex<dyn BusDevice>> = dev;
        bus.remove(0x10, &dev);
        assert!(!bus.read(0x13, &mut b));
        assert!(bus.read(0x18, &mut b));
        bus.remove_device(&dev);
        assert!(!bus.read(0x18, &mut b), "every range of the device goes");
    }

    #[test]
    fn free_ranges_are_aligned_gaps_inside_the_window() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        assert_eq!(bus.free_range(0x1000, 0x4000, 0x1000), Some(0x1000));
        bus.insert(dev.clone(), 0x1000, 0x1000).unwrap();
        bus.insert(dev.clone(), 0x2800, 0x10).unwrap();
        // 0x2000 would reach 0x2800's device; the next aligned gap is 0x3000.
        assert_eq!(bus.free_range(0x1000, 0x4000, 0x1000), Some(0x3000));
        assert_eq!(bus.free_range(0x1000, 0x4000, 0x800), Some(0x2000));
        // A range from below the window reaching into it counts.
        bus.insert(dev.clone(), 0x3f00, 0x200).unwrap();
        assert_eq!(bus.free_range(0x4000, 0x2000, 0x1000), Some(0x5000));
        assert_eq!(bus.free_range(0x4000, 0x1000, 0x1000), None, "no room");
        assert_eq!(
            bus.free_range(0x1000, 0x4000, 0x3000),
            None,
            "not a power of two"
        );
        assert_eq!(
            bus.free_range(u64::MAX - 0xfff, 0x2000, 0x1000),
            None,
            "overflow"
        );
    }
}
