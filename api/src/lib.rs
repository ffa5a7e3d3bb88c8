//! baton's API data model and its command-line form.
//!
//! [`vm_config`] holds the plain-data VM configuration that the command line, the REST API and
//! tests all produce; [`option_parser`] parses Cloud Hypervisor-style option strings
//! (`key=value,key=value`) into it. Validation lives next to the data model; nothing here
//! touches KVM or the host.
#![warn(missing_docs)]

pub mod option_parser;
pub mod vm_config;

pub use vm_config::{
    ConfigError, ConsoleConfig, ConsoleMode, CpuTemplate, CpusConfig, MemoryConfig, PayloadConfig,
    VmConfig,
};
