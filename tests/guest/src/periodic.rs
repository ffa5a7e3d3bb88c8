//! Repeating deadlines on a free-running counter (the TSC).

/// A deadline that repeats every `period` counter ticks.
///
/// Built for a guest that may be paused, snapshotted or migrated: after a
/// long stall it fires once and resumes the rhythm from then (no burst of
/// catch-up events), and if the counter jumps backwards it re-arms instead of
/// waiting for the counter to get back to the old deadline.
#[derive(Clone, Copy, Debug)]
pub struct Periodic {
    period: u64,
    next: u64,
}

/// Longest period: deadlines are compared with wrapping arithmetic, which
/// needs them within 2^63 ticks of now. (2^62 TSC ticks is decades.)
pub const MAX_PERIOD: u64 = 1 << 62;

impl Periodic {
    /// First due `period` ticks after `now`; `period` is clamped to
    /// 1..=[`MAX_PERIOD`].
    pub fn new(now: u64, period: u64) -> Self {
        let period = period.clamp(1, MAX_PERIOD);
        Self {
            period,
            next: now.wrapping_add(period),
        }
    }

    /// Whether the deadline has passed at `now`; if so, arms the next one.
    pub fn due(&mut self, now: u64) -> bool {
        let ahead = self.next.wrapping_sub(now);
        if ahead != 0 && ahead <= MAX_PERIOD << 1 {
            if ahead > self.period {
                // The counter went backwards: restart the period from now.
                self.next = now.wrapping_add(self.period);
            }
            return false;
        }
        self.next = self.next.wrapping_add(self.period);
        let behind = now.wrapping_sub(self.next);
        if behind <= MAX_PERIOD << 1 {
            // Stalled for more than a period: no catching up.
            self.next = now.wrapping_add(self.period);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_every_period() {
        let mut p = Periodic::new(1000, 10);
        assert!(!p.due(1000));
        assert!(!p.due(1009));
        assert!(p.due(1010));
        assert!(!p.due(1010));
        assert!(!p.due(1019));
        assert!(p.due(1021)); // late, but by less than a period: the rhythm is kept
        assert!(!p.due(1029));
        assert!(p.due(1030));
    }

    #[test]
    fn long_stall_fires_once() {
        let mut p = Periodic::new(0, 10);
        assert!(p.due(1_000_005));
        assert!(!p.due(1_000_006));
        assert!(!p.due(1_000_014));
        assert!(p.due(1_000_015));
    }

    #[test]
    fn counter_going_back_rearms() {
        let mut p = Periodic::new(1_000_000, 10);
        assert!(!p.due(500));
        assert!(!p.due(509));
        assert!(p.due(510));
    }

    #[test]
    fn wraps_around() {
        let mut p = Periodic::new(u64::MAX - 5, 10);
        assert!(!p.due(u64::MAX));
        assert!(!p.due(3));
        assert!(p.due(4));
    }

    #[test]
    fn huge_and_zero_periods_are_clamped() {
        let mut p = Periodic::new(0, u64::MAX);
        assert!(!p.due(1));
        assert!(!p.due(1 << 61));
        let mut p = Periodic::new(0, 0);
        assert!(p.due(1));
    }
}
