//! The versioned state format: what a snapshot's state file holds and what a migration's State
//! request carries.
//!
//! A fixed header guards the serde payload, so that a wrong file, a file from another format
//! version, a torn write or a flipped bit is named as such instead of surfacing as a confusing
//! JSON error (or, worse, as a VM restored from half a state):
//!
//! | bytes | field                                      |
//! |-------|--------------------------------------------|
//! | 0..8  | magic `BATONSNP`                           |
//! | 8..12 | format version, u32 LE                     |
//! | 12..20| payload length, u64 LE                     |
//! | 20..24| CRC-32 (IEEE) of the payload, u32 LE       |
//! | 24..  | payload: serde_json                        |

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every snapshot state.
pub const MAGIC: [u8; 8] = *b"BATONSNP";
/// The format this baton writes, and the only one it reads. 3: KVM's structures are hex
/// strings (2 had a number per byte); 2: each virtio device's own state is a typed,
/// versioned value by kind (1 had an untyped value with no version).
pub const FORMAT_VERSION: u32 = 3;
/// Largest payload accepted: device and vCPU state is kilobytes; this only stops a hostile
/// length from allocating the host away.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Bytes ahead of the payload.
pub const HEADER_LEN: usize = 24;

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The magic is wrong.
    #[error("Not a baton snapshot (bad magic)")]
    BadMagic,
    /// Written by a baton with another format.
    #[error(
        "Snapshot format version {found} is not supported (this baton reads version {supported})"
    )]
    Version {
        /// The version in the header.
        found: u32,
        /// The version this baton reads.
        supported: u32,
    },
    /// Fewer bytes than the header promises.
    #[error("Snapshot is truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header (or the header itself) needs.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// More bytes than the header promises.
    #[error("Snapshot has {0} unexpected bytes after its payload")]
    TrailingBytes(u64),
    /// The payload is over [`MAX_STATE_LEN`].
    #[error("Snapshot payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The payload length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The payload is not what was written.
    #[error(
        "Snapshot checksum mismatch (header says {expected:#010x}, payload has {found:#010x})"
    )]
    Checksum {
        /// CRC-32 in the header.
        expected: u32,
        /// CRC-32 of the payload.
        found: u32,
    },
    /// The payload is intact but not the state this baton expects.
    #[error("Snapshot payload does not parse")]
    Parse(#[source] serde_json::Error),
    /// The state cannot be written as JSON (a programming error, e.g. a map with non-string
    /// keys).
    #[error("Cannot serialize the state")]
    Serialize(#[source] serde_json::Error),
    /// Reading the state failed.
    #[error("Cannot read the snapshot")]
    Io(#[source] std::io::Error),
}

/// CRC-32 as in Ethernet, zlib and PNG (reflected polynomial 0xEDB88320), eight bytes a
/// step: a migration checks the state inside its pause, and a byte a step took 60 us of it.
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let lo = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ crc;
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        let byte = |x: u32, shift: u32| ((x >> shift) & 0xff) as usize;
        crc = t[7][byte(lo, 0)]
            ^ t[6][byte(lo, 8)]
            ^ t[5][byte(lo, 16)]
            ^ t[4][byte(lo, 24)]
            ^ t[3][byte(hi, 0)]
            ^ t[2][byte(hi, 8)]
            ^ t[1][byte(hi, 16)]
            ^ t[0][byte(hi, 24)];
    }
    for &b in words.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// `CRC_TABLES[0]` is the CRC of each byte; `CRC_TABLES[k]` that of each byte followed by
/// `k` zero bytes.
const CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = tables[k - 1][i];
            tables[k][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    tables
}

/// `state` with its header, ready to be written to a file or sent as a State request.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(SnapshotError::Serialize)?;
    let len = payload.len() as u64;
    if len > MAX_STATE_LEN {
        // Refused here rather than by the restore that would fail later.
        return Err(SnapshotError::TooLarge {
            len,
            limit: MAX_STATE_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The header's fields, once its magic and version are known good.
struct Header {
    len: u64,
    crc: u32,
}

fn parse_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, SnapshotError> {
    let field = |range: std::ops::Range<usize>| &bytes[range];
    if field(0..8) != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let version = u32::from_le_bytes(field(8..12).try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = u64::from_le_bytes(field(12..20).try_into().expect("8 bytes"));
    if len > MAX_STATE_LEN {
        return Err(SnapshotError::TooLarge {
            len,
            limit: MAX_STATE_LEN,
        });
    }
    let crc = u32::from_le_bytes(field(20..24).try_into().expect("4 bytes"));
    Ok(Header { len, crc })
}

fn parse_payload<T: DeserializeOwned>(header: &Header, payload: &[u8]) -> Result<T, SnapshotError> {
    let found = crc32(payload);
    if found != header.crc {
        return Err(SnapshotError::Checksum {
            expected: header.crc,
            found,
        });
    }
    serde_json::from_slice(payload).map_err(SnapshotError::Parse)
}

/// The state in `bytes`, which must hold exactly one header and its payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    let got = bytes.len() as u64;
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        // A short file that does not even start like a snapshot is not a truncated one.
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(SnapshotError::BadMagic);
        }
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            got,
        });
    };
    let header = parse_header(head)?;
    let payload = &bytes[HEADER_LEN..];
    let have = payload.len() as u64;
    if have < header.len {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64 + header.len,
            got,
        });
    }
    if have > header.len {
        return Err(SnapshotError::TrailingBytes(have - header.len));
    }
    parse_payload(&header, payload)
}

/// The state read from `reader` (a state file), allocating no more than the header announces
/// and [`MAX_STATE_LEN`] allows.
pub fn read_from<T: DeserializeOwned, R: Read>(mut reader: R) -> Result<T, SnapshotError> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(&mut reader, &mut head)?;
    if got < HEADER_LEN {
        return decode(&head[..got]);
    }
    let header = parse_header(&head)?;
    let mut payload = Vec::new();
    // One byte more than announced, to notice trailing garbage.
    reader
        .by_ref()
        .take(header.len + 1)
        .read_to_end(&mut payload)
        .map_err(SnapshotError::Io)?;
    let have = payload.len() as u64;
    if have < header.len {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64 + header.len,
            got: HEADER_LEN as u64 + have,
        });
    }
    if have > header.len {
        return Err(SnapshotError::TrailingBytes(have - header.len));
    }
    parse_payload(&header, &payload)
}

/// Like `read_exact`, but says how much arrived before the end.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Io(e)),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
    }

    fn state() -> State {
        State {
            name: "vcpu0".into(),
            regs: vec![1, 2, u64::MAX],
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // Eight bytes a step gives what one byte a step gives, at every length and offset.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        let bytewise = |d: &[u8]| {
            !d.iter().fold(!0u32, |crc, &b| {
                CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
            })
        };
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32(&data[start..end]), bytewise(&data[start..end]));
            }
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&state()).unwrap();
        assert_eq!(&bytes[..8], b"BATONSNP");
        assert_eq!(decode::<State>(&bytes).unwrap(), state());
        assert_eq!(read_from::<State, _>(bytes.as_slice()).unwrap(), state());
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode(&state()).unwrap();
        bytes[0] = b'X';
        assert!(matches!(
            decode::<State>(&bytes),
            Err(SnapshotError::BadMagic)
        ));
        assert!(matches!(
            decode::<State>(b"{}"),
            Err(SnapshotError::BadMagic)
        ));
        let e = decode::<State>(b"").unwrap_err();
        assert!(matches!(
            e,
            SnapshotError::Truncated {
                expected: 24,
                got: 0
            }
        ));
    }

    #[test]
    fn other_version() {
        let mut bytes = encode(&state()).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(
            e,
            SnapshotError::Version {
                found: 7,
                supported: FORMAT_VERSION
            }
        ));
        assert_eq!(
            e.to_string(),
            "Snapshot format version 7 is not supported (this baton reads version 3)"
        );
    }

    #[test]
    fn truncated() {
        let bytes = encode(&state()).unwrap();
        let whole = bytes.len() as u64;
        for cut in [10, HEADER_LEN, bytes.len() - 1] {
            let e = decode::<State>(&bytes[..cut]).unwrap_err();
            let expected = if cut < HEADER_LEN {
                HEADER_LEN as u64
            } else {
                whole
            };
            assert!(
                matches!(e, SnapshotError::Truncated { expected: x, got } if x == expected && got == cut as u64),
                "{cut}: {e:?}"
            );
            let e = read_from::<State, _>(&bytes[..cut]).unwrap_err();
            assert!(matches!(e, SnapshotError::Truncated { .. }), "{cut}: {e:?}");
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = encode(&state()).unwrap();
        bytes.extend_from_slice(b"xy");
        let e = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::TrailingBytes(2)));
        let e = read_from::<State, _>(bytes.as_slice()).unwrap_err();
        assert!(matches!(e, SnapshotError::TrailingBytes(1)));
    }

    #[test]
    fn too_large() {
        let mut bytes = encode(&state()).unwrap();
        bytes[12..20].copy_from_slice(&(MAX_STATE_LEN + 1).to_le_bytes());
        let e = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::TooLarge { .. }));
        // The reader refuses before allocating.
        let e = read_from::<State, _>(bytes.as_slice()).unwrap_err();
        assert!(matches!(e, SnapshotError::TooLarge { .. }));
    }

    #[test]
    fn checksum_mismatch() {
        let mut bytes = encode(&state()).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        let e = decode::<State>(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "{e:?}");
    }

    #[test]
    fn payload_does_not_parse() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Other {
            cpus: u32,
        }
        let bytes = encode(&state()).unwrap();
        let e = decode::<Other>(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::Parse(_)));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn unserializable_state_is_an_error() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), 3);
        assert!(matches!(encode(&map), Err(SnapshotError::Serialize(_))));
    }
}
