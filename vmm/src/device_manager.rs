//! Device backends and the virtio PCI devices built on them.
//!
//! [`Backends`] are opened once, when the VM is created: TAP queues and disk images. They
//! outlive each run of the guest, so a reboot rebuilds the devices on the same TAP (a TAP
//! baton created would vanish, with whatever the host set on it, if its last queue closed)
//! and the same open image. [`create`] builds the PCI functions for one run.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::{MacAddr, NetConfig, VmConfig};
use devices::pci::PciBus;
use devices::virtio::block::{Block, BlockParams, BlockState};
use devices::virtio::net::{Net, NetParams, NetState};
use devices::virtio::pci::BAR_SIZE;
use devices::virtio::rng::{Rng, RngState};
use devices::virtio::transport::TransportState;
use devices::virtio::{DeviceState, GuestMemory, VirtioDevice, VirtioPciDevice, VmOps};
use devices::Versioned;
use net_util::{Tap, TapQueues};

use crate::layout::{mem_64bit_devices_start, MEM_64BIT_DEVICES_SIZE};

/// Errors opening backends or building devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TAP could not be opened or set up.
    #[error("Network card '{0}'")]
    Tap(String, #[source] net_util::tap::Error),
    /// A disk image could not be opened.
    #[error("Disk '{0}': cannot open {1}")]
    DiskOpen(String, PathBuf, #[source] std::io::Error),
    /// A disk image is not a regular file or block device.
    #[error("Disk '{0}': {1} is not a regular file or a block device")]
    DiskKind(String, PathBuf),
    /// A device could not be created.
    #[error("Device '{0}'")]
    Device(String, #[source] std::io::Error),
    /// No room for another BAR.
    #[error("No PCI address space left for device '{0}'")]
    BarSpace(String),
    /// A PCI function could not be created or placed.
    #[error("Device '{0}': cannot put it on PCI")]
    Pci(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// Fewer TAP descriptors came than the network cards without a TAP name need.
    #[error("Network card '{id}' needs {need} TAP descriptor(s) (one per queue pair); {left} left of those passed")]
    TooFewFds {
        /// The card.
        id: String,
        /// Descriptors it needs.
        need: usize,
        /// Descriptors left.
        left: usize,
    },
    /// The saved state has no entry for a configured device.
    #[error("Device '{0}': the saved state has no such device")]
    NotSaved(String),
    /// The saved state has another number of devices than the configuration.
    #[error("{saved} devices saved, {configured} configured")]
    DeviceCount {
        /// Devices in the state.
        saved: usize,
        /// Devices configured.
        configured: usize,
    },
    /// A device's saved state is of another kind.
    #[error("Device '{id}': its saved state is a {saved} state, not a {wanted} one")]
    StateKind {
        /// The device.
        id: String,
        /// The kind saved.
        saved: &'static str,
        /// The kind configured.
        wanted: &'static str,
    },
    /// A device's saved state does not fit it.
    #[error("Device '{0}': the saved state does not fit")]
    State(String, #[source] devices::StateError),
    /// A disk could not be built.
    #[error("Disk '{0}'")]
    Disk(String, #[source] devices::virtio::block::Error),
    /// A network card's saved state uses other queue pairs than its transferred TAP has.
    #[error("Network card '{id}': the device uses {active} queue pair(s), but its transferred TAP has {attached} attached")]
    TransferredPairs {
        /// The card.
        id: String,
        /// Queue pairs the saved device uses.
        active: usize,
        /// Queues attached on the TAP.
        attached: usize,
    },
    /// No configured device has this id.
    #[error("Device '{0}' is not configured")]
    NotConfigured(String),
    /// A network card's transferred backend never came.
    #[error("Device '{0}': its transferred backend never came")]
    NoBackend(String),
    /// More TAP descriptors came than any network card takes.
    #[error("{0} TAP descriptor(s) passed but not used: only network cards without a tap name take descriptors, one per queue pair")]
    UnusedFds(usize),
}

impl Error {
    /// The saved state does not fit the configured devices (see
    /// [`crate::vm::Error::is_bad_state`]).
    pub fn is_bad_state(&self) -> bool {
        matches!(
            self,
            Error::NotSaved(_)
                | Error::DeviceCount { .. }
                | Error::StateKind { .. }
                | Error::State(..)
                | Error::TransferredPairs { .. }
                | Error::Disk(_, devices::virtio::block::Error::State(_))
        )
    }
}

/// A network card's open TAP queues; `None` while a migration's backend transfer has yet to
/// deliver them.
pub struct NetBackend {
    config: NetConfig,
    taps: Option<Arc<TapQueues>>,
    /// The queues came from a migration's source, which shared them as they were.
    transferred: bool,
}

impl NetBackend {
    /// Queue pairs configured: one TAP queue each.
    pub fn queue_pairs(&self) -> usize {
        self.config.queue_pairs()
    }

    /// Runs the card on TAP queues a migration's source handed over.
    pub fn install_transferred(&mut self, taps: TapQueues) {
        self.config.tap = Some(taps.name().to_string());
        self.taps = Some(Arc::new(taps));
        self.transferred = true;
    }
}

/// A disk's open image; `None` while a migration's backend transfer has yet to deliver it.
pub struct DiskBackend {
    config: api::DiskConfig,
    file: Option<File>,
}

impl DiskBackend {
    /// The disk's configuration.
    pub fn config(&self) -> &api::DiskConfig {
        &self.config
    }

    /// Runs the disk on the image a migration's source handed over.
    pub fn install_transferred(&mut self, file: File) {
        self.file = Some(file);
    }
}

/// What the VM's devices run on, kept from creation to deletion.
#[derive(Default)]
pub struct Backends {
    nets: Vec<NetBackend>,
    disks: Vec<DiskBackend>,
}

/// A network card on TAP descriptors a caller passed.
fn net_from_fds(config: &mut NetConfig, fds: Vec<OwnedFd>) -> Result<NetBackend, Error> {
    let id = config.id.clone().unwrap_or_default();
    let err = |e| Error::Tap(id.clone(), e);
    let taps = TapQueues::new(Tap::from_fds(fds).map_err(err)?).map_err(err)?;
    config.tap = Some(taps.name().to_string());
    Ok(NetBackend {
        config: config.clone(),
        taps: Some(Arc::new(taps)),
        transferred: false,
    })
}

fn open_net(config: &mut NetConfig) -> Result<NetBackend, Error> {
    let id = config.id.clone().unwrap_or_default();
    let err = |e| Error::Tap(id.clone(), e);
    let existed = config.tap.as_deref().is_some_and(net_util::tap::exists);
    // The kernel picks a free name for "baton%d".
    let name = config.tap.clone().unwrap_or_else(|| "baton%d".into());
    let taps = Tap::open_queues(&name, config.queue_pairs()).map_err(err)?;
    let first = &taps[0];
    if existed {
        if config.ip.is_some() || config.mask.is_some() || config.host_mac.is_some() {
            log::info!(
                "{id}: TAP '{}' already exists: its address and MAC are left as they are",
                first.name()
            );
        }
    } else {
        if let Some(mac) = config.host_mac {
            first.set_mac(mac.0).map_err(err)?;
        }
        if let Some(mtu) = config.mtu {
            first.set_mtu(mtu).map_err(err)?;
        }
        if let Some(ip) = config.ip {
            let mask = config.mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            first.set_ipv4(ip, mask).map_err(err)?;
        }
        first.set_up().map_err(err)?;
    }
    config.tap = Some(first.name().to_string());
    Ok(NetBackend {
        config: config.clone(),
        taps: Some(Arc::new(TapQueues::new(taps).map_err(err)?)),
        transferred: false,
    })
}

fn open_disk(config: &api::DiskConfig) -> Result<DiskBackend, Error> {
    let id = config.id.clone().unwrap_or_default();
    let mut options = OpenOptions::new();
    options.read(true).write(!config.readonly);
    let mut flags = libc::O_CLOEXEC;
    if config.direct {
        flags |= libc::O_DIRECT;
    }
    options.custom_flags(flags);
    let file = options
        .open(&config.path)
        .map_err(|e| Error::DiskOpen(id.clone(), config.path.clone(), e))?;
    let kind = file
        .metadata()
        .map_err(|e| Error::DiskOpen(id.clone(), config.path.clone(), e))?
        .file_type();
    use std::os::unix::fs::FileTypeExt;
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Error::DiskKind(id, config.path.clone()));
    }
    Ok(DiskBackend {
        config: config.clone(),
        file: Some(file),
    })
}

impl Backends {
    /// Opens every backend `config` names. Network cards without a TAP name take their TAP
    /// queues from `fds` in order, one per queue pair, while any are left. Fills in what the
    /// host decided: random MACs, and the names of the TAPs.
    pub fn open(config: &mut VmConfig, fds: Vec<OwnedFd>) -> Result<Self, Error> {
        Self::open_except(config, fds, &[])
    }

    /// [`Backends::open`], except for the network cards and disks in `transferred`: they
    /// open nothing and wait for [`crate::migration::backend::take_over`] to hand them the
    /// backend a migration's source sends.
    pub fn open_except(
        config: &mut VmConfig,
        fds: Vec<OwnedFd>,
        transferred: &[String],
    ) -> Result<Self, Error> {
        let mut backends = Backends::default();
        let mut fds = fds.into_iter();
        let passed = fds.len() > 0;
        for net in &mut config.net {
            if net.id.as_ref().is_some_and(|id| transferred.contains(id)) {
                backends.nets.push(NetBackend {
                    config: net.clone(),
                    taps: None,
                    transferred: false,
                });
                continue;
            }
            let taken: Vec<OwnedFd> = if net.tap.is_none() && passed {
                let need = net.queue_pairs();
                let taken: Vec<OwnedFd> = fds.by_ref().take(need).collect();
                if taken.len() < need {
                    return Err(Error::TooFewFds {
                        id: net.id.clone().unwrap_or_default(),
                        need,
                        left: taken.len(),
                    });
                }
                taken
            } else {
                Vec::new()
            };
            backends.nets.push(Self::net(net, taken)?);
        }
        if fds.len() > 0 {
            return Err(Error::UnusedFds(fds.len()));
        }
        for disk in &config.disks {
            if disk.id.as_ref().is_some_and(|id| transferred.contains(id)) {
                backends.disks.push(DiskBackend {
                    config: disk.clone(),
                    file: None,
                });
                continue;
            }
            backends.disks.push(open_disk(disk)?);
        }
        Ok(backends)
    }

    fn net(config: &mut NetConfig, fds: Vec<OwnedFd>) -> Result<NetBackend, Error> {
        if config.mac.is_none() {
            config.mac = Some(MacAddr::random());
        }
        if fds.is_empty() {
            open_net(config)
        } else {
            net_from_fds(config, fds)
        }
    }

    /// Network card `id` if it waits for the backend a migration's source hands over
    /// ([`crate::migration::backend::take_over`]).
    pub fn waiting_net(&mut self, id: &str) -> Option<&mut NetBackend> {
        self.nets
            .iter_mut()
            .find(|n| n.config.id.as_deref() == Some(id) && n.taps.is_none())
    }

    /// Disk `id` if it waits for the image a migration's source hands over
    /// ([`crate::migration::backend::take_over`]).
    pub fn waiting_disk(&mut self, id: &str) -> Option<&mut DiskBackend> {
        self.disks
            .iter_mut()
            .find(|d| d.config.id.as_deref() == Some(id) && d.file.is_none())
    }

    /// Each disk's configuration and open image (none while a transferred image has yet to
    /// come).
    pub fn disks(&self) -> impl Iterator<Item = (&api::DiskConfig, Option<&File>)> {
        self.disks.iter().map(|d| (&d.config, d.file.as_ref()))
    }

    /// Each network card's configuration and TAP queues (none while a transferred backend
    /// has yet to come).
    pub fn nets(&self) -> impl Iterator<Item = (&NetConfig, Option<&Arc<TapQueues>>)> {
        self.nets.iter().map(|n| (&n.config, n.taps.as_ref()))
    }

    /// Whether a network card or disk has the id `id`.
    pub fn has_device(&self, id: &str) -> bool {
        self.nets.iter().any(|n| n.config.id.as_deref() == Some(id))
            || self
                .disks
                .iter()
                .any(|d| d.config.id.as_deref() == Some(id))
    }

    /// The network configurations as the backends filled them in (TAP names included).
    pub fn net_configs(&self) -> impl Iterator<Item = &NetConfig> {
        self.nets.iter().map(|n| &n.config)
    }

    /// Opens one more disk's image (vm.add-disk).
    pub fn add_disk(&mut self, config: &api::DiskConfig) -> Result<(), Error> {
        self.disks.push(open_disk(config)?);
        Ok(())
    }

    /// Closes the backend of network card or disk `id` (vm.remove-device); false if there
    /// is none.
    pub fn remove(&mut self, id: &str) -> bool {
        let (nets, disks) = (self.nets.len(), self.disks.len());
        self.nets.retain(|n| n.config.id.as_deref() != Some(id));
        self.disks.retain(|d| d.config.id.as_deref() != Some(id));
        nets != self.nets.len() || disks != self.disks.len()
    }

    /// Opens one more network card (vm.add-net): on `fds` if any came, else by TAP name.
    pub fn add_net(&mut self, config: &mut NetConfig, fds: Vec<OwnedFd>) -> Result<(), Error> {
        if !fds.is_empty() && fds.len() != config.queue_pairs() {
            return Err(Error::TooFewFds {
                id: config.id.clone().unwrap_or_default(),
                need: config.queue_pairs(),
                left: fds.len(),
            });
        }
        if !fds.is_empty() && config.tap.is_some() {
            // The descriptors name their interface; a second name could only disagree.
            return Err(Error::UnusedFds(fds.len()));
        }
        self.nets.push(Self::net(config, fds)?);
        Ok(())
    }
}

/// A device on PCI: its id, its slot on bus 0 and the function.
pub struct PciDeviceHandle {
    /// The device's id.
    pub id: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// The virtio PCI function.
    pub device: Arc<Mutex<VirtioPciDevice>>,
}

/// Where a VM's devices start from: power-on, or the state a snapshot or migration saved.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    /// Each device's transport state, by id.
    pub devices: &'a [(String, TransportState)],
    /// Each device's slot, by id (empty in states saved before hot-plug: then devices take
    /// slots in configuration order, as they did then).
    pub slots: &'a [(String, u8)],
}

impl<'a> Saved<'a> {
    fn state(self, id: &str) -> Result<&'a TransportState, Error> {
        self.devices
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, s)| s)
            .ok_or_else(|| Error::NotSaved(id.into()))
    }

    fn slot(self, id: &str) -> Option<u8> {
        self.slots.iter().find(|(i, _)| i == id).map(|(_, s)| *s)
    }
}

/// The virtio device of network card `net`, at power-on or as `saved` left it.
fn net_device(
    net: &NetBackend,
    saved: Option<&DeviceState>,
) -> Result<Box<dyn VirtioDevice>, Error> {
    let c = &net.config;
    let params = NetParams {
        mac: c.mac.expect("filled in by Backends::open").0,
        mtu: c.mtu,
        queue_size: c.queue_size,
        offload_csum: c.offload_csum,
        offload_tso: c.offload_tso,
        offload_ufo: c.offload_ufo,
    };
    let id = c.id.clone().unwrap_or_default();
    let taps = net
        .taps
        .clone()
        .ok_or_else(|| Error::NoBackend(id.clone()))?;
    let Some(saved) = saved else {
        return Ok(Box::new(Net::new(params, taps)));
    };
    let DeviceState::Net(state) = saved else {
        return Err(wrong_kind(id, saved, NetState::KIND));
    };
    if net.transferred && state.active_pairs != taps.active_pairs() {
        // The device would attach or detach queues the source shares: refuse instead.
        return Err(Error::TransferredPairs {
            id,
            active: state.active_pairs,
            attached: taps.active_pairs(),
        });
    }
    let net = Net::restore(params, taps, state.clone()).map_err(|e| Error::State(id, e))?;
    Ok(Box::new(net))
}

fn wrong_kind(id: String, saved: &DeviceState, wanted: &'static str) -> Error {
    Error::StateKind {
        id,
        saved: saved.kind(),
        wanted,
    }
}

/// The virtio device of `disk`, at power-on or as `saved` left it.
fn disk_device(
    disk: &DiskBackend,
    saved: Option<&DeviceState>,
) -> Result<Box<dyn VirtioDevice>, Error> {
    let id = disk.config.id.clone().unwrap_or_default();
    let file = disk
        .file
        .as_ref()
        .ok_or_else(|| Error::NoBackend(id.clone()))?
        .try_clone()
        .map_err(|e| Error::Device(id.clone(), e))?;
    let params = BlockParams {
        file,
        readonly: disk.config.readonly,
        direct: disk.config.direct,
        serial: id.clone(),
    };
    let block = match saved {
        None => Block::new(params),
        Some(DeviceState::Block(state)) => Block::restore(params, state.clone()),
        Some(other) => return Err(wrong_kind(id, other, BlockState::KIND)),
    };
    Ok(Box::new(block.map_err(|e| Error::Disk(id, e))?))
}

/// The entropy device `id`, at power-on or as `saved` left it.
fn rng_device(id: &str, saved: Option<&DeviceState>) -> Result<Box<dyn VirtioDevice>, Error> {
    match saved {
        None => Ok(Box::new(Rng::new())),
        Some(DeviceState::Rng(state)) => Ok(Box::new(
            Rng::restore(state.clone()).map_err(|e| Error::State(id.into(), e))?,
        )),
        Some(other) => Err(wrong_kind(id.into(), other, RngState::KIND)),
    }
}

/// Every device of `config` on `backends`, by id, in configuration order.
fn devices_of<'a>(
    config: &'a VmConfig,
    backends: &'a Backends,
) -> impl Iterator<Item = (String, DeviceOf<'a>)> {
    let id = |i: &Option<String>| i.clone().unwrap_or_default();
    let nets = backends
        .nets
        .iter()
        .map(move |n| (id(&n.config.id), DeviceOf::Net(n)));
    let disks = backends
        .disks
        .iter()
        .map(move |d| (id(&d.config.id), DeviceOf::Disk(d)));
    let rng = config.rng.iter().map(move |r| (id(&r.id), DeviceOf::Rng));
    nets.chain(disks).chain(rng)
}

/// What a device is built on.
enum DeviceOf<'a> {
    Net(&'a NetBackend),
    Disk(&'a DiskBackend),
    Rng,
}

impl DeviceOf<'_> {
    /// Device `id` on this, at power-on or as `saved` left it.
    fn build(
        &self,
        id: &str,
        saved: Option<&TransportState>,
    ) -> Result<Box<dyn VirtioDevice>, Error> {
        let saved = saved.map(|s| &s.device);
        match self {
            DeviceOf::Net(net) => net_device(net, saved),
            DeviceOf::Disk(disk) => disk_device(disk, saved),
            DeviceOf::Rng => rng_device(id, saved),
        }
    }
}

/// Where devices go: the VM's memory and hypervisor operations, its PCI bus, and the start
/// of the 64-bit window for new BARs.
struct Target<'a> {
    mem: &'a GuestMemory,
    vm: Arc<dyn VmOps>,
    pci: &'a mut PciBus,
    bar_window: u64,
}

impl<'a> Target<'a> {
    fn new(
        config: &VmConfig,
        mem: &'a GuestMemory,
        vm: Arc<dyn VmOps>,
        pci: &'a mut PciBus,
    ) -> Self {
        Target {
            mem,
            vm,
            pci,
            bar_window: mem_64bit_devices_start(config.memory.size),
        }
    }
}

/// Puts `device` on the bus as `id`: in slot `slot` (or the first free one), with BAR 0 in
/// the first free place of the 64-bit device window, or as `saved` describes the function.
fn place(
    id: String,
    device: Box<dyn VirtioDevice>,
    saved: Option<&TransportState>,
    slot: Option<u8>,
    to: &mut Target<'_>,
) -> Result<PciDeviceHandle, Error> {
    let (mem, vm, pci) = (to.mem, &to.vm, &mut *to.pci);
    let function = match saved {
        None => {
            let addr = pci
                .free_range(to.bar_window, MEM_64BIT_DEVICES_SIZE, BAR_SIZE)
                .ok_or_else(|| Error::BarSpace(id.clone()))?;
            VirtioPciDevice::new(id.clone(), device, addr, mem.clone(), vm.clone())
        }
        Some(s) => VirtioPciDevice::restore(id.clone(), device, s.clone(), mem.clone(), vm.clone()),
    }
    .map_err(|e| Error::Pci(id.clone(), Box::new(e)))?;
    let bar = function.bar();
    let function = Arc::new(Mutex::new(function));
    let slot = pci
        .add(function.clone(), function.clone(), bar, slot)
        .map_err(|e| Error::Pci(id.clone(), Box::new(e)))?;
    log::debug!("{id}: PCI 00:{slot:02x}.0, BAR 0 at {:#x}", bar.addr);
    Ok(PciDeviceHandle {
        id,
        slot,
        device: function,
    })
}

/// The order devices go on the bus, each with its saved slot: devices whose slot was saved
/// first (a stable sort), so none takes another's slot; the others after them, in
/// configuration order, in the first free slots.
fn placement_order<T>(
    devices: Vec<(String, T)>,
    saved: Option<Saved<'_>>,
) -> Vec<(String, T, Option<u8>)> {
    let mut order: Vec<_> = devices
        .into_iter()
        .map(|(id, of)| {
            let slot = saved.and_then(|s| s.slot(&id));
            (id, of, slot)
        })
        .collect();
    order.sort_by_key(|(_, _, slot)| slot.is_none());
    order
}

/// The most worker threads `config`'s devices run: one per network queue pair, one per
/// disk and one for the entropy device.
pub fn most_workers(config: &VmConfig) -> usize {
    let pairs: usize = config.net.iter().map(NetConfig::queue_pairs).sum();
    pairs + config.disks.len() + usize::from(config.rng.is_some())
}

/// Builds the virtio devices of `config` on `backends` and puts them on `pci`: at power-on,
/// or as `saved` describes them (same devices, same slots).
pub fn create(
    config: &VmConfig,
    backends: &Backends,
    mem: &GuestMemory,
    vm: Arc<dyn VmOps>,
    pci: &mut PciBus,
    saved: Option<Saved<'_>>,
) -> Result<Vec<PciDeviceHandle>, Error> {
    let all: Vec<_> = devices_of(config, backends).collect();
    if let Some(saved) = saved {
        if saved.devices.len() != all.len() {
            return Err(Error::DeviceCount {
                saved: saved.devices.len(),
                configured: all.len(),
            });
        }
    }
    let mut to = Target::new(config, mem, vm, pci);
    let mut handles = Vec::new();
    for (id, of, slot) in placement_order(all, saved) {
        let state = saved.map(|s| s.state(&id)).transpose()?;
        let device = of.build(&id, state)?;
        handles.push(place(id, device, state, slot, &mut to)?);
    }
    Ok(handles)
}

/// Builds device `id` of `config` on `backends` and puts it on `pci` while the VM runs.
pub fn hot_add(
    id: &str,
    config: &VmConfig,
    backends: &Backends,
    mem: &GuestMemory,
    vm: Arc<dyn VmOps>,
    pci: &mut PciBus,
) -> Result<PciDeviceHandle, Error> {
    let (id, of) = devices_of(config, backends)
        .find(|(i, _)| i == id)
        .ok_or_else(|| Error::NotConfigured(id.into()))?;
    let device = of.build(&id, None)?;
    place(
        id,
        device,
        None,
        None,
        &mut Target::new(config, mem, vm, pci),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::block::BlockState;

    #[test]
    fn devices_with_saved_slots_go_first_and_the_rest_keep_their_order() {
        let devices = ["net0", "disk0", "disk1", "rng0"]
            .map(|id| (id.to_string(), ()))
            .to_vec();
        let ids = |order: Vec<(String, (), Option<u8>)>| {
            order
                .into_iter()
                .map(|(id, _, slot)| (id, slot))
                .collect::<Vec<_>>()
        };
        let at_power_on = ids(placement_order(devices.clone(), None));
        assert_eq!(
            at_power_on,
            [
                ("net0", None),
                ("disk0", None),
                ("disk1", None),
                ("rng0", None)
            ]
            .map(|(i, s)| (i.to_string(), s))
        );
        let slots = [("rng0".to_string(), 1), ("disk1".to_string(), 4)];
        let saved = Saved {
            devices: &[],
            slots: &slots,
        };
        assert_eq!(
            ids(placement_order(devices, Some(saved))),
            [
                ("disk1", Some(4)),
                ("rng0", Some(1)),
                ("net0", None),
                ("disk0", None)
            ]
            .map(|(i, s)| (i.to_string(), s))
        );
    }

    #[test]
    fn a_saved_state_must_be_of_the_device_s_kind_and_version() {
        let block = DeviceState::Block(BlockState {
            version: 1,
            sectors: 8,
        });
        let e = rng_device("rng0", Some(&block))
            .err()
            .expect("another kind");
        assert_eq!(
            e.to_string(),
            "Device 'rng0': its saved state is a virtio-blk state, not a virtio-rng one"
        );
        assert!(e.is_bad_state());
        let newer = DeviceState::Rng(RngState { version: 2 });
        let e = rng_device("rng0", Some(&newer))
            .err()
            .expect("another version");
        assert_eq!(
            devices::error_chain(&e),
            "Device 'rng0': the saved state does not fit: virtio-rng state version 2 is not supported (this baton reads version 1)"
        );
        assert!(e.is_bad_state());
        rng_device("rng0", Some(&DeviceState::Rng(RngState { version: 1 }))).expect("fits");
        rng_device("rng0", None).expect("power-on");
    }

    #[test]
    fn a_card_waiting_for_its_backend_cannot_be_built_and_unknown_ids_are_named() {
        let mut config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "net": [{"id": "net0", "mac": "52:54:00:00:00:01"}],
        }))
        .expect("a configuration");
        let backends =
            Backends::open_except(&mut config, Vec::new(), &["net0".into()]).expect("waits");
        let (_, net) = devices_of(&config, &backends).next().expect("the card");
        let e = net.build("net0", None).err().expect("no backend yet");
        assert_eq!(
            e.to_string(),
            "Device 'net0': its transferred backend never came"
        );
        let saved = Saved {
            devices: &[],
            slots: &[],
        };
        let e = saved.state("net0").expect_err("not saved");
        assert_eq!(
            e.to_string(),
            "Device 'net0': the saved state has no such device"
        );
        assert!(e.is_bad_state());
    }
}
