//! The MADT ("APIC"): how many processors the guest has.
//!
//! After the header come the local APIC address (u32) and flags (u32), then
//! variable-length structures `{ u8 type; u8 length; ... }`. A processor is
//! listed once, as a Local APIC (type 0, flags at offset 4) or, for APIC IDs
//! of 255 and up, a Local x2APIC (type 9, flags at offset 8); flags bit 0 is
//! "enabled". Processors that are only "online capable" are not counted.

use super::HEADER_SIZE;
use crate::bytes::{u32_at, u8_at};

const ENTRIES_OFFSET: usize = HEADER_SIZE + 8;
const LOCAL_APIC: u8 = 0;
const LOCAL_X2APIC: u8 = 9;
const ENABLED: u32 = 1;

/// Counts the enabled processors in a validated MADT. Stops at the first
/// structure whose length is impossible, rather than guessing past it.
pub fn enabled_cpus(table: &[u8]) -> u32 {
    let mut count = 0u32;
    let mut offset = ENTRIES_OFFSET;
    while let (Some(kind), Some(len)) = (u8_at(table, offset), u8_at(table, offset + 1)) {
        let len = usize::from(len);
        let Some(entry) = table.get(offset..offset + len).filter(|_| len >= 2) else {
            break;
        };
        let flags = match kind {
            LOCAL_APIC => u32_at(entry, 4),
            LOCAL_X2APIC => u32_at(entry, 8),
            _ => None,
        };
        if flags.is_some_and(|f| f & ENABLED != 0) {
            count += 1;
        }
        offset += len;
    }
    count
}
