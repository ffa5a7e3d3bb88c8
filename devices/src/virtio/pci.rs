//! A virtio device as a PCI function: its configuration space (identity, one 64-bit memory
//! BAR, the virtio capabilities and MSI-X) and the guest's accesses to that BAR, turned into
//! [`Event`]s for the VMM.
//!
//! BAR 0 layout:
//!
//! ```text
//! 0x0000  common configuration      0x3000  notifications (4 bytes per queue)
//! 0x1000  ISR status                0x4000  MSI-X table
//! 0x2000  device configuration      0x6000  MSI-X pending bits
//! ```
//!
//! This model holds no memory, interrupts or threads: what to do on activation, a queue
//! notification or an interrupt is the VMM's and the device's business.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::pci::configuration::{
    Bar, BarKind, BarMove, ConfigError, ConfigState, Identity, PciConfiguration,
};
use crate::pci::msix::{Msix, MsixWrite};

use super::common_config::{self, CommonConfig};
use super::VirtioDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Offset of the notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending bits.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION: u64 = 0x1000;

const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
const MODERN_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR_SPECIFIC: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

/// ISR bit: a queue interrupt.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: a configuration change.
pub const ISR_CONFIG: u8 = 2;

/// What a guest access asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver is ready: start the device with the negotiated features and queues.
    Activate,
    /// The driver reset the device: stop it.
    Reset,
    /// The driver notified queue N (when notifications do not come through an ioeventfd).
    Notify(u16),
    /// MSI-X vector N got a new message: update its route.
    VectorChanged(u16),
    /// MSI-X vector N was pending and may now be delivered.
    Deliver(u16),
}

/// What the guest set up in a virtio PCI function, for snapshots.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciState {
    /// Configuration space, BAR addresses included.
    pub config: ConfigState,
    /// Features, status and queue set-up.
    pub common: CommonConfig,
    /// The MSI-X table, pending bits and control.
    pub msix: Msix,
    /// The ISR status byte.
    pub isr: u8,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: PciConfiguration,
    common: CommonConfig,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    isr: Arc<AtomicU8>,
    device: Box<dyn VirtioDevice>,
    /// Events raised by configuration-space writes, taken by [`VirtioPci::take_events`].
    events: Vec<Event>,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![CAP_VENDOR_SPECIFIC, 0, len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        cap.extend_from_slice(&x.to_le_bytes());
    }
    cap
}

impl VirtioPci {
    /// The PCI function for `device`, its BAR 0 at `bar_addr` (aligned to [`BAR_SIZE`]).
    pub fn new(device: Box<dyn VirtioDevice>, bar_addr: u64) -> Result<Self, ConfigError> {
        let queues = device.queue_max_sizes();
        let id = Identity {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + device.device_type(),
            class: device.pci_class(),
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        };
        let mut config = PciConfiguration::new(id);
        config.add_bar(
            0,
            Bar {
                addr: bar_addr,
                size: BAR_SIZE,
                kind: BarKind::Memory64,
            },
        )?;
        config.add_capability(&virtio_cap(
            CFG_COMMON,
            COMMON_OFFSET,
            common_config::SIZE,
            None,
        ))?;
        config.add_capability(&virtio_cap(
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            REGION,
            Some(NOTIFY_MULTIPLIER),
        ))?;
        config.add_capability(&virtio_cap(CFG_ISR, ISR_OFFSET, 1, None))?;
        config.add_capability(&virtio_cap(CFG_DEVICE, DEVICE_CONFIG_OFFSET, REGION, None))?;
        // One vector per queue plus one for configuration changes.
        let msix = Msix::new(queues.len() as u16 + 1);
        let msix_cap = config.add_capability(&msix.capability(
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        ))?;
        // The guest may set MSI-X Enable and Function Mask (message control bits 15, 14).
        config.set_writable(msix_cap, 0xc000_0000);
        Ok(VirtioPci {
            common: CommonConfig::new(device.features(), &queues),
            config,
            msix: Arc::new(Mutex::new(msix)),
            msix_cap,
            isr: Arc::new(AtomicU8::new(0)),
            device,
            events: Vec::new(),
        })
    }

    /// The function for `device` as `state` describes it, refused if the state belongs to
    /// a function of another shape.
    pub fn from_state(
        device: Box<dyn VirtioDevice>,
        state: VirtioPciState,
    ) -> Result<Self, crate::StateError> {
        let bar = state
            .config
            .bars
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| crate::StateError::new("the state has no BAR 0"))?;
        let features = device.features();
        let sizes = device.queue_max_sizes();
        let mut pci = VirtioPci::new(device, bar)
            .map_err(|e| crate::StateError::Invalid(format!("BAR 0 at {bar:#x}: {e}")))?;
        pci.config.restore(&state.config)?;
        pci.common = CommonConfig::from_state(features, &sizes, state.common)?;
        let vectors = pci.lock_msix().vectors();
        *pci.lock_msix() = Msix::from_state(vectors, state.msix)?;
        pci.isr.store(state.isr, Ordering::Release);
        Ok(pci)
    }

    /// What the guest set up.
    pub fn state(&self) -> VirtioPciState {
        VirtioPciState {
            config: self.config.state(),
            common: self.common.clone(),
            msix: self.lock_msix().clone(),
            isr: self.isr.load(Ordering::Acquire),
        }
    }

    /// The transport's common configuration (features, status, queues).
    pub fn common(&self) -> &CommonConfig {
        &self.common
    }

    /// The common configuration, for marking the device broken.
    pub fn common_mut(&mut self) -> &mut CommonConfig {
        &mut self.common
    }

    /// The MSI-X state, shared with whoever raises the device's interrupts.
    pub fn msix(&self) -> Arc<Mutex<Msix>> {
        self.msix.clone()
    }

    /// The ISR status byte, shared with whoever raises the device's interrupts.
    pub fn isr(&self) -> Arc<AtomicU8> {
        self.isr.clone()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind the transport.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn lock_msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().expect("MSI-X lock poisoned")
    }

    /// BAR 0 as it is now.
    pub fn bar(&self) -> Bar {
        self.config.bar(0).expect("BAR 0 declared in new")
    }

    /// Events raised by configuration-space writes since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// A guest read of BAR 0 at `offset`.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < common_config::SIZE => self.common.read(o, data),
            o if o == ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                if let Some(b) = data.first_mut() {
                    *b = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + REGION).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.lock_msix().table_size())
                .contains(&o) =>
            {
                self.lock_msix().read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + self.lock_msix().pba_size()).contains(&o) => {
                self.lock_msix().read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    /// A guest write to BAR 0 at `offset`; returns what the VMM must do.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) -> Option<Event> {
        match offset {
            o if o < common_config::SIZE => match self.common.write(o, data) {
                common_config::Event::Activate => Some(Event::Activate),
                common_config::Event::Reset => {
                    self.isr.store(0, Ordering::Release);
                    Some(Event::Reset)
                }
                common_config::Event::None => None,
            },
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + REGION).contains(&o) => {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data);
                None
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION).contains(&o) => {
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                (queue < self.common.queues().len() as u64).then_some(Event::Notify(queue as u16))
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + self.lock_msix().table_size())
                .contains(&o) =>
            {
                match self.lock_msix().write_table(o - MSIX_TABLE_OFFSET, data) {
                    MsixWrite::None => None,
                    MsixWrite::Message(v) => Some(Event::VectorChanged(v)),
                    MsixWrite::Unmasked(v) => Some(Event::Deliver(v)),
                }
            }
            _ => None,
        }
    }
}

impl VirtioPci {
    /// A guest read of configuration dword `reg`.
    pub fn read_config(&self, reg: usize) -> u32 {
        let value = self.config.read_reg(reg);
        if reg == self.msix_cap / 4 {
            // Message control lives in the MSI-X model.
            (value & 0xffff) | (u32::from(self.lock_msix().control()) << 16)
        } else {
            value
        }
    }

    /// A guest write to configuration space; MSI-X changes are queued as events.
    pub fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write_reg(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let control = (self.config.read_reg(reg) >> 16) as u16;
            let deliver = self.lock_msix().set_control(control);
            self.events.extend(deliver.into_iter().map(Event::Deliver));
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng;

    impl VirtioDevice for Rng {
        fn activate(
            &mut self,
            _: crate::virtio::Activation,
        ) -> Result<(), crate::virtio::ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn pause(&mut self) -> Vec<Option<crate::virtio::ActiveQueue>> {
            Vec::new()
        }
        fn device_type(&self) -> u16 {
            4
        }
        fn pci_class(&self) -> [u8; 3] {
            [0xff, 0, 0]
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256]
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0xab);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn save(&self) -> crate::virtio::DeviceState {
            crate::virtio::DeviceState::Rng(crate::virtio::rng::RngState { version: 1 })
        }
    }

    fn function() -> VirtioPci {
        VirtioPci::new(Box::new(Rng), 0xc000_0000).unwrap()
    }

    /// Walks the capability list: (id, offset) pairs.
    fn capabilities(f: &VirtioPci) -> Vec<(u8, usize)> {
        let mut caps = Vec::new();
        let mut at = (f.read_config(13) & 0xff) as usize;
        while at != 0 && caps.len() < 16 {
            let dword = f.read_config(at / 4);
            caps.push((dword as u8, at));
            at = ((dword >> 8) & 0xff) as usize;
        }
        caps
    }

    #[test]
    fn identity_bar_and_capabilities() {
        let f = function();
        assert_eq!(f.read_config(0), 0x1044_1af4, "virtio-rng, modern id");
        assert_eq!(f.read_config(4) & 0x7, 0b100, "64-bit memory BAR");
        let caps = capabilities(&f);
        let ids: Vec<u8> = caps.iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![9, 9, 9, 9, 0x11]);
        // The virtio capabilities name their structure, BAR and offset.
        let cfg_types: Vec<u8> = caps[..4]
            .iter()
            .map(|(_, at)| (f.read_config(at / 4) >> 24) as u8)
            .collect();
        assert_eq!(cfg_types, vec![CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE]);
        let (_, notify) = caps[1];
        assert_eq!(f.read_config(notify / 4 + 2), NOTIFY_OFFSET as u32);
        assert_eq!(f.read_config(notify / 4 + 4), NOTIFY_MULTIPLIER);
        // MSI-X: one vector per queue plus config, table in BAR 0.
        let (_, msix) = caps[4];
        assert_eq!((f.read_config(msix / 4) >> 16) & 0x7ff, 1);
        assert_eq!(f.read_config(msix / 4 + 1), MSIX_TABLE_OFFSET as u32);
    }

    #[test]
    fn bar_accesses_become_events() {
        let mut f = function();
        let mut b = [0u8; 2];
        f.bar_read(18, &mut b);
        assert_eq!(u16::from_le_bytes(b), 1, "num_queues");
        let mut d = [0u8; 4];
        f.bar_read(DEVICE_CONFIG_OFFSET + 4, &mut d);
        assert_eq!(d, [0xab; 4]);
        assert_eq!(f.bar_write(NOTIFY_OFFSET, &[0, 0]), Some(Event::Notify(0)));
        assert_eq!(f.bar_write(NOTIFY_OFFSET + 4, &[0, 0]), None, "no queue 1");
        assert_eq!(
            f.bar_write(MSIX_TABLE_OFFSET + 8, &0x30u32.to_le_bytes()),
            Some(Event::VectorChanged(0))
        );
        // Reading the ISR clears it.
        f.isr().fetch_or(ISR_QUEUE, Ordering::AcqRel);
        let mut isr = [0u8; 1];
        f.bar_read(ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], ISR_QUEUE);
        f.bar_read(ISR_OFFSET, &mut isr);
        assert_eq!(isr[0], 0);
        // A status of 0 resets.
        assert_eq!(f.bar_write(20, &[0]), Some(Event::Reset));
        // Nothing mapped reads zero, never panics.
        for offset in (0..BAR_SIZE + 16).step_by(3) {
            f.bar_read(offset, &mut d);
            let _ = f.bar_write(offset, &d);
        }
    }

    #[test]
    fn state_round_trips_and_refuses_another_device() {
        let mut f = function();
        // The guest programs the function: queue 0, MSI-X vector 0, status, a BAR move.
        f.bar_write(22, &0u16.to_le_bytes());
        f.bar_write(24, &64u16.to_le_bytes());
        f.bar_write(32, &0x1000u64.to_le_bytes());
        f.bar_write(MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
        f.bar_write(MSIX_TABLE_OFFSET + 8, &0x31u32.to_le_bytes());
        f.bar_write(20, &[1]);
        f.write_config(4, 0, &0xd000_0004u32.to_le_bytes());
        f.isr().store(ISR_CONFIG, Ordering::Release);
        let saved = f.state();
        let json = serde_json::to_string(&saved).unwrap();
        let back =
            VirtioPci::from_state(Box::new(Rng), serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(back.bar().addr, 0xd000_0000);
        for reg in 0..64 {
            assert_eq!(back.read_config(reg), f.read_config(reg), "register {reg}");
        }
        assert_eq!(*back.common(), *f.common());
        assert_eq!(*back.msix().lock().unwrap(), *f.msix().lock().unwrap());
        assert_eq!(back.isr().load(Ordering::Acquire), ISR_CONFIG);

        // A state with another device id, more queues, or a misaligned BAR is refused.
        let mut other = saved.clone();
        other.config.regs[0] = 0x1041_1af4;
        assert!(VirtioPci::from_state(Box::new(Rng), other).is_err());
        let mut queues = saved.clone();
        let json = serde_json::to_value(&queues.common).unwrap();
        let mut json = json;
        let extra = json["queues"][0].clone();
        json["queues"].as_array_mut().unwrap().push(extra);
        queues.common = serde_json::from_value(json).unwrap();
        let e = VirtioPci::from_state(Box::new(Rng), queues).err().unwrap();
        assert!(e.to_string().contains("queues"), "{e}");
        let mut bar = saved;
        bar.config.bars[0] = Some(0xd000_0010);
        assert!(VirtioPci::from_state(Box::new(Rng), bar).is_err());
    }

    #[test]
    fn msix_enable_through_config_space_delivers_pending() {
        let mut f = function();
        let caps = capabilities(&f);
        let (_, msix) = caps[4];
        // Vector 0 pends while MSI-X is off, and is masked.
        assert_eq!(
            f.msix().lock().unwrap().fire(0),
            crate::pci::msix::Fire::Pending
        );
        f.bar_write(MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
        // Enable MSI-X (bit 15 of message control, byte 3 of the capability's first dword).
        f.write_config(msix / 4, 3, &[0x80]);
        assert_eq!(f.take_events(), vec![Event::Deliver(0)]);
        assert_ne!(f.read_config(msix / 4) & (1 << 31), 0);
        assert!(f.msix().lock().unwrap().enabled());
    }
}
