//! Parsing command lines received on the serial port.
//!
//! The replies are written by [`crate::protocol`], which documents the whole
//! exchange.

use crate::text::{is_blank, trim};

/// One command line, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `status`: counters in one line.
    Status,
    /// `cpus`: enabled processors in the MADT.
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
        _ => Command::Unknown(word),
    })
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
