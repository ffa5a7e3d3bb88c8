//! Live upgrade, the old baton's side: start the new binary through the launcher with a
//! socket pair, the API socket and its lock; migrate the VM to it over the pair (memory
//! descriptors when memory is shared, and every backend handed over); and stop taking API
//! connections while the VM is paused, so that clients who connect meanwhile wait in the
//! socket's backlog for the new baton.
//!
//! The new baton gets its own process id, reported in the answer: exec in place would leave
//! nothing to fall back on if the new binary failed once the old image was gone, while a new
//! process lets the old one resume the VM, with every backend and its API socket, whatever
//! step fails. At the last step the new baton says it will run the VM before it does
//! (the protocol's start notice): until then the VM resumes here if the new baton ends, or
//! does not answer in time and is killed; after it, a new baton that ends or keeps silent
//! without answering may have run the VM, which then stays paused here, so that it never
//! runs in both.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::migration::timing::Timeline;
use api::server::{AcceptGate, ApiHandover};
use api::{LiveUpgradeConfig, SendMigrationConfig, VmConfig};
use serde::Serialize;

use super::backend::Transferable;
use super::{send, Done, Error, Notify, Progress, Stats};
use crate::launcher::{Launcher, FIRST_FD};
use crate::vm::Vm;

/// How long the new baton has to end by itself once the migration failed, and to be gone
/// once killed.
const CHILD_EXIT: Duration = Duration::from_secs(5);

/// What a live upgrade needs from the running baton besides the VM.
pub struct Handover {
    /// Starts the new binary.
    pub launcher: Arc<Launcher>,
    /// The API socket and its lock, for the new baton.
    pub api: ApiHandover,
    /// This baton's API server's gate on new connections.
    pub gate: AcceptGate,
    /// Options the new baton runs with, as this one does (`--seccomp`, `-v`).
    pub args: Vec<String>,
}

/// What `vmm.live-upgrade` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Upgraded {
    /// The new baton's process id.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// What it took over: guest memory (its descriptors), each device whose backend went,
    /// and the API socket.
    pub handed_over: Vec<String>,
    /// The migration's figures.
    #[serde(flatten)]
    pub stats: Stats,
}

/// Starts the upgrade on a `migration-send` thread; `notify` gets the outcome.
pub fn spawn(
    vm: Arc<Vm>,
    config: VmConfig,
    cfg: LiveUpgradeConfig,
    transferable: Vec<Transferable>,
    handover: Handover,
    notify: Notify,
) -> Result<Arc<Progress>, Error> {
    send::on_thread(notify, move |p| {
        Done::Upgraded(upgrade(&vm, &config, &cfg, transferable, &handover, p))
    })
}

/// The options that start a baton taking the VM over from this one.
fn arguments(cfg: &LiveUpgradeConfig, handover: &Handover) -> Vec<String> {
    let mut api = format!(
        "fd={},max_connections={}",
        FIRST_FD + 1,
        handover.api.max_connections
    );
    if handover.api.lock.is_some() {
        api.push_str(&format!(",lock_fd={}", FIRST_FD + 2));
    }
    let mut args = vec![
        "--upgrade-from".to_string(),
        format!("fd={FIRST_FD},step_timeout_s={}", cfg.step_timeout_s),
        "--api-socket".to_string(),
        api,
    ];
    args.extend(handover.args.iter().cloned());
    args
}

fn upgrade(
    vm: &Vm,
    config: &VmConfig,
    cfg: &LiveUpgradeConfig,
    transferable: Vec<Transferable>,
    handover: &Handover,
    progress: &Progress,
) -> Result<Upgraded, Error> {
    let mut timer = Timeline::new();
    progress.phase("starting");
    let (ours, theirs) = UnixStream::pair().map_err(Error::Socket)?;
    let mut fds = vec![theirs.as_fd(), handover.api.listener.as_fd()];
    fds.extend(handover.api.lock.as_ref().map(|l| l.as_fd()));
    let child = handover
        .launcher
        .spawn(&cfg.binary, &arguments(cfg, handover), &fds)
        .map_err(Error::Launch)?;
    drop(fds);
    drop(theirs);
    timer.mark("start the new baton");
    log::info!(
        "live upgrade: {} runs as pid {}",
        cfg.binary.display(),
        child.pid
    );
    let migration = SendMigrationConfig {
        destination_url: format!("unix:(pid {})", child.pid),
        local: config.memory.shared,
        backend_transfer: true,
        step_timeout_s: cfg.step_timeout_s,
        ..Default::default()
    };
    let gate = &handover.gate;
    let hooks = send::Hooks {
        paused: &|paused| gate.set(!paused),
        // Once it is gone, what it wrote tells whether it was to run the VM.
        silence: &|| child.kill(CHILD_EXIT),
    };
    let result = send::send_over(
        ours.into(),
        vm,
        config,
        &migration,
        transferable,
        progress,
        hooks,
        timer,
    );
    match result {
        Ok(stats) => {
            let mut handed_over = Vec::new();
            if migration.local {
                handed_over.push("memory".to_string());
            }
            handed_over.extend(stats.transferred_backends.iter().cloned());
            handed_over.push("api-socket".to_string());
            Ok(Upgraded {
                pid: child.pid,
                binary: cfg.binary.clone(),
                handed_over,
                stats,
            })
        }
        Err(Error::Unanswered(e)) => {
            // It said it would run the VM and did not answer: nothing here may resume it,
            // so it stays paused and the API is open again to say so.
            gate.set(true);
            if child.wait_exit(CHILD_EXIT) {
                log::error!(
                    "live upgrade: pid {} ended after it said it would run the VM; the VM \
                     stays paused here",
                    child.pid
                );
                return Err(Error::NewBatonLost(
                    child.pid,
                    Box::new(Error::Unanswered(e)),
                ));
            }
            log::error!(
                "live upgrade: pid {} said it would run the VM and does not answer; the VM \
                 stays paused here",
                child.pid
            );
            Err(Error::NewBatonSilent(
                child.pid,
                Box::new(Error::Unanswered(e)),
            ))
        }
        Err(Error::EndedBeforeRun(e)) => {
            // It ended before it would run the VM, which runs on here already.
            Err(Error::NewBatonEnded(
                child.pid,
                Box::new(Error::EndedBeforeRun(e)),
            ))
        }
        Err(e) => {
            // The VM ran here all along, or resumed here already. A new baton whose
            // migration failed ends by itself; one that does not (stuck) is ended here.
            if !child.wait_exit(CHILD_EXIT) && !child.kill(CHILD_EXIT) {
                log::warn!("live upgrade: pid {} survives SIGKILL", child.pid);
            }
            gate.set(true);
            Err(Error::NewBatonFailed(child.pid, Box::new(e)))
        }
    }
}
