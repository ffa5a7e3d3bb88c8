//! `baton`: boot a VM from command-line options.

use std::process::ExitCode;

use std::os::fd::FromRawFd;
use std::path::Path;

use api::option_parser::{parse_int, OptionError, OptionParser};
use api::server::ApiSocket;
use api::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig, RngConfig,
    VmConfig,
};
use clap::{Arg, ArgAction, ArgMatches, Command};

fn command() -> Command {
    Command::new("baton")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "A virtual machine monitor for Linux/KVM.\n\n\
             Boots a kernel (an ELF with a PVH note, an ELF vmlinux, or a bzImage) with ACPI, \
             an 8250 serial port (ttyS0) and a PCI host bridge. The guest powering off ends \
             baton with status 0; a guest reboot restarts it in the same process; SIGTERM or \
             SIGINT shuts the VM down. With --api-socket, baton also serves its REST API \
             (Cloud Hypervisor-compatible paths under /api/v1/), with or without a VM given \
             on the command line.",
        )
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .value_name("OPTIONS")
                .help(
                    "Serve the REST API: \"path=<socket path>\" (created owner-only) or \
                     \"fd=<n>\" (an inherited listening socket, with \"lock_fd=<n>\" the \
                     lock on its path a live upgrade passes on), and \"max_connections=<n>\" \
                     (served at once, 1 to 512, default 256; at the limit the connection idle \
                     longest is closed). Without VM options baton waits for vm.create",
                ),
        )
        .arg(
            Arg::new("kernel")
                .long("kernel")
                .value_name("PATH")
                .help("Kernel to boot: ELF with PVH note, ELF vmlinux, or bzImage"),
        )
        .arg(
            Arg::new("initramfs")
                .long("initramfs")
                .value_name("PATH")
                .help("Initramfs loaded next to the kernel"),
        )
        .arg(
            Arg::new("cmdline")
                .long("cmdline")
                .value_name("STRING")
                .help("Kernel command line"),
        )
        .arg(
            Arg::new("cpus")
                .long("cpus")
                .value_name("OPTIONS")
                .help(CpusConfig::SYNTAX),
        )
        .arg(
            Arg::new("memory")
                .long("memory")
                .value_name("OPTIONS")
                .help(MemoryConfig::SYNTAX),
        )
        .arg(
            Arg::new("serial")
                .long("serial")
                .value_name("OPTIONS")
                .help(ConsoleConfig::SERIAL_SYNTAX),
        )
        .arg(
            Arg::new("console")
                .long("console")
                .value_name("OPTIONS")
                .help("virtio console: only \"off\" for now"),
        )
        .arg(
            Arg::new("net")
                .long("net")
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .help(NetConfig::SYNTAX),
        )
        .arg(
            Arg::new("disk")
                .long("disk")
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .help(DiskConfig::SYNTAX),
        )
        .arg(
            Arg::new("rng")
                .long("rng")
                .value_name("OPTIONS")
                .help(RngConfig::SYNTAX),
        )
        .arg(
            Arg::new("restore")
                .long("restore")
                .value_name("OPTIONS")
                .conflicts_with_all(VM_OPTIONS)
                .help(api::RestoreConfig::SYNTAX),
        )
        .arg(
            Arg::new("upgrade-from")
                .long("upgrade-from")
                .value_name("fd=N,step_timeout_s=N")
                .conflicts_with_all(VM_OPTIONS)
                .conflicts_with("restore")
                .requires("api-socket")
                .help(
                    "Started by vmm.live-upgrade, not by hand: take the VM over from the old \
                     baton, which sends it over inherited socket N, and serve the API once \
                     it runs here",
                ),
        )
        .arg(
            Arg::new("seccomp")
                .long("seccomp")
                .value_name("true|false|log")
                .default_value("true")
                .value_parser(["true", "false", "log"])
                .help(
                    "System call filtering per thread role (docs/security.md): \"true\" ends \
                     baton, naming the call, when a thread makes a call its role does not \
                     need; \"log\" lets it through and has the kernel log it; \"false\" \
                     filters nothing",
                ),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .long("verbose")
                .action(ArgAction::Count)
                .help("More log output (repeat for more)"),
        )
}

fn option<T>(
    m: &ArgMatches,
    name: &'static str,
    parse: impl FnOnce(&str) -> Result<T, api::option_parser::OptionError>,
) -> Result<Option<T>, api::ConfigError> {
    m.get_one::<String>(name)
        .map(|s| parse(s))
        .transpose()
        .map_err(|source| api::ConfigError::Option {
            option: name,
            source,
        })
}

fn options<T>(
    m: &ArgMatches,
    name: &'static str,
    parse: impl Fn(&str) -> Result<T, api::option_parser::OptionError>,
) -> Result<Vec<T>, api::ConfigError> {
    m.get_many::<String>(name)
        .into_iter()
        .flatten()
        .map(|s| parse(s))
        .collect::<Result<Vec<T>, _>>()
        .map_err(|source| api::ConfigError::Option {
            option: name,
            source,
        })
}

fn config_from(m: &ArgMatches) -> Result<VmConfig, api::ConfigError> {
    Ok(VmConfig {
        net: options(m, "net", NetConfig::from_option_string)?,
        disks: options(m, "disk", DiskConfig::from_option_string)?,
        rng: option(m, "rng", RngConfig::from_option_string)?.flatten(),
        cpus: option(m, "cpus", CpusConfig::from_option_string)?.unwrap_or_default(),
        memory: option(m, "memory", MemoryConfig::from_option_string)?.unwrap_or_default(),
        payload: PayloadConfig {
            kernel: m.get_one::<String>("kernel").map(Into::into),
            initramfs: m.get_one::<String>("initramfs").map(Into::into),
            cmdline: m.get_one::<String>("cmdline").cloned(),
            ..Default::default()
        },
        serial: option(m, "serial", ConsoleConfig::from_option_string)?.unwrap_or(ConsoleConfig {
            mode: api::ConsoleMode::Tty,
            ..Default::default()
        }),
        console: option(m, "console", ConsoleConfig::from_option_string)?.unwrap_or_default(),
        ..Default::default()
    })
}

/// Prints an error and its causes, outermost first.
fn report(err: &dyn std::error::Error) {
    let chain = api::request::error_chain(err);
    eprintln!("baton: error: {}", chain[0]);
    for cause in &chain[1..] {
        eprintln!("  caused by: {cause}");
    }
}

/// Options that describe a VM: if none is given with --api-socket, baton waits for
/// vm.create.
const VM_OPTIONS: &[&str] = &[
    "kernel",
    "initramfs",
    "cmdline",
    "cpus",
    "memory",
    "serial",
    "console",
    "net",
    "disk",
    "rng",
];

/// The API socket named by `--api-socket`, bound.
fn api_socket(m: &ArgMatches) -> Result<Option<ApiSocket>, vmm::Error> {
    let Some(spec) = m.get_one::<String>("api-socket") else {
        return Ok(None);
    };
    let invalid = vmm::Error::ApiSocketOption;
    let p = OptionParser::parse(
        spec,
        &["path", "fd", "lock_fd", "max_connections"],
        Some("path"),
    )
    .map_err(invalid)?;
    let fd = p.convert("fd", parse_int::<i32>).map_err(invalid)?;
    let lock_fd = p.convert("lock_fd", parse_int::<i32>).map_err(invalid)?;
    if lock_fd.is_some() && fd.is_none() {
        return Err(invalid(OptionError::InvalidValue {
            key: "lock_fd".into(),
            value: spec.clone(),
            reason: "lock_fd goes with fd=N".into(),
        }));
    }
    // Checked before anything is bound.
    let max_connections = p
        .convert("max_connections", parse_int::<usize>)
        .map_err(invalid)?
        .map(api::server::check_max_connections)
        .transpose()
        .map_err(vmm::Error::Api)?;
    match (p.get("path"), fd) {
        (Some(path), None) => ApiSocket::bind(Path::new(path)),
        (None, Some(fd)) => ApiSocket::from_fd(fd),
        _ => {
            return Err(invalid(OptionError::InvalidValue {
                key: "api-socket".into(),
                value: spec.clone(),
                reason: "give exactly one of path=PATH or fd=N".into(),
            }))
        }
    }
    .and_then(|s| match max_connections {
        Some(n) => s.max_connections(n),
        None => Ok(s),
    })
    .and_then(|s| match lock_fd {
        Some(fd) => s.with_lock_fd(fd),
        None => Ok(s),
    })
    .map(Some)
    .map_err(vmm::Error::Api)
}

/// What a live upgrade needs: the launcher, forked here while baton has one thread and no
/// filter (after every inherited descriptor is taken, so that none can be mistaken for its
/// socket), and the options the new baton runs with. Only with an API, which asks for it.
fn upgrade_support(m: &ArgMatches) -> Option<vmm::control::UpgradeSupport> {
    m.get_one::<String>("api-socket")?;
    // SAFETY: baton has started no thread yet (main calls this before vmm::run).
    let launcher = match unsafe { vmm::launcher::Launcher::start() } {
        Ok(l) => l,
        Err(e) => {
            log::warn!("live upgrade unavailable: {e}");
            return None;
        }
    };
    let mut args = vec![
        "--seccomp".to_string(),
        m.get_one::<String>("seccomp")
            .cloned()
            .unwrap_or_else(|| "true".into()),
    ];
    args.extend((0..m.get_count("verbose")).map(|_| "-v".to_string()));
    Some(vmm::control::UpgradeSupport {
        launcher: std::sync::Arc::new(launcher),
        args,
        api: None,
    })
}

/// The socket `--upgrade-from` names, and its step timeout.
fn upgrade_from(spec: &str) -> Result<vmm::Initial, vmm::Error> {
    let invalid = |source| {
        vmm::Error::Config(api::ConfigError::Option {
            option: "upgrade-from",
            source,
        })
    };
    let p = OptionParser::parse(spec, &["fd", "step_timeout_s"], Some("fd")).map_err(invalid)?;
    let fd = p.required("fd").map_err(invalid).and_then(|v| {
        parse_int::<i32>(v).map_err(|reason| {
            invalid(OptionError::InvalidValue {
                key: "fd".into(),
                value: v.into(),
                reason,
            })
        })
    })?;
    let step_timeout_s = p
        .convert("step_timeout_s", parse_int::<u64>)
        .map_err(invalid)?
        .unwrap_or(api::migration_config::DEFAULT_STEP_TIMEOUT_S);
    let socket = inherit("upgrade-from", vec![fd])?.remove(0);
    if !fd_passing::is_unix_socket(std::os::fd::AsFd::as_fd(&socket)) {
        return Err(invalid(OptionError::InvalidValue {
            key: "fd".into(),
            value: fd.to_string(),
            reason: "not a UNIX socket".into(),
        }));
    }
    Ok(vmm::Initial::TakeOver(socket, step_timeout_s))
}

fn run(m: &ArgMatches) -> Result<vmm::Outcome, vmm::Error> {
    let given = |o: &str| m.value_source(o).is_some();
    let wants_vm = VM_OPTIONS.iter().any(|o| given(o)) || !given("api-socket");
    let initial = if let Some(spec) = m.get_one::<String>("upgrade-from") {
        upgrade_from(spec)?
    } else if let Some(spec) = m.get_one::<String>("restore") {
        let mut restore = api::RestoreConfig::from_option_string(spec).map_err(|source| {
            vmm::Error::Config(api::ConfigError::Option {
                option: "restore",
                source,
            })
        })?;
        let fds = inherit("restore", restore.take_fds())?;
        vmm::Initial::Restore(restore, fds)
    } else if wants_vm {
        let mut config = config_from(m).map_err(vmm::Error::Config)?;
        let fds = net_fds(&mut config)?;
        vmm::Initial::Boot(Box::new(config), fds)
    } else {
        vmm::Initial::Wait
    };
    let api = api_socket(m)?;
    let upgrades = upgrade_support(m);
    let mode = m
        .get_one::<String>("seccomp")
        .map_or(Ok(vmm::seccomp::Mode::Trap), |s| s.parse())
        .expect("clap checked the value");
    vmm::seccomp::install(mode).map_err(vmm::Error::Seccomp)?;
    if std::env::var_os(vmm::seccomp::SELFTEST).is_some_and(|v| v == "1") {
        // For tests/seccomp.rs: getppid(2) is in no role's list.
        // SAFETY: getppid takes no arguments and changes nothing.
        let parent = unsafe { libc::syscall(libc::SYS_getppid) };
        log::warn!("seccomp self-test: getppid() returned {parent}");
    }
    vmm::run(initial, api, upgrades)
}

/// Takes ownership of descriptors baton inherited, named on its command line.
fn inherit(option: &'static str, numbers: Vec<i32>) -> Result<api::fds::Fds, vmm::Error> {
    let bad = |fd: i32, reason: &str| {
        vmm::Error::Config(api::ConfigError::Option {
            option,
            source: OptionError::InvalidValue {
                key: "fd".into(),
                value: fd.to_string(),
                reason: reason.into(),
            },
        })
    };
    let mut owned = Vec::with_capacity(numbers.len());
    for (i, &fd) in numbers.iter().enumerate() {
        if fd < 3 {
            return Err(bad(fd, "standard input, output and error cannot be taken"));
        }
        if numbers[..i].contains(&fd) {
            return Err(bad(fd, "named twice"));
        }
        if !api::fds::is_open(fd) {
            return Err(bad(fd, "not an open descriptor of baton"));
        }
        // SAFETY: the descriptor is open, was inherited (nothing in baton has opened
        // anything yet that could own it), and is named only once; baton owns it from here.
        // FD_CLOEXEC keeps it from processes baton starts.
        owned.push(unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            std::os::fd::OwnedFd::from_raw_fd(fd)
        });
    }
    Ok(owned)
}

/// The inherited TAP queues `--net fd=[...]` names, in card order, as vm.create takes them.
fn net_fds(config: &mut VmConfig) -> Result<api::fds::Fds, vmm::Error> {
    let invalid = |reason: String| {
        vmm::Error::Config(api::ConfigError::Option {
            option: "net",
            source: OptionError::InvalidValue {
                key: "fd".into(),
                value: String::new(),
                reason,
            },
        })
    };
    let any = config.net.iter().any(|n| n.fds.is_some());
    let mut numbers = Vec::new();
    for (i, net) in config.net.iter_mut().enumerate() {
        match net.fds.take() {
            Some(fds) => {
                if net.tap.is_some() {
                    return Err(invalid(format!(
                        "card {i}: give either tap= or fd=, not both"
                    )));
                }
                if fds.len() != net.queue_pairs() {
                    return Err(invalid(format!(
                        "card {i}: {} descriptor(s) for {} queue pair(s); give one per pair",
                        fds.len(),
                        net.queue_pairs()
                    )));
                }
                numbers.extend(fds);
            }
            // Cards take passed descriptors in order when they have no TAP name.
            None if any && net.tap.is_none() => {
                return Err(invalid(format!(
                    "card {i} has neither tap= nor fd=: with fd= on any card, name the TAP \
                     of the others"
                )))
            }
            None => {}
        }
    }
    inherit("net", numbers)
}

fn main() -> ExitCode {
    vmm::process::grow_descriptor_table();
    let matches = command().get_matches();
    vmm::logger::init(matches.get_count("verbose"));
    match run(&matches) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_builds_config() {
        let m = command().get_matches_from([
            "baton",
            "--kernel",
            "/k",
            "--cpus",
            "boot=4",
            "--memory",
            "size=5G",
            "--serial",
            "socket=/tmp/s",
        ]);
        let c = config_from(&m).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 4);
        assert_eq!(c.memory.size, 5 << 30);
        assert_eq!(c.serial.mode, api::ConsoleMode::Socket);
    }

    #[test]
    fn bad_option_names_the_option() {
        let m = command().get_matches_from(["baton", "--kernel", "/k", "--memory", "sise=1G"]);
        let err = config_from(&m).unwrap_err();
        assert!(err.to_string().contains("--memory"), "{err}");
    }

    #[test]
    fn clap_definition_is_valid() {
        command().debug_assert();
    }
}
