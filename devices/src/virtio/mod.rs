//! virtio over PCI (virtio 1.x "modern" transport).
//!
//! [`common_config`] is the transport's common configuration structure: feature
//! negotiation, device status and each queue's set-up, as the guest drives them; [`pci`]
//! puts a device on PCI with its capabilities, BAR and MSI-X. The devices issue wires
//! notifications, interrupts and the devices themselves on top.

pub mod common_config;
pub mod pci;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready: queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Feature bit every modern device offers and every modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
