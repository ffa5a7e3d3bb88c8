//! The sequence streams the network services send and check.
//!
//! A stream is the little-endian bytes of the counter 0, 1, 2, ... as u64s,
//! so byte `i` of a stream is byte `i % 8` of `i / 8`. Whoever reads it can
//! tell the exact offset where a byte went missing, repeated or changed.

/// Byte `offset` of the stream.
pub fn byte_at(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Produces the stream, from where it left off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// Bytes produced so far.
    pub offset: u64,
}

impl Source {
    /// The next `buf.len()` bytes (the caller advances with [`Source::advance`]
    /// by however many it managed to send).
    pub fn peek(&self, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(self.offset + i as u64);
        }
    }

    /// Marks `n` bytes as sent.
    pub fn advance(&mut self, n: usize) {
        self.offset += n as u64;
    }
}

/// Checks a received stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sink {
    /// Bytes received so far.
    pub offset: u64,
    /// Bytes that differed from the stream.
    pub errors: u64,
    /// Offset of the first wrong byte.
    pub first_error: Option<u64>,
}

impl Sink {
    /// Checks the next bytes received.
    pub fn check(&mut self, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = self.offset + i as u64;
            if *b != byte_at(at) {
                self.errors += 1;
                self.first_error.get_or_insert(at);
            }
        }
        self.offset += data.len() as u64;
    }
}

/// FNV-1a, 64 bits: the digest `disk read` reports, easy to compute on the host.
pub fn fnv1a(hash: u64, data: &[u8]) -> u64 {
    data.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_counter_bytes() {
        let mut s = Source::default();
        let mut b = [0u8; 20];
        s.peek(&mut b);
        assert_eq!(&b[..8], &0u64.to_le_bytes());
        assert_eq!(&b[8..16], &1u64.to_le_bytes());
        s.advance(5);
        let mut c = [0u8; 4];
        s.peek(&mut c);
        assert_eq!(c, [0, 0, 0, 1]);
        assert_eq!(byte_at(8 * 258 + 1), 1);
    }

    #[test]
    fn sink_finds_the_first_bad_byte_across_chunks() {
        let mut src = Source::default();
        let mut sink = Sink::default();
        let mut buf = [0u8; 1000];
        src.peek(&mut buf);
        sink.check(&buf[..333]);
        sink.check(&buf[333..]);
        assert_eq!(
            (sink.offset, sink.errors, sink.first_error),
            (1000, 0, None)
        );
        // A lost chunk shows as errors from where it went missing.
        src.advance(1000);
        src.advance(16);
        src.peek(&mut buf);
        sink.check(&buf[..16]);
        assert_eq!(sink.first_error, Some(1000));
        assert!(sink.errors > 0);
    }

    #[test]
    fn fnv_known_value() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
