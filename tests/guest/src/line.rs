//! Assembling serial input bytes into command lines.

/// Longest accepted command line, in bytes, not counting the terminator.
pub const MAX_LINE: usize = 128;

/// What a byte of input completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A line (without its terminator); may be empty or blank.
    Line(&'a [u8]),
    /// A line longer than [`MAX_LINE`] ended; its bytes were dropped.
    TooLong,
}

/// Collects bytes until CR or LF.
///
/// Either byte ends a line so that hosts sending CR, LF or CRLF all work; CRLF
/// thus also yields an empty line, which callers ignore.
#[derive(Debug)]
pub struct LineBuffer {
    buf: [u8; MAX_LINE],
    len: usize,
    overflowed: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
            overflowed: false,
        }
    }

    /// Adds one input byte; returns the line it completed, if any.
    pub fn push(&mut self, byte: u8) -> Option<Event<'_>> {
        if byte == b'\r' || byte == b'\n' {
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.overflowed) {
                return Some(Event::TooLong);
            }
            return Some(Event::Line(&self.buf[..len]));
        }
        if self.len == MAX_LINE {
            self.overflowed = true;
        } else if !self.overflowed {
            self.buf[self.len] = byte;
            self.len += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(input: &[u8]) -> Vec<Result<Vec<u8>, ()>> {
        let mut lines = LineBuffer::new();
        let mut out = Vec::new();
        for &b in input {
            match lines.push(b) {
                Some(Event::Line(l)) => out.push(Ok(l.to_vec())),
                Some(Event::TooLong) => out.push(Err(())),
                None => {}
            }
        }
        out
    }

    #[test]
    fn cr_lf_and_crlf_end_lines() {
        assert_eq!(
            feed(b"a\rb\nc\r\n"),
            [
                Ok(b"a".to_vec()),
                Ok(b"b".to_vec()),
                Ok(b"c".to_vec()),
                Ok(vec![])
            ]
        );
    }

    #[test]
    fn unterminated_input_waits() {
        assert!(feed(b"status").is_empty());
    }

    #[test]
    fn max_line_is_accepted_one_more_is_too_long() {
        let mut input = vec![b'x'; MAX_LINE];
        input.push(b'\n');
        assert_eq!(feed(&input), [Ok(vec![b'x'; MAX_LINE])]);

        let mut input = vec![b'x'; MAX_LINE + 50];
        input.extend_from_slice(b"\nok\n");
        assert_eq!(feed(&input), [Err(()), Ok(b"ok".to_vec())]);
    }
}
