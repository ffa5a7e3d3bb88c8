//! baton, the VMM: builds a VM from a [`api::VmConfig`] on KVM and runs its control loop.
//!
//! The control loop ([`run`]) waits on eventfds: the guest powering off (baton exits 0), the
//! guest resetting (the VM is rebuilt in the same process), a vCPU failing (baton exits with
//! an error), the guest ejecting a hot-plugged device (it is released), SIGTERM/SIGINT (the
//! VM is shut down and baton exits 0), and requests of the internal API ([`api::request`]),
//! which [`control`] handles.
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
pub mod layout;
pub mod logger;
pub mod memory;
pub mod migration;
pub mod regs;
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
use kvm_ioctls::{Cap, Kvm};
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

/// Waits until one of `fds` is readable; returns its index and drains it.
fn wait_any(evts: &[&EventFd]) -> std::io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = evts
        .iter()
        .map(|e| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(i) = pfds.iter().position(|p| p.revents & libc::POLLIN != 0) {
            // Non-blocking eventfd; the value only says "it happened".
            let _ = evts[i].read();
            return Ok(i);
        }
    }
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
}

/// Runs the VMM: boots or restores the VM `initial` names, serves the API on `api_socket` if
/// given, and handles guest and API events until the guest powers off, a signal arrives,
/// `vmm.shutdown` is requested, or a vCPU fails. Guest resets rebuild the VM in place.
pub fn run(initial: Initial, api_socket: Option<ApiSocket>) -> Result<Outcome, Error> {
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

    let api = match api_socket {
        Some(socket) => {
            let (sender, requests, wake) = ApiSender::new().map_err(Error::Loop)?;
            let server = socket.serve(sender).map_err(Error::Api)?;
            Some((requests, wake, server))
        }
        None => None,
    };
    // The command line goes through the same internal API as HTTP requests.
    let actions = match initial {
        Initial::Wait => Vec::new(),
        Initial::Boot(config, fds) => vec![ApiAction::VmCreate(config, fds), ApiAction::VmBoot],
        Initial::Restore(restore, fds) => vec![ApiAction::VmRestore(restore, fds)],
    };
    for action in actions {
        vmm.handle(action).0.map_err(Error::Request)?;
    }

    loop {
        let which = {
            let events = vmm.events();
            let mut fds = vec![
                &events.exit,
                &events.reset,
                &events.fail,
                &events.eject,
                &terminate,
                vmm.migration_event(),
            ];
            if let Some((_, wake, _)) = &api {
                fds.push(wake);
            }
            wait_any(&fds).map_err(Error::Loop)?
        };
        match which {
            0 => {
                log::info!("guest powered off");
                vmm.shutdown();
                return Ok(Outcome::PoweredOff);
            }
            // Guest events of a VM that is already gone (deleted or shut down while its
            // guest signalled) were drained with it; nothing is left to act on.
            0..=2 if !vmm.has_vm() => {}
            1 => {
                log::info!("guest reset: rebooting");
                vmm.reboot().map_err(Error::Request)?;
            }
            2 => {
                vmm.shutdown();
                return Err(Error::VcpuFailed);
            }
            3 => vmm.devices_ejected(),
            4 => {
                log::info!("signal received: shutting the VM down");
                vmm.shutdown();
                return Ok(Outcome::Signalled);
            }
            5 => {
                if vmm.migration_done() == After::Exit {
                    log::info!("the VM was migrated: exiting");
                    if let Some((_, _, server)) = &api {
                        server.drain(Duration::from_secs(2));
                    }
                    return Ok(Outcome::Migrated);
                }
            }
            _ => {
                let (requests, _, server) = api.as_ref().expect("index 6 is the API eventfd");
                while let Ok(request) = requests.try_recv() {
                    if vmm.dispatch(request) == After::Exit {
                        log::info!("vmm.shutdown requested");
                        while let Ok(late) = requests.try_recv() {
                            let _ = late
                                .reply
                                .send(Err(ApiError::message(503, "The VMM is shutting down")));
                        }
                        server.drain(Duration::from_secs(2));
                        return Ok(Outcome::ApiShutdown);
                    }
                }
            }
        }
    }
}
