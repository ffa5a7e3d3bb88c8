//! vCPU threads: each runs KVM_RUN and sends port I/O and MMIO exits to the buses.
//!
//! A vCPU is stopped by setting its stop flag and kicking it out of KVM_RUN with a signal
//! ([`KICK_SIGNAL`]); the kick repeats until the thread is gone, so a signal that lands just
//! before KVM_RUN cannot leave it blocked (application processors wait in KVM_RUN for an
//! INIT/SIPI that may never come).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::memory::GuestMemory;

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("Cannot start vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// The real-time signal offset used to kick vCPUs.
pub const KICK_SIGNAL: i32 = 0;

/// Installs the (empty) kick handler; its only effect is to interrupt KVM_RUN.
pub fn install_kick_handler() -> Result<(), Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN() + KICK_SIGNAL, noop).map_err(Error::Signal)
}

/// Eventfds a vCPU uses to tell the control loop what the guest did.
pub struct VcpuEvents {
    /// The guest powered off.
    pub exit: EventFd,
    /// The guest asked for a reset (or triple-faulted).
    pub reset: EventFd,
    /// The vCPU failed (KVM internal error, failed entry, guest crash).
    pub fail: EventFd,
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VcpuEvents,
    stop: Arc<AtomicBool>,
    mem: GuestMemory,
}

fn signal(evt: &EventFd) {
    if let Err(e) = evt.write(1) {
        log::error!("cannot signal the control loop: {e}");
    }
}

impl Vcpu {
    /// "at rip X (bytes ..)": where the vCPU stopped and the instruction bytes there, for
    /// diagnosing guests that stop on an instruction KVM cannot run.
    fn describe_rip(&self) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return "(registers unavailable)".into();
        };
        let mut bytes = [0u8; 16];
        let code = self
            .fd
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                self.mem
                    .read_slice(&mut bytes, GuestAddress(t.physical_address))
                    .ok()
            })
            .map(|_| {
                bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "unreadable".into());
        format!("at rip {:#x} (code: {code})", regs.rip)
    }

    /// Runs until stopped; returns after signalling an event if the guest ends its run.
    fn run(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) {
                        log::trace!("vCPU {}: write to unhandled port {port:#x}", self.id);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        log::trace!("vCPU {}: write to unhandled MMIO {addr:#x}", self.id);
                    }
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::Shutdown) => {
                    log::info!("vCPU {}: triple fault, resetting the VM", self.id);
                    return signal(&self.events.reset);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => signal(&self.events.exit),
                        KVM_SYSTEM_EVENT_RESET => signal(&self.events.reset),
                        KVM_SYSTEM_EVENT_CRASH => {
                            log::error!("vCPU {}: the guest reported a crash", self.id);
                            signal(&self.events.fail)
                        }
                        _ => {
                            log::error!("vCPU {}: unknown system event {kind}", self.id);
                            signal(&self.events.fail)
                        }
                    };
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: KVM filled the internal-error member of the union for this exit.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    log::error!(
                        "vCPU {}: KVM internal error (suberror {suberror}) {}",
                        self.id,
                        self.describe_rip()
                    );
                    return signal(&self.events.fail);
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    log::error!(
                        "vCPU {}: KVM entry failed (reason {reason:#x}, host CPU {cpu})",
                        self.id
                    );
                    return signal(&self.events.fail);
                }
                Ok(exit) => {
                    log::error!("vCPU {}: unexpected exit {exit:?}", self.id);
                    return signal(&self.events.fail);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    log::error!("vCPU {}: KVM_RUN failed: {e}", self.id);
                    return signal(&self.events.fail);
                }
            }
        }
    }
}

impl VcpuThread {
    /// Starts vCPU `id` on its own thread.
    pub fn spawn(
        id: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: VcpuEvents,
        mem: GuestMemory,
    ) -> Result<Self, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut vcpu = Vcpu {
            id,
            fd,
            pio,
            mmio,
            events,
            stop: stop.clone(),
            mem,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu.run())
            .map_err(Error::Spawn)?;
        Ok(VcpuThread {
            handle: Some(handle),
            stop,
        })
    }

    /// Asks the thread to stop without waiting.
    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Stops the vCPU and waits for its thread.
    pub fn stop(&mut self) {
        self.request_stop();
        let Some(handle) = self.handle.take() else {
            return;
        };
        while !handle.is_finished() {
            if let Err(e) = handle.kill(SIGRTMIN() + KICK_SIGNAL) {
                log::debug!("vCPU kick failed: {e}");
            }
            std::thread::park_timeout(Duration::from_millis(1));
        }
        if handle.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// Stops every vCPU: all are asked first, so they wind down together.
pub fn stop_all(vcpus: &mut [VcpuThread]) {
    for v in vcpus.iter() {
        v.request_stop();
    }
    for v in vcpus.iter_mut() {
        v.stop();
    }
}
