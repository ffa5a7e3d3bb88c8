//! Options on the kernel command line (`start_info.cmdline_paddr`).
//!
//! Space-separated `key=value` words. Known keys:
//!
//! | key            | value                                      | default |
//! |----------------|--------------------------------------------|---------|
//! | `heartbeat_ms` | period of the `heartbeat N` line; 0 = none | 1000    |
//!
//! A VMM may add options meant for Linux (`console=ttyS0`, ...), so unknown
//! words are reported as warnings, never refused.

use crate::text::{parse_u64, words};

/// Heartbeat period when the command line does not set one.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// The options the guest understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Milliseconds between heartbeat lines; 0 disables them.
    pub heartbeat_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
        }
    }
}

/// Something on the command line that was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning<'a> {
    /// A word whose key is not known (the whole word when it has no `=`).
    UnknownOption(&'a [u8]),
    /// A known key with a value that does not parse; the value is ignored.
    BadValue {
        /// The option's key.
        key: &'a [u8],
        /// The value as given.
        value: &'a [u8],
    },
}

/// Parses `cmdline`, reporting each ignored word to `warn`, in order.
pub fn parse<'a>(cmdline: &'a [u8], mut warn: impl FnMut(Warning<'a>)) -> Options {
    let mut options = Options::default();
    for word in words(cmdline) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        match (key, value) {
            (b"heartbeat_ms", value) => match value.and_then(parse_u64) {
                Some(ms) => options.heartbeat_ms = ms,
                None => warn(Warning::BadValue {
                    key,
                    value: value.unwrap_or_default(),
                }),
            },
            _ => warn(Warning::UnknownOption(key)),
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(cmdline: &[u8]) -> (Options, Vec<Warning<'_>>) {
        let mut warnings = Vec::new();
        let options = parse(cmdline, |w| warnings.push(w));
        (options, warnings)
    }

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(parse_all(b""), (Options::default(), vec![]));
        assert_eq!(parse_all(b"   ").0.heartbeat_ms, 1000);
    }

    #[test]
    fn heartbeat_is_parsed() {
        assert_eq!(parse_all(b"heartbeat_ms=200").0.heartbeat_ms, 200);
        assert_eq!(parse_all(b"  heartbeat_ms=0 ").0.heartbeat_ms, 0);
        // The last one wins, as on Linux.
        assert_eq!(
            parse_all(b"heartbeat_ms=1 heartbeat_ms=2").0.heartbeat_ms,
            2
        );
    }

    #[test]
    fn unknown_words_warn_and_are_ignored() {
        let (options, warnings) = parse_all(b"console=ttyS0 heartbeat_ms=5 quiet");
        assert_eq!(options.heartbeat_ms, 5);
        assert_eq!(
            warnings,
            [
                Warning::UnknownOption(b"console"),
                Warning::UnknownOption(b"quiet")
            ]
        );
    }

    #[test]
    fn bad_values_keep_the_default() {
        let (options, warnings) = parse_all(b"heartbeat_ms=fast heartbeat_ms");
        assert_eq!(options.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        assert_eq!(
            warnings,
            [
                Warning::BadValue {
                    key: b"heartbeat_ms",
                    value: b"fast"
                },
                Warning::BadValue {
                    key: b"heartbeat_ms",
                    value: b""
                },
            ]
        );
    }
}
