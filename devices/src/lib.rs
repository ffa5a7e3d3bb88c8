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

/// Saved state that does not fit the device it is restored into (another layout, another
/// version, or a corrupted snapshot): the message says which field and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(pub String);

impl StateError {
    /// `what` was wrong.
    pub fn new(what: impl Into<String>) -> Self {
        StateError(what.into())
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
