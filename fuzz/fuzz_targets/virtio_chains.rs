//! A hostile driver's ring served by each virtio device's own code: the fuzzer writes the
//! descriptor table, the available ring and the buffers into 1 MiB of guest memory, and
//! virtio-rng, virtio-blk (over a scratch image), virtio-net's receive queue (a frame
//! waiting on a socket in place of the TAP), its transmit queue and its control queue each
//! serve what it made available. Chains that loop, point outside memory, go the wrong way or
//! claim more than the ring holds end with an error or an empty used entry, never a panic,
//! a hang, or a write outside guest memory.
//!
//! Input: byte 0 picks the device; byte 1 the ring size (1 << (b % 9)) and, with bit 7,
//! event indices; byte 2 the length of the waiting frame (in 8-byte units); the rest is
//! guest memory from address 0: the descriptor table at 0, the available ring at 0x1000,
//! the used ring at 0x2000, buffers anywhere.
#![no_main]

use std::sync::OnceLock;

use devices::virtio::fuzz::{self, Backends, Ring, Target};
use devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 1 << 20;

/// The backends, made once: a 64 KiB image and a socket pair.
fn backends() -> &'static Backends {
    static BACKENDS: OnceLock<Backends> = OnceLock::new();
    BACKENDS.get_or_init(|| Backends::new(64 << 10).expect("fuzz backends"))
}

fuzz_target!(|data: &[u8]| {
    let [pick, shape, frame, rest @ ..] = data else {
        return;
    };
    let target = match pick % 7 {
        0 => Target::Rng,
        1 => Target::Block { readonly: false },
        2 => Target::Block { readonly: true },
        3 => Target::NetRx { mergeable: false },
        4 => Target::NetRx { mergeable: true },
        5 => Target::NetTx,
        _ => Target::NetCtrl,
    };
    let ring = Ring {
        size: 1 << (shape % 9),
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
        event_idx: shape & 0x80 != 0,
    };
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("guest memory");
    let n = rest.len().min(MEMORY);
    mem.write_slice(&rest[..n], GuestAddress(0))
        .expect("inside memory");
    let Some(q) = fuzz::queue(&mem, ring) else {
        return;
    };
    let b = backends();
    let waiting = vec![0x5a; usize::from(*frame) * 8 + 12];
    let rx = matches!(target, Target::NetRx { .. });
    b.reset(rx.then_some(&waiting[..]))
        .expect("reset the socket");
    let _ = fuzz::serve(target, q, &mem, b);
});
