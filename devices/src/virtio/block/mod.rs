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

/// What a disk carries across a snapshot or migration besides its queues: the size the guest
/// was told, which the image must still have.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// The layout's version ([`crate::Versioned`]).
    pub version: u32,
    /// The capacity the guest read, in 512-byte sectors.
    pub sectors: u64,
}

impl crate::Versioned for BlockState {
    const KIND: &'static str = "virtio-blk";
    const VERSION: u32 = 1;
    fn version(&self) -> u32 {
        self.version
    }
}

/// Why a disk could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image's size cannot be read.
    #[error("Cannot read the image's size")]
    Size(#[source] std::io::Error),
    /// The state does not fit.
    #[error("The saved state does not fit this disk")]
    State(#[source] crate::StateError),
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<request::Disk>,
    worker: Option<Worker<ActiveQueue>>,
}

impl Block {
    /// A device over `params.file`, as at power-on; its size is fixed now.
    pub fn new(params: BlockParams) -> Result<Self, Error> {
        let size = params.file.metadata().map_err(Error::Size)?.len();
        Ok(Self::build(params, size / SECTOR_SIZE))
    }

    /// A device over `params.file` in the state `state` describes: the image must have the
    /// size the guest was told.
    pub fn restore(params: BlockParams, state: BlockState) -> Result<Self, Error> {
        crate::Versioned::check_version(&state).map_err(Error::State)?;
        let block = Self::new(params)?;
        if block.disk.sectors != state.sectors {
            return Err(Error::State(crate::StateError::Invalid(format!(
                "the image has {} sectors, but the guest was told {}",
                block.disk.sectors, state.sectors
            ))));
        }
        Ok(block)
    }

    fn build(params: BlockParams, sectors: u64) -> Self {
        Block {
            disk: Arc::new(request::Disk {
                file: params.file,
                sectors,
                readonly: params.readonly,
                direct: params.direct,
                serial: params.serial,
            }),
            worker: None,
        }
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

    fn save(&self) -> super::DeviceState {
        super::DeviceState::Block(BlockState {
            version: <BlockState as crate::Versioned>::VERSION,
            sectors: self.disk.sectors,
        })
    }
}

/// Serves every available chain of `q` once over `image`, as the worker does, for the fuzz
/// targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn process_for_fuzzing(
    mut q: ActiveQueue,
    mem: &GuestMemory,
    interrupt: &super::Interrupt,
    image: &File,
    readonly: bool,
) -> Result<(), worker::QueueError> {
    let size = image.metadata().map(|m| m.len()).unwrap_or(0);
    let disk = request::Disk {
        file: image
            .try_clone()
            .expect("the fuzz target's image duplicates"),
        sectors: size / SECTOR_SIZE,
        readonly,
        direct: false,
        serial: "fuzz".into(),
    };
    let mut bounce = request::Bounce::default();
    let mut serve: Box<worker::ServeChain> =
        Box::new(move |chain, mem: &GuestMemory| request::execute(mem, chain, &disk, &mut bounce));
    worker::serve_queue(&mut q, mem, interrupt, &mut serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::DeviceState;

    fn image(sectors: u64) -> BlockParams {
        let file = tempfile_of(sectors * SECTOR_SIZE);
        BlockParams {
            file,
            readonly: false,
            direct: false,
            serial: "disk0".into(),
        }
    }

    /// An unlinked file of `len` bytes.
    fn tempfile_of(len: u64) -> File {
        let path = std::env::temp_dir().join(format!(
            "baton-block-state-{}-{len}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("temporary image");
        std::fs::remove_file(&path).expect("unlinked");
        file.set_len(len).expect("sized");
        file
    }

    #[test]
    fn state_round_trips_and_other_versions_or_sizes_are_refused() {
        let saved = Block::new(image(8)).expect("opens").save();
        assert_eq!(
            saved,
            DeviceState::Block(BlockState {
                version: 1,
                sectors: 8
            })
        );
        let json = serde_json::to_value(&saved).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"block": {"version": 1, "sectors": 8}})
        );
        let DeviceState::Block(state) = serde_json::from_value(json).expect("parses") else {
            panic!("not a block state");
        };
        let restored = Block::restore(image(8), state.clone()).expect("restores");
        assert_eq!(restored.save(), saved);

        let e = Block::restore(
            image(8),
            BlockState {
                version: 7,
                ..state.clone()
            },
        )
        .err()
        .expect("another version");
        assert_eq!(
            crate::error_chain(&e),
            "The saved state does not fit this disk: virtio-blk state version 7 is not supported (this baton reads version 1)"
        );
        let e = Block::restore(image(16), state)
            .err()
            .expect("another size");
        assert_eq!(
            crate::error_chain(&e),
            "The saved state does not fit this disk: the image has 16 sectors, but the guest was told 8"
        );
        // The layout before versions (format 1) saved nothing for a disk: it does not parse.
        assert!(serde_json::from_value::<DeviceState>(serde_json::Value::Null).is_err());
    }
}
