//! virtio-blk (virtio 1.2, 5.2) on a raw image file: read, write, flush and get-id, with
//! read-only images and optional O_DIRECT.
//!
//! Requests are copied through a bounce buffer, which also gives O_DIRECT the aligned memory
//! it needs. A request outside the image, of an unknown type, or malformed gets an error
//! status; it never stops the device.

mod request;

use std::fs::File;
use std::sync::Arc;

use super::worker::{self, Worker};
use super::{ActivateError, Activation, ActiveQueue, GuestMemory, VirtioDevice};

pub use request::SECTOR_SIZE;

/// virtio device type of a block device.
pub const DEVICE_TYPE: u16 = 2;
const QUEUE_SIZE: u16 = 256;

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
    worker: Option<Worker<ActiveQueue>>,
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
            | super::VIRTIO_RING_F_EVENT_IDX
            | super::VIRTIO_RING_F_INDIRECT_DESC;
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
        let disk = self.disk.clone();
        let mut bounce = request::Bounce::default();
        let serve: Box<worker::ServeChain> = Box::new(move |chain, mem: &GuestMemory| {
            request::execute(mem, chain, &disk, &mut bounce)
        });
        self.worker = Some(worker::spawn_single_queue("virtio-blk", activation, serve)?);
        Ok(())
    }

    fn reset(&mut self) {
        // Nothing but the worker's queue to forget.
        self.pause();
    }

    fn pause(&mut self) -> Vec<Option<ActiveQueue>> {
        worker::stop_single_queue(&mut self.worker)
    }
}
