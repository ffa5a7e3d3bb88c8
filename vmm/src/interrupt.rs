//! KVM's GSI routing table and the hypervisor operations virtio devices need ([`VmOps`]):
//! ioeventfds for queue notifications, and MSI routes with irqfds for MSI-X vectors.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, including the default routes that
//! KVM_CREATE_IRQCHIP installed for the PIC and IOAPIC pins, so the table here starts with
//! those and every MSI change re-sends the lot.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};

use devices::pci::msix::MsixEntry;
use devices::virtio::VmOps;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC pins; GSIs from here on are free for MSIs.
const IOAPIC_PINS: u32 = 24;
/// KVM's limit on routing entries.
const MAX_GSI: u32 = 4095;

struct Table {
    routes: BTreeMap<(u32, u32), kvm_irq_routing_entry>,
    next_gsi: u32,
    /// GSIs below `next_gsi` given back by unplugged devices.
    free: BTreeSet<u32>,
    irqfds: BTreeSet<u32>,
    /// Inside [`Interrupts::batched`]: route changes wait for its end.
    batching: bool,
    /// Routes changed while batching, not yet given to KVM.
    pending: bool,
}

/// The VM's interrupt routing, shared by every device.
pub struct Interrupts {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl Interrupts {
    /// The table KVM_CREATE_IRQCHIP set up: PIC pins for GSIs 0-15, IOAPIC pins for 0-23.
    pub fn new(vm: Arc<VmFd>) -> Self {
        let mut routes = BTreeMap::new();
        for gsi in 0..IOAPIC_PINS {
            routes.insert((gsi, 0), irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 16 {
                let (chip, pin) = if gsi < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, gsi)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
                };
                routes.insert((gsi, 1), irqchip_route(gsi, chip, pin));
            }
        }
        Interrupts {
            vm,
            table: Mutex::new(Table {
                routes,
                next_gsi: IOAPIC_PINS,
                free: BTreeSet::new(),
                irqfds: BTreeSet::new(),
                batching: false,
                pending: false,
            }),
        }
    }

    /// Runs `f`, giving KVM the routes it changed in one update at its end rather than one
    /// update each: KVM waits for a grace period on every update. An interrupt signalled
    /// through an irqfd before its route reaches KVM is lost, so `f` must not let devices
    /// run (a restore builds them paused).
    pub fn batched<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        self.table.lock().expect("routing lock poisoned").batching = true;
        let result = f();
        let mut t = self.table.lock().expect("routing lock poisoned");
        t.batching = false;
        if std::mem::take(&mut t.pending) {
            self.commit(&mut t)?;
        }
        Ok(result)
    }

    /// Gives KVM the routing table, unless a batch is open.
    fn commit(&self, table: &mut Table) -> io::Result<()> {
        if table.batching {
            table.pending = true;
            return Ok(());
        }
        let mut routing = KvmIrqRouting::new(table.routes.len()).map_err(io::Error::other)?;
        for (slot, entry) in routing.as_mut_slice().iter_mut().zip(table.routes.values()) {
            *slot = *entry;
        }
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl VmOps for Interrupts {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut t = self.table.lock().expect("routing lock poisoned");
        if let Some(gsi) = t.free.pop_first() {
            return Ok(gsi);
        }
        if t.next_gsi > MAX_GSI {
            return Err(io::Error::other("all KVM interrupt routes are in use"));
        }
        t.next_gsi += 1;
        Ok(t.next_gsi - 1)
    }

    fn route_msi(&self, gsi: u32, message: MsixEntry, fd: &EventFd) -> io::Result<()> {
        let mut t = self.table.lock().expect("routing lock poisoned");
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = message.addr_lo;
        e.u.msi.address_hi = message.addr_hi;
        e.u.msi.data = message.data;
        t.routes.insert((gsi, 0), e);
        self.commit(&mut t)?;
        if t.irqfds.insert(gsi) {
            if let Err(e) = self.vm.register_irqfd(fd, gsi) {
                t.irqfds.remove(&gsi);
                return Err(io::Error::from_raw_os_error(e.errno()));
            }
        }
        Ok(())
    }

    fn release_gsi(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        let mut t = self.table.lock().expect("routing lock poisoned");
        if gsi < IOAPIC_PINS || gsi >= t.next_gsi || t.free.contains(&gsi) {
            return Err(io::Error::other(format!("GSI {gsi} was not allocated")));
        }
        let routed = t.routes.remove(&(gsi, 0)).is_some();
        let wired = t.irqfds.remove(&gsi);
        t.free.insert(gsi);
        if wired {
            self.vm
                .unregister_irqfd(fd, gsi)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        if routed {
            self.commit(&mut t)?;
        }
        Ok(())
    }
}
