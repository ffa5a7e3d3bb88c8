//! The launcher: a small process forked from baton at start-up, before any seccomp filter
//! is loaded, that starts the new binary of a live upgrade.
//!
//! A process started by a filtered thread keeps that thread's filter under its own, for
//! good: a baton started from baton's own threads would run every system call through its
//! predecessor's filter too, and one more with each upgrade. The launcher has no filter, so
//! what it starts has none but its own. It does one thing: on a request over its socket (a
//! binary, its arguments and the descriptors to give it as 3, 4, 5 ...) it forks, execs and
//! answers the new process's pid with a pidfd for it, or why it could not run. The pidfd is
//! opened before the child can be reaped, so it never names a recycled pid; baton watches
//! and ends the child through it. The launcher reaps children that ended before each request.
//! It ends with baton (end of file on its socket, or PR_SET_PDEATHSIG), leaving a new baton
//! it started running.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The descriptor number the first descriptor passed to a new process gets.
pub const FIRST_FD: RawFd = 3;
/// Most descriptors one new process is given.
const MAX_FDS: usize = 8;

/// Errors starting a process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The launcher could not be forked.
    #[error("Cannot start the launcher process")]
    Start(#[source] io::Error),
    /// The launcher is gone or did not answer.
    #[error("The launcher process does not answer")]
    Gone(#[source] io::Error),
    /// The launcher could not start the binary.
    #[error("{0}")]
    Launch(String),
}

#[derive(Serialize, Deserialize)]
struct Request {
    binary: PathBuf,
    args: Vec<String>,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Started(u32),
    Failed(String),
}

/// Baton's end of its launcher.
#[derive(Debug)]
pub struct Launcher {
    socket: Mutex<UnixStream>,
}

/// A process the launcher started.
#[derive(Debug)]
pub struct Child {
    /// Its process id.
    pub pid: u32,
    pidfd: OwnedFd,
}

/// How long baton waits for the launcher's answer (an exec takes milliseconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Launcher {
    /// Forks the launcher.
    ///
    /// # Safety
    ///
    /// The process must run one thread: the launcher goes on running ordinary code (it
    /// allocates) in the forked child, where a lock another thread held would stay locked.
    pub unsafe fn start() -> Result<Launcher, Error> {
        let mut pair = [-1 as RawFd; 2];
        // SAFETY: socketpair writes two descriptors into `pair`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(Error::Start(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just made and are owned here only.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        // SAFETY: getpid has no arguments.
        let baton = unsafe { libc::getpid() };
        // SAFETY: the process has one thread (the caller's promise), so the child may run
        // ordinary code.
        match unsafe { libc::fork() } {
            -1 => Err(Error::Start(io::Error::last_os_error())),
            0 => {
                drop(ours);
                launcher_main(theirs, baton)
            }
            _ => {
                drop(theirs);
                let socket = UnixStream::from(ours);
                socket
                    .set_read_timeout(Some(ANSWER_TIMEOUT))
                    .map_err(Error::Start)?;
                Ok(Launcher {
                    socket: Mutex::new(socket),
                })
            }
        }
    }

    /// Starts `binary` with `args`, giving it `fds` as descriptors 3, 4, 5 ... (and baton's
    /// standard input, output and error); nothing else of baton's is open in it.
    pub fn spawn(
        &self,
        binary: &Path,
        args: &[String],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Child, Error> {
        assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
        let request = serde_json::to_vec(&Request {
            binary: binary.to_owned(),
            args: args.to_vec(),
        })
        .expect("requests serialise");
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let socket = self.socket.lock().expect("launcher lock poisoned");
        fd_passing::send(&socket, &request, &raw).map_err(Error::Gone)?;
        let mut buf = vec![0u8; 64 << 10];
        let (n, mut got) = fd_passing::recv(&socket, &mut buf, 1).map_err(Error::Gone)?;
        if n == 0 {
            return Err(Error::Gone(io::ErrorKind::UnexpectedEof.into()));
        }
        match serde_json::from_slice(&buf[..n]) {
            Ok(Answer::Started(pid)) if got.len() == 1 => Ok(Child {
                pid,
                pidfd: got.remove(0),
            }),
            Ok(Answer::Failed(why)) => Err(Error::Launch(why)),
            _ => Err(Error::Gone(io::Error::other(
                "an answer it should not give",
            ))),
        }
    }
}

impl Child {
    /// Waits at most `timeout` for the process to end; true if it has.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, and a count of one.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return true;
            }
            let interrupted =
                r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted;
            if !interrupted && (r < 0 || left.is_zero()) {
                return false;
            }
        }
    }

    /// Kills the process (SIGKILL) and waits at most `timeout` for it to be gone; true if
    /// it is.
    pub fn kill(&self, timeout: Duration) -> bool {
        // SAFETY: pidfd_send_signal on our pidfd, with no siginfo and no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        self.wait_exit(timeout)
    }
}

/// The launcher process: answers requests until baton goes.
fn launcher_main(socket: OwnedFd, baton: libc::pid_t) -> ! {
    // SAFETY: prctl and signal with valid constant arguments; getppid has none.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != baton {
            // Baton ended before the line above took effect.
            libc::_exit(0);
        }
        libc::prctl(libc::PR_SET_NAME, c"baton-launcher".as_ptr());
        // Ctrl-C on baton's terminal is baton's to handle: the launcher ends with it.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    // Nothing of baton's stays open here but standard input, output and error: inherited
    // TAPs, sockets and files belong to baton.
    let socket = keep_only_stdio_and(socket);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Children that ended (a new baton that failed): reaped now that their pidfds are
        // with baton, which may still poll them (a pidfd reports a reaped child as ended).
        // SAFETY: waitpid with a null status pointer only reaps.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let (n, fds) = match fd_passing::recv(&socket, &mut buf, MAX_FDS) {
            Ok((n, fds)) if n > 0 => (n, fds),
            // End of file: baton is gone.
            _ => {
                // SAFETY: _exit ends the process without running baton's destructors.
                unsafe { libc::_exit(0) }
            }
        };
        let (answer, pidfd) = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(request) => match launch(&request, &fds) {
                Ok((pid, pidfd)) => (Answer::Started(pid), Some(pidfd)),
                Err(why) => (Answer::Failed(why), None),
            },
            Err(e) => (Answer::Failed(format!("Bad launcher request: {e}")), None),
        };
        drop(fds);
        let raw: Vec<RawFd> = pidfd.iter().map(|f| f.as_raw_fd()).collect();
        let answer = serde_json::to_vec(&answer).expect("answers serialise");
        if fd_passing::send(&socket, &answer, &raw).is_err() {
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
    }
}

/// The highest descriptor number closed one by one where close_range is missing.
const FALLBACK_FD_LIMIT: RawFd = 4096;

/// Moves `socket` to descriptor 3 and closes every other descriptor above 2.
fn keep_only_stdio_and(socket: OwnedFd) -> UnixStream {
    let fd = socket.as_raw_fd();
    std::mem::forget(socket);
    // SAFETY: dup3 and close on descriptor numbers only; from here descriptor 3 is the one
    // owned by the returned stream, and nothing else in this process uses the others.
    unsafe {
        if fd != FIRST_FD && libc::dup3(fd, FIRST_FD, libc::O_CLOEXEC) < 0 {
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_close_range, FIRST_FD + 1, u32::MAX, 0) != 0 {
            // Before Linux 5.9.
            for other in FIRST_FD + 1..FALLBACK_FD_LIMIT {
                libc::close(other);
            }
        }
        UnixStream::from_raw_fd(FIRST_FD)
    }
}

/// Forks and execs `request`, giving it `fds` as 3, 4, 5 ...; the new process's pid and a
/// pidfd for it, or why it could not run.
fn launch(request: &Request, fds: &[OwnedFd]) -> Result<(u32, OwnedFd), String> {
    let name = request.binary.display().to_string();
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| format!("{name}: a NUL byte in the command"));
    let path = cstr(request.binary.as_os_str().as_bytes())?;
    let mut args = vec![path.clone()];
    for a in &request.args {
        args.push(cstr(a.as_bytes())?);
    }
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // Reports exec's errno; closed by a successful exec.
    let mut pipe = [-1 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `pipe`, which has room for them.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "Cannot start {name}: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: the pipe's descriptors were just made and are owned here only.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    // SAFETY: the launcher has one thread, so the child may run ordinary code; it only
    // moves descriptors and execs, or writes an errno and exits.
    match unsafe { libc::fork() } {
        -1 => Err(format!(
            "Cannot start {name}: {}",
            io::Error::last_os_error()
        )),
        0 => {
            // SAFETY: descriptor moves on numbers this process owns, then exec or _exit.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                // Above every target first, so that no move overwrites a descriptor that
                // is still to move.
                let high = FIRST_FD + MAX_FDS as RawFd + 1;
                let report = libc::fcntl(write_end.as_raw_fd(), libc::F_DUPFD_CLOEXEC, high);
                let moved: Vec<RawFd> = raw
                    .iter()
                    .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, high))
                    .collect();
                let mut ok = report >= 0 && moved.iter().all(|&fd| fd >= 0);
                for (i, &fd) in moved.iter().enumerate() {
                    // dup2 leaves the new descriptor open across exec.
                    ok &= libc::dup2(fd, FIRST_FD + i as RawFd) >= 0;
                }
                let first_other = FIRST_FD + raw.len() as libc::c_int;
                // Everything else closes on exec (the report pipe included).
                let flagged = libc::syscall(
                    libc::SYS_close_range,
                    first_other,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) == 0;
                if !flagged {
                    // Before Linux 5.11.
                    for other in first_other..FALLBACK_FD_LIMIT {
                        libc::fcntl(other, libc::F_SETFD, libc::FD_CLOEXEC);
                    }
                }
                if ok {
                    libc::execv(path.as_ptr(), argv.as_ptr());
                }
                let errno = *libc::__errno_location();
                libc::write(report, (&errno as *const libc::c_int).cast(), 4);
                libc::_exit(127)
            }
        }
        pid => {
            drop(write_end);
            // Before anything can reap the child, so that the pidfd names it and no other.
            // SAFETY: pidfd_open with a pid and no flags returns a new descriptor or -1.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            let mut errno = [0u8; 4];
            let mut file = std::fs::File::from(read_end);
            let got = io::Read::read(&mut file, &mut errno).unwrap_or(0);
            if got == 4 || pidfd < 0 {
                // SAFETY: waitpid on our own child, with a null status pointer.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                if pidfd >= 0 {
                    // SAFETY: the descriptor pidfd_open made, closed once.
                    unsafe { libc::close(pidfd as RawFd) };
                }
                return Err(if got == 4 {
                    let e = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                    format!("Cannot run {name}: {e}")
                } else {
                    format!("Cannot watch {name}: {}", io::Error::last_os_error())
                });
            }
            // SAFETY: pidfd_open just made this descriptor for us.
            Ok((pid as u32, unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }))
        }
    }
}
