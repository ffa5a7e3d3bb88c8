//! A virtio-net card with several queue pairs, on `virtio-drivers`' virtqueues and PCI
//! transport (its own net driver knows one pair only).
//!
//! Feature negotiation takes VERSION_1, MAC, STATUS, EVENT_IDX and, when offered, CTRL_VQ
//! with MQ; then every queue pair the device offers is set up and switched on through the
//! control queue. Frames leave on the pair their flow hashes to (TCP/UDP ports), so each
//! connection keeps its order; they are received from every pair in turn.
//!
//! MRG_RXBUF and INDIRECT_DESC are taken too unless the command line says otherwise
//! ([`NetTuning`]). With mergeable buffers a frame may come in several receive buffers (the
//! first header's num_buffers says how many), which are put together in a buffer of their
//! own; with indirect descriptors each frame is sent as two buffers, header and payload, which
//! the ring holds in an indirect table.

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use baton_test_guest::cmdline::{NetTuning, MAX_RX_BUFFER};
use baton_test_guest::flow::flow_pair;

use crate::hal::IdentityHal;

const QUEUE_SIZE: usize = 256;
const CTRL_QUEUE_SIZE: usize = 64;
/// Receive buffers per pair, and transmit buffers in flight across pairs.
const RX_BUFFERS: usize = 128;
const TX_BUFFERS: usize = 256;
/// Room for a 9000-byte MTU frame and the 12-byte header.
pub const BUFFER_LEN: usize = MAX_RX_BUFFER;
/// The buffer index [`Card::receive`] gives for a frame put together from several receive
/// buffers.
pub const MERGED: usize = usize::MAX;
/// The virtio 1.x net header before every frame.
pub const HEADER_LEN: usize = 12;
/// Most pairs the guest drives.
pub const MAX_PAIRS: usize = 8;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_MQ: u64 = 1 << 22;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// Why a card could not be started.
#[derive(Debug)]
pub enum CardError {
    /// The device refused the features.
    Features,
    /// A queue could not be set up.
    Queue(virtio_drivers::Error),
    /// The device refused the number of queue pairs.
    Pairs(u16),
    /// The device refused an MSI-X vector for a queue.
    Vector(u16),
}

impl core::fmt::Display for CardError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CardError::Features => f.write_str("the device refused the features"),
            CardError::Queue(e) => write!(f, "queue set-up: {e}"),
            CardError::Pairs(n) => write!(f, "the device refused {n} queue pairs"),
            CardError::Vector(q) => write!(f, "the device refused an MSI-X vector for queue {q}"),
        }
    }
}

struct Pair {
    rx: VirtQueue<IdentityHal, QUEUE_SIZE>,
    tx: VirtQueue<IdentityHal, QUEUE_SIZE>,
    rx_bufs: Vec<Box<[u8]>>,
    /// Receive buffer index by token.
    rx_slot: Vec<usize>,
    /// Transmit buffer index and length by token.
    tx_slot: Vec<(usize, usize)>,
    rx_frames: u64,
    tx_frames: u64,
}

/// A started card.
pub struct Card {
    transport: PciTransport,
    pairs: Vec<Pair>,
    tx_bufs: Vec<Box<[u8]>>,
    tx_free: Vec<usize>,
    mac: [u8; 6],
    next_rx: usize,
    /// The control queue, kept for as long as the card: the device owns its rings while
    /// the queue is enabled (a migrated device reads them again), so they must not be freed.
    _ctrl: Option<VirtQueue<IdentityHal, CTRL_QUEUE_SIZE>>,
    /// The features the device accepted.
    features: u64,
    /// Bytes of each posted receive buffer.
    rx_len: usize,
    /// Where a frame that came in several buffers is put together.
    merge: Box<[u8]>,
    /// Frames that came in several buffers.
    merged: u64,
    /// Frames whose further buffers were missing or did not fit.
    merge_errors: u64,
}

impl Card {
    /// Starts the card on `transport` with every queue pair it offers (up to [`MAX_PAIRS`]).
    pub fn new(
        mut transport: PciTransport,
        msix: Option<&crate::irq::Msix>,
        tuning: NetTuning,
    ) -> Result<Self, CardError> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        let mut wanted = F_VERSION_1 | F_MAC | F_STATUS | F_EVENT_IDX | F_CTRL_VQ | F_MQ;
        if tuning.mrg_rxbuf {
            wanted |= F_MRG_RXBUF;
        }
        if tuning.indirect {
            wanted |= F_INDIRECT_DESC;
        }
        let features = offered & wanted;
        transport.write_driver_features(features);
        let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        transport.set_status(ok);
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(CardError::Features);
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = transport.read_config_space::<u8>(i).unwrap_or(0);
        }
        let mq = features & (F_MQ | F_CTRL_VQ) == F_MQ | F_CTRL_VQ;
        let max_pairs = if mq {
            usize::from(transport.read_config_space::<u16>(8).unwrap_or(1)).max(1)
        } else {
            1
        };
        let event_idx = features & F_EVENT_IDX != 0;
        let indirect = features & F_INDIRECT_DESC != 0;
        let use_pairs = max_pairs.min(MAX_PAIRS);
        let mut pairs = Vec::with_capacity(use_pairs);
        for p in 0..use_pairs {
            let rx = VirtQueue::new(&mut transport, 2 * p as u16, indirect, event_idx)
                .map_err(CardError::Queue)?;
            let tx = VirtQueue::new(&mut transport, 2 * p as u16 + 1, indirect, event_idx)
                .map_err(CardError::Queue)?;
            pairs.push(Pair {
                rx,
                tx,
                rx_bufs: (0..RX_BUFFERS)
                    .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                    .collect(),
                rx_slot: vec![0; QUEUE_SIZE],
                tx_slot: vec![(0, 0); QUEUE_SIZE],
                rx_frames: 0,
                tx_frames: 0,
            });
        }
        let ctrl_index = 2 * max_pairs as u16;
        let mut ctrl = if mq && use_pairs > 1 {
            Some(
                VirtQueue::<IdentityHal, CTRL_QUEUE_SIZE>::new(
                    &mut transport,
                    ctrl_index,
                    indirect,
                    event_idx,
                )
                .map_err(CardError::Queue)?,
            )
        } else {
            None
        };
        if let Some(m) = msix {
            let queues = (0..2 * use_pairs as u16).chain(ctrl.as_ref().map(|_| ctrl_index));
            for q in queues {
                if !m.assign_queue(q) {
                    return Err(CardError::Vector(q));
                }
            }
        }
        transport.set_status(ok | DeviceStatus::DRIVER_OK);
        let mut card = Card {
            transport,
            pairs,
            tx_bufs: (0..TX_BUFFERS)
                .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                .collect(),
            tx_free: (0..TX_BUFFERS).collect(),
            mac,
            next_rx: 0,
            _ctrl: None,
            features,
            rx_len: tuning.rx_buffer.min(BUFFER_LEN),
            merge: vec![0u8; BUFFER_LEN].into_boxed_slice(),
            merged: 0,
            merge_errors: 0,
        };
        for p in 0..card.pairs.len() {
            for i in 0..RX_BUFFERS {
                card.post_rx(p, i).map_err(CardError::Queue)?;
            }
        }
        if let Some(ctrl) = &mut ctrl {
            card.set_pairs(ctrl, ctrl_index)?;
        }
        card._ctrl = ctrl;
        Ok(card)
    }

    /// VQ_PAIRS_SET through the control queue, waiting for the answer.
    fn set_pairs(
        &mut self,
        ctrl: &mut VirtQueue<IdentityHal, CTRL_QUEUE_SIZE>,
        index: u16,
    ) -> Result<(), CardError> {
        let n = self.pairs.len() as u16;
        let [lo, hi] = n.to_le_bytes();
        let command = [4u8, 0, lo, hi];
        let mut ack = [0xffu8];
        // SAFETY: both buffers live on this stack frame until `pop_used` below returns them.
        let token = unsafe { ctrl.add(&[&command], &mut [&mut ack]) }.map_err(CardError::Queue)?;
        if ctrl.should_notify() {
            self.transport.notify(index);
        }
        let mut spins = 0u64;
        while ctrl.peek_used() != Some(token) {
            spins += 1;
            if spins > 1 << 32 {
                return Err(CardError::Pairs(n));
            }
            core::hint::spin_loop();
        }
        // SAFETY: the same buffers `add` took, returned by the device.
        unsafe { ctrl.pop_used(token, &[&command], &mut [&mut ack]) }.map_err(CardError::Queue)?;
        if ack[0] != 0 {
            return Err(CardError::Pairs(n));
        }
        Ok(())
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Queue pairs in use.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Frames received and sent on each pair.
    pub fn frames(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pairs.iter().map(|p| (p.rx_frames, p.tx_frames))
    }

    /// Whether mergeable receive buffers and indirect descriptors are in use.
    pub fn negotiated(&self) -> (bool, bool) {
        (
            self.features & F_MRG_RXBUF != 0,
            self.features & F_INDIRECT_DESC != 0,
        )
    }

    /// Frames that came in several buffers, and those whose further buffers were missing.
    pub fn merges(&self) -> (u64, u64) {
        (self.merged, self.merge_errors)
    }

    fn post_rx(&mut self, pair: usize, index: usize) -> Result<(), virtio_drivers::Error> {
        let len = self.rx_len;
        let p = &mut self.pairs[pair];
        // SAFETY: the boxed buffer stays put and untouched until the device returns it.
        let token = unsafe { p.rx.add(&[], &mut [&mut p.rx_bufs[index][..len]])? };
        p.rx_slot[usize::from(token)] = index;
        if p.rx.should_notify() {
            self.transport.notify(2 * pair as u16);
        }
        Ok(())
    }

    /// Takes the next used receive buffer of `pair`: its index and the bytes written.
    fn pop_rx(&mut self, pair: usize) -> Option<(usize, Result<u32, virtio_drivers::Error>)> {
        let len = self.rx_len;
        let p = &mut self.pairs[pair];
        let token = p.rx.peek_used()?;
        let index = p.rx_slot[usize::from(token)];
        let mut buf = core::mem::take(&mut p.rx_bufs[index]);
        // SAFETY: the token and buffer are the pair `add` used.
        let written = unsafe { p.rx.pop_used(token, &[], &mut [&mut buf[..len]]) };
        p.rx_bufs[index] = buf;
        Some((index, written))
    }

    /// The next received frame, from the pairs in turn: (pair, buffer, frame length). The
    /// frame starts after [`HEADER_LEN`] bytes of [`Card::take_rx`]'s buffer; a frame that
    /// came in several buffers is in the buffer [`MERGED`].
    pub fn receive(&mut self) -> Option<(usize, usize, usize)> {
        for i in 0..self.pairs.len() {
            let pair = (self.next_rx + i) % self.pairs.len();
            let Some((index, written)) = self.pop_rx(pair) else {
                continue;
            };
            self.next_rx = pair + 1;
            let n = match written {
                Ok(n) if n as usize >= HEADER_LEN => n as usize,
                _ => {
                    let _ = self.post_rx(pair, index);
                    continue;
                }
            };
            let buffers = if self.features & F_MRG_RXBUF != 0 {
                let b = &self.pairs[pair].rx_bufs[index];
                u16::from_le_bytes([b[HEADER_LEN - 2], b[HEADER_LEN - 1]])
            } else {
                1
            };
            if buffers <= 1 {
                self.pairs[pair].rx_frames += 1;
                return Some((pair, index, n - HEADER_LEN));
            }
            if let Some(len) = self.put_together(pair, index, n, buffers) {
                self.pairs[pair].rx_frames += 1;
                return Some((pair, MERGED, len));
            }
        }
        None
    }

    /// Copies a frame that came in `buffers` buffers, the first `first` (`n` bytes), into
    /// the merge buffer, posting every one of them again; returns the frame's length, or
    /// nothing when a buffer is missing (the device must return them all at once) or the
    /// frame does not fit.
    fn put_together(&mut self, pair: usize, first: usize, n: usize, buffers: u16) -> Option<usize> {
        self.merge[..n].copy_from_slice(&self.pairs[pair].rx_bufs[first][..n]);
        let _ = self.post_rx(pair, first);
        let mut total = n;
        let mut ok = true;
        for _ in 1..buffers {
            let Some((index, written)) = self.pop_rx(pair) else {
                ok = false;
                break;
            };
            let part = written.map(|w| w as usize).unwrap_or(usize::MAX);
            if ok && total.saturating_add(part) <= self.merge.len() {
                self.merge[total..total + part]
                    .copy_from_slice(&self.pairs[pair].rx_bufs[index][..part]);
                total += part;
            } else {
                ok = false;
            }
            let _ = self.post_rx(pair, index);
        }
        if !ok {
            self.merge_errors += 1;
            return None;
        }
        self.merged += 1;
        Some(total - HEADER_LEN)
    }

    /// Lends out a received buffer (while smoltcp reads it without holding the card).
    pub fn take_rx(&mut self, pair: usize, index: usize) -> Box<[u8]> {
        if index == MERGED {
            return core::mem::take(&mut self.merge);
        }
        core::mem::take(&mut self.pairs[pair].rx_bufs[index])
    }

    /// Gives a buffer back and posts it for the next frame.
    pub fn return_rx(&mut self, pair: usize, index: usize, buf: Box<[u8]>) {
        if index == MERGED {
            self.merge = buf;
            return;
        }
        self.pairs[pair].rx_bufs[index] = buf;
        // A buffer that cannot be posted again is lost; the ring has more.
        let _ = self.post_rx(pair, index);
    }

    /// Collects transmit buffers the device is done with.
    pub fn reclaim_tx(&mut self) {
        let split = self.features & F_INDIRECT_DESC != 0;
        for p in &mut self.pairs {
            while let Some(token) = p.tx.peek_used() {
                let (index, len) = p.tx_slot[usize::from(token)];
                let frame = &self.tx_bufs[index][..len];
                let (header, payload) = frame.split_at(HEADER_LEN);
                // SAFETY: the token and buffers (and their lengths) are those `add` used.
                let done = unsafe {
                    if split {
                        p.tx.pop_used(token, &[header, payload], &mut [])
                    } else {
                        p.tx.pop_used(token, &[frame], &mut [])
                    }
                };
                if done.is_err() {
                    break;
                }
                self.tx_free.push(index);
            }
        }
    }

    /// Whether a transmit buffer is free.
    pub fn can_send(&self) -> bool {
        !self.tx_free.is_empty()
    }

    /// Sends a frame of `len` bytes that `fill` writes, on the pair its flow maps to.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let index = self.tx_free.pop().expect("can_send() was checked");
        let buf = &mut self.tx_bufs[index];
        buf[..HEADER_LEN].fill(0);
        let len = len.min(BUFFER_LEN - HEADER_LEN);
        let r = fill(&mut buf[HEADER_LEN..HEADER_LEN + len]);
        let pair = flow_pair(&buf[HEADER_LEN..HEADER_LEN + len], self.pairs.len());
        let total = HEADER_LEN + len;
        let p = &mut self.pairs[pair];
        let frame = &self.tx_bufs[index][..total];
        let (header, payload) = frame.split_at(HEADER_LEN);
        // SAFETY: the boxed buffer stays put and untouched until `reclaim_tx` pops it.
        let added = unsafe {
            if self.features & F_INDIRECT_DESC != 0 {
                // Two buffers: the ring holds them in one indirect table.
                p.tx.add(&[header, payload], &mut [])
            } else {
                p.tx.add(&[frame], &mut [])
            }
        };
        match added {
            Ok(token) => {
                p.tx_slot[usize::from(token)] = (index, total);
                p.tx_frames += 1;
                if p.tx.should_notify() {
                    self.transport.notify(2 * pair as u16 + 1);
                }
            }
            Err(_) => self.tx_free.push(index),
        }
        r
    }
}
