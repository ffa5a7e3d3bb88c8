//! The test guest's pure logic: everything that needs no hardware.
//!
//! The guest binary (`src/main.rs`) is `no_std`, `no_main` and linked for
//! bare metal, so it cannot be built as a test harness. What can be decided
//! from bytes alone lives here instead, free of `unsafe` and raw pointers, and
//! is unit-tested on the host with `cargo test -p baton-test-guest --lib`:
//! the serial protocol, option and command parsing, the PVH start_info
//! layout, ACPI table parsing, deadline and pacing arithmetic, the page stamps
//! of the memory dirtier and the tables that start the other processors. The binary supplies the
//! bytes (through thin accessors over guest-physical memory) and performs the
//! side effects.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod acpi;
pub mod bytes;
pub mod cmdline;
pub mod command;
pub mod dirty;
pub mod flow;
pub mod icmp;
pub mod line;
pub mod periodic;
pub mod protocol;
pub mod smp;
pub mod start_info;
pub mod stream;
pub mod text;
