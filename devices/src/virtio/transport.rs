//! A virtio PCI function at run time.
//!
//! [`VirtioPciDevice`] answers the guest's configuration-space and BAR accesses through the
//! [`VirtioPci`] model and does what they ask: it starts and resets the device, routes MSI-X
//! vectors, and delivers interrupts that were pending. Hypervisor operations (ioeventfds for
//! queue notifications, MSI routes and irqfds) go through [`VmOps`], so this crate stays free
//! of KVM.
//!
//! A queue notification normally never reaches this code: the notify address of each queue is
//! an ioeventfd, so the guest's write signals the device's worker inside the kernel. Only if
//! that registration failed does the write come here and get forwarded to the same eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::common_config::{QueueConfig, NO_VECTOR};
use super::pci::{
    Event, VirtioPci, VirtioPciState, ISR_CONFIG, ISR_QUEUE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET,
};
use super::{Activation, ActiveQueue, GuestMemory, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use crate::pci::msix::{Fire, Msix, MsixEntry};
use crate::pci::{Bar, BarMove, PciDevice};
use crate::BusDevice;

/// What the transport needs from the hypervisor.
pub trait VmOps: Send + Sync {
    /// Makes a guest write at `addr` (MMIO) signal `fd` inside the kernel.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undoes [`VmOps::register_ioevent`].
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// A new interrupt number for an MSI.
    fn allocate_gsi(&self) -> io::Result<u32>;
    /// Points `gsi` at the MSI `message`, and makes a write to `fd` raise it.
    fn route_msi(&self, gsi: u32, message: MsixEntry, fd: &EventFd) -> io::Result<()>;
    /// Gives back `gsi`: its route goes, `fd` no longer raises it, and it may be allocated
    /// again.
    fn release_gsi(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
}

/// Errors creating a virtio PCI function.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The function's configuration space could not be laid out.
    #[error("Cannot lay out the PCI function")]
    Config(#[source] crate::pci::configuration::ConfigError),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// No interrupt number is left.
    #[error("Cannot allocate an interrupt")]
    Gsi(#[source] io::Error),
    /// Saved state does not fit the device.
    #[error("Cannot restore the device")]
    State(#[source] crate::StateError),
}

/// Where a running queue is: what was saved of it, not re-derived from the rings, so no
/// chain is lost or served twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePosition {
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// A virtio PCI device's whole state, for snapshots and migration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// The PCI function as the guest set it up.
    pub pci: VirtioPciState,
    /// MSI-X vector of configuration interrupts.
    pub config_vector: u16,
    /// A worker had found the queues unusable.
    pub broken: bool,
    /// The device was running (the driver set DRIVER_OK and activation worked).
    pub active: bool,
    /// Each queue's position while running, by index.
    pub queues: Vec<Option<QueuePosition>>,
    /// The device's own state.
    pub device: super::DeviceState,
}

/// Why a queue the driver enabled cannot run.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Its rings are outside memory or otherwise unusable.
    #[error("its rings are not usable")]
    Rings,
    /// Its notification eventfd could not be shared with a worker.
    #[error("cannot clone its eventfd")]
    Notify(#[source] io::Error),
}

/// Why a device's state cannot be taken now.
#[derive(Debug, thiserror::Error)]
#[error("Device {0} is running: pause it before saving its state")]
pub struct NotPaused(pub String);

/// Raises a device's interrupts: MSI-X messages when the guest enabled and unmasked them,
/// otherwise pending bits, and the ISR byte either way.
pub struct Interrupt {
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    irqfds: Vec<EventFd>,
    config_vector: AtomicU16,
    /// A worker found the driver's rings unusable: the device needs a reset.
    broken: AtomicBool,
}

impl Interrupt {
    /// Signals that queue work completed on `vector`.
    pub fn queue(&self, vector: u16) {
        self.raise(vector, ISR_QUEUE);
    }

    /// A worker found a queue unusable (rings outside memory, an impossible index): the
    /// device reports DEVICE_NEEDS_RESET and tells the driver with a configuration interrupt.
    pub fn device_broken(&self) {
        self.broken.store(true, Ordering::Release);
        self.config();
    }

    /// Signals that the device configuration changed.
    pub fn config(&self) {
        self.raise(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }

    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector == NO_VECTOR {
            return;
        }
        let fire = self.msix.lock().expect("MSI-X lock poisoned").fire(vector);
        if let Fire::Send(_) = fire {
            self.send(vector);
        }
    }

    /// An interrupt with `vectors` vectors whose MSI-X is off (everything pends), for tests.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn for_test(vectors: u16) -> Self {
        Interrupt {
            msix: Arc::new(Mutex::new(Msix::new(vectors))),
            isr: Arc::new(AtomicU8::new(0)),
            irqfds: (0..vectors)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            broken: AtomicBool::new(false),
        }
    }

    fn send(&self, vector: u16) {
        if let Some(fd) = self.irqfds.get(usize::from(vector)) {
            if let Err(e) = fd.write(1) {
                log::warn!("Cannot raise MSI-X vector {vector}: {e}");
            }
        }
    }
}

/// A virtio device on PCI, with its notifications and interrupts wired.
pub struct VirtioPciDevice {
    id: String,
    pci: VirtioPci,
    mem: GuestMemory,
    vm: Arc<dyn VmOps>,
    notify: Vec<EventFd>,
    /// Whether each notify eventfd is registered as an ioeventfd.
    ioevents: Vec<bool>,
    interrupt: Arc<Interrupt>,
    gsis: Vec<u32>,
    active: bool,
    /// The running queues while paused.
    paused: Option<Vec<Option<ActiveQueue>>>,
}

fn position(q: &ActiveQueue) -> QueuePosition {
    QueuePosition {
        next_avail: q.queue.next_avail(),
        next_used: q.queue.next_used(),
    }
}

fn notify_addr(bar: u64, queue: usize) -> u64 {
    bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

/// The queue `config` describes, as the driver enabled it; `None` if its size is not one
/// the device takes or its rings do not lie in `mem`.
pub(crate) fn queue_of(config: &QueueConfig, event_idx: bool, mem: &GuestMemory) -> Option<Queue> {
    let mut queue = Queue::new(config.max_size).ok()?;
    queue.try_set_size(config.size).ok()?;
    queue
        .try_set_desc_table_address(GuestAddress(config.desc))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(config.driver))
        .ok()?;
    queue
        .try_set_used_ring_address(GuestAddress(config.device))
        .ok()?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}

impl VirtioPciDevice {
    /// Puts `device` on PCI as `id`, with BAR 0 at `bar_addr`.
    pub fn new(
        id: String,
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        mem: GuestMemory,
        vm: Arc<dyn VmOps>,
    ) -> Result<Self, Error> {
        let pci = VirtioPci::new(device, bar_addr).map_err(Error::Config)?;
        Self::with_function(id, pci, mem, vm)
    }

    /// Builds `device` as `state` describes it: the function as the guest set it up, its
    /// MSI-X routes, and, if it was running, its queues at their saved positions.
    pub fn restore(
        id: String,
        device: Box<dyn VirtioDevice>,
        state: TransportState,
        mem: GuestMemory,
        vm: Arc<dyn VmOps>,
    ) -> Result<Self, Error> {
        let pci = VirtioPci::from_state(device, state.pci).map_err(Error::State)?;
        let mut dev = Self::with_function(id, pci, mem, vm)?;
        dev.interrupt
            .config_vector
            .store(state.config_vector, Ordering::Release);
        dev.interrupt.broken.store(state.broken, Ordering::Release);
        let vectors = dev.interrupt.irqfds.len() as u16;
        for v in 0..vectors {
            let programmed = dev
                .interrupt
                .msix
                .lock()
                .expect("MSI-X lock poisoned")
                .entry(v)
                .is_some_and(|e| e.addr_lo != 0 || e.addr_hi != 0);
            if programmed {
                dev.handle(Event::VectorChanged(v));
            }
        }
        if state.active {
            // The device waits, paused, for the VM to resume.
            dev.paused = Some(dev.saved_queues(&state.queues).map_err(Error::State)?);
            dev.active = true;
        }
        Ok(dev)
    }

    /// The running queues at `positions`.
    fn saved_queues(
        &self,
        positions: &[Option<QueuePosition>],
    ) -> Result<Vec<Option<ActiveQueue>>, crate::StateError> {
        let common = self.pci.common();
        let event_idx = common.acked_features() & VIRTIO_RING_F_EVENT_IDX != 0;
        if positions.len() != common.queues().len() {
            return Err(crate::StateError::Invalid(format!(
                "{} queue positions for {} queues",
                positions.len(),
                common.queues().len()
            )));
        }
        let mut queues = Vec::new();
        for (i, (config, pos)) in common.queues().iter().zip(positions).enumerate() {
            let Some(pos) = pos else {
                queues.push(None);
                continue;
            };
            let mut active = self
                .active_queue(i, config, event_idx)
                .map_err(|e| crate::StateError::Queue(i, e))?;
            active.queue.set_next_avail(pos.next_avail);
            active.queue.set_next_used(pos.next_used);
            queues.push(Some(active));
        }
        Ok(queues)
    }

    /// Queue `index` as the driver set it up (`config`), ready for a worker, at the start
    /// of its rings.
    fn active_queue(
        &self,
        index: usize,
        config: &QueueConfig,
        event_idx: bool,
    ) -> Result<ActiveQueue, QueueError> {
        let queue = self
            .build_queue(index, config, event_idx)
            .ok_or(QueueError::Rings)?;
        let notify = self.notify[index].try_clone().map_err(QueueError::Notify)?;
        Ok(ActiveQueue {
            queue,
            notify,
            vector: config.msix_vector,
        })
    }

    fn with_function(
        id: String,
        pci: VirtioPci,
        mem: GuestMemory,
        vm: Arc<dyn VmOps>,
    ) -> Result<Self, Error> {
        let bar_addr = pci.bar().addr;
        let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd);
        let queues = pci.common().queues().len();
        let notify = (0..queues)
            .map(|_| new_fd())
            .collect::<Result<Vec<_>, _>>()?;
        let ioevents = notify
            .iter()
            .enumerate()
            .map(
                |(q, fd)| match vm.register_ioevent(fd, notify_addr(bar_addr, q)) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("{id}: queue {q} notifications will exit to baton: {e}");
                        false
                    }
                },
            )
            .collect();
        let msix = pci.msix();
        let vectors = msix.lock().expect("MSI-X lock poisoned").vectors();
        let irqfds = (0..vectors)
            .map(|_| new_fd())
            .collect::<Result<Vec<_>, _>>()?;
        let gsis = (0..vectors)
            .map(|_| vm.allocate_gsi().map_err(Error::Gsi))
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt = Arc::new(Interrupt {
            msix,
            isr: pci.isr(),
            irqfds,
            config_vector: AtomicU16::new(NO_VECTOR),
            broken: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            id,
            pci,
            mem,
            vm,
            notify,
            ioevents,
            interrupt,
            gsis,
            active: false,
            paused: None,
        })
    }

    /// Stops the device's workers, keeping its queues where they are; nothing touches
    /// guest memory or the backend until [`VirtioPciDevice::resume`].
    pub fn pause(&mut self) {
        if self.active && self.paused.is_none() {
            self.paused = Some(self.pci.device_mut().pause());
        }
    }

    /// Restarts what [`VirtioPciDevice::pause`] stopped (in this process, or in the one a
    /// snapshot or migration came from).
    ///
    /// Each queue then gets one interrupt: whether the driver was owed one for buffers used
    /// just before the pause is not part of the queue's state (it is counted from the last
    /// interrupt decision, which starts afresh here), and a driver waiting for an interrupt
    /// it never gets never looks at that queue again (Linux's NAPI: a queue pair left
    /// silent until its traffic moves there). One interrupt too many only makes the driver
    /// look at a used ring with nothing new.
    pub fn resume(&mut self) {
        if let Some(queues) = self.paused.take() {
            let vectors: Vec<u16> = queues.iter().flatten().map(|q| q.vector).collect();
            self.active = false;
            self.start(queues);
            if self.active {
                for vector in vectors {
                    self.interrupt.queue(vector);
                }
            }
        }
    }

    /// Has a running device ask its driver to announce the guest (after a migration).
    pub fn announce(&mut self) {
        if self.active && self.paused.is_none() && self.pci.device_mut().announce() {
            self.interrupt.config();
        }
    }

    /// The device's whole state; it must be paused (or not running).
    pub fn state(&self) -> Result<TransportState, NotPaused> {
        let queues = match (&self.paused, self.active) {
            (Some(queues), _) => {
                let mut positions: Vec<Option<QueuePosition>> =
                    queues.iter().map(|q| q.as_ref().map(position)).collect();
                positions.resize(self.pci.common().queues().len(), None);
                positions
            }
            (None, true) => return Err(NotPaused(self.id.clone())),
            (None, false) => Vec::new(),
        };
        Ok(TransportState {
            pci: self.pci.state(),
            config_vector: self.interrupt.config_vector.load(Ordering::Acquire),
            broken: self.interrupt.broken.load(Ordering::Acquire),
            active: self.active,
            queues,
            device: self.pci.device().save(),
        })
    }

    /// BAR 0 as it is now.
    pub fn bar(&self) -> Bar {
        self.pci.bar()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.pci.device()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Activate => self.activate(),
            Event::Reset => {
                self.paused = None;
                if std::mem::take(&mut self.active) {
                    self.pci.device_mut().reset();
                }
                self.interrupt.broken.store(false, Ordering::Release);
                self.interrupt
                    .config_vector
                    .store(NO_VECTOR, Ordering::Release);
            }
            Event::Notify(q) => {
                if let Some(fd) = self.notify.get(usize::from(q)) {
                    let _ = fd.write(1);
                }
            }
            Event::VectorChanged(v) => {
                let entry = self
                    .interrupt
                    .msix
                    .lock()
                    .expect("MSI-X lock poisoned")
                    .entry(v);
                let (Some(entry), Some(&gsi), Some(fd)) = (
                    entry,
                    self.gsis.get(usize::from(v)),
                    self.interrupt.irqfds.get(usize::from(v)),
                ) else {
                    return;
                };
                if let Err(e) = self.vm.route_msi(gsi, entry, fd) {
                    log::warn!("{}: cannot route MSI-X vector {v}: {e}", self.id);
                }
            }
            Event::Deliver(v) => self.interrupt.send(v),
        }
    }

    fn build_queue(&self, index: usize, config: &QueueConfig, event_idx: bool) -> Option<Queue> {
        let queue = queue_of(config, event_idx, &self.mem);
        if queue.is_none() {
            log::warn!(
                "{}: queue {index} is not valid (its size, or rings outside guest memory)",
                self.id
            );
        }
        queue
    }

    fn activate(&mut self) {
        let common = self.pci.common();
        self.interrupt
            .config_vector
            .store(common.config_msix_vector(), Ordering::Release);
        let event_idx = common.acked_features() & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, config) in common.queues().iter().enumerate() {
            if !config.enabled {
                queues.push(None);
                continue;
            }
            match self.active_queue(i, config, event_idx) {
                Ok(q) => queues.push(Some(q)),
                Err(e) => {
                    log::warn!("{}: queue {i}: {}", self.id, crate::error_chain(&e));
                    return self.failed();
                }
            }
        }
        self.start(queues);
    }

    /// Runs the device on `queues`.
    fn start(&mut self, queues: Vec<Option<ActiveQueue>>) {
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.pci.common().acked_features(),
            queues,
            interrupt: self.interrupt.clone(),
        };
        match self.pci.device_mut().activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("{}: cannot start: {}", self.id, crate::error_chain(&e));
                self.failed();
            }
        }
    }

    /// The device cannot run: the driver must reset it.
    fn failed(&mut self) {
        self.pci.common_mut().set_needs_reset();
        self.interrupt.config();
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.interrupt.broken.load(Ordering::Acquire) {
            self.pci.common_mut().set_needs_reset();
        }
        self.pci.bar_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(event) = self.pci.bar_write(offset, data) {
            self.handle(event);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&self, reg: usize) -> u32 {
        self.pci.read_config(reg)
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let moved = self.pci.write_config(reg, offset, data);
        for event in self.pci.take_events() {
            self.handle(event);
        }
        moved
    }

    fn bar_moved(&mut self, mv: &BarMove) {
        for (q, fd) in self.notify.iter().enumerate() {
            if self.ioevents[q] {
                let _ = self.vm.unregister_ioevent(fd, notify_addr(mv.old, q));
            }
            self.ioevents[q] = self.vm.register_ioevent(fd, notify_addr(mv.new, q)).is_ok();
        }
    }
}

impl Drop for VirtioPciDevice {
    /// Stops the workers without resetting the device: a reset would change the backend
    /// (detach TAP queues), which may live on in another VM after a migration.
    /// Its notifications and interrupts are given back to the VM, which lives on when the
    /// device is unplugged.
    fn drop(&mut self) {
        if self.active {
            self.pci.device_mut().pause();
        }
        let bar = self.pci.bar().addr;
        for (q, fd) in self.notify.iter().enumerate() {
            if self.ioevents[q] {
                if let Err(e) = self.vm.unregister_ioevent(fd, notify_addr(bar, q)) {
                    log::warn!("{}: cannot release queue {q}'s notifications: {e}", self.id);
                }
            }
        }
        for (gsi, fd) in self.gsis.iter().zip(&self.interrupt.irqfds) {
            if let Err(e) = self.vm.release_gsi(*gsi, fd) {
                log::warn!("{}: cannot release interrupt {gsi}: {e}", self.id);
            }
        }
    }
}
