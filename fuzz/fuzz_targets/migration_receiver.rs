//! The migration destination's pieces on their own, with the properties they must keep:
//! a request header that decodes encodes back to the same bytes; the receiver's state
//! machine, fed any sequence of headers and parsed Start, MemoryFds and Fds payloads, is
//! over after any error and stays as it ended; a Memory payload never yields more bytes
//! than its header announced, nor writes outside the guest.
//!
//! Input: byte 0 picks the mode (mod 3). 0: 16 bytes as a request header. 1: a run of
//! operations, each a command byte, a length byte (scaled) and, for Start, MemoryFds and
//! Fds, a payload-length byte and that JSON. 2: a Memory request, two bytes of announced
//! length, then the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::protocol::{
    self, parse_json, Command, FdsHeader, Limits, MemoryRegion, Receiver, ReceiverState,
    RequestHeader, Start,
};

/// Small limits, so that the limit checks themselves get hit.
const LIMITS: Limits = Limits {
    max_json: 4096,
    max_state: 4096,
    max_memory_message: 1 << 20,
    max_ranges: 16,
    max_fds: 8,
};

fn over(state: ReceiverState) -> bool {
    matches!(
        state,
        ReceiverState::Completed | ReceiverState::Abandoned | ReceiverState::Failed
    )
}

/// Takes `n` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fn header(input: &[u8]) {
    if let Some(head) = input.first_chunk::<16>() {
        if let Ok(h) = RequestHeader::decode(head) {
            assert_eq!(
                &h.encode(),
                head,
                "a decoded header encodes back to its bytes"
            );
        }
    }
}

fn receiver(mut input: &[u8]) {
    let mut receiver = Receiver::new(LIMITS);
    let mut last = receiver.state();
    while let Some(&[command, length]) = take(&mut input, 2) {
        let command = Command::ALL[usize::from(command) % Command::ALL.len()];
        // Lengths around every limit: small steps, then the top bit for a huge one.
        let length = match length {
            255 => u64::MAX,
            l => u64::from(l) * 64,
        };
        let header = RequestHeader { command, length };
        let applied = receiver.check(&header).and_then(|()| {
            let json = match command {
                Command::Start | Command::MemoryFds | Command::Fds => {
                    let n = take(&mut input, 1).map_or(0, |n| usize::from(n[0]));
                    take(&mut input, n).unwrap_or_default()
                }
                _ => return Ok(()),
            };
            match command {
                Command::Start => {
                    let start: Start = parse_json(command, json)?;
                    receiver.started(&start)?;
                    let ids: Vec<String> = start.devices.iter().map(|d| d.id.clone()).collect();
                    receiver.accept(&ids).map(drop)
                }
                Command::MemoryFds => {
                    let regions: Vec<MemoryRegion> = parse_json(command, json)?;
                    receiver.memory_fds(&regions)
                }
                _ => {
                    let fds: FdsHeader = parse_json(command, json)?;
                    receiver.fds(&fds)
                }
            }
        });
        if applied.is_err() && !matches!(applied, Err(protocol::ProtocolError::Json { .. })) {
            assert!(receiver.is_done(), "an error leaves the receiver over");
        }
        if over(last) {
            assert_eq!(receiver.state(), last, "once over, it stays as it ended");
        }
        last = receiver.state();
    }
}

fn memory(input: &[u8]) {
    let Some((length, mut payload)) = input.split_first_chunk::<2>() else {
        return;
    };
    let length = u64::from(u16::from_le_bytes(*length));
    let header = RequestHeader {
        command: Command::Memory,
        length,
    };
    let mut guest = vec![0u8; 64 << 10];
    let result = protocol::recv_memory(&mut payload, &header, &LIMITS, |gpa, data| {
        let start = usize::try_from(gpa).map_err(std::io::Error::other)?;
        guest
            .get_mut(start..start.saturating_add(data.len()))
            .ok_or_else(|| std::io::Error::other("outside the guest"))?
            .copy_from_slice(data);
        Ok(())
    });
    if let Ok(bytes) = result {
        assert!(
            bytes <= length,
            "{bytes} bytes from a {length}-byte payload"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => header(rest),
        1 => receiver(rest),
        _ => memory(rest),
    }
});
