//! The control queue (virtio 1.2, 5.1.6.5): the driver picks how many queue pairs it uses
//! and acknowledges announcements. Other commands are acknowledged when they only ask for
//! filtering the device does not do anyway, and refused otherwise.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use net_util::TapQueues;
use virtio_queue::{Reader, Writer};

use super::STATUS_ANNOUNCE;
use crate::virtio::worker::{self, QueueError};
use crate::virtio::{ActiveQueue, GuestMemory, Interrupt, MemSlice};

const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_ANNOUNCE: u8 = 3;
const CLASS_MQ: u8 = 4;
const ANNOUNCE_ACK: u8 = 0;
const MQ_VQ_PAIRS_SET: u8 = 0;
const OK: u8 = 0;
const ERR: u8 = 1;

/// The control queue and what its commands change.
pub(super) struct Ctrl {
    pub queue: ActiveQueue,
    pub taps: Arc<TapQueues>,
    pub status: Arc<AtomicU16>,
    pub interrupt: Arc<Interrupt>,
    pub max_pairs: usize,
}

impl Ctrl {
    pub fn process(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        let mut used = false;
        while let Some(chain) = worker::pop(&mut self.queue.queue, mem)? {
            let head = chain.head_index();
            let reader = Reader::new(mem, chain.clone());
            let writer = Writer::new(mem, chain);
            let written = match (reader, writer) {
                (Ok(mut r), Ok(mut w)) => {
                    let ack = self.command(&mut r);
                    u32::from(w.write_obj(ack).is_ok())
                }
                _ => 0,
            };
            worker::add_used(&mut self.queue.queue, mem, head, written)?;
            used = true;
        }
        if used && worker::needs_interrupt(&mut self.queue.queue, mem) {
            self.interrupt.queue(self.queue.vector);
        }
        Ok(())
    }

    fn command(&mut self, r: &mut Reader<'_, MemSlice<'_>>) -> u8 {
        let (Ok(class), Ok(cmd)) = (r.read_obj::<u8>(), r.read_obj::<u8>()) else {
            return ERR;
        };
        match (class, cmd) {
            (CLASS_MQ, MQ_VQ_PAIRS_SET) => match r.read_obj::<u16>() {
                Ok(pairs) if (1..=self.max_pairs).contains(&usize::from(pairs)) => {
                    self.taps.set_active_pairs(usize::from(pairs));
                    OK
                }
                _ => ERR,
            },
            (CLASS_ANNOUNCE, ANNOUNCE_ACK) => {
                self.status.fetch_and(!STATUS_ANNOUNCE, Ordering::AcqRel);
                OK
            }
            // Receive modes and MAC filters: every frame reaches the guest regardless.
            (CLASS_RX, _) | (CLASS_MAC, _) => OK,
            _ => ERR,
        }
    }
}
