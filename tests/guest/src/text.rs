//! Printing untrusted bytes on a line-based protocol.

use core::fmt;

/// Displays bytes as text, with anything but printable ASCII shown as `?`.
///
/// Serial input and the kernel command line are arbitrary bytes; echoing a CR,
/// LF or escape sequence back would break the one-reply-per-line protocol.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for &b in self.0 {
            f.write_char(if is_printable(b) { char::from(b) } else { '?' })?;
        }
        Ok(())
    }
}

fn is_printable(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// Splits `bytes` into words separated by spaces or tabs.
pub fn words(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|b| is_blank(*b)).filter(|w| !w.is_empty())
}

/// Returns `bytes` without leading and trailing spaces and tabs.
pub fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !is_blank(*b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_blank(*b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Spaces and tabs separate words; other control bytes are kept (and printed as `?`).
pub fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Parses an unsigned decimal number, rejecting empty input, signs and overflow.
pub fn parse_u64(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        let digit = u64::from(b.checked_sub(b'0').filter(|d| *d < 10)?);
        acc.checked_mul(10)?.checked_add(digit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_masks_control_and_high_bytes() {
        assert_eq!(Printable(b"a b\r\n\x1b[0m\xff~").to_string(), "a b???[0m?~");
        assert_eq!(Printable(b"").to_string(), "");
    }

    #[test]
    fn words_and_trim() {
        let w: Vec<&[u8]> = words(b"  a\tbc  d ").collect();
        assert_eq!(w, [&b"a"[..], b"bc", b"d"]);
        assert_eq!(trim(b" \t x y \t"), b"x y");
        assert_eq!(trim(b"   "), b"");
    }

    #[test]
    fn parse_numbers() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"1000"), Some(1000));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"1x"), None);
    }
}
