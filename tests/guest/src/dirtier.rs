//! The memory dirtier behind the `dirty` commands (see
//! [`baton_test_guest::dirty`] for the page stamps and
//! [`baton_test_guest::protocol`] for the commands).
//!
//! The writer is [`step`], called over and over by the CPU whose job it is:
//! CPU 1 in its counting loop when that AP started, otherwise the boot CPU's
//! main loop. Each call writes the pages the pacer allows, at most
//! [`STEP_PAGES`], so the main loop stays responsive. The commands run on the
//! boot CPU and take the same lock; while one waits for it the writer stands
//! back, so a `dirty check` sees the buffer between two page writes.

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use baton_test_guest::dirty::{self, Pacer, Progress, PAGES_PER_MIB, PAGE_SIZE, PAGE_WORDS};
use baton_test_guest::protocol::{self, BadPage, DirtyStatus};

use crate::io::rdtsc;
use crate::serial::emit;

/// Most pages one [`step`] writes: 256 KiB, some tens of microseconds.
const STEP_PAGES: u64 = 64;

type Page = [u64; PAGE_WORDS];

struct Buffer {
    pages: *mut Page,
    mib: u64,
}

impl Buffer {
    fn layout(mib: u64) -> Layout {
        Layout::from_size_align((mib << 20) as usize, PAGE_SIZE).expect("a valid layout")
    }

    /// `mib` MiB from the heap, left as they are: the writer's first pass
    /// stamps them, at the requested rate like every other.
    fn new(mib: u64) -> Option<Self> {
        // SAFETY: a non-zero size (mib >= 1, checked by the command parser).
        let pages = unsafe { alloc(Self::layout(mib)) }.cast::<Page>();
        (!pages.is_null()).then_some(Self { pages, mib })
    }

    fn page(&self, index: u64) -> &Page {
        debug_assert!(index < self.mib * PAGES_PER_MIB);
        // SAFETY: `index` is within the allocation (every caller bounds it by
        // the page count); the lock gives the holder sole access.
        unsafe { &*self.pages.add(index as usize) }
    }

    fn page_mut(&mut self, index: u64) -> &mut Page {
        debug_assert!(index < self.mib * PAGES_PER_MIB);
        // SAFETY: as for `page`, and `&mut self` makes the access exclusive.
        unsafe { &mut *self.pages.add(index as usize) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.pages.cast(), Self::layout(self.mib)) }
    }
}

#[derive(Default)]
struct State {
    buffer: Option<Buffer>,
    rate: u64,
    progress: Progress,
    written: u64,
    pacer: Option<Pacer>,
    khz: u64,
}

impl State {
    fn status(&self) -> DirtyStatus {
        DirtyStatus {
            mib: self.buffer.as_ref().map_or(0, |b| b.mib),
            rate: self.rate,
            progress: self.progress,
            written: self.written,
            cpu: WRITER.load(Ordering::Relaxed) as u32,
        }
    }

    fn write_due(&mut self, now: u64) {
        let (Some(buffer), Some(pacer)) = (self.buffer.as_mut(), self.pacer.as_mut()) else {
            return;
        };
        let due = pacer.due(now).min(STEP_PAGES);
        for _ in 0..due {
            let (page, generation) = self.progress.next();
            dirty::fill(buffer.page_mut(page), page, generation);
            self.progress.advance();
        }
        pacer.wrote(due);
        self.written += due;
    }
}

/// A spin lock: the writer only ever tries it, the commands wait for it.
struct Lock {
    held: AtomicBool,
    state: UnsafeCell<Option<State>>,
}

// SAFETY: `state` is only reached through a `Guard`, and `held` lets one
// guard exist at a time.
unsafe impl Sync for Lock {}

struct Guard<'a>(&'a Lock);

impl Lock {
    fn try_lock(&self) -> Option<Guard<'_>> {
        // A guard only once the lock is taken: dropping one releases it.
        let taken = self
            .held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed);
        taken.ok().map(|_| Guard(self))
    }

    fn lock(&self) -> Guard<'_> {
        WAITING.store(true, Ordering::Relaxed);
        let guard = loop {
            if let Some(g) = self.try_lock() {
                break g;
            }
            core::hint::spin_loop();
        };
        WAITING.store(false, Ordering::Relaxed);
        guard
    }
}

impl Deref for Guard<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        // SAFETY: this guard holds the lock; the state is set up by `init`
        // before anything takes it.
        unsafe { (*self.0.state.get()).as_ref().expect("dirtier initialised") }
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        // SAFETY: as for `deref`; `&mut self` makes this the only reference.
        unsafe { (*self.0.state.get()).as_mut().expect("dirtier initialised") }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::Release);
    }
}

static STATE: Lock = Lock {
    held: AtomicBool::new(false),
    state: UnsafeCell::new(None),
};
/// A command waits for the lock: the writer stands back.
static WAITING: AtomicBool = AtomicBool::new(false);
/// The writer has a buffer and a rate: cheaper to look at than the lock.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The CPU index whose loop runs the writer.
static WRITER: AtomicUsize = AtomicUsize::new(0);

/// Sets the dirtier up, with the writer on CPU `writer`; call once, before
/// the first [`step`] or command.
pub fn init(khz: u64, writer: usize) {
    WRITER.store(writer, Ordering::Relaxed);
    // SAFETY: nothing has taken the lock yet (no command was read, and `step`
    // returns early until ACTIVE), so this is the only access.
    unsafe {
        *STATE.state.get() = Some(State {
            khz,
            ..State::default()
        })
    };
}

/// The writer: writes the pages that are due if CPU `cpu` runs it.
pub fn step(cpu: usize) {
    if !ACTIVE.load(Ordering::Relaxed)
        || WAITING.load(Ordering::Relaxed)
        || WRITER.load(Ordering::Relaxed) != cpu
    {
        return;
    }
    if let Some(mut state) = STATE.try_lock() {
        state.write_due(rdtsc());
    }
}

/// `dirty`
pub fn status() {
    let status = STATE.lock().status();
    emit(|w| protocol::dirty_status(w, &status));
}

/// `dirty MIB RATE`
pub fn set(mib: u64, rate: u64) {
    let mut state = STATE.lock();
    ACTIVE.store(false, Ordering::Relaxed);
    if state.buffer.as_ref().is_none_or(|b| b.mib != mib) {
        // The old buffer goes first, so that one as large fits again.
        state.buffer = None;
        state.buffer = Buffer::new(mib);
        state.progress = Progress::new(mib * PAGES_PER_MIB);
        state.written = 0;
    }
    if state.buffer.is_none() {
        state.rate = 0;
        state.progress = Progress::default();
        drop(state);
        let problem = format_args!("cannot allocate {mib} MiB");
        emit(|w| protocol::device_error(w, "dirty", &problem));
        return;
    }
    state.rate = rate;
    state.pacer = (rate != 0).then(|| Pacer::new(rdtsc(), rate, state.khz));
    ACTIVE.store(rate != 0, Ordering::Relaxed);
    let status = state.status();
    drop(state);
    emit(|w| protocol::dirty_status(w, &status));
}

/// `dirty check`
pub fn check() {
    let state = STATE.lock();
    let Some(buffer) = &state.buffer else {
        drop(state);
        emit(|w| protocol::device_error(w, "dirty", &"no buffer"));
        return;
    };
    let progress = state.progress;
    let mut bad_pages = 0u64;
    let mut first = None;
    let written = (0..progress.pages).filter_map(|page| Some((page, progress.generation(page)?)));
    for (page, generation) in written {
        if let Err(mismatch) = dirty::verify(buffer.page(page), page, generation) {
            bad_pages += 1;
            first.get_or_insert(BadPage { page, mismatch });
        }
    }
    drop(state);
    emit(|w| protocol::dirty_check(w, &progress, bad_pages, first));
}
