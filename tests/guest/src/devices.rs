//! The guest's virtio devices: found on PCI bus 0 through the ECAM window that
//! the MCFG names, and driven by the `virtio-drivers` crate, by polling.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use baton_test_guest::protocol;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::bus::{
    Cam, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;

use crate::hal::IdentityHal;
use crate::hotplug::HotplugRegs;
use crate::net::Nic;
use crate::serial::emit;

/// Block devices driven here.
pub type Disk = VirtIOBlk<IdentityHal, PciTransport>;
/// Entropy devices driven here.
pub type Rng = VirtIORng<IdentityHal, PciTransport>;

/// What was found.
#[derive(Default)]
pub struct Devices {
    /// The PCI bus, kept for the `chaos` command.
    pub root: Option<PciRoot<MmioCam<'static>>>,
    /// A second handle on the same window, for MSI-X set-up.
    cam2: Option<MmioCam<'static>>,
    /// How devices are started, for those that arrive later.
    setup: Option<Setup>,
    /// Where the entropy device is.
    pub rng_at: Option<DeviceFunction>,
    /// Network cards, in PCI order (hot-plugged ones last).
    pub nics: Vec<Nic>,
    /// Where each card is.
    nic_at: Vec<DeviceFunction>,
    /// The first disk.
    pub disk: Option<Disk>,
    /// Where it is.
    disk_at: Option<DeviceFunction>,
    /// The first entropy device.
    pub rng: Option<Rng>,
}

/// The command line's device settings.
struct Setup {
    addresses: Vec<Option<baton_test_guest::cmdline::Cidr>>,
    services: baton_test_guest::cmdline::Services,
    interrupts: bool,
    net_tuning: baton_test_guest::cmdline::NetTuning,
}

/// Enumerates bus 0 and starts a driver for each virtio device on it.
pub fn probe(
    ecam: u64,
    addresses: &[Option<baton_test_guest::cmdline::Cidr>],
    services: baton_test_guest::cmdline::Services,
    interrupts: bool,
    net_tuning: baton_test_guest::cmdline::NetTuning,
) -> Devices {
    // SAFETY: the MCFG names this identity-mapped window for bus 0 onwards;
    // only bus 0 (the first 1 MiB) is ever touched, and nothing else in the
    // guest uses it.
    let cam = unsafe { MmioCam::new(ecam as *mut u8, Cam::Ecam) };
    // SAFETY: the copy is used only between uses of `root`, never at the same time (one CPU,
    // no interrupts touching PCI), for the MSI-X capability `PciRoot` does not expose.
    let cam2 = unsafe { cam.unsafe_clone() };
    let root = PciRoot::new(cam);
    if interrupts {
        crate::irq::enable();
    }
    let functions: Vec<_> = root.enumerate_bus(0).collect();
    let mut found = Devices {
        root: Some(root),
        cam2: Some(cam2),
        setup: Some(Setup {
            addresses: addresses.to_vec(),
            services,
            interrupts,
            net_tuning,
        }),
        ..Devices::default()
    };
    for (df, info) in functions {
        found.start(df, &info);
    }
    found
}

impl Devices {
    /// Starts a driver for the function at `df`, if it is a virtio device this guest
    /// drives and has none of yet; returns what it started.
    fn start(&mut self, df: DeviceFunction, info: &DeviceFunctionInfo) -> Option<&'static str> {
        let kind = virtio_device_type(info)?;
        let (Some(root), Some(cam2), Some(setup)) =
            (self.root.as_mut(), self.cam2.as_mut(), self.setup.as_ref())
        else {
            return None;
        };
        match kind {
            DeviceType::Network | DeviceType::Block | DeviceType::EntropySource => {}
            _ => return None,
        }
        if (kind == DeviceType::Block && self.disk.is_some())
            || (kind == DeviceType::EntropySource && self.rng.is_some())
        {
            return None;
        }
        root.set_command(df, Command::MEMORY_SPACE | Command::BUS_MASTER);
        let msix = if setup.interrupts && kind == DeviceType::Network {
            let m = crate::irq::setup(root, cam2, df);
            if m.is_none() {
                emit(|w| protocol::warning(w, "pci", &format_args!("{df}: no MSI-X")));
            }
            m
        } else {
            None
        };
        let transport = match PciTransport::new::<IdentityHal, _>(root, df) {
            Ok(t) => t,
            Err(e) => {
                emit(|w| protocol::warning(w, "pci", &format_args!("{df}: {e}")));
                return None;
            }
        };
        match kind {
            DeviceType::Network => {
                let address = setup.addresses.get(self.nics.len()).copied().flatten();
                match Nic::new(transport, address, setup.services, msix, setup.net_tuning) {
                    Ok(nic) => {
                        self.nics.push(nic);
                        self.nic_at.push(df);
                        Some("net")
                    }
                    Err(e) => {
                        emit(|w| protocol::warning(w, "net", &e));
                        None
                    }
                }
            }
            DeviceType::Block => match Disk::new(transport) {
                Ok(d) => {
                    self.disk = Some(d);
                    self.disk_at = Some(df);
                    Some("disk")
                }
                Err(e) => {
                    emit(|w| protocol::warning(w, "disk", &e));
                    None
                }
            },
            _ => match Rng::new(transport) {
                Ok(r) => {
                    self.rng = Some(r);
                    self.rng_at = Some(df);
                    Some("rng")
                }
                Err(e) => {
                    emit(|w| protocol::warning(w, "rng", &e));
                    None
                }
            },
        }
    }

    /// Stops the driver of the device in `slot` of bus 0, if there is one (dropping the
    /// transport resets the device); returns what it was.
    fn stop(&mut self, slot: u8) -> Option<&'static str> {
        let here = |df: &DeviceFunction| df.bus == 0 && df.device == slot;
        if self.disk_at.as_ref().is_some_and(here) {
            self.disk = None;
            self.disk_at = None;
            return Some("disk");
        }
        if self.rng_at.as_ref().is_some_and(here) {
            self.rng = None;
            self.rng_at = None;
            return Some("rng");
        }
        let i = self.nic_at.iter().position(here)?;
        self.nic_at.remove(i);
        self.nics.remove(i);
        Some("net")
    }
}

/// Handles PCI hot-plug news: a driver for each device that arrived, and each device the
/// VMM wants back let go of and ejected.
pub fn hotplug(d: &mut Devices, regs: &HotplugRegs) {
    let (arrived, to_remove) = regs.take();
    for slot in 1..32u8 {
        if to_remove & (1 << slot) != 0 {
            let kind = d.stop(slot).unwrap_or("none");
            regs.eject(slot);
            emit(|w| protocol::hotplug_ejected(w, slot, kind));
        }
    }
    if arrived == 0 {
        return;
    }
    let Some(root) = d.root.as_mut() else { return };
    let functions: Vec<_> = root
        .enumerate_bus(0)
        .filter(|(df, _)| df.function == 0 && arrived & (1 << df.device) != 0)
        .collect();
    for (df, info) in functions {
        let kind = d.start(df, &info).unwrap_or("none");
        emit(|w| protocol::hotplug_added(w, df.device, kind));
    }
}

/// `chaos`: a hostile driver on the entropy device, then a fresh driver.
pub fn chaos(d: &mut Devices, clock: &crate::time::Clock) {
    let (Some(root), Some(df)) = (d.root.as_mut(), d.rng_at) else {
        emit(|w| protocol::device_error(w, "chaos", &"no rng"));
        return;
    };
    // The old driver goes first: its rings are about to be replaced.
    d.rng = None;
    match crate::chaos::run(root, df, clock) {
        Ok(r) => emit(|w| protocol::chaos(w, r.posted, r.used, r.needs_reset)),
        Err(e) => emit(|w| protocol::device_error(w, "chaos", &e)),
    }
    match PciTransport::new::<IdentityHal, _>(root, df).map(Rng::new) {
        Ok(Ok(rng)) => d.rng = Some(rng),
        _ => emit(|w| protocol::device_error(w, "rng", &"cannot start again")),
    }
}

/// Most sectors moved per request.
const CHUNK_SECTORS: u64 = 64;

/// `disk info`
pub fn disk_info(disk: &mut Disk) {
    let mut id = [0u8; 20];
    let len = disk.device_id(&mut id).unwrap_or(0);
    let id = String::from_utf8_lossy(&id[..len]);
    let (sectors, readonly) = (disk.capacity(), disk.readonly());
    emit(|w| protocol::disk_info(w, sectors, readonly, id.trim_end_matches('\0').as_bytes()));
}

/// `disk read SECTOR COUNT`
pub fn disk_read(disk: &mut Disk, sector: u64, count: u64) {
    let mut buf = alloc::vec![0u8; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut hash = baton_test_guest::stream::FNV_OFFSET;
    let mut at = sector;
    while at < sector + count {
        let n = (sector + count - at).min(CHUNK_SECTORS) as usize;
        let chunk = &mut buf[..n * SECTOR_SIZE];
        if let Err(e) = disk.read_blocks(at as usize, chunk) {
            emit(|w| protocol::device_error(w, "disk", &format_args!("read at {at}: {e}")));
            return;
        }
        hash = baton_test_guest::stream::fnv1a(hash, chunk);
        at += n as u64;
    }
    emit(|w| protocol::disk_read(w, sector, count, hash));
}

/// `disk write SECTOR COUNT BYTE`
pub fn disk_write(disk: &mut Disk, sector: u64, count: u64, byte: u8) {
    let buf = alloc::vec![byte; (CHUNK_SECTORS as usize) * SECTOR_SIZE];
    let mut at = sector;
    while at < sector + count {
        let n = (sector + count - at).min(CHUNK_SECTORS) as usize;
        if let Err(e) = disk.write_blocks(at as usize, &buf[..n * SECTOR_SIZE]) {
            emit(|w| protocol::device_error(w, "disk", &format_args!("write at {at}: {e}")));
            return;
        }
        at += n as u64;
    }
    if let Err(e) = disk.flush() {
        emit(|w| protocol::device_error(w, "disk", &format_args!("flush: {e}")));
        return;
    }
    emit(|w| protocol::disk_wrote(w, sector, count));
}

/// `rng N`
pub fn rng(rng: &mut Rng, n: usize) {
    let mut buf = alloc::vec![0u8; n];
    let mut got = 0;
    while got < n {
        match rng.request_entropy(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    emit(|w| protocol::rng(w, &buf[..got]));
}
