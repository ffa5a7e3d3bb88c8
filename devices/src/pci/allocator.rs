//! Placement of BARs in a window of guest address space: aligned, never overlapping, never
//! past the window's end.

/// A window handing out naturally aligned ranges from the bottom up.
#[derive(Clone, Debug)]
pub struct AddressAllocator {
    next: u64,
    end: u64,
}

impl AddressAllocator {
    /// The window `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Self {
        AddressAllocator {
            next: base,
            end: base.saturating_add(size),
        }
    }

    /// `size` bytes aligned to `align` (a power of two; BARs pass their size), or None when
    /// the window is full.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let start = self.next.checked_next_multiple_of(align)?;
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_disjoint_and_bounded() {
        let mut a = AddressAllocator::new(0xc000_0000, 0x10_0000);
        assert_eq!(a.allocate(0x1000, 0x1000), Some(0xc000_0000));
        assert_eq!(a.allocate(0x4000, 0x4000), Some(0xc000_4000));
        assert_eq!(a.allocate(0x10, 0x10), Some(0xc000_8000));
        assert_eq!(a.allocate(0x8_0000, 0x8_0000), Some(0xc008_0000));
        assert_eq!(a.allocate(0x8_0000, 0x8_0000), None, "past the end");
        assert_eq!(a.allocate(0, 16), None);
        assert_eq!(a.allocate(16, 3), None);
        let mut top = AddressAllocator::new(u64::MAX - 0xfff, 0x1000);
        assert_eq!(top.allocate(0x2000, 0x1000), None);
    }
}
