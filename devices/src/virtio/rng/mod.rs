//! virtio-rng (virtio 1.2, 5.4): one queue of device-writable buffers, filled from the host
//! kernel's `getrandom`.

use std::os::fd::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use super::worker::{self, IoVecs, Worker, STOP_TOKEN};
use super::{ActivateError, Activation, ActiveQueue, GuestMemory, Interrupt, VirtioDevice};

/// virtio device type of an entropy source.
pub const DEVICE_TYPE: u16 = 4;
const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request: a guest asking for more gets this much.
const MAX_REQUEST: usize = 64 * 1024;
const NOTIFY_TOKEN: u64 = 0;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    /// A device that is not started yet.
    pub fn new() -> Self {
        Rng::default()
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
        super::VIRTIO_RING_F_EVENT_IDX
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
        let Activation {
            mem,
            mut queues,
            interrupt,
            ..
        } = activation;
        let queue = queues
            .get_mut(0)
            .and_then(Option::take)
            .ok_or(ActivateError::QueueMissing(0))?;
        let worker = Worker::spawn("virtio-rng".into(), move |events| {
            if let Err(e) = events.add(queue.notify.as_raw_fd(), NOTIFY_TOKEN, EventSet::IN) {
                log::warn!("virtio-rng: cannot watch the queue: {e}");
                return;
            }
            run(events, queue, &mem, &interrupt)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

fn run(events: worker::Events, mut q: ActiveQueue, mem: &GuestMemory, interrupt: &Interrupt) {
    let mut tokens = Vec::new();
    loop {
        if let Err(e) = events.wait(&mut tokens) {
            log::warn!("virtio-rng: epoll: {e}");
            return;
        }
        if tokens.contains(&STOP_TOKEN) {
            return;
        }
        let _ = q.notify.read();
        if let Err(e) = process(&mut q, mem, interrupt) {
            // The worker stays until the driver resets the device, but stops serving.
            log::warn!("virtio-rng: {e}; the queue stops until the driver resets the device");
            wait_for_stop(&events);
            return;
        }
    }
}

/// Parks a worker whose queue broke until it is told to stop.
pub(crate) fn wait_for_stop(events: &worker::Events) {
    let mut tokens = Vec::new();
    while events.wait(&mut tokens).is_ok() && !tokens.contains(&STOP_TOKEN) {}
}

fn process(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
) -> Result<(), worker::QueueError> {
    let mut used = false;
    loop {
        worker::disable_notification(&mut q.queue, mem)?;
        while let Some(chain) = worker::pop(&mut q.queue, mem)? {
            let head = chain.head_index();
            // A chain that is not all writable, or points outside memory, gets nothing.
            let len = IoVecs::from_chain(mem, chain, true, usize::MAX)
                .map(|iovs| fill(&iovs))
                .unwrap_or_else(|e| {
                    log::debug!("virtio-rng: refused a chain: {e}");
                    0
                });
            worker::add_used(&mut q.queue, mem, head, len as u32)?;
            used = true;
        }
        if !worker::enable_notification(&mut q.queue, mem)? {
            break;
        }
    }
    if used && worker::needs_interrupt(&mut q.queue, mem) {
        interrupt.queue(q.vector);
    }
    Ok(())
}

/// [`process`], for the hostile-driver tests.
#[cfg(test)]
pub(crate) fn process_for_test(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
) -> Result<(), worker::QueueError> {
    process(q, mem, interrupt)
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
