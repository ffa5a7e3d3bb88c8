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
    /// Serves every command the driver queued. Notifications go back on at the end: with
    /// VIRTIO_RING_F_EVENT_IDX that publishes where the device is (avail_event), without
    /// which the driver stops notifying after its first command, and Linux, which waits for
    /// each command's answer with interrupts off, spins forever on its second one.
    pub fn process(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        let mut used = false;
        loop {
            worker::disable_notification(&mut self.queue.queue, mem)?;
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
            if !worker::enable_notification(&mut self.queue.queue, mem)? {
                break;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU16;
    use std::sync::Arc;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const CMD: u64 = 0x10_0000;
    const ACK: u64 = 0x10_1000;

    fn ctrl(queue: Queue) -> Ctrl {
        Ctrl {
            queue: ActiveQueue {
                queue,
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                vector: 0,
            },
            taps: Arc::new(TapQueues::new(Vec::new()).unwrap()),
            status: Arc::new(AtomicU16::new(STATUS_ANNOUNCE | 1)),
            interrupt: Arc::new(Interrupt::for_test(2)),
            max_pairs: 1,
        }
    }

    /// Regression: the control queue never published its avail_event, so a driver using
    /// VIRTIO_RING_F_EVENT_IDX stopped notifying after its first command; Linux then spun
    /// forever on the announcement acknowledgement that follows a migration.
    #[test]
    fn publishes_where_it_is_so_event_index_drivers_keep_notifying() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mem.write_slice(&[CLASS_ANNOUNCE, ANNOUNCE_ACK], GuestAddress(CMD))
            .unwrap();
        let chain = |first: u16| {
            [
                RawDescriptor::from(Descriptor::new(CMD, 2, NEXT, first + 1)),
                RawDescriptor::from(Descriptor::new(ACK, 1, WRITE, 0)),
            ]
        };
        mock.add_desc_chains(&chain(0), 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_event_idx(true);
        let mut c = ctrl(queue);
        c.process(&mem).unwrap();
        assert_eq!(c.status.load(Ordering::Acquire), 1, "announce acknowledged");
        // avail_event sits after the used ring's entries: 4 + 8 * size.
        let avail_event = GuestAddress(mock.used_addr().0 + 4 + 8 * 16);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);

        // A second command, queued after the first was served, is also taken.
        mock.add_desc_chains(&chain(2), 2).unwrap();
        c.status.fetch_or(STATUS_ANNOUNCE, Ordering::AcqRel);
        c.process(&mem).unwrap();
        assert_eq!(c.status.load(Ordering::Acquire), 1);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ACK)).unwrap(), OK);
    }
}
