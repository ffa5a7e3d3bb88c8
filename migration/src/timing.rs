//! Timing the steps of a migration: a [`Timeline`] records how long each step took, as
//! [`Phase`]s, which the destination sends back with its answer to Complete and the source
//! reports with its own.

use std::time::{Duration, Instant};

use crate::protocol::Phase;

/// Consecutive steps, each ended by [`Timeline::mark`].
#[derive(Debug, Clone)]
pub struct Timeline {
    began: Instant,
    last: Instant,
    phases: Vec<Phase>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// A timeline whose first step starts now.
    pub fn new() -> Self {
        let now = Instant::now();
        Timeline {
            began: now,
            last: now,
            phases: Vec::new(),
        }
    }

    /// The time since the timeline was created.
    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// The next step starts now: the time since the last mark is not counted.
    pub fn restart(&mut self) {
        self.last = Instant::now();
    }

    /// Ends the step called `name`, which began at the last mark (or restart).
    pub fn mark(&mut self, name: impl Into<String>) {
        let now = Instant::now();
        self.push(name, now - self.last);
        self.last = now;
    }

    /// Records a step timed elsewhere, leaving the current step's start alone.
    pub fn push(&mut self, name: impl Into<String>, took: Duration) {
        self.phases.push(Phase {
            name: name.into(),
            us: micros(took),
        });
    }

    /// The steps recorded so far, leaving none.
    pub fn take(&mut self) -> Vec<Phase> {
        std::mem::take(&mut self.phases)
    }

    /// The steps as one line: `name 12 us, other 3 us`.
    pub fn report(&self) -> String {
        report(&self.phases)
    }
}

/// `phases` as one line: `name 12 us, other 3 us`.
pub fn report(phases: &[Phase]) -> String {
    let parts: Vec<String> = phases
        .iter()
        .map(|p| format!("{} {} us", p.name, p.us))
        .collect();
    parts.join(", ")
}

/// `d` in whole microseconds (saturating).
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_consecutive_and_restart_skips_a_gap() {
        let mut t = Timeline::new();
        std::thread::sleep(Duration::from_millis(2));
        t.mark("first");
        std::thread::sleep(Duration::from_millis(5));
        t.restart();
        t.mark("second");
        t.push("elsewhere", Duration::from_micros(7));
        assert_eq!(t.report().split(", ").count(), 3);
        let p = t.take();
        assert_eq!(p.len(), 3);
        assert!(p[0].us >= 2000, "{p:?}");
        // The 5 ms before the restart are not in the second step.
        assert!(p[1].us < 5000, "{p:?}");
        assert_eq!(p[2].us, 7);
        assert_eq!(report(&p[2..]), "elsewhere 7 us");
        assert!(t.take().is_empty());
        assert!(t.elapsed() >= Duration::from_millis(7));
    }
}
