//! What every device's worker threads share: the thread with its stop signal, an epoll set,
//! and walking a queue's descriptor chains as host I/O vectors.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap as _;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Activation, ActiveQueue, GuestMemory, Interrupt};

/// Token of a single-queue device's notifications.
const NOTIFY_TOKEN: u64 = 0;

/// A chain handler: serves one descriptor chain and returns the bytes it wrote into it.
pub type ServeChain = dyn FnMut(DescriptorChain<&GuestMemory>, &GuestMemory) -> u32 + Send;

/// Starts a worker for a device with one queue (queue 0) that serves each chain with
/// `serve`. A broken queue parks the worker until the driver resets the device. Stopped, the
/// worker hands the queue back where it left it.
pub fn spawn_single_queue(
    name: &'static str,
    activation: Activation,
    mut serve: Box<ServeChain>,
) -> Result<Worker<ActiveQueue>, ActivateError> {
    let Activation {
        mem,
        mut queues,
        interrupt,
        ..
    } = activation;
    let mut queue = queues
        .get_mut(0)
        .and_then(Option::take)
        .ok_or(ActivateError::QueueMissing(0))?;
    Worker::spawn(name.into(), move |events| {
        if let Err(e) = events.add(queue.notify.as_raw_fd(), NOTIFY_TOKEN, EventSet::IN) {
            log::warn!("{name}: cannot watch the queue: {e}");
            return queue;
        }
        // Chains may have been made available while the device was paused.
        let mut tokens = vec![NOTIFY_TOKEN];
        loop {
            if tokens.contains(&STOP_TOKEN) {
                return queue;
            }
            if tokens.contains(&NOTIFY_TOKEN) {
                let _ = queue.notify.read();
                if let Err(e) = serve_queue(&mut queue, &mem, &interrupt, &mut serve) {
                    log::warn!("{name}: {e}; the queue stops until the driver resets the device");
                    interrupt.device_broken();
                    wait_for_stop(&events);
                    return queue;
                }
            }
            if let Err(e) = events.wait(&mut tokens) {
                log::warn!("{name}: epoll: {e}");
                return queue;
            }
        }
    })
    .map_err(ActivateError::Worker)
}

/// Stops a single-queue worker, if running, and hands back its queue as the queue list a
/// paused device returns.
pub fn stop_single_queue(worker: &mut Option<Worker<ActiveQueue>>) -> Vec<Option<ActiveQueue>> {
    worker
        .take()
        .and_then(Worker::stop)
        .map(Some)
        .into_iter()
        .collect()
}

/// Serves every available chain of `q`, then interrupts the driver if it wants that.
pub fn serve_queue(
    q: &mut ActiveQueue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    serve: &mut ServeChain,
) -> Result<(), QueueError> {
    let mut used = false;
    loop {
        disable_notification(&mut q.queue, mem)?;
        while let Some(chain) = pop(&mut q.queue, mem)? {
            let head = chain.head_index();
            let written = serve(chain, mem);
            add_used(&mut q.queue, mem, head, written)?;
            used = true;
        }
        if !enable_notification(&mut q.queue, mem)? {
            break;
        }
    }
    if used && needs_interrupt(&mut q.queue, mem) {
        interrupt.queue(q.vector);
    }
    Ok(())
}

/// Parks a worker whose queue broke until it is told to stop.
pub fn wait_for_stop(events: &Events) {
    let mut tokens = Vec::new();
    while events.wait(&mut tokens).is_ok() && !tokens.contains(&STOP_TOKEN) {}
}

/// What every worker thread runs first, if set ([`on_thread_start`]).
static ON_THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Has every worker thread started from now on call `hook` first thing: the VMM loads the
/// device threads' seccomp filter there. Only the first hook set counts.
pub fn on_thread_start(hook: fn()) {
    let _ = ON_THREAD_START.set(hook);
}

/// Token of the stop eventfd in every worker's epoll set.
pub const STOP_TOKEN: u64 = u64::MAX;

/// A device worker thread that stops when asked, and then hands back what it worked on
/// (its queues), so the device can be paused and resumed without losing its place.
pub struct Worker<T: Send + 'static = ()> {
    stop: EventFd,
    /// What the body hands back, once it has returned.
    done: Option<Receiver<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Runs `body` on a thread named `name` (a spare one if one waits: see [`reserve`]);
    /// `body` gets an epoll set that already watches the stop eventfd under
    /// [`STOP_TOKEN`], and must return when that fires.
    pub fn spawn(
        name: String,
        body: impl FnOnce(Events) -> T + Send + 'static,
    ) -> io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let events = Events::new()?;
        events.add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        let (tx, done) = sync_channel(1);
        run_on_a_thread(
            name,
            Box::new(move || {
                // Everything the body held is dropped before the stopper hears of it.
                let _ = tx.send(body(events));
            }),
        )?;
        Ok(Worker {
            stop,
            done: Some(done),
        })
    }

    /// Asks the thread to stop without waiting: a device with several workers asks them all
    /// before waiting for each, so they wind down together.
    pub fn ask_to_stop(&self) {
        let _ = self.stop.write(1);
    }

    /// Asks the thread to stop, waits until its body has returned, and returns what it
    /// handed back (nothing if it panicked).
    pub fn stop(mut self) -> Option<T> {
        self.stop_and_wait()
    }

    fn stop_and_wait(&mut self) -> Option<T> {
        let done = self.done.take()?;
        let _ = self.stop.write(1);
        match done.recv() {
            Ok(t) => Some(t),
            Err(_) => {
                log::error!("A device worker panicked");
                None
            }
        }
    }
}

impl<T: Send + 'static> Drop for Worker<T> {
    fn drop(&mut self) {
        self.stop_and_wait();
    }
}

/// A worker's body, with its thread's name.
type Job = (String, Box<dyn FnOnce() + Send>);

/// Threads whose worker stopped wait here for the next one: pausing a device stops its
/// workers and resuming starts new ones, inside a migration's downtime, and handing a body
/// to a waiting thread costs one wake-up where ending a thread and starting another cost
/// tens of microseconds each on a busy host. A spare beyond those [`reserve`] keeps ends
/// after [`SPARE_IDLE`] without work.
struct Spares {
    state: Mutex<SparesState>,
    work: Condvar,
}

struct SparesState {
    /// Bodies handed over that no spare has taken yet.
    jobs: VecDeque<Job>,
    /// Spares waiting.
    idle: usize,
    /// Spares started and not yet waiting.
    starting: usize,
    /// Spares that wait without a deadline.
    keep: usize,
}

static SPARES: Spares = Spares {
    state: Mutex::new(SparesState {
        jobs: VecDeque::new(),
        idle: 0,
        starting: 0,
        keep: 0,
    }),
    work: Condvar::new(),
};

/// How long a spare thread waits for a worker to run before it ends.
pub const SPARE_IDLE: Duration = Duration::from_secs(1);

fn spares() -> MutexGuard<'static, SparesState> {
    SPARES.state.lock().expect("spare worker lock poisoned")
}

/// Runs `job` on a spare thread if one waits for it, else on a new one.
fn run_on_a_thread(name: String, job: Box<dyn FnOnce() + Send>) -> io::Result<()> {
    let mut st = spares();
    if st.idle > st.jobs.len() {
        st.jobs.push_back((name, job));
        SPARES.work.notify_one();
        return Ok(());
    }
    drop(st);
    start_thread(name, Some(job))
}

/// A new thread that runs `first` (if any) and then waits as a spare; one without `first`
/// the caller has counted as `starting`.
fn start_thread(name: String, first: Option<Box<dyn FnOnce() + Send>>) -> io::Result<()> {
    let spare = first.is_none();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        if let Some(hook) = ON_THREAD_START.get() {
            hook();
        }
        if let Some(job) = first {
            job();
        }
        serve_as_spare(spare);
    });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            if spare {
                spares().starting -= 1;
            }
            Err(e)
        }
    }
}

/// Waits for bodies to run until none comes for [`SPARE_IDLE`] (or ever, while
/// [`reserve`] keeps this thread); `starting` if counted as such until now.
fn serve_as_spare(mut starting: bool) {
    loop {
        let mut st = spares();
        if std::mem::take(&mut starting) {
            st.starting -= 1;
        }
        st.idle += 1;
        let job = loop {
            if let Some(job) = st.jobs.pop_front() {
                break Some(job);
            }
            if st.idle <= st.keep {
                st = SPARES.work.wait(st).expect("spare worker lock poisoned");
                continue;
            }
            let (guard, waited) = SPARES
                .work
                .wait_timeout(st, SPARE_IDLE)
                .expect("spare worker lock poisoned");
            st = guard;
            if waited.timed_out() && st.jobs.is_empty() && st.idle > st.keep {
                break None;
            }
        };
        st.idle -= 1;
        drop(st);
        let Some((name, job)) = job else {
            return;
        };
        name_thread(&name);
        job();
    }
}

/// Names the calling thread (what `ps` and `/proc` show), cut to the kernel's 15 bytes.
fn name_thread(name: &str) {
    let mut bytes = [0u8; 16];
    let n = name.len().min(15);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which
    // `bytes` is (its last byte stays 0).
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
}

/// Spare threads kept by [`reserve`] until this is dropped.
#[must_use = "the spares are kept only while this lives"]
pub struct Reserved(usize);

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut st = spares();
        st.keep -= self.0;
        // Spares beyond what is kept now wait with a deadline.
        SPARES.work.notify_all();
    }
}

/// Keeps `n` more spare worker threads waiting without a deadline while the answer lives,
/// starting those missing: a migration destination reserves its devices' workers before
/// the source pauses, so that resuming the VM starts no thread. Afterwards, they end after
/// [`SPARE_IDLE`] without work.
pub fn reserve(n: usize) -> io::Result<Reserved> {
    let missing = {
        let mut st = spares();
        st.keep += n;
        let missing = st.keep.saturating_sub(st.idle + st.starting);
        st.starting += missing;
        missing
    };
    let reserved = Reserved(n);
    for started in 0..missing {
        if let Err(e) = start_thread("worker-spare".into(), None) {
            // That one is uncounted already; the ones after it never start.
            spares().starting -= missing - started - 1;
            return Err(e);
        }
    }
    Ok(reserved)
}

/// An epoll set keyed by tokens (vmm-sys-util's `Epoll`).
///
/// Not event-manager, which runs the control loop: a worker is one thread per queue (pair)
/// whose body owns its queues by value and returns them, positions intact, when it is asked
/// to stop (pause, migration, reset), and its wake-up path is the datapath a ping flood
/// measures. event-manager would own the queues inside a subscriber, to be pried out with
/// `remove_subscriber` and a downcast at every pause, and add a dispatch step to every
/// wake-up, for a set of two or three descriptors that never changes while the thread runs.
pub struct Events {
    epoll: Epoll,
}

impl Events {
    fn new() -> io::Result<Self> {
        Ok(Events {
            epoll: Epoll::new()?,
        })
    }

    /// Watches `fd` for `set`, reporting it as `token`.
    pub fn add(&self, fd: RawFd, token: u64, set: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    /// Waits for events; returns their tokens. Interrupted waits return nothing.
    pub fn wait(&self, tokens: &mut Vec<u64>) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 16];
        tokens.clear();
        match self.epoll.wait(-1, &mut events) {
            Ok(n) => tokens.extend(events[..n].iter().map(|e| e.data())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Why a queue cannot be used any more until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings are not where the driver said, or their indices are impossible.
    #[error("Broken queue")]
    Queue(#[source] virtio_queue::Error),
}

/// Takes the next available chain, or `None` when the ring is empty.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, QueueError> {
    Ok(queue.iter(mem).map_err(QueueError::Queue)?.next())
}

/// Returns a chain to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, len).map_err(QueueError::Queue)
}

/// Returns several chains to the driver at once, `(head, bytes written)` in order: the used
/// index moves past all of them with one store, so the driver never sees part of the set. A
/// frame spread over mergeable receive buffers must arrive whole (Linux drops it when the
/// buffers after the first are not there yet). Interrupts for a queue used this way are
/// decided by [`UsedSince::needs_interrupt`], which counts what this function adds.
pub fn add_used_together(
    queue: &mut Queue,
    mem: &GuestMemory,
    used: &[(u16, u32)],
) -> Result<(), QueueError> {
    let size = queue.size();
    let start = queue.next_used();
    for (i, &(head, len)) in used.iter().enumerate() {
        if head >= size {
            return Err(QueueError::Queue(
                virtio_queue::Error::InvalidDescriptorIndex,
            ));
        }
        let slot = u64::from(start.wrapping_add(i as u16) % size);
        let elem = queue
            .used_ring()
            .checked_add(USED_RING_HEADER + slot * USED_ELEMENT)
            .ok_or(QueueError::Queue(virtio_queue::Error::AddressOverflow))?;
        // The element: the chain's head (u32), then the bytes written (u32).
        mem.write_obj(
            (u64::from(len) << 32 | u64::from(head)).to_le(),
            GuestAddress(elem),
        )
        .map_err(|e| QueueError::Queue(virtio_queue::Error::GuestMemory(e)))?;
    }
    let end = start.wrapping_add(used.len() as u16);
    let idx = queue
        .used_ring()
        .checked_add(2)
        .ok_or(QueueError::Queue(virtio_queue::Error::AddressOverflow))?;
    mem.store(end.to_le(), GuestAddress(idx), AtomicOrdering::Release)
        .map_err(|e| QueueError::Queue(virtio_queue::Error::GuestMemory(e)))?;
    queue.set_next_used(end);
    Ok(())
}

/// Bytes before the used ring's elements (flags, index).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used element.
const USED_ELEMENT: u64 = 8;

/// Where the used index stood when the driver was last interrupted (or not) for a queue
/// returned with [`add_used_together`].
#[derive(Clone, Copy, Debug)]
pub struct UsedSince(u16);

impl UsedSince {
    /// Counting from `queue`'s used index now.
    pub fn new(queue: &Queue) -> Self {
        UsedSince(queue.next_used())
    }

    /// Whether the driver wants an interrupt for what was used since the last call: always
    /// without VIRTIO_RING_F_EVENT_IDX, and with it when the index it asked to be told about
    /// (used_event) was passed (virtio 1.2, 2.7.10).
    pub fn needs_interrupt(&mut self, queue: &Queue, mem: &GuestMemory) -> bool {
        let now = queue.next_used();
        let old = std::mem::replace(&mut self.0, now);
        if !queue.event_idx_enabled() {
            return now != old;
        }
        // The used entries are written before the driver's event index is read.
        std::sync::atomic::fence(AtomicOrdering::SeqCst);
        // used_event follows the available ring's entries.
        let at = queue
            .avail_ring()
            .checked_add(4 + 2 * u64::from(queue.size()));
        // An unreadable event index is the driver's problem; interrupting is the safe answer.
        let Some(event) = at.and_then(|a| {
            mem.load::<u16>(GuestAddress(a), AtomicOrdering::Acquire)
                .ok()
        }) else {
            return true;
        };
        let event = u16::from_le(event);
        now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(old)
    }
}

/// Whether the driver wants an interrupt for what was just used.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemory) -> bool {
    // An unreadable event index is the driver's problem; interrupting is the safe answer.
    queue.needs_notification(mem).unwrap_or(true)
}

/// Turns driver notifications back on; true if more chains arrived meanwhile.
pub fn enable_notification(queue: &mut Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
    queue.enable_notification(mem).map_err(QueueError::Queue)
}

/// Turns driver notifications off while the device works through the ring.
pub fn disable_notification(queue: &mut Queue, mem: &GuestMemory) -> Result<(), QueueError> {
    queue.disable_notification(mem).map_err(QueueError::Queue)
}

/// Spins up to `limit` for the driver to make a chain available; true if it did.
pub fn wait_for_avail(queue: &Queue, mem: &GuestMemory, limit: std::time::Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) if idx.0 != queue.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Why a descriptor chain is refused.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor points outside guest memory.
    #[error("Descriptor at {0:#x}+{1:#x} is outside guest memory")]
    Address(u64, u32),
    /// The chain is longer than the device accepts.
    #[error("Descriptor chain longer than {0} bytes")]
    TooLong(usize),
    /// A descriptor has the wrong direction for the device.
    #[error("Descriptor direction is wrong for this queue")]
    Direction,
}

/// Host I/O vectors over guest memory, for readv/writev straight into or out of a chain.
#[derive(Default)]
pub struct IoVecs {
    iovs: Vec<libc::iovec>,
    len: usize,
    /// Guest address and length of each descriptor, for device-writable chains.
    written: Vec<(GuestAddress, usize)>,
}

// SAFETY: the vectors point into guest memory, which lives as long as the VM and is shared
// with the guest anyway; they carry no thread-local state.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// The descriptors of `chain`, which must all be device-writable (`writable`) or all
    /// device-readable, and together at most `max` bytes. Zero-length descriptors are skipped.
    pub fn from_chain<M>(
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
        writable: bool,
        max: usize,
    ) -> Result<Self, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut v = IoVecs::default();
        let perm = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for desc in chain {
            if desc.is_write_only() != writable {
                return Err(ChainError::Direction);
            }
            let len = desc.len() as usize;
            v.len = v
                .len
                .checked_add(len)
                .filter(|l| *l <= max)
                .ok_or(ChainError::TooLong(max))?;
            let bad = ChainError::Address(desc.addr().0, desc.len());
            if writable && len > 0 {
                v.written.push((desc.addr(), len));
            }
            let slices = mem
                .get_slices(desc.addr(), len, perm)
                .map_err(|_| bad.clone())?;
            for slice in slices {
                let slice = slice.map_err(|_| bad.clone())?;
                if writable {
                    // The device writes here behind vm-memory's back: record it for the
                    // dirty-page tracking of live migration.
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                v.iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        Ok(v)
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Marks the first `len` bytes of a device-writable chain dirty for the dirty-page
    /// tracking of live migration, again: [`IoVecs::from_chain`] marks the chain when it is
    /// taken, but a chain held for later (a receive buffer waiting for a frame) may be
    /// written after a pre-copy pass collected that mark.
    pub fn mark_written(&self, mem: &GuestMemory, len: usize) {
        let mut left = len;
        for &(addr, n) in &self.written {
            if left == 0 {
                break;
            }
            let n = n.min(left);
            left -= n;
            let Ok(slices) = mem.get_slices(addr, n, Permissions::Write) else {
                continue;
            };
            for slice in slices.flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
    }

    /// The vectors, for readv/writev.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.iovs
    }

    /// Writes `bytes` at byte `offset` of the vectors (short if they end first).
    pub fn write_at(&self, offset: usize, bytes: &[u8]) {
        let mut skip = offset;
        let mut src = bytes;
        for iov in &self.iovs {
            if src.is_empty() {
                break;
            }
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            let n = (iov.iov_len - skip).min(src.len());
            // SAFETY: the vector covers `iov_len` bytes of guest memory that the chain gave
            // the device to write, and `skip + n <= iov_len`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), iov.iov_base.cast::<u8>().add(skip), n)
            };
            src = &src[n..];
            skip = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryBackend;

    use super::*;

    const BUFFER: u64 = 0x20_0000;

    /// The calling thread's name, as the kernel has it.
    fn own_name() -> String {
        let mut bytes = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL-terminated.
        unsafe { libc::prctl(libc::PR_GET_NAME, bytes.as_mut_ptr()) };
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }

    fn idle() -> usize {
        spares().idle
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stopped_workers_wait_as_spares_and_run_the_next_under_its_name() {
        // More than other tests running meanwhile could take.
        let reserved = reserve(16).unwrap();
        wait_for("spares reserved", || idle() >= 16);
        // A worker runs on a spare, named as asked, and hands back what its body returned.
        let names = |name: &str| {
            Worker::spawn(name.into(), |events| {
                let mut tokens = Vec::new();
                while !tokens.contains(&STOP_TOKEN) {
                    events.wait(&mut tokens).unwrap();
                }
                let spawned_as = std::thread::current().name().map(String::from);
                (own_name(), spawned_as)
            })
            .unwrap()
        };
        let first = names("first-worker").stop().unwrap();
        assert_eq!(first.0, "first-worker");
        assert_eq!(
            first.1.as_deref(),
            Some("worker-spare"),
            "ran on a reserved thread"
        );
        let second = names("a-name-longer-than-fifteen").stop().unwrap();
        assert_eq!(second.0, "a-name-longer-t", "cut to the kernel's 15 bytes");
        // Dropping a worker stops it, and waits for its body to end.
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let set = ended.clone();
        let dropped = Worker::spawn("dropped".into(), move |events| {
            let mut tokens = Vec::new();
            while !tokens.contains(&STOP_TOKEN) {
                events.wait(&mut tokens).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
            set.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap();
        drop(dropped);
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
        drop(reserved);
        // Unreserved, spares end once idle: the count falls back (other tests' workers may
        // come and go meanwhile, but they end the same way).
        wait_for("spares ending after SPARE_IDLE", || idle() == 0);
    }

    /// Regression: a receive buffer held for a later frame was marked dirty only when taken,
    /// so a pre-copy pass between that and the write left the destination a stale page
    /// (a ping lost across a local=off migration).
    #[test]
    fn a_held_chain_is_marked_dirty_again_where_it_is_written() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let desc = RawDescriptor::from(Descriptor::new(BUFFER, 8192, 2, 0));
        mock.add_desc_chains(&[desc], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = pop(&mut queue, &mem).unwrap().unwrap();
        let iovs = IoVecs::from_chain(&mem, chain, true, usize::MAX).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        // The pages marked since the last look, as a pre-copy pass collects them.
        let collect = || {
            let words = std::ops::Deref::deref(region).bitmap().get_and_reset();
            let page = |addr: u64| words[(addr / 4096 / 64) as usize] >> (addr / 4096 % 64) & 1;
            (page(BUFFER), page(BUFFER + 4096))
        };
        assert_eq!(collect(), (1, 1), "marked when taken");
        // The device writes 100 bytes, then the rest.
        iovs.mark_written(&mem, 100);
        assert_eq!(collect(), (1, 0), "only the page written");
        iovs.mark_written(&mem, 5000);
        assert_eq!(collect(), (1, 1));
    }
}
