//! The source's side of a migration: pre-copy or memory descriptors, then, paused, the
//! state and the handed-over backends, on a `migration-send` thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ::migration::protocol::{self, Command, MemoryRanges, Start, PROTOCOL_VERSION};
use ::migration::session::{self, Unfinished};
use ::migration::timing::{micros, Timeline};
use ::migration::{Channel, Limits};
use api::{SendMigrationConfig, VmConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::backend::{self, Transferable};
use super::{check_send, Done, Error, Notify, Progress, Stats};
use crate::memory::{self, GuestMemory};
use crate::vm::{Vm, PAGE_SIZE};

/// Starts sending `vm` on a `migration-send` thread, offering the `transferable` backends
/// when `cfg` asks for backend transfer; `notify` gets the outcome. Returns the migration's
/// progress.
pub fn spawn(
    vm: Arc<Vm>,
    config: VmConfig,
    cfg: SendMigrationConfig,
    transferable: Vec<Transferable>,
    notify: Notify,
) -> Result<Arc<Progress>, Error> {
    on_thread(notify, move |p| {
        Done::Sent(send(&vm, &config, &cfg, transferable, p))
    })
}

/// Runs `body` on a `migration-send` thread and reports what it returns to `notify`;
/// returns the progress `body` updates.
pub(super) fn on_thread(
    notify: Notify,
    body: impl FnOnce(&Progress) -> Done + Send + 'static,
) -> Result<Arc<Progress>, Error> {
    let progress = Arc::new(Progress::default());
    let p = progress.clone();
    std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::MigrationSend);
            notify.report(body(&p));
        })
        .map_err(Error::Thread)?;
    Ok(progress)
}

/// Byte ranges (offsets into a region of `len` bytes) that may hold data: the rest is known
/// to read as zero without touching it, which matters because touching a never-used page
/// costs a page fault, and an idle guest has mostly those.
/// - Shared memory: the memfd's allocated extents (SEEK_DATA/SEEK_HOLE); pages written by
///   another process that had the memory before (a local migration) count too.
/// - Private memory: the pages /proc/self/pagemap shows present or swapped.
fn candidate_ranges(host: *mut u8, len: u64, file: Option<&std::fs::File>) -> Vec<(u64, u64)> {
    let whole = vec![(0, len)];
    match file {
        Some(f) => crate::snapshot::data_extents(f, len).unwrap_or(whole),
        None => pagemap_ranges(host as u64, len).unwrap_or(whole),
    }
}

/// The pages of `[addr, addr + len)` present or swapped in this process, as offsets.
fn pagemap_ranges(addr: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let pages = len / PAGE_SIZE;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(4096);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (addr / PAGE_SIZE + page) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) == 0 {
                continue;
            }
            let at = (page + i as u64) * PAGE_SIZE;
            match ranges.last_mut() {
                Some((start, l)) if *start + *l == at => *l += PAGE_SIZE,
                _ => ranges.push((at, PAGE_SIZE)),
            }
        }
        page += n;
    }
    Ok(ranges)
}

/// The non-zero pages of guest memory, as ranges: the first pre-copy pass (the destination's
/// memory starts zeroed).
fn nonzero_ranges(mem: &GuestMemory) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut page = [0u8; PAGE_SIZE as usize];
    for region in mem.iter() {
        let base = region.start_addr().0;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory");
        let file = region.file_offset().map(|f| f.file());
        for (from, len) in candidate_ranges(host, region.len(), file) {
            for offset in (from..from + len).step_by(PAGE_SIZE as usize) {
                let addr = base + offset;
                if mem.read_slice(&mut page, GuestAddress(addr)).is_err()
                    || page.iter().all(|b| *b == 0)
                {
                    continue;
                }
                match ranges.last_mut() {
                    Some((start, len)) if *start + *len == addr => *len += PAGE_SIZE,
                    _ => ranges.push((addr, PAGE_SIZE)),
                }
            }
        }
    }
    ranges
}

fn bytes_of(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(_, l)| l).sum()
}

/// Sends `ranges` of guest memory; returns the bytes sent.
fn send_ranges(
    channel: &mut Channel,
    mem: &GuestMemory,
    ranges: Vec<(u64, u64)>,
    progress: &Progress,
) -> Result<u64, Error> {
    let mut sent = 0;
    for batch in MemoryRanges::batches(ranges, &Limits::default())? {
        let n = channel.send_memory(&batch, |gpa, buf| {
            mem.read_slice(buf, GuestAddress(gpa))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })?;
        sent += n;
        progress.bytes.fetch_add(n, Ordering::Relaxed);
    }
    Ok(sent)
}

/// Runs `f` with a [`Throttle`] that, with `auto_converge`, a `migration-throttle` thread
/// applies to `vm`'s vCPUs (otherwise nothing applies it); returns where it ended, in
/// percent. The vCPUs run at full speed again when this returns.
fn throttled(
    vm: &Vm,
    auto_converge: bool,
    f: impl FnOnce(&Throttle) -> Result<(), Error>,
) -> Result<u64, Error> {
    let throttle = Throttle::default();
    std::thread::scope(|scope| {
        if auto_converge {
            // It stays in this thread's role (migration-send): it only stops and restarts
            // the vCPUs, as this thread does when it pauses the VM.
            std::thread::Builder::new()
                .name("migration-throttle".into())
                .spawn_scoped(scope, || throttle.run(vm))
                .map_err(Error::Thread)?;
        }
        let result = f(&throttle);
        throttle.end();
        result.map(|()| throttle.percent.load(Ordering::Relaxed))
    })
}

/// Pre-copy until what is left fits `downtime_ms`; what the last pass leaves dirty goes
/// once the VM is paused. With `auto_converge`, each pass from the second on that does not
/// fit raises `throttle` by 20 points, up to 99%.
fn precopy(
    vm: &Vm,
    channel: &mut Channel,
    cfg: &SendMigrationConfig,
    elapsed: Duration,
    progress: &Progress,
    stats: &mut Stats,
    throttle: &Throttle,
) -> Result<(), Error> {
    progress.phase("pre-copy");
    vm.dirty_logging(true).map_err(Error::Vm)?;
    let mut pass = nonzero_ranges(vm.memory());
    // timeout_s counts from the request, and is not bounded: one past what a clock can
    // hold is no deadline at all.
    let deadline =
        Instant::now().checked_add(Duration::from_secs(cfg.timeout_s).saturating_sub(elapsed));
    let downtime = Duration::from_millis(cfg.downtime_ms);
    let test_mbps = std::env::var(super::TEST_PRECOPY_MBPS)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|mbps| *mbps > 0);
    loop {
        stats.iterations += 1;
        progress
            .iteration
            .store(stats.iterations, Ordering::Relaxed);
        progress.remaining.store(bytes_of(&pass), Ordering::Relaxed);
        let t = Instant::now();
        let sent = send_ranges(channel, vm.memory(), pass, progress)?;
        if let Some(mbps) = test_mbps {
            let at_that_speed = Duration::from_micros(sent / mbps);
            std::thread::sleep(at_that_speed.saturating_sub(t.elapsed()));
        }
        let took = t.elapsed().as_secs_f64().max(1e-6);
        stats.memory_bytes += sent;
        stats.memory_ms += t.elapsed().as_millis() as u64;
        // Bytes per second of this pass; a tiny pass says little, so assume at least 100 MB/s.
        let rate = (sent as f64 / took).max(100e6);
        pass = vm.take_dirty().map_err(Error::Vm)?;
        let dirty = bytes_of(&pass);
        stats.dirty_bytes_per_s = (dirty as f64 / took) as u64;
        let left = dirty as f64 / rate;
        log::debug!(
            "pre-copy pass {}: {sent} bytes at {:.0} MB/s; {dirty} bytes dirty",
            stats.iterations,
            rate / 1e6,
        );
        if left <= downtime.as_secs_f64() {
            // This pass still goes while the guest runs; what it leaves dirty goes paused.
            stats.iterations += 1;
            progress
                .iteration
                .store(stats.iterations, Ordering::Relaxed);
            let t = Instant::now();
            stats.memory_bytes += send_ranges(channel, vm.memory(), pass, progress)?;
            stats.memory_ms += t.elapsed().as_millis() as u64;
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::Timeout {
                seconds: cfg.timeout_s,
                dirty_mb_s: stats.dirty_bytes_per_s / 1_000_000,
                sent_mb_s: (sent as f64 / took / 1e6) as u64,
                throttle: cfg
                    .auto_converge
                    .then(|| throttle.percent.load(Ordering::Relaxed)),
            });
        }
        // The first pass sent all memory: only later ones tell how fast the guest writes.
        if cfg.auto_converge && stats.iterations >= 2 {
            let percent = throttle.raise();
            log::info!("pre-copy does not converge: the vCPUs now stop {percent}% of the time");
        }
    }
}

/// auto_converge's duty cycle: in every [`THROTTLE_PERIOD`], the vCPUs are stopped for
/// `percent` of it.
#[derive(Default)]
struct Throttle {
    percent: AtomicU64,
    ended: Mutex<bool>,
    wake: Condvar,
}

/// The throttle's cycle: short enough that a guest sees a slower CPU, not pauses.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// The most the throttle stops the vCPUs: they must still run to converge.
const THROTTLE_MAX: u64 = 99;

impl Throttle {
    /// Stops and restarts `vm`'s vCPUs as `percent` says, until [`Throttle::end`]; the vCPUs
    /// run when it returns.
    fn run(&self, vm: &Vm) {
        let mut ended = self.ended.lock().expect("throttle lock poisoned");
        while !*ended {
            let percent = self.percent.load(Ordering::Relaxed).min(THROTTLE_MAX) as u32;
            if percent > 0 {
                vm.throttle_vcpus(true);
                ended = self
                    .wake
                    .wait_timeout(ended, THROTTLE_PERIOD * percent / 100)
                    .expect("throttle lock poisoned")
                    .0;
                vm.throttle_vcpus(false);
            }
            if !*ended {
                let run = THROTTLE_PERIOD * (100 - percent) / 100;
                ended = self
                    .wake
                    .wait_timeout(ended, run)
                    .expect("throttle lock poisoned")
                    .0;
            }
        }
    }

    /// Stops the vCPUs for 20 points more of the time (from 20% to at most 99%); returns
    /// the new share.
    fn raise(&self) -> u64 {
        let percent = (self.percent.load(Ordering::Relaxed) + 20).min(THROTTLE_MAX);
        self.percent.store(percent, Ordering::Relaxed);
        percent
    }

    /// Ends [`Throttle::run`].
    fn end(&self) {
        *self.ended.lock().expect("throttle lock poisoned") = true;
        self.wake.notify_all();
    }
}

/// How long a failed source waits for the destination to take and answer Abandon.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends the VM to the destination `cfg` names, offering the `transferable` backends when
/// `cfg` asks for backend transfer. On success the VM runs there (this one is paused for
/// good and should be dropped, which closes its descriptors and changes nothing on the
/// TAPs); on failure it runs here as before.
pub fn send(
    vm: &Vm,
    config: &VmConfig,
    cfg: &SendMigrationConfig,
    transferable: Vec<Transferable>,
    progress: &Progress,
) -> Result<Stats, Error> {
    let mut timer = Timeline::new();
    let url = check_send(config, cfg)?;
    progress.phase("connecting");
    let channel =
        Channel::connect(&url).map_err(|e| Error::Connect(cfg.destination_url.clone(), e))?;
    timer.mark("connect");
    send_over(
        channel,
        vm,
        config,
        cfg,
        transferable,
        progress,
        Hooks::NONE,
        timer,
    )
}

/// What the caller of [`send_over`] does around the last step.
#[derive(Clone, Copy)]
pub(super) struct Hooks<'a> {
    /// Told when the VM pauses for the last step (true) and when it resumes here after a
    /// failure (false).
    pub paused: &'a dyn Fn(bool),
    /// Ends a destination that does not answer Complete, if this side can (a process it
    /// started); true once it is gone, so that what it left on the channel tells whether
    /// it ran the VM.
    pub silence: &'a dyn Fn() -> bool,
}

impl Hooks<'_> {
    /// Nothing around the pause, and no way to end the destination.
    pub const NONE: Hooks<'static> = Hooks {
        paused: &|_| {},
        silence: &|| false,
    };
}

/// [`send`] over a connected `channel`; `timer` began with the migration and holds the
/// steps before this one.
#[allow(clippy::too_many_arguments)]
pub(super) fn send_over(
    mut channel: Channel,
    vm: &Vm,
    config: &VmConfig,
    cfg: &SendMigrationConfig,
    transferable: Vec<Transferable>,
    progress: &Progress,
    hooks: Hooks,
    mut timer: Timeline,
) -> Result<Stats, Error> {
    // The longest the destination may leave a step without a byte moving.
    let step = Duration::from_secs(cfg.step_timeout_s);
    let timeouts = channel
        .set_read_timeout(Some(step))
        .and_then(|_| channel.set_write_timeout(Some(step)));
    timeouts.map_err(Error::Socket)?;
    let mut stats = Stats::default();
    let offered = if cfg.backend_transfer {
        transferable
    } else {
        Vec::new()
    };
    let result = send_on(
        vm,
        config,
        cfg,
        &offered,
        &mut channel,
        &mut timer,
        progress,
        hooks,
        &mut stats,
    );
    let logging_off = vm.dirty_logging(false);
    match result {
        Ok(()) => {
            stats.total_us = micros(timer.elapsed());
            stats.total_ms = stats.total_us / 1000;
            stats.breakdown.log();
            Ok(stats)
        }
        Err(e) => {
            // Tell the destination to drop what it built (it may be gone already). A live
            // one answers at once; a stalled one is not waited for a second step timeout.
            let brief = step.min(ABANDON_TIMEOUT);
            let _ = channel
                .set_read_timeout(Some(brief))
                .and_then(|_| channel.set_write_timeout(Some(brief)));
            let _ = channel.request(Command::Abandon, &[]);
            let e = e.stalled(cfg.step_timeout_s);
            if let Err(e) = logging_off {
                log::warn!("cannot stop dirty logging: {e}");
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_on(
    vm: &Vm,
    config: &VmConfig,
    cfg: &SendMigrationConfig,
    offered: &[Transferable],
    channel: &mut Channel,
    timer: &mut Timeline,
    progress: &Progress,
    hooks: Hooks,
    stats: &mut Stats,
) -> Result<(), Error> {
    let start = Start {
        version: PROTOCOL_VERSION,
        local: cfg.local,
        backend_transfer: cfg.backend_transfer,
        devices: backend::proposal(offered),
        software: Some(super::software()),
        start_notice: true,
    };
    let reply = ::migration::session::start(channel, &start)?;
    timer.mark("start");
    // A destination that took Start may still be one whose state layout this baton cannot
    // write: refused here, before anything is paused (Abandon tells it).
    super::check_peer(reply.software.as_ref(), true)?;
    let accepted = reply.accepted;
    let handed: Vec<&Transferable> = offered
        .iter()
        .filter(|t| accepted.contains(&t.id))
        .collect();
    if !offered.is_empty() {
        log::info!(
            "backend transfer: the destination takes over {:?} of {:?}",
            accepted,
            offered.iter().map(|t| &t.id).collect::<Vec<_>>()
        );
    }
    if cfg.local {
        progress.phase("memory");
        let fds = memory::fds(vm.memory()).ok_or(Error::LocalNeedsShared)?;
        let regions: Vec<protocol::MemoryRegion> = vm
            .memory()
            .iter()
            .map(|r| protocol::MemoryRegion {
                gpa: r.start_addr().0,
                len: r.len(),
            })
            .collect();
        channel.request_with_fds(Command::MemoryFds, &protocol::to_json(&regions), &fds)?;
        timer.mark("memory descriptors");
    }
    channel.request(
        Command::Config,
        &serde_json::to_vec(config).expect("configurations serialise"),
    )?;
    timer.mark("config");
    if !cfg.local {
        let elapsed = timer.elapsed();
        let percent = throttled(vm, cfg.auto_converge, |throttle| {
            precopy(vm, channel, cfg, elapsed, progress, stats, throttle)
        })?;
        stats.throttle_percent = percent;
        timer.mark("pre-copy");
    }
    stats.breakdown.source_before_pause = timer.take();

    progress.phase("downtime");
    (hooks.paused)(true);
    // The downtime is the sum of the steps from here to the destination's answer.
    timer.restart();
    vm.pause_for_state(timer);
    let result = (|| {
        if !cfg.local {
            let last = vm.take_dirty().map_err(Error::Vm)?;
            timer.mark("read the dirty log");
            stats.memory_bytes += send_ranges(channel, vm.memory(), last, progress)?;
            timer.mark("last memory");
        }
        let state = vm.state().map_err(Error::Vm)?;
        timer.mark("save state");
        let state = ::migration::snapshot::encode(&state).map_err(Error::Encode)?;
        timer.mark("encode state");
        // State and each backend go one after the other, their answers read before
        // Complete goes: the destination decodes the state while this side hands the
        // backends over, and one that refuses, stalls or ends on them never gets Complete.
        channel
            .send_request(Command::State, &state)
            .map_err(|e| channel.refusal(e, 0))?;
        timer.mark("send state");
        for (sent, t) in handed.iter().enumerate() {
            let (header, fds) = backend::hand_over(t)?;
            channel
                .send_request_with_fds(Command::Fds, &protocol::to_json(&header), &fds.fds())
                .map_err(|e| channel.refusal(e, sent + 1))?;
            timer.mark(format!("hand over {}", t.id));
        }
        progress.phase("completing");
        // The VM resumes here only if it cannot have run there: the destination refused,
        // or ended or was silenced before it said it would run the VM. Otherwise, with no
        // answer, it stays paused: never running in both places; the operator resumes it
        // here if the destination has no VM.
        let earlier = 1 + handed.len();
        let silence = &mut || (hooks.silence)();
        let timings = session::complete(channel, earlier, reply.start_notice, silence).map_err(
            |u| match u {
                Unfinished::NotRun(e) => Error::Protocol(e),
                Unfinished::Ended(e) => Error::EndedBeforeRun(e),
                Unfinished::MayRun(e) => Error::Unanswered(e),
            },
        )?;
        timer.mark("complete");
        Ok(timings)
    })();
    match result {
        Ok(timings) => {
            stats.breakdown.source_paused = timer.take();
            stats.downtime_us = stats.breakdown.source_paused.iter().map(|p| p.us).sum();
            stats.downtime_ms = stats.downtime_us / 1000;
            stats.breakdown.destination_before_pause = timings.before_pause;
            stats.breakdown.destination_paused = timings.paused;
            handed.iter().for_each(|t| t.handed_over());
            stats.transferred_backends = handed.iter().map(|t| t.id.clone()).collect();
            log::info!(
                "migration done: {} ms, {} us down, {} bytes in {} passes",
                timer.elapsed().as_millis(),
                stats.downtime_us,
                stats.memory_bytes,
                stats.iterations
            );
            Ok(())
        }
        Err(e @ Error::Unanswered(_)) => {
            log::error!(
                "the destination did not answer Complete: the VM stays paused here, as it may \
                 run there"
            );
            Err(e)
        }
        Err(e) => {
            log::warn!("migration failed while paused; resuming here");
            vm.resume();
            handed.iter().for_each(|t| t.resumed());
            (hooks.paused)(false);
            Err(e)
        }
    }
}
