//! Just enough AML to read the `\_S5` object: the sleep type for "soft off".
//!
//! Firmware declares it as `Name (_S5, Package () { SLP_TYPa, SLP_TYPb, ... })`,
//! which DSDTs encode as `NameOp '_S5_' PackageOp PkgLength NumElements
//! <integers>`. A full AML interpreter is far beyond this guest; this scan
//! finds that one encoding, as simple OS loaders do, and gives up on anything
//! else (the caller then uses a default).

const NAME_OP: u8 = 0x08;
const ROOT_CHAR: u8 = b'\\';
const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;

/// SLP_TYP is a 3-bit field.
const SLP_TYP_MASK: u64 = 0x7;

/// `(SLP_TYPa, SLP_TYPb)` from the first `Name (_S5, Package ...)` in an AML
/// body (the DSDT without its header). SLP_TYPb is SLP_TYPa if absent.
pub fn s5_sleep_types(aml: &[u8]) -> Option<(u8, u8)> {
    let at = aml.windows(4).enumerate().find_map(|(i, w)| {
        let named = (i >= 1 && aml[i - 1] == NAME_OP)
            || (i >= 2 && aml[i - 1] == ROOT_CHAR && aml[i - 2] == NAME_OP);
        (w == b"_S5_" && named).then_some(i + 4)
    })?;
    let rest = aml.get(at..)?;
    if *rest.first()? != PACKAGE_OP {
        return None;
    }
    // PkgLength: bits 7-6 of the lead byte count the bytes that follow it.
    let pkg_length_bytes = 1 + usize::from(rest.get(1)? >> 6);
    let mut elements = rest.get(1 + pkg_length_bytes + 1..)?;
    let a = integer(&mut elements)?;
    let b = integer(&mut elements).unwrap_or(a);
    Some((a, b))
}

/// Decodes one AML integer constant, advancing past it; masked to SLP_TYP.
fn integer(aml: &mut &[u8]) -> Option<u8> {
    let (&op, rest) = aml.split_first()?;
    let (value, size) = match op {
        ZERO_OP => (0, 0),
        ONE_OP => (1, 0),
        BYTE_PREFIX => (u64::from(*rest.first()?), 1),
        WORD_PREFIX => (u64::from(crate::bytes::u16_at(rest, 0)?), 2),
        DWORD_PREFIX => (u64::from(crate::bytes::u32_at(rest, 0)?), 4),
        _ => return None,
    };
    *aml = &rest[size..];
    u8::try_from(value & SLP_TYP_MASK).ok()
}
