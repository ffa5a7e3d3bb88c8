//! virtio-blk (virtio 1.2, 5.2) on a raw image file: read, write, flush and get-id, with
//! read-only images and optional O_DIRECT.
//!
//! Requests are copied through a bounce buffer, which also gives O_DIRECT the aligned memory
//! it needs. A request outside the image, of an unknown type, or malformed gets an error
//! status; it never stops the device.

mod request;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use super::worker::{self, Worker, STOP_TOKEN};
use super::{ActivateError, Activation, ActiveQueue, GuestMemory, Interrupt, VirtioDevice};

pub use request::SECTOR_SIZE;

/// virtio device type of a block device.
pub const DEVICE_TYPE: u16 = 2;
const QUEUE_SIZE: u16 = 256;
const NOTIFY_TOKEN: u64 = 0;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod features {
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Flush is supported.
    pub const FLUSH: u64 = 1 << 9;
}

/// How a block device is set up.
#[derive(Debug)]
pub struct BlockParams {
    /// The open image.
    pub file: File,
    /// Refuse writes.
    pub readonly: bool,
    /// The file was opened with O_DIRECT.
    pub direct: bool,
    /// Reported by get-id (at most 20 bytes are used).
    pub serial: String,
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<request::Disk>,
    worker: Option<Worker>,
}

impl Block {
    /// A device over `params.file`; its size is fixed now.
    pub fn new(params: BlockParams) -> std::io::Result<Self> {
        let size = params.file.metadata()?.len();
        Ok(Block {
            disk: Arc::new(request::Disk {
                file: params.file,
                sectors: size / SECTOR_SIZE,
                readonly: params.readonly,
                direct: params.direct,
                serial: params.serial,
            }),
            worker: None,
        })
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..8].copy_from_slice(&self.disk.sectors.to_le_bytes());
        // size_max (8) stays 0; seg_max at 12; geometry at 16; blk_size at 20.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> [u8; 3] {
        // Mass storage, SCSI (what virtio-blk has always used).
        [0x01, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        let mut f = features::SEG_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | super::VIRTIO_RING_F_EVENT_IDX;
        if self.disk.readonly {
            f |= features::RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
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
        let disk = self.disk.clone();
        let worker = Worker::spawn("virtio-blk".into(), move |events| {
            if let Err(e) = events.add(queue.notify.as_raw_fd(), NOTIFY_TOKEN, EventSet::IN) {
                log::warn!("virtio-blk: cannot watch the queue: {e}");
                return;
            }
            run(events, queue, &mem, &interrupt, &disk)
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

fn run(
    events: worker::Events,
    mut q: ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    disk: &request::Disk,
) {
    let mut tokens = Vec::new();
    let mut bounce = request::Bounce::default();
    loop {
        if let Err(e) = events.wait(&mut tokens) {
            log::warn!("virtio-blk: epoll: {e}");
            return;
        }
        if tokens.contains(&STOP_TOKEN) {
            return;
        }
        let _ = q.notify.read();
        if let Err(e) = process(&mut q, mem, interrupt, disk, &mut bounce) {
            log::warn!("virtio-blk: {e}; the queue stops until the driver resets the device");
            super::rng::wait_for_stop(&events);
            return;
        }
    }
}

fn process(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    disk: &request::Disk,
    bounce: &mut request::Bounce,
) -> Result<(), worker::QueueError> {
    let mut used = false;
    loop {
        worker::disable_notification(&mut q.queue, mem)?;
        while let Some(chain) = worker::pop(&mut q.queue, mem)? {
            let head = chain.head_index();
            let written = request::execute(mem, chain, disk, bounce);
            worker::add_used(&mut q.queue, mem, head, written)?;
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
