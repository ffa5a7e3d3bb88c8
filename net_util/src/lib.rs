//! TAP devices and the virtio-net data path: opening TAPs by name or from descriptors,
//! the vnet header and offloads, and the TAP backend state that backend transfer hands over.
#![warn(missing_docs)]

pub mod queues;
pub mod tap;

pub use queues::{TapQueues, TapState};
pub use tap::{Offloads, Tap};
