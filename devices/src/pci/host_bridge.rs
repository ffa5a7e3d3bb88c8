//! The PCI host bridge at 00:00.0: identifies segment 0 to the guest; no BARs.

use super::{BarMove, PciDevice};

/// Vendor (low 16 bits) and device id: Red Hat's generic PCIe host bridge, which guests know.
pub const ID: u32 = 0x0008_1b36;
const CLASS_HOST_BRIDGE: u32 = 0x0600_0000;

/// The host bridge's configuration space (header type 0, all read-only but the command word).
pub struct HostBridge {
    command: u16,
}

impl HostBridge {
    /// A bridge in its reset state.
    pub fn new() -> Self {
        HostBridge { command: 0 }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&self, reg: usize) -> u32 {
        match reg {
            0 => ID,
            1 => u32::from(self.command),
            2 => CLASS_HOST_BRIDGE,
            // Subsystem vendor and id.
            11 => ID,
            _ => 0,
        }
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        if reg == 1 && offset == 0 && data.len() >= 2 {
            self.command = u16::from_le_bytes([data[0], data[1]]);
        }
        None
    }
}
