//! `baton-remote`: drive a running baton through its API socket, one command per endpoint.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use api::client::{self, Response};
use clap::{Arg, ArgMatches, Command};

/// (command, method, endpoint, help).
const SIMPLE: &[(&str, &str, &str, &str)] = &[
    (
        "ping",
        "GET",
        "vmm.ping",
        "Show the VMM's version and pid (GET vmm.ping)",
    ),
    (
        "backend-transfer-support",
        "GET",
        "vmm.backend-transfer-support",
        "Show the backend kinds this baton can take over in a local migration, and the VM's \
         devices that would hand theirs over, with their descriptor counts \
         (GET vmm.backend-transfer-support)",
    ),
    (
        "info",
        "GET",
        "vm.info",
        "Show the VM's configuration and state (GET vm.info)",
    ),
    (
        "boot",
        "PUT",
        "vm.boot",
        "Boot the created VM (PUT vm.boot)",
    ),
    (
        "counters",
        "GET",
        "vm.counters",
        "Show each device's counters, e.g. a network card's rx/tx bytes and frames (GET vm.counters)",
    ),
    ("pause", "PUT", "vm.pause", "Stop every vCPU (PUT vm.pause)"),
    (
        "resume",
        "PUT",
        "vm.resume",
        "Run a paused VM again (PUT vm.resume)",
    ),
    (
        "shutdown",
        "PUT",
        "vm.shutdown",
        "Stop the VM; it can be booted again (PUT vm.shutdown)",
    ),
    (
        "reboot",
        "PUT",
        "vm.reboot",
        "Restart the VM from its configuration (PUT vm.reboot)",
    ),
    (
        "power-button",
        "PUT",
        "vm.power-button",
        "Press the ACPI power button: the guest shuts down (PUT vm.power-button)",
    ),
    (
        "delete",
        "PUT",
        "vm.delete",
        "Shut down and forget the VM (PUT vm.delete)",
    ),
    (
        "shutdown-vmm",
        "PUT",
        "vmm.shutdown",
        "Shut the VM down and end baton (PUT vmm.shutdown)",
    ),
];

/// Commands whose argument is an option string turned into a JSON body and the descriptors
/// to pass with it: (command, endpoint, argument help, help, parser).
type Parse = fn(&str) -> Result<(serde_json::Value, Vec<i32>), api::option_parser::OptionError>;

fn json<T: serde::Serialize>(v: T) -> (serde_json::Value, Vec<i32>) {
    (
        serde_json::to_value(v).expect("configurations serialise"),
        Vec::new(),
    )
}

const WITH_OPTIONS: &[(&str, &str, &str, &str, Parse)] = &[
    (
        "snapshot",
        "vm.snapshot",
        "URL: file:///dir (a new or empty directory), or destination_url=file:///dir",
        "Write a snapshot of the paused VM (PUT vm.snapshot)",
        |s| api::SnapshotConfig::from_option_string(s).map(json),
    ),
    (
        "restore",
        "vm.restore",
        "source_url=file:///dir[,resume=on][,net_fds=[<id>@[<fd>,...],...]]",
        "Build the VM from a snapshot; it stays paused unless resume=on (PUT vm.restore). \
         net_fds names open TAP queues baton-remote inherited, per network card, which \
         travel with SCM_RIGHTS",
        |s| {
            api::RestoreConfig::from_option_string(s).map(|mut c| {
                let fds = c.take_fds();
                (json(c).0, fds)
            })
        },
    ),
    (
        "send-migration",
        "vm.send-migration",
        "destination_url=unix:/path|tcp:host:port[,local=on][,downtime_ms=N][,timeout_s=N]\
         [,step_timeout_s=N][,backend_transfer=on][,auto_converge=on] (downtime_limit_ms=N for \
         downtime_ms; Cloud Hypervisor's timeout_strategy=cancel, connections=1 and \
         memory_mode=precopy are accepted too)",
        "Migrate the VM to a baton waiting in receive-migration; shows progress on standard \
         error while it runs (PUT vm.send-migration)",
        |s| api::SendMigrationConfig::from_option_string(s).map(json),
    ),
    (
        "receive-migration",
        "vm.receive-migration",
        "receiver_url=unix:/path|tcp:host:port[,backend_transfer=on][,step_timeout_s=N]\
         [,net_fds=[<id>@[<fd>,...],...]]",
        "Wait for a VM migrated from another baton (PUT vm.receive-migration). net_fds \
         names open TAP queues baton-remote inherited, per network card, which travel with \
         SCM_RIGHTS",
        |s| {
            api::ReceiveMigrationConfig::from_option_string(s).map(|mut c| {
                let fds = c.take_fds();
                (json(c).0, fds)
            })
        },
    ),
    (
        "add-disk",
        "vm.add-disk",
        api::DiskConfig::SYNTAX,
        "Add a disk (PUT vm.add-disk): at the next boot, or hot-plugged into a running VM",
        |s| api::DiskConfig::from_option_string(s).map(json),
    ),
    (
        "remove-device",
        "vm.remove-device",
        "ID: the device's id (net0, disk0, rng0 ...)",
        "Remove a device (PUT vm.remove-device): at once if the VM is not running, else when \
         the guest ejects it",
        |s| Ok(json(serde_json::json!({ "id": s }))),
    ),
];

fn command() -> Command {
    let mut cmd = Command::new("baton-remote")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Drive a running baton through its REST API socket.\n\n\
             Prints JSON answers on standard output; on failure prints the error chain \
             (outermost first) and exits 1.",
        )
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .value_name("PATH")
                .required(true)
                .help("baton's API socket (baton --api-socket path=PATH)"),
        )
        .subcommand_required(true)
        .arg_required_else_help(true);
    for (name, _, _, help) in SIMPLE {
        cmd = cmd.subcommand(Command::new(*name).about(*help));
    }
    for (name, _, arg_help, help, _) in WITH_OPTIONS {
        cmd = cmd.subcommand(
            Command::new(*name).about(*help).arg(
                Arg::new("options")
                    .value_name("OPTIONS")
                    .required(true)
                    .help(*arg_help),
            ),
        );
    }
    cmd.subcommand(
        Command::new("add-net")
            .about(
                "Add a network card (PUT vm.add-net): at the next boot, or hot-plugged into a \
                 running VM; TAP descriptors given with fd=[...] or --fd travel with SCM_RIGHTS",
            )
            .arg(
                Arg::new("net")
                    .value_name("OPTIONS")
                    .required(true)
                    .help(api::NetConfig::SYNTAX),
            )
            .arg(
                Arg::new("fd")
                    .long("fd")
                    .value_name("N")
                    .action(clap::ArgAction::Append)
                    .value_parser(clap::value_parser!(i32))
                    .help(
                        "An open TAP queue inherited by baton-remote (one per queue pair, \
                         in order); baton gets its own copy",
                    ),
            ),
    )
    .subcommand(
        Command::new("live-upgrade")
            .about(
                "Hand the running VM, its memory, network and disk backends and the API \
                 socket to a new baton binary, which goes on serving the same socket; shows \
                 progress on standard error and prints the new pid, the downtime and what \
                 was handed over (PUT vmm.live-upgrade). If any step fails the VM runs on in \
                 this baton",
            )
            .arg(
                Arg::new("binary")
                    .long("binary")
                    .value_name("PATH")
                    .required(true)
                    .help("The new baton binary (a relative path is taken from here)"),
            )
            .arg(
                Arg::new("step-timeout-s")
                    .long("step-timeout-s")
                    .value_name("SECONDS")
                    .value_parser(clap::value_parser!(u64))
                    .help(
                        "Give up, keeping the VM here, when the new baton moves no byte for \
                         this long at any step (default 60)",
                    ),
            ),
    )
    .subcommand(
        Command::new("create")
            .about("Create a VM from a JSON VmConfig (PUT vm.create)")
            .arg(
                Arg::new("config")
                    .value_name("FILE|-")
                    .required(true)
                    .help("JSON VM configuration; - reads standard input"),
            ),
    )
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("Cannot read the VM configuration {0}")]
    ReadConfig(String, #[source] std::io::Error),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("Invalid network card options")]
    Net(#[source] api::option_parser::OptionError),
    #[error("Invalid {0} options")]
    Options(&'static str, #[source] api::option_parser::OptionError),
    #[error("Descriptor {0} is not open in baton-remote (pass it when starting baton-remote)")]
    BadFd(i32),
    #[error("Cannot name the binary {0} by an absolute path")]
    Binary(PathBuf, #[source] std::io::Error),
}

fn read_config(arg: &str) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    let result = if arg == "-" {
        std::io::stdin().read_to_end(&mut body).map(|_| ())
    } else {
        std::fs::read(arg).map(|b| body = b)
    };
    result.map_err(|e| Error::ReadConfig(arg.to_string(), e))?;
    Ok(body)
}

fn call(m: &ArgMatches) -> Result<Response, Error> {
    let socket = PathBuf::from(m.get_one::<String>("api-socket").expect("required"));
    let (name, sub) = m.subcommand().expect("subcommand required");
    if name == "add-net" {
        let mut net =
            api::NetConfig::from_option_string(sub.get_one::<String>("net").expect("required"))
                .map_err(Error::Net)?;
        let mut fds = net.fds.take().unwrap_or_default();
        fds.extend(sub.get_many::<i32>("fd").into_iter().flatten().copied());
        check_fds(&fds)?;
        let body = serde_json::to_vec(&net).expect("a NetConfig serialises");
        return Ok(client::request_with_fds(
            &socket,
            "PUT",
            "vm.add-net",
            Some(&body),
            &fds,
        )?);
    }
    if let Some((name, endpoint, _, _, parse)) = WITH_OPTIONS.iter().find(|c| c.0 == name) {
        let options = sub.get_one::<String>("options").expect("required");
        let (body, fds) = parse(options).map_err(|e| Error::Options(name, e))?;
        check_fds(&fds)?;
        let body = serde_json::to_vec(&body).expect("JSON values serialise");
        if *endpoint == "vm.send-migration" {
            return long_request(&socket, endpoint, body);
        }
        return Ok(client::request_with_fds(
            &socket,
            "PUT",
            endpoint,
            Some(&body),
            &fds,
        )?);
    }
    if name == "live-upgrade" {
        let given = PathBuf::from(sub.get_one::<String>("binary").expect("required"));
        let binary = std::path::absolute(&given).map_err(|e| Error::Binary(given, e))?;
        let mut cfg = api::LiveUpgradeConfig {
            binary,
            step_timeout_s: api::migration_config::DEFAULT_STEP_TIMEOUT_S,
        };
        if let Some(s) = sub.get_one::<u64>("step-timeout-s") {
            cfg.step_timeout_s = *s;
        }
        let body = serde_json::to_vec(&cfg).expect("the request serialises");
        return long_request(&socket, "vmm.live-upgrade", body);
    }
    if name == "create" {
        let body = read_config(sub.get_one::<String>("config").expect("required"))?;
        return Ok(client::request(&socket, "PUT", "vm.create", Some(&body))?);
    }
    let (_, method, endpoint, _) = SIMPLE
        .iter()
        .find(|(n, ..)| *n == name)
        .expect("clap only accepts known commands");
    Ok(client::request(&socket, method, endpoint, None)?)
}

/// Refuses descriptor numbers that are not open in this process.
fn check_fds(fds: &[i32]) -> Result<(), Error> {
    match fds.iter().find(|fd| !api::fds::is_open(**fd)) {
        Some(fd) => Err(Error::BadFd(*fd)),
        None => Ok(()),
    }
}

/// How often `send-migration` asks for progress.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

/// PUTs `body` to `endpoint` (a migration or live upgrade) on a thread of its own; until
/// the answer comes, polls vm.info on other connections and shows the migration's progress
/// on standard error, so that standard output still carries only the answer.
fn long_request(socket: &Path, endpoint: &'static str, body: Vec<u8>) -> Result<Response, Error> {
    let (tx, rx) = mpsc::channel();
    let to = socket.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(client::request(&to, "PUT", endpoint, Some(&body)));
    });
    let mut shown = ProgressDisplay::new(std::io::stderr().is_terminal());
    loop {
        match rx.recv_timeout(PROGRESS_POLL) {
            Ok(answer) => {
                shown.finish();
                return Ok(answer?);
            }
            Err(RecvTimeoutError::Timeout) => shown.show(poll_progress(socket)),
            Err(RecvTimeoutError::Disconnected) => {
                unreachable!("the request thread sends its answer before it ends")
            }
        }
    }
}

/// The progress line for the migration vm.info reports, if one runs. Errors are ignored:
/// the answer to the migration request says what went wrong.
fn poll_progress(socket: &Path) -> Option<String> {
    let r = client::request(socket, "GET", "vm.info", None).ok()?;
    let info: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
    progress_line(info.get("migration")?)
}

/// `n` bytes in MiB, or KiB under one MiB.
fn size(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n.div_ceil(1 << 10))
    }
}

/// A line for vm.info's `migration` object: `migration: pre-copy pass 3, 512 MiB sent, 12 MiB
/// in this pass`.
fn progress_line(m: &serde_json::Value) -> Option<String> {
    let phase = m.get("phase")?.as_str().filter(|p| !p.is_empty())?;
    let number = |key: &str| m.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let sent = number("bytes_sent");
    Some(match phase {
        // The first pass is being worked out.
        "pre-copy" if number("iteration") == 0 => "migration: pre-copy starting".to_string(),
        "pre-copy" => format!(
            "migration: pre-copy pass {}, {} sent, {} in this pass",
            number("iteration"),
            size(sent),
            size(number("bytes_in_pass"))
        ),
        _ if sent == 0 => format!("migration: {phase}"),
        _ => format!("migration: {phase}, {} sent", size(sent)),
    })
}

/// Prints progress lines when they change: on a terminal over one another, elsewhere one per
/// line.
struct ProgressDisplay {
    terminal: bool,
    last: Option<String>,
}

impl ProgressDisplay {
    fn new(terminal: bool) -> Self {
        ProgressDisplay {
            terminal,
            last: None,
        }
    }

    fn show(&mut self, line: Option<String>) {
        let Some(line) = line else { return };
        if self.last.as_ref() == Some(&line) {
            return;
        }
        if self.terminal {
            // Back to the start of the line and clear it.
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("{line}");
        }
        self.last = Some(line);
    }

    /// Ends a line left open on a terminal.
    fn finish(&self) {
        if self.terminal && self.last.is_some() {
            eprintln!();
        }
    }
}

fn print_chain(chain: &[String]) {
    let mut lines = chain.iter();
    if let Some(first) = lines.next() {
        eprintln!("baton-remote: error: {first}");
    }
    for cause in lines {
        eprintln!("  caused by: {cause}");
    }
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    match call(&matches) {
        Ok(r) if (200..300).contains(&r.status) => {
            if !r.body.is_empty() {
                match serde_json::from_slice::<serde_json::Value>(&r.body) {
                    Ok(v) => println!(
                        "{}",
                        serde_json::to_string_pretty(&v).expect("JSON values print")
                    ),
                    Err(_) => println!("{}", String::from_utf8_lossy(&r.body)),
                }
            }
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let chain = r.error_chain().unwrap_or_else(|| {
                vec![format!(
                    "HTTP {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )]
            });
            print_chain(&chain);
            ExitCode::FAILURE
        }
        Err(e) => {
            print_chain(&api::request::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_a_command_with_help() {
        let cmd = command();
        cmd.clone().debug_assert();
        for (_, method, endpoint, _) in SIMPLE {
            assert!(
                api::routes::ROUTES
                    .iter()
                    .any(|(n, m, _)| n == endpoint && m == method),
                "{method} {endpoint} is not a route"
            );
        }
        for (name, _, _) in api::routes::ROUTES {
            let covered = ["vm.create", "vm.add-net", "vmm.live-upgrade"].contains(name)
                || SIMPLE.iter().any(|(_, _, e, _)| e == name)
                || WITH_OPTIONS.iter().any(|c| c.1 == *name);
            assert!(covered, "no baton-remote command for {name}");
        }
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no help", sub.get_name());
        }
    }

    #[test]
    fn progress_lines() {
        let line = |v: serde_json::Value| progress_line(&v);
        assert_eq!(
            line(serde_json::json!({
                "phase": "pre-copy", "iteration": 3,
                "bytes_sent": 512u64 << 20, "bytes_in_pass": (12u64 << 20) + 5,
            }))
            .as_deref(),
            Some("migration: pre-copy pass 3, 512 MiB sent, 12 MiB in this pass")
        );
        assert_eq!(
            line(serde_json::json!({
                "phase": "pre-copy", "iteration": 9, "bytes_sent": 1u64 << 30, "bytes_in_pass": 4097,
            }))
            .as_deref(),
            Some("migration: pre-copy pass 9, 1024 MiB sent, 5 KiB in this pass")
        );
        assert_eq!(
            line(serde_json::json!({
                "phase": "downtime", "iteration": 4, "bytes_sent": 300u64 << 20, "bytes_in_pass": 0,
            }))
            .as_deref(),
            Some("migration: downtime, 300 MiB sent")
        );
        // local=on copies no memory.
        assert_eq!(
            line(serde_json::json!({
                "phase": "memory", "iteration": 0, "bytes_sent": 0, "bytes_in_pass": 0,
            }))
            .as_deref(),
            Some("migration: memory")
        );
        assert_eq!(
            line(serde_json::json!({
                "phase": "pre-copy", "iteration": 0, "bytes_sent": 0, "bytes_in_pass": 0,
            }))
            .as_deref(),
            Some("migration: pre-copy starting")
        );
        // Before the migration thread names its phase, and for answers of another shape.
        assert_eq!(
            line(serde_json::json!({"phase": "", "bytes_sent": 0})),
            None
        );
        assert_eq!(line(serde_json::json!({"iteration": 1})), None);
    }
}
