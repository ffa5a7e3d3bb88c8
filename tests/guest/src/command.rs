//! Parsing command lines received on the serial port.
//!
//! The replies are written by [`crate::protocol`], which documents the whole
//! exchange.

use crate::text::{is_blank, parse_u64, trim, words};

/// One command line, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `status`: counters in one line.
    Status,
    /// `cpus`: enabled processors in the MADT, and each one's loop counter.
    Cpus,
    /// `mem`: RAM in the PVH memory map.
    Mem,
    /// `echo TEXT`: TEXT back, trimmed of surrounding blanks.
    Echo(&'a [u8]),
    /// `poweroff`: ACPI S5.
    Poweroff,
    /// `reboot`: reset the machine.
    Reboot,
    /// `help`: the command list.
    Help,
    /// `net [N]`: network card N's address and counters.
    Net(u64),
    /// `disk info`: the first disk's size and mode.
    DiskInfo,
    /// `disk read SECTOR COUNT`: digest of COUNT sectors.
    DiskRead {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
    },
    /// `disk write SECTOR COUNT BYTE`: fill COUNT sectors with BYTE.
    DiskWrite {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// The fill byte.
        byte: u8,
    },
    /// `rng N`: N bytes from the entropy device.
    Rng(u64),
    /// `ping A.B.C.D [COUNT]`: COUNT echo requests (default 5) from the first card.
    Ping {
        /// Destination.
        addr: [u8; 4],
        /// Requests, 1 to 1000.
        count: u64,
    },
    /// `chaos`: post malformed descriptor chains to the entropy device, then reset it.
    Chaos,
    /// `dirty`: the memory dirtier's state.
    DirtyStatus,
    /// `dirty MIB RATE`: keep rewriting a MIB MiB buffer at RATE MiB/s (0: stop).
    Dirty {
        /// Buffer size in MiB, 1 to [`MAX_DIRTY_MIB`].
        mib: u64,
        /// MiB/s; 0 stops the writer.
        rate: u64,
    },
    /// `dirty check`: compare every page of the buffer with what was written.
    DirtyCheck,
    /// A known command with arguments that do not parse: its usage.
    Usage(&'static str),
    /// Anything else: the first word.
    Unknown(&'a [u8]),
}

/// Parses one line; `None` if it is empty or blank. Words after a command
/// that takes no argument are ignored.
pub fn parse(line: &[u8]) -> Option<Command<'_>> {
    let line = trim(line);
    if line.is_empty() {
        return None;
    }
    let (word, rest) = match line.iter().position(|&b| is_blank(b)) {
        Some(i) => (&line[..i], trim(&line[i..])),
        None => (line, &[][..]),
    };
    Some(match word {
        b"status" => Command::Status,
        b"cpus" => Command::Cpus,
        b"mem" => Command::Mem,
        b"echo" => Command::Echo(rest),
        b"poweroff" => Command::Poweroff,
        b"reboot" => Command::Reboot,
        b"help" => Command::Help,
        b"net" => match rest {
            [] => Command::Net(0),
            n => parse_u64(n).map_or(Command::Usage("net [N]"), Command::Net),
        },
        b"disk" => parse_disk(rest),
        b"ping" => parse_ping(rest),
        b"chaos" => Command::Chaos,
        b"dirty" => parse_dirty(rest),
        b"rng" => parse_u64(rest)
            .filter(|n| (1..=4096).contains(n))
            .map_or(Command::Usage("rng N (1 to 4096)"), Command::Rng),
        _ => Command::Unknown(word),
    })
}

/// Largest `dirty` buffer: the page stamp holds 23 bits of page index.
pub const MAX_DIRTY_MIB: u64 = crate::dirty::MAX_PAGES / crate::dirty::PAGES_PER_MIB;
/// Highest `dirty` rate, MiB/s (far beyond what memory takes).
pub const MAX_DIRTY_RATE: u64 = 1 << 20;

const DIRTY_USAGE: &str = "dirty [MIB RATE | check] (MIB 1 to 32768, RATE MiB/s, 0 stops)";

fn parse_dirty(rest: &[u8]) -> Command<'_> {
    let mut w = words(rest);
    let command = match (w.next(), w.next(), w.next()) {
        (None, _, _) => Some(Command::DirtyStatus),
        (Some(b"check"), None, _) => Some(Command::DirtyCheck),
        (Some(mib), Some(rate), None) => match (parse_u64(mib), parse_u64(rate)) {
            (Some(mib), Some(rate))
                if (1..=MAX_DIRTY_MIB).contains(&mib) && rate <= MAX_DIRTY_RATE =>
            {
                Some(Command::Dirty { mib, rate })
            }
            _ => None,
        },
        _ => None,
    };
    command.unwrap_or(Command::Usage(DIRTY_USAGE))
}

const DISK_USAGE: &str = "disk info | disk read SECTOR COUNT | disk write SECTOR COUNT BYTE";

fn parse_disk(rest: &[u8]) -> Command<'_> {
    let mut w = words(rest);
    let verb = w.next();
    let mut num = || w.next().and_then(parse_u64);
    let command = match verb {
        Some(b"info") => Some(Command::DiskInfo),
        Some(b"read") => match (num(), num()) {
            (Some(sector), Some(count)) => Some(Command::DiskRead { sector, count }),
            _ => None,
        },
        Some(b"write") => match (num(), num(), num()) {
            (Some(sector), Some(count), Some(byte)) if byte < 256 => Some(Command::DiskWrite {
                sector,
                count,
                byte: byte as u8,
            }),
            _ => None,
        },
        _ => None,
    };
    command.unwrap_or(Command::Usage(DISK_USAGE))
}

fn parse_ping(rest: &[u8]) -> Command<'_> {
    let usage = Command::Usage("ping A.B.C.D [COUNT (1 to 1000)]");
    let mut w = words(rest);
    let Some(cidr) = w.next().and_then(|a| {
        let mut text = [0u8; 19];
        let n = a.len().min(15);
        text[..n].copy_from_slice(&a[..n]);
        text[n..n + 3].copy_from_slice(b"/32");
        (a.len() <= 15).then(|| crate::cmdline::Cidr::parse(&text[..n + 3]))?
    }) else {
        return usage;
    };
    let count = match w.next() {
        None => 5,
        Some(c) => match parse_u64(c).filter(|c| (1..=1000).contains(c)) {
            Some(c) => c,
            None => return usage,
        },
    };
    Command::Ping {
        addr: cidr.addr,
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_lines_are_ignored() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b" \t "), None);
    }

    #[test]
    fn commands() {
        assert_eq!(parse(b"status"), Some(Command::Status));
        assert_eq!(parse(b"  cpus "), Some(Command::Cpus));
        assert_eq!(parse(b"mem"), Some(Command::Mem));
        assert_eq!(parse(b"poweroff"), Some(Command::Poweroff));
        assert_eq!(parse(b"reboot now"), Some(Command::Reboot));
        assert_eq!(parse(b"help"), Some(Command::Help));
    }

    #[test]
    fn device_commands() {
        assert_eq!(parse(b"net"), Some(Command::Net(0)));
        assert_eq!(parse(b"net 1"), Some(Command::Net(1)));
        assert_eq!(parse(b"net x"), Some(Command::Usage("net [N]")));
        assert_eq!(parse(b"disk info"), Some(Command::DiskInfo));
        assert_eq!(
            parse(b"disk read 8 16"),
            Some(Command::DiskRead {
                sector: 8,
                count: 16
            })
        );
        assert_eq!(
            parse(b"disk write 0 1 255"),
            Some(Command::DiskWrite {
                sector: 0,
                count: 1,
                byte: 255
            })
        );
        for bad in [
            &b"disk"[..],
            b"disk write 0 1 256",
            b"disk read 1",
            b"disk erase",
        ] {
            assert_eq!(parse(bad), Some(Command::Usage(DISK_USAGE)), "{bad:?}");
        }
        assert_eq!(parse(b"rng 32"), Some(Command::Rng(32)));
        assert_eq!(
            parse(b"ping 10.0.0.1 3"),
            Some(Command::Ping {
                addr: [10, 0, 0, 1],
                count: 3
            })
        );
        assert!(matches!(
            parse(b"ping 10.0.0.1"),
            Some(Command::Ping { count: 5, .. })
        ));
        for bad in [
            &b"ping"[..],
            b"ping 10.0.0",
            b"ping 10.0.0.1 0",
            b"ping 1.2.3.4.5.6.7.8",
        ] {
            assert!(matches!(parse(bad), Some(Command::Usage(_))), "{bad:?}");
        }
        assert!(matches!(parse(b"rng 0"), Some(Command::Usage(_))));
    }

    #[test]
    fn dirty_commands() {
        assert_eq!(parse(b"dirty"), Some(Command::DirtyStatus));
        assert_eq!(parse(b"dirty check"), Some(Command::DirtyCheck));
        assert_eq!(
            parse(b"dirty 64 200"),
            Some(Command::Dirty { mib: 64, rate: 200 })
        );
        assert_eq!(
            parse(b" dirty  1\t0 "),
            Some(Command::Dirty { mib: 1, rate: 0 })
        );
        assert_eq!(
            parse(b"dirty 32768 1048576"),
            Some(Command::Dirty {
                mib: 32768,
                rate: 1 << 20
            })
        );
        for bad in [
            &b"dirty 64"[..],
            b"dirty 0 10",
            b"dirty 32769 10",
            b"dirty 64 1048577",
            b"dirty 64 -1",
            b"dirty 64 10 x",
            b"dirty check now",
            b"dirty stop",
        ] {
            assert_eq!(parse(bad), Some(Command::Usage(DIRTY_USAGE)), "{bad:?}");
        }
    }

    #[test]
    fn echo_keeps_inner_spacing() {
        assert_eq!(parse(b"echo hi"), Some(Command::Echo(b"hi")));
        assert_eq!(parse(b"echo  a  b \t"), Some(Command::Echo(b"a  b")));
        assert_eq!(parse(b"echo"), Some(Command::Echo(b"")));
    }

    #[test]
    fn unknown_reports_first_word() {
        assert_eq!(
            parse(b"frobnicate x y"),
            Some(Command::Unknown(b"frobnicate"))
        );
        assert_eq!(parse(b"Status"), Some(Command::Unknown(b"Status")));
    }
}
