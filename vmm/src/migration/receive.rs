//! The destination's side of a migration: a `migration-receive` thread that accepts one
//! source and builds the VM from what it sends ([`Incoming`], driven by
//! [`::migration::session::receive`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::migration::protocol::{self, CompleteReply, FdsHeader, Start};
use ::migration::timing::Timeline;
use ::migration::{BoxError, Limits};
use api::VmConfig;
use vm_memory::{Bytes, GuestAddress};

use super::{backend, check_receive, Done, Error, Notify};
use crate::device_manager::Backends;
use crate::memory;
use crate::vm::{self, Vm, VmEvents, VmState};

/// Binds the URL `cfg` names and waits there, on a `migration-receive` thread, for one
/// source; `notify` gets the outcome. Descriptors `fds` are TAP queues for the cards
/// `cfg.net_fds` names.
pub fn spawn(
    kvm: Arc<kvm_ioctls::Kvm>,
    events: VmEvents,
    cfg: api::ReceiveMigrationConfig,
    fds: Vec<OwnedFd>,
    notify: Notify,
) -> Result<(), Error> {
    let url = check_receive(&cfg)?;
    let listener = ::migration::Listener::bind(&url)
        .map_err(|e| Error::Listen(cfg.receiver_url.clone(), e))?;
    let receiver_url = cfg.receiver_url.clone();
    let incoming = Incoming::new(kvm, events, cfg, fds);
    on_thread(incoming, notify, move |incoming| {
        let result = listener
            .accept()
            .map_err(Error::Accept)
            .and_then(|channel| incoming.serve(channel));
        // The socket goes before the answer: a client told the migration failed may ask
        // to receive on the same path at once, and a source must not reach this
        // listener's backlog only to be reset.
        drop(listener);
        result
    })?;
    log::info!("waiting for a migration on {receiver_url}");
    Ok(())
}

/// Receives, on a `migration-receive` thread, the VM a baton sends over `channel`, already
/// connected (a live upgrade: the old baton started this one with it), taking over every
/// backend it offers; `notify` gets the outcome.
pub fn spawn_on(
    kvm: Arc<kvm_ioctls::Kvm>,
    events: VmEvents,
    channel: ::migration::Channel,
    step_timeout_s: u64,
    notify: Notify,
) -> Result<(), Error> {
    let cfg = api::ReceiveMigrationConfig {
        receiver_url: "unix:".into(),
        backend_transfer: true,
        step_timeout_s,
        ..Default::default()
    };
    let incoming = Incoming::new(kvm, events, cfg, Vec::new());
    on_thread(incoming, notify, move |incoming| incoming.serve(channel))
}

/// Runs `serve` on `incoming` on a `migration-receive` thread and reports the VM that
/// arrived, if any.
fn on_thread(
    mut incoming: Incoming,
    notify: Notify,
    serve: impl FnOnce(&mut Incoming) -> Result<bool, Error> + Send + 'static,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("migration-receive".into())
        .spawn(move || {
            // It builds a VM, as the main thread does: the VMM's role.
            crate::seccomp::enter(crate::seccomp::Role::Vmm);
            let result = serve(&mut incoming).map(|completed| {
                completed
                    .then(|| incoming.arrived.take().map(Box::new))
                    .flatten()
            });
            notify.report(Done::Received(result));
        })
        .map(|_| ())
        .map_err(Error::Thread)
}

/// A VM that arrived: what the control loop installs.
pub struct Arrived {
    /// Its configuration (device ids assigned).
    pub config: VmConfig,
    /// Its backends.
    pub backends: Backends,
    /// Its console.
    pub console: crate::console::Console,
    /// The VM (running once it arrived).
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
    /// The longest the source may leave a step without a byte moving.
    step_timeout: Duration,
    /// The proposed backends accepted, with their descriptor counts.
    accepted: Vec<(String, u32)>,
    local: bool,
    shared_memory: Option<Vec<OwnedFd>>,
    config: Option<VmConfig>,
    backends: Option<Backends>,
    shell: Option<vm::Shell>,
    /// Spare threads for the devices' workers, kept until the VM runs (or this ends).
    spares: Option<devices::virtio::ReservedWorkers>,
    state: Option<VmState>,
    /// The serial console the source handed over.
    console: Option<crate::console::ConsoleHandOver>,
    /// The VM once Complete built it, not running yet, and the console handed over with it
    /// (held until the VM runs).
    built: Option<(Arrived, Option<crate::console::ConsoleHandle>)>,
    /// The VM once it runs here.
    pub arrived: Option<Arrived>,
    /// This side's steps before the State request.
    before_pause: Timeline,
    /// Time spent writing memory the source sent, not yet in `before_pause`.
    writing_memory: Duration,
    /// This side's steps from the State request on.
    paused: Timeline,
    /// The steps sent with the answer to Complete, to log once the VM runs.
    sent_timings: Option<CompleteReply>,
}

impl Incoming {
    /// A destination that opens net backends by name, or from `fds` as `cfg.net_fds` says,
    /// or, with `cfg.backend_transfer`, takes over the TAP backends the source offers.
    pub fn new(
        kvm: Arc<kvm_ioctls::Kvm>,
        events: VmEvents,
        cfg: api::ReceiveMigrationConfig,
        fds: Vec<OwnedFd>,
    ) -> Self {
        Incoming {
            kvm,
            events,
            net_fds: cfg.net_fds,
            fds,
            backend_transfer: cfg.backend_transfer,
            step_timeout: Duration::from_secs(cfg.step_timeout_s),
            accepted: Vec::new(),
            local: false,
            shared_memory: None,
            config: None,
            backends: None,
            shell: None,
            spares: None,
            state: None,
            console: None,
            built: None,
            arrived: None,
            before_pause: Timeline::new(),
            writing_memory: Duration::ZERO,
            paused: Timeline::new(),
            sent_timings: None,
        }
    }

    /// Serves the session of the source on `channel`; true if the VM arrived (it is then
    /// in [`Incoming::arrived`]), false if the source abandoned. A step in which the source
    /// sends nothing, or takes no byte of an answer, for `step_timeout_s` ends the session.
    pub fn serve(&mut self, mut channel: ::migration::Channel) -> Result<bool, Error> {
        let timeouts = channel
            .set_read_timeout(Some(self.step_timeout))
            .and_then(|_| channel.set_write_timeout(Some(self.step_timeout)));
        timeouts.map_err(Error::Socket)?;
        let seconds = self.step_timeout.as_secs();
        let outcome = ::migration::session::receive(&mut channel, Limits::default(), self);
        if let Some((_, Some(console))) = self.built.take() {
            // Built but never run (the source could not be told): the source resumes on
            // that socket and client, so they are left alone.
            console.handed_over();
        }
        let outcome = outcome.map_err(|e| Error::from(e).stalled(seconds))?;
        Ok(outcome == ::migration::Outcome::Completed)
    }

    fn missing(what: &str) -> BoxError {
        format!("no {what} before this request").into()
    }
}

impl ::migration::Destination for Incoming {
    fn software(&self) -> Option<::migration::protocol::Software> {
        Some(super::software())
    }

    fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError> {
        self.before_pause.restart();
        super::check_peer(start.software.as_ref(), false)?;
        self.local = start.local;
        self.accepted = backend::accept(start, self.backend_transfer);
        self.before_pause.mark("start");
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
        super::test_crash("config");
        let t = &mut self.before_pause;
        t.restart();
        let mut config: VmConfig = serde_json::from_slice(&bytes)?;
        crate::config::check_and_name(&mut config)?;
        let fds = crate::config::net_fds_in_order(
            &mut config,
            &self.net_fds,
            std::mem::take(&mut self.fds),
        )?;
        backend::check_accepted(&config, &self.accepted)?;
        let transferred: Vec<String> = self.accepted.iter().map(|(id, _)| id.clone()).collect();
        // Cards taken over open no TAP: their queues come after State.
        let backends = Backends::open_except(&mut config, fds, &transferred)?;
        t.mark("open backends");
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
        t.mark("map memory");
        // The VM, its memory and vCPU threads are set up now, while the source still runs.
        let mut shell = vm::Shell::new(&self.kvm, &config, Some(mem), t)?;
        shell.park_vcpus(&self.kvm, &self.events)?;
        t.mark("vCPU threads");
        // The devices' workers start on these when the VM resumes.
        let most = crate::device_manager::most_workers(&config);
        self.spares = Some(devices::virtio::reserve_workers(most)?);
        t.mark("worker threads");
        self.shell = Some(shell);
        self.config = Some(config);
        self.backends = Some(backends);
        Ok(())
    }

    fn write_memory(&mut self, gpa: u64, data: &[u8]) -> std::io::Result<()> {
        let t = Instant::now();
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
        })?;
        self.writing_memory += t.elapsed();
        Ok(())
    }

    fn state(&mut self, bytes: Vec<u8>) -> Result<(), BoxError> {
        super::test_crash("state");
        self.paused.restart();
        if !self.writing_memory.is_zero() {
            let took = std::mem::take(&mut self.writing_memory);
            self.before_pause.push("write memory", took);
        }
        let state: VmState = ::migration::snapshot::decode(&bytes)?;
        self.paused.mark("decode state");
        // The vCPU threads write it while the backends come and Complete is awaited.
        if let Some(shell) = self.shell.as_mut() {
            shell.restore_vcpus(&state.vcpus)?;
            self.paused.mark("vCPU state to threads");
        }
        self.state = Some(state);
        Ok(())
    }

    fn backend_fds(&mut self, header: FdsHeader, fds: Vec<OwnedFd>) -> Result<(), BoxError> {
        self.paused.restart();
        // Dropped, and so closed, on any error here or later.
        let backends = self
            .backends
            .as_mut()
            .ok_or_else(|| Self::missing("configuration"))?;
        let id = header.id.clone();
        if id == backend::CONSOLE_ID && !backends.has_device(&id) {
            self.console = Some(backend::console_hand_over(header, fds)?);
            log::info!("took over the serial console");
        } else {
            let taken = backend::take_over(backends, header, fds)?;
            log::info!("{id}: took over {taken}");
        }
        self.paused.mark(format!("take over {id}"));
        Ok(())
    }

    fn complete(&mut self) -> Result<(), BoxError> {
        super::test_crash("complete");
        self.paused.restart();
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
        let from_source = self.console.is_some();
        let console = match self.console.take() {
            Some(handed) => crate::console::Console::from_hand_over(&config.serial, handed)?,
            None => crate::console::Console::taking_over(&config.serial)?,
        };
        self.paused.mark("console");
        let started = Vm::start(
            &self.kvm,
            &config,
            &backends,
            &console,
            &self.events,
            vm::Start::Restore(Box::new(state), shell),
            &mut self.paused,
        );
        // A console handed over starts held: the source's until the VM runs here.
        let handed = console.handle().filter(|_| from_source);
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                // The source resumes on that socket and client: leave them alone.
                if let Some(h) = handed {
                    h.handed_over();
                }
                return Err(e.into());
            }
        };
        let arrived = Arrived {
            config,
            backends,
            console,
            vm,
        };
        self.built = Some((arrived, handed));
        Ok(())
    }

    fn run(&mut self) -> Result<(), BoxError> {
        super::test_crash("run");
        let (arrived, handed) = self.built.take().ok_or_else(|| Self::missing("Complete"))?;
        self.paused.restart();
        arrived.vm.resume_devices();
        self.paused.mark("resume devices");
        if let Some(h) = handed {
            h.release();
            self.paused.mark("release the console");
        }
        arrived.vm.announce();
        self.paused.mark("announce");
        self.arrived = Some(arrived);
        Ok(())
    }

    fn timings(&mut self) -> CompleteReply {
        let reply = CompleteReply {
            before_pause: self.before_pause.take(),
            paused: self.paused.take(),
        };
        // Logged once the VM runs: the source waits for these.
        self.sent_timings = Some(reply.clone());
        reply
    }

    fn release(&mut self) {
        if let Some(arrived) = &self.arrived {
            arrived.vm.resume_vcpus();
        }
        // The workers run on the spares now; any left end when idle.
        self.spares = None;
        if let Some(t) = self.sent_timings.take() {
            log::info!(
                "migration received; before the pause: {}; paused: {}",
                ::migration::timing::report(&t.before_pause),
                ::migration::timing::report(&t.paused)
            );
        }
    }
}
