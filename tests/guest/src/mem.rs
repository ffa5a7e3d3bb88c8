//! memcpy, memmove, memset, memcmp and bcmp, which `core` and the drivers
//! call and which the host target expects from a C library the guest does
//! not link. String instructions keep the compiler from turning these back
//! into calls to themselves.

use core::arch::asm;

/// Copies `n` bytes forwards.
///
/// # Safety
/// The C contract: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid ranges of `n` bytes; DF is clear.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// Copies `n` bytes between possibly overlapping ranges.
///
/// # Safety
/// The C contract: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // Destination before the source, or no overlap: forwards is safe.
        // SAFETY: as for memcpy.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copies backwards from the last byte with DF set, then clears it
    // again as the ABI requires; the ranges are valid for `n` bytes.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
             inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
             options(nostack));
    }
    dst
}

/// Fills `n` bytes with `c`.
///
/// # Safety
/// The C contract: a valid range.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of `n` bytes; DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// Compares `n` bytes.
///
/// # Safety
/// The C contract: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n`, inside both ranges. Volatile reads keep this loop
        // from being recognised as a memcmp idiom.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes for equality only.
///
/// # Safety
/// The C contract: valid ranges.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
