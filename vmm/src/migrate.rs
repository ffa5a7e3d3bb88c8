//! Live migration between two batons: the source's side ([`send`]) and the destination's
//! ([`Incoming`], driven by [`migration::session::receive`]). Both run on a migration thread
//! of their own, so the control loop keeps answering the API meanwhile.
//!
//! Source, in order (see the `migration` crate for the wire protocol):
//! 1. Start (protocol version, local or not, and with backend transfer the network cards
//!    whose TAP it offers); the destination checks and answers which it takes over.
//! 2. `local=on`: the shared-memory descriptors of guest RAM (nothing is copied later).
//! 3. Config: the VM configuration; the destination opens backends and prepares memory.
//! 4. `local=off`: pre-copy. Dirty logging starts, every non-zero page goes, then each pass
//!    sends what was written meanwhile (KVM's log of vCPU writes plus the pages devices
//!    wrote), until what is left fits `downtime_ms` at the bandwidth of the last pass.
//!    Past `timeout_s` the migration is abandoned and the VM runs on here.
//! 5. Pause (vCPUs, then devices: network cards stop reading their TAPs, whose frames wait in
//!    the kernel), the last dirty pages, State, then for each network card taken over its
//!    TAP state and queue descriptors (Fds), and Complete. The destination builds the VM
//!    from that state on those descriptors, resumes it, and only then answers Complete:
//!    until that answer any failure resumes the VM here as it was, on its own descriptors
//!    (the destination got duplicates, and set nothing on them).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{SendMigrationConfig, VmConfig};
use migration::protocol::{
    self, Command, FdsHeader, MemoryRanges, ProposedBackend, Start, PROTOCOL_VERSION,
};
use migration::{BoxError, Channel, Limits, MigrationUrl, ProtocolError};
use net_util::{TapQueues, TapState};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::device_manager::Backends;
use crate::memory::{self, GuestMemory};
use crate::vm::{self, Vm, VmEvents, VmState, PAGE_SIZE};

/// How long either side waits for the other before giving up.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL does not parse.
    #[error("Invalid migration URL")]
    Url(#[source] migration::UrlError),
    /// `local=on` needs memory whose descriptors can be handed over.
    #[error("local=on needs guest memory created with shared=on")]
    LocalNeedsShared,
    /// `local=on` needs a channel that carries descriptors.
    #[error("local=on needs a unix: URL: memory descriptors cannot travel over TCP")]
    LocalNeedsUnix,
    /// Backend transfer needs a channel that carries descriptors.
    #[error("backend_transfer needs a unix: URL: TAP descriptors cannot travel over TCP")]
    BackendTransferNeedsUnix,
    /// A TAP's state cannot be read for the hand-over.
    #[error("Cannot read the TAP state of network card '{0}'")]
    TapState(String, #[source] net_util::tap::Error),
    /// Nobody listens at the URL.
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    /// Cannot listen at the URL.
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The protocol failed (the destination refused, the stream broke ...).
    #[error("Migration protocol")]
    Protocol(#[source] ProtocolError),
    /// Pre-copy did not converge in time.
    #[error("Memory was still changing too fast after {0} s (timeout_s): migration cancelled; the VM keeps running here")]
    Timeout(u64),
    /// The VM could not be paused, saved or logged.
    #[error("VM")]
    Vm(#[source] vm::Error),
    /// The state would not encode.
    #[error("Cannot encode the VM state")]
    Encode(#[source] migration::SnapshotError),
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

/// What `vm.send-migration` answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// From the request to the destination's final answer.
    pub total_ms: u64,
    /// From pausing here to the destination resuming.
    pub downtime_ms: u64,
    /// Guest memory bytes sent (0 with local=on).
    pub memory_bytes: u64,
    /// Pre-copy passes, the first (whole memory) included.
    pub iterations: u64,
    /// Time spent sending memory (with the guest running), for throughput.
    pub memory_ms: u64,
    /// Devices whose backends the destination took over.
    pub transferred_backends: Vec<String>,
}

/// Where a running migration is, for `vm.info` and `baton-remote`'s progress.
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    iteration: AtomicU64,
    bytes: AtomicU64,
    remaining: AtomicU64,
}

/// A snapshot of [`Progress`].
#[derive(Clone, Debug, Serialize)]
pub struct ProgressReport {
    /// connecting, memory, pre-copy, downtime, completing.
    pub phase: String,
    /// Current pre-copy pass.
    pub iteration: u64,
    /// Memory bytes sent so far.
    pub bytes_sent: u64,
    /// Bytes the current pass sends.
    pub bytes_in_pass: u64,
}

impl Progress {
    fn phase(&self, phase: &'static str) {
        *self.phase.lock().expect("progress lock poisoned") = phase;
    }

    /// The current figures.
    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            phase: self
                .phase
                .lock()
                .expect("progress lock poisoned")
                .to_string(),
            iteration: self.iteration.load(Ordering::Relaxed),
            bytes_sent: self.bytes.load(Ordering::Relaxed),
            bytes_in_pass: self.remaining.load(Ordering::Relaxed),
        }
    }
}

/// The migration URL `text`, which must name a UNIX socket when `backend_transfer` asks to
/// pass TAP descriptors: the one check of the URL both sides make.
fn migration_url(text: &str, backend_transfer: bool) -> Result<MigrationUrl, Error> {
    let url: MigrationUrl = text.parse().map_err(Error::Url)?;
    if backend_transfer && !url.is_unix() {
        return Err(Error::BackendTransferNeedsUnix);
    }
    Ok(url)
}

/// Checks a receive request before anything listens.
pub fn check_receive(cfg: &api::ReceiveMigrationConfig) -> Result<MigrationUrl, Error> {
    migration_url(&cfg.receiver_url, cfg.backend_transfer)
}

/// Checks a send request before anything moves.
pub fn check_send(config: &VmConfig, cfg: &SendMigrationConfig) -> Result<MigrationUrl, Error> {
    let url = migration_url(&cfg.destination_url, cfg.backend_transfer)?;
    if cfg.local && !url.is_unix() {
        return Err(Error::LocalNeedsUnix);
    }
    if cfg.local && !config.memory.shared {
        return Err(Error::LocalNeedsShared);
    }
    Ok(url)
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

/// Pre-copy until the rest fits `downtime_ms`; returns the last dirty set (to send paused).
fn precopy(
    vm: &Vm,
    channel: &mut Channel,
    cfg: &SendMigrationConfig,
    started: Instant,
    progress: &Progress,
    stats: &mut Stats,
) -> Result<(), Error> {
    progress.phase("pre-copy");
    vm.dirty_logging(true).map_err(Error::Vm)?;
    let mut pass = nonzero_ranges(vm.memory());
    let deadline = started + Duration::from_secs(cfg.timeout_s);
    let downtime = Duration::from_millis(cfg.downtime_ms);
    loop {
        stats.iterations += 1;
        progress
            .iteration
            .store(stats.iterations, Ordering::Relaxed);
        progress.remaining.store(bytes_of(&pass), Ordering::Relaxed);
        let t = Instant::now();
        let sent = send_ranges(channel, vm.memory(), pass, progress)?;
        stats.memory_bytes += sent;
        stats.memory_ms += t.elapsed().as_millis() as u64;
        // Bytes per second of this pass; a tiny pass says little, so assume at least 100 MB/s.
        let rate = (sent as f64 / t.elapsed().as_secs_f64().max(1e-6)).max(100e6);
        pass = vm.take_dirty().map_err(Error::Vm)?;
        let left = bytes_of(&pass) as f64 / rate;
        log::debug!(
            "pre-copy pass {}: {sent} bytes at {:.0} MB/s; {} bytes dirty",
            stats.iterations,
            rate / 1e6,
            bytes_of(&pass)
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
        if Instant::now() >= deadline {
            return Err(Error::Timeout(cfg.timeout_s));
        }
    }
}

/// The backend kind a network card's TAP hands over as.
pub const TAP_KIND: &str = "virtio-net-tap";

/// A network card's TAP queues that backend transfer may hand over.
pub type Transferable = (String, Arc<TapQueues>);

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
    let started = Instant::now();
    let url = check_send(config, cfg)?;
    progress.phase("connecting");
    let mut channel =
        Channel::connect(&url).map_err(|e| Error::Connect(cfg.destination_url.clone(), e))?;
    let timeouts = channel
        .set_read_timeout(Some(PEER_TIMEOUT))
        .and_then(|_| channel.set_write_timeout(Some(PEER_TIMEOUT)));
    timeouts.map_err(|e| Error::Connect(cfg.destination_url.clone(), e))?;
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
        started,
        progress,
        &mut stats,
    );
    let logging_off = vm.dirty_logging(false);
    match result {
        Ok(()) => {
            stats.total_ms = started.elapsed().as_millis() as u64;
            Ok(stats)
        }
        Err(e) => {
            // Tell the destination to drop what it built (it may be gone already).
            let _ = channel.request(Command::Abandon, &[]);
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
    started: Instant,
    progress: &Progress,
    stats: &mut Stats,
) -> Result<(), Error> {
    let start = Start {
        version: PROTOCOL_VERSION,
        local: cfg.local,
        backend_transfer: cfg.backend_transfer,
        devices: offered
            .iter()
            .map(|(id, taps)| ProposedBackend {
                id: id.clone(),
                kind: TAP_KIND.into(),
                fds: taps.len() as u32,
            })
            .collect(),
    };
    let accepted = migration::session::start(channel, &start)?.accepted;
    let handed: Vec<&Transferable> = offered
        .iter()
        .filter(|(id, _)| accepted.contains(id))
        .collect();
    if !offered.is_empty() {
        log::info!(
            "backend transfer: the destination takes over {:?} of {:?}",
            accepted,
            offered.iter().map(|(id, _)| id).collect::<Vec<_>>()
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
    }
    channel.request(
        Command::Config,
        &serde_json::to_vec(config).expect("configurations serialise"),
    )?;
    if !cfg.local {
        precopy(vm, channel, cfg, started, progress, stats)?;
    }

    progress.phase("downtime");
    let paused_at = Instant::now();
    vm.pause();
    let result = (|| {
        if !cfg.local {
            let last = vm.take_dirty().map_err(Error::Vm)?;
            stats.memory_bytes += send_ranges(channel, vm.memory(), last, progress)?;
        }
        let state = vm.state().map_err(Error::Vm)?;
        let state = migration::snapshot::encode(&state).map_err(Error::Encode)?;
        channel.request(Command::State, &state)?;
        for (id, taps) in &handed {
            let tap = taps.state().map_err(|e| Error::TapState(id.clone(), e))?;
            let header = FdsHeader {
                id: id.clone(),
                count: taps.len() as u32,
                state: serde_json::to_value(&tap).expect("TAP state serialises"),
            };
            channel.request_with_fds(Command::Fds, &protocol::to_json(&header), &taps.fds())?;
        }
        progress.phase("completing");
        channel.request(Command::Complete, &[])?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            stats.downtime_ms = paused_at.elapsed().as_millis() as u64;
            stats.transferred_backends = handed.iter().map(|(id, _)| id.clone()).collect();
            log::info!(
                "migration done: {} ms, {} ms down, {} bytes in {} passes",
                started.elapsed().as_millis(),
                stats.downtime_ms,
                stats.memory_bytes,
                stats.iterations
            );
            Ok(())
        }
        Err(e) => {
            log::warn!("migration failed while paused; resuming here");
            vm.resume();
            Err(e)
        }
    }
}

/// A VM that arrived: what the control loop installs.
pub struct Arrived {
    /// Its configuration (device ids assigned).
    pub config: VmConfig,
    /// Its backends.
    pub backends: Backends,
    /// Its console.
    pub console: crate::console::Console,
    /// The VM, running.
    pub vm: Vm,
}

/// The destination's side, fed by [`migration::session::receive`].
pub struct Incoming {
    kvm: Arc<kvm_ioctls::Kvm>,
    events: VmEvents,
    net_fds: Vec<api::NetFds>,
    fds: Vec<OwnedFd>,
    /// Whether this destination takes over backends.
    backend_transfer: bool,
    /// The proposed backends accepted, with their descriptor counts.
    accepted: Vec<(String, u32)>,
    local: bool,
    shared_memory: Option<Vec<OwnedFd>>,
    config: Option<VmConfig>,
    backends: Option<Backends>,
    shell: Option<vm::Shell>,
    state: Option<VmState>,
    /// The VM once Complete built it.
    pub arrived: Option<Arrived>,
}

impl Incoming {
    /// A destination that opens net backends by name, or from `fds` as `net_fds` says, or,
    /// with `backend_transfer`, takes over the TAP backends the source offers.
    pub fn new(
        kvm: Arc<kvm_ioctls::Kvm>,
        events: VmEvents,
        net_fds: Vec<api::NetFds>,
        fds: Vec<OwnedFd>,
        backend_transfer: bool,
    ) -> Self {
        Incoming {
            kvm,
            events,
            net_fds,
            fds,
            backend_transfer,
            accepted: Vec::new(),
            local: false,
            shared_memory: None,
            config: None,
            backends: None,
            shell: None,
            state: None,
            arrived: None,
        }
    }

    /// Accepts one source on `listener` and serves its session; true if the VM arrived
    /// (it is then in [`Incoming::arrived`]), false if the source abandoned.
    pub fn serve(&mut self, listener: &migration::Listener) -> Result<bool, String> {
        let mut channel = listener
            .accept()
            .map_err(|e| format!("Cannot accept the source: {e}"))?;
        let timeouts = channel
            .set_read_timeout(Some(PEER_TIMEOUT))
            .and_then(|_| channel.set_write_timeout(Some(PEER_TIMEOUT)));
        timeouts.map_err(|e| format!("Cannot set up the migration socket: {e}"))?;
        match migration::session::receive(&mut channel, Limits::default(), self) {
            Ok(outcome) => Ok(outcome == migration::Outcome::Completed),
            Err(e) => Err(api::request::error_chain(&e).join(": ")),
        }
    }

    fn missing(what: &str) -> BoxError {
        format!("no {what} before this request").into()
    }
}

impl migration::Destination for Incoming {
    fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError> {
        self.local = start.local;
        // Without the flag every device takes the ordinary path (its TAP opened by name or
        // from net_fds); if that cannot work, Config fails, before the source pauses.
        if self.backend_transfer && start.backend_transfer {
            self.accepted = start
                .devices
                .iter()
                .filter(|d| d.kind == TAP_KIND)
                .map(|d| (d.id.clone(), d.fds))
                .collect();
        }
        Ok(self.accepted.iter().map(|(id, _)| id.clone()).collect())
    }

    fn memory_fds(
        &mut self,
        _regions: Vec<protocol::MemoryRegion>,
        fds: Vec<OwnedFd>,
    ) -> Result<(), BoxError> {
        // Mapped once the configuration says how large RAM is (and checks the regions).
        self.shared_memory = Some(fds);
        Ok(())
    }

    fn config(&mut self, bytes: Vec<u8>) -> Result<(), BoxError> {
        let mut config: VmConfig = serde_json::from_slice(&bytes)?;
        crate::config::check_and_name(&mut config)?;
        let fds = crate::config::net_fds_in_order(
            &mut config,
            &self.net_fds,
            std::mem::take(&mut self.fds),
        )?;
        let transferred: Vec<String> = self.accepted.iter().map(|(id, _)| id.clone()).collect();
        for (id, fds) in &self.accepted {
            let net = config.net.iter().find(|n| n.id.as_deref() == Some(id));
            match net {
                None => return Err(format!("no network card '{id}' for its backend").into()),
                Some(n) if n.queue_pairs() != *fds as usize => {
                    return Err(format!(
                    "network card '{id}' has {} queue pair(s), but {fds} TAP queue(s) are offered",
                    n.queue_pairs()
                )
                    .into())
                }
                Some(_) => {}
            }
        }
        // Cards taken over open no TAP: their queues come after State.
        let backends = Backends::open_except(&mut config, fds, &transferred)?;
        let mem = match self.shared_memory.take() {
            Some(fds) => {
                if !config.memory.shared {
                    return Err("memory descriptors came for a VM without shared memory".into());
                }
                memory::from_fds(config.memory.size, fds)?
            }
            None if self.local => return Err(Self::missing("memory descriptors")),
            None => memory::create(config.memory.size, config.memory.shared)?,
        };
        // The VM and its memory are set up now, while the source still runs.
        self.shell = Some(vm::Shell::new(&self.kvm, &config, Some(mem))?);
        self.config = Some(config);
        self.backends = Some(backends);
        Ok(())
    }

    fn write_memory(&mut self, gpa: u64, data: &[u8]) -> std::io::Result<()> {
        let mem = self
            .shell
            .as_ref()
            .map(vm::Shell::memory)
            .ok_or_else(|| std::io::Error::other("memory before the configuration"))?;
        mem.write_slice(data, GuestAddress(gpa)).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} bytes at {gpa:#x}: {e}", data.len()),
            )
        })
    }

    fn state(&mut self, bytes: Vec<u8>) -> Result<(), BoxError> {
        self.state = Some(migration::snapshot::decode(&bytes)?);
        Ok(())
    }

    fn backend_fds(&mut self, header: FdsHeader, fds: Vec<OwnedFd>) -> Result<(), BoxError> {
        // Dropped, and so closed, on any error here or later.
        let state: TapState = serde_json::from_value(header.state)
            .map_err(|e| format!("the TAP state of '{}': {e}", header.id))?;
        let backends = self
            .backends
            .as_mut()
            .ok_or_else(|| Self::missing("configuration"))?;
        backends.take_over(&header.id, fds, &state)?;
        log::info!(
            "{}: took over TAP '{}' with {} queue(s)",
            header.id,
            state.name,
            state.queues
        );
        Ok(())
    }

    fn complete(&mut self) -> Result<(), BoxError> {
        let mut config = self
            .config
            .take()
            .ok_or_else(|| Self::missing("configuration"))?;
        let backends = self
            .backends
            .take()
            .ok_or_else(|| Self::missing("configuration"))?;
        let shell = self
            .shell
            .take()
            .ok_or_else(|| Self::missing("configuration"))?;
        let state = self.state.take().ok_or_else(|| Self::missing("state"))?;
        // What vm.info shows: the TAPs the cards run on, taken over or opened.
        config.net = backends.net_configs().cloned().collect();
        let console = crate::console::Console::taking_over(&config.serial)?;
        let vm = Vm::start(
            &self.kvm,
            &config,
            &backends,
            &console,
            &self.events,
            vm::Start::Restore(Box::new(state), shell),
        )?;
        vm.resume();
        vm.announce();
        self.arrived = Some(Arrived {
            config,
            backends,
            console,
            vm,
        });
        Ok(())
    }
}
