//! baton, the VMM: builds a VM from a [`api::VmConfig`] on KVM and runs its control loop.
//!
//! The control loop ([`run`]) is event-manager's one subscriber on the main thread. It wakes
//! on eventfds: the guest powering off (baton exits 0), the guest resetting (the VM is rebuilt
//! in the same process), a vCPU failing (baton exits with an error), the guest ejecting a
//! hot-plugged device (it is released), SIGTERM/SIGINT (the VM is shut down and baton exits
//! 0), a migration thread ending, and requests of the internal API ([`api::request`]), which
//! [`control`] handles.
#![warn(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod config;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod error;
pub mod interrupt;
pub mod launcher;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod process;
pub mod regs;
pub mod seccomp;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use api::request::{ApiAction, ApiError, ApiSender};
use api::server::ApiSocket;
use api::VmConfig;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::control::{After, Vmm};
pub use crate::error::Error;
use crate::vm::VmEvents;

/// How a VM run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PoweredOff,
    /// baton was asked to stop by a signal.
    Signalled,
    /// `vmm.shutdown` was requested.
    ApiShutdown,
    /// The VM was migrated to another baton.
    Migrated,
}

/// Eventfd written by the SIGTERM/SIGINT handler (-1 until installed).
static TERMINATE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int) {
    let fd = TERMINATE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is an
        // eventfd that stays open for the life of the process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_terminate_handler(evt: &EventFd) -> std::io::Result<()> {
    TERMINATE_FD.store(evt.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is valid; we set the handler and an empty mask.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_terminate as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is fully initialised and the handler only calls write(2).
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Checks that KVM has what baton relies on.
fn check_kvm(kvm: &Kvm) -> Result<(), Error> {
    let needed = [
        (Cap::Irqchip, "in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Pit2, "in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::UserMemory, "user memory (KVM_CAP_USER_MEMORY)"),
        (
            Cap::ImmediateExit,
            "immediate exit (KVM_CAP_IMMEDIATE_EXIT)",
        ),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(())
}

/// What baton does before it serves requests.
pub enum Initial {
    /// Nothing: wait for vm.create, vm.restore or vm.receive-migration.
    Wait,
    /// Create and boot this VM, its network cards without a TAP name on these inherited
    /// descriptors (in order).
    Boot(Box<VmConfig>, api::fds::Fds),
    /// Restore this snapshot, with `net_fds` on these inherited descriptors.
    Restore(api::RestoreConfig, api::fds::Fds),
    /// Take the VM over from the old baton of a live upgrade, which sends it over this
    /// inherited socket with this step timeout; serve the API only once the VM runs here.
    TakeOver(std::os::fd::OwnedFd, u64),
}

/// Runs the VMM: boots or restores the VM `initial` names, serves the API on `api_socket` if
/// given, and handles guest and API events until the guest powers off, a signal arrives,
/// `vmm.shutdown` is requested, or a vCPU fails. Guest resets rebuild the VM in place.
/// With `upgrades`, `vmm.live-upgrade` hands the VM to a new binary.
pub fn run(
    initial: Initial,
    api_socket: Option<ApiSocket>,
    upgrades: Option<control::UpgradeSupport>,
) -> Result<Outcome, Error> {
    if let Initial::Boot(config, _) = &initial {
        // Before touching /dev/kvm, so a bad command line gets its own message everywhere.
        config
            .validate(&cpuid::feature_names())
            .map_err(Error::Config)?;
    }
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    check_kvm(&kvm)?;
    vcpu::install_kick_handler().map_err(|e| Error::Vm(vm::Error::Vcpu(e)))?;
    let terminate = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Loop)?;
    install_terminate_handler(&terminate).map_err(Error::Loop)?;
    let mut vmm = Vmm::new(kvm, VmEvents::new().map_err(Error::Vm)?).map_err(Error::Loop)?;
    if let Some(upgrades) = upgrades {
        vmm.support_upgrades(upgrades);
    }

    let mut api = match api_socket {
        Some(socket) => {
            let (sender, requests, wake) = ApiSender::new().map_err(Error::Loop)?;
            Some(Api {
                requests,
                wake,
                server: None,
                waiting: Some((socket, sender)),
            })
        }
        None => None,
    };
    // A new baton of a live upgrade serves the API once the VM runs here.
    let taking_over = matches!(initial, Initial::TakeOver(..));
    // The command line goes through the same internal API as HTTP requests.
    let actions = match initial {
        Initial::Wait => Vec::new(),
        Initial::Boot(config, fds) => vec![ApiAction::VmCreate(config, fds), ApiAction::VmBoot],
        Initial::Restore(restore, fds) => vec![ApiAction::VmRestore(restore, fds)],
        Initial::TakeOver(fd, step_timeout_s) => {
            let channel = std::os::unix::net::UnixStream::from(fd).into();
            vmm.take_over(channel, step_timeout_s)
                .map_err(Error::Request)?;
            Vec::new()
        }
    };
    if let (Some(api), false) = (&mut api, taking_over) {
        api.serve(&mut vmm)?;
    }
    for action in actions {
        vmm.handle(action).0.map_err(Error::Request)?;
    }

    let control = ControlLoop {
        vmm,
        terminate,
        api,
        outcome: None,
    };
    let mut manager = EventManager::<ControlLoop>::new().map_err(Error::EventLoop)?;
    let id = manager.add_subscriber(control);
    loop {
        let control = manager.subscriber_mut(id).map_err(Error::EventLoop)?;
        if let Some(outcome) = control.outcome.take() {
            return outcome;
        }
        manager.run().map_err(Error::EventLoop)?;
    }
}

/// What wakes the control loop, as the data of its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    PowerOff,
    Reset,
    VcpuFailed,
    Ejected,
    Signal,
    MigrationDone,
    Api,
}

impl Wake {
    const ALL: [Wake; 7] = [
        Wake::PowerOff,
        Wake::Reset,
        Wake::VcpuFailed,
        Wake::Ejected,
        Wake::Signal,
        Wake::MigrationDone,
        Wake::Api,
    ];

    fn from_data(data: u32) -> Option<Wake> {
        Wake::ALL.get(data as usize).copied()
    }

    /// A guest event, which only means something while a VM exists.
    fn is_guest_event(self) -> bool {
        matches!(self, Wake::PowerOff | Wake::Reset | Wake::VcpuFailed)
    }
}

/// The API: requests from the server thread, the eventfd that says some came, and the
/// server, or, until it serves (a new baton of a live upgrade waits for the VM first), its
/// socket.
struct Api {
    requests: std::sync::mpsc::Receiver<api::request::ApiRequest>,
    wake: EventFd,
    server: Option<api::server::Server>,
    waiting: Option<(ApiSocket, ApiSender)>,
}

impl Api {
    /// Starts serving the socket, and tells `vmm` what a live upgrade hands over.
    fn serve(&mut self, vmm: &mut Vmm) -> Result<(), Error> {
        let Some((socket, sender)) = self.waiting.take() else {
            return Ok(());
        };
        let server = socket.serve(sender).map_err(Error::Api)?;
        match server.handover() {
            Ok(handover) => vmm.api_served(handover, server.gate()),
            Err(e) => log::warn!("the API socket cannot be handed over (no live upgrade): {e}"),
        }
        self.server = Some(server);
        Ok(())
    }

    /// Answers every request still queued with a 503 saying `why`, then waits (a little)
    /// for every answer to be written.
    fn refuse_the_rest(&self, why: &str) {
        while let Ok(late) = self.requests.try_recv() {
            let _ = late.reply.send(Err(ApiError::message(503, why)));
        }
        if let Some(server) = &self.server {
            server.drain(Duration::from_secs(2));
        }
    }
}

/// The control loop, as event-manager's one subscriber on the main thread: it owns the VMM
/// and everything that wakes it, and sets `outcome` when baton should end.
struct ControlLoop {
    vmm: Vmm,
    terminate: EventFd,
    api: Option<Api>,
    outcome: Option<Result<Outcome, Error>>,
}

impl ControlLoop {
    fn eventfd(&self, wake: Wake) -> Option<&EventFd> {
        let events = self.vmm.events();
        Some(match wake {
            Wake::PowerOff => &events.exit,
            Wake::Reset => &events.reset,
            Wake::VcpuFailed => &events.fail,
            Wake::Ejected => &events.eject,
            Wake::Signal => &self.terminate,
            Wake::MigrationDone => self.vmm.migration_event(),
            Wake::Api => &self.api.as_ref()?.wake,
        })
    }

    /// Acts on `wake`; `Some` when baton should end.
    fn handle(&mut self, wake: Wake) -> Option<Result<Outcome, Error>> {
        if wake.is_guest_event() && !self.vmm.has_vm() {
            // Guest events of a VM that is already gone (deleted or shut down while its
            // guest signalled) were drained with it; nothing is left to act on.
            return None;
        }
        match wake {
            Wake::PowerOff => {
                log::info!("guest powered off");
                self.vmm.shutdown();
                Some(Ok(Outcome::PoweredOff))
            }
            Wake::Reset => {
                log::info!("guest reset: rebooting");
                self.vmm.reboot().err().map(|e| Err(Error::Request(e)))
            }
            Wake::VcpuFailed => {
                self.vmm.shutdown();
                Some(Err(Error::VcpuFailed))
            }
            Wake::Ejected => {
                self.vmm.devices_ejected();
                None
            }
            Wake::Signal => {
                log::info!("signal received: shutting the VM down");
                self.vmm.shutdown();
                Some(Ok(Outcome::Signalled))
            }
            Wake::MigrationDone => match self.vmm.migration_done() {
                After::Continue => None,
                After::Exit => {
                    log::info!("the VM was migrated: exiting");
                    if let Some(api) = &self.api {
                        api.refuse_the_rest(
                            "This baton has handed its VM over and is ending; send the \
                             request again",
                        );
                    }
                    Some(Ok(Outcome::Migrated))
                }
                After::TookOver => {
                    // The VM runs here now, whatever becomes of the API.
                    if let Err(e) = self.api.as_mut()?.serve(&mut self.vmm) {
                        let chain = api::request::error_chain(&e);
                        log::error!(
                            "the VM runs, but the API is not served: {}",
                            chain.join(": ")
                        );
                    }
                    None
                }
                After::TakeOverFailed => Some(Err(Error::TakeOver)),
            },
            Wake::Api => self.serve_requests(),
        }
    }

    /// Serves every request the API thread queued.
    fn serve_requests(&mut self) -> Option<Result<Outcome, Error>> {
        let api = self.api.as_ref()?;
        while let Ok(request) = api.requests.try_recv() {
            if self.vmm.dispatch(request) == After::Exit {
                log::info!("vmm.shutdown requested");
                api.refuse_the_rest("The VMM is shutting down");
                return Some(Ok(Outcome::ApiShutdown));
            }
        }
        None
    }
}

impl MutEventSubscriber for ControlLoop {
    fn init(&mut self, ops: &mut EventOps) {
        for wake in Wake::ALL {
            let Some(evt) = self.eventfd(wake) else {
                continue;
            };
            let events = Events::with_data(evt, wake as u32, EventSet::IN);
            if let Err(e) = ops.add(events) {
                self.outcome = Some(Err(Error::EventLoop(e)));
                return;
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.outcome.is_some() {
            // Baton is ending: what else woke it in the same round waits for nobody.
            return;
        }
        let Some(wake) = Wake::from_data(events.data()) else {
            return;
        };
        if let Some(evt) = self.eventfd(wake) {
            // Non-blocking eventfds; the value only says "it happened".
            let _ = evt.read();
        }
        self.outcome = self.handle(wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wake_round_trips_through_its_event_data() {
        for wake in Wake::ALL {
            assert_eq!(Wake::from_data(wake as u32), Some(wake));
        }
        assert_eq!(Wake::from_data(Wake::ALL.len() as u32), None);
        assert_eq!(Wake::from_data(u32::MAX), None);
    }

    #[test]
    fn only_power_reset_and_vcpu_failure_are_guest_events() {
        let guest: Vec<Wake> = Wake::ALL
            .into_iter()
            .filter(|w| w.is_guest_event())
            .collect();
        assert_eq!(guest, [Wake::PowerOff, Wake::Reset, Wake::VcpuFailed]);
    }
}
