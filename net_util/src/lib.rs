//! TAP devices and the virtio-net data path: opening TAPs by name or from descriptors,
//! the vnet header and offloads, and the TAP backend state that backend transfer hands over.
//!
//! Filled by the devices issue; for now it only fixes its place in the crate graph.
#![warn(missing_docs)]
