//! The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3): what the guest reads
//! and writes to negotiate features, set the device status and set up each queue.
//!
//! Layout (offsets in bytes):
//!
//! ```text
//!  0 device_feature_select u32    4 device_feature u32 (RO)
//!  8 driver_feature_select u32   12 driver_feature u32
//! 16 config_msix_vector u16      18 num_queues u16 (RO)
//! 20 device_status u8            21 config_generation u8 (RO)
//! 22 queue_select u16            24 queue_size u16
//! 26 queue_msix_vector u16       28 queue_enable u16
//! 30 queue_notify_off u16 (RO)   32 queue_desc u64
//! 40 queue_driver u64            48 queue_device u64
//! ```
//!
//! The guest is not trusted: it may only accept features the device offers (FEATURES_OK is
//! refused otherwise), queue set-up is frozen once DRIVER_OK is set, a queue size must be a
//! power of two no larger than the device's maximum, and accesses of the wrong width are
//! ignored (reads answer zero).

use super::{status, VIRTIO_F_VERSION_1};

/// Bytes of the structure.
pub const SIZE: u64 = 56;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// One queue as the driver set it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub enabled: bool,
    /// MSI-X vector for its interrupts.
    pub msix_vector: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub driver: u64,
    /// Guest address of the used (device) ring.
    pub device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            msix_vector: NO_VECTOR,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// What a guest write means for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing to do.
    None,
    /// The driver set DRIVER_OK: activate the device with the negotiated features and queues.
    Activate,
    /// The driver wrote 0 to the status: reset the device (the transport already reset).
    Reset,
}

/// The common configuration of one device; serialised as it is for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonConfig {
    device_features: u64,
    driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
}

impl CommonConfig {
    /// A device offering `features` (VERSION_1 is always added) with queues of these maximum
    /// sizes.
    pub fn new(features: u64, queue_max_sizes: &[u16]) -> Self {
        CommonConfig {
            device_features: features | VIRTIO_F_VERSION_1,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|m| QueueConfig::new(*m))
                .collect(),
        }
    }

    /// The state `saved` for a device offering `features` with queues of these maximum
    /// sizes; refused if it belongs to another device or holds what no guest could set.
    pub fn from_state(
        features: u64,
        queue_max_sizes: &[u16],
        saved: CommonConfig,
    ) -> Result<Self, crate::StateError> {
        let fresh = CommonConfig::new(features, queue_max_sizes);
        if saved.device_features != fresh.device_features {
            return Err(crate::StateError::Invalid(format!(
                "the device offers features {:#x}, the state {:#x}",
                fresh.device_features, saved.device_features
            )));
        }
        if saved.queues.len() != fresh.queues.len() {
            return Err(crate::StateError::Invalid(format!(
                "the device has {} queues, the state {}",
                fresh.queues.len(),
                saved.queues.len()
            )));
        }
        for (i, (q, f)) in saved.queues.iter().zip(&fresh.queues).enumerate() {
            if q.max_size != f.max_size || !q.size.is_power_of_two() || q.size > q.max_size {
                return Err(crate::StateError::Invalid(format!(
                    "queue {i} has size {} of at most {} in the state; the device allows {}",
                    q.size, q.max_size, f.max_size
                )));
            }
        }
        Ok(saved)
    }

    /// Features both sides agreed on.
    pub fn acked_features(&self) -> u64 {
        self.driver_features & self.device_features
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The queues.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// MSI-X vector for configuration changes.
    pub fn config_msix_vector(&self) -> u16 {
        self.config_msix_vector
    }

    /// Marks the device broken: the driver must reset it before using it again.
    pub fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// Marks the device configuration changed (the guest re-reads it).
    pub fn bump_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueConfig> {
        let live = self.status & status::DRIVER_OK != 0;
        // Queue set-up is frozen while the device runs.
        (!live)
            .then(|| self.queues.get_mut(usize::from(self.queue_select)))
            .flatten()
    }

    fn feature_word(features: u64, select: u32) -> u32 {
        match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    /// A guest read at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let q = self.selected();
        let value: u64 = match (offset, data.len()) {
            (0, 4) => self.device_feature_select.into(),
            (4, 4) => Self::feature_word(self.device_features, self.device_feature_select).into(),
            (8, 4) => self.driver_feature_select.into(),
            (12, 4) => Self::feature_word(self.driver_features, self.driver_feature_select).into(),
            (16, 2) => self.config_msix_vector.into(),
            (18, 2) => self.queues.len() as u64,
            (20, 1) => self.status.into(),
            (21, 1) => self.config_generation.into(),
            (22, 2) => self.queue_select.into(),
            (24, 2) => q.map_or(0, |q| q.size.into()),
            (26, 2) => q.map_or(NO_VECTOR, |q| q.msix_vector).into(),
            (28, 2) => q.map_or(0, |q| q.enabled.into()),
            // Each queue notifies at its own index times the notify multiplier.
            (30, 2) => q.map_or(0, |_| self.queue_select.into()),
            (32, 8) => q.map_or(0, |q| q.desc),
            (40, 8) => q.map_or(0, |q| q.driver),
            (48, 8) => q.map_or(0, |q| q.device),
            // 64-bit fields may be read as two dwords.
            (32 | 36 | 40 | 44 | 48 | 52, 4) => {
                let full = q.map_or(0, |q| match offset & !7 {
                    32 => q.desc,
                    40 => q.driver,
                    _ => q.device,
                });
                if offset % 8 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Event {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        match (offset, data.len()) {
            (0, 4) => self.device_feature_select = v as u32,
            (8, 4) => self.driver_feature_select = v as u32,
            (12, 4) => self.write_driver_features(v as u32),
            (16, 2) => self.config_msix_vector = v as u16,
            (20, 1) => return self.write_status(v as u8),
            (22, 2) => self.queue_select = v as u16,
            (24, 2) => {
                if let Some(q) = self.selected_mut() {
                    let size = v as u16;
                    if size.is_power_of_two() && size <= q.max_size {
                        q.size = size;
                    }
                }
            }
            (26, 2) => {
                if let Some(q) = self.selected_mut() {
                    q.msix_vector = v as u16;
                }
            }
            (28, 2) => {
                if let Some(q) = self.selected_mut() {
                    // Only 1 may be written (a driver disables a queue by resetting).
                    if v == 1 {
                        q.enabled = true;
                    }
                }
            }
            (32 | 40 | 48, 8) => self.write_address(offset, v, !0),
            (32 | 36 | 40 | 44 | 48 | 52, 4) => {
                let (value, mask) = if offset % 8 == 0 {
                    (v, 0xffff_ffff)
                } else {
                    (v << 32, 0xffff_ffff_0000_0000)
                };
                self.write_address(offset & !7, value, mask);
            }
            _ => {}
        }
        Event::None
    }

    fn write_address(&mut self, field: u64, value: u64, mask: u64) {
        if let Some(q) = self.selected_mut() {
            let slot = match field {
                32 => &mut q.desc,
                40 => &mut q.driver,
                _ => &mut q.device,
            };
            *slot = (*slot & !mask) | (value & mask);
        }
    }

    fn write_driver_features(&mut self, word: u32) {
        // Features are fixed once FEATURES_OK is set.
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(word),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(word) << 32)
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) -> Event {
        if value == 0 {
            let fresh = CommonConfig::new(
                self.device_features,
                &self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
            );
            // The generation keeps counting across resets.
            let generation = self.config_generation;
            *self = fresh;
            self.config_generation = generation;
            return Event::Reset;
        }
        let mut value = value;
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // Refuse features we do not offer, and legacy drivers.
            let unknown = self.driver_features & !self.device_features != 0;
            if unknown || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                value &= !status::FEATURES_OK;
            }
        }
        let activate = value & status::DRIVER_OK != 0
            && self.status & status::DRIVER_OK == 0
            && value & status::FEATURES_OK != 0;
        self.status = value;
        if activate {
            Event::Activate
        } else {
            Event::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(c: &CommonConfig, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(c: &mut CommonConfig, offset: u64, len: usize, v: u64) -> Event {
        c.write(offset, &v.to_le_bytes()[..len])
    }

    /// Drives the standard initialisation; returns the event of DRIVER_OK.
    fn initialise(c: &mut CommonConfig, features: u64) -> Event {
        w(c, 20, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        w(c, 8, 4, 0);
        w(c, 12, 4, features & 0xffff_ffff);
        w(c, 8, 4, 1);
        w(c, 12, 4, features >> 32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(c, 20, 1, u64::from(s));
        if r(c, 20, 1) as u8 & status::FEATURES_OK == 0 {
            return Event::None;
        }
        w(c, 22, 2, 1);
        w(c, 24, 2, 64);
        w(c, 26, 2, 3);
        w(c, 32, 8, 0x1000);
        w(c, 40, 4, 0x2000);
        w(c, 44, 4, 0);
        w(c, 48, 8, 0x3000);
        w(c, 28, 2, 1);
        w(c, 20, 1, u64::from(s | status::DRIVER_OK))
    }

    #[test]
    fn negotiation_and_queue_setup() {
        let mut c = CommonConfig::new(1 << 5, &[256, 256]);
        assert_eq!(r(&c, 18, 2), 2);
        w(&mut c, 0, 4, 1);
        assert_eq!(r(&c, 4, 4), 1, "VERSION_1 offered in the high word");
        assert_eq!(
            initialise(&mut c, VIRTIO_F_VERSION_1 | 1 << 5),
            Event::Activate
        );
        assert_eq!(c.acked_features(), VIRTIO_F_VERSION_1 | 1 << 5);
        let q = c.queues()[1];
        assert_eq!((q.size, q.msix_vector, q.enabled), (64, 3, true));
        assert_eq!((q.desc, q.driver, q.device), (0x1000, 0x2000, 0x3000));
        assert!(!c.queues()[0].enabled);
        // Frozen while running.
        w(&mut c, 32, 8, 0xdead_0000);
        assert_eq!(c.queues()[1].desc, 0x1000);
        // Reads of the 64-bit fields, whole and in halves.
        w(&mut c, 22, 2, 1);
        assert_eq!(r(&c, 40, 8), 0x2000);
        assert_eq!(r(&c, 44, 4), 0);
        assert_eq!(r(&c, 30, 2), 1, "notify offset is the queue index");
    }

    #[test]
    fn refuses_unoffered_features_and_legacy_drivers() {
        let mut c = CommonConfig::new(1 << 5, &[16]);
        assert_eq!(initialise(&mut c, VIRTIO_F_VERSION_1 | 1 << 6), Event::None);
        assert_eq!(c.status() & status::FEATURES_OK, 0);
        let mut c = CommonConfig::new(1 << 5, &[16]);
        assert_eq!(initialise(&mut c, 1 << 5), Event::None, "no VERSION_1");
    }

    #[test]
    fn reset_clears_everything_but_the_generation() {
        let mut c = CommonConfig::new(0, &[8]);
        c.bump_generation();
        initialise(&mut c, VIRTIO_F_VERSION_1);
        assert_eq!(w(&mut c, 20, 1, 0), Event::Reset);
        assert_eq!(c.status(), 0);
        assert_eq!(c.acked_features(), 0);
        assert!(!c.queues()[0].enabled);
        assert_eq!(r(&c, 21, 1), 1);
        assert_eq!(c.queues()[0].max_size, 8);
    }

    #[test]
    fn invalid_sizes_selects_and_widths_are_ignored() {
        let mut c = CommonConfig::new(0, &[128]);
        w(&mut c, 24, 2, 100);
        assert_eq!(c.queues()[0].size, 128, "not a power of two");
        w(&mut c, 24, 2, 256);
        assert_eq!(c.queues()[0].size, 128, "above the maximum");
        w(&mut c, 22, 2, 7);
        assert_eq!(r(&c, 24, 2), 0, "no queue 7");
        w(&mut c, 24, 2, 16);
        w(&mut c, 20, 4, 0xffff_ffff);
        assert_eq!(c.status(), 0, "status is one byte");
        assert_eq!(r(&c, 4, 2), 0);
        assert_eq!(r(&c, 100, 4), 0);
        w(&mut c, 28, 2, 0);
        assert!(!c.queues()[0].enabled);
        // Every offset and width, never a panic.
        for offset in 0..64 {
            for len in [1, 2, 3, 4, 8] {
                let mut b = [0u8; 8];
                c.read(offset, &mut b[..len]);
                c.write(offset, &[0xff; 8][..len]);
            }
        }
    }
}
