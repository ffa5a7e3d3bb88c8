//! The migration wire protocol.
//!
//! The source sends requests; the destination answers each with exactly one response, in order.
//! Everything the source sends is hostile input to the destination: frames are checked against
//! [`Limits`] before anything is allocated, and the [`Receiver`] state machine refuses any
//! request that is not valid at that point.
//!
//! # Frames
//!
//! A request is a 16-byte header, then `length` payload bytes (all integers little-endian):
//!
//! | bytes  | field                                          |
//! |--------|------------------------------------------------|
//! | 0..4   | magic `BTNM`                                   |
//! | 4..6   | [`Command`] (u16)                              |
//! | 6..8   | reserved, 0                                    |
//! | 8..16  | payload length (u64)                           |
//!
//! A response has the same layout with magic `BTNR` and a status instead of the command
//! (1 Ok, 2 Error). An Ok payload is the command's reply (only Start has one); an Error payload
//! is the UTF-8 error chain, joined with ": ". The magics differ so that a peer reading the
//! wrong direction fails at once.
//!
//! # A session
//!
//! ```text
//! source                                               destination
//! Start {version, local, backend_transfer, devices,  -> check version, channel, features,
//!        software, start_notice}                        software
//!                                                    <- Ok StartReply {accepted, software,
//!                                                                      start_notice}
//! [local]     MemoryFds [{gpa, len}, ...]            -> one descriptor per region, in order
//!                                                    <- Ok
//! Config (the VM config, opaque to this crate)       -> create the VM
//!                                                    <- Ok
//! [not local] Memory (range table, then bytes)       -> write guest memory
//!             ... repeated for each pre-copy pass    <- Ok (each)
//! State (a snapshot::encode blob)                    -> vCPU and device state
//!                                                    <- Ok
//! Fds {id, count, state}, for every accepted device  -> its backend descriptors
//!                                                    <- Ok (each)
//! Complete                                           -> build
//!                                   [start_notice]   <- Ok "running"
//!                                                       resume
//!                                                    <- Ok
//! ```
//!
//! With `start_notice` agreed, the destination runs the VM only once the notice is sent:
//! a source that reads the end of the connection, or an Error, before the notice knows the
//! VM never ran there and may resume it. After the notice, only an answer settles it.
//!
//! Abandon (empty) is valid at any point before Complete: the destination answers Ok and
//! drops everything it received. An Error response ends the session: the destination closes
//! the connection, and the source resumes on its own descriptors.
//!
//! # Payloads
//!
//! Start, StartReply, MemoryFds ([`MemoryRegion`] list) and Fds ([`FdsHeader`]) are JSON with
//! unknown fields refused. Config is whatever the VMM sends (JSON), under the JSON limit. State
//! is a blob in the [`snapshot`](crate::snapshot) format. Memory is binary: a u32 range count,
//! that many (gpa u64, len u64) pairs, then the bytes of each range in order; see
//! [`MemoryRanges`]. Complete and Abandon are empty.
//!
//! # Descriptors
//!
//! MemoryFds and Fds are followed, after their payload and before the response, by the
//! descriptors themselves: ceil(n / 253) messages of one byte, the byte being the number of
//! descriptors that message carries as SCM_RIGHTS (253 is the kernel's per-message maximum).
//! Only a UNIX domain socket carries them, so local migration and backend transfer need one
//! ([`check_transport`]); both ends check the connected socket, not the URL.

mod memory;
mod receiver;

use std::error::Error as StdError;
use std::fmt;
use std::io;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use memory::{recv_memory, send_memory, MemoryRanges, CHUNK};
pub use receiver::{Receiver, ReceiverState};

/// The protocol this baton speaks; Start must carry exactly this. 2: State carries each
/// virtio device's state as its own versioned type (snapshot format 2).
pub const PROTOCOL_VERSION: u32 = 2;
/// First four bytes of every request header.
pub const REQUEST_MAGIC: [u8; 4] = *b"BTNM";
/// First four bytes of every response header.
pub const RESPONSE_MAGIC: [u8; 4] = *b"BTNR";
/// Size of request and response headers.
pub const HEADER_LEN: usize = 16;

/// What a request asks for.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Open the session: version, mode, proposed backend transfers.
    Start = 1,
    /// Guest memory descriptors (local migration).
    MemoryFds,
    /// The VM configuration.
    Config,
    /// Guest memory contents (copying migration).
    Memory,
    /// vCPU and device state.
    State,
    /// One device's backend descriptors.
    Fds,
    /// Build and run the VM.
    Complete,
    /// Give up; drop everything received.
    Abandon,
}

impl Command {
    /// Every command, in wire order.
    pub const ALL: [Command; 8] = [
        Command::Start,
        Command::MemoryFds,
        Command::Config,
        Command::Memory,
        Command::State,
        Command::Fds,
        Command::Complete,
        Command::Abandon,
    ];
}

impl TryFrom<u16> for Command {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        Command::ALL
            .into_iter()
            .find(|c| *c as u16 == value)
            .ok_or(ProtocolError::UnknownCommand(value))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// What is asked.
    pub command: Command,
    /// Payload bytes that follow.
    pub length: u64,
}

impl RequestHeader {
    /// The header's wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        encode_header(REQUEST_MAGIC, self.command as u16, self.length)
    }

    /// Parses a header; the length is checked later, against the command's limit.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let (code, length) = decode_header(bytes, REQUEST_MAGIC)?;
        Ok(RequestHeader {
            command: Command::try_from(code)?,
            length,
        })
    }
}

/// Whether a request succeeded.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Done; the payload is the reply.
    Ok = 1,
    /// Failed; the payload is the error chain.
    Error = 2,
}

/// A response's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Success or failure.
    pub status: Status,
    /// Payload bytes that follow.
    pub length: u64,
}

impl ResponseHeader {
    /// The header's wire form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        encode_header(RESPONSE_MAGIC, self.status as u16, self.length)
    }

    /// Parses a header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let (code, length) = decode_header(bytes, RESPONSE_MAGIC)?;
        let status = match code {
            1 => Status::Ok,
            2 => Status::Error,
            other => return Err(ProtocolError::UnknownStatus(other)),
        };
        Ok(ResponseHeader { status, length })
    }
}

fn encode_header(magic: [u8; 4], code: u16, length: u64) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[0..4].copy_from_slice(&magic);
    out[4..6].copy_from_slice(&code.to_le_bytes());
    out[8..16].copy_from_slice(&length.to_le_bytes());
    out
}

fn decode_header(bytes: &[u8; HEADER_LEN], magic: [u8; 4]) -> Result<(u16, u64), ProtocolError> {
    let (head, length) = bytes.split_at(8);
    let (found, rest) = head.split_at(4);
    if found != magic {
        return Err(ProtocolError::BadMagic(u32::from_be_bytes(
            found.try_into().expect("4 bytes"),
        )));
    }
    let code = u16::from_le_bytes([rest[0], rest[1]]);
    let reserved = u16::from_le_bytes([rest[2], rest[3]]);
    if reserved != 0 {
        return Err(ProtocolError::Reserved(reserved));
    }
    Ok((
        code,
        u64::from_le_bytes(length.try_into().expect("8 bytes")),
    ))
}

/// The destination's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Done, with the command's reply (empty for all but Start).
    Ok(Vec<u8>),
    /// Failed, with the error chain.
    Error(String),
}

impl Response {
    /// An Error response carrying `err` and its causes.
    pub fn error(err: &(dyn StdError + 'static)) -> Self {
        Response::Error(error_chain(err))
    }

    /// The response's header.
    pub fn header(&self) -> ResponseHeader {
        let (status, length) = match self {
            Response::Ok(p) => (Status::Ok, p.len()),
            Response::Error(m) => (Status::Error, m.len()),
        };
        ResponseHeader {
            status,
            length: length as u64,
        }
    }

    /// The response's payload.
    pub fn payload(&self) -> &[u8] {
        match self {
            Response::Ok(p) => p,
            Response::Error(m) => m.as_bytes(),
        }
    }
}

/// `read_exact`, with an end of stream that says what happened.
pub(crate) fn read_exact(reader: &mut (impl io::Read + ?Sized), buf: &mut [u8]) -> io::Result<()> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "The peer closed the connection")
        } else {
            e
        }
    })
}

/// `err` and its sources, outermost first, joined with ": ".
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Size limits the destination enforces before reading a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Start, MemoryFds, Config and Fds payloads, and responses.
    pub max_json: u64,
    /// The State payload.
    pub max_state: u64,
    /// One Memory payload (table and bytes); the source splits larger passes.
    pub max_memory_message: u64,
    /// Ranges in one Memory payload.
    pub max_ranges: u32,
    /// Descriptors in one MemoryFds or Fds request.
    pub max_fds: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_json: 16 << 20,
            max_state: crate::snapshot::MAX_STATE_LEN + crate::snapshot::HEADER_LEN as u64,
            max_memory_message: 1 << 30,
            // A full message of 4 KiB pages; the table is then 4 MiB.
            max_ranges: 1 << 18,
            max_fds: 512,
        }
    }
}

/// Opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// Must be [`PROTOCOL_VERSION`].
    pub version: u32,
    /// Guest memory is shared (its descriptors travel) instead of copied.
    pub local: bool,
    /// The source offers to hand over device backends.
    #[serde(default)]
    pub backend_transfer: bool,
    /// The devices whose backends the source offers.
    #[serde(default)]
    pub devices: Vec<ProposedBackend>,
    /// The source's software (absent from a source that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<Software>,
    /// The source asks to be told, before the final answer to Complete, that the
    /// destination built the VM and is about to run it (a first Ok response carrying
    /// [`START_NOTICE`]). A destination then never runs the VM without the notice sent, so
    /// a source that sees the connection end without it knows the VM never ran there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_notice: bool,
}

/// The payload of the Ok response that tells the source, when [`Start::start_notice`] was
/// agreed, that the VM is about to run on the destination.
pub const START_NOTICE: &[u8] = b"running";

/// Which software a side runs, so that a pair that cannot work together is refused while
/// Start is answered, before anything is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Software {
    /// The VMM and its version, such as `baton 0.1.0`.
    pub vmm: String,
    /// The layout version of the VM state it writes and reads.
    pub state_format: u32,
}

impl std::fmt::Display for Software {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (state format {})", self.vmm, self.state_format)
    }
}

impl Start {
    /// Checks the destination's reply: it may accept only proposed devices, each once, and
    /// agree to the start notice only if asked.
    pub fn check_reply(&self, reply: &StartReply) -> Result<(), ProtocolError> {
        if reply.start_notice && !self.start_notice {
            return Err(ProtocolError::InvalidReply(
                "it agreed to a start notice nobody asked for".into(),
            ));
        }
        for (i, id) in reply.accepted.iter().enumerate() {
            if !self.devices.iter().any(|d| &d.id == id) || reply.accepted[..i].contains(id) {
                return Err(ProtocolError::BadAccept(id.clone()));
            }
        }
        Ok(())
    }
}

/// A backend the source offers to hand over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposedBackend {
    /// The device id.
    pub id: String,
    /// The backend kind, such as `virtio-net-tap`.
    pub kind: String,
    /// Descriptors the device will send.
    pub fds: u32,
}

/// The destination's answer to Start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartReply {
    /// Ids of the proposed devices whose backends the destination takes; the others take the
    /// ordinary path.
    pub accepted: Vec<String>,
    /// The destination's software (absent from a destination that does not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software: Option<Software>,
    /// The destination agrees to [`Start::start_notice`] (only when asked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_notice: bool,
}

/// How long one step of a migration took on one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// What the step did, such as `decode state` or `resume devices`.
    pub name: String,
    /// Microseconds.
    pub us: u64,
}

/// The payload of the destination's last Ok to Complete: how long its steps took, so that
/// the source can tell where the downtime went. Empty from a destination that does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteReply {
    /// Steps before the State request: Start, memory descriptors, Config, memory.
    #[serde(default)]
    pub before_pause: Vec<Phase>,
    /// Steps from the State request to the VM running: the source is paused meanwhile.
    #[serde(default)]
    pub paused: Vec<Phase>,
}

/// A guest memory region shared in a local migration; MemoryFds carries a list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// Whose descriptors follow an Fds request, and how many.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdsHeader {
    /// The device id, one of those accepted.
    pub id: String,
    /// Descriptors that follow; as many as proposed.
    pub count: u32,
    /// The backend's state, which the VMM defines (a TAP's name, queues, offloads ...).
    #[serde(default)]
    pub state: serde_json::Value,
}

/// A JSON payload of `command`.
pub fn parse_json<T: DeserializeOwned>(
    command: Command,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|source| ProtocolError::Json { command, source })
}

/// The JSON payload for a request or reply.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("protocol payloads are plain structs with string keys")
}

/// Refuses what `start` asks when the channel is not a UNIX domain socket; both ends call it
/// before any state moves.
pub fn check_transport(start: &Start, channel_is_unix: bool) -> Result<(), ProtocolError> {
    if channel_is_unix {
        return Ok(());
    }
    if start.local {
        return Err(ProtocolError::NeedsUnix("A local migration"));
    }
    if start.backend_transfer {
        return Err(ProtocolError::NeedsUnix("Backend transfer"));
    }
    Ok(())
}

/// Errors of the migration protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The channel failed; the context says during what.
    #[error("Migration channel failed while {0}")]
    Io(&'static str, #[source] io::Error),
    /// Not a frame of this protocol.
    #[error("Not a baton migration stream (magic {0:#010x})")]
    BadMagic(u32),
    /// A request header with an unknown command.
    #[error("Unknown migration command {0}")]
    UnknownCommand(u16),
    /// A response header with an unknown status.
    #[error("Unknown migration response status {0}")]
    UnknownStatus(u16),
    /// The reserved header field is set.
    #[error("Reserved header field is {0}, not 0")]
    Reserved(u16),
    /// Start carries another version.
    #[error("Peer speaks migration protocol version {found}, this baton speaks {supported}")]
    Version {
        /// The version in Start.
        found: u32,
        /// [`PROTOCOL_VERSION`].
        supported: u32,
    },
    /// The command is not valid now.
    #[error("Unexpected {command} request {state}; expected {expected}")]
    Unexpected {
        /// What arrived.
        command: Command,
        /// Where the session stood.
        state: ReceiverState,
        /// What may come instead.
        expected: String,
    },
    /// A payload over its limit.
    #[error("{command} payload of {length} bytes exceeds the limit of {limit} bytes")]
    TooLong {
        /// The request.
        command: Command,
        /// Announced length.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// A response over the limit.
    #[error("Response of {length} bytes exceeds the limit of {limit} bytes")]
    ResponseTooLong {
        /// Announced length.
        length: u64,
        /// The limit.
        limit: u64,
    },
    /// Complete or Abandon with a payload.
    #[error("{command} carries no payload, but {length} bytes were announced")]
    NotEmpty {
        /// The request.
        command: Command,
        /// Announced length.
        length: u64,
    },
    /// A JSON payload that does not parse.
    #[error("Malformed {command} payload")]
    Json {
        /// The request.
        command: Command,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Start proposes nonsense.
    #[error("Invalid Start request: {0}")]
    InvalidStart(String),
    /// The destination accepted a device that was not proposed, or one twice.
    #[error("Destination accepted device '{0}', which was not proposed or is listed twice")]
    BadAccept(String),
    /// The reply to Start agrees to something the source did not ask.
    #[error("Invalid reply to Start: {0}")]
    InvalidReply(String),
    /// What Start asks needs a UNIX domain socket.
    #[error("{0} needs a UNIX domain socket, but the migration channel is not one")]
    NeedsUnix(&'static str),
    /// Too many descriptors announced.
    #[error("{count} descriptors announced; at most {limit} may travel in one request")]
    TooManyFds {
        /// Announced.
        count: u64,
        /// [`Limits::max_fds`].
        limit: u32,
    },
    /// MemoryFds with no region.
    #[error("MemoryFds lists no memory region")]
    NoRegions,
    /// Two shared memory regions overlap.
    #[error("Memory regions overlap at guest address {0:#x}")]
    Overlap(u64),
    /// Too many ranges in a Memory table.
    #[error("Memory table lists {count} ranges; at most {limit} are allowed")]
    TooManyRanges {
        /// Announced.
        count: u64,
        /// [`Limits::max_ranges`].
        limit: u32,
    },
    /// A zero-length range.
    #[error("Empty memory range at guest address {0:#x}")]
    EmptyRange(u64),
    /// A range past the end of the address space.
    #[error("Memory range at {gpa:#x} of {len:#x} bytes overflows the address space")]
    RangeOverflow {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The table and the frame disagree on the payload's size.
    #[error("Memory payload is {announced} bytes, but its table describes {described}")]
    MemoryLength {
        /// The frame's length.
        announced: u64,
        /// Table plus ranges (saturated at u64::MAX).
        described: u64,
    },
    /// Guest memory refused a read or write.
    #[error("Cannot access guest memory at {gpa:#x}")]
    MemoryAccess {
        /// Where (the start of the chunk).
        gpa: u64,
        /// The memory's complaint.
        #[source]
        source: io::Error,
    },
    /// Fds for a device that was not accepted.
    #[error("Descriptors for device '{0}', which was not accepted for backend transfer")]
    UnknownDevice(String),
    /// Fds for a device a second time.
    #[error("Descriptors for device '{0}' were already received")]
    FdsTwice(String),
    /// Fds with another count than proposed.
    #[error("Device '{id}' announces {count} descriptors, but {proposed} were proposed")]
    FdCount {
        /// The device.
        id: String,
        /// In the Fds request.
        count: u32,
        /// In Start.
        proposed: u32,
    },
    /// The other end answered Error.
    #[error("The other side failed: {0}")]
    Remote(String),
    /// The destination's own work on a request failed.
    #[error("Cannot apply {command}")]
    Destination {
        /// The request.
        command: Command,
        /// Why.
        #[source]
        source: crate::BoxError,
    },
    /// This crate's API was called out of order (a bug in the caller).
    #[error("Migration receiver used out of order: {0}")]
    Misuse(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trip() {
        for command in Command::ALL {
            let h = RequestHeader {
                command,
                length: 0x0102_0304_0506_0708,
            };
            let bytes = h.encode();
            assert_eq!(&bytes[..4], b"BTNM");
            assert_eq!(RequestHeader::decode(&bytes).unwrap(), h);
        }
        let bytes = RequestHeader {
            command: Command::Config,
            length: 5,
        }
        .encode();
        assert_eq!(
            bytes,
            *b"BTNM\x03\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00"
        );
    }

    #[test]
    fn request_header_errors() {
        let good = RequestHeader {
            command: Command::Start,
            length: 1,
        }
        .encode();
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(ProtocolError::BadMagic(_))
        ));
        // A response is not a request.
        let response = Response::Ok(vec![]).header().encode();
        assert!(matches!(
            RequestHeader::decode(&response),
            Err(ProtocolError::BadMagic(_))
        ));
        for code in [0u16, 9, 0xffff] {
            let mut bad = good;
            bad[4..6].copy_from_slice(&code.to_le_bytes());
            let e = RequestHeader::decode(&bad).unwrap_err();
            assert!(matches!(e, ProtocolError::UnknownCommand(c) if c == code));
        }
        let mut bad = good;
        bad[7] = 1;
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(ProtocolError::Reserved(256))
        ));
    }

    #[test]
    fn response_header_round_trip() {
        for r in [Response::Ok(b"{}".to_vec()), Response::Error("no".into())] {
            let h = r.header();
            assert_eq!(ResponseHeader::decode(&h.encode()).unwrap(), h);
            assert_eq!(h.length, r.payload().len() as u64);
        }
        let mut bad = Response::Ok(vec![]).header().encode();
        bad[4] = 3;
        assert!(matches!(
            ResponseHeader::decode(&bad),
            Err(ProtocolError::UnknownStatus(3))
        ));
    }

    #[test]
    fn error_chain_joins_causes() {
        let e = ProtocolError::Io(
            "reading the request header",
            io::Error::new(io::ErrorKind::UnexpectedEof, "closed"),
        );
        assert_eq!(
            error_chain(&e),
            "Migration channel failed while reading the request header: closed"
        );
        assert_eq!(Response::error(&e), Response::Error(error_chain(&e)));
    }

    #[test]
    fn start_payload() {
        let start: Start = parse_json(Command::Start, br#"{"version":1,"local":true}"#).unwrap();
        assert!(!start.backend_transfer);
        assert!(start.devices.is_empty());
        let e = parse_json::<Start>(Command::Start, br#"{"version":1,"local":true,"x":1}"#)
            .unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::Json {
                command: Command::Start,
                ..
            }
        ));
        let e = parse_json::<Start>(
            Command::Start,
            br#"{"version":1,"local":true,"devices":[{"id":"a","kind":"k","fds":1,"y":0}]}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ProtocolError::Json { .. }));
    }

    #[test]
    fn start_reply_must_accept_proposed_devices_once() {
        let start = Start {
            version: PROTOCOL_VERSION,
            local: true,
            backend_transfer: true,
            devices: vec![ProposedBackend {
                id: "net0".into(),
                kind: "virtio-net-tap".into(),
                fds: 2,
            }],
            software: None,
            start_notice: false,
        };
        let reply = |ids: &[&str]| StartReply {
            accepted: ids.iter().map(|s| s.to_string()).collect(),
            software: None,
            start_notice: false,
        };
        let unasked = StartReply {
            start_notice: true,
            ..reply(&[])
        };
        assert!(matches!(
            start.check_reply(&unasked),
            Err(ProtocolError::InvalidReply(_))
        ));
        assert!(start.check_reply(&reply(&[])).is_ok());
        assert!(start.check_reply(&reply(&["net0"])).is_ok());
        assert!(start.check_reply(&reply(&["net1"])).is_err());
        assert!(start.check_reply(&reply(&["net0", "net0"])).is_err());
    }

    #[test]
    fn transport_check() {
        let mut start = Start {
            version: 1,
            local: false,
            backend_transfer: false,
            devices: vec![],
            software: None,
            start_notice: false,
        };
        assert!(check_transport(&start, false).is_ok());
        start.backend_transfer = true;
        let e = check_transport(&start, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Backend transfer needs a UNIX domain socket, but the migration channel is not one"
        );
        assert!(check_transport(&start, true).is_ok());
        start.local = true;
        assert!(matches!(
            check_transport(&start, false),
            Err(ProtocolError::NeedsUnix("A local migration"))
        ));
    }
}
