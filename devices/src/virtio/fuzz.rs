//! Entry points for cargo fuzz (feature `fuzzing`, never in baton itself): a driver's ring,
//! laid out by the fuzzer in guest memory, served once by a device as its worker serves it,
//! with the device's own code from the descriptor walk to the used entry.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::QueueConfig;
use super::worker::QueueError;
use super::{ActiveQueue, GuestMemory, Interrupt};

/// Which device serves the ring.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// virtio-rng's request queue.
    Rng,
    /// virtio-blk's request queue, over a scratch image.
    Block {
        /// The image refuses writes.
        readonly: bool,
    },
    /// virtio-net's receive queue, with one frame waiting on the backend.
    NetRx {
        /// Frames may span chains (VIRTIO_NET_F_MRG_RXBUF).
        mergeable: bool,
    },
    /// virtio-net's transmit queue.
    NetTx,
    /// virtio-net's control queue.
    NetCtrl,
}

/// Where the driver put one split ring.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    /// Entries (a power of two up to 256, or the queue is refused).
    pub size: u16,
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

/// What the device's backend is, besides memory: a scratch image for a disk, one end of a
/// datagram socket pair for a network card (the other end, `peer`, holds a frame for it).
pub struct Backends {
    /// The disk image.
    pub image: std::fs::File,
    /// The network card's end.
    pub net: OwnedFd,
    /// The other end.
    pub peer: OwnedFd,
}

impl Backends {
    /// A scratch image of `image_len` bytes (in memory, filled with 0xa5) and a
    /// non-blocking datagram socket pair.
    pub fn new(image_len: usize) -> std::io::Result<Self> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the descriptor it
        // returns is new and ours.
        let raw = unsafe { libc::memfd_create(c"baton-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just created and nobody else owns.
        let mut image = unsafe { std::fs::File::from_raw_fd(raw) };
        image.write_all(&vec![0xa5; image_len])?;
        let (net, peer) = UnixDatagram::pair()?;
        net.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        Ok(Backends {
            image,
            net: OwnedFd::from(net),
            peer: OwnedFd::from(peer),
        })
    }

    /// Empties both ends of the socket, then, if `frame` is given, has it wait for the
    /// network card: each input starts with the socket as fresh.
    pub fn reset(&self, frame: Option<&[u8]>) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 17];
        let end = |fd: &OwnedFd| fd.try_clone().map(UnixDatagram::from);
        let (net, peer) = (end(&self.net)?, end(&self.peer)?);
        while net.recv(&mut buf).is_ok() {}
        while peer.recv(&mut buf).is_ok() {}
        if let Some(frame) = frame {
            peer.send(frame)?;
        }
        Ok(())
    }
}

/// Builds the queue the driver described, as the transport does when the driver enables
/// it; `None` if the transport would refuse it.
pub fn queue(mem: &GuestMemory, ring: Ring) -> Option<ActiveQueue> {
    let config = QueueConfig {
        max_size: 256,
        size: ring.size,
        enabled: true,
        msix_vector: 0,
        desc: ring.desc,
        driver: ring.avail,
        device: ring.used,
    };
    Some(ActiveQueue {
        queue: super::transport::queue_of(&config, ring.event_idx, mem)?,
        notify: EventFd::new(libc::EFD_NONBLOCK).ok()?,
        vector: 0,
    })
}

/// A queue the driver never enabled, for the other slots of a network card's pair.
pub(crate) fn idle_queue() -> ActiveQueue {
    ActiveQueue {
        queue: Queue::new(256).expect("256 is a valid queue size"),
        notify: EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
        vector: 0,
    }
}

/// Serves every chain the driver made available on `q`, once, as `target`.
pub fn serve(
    target: Target,
    q: ActiveQueue,
    mem: &GuestMemory,
    backends: &Backends,
) -> Result<(), QueueError> {
    let interrupt = std::sync::Arc::new(Interrupt::for_test(1));
    match target {
        Target::Rng => {
            let mut q = q;
            super::rng::process_for_test(&mut q, mem, &interrupt)
        }
        Target::Block { readonly } => {
            super::block::process_for_fuzzing(q, mem, &interrupt, &backends.image, readonly)
        }
        Target::NetRx { .. } | Target::NetTx | Target::NetCtrl => {
            super::net::process_for_fuzzing(target, q, mem, interrupt, backends)
        }
    }
}
