//! One queue pair's data path: frames from the TAP into the guest's receive buffers, and
//! the guest's transmit chains out to the TAP.
//!
//! The TAP descriptor is watched edge-triggered: after it becomes readable the worker reads
//! until the kernel has no more frames or the guest has no more buffers. In the second case
//! `tap_pending` stays set and reading resumes when the guest adds buffers, so frames wait
//! in the kernel's queue, never dropped here.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use net_util::tap::VNET_HDR_LEN;
use net_util::Tap;
use virtio_queue::QueueOwnedT;
use vmm_sys_util::epoll::EventSet;

use super::ctrl::Ctrl;
use super::{Counters, MAX_FRAME};
use crate::virtio::worker::{self, Events, IoVecs, QueueError, STOP_TOKEN};
use crate::virtio::{ActiveQueue, GuestMemory, Interrupt};

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const CTRL_TOKEN: u64 = 3;
/// How long a transmit queue is polled for more frames before notifications go back on.
const TX_POLL: std::time::Duration = std::time::Duration::from_micros(50);

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
        if let Err(e) = self.watch(&events) {
            log::warn!("virtio-net: cannot watch queues: {e}");
            return self;
        }
        // Frames may have queued before the guest was ready (or while the device was
        // paused); buffers may already be there.
        self.tap_pending = true;
        let mut tokens = vec![RX_TOKEN, TX_TOKEN, CTRL_TOKEN];
        loop {
            if tokens.contains(&STOP_TOKEN) {
                return self;
            }
            if let Err(e) = self.step(&tokens) {
                self.broken(&events, e);
                return self;
            }
            if let Err(e) = events.wait(&mut tokens) {
                log::warn!("virtio-net: epoll: {e}");
                return self;
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
    fn receive(&mut self) -> Result<(), QueueError> {
        let mem = &self.mem;
        let q = &mut self.rx.queue;
        let mut used = 0u32;
        loop {
            let Some(chain) = worker::pop(q, mem)? else {
                // Out of buffers: ask the driver to notify when it adds some, unless it
                // already did meanwhile.
                if worker::enable_notification(q, mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let iovs = match IoVecs::from_chain(mem, chain, true, usize::MAX) {
                Ok(v) if v.len() >= VNET_HDR_LEN => v,
                Ok(_) | Err(_) => {
                    // Unusable buffer: give it back empty and go on.
                    worker::add_used(q, mem, head, 0)?;
                    used += 1;
                    continue;
                }
            };
            match self.tap.readv(iovs.as_slice()) {
                Ok(Some(n)) => {
                    // One buffer per frame: num_buffers is 1 (virtio 1.2, 5.1.6.4).
                    iovs.write_at(VNET_HDR_LEN - 2, &1u16.to_le_bytes());
                    worker::add_used(q, mem, head, n as u32)?;
                    used += 1;
                    let frame = n.saturating_sub(VNET_HDR_LEN) as u64;
                    self.counters.rx_bytes.fetch_add(frame, Ordering::Relaxed);
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    // Long bursts: let the guest start on what it has.
                    if used % 64 == 0 && worker::needs_interrupt(q, mem) {
                        self.interrupt.queue(self.rx.vector);
                    }
                }
                Ok(None) => {
                    q.go_to_previous_position();
                    self.tap_pending = false;
                    break;
                }
                Err(e) => {
                    log::debug!("virtio-net: TAP read: {e}");
                    q.go_to_previous_position();
                    self.tap_pending = false;
                    break;
                }
            }
        }
        if used > 0 && worker::needs_interrupt(q, mem) {
            self.interrupt.queue(self.rx.vector);
        }
        Ok(())
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
