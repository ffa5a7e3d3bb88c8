//! A type-0 PCI function's configuration space: identity, command/status, BARs with the
//! sizing protocol, and the capability list.
//!
//! Guests may write anything anywhere; only the bits a real function lets them change
//! change (the writable mask), so a guest cannot rename the device or resize a BAR. A BAR
//! that moves is reported to the caller, which remaps what lives behind it. A guest sizing a
//! 64-bit BAR writes its halves one at a time and passes through addresses that mean
//! nothing, each reported: callers map BARs only while memory decoding is enabled.
//!
//! This is the base of the virtio-pci functions the devices issue adds.

/// Dwords of configuration space (4 KiB, as ECAM exposes it).
pub const CONFIG_DWORDS: usize = 1024;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITIES_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// First byte of the capability area (after the 64-byte header).
const FIRST_CAPABILITY: usize = 0x40;
/// Status register bit: the function has a capability list.
const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
/// Command bits a guest may change: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x1 | 0x2 | 0x4 | (1 << 10);

/// What a BAR maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory.
    Memory32,
    /// 64-bit memory (uses this BAR and the next).
    Memory64,
    /// Port I/O.
    Io,
}

/// A BAR as the device declared it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Current guest address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// What it maps.
    pub kind: BarKind,
}

/// A BAR the guest moved: remap `size` bytes from `old` to `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub index: usize,
    /// Previous address.
    pub old: u64,
    /// New address.
    pub new: u64,
    /// Size.
    pub size: u64,
}

/// Errors declaring the layout of a function (programming errors of the VMM).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index out of range or already used (a 64-bit BAR takes two).
    #[error("BAR {0} is out of range or already used")]
    BarIndex(usize),
    /// BAR size not a power of two, or too small.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    /// BAR address not aligned to its size.
    #[error("BAR address {0:#x} is not aligned to its size")]
    BarAlignment(u64),
    /// No room left for a capability.
    #[error("Capability of {0} bytes does not fit the configuration space")]
    CapabilitySpace(usize),
}

/// A function's configuration space as the guest left it, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigState {
    /// Every dword.
    pub regs: Vec<u32>,
    /// Each BAR's address (None where no BAR is declared).
    pub bars: Vec<Option<u64>>,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class, subclass and programming interface.
    pub class: [u8; 3],
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct PciConfiguration {
    regs: Box<[u32; CONFIG_DWORDS]>,
    writable: Box<[u32; CONFIG_DWORDS]>,
    bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last capability header, to link the next one.
    last_capability: Option<usize>,
    /// First free byte of the capability area.
    next_capability: usize,
}

impl PciConfiguration {
    /// A function with `id`, no BARs and no capabilities. Its interrupt pin is 0: baton's
    /// functions interrupt with MSI-X only, and a pin with no routing behind it makes Linux
    /// log "PCI INT A: no GSI".
    pub fn new(id: Identity) -> Self {
        let mut regs = Box::new([0u32; CONFIG_DWORDS]);
        let mut writable = Box::new([0u32; CONFIG_DWORDS]);
        regs[0] = u32::from(id.device) << 16 | u32::from(id.vendor);
        regs[2] = u32::from(id.class[0]) << 24
            | u32::from(id.class[1]) << 16
            | u32::from(id.class[2]) << 8
            | u32::from(id.revision);
        regs[11] = u32::from(id.subsystem) << 16 | u32::from(id.subsystem_vendor);
        writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size and latency timer are scratch registers; interrupt line too.
        writable[3] = 0x0000_ffff;
        writable[INTERRUPT_REG] = 0xff;
        PciConfiguration {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        }
    }

    /// Declares BAR `index` at `addr` (aligned to `size`, a power of two).
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        let wide = bar.kind == BarKind::Memory64;
        let last = index + usize::from(wide);
        let taken = |i: usize| {
            // A slot is used by its own BAR or as the upper half of a 64-bit BAR before it.
            self.bars[i].is_some()
                || (i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind == BarKind::Memory64))
        };
        if last >= NUM_BARS || taken(index) || (wide && taken(last)) {
            return Err(ConfigError::BarIndex(index));
        }
        if !bar.size.is_power_of_two() || bar.size < 16 {
            return Err(ConfigError::BarSize(bar.size));
        }
        if bar.addr % bar.size != 0 {
            return Err(ConfigError::BarAlignment(bar.addr));
        }
        let reg = BAR0_REG + index;
        let mask = !(bar.size - 1);
        let type_bits = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 => 0b100,
            BarKind::Io => 0b1,
        };
        self.regs[reg] = (bar.addr as u32 & mask as u32) | type_bits;
        self.writable[reg] = mask as u32 & if bar.kind == BarKind::Io { !0x3 } else { !0xf };
        if wide {
            self.regs[reg + 1] = (bar.addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// Appends a capability; `body` starts with its id byte and leaves the next-pointer byte
    /// (`body[1]`) for the list. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let end = (offset + body.len()).next_multiple_of(4);
        if body.len() < 2 || end > 256 {
            return Err(ConfigError::CapabilitySpace(body.len()));
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { *b });
        }
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[CAPABILITIES_POINTER_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end;
        Ok(offset)
    }

    /// Lets the guest write `mask` bits of the dword at byte `offset` (within a capability).
    pub fn set_writable(&mut self, offset: usize, mask: u32) {
        self.writable[offset / 4] = mask;
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// The dword at index `reg` (all ones past the end).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Writes `data` at byte `offset` within dword `reg`, keeping read-only bits; returns a
    /// BAR the write moved.
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let offset = offset as usize;
        if reg >= CONFIG_DWORDS || data.is_empty() || offset + data.len() > 4 {
            return None;
        }
        let mut value = [0u8; 4];
        value[offset..offset + data.len()].copy_from_slice(data);
        let byte_mask = (u32::MAX >> (32 - 8 * data.len() as u32)) << (8 * offset);
        let mask = self.writable[reg] & byte_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | (u32::from_le_bytes(value) & mask);
        self.bar_moved(reg)
    }

    /// If `reg` belongs to a BAR whose address changed, records and reports the move.
    fn bar_moved(&mut self, reg: usize) -> Option<BarMove> {
        if !(BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return None;
        }
        let slot = reg - BAR0_REG;
        // The upper half of a 64-bit BAR belongs to the BAR before it.
        let index = match self.bars[slot] {
            Some(_) => slot,
            None => slot
                .checked_sub(1)
                .filter(|i| matches!(self.bars[*i], Some(b) if b.kind == BarKind::Memory64))?,
        };
        let bar = self.bars[index]?;
        let low = u64::from(self.regs[BAR0_REG + index]);
        let new = match bar.kind {
            BarKind::Memory64 => low & !0xf | u64::from(self.regs[BAR0_REG + index + 1]) << 32,
            BarKind::Memory32 => low & !0xf,
            BarKind::Io => low & !0x3,
        };
        // Sizing writes all ones: the address read back is not a place to map.
        let sizing = new | (bar.size - 1) == u64::MAX >> (64 - self.bar_width(bar.kind));
        if new == bar.addr || sizing {
            return None;
        }
        self.bars[index] = Some(Bar { addr: new, ..bar });
        Some(BarMove {
            index,
            old: bar.addr,
            new,
            size: bar.size,
        })
    }

    fn bar_width(&self, kind: BarKind) -> u32 {
        match kind {
            BarKind::Memory64 => 64,
            BarKind::Memory32 => 32,
            BarKind::Io => 32,
        }
    }

    /// What the guest set: every register and where each BAR is.
    pub fn state(&self) -> ConfigState {
        ConfigState {
            regs: self.regs.to_vec(),
            bars: self.bars.iter().map(|b| b.map(|b| b.addr)).collect(),
        }
    }

    /// Puts back what the guest had set in a function laid out like this one. Read-only
    /// bits must match (the same device, the same capabilities) or the state is refused.
    pub fn restore(&mut self, state: &ConfigState) -> Result<(), crate::StateError> {
        if state.regs.len() != CONFIG_DWORDS || state.bars.len() != NUM_BARS {
            return Err(crate::StateError::new(
                "PCI configuration state has the wrong size",
            ));
        }
        for (reg, (&saved, &now)) in state.regs.iter().zip(self.regs.iter()).enumerate() {
            let fixed = !self.writable[reg];
            if saved & fixed != now & fixed {
                return Err(crate::StateError::Invalid(format!(
                    "PCI configuration register {reg:#x} is {saved:#x} in the state, but this \
                     device has {now:#x} in its read-only bits"
                )));
            }
        }
        for (i, addr) in state.bars.iter().enumerate() {
            match (&mut self.bars[i], addr) {
                (Some(bar), Some(addr)) => bar.addr = *addr,
                (None, None) => {}
                _ => {
                    return Err(crate::StateError::Invalid(format!(
                        "BAR {i} is declared on one side only"
                    )))
                }
            }
        }
        self.regs.copy_from_slice(&state.regs);
        Ok(())
    }

    /// BAR `index` as it is now.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & 0x2 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(Identity {
            vendor: 0x1af4,
            device: 0x1041,
            class: [0x02, 0x00, 0x00],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x0040,
        })
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) -> Option<BarMove> {
        c.write_reg(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = config();
        assert_eq!(c.read_reg(0), 0x1041_1af4);
        write32(&mut c, 0, 0xdead_beef);
        assert_eq!(c.read_reg(0), 0x1041_1af4);
        assert_eq!(c.read_reg(2) >> 8, 0x02_0000);
        assert_eq!(c.read_reg(11), 0x0040_1af4);
        assert_eq!(c.read_reg(4096), u32::MAX);
    }

    /// Regression: the pin said INTA with nothing routed behind it, and Linux logged
    /// "PCI INT A: no GSI" for every function.
    #[test]
    fn no_interrupt_pin_and_a_scratch_interrupt_line() {
        let mut c = config();
        assert_eq!(c.read_reg(INTERRUPT_REG) >> 8 & 0xff, 0, "no pin");
        c.write_reg(INTERRUPT_REG, 0, &[0x0b, 0x01]);
        assert_eq!(
            c.read_reg(INTERRUPT_REG) & 0xffff,
            0x000b,
            "line written, pin kept"
        );
    }

    #[test]
    fn command_register_keeps_only_known_bits() {
        let mut c = config();
        c.write_reg(COMMAND_REG, 0, &[0xff, 0xff]);
        assert_eq!(c.read_reg(COMMAND_REG) & 0xffff, COMMAND_WRITABLE);
        assert!(c.memory_enabled());
        // A byte write to the status half leaves the command half alone.
        c.write_reg(COMMAND_REG, 2, &[0xff]);
        assert_eq!(c.read_reg(COMMAND_REG) & 0xffff, COMMAND_WRITABLE);
    }

    #[test]
    fn bar_sizing_and_move_32() {
        let mut c = config();
        let bar = Bar {
            addr: 0xc000_0000,
            size: 0x4000,
            kind: BarKind::Memory32,
        };
        c.add_bar(0, bar).unwrap();
        assert_eq!(c.read_reg(BAR0_REG), 0xc000_0000);
        // Sizing: all ones reads back the size mask; nothing moves.
        assert_eq!(write32(&mut c, BAR0_REG, u32::MAX), None);
        assert_eq!(c.read_reg(BAR0_REG), 0xffff_c000);
        // Moving it.
        let m = write32(&mut c, BAR0_REG, 0xc001_0000).unwrap();
        assert_eq!((m.old, m.new, m.size), (0xc000_0000, 0xc001_0000, 0x4000));
        assert_eq!(c.bar(0).unwrap().addr, 0xc001_0000);
        // Unaligned bits are dropped.
        let m = write32(&mut c, BAR0_REG, 0xc002_0123).unwrap();
        assert_eq!(m.new, 0xc002_0000);
    }

    #[test]
    fn bar_64_spans_two_registers() {
        let mut c = config();
        let bar = Bar {
            addr: 0x1_0000_0000,
            size: 0x10_0000,
            kind: BarKind::Memory64,
        };
        c.add_bar(2, bar).unwrap();
        assert_eq!(c.read_reg(BAR0_REG + 2), 0b100);
        assert_eq!(c.read_reg(BAR0_REG + 3), 1);
        assert_eq!(c.add_bar(3, bar), Err(ConfigError::BarIndex(3)));
        write32(&mut c, BAR0_REG + 2, u32::MAX);
        write32(&mut c, BAR0_REG + 3, u32::MAX);
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xfff0_0004);
        assert_eq!(c.read_reg(BAR0_REG + 3), u32::MAX);
        write32(&mut c, BAR0_REG + 2, 0);
        let m = write32(&mut c, BAR0_REG + 3, 2).unwrap();
        assert_eq!(m.new, 0x2_0000_0000);
        assert_eq!(m.index, 2);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = config();
        let bar = |addr, size| Bar {
            addr,
            size,
            kind: BarKind::Memory32,
        };
        assert_eq!(c.add_bar(6, bar(0, 16)), Err(ConfigError::BarIndex(6)));
        assert_eq!(c.add_bar(0, bar(0, 24)), Err(ConfigError::BarSize(24)));
        assert_eq!(
            c.add_bar(0, bar(0x10, 0x100)),
            Err(ConfigError::BarAlignment(0x10))
        );
        c.add_bar(0, bar(0, 16)).unwrap();
        assert_eq!(c.add_bar(0, bar(0, 16)), Err(ConfigError::BarIndex(0)));
    }

    #[test]
    fn capabilities_form_a_list() {
        let mut c = config();
        let first = c.add_capability(&[0x09, 0xaa, 0x10, 1, 2, 3]).unwrap();
        let second = c.add_capability(&[0x11, 0xaa, 0x00, 0x00]).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_eq!(c.read_reg(CAPABILITIES_POINTER_REG), 0x40);
        assert_ne!(c.read_reg(COMMAND_REG) & STATUS_CAPABILITIES, 0);
        // id, next pointer, then the body as given.
        assert_eq!(c.read_reg(0x40 / 4) & 0xffff, 0x4809);
        assert_eq!(c.read_reg(0x48 / 4) & 0xffff, 0x0011);
        // Capabilities are read-only unless made writable.
        write32(&mut c, 0x48 / 4, 0);
        assert_eq!(c.read_reg(0x48 / 4) & 0xff, 0x11);
        assert!(c.add_capability(&[0; 300]).is_err());
    }

    #[test]
    fn hostile_writes_never_panic() {
        let mut c = config();
        c.add_bar(
            0,
            Bar {
                addr: 0xc000_0000,
                size: 0x1000,
                kind: BarKind::Memory32,
            },
        )
        .unwrap();
        for reg in [0, 4, 9, 1023, 1024, usize::MAX] {
            for (offset, len) in [(0, 4), (3, 1), (3, 2), (4, 1), (0, 0), (0, 8)] {
                let _ = c.write_reg(reg, offset, &vec![0xff; len]);
            }
        }
    }
}
