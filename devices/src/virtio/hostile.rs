//! Hostile drivers: descriptor chains that loop, point outside guest memory, have zero
//! lengths or the wrong direction, and available indices that run ahead of the ring. Every
//! device must answer them with an error status, an empty used entry or a stopped queue,
//! and never panic or spin.

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{self, IoVecs};
use super::{ActiveQueue, GuestMemory, Interrupt};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const SIZE: u16 = 16;
/// Buffers live from here; the rings sit below.
const DATA: u64 = 0x10_0000;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("test memory")
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Every malformed chain a test offers, each as the raw descriptors of one chain.
fn hostile_chains() -> Vec<(&'static str, Vec<RawDescriptor>)> {
    vec![
        // 0 -> 1 -> 0 -> ...: add_desc_chains keeps our `next` values.
        (
            "loop",
            vec![
                desc(DATA, 64, NEXT | WRITE, 1),
                desc(DATA, 64, NEXT | WRITE, 0),
            ],
        ),
        (
            "outside memory",
            vec![desc(0xffff_ffff_0000, 4096, WRITE, 0)],
        ),
        (
            "crosses the end of memory",
            vec![desc((4 << 20) - 8, 4096, WRITE, 0)],
        ),
        ("zero length", vec![desc(DATA, 0, WRITE, 0)]),
        ("wrong direction", vec![desc(DATA, 64, 0, 0)]),
        (
            "next out of the table",
            vec![desc(DATA, 64, NEXT | WRITE, 999)],
        ),
        ("huge length", vec![desc(DATA, u32::MAX, WRITE, 0)]),
    ]
}

fn queue_with<'m>(
    mem: &'m GuestMemory,
    chain: &[RawDescriptor],
) -> (MockSplitQueue<'m, GuestMemory>, Queue) {
    let mock = MockSplitQueue::new(mem, SIZE);
    mock.add_desc_chains(chain, 0).expect("write the chain");
    let queue: Queue = mock.create_queue().expect("queue");
    (mock, queue)
}

fn used_idx(mem: &GuestMemory, mock: &MockSplitQueue<'_, GuestMemory>) -> u16 {
    mem.read_obj::<u16>(GuestAddress(mock.used_addr().0 + 2))
        .expect("used index")
}

#[test]
fn io_vectors_refuse_malformed_chains() {
    for (what, chain) in hostile_chains() {
        let mem = memory();
        let (_mock, mut queue) = queue_with(&mem, &chain);
        // Popping and walking the chain must end, whatever it holds.
        if let Ok(Some(c)) = worker::pop(&mut queue, &mem) {
            let got = IoVecs::from_chain(&mem, c, true, 1 << 20);
            if let Ok(v) = got {
                assert!(v.len() <= 1 << 20, "{what}: {} bytes", v.len());
            }
        }
    }
}

#[test]
fn entropy_device_survives_malformed_chains() {
    for (what, chain) in hostile_chains() {
        let mem = memory();
        let (mock, queue) = queue_with(&mem, &chain);
        let mut q = ActiveQueue {
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            vector: 0,
        };
        let interrupt = Interrupt::for_test(2);
        super::rng::process_for_test(&mut q, &mem, &interrupt)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // The chain came back (used), with nothing or something written, never more than
        // the device may hand out.
        assert_eq!(used_idx(&mem, &mock), 1, "{what}");
    }
}

#[test]
fn available_index_running_ahead_stops_the_queue() {
    let mem = memory();
    let (mock, queue) = queue_with(&mem, &[desc(DATA, 64, WRITE, 0)]);
    // The driver claims 1000 new chains in a ring of 16.
    mem.write_obj::<u16>(1000, GuestAddress(mock.avail_addr().0 + 2))
        .unwrap();
    let mut q = ActiveQueue {
        queue,
        notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        vector: 0,
    };
    let interrupt = Interrupt::for_test(2);
    assert!(super::rng::process_for_test(&mut q, &mem, &interrupt).is_err());
    assert_eq!(used_idx(&mem, &mock), 0);
}

#[test]
fn queue_outside_memory_is_not_valid() {
    let mem = memory();
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(SIZE);
    q.set_desc_table_address(Some(0xffff_0000), Some(0xffff));
    q.set_ready(true);
    assert!(!q.is_valid(&mem));
}
