//! Bounds-checked little-endian field reads from byte slices.
//!
//! Firmware tables and boot structures come from memory the guest does not
//! control, so every read says what it does when the field is out of range:
//! it returns `None` rather than panicking.

/// Returns `N` bytes at `offset`, or `None` if they are not all inside `bytes`.
pub fn array<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    bytes.get(offset..end)?.try_into().ok()
}

/// Reads a `u8` at `offset`.
pub fn u8_at(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

/// Reads a little-endian `u16` at `offset`.
pub fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    array(bytes, offset).map(u16::from_le_bytes)
}

/// Reads a little-endian `u32` at `offset`.
pub fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    array(bytes, offset).map(u32::from_le_bytes)
}

/// Reads a little-endian `u64` at `offset`.
pub fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    array(bytes, offset).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_range() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u8_at(&b, 8), Some(9));
        assert_eq!(u16_at(&b, 0), Some(0x0201));
        assert_eq!(u32_at(&b, 1), Some(0x0504_0302));
        assert_eq!(u64_at(&b, 1), Some(0x0908_0706_0504_0302));
    }

    #[test]
    fn out_of_range_is_none() {
        let b = [0u8; 4];
        assert_eq!(u8_at(&b, 4), None);
        assert_eq!(u32_at(&b, 1), None);
        assert_eq!(u64_at(&b, 0), None);
        assert_eq!(u16_at(&b, usize::MAX), None);
    }
}
