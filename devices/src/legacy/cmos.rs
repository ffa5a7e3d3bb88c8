//! The CMOS real-time clock at ports 0x70/0x71.
//!
//! Linux reads the wall-clock time from it at boot and waits while the "update in progress"
//! bit is set, so a missing RTC (reads of 0xff) would hang it. The time is the host's, in BCD,
//! 24-hour mode; the update bit is never set. Other registers are plain battery-backed RAM.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

const INDEX_MASK: u8 = 0x7f;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;
/// Register B: 24-hour mode, BCD.
const REG_B_24H: u8 = 0x02;
/// Register D: the battery is fine.
const REG_D_VRT: u8 = 0x80;
/// Register A: the 32.768 kHz divider and a 1024 Hz rate, no update in progress.
const REG_A_DEFAULT: u8 = 0x26;

/// The CMOS RTC (base 0x70, length 2).
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = REG_A_DEFAULT;
        ram[REG_B] = REG_B_24H;
        ram[REG_D] = REG_D_VRT;
        Cmos { index: 0, ram }
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Converts days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + u64::from(month <= 2);
    (year, month, day)
}

/// The CMOS index register and RAM, for snapshots (the clock registers follow the host).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    /// The layout's version ([`crate::Versioned`]).
    pub version: u32,
    /// Selected register.
    pub index: u8,
    /// The 128 bytes of RAM.
    pub ram: Vec<u8>,
}

impl crate::Versioned for CmosState {
    const KIND: &'static str = "CMOS";
    const VERSION: u32 = 1;
    fn version(&self) -> u32 {
        self.version
    }
}

impl Cmos {
    /// The state to save.
    pub fn state(&self) -> CmosState {
        CmosState {
            version: <CmosState as crate::Versioned>::VERSION,
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// A CMOS in the state `state`.
    pub fn from_state(state: &CmosState) -> Result<Self, crate::StateError> {
        crate::Versioned::check_version(state)?;
        let ram = state.ram.as_slice().try_into().map_err(|_| {
            crate::StateError::Invalid(format!("CMOS RAM of {} bytes, not 128", state.ram.len()))
        })?;
        Ok(Cmos {
            index: state.index,
            ram,
        })
    }

    /// The clock register at `index` for the time `secs` since the epoch.
    fn clock_register(index: usize, secs: u64) -> Option<u8> {
        let days = secs / 86_400;
        let (year, month, day) = civil_from_days(days);
        let tod = secs % 86_400;
        Some(match index {
            0x00 => bcd(tod % 60),
            0x02 => bcd(tod / 60 % 60),
            0x04 => bcd(tod / 3600),
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            0x06 => bcd((days + 4) % 7 + 1),
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year % 100),
            REG_CENTURY => bcd(year / 100),
            _ => return None,
        })
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 || data.len() != 1 {
            data.fill(0);
            return;
        }
        let index = usize::from(self.index & INDEX_MASK);
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        data[0] = match index {
            REG_C => 0,
            _ => Self::clock_register(index, secs).unwrap_or(self.ram[index]),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value,
            1 => {
                let index = usize::from(self.index & INDEX_MASK);
                // The clock follows the host; the status registers stay as the guest needs them.
                if Self::clock_register(index, 0).is_none() && index != REG_A && index != REG_D {
                    self.ram[index] = value;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_778), (2026, 11, 21));
        // 2026-11-21 12:34:56 UTC, a Saturday.
        let secs = 20_778 * 86_400 + 12 * 3600 + 34 * 60 + 56;
        assert_eq!(Cmos::clock_register(0x04, secs), Some(0x12));
        assert_eq!(Cmos::clock_register(0x02, secs), Some(0x34));
        assert_eq!(Cmos::clock_register(0x00, secs), Some(0x56));
        assert_eq!(Cmos::clock_register(0x06, secs), Some(7));
        assert_eq!(Cmos::clock_register(0x09, secs), Some(0x26));
        assert_eq!(Cmos::clock_register(REG_CENTURY, secs), Some(0x20));
    }

    #[test]
    fn update_bit_never_set_and_ram_works() {
        let mut cmos = Cmos::default();
        let mut b = [0u8];
        cmos.write(0, &[REG_A as u8 | 0x80]);
        cmos.read(1, &mut b);
        assert_eq!(b[0] & 0x80, 0);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        cmos.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
    }

    #[test]
    fn state_round_trips_and_other_versions_or_sizes_are_refused() {
        let mut cmos = Cmos::default();
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0x5a]);
        let saved = cmos.state();
        assert_eq!(
            (saved.version, saved.index, saved.ram[0x40]),
            (1, 0x40, 0x5a)
        );
        let json = serde_json::to_string(&saved).expect("serialises");
        let back: CmosState = serde_json::from_str(&json).expect("parses");
        assert_eq!(Cmos::from_state(&back).expect("restores").state(), saved);
        let e = Cmos::from_state(&CmosState {
            version: 2,
            ..saved.clone()
        })
        .err()
        .expect("another version");
        assert_eq!(
            e.to_string(),
            "CMOS state version 2 is not supported (this baton reads version 1)"
        );
        let e = Cmos::from_state(&CmosState {
            ram: vec![0; 64],
            ..saved
        })
        .err()
        .expect("another size");
        assert_eq!(e.to_string(), "CMOS RAM of 64 bytes, not 128");
    }
}
