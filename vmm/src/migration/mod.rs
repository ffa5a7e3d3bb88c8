//! Live migration between two batons: the source's side ([`send`]) and the destination's
//! ([`receive`], driven by [`::migration::session::receive`]), and backend transfer ([`backend`]):
//! the one place that knows which backends can be handed over and how. Both run on a migration thread
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
//!    from that state on those descriptors, resumes its devices, answers Complete and lets
//!    its vCPUs go: until that answer any failure resumes the VM here as it was, on its
//!    own descriptors (the destination got duplicates, and set nothing on them).
pub mod backend;
pub mod receive;
pub mod send;
pub mod upgrade;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use ::migration::protocol::{Phase, Software};
use ::migration::{MigrationUrl, ProtocolError};
use api::{SendMigrationConfig, VmConfig};
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::vm;

pub use receive::Arrived;
pub use send::send;

/// Errors of a migration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL does not parse.
    #[error("Invalid migration URL")]
    Url(#[source] ::migration::UrlError),
    /// `local=on` needs memory whose descriptors can be handed over.
    #[error("local=on needs guest memory created with shared=on")]
    LocalNeedsShared,
    /// `local=on` needs a channel that carries descriptors.
    #[error("local=on needs a unix: URL: memory descriptors cannot travel over TCP")]
    LocalNeedsUnix,
    /// Backend transfer needs a channel that carries descriptors.
    #[error("backend_transfer needs a unix: URL: TAP descriptors cannot travel over TCP")]
    BackendTransferNeedsUnix,
    /// A backend could not be handed over or taken over.
    #[error("Backend transfer")]
    Backend(#[source] backend::Error),
    /// Nobody listens at the URL.
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    /// Cannot listen at the URL.
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    /// The source could not be accepted.
    #[error("Cannot accept the source")]
    Accept(#[source] std::io::Error),
    /// The socket's timeouts could not be set.
    #[error("Cannot set up the migration socket")]
    Socket(#[source] std::io::Error),
    /// The migration thread could not be started.
    #[error("Cannot start the migration thread")]
    Thread(#[source] std::io::Error),
    /// The protocol failed (the destination refused, the stream broke ...).
    #[error("Migration protocol")]
    Protocol(#[source] ProtocolError),
    /// The destination got Complete but its answer never came: it may run the VM, so the VM
    /// stays paused here.
    #[error("The destination did not answer Complete, so it may be running the VM: the VM stays paused here. Resume it here (vm.resume) only if the destination has no VM")]
    Unanswered(#[source] ProtocolError),
    /// The destination ended after Complete without saying it would run the VM: it never
    /// ran there.
    #[error("The destination ended before it ran the VM; the VM runs on here")]
    EndedBeforeRun(#[source] ProtocolError),
    /// The peer moved no byte for `step_timeout_s`.
    #[error("The peer sent or took nothing for {seconds} s (step_timeout_s) while {during}")]
    Stalled {
        /// `step_timeout_s`.
        seconds: u64,
        /// What this side was doing.
        during: &'static str,
        /// The timed-out read or write.
        #[source]
        source: ProtocolError,
    },
    /// The two batons write and read the VM state in different layouts.
    #[error("The source runs {source_software} and the destination {destination_software}: they lay out the VM state differently, so the VM cannot move between them. Nothing was paused; the VM runs on at the source")]
    Skew {
        /// The source's software.
        source_software: Software,
        /// The destination's.
        destination_software: Software,
    },
    /// The new binary of a live upgrade could not be started.
    #[error("Cannot start the new baton")]
    Launch(#[source] crate::launcher::Error),
    /// The new baton of a live upgrade ended before it said it would run the VM.
    #[error("The new baton (pid {0}) ended without taking the VM; the VM runs on here")]
    NewBatonEnded(u32, #[source] Box<Error>),
    /// The new baton of a live upgrade did not take the VM: it refused, failed, or was ended
    /// for its silence before it would run the VM.
    #[error("The new baton (pid {0}) did not take the VM; the VM runs on here")]
    NewBatonFailed(u32, #[source] Box<Error>),
    /// The new baton of a live upgrade got Complete, does not answer and has not ended.
    #[error("The new baton (pid {0}) said it would run the VM and does not answer: it may run the VM, which stays paused here. Resume it here (vm.resume) only once that process is gone")]
    NewBatonSilent(u32, #[source] Box<Error>),
    /// The new baton of a live upgrade said it would run the VM and ended without answering.
    #[error("The new baton (pid {0}) said it would run the VM and ended without answering: the VM stays paused here, as it was before the upgrade. vm.resume runs it here from that state, on memory the new baton may have changed")]
    NewBatonLost(u32, #[source] Box<Error>),
    /// Pre-copy did not converge in time.
    #[error("Memory was still changing too fast after {seconds} s (timeout_s): the guest wrote {dirty_mb_s} MB/s while {sent_mb_s} MB/s went out{}; migration cancelled, and the VM keeps running here. Raise downtime_ms or timeout_s{}", throttled(.throttle), match .throttle { Some(_) => "", None => ", or set auto_converge" })]
    Timeout {
        /// `timeout_s`.
        seconds: u64,
        /// How fast the guest dirtied memory in the last pass.
        dirty_mb_s: u64,
        /// How fast memory went out in the last pass.
        sent_mb_s: u64,
        /// With auto_converge, the share of time the vCPUs were stopped, in percent.
        throttle: Option<u64>,
    },
    /// The VM could not be paused, saved or logged.
    #[error("VM")]
    Vm(#[source] vm::Error),
    /// The state would not encode.
    #[error("Cannot encode the VM state")]
    Encode(#[source] ::migration::SnapshotError),
}

/// How far auto_converge slowed the vCPUs down, for [`Error::Timeout`].
fn throttled(throttle: &Option<u64>) -> String {
    throttle.map_or_else(String::new, |percent| {
        format!(", its vCPUs stopped {percent}% of the time")
    })
}

impl From<ProtocolError> for Error {
    fn from(e: ProtocolError) -> Self {
        Error::Protocol(e)
    }
}

impl Error {
    /// This error, told as the step timeout passing if a read or write timed out: the
    /// sockets of a migration carry `step_timeout_s` as their timeouts.
    pub(crate) fn stalled(self, seconds: u64) -> Self {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        match self {
            Error::Protocol(ProtocolError::Io(during, io))
                if matches!(io.kind(), WouldBlock | TimedOut) =>
            {
                Error::Stalled {
                    seconds,
                    during,
                    source: ProtocolError::Io(during, io),
                }
            }
            e => e,
        }
    }
}

impl From<backend::Error> for Error {
    fn from(e: backend::Error) -> Self {
        Error::Backend(e)
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
    /// How fast the guest wrote memory during the last pre-copy pass, in bytes per second
    /// (0 with local=on).
    pub dirty_bytes_per_s: u64,
    /// With auto_converge, the share of time the vCPUs were stopped at the end of
    /// pre-copy, in percent (0: never slowed down).
    pub throttle_percent: u64,
    /// Devices whose backends the destination took over.
    pub transferred_backends: Vec<String>,
    /// [`Stats::total_ms`] in microseconds.
    pub total_us: u64,
    /// [`Stats::downtime_ms`] in microseconds.
    pub downtime_us: u64,
    /// Where the time went, step by step, on both sides.
    pub breakdown: Breakdown,
}

/// Where a migration's time went, step by step, on both sides, in microseconds. The
/// source's paused steps add up to its downtime; the destination's paused steps happen
/// while the source writes the state and the backends and waits in its `complete` step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Breakdown {
    /// The source's steps before it paused the VM: connecting, the handshake, memory.
    pub source_before_pause: Vec<Phase>,
    /// The source's steps from pausing the VM to the destination's last answer.
    pub source_paused: Vec<Phase>,
    /// The destination's steps before the State request (its gaps, waiting for the
    /// source, are not counted).
    pub destination_before_pause: Vec<Phase>,
    /// The destination's steps from the State request to the VM running there.
    pub destination_paused: Vec<Phase>,
}

impl Breakdown {
    /// The whole breakdown as log lines.
    pub fn log(&self) {
        use ::migration::timing::report;
        log::info!(
            "source, before the pause: {}",
            report(&self.source_before_pause)
        );
        log::info!("source, paused: {}", report(&self.source_paused));
        log::info!(
            "destination, before the pause: {}",
            report(&self.destination_before_pause)
        );
        log::info!("destination, paused: {}", report(&self.destination_paused));
    }
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
    pub(super) fn phase(&self, phase: &'static str) {
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
pub(crate) fn migration_url(text: &str, backend_transfer: bool) -> Result<MigrationUrl, Error> {
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

/// Makes a source's pre-copy passes send no faster than this many MB/s, so that the tests
/// can make a guest that writes memory faster than it goes out.
pub const TEST_PRECOPY_MBPS: &str = "BATON_TEST_PRECOPY_MBPS";

/// Makes a baton taking a VM over end on the spot at the named step (`config`, `state` or
/// `complete`, before the VM starts there), or, with `hang-` before the step, stop there
/// for an hour: for the live-upgrade tests, which need a new binary that crashes or hangs.
pub const TEST_CRASH: &str = "BATON_TEST_CRASH";

/// Ends this baton at once, or hangs, if [`TEST_CRASH`] names `step`.
pub(crate) fn test_crash(step: &str) {
    let Ok(asked) = std::env::var(TEST_CRASH) else {
        return;
    };
    if asked == step {
        log::error!("{TEST_CRASH}={step}: ending now");
        // SAFETY: _exit ends the process at once, as a crash would.
        unsafe { libc::_exit(101) };
    }
    if asked.strip_prefix("hang-") == Some(step) {
        log::error!("{TEST_CRASH}={asked}: hanging");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Makes this baton announce, and accept, another state layout version: for the tests of
/// version skew only, which have no second build at hand.
pub const TEST_STATE_FORMAT: &str = "BATON_TEST_STATE_FORMAT";

/// The software this baton runs, as it tells a migration's peer.
pub fn software() -> Software {
    let state_format = std::env::var(TEST_STATE_FORMAT)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(::migration::snapshot::FORMAT_VERSION);
    Software {
        vmm: format!("baton {}", env!("CARGO_PKG_VERSION")),
        state_format,
    }
}

/// Refuses a peer whose state this baton cannot read, or which cannot read this one's
/// (`here_is_source`: this baton sends); a peer that does not say is taken as compatible (the
/// protocol version already matched).
pub fn check_peer(there: Option<&Software>, here_is_source: bool) -> Result<(), Error> {
    let here = software();
    let Some(there) = there.filter(|t| t.state_format != here.state_format) else {
        return Ok(());
    };
    let (source_software, destination_software) = if here_is_source {
        (here, there.clone())
    } else {
        (there.clone(), here)
    };
    Err(Error::Skew {
        source_software,
        destination_software,
    })
}

/// What a migration thread reports when it ends.
pub enum Done {
    /// The VM was sent (it runs there now) or not (it runs here as before).
    Sent(Result<Stats, Error>),
    /// A VM arrived (None: the source abandoned), or receiving failed.
    Received(Result<Option<Box<Arrived>>, Error>),
    /// A live upgrade handed the VM over (it runs in the new baton now) or not (it runs
    /// here as before, unless the error is [`Error::Unanswered`]).
    Upgraded(Result<upgrade::Upgraded, Error>),
}

/// Where a migration thread reports its end: the control loop's channel, and the eventfd
/// that wakes the loop.
pub struct Notify {
    /// The control loop's end of the channel.
    pub tx: Sender<Done>,
    /// Written once the report is in the channel.
    pub evt: EventFd,
}

impl Notify {
    /// Reports `done` and wakes the control loop (which may be gone, if baton is exiting).
    fn report(self, done: Done) {
        let _ = self.tx.send(done);
        let _ = self.evt.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(shared: bool) -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
            "memory": {"size": 64 << 20, "shared": shared},
        }))
        .expect("a configuration")
    }

    fn send(url: &str, local: bool, backend_transfer: bool) -> SendMigrationConfig {
        SendMigrationConfig {
            destination_url: url.into(),
            local,
            backend_transfer,
            ..Default::default()
        }
    }

    #[test]
    fn both_sides_check_the_url_before_anything_moves() {
        let ok = check_send(&config(true), &send("unix:/run/m.sock", true, true));
        assert!(ok.expect("local backend transfer").is_unix());
        check_send(&config(false), &send("tcp:127.0.0.1:6000", false, false))
            .expect("copied memory over TCP");
        let refused = [
            (
                send("tcp:127.0.0.1:6000", true, false),
                true,
                "local=on needs a unix: URL",
            ),
            (
                send("unix:/run/m.sock", true, false),
                false,
                "local=on needs guest memory created with shared=on",
            ),
            (
                send("tcp:127.0.0.1:6000", false, true),
                true,
                "backend_transfer needs a unix: URL",
            ),
            (
                send("http://x", false, false),
                true,
                "Invalid migration URL",
            ),
        ];
        for (cfg, shared, why) in refused {
            let e = check_send(&config(shared), &cfg).expect_err(why);
            assert!(
                e.to_string().starts_with(why),
                "{}: {e}",
                cfg.destination_url
            );
        }
        let receive = |url: &str, backend_transfer| api::ReceiveMigrationConfig {
            receiver_url: url.into(),
            backend_transfer,
            ..Default::default()
        };
        check_receive(&receive("tcp:0.0.0.0:6000", false)).expect("TCP without transfer");
        let e = check_receive(&receive("tcp:0.0.0.0:6000", true)).expect_err("TCP transfer");
        assert!(matches!(e, Error::BackendTransferNeedsUnix), "{e}");
    }

    #[test]
    fn a_timed_out_read_or_write_is_told_as_the_step_timeout() {
        let io = |kind| std::io::Error::from(kind);
        for kind in [std::io::ErrorKind::WouldBlock, std::io::ErrorKind::TimedOut] {
            let e = Error::Protocol(ProtocolError::Io("reading the response", io(kind)));
            let e = e.stalled(5);
            assert_eq!(
                e.to_string(),
                "The peer sent or took nothing for 5 s (step_timeout_s) while reading the response"
            );
        }
        let broken = Error::Protocol(ProtocolError::Io(
            "reading the response",
            io(std::io::ErrorKind::UnexpectedEof),
        ));
        assert!(matches!(broken.stalled(5), Error::Protocol(_)));
        let timeout = |throttle| Error::Timeout {
            seconds: 3,
            dirty_mb_s: 0,
            sent_mb_s: 0,
            throttle,
        };
        assert!(matches!(
            timeout(None).stalled(5),
            Error::Timeout { seconds: 3, .. }
        ));
        // The advice to set auto_converge only when it was off; the throttle when on.
        let off = timeout(None).to_string();
        assert!(off.ends_with("timeout_s, or set auto_converge"), "{off}");
        let on = timeout(Some(99)).to_string();
        assert!(
            on.contains("went out, its vCPUs stopped 99% of the time;"),
            "{on}"
        );
        assert!(on.ends_with("Raise downtime_ms or timeout_s"), "{on}");
    }

    #[test]
    fn progress_reports_its_phase_and_figures() {
        let p = Progress::default();
        p.phase("pre-copy");
        p.iteration.store(3, Ordering::Relaxed);
        p.bytes.store(4096, Ordering::Relaxed);
        p.remaining.store(8192, Ordering::Relaxed);
        let r = serde_json::to_value(p.report()).expect("serialises");
        assert_eq!(
            r,
            serde_json::json!({
                "phase": "pre-copy", "iteration": 3, "bytes_sent": 4096, "bytes_in_pass": 8192,
            })
        );
    }
}
