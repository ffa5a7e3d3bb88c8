//! virtio-rng (virtio 1.2, 5.4): one queue of device-writable buffers, filled from the host
//! kernel's `getrandom`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::DescriptorChain;

use super::worker::{self, IoVecs, Worker};
#[cfg(any(test, feature = "fuzzing"))]
use super::Interrupt;
use super::{ActivateError, Activation, ActiveQueue, GuestMemory, VirtioDevice};

/// virtio device type of an entropy source.
pub const DEVICE_TYPE: u16 = 4;
const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request: a guest asking for more gets this much.
const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker<ActiveQueue>>,
    counters: Arc<Counters>,
}

/// What the device handed out since it was created.
#[derive(Debug, Default)]
struct Counters {
    /// Random bytes written into the guest's buffers.
    bytes: AtomicU64,
    /// Buffers served.
    requests: AtomicU64,
}

/// What an entropy source carries across a snapshot or migration besides its queue: nothing
/// but its layout's version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// The layout's version ([`crate::Versioned`]).
    pub version: u32,
}

impl crate::Versioned for RngState {
    const KIND: &'static str = "virtio-rng";
    const VERSION: u32 = 1;
    fn version(&self) -> u32 {
        self.version
    }
}

impl Rng {
    /// A device that is not started yet.
    pub fn new() -> Self {
        Rng::default()
    }

    /// A device in the state `state` describes.
    pub fn restore(state: RngState) -> Result<Self, crate::StateError> {
        crate::Versioned::check_version(&state)?;
        Ok(Rng::new())
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> [u8; 3] {
        // "Other" device: virtio-rng has no class of its own.
        [0xff, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_RING_F_EVENT_IDX | super::VIRTIO_RING_F_INDIRECT_DESC
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No device configuration.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let counters = self.counters.clone();
        let serve: Box<worker::ServeChain> =
            Box::new(move |chain, mem: &GuestMemory| serve_chain(&counters, chain, mem));
        self.worker = Some(worker::spawn_single_queue("virtio-rng", activation, serve)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Nothing but the worker's queue to forget.
        self.pause();
    }

    fn pause(&mut self) -> Vec<Option<ActiveQueue>> {
        worker::stop_single_queue(&mut self.worker)
    }

    fn save(&self) -> super::DeviceState {
        super::DeviceState::Rng(RngState {
            version: <RngState as crate::Versioned>::VERSION,
        })
    }

    fn counters(&self) -> Vec<(String, u64)> {
        let c = &self.counters;
        vec![
            ("bytes".into(), c.bytes.load(Ordering::Relaxed)),
            ("requests".into(), c.requests.load(Ordering::Relaxed)),
        ]
    }
}

/// The chain handler, for the hostile-driver tests and the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn process_for_test(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
) -> Result<(), worker::QueueError> {
    let counters = Counters::default();
    let mut serve: Box<worker::ServeChain> =
        Box::new(move |chain, mem: &GuestMemory| serve_chain(&counters, chain, mem));
    worker::serve_queue(q, mem, interrupt, &mut serve)
}

/// Serves one chain; returns the bytes written. A chain that is not all writable, or points
/// outside memory, gets nothing.
fn serve_chain(
    counters: &Counters,
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
) -> u32 {
    let n = IoVecs::from_chain(mem, chain, true, usize::MAX)
        .map(|iovs| {
            let n = fill(&iovs);
            // Marked once written, so a pre-copy pass in between cannot miss it.
            iovs.mark_written(mem, n);
            n as u32
        })
        .unwrap_or_else(|e| {
            log::debug!("virtio-rng: refused a chain: {e}");
            0
        });
    counters.bytes.fetch_add(u64::from(n), Ordering::Relaxed);
    counters.requests.fetch_add(1, Ordering::Relaxed);
    n
}

/// Fills the vectors with random bytes, up to [`MAX_REQUEST`]; returns how many.
fn fill(iovs: &IoVecs) -> usize {
    let mut done = 0;
    for iov in iovs.as_slice() {
        let want = iov.iov_len.min(MAX_REQUEST - done);
        let mut filled = 0;
        while filled < want {
            // SAFETY: the vector covers `iov_len` bytes of guest memory that the driver gave
            // the device to write; `filled < want <= iov_len`.
            let n = unsafe {
                libc::getrandom(
                    iov.iov_base.cast::<u8>().add(filled).cast(),
                    want - filled,
                    0,
                )
            };
            if n <= 0 {
                return done + filled;
            }
            filled += n as usize;
        }
        done += filled;
        if done >= MAX_REQUEST {
            break;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::DeviceState;

    #[test]
    fn state_round_trips_and_other_versions_are_refused() {
        let saved = Rng::new().save();
        let json = serde_json::to_value(&saved).expect("serialises");
        assert_eq!(json, serde_json::json!({"rng": {"version": 1}}));
        let DeviceState::Rng(state) = serde_json::from_value(json).expect("parses") else {
            panic!("not an entropy state");
        };
        assert_eq!(Rng::restore(state).expect("restores").save(), saved);
        let e = Rng::restore(RngState { version: 0 })
            .err()
            .expect("refused");
        assert_eq!(
            e.to_string(),
            "virtio-rng state version 0 is not supported (this baton reads version 1)"
        );
    }
}
