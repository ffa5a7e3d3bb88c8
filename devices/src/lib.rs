//! Emulated devices: the port-I/O and MMIO buses, the legacy platform devices (8250 serial,
//! i8042 reset, CMOS clock), the ACPI power/reset registers and the PCI host bridge.
//!
//! Devices know nothing of KVM or the VMM: they raise interrupts through [`Trigger`]s
//! (eventfds that the VMM wires to irqfds) and report guest-requested power events on
//! eventfds the VMM watches.
#![warn(missing_docs)]

pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd (the VMM registers it as a KVM irqfd).
pub struct Trigger(EventFd);

impl Trigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Trigger(evt)
    }
}

impl vm_superio::Trigger for Trigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Saved state that does not fit the device it is restored into: another layout version, or
/// a field that cannot be (another layout, a corrupted snapshot).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state was saved in a layout this baton does not read.
    #[error(
        "{kind} state version {found} is not supported (this baton reads version {supported})"
    )]
    Version {
        /// The device kind.
        kind: &'static str,
        /// The version saved.
        found: u32,
        /// The version this baton reads.
        supported: u32,
    },
    /// A running queue in the state cannot run here.
    #[error("queue {0} in the state")]
    Queue(usize, #[source] virtio::transport::QueueError),
    /// A field does not fit: the message says which and why.
    #[error("{0}")]
    Invalid(String),
}

impl StateError {
    /// `what` was wrong.
    pub fn new(what: impl Into<String>) -> Self {
        StateError::Invalid(what.into())
    }
}

/// A device's saved state, with the version of its layout. A device is restored by
/// construction from its state, which first passes [`Versioned::check_version`]: a state of
/// another layout is refused with both versions named, never misread.
pub trait Versioned {
    /// The device kind, as messages name it.
    const KIND: &'static str;
    /// The layout this baton writes, and the only one it reads.
    const VERSION: u32;
    /// The version the state was saved with.
    fn version(&self) -> u32;
    /// Refuses a state saved in another layout.
    fn check_version(&self) -> Result<(), StateError> {
        if self.version() == Self::VERSION {
            Ok(())
        } else {
            Err(StateError::Version {
                kind: Self::KIND,
                found: self.version(),
                supported: Self::VERSION,
            })
        }
    }
}

/// `err` and its causes, outer first, joined by ": " (for log lines).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut cause = err.source();
    while let Some(c) = cause {
        parts.push(c.to_string());
        cause = c.source();
    }
    parts.join(": ")
}
