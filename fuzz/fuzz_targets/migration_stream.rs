//! The destination of a migration on an arbitrary stream from its source: every request
//! header, payload (Start, Config, memory ranges, State, Fds headers), descriptor message
//! and the order they come in. The session ends with an outcome or an error, never a panic,
//! and never writes outside the guest's memory.
//!
//! Input: a byte n (mod 9), n marks of three bytes (where in the stream, as u16, and how
//! many descriptors, mod 9, a descriptor message carries there), then the stream.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

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

    fn run(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Descriptors the source sends: /dev/null, opened once.
fn null() -> &'static File {
    static NULL: OnceLock<File> = OnceLock::new();
    NULL.get_or_init(|| File::open("/dev/null").expect("/dev/null"))
}

fuzz_target!(|data: &[u8]| {
    // Up to 8 marks, each where in the stream (u16) a message of how many descriptors (up
    // to 8) goes, as the source sends memory and TAP descriptors.
    let Some((&marks, rest)) = data.split_first() else {
        return;
    };
    let marks = usize::from(marks % 9);
    if rest.len() < 3 * marks {
        return;
    }
    let (marks, stream) = rest.split_at(3 * marks);
    // The whole stream fits the socket's buffer, so it is written before the destination
    // reads; its answers are small and go unread.
    if stream.len() > 64 << 10 {
        return;
    }
    let mut at: Vec<(usize, usize)> = marks
        .chunks(3)
        .map(|m| {
            let pos = usize::from(u16::from_le_bytes([m[0], m[1]]));
            (pos.min(stream.len()), usize::from(m[2] % 9))
        })
        .collect();
    at.sort_unstable();
    let (source, destination) = UnixStream::pair().expect("a socket pair");
    let mut source = Channel::from(source);
    let mut from = 0;
    for (pos, count) in at {
        source
            .write_all(&stream[from..pos])
            .expect("fits the buffer");
        source
            .send_fds(&vec![null().as_fd(); count])
            .expect("fits the buffer");
        from = pos;
    }
    source.write_all(&stream[from..]).expect("fits the buffer");
    source.shutdown(Shutdown::Write).expect("shut down");
    let mut channel = Channel::from(destination);
    let limits = Limits {
        max_json: 16 << 10,
        max_state: 32 << 10,
        max_memory_message: 64 << 10,
        max_ranges: 16,
        max_fds: 8,
    };
    let mut sink = Sink {
        memory: vec![0; 64 << 10],
    };
    let _ = session::receive(&mut channel, limits, &mut sink);
});
