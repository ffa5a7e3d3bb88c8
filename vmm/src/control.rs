//! The control loop's state machine: one optional VM, its configuration and state, and the
//! handling of every internal API request.
//!
//! States: no VM; `Created` (configured, not booted); `Running`; `Paused`; `Shutdown` (stopped
//! by `vm.shutdown`, can be booted again). A request in the wrong state is a 409 Conflict; a
//! request that needs a VM when there is none is a 404.

use api::request::{
    ApiAction, ApiError, ApiReply, ApiResponse, Reply, VmInfoResponse, VmState, VmmPingResponse,
};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use ::migration::timing::Timeline;
use api::VmConfig;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::migration::{self, backend, Done, Notify, Progress};

use crate::console::Console;
use crate::device_manager::Backends;
use crate::error::Error;
use crate::vm::{Start, Vm, VmEvents};
use crate::{config, snapshot};

/// What the control loop should do after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// End the VMM (vmm.shutdown).
    Exit,
    /// The VM was taken over from the old baton of a live upgrade: serve the API now.
    TookOver,
    /// Taking the VM over failed (logged): end baton with an error.
    TakeOverFailed,
}

/// A migration in progress, on its own thread.
enum Job {
    /// This VM is being sent.
    Sending(Arc<Progress>),
    /// A VM is being received.
    Receiving,
    /// This VM is being handed to a new baton binary.
    Upgrading(Arc<Progress>),
    /// This new baton takes the VM over from the old one (nobody waits for an answer).
    TakingOver,
}

/// What a live upgrade needs besides the VM: the launcher, and the API socket to hand
/// over, once baton serves it.
pub struct UpgradeSupport {
    /// Starts the new binary.
    pub launcher: Arc<crate::launcher::Launcher>,
    /// Options the new baton runs with.
    pub args: Vec<String>,
    /// The API server's socket and gate, once it serves.
    pub api: Option<(api::server::ApiHandover, api::server::AcceptGate)>,
}

/// The VMM's VM, if any.
pub struct Vmm {
    kvm: Arc<Kvm>,
    events: VmEvents,
    config: Option<VmConfig>,
    state: VmState,
    vm: Option<Arc<Vm>>,
    backends: Backends,
    console: Option<(api::ConsoleConfig, Console)>,
    job: Option<(Job, Reply)>,
    /// Devices whose removal the guest was asked for and has not ejected yet: they go when
    /// it does, or when the VM stops.
    unplugging: Vec<String>,
    /// This process's id, for vmm.ping (asked once: a system call costs microseconds here).
    pid: u32,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    done_evt: EventFd,
    /// What a live upgrade needs; none: this baton cannot do one.
    upgrade: Option<UpgradeSupport>,
}

fn conflict(msg: String) -> ApiError {
    ApiError::message(409, msg)
}

/// Validates `config` and names its devices, or says why not (400).
fn check_and_name(config: &mut VmConfig) -> Result<(), ApiError> {
    config::check_and_name(config).map_err(|e| ApiError::new(400, &e))
}

/// A migration error as the API answers it.
fn migration_error(status: u16, e: migration::Error) -> ApiError {
    ApiError::new(status, &Error::Migration(e))
}

/// Refuses a live upgrade's binary that cannot be run, before anything starts (400).
fn check_binary(binary: &std::path::Path) -> Result<(), ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let refuse = |why: String| {
        Err(ApiError::message(
            400,
            format!("Cannot run {}: {why}", binary.display()),
        ))
    };
    match std::fs::metadata(binary) {
        Err(e) => refuse(e.to_string()),
        Ok(m) if !m.is_file() => refuse("not a regular file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => refuse("not executable".into()),
        Ok(_) => Ok(()),
    }
}

fn no_vm() -> ApiError {
    ApiError::message(404, "No VM has been created (use vm.create)")
}

impl Vmm {
    /// A VMM without a VM.
    pub fn new(kvm: Kvm, events: VmEvents) -> std::io::Result<Self> {
        let (done_tx, done_rx) = channel();
        Ok(Vmm {
            kvm: Arc::new(kvm),
            events,
            config: None,
            state: VmState::Created,
            vm: None,
            backends: Backends::default(),
            console: None,
            job: None,
            unplugging: Vec::new(),
            pid: std::process::id(),
            done_tx,
            done_rx,
            done_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            upgrade: None,
        })
    }

    /// Signalled when a migration thread ends: call [`Vmm::migration_done`].
    pub fn migration_event(&self) -> &EventFd {
        &self.done_evt
    }

    /// Refuses what cannot happen while a migration runs.
    fn not_migrating(&self) -> Result<(), ApiError> {
        match &self.job {
            None => Ok(()),
            Some((Job::Sending(_), _)) => Err(conflict(
                "The VM is being migrated; wait for vm.send-migration to answer".into(),
            )),
            Some((Job::Receiving | Job::TakingOver, _)) => Err(conflict(
                "A migration is being received; wait for vm.receive-migration to answer".into(),
            )),
            Some((Job::Upgrading(_), _)) => Err(conflict(
                "The VM is being handed to a new baton; wait for vmm.live-upgrade to answer".into(),
            )),
        }
    }

    /// The VM's console with its configuration, if it has one.
    fn console(&self) -> Option<(&api::ConsoleConfig, &Console)> {
        self.console
            .as_ref()
            .map(|(config, console)| (config, console))
    }

    /// Lets this baton do live upgrades with `support`.
    pub fn support_upgrades(&mut self, support: UpgradeSupport) {
        self.upgrade = Some(support);
    }

    /// The API server now serves `handover`'s socket, whose gate is `gate`.
    pub fn api_served(
        &mut self,
        handover: api::server::ApiHandover,
        gate: api::server::AcceptGate,
    ) {
        if let Some(u) = &mut self.upgrade {
            u.api = Some((handover, gate));
        }
    }

    /// Starts a live upgrade, or says why not.
    fn start_upgrade(&mut self, cfg: api::LiveUpgradeConfig) -> Result<Job, ApiError> {
        self.not_migrating()?;
        cfg.validate().map_err(|e| ApiError::new(400, &e))?;
        self.require(&[VmState::Running], "upgrade under")?;
        check_binary(&cfg.binary)?;
        let Some(UpgradeSupport {
            launcher,
            args,
            api: Some((api, gate)),
        }) = &self.upgrade
        else {
            return Err(ApiError::message(
                400,
                "Live upgrade needs baton serving its API on a socket (--api-socket)",
            ));
        };
        let handover = migration::upgrade::Handover {
            launcher: launcher.clone(),
            api: api.try_clone().map_err(|e| ApiError::new(500, &e))?,
            gate: gate.clone(),
            args: args.clone(),
        };
        let config = self
            .config
            .clone()
            .expect("require() checked the VM exists");
        let vm = self.vm.clone().expect("a running VM exists");
        let offered = backend::transferable(&self.backends, self.console());
        let progress =
            migration::upgrade::spawn(vm, config, cfg, offered, handover, self.notify()?)
                .map_err(|e| migration_error(500, e))?;
        Ok(Job::Upgrading(progress))
    }

    /// Takes the VM over from the old baton of a live upgrade, which sends it over
    /// `channel`.
    pub fn take_over(
        &mut self,
        channel: ::migration::Channel,
        step_timeout_s: u64,
    ) -> Result<(), ApiError> {
        let events = self
            .events
            .try_clone()
            .map_err(|e| ApiError::new(500, &e))?;
        let notify = self.notify()?;
        migration::receive::spawn_on(self.kvm.clone(), events, channel, step_timeout_s, notify)
            .map_err(|e| migration_error(500, e))?;
        // Nobody waits for an answer: the old baton learns the outcome from the stream.
        let (reply, _) = Reply::channel();
        self.job = Some((Job::TakingOver, reply));
        Ok(())
    }

    /// Starts sending the VM, or says why not.
    fn start_send(&mut self, cfg: api::SendMigrationConfig) -> Result<Job, ApiError> {
        self.not_migrating()?;
        cfg.validate().map_err(|e| ApiError::new(400, &e))?;
        self.require(&[VmState::Running], "migrate")?;
        let config = self
            .config
            .clone()
            .expect("require() checked the VM exists");
        migration::check_send(&config, &cfg).map_err(|e| migration_error(400, e))?;
        let vm = self.vm.clone().expect("a running VM exists");
        let offered = if cfg.backend_transfer {
            backend::transferable(&self.backends, self.console())
        } else {
            Vec::new()
        };
        let progress = migration::send::spawn(vm, config, cfg, offered, self.notify()?)
            .map_err(|e| migration_error(500, e))?;
        Ok(Job::Sending(progress))
    }

    /// Where a migration thread reports its end.
    fn notify(&self) -> Result<Notify, ApiError> {
        let evt = self
            .done_evt
            .try_clone()
            .map_err(|e| ApiError::new(500, &e))?;
        Ok(Notify {
            tx: self.done_tx.clone(),
            evt,
        })
    }

    /// Starts receiving a VM, or says why not.
    fn start_receive(
        &mut self,
        cfg: api::ReceiveMigrationConfig,
        fds: api::fds::Fds,
    ) -> Result<Job, ApiError> {
        self.not_migrating()?;
        if let Some(state) = self.config.as_ref().map(|_| self.state) {
            return Err(conflict(format!(
                "A VM already exists ({state:?}); delete it before receiving one"
            )));
        }
        cfg.validate().map_err(|e| ApiError::new(400, &e))?;
        let events = self
            .events
            .try_clone()
            .map_err(|e| ApiError::new(500, &e))?;
        let notify = self.notify()?;
        migration::receive::spawn(self.kvm.clone(), events, cfg, fds, notify).map_err(|e| {
            let status = match e {
                migration::Error::Thread(_) => 500,
                _ => 400,
            };
            migration_error(status, e)
        })?;
        Ok(Job::Receiving)
    }

    /// A migration thread ended: answers its request and installs or drops the VM.
    pub fn migration_done(&mut self) -> After {
        let Ok(done) = self.done_rx.try_recv() else {
            return After::Continue;
        };
        let Some((job, reply)) = self.job.take() else {
            return After::Continue;
        };
        if matches!(job, Job::TakingOver) {
            return self.took_over(done);
        }
        let (response, after) = match done {
            Done::Upgraded(Ok(upgraded)) => {
                log::info!(
                    "live upgrade: pid {} runs the VM now ({} ms down)",
                    upgraded.pid,
                    upgraded.stats.downtime_ms
                );
                self.stop_vm();
                self.state = VmState::Shutdown;
                let body = serde_json::to_value(&upgraded).expect("the answer serialises");
                (Ok(ApiReply::Json(body)), After::Exit)
            }
            Done::Upgraded(Err(e)) => {
                if matches!(
                    e,
                    migration::Error::Unanswered(_)
                        | migration::Error::NewBatonSilent(..)
                        | migration::Error::NewBatonLost(..)
                ) {
                    self.state = VmState::Paused;
                }
                let mut chain = vec!["Live upgrade failed; the VM runs on in this baton".into()];
                if self.state == VmState::Paused {
                    chain[0] = "Live upgrade failed; the VM stays paused here".into();
                }
                chain.extend(api::request::error_chain(&Error::Migration(e)));
                (Err(ApiError { status: 500, chain }), After::Continue)
            }
            Done::Sent(Ok(stats)) => {
                // The VM runs at the destination now; this one stays paused and goes.
                self.stop_vm();
                self.state = VmState::Shutdown;
                let body = serde_json::to_value(&stats).expect("stats serialise");
                (Ok(ApiReply::Json(body)), After::Exit)
            }
            Done::Sent(Err(e)) => {
                if matches!(e, migration::Error::Unanswered(_)) {
                    // Left paused on purpose: see migration::send.
                    self.state = VmState::Paused;
                }
                (Err(migration_error(500, e)), After::Continue)
            }
            Done::Received(Ok(Some(arrived))) => {
                let arrived = *arrived;
                log::info!("migration received: the VM runs here now");
                self.console = Some((arrived.config.serial.clone(), arrived.console));
                self.config = Some(arrived.config);
                self.backends = arrived.backends;
                self.vm = Some(Arc::new(arrived.vm));
                self.state = VmState::Running;
                (Ok(ApiReply::Empty), After::Continue)
            }
            Done::Received(Ok(None)) => (
                Err(ApiError::message(
                    500,
                    "The source abandoned the migration; nothing was kept",
                )),
                After::Continue,
            ),
            Done::Received(Err(e)) => {
                let mut chain = vec!["Receiving the migration failed; nothing was kept".into()];
                chain.extend(api::request::error_chain(&e));
                (Err(ApiError { status: 500, chain }), After::Continue)
            }
        };
        let _ = reply.send(response);
        after
    }

    /// A live upgrade's take-over ended: the VM runs here, or baton ends.
    fn took_over(&mut self, done: Done) -> After {
        match done {
            Done::Received(Ok(Some(arrived))) => {
                let arrived = *arrived;
                log::info!("live upgrade: the VM runs in this baton now");
                self.console = Some((arrived.config.serial.clone(), arrived.console));
                self.config = Some(arrived.config);
                self.backends = arrived.backends;
                self.vm = Some(Arc::new(arrived.vm));
                self.state = VmState::Running;
                After::TookOver
            }
            Done::Received(Ok(None)) => {
                log::error!("live upgrade: the old baton kept the VM");
                After::TakeOverFailed
            }
            Done::Received(Err(e)) => {
                let chain = api::request::error_chain(&e);
                log::error!(
                    "live upgrade: taking the VM over failed: {}",
                    chain.join(": ")
                );
                After::TakeOverFailed
            }
            Done::Sent(_) | Done::Upgraded(_) => After::TakeOverFailed,
        }
    }

    /// The eventfds the VM's devices and vCPUs signal.
    pub fn events(&self) -> &VmEvents {
        &self.events
    }

    fn state(&self) -> Result<VmState, ApiError> {
        self.config.as_ref().map(|_| self.state).ok_or_else(no_vm)
    }

    fn require(&self, wanted: &[VmState], action: &str) -> Result<(), ApiError> {
        let state = self.state()?;
        if wanted.contains(&state) {
            Ok(())
        } else {
            Err(conflict(format!("Cannot {action} a VM that is {state:?}")))
        }
    }

    /// Builds and starts the VM from its configuration.
    fn start_vm(&mut self) -> Result<(), ApiError> {
        self.build_vm(Start::Boot)
    }

    /// Builds the VM from its configuration: booted, or restored (and then paused).
    fn build_vm(&mut self, start: Start) -> Result<(), ApiError> {
        let restoring = matches!(start, Start::Restore(..));
        let config = self.config.as_ref().ok_or_else(no_vm)?;
        if self
            .console
            .as_ref()
            .is_none_or(|(c, _)| *c != config.serial)
        {
            // Release the old console (and its socket) before taking a new one.
            self.console = None;
            let console = Console::new(&config.serial).map_err(|e| ApiError::new(500, &e))?;
            self.console = Some((config.serial.clone(), console));
        }
        let (_, console) = self.console.as_ref().expect("console set above");
        let mut timer = Timeline::new();
        let vm = Vm::start(
            &self.kvm,
            config,
            &self.backends,
            console,
            &self.events,
            start,
            &mut timer,
        )
        .map_err(|e| {
            let status = if e.is_bad_state() { 400 } else { 500 };
            ApiError::new(status, &Error::Vm(e))
        })?;
        log::info!(
            "VM {} with {} vCPUs: built in {} us",
            if restoring { "restored" } else { "started" },
            config.cpus.boot_vcpus,
            timer.elapsed().as_micros()
        );
        log::debug!("VM build time: {}", timer.report());
        self.vm = Some(Arc::new(vm));
        self.state = if restoring {
            VmState::Paused
        } else {
            VmState::Running
        };
        Ok(())
    }

    /// Stops and drops the running VM, if any, and forgets what its guest last signalled:
    /// a reset or power-off raced by the stop must not act on the next VM.
    fn stop_vm(&mut self) {
        self.devices_ejected();
        if let Some(vm) = self.vm.take() {
            vm.stop();
        }
        // A removal asked for is done when the VM stops: it does not come back at the next
        // boot.
        for id in std::mem::take(&mut self.unplugging) {
            self.forget_device(&id);
        }
        for evt in [
            &self.events.exit,
            &self.events.reset,
            &self.events.fail,
            &self.events.eject,
        ] {
            // Non-blocking: an empty eventfd just says so.
            let _ = evt.read();
        }
    }

    /// Whether a VM is running (guest events only mean something then).
    pub fn has_vm(&self) -> bool {
        self.vm.is_some()
    }

    /// The running (or paused) VM, or a 409 saying why there is none.
    fn running(&self) -> Result<&Vm, ApiError> {
        self.vm
            .as_deref()
            .ok_or_else(|| conflict(format!("The VM is not running ({:?})", self.state)))
    }

    /// Rebuilds the VM (guest reset or vm.reboot). If the new VM cannot start, the VM is
    /// left shut down, and says so.
    pub fn reboot(&mut self) -> Result<(), ApiError> {
        self.stop_vm();
        self.state = VmState::Shutdown;
        self.start_vm()
    }

    /// Stops the VM for good (VMM exit).
    pub fn shutdown(&mut self) {
        self.stop_vm();
    }

    /// Keeps the migration job `started` gave, whose answer goes to `reply` when it ends
    /// (from [`Vmm::migration_done`]), or answers its refusal now.
    fn run_job(&mut self, started: Result<Job, ApiError>, reply: Reply) -> After {
        match started {
            Ok(job) => self.job = Some((job, reply)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        After::Continue
    }

    /// Takes one request from the API: answers it, or, for a migration, starts it and
    /// answers when it ends (from [`Vmm::migration_done`]). The one dispatcher of API requests.
    pub fn dispatch(&mut self, request: api::request::ApiRequest) -> After {
        match request.action {
            ApiAction::VmSendMigration(cfg) => {
                let started = self.start_send(cfg);
                self.run_job(started, request.reply)
            }
            ApiAction::VmReceiveMigration(cfg, fds) => {
                let started = self.start_receive(cfg, fds);
                self.run_job(started, request.reply)
            }
            ApiAction::VmmLiveUpgrade(cfg) => {
                let started = self.start_upgrade(cfg);
                self.run_job(started, request.reply)
            }
            action => {
                let (response, after) = self.handle(action);
                // A client that hung up does not need its answer.
                let _ = request.reply.send(response);
                after
            }
        }
    }

    /// Handles one request that is answered at once (every request but migrations, which
    /// only [`Vmm::dispatch`] starts).
    pub fn handle(&mut self, action: ApiAction) -> (ApiResponse, After) {
        let mut after = After::Continue;
        let read_only = matches!(
            action,
            ApiAction::VmmPing
                | ApiAction::VmInfo
                | ApiAction::VmCounters
                | ApiAction::VmmBackendTransferSupport
        );
        if !read_only {
            if let Err(e) = self.not_migrating() {
                return (Err(e), after);
            }
        }
        let response = match action {
            ApiAction::VmmPing => Ok(ApiReply::Json(
                serde_json::to_value(VmmPingResponse {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    build_version: format!("baton {}", env!("CARGO_PKG_VERSION")),
                    pid: self.pid,
                    features: Vec::new(),
                })
                .expect("ping answer serialises"),
            )),
            ApiAction::VmmBackendTransferSupport => Ok(ApiReply::Json(
                serde_json::to_value(backend::support(&self.backends, self.console()))
                    .expect("the support answer serialises"),
            )),
            ApiAction::VmmShutdown => {
                self.stop_vm();
                after = After::Exit;
                Ok(ApiReply::Empty)
            }
            ApiAction::VmCreate(config, fds) => self.create(*config, fds),
            ApiAction::VmAddNet(net, fds) => self.add_net(*net, fds),
            ApiAction::VmAddDisk(disk) => self.add_disk(*disk),
            ApiAction::VmRemoveDevice(id) => self.remove_device(&id),
            ApiAction::VmBoot => self
                .require(&[VmState::Created, VmState::Shutdown], "boot")
                .and_then(|_| self.start_vm())
                .map(|_| ApiReply::Empty),
            ApiAction::VmInfo => self.info(),
            ApiAction::VmCounters => self.counters(),
            ApiAction::VmPause => self.require(&[VmState::Running], "pause").and_then(|_| {
                self.running()?.pause();
                self.state = VmState::Paused;
                Ok(ApiReply::Empty)
            }),
            ApiAction::VmResume => self.require(&[VmState::Paused], "resume").and_then(|_| {
                self.running()?.resume();
                // A console held by a migration that never heard back serves again.
                if let Some(handle) = self.console.as_ref().and_then(|(_, c)| c.handle()) {
                    handle.release();
                }
                // So does an API a live upgrade stopped accepting on.
                if let Some((_, gate)) = self.upgrade.as_ref().and_then(|u| u.api.as_ref()) {
                    gate.set(true);
                }
                self.state = VmState::Running;
                Ok(ApiReply::Empty)
            }),
            ApiAction::VmShutdown => self
                .require(&[VmState::Running, VmState::Paused], "shut down")
                .map(|_| {
                    self.stop_vm();
                    self.state = VmState::Shutdown;
                    ApiReply::Empty
                }),
            ApiAction::VmReboot => self
                .require(&[VmState::Running, VmState::Paused], "reboot")
                .and_then(|_| self.reboot())
                .map(|_| ApiReply::Empty),
            ApiAction::VmPowerButton => self
                .require(&[VmState::Running], "press the power button of")
                .and_then(|_| self.running())
                .and_then(|vm| vm.power_button().map_err(|e| ApiError::new(500, &e)))
                .map(|_| ApiReply::Empty),
            ApiAction::VmSnapshot(cfg) => self.snapshot(&cfg),
            ApiAction::VmRestore(cfg, fds) => self.restore(cfg, fds),
            ApiAction::VmSendMigration(_)
            | ApiAction::VmReceiveMigration(..)
            | ApiAction::VmmLiveUpgrade(_) => Err(ApiError::message(
                400,
                "Migrations are only taken through the REST API",
            )),
            ApiAction::VmDelete => self.state().map(|_| {
                self.stop_vm();
                self.config = None;
                // Everything the VM held goes with it: TAPs, images, the console's socket.
                self.backends = Backends::default();
                self.console = None;
                ApiReply::Empty
            }),
        };
        (response, after)
    }

    fn add_net(&mut self, net: api::NetConfig, fds: api::fds::Fds) -> ApiResponse {
        let hot = self.may_change_devices()?;
        let config = self.config.as_ref().expect("state() checked the VM exists");
        // Check the card together with the rest, ids included, before touching the host.
        let mut candidate = config.clone();
        candidate.net.push(net);
        check_and_name(&mut candidate)?;
        let net = candidate.net.last_mut().expect("pushed above");
        let id = net.id.clone().unwrap_or_default();
        self.backends
            .add_net(net, fds)
            .map_err(|e| ApiError::new(400, &Error::Devices(e)))?;
        self.plug(candidate, &id, hot)
    }

    /// Whether devices may change now, and if so whether the VM runs (hot-plug) or not.
    fn may_change_devices(&mut self) -> Result<bool, ApiError> {
        self.not_migrating()?;
        let state = self.state()?;
        // Ejections the guest made are settled first, so that no request acts on a device
        // that has left already.
        self.devices_ejected();
        Ok(matches!(state, VmState::Running | VmState::Paused))
    }

    /// Takes `config`, which has device `id` more, whose backend is open: the device is
    /// built at the next boot, or now if the VM runs (`hot`), and the guest told.
    fn plug(&mut self, config: VmConfig, id: &str, hot: bool) -> ApiResponse {
        if !hot {
            self.config = Some(config);
            return Ok(ApiReply::Empty);
        }
        let vm = self.vm.as_ref().expect("a running VM");
        let slot = match vm.add_device(id, &config, &self.backends) {
            Ok(slot) => slot,
            Err(e) => {
                self.backends.remove(id);
                return Err(ApiError::new(500, &Error::Vm(e)));
            }
        };
        // As Cloud Hypervisor answers a hot-plug: the device and where it sits.
        let bdf = format!("0000:00:{slot:02x}.0");
        log::info!("{id}: hot-plugged at {bdf}");
        self.config = Some(config);
        Ok(ApiReply::Json(serde_json::json!({ "id": id, "bdf": bdf })))
    }

    fn add_disk(&mut self, disk: api::DiskConfig) -> ApiResponse {
        let hot = self.may_change_devices()?;
        let config = self.config.as_ref().expect("state() checked the VM exists");
        let mut candidate = config.clone();
        candidate.disks.push(disk);
        check_and_name(&mut candidate)?;
        let disk = candidate.disks.last().expect("pushed above");
        let id = disk.id.clone().unwrap_or_default();
        self.backends
            .add_disk(disk)
            .map_err(|e| ApiError::new(400, &Error::Devices(e)))?;
        self.plug(candidate, &id, hot)
    }

    fn remove_device(&mut self, id: &str) -> ApiResponse {
        let hot = self.may_change_devices()?;
        let config = self.config.as_ref().expect("state() checked the VM exists");
        let named = |d: &Option<String>| d.as_deref() == Some(id);
        let known = config.net.iter().any(|n| named(&n.id))
            || config.disks.iter().any(|d| named(&d.id))
            || config.rng.as_ref().is_some_and(|r| named(&r.id));
        if !known {
            return Err(ApiError::message(
                404,
                format!("The VM has no device {id:?}"),
            ));
        }
        if hot {
            // The guest lets go first; the device goes when it ejects it.
            if self.vm.as_ref().is_some_and(|vm| vm.request_removal(id)) {
                log::info!("{id}: removal requested; it goes when the guest ejects it");
                if !self.unplugging.iter().any(|u| u == id) {
                    self.unplugging.push(id.to_string());
                }
                return Ok(ApiReply::Empty);
            }
        }
        self.forget_device(id);
        Ok(ApiReply::Empty)
    }

    /// Drops device `id` from the configuration and closes its backend.
    fn forget_device(&mut self, id: &str) {
        self.unplugging.retain(|u| u != id);
        let Some(config) = self.config.as_mut() else {
            return;
        };
        let named = |d: &Option<String>| d.as_deref() == Some(id);
        config.net.retain(|n| !named(&n.id));
        config.disks.retain(|d| !named(&d.id));
        if config.rng.as_ref().is_some_and(|r| named(&r.id)) {
            config.rng = None;
        }
        self.backends.remove(id);
    }

    /// Finishes the removal of the devices the guest ejected.
    pub fn devices_ejected(&mut self) {
        let Some(vm) = self.vm.clone() else { return };
        for id in vm.take_ejected() {
            log::info!("{id}: ejected by the guest and removed");
            self.forget_device(&id);
        }
    }

    fn create(&mut self, config: VmConfig, fds: api::fds::Fds) -> ApiResponse {
        if let Some(state) = self.config.as_ref().map(|_| self.state) {
            return Err(conflict(format!(
                "A VM already exists ({state:?}); delete it first"
            )));
        }
        let mut config = config;
        check_and_name(&mut config)?;
        // TAPs and images are opened now, so a bad one is refused here, and they stay open
        // across reboots.
        self.backends =
            Backends::open(&mut config, fds).map_err(|e| ApiError::new(400, &Error::Devices(e)))?;
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(ApiReply::Empty)
    }

    fn snapshot(&self, cfg: &api::SnapshotConfig) -> ApiResponse {
        cfg.validate().map_err(|e| ApiError::new(400, &e))?;
        self.require(&[VmState::Paused], "snapshot")?;
        let dir = snapshot::dir_of(&cfg.destination_url).map_err(|e| ApiError::new(400, &e))?;
        let vm = self.running()?;
        let config = self
            .config
            .as_ref()
            .expect("require() checked the VM exists");
        let started = std::time::Instant::now();
        let state = vm.state().map_err(|e| ApiError::new(500, &Error::Vm(e)))?;
        snapshot::save(&dir, config, &state, vm.memory()).map_err(|e| {
            let status = if matches!(e, snapshot::Error::Exists(_)) {
                409
            } else {
                500
            };
            ApiError::new(status, &Error::Snapshot(e))
        })?;
        log::info!(
            "snapshot written to {} in {} ms",
            dir.display(),
            started.elapsed().as_millis()
        );
        Ok(ApiReply::Empty)
    }

    fn restore(&mut self, cfg: api::RestoreConfig, fds: api::fds::Fds) -> ApiResponse {
        if let Some(state) = self.config.as_ref().map(|_| self.state) {
            return Err(conflict(format!(
                "A VM already exists ({state:?}); delete it before restoring one"
            )));
        }
        cfg.validate().map_err(|e| ApiError::new(400, &e))?;
        let dir = snapshot::dir_of(&cfg.source_url).map_err(|e| ApiError::new(400, &e))?;
        let bad = |e: snapshot::Error| ApiError::new(400, &Error::Snapshot(e));
        let (mut config, state) = snapshot::load(&dir).map_err(bad)?;
        check_and_name(&mut config)?;
        let fds = config::net_fds_in_order(&mut config, &cfg.net_fds, fds)
            .map_err(|e| ApiError::new(400, &e))?;
        let backends =
            Backends::open(&mut config, fds).map_err(|e| ApiError::new(400, &Error::Devices(e)))?;
        let mem = crate::memory::create(config.memory.size, config.memory.shared)
            .map_err(|e| ApiError::new(500, &Error::Vm(crate::vm::Error::Memory(e))))?;
        snapshot::load_memory(&dir, &mem).map_err(bad)?;
        self.config = Some(config);
        self.backends = backends;
        self.state = VmState::Created;
        let shell = crate::vm::Shell::new(
            &self.kvm,
            self.config.as_ref().expect("set above"),
            Some(mem),
            &mut Timeline::new(),
        )
        .map_err(|e| ApiError::new(500, &Error::Vm(e)));
        let built = shell.and_then(|shell| self.build_vm(Start::Restore(Box::new(state), shell)));
        if let Err(e) = built {
            self.config = None;
            self.backends = Backends::default();
            return Err(e);
        }
        if cfg.resume {
            self.running()?.resume();
            self.state = VmState::Running;
        }
        Ok(ApiReply::Empty)
    }

    fn counters(&self) -> ApiResponse {
        self.state()?;
        let counters: serde_json::Map<String, serde_json::Value> = self
            .vm
            .as_ref()
            .map(|vm| vm.counters())
            .unwrap_or_default()
            .into_iter()
            .map(|(id, c)| {
                let values: serde_json::Map<String, serde_json::Value> =
                    c.into_iter().map(|(k, v)| (k, v.into())).collect();
                (id, values.into())
            })
            .collect();
        Ok(ApiReply::Json(counters.into()))
    }

    fn info(&self) -> ApiResponse {
        let state = self.state()?;
        let config = self.config.clone().expect("state() checked the VM exists");
        let memory_actual_size = config.memory.size;
        Ok(ApiReply::Json(
            serde_json::to_value(VmInfoResponse {
                config,
                state,
                memory_actual_size,
                migration: match &self.job {
                    Some((Job::Sending(p) | Job::Upgrading(p), _)) => {
                        Some(serde_json::to_value(p.report()).expect("progress serialises"))
                    }
                    _ => None,
                },
            })
            .expect("info serialises"),
        ))
    }
}

#[cfg(test)]
mod tests {
    //! The state machine without a guest: everything here runs before any VM is built, so
    //! only /dev/kvm is opened (never a VM created).
    use super::*;

    fn vmm() -> Vmm {
        let kvm = Kvm::new().expect("the control loop's tests open /dev/kvm: is KVM available?");
        Vmm::new(kvm, VmEvents::new().expect("eventfds")).expect("a VMM")
    }

    fn config() -> Box<VmConfig> {
        let config = serde_json::json!({
            "payload": {"kernel": "/nonexistent/vmlinux"},
            "memory": {"size": 64 << 20},
            "rng": {},
        });
        Box::new(serde_json::from_value(config).expect("a configuration"))
    }

    /// The status and the outermost message of `action`'s answer.
    fn answer(vmm: &mut Vmm, action: ApiAction) -> (u16, String) {
        match vmm.handle(action).0 {
            Ok(ApiReply::Empty) => (204, String::new()),
            Ok(ApiReply::Json(v)) => (200, v.to_string()),
            Err(e) => (e.status, e.chain.join(": ")),
        }
    }

    #[test]
    fn without_a_vm_requests_that_need_one_are_404() {
        let mut v = vmm();
        for action in [
            ApiAction::VmBoot,
            ApiAction::VmPause,
            ApiAction::VmResume,
            ApiAction::VmShutdown,
            ApiAction::VmReboot,
            ApiAction::VmInfo,
            ApiAction::VmCounters,
            ApiAction::VmDelete,
        ] {
            let name = format!("{action:?}");
            let (status, message) = answer(&mut v, action);
            assert_eq!(status, 404, "{name}: {message}");
            assert!(message.contains("vm.create"), "{name}: {message}");
        }
        let (status, ping) = answer(&mut v, ApiAction::VmmPing);
        assert_eq!(status, 200);
        assert!(
            ping.contains(&format!("\"pid\":{}", std::process::id())),
            "{ping}"
        );
    }

    #[test]
    fn a_created_vm_only_boots_or_goes() {
        let mut v = vmm();
        assert_eq!(
            answer(&mut v, ApiAction::VmCreate(config(), Vec::new())).0,
            204
        );
        assert_eq!(v.state, VmState::Created);
        let (status, message) = answer(&mut v, ApiAction::VmCreate(config(), Vec::new()));
        assert_eq!(
            (status, message.as_str()),
            (409, "A VM already exists (Created); delete it first")
        );
        for (action, verb) in [
            (ApiAction::VmPause, "pause"),
            (ApiAction::VmResume, "resume"),
            (ApiAction::VmShutdown, "shut down"),
            (ApiAction::VmReboot, "reboot"),
            (ApiAction::VmPowerButton, "press the power button of"),
        ] {
            let (status, message) = answer(&mut v, action);
            assert_eq!(status, 409, "{verb}: {message}");
            assert_eq!(message, format!("Cannot {verb} a VM that is Created"));
        }
        let (status, info) = answer(&mut v, ApiAction::VmInfo);
        assert_eq!(status, 200);
        let info: serde_json::Value = serde_json::from_str(&info).expect("JSON");
        assert_eq!(info["state"], "Created", "{info}");
        assert!(info["config"]["rng"]["id"].is_string(), "named: {info}");
        assert_eq!(answer(&mut v, ApiAction::VmDelete).0, 204);
        assert_eq!(answer(&mut v, ApiAction::VmInfo).0, 404);
        assert_eq!(
            answer(&mut v, ApiAction::VmCreate(config(), Vec::new())).0,
            204
        );
    }

    #[test]
    fn a_bad_configuration_is_400_and_leaves_no_vm() {
        let mut v = vmm();
        let mut bad = config();
        bad.memory.size = 0;
        let (status, message) = answer(&mut v, ApiAction::VmCreate(bad, Vec::new()));
        assert_eq!(status, 400, "{message}");
        assert_eq!(answer(&mut v, ApiAction::VmInfo).0, 404);
    }

    #[test]
    fn while_a_migration_runs_only_reads_are_answered() {
        let mut v = vmm();
        assert_eq!(
            answer(&mut v, ApiAction::VmCreate(config(), Vec::new())).0,
            204
        );
        let (reply, _answer) = Reply::channel();
        v.job = Some((Job::Receiving, reply));
        for action in [
            ApiAction::VmBoot,
            ApiAction::VmDelete,
            ApiAction::VmmShutdown,
        ] {
            let name = format!("{action:?}");
            let (status, message) = answer(&mut v, action);
            assert_eq!(status, 409, "{name}: {message}");
            assert!(
                message.contains("vm.receive-migration"),
                "{name}: {message}"
            );
        }
        for action in [
            ApiAction::VmmPing,
            ApiAction::VmInfo,
            ApiAction::VmmBackendTransferSupport,
        ] {
            let name = format!("{action:?}");
            assert_eq!(answer(&mut v, action).0, 200, "{name}");
        }
    }

    #[test]
    fn vmm_shutdown_ends_the_loop_and_migrations_only_come_through_dispatch() {
        let mut v = vmm();
        let (response, after) = v.handle(ApiAction::VmSendMigration(Default::default()));
        assert_eq!(response.err().map(|e| e.status), Some(400));
        assert_eq!(after, After::Continue);
        let (response, after) = v.handle(ApiAction::VmmShutdown);
        assert!(response.is_ok());
        assert_eq!(after, After::Exit);
    }
}
