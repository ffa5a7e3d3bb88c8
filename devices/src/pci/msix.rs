//! MSI-X: the capability, the vector table and the pending-bit array, as a guest programs
//! them through a BAR.
//!
//! The model only keeps state and answers the guest; the VMM turns a vector's message into a
//! KVM route (GSI + irqfd) and asks [`Msix::fire`] what to do when the device raises it: send
//! the message, or record it as pending because the vector or the function is masked. A
//! pending vector is sent when it is unmasked ([`MsixWrite::Unmasked`]).

/// MSI-X capability id.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// One table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    /// Message address, low half.
    pub addr_lo: u32,
    /// Message address, high half.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// What a guest write to the table changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixWrite {
    /// Nothing the VMM must act on.
    None,
    /// The message of this vector changed: update its route.
    Message(u16),
    /// This vector was unmasked while pending: send it now.
    Unmasked(u16),
}

/// What to do when the device raises a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fire {
    /// Send this message.
    Send(MsixEntry),
    /// Masked (or MSI-X disabled): recorded as pending.
    Pending,
    /// No such vector.
    Invalid,
}

/// A function's MSI-X state; serialised as it is for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Msix {
    table: Vec<MsixEntry>,
    pending: Vec<u64>,
    control: u16,
}

impl Msix {
    /// `vectors` entries (1 to [`MAX_VECTORS`]), all masked, MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        Msix {
            table: vec![
                MsixEntry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                usize::from(vectors)
            ],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            control: vectors - 1,
        }
    }

    /// The state `saved` for a function with `vectors` vectors, refused if it has another
    /// number of vectors.
    pub fn from_state(vectors: u16, saved: Msix) -> Result<Self, crate::StateError> {
        let fresh = Msix::new(vectors);
        if saved.table.len() != fresh.table.len()
            || saved.pending.len() != fresh.pending.len()
            || saved.control & !(CONTROL_ENABLE | CONTROL_FUNCTION_MASK) != fresh.control
        {
            return Err(crate::StateError::Invalid(format!(
                "MSI-X state has {} vectors, the device has {vectors}",
                saved.table.len()
            )));
        }
        Ok(saved)
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes of table.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of pending-bit array.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// The capability body (id, next placeholder, control, table and PBA locations) for a
    /// table at `table_offset` and a PBA at `pba_offset`, both in BAR `bar`.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> Vec<u8> {
        let mut cap = vec![CAPABILITY_ID, 0];
        cap.extend_from_slice(&(self.vectors() - 1).to_le_bytes());
        cap.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        cap
    }

    /// The message control word as the guest reads it.
    pub fn control(&self) -> u16 {
        self.control
    }

    /// The guest wrote the message control word; returns the vectors that became deliverable
    /// (pending and no longer masked) if the function was enabled or unmasked.
    pub fn set_control(&mut self, value: u16) -> Vec<u16> {
        let was_blocked = self.blocked();
        let writable = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        self.control = (self.control & !writable) | (value & writable);
        if was_blocked && !self.blocked() {
            self.take_deliverable()
        } else {
            Vec::new()
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn blocked(&self) -> bool {
        !self.enabled() || self.control & CONTROL_FUNCTION_MASK != 0
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    fn take_deliverable(&mut self) -> Vec<u16> {
        let ready: Vec<u16> = (0..self.table.len())
            .filter(|&v| self.is_pending(v) && !self.table[v].masked())
            .map(|v| v as u16)
            .collect();
        for v in &ready {
            self.set_pending(usize::from(*v), false);
        }
        ready
    }

    /// Entry `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.table.get(usize::from(vector)).copied()
    }

    /// A guest read of the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        read_words(offset, data, |word| {
            let e = self.table.get((word / 4) as usize)?;
            Some(match word % 4 {
                0 => e.addr_lo,
                1 => e.addr_hi,
                2 => e.data,
                _ => e.control,
            })
        });
    }

    /// A guest write to the table at `offset` (dword or qword writes, as the spec allows).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> MsixWrite {
        if offset % 4 != 0 || !(data.len() == 4 || data.len() == 8) {
            return MsixWrite::None;
        }
        let mut result = MsixWrite::None;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let word = offset / 4 + i as u64;
            let value = u32::from_le_bytes(chunk.try_into().expect("4-byte chunk"));
            let vector = (word / 4) as usize;
            let Some(e) = self.table.get_mut(vector) else {
                return MsixWrite::None;
            };
            match word % 4 {
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => {
                    let was_masked = e.masked();
                    e.control = value & VECTOR_MASKED;
                    if was_masked && !e.masked() && self.is_pending(vector) && !self.blocked() {
                        self.set_pending(vector, false);
                        return MsixWrite::Unmasked(vector as u16);
                    }
                    continue;
                }
            }
            result = MsixWrite::Message(vector as u16);
        }
        result
    }

    /// A guest read of the pending-bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        read_words(offset, data, |word| {
            let qword = self.pending.get((word / 2) as usize)?;
            Some((qword >> (32 * (word % 2))) as u32)
        });
    }

    /// The device raises `vector`.
    pub fn fire(&mut self, vector: u16) -> Fire {
        let v = usize::from(vector);
        let Some(e) = self.table.get(v).copied() else {
            return Fire::Invalid;
        };
        if self.blocked() || e.masked() {
            self.set_pending(v, true);
            Fire::Pending
        } else {
            Fire::Send(e)
        }
    }
}

/// Fills `data` from dwords given by `word` (all ones where it answers None).
fn read_words(offset: u64, data: &mut [u8], word: impl Fn(u64) -> Option<u32>) {
    for (i, b) in data.iter_mut().enumerate() {
        let at = offset + i as u64;
        *b = word(at / 4).map_or(0xff, |w| (w >> (8 * (at % 4))) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(m: &mut Msix, v: u64, data: u32) {
        m.write_table(v * ENTRY_SIZE, &0xfee0_0000u32.to_le_bytes());
        m.write_table(v * ENTRY_SIZE + 4, &0u32.to_le_bytes());
        m.write_table(v * ENTRY_SIZE + 8, &data.to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let m = Msix::new(9);
        let cap = m.capability(1, 0x2000, 0x3000);
        assert_eq!(cap[0], CAPABILITY_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 8);
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x2001);
        assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x3001);
        assert_eq!(m.table_size(), 9 * 16);
        assert_eq!(m.pba_size(), 8);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let mut m = Msix::new(4);
        assert_eq!(
            m.write_table(16 + 8, &0x41u32.to_le_bytes()),
            MsixWrite::Message(1)
        );
        program(&mut m, 1, 0x41);
        // Disabled: everything pends.
        assert_eq!(m.fire(1), Fire::Pending);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Enabling leaves vector 1 masked, so nothing is delivered yet.
        assert!(m.set_control(CONTROL_ENABLE).is_empty());
        assert_eq!(
            m.write_table(16 + 12, &0u32.to_le_bytes()),
            MsixWrite::Unmasked(1)
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        match m.fire(1) {
            Fire::Send(e) => assert_eq!((e.addr_lo, e.data), (0xfee0_0000, 0x41)),
            other => panic!("{other:?}"),
        }
        // Function mask holds everything; clearing it delivers what pended.
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(m.fire(1), Fire::Pending);
        assert_eq!(m.set_control(CONTROL_ENABLE), vec![1]);
        assert_eq!(m.fire(9), Fire::Invalid);
    }

    #[test]
    fn table_reads_and_odd_accesses() {
        let mut m = Msix::new(2);
        program(&mut m, 0, 0x1234);
        let mut b = [0u8; 4];
        m.read_table(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1234);
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), VECTOR_MASKED, "vectors start masked");
        // Past the table reads all ones; odd writes are ignored.
        m.read_table(32, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(m.write_table(2, &[1, 2, 3, 4]), MsixWrite::None);
        assert_eq!(m.write_table(0, &[1, 2]), MsixWrite::None);
        assert_eq!(m.write_table(4096, &[0; 4]), MsixWrite::None);
        // A qword write sets address low and high at once.
        assert_eq!(
            m.write_table(16, &[1, 0, 0, 0, 2, 0, 0, 0]),
            MsixWrite::Message(1)
        );
        assert_eq!(m.entry(1).unwrap().addr_hi, 2);
        // Reserved vector control bits stay zero; table size is read-only.
        m.write_table(12, &u32::MAX.to_le_bytes());
        assert_eq!(m.entry(0).unwrap().control, VECTOR_MASKED);
        m.set_control(0x07ff);
        assert_eq!(m.control(), 1);
    }
}
