//! Dirtying memory at a set rate, in a way that can be checked afterwards.
//!
//! The `dirty` command keeps rewriting the 4 KiB pages of a buffer, one after
//! the other, at about a requested rate, so that a migration always has pages
//! to copy again. Every write stamps the whole page with its generation: the
//! number of the pass that wrote it, from 0. A pass writes pages 0, 1, 2 … in
//! order, so at any moment the pages before the cursor hold generation
//! `passes` and the others generation `passes - 1`, or nothing yet during the
//! first pass (see [`Progress`]). `dirty check` compares every written page
//! with that: a migration that lost a dirtied page leaves an older generation
//! behind, and one that mixed pages up leaves another page's stamp.
//!
//! Each u64 of a page is [`stamp`]`(page, generation, word)`: the three
//! fields side by side, XORed with a constant so that a zeroed page never
//! matches. [`decode`] gives the fields back, which makes a wrong value say
//! what it is.

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;
/// u64 words in a page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;
/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE as u64;

const KEY: u64 = 0x9e37_79b9_7f4a_7c15;
const WORD_BITS: u32 = 9;
const PAGE_BITS: u32 = 23;
const PAGE_MASK: u64 = (1 << PAGE_BITS) - 1;
const GEN_SHIFT: u32 = WORD_BITS + PAGE_BITS;

/// Most pages a buffer may have: the stamp keeps 23 bits of the page index.
pub const MAX_PAGES: u64 = 1 << PAGE_BITS;

/// The value of word `word` of page `page` in generation `generation`
/// (generations count modulo 2^32).
pub fn stamp(page: u64, generation: u64, word: usize) -> u64 {
    let fields = (generation << GEN_SHIFT) | (page & PAGE_MASK) << WORD_BITS | word as u64;
    fields ^ KEY
}

/// What a stamp says: page, generation (modulo 2^32) and word.
pub fn decode(value: u64) -> (u64, u64, usize) {
    let fields = value ^ KEY;
    let word = (fields & (PAGE_WORDS as u64 - 1)) as usize;
    (fields >> WORD_BITS & PAGE_MASK, fields >> GEN_SHIFT, word)
}

/// Stamps every word of `page`, which is page number `index`, with `generation`.
pub fn fill(page: &mut [u64; PAGE_WORDS], index: u64, generation: u64) {
    for (word, value) in page.iter_mut().enumerate() {
        *value = stamp(index, generation, word);
    }
}

/// The first word of a page that does not hold what it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Word index in the page.
    pub word: usize,
    /// What it should hold.
    pub want: u64,
    /// What it holds.
    pub got: u64,
}

/// Checks that every word of `page` (page number `index`) holds `generation`'s stamp.
pub fn verify(page: &[u64; PAGE_WORDS], index: u64, generation: u64) -> Result<(), Mismatch> {
    // The common case, all equal, as one pass the compiler can vectorise.
    let bad = page
        .iter()
        .enumerate()
        .fold(0u64, |acc, (w, &v)| acc | (v ^ stamp(index, generation, w)));
    if bad == 0 {
        return Ok(());
    }
    let (word, &got) = page
        .iter()
        .enumerate()
        .find(|&(w, &v)| v != stamp(index, generation, w))
        .expect("some word differs");
    Err(Mismatch {
        word,
        want: stamp(index, generation, word),
        got,
    })
}

/// Where the writer is in a buffer of `pages` pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Pages in the buffer.
    pub pages: u64,
    /// Passes over the whole buffer completed since it was allocated.
    pub passes: u64,
    /// The next page to write; pages before it were written in this pass.
    pub cursor: u64,
}

impl Progress {
    /// A new buffer of `pages` pages, none written yet.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            passes: 0,
            cursor: 0,
        }
    }

    /// The generation page `index` holds; `None` if it was never written.
    pub fn generation(&self, index: u64) -> Option<u64> {
        if index < self.cursor {
            Some(self.passes)
        } else {
            self.passes.checked_sub(1)
        }
    }

    /// Pages written at least once: those [`Progress::generation`] knows.
    pub fn written(&self) -> u64 {
        if self.passes == 0 {
            self.cursor
        } else {
            self.pages
        }
    }

    /// The page to write next and the generation to write it with.
    pub fn next(&self) -> (u64, u64) {
        (self.cursor, self.passes)
    }

    /// Records that the page [`Progress::next`] named was written.
    pub fn advance(&mut self) {
        self.cursor += 1;
        if self.cursor >= self.pages {
            self.cursor = 0;
            self.passes += 1;
        }
    }
}

/// Paces page writes at a rate, on a free-running counter (the TSC).
///
/// Like [`crate::periodic::Periodic`], it is built for a guest that may be
/// paused or migrated: after a stall it allows at most one burst (10 ms worth
/// of pages) rather than catching up, and if the counter goes backwards it
/// starts again from there.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    pages_per_sec: u64,
    ticks_per_sec: u64,
    start: u64,
    done: u64,
    burst: u64,
}

impl Pacer {
    /// `mib_per_sec` MiB/s of pages from `now`, on a counter that runs at
    /// `khz` kHz.
    pub fn new(now: u64, mib_per_sec: u64, khz: u64) -> Self {
        let pages_per_sec = mib_per_sec.saturating_mul(PAGES_PER_MIB);
        Self {
            pages_per_sec,
            ticks_per_sec: khz.saturating_mul(1000).max(1),
            start: now,
            done: 0,
            burst: (pages_per_sec / 100).max(1),
        }
    }

    /// Pages that may be written at `now`; call [`Pacer::wrote`] for those written.
    pub fn due(&mut self, now: u64) -> u64 {
        let elapsed = now.wrapping_sub(self.start);
        if elapsed > u64::MAX / 2 {
            // The counter went backwards.
            self.start = now;
            self.done = 0;
            return 0;
        }
        let allowed =
            u128::from(elapsed) * u128::from(self.pages_per_sec) / u128::from(self.ticks_per_sec);
        let allowed = u64::try_from(allowed).unwrap_or(u64::MAX);
        if allowed.saturating_sub(self.done) > self.burst {
            // Stalled: forgive what was missed, beyond one burst.
            self.done = allowed - self.burst;
        }
        allowed.saturating_sub(self.done)
    }

    /// Records `pages` written.
    pub fn wrote(&mut self, pages: u64) {
        self.done = self.done.saturating_add(pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_decode_and_differ() {
        let v = stamp(12345, 77, 511);
        assert_eq!(decode(v), (12345, 77, 511));
        assert_ne!(stamp(0, 0, 0), 0, "a zeroed page must not pass");
        assert_ne!(stamp(1, 0, 0), stamp(0, 1, 0));
        assert_ne!(stamp(0, 0, 1), stamp(1, 0, 0));
        assert_eq!(
            decode(stamp(MAX_PAGES - 1, u32::MAX.into(), 0)).0,
            MAX_PAGES - 1
        );
    }

    #[test]
    fn fill_then_verify() {
        let mut page = [0u64; PAGE_WORDS];
        assert_eq!(
            verify(&page, 3, 0),
            Err(Mismatch {
                word: 0,
                want: stamp(3, 0, 0),
                got: 0
            })
        );
        fill(&mut page, 3, 9);
        assert_eq!(verify(&page, 3, 9), Ok(()));
        // An older generation, another page's stamp, one flipped word.
        assert_eq!(verify(&page, 3, 10).unwrap_err().word, 0);
        assert_eq!(verify(&page, 4, 9).unwrap_err().got, stamp(3, 9, 0));
        page[100] ^= 1;
        let bad = verify(&page, 3, 9).unwrap_err();
        assert_eq!((bad.word, bad.want), (100, stamp(3, 9, 100)));
    }

    #[test]
    fn progress_runs_passes() {
        let generations = |p: &Progress| (0..3).map(|i| p.generation(i)).collect::<Vec<_>>();
        let mut p = Progress::new(3);
        assert_eq!(generations(&p), [None, None, None]);
        assert_eq!((p.next(), p.written()), ((0, 0), 0));
        p.advance();
        assert_eq!(generations(&p), [Some(0), None, None]);
        assert_eq!(p.written(), 1);
        p.advance();
        assert_eq!(p.next(), (2, 0));
        p.advance();
        assert_eq!(
            p,
            Progress {
                pages: 3,
                passes: 1,
                cursor: 0
            }
        );
        assert_eq!(generations(&p), [Some(0), Some(0), Some(0)]);
        assert_eq!((p.next(), p.written()), ((0, 1), 3));
        p.advance();
        assert_eq!(generations(&p), [Some(1), Some(0), Some(0)]);
    }

    #[test]
    fn pacer_keeps_the_rate() {
        // 4 MiB/s = 1024 pages/s on a 1 MHz counter: one page per ~977 ticks.
        let mut p = Pacer::new(0, 4, 1000);
        assert_eq!(p.due(0), 0);
        assert_eq!(p.due(5_000), 5);
        p.wrote(5);
        assert_eq!(p.due(5_000), 0);
        assert_eq!(p.due(10_000), 5);
        p.wrote(3);
        assert_eq!(p.due(10_000), 2, "what was not written stays due");
    }

    #[test]
    fn pacer_does_not_catch_up_after_a_stall() {
        // 100 MiB/s = 25600 pages/s: bursts of 256 pages.
        let mut p = Pacer::new(0, 100, 1000);
        assert_eq!(p.due(10_000_000), 256);
        p.wrote(256);
        assert_eq!(p.due(10_000_000), 0);
        assert_eq!(p.due(10_001_000), 25);
    }

    #[test]
    fn pacer_restarts_when_the_counter_goes_back() {
        let mut p = Pacer::new(1_000_000, 4, 1000);
        assert_eq!(p.due(500), 0);
        assert_eq!(p.due(5_500), 5);
    }

    #[test]
    fn pacer_survives_extremes() {
        let mut p = Pacer::new(0, u64::MAX, u64::MAX);
        assert!(p.due(u64::MAX / 2) > 0);
        let mut p = Pacer::new(0, 1, 0);
        assert_eq!(p.due(1000), 2, "one burst: 10 ms of 256 pages/s");
    }
}
