//! The errors that end baton, or that the API answers with their layer named: each variant
//! is one layer's context, its cause kept as the source.

use api::request::ApiError;
use api::server::ServerError;

use crate::{device_manager, snapshot, vm};

/// Errors that end baton.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("Invalid VM configuration")]
    Config(#[source] api::ConfigError),
    /// /dev/kvm is missing or unusable.
    #[error("Cannot open /dev/kvm: is KVM available and do you have access to it?")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability baton needs.
    #[error("KVM lacks a capability baton needs: {0}")]
    KvmCapability(&'static str),
    /// The API socket.
    #[error("Cannot serve the API")]
    Api(#[source] ServerError),
    /// `--api-socket` did not parse.
    #[error("Invalid --api-socket option")]
    ApiSocketOption(#[source] api::option_parser::OptionError),
    /// A request from the command line failed (the error chain, outermost first).
    #[error("{}", .0.chain.join("\n  caused by: "))]
    Request(ApiError),
    /// Building or starting the VM.
    #[error("Cannot start the VM")]
    Vm(#[source] vm::Error),
    /// Opening device backends.
    #[error("Cannot open the VM's devices")]
    Devices(#[source] device_manager::Error),
    /// A live migration.
    #[error("Live migration")]
    Migration(#[source] crate::migration::Error),
    /// Writing or reading a snapshot.
    #[error("Snapshot")]
    Snapshot(#[source] snapshot::Error),
    /// The control loop's event manager.
    #[error("Control loop failure")]
    EventLoop(#[source] event_manager::Error),
    /// The seccomp filters could not be built or loaded.
    #[error("Cannot confine baton's threads (--seccomp)")]
    Seccomp(#[source] crate::seccomp::Error),
    /// Control loop plumbing.
    #[error("Control loop failure")]
    Loop(#[source] std::io::Error),
    /// The new baton of a live upgrade did not get the VM (the old one runs it on).
    #[error(
        "The VM could not be taken over from the old baton, which runs it on (see the log above)"
    )]
    TakeOver,
    /// A vCPU failed; the guest cannot continue.
    #[error("The guest stopped on a vCPU error (see the log above)")]
    VcpuFailed,
}
