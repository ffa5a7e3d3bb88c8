//! A destination serving a session that ends early: every cut of a valid session, copying
//! memory or handing descriptors over, at and around every message boundary, must end with
//! the end of the stream as the error, never a panic, a hang or a completed VM. Arbitrary
//! and mutated streams are the fuzz targets' (`migration_stream`, `migration_receiver`,
//! `vm_state`, `option_string`: scripts/fuzz.sh).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use migration::protocol::{
    self, to_json, Command, FdsHeader, Limits, MemoryRanges, MemoryRegion, ProposedBackend,
    RequestHeader, Start, PROTOCOL_VERSION,
};
use migration::session::{self, Destination, Outcome};
use migration::{snapshot, BoxError, Channel};

fn header(command: Command, length: u64) -> RequestHeader {
    RequestHeader { command, length }
}

/// A destination with 64 KiB of guest memory that takes TAP backends and checks the state.
struct Sink {
    memory: Vec<u8>,
    fds: usize,
}

impl Destination for Sink {
    fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError> {
        Ok(start
            .devices
            .iter()
            .filter(|d| d.kind == "virtio-net-tap")
            .map(|d| d.id.clone())
            .collect())
    }

    fn memory_fds(&mut self, _: Vec<MemoryRegion>, fds: Vec<OwnedFd>) -> Result<(), BoxError> {
        self.fds += fds.len();
        Ok(())
    }

    fn config(&mut self, config: Vec<u8>) -> Result<(), BoxError> {
        serde_json::from_slice::<serde_json::Value>(&config)?;
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
        snapshot::decode::<serde_json::Value>(&state)?;
        Ok(())
    }

    fn backend_fds(&mut self, _: FdsHeader, fds: Vec<OwnedFd>) -> Result<(), BoxError> {
        self.fds += fds.len();
        Ok(())
    }

    fn complete(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    fn run(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// What the source puts on the wire: bytes, or descriptors (which count as one byte each
/// message, since that is what carries them).
enum Op {
    Bytes(Vec<u8>),
    Fds(usize),
}

fn request(command: Command, payload: &[u8]) -> Op {
    let mut bytes = header(command, payload.len() as u64).encode().to_vec();
    bytes.extend_from_slice(payload);
    Op::Bytes(bytes)
}

fn copying_session() -> Vec<Op> {
    let mut ops = vec![
        request(
            Command::Start,
            &to_json(&Start {
                version: PROTOCOL_VERSION,
                local: false,
                backend_transfer: false,
                devices: vec![],
                software: None,
                start_notice: false,
            }),
        ),
        request(Command::Config, br#"{"cpus":2}"#),
    ];
    for pass in 0..2u8 {
        let mut bytes = Vec::new();
        let ranges = MemoryRanges(vec![(0, 300), (8192, 100 + u64::from(pass))]);
        protocol::send_memory(&mut bytes, &ranges, |_, buf| {
            buf.fill(pass);
            Ok(())
        })
        .unwrap();
        ops.push(Op::Bytes(bytes));
    }
    let state = snapshot::encode(&serde_json::json!({"rip": 1})).unwrap();
    ops.push(request(Command::State, &state));
    ops.push(request(Command::Complete, b""));
    ops
}

fn local_session() -> Vec<Op> {
    let devices = [("net0", 2), ("net1", 1)];
    let regions = vec![
        MemoryRegion { gpa: 0, len: 4096 },
        MemoryRegion {
            gpa: 1 << 32,
            len: 4096,
        },
    ];
    let mut ops = vec![
        request(
            Command::Start,
            &to_json(&Start {
                version: PROTOCOL_VERSION,
                local: true,
                backend_transfer: true,
                devices: devices
                    .iter()
                    .map(|(id, fds)| ProposedBackend {
                        id: id.to_string(),
                        kind: "virtio-net-tap".into(),
                        fds: *fds,
                    })
                    .collect(),
                software: None,
                start_notice: false,
            }),
        ),
        request(Command::MemoryFds, &to_json(&regions)),
        Op::Fds(2),
        request(Command::Config, b"{}"),
        request(
            Command::State,
            &snapshot::encode(&serde_json::json!([1, 2])).unwrap(),
        ),
    ];
    for (id, count) in devices {
        let h = FdsHeader {
            id: id.into(),
            count,
            ..Default::default()
        };
        ops.push(request(Command::Fds, &to_json(&h)));
        ops.push(Op::Fds(count as usize));
    }
    ops.push(request(Command::Complete, b""));
    ops
}

fn wire_len(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Bytes(b) => b.len(),
            Op::Fds(_) => 1,
        })
        .sum()
}

/// Sends the first `cut` bytes of `ops`, then shuts down writing and drains the responses;
/// serves the other end with `session::receive`.
fn serve(ops: Vec<Op>, cut: usize) -> (Result<Outcome, migration::ProtocolError>, Sink) {
    let (a, b) = UnixStream::pair().unwrap();
    let timeout = Some(Duration::from_secs(20));
    let source = thread::spawn(move || {
        let mut channel = Channel::from(a);
        channel.set_read_timeout(timeout).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut left = cut;
        for op in ops {
            // The destination may give up early and close: then writes fail, which is fine.
            let sent = match op {
                Op::Bytes(bytes) => {
                    let n = bytes.len().min(left);
                    left -= n;
                    channel.write_all(&bytes[..n]).is_ok() && left > 0
                }
                Op::Fds(n) if left > 0 => {
                    left -= 1;
                    channel.send_fds(&vec![file.as_fd(); n]).is_ok()
                }
                Op::Fds(_) => false,
            };
            if !sent {
                break;
            }
        }
        let _ = channel.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = channel.read_to_end(&mut sink);
    });
    let mut channel = Channel::from(b);
    channel.set_read_timeout(timeout).unwrap();
    channel.set_write_timeout(timeout).unwrap();
    let mut sink = Sink {
        memory: vec![0; 64 << 10],
        fds: 0,
    };
    let result = session::receive(&mut channel, Limits::default(), &mut sink);
    drop(channel);
    source.join().unwrap();
    (result, sink)
}

#[test]
fn truncated_sessions_end_cleanly() {
    for (ops, fds) in [(copying_session as fn() -> Vec<Op>, 0), (local_session, 5)] {
        let total = wire_len(&ops());
        // Whole sessions complete.
        let (result, sink) = serve(ops(), total);
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert_eq!(sink.fds, fds);
        // Cuts at, just after and just before every message boundary (descriptors
        // included), and in the middle of every message.
        let mut cuts = Vec::new();
        let mut at = 0;
        for op in ops() {
            let len = wire_len(&[op]);
            cuts.extend([at, at + 1, at + len / 2, (at + len).saturating_sub(1)]);
            at += len;
        }
        for cut in cuts.into_iter().filter(|&c| c < total) {
            let (result, _) = serve(ops(), cut);
            let e = result.expect_err("a truncated session cannot complete");
            // The truncation is found as the end of the stream, not as anything else.
            assert!(
                matches!(e, migration::ProtocolError::Io(..)),
                "cut at {cut} of {total}: {e}"
            );
        }
    }
}
