//! virtio over PCI (virtio 1.x "modern" transport) and the virtio devices.
//!
//! [`common_config`] is the transport's common configuration structure: feature
//! negotiation, device status and each queue's set-up, as the guest drives them; [`pci`]
//! puts a device on PCI with its capabilities, BAR and MSI-X; [`transport`] runs it: queue
//! notifications through ioeventfds, interrupts through MSI-X routes and irqfds, and the
//! device's activation and reset. The devices ([`rng`], [`net`], [`block`]) implement
//! [`VirtioDevice`] and run their queues on worker threads of their own.

pub mod block;
pub mod common_config;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
#[cfg(test)]
mod hostile;
pub mod net;
pub mod pci;
pub mod rng;
pub mod transport;
mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use transport::{Interrupt, VirtioPciDevice, VmOps};
pub use worker::on_thread_start as on_worker_start;
pub use worker::{reserve as reserve_workers, Reserved as ReservedWorkers};

/// Guest memory as devices see it. Each region carries a bitmap of the pages written through
/// it (by devices: vCPU writes are KVM's dirty log), which live migration sends again.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// The bitmap slice of a piece of [`GuestMemory`], as chain readers and writers carry it.
pub type MemSlice<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

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
/// Feature bit: used/available event indices suppress notifications and interrupts.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Descriptors may point to a table of further descriptors (virtio 1.2, 2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// A queue the driver enabled, ready for a device to run.
pub struct ActiveQueue {
    /// The queue, with its addresses, size and event-index setting.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue.
    pub notify: EventFd,
    /// The MSI-X vector of its interrupts.
    pub vector: u16,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// Features both sides agreed on.
    pub features: u64,
    /// Each queue by index; `None` where the driver did not enable it.
    pub queues: Vec<Option<ActiveQueue>>,
    /// Raises the device's interrupts.
    pub interrupt: Arc<Interrupt>,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not enabled.
    #[error("Queue {0} is not enabled")]
    QueueMissing(usize),
    /// A worker thread could not be started.
    #[error("Cannot start the device's worker")]
    Worker(#[source] std::io::Error),
    /// The backend refused the negotiated set-up.
    #[error("Cannot configure the backend")]
    Backend(#[source] std::io::Error),
}

/// A virtio device's own state besides its transport and queues, by kind: each kind's state
/// is its own versioned type ([`crate::Versioned`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceState {
    /// A network card.
    Net(net::NetState),
    /// A disk.
    Block(block::BlockState),
    /// An entropy source.
    Rng(rng::RngState),
}

impl DeviceState {
    /// The device kind, as messages name it.
    pub fn kind(&self) -> &'static str {
        use crate::Versioned;
        match self {
            DeviceState::Net(_) => net::NetState::KIND,
            DeviceState::Block(_) => block::BlockState::KIND,
            DeviceState::Rng(_) => rng::RngState::KIND,
        }
    }
}

/// What a virtio device tells the transport about itself, and how it runs.
pub trait VirtioDevice: Send {
    /// virtio device type (1 net, 2 block, 4 entropy ...).
    fn device_type(&self) -> u16;
    /// PCI class code (class, subclass, interface).
    fn pci_class(&self) -> [u8; 3];
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Each queue's maximum size.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// A guest read of the device configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A guest write to the device configuration.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops processing; returns once no worker touches guest memory any more.
    fn reset(&mut self);
    /// Stops processing without resetting anything, and hands back the running queues by
    /// index with their positions intact (nothing when the device is not running). Once it
    /// returns, no worker touches guest memory or the backend; [`VirtioDevice::activate`]
    /// with the same queues carries on where the device stopped.
    fn pause(&mut self) -> Vec<Option<ActiveQueue>>;
    /// What a snapshot must carry for this device besides its transport and queues; each
    /// device kind is built again from it by its own `restore` constructor.
    fn save(&self) -> DeviceState;
    /// Asks the driver to tell the network the guest moved (after a migration), if the
    /// device and driver support it; true when the driver must be told through a
    /// configuration change interrupt.
    fn announce(&mut self) -> bool {
        false
    }
    /// Named counters for `vm.counters`.
    fn counters(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// Copies `value`'s little-endian bytes at `offset` into `data`; zero past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
        *b = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
    }
}
