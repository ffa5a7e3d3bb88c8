//! One queue pair's data path: frames from the TAP into the guest's receive buffers, and
//! the guest's transmit chains out to the TAP.
//!
//! The TAP descriptor is watched edge-triggered: after it becomes readable the worker reads
//! until the kernel has no more frames or the guest has no more buffers. In the second case
//! `tap_pending` stays set and reading resumes when the guest adds buffers, so frames wait
//! in the kernel's queue, never dropped here.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use net_util::tap::VNET_HDR_LEN;
use net_util::Tap;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::ctrl::Ctrl;
use super::{Counters, MAX_FRAME};
use crate::virtio::worker::{self, Events, IoVecs, QueueError, UsedSince, STOP_TOKEN};
use crate::virtio::{ActiveQueue, GuestMemory, Interrupt};

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const CTRL_TOKEN: u64 = 3;
/// How long a transmit queue is polled for more frames before notifications go back on.
const TX_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A receive chain taken from the ring and not handed back yet.
pub(super) enum Taken {
    /// Writable guest memory, at least a header long.
    Buffer(u16, IoVecs),
    /// A chain the device cannot write a frame into; it goes back empty.
    Unusable(u16),
}

impl Taken {
    fn buffer(&self) -> Option<&IoVecs> {
        match self {
            Taken::Buffer(_, v) => Some(v),
            Taken::Unusable(_) => None,
        }
    }
}

/// How much receive room a frame needs before the TAP is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Room {
    /// One chain per frame (no VIRTIO_NET_F_MRG_RXBUF).
    Chain,
    /// At least this many bytes, over as many chains as it takes.
    Bytes(usize),
}

fn fits(taken: &VecDeque<Taken>, room: Room) -> bool {
    match room {
        Room::Chain => taken.iter().any(|t| t.buffer().is_some()),
        Room::Bytes(want) => {
            taken
                .iter()
                .filter_map(Taken::buffer)
                .map(IoVecs::len)
                .sum::<usize>()
                >= want
        }
    }
}

/// What a queue-pair worker owns.
pub(super) struct QueuePair {
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub tap: Arc<Tap>,
    pub mem: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<Counters>,
    /// The control queue, served by the first pair's worker.
    pub ctrl: Option<Ctrl>,
    /// The TAP may hold frames the guest had no buffers for.
    pub tap_pending: bool,
    /// Receive room a frame needs; [`Room::Bytes`] when frames may span several chains.
    pub room: Room,
    /// Receive chains taken from the ring and not filled yet, in ring order: kept for the
    /// next frames rather than taken again for each (a frame needs room for the largest one,
    /// dozens of chains with mergeable buffers), and given back when the worker stops.
    pub rx_taken: VecDeque<Taken>,
    /// Where the receive queue's used index was at the last interrupt decision.
    pub rx_used: UsedSince,
}

impl QueuePair {
    fn watch(&self, events: &Events) -> std::io::Result<()> {
        events.add(self.rx.notify.as_raw_fd(), RX_TOKEN, EventSet::IN)?;
        events.add(self.tx.notify.as_raw_fd(), TX_TOKEN, EventSet::IN)?;
        events.add(
            self.tap.as_raw_fd(),
            TAP_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        if let Some(c) = &self.ctrl {
            events.add(c.queue.notify.as_raw_fd(), CTRL_TOKEN, EventSet::IN)?;
        }
        Ok(())
    }

    /// Runs until stopped; hands itself back, queues where they are.
    pub fn run(mut self, events: Events) -> Self {
        self.serve(&events);
        // Hand back exactly where the driver's rings stand: chains held for the next
        // frame go back to the ring.
        for _ in 0..self.rx_taken.len() {
            self.rx.queue.go_to_previous_position();
        }
        self.rx_taken.clear();
        self
    }

    fn serve(&mut self, events: &Events) {
        if let Err(e) = self.watch(events) {
            log::warn!("virtio-net: cannot watch queues: {e}");
            return;
        }
        // Frames may have queued before the guest was ready (or while the device was
        // paused); buffers may already be there.
        self.tap_pending = true;
        let mut tokens = vec![RX_TOKEN, TX_TOKEN, CTRL_TOKEN];
        loop {
            if tokens.contains(&STOP_TOKEN) {
                return;
            }
            if let Err(e) = self.step(&tokens) {
                self.broken(events, e);
                return;
            }
            if let Err(e) = events.wait(&mut tokens) {
                log::warn!("virtio-net: epoll: {e}");
                return;
            }
        }
    }

    fn broken(&self, events: &Events, e: QueueError) {
        log::warn!(
            "virtio-net: {}; the device stops until the driver resets it",
            crate::error_chain(&e)
        );
        self.interrupt.device_broken();
        worker::wait_for_stop(events);
    }

    fn step(&mut self, tokens: &[u64]) -> Result<(), QueueError> {
        if tokens.contains(&TX_TOKEN) {
            let _ = self.tx.notify.read();
            self.transmit()?;
        }
        if tokens.contains(&RX_TOKEN) {
            let _ = self.rx.notify.read();
        }
        if tokens.contains(&TAP_TOKEN) {
            self.tap_pending = true;
        }
        if self.tap_pending && (tokens.contains(&TAP_TOKEN) || tokens.contains(&RX_TOKEN)) {
            self.receive()?;
        }
        if tokens.contains(&CTRL_TOKEN) {
            if let Some(c) = &mut self.ctrl {
                let _ = c.queue.notify.read();
                c.process(&self.mem)?;
            }
        }
        Ok(())
    }

    /// Moves frames from the TAP into receive buffers until either runs out.
    ///
    /// Without VIRTIO_NET_F_MRG_RXBUF a frame takes one chain. With it, a frame may spread
    /// over several (the header's num_buffers says how many), so the chains taken must hold
    /// the largest frame the TAP can give ([`QueuePair::room`]) before reading: the TAP
    /// hands a frame over whole or not at all. Chains taken but not filled wait in
    /// [`QueuePair::rx_taken`] for the next frames; [`QueuePair::run`] gives them back to the
    /// ring when it stops, so the driver loses none.
    fn receive(&mut self) -> Result<(), QueueError> {
        let mem = &self.mem;
        let q = &mut self.rx.queue;
        let size = usize::from(q.size());
        let taken = &mut self.rx_taken;
        let mut frames = 0u32;
        loop {
            // Take chains until they can hold a frame, or the ring has no more.
            while !fits(taken, self.room) && taken.len() < size {
                let Some(chain) = worker::pop(q, mem)? else {
                    break;
                };
                let head = chain.head_index();
                taken.push_back(match IoVecs::from_chain(mem, chain, true, usize::MAX) {
                    Ok(v) if v.len() >= VNET_HDR_LEN => Taken::Buffer(head, v),
                    // Unusable: given back empty when its turn comes.
                    Ok(_) | Err(_) => Taken::Unusable(head),
                });
            }
            while let Some(Taken::Unusable(head)) = taken.front() {
                worker::add_used_together(q, mem, &[(*head, 0)])?;
                taken.pop_front();
            }
            if !fits(taken, self.room) && taken.len() < size {
                // Out of buffers: ask the driver to notify when it adds some, unless it
                // already did meanwhile.
                if worker::enable_notification(q, mem)? {
                    continue;
                }
                break;
            }
            let iovs: Vec<libc::iovec> = taken
                .iter()
                .filter_map(Taken::buffer)
                .flat_map(|b| b.as_slice().iter().copied())
                .take(libc::UIO_MAXIOV as usize)
                .collect();
            if iovs.is_empty() {
                break;
            }
            let n = match self.tap.readv(&iovs) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    self.tap_pending = false;
                    break;
                }
                Err(e) => {
                    log::debug!("virtio-net: TAP read: {e}");
                    self.tap_pending = false;
                    break;
                }
            };
            // The chains the frame filled, in order, each with what it holds; unusable
            // ones among them go back empty, apart from the frame.
            let mut left = n;
            let mut filled: Vec<(u16, u32)> = Vec::new();
            let mut first: Option<IoVecs> = None;
            while let Some(t) = taken.pop_front() {
                match t {
                    Taken::Unusable(head) => worker::add_used_together(q, mem, &[(head, 0)])?,
                    Taken::Buffer(head, v) => {
                        let part = left.min(v.len());
                        v.mark_written(mem, part);
                        filled.push((head, part as u32));
                        left -= part;
                        first.get_or_insert(v);
                    }
                }
                if left == 0 || self.room == Room::Chain {
                    break;
                }
            }
            // num_buffers, written before the driver can see the frame.
            if let Some(v) = first {
                v.write_at(VNET_HDR_LEN - 2, &(filled.len() as u16).to_le_bytes());
            }
            worker::add_used_together(q, mem, &filled)?;
            let frame = n.saturating_sub(VNET_HDR_LEN) as u64;
            self.counters.rx_bytes.fetch_add(frame, Ordering::Relaxed);
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            frames += 1;
            // Long bursts: let the guest start on what it has.
            if frames % 64 == 0 && self.rx_used.needs_interrupt(q, mem) {
                self.interrupt.queue(self.rx.vector);
            }
        }
        if self.rx_used.needs_interrupt(q, mem) {
            self.interrupt.queue(self.rx.vector);
        }
        Ok(())
    }

    /// [`QueuePair::receive`], for the fuzz targets.
    #[cfg(feature = "fuzzing")]
    pub(super) fn fuzz_receive(&mut self) -> Result<(), QueueError> {
        self.receive()
    }

    /// [`QueuePair::transmit`], for the fuzz targets.
    #[cfg(feature = "fuzzing")]
    pub(super) fn fuzz_transmit(&mut self) -> Result<(), QueueError> {
        self.transmit()
    }

    /// Sends every chain the driver queued for transmission.
    fn transmit(&mut self) -> Result<(), QueueError> {
        let mem = &self.mem;
        let q = &mut self.tx.queue;
        let mut used = false;
        loop {
            worker::disable_notification(q, mem)?;
            while let Some(chain) = worker::pop(q, mem)? {
                let head = chain.head_index();
                match IoVecs::from_chain(mem, chain, false, MAX_FRAME) {
                    Ok(iovs) if iovs.len() > VNET_HDR_LEN => match self.tap.writev(iovs.as_slice())
                    {
                        Ok(_) => {
                            let frame = (iovs.len() - VNET_HDR_LEN) as u64;
                            self.counters.tx_bytes.fetch_add(frame, Ordering::Relaxed);
                            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => log::debug!("virtio-net: TAP write dropped a frame: {e}"),
                    },
                    Ok(_) => log::debug!("virtio-net: dropped a frame shorter than its header"),
                    Err(e) => log::debug!("virtio-net: dropped a transmit chain: {e}"),
                }
                worker::add_used(q, mem, head, 0)?;
                used = true;
            }
            // A guest that is sending keeps adding frames: wait a little for the next one
            // rather than have it pay a notification exit per frame.
            if worker::wait_for_avail(q, mem, TX_POLL) {
                continue;
            }
            if !worker::enable_notification(q, mem)? {
                break;
            }
        }
        if used && worker::needs_interrupt(q, mem) {
            self.interrupt.queue(self.tx.vector);
        }
        Ok(())
    }
}
