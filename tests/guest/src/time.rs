//! Time from the TSC, which CPL3 can read at native speed.
//!
//! The frequency comes from the hypervisor when it publishes one (CPUID leaf
//! 0x40000010, EAX = TSC kHz: VMware's convention, which QEMU follows too),
//! otherwise from timing PIT channel 2 for 10 ms, the classic method. With
//! neither, 1 GHz is assumed and reported as `tsc_source=assumed`.

use baton_test_guest::protocol::TscSource;

use crate::io::{cpuid, inb, outb, rdtsc};

const CPUID_HYPERVISOR_PRESENT: u32 = 1 << 31;
const CPUID_HYPERVISOR_BASE: u32 = 0x4000_0000;
const CPUID_TSC_KHZ: u32 = 0x4000_0010;

const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL2: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
/// Channel 2, low then high byte, mode 0 (OUT rises at terminal count), binary.
const PIT_CH2_ONESHOT: u8 = 0xb0;
/// Port B of the (emulated) 8255: bit 0 gates channel 2, bit 1 drives the
/// speaker, bit 5 reads channel 2's OUT.
const PORT_B: u16 = 0x61;
const PORT_B_GATE2: u8 = 0x01;
const PORT_B_SPEAKER: u8 = 0x02;
const PORT_B_OUT2: u8 = 0x20;
const CALIBRATION_MS: u64 = 10;
/// Give up on a PIT that never fires after this many TSC ticks: about a
/// second at common frequencies, far beyond the 10 ms it should take.
const PIT_GIVE_UP_TICKS: u64 = 2_000_000_000;
/// Plausible TSC frequencies; a result outside means the PIT is not real.
const PLAUSIBLE_KHZ: core::ops::RangeInclusive<u64> = 100_000..=20_000_000;
/// Used when neither source works, so that timing still roughly works.
const ASSUMED_KHZ: u64 = 1_000_000;

/// The TSC and its frequency.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    khz: u64,
    source: TscSource,
    start: u64,
}

impl Clock {
    /// Finds the TSC frequency; uptime counts from here.
    pub fn calibrate() -> Self {
        let (khz, source) = if let Some(khz) = hypervisor_khz() {
            (khz, TscSource::Hypervisor)
        } else if let Some(khz) = pit_khz() {
            (khz, TscSource::Pit)
        } else {
            (ASSUMED_KHZ, TscSource::Assumed)
        };
        Self {
            khz,
            source,
            start: rdtsc(),
        }
    }

    /// TSC frequency in kHz, i.e. ticks per millisecond.
    pub fn khz(&self) -> u64 {
        self.khz
    }

    /// Where the frequency came from.
    pub fn source(&self) -> TscSource {
        self.source
    }

    /// The current TSC value.
    pub fn now(&self) -> u64 {
        rdtsc()
    }

    /// TSC ticks in `ms` milliseconds.
    pub fn ticks(&self, ms: u64) -> u64 {
        ms.saturating_mul(self.khz)
    }

    /// Spins for `ms` milliseconds.
    pub fn delay_ms(&self, ms: u64) {
        let start = rdtsc();
        let ticks = self.ticks(ms);
        while rdtsc().wrapping_sub(start) < ticks {
            core::hint::spin_loop();
        }
    }
}

fn hypervisor_khz() -> Option<u64> {
    if cpuid(1).ecx & CPUID_HYPERVISOR_PRESENT == 0 {
        return None;
    }
    if cpuid(CPUID_HYPERVISOR_BASE).eax < CPUID_TSC_KHZ {
        return None;
    }
    let khz = u64::from(cpuid(CPUID_TSC_KHZ).eax);
    (khz != 0).then_some(khz)
}

fn pit_khz() -> Option<u64> {
    let latch = PIT_HZ * CALIBRATION_MS / 1000;
    let port_b = inb(PORT_B);
    outb(PORT_B, (port_b & !PORT_B_SPEAKER) | PORT_B_GATE2);
    outb(PIT_COMMAND, PIT_CH2_ONESHOT);
    let [lo, hi, ..] = latch.to_le_bytes();
    outb(PIT_CHANNEL2, lo);
    outb(PIT_CHANNEL2, hi);
    let start = rdtsc();
    let mut polls = 0u64;
    let end = loop {
        let now = rdtsc();
        if inb(PORT_B) & PORT_B_OUT2 != 0 {
            break Some(now);
        }
        if now.wrapping_sub(start) > PIT_GIVE_UP_TICKS {
            break None;
        }
        polls += 1;
    };
    outb(PORT_B, port_b);
    let ticks = end?.wrapping_sub(start);
    let khz =
        u64::try_from(u128::from(ticks) * u128::from(PIT_HZ) / u128::from(latch * 1000)).ok()?;
    // OUT high on the first look means nothing counted (no PIT, or a stuck bit).
    (polls > 0 && PLAUSIBLE_KHZ.contains(&khz)).then_some(khz)
}

impl Clock {
    /// Microseconds since [`Clock::calibrate`] (smoltcp's clock, and the
    /// `status` line's): the TSC as it is, so it goes back (to 0 at worst) if
    /// the TSC does.
    pub fn uptime_us(&self) -> u64 {
        let ticks = rdtsc().saturating_sub(self.start);
        let us = u128::from(ticks) * 1000 / u128::from(self.khz);
        u64::try_from(us).unwrap_or(u64::MAX)
    }
}
