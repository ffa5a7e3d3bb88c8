//! The destination of a migration on an arbitrary byte stream from its source: every
//! request header, payload (Start, Config, memory ranges, State, Fds headers) and the order
//! they come in. The session ends with an outcome or an error, never a panic, and never
//! writes outside the guest's memory.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use migration::protocol::{FdsHeader, Limits, MemoryRegion, Start};
use migration::session::{self, Destination};
use migration::{snapshot, BoxError, Channel};

/// A destination with 64 KiB of guest memory that accepts TAP backends.
struct Sink {
    memory: Vec<u8>,
}

impl Destination for Sink {
    fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError> {
        Ok(start.devices.iter().map(|d| d.id.clone()).collect())
    }

    fn memory_fds(&mut self, _: Vec<MemoryRegion>, _: Vec<OwnedFd>) -> Result<(), BoxError> {
        Ok(())
    }

    fn config(&mut self, config: Vec<u8>) -> Result<(), BoxError> {
        serde_json::from_slice::<api::VmConfig>(&config)?;
        Ok(())
    }

    fn write_memory(&mut self, gpa: u64, data: &[u8]) -> std::io::Result<()> {
        let start = usize::try_from(gpa).map_err(std::io::Error::other)?;
        self.memory
            .get_mut(start..start.saturating_add(data.len()))
            .ok_or_else(|| std::io::Error::other("outside the guest"))?
            .copy_from_slice(data);
        Ok(())
    }

    fn state(&mut self, state: Vec<u8>) -> Result<(), BoxError> {
        snapshot::decode::<vmm::vm::VmState>(&state)?;
        Ok(())
    }

    fn backend_fds(&mut self, _: FdsHeader, _: Vec<OwnedFd>) -> Result<(), BoxError> {
        Ok(())
    }

    fn complete(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // The whole stream fits the socket's buffer, so it is written before the destination
    // reads; its answers are small and go unread.
    if data.len() > 64 << 10 {
        return;
    }
    let (mut source, destination) = UnixStream::pair().expect("a socket pair");
    source.write_all(data).expect("fits the buffer");
    source.shutdown(Shutdown::Write).expect("shut down");
    let mut channel = Channel::from(destination);
    let limits = Limits {
        max_json: 16 << 10,
        max_state: 16 << 10,
        max_memory_message: 64 << 10,
        max_ranges: 16,
        max_fds: 8,
    };
    let mut sink = Sink {
        memory: vec![0; 64 << 10],
    };
    let _ = session::receive(&mut channel, limits, &mut sink);
});
