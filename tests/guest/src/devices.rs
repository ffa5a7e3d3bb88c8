//! The guest's virtio devices: found on PCI bus 0 through the ECAM window that
//! the MCFG names, and driven by the `virtio-drivers` crate, by polling.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use baton_test_guest::protocol;
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::bus::{Cam, Command, ConfigurationAccess, MmioCam, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, Transport};

use crate::hal::IdentityHal;
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
    /// Where the entropy device is.
    pub rng_at: Option<virtio_drivers::transport::pci::bus::DeviceFunction>,
    /// Network cards, in PCI order.
    pub nics: Vec<Nic>,
    /// The first disk.
    pub disk: Option<Disk>,
    /// The first entropy device.
    pub rng: Option<Rng>,
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
    let mut cam2 = unsafe { cam.unsafe_clone() };
    let mut root = PciRoot::new(cam);
    if interrupts {
        crate::irq::enable();
    }
    let mut found = Devices::default();
    let functions: Vec<_> = root.enumerate_bus(0).collect();
    for (df, info) in functions {
        let Some(kind) = virtio_device_type(&info) else {
            continue;
        };
        root.set_command(df, Command::MEMORY_SPACE | Command::BUS_MASTER);
        let msix = if interrupts && kind == DeviceType::Network {
            let m = crate::irq::setup(&mut root, &mut cam2, df);
            if m.is_none() {
                emit(|w| protocol::warning(w, "pci", &format_args!("{df}: no MSI-X")));
            }
            m
        } else {
            None
        };
        let transport = match PciTransport::new::<IdentityHal, _>(&mut root, df) {
            Ok(t) => t,
            Err(e) => {
                emit(|w| protocol::warning(w, "pci", &format_args!("{df}: {e}")));
                continue;
            }
        };
        match (kind, transport.device_type()) {
            (DeviceType::Network, _) => {
                let address = addresses.get(found.nics.len()).copied().flatten();
                match Nic::new(transport, address, services, msix, net_tuning) {
                    Ok(nic) => found.nics.push(nic),
                    Err(e) => emit(|w| protocol::warning(w, "net", &e)),
                }
            }
            (DeviceType::Block, _) if found.disk.is_none() => match Disk::new(transport) {
                Ok(d) => found.disk = Some(d),
                Err(e) => emit(|w| protocol::warning(w, "disk", &e)),
            },
            (DeviceType::EntropySource, _) if found.rng.is_none() => match Rng::new(transport) {
                Ok(r) => {
                    found.rng = Some(r);
                    found.rng_at = Some(df);
                }
                Err(e) => emit(|w| protocol::warning(w, "rng", &e)),
            },
            _ => {}
        }
    }
    found.root = Some(root);
    found
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
