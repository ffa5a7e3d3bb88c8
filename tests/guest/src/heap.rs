//! The heap: RAM right after the image, for the virtio drivers' rings and
//! buffers and smoltcp's sockets.
//!
//! Only the boot CPU allocates (the other CPUs run code that never does, see
//! [`crate::cpus`]) and nothing interrupts it, so the allocator needs no lock.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::NonNull;

use linked_list_allocator::Heap;

/// Most memory given to the heap.
pub const MAX_HEAP: u64 = 256 << 20;

struct Allocator(UnsafeCell<Heap>);

// SAFETY: only the boot CPU allocates or frees, with interrupts off (the
// other CPUs never do), so the heap is never used from two places at once.
unsafe impl Sync for Allocator {}

#[global_allocator]
static ALLOCATOR: Allocator = Allocator(UnsafeCell::new(Heap::empty()));

// SAFETY: `Heap` hands out non-overlapping blocks of at least the requested
// layout; access is exclusive (see the `Sync` impl).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: exclusive access, see above.
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map_or(core::ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: exclusive access; the caller returns a block `alloc` gave
        // out with this layout.
        unsafe {
            let heap = &mut *self.0.get();
            if let Some(p) = NonNull::new(ptr) {
                heap.deallocate(p, layout);
            }
        }
    }
}

/// Gives the heap `[start, start + size)`.
///
/// # Safety
/// The range must be RAM that nothing else uses, identity-mapped and
/// writable; call once, before the first allocation.
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: the caller vouches for the range; nothing has allocated yet.
    unsafe { (*ALLOCATOR.0.get()).init(start as *mut u8, size as usize) }
}
