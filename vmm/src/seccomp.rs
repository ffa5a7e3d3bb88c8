//! seccomp filters, one per thread role, built with seccompiler (`--seccomp true|false|log`).
//!
//! [`install`] compiles every role's filter, so a bad list fails at start-up, and loads the
//! VMM's on the main thread before anything else runs; every thread baton starts then calls
//! [`enter`] with its role first thing (the API server and device workers through the hooks
//! `api::server::on_thread_start` and `devices::virtio::on_worker_start`). A thread inherits
//! the filter of the thread that started it and adds its own, and the kernel applies both:
//! a role must therefore let through what the threads it starts do ([`Role`]'s `starts`).
//! The VMM role (the main thread, and the migration-receive thread that builds a VM) allows
//! what any role does; the others allow only what their role needs, so a compromised vCPU,
//! device or API thread cannot open files, execute programs or change credentials.
//!
//! With `true` a forbidden system call raises SIGSYS, whose handler names the thread's role
//! and the call's number on standard error and ends baton with status 159 (128 + SIGSYS),
//! so that a missing entry shows up in any test as a failure. With `log` the kernel logs the
//! call and lets it through (to find what a new code path needs), with `false` nothing is
//! filtered. `docs/security.md` lists what each role may do, and why.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filter.
    Off,
    /// Forbidden calls end baton, naming the call.
    Trap,
    /// Forbidden calls are logged by the kernel and allowed.
    Log,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(Mode::Trap),
            "false" => Ok(Mode::Off),
            "log" => Ok(Mode::Log),
            other => Err(format!("'{other}': give true, false or log")),
        }
    }
}

/// A thread's role: what it may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main thread (control loop), and the migration-receive thread, which builds a VM.
    Vmm,
    /// The `http-server` thread.
    Api,
    /// A `vcpuN` thread; it also starts device workers when the driver activates a device.
    Vcpu,
    /// A device worker (virtio-net queue pair, virtio-blk, virtio-rng).
    Device,
    /// The `migration-send` thread.
    MigrationSend,
    /// The serial console's threads (stdin reader, socket listener and clients).
    Serial,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::Vmm,
        Role::Api,
        Role::Vcpu,
        Role::Device,
        Role::MigrationSend,
        Role::Serial,
    ];

    /// The role's name, as the SIGSYS message and docs/security.md give it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Api => "api",
            Role::Vcpu => "vcpu",
            Role::Device => "device",
            Role::MigrationSend => "migration-send",
            Role::Serial => "serial",
        }
    }

    /// The system calls the role may make, by number, each with the rules of its
    /// arguments (none: any arguments).
    fn allowed(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        // A thread keeps the filter of the thread that started it: what the roles it starts
        // do, it must let through.
        let mut lists = vec![COMMON, self.own()];
        lists.extend(self.starts().iter().map(|r| r.own()));
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut unconditional = std::collections::BTreeSet::new();
        for allow in lists.into_iter().flatten() {
            let (nr, more) = match *allow {
                Allow::Call(nr) => (nr, Vec::new()),
                Allow::Prctl => (
                    libc::SYS_prctl,
                    [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS]
                        .map(|option| rule(0, SeccompCmpOp::Eq, option as u64))
                        .to_vec(),
                ),
                Allow::Ioctls(requests) => (
                    libc::SYS_ioctl,
                    requests
                        .iter()
                        .map(|&r| rule(1, SeccompCmpOp::Eq, r))
                        .collect(),
                ),
                // KVM's requests: type 0xAE, bits 8 to 15 of the number.
                Allow::KvmIoctls => (
                    libc::SYS_ioctl,
                    vec![rule(
                        1,
                        SeccompCmpOp::MaskedEq(0xff00),
                        u64::from(KVMIO) << 8,
                    )],
                ),
            };
            if more.is_empty() {
                unconditional.insert(nr);
            }
            rules.entry(nr).or_default().extend(more);
        }
        for nr in unconditional {
            // Allowed whatever the arguments: conditions from other lists would narrow it.
            rules.insert(nr, Vec::new());
        }
        rules
    }

    /// The system calls the role may make, by number.
    pub fn calls(self) -> Vec<i64> {
        self.allowed().into_keys().collect()
    }

    /// The roles of the threads this role's threads start.
    fn starts(self) -> &'static [Role] {
        match self {
            // Every other role, the migration-receive thread building a VM included.
            Role::Vmm => &Role::ALL,
            // A driver activating its device; a failed migration resuming the VM.
            Role::Vcpu | Role::MigrationSend => &[Role::Device],
            Role::Api | Role::Device | Role::Serial => &[],
        }
    }

    fn own(self) -> &'static [Allow] {
        match self {
            Role::Vmm => VMM,
            Role::Api => API,
            Role::Vcpu => VCPU,
            Role::Device => DEVICE,
            Role::MigrationSend => MIGRATION_SEND,
            Role::Serial => SERIAL,
        }
    }
}

/// The ioctl type of KVM's requests (`linux/kvm.h`).
const KVMIO: u8 = 0xAE;

/// A rule: argument `index` (as a 32-bit value) compares with `value` by `op`.
fn rule(index: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
        .expect("argument indices are below 6");
    SeccompRule::new(vec![condition]).expect("one condition")
}

/// Errors building or loading a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused a list.
    #[error("Cannot build the seccomp filter of the {0} threads")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("Cannot load the seccomp filter of the {0} threads")]
    Load(&'static str, #[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// A system call a role may make: always, or only with one of these first arguments
/// (`prctl`'s option, `ioctl`'s request is the second: see [`Allow::Ioctls`]).
#[derive(Clone, Copy, Debug)]
enum Allow {
    /// Whatever its arguments.
    Call(i64),
    /// `prctl` for naming the thread and for NO_NEW_PRIVS (which loading a filter sets).
    Prctl,
    /// `ioctl` with one of these requests.
    Ioctls(&'static [u64]),
    /// `ioctl` with any of KVM's requests.
    KvmIoctls,
}

use libc::{
    SYS_accept4, SYS_bind, SYS_brk, SYS_chmod, SYS_clock_gettime, SYS_clock_nanosleep, SYS_clone,
    SYS_clone3, SYS_close, SYS_connect, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait,
    SYS_epoll_wait, SYS_eventfd2, SYS_exit, SYS_exit_group, SYS_fallocate, SYS_fcntl,
    SYS_fdatasync, SYS_flock, SYS_fstat, SYS_fsync, SYS_ftruncate, SYS_futex, SYS_getdents64,
    SYS_getpid, SYS_getrandom, SYS_getsockname, SYS_getsockopt, SYS_gettid, SYS_ioctl, SYS_listen,
    SYS_lseek, SYS_madvise, SYS_memfd_create, SYS_mkdir, SYS_mkdirat, SYS_mmap, SYS_mprotect,
    SYS_mremap, SYS_munmap, SYS_nanosleep, SYS_newfstatat, SYS_openat, SYS_pidfd_send_signal,
    SYS_poll, SYS_ppoll, SYS_pread64, SYS_preadv, SYS_prlimit64, SYS_pwrite64, SYS_pwritev,
    SYS_read, SYS_readv, SYS_recvfrom, SYS_recvmsg, SYS_rename, SYS_renameat, SYS_rseq,
    SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sched_getaffinity, SYS_sched_yield,
    SYS_seccomp, SYS_sendmsg, SYS_sendto, SYS_set_robust_list, SYS_setsockopt, SYS_shutdown,
    SYS_sigaltstack, SYS_socket, SYS_socketpair, SYS_statx, SYS_tgkill, SYS_umask, SYS_unlink,
    SYS_unlinkat, SYS_write, SYS_writev,
};
use Allow::Call;

/// The TAP requests a device worker makes: the control queue attaching or detaching queue
/// pairs (TUNSETQUEUE) and setting offloads (TUNSETOFFLOAD).
const TAP_IOCTLS: &[u64] = &[libc::TUNSETQUEUE, libc::TUNSETOFFLOAD];

/// What every thread does: memory, locks, its start and end, signals, the clock, eventfds
/// and epoll, logging to standard error, and loading its own filter.
const COMMON: &[Allow] = &[
    Call(SYS_brk),
    Call(SYS_mmap),
    Call(SYS_munmap),
    Call(SYS_mremap),
    Call(SYS_mprotect),
    Call(SYS_madvise),
    Call(SYS_futex),
    Call(SYS_sched_yield),
    Call(SYS_sched_getaffinity),
    Call(SYS_exit),
    Call(SYS_exit_group),
    Call(SYS_rseq),
    Call(SYS_set_robust_list),
    Call(SYS_rt_sigreturn),
    Call(SYS_rt_sigprocmask),
    Call(SYS_sigaltstack),
    Call(SYS_clock_gettime),
    Call(SYS_clock_nanosleep),
    Call(SYS_nanosleep),
    Call(SYS_gettid),
    Call(SYS_getrandom),
    Call(SYS_read),
    Call(SYS_write),
    Call(SYS_writev),
    Call(SYS_close),
    Call(SYS_fcntl),
    Call(SYS_eventfd2),
    Call(SYS_epoll_create1),
    Call(SYS_epoll_ctl),
    Call(SYS_epoll_wait),
    Call(SYS_epoll_pwait),
    Call(SYS_poll),
    Call(SYS_ppoll),
    Call(SYS_seccomp),
    Allow::Prctl,
];

/// The VMM: KVM, memory, backends, sockets, snapshots, signals, threads; and whatever the
/// threads it starts do ([`Role::allowed`] adds those).
const VMM: &[Allow] = &[
    Call(SYS_clone),
    Call(SYS_clone3),
    Call(SYS_ioctl),
    Call(SYS_openat),
    Call(SYS_newfstatat),
    Call(SYS_fstat),
    Call(SYS_statx),
    Call(SYS_lseek),
    Call(SYS_pread64),
    Call(SYS_pwrite64),
    Call(SYS_readv),
    Call(SYS_preadv),
    Call(SYS_pwritev),
    Call(SYS_fsync),
    Call(SYS_fdatasync),
    Call(SYS_ftruncate),
    Call(SYS_fallocate),
    Call(SYS_memfd_create),
    Call(SYS_mkdir),
    Call(SYS_mkdirat),
    Call(SYS_rename),
    Call(SYS_renameat),
    Call(SYS_unlink),
    Call(SYS_unlinkat),
    Call(SYS_getdents64),
    Call(SYS_flock),
    Call(SYS_chmod),
    Call(SYS_umask),
    Call(SYS_socket),
    Call(SYS_bind),
    Call(SYS_listen),
    Call(SYS_accept4),
    Call(SYS_connect),
    Call(SYS_getsockopt),
    Call(SYS_setsockopt),
    Call(SYS_getsockname),
    Call(SYS_sendmsg),
    Call(SYS_recvmsg),
    Call(SYS_sendto),
    Call(SYS_recvfrom),
    Call(SYS_shutdown),
    Call(SYS_rt_sigaction),
    Call(SYS_tgkill),
    Call(SYS_getpid),
    Call(SYS_prlimit64),
];

/// The API server: its socket's connections (descriptors come with recvmsg), and answers.
const API: &[Allow] = &[
    Call(SYS_accept4),
    Call(SYS_recvmsg),
    Call(SYS_recvfrom),
    Call(SYS_sendto),
    Call(SYS_sendmsg),
];

/// A vCPU: KVM_RUN, its own state, and the exits it serves (ioeventfds, irqfds and MSI
/// routes as the driver moves BARs and programs MSI-X: KVM's requests only). A driver
/// activating its device starts the device's workers here (a thread, an epoll set, TAP
/// offloads and queue attachment, the MTU asked on the card's control socket); the serial
/// port's output goes to socket clients with send.
const VCPU: &[Allow] = &[
    Allow::KvmIoctls,
    Allow::Ioctls(&[libc::SIOCGIFMTU]),
    Call(SYS_clone),
    Call(SYS_clone3),
    Call(SYS_sendto),
    Call(SYS_tgkill),
];

/// A device worker: its queues' eventfds, the TAP or disk image, the host's entropy, and
/// the control queue's TAP requests.
const DEVICE: &[Allow] = &[
    Call(SYS_readv),
    Call(SYS_preadv),
    Call(SYS_pwritev),
    Call(SYS_pread64),
    Call(SYS_pwrite64),
    Call(SYS_fsync),
    Call(SYS_fdatasync),
    Allow::Ioctls(TAP_IOCTLS),
];

/// The migration source: the channel (and its descriptors), the dirty log and memory
/// regions (KVM), the memory's extents (pagemap, SEEK_DATA), pausing and resuming the VM
/// (signals to vCPUs; a resume after a failure restarts device workers).
const MIGRATION_SEND: &[Allow] = &[
    Call(SYS_ioctl),
    Call(SYS_socket),
    Call(SYS_connect),
    Call(SYS_sendmsg),
    Call(SYS_recvmsg),
    Call(SYS_sendto),
    Call(SYS_recvfrom),
    Call(SYS_setsockopt),
    Call(SYS_getsockopt),
    Call(SYS_openat),
    Call(SYS_pread64),
    Call(SYS_lseek),
    Call(SYS_fstat),
    Call(SYS_newfstatat),
    Call(SYS_statx),
    Call(SYS_tgkill),
    Call(SYS_getpid),
    Call(SYS_clone),
    Call(SYS_clone3),
    // A live upgrade: the socket pair to the new baton, and ending it if it hangs.
    Call(SYS_socketpair),
    Call(SYS_pidfd_send_signal),
];

/// The serial console: standard input, and its socket (bound again once a migration's
/// source lets go of the path) with its clients, served by one thread.
const SERIAL: &[Allow] = &[
    Call(SYS_socket),
    // Probing a socket file left for seconds: is its owner gone?
    Call(SYS_connect),
    Call(SYS_umask),
    Call(SYS_bind),
    Call(SYS_listen),
    Call(SYS_accept4),
    Call(SYS_statx),
    Call(SYS_newfstatat),
    Call(SYS_unlink),
    Call(SYS_recvfrom),
    Call(SYS_sendto),
    Call(SYS_setsockopt),
    Call(SYS_shutdown),
];

/// The compiled filters and the mode, once [`install`] ran.
static FILTERS: OnceLock<BTreeMap<Role, BpfProgram>> = OnceLock::new();

thread_local! {
    /// This thread's role, for the SIGSYS message (a plain index: the handler reads it
    /// without allocating or locking).
    static ROLE: std::cell::Cell<u8> = const { std::cell::Cell::new(u8::MAX) };
}

fn compile(role: Role, mode: Mode) -> Result<BpfProgram, Error> {
    let rules = role.allowed();
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| Error::Build(role.name(), e))?;
    BpfProgram::try_from(filter).map_err(|e| Error::Build(role.name(), e))
}

/// Compiles every role's filter and loads the VMM's on the calling (main) thread, which
/// sets NO_NEW_PRIVS first. Nothing with [`Mode::Off`].
pub fn install(mode: Mode) -> Result<(), Error> {
    if mode == Mode::Off {
        return Ok(());
    }
    // glibc sizes its malloc arenas from /sys/devices/system/cpu/online when a thread first
    // needs one more than eight: a file opened on whatever thread that happens, which its
    // filter may forbid. Setting the limit glibc would choose (8 per CPU) skips the read.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(1024) as libc::c_int) };
    warm_up_malloc();
    let mut filters = BTreeMap::new();
    for role in Role::ALL {
        filters.insert(role, compile(role, mode)?);
    }
    install_sigsys_handler().map_err(Error::Handler)?;
    let filters = FILTERS.get_or_init(|| filters);
    apply(Role::Vmm, filters)?;
    api::server::on_thread_start(|| enter(Role::Api));
    devices::virtio::on_worker_start(|| enter(Role::Device));
    Ok(())
}

/// glibc reads /proc/sys/vm/overcommit_memory once per process, the first time a thread's
/// malloc heap shrinks, on whichever thread that is (the API server's, after a flood of
/// connections): a file its filter forbids. A thread with an arena of its own fills and
/// frees enough of it here, before any filter, so that read is done.
fn warm_up_malloc() {
    let warm = std::thread::Builder::new()
        .name("malloc-warm-up".into())
        .spawn(|| {
            // Below the mmap threshold (128 KiB), so they come from the thread's heap.
            let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 96 << 10]).collect();
            std::hint::black_box(&blocks);
        });
    if let Ok(thread) = warm {
        let _ = thread.join();
    }
}

fn apply(role: Role, filters: &BTreeMap<Role, BpfProgram>) -> Result<(), Error> {
    ROLE.with(|r| r.set(role as u8));
    let program = filters.get(&role).expect("every role is compiled");
    seccompiler::apply_filter(program).map_err(|e| Error::Load(role.name(), e))
}

/// Loads `role`'s filter on the calling thread, if [`install`] ran; first thing in every
/// thread baton starts. A thread that cannot be confined ends baton.
pub fn enter(role: Role) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    if let Err(e) = apply(role, filters) {
        log::error!("{}", api::request::error_chain(&e).join(": "));
        std::process::abort();
    }
    if role == Role::Vcpu && std::env::var_os(SELFTEST).is_some_and(|v| v == "vcpu-ioctl") {
        // For tests/seccomp.rs: TCGETS is no KVM request.
        let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: TCGETS writes one termios into memory that holds one.
        let rc = unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
        log::warn!("seccomp self-test: a vCPU's TCGETS returned {rc}");
    }
}

/// The environment variable that has baton make a call its filters forbid, for the tests:
/// `1` the main thread calls getppid; `vcpu-ioctl` a vCPU makes a terminal ioctl.
pub const SELFTEST: &str = "BATON_SECCOMP_SELFTEST";

/// Exit status after a forbidden call: what a shell shows for a process SIGSYS killed.
pub const FORBIDDEN_EXIT: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's `_sigsys` member: the call's address (8 bytes) at offset 16, then its
    // number (int) at 24.
    // SAFETY: the kernel passes a full siginfo_t for SIGSYS; offset 24 is inside it.
    let nr = unsafe {
        info.cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let role = ROLE.with(|r| r.get());
    // A thread that has not entered its role yet runs under its parent's filter.
    let name = Role::ALL
        .get(usize::from(role))
        .map_or("starting", |r| r.name());
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut push = |part: &[u8]| {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    };
    push(b"baton: seccomp: a ");
    push(name.as_bytes());
    push(b" thread made a forbidden system call (number ");
    let mut digits = [0u8; 10];
    let n = write_decimal(&mut digits, nr.unsigned_abs());
    push(&digits[..n]);
    push(b"); baton stops\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed in every filter.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(FORBIDDEN_EXIT);
    }
}

/// Writes `n` in decimal at the start of `out`; returns the bytes written.
fn write_decimal(out: &mut [u8], mut n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    len
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; the handler and flags are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is fully initialised; the handler only writes and exits.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_lets_through_what_the_threads_it_starts_do() {
        for role in Role::ALL {
            compile(role, Mode::Trap).expect("compiles");
            compile(role, Mode::Log).expect("compiles");
            let parent = role.calls();
            for child in role.starts() {
                for n in child.calls() {
                    assert!(
                        parent.contains(&n),
                        "{} lacks {n} of {}",
                        role.name(),
                        child.name()
                    );
                }
            }
            let vmm = Role::Vmm.calls();
            for n in role.calls() {
                assert!(
                    vmm.contains(&n),
                    "{}: {n} not allowed to the VMM",
                    role.name()
                );
            }
        }
    }

    #[test]
    fn leaf_roles_cannot_open_files_or_start_processes() {
        use libc::{SYS_execve, SYS_ptrace, SYS_setuid};
        for role in [Role::Api, Role::Device] {
            let allowed = role.calls();
            for n in [SYS_openat, SYS_execve, SYS_clone3, SYS_socket, SYS_ptrace] {
                assert!(!allowed.contains(&n), "{}: {n}", role.name());
            }
        }
        let vcpu = Role::Vcpu.calls();
        for n in [SYS_openat, SYS_execve, SYS_socket, SYS_connect, SYS_ptrace] {
            assert!(!vcpu.contains(&n), "vcpu: {n}");
        }
        for role in Role::ALL {
            for n in [SYS_execve, SYS_ptrace, SYS_setuid, libc::SYS_getppid] {
                assert!(!role.calls().contains(&n), "{}: {n}", role.name());
            }
        }
        // A device worker's ioctls are the TAP's two, and prctl only names or confines.
        let device = Role::Device.allowed();
        assert_eq!(device[&SYS_ioctl].len(), TAP_IOCTLS.len());
        assert_eq!(device[&libc::SYS_prctl].len(), 2);
        assert!(
            Role::Vmm.allowed()[&SYS_ioctl].is_empty(),
            "the VMM's ioctls are any"
        );
        // A vCPU's: KVM's, the MTU, and its device workers' two.
        assert_eq!(
            Role::Vcpu.allowed()[&SYS_ioctl].len(),
            1 + 1 + TAP_IOCTLS.len()
        );
    }

    #[test]
    fn modes_parse_as_cloud_hypervisor_spells_them() {
        assert_eq!("true".parse(), Ok(Mode::Trap));
        assert_eq!("false".parse(), Ok(Mode::Off));
        assert_eq!("log".parse(), Ok(Mode::Log));
        assert!("yes".parse::<Mode>().is_err());
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut out = [0u8; 10];
        let n = write_decimal(&mut out, 0);
        assert_eq!(&out[..n], b"0");
        let n = write_decimal(&mut out, 4_294_967_295);
        assert_eq!(&out[..n], b"4294967295");
    }
}
