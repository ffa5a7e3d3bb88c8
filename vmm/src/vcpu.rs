//! vCPU threads: each runs KVM_RUN and sends port I/O and MMIO exits to the buses.
//!
//! The threads of a VM share one [`Control`]. To pause or stop them, the control loop sets the
//! request there and kicks every thread out of KVM_RUN with a signal ([`KICK_SIGNAL`]); each
//! thread checks the request before re-entering KVM_RUN and parks (pause) or ends (stop). The
//! kick repeats until every thread has acknowledged, so a signal that lands just before
//! KVM_RUN cannot leave a thread inside it: a guest spinning at CPL3 or an application
//! processor waiting for its SIPI never leaves KVM_RUN on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::memory::GuestMemory;
use crate::state::VcpuState;

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("Cannot start vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// A vCPU's state could not be read.
    #[error("Cannot save the state of vCPU {0}")]
    Save(usize, #[source] crate::state::Error),
    /// A vCPU had stopped for good (the guest powered off or failed).
    #[error("vCPU {0} has stopped; its state cannot be saved")]
    Ended(usize),
    /// State can only be saved while paused.
    #[error("The vCPUs are running; pause them before saving their state")]
    NotPaused,
    /// A vCPU's saved state could not be restored.
    #[error("Cannot restore the state of vCPU {0}")]
    Restore(usize, #[source] crate::state::Error),
    /// Saved state for another number of vCPUs.
    #[error("Saved state for {saved} vCPUs, {started} started")]
    RestoreCount {
        /// vCPUs in the saved state.
        saved: usize,
        /// vCPU threads started.
        started: usize,
    },
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

#[derive(Default)]
struct ControlState {
    pause: bool,
    stop: bool,
    /// Threads parked by a pause.
    parked: usize,
    /// Threads whose run has ended (stopped, or the guest ended it).
    ended: usize,
    /// Per vCPU: its state is wanted (set by [`Vcpus::save_state`] or
    /// [`Vcpus::pause_and_save`], taken by the thread once every thread has parked).
    save_wanted: Vec<bool>,
    /// Per vCPU: its saved state, once the thread has read it.
    saved: Vec<Option<Result<VcpuState, crate::state::Error>>>,
    /// States were asked for with the pause and [`Vcpus::save_state`] has not taken them.
    saving: bool,
    /// Per vCPU: where writing a saved state into it stands.
    restore: Vec<Restore>,
    /// Per vCPU: its thread has ended.
    gone: Vec<bool>,
}

/// Where writing a saved state into one vCPU stands.
#[derive(Default)]
enum Restore {
    /// Nothing asked, or [`Vcpus::restored`] took the outcome.
    #[default]
    Idle,
    /// Given by [`Vcpus::restore`], for the thread to take.
    Asked(Box<VcpuState>),
    /// The thread is writing it.
    Writing,
    /// Written, or refused.
    Done(Result<(), crate::state::Error>),
}

/// Pause and stop requests shared by a VM's vCPU threads.
#[derive(Default)]
pub struct Control {
    /// Set while a pause or stop is requested: the fast check before each KVM_RUN.
    attention: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    /// The control of `n` threads, which start parked if `paused`.
    fn for_threads(n: usize, paused: bool) -> Self {
        let control = Control::default();
        {
            let mut st = control.lock();
            st.save_wanted = vec![false; n];
            st.saved = (0..n).map(|_| None).collect();
            st.restore = (0..n).map(|_| Restore::Idle).collect();
            st.gone = vec![false; n];
            st.pause = paused;
            control.attention.store(paused, Ordering::Release);
        }
        control
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().expect("vCPU control lock poisoned")
    }

    /// Called by vCPU `id`'s thread when attention is set: parks while paused, restoring
    /// its state with `restore` or saving it with `save` when asked. Returns false when the
    /// thread must end.
    fn check_in(
        &self,
        id: usize,
        save: &mut dyn FnMut() -> Result<VcpuState, crate::state::Error>,
        restore: &mut dyn FnMut(&VcpuState) -> Result<(), crate::state::Error>,
    ) -> bool {
        let mut st = self.lock();
        if st.pause && !st.stop {
            st.parked += 1;
            self.changed.notify_all();
            while st.pause && !st.stop {
                match std::mem::take(&mut st.restore[id]) {
                    Restore::Asked(state) => {
                        st.restore[id] = Restore::Writing;
                        drop(st);
                        let done = restore(&state);
                        st = self.lock();
                        st.restore[id] = Restore::Done(done);
                        self.changed.notify_all();
                        continue;
                    }
                    other => st.restore[id] = other,
                }
                // Read only once no vCPU runs: one still running could send this one an
                // IPI that the state read before it would not hold.
                let all_parked = st.parked + st.ended == st.gone.len();
                if all_parked && std::mem::take(&mut st.save_wanted[id]) {
                    drop(st);
                    let state = save();
                    st = self.lock();
                    st.saved[id] = Some(state);
                    self.changed.notify_all();
                    continue;
                }
                st = self.changed.wait(st).expect("vCPU control lock poisoned");
            }
            st.parked -= 1;
        }
        !st.stop
    }

    fn ended(&self, id: usize) {
        let mut st = self.lock();
        st.ended += 1;
        st.gone[id] = true;
        self.changed.notify_all();
    }
}

/// The vCPU threads of one VM.
pub struct Vcpus {
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Number of threads started.
    count: usize,
    control: Arc<Control>,
}

struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// What to save: the MSR indices (those of the state restored, if one was) and the XSAVE
    /// size.
    msrs: Vec<u32>,
    xsave: usize,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VcpuEvents,
    control: Arc<Control>,
    mem: GuestMemory,
    /// KVM_RUN last returned an I/O exit, which only the next KVM_RUN completes.
    io_pending: bool,
}

fn signal(evt: &EventFd) {
    if let Err(e) = evt.write(1) {
        log::error!("cannot signal the control loop: {e}");
    }
}

impl Vcpu {
    /// The vCPU's RIP and up to 16 code bytes there (not past the end of its page, whose
    /// successor may map elsewhere), if its mapping can be walked.
    fn code_at_rip(&self) -> Option<(u64, Vec<u8>)> {
        let rip = self.fd.get_regs().ok()?.rip;
        let t = self.fd.translate_gva(rip).ok().filter(|t| t.valid != 0)?;
        let in_page = 0x1000 - (t.physical_address & 0xfff);
        let mut bytes = vec![0u8; in_page.min(16) as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(t.physical_address))
            .ok()?;
        Some((rip, bytes))
    }

    /// "at rip X (code: ..)": where the vCPU stopped and the instruction bytes there, for
    /// diagnosing guests that stop on an instruction KVM cannot run.
    fn describe_rip(&self) -> String {
        match self.code_at_rip() {
            Some((rip, bytes)) => {
                let code: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                format!("at rip {rip:#x} (code: {})", code.join(" "))
            }
            None => "(code unreadable)".into(),
        }
    }

    /// Completes an instruction that KVM's emulator gave up on, for the few where that is
    /// well defined without emulating anything: hosts that interpret guest kernel code (such
    /// as nested PVM) stop on them otherwise, and Linux runs both early.
    /// - INT3 (Linux's self-test): the guest gets the #BP trap it asked for, returning after
    ///   the INT3;
    /// - FWAIT: with no unmasked x87 exception pending (the state Linux's FNINIT leaves) it
    ///   does nothing, so it is skipped.
    fn complete_unemulated(&mut self) -> Option<&'static str> {
        const INT3: u8 = 0xcc;
        const FWAIT: u8 = 0x9b;
        const BP_VECTOR: u8 = 3;
        let opcode = *self.code_at_rip()?.1.first()?;
        let mut regs = self.fd.get_regs().ok()?;
        match opcode {
            INT3 => {
                let mut events = self.fd.get_vcpu_events().ok()?;
                regs.rip = regs.rip.wrapping_add(1);
                events.exception.injected = 1;
                events.exception.nr = BP_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.pending = 0;
                self.fd.set_regs(&regs).ok()?;
                self.fd.set_vcpu_events(&events).ok()?;
                Some("INT3")
            }
            FWAIT => {
                regs.rip = regs.rip.wrapping_add(1);
                self.fd.set_regs(&regs).ok()?;
                Some("FWAIT")
            }
            _ => None,
        }
    }

    /// Finishes the I/O exit KVM_RUN last returned without running guest code: until then
    /// the vCPU's registers do not reflect it (KVM completes it on the next KVM_RUN).
    fn complete_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => log::warn!("vCPU {}: completing I/O before a pause: {e}", self.id),
            Ok(exit) => log::warn!("vCPU {}: unexpected exit {exit:?} before a pause", self.id),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Parks while paused; false when the thread must end.
    fn check_in(&mut self) -> bool {
        // A kick out of KVM_RUN (or a thread that never ran) leaves nothing to complete.
        if self.io_pending && self.control.lock().pause {
            self.complete_io();
            self.io_pending = false;
        }
        let (fd, xsave) = (&self.fd, self.xsave);
        let msrs = std::cell::RefCell::new(std::mem::take(&mut self.msrs));
        let go_on = {
            let mut save = || crate::state::save_vcpu(fd, &msrs.borrow(), xsave);
            // The MSRs a restored state holds are the ones to save later: a list probed
            // before the state's CPUID was set may lack some on kernels that check it.
            let mut restore = |state: &VcpuState| {
                crate::state::restore_vcpu(fd, state, xsave)?;
                *msrs.borrow_mut() = state.msrs.iter().map(|m| m.index).collect();
                Ok(())
            };
            self.control
                .check_in(usize::from(self.id), &mut save, &mut restore)
        };
        self.msrs = msrs.into_inner();
        go_on
    }

    /// Runs until stopped, parking while paused; returns after signalling an event if the
    /// guest ends its run.
    fn run(&mut self) {
        loop {
            if self.control.attention.load(Ordering::Acquire) && !self.check_in() {
                return;
            }
            self.io_pending = false;
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.io_pending = true;
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.io_pending = true;
                    if !self.pio.write(u64::from(port), data) {
                        log::trace!("vCPU {}: write to unhandled port {port:#x}", self.id);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.io_pending = true;
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.io_pending = true;
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
                    if suberror == KVM_INTERNAL_ERROR_EMULATION {
                        if let Some(insn) = self.complete_unemulated() {
                            log::debug!(
                                "vCPU {}: completed an {insn} KVM could not emulate",
                                self.id
                            );
                            continue;
                        }
                    }
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

/// What vCPU threads need besides their fds.
pub struct VcpuSetup<'a> {
    /// Port I/O bus.
    pub pio: &'a Arc<Bus>,
    /// MMIO bus.
    pub mmio: &'a Arc<Bus>,
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The MSRs a saved state holds (until a restore gives those of the state restored).
    pub msrs: Vec<u32>,
    /// Bytes of the XSAVE area.
    pub xsave: usize,
    /// Start parked, as after [`Vcpus::pause`] (a restored VM waits for vm.resume).
    pub paused: bool,
}

impl Vcpus {
    /// Starts one thread per vCPU in `fds` (vCPU id = index); `events` makes each thread's
    /// eventfds.
    pub fn start(
        fds: Vec<VcpuFd>,
        setup: VcpuSetup<'_>,
        mut events: impl FnMut() -> std::io::Result<VcpuEvents>,
    ) -> Result<Self, Error> {
        let n = fds.len();
        let control = Control::for_threads(n, setup.paused);
        let mut vcpus = Vcpus {
            threads: Mutex::new(Vec::with_capacity(n)),
            count: 0,
            control: Arc::new(control),
        };
        let msrs = setup.msrs;
        let (pio, mmio, mem) = (setup.pio, setup.mmio, setup.mem);
        for (id, fd) in fds.into_iter().enumerate() {
            let mut vcpu = Vcpu {
                id: id as u8,
                fd,
                msrs: msrs.clone(),
                xsave: setup.xsave,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events().map_err(Error::Spawn)?,
                control: vcpus.control.clone(),
                mem: mem.clone(),
                io_pending: false,
            };
            let control = vcpus.control.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::enter(crate::seccomp::Role::Vcpu);
                    vcpu.run();
                    control.ended(id);
                })
                .map_err(Error::Spawn)?;
            vcpus.lock_threads().push(handle);
            vcpus.count += 1;
        }
        Ok(vcpus)
    }

    /// How many vCPU threads were started.
    pub fn count(&self) -> usize {
        self.count
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().expect("vCPU thread list poisoned")
    }

    fn kick(&self) {
        for t in self.lock_threads().iter().filter(|t| !t.is_finished()) {
            if let Err(e) = t.kill(SIGRTMIN() + KICK_SIGNAL) {
                log::debug!("vCPU kick failed: {e}");
            }
        }
    }

    /// Kicks until `done` holds for the shared state.
    fn kick_until(&self, done: impl Fn(&ControlState) -> bool) {
        let mut st = self.control.lock();
        while !done(&st) {
            drop(st);
            self.kick();
            st = self.control.lock();
            if !done(&st) {
                st = self
                    .control
                    .changed
                    .wait_timeout(st, Duration::from_millis(1))
                    .expect("vCPU control lock poisoned")
                    .0;
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all of them are parked (or ended).
    pub fn pause(&self) {
        self.pause_asking(false);
    }

    /// [`Vcpus::pause`], each thread then reading its vCPU's state at once, while the
    /// caller goes on (pausing the devices): [`Vcpus::save_state`] takes the states.
    pub fn pause_and_save(&self) {
        self.pause_asking(true);
    }

    fn pause_asking(&self, save: bool) {
        let n = self.count;
        {
            let mut st = self.control.lock();
            st.pause = true;
            if save {
                // Asked now, each thread reads its state as soon as all have parked (and
                // wakes for it if it already had).
                self.ask_for_states(&mut st, n);
            }
            self.control.attention.store(true, Ordering::Release);
        }
        self.kick_until(|st| st.parked + st.ended == n);
    }

    /// Asks every thread for its state, waking those parked already.
    fn ask_for_states(&self, st: &mut ControlState, n: usize) {
        st.save_wanted = vec![true; n];
        st.saved = (0..n).map(|_| None).collect();
        st.saving = true;
        self.control.changed.notify_all();
    }

    /// Each vCPU's state; they must be paused. Each parked thread reads its own (already
    /// asked for by [`Vcpus::pause_and_save`], or now).
    pub fn save_state(&self) -> Result<Vec<VcpuState>, Error> {
        let n = self.count;
        let mut st = self.control.lock();
        if !st.pause {
            return Err(Error::NotPaused);
        }
        if !st.saving {
            if let Some(id) = st.gone.iter().position(|g| *g) {
                return Err(Error::Ended(id));
            }
            self.ask_for_states(&mut st, n);
        }
        // Taken by this call, whatever comes.
        st.saving = false;
        let mut st = self.wait_while(st, |st, i| st.saved[i].is_none())?;
        st.saved
            .iter_mut()
            .enumerate()
            .map(|(id, s)| {
                s.take()
                    .expect("checked above")
                    .map_err(|e| Error::Save(id, e))
            })
            .collect()
    }

    /// Has each parked thread write `states` (one per vCPU, in order) into its vCPU, and
    /// returns without waiting: [`Vcpus::restored`] waits. The vCPUs must be paused and not
    /// have run since they started, as after [`Vcpus::start`] with `paused`.
    pub fn restore(&self, states: Vec<VcpuState>) -> Result<(), Error> {
        let mut st = self.control.lock();
        if !st.pause {
            return Err(Error::NotPaused);
        }
        if states.len() != self.count {
            return Err(Error::RestoreCount {
                saved: states.len(),
                started: self.count,
            });
        }
        for (id, state) in states.into_iter().enumerate() {
            st.restore[id] = Restore::Asked(Box::new(state));
        }
        self.control.changed.notify_all();
        Ok(())
    }

    /// Waits until every vCPU given state by [`Vcpus::restore`] has it; the first error.
    pub fn restored(&self) -> Result<(), Error> {
        let n = self.count;
        let st = self.control.lock();
        let mut st = self.wait_while(st, |st, i| {
            matches!(st.restore[i], Restore::Asked(_) | Restore::Writing)
        })?;
        let mut first = Ok(());
        for id in 0..n {
            if let (Restore::Done(Err(e)), Ok(())) = (std::mem::take(&mut st.restore[id]), &first) {
                first = Err(Error::Restore(id, e));
            }
        }
        first
    }

    /// Waits while `waiting` holds for some vCPU; an error if one of those has ended.
    fn wait_while<'a>(
        &'a self,
        mut st: MutexGuard<'a, ControlState>,
        waiting: impl Fn(&ControlState, usize) -> bool,
    ) -> Result<MutexGuard<'a, ControlState>, Error> {
        let n = self.count;
        loop {
            if let Some(id) = (0..n).find(|&i| waiting(&st, i) && st.gone[i]) {
                return Err(Error::Ended(id));
            }
            if !(0..n).any(|i| waiting(&st, i)) {
                return Ok(st);
            }
            st = self
                .control
                .changed
                .wait(st)
                .expect("vCPU control lock poisoned");
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut st = self.control.lock();
        st.pause = false;
        // States read for this pause are stale once the vCPUs run.
        st.saving = false;
        st.save_wanted.iter_mut().for_each(|w| *w = false);
        self.control.attention.store(st.stop, Ordering::Release);
        self.control.changed.notify_all();
    }

    /// Ends every vCPU thread and waits for them.
    pub fn stop(&self) {
        if self.lock_threads().is_empty() {
            return;
        }
        {
            let mut st = self.control.lock();
            st.stop = true;
            self.control.attention.store(true, Ordering::Release);
            self.control.changed.notify_all();
        }
        let n = self.count;
        self.kick_until(|st| st.ended == n);
        let threads: Vec<_> = self.lock_threads().drain(..).collect();
        for t in threads {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::vcpu_state;

    /// `n` threads that park as vCPU threads do, writing a state's RIP into their own
    /// "vCPU" when asked to restore (refusing RIP 0) and reading it back when asked to save;
    /// the last one is slow to answer a pause. `fewest` is the fewest threads parked that
    /// any save saw.
    struct Fake {
        vcpus: Vcpus,
        rips: Vec<Arc<Mutex<u64>>>,
        fewest: Arc<std::sync::atomic::AtomicUsize>,
    }

    fn parked(n: usize) -> Fake {
        // Pausing kicks the threads with this signal.
        install_kick_handler().unwrap();
        let control = Control::for_threads(n, true);
        let control = Arc::new(control);
        let mut threads = Vec::new();
        let mut rips = Vec::new();
        let fewest = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        for id in 0..n {
            let (control, rip) = (control.clone(), Arc::new(Mutex::new(0u64)));
            let fewest = fewest.clone();
            rips.push(rip.clone());
            threads.push(std::thread::spawn(move || {
                let seen = control.clone();
                let mut save = || {
                    let parked = seen.lock().parked;
                    fewest.fetch_min(parked, Ordering::SeqCst);
                    let mut s = vcpu_state();
                    s.regs.rip = *rip.lock().unwrap();
                    Ok(s)
                };
                let written = rip.clone();
                let mut restore = |s: &VcpuState| match s.regs.rip {
                    0 => Err(crate::state::Error::Msr(0)),
                    r => {
                        *written.lock().unwrap() = r;
                        Ok(())
                    }
                };
                loop {
                    if id == n - 1 {
                        // A vCPU deep in guest code: the pause reaches it late.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if !control.check_in(id, &mut save, &mut restore) {
                        break;
                    }
                }
                control.ended(id);
            }));
        }
        let vcpus = Vcpus {
            threads: Mutex::new(threads),
            count: n,
            control,
        };
        Fake {
            vcpus,
            rips,
            fewest,
        }
    }

    fn with_rip(rip: u64) -> VcpuState {
        let mut s = vcpu_state();
        s.regs.rip = rip;
        s
    }

    #[test]
    fn parked_threads_write_their_own_state_and_the_first_failure_is_reported() {
        let Fake { vcpus, rips, .. } = parked(2);
        vcpus
            .restore(vec![with_rip(0x1000), with_rip(0x2000)])
            .unwrap();
        vcpus.restored().unwrap();
        assert_eq!(*rips[0].lock().unwrap(), 0x1000);
        assert_eq!(*rips[1].lock().unwrap(), 0x2000);
        // Waiting again, with nothing asked, returns at once.
        vcpus.restored().unwrap();

        vcpus.restore(vec![with_rip(0x3000), with_rip(0)]).unwrap();
        let e = vcpus.restored().unwrap_err();
        assert!(matches!(e, Error::Restore(1, _)), "{e}");
        assert!(matches!(
            vcpus.restore(vec![with_rip(1)]),
            Err(Error::RestoreCount {
                saved: 1,
                started: 2
            })
        ));
        // What was written is what a save reads back.
        let saved = vcpus.save_state().unwrap();
        assert_eq!(saved[0].regs.rip, 0x3000);
        vcpus.stop();
    }

    #[test]
    fn states_asked_for_with_the_pause_are_read_once_all_park_taken_once_and_forgotten() {
        let Fake {
            vcpus,
            rips,
            fewest,
        } = parked(3);
        // Threads parked already (a VM paused before) are woken to read their states.
        *rips[0].lock().unwrap() = 6;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while vcpus.control.lock().parked < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the threads never parked"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let vcpus = std::thread::spawn(move || {
            vcpus.pause_and_save();
            let rip = vcpus.save_state().unwrap()[0].regs.rip;
            (vcpus, rip)
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !vcpus.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "parked threads never saved"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (vcpus, rip) = vcpus.join().unwrap();
        assert_eq!(rip, 6);
        vcpus.resume();
        *rips[0].lock().unwrap() = 7;
        vcpus.pause_and_save();
        let saved = vcpus.save_state().unwrap();
        assert_eq!(saved[0].regs.rip, 7);
        // The slow thread parked last; no state was read before it had.
        assert_eq!(fewest.load(Ordering::SeqCst), 3);
        // A second save asks anew and sees the later value.
        *rips[0].lock().unwrap() = 8;
        assert_eq!(vcpus.save_state().unwrap()[0].regs.rip, 8);
        // Asked for, then resumed: a later save does not take the stale states.
        vcpus.pause_and_save();
        vcpus.resume();
        *rips[0].lock().unwrap() = 9;
        vcpus.pause();
        assert_eq!(vcpus.save_state().unwrap()[0].regs.rip, 9);
        vcpus.stop();
    }
}
