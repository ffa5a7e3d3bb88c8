//! Memory payloads, streamed in chunks between the channel and guest memory so that neither
//! end buffers a whole message.
//!
//! Layout: a u32 range count, that many (gpa u64, len u64) pairs, then the bytes of each range
//! in table order, all little-endian. The frame's length must equal the table's size plus the
//! sum of the ranges, so a lying table is caught before any guest memory is written.

use std::io::{self, Read, Write};

use super::{read_exact, Command, Limits, ProtocolError, RequestHeader};

/// Largest piece of guest memory handed to a callback at once.
pub const CHUNK: usize = 1 << 20;

/// Bytes of a table entry.
const ENTRY_LEN: u64 = 16;
/// Bytes of the range count.
const COUNT_LEN: u64 = 4;

/// The (gpa, len) ranges one Memory payload carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryRanges(pub Vec<(u64, u64)>);

impl MemoryRanges {
    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        COUNT_LEN + ENTRY_LEN * self.0.len() as u64
    }

    /// The table's wire form.
    pub fn encode_table(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.table_len() as usize);
        out.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (gpa, len) in &self.0 {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out
    }

    /// The whole payload's length, if the ranges are fit to send: each non-empty, inside the
    /// address space, at most u32::MAX of them.
    pub fn payload_len(&self) -> Result<u64, ProtocolError> {
        if self.0.len() > u32::MAX as usize {
            return Err(ProtocolError::TooManyRanges {
                count: self.0.len() as u64,
                limit: u32::MAX,
            });
        }
        let data = sum_ranges(&self.0)?;
        data.checked_add(self.table_len())
            .ok_or(ProtocolError::MemoryLength {
                announced: u64::MAX,
                described: u64::MAX,
            })
    }

    /// Reads and checks the table of a Memory payload of `payload_len` bytes, leaving the
    /// reader at the first data byte.
    pub fn parse_table<R: Read + ?Sized>(
        reader: &mut R,
        payload_len: u64,
        limits: &Limits,
    ) -> Result<MemoryRanges, ProtocolError> {
        let mismatch = |described| ProtocolError::MemoryLength {
            announced: payload_len,
            described,
        };
        if payload_len < COUNT_LEN {
            return Err(mismatch(COUNT_LEN));
        }
        let mut count = [0u8; COUNT_LEN as usize];
        read_exact(reader, &mut count)
            .map_err(|e| ProtocolError::Io("reading the memory table", e))?;
        let count = u32::from_le_bytes(count);
        if count > limits.max_ranges {
            return Err(ProtocolError::TooManyRanges {
                count: count.into(),
                limit: limits.max_ranges,
            });
        }
        let table_len = COUNT_LEN + ENTRY_LEN * u64::from(count);
        if table_len > payload_len {
            return Err(mismatch(table_len));
        }
        // Bounded by max_ranges, and by the payload length the caller checked.
        let mut table = vec![0u8; (table_len - COUNT_LEN) as usize];
        read_exact(reader, &mut table)
            .map_err(|e| ProtocolError::Io("reading the memory table", e))?;
        let ranges: Vec<(u64, u64)> = table
            .chunks_exact(ENTRY_LEN as usize)
            .map(|e| {
                let (gpa, len) = e.split_at(8);
                (
                    u64::from_le_bytes(gpa.try_into().expect("8 bytes")),
                    u64::from_le_bytes(len.try_into().expect("8 bytes")),
                )
            })
            .collect();
        let described = sum_ranges(&ranges)?.saturating_add(table_len);
        if described != payload_len {
            return Err(mismatch(described));
        }
        Ok(MemoryRanges(ranges))
    }

    /// Splits `ranges` into payloads within `limits`, cutting ranges where needed, so that a
    /// pre-copy pass of any size can be sent. Empty ranges are dropped.
    pub fn batches(
        ranges: impl IntoIterator<Item = (u64, u64)>,
        limits: &Limits,
    ) -> Result<Vec<MemoryRanges>, ProtocolError> {
        let room = limits.max_memory_message.saturating_sub(COUNT_LEN);
        if room <= ENTRY_LEN || limits.max_ranges == 0 {
            return Err(ProtocolError::Misuse("limits leave no room for memory"));
        }
        let mut out = Vec::new();
        let mut current = MemoryRanges::default();
        let mut used = 0u64; // Table entries and data of `current`.
        for (mut gpa, mut len) in ranges {
            if gpa.checked_add(len).is_none() {
                return Err(ProtocolError::RangeOverflow { gpa, len });
            }
            while len > 0 {
                let full = current.0.len() as u64 == u64::from(limits.max_ranges)
                    || room - used <= ENTRY_LEN;
                if full {
                    out.push(std::mem::take(&mut current));
                    used = 0;
                }
                let take = len.min(room - used - ENTRY_LEN);
                current.0.push((gpa, take));
                used += ENTRY_LEN + take;
                gpa += take;
                len -= take;
            }
        }
        if !current.0.is_empty() {
            out.push(current);
        }
        Ok(out)
    }
}

/// Total bytes of `ranges`, refusing empty and overflowing ones; saturates at u64::MAX.
fn sum_ranges(ranges: &[(u64, u64)]) -> Result<u64, ProtocolError> {
    let mut sum = 0u64;
    for &(gpa, len) in ranges {
        if len == 0 {
            return Err(ProtocolError::EmptyRange(gpa));
        }
        if gpa.checked_add(len).is_none() {
            return Err(ProtocolError::RangeOverflow { gpa, len });
        }
        sum = sum.saturating_add(len);
    }
    Ok(sum)
}

/// A buffer for the largest chunk `ranges` needs.
fn chunk_buffer(ranges: &MemoryRanges) -> Vec<u8> {
    let largest = ranges.0.iter().map(|r| r.1).max().unwrap_or(0);
    vec![0u8; largest.min(CHUNK as u64) as usize]
}

/// Calls `f` with (gpa, len) of each chunk of `ranges`, in order.
fn for_each_chunk(
    ranges: &MemoryRanges,
    mut f: impl FnMut(u64, usize) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    for &(gpa, len) in &ranges.0 {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            f(gpa + done, n)?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Writes a whole Memory request: header, table, then the ranges' bytes, which `read(gpa, buf)`
/// fills from guest memory a chunk (at most [`CHUNK`]) at a time. Returns the bytes of memory
/// sent. The caller then waits for the response.
pub fn send_memory<W: Write + ?Sized>(
    writer: &mut W,
    ranges: &MemoryRanges,
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> Result<u64, ProtocolError> {
    let length = ranges.payload_len()?;
    let header = RequestHeader {
        command: Command::Memory,
        length,
    };
    let write_err = |e| ProtocolError::Io("writing a Memory request", e);
    writer.write_all(&header.encode()).map_err(write_err)?;
    writer
        .write_all(&ranges.encode_table())
        .map_err(write_err)?;
    let mut buf = chunk_buffer(ranges);
    for_each_chunk(ranges, |gpa, n| {
        let chunk = &mut buf[..n];
        read(gpa, chunk).map_err(|source| ProtocolError::MemoryAccess { gpa, source })?;
        writer.write_all(chunk).map_err(write_err)
    })?;
    Ok(length - ranges.table_len())
}

/// Reads the payload of a Memory request whose `header` was just read, handing the bytes to
/// `write(gpa, data)` a chunk (at most [`CHUNK`]) at a time. `write` must refuse addresses
/// outside guest memory: the table is only checked for consistency, not against the guest.
/// Returns the bytes of memory received.
pub fn recv_memory<R: Read + ?Sized>(
    reader: &mut R,
    header: &RequestHeader,
    limits: &Limits,
    mut write: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> Result<u64, ProtocolError> {
    if header.command != Command::Memory {
        return Err(ProtocolError::Misuse("recv_memory needs a Memory request"));
    }
    if header.length > limits.max_memory_message {
        return Err(ProtocolError::TooLong {
            command: Command::Memory,
            length: header.length,
            limit: limits.max_memory_message,
        });
    }
    let ranges = MemoryRanges::parse_table(reader, header.length, limits)?;
    let mut buf = chunk_buffer(&ranges);
    for_each_chunk(&ranges, |gpa, n| {
        let chunk = &mut buf[..n];
        read_exact(reader, chunk).map_err(|e| ProtocolError::Io("reading memory", e))?;
        write(gpa, chunk).map_err(|source| ProtocolError::MemoryAccess { gpa, source })
    })?;
    Ok(header.length - ranges.table_len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little guest: `len` bytes at guest address `base`.
    struct Guest {
        base: u64,
        mem: Vec<u8>,
    }

    impl Guest {
        fn new(base: u64, len: usize) -> Self {
            Guest {
                base,
                mem: (0..len).map(|i| (i * 7 % 251) as u8).collect(),
            }
        }

        fn slot(&mut self, gpa: u64, len: usize) -> io::Result<&mut [u8]> {
            let off = gpa
                .checked_sub(self.base)
                .filter(|o| o + len as u64 <= self.mem.len() as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "outside guest"))?;
            Ok(&mut self.mem[off as usize..off as usize + len])
        }
    }

    fn send(ranges: &MemoryRanges, guest: &mut Guest) -> Vec<u8> {
        let mut wire = Vec::new();
        send_memory(&mut wire, ranges, |gpa, buf| {
            buf.copy_from_slice(guest.slot(gpa, buf.len())?);
            Ok(())
        })
        .unwrap();
        wire
    }

    fn receive(wire: &[u8], guest: &mut Guest, limits: &Limits) -> Result<u64, ProtocolError> {
        let mut r = wire;
        let mut h = [0u8; 16];
        r.read_exact(&mut h).unwrap();
        let header = RequestHeader::decode(&h)?;
        recv_memory(&mut r, &header, limits, |gpa, data| {
            assert!(data.len() <= CHUNK);
            guest.slot(gpa, data.len())?.copy_from_slice(data);
            Ok(())
        })
    }

    #[test]
    fn memory_round_trip_in_chunks() {
        let base = 0x10_0000;
        let mut src = Guest::new(base, 3 * CHUNK + 100);
        let mut dst = Guest {
            base,
            mem: vec![0; src.mem.len()],
        };
        let ranges = MemoryRanges(vec![
            (base + 4096, 2 * CHUNK as u64 + 5),
            (base, 10),
            (base + 3 * CHUNK as u64, 100),
        ]);
        let wire = send(&ranges, &mut src);
        assert_eq!(wire.len() as u64, 16 + ranges.payload_len().unwrap());
        let got = receive(&wire, &mut dst, &Limits::default()).unwrap();
        assert_eq!(got, 2 * CHUNK as u64 + 115);
        for &(gpa, len) in &ranges.0 {
            let (a, b) = ((gpa - base) as usize, (gpa - base + len) as usize);
            assert_eq!(src.mem[a..b], dst.mem[a..b]);
        }
        assert!(dst.mem[10..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn empty_table_is_fine() {
        let wire = send(&MemoryRanges::default(), &mut Guest::new(0, 0));
        assert_eq!(wire.len(), 20);
        assert_eq!(
            receive(&wire, &mut Guest::new(0, 0), &Limits::default()).unwrap(),
            0
        );
    }

    fn table_payload(ranges: &[(u64, u64)], extra: u64) -> (Vec<u8>, u64) {
        let ranges = MemoryRanges(ranges.to_vec());
        let sum: u64 = ranges.0.iter().fold(0u64, |s, r| s.saturating_add(r.1));
        (
            ranges.encode_table(),
            ranges.table_len().saturating_add(sum).saturating_add(extra),
        )
    }

    #[test]
    fn bad_tables_are_refused() {
        let limits = Limits {
            max_ranges: 4,
            ..Limits::default()
        };
        let parse = |table: &[u8], len| MemoryRanges::parse_table(&mut &table[..], len, &limits);
        let (t, len) = table_payload(&[(0, 10), (100, 5)], 0);
        assert_eq!(parse(&t, len).unwrap().0, vec![(0, 10), (100, 5)]);
        // Too long and too short frames.
        assert!(matches!(
            parse(&t, len + 1),
            Err(ProtocolError::MemoryLength { .. })
        ));
        assert!(matches!(
            parse(&t, len - 1),
            Err(ProtocolError::MemoryLength { .. })
        ));
        assert!(matches!(
            parse(&t, 3),
            Err(ProtocolError::MemoryLength { .. })
        ));
        // The table runs past the frame.
        assert!(matches!(
            parse(&t, 20),
            Err(ProtocolError::MemoryLength { .. })
        ));
        let (t, len) = table_payload(&[(0, 1); 5], 0);
        assert!(matches!(
            parse(&t, len),
            Err(ProtocolError::TooManyRanges { count: 5, limit: 4 })
        ));
        let (t, len) = table_payload(&[(0, 1), (7, 0)], 0);
        assert!(matches!(parse(&t, len), Err(ProtocolError::EmptyRange(7))));
        let (t, len) = table_payload(&[(u64::MAX, 1)], 0);
        assert!(matches!(
            parse(&t, len),
            Err(ProtocolError::RangeOverflow { .. })
        ));
        // Lengths whose sum wraps around.
        let (t, _) = table_payload(&[(0, u64::MAX / 2 + 1), (0, u64::MAX / 2 + 1)], 0);
        assert!(matches!(
            parse(&t, 52),
            Err(ProtocolError::MemoryLength { .. })
        ));
        // The table itself is cut short.
        let (t, len) = table_payload(&[(0, 10), (100, 5)], 0);
        assert!(matches!(parse(&t[..20], len), Err(ProtocolError::Io(..))));
    }

    #[test]
    fn over_the_message_limit() {
        let limits = Limits {
            max_memory_message: 100,
            ..Limits::default()
        };
        let wire = send(&MemoryRanges(vec![(0, 200)]), &mut Guest::new(0, 200));
        let e = receive(&wire, &mut Guest::new(0, 200), &limits).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::TooLong {
                command: Command::Memory,
                ..
            }
        ));
    }

    #[test]
    fn guest_refusal_is_reported_with_the_address() {
        let wire = send(&MemoryRanges(vec![(0, 200)]), &mut Guest::new(0, 200));
        let e = receive(&wire, &mut Guest::new(0, 100), &Limits::default()).unwrap_err();
        assert!(matches!(e, ProtocolError::MemoryAccess { gpa: 0, .. }));
    }

    #[test]
    fn truncated_data_is_an_error() {
        let wire = send(&MemoryRanges(vec![(0, 200)]), &mut Guest::new(0, 200));
        let e = receive(
            &wire[..wire.len() - 1],
            &mut Guest::new(0, 200),
            &Limits::default(),
        );
        assert!(matches!(e, Err(ProtocolError::Io("reading memory", _))));
    }

    #[test]
    fn sender_refuses_bad_ranges() {
        let mut sink = Vec::new();
        let e = send_memory(&mut sink, &MemoryRanges(vec![(5, 0)]), |_, _| Ok(()));
        assert!(matches!(e, Err(ProtocolError::EmptyRange(5))));
        assert!(sink.is_empty());
    }

    #[test]
    fn batches_respect_the_limits() {
        let limits = Limits {
            max_memory_message: 4 + 2 * 16 + 100,
            max_ranges: 2,
            ..Limits::default()
        };
        let input = [(0u64, 250u64), (1000, 0), (2000, 10), (3000, 1), (4000, 1)];
        let batches = MemoryRanges::batches(input, &limits).unwrap();
        let mut covered = Vec::new();
        for b in &batches {
            assert!(b.0.len() <= 2);
            assert!(b.payload_len().unwrap() <= limits.max_memory_message);
            covered.extend_from_slice(&b.0);
        }
        // Cut pieces join up again into the input, in order, without the empty range.
        let mut joined: Vec<(u64, u64)> = Vec::new();
        for (gpa, len) in covered {
            match joined.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += len,
                _ => joined.push((gpa, len)),
            }
        }
        assert_eq!(joined, vec![(0, 250), (2000, 10), (3000, 1), (4000, 1)]);
        let big = MemoryRanges::batches([(0, 8u64 << 30)], &Limits::default()).unwrap();
        assert_eq!(big.len(), 9);
        let tiny = Limits {
            max_memory_message: 20,
            ..Limits::default()
        };
        assert!(MemoryRanges::batches([(0, 1)], &tiny).is_err());
        assert!(MemoryRanges::batches([(u64::MAX, 2)], &Limits::default()).is_err());
    }
}
