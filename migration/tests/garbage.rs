//! Hostile input for the migration stream's decoders and for a destination serving a session:
//! every truncation of a valid session, and seeded mutations of it, must end with an answer
//! or an error, never a panic or a hang. The coverage-guided search is the fuzz target
//! `migration_stream` (scripts/fuzz.sh); these stay as fast, replayable checks that run with
//! every `cargo test`, over sessions with descriptors, which the fuzz target does not send.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use migration::protocol::{
    self, parse_json, to_json, Command, FdsHeader, Limits, MemoryRanges, MemoryRegion,
    ProposedBackend, Receiver, ReceiverState, RequestHeader, Start, PROTOCOL_VERSION,
};
use migration::session::{self, Destination, Outcome};
use migration::{snapshot, BoxError, Channel, MigrationUrl};

/// xorshift64*: small, seeded, good enough to spray bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.below(max + 1))
            .map(|_| self.next() as u8)
            .collect()
    }

    /// `base` with a few random bytes replaced, inserted or removed.
    fn mutate(&mut self, base: &[u8], alphabet: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        for _ in 0..=self.below(4) {
            let pos = self.below(v.len() + 1);
            let byte = match self.below(2) {
                0 => alphabet[self.below(alphabet.len())],
                _ => self.next() as u8,
            };
            match self.below(3) {
                0 if pos < v.len() => v[pos] = byte,
                1 => v.insert(pos, byte),
                _ if pos < v.len() => {
                    v.remove(pos);
                }
                _ => v.push(byte),
            }
        }
        v
    }
}

fn header(command: Command, length: u64) -> RequestHeader {
    RequestHeader { command, length }
}

/// Small limits, so that the limit checks themselves get hit.
fn small_limits() -> Limits {
    Limits {
        max_json: 4096,
        max_state: 4096,
        max_memory_message: 1 << 20,
        max_ranges: 16,
        max_fds: 8,
    }
}

#[test]
fn request_headers_survive_garbage() {
    let mut rng = Rng(0x5eed_1001);
    let seeds: Vec<[u8; 16]> = Command::ALL
        .iter()
        .map(|&c| header(c, rng.next() % 100).encode())
        .collect();
    for i in 0..2_000 {
        // One receiver per run of headers, so that later states are reached too.
        let mut receiver = Receiver::new(small_limits());
        for _ in 0..8 {
            let seed = seeds[(i + rng.below(8)) % seeds.len()];
            let bytes = match rng.below(3) {
                0 => rng.bytes(16),
                _ => rng.mutate(&seed, b"\x00\x01\x08BTNM"),
            };
            let Ok(bytes) = <[u8; 16]>::try_from(bytes.as_slice()) else {
                continue;
            };
            let Ok(h) = RequestHeader::decode(&bytes) else {
                continue;
            };
            assert_eq!(
                h.encode(),
                bytes,
                "a decoded header encodes back to its bytes"
            );
            if receiver.check(&h).is_err() {
                assert!(receiver.is_done());
                break;
            }
            // Payloads as the protocol would have them, to move on to later states.
            let _ = match h.command {
                Command::Start => receiver.started(&Start {
                    version: PROTOCOL_VERSION,
                    local: rng.below(2) == 0,
                    backend_transfer: false,
                    devices: vec![],
                }),
                Command::MemoryFds => receiver.memory_fds(&[MemoryRegion { gpa: 0, len: 1 }]),
                Command::Fds => receiver.fds(&FdsHeader {
                    id: "x".into(),
                    count: 1,
                    ..Default::default()
                }),
                _ => Ok(()),
            };
        }
    }
}

#[test]
fn receiver_survives_random_command_sequences() {
    let mut rng = Rng(0x5eed_1002);
    for _ in 0..5_000 {
        let mut receiver = Receiver::new(small_limits());
        let mut last = receiver.state();
        for _ in 0..12 {
            let command = Command::ALL[rng.below(8)];
            let length = match rng.below(4) {
                0 => 0,
                1 => rng.next(),
                _ => rng.next() % 5000,
            };
            match receiver.check(&header(command, length)) {
                Ok(()) => {
                    let _ = match command {
                        Command::Start => receiver.started(&Start {
                            version: if rng.below(8) == 0 { 2 } else { 1 },
                            local: rng.below(2) == 0,
                            backend_transfer: true,
                            devices: vec![ProposedBackend {
                                id: "n".into(),
                                kind: "k".into(),
                                fds: rng.below(10) as u32,
                            }],
                        }),
                        Command::MemoryFds => receiver.memory_fds(&[MemoryRegion {
                            gpa: rng.next(),
                            len: rng.next() % 3,
                        }]),
                        Command::Fds => receiver.fds(&FdsHeader {
                            id: ["n", "m"][rng.below(2)].into(),
                            count: rng.below(10) as u32,
                            ..Default::default()
                        }),
                        _ => Ok(()),
                    };
                    if receiver.state() == ReceiverState::Started && rng.below(2) == 0 {
                        let _ = receiver.accept(&["n".to_string()]);
                    }
                }
                Err(_) => assert!(receiver.is_done()),
            }
            // Once over, always over, and as it ended.
            if receiver_is_over(last) {
                assert_eq!(receiver.state(), last);
            }
            last = receiver.state();
        }
    }
}

fn receiver_is_over(state: ReceiverState) -> bool {
    matches!(
        state,
        ReceiverState::Completed | ReceiverState::Abandoned | ReceiverState::Failed
    )
}

#[test]
fn json_payloads_survive_garbage() {
    let mut rng = Rng(0x5eed_1003);
    let start = to_json(&Start {
        version: 1,
        local: true,
        backend_transfer: true,
        devices: vec![
            ProposedBackend {
                id: "net0".into(),
                kind: "virtio-net-tap".into(),
                fds: 2,
            },
            ProposedBackend {
                id: "net1".into(),
                kind: "virtio-net-tap".into(),
                fds: 1,
            },
        ],
    });
    let regions = to_json(&vec![
        MemoryRegion { gpa: 0, len: 4096 },
        MemoryRegion {
            gpa: 1 << 32,
            len: 4096,
        },
    ]);
    let fds = to_json(&FdsHeader {
        id: "net0".into(),
        count: 2,
        ..Default::default()
    });
    let alphabet = b"{}[]\":,0123456789truefalsnul \\-e";
    for _ in 0..20_000 {
        let mut receiver = Receiver::new(small_limits());
        receiver.check(&header(Command::Start, 1)).unwrap();
        let input = rng.mutate(&start, alphabet);
        let Ok(start) = parse_json::<Start>(Command::Start, &input) else {
            continue;
        };
        if receiver.started(&start).is_err() {
            continue;
        }
        let ids: Vec<String> = start.devices.iter().map(|d| d.id.clone()).collect();
        if receiver.accept(&ids).is_err() {
            continue;
        }
        if start.local {
            receiver.check(&header(Command::MemoryFds, 1)).unwrap();
            let input = rng.mutate(&regions, alphabet);
            let Ok(regions) = parse_json::<Vec<MemoryRegion>>(Command::MemoryFds, &input) else {
                continue;
            };
            if receiver.memory_fds(&regions).is_err() {
                continue;
            }
        }
        receiver.check(&header(Command::Config, 1)).unwrap();
        receiver.check(&header(Command::State, 1)).unwrap();
        for _ in 0..3 {
            if receiver.check(&header(Command::Fds, 1)).is_err() {
                break;
            }
            let input = rng.mutate(&fds, alphabet);
            match parse_json::<FdsHeader>(Command::Fds, &input) {
                Ok(h) if receiver.fds(&h).is_ok() => {}
                _ => break,
            }
        }
    }
}

#[test]
fn memory_payloads_survive_garbage() {
    let mut rng = Rng(0x5eed_1004);
    let limits = small_limits();
    let guest_len = 64 << 10;
    let ranges = MemoryRanges(vec![(0, 100), (4096, 3000), (60_000, 1)]);
    let mut valid = Vec::new();
    protocol::send_memory(&mut valid, &ranges, |_, buf| {
        buf.fill(0xaa);
        Ok(())
    })
    .unwrap();
    let alphabet = b"\x00\x01\x02\x10\xff";
    for i in 0..20_000 {
        let input = match i % 5 {
            0 => rng.bytes(200),
            _ => rng.mutate(&valid, alphabet),
        };
        let Some((head, mut payload)) = input.split_first_chunk::<16>() else {
            continue;
        };
        // Sometimes the header's own length, sometimes a lie.
        let length = match rng.below(3) {
            0 => rng.next() % 10_000,
            _ => match RequestHeader::decode(head) {
                Ok(h) => h.length,
                Err(_) => continue,
            },
        };
        let mut guest = vec![0u8; guest_len];
        let result = protocol::recv_memory(
            &mut payload,
            &header(Command::Memory, length),
            &limits,
            |gpa, data| {
                let start = usize::try_from(gpa).map_err(std::io::Error::other)?;
                guest
                    .get_mut(start..start.saturating_add(data.len()))
                    .ok_or_else(|| std::io::Error::other("outside the guest"))?
                    .copy_from_slice(data);
                Ok(())
            },
        );
        if let Ok(bytes) = result {
            assert!(bytes <= length);
        }
    }
}

#[test]
fn snapshots_survive_garbage() {
    let mut rng = Rng(0x5eed_1005);
    let state = serde_json::json!({"vcpus": [{"rip": 4096, "regs": [1, 2, 3]}], "net0": "up"});
    let valid = snapshot::encode(&state).unwrap();
    let alphabet = b"\x00\x01\xffBATONSNP{}[]\":,0123456789";
    for i in 0..20_000 {
        let input = match i % 5 {
            0 => rng.bytes(64),
            _ => rng.mutate(&valid, alphabet),
        };
        let decoded = snapshot::decode::<serde_json::Value>(&input);
        let read = snapshot::read_from::<serde_json::Value, _>(input.as_slice());
        // Both readers agree on whether the blob is good.
        assert_eq!(decoded.is_ok(), read.is_ok(), "{decoded:?} {read:?}");
        // A checksum guards the payload: a mutated blob never decodes to a different state.
        if let Ok(v) = decoded {
            assert_eq!(v, state);
        }
    }
}

#[test]
fn urls_survive_garbage_and_print_back() {
    let mut rng = Rng(0x5eed_1006);
    let seeds = [
        "unix:/run/baton.sock",
        "unix:///a",
        "tcp:10.0.0.1:6000",
        "tcp:[::1]:1",
        "tcp:host.example:65535",
        "file:///var/snap",
    ];
    let alphabet = b"/:[].0123456789abcfilnptux";
    for i in 0..20_000 {
        let input = rng.mutate(seeds[i % seeds.len()].as_bytes(), alphabet);
        let Ok(text) = String::from_utf8(input) else {
            continue;
        };
        match text.parse::<MigrationUrl>() {
            Ok(url) => {
                let printed = url.to_string();
                assert_eq!(printed.parse::<MigrationUrl>().as_ref(), Ok(&url), "{text}");
            }
            Err(e) => assert!(e.to_string().contains(&text)),
        }
    }
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
    let mut rng = Rng(0x5eed_1007);
    for (ops, fds) in [(copying_session as fn() -> Vec<Op>, 0), (local_session, 5)] {
        let total = wire_len(&ops());
        // Whole sessions complete.
        let (result, sink) = serve(ops(), total);
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert_eq!(sink.fds, fds);
        // Cuts at, and just after, every message boundary (descriptors included), and
        // anywhere.
        let mut cuts = Vec::new();
        let mut at = 0;
        for op in ops() {
            cuts.extend([at, at + 1]);
            at += wire_len(&[op]);
        }
        cuts.extend((0..150).map(|_| rng.below(total)));
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

#[test]
fn mutated_sessions_end_cleanly() {
    let mut rng = Rng(0x5eed_1008);
    let valid: Vec<u8> = copying_session()
        .into_iter()
        .flat_map(|op| match op {
            Op::Bytes(b) => b,
            Op::Fds(_) => unreachable!("a copying session passes no descriptors"),
        })
        .collect();
    let alphabet = b"\x00\x01\x02\x03\x05\x07\x08\xffBTNM{}\"";
    for _ in 0..300 {
        let input = rng.mutate(&valid, alphabet);
        let len = input.len();
        let (result, _) = serve(vec![Op::Bytes(input)], len);
        // Completing is possible (a mutated memory byte, say); ending is what matters.
        let _ = result;
    }
}
