//! The MADT ("APIC"): the processors the guest has.
//!
//! After the header come the local APIC address (u32) and flags (u32), then
//! variable-length structures `{ u8 type; u8 length; ... }`. A processor is
//! listed once, as a Local APIC (type 0: APIC ID u8 at offset 3, flags at
//! offset 4) or, for APIC IDs of 255 and up, a Local x2APIC (type 9: APIC ID
//! u32 at offset 4, flags at offset 8); flags bit 0 is "enabled". Processors
//! that are only "online capable" are not counted.

use super::HEADER_SIZE;
use crate::bytes::{u32_at, u8_at};

const ENTRIES_OFFSET: usize = HEADER_SIZE + 8;
const LOCAL_APIC: u8 = 0;
const LOCAL_X2APIC: u8 = 9;
const ENABLED: u32 = 1;

/// Most processors whose APIC IDs are kept (the count goes on beyond).
pub const MAX_CPUS: usize = 256;

/// The APIC IDs of the enabled processors, in MADT order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicIds {
    ids: [u32; MAX_CPUS],
    len: usize,
}

impl Default for ApicIds {
    fn default() -> Self {
        Self {
            ids: [0; MAX_CPUS],
            len: 0,
        }
    }
}

impl ApicIds {
    /// The IDs, at most [`MAX_CPUS`] of them.
    pub fn as_slice(&self) -> &[u32] {
        &self.ids[..self.len]
    }

    fn push(&mut self, id: u32) {
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = id;
            self.len += 1;
        }
    }
}

/// The enabled processors in a validated MADT: how many, and the APIC IDs of
/// the first [`MAX_CPUS`]. Stops at the first structure whose length is
/// impossible, rather than guessing past it.
pub fn enabled_cpus(table: &[u8]) -> (u32, ApicIds) {
    let mut count = 0u32;
    let mut ids = ApicIds::default();
    let mut offset = ENTRIES_OFFSET;
    while let (Some(kind), Some(len)) = (u8_at(table, offset), u8_at(table, offset + 1)) {
        let len = usize::from(len);
        let Some(entry) = table.get(offset..offset + len).filter(|_| len >= 2) else {
            break;
        };
        let cpu = match kind {
            LOCAL_APIC => u8_at(entry, 3).map(u32::from).zip(u32_at(entry, 4)),
            LOCAL_X2APIC => u32_at(entry, 4).zip(u32_at(entry, 8)),
            _ => None,
        };
        if let Some((id, _)) = cpu.filter(|(_, flags)| flags & ENABLED != 0) {
            count += 1;
            ids.push(id);
        }
        offset += len;
    }
    (count, ids)
}
