//! One VM: the KVM VM with its in-kernel irqchip and PIT, guest memory, devices, ACPI
//! tables, the loaded payload, and running vCPU threads.
//!
//! A guest reboot drops the whole `Vm` and builds a new one from the same configuration, so
//! nothing of the previous run (device state, vCPU state, memory contents) leaks into the next.

use std::sync::{Arc, Mutex};

use ::migration::timing::Timeline;
use api::VmConfig;
use devices::acpi::Ged;
use devices::legacy::{Cmos, CmosState, Serial, SerialState, I8042};
use devices::pci::hotplug::{PciHotplug, HOTPLUG_LEN};
use devices::pci::{PciBus, PciConfigIo, PciEcam};
use devices::virtio::transport::TransportState;
use devices::{Bus, Trigger};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
use crate::cpuid::{self, VcpuCpuid};
use crate::device_manager::{self, Backends, PciDeviceHandle};
use crate::interrupt::Interrupts;
use crate::layout::*;
use crate::memory::{self, GuestMemory};
use crate::state::{KvmVmState, VcpuState};
use crate::vcpu::{VcpuEvents, VcpuSetup, Vcpus};
use crate::{acpi, boot, regs, state, vcpu};

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl on the VM failed.
    #[error("KVM: cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error("Cannot create guest memory")]
    Memory(#[source] memory::Error),
    /// An eventfd could not be created or cloned.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A device could not be placed on a bus.
    #[error("Cannot place device {0}")]
    Bus(&'static str, #[source] devices::BusError),
    /// ACPI tables.
    #[error("Cannot build ACPI tables")]
    Acpi(#[source] acpi::Error),
    /// Kernel, initramfs or boot information.
    #[error("Cannot load the payload")]
    Boot(#[source] boot::Error),
    /// The adjusted CPUID does not fit KVM's table.
    #[error("CPUID has {0} entries, more than KVM takes")]
    Cpuid(usize, #[source] vmm_sys_util::fam::Error),
    /// vCPU register setup.
    #[error("Cannot set up vCPU {0}")]
    Regs(u8, #[source] regs::Error),
    /// vCPU threads.
    #[error("Cannot start vCPUs")]
    Vcpu(#[source] vcpu::Error),
    /// virtio devices.
    #[error("Cannot create devices")]
    Devices(#[source] device_manager::Error),
    /// KVM state could not be saved or restored.
    #[error("Cannot {0} the VM's KVM state")]
    State(&'static str, #[source] state::Error),
    /// A legacy device's saved state does not fit.
    #[error("Cannot restore the {0}")]
    DeviceState(&'static str, #[source] devices::StateError),
    /// The saved state has another number of vCPUs than the configuration.
    #[error("The saved state does not match the configuration: {saved} vCPUs saved, {configured} configured")]
    VcpuCount {
        /// vCPUs in the state.
        saved: usize,
        /// vCPUs configured.
        configured: u8,
    },
    /// A shell with parked vCPU threads was given to a boot, which sets the vCPUs up first.
    #[error("The VM was prepared for a restore, not for booting")]
    ParkedForBoot,
    /// The VM shell was built for another number of vCPUs than the configuration has.
    #[error("The VM was prepared with {created} vCPUs, but {configured} are configured")]
    ShellVcpus {
        /// vCPUs the shell created.
        created: usize,
        /// vCPUs configured.
        configured: u8,
    },
    /// A device was still running when its state was wanted.
    #[error("Cannot save device state")]
    NotPaused(#[source] devices::virtio::transport::NotPaused),
}

impl Error {
    /// The saved state a restore was given does not fit the configuration or this baton:
    /// the caller's input, not a failure of the host.
    pub fn is_bad_state(&self) -> bool {
        match self {
            Error::VcpuCount { .. } | Error::DeviceState(..) => true,
            Error::Devices(e) => e.is_bad_state(),
            _ => false,
        }
    }
}

/// Granularity of dirty-page tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Everything a paused VM holds besides its memory and configuration: the state a snapshot
/// or a migration carries. Devices are rebuilt from it, not created and then patched.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Each vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel PICs, IOAPIC, PIT and clock.
    pub kvm: KvmVmState,
    /// The serial port.
    pub serial: SerialState,
    /// The CMOS.
    pub cmos: CmosState,
    /// ACPI GED events the guest has not read.
    pub ged: u8,
    /// The virtio PCI devices.
    pub devices: Vec<(String, TransportState)>,
    /// Each virtio device's slot on PCI bus 0, by id.
    #[serde(default)]
    pub slots: Vec<(String, u8)>,
    /// PCI hot-plug news the guest has not read: (arrived, to remove) slot bitmaps.
    #[serde(default)]
    pub hotplug: devices::pci::hotplug::Pending,
}

/// How a VM starts.
pub enum Start {
    /// From its payload, at power-on.
    Boot,
    /// From saved state, on a VM shell whose memory already holds the guest; the VM stays
    /// paused.
    Restore(Box<VmState>, Shell),
}

/// A KVM VM with its in-kernel irqchip and PIT, its memory registered and its vCPUs
/// created, but no devices and no vCPU set up or running yet. A migration destination
/// builds it before the source pauses, so that KVM's set-up (which grows with memory size)
/// stays out of the downtime, and starts its vCPU threads there too
/// ([`Shell::park_vcpus`]).
pub struct Shell {
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
    /// The buses the devices go on, empty until [`Vm::start`] fills them: threads parked
    /// ahead already hold them.
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vcpus: ShellVcpus,
}

enum ShellVcpus {
    /// Created, with no thread yet.
    Created(Vec<kvm_ioctls::VcpuFd>),
    /// Threads started and parked; `restoring` once they were given their saved state.
    Parked { vcpus: Vcpus, restoring: bool },
}

impl Shell {
    /// A VM on `mem`, or on new memory as `config` describes; each step's end is marked on
    /// `timer`.
    pub fn new(
        kvm: &Kvm,
        config: &VmConfig,
        mem: Option<GuestMemory>,
        timer: &mut Timeline,
    ) -> Result<Self, Error> {
        let vm_fd = Arc::new(kvm.create_vm().map_err(|e| Error::Kvm("create a VM", e))?);
        timer.mark("create the VM");
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| Error::Kvm("set the identity map address", e))?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| Error::Kvm("set the TSS address", e))?;
        let mem = match mem {
            Some(mem) => mem,
            None => {
                memory::create(config.memory.size, config.memory.shared).map_err(Error::Memory)?
            }
        };
        // Memory goes in before the irqchip: once the irqchip exists, KVM's first slot update
        // waits for a full SRCU grace period (7 ms on the nested hosts we measure on, whatever
        // the size) instead of about 0.3 ms per GiB.
        register_memory(&vm_fd, &mem)?;
        timer.mark("memory slots");
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;
        timer.mark("in-kernel devices");
        let vcpus = (0..config.cpus.boot_vcpus)
            .map(|id| vm_fd.create_vcpu(u64::from(id)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Kvm("create a vCPU", e))?;
        timer.mark("create vCPUs");
        Ok(Shell {
            vm_fd,
            mem,
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            vcpus: ShellVcpus::Created(vcpus),
        })
    }

    /// Its memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Starts the vCPU threads now, parked until the restored VM is resumed, so that a
    /// restore neither starts them nor waits for its vCPUs' state to be written inside
    /// the downtime ([`Shell::restore_vcpus`]).
    /// False if they were started already.
    pub fn park_vcpus(&mut self, kvm: &Kvm, events: &VmEvents) -> Result<bool, Error> {
        let ShellVcpus::Created(fds) = &mut self.vcpus else {
            return Ok(false);
        };
        let fds = std::mem::take(fds);
        let setup = (&*self.vm_fd, &self.pio, &self.mmio, &self.mem);
        let vcpus = start_vcpus(kvm, setup, fds, events, true)?;
        self.vcpus = ShellVcpus::Parked {
            vcpus,
            restoring: false,
        };
        Ok(true)
    }

    /// Has parked vCPU threads write `states` into their vCPUs while the caller goes on;
    /// [`Vm::start`] waits for them. Does nothing without parked threads ([`Vm::start`]
    /// parks them first), or if they were given their states already.
    pub fn restore_vcpus(&mut self, states: &[VcpuState]) -> Result<(), Error> {
        if let ShellVcpus::Parked {
            vcpus,
            restoring: restoring @ false,
        } = &mut self.vcpus
        {
            vcpus.restore(states.to_vec()).map_err(Error::Vcpu)?;
            *restoring = true;
        }
        Ok(())
    }
}

/// The vCPU threads of `fds` on the VM, buses and memory of `on`, with what they save (the
/// XSAVE size and the MSRs KVM can save), started running or `paused`.
fn start_vcpus(
    kvm: &Kvm,
    on: (&VmFd, &Arc<Bus>, &Arc<Bus>, &GuestMemory),
    fds: Vec<kvm_ioctls::VcpuFd>,
    events: &VmEvents,
    paused: bool,
) -> Result<Vcpus, Error> {
    let (vm_fd, pio, mmio, mem) = on;
    let msrs = match fds.first() {
        Some(fd) => state::saveable_msrs(kvm, fd).map_err(|e| Error::State("list", e))?,
        None => Vec::new(),
    };
    let setup = VcpuSetup {
        pio,
        mmio,
        mem,
        msrs,
        xsave: state::xsave_size(vm_fd),
        paused,
    };
    Vcpus::start(fds, setup, || events.for_vcpu()).map_err(Error::Vcpu)
}

/// Sets up a new vCPU for power-on: CPUID from what KVM supports (`supported`), adjusted by
/// the configuration, and the registers every vCPU starts with.
fn setup_vcpu(
    kvm: &Kvm,
    supported: &CpuId,
    config: &VmConfig,
    fd: &kvm_ioctls::VcpuFd,
    id: u8,
) -> Result<(), Error> {
    let mut masked: Vec<&str> = config
        .cpus
        .template
        .map(cpuid::template_mask)
        .unwrap_or_default()
        .to_vec();
    masked.extend(config.cpus.mask.iter().map(String::as_str));
    let mut entries = supported.as_slice().to_vec();
    cpuid::adjust(
        &mut entries,
        &VcpuCpuid {
            apic_id: id,
            cpu_count: config.cpus.boot_vcpus,
            tsc_khz: fd.get_tsc_khz().ok(),
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            masked: &masked,
        },
    );
    let cpuid = CpuId::from_entries(&entries).map_err(|e| Error::Cpuid(entries.len(), e))?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("set CPUID", e))?;
    regs::setup_common(fd).map_err(|e| Error::Regs(id, e))
}

/// The eventfds through which a VM's devices and vCPUs reach the control loop. They are
/// created once and shared by every VM the process runs, so the loop polls fixed fds.
pub struct VmEvents {
    /// Guest power-off.
    pub exit: EventFd,
    /// Guest reset.
    pub reset: EventFd,
    /// vCPU failure.
    pub fail: EventFd,
    /// The guest ejected a hot-plugged device ([`Vm::take_ejected`] says which).
    pub eject: EventFd,
}

impl VmEvents {
    /// The same eventfds, for a VM built on another thread (an incoming migration).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VmEvents {
            exit: self.exit.try_clone()?,
            reset: self.reset.try_clone()?,
            fail: self.fail.try_clone()?,
            eject: self.eject.try_clone()?,
        })
    }

    /// Four new non-blocking eventfds.
    pub fn new() -> Result<Self, Error> {
        let new = || EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd);
        Ok(VmEvents {
            exit: new()?,
            reset: new()?,
            fail: new()?,
            eject: new()?,
        })
    }

    fn for_vcpu(&self) -> std::io::Result<VcpuEvents> {
        Ok(VcpuEvents {
            exit: self.exit.try_clone()?,
            reset: self.reset.try_clone()?,
            fail: self.fail.try_clone()?,
        })
    }
}

/// A built, possibly running VM.
pub struct Vm {
    vcpus: Vcpus,
    ged: Arc<Mutex<Ged>>,
    serial: Arc<Mutex<Serial>>,
    cmos: Arc<Mutex<Cmos>>,
    pci: Arc<Mutex<PciBus>>,
    hotplug: Arc<Mutex<PciHotplug>>,
    interrupts: Arc<Interrupts>,
    // Dropped after the vCPUs stop; dropping a device stops its workers.
    devices: Mutex<Vec<PciDeviceHandle>>,
    // Dropped after the vCPUs stop: they run on this memory and VM.
    memory: GuestMemory,
    vm_fd: Arc<VmFd>,
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), Error> {
    set_memory_flags(vm_fd, mem, 0)
}

/// (Re-)registers every RAM region as KVM memory slot `index` with `flags`.
fn set_memory_flags(vm_fd: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` is owned by `mem`, which the VM keeps alive for
        // as long as the VM fd exists, and it is exactly `memory_size` bytes long.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm("map guest memory", e))?;
    }
    Ok(())
}

struct Buses {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    ged: Arc<Mutex<Ged>>,
    serial: Arc<Mutex<Serial>>,
    cmos: Arc<Mutex<Cmos>>,
    pci: Arc<Mutex<PciBus>>,
    hotplug: Arc<Mutex<PciHotplug>>,
}

/// Builds the platform devices, at power-on or as `saved` left them.
fn create_devices(
    vm_fd: &VmFd,
    (pio, mmio): (Arc<Bus>, Arc<Bus>),
    console: &Console,
    events: &VmEvents,
    saved: Option<&VmState>,
) -> Result<Buses, Error> {
    let clone = |e: &EventFd| e.try_clone().map_err(Error::EventFd);

    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| Error::Kvm("wire the serial interrupt", e))?;
    let serial = match saved {
        None => Serial::new(Trigger::new(irq), console.output()),
        Some(s) => Serial::from_state(Trigger::new(irq), console.output(), &s.serial)
            .map_err(|e| Error::DeviceState("serial port", e))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    console.attach(serial.clone());
    pio.insert(serial.clone(), COM1_PORT, 8)
        .map_err(|e| Error::Bus("serial", e))?;

    let i8042 = I8042::new(clone(&events.reset)?);
    pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, 5)
        .map_err(|e| Error::Bus("i8042", e))?;
    let cmos = match saved {
        None => Cmos::default(),
        Some(s) => Cmos::from_state(&s.cmos).map_err(|e| Error::DeviceState("CMOS", e))?,
    };
    let cmos = Arc::new(Mutex::new(cmos));
    pio.insert(cmos.clone(), CMOS_PORT, 2)
        .map_err(|e| Error::Bus("CMOS", e))?;
    let pm = devices::acpi::AcpiPm::new(clone(&events.exit)?, clone(&events.reset)?);
    pio.insert(
        Arc::new(Mutex::new(pm)),
        ACPI_PM_PORT,
        devices::acpi::PORT_LEN,
    )
    .map_err(|e| Error::Bus("ACPI power registers", e))?;

    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm_fd
        .register_irqfd(&ged_irq, ACPI_GED_IRQ)
        .map_err(|e| Error::Kvm("wire the GED interrupt", e))?;
    let pending = saved.map_or(0, |s| s.ged);
    let ged = Arc::new(Mutex::new(Ged::with_pending(
        Trigger::new(ged_irq),
        pending,
    )));
    mmio.insert(ged.clone(), ACPI_GED_START, devices::acpi::GED_LEN)
        .map_err(|e| Error::Bus("ACPI GED", e))?;

    let pci = Arc::new(Mutex::new(PciBus::new(mmio.clone())));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        PCI_CONFIG_PORT,
        8,
    )
    .map_err(|e| Error::Bus("PCI config ports", e))?;
    mmio.insert(
        Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
        PCI_MMCONFIG_START,
        PCI_MMCONFIG_SIZE,
    )
    .map_err(|e| Error::Bus("PCI ECAM", e))?;
    let hotplug = Arc::new(Mutex::new(PciHotplug::new(
        pci.clone(),
        clone(&events.eject)?,
        saved.map_or((0, 0), |s| s.hotplug),
    )));
    mmio.insert(hotplug.clone(), PCI_HOTPLUG_START, HOTPLUG_LEN)
        .map_err(|e| Error::Bus("PCI hot-plug registers", e))?;

    Ok(Buses {
        pio,
        mmio,
        ged,
        serial,
        cmos,
        pci,
        hotplug,
    })
}

impl Vm {
    /// Builds the VM described by `config` and starts its vCPUs: from its payload, or
    /// restored (and left paused) from saved state and memory.
    pub fn start(
        kvm: &Kvm,
        config: &VmConfig,
        backends: &Backends,
        console: &Console,
        events: &VmEvents,
        start: Start,
        timer: &mut Timeline,
    ) -> Result<Self, Error> {
        timer.restart();
        let (saved, shell) = match start {
            Start::Boot => (None, None),
            Start::Restore(state, shell) => (Some(state), Some(shell)),
        };
        let saved = saved.as_deref();
        if let Some(s) = saved {
            if s.vcpus.len() != usize::from(config.cpus.boot_vcpus) {
                return Err(Error::VcpuCount {
                    saved: s.vcpus.len(),
                    configured: config.cpus.boot_vcpus,
                });
            }
        }
        let mut shell = match shell {
            Some(shell) => shell,
            None => Shell::new(kvm, config, None, timer)?,
        };
        let created = match &shell.vcpus {
            ShellVcpus::Created(fds) => fds.len(),
            ShellVcpus::Parked { vcpus, .. } => vcpus.count(),
        };
        if created != usize::from(config.cpus.boot_vcpus) {
            return Err(Error::ShellVcpus {
                created,
                configured: config.cpus.boot_vcpus,
            });
        }
        if let Some(s) = saved {
            // As a migration destination does ahead (where these do nothing).
            if shell.park_vcpus(kvm, events)? {
                timer.mark("vCPU threads");
            }
            shell.restore_vcpus(&s.vcpus)?;
        }
        let Shell {
            vm_fd,
            mem,
            pio,
            mmio,
            vcpus,
        } = shell;
        let buses = create_devices(&vm_fd, (pio, mmio), console, events, saved)?;
        timer.mark("platform devices");
        let interrupts = Arc::new(Interrupts::new(vm_fd.clone()));
        // One routing table update for every restored MSI-X vector, not one each: each
        // makes KVM wait for a grace period, which takes milliseconds on a busy host.
        let devices = interrupts
            .batched(|| {
                device_manager::create(
                    config,
                    backends,
                    &mem,
                    interrupts.clone(),
                    &mut buses.pci.lock().expect("PCI lock poisoned"),
                    saved.map(|s| device_manager::Saved {
                        devices: &s.devices,
                        slots: &s.slots,
                    }),
                )
                .map_err(Error::Devices)
            })
            .map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                Error::Kvm("route MSIs", kvm_ioctls::Error::new(errno))
            })??;

        timer.mark("virtio devices");
        let cpus = config.cpus.boot_vcpus;
        let entry = match saved {
            Some(_) => None,
            None => {
                let tables = acpi::build(cpus, config.memory.size).map_err(Error::Acpi)?;
                tables.write(&mem).map_err(Error::Acpi)?;
                let map = memory::memory_map(config.memory.size);
                Some(
                    boot::load(&mem, &config.payload, &map, tables.rsdp_addr())
                        .map_err(Error::Boot)?,
                )
            }
        };

        if saved.is_none() {
            timer.mark("ACPI and payload");
        }
        let vcpus = match (saved, vcpus) {
            (Some(s), ShellVcpus::Parked { vcpus, .. }) => {
                // Each parked thread writes its own vCPU's state, in parallel.
                vcpus.restored().map_err(Error::Vcpu)?;
                timer.mark("vCPU state");
                state::restore_vm(&vm_fd, &s.kvm).map_err(|e| Error::State("restore", e))?;
                timer.mark("in-kernel device state");
                vcpus
            }
            (None, ShellVcpus::Created(fds)) => {
                let supported = kvm
                    .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| Error::Kvm("get supported CPUID", e))?;
                for (id, fd) in (0..cpus).zip(&fds) {
                    setup_vcpu(kvm, &supported, config, fd, id)?;
                    if let (0, Some(entry)) = (id, entry) {
                        regs::setup_boot_vcpu(fd, &mem, entry).map_err(|e| Error::Regs(id, e))?;
                    }
                }
                timer.mark("vCPU setup");
                let on = (&*vm_fd, &buses.pio, &buses.mmio, &mem);
                let vcpus = start_vcpus(kvm, on, fds, events, false)?;
                timer.mark("vCPU threads");
                vcpus
            }
            // A restore parked its threads above.
            (Some(_), ShellVcpus::Created(_)) | (None, ShellVcpus::Parked { .. }) => {
                return Err(Error::ParkedForBoot)
            }
        };
        Ok(Vm {
            vcpus,
            ged: buses.ged,
            serial: buses.serial,
            cmos: buses.cmos,
            pci: buses.pci,
            hotplug: buses.hotplug,
            interrupts,
            devices: Mutex::new(devices),
            memory: mem,
            vm_fd,
        })
    }

    /// The state of the paused VM: vCPUs, in-kernel devices, platform and virtio devices.
    pub fn state(&self) -> Result<VmState, Error> {
        let vcpus = self.vcpus.save_state().map_err(Error::Vcpu)?;
        let kvm = state::save_vm(&self.vm_fd).map_err(|e| Error::State("save", e))?;
        let mut devices = Vec::new();
        let mut slots = Vec::new();
        for d in self.devices().iter() {
            let s = d
                .device
                .lock()
                .expect("device lock poisoned")
                .state()
                .map_err(Error::NotPaused)?;
            devices.push((d.id.clone(), s));
            slots.push((d.id.clone(), d.slot));
        }
        Ok(VmState {
            vcpus,
            kvm,
            serial: self.serial.lock().expect("serial lock poisoned").state(),
            cmos: self.cmos.lock().expect("CMOS lock poisoned").state(),
            ged: self.ged.lock().expect("GED lock poisoned").pending(),
            devices,
            slots,
            hotplug: self
                .hotplug
                .lock()
                .expect("hot-plug lock poisoned")
                .pending(),
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Starts or stops recording which pages change: KVM logs the vCPUs' writes, each
    /// region's bitmap the devices'. Starting forgets what was recorded before.
    pub fn dirty_logging(&self, on: bool) -> Result<(), Error> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        set_memory_flags(&self.vm_fd, &self.memory, flags)?;
        for region in self.memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging started), as sorted
    /// guest-physical (address, length) ranges; clears the record.
    pub fn take_dirty(&self) -> Result<Vec<(u64, u64)>, Error> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| Error::Kvm("read the dirty log", e))?;
            let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let words = kvm.len().max(devices.len());
            let base = region.start_addr().0;
            for w in 0..words {
                let mut bits =
                    kvm.get(w).copied().unwrap_or(0) | devices.get(w).copied().unwrap_or(0);
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = w as u64 * 64 + bit;
                    let addr = base + page * PAGE_SIZE;
                    if addr >= base + region.len() {
                        break;
                    }
                    match ranges.last_mut() {
                        Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
                        _ => ranges.push((addr, PAGE_SIZE)),
                    }
                }
            }
        }
        Ok(ranges)
    }

    /// Stops every vCPU for good.
    pub fn stop(&self) {
        self.vcpus.stop();
    }

    /// Stops every vCPU, then every device, until [`Vm::resume`]; returns once no vCPU
    /// runs guest code and no device touches guest memory or its backend.
    pub fn pause(&self) {
        self.vcpus.pause();
        self.pause_devices();
    }

    /// [`Vm::pause`] before [`Vm::state`], marking the end of each of its steps on `timer`:
    /// each vCPU thread reads its vCPU's state while the devices are paused. A device
    /// interrupt in between is then in no vCPU's saved state, but every queue gets one
    /// interrupt when its device resumes ([`devices::virtio::transport`]).
    pub fn pause_for_state(&self, timer: &mut Timeline) {
        self.vcpus.pause_and_save();
        timer.mark("pause vCPUs");
        self.pause_devices();
        timer.mark("pause devices");
    }

    fn pause_devices(&self) {
        for d in self.devices().iter() {
            d.device.lock().expect("device lock poisoned").pause();
        }
    }

    /// Stops (true) or restarts (false) the vCPUs alone, the devices running on: how
    /// pre-copy's auto-converge slows a guest down.
    pub fn throttle_vcpus(&self, stopped: bool) {
        if stopped {
            self.vcpus.pause();
        } else {
            self.vcpus.resume();
        }
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> std::io::Result<()> {
        self.ged
            .lock()
            .expect("GED lock poisoned")
            .notify(devices::acpi::GED_EVENT_POWER_BUTTON)
    }

    /// Each device's counters, by device id.
    pub fn counters(&self) -> Vec<(String, Vec<(String, u64)>)> {
        self.devices()
            .iter()
            .map(|d| {
                let device = d.device.lock().expect("device lock poisoned");
                (d.id.clone(), device.device().counters())
            })
            .filter(|(_, c)| !c.is_empty())
            .collect()
    }

    /// Restarts the devices, then the vCPUs, after [`Vm::pause`] (or a restore).
    pub fn resume(&self) {
        self.resume_devices();
        self.resume_vcpus();
    }

    /// The first half of [`Vm::resume`]: restarts the devices, the vCPUs staying paused
    /// until [`Vm::resume_vcpus`].
    pub fn resume_devices(&self) {
        for d in self.devices().iter() {
            d.device.lock().expect("device lock poisoned").resume();
        }
    }

    /// The second half of [`Vm::resume`]: lets the vCPUs run.
    pub fn resume_vcpus(&self) {
        self.vcpus.resume();
    }

    /// Asks network drivers that can to announce the guest where it now runs.
    pub fn announce(&self) {
        for d in self.devices().iter() {
            d.device.lock().expect("device lock poisoned").announce();
        }
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Vec<PciDeviceHandle>> {
        self.devices.lock().expect("device list lock poisoned")
    }

    /// Hot-plugs device `id` of `config` (its backend already in `backends`) and tells the
    /// guest through the GED; returns its slot.
    pub fn add_device(
        &self,
        id: &str,
        config: &VmConfig,
        backends: &Backends,
    ) -> Result<u8, Error> {
        let handle = device_manager::hot_add(
            id,
            config,
            backends,
            &self.memory,
            self.interrupts.clone(),
            &mut self.pci.lock().expect("PCI lock poisoned"),
        )
        .map_err(Error::Devices)?;
        let slot = handle.slot;
        self.devices().push(handle);
        self.hotplug
            .lock()
            .expect("hot-plug lock poisoned")
            .arrived(slot);
        self.notify_hotplug();
        Ok(slot)
    }

    /// Asks the guest to let go of device `id`: it ejects it when its driver has stopped,
    /// and [`Vm::take_ejected`] then names it. False if no such device is on PCI.
    pub fn request_removal(&self, id: &str) -> bool {
        let Some(slot) = self.devices().iter().find(|d| d.id == id).map(|d| d.slot) else {
            return false;
        };
        self.hotplug
            .lock()
            .expect("hot-plug lock poisoned")
            .request_removal(slot);
        self.notify_hotplug();
        true
    }

    fn notify_hotplug(&self) {
        let raised = self
            .ged
            .lock()
            .expect("GED lock poisoned")
            .notify(devices::acpi::GED_EVENT_PCI_HOTPLUG);
        if let Err(e) = raised {
            log::warn!("cannot interrupt the guest about PCI hot-plug: {e}");
        }
    }

    /// The devices the guest ejected since the last call, by id: they are off the bus and
    /// stopped now, their notifications and interrupts given back.
    pub fn take_ejected(&self) -> Vec<String> {
        let ejected = self
            .hotplug
            .lock()
            .expect("hot-plug lock poisoned")
            .take_ejected();
        // By the function, not the slot: a device hot-plugged since may sit there already.
        let is = |d: &PciDeviceHandle, f: &devices::pci::hotplug::Ejected| {
            std::ptr::addr_eq(Arc::as_ptr(&d.device), Arc::as_ptr(&f.1))
        };
        let mut devices = self.devices();
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *devices)
            .into_iter()
            .partition(|d| ejected.iter().any(|f| is(d, f)));
        *devices = kept;
        drop(devices);
        // Dropping the handles stops the devices.
        gone.into_iter().map(|d| d.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_state() -> VmState {
        let cmos = devices::legacy::Cmos::default().state();
        let serial = devices::legacy::Serial::new(
            devices::Trigger::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")),
            Box::new(std::io::sink()),
        )
        .state();
        VmState {
            vcpus: vec![crate::state::tests::vcpu_state()],
            kvm: KvmVmState {
                irqchips: Vec::new(),
                pit: Default::default(),
                clock: Default::default(),
            },
            serial,
            cmos,
            ged: 2,
            devices: Vec::new(),
            slots: vec![("rng0".into(), 3)],
            hotplug: (1 << 3, 0),
        }
    }

    #[test]
    fn vm_state_round_trips_and_a_state_saved_before_hot_plug_still_loads() {
        let state = vm_state();
        let bytes = ::migration::snapshot::encode(&state).expect("encodes");
        let back: VmState = ::migration::snapshot::decode(&bytes).expect("decodes");
        assert_eq!(
            serde_json::to_value(&back).expect("serialises"),
            serde_json::to_value(&state).expect("serialises")
        );
        assert_eq!((back.ged, back.hotplug), (2, (1 << 3, 0)));

        let mut older = serde_json::to_value(&state).expect("serialises");
        let fields = older.as_object_mut().expect("an object");
        fields.remove("slots");
        fields.remove("hotplug");
        let older: VmState = serde_json::from_value(older).expect("loads");
        assert!(older.slots.is_empty());
        assert_eq!(older.hotplug, (0, 0));
    }
}
