//! Guest-physical memory as the guest sees it: identity-mapped below 4 GiB.
//!
//! The one place that turns physical addresses from the VMM (start_info,
//! ACPI pointers) into slices. Everything else parses those slices.

use baton_test_guest::acpi::PhysMem;

/// Only the first 4 GiB are mapped (by the entry stub's page tables).
const MAPPED_LIMIT: u64 = 1 << 32;

extern "C" {
    // Bounds of the loaded image, stacks included (from linker.ld).
    static __image_start: u8;
    static __image_end: u8;
}

/// Read access to the identity map, excluding the guest's own image.
///
/// The image holds Rust statics and stacks, which change while a slice from
/// here is alive; a bad pointer from the VMM must not alias them. Address 0
/// is refused too: it means "absent" everywhere in the boot ABI (page 0 itself
/// is fine: QEMU puts the PVH memory map there).
pub struct IdentityMap {
    image: core::ops::Range<u64>,
}

/// First byte after the loaded image (stacks included).
pub fn image_end() -> u64 {
    // Only the symbol's address is used, never its contents.
    &raw const __image_end as u64
}

impl IdentityMap {
    /// Looks up the image bounds.
    pub fn new() -> Self {
        // Only the symbols' addresses are used, never their contents.
        let start = &raw const __image_start;
        let end = &raw const __image_end;
        Self {
            image: start as u64..end as u64,
        }
    }

    /// How many of the `want` bytes at `addr` may be read, stopping short of
    /// the image or the end of the map rather than refusing outright.
    fn readable_len(&self, addr: u64, want: usize) -> usize {
        if addr == 0 || addr >= MAPPED_LIMIT || self.image.contains(&addr) {
            return 0;
        }
        let limit = if addr < self.image.start {
            self.image.start
        } else {
            MAPPED_LIMIT
        };
        usize::try_from(limit - addr).map_or(want, |room| room.min(want))
    }

    /// The NUL-terminated string at `addr` (at most `max` bytes; empty if `addr` is 0).
    pub fn c_string(&self, addr: u64, max: usize) -> &[u8] {
        let len = self.readable_len(addr, max);
        let bytes = self.read(addr, len).unwrap_or_default();
        baton_test_guest::start_info::until_nul(bytes)
    }

    /// Whether `len` bytes at `addr` are mapped and outside the image.
    pub fn may_access(&self, addr: u64, len: usize) -> bool {
        len != 0 && self.readable_len(addr, len) == len
    }
}

impl PhysMem for IdentityMap {
    fn read(&self, addr: u64, len: usize) -> Option<&[u8]> {
        if len == 0 {
            return Some(&[]);
        }
        if !self.may_access(addr, len) {
            return None;
        }
        // SAFETY: [addr, addr + len) is below 4 GiB, so the entry stub's
        // identity map covers it and reading cannot fault; addr is not 0
        // (non-null) and len < 4 GiB fits in isize. It lies outside the image,
        // so no Rust object lives there and nothing in this guest writes it
        // while the slice exists. (A bad pointer into device MMIO would read
        // device registers; the ACPI parser validates checksums before using
        // more than a header.)
        Some(unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) })
    }
}
