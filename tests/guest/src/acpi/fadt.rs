//! The FADT ("FACP"): which registers power the machine off or reset it.
//!
//! Field offsets (ACPI 6.x, table 5.9) used here:
//!
//! | offset | field                     |
//! |--------|---------------------------|
//! | 40     | DSDT (u32)                |
//! | 64     | PM1a_CNT_BLK (u32, port)  |
//! | 68     | PM1b_CNT_BLK (u32, port)  |
//! | 112    | Flags (u32)               |
//! | 116    | RESET_REG (GAS)           |
//! | 128    | RESET_VALUE (u8)          |
//! | 140    | X_DSDT (u64)              |
//! | 172    | X_PM1a_CNT_BLK (GAS)      |
//! | 244    | SLEEP_CONTROL_REG (GAS)   |
//!
//! Older, shorter FADTs simply lack the later fields.

use crate::bytes::{array, u32_at, u64_at, u8_at};

/// Flags bit 10: RESET_REG is supported.
pub const RESET_REG_SUP: u32 = 1 << 10;
/// Flags bit 20: hardware-reduced ACPI (no PM1 blocks; sleep registers instead).
pub const HW_REDUCED_ACPI: u32 = 1 << 20;

/// Sleep type for S5 when the DSDT has no usable `\_S5`.
pub const DEFAULT_S5_SLP_TYP: u8 = 5;

/// Generic Address Structure address space: system memory.
pub const SPACE_MEMORY: u8 = 0;
/// Generic Address Structure address space: system I/O.
pub const SPACE_IO: u8 = 1;

const PM1_SLP_TYP_SHIFT: u32 = 10;
const PM1_SLP_EN: u32 = 1 << 13;
const SLEEP_CONTROL_SLP_TYP_SHIFT: u32 = 2;
const SLEEP_CONTROL_SLP_EN: u32 = 1 << 5;

/// The i8042 controller's command port and its "pulse reset line" command.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u64 = 0xfe;
/// The PCI reset control register and its "hard reset now" value.
const RESET_CONTROL: u16 = 0xcf9;
const RESET_CONTROL_HARD: u64 = 0x06;

/// An ACPI Generic Address Structure (12 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gas {
    /// Address space: [`SPACE_MEMORY`], [`SPACE_IO`], ...
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Register offset in bits.
    pub bit_offset: u8,
    /// Access size: 0 undefined, 1 byte, 2 word, 3 dword, 4 qword.
    pub access_size: u8,
    /// Address in `space`.
    pub address: u64,
}

impl Gas {
    /// Parses the 12 bytes at `offset`; `None` if out of range or the address is 0
    /// (the way tables say "not present").
    pub fn parse(bytes: &[u8], offset: usize) -> Option<Self> {
        let raw: [u8; 12] = array(bytes, offset)?;
        let gas = Self {
            space: raw[0],
            bit_width: raw[1],
            bit_offset: raw[2],
            access_size: raw[3],
            address: u64_at(&raw, 4)?,
        };
        (gas.address != 0).then_some(gas)
    }

    /// The register write that stores `value` here. `default_bytes` is the
    /// width to use when the structure gives none. `None` for address spaces
    /// other than memory and I/O, or ports beyond 0xffff.
    pub fn write(&self, value: u64, default_bytes: u8) -> Option<RegWrite> {
        let bytes = match (self.access_size, self.bit_width) {
            (1..=4, _) => 1 << (self.access_size - 1),
            (_, 8 | 16 | 32 | 64) => self.bit_width / 8,
            _ => default_bytes,
        };
        let value = value.checked_shl(u32::from(self.bit_offset))?;
        match self.space {
            SPACE_MEMORY => Some(RegWrite::Memory {
                addr: self.address,
                bytes,
                value,
            }),
            SPACE_IO => Some(RegWrite::Io {
                port: u16::try_from(self.address).ok()?,
                bytes: bytes.min(4),
                value,
            }),
            _ => None,
        }
    }
}

/// One register write: what the guest does to power off or reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegWrite {
    /// An `out` of `bytes` (1, 2 or 4) bytes.
    Io {
        /// I/O port.
        port: u16,
        /// Access width in bytes.
        bytes: u8,
        /// Value, truncated to the width.
        value: u64,
    },
    /// A memory store of `bytes` (1, 2, 4 or 8) bytes.
    Memory {
        /// Physical address.
        addr: u64,
        /// Access width in bytes.
        bytes: u8,
        /// Value, truncated to the width.
        value: u64,
    },
}

/// What the guest uses from the FADT. Absent fields are 0 or `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fadt {
    /// Fixed feature flags.
    pub flags: u32,
    /// PM1a control block port.
    pub pm1a_cnt_blk: u32,
    /// PM1b control block port.
    pub pm1b_cnt_blk: u32,
    /// PM1a control block, extended form (used if `pm1a_cnt_blk` is 0).
    pub x_pm1a_cnt_blk: Option<Gas>,
    /// Reset register.
    pub reset_reg: Option<Gas>,
    /// Value to write to the reset register.
    pub reset_value: u8,
    /// Sleep control register (hardware-reduced ACPI).
    pub sleep_control_reg: Option<Gas>,
    /// Physical address of the DSDT (X_DSDT if set, else DSDT).
    pub dsdt: u64,
    /// `(SLP_TYPa, SLP_TYPb)` for S5 from the DSDT's `\_S5`, if found.
    pub s5: Option<(u8, u8)>,
}

impl Fadt {
    /// Parses a validated FADT (the DSDT is read separately, into `s5`).
    pub fn parse(table: &[u8]) -> Self {
        let x_dsdt = u64_at(table, 140).unwrap_or(0);
        Self {
            flags: u32_at(table, 112).unwrap_or(0),
            pm1a_cnt_blk: u32_at(table, 64).unwrap_or(0),
            pm1b_cnt_blk: u32_at(table, 68).unwrap_or(0),
            x_pm1a_cnt_blk: Gas::parse(table, 172),
            reset_reg: Gas::parse(table, 116),
            reset_value: u8_at(table, 128).unwrap_or(0),
            sleep_control_reg: Gas::parse(table, 244),
            dsdt: if x_dsdt != 0 {
                x_dsdt
            } else {
                u32_at(table, 40).map_or(0, u64::from)
            },
            s5: None,
        }
    }

    /// The writes that enter S5, in order: SLEEP_CONTROL_REG on
    /// hardware-reduced platforms, else PM1a (port or extended) and PM1b.
    pub fn poweroff_writes(&self) -> [Option<RegWrite>; 2] {
        let (typ_a, typ_b) = self.s5.unwrap_or((DEFAULT_S5_SLP_TYP, DEFAULT_S5_SLP_TYP));
        if self.flags & HW_REDUCED_ACPI != 0 {
            let value = (u32::from(typ_a) << SLEEP_CONTROL_SLP_TYP_SHIFT) | SLEEP_CONTROL_SLP_EN;
            let write = self
                .sleep_control_reg
                .and_then(|gas| gas.write(value.into(), 1));
            return [write, None];
        }
        let pm1 = |typ: u8| u64::from((u32::from(typ) << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN);
        let pm1a = match u16::try_from(self.pm1a_cnt_blk) {
            Ok(port) if port != 0 => Some(RegWrite::Io {
                port,
                bytes: 2,
                value: pm1(typ_a),
            }),
            _ => self.x_pm1a_cnt_blk.and_then(|gas| gas.write(pm1(typ_a), 2)),
        };
        let pm1b = u16::try_from(self.pm1b_cnt_blk)
            .ok()
            .filter(|&port| port != 0)
            .map(|port| RegWrite::Io {
                port,
                bytes: 2,
                value: pm1(typ_b),
            });
        [pm1a, pm1b]
    }
}

/// The writes that reset the machine, in order of preference: the FADT's
/// RESET_REG if it says the register is supported, then the i8042 reset
/// pulse, then the PCI reset control register.
pub fn reset_writes(fadt: Option<&Fadt>) -> [Option<RegWrite>; 3] {
    let reset_reg = fadt
        .filter(|f| f.flags & RESET_REG_SUP != 0)
        .and_then(|f| f.reset_reg?.write(f.reset_value.into(), 1));
    [
        reset_reg,
        Some(RegWrite::Io {
            port: I8042_COMMAND,
            bytes: 1,
            value: I8042_RESET,
        }),
        Some(RegWrite::Io {
            port: RESET_CONTROL,
            bytes: 1,
            value: RESET_CONTROL_HARD,
        }),
    ]
}
