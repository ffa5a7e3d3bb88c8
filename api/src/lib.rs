//! baton's API data model and its command-line form.
//!
//! [`vm_config`] holds the plain-data VM configuration that the command line, the REST API and
//! tests all produce; [`option_parser`] parses Cloud Hypervisor-style option strings
//! (`key=value,key=value`) into it. Validation lives next to the data model.
//!
//! The REST API: [`http`] parses requests, [`routes`] maps them to endpoints, [`server`] runs
//! the socket and hands each request to the VMM as a [`request::ApiRequest`], the one internal
//! API that the command line and tests use too; [`client`] talks to the socket. Nothing here
//! touches KVM.
#![warn(missing_docs)]

pub mod client;
pub mod compat;
pub mod device_config;
pub mod fds;
pub mod http;
pub mod migration_config;
pub mod option_parser;
pub mod request;
pub mod routes;
pub mod server;
pub mod vm_config;

pub use device_config::{DiskConfig, MacAddr, NetConfig, RngConfig};
pub use migration_config::{
    LiveUpgradeConfig, NetFds, ReceiveMigrationConfig, RestoreConfig, SendMigrationConfig,
    SnapshotConfig,
};
pub use vm_config::{
    ConfigError, ConsoleConfig, ConsoleMode, CpuTemplate, CpusConfig, MemoryConfig, PayloadConfig,
    VmConfig,
};
