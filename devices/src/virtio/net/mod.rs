//! virtio-net (virtio 1.2, 5.1) on a TAP backend.
//!
//! Queues are `rx0, tx0, rx1, tx1, ...` and, last, the control queue. Each queue pair runs on
//! its own worker thread ([`queue_pair`]) with its own TAP descriptor; the first worker also
//! serves the control queue ([`ctrl`]). Frames move between guest memory and the TAP with
//! readv/writev and no copy: the guest's 12-byte header is the TAP's vnet header.

mod ctrl;
mod queue_pair;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use net_util::{Offloads, TapQueues};

use super::worker::{UsedSince, Worker};
use super::{
    ActivateError, Activation, ActiveQueue, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

/// virtio device type of a network card.
pub const DEVICE_TYPE: u16 = 1;

/// Feature bits (virtio 1.2, 5.1.3).
pub mod features {
    /// Device handles packets with partial checksum.
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Device reports its MTU.
    pub const MTU: u64 = 1 << 3;
    /// Device has a MAC address.
    pub const MAC: u64 = 1 << 5;
    /// Driver takes TSO over IPv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver takes TSO over IPv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Driver takes TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// Driver takes UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// Device takes TSO over IPv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device takes TSO over IPv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Device takes TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// Device takes UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers: a frame may span several.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Configuration status field is valid.
    pub const STATUS: u64 = 1 << 16;
    /// Control queue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Driver can send gratuitous packets when asked.
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Several queue pairs.
    pub const MQ: u64 = 1 << 22;
}

/// Link is up (config status bit).
pub const STATUS_LINK_UP: u16 = 1;
/// Driver should announce itself (config status bit).
pub const STATUS_ANNOUNCE: u16 = 2;
/// Largest frame the device moves: a 64 KiB GSO frame plus its header.
pub const MAX_FRAME: usize = 65_562;

/// How a network device is set up (validated by the caller).
#[derive(Clone, Debug)]
pub struct NetParams {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU to report to the guest, if any.
    pub mtu: Option<u16>,
    /// Size of each queue.
    pub queue_size: u16,
    /// Offer checksum offload.
    pub offload_csum: bool,
    /// Offer TCP segmentation offload (needs checksum offload).
    pub offload_tso: bool,
    /// Offer UDP fragmentation offload (needs checksum offload).
    pub offload_ufo: bool,
}

/// Frames and bytes moved, without vnet headers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes sent by the guest.
    pub tx_bytes: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
}

/// What a network device carries across a snapshot or migration besides its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The layout's version ([`crate::Versioned`]).
    pub version: u32,
    /// Queue pairs the driver uses (their TAP queues are attached, the others detached).
    pub active_pairs: usize,
    /// The configuration status field (link up, announce requested).
    pub status: u16,
}

/// A virtio-net device over one TAP interface, one descriptor per queue pair.
pub struct Net {
    params: NetParams,
    taps: Arc<TapQueues>,
    status: Arc<AtomicU16>,
    /// One set per queue pair.
    counters: Vec<Arc<Counters>>,
    /// Each running queue pair's worker, with the pair's index (a driver may leave a pair
    /// out).
    workers: Vec<(usize, Worker<queue_pair::QueuePair>)>,
    /// Features the running driver acked.
    acked: u64,
}

impl crate::Versioned for NetState {
    const KIND: &'static str = "virtio-net";
    const VERSION: u32 = 1;
    fn version(&self) -> u32 {
        self.version
    }
}

impl Net {
    /// A device over `taps`, one per queue pair, as at power-on.
    pub fn new(params: NetParams, taps: Arc<TapQueues>) -> Self {
        Self::build(
            params,
            taps,
            NetState {
                version: <NetState as crate::Versioned>::VERSION,
                active_pairs: 1,
                status: STATUS_LINK_UP,
            },
        )
    }

    /// A device over `taps`, one per queue pair, in the state `state` describes.
    pub fn restore(
        params: NetParams,
        taps: Arc<TapQueues>,
        state: NetState,
    ) -> Result<Self, crate::StateError> {
        crate::Versioned::check_version(&state)?;
        if state.active_pairs > taps.len() {
            return Err(crate::StateError::Invalid(format!(
                "the network card uses {} queue pair(s) but has {}",
                state.active_pairs,
                taps.len()
            )));
        }
        Ok(Self::build(params, taps, state))
    }

    fn build(params: NetParams, taps: Arc<TapQueues>, state: NetState) -> Self {
        let net = Net {
            params,
            counters: (0..taps.len()).map(|_| Arc::default()).collect(),
            taps,
            status: Arc::new(AtomicU16::new(state.status)),
            workers: Vec::new(),
            acked: 0,
        };
        // Until the driver asks for more, frames only queue where it reads.
        net.taps.set_active_pairs(state.active_pairs.max(1));
        net
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    /// Receive room a frame needs with the driver's `features`: one chain, or with
    /// mergeable buffers the largest frame the TAP can deliver (a GSO frame when the driver
    /// takes any, otherwise a full-size frame at the TAP's MTU).
    fn receive_room(&self, features: u64) -> queue_pair::Room {
        use features::*;
        if features & MRG_RXBUF == 0 {
            return queue_pair::Room::Chain;
        }
        if features & (GUEST_TSO4 | GUEST_TSO6 | GUEST_UFO) != 0 {
            return queue_pair::Room::Bytes(MAX_FRAME);
        }
        let tap_mtu = (self.pairs() > 0).then(|| self.taps.mtu().ok()).flatten();
        let mtu = [tap_mtu, self.params.mtu, Some(1500)]
            .into_iter()
            .flatten()
            .max()
            .map_or(1500, usize::from);
        // The header, an Ethernet header with a VLAN tag, and the payload.
        queue_pair::Room::Bytes(net_util::tap::VNET_HDR_LEN + 18 + mtu)
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.params.mac);
        c[6..8].copy_from_slice(&self.status.load(Ordering::Acquire).to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.params.mtu.unwrap_or(0).to_le_bytes());
        c
    }
}

fn offloads_from(acked: u64) -> Offloads {
    use features::*;
    Offloads {
        csum: acked & GUEST_CSUM != 0,
        tso4: acked & GUEST_TSO4 != 0,
        tso6: acked & GUEST_TSO6 != 0,
        tso_ecn: acked & GUEST_ECN != 0,
        ufo: acked & GUEST_UFO != 0,
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> [u8; 3] {
        // Network controller, Ethernet.
        [0x02, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        use features::*;
        let mut f = MAC
            | STATUS
            | CTRL_VQ
            | GUEST_ANNOUNCE
            | MRG_RXBUF
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC;
        if self.pairs() > 1 {
            f |= MQ;
        }
        if self.params.mtu.is_some() {
            f |= MTU;
        }
        if self.params.offload_csum {
            f |= CSUM | GUEST_CSUM;
            if self.params.offload_tso {
                f |= HOST_TSO4 | HOST_TSO6 | HOST_ECN | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN;
            }
            if self.params.offload_ufo {
                f |= HOST_UFO | GUEST_UFO;
            }
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![self.params.queue_size; 2 * self.pairs()];
        sizes.push(64);
        sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only under VERSION_1; drivers set it through the control queue.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            features,
            mut queues,
            interrupt,
        } = activation;
        let offloads = offloads_from(features);
        // A restored device finds them set already, and leaves them alone.
        self.taps
            .set_offloads(offloads)
            .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        let ctrl_index = 2 * self.pairs();
        let ctrl = queues.get_mut(ctrl_index).and_then(Option::take);
        // Without MQ the driver uses one pair; with it, one until it asks for more.
        let mut ctrl = ctrl.map(|q| ctrl::Ctrl {
            queue: q,
            taps: self.taps.clone(),
            status: self.status.clone(),
            interrupt: interrupt.clone(),
            max_pairs: if features & features::MQ != 0 {
                self.pairs()
            } else {
                1
            },
        });
        let room = self.receive_room(features);
        let mut workers = Vec::new();
        for pair in 0..self.pairs() {
            let tap = self.taps.queue(pair);
            let rx = queues.get_mut(2 * pair).and_then(Option::take);
            let tx = queues.get_mut(2 * pair + 1).and_then(Option::take);
            let (Some(rx), Some(tx)) = (rx, tx) else {
                if pair == 0 {
                    return Err(ActivateError::QueueMissing(0));
                }
                continue;
            };
            let qp = queue_pair::QueuePair {
                rx_used: UsedSince::new(&rx.queue),
                rx,
                tx,
                tap: tap.clone(),
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                counters: self.counters[pair].clone(),
                ctrl: if pair == 0 { ctrl.take() } else { None },
                tap_pending: true,
                room,
                rx_taken: Default::default(),
            };
            let worker = Worker::spawn(format!("virtio-net-{pair}"), move |events| qp.run(events))
                .map_err(ActivateError::Worker)?;
            workers.push((pair, worker));
        }
        self.workers = workers;
        self.acked = features;
        Ok(())
    }

    fn reset(&mut self) {
        for (_, w) in self.workers.drain(..) {
            w.stop();
        }
        self.status.store(STATUS_LINK_UP, Ordering::Release);
        self.taps.set_active_pairs(1);
    }

    fn pause(&mut self) -> Vec<Option<ActiveQueue>> {
        if self.workers.is_empty() {
            return Vec::new();
        }
        let mut queues: Vec<Option<ActiveQueue>> = (0..=2 * self.pairs()).map(|_| None).collect();
        let ctrl_index = 2 * self.pairs();
        // Paused inside a migration's downtime: the workers stop together.
        for (_, w) in &self.workers {
            w.ask_to_stop();
        }
        for (pair, w) in self.workers.drain(..) {
            let Some(qp) = w.stop() else { continue };
            queues[2 * pair] = Some(qp.rx);
            queues[2 * pair + 1] = Some(qp.tx);
            if let Some(c) = qp.ctrl {
                queues[ctrl_index] = Some(c.queue);
            }
        }
        queues
    }

    fn save(&self) -> super::DeviceState {
        super::DeviceState::Net(NetState {
            version: <NetState as crate::Versioned>::VERSION,
            active_pairs: self.taps.active_pairs(),
            status: self.status.load(Ordering::Acquire),
        })
    }

    fn announce(&mut self) -> bool {
        // The driver acknowledges through the control queue, which then clears the bit.
        let can = features::GUEST_ANNOUNCE | features::CTRL_VQ;
        if self.workers.is_empty() || self.acked & can != can {
            return false;
        }
        self.status.fetch_or(STATUS_ANNOUNCE, Ordering::AcqRel);
        true
    }

    /// Totals over the queue pairs, then each pair's frames (`rx_frames_N`, `tx_frames_N`),
    /// which show how a multi-queue driver spreads its traffic.
    fn counters(&self) -> Vec<(String, u64)> {
        let sum = |f: fn(&Counters) -> &AtomicU64| -> u64 {
            self.counters
                .iter()
                .map(|c| f(c).load(Ordering::Relaxed))
                .sum()
        };
        let mut out = vec![
            ("rx_bytes".to_string(), sum(|c| &c.rx_bytes)),
            ("rx_frames".to_string(), sum(|c| &c.rx_frames)),
            ("tx_bytes".to_string(), sum(|c| &c.tx_bytes)),
            ("tx_frames".to_string(), sum(|c| &c.tx_frames)),
        ];
        for (pair, c) in self.counters.iter().enumerate() {
            out.push((
                format!("rx_frames_{pair}"),
                c.rx_frames.load(Ordering::Relaxed),
            ));
            out.push((
                format!("tx_frames_{pair}"),
                c.tx_frames.load(Ordering::Relaxed),
            ));
        }
        out
    }
}

/// Serves the receive queue (one frame waits on the backend), the transmit queue or the
/// control queue of a card with one queue pair once, as its worker does, on the fuzz
/// targets' socket instead of a TAP.
#[cfg(feature = "fuzzing")]
pub(crate) fn process_for_fuzzing(
    target: super::fuzz::Target,
    q: ActiveQueue,
    mem: &super::GuestMemory,
    interrupt: Arc<super::Interrupt>,
    backends: &super::fuzz::Backends,
) -> Result<(), super::worker::QueueError> {
    use super::fuzz::Target;
    let fd = backends
        .net
        .try_clone()
        .expect("the fuzz target's socket duplicates");
    let tap = Arc::new(net_util::Tap::unchecked(fd));
    // The control queue's view of the TAP: one pair, which needs no attaching.
    let taps = Arc::new(TapQueues::new(Vec::new()).expect("no queues"));
    let idle = super::fuzz::idle_queue;
    let (rx, tx, ctrl_queue, room) = match target {
        Target::NetRx { mergeable } => {
            let room = if mergeable {
                queue_pair::Room::Bytes(MAX_FRAME)
            } else {
                queue_pair::Room::Chain
            };
            (q, idle(), None, room)
        }
        Target::NetTx => (idle(), q, None, queue_pair::Room::Chain),
        _ => (idle(), idle(), Some(q), queue_pair::Room::Chain),
    };
    let mut qp = queue_pair::QueuePair {
        rx_used: UsedSince::new(&rx.queue),
        rx,
        tx,
        tap,
        mem: mem.clone(),
        interrupt: interrupt.clone(),
        counters: Default::default(),
        ctrl: ctrl_queue.map(|queue| ctrl::Ctrl {
            queue,
            taps,
            status: Arc::new(AtomicU16::new(STATUS_LINK_UP | STATUS_ANNOUNCE)),
            interrupt,
            max_pairs: 1,
        }),
        tap_pending: true,
        room,
        rx_taken: Default::default(),
    };
    match target {
        Target::NetRx { .. } => qp.fuzz_receive(),
        Target::NetTx => qp.fuzz_transmit(),
        _ => qp.ctrl.as_mut().map_or(Ok(()), |c| c.process(mem)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_taps() -> Arc<TapQueues> {
        Arc::new(TapQueues::new(Vec::new()).unwrap())
    }

    fn params() -> NetParams {
        NetParams {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            mtu: Some(9000),
            queue_size: 256,
            offload_csum: true,
            offload_tso: true,
            offload_ufo: false,
        }
    }

    #[test]
    fn config_space_and_features() {
        let net = Net::new(params(), no_taps());
        let mut b = [0u8; 12];
        net.read_config(0, &mut b);
        assert_eq!(&b[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), STATUS_LINK_UP);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 9000);
        // Past the end reads zero.
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        let f = net.features();
        assert_ne!(f & features::GUEST_TSO4, 0);
        assert_eq!(f & features::GUEST_UFO, 0);
        assert_ne!(f & features::MTU, 0);
        let plain = Net::new(
            NetParams {
                offload_csum: false,
                mtu: None,
                ..params()
            },
            no_taps(),
        );
        assert_eq!(
            plain.features() & (features::GUEST_TSO4 | features::CSUM),
            0
        );
        assert_eq!(plain.features() & features::MTU, 0);
    }

    #[test]
    fn state_round_trips_and_other_versions_are_refused() {
        use crate::virtio::DeviceState;
        let saved = NetState {
            version: 1,
            active_pairs: 0,
            status: STATUS_LINK_UP | STATUS_ANNOUNCE,
        };
        let net = Net::restore(params(), no_taps(), saved.clone()).expect("restores");
        assert_eq!(net.save(), DeviceState::Net(saved.clone()));
        let json = serde_json::to_value(net.save()).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"net": {"version": 1, "active_pairs": 0, "status": 3}})
        );
        let back: DeviceState = serde_json::from_value(json).expect("parses");
        assert_eq!(back, DeviceState::Net(saved.clone()));

        let e = Net::restore(
            params(),
            no_taps(),
            NetState {
                version: 2,
                ..saved.clone()
            },
        )
        .err()
        .expect("another version");
        assert_eq!(
            e.to_string(),
            "virtio-net state version 2 is not supported (this baton reads version 1)"
        );
        let e = Net::restore(
            params(),
            no_taps(),
            NetState {
                active_pairs: 1,
                ..saved
            },
        )
        .err()
        .expect("more pairs than TAP queues");
        assert_eq!(
            e.to_string(),
            "the network card uses 1 queue pair(s) but has 0"
        );
        // The layout before versions (format 1) had no version field: it does not parse.
        let old = serde_json::json!({"active_pairs": 1, "status": 1});
        assert!(serde_json::from_value::<DeviceState>(old).is_err());
    }

    #[test]
    fn offloads_follow_acked_features() {
        let o = offloads_from(features::GUEST_CSUM | features::GUEST_TSO4);
        assert!(o.csum && o.tso4 && !o.tso6 && !o.ufo);
        assert_eq!(offloads_from(0), Offloads::default());
    }
}
