//! The internal API: requests that the HTTP server, the command line and tests send to the
//! VMM's control loop, and the answers that come back.
//!
//! A request travels as an [`ApiRequest`] over a channel; writing the [`ApiSender`]'s eventfd
//! wakes the control loop, which answers on the request's own reply channel. The HTTP layer
//! only parses and routes; every decision is the control loop's.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::fds::Fds;
use crate::{
    DiskConfig, LiveUpgradeConfig, NetConfig, ReceiveMigrationConfig, RestoreConfig,
    SendMigrationConfig, SnapshotConfig, VmConfig,
};

/// What to do.
#[derive(Debug)]
pub enum ApiAction {
    /// Report the VMM's version and pid.
    VmmPing,
    /// Shut the VM down (if any) and end the VMM.
    VmmShutdown,
    /// Report the backends this VMM can take over in a migration, and the VM's devices that
    /// would hand theirs over.
    VmmBackendTransferSupport,
    /// Store a VM configuration; TAP descriptors for its network cards may come along.
    VmCreate(Box<VmConfig>, Fds),
    /// Add a network card to a VM that has not booted; its TAP descriptors may come along.
    VmAddNet(Box<NetConfig>, Fds),
    /// Add a disk to a VM that has not booted.
    VmAddDisk(Box<DiskConfig>),
    /// Remove the device with this id from a VM that has not booted.
    VmRemoveDevice(String),
    /// Boot the created VM.
    VmBoot,
    /// Report the VM's configuration and state.
    VmInfo,
    /// Report each device's counters.
    VmCounters,
    /// Stop every vCPU.
    VmPause,
    /// Restart the vCPUs after a pause.
    VmResume,
    /// Stop the VM; it can be booted again.
    VmShutdown,
    /// Restart the VM from its configuration.
    VmReboot,
    /// Press the ACPI power button.
    VmPowerButton,
    /// Shut down and forget the VM.
    VmDelete,
    /// Write a snapshot of the paused VM.
    VmSnapshot(SnapshotConfig),
    /// Build the VM from a snapshot; TAP descriptors for its network cards may come along.
    VmRestore(RestoreConfig, Fds),
    /// Migrate the VM to another baton.
    VmSendMigration(SendMigrationConfig),
    /// (+) Hand the VM, its backends and the API socket to a new baton binary, answered
    /// when it has them.
    VmmLiveUpgrade(LiveUpgradeConfig),
    /// Wait for a VM migrated from another baton; TAP descriptors may come along.
    VmReceiveMigration(ReceiveMigrationConfig, Fds),
}

/// A successful answer.
#[derive(Debug, PartialEq)]
pub enum ApiReply {
    /// 204, no body.
    Empty,
    /// 200 with a JSON body.
    Json(serde_json::Value),
}

/// A failed request: the status and the error chain, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// The error and its causes.
    pub chain: Vec<String>,
}

/// `err` and its causes, outermost first: how every error reaches a user.
pub fn error_chain(err: &dyn std::error::Error) -> Vec<String> {
    let mut chain = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    chain
}

impl ApiError {
    /// An error with `status` built from `err` and its sources.
    pub fn new(status: u16, err: &dyn std::error::Error) -> Self {
        ApiError {
            status,
            chain: error_chain(err),
        }
    }

    /// An error with `status` and one message.
    pub fn message(status: u16, msg: impl Into<String>) -> Self {
        ApiError {
            status,
            chain: vec![msg.into()],
        }
    }
}

/// The answer to one request.
pub type ApiResponse = Result<ApiReply, ApiError>;

/// Where the answer to one request goes: a channel, and the eventfd that wakes whoever
/// waits on it (the HTTP server's event loop) when the answer is sent.
#[derive(Debug)]
pub struct Reply {
    tx: Sender<ApiResponse>,
    wake: Option<Arc<EventFd>>,
}

impl Reply {
    /// A reply channel without a wake-up: the receiver blocks on it.
    pub fn channel() -> (Self, Receiver<ApiResponse>) {
        let (tx, rx) = channel();
        (Reply { tx, wake: None }, rx)
    }

    /// Sends the answer; an error means the requester has gone and needs no answer.
    pub fn send(self, response: ApiResponse) -> Result<(), ApiResponse> {
        self.tx.send(response).map_err(|e| e.0)?;
        if let Some(wake) = &self.wake {
            // A full eventfd counter already wakes its reader.
            let _ = wake.write(1);
        }
        Ok(())
    }
}

/// A request and where to send its answer.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: ApiAction,
    /// Where the answer goes.
    pub reply: Reply,
}

/// The sending side of the internal API; cheap to clone.
pub struct ApiSender {
    tx: Sender<ApiRequest>,
    evt: EventFd,
}

impl ApiSender {
    /// A channel to the control loop and the eventfd that wakes it; the loop keeps the
    /// receiver and a clone of the eventfd.
    pub fn new() -> std::io::Result<(Self, Receiver<ApiRequest>, EventFd)> {
        let (tx, rx) = channel();
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let loop_evt = evt.try_clone()?;
        Ok((ApiSender { tx, evt }, rx, loop_evt))
    }

    /// Another handle on the same channel.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(ApiSender {
            tx: self.tx.clone(),
            evt: self.evt.try_clone()?,
        })
    }

    /// Sends `action` and waits for the answer.
    pub fn call(&self, action: ApiAction) -> ApiResponse {
        let (reply, answer) = Reply::channel();
        self.send(action, reply)?;
        answer.recv().map_err(|_| shutting_down())?
    }

    /// Sends `action` without waiting: the answer arrives on the returned channel, and
    /// `wake` is written when it does.
    pub fn start(
        &self,
        action: ApiAction,
        wake: &Arc<EventFd>,
    ) -> Result<Receiver<ApiResponse>, ApiError> {
        let (tx, rx) = channel();
        let reply = Reply {
            tx,
            wake: Some(wake.clone()),
        };
        self.send(action, reply)?;
        Ok(rx)
    }

    fn send(&self, action: ApiAction, reply: Reply) -> Result<(), ApiError> {
        self.tx
            .send(ApiRequest { action, reply })
            .map_err(|_| shutting_down())?;
        self.evt.write(1).map_err(|e| ApiError::new(500, &e))
    }
}

/// The answer to a request the VMM can no longer take (it is ending).
pub(crate) fn shutting_down() -> ApiError {
    ApiError::message(503, "The VMM is shutting down")
}

/// The answer to `vmm.ping`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmPingResponse {
    /// baton's version.
    pub version: String,
    /// The build's version string.
    pub build_version: String,
    /// The VMM's process id.
    pub pid: u32,
    /// Optional features compiled in.
    pub features: Vec<String>,
}

/// The answer to `vmm.backend-transfer-support`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendTransferSupport {
    /// Backend kinds this baton can take over (and hand over), such as `virtio-net-tap`.
    pub kinds: Vec<String>,
    /// The current VM's devices that would hand their backend over in a migration with
    /// backend transfer; empty without a VM.
    pub devices: Vec<TransferableDevice>,
}

/// A device whose backend would be handed over.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TransferableDevice {
    /// The device id.
    pub id: String,
    /// Its backend kind.
    pub kind: String,
    /// Descriptors it would hand over (one per queue pair for a TAP).
    pub fds: u32,
}

/// A VM's state as `vm.info` reports it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum VmState {
    /// Created, not booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped by `vm.pause`.
    Paused,
    /// Shut down through `vm.shutdown`; can be booted again.
    Shutdown,
}

/// The answer to `vm.info`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfoResponse {
    /// The VM's configuration.
    pub config: VmConfig,
    /// Its state.
    pub state: VmState,
    /// Guest RAM in bytes.
    pub memory_actual_size: u64,
    /// (+) Where an outgoing migration is, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_outer_to_root() {
        let e = ApiError::new(409, &Outer(std::io::Error::other("root cause")));
        assert_eq!(e.status, 409);
        assert_eq!(e.chain, vec!["outer", "root cause"]);
    }

    #[test]
    fn call_round_trip() {
        let (sender, rx, evt) = ApiSender::new().unwrap();
        let t = std::thread::spawn(move || sender.call(ApiAction::VmmPing));
        let req = rx.recv().unwrap();
        assert!(matches!(req.action, ApiAction::VmmPing));
        // The caller wakes the loop right after queueing the request: wait for the wake-up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let woken = loop {
            match evt.read() {
                Ok(n) => break n,
                Err(_) if std::time::Instant::now() < deadline => std::thread::yield_now(),
                Err(e) => panic!("no wake-up: {e}"),
            }
        };
        assert_eq!(woken, 1);
        req.reply.send(Ok(ApiReply::Empty)).unwrap();
        assert_eq!(t.join().unwrap(), Ok(ApiReply::Empty));
    }

    #[test]
    fn call_fails_cleanly_when_the_loop_is_gone() {
        let (sender, rx, _evt) = ApiSender::new().unwrap();
        drop(rx);
        assert_eq!(sender.call(ApiAction::VmInfo).unwrap_err().status, 503);
    }
}
