//! Plumbing between the serial port and the outside: stdout/stdin, a file, or a UNIX socket.
//!
//! The plumbing outlives any one VM (a guest reboot builds a new serial device), so the
//! device gets a [`ConsoleOutput`] handle for its output and the console keeps a reference to
//! the current device to push input into.
//!
//! In socket mode, the last [`BACKLOG`] bytes of output are replayed to each client that
//! connects, so a client that connects after boot still sees the boot messages. A new client
//! replaces (disconnects) the previous one. Dropping the console releases its socket. One
//! `serial-socket` thread accepts clients and reads the current one; a migration with backend
//! transfer can hold it ([`ConsoleHandle::hold`]) and hand the listening socket, the client,
//! the backlog and input not yet taken by the guest to another baton
//! ([`Console::from_hand_over`]), whose client then never notices.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use api::{ConsoleConfig, ConsoleMode};
use devices::legacy::Serial;
use vmm_sys_util::eventfd::EventFd;

/// Output bytes kept for replay to a new socket client.
pub const BACKLOG: usize = 256 * 1024;
/// How long a stalled socket client may block the guest's output before it is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Input read from a socket client and not yet taken by the guest, at most: past it the
/// client is not read until the guest takes some (the socket holds the rest).
const PENDING_INPUT: usize = 4096;

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The output file could not be opened.
    #[error("Cannot open serial output file {0}")]
    File(PathBuf, #[source] io::Error),
    /// Another process serves the socket path.
    #[error("Serial socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The socket could not be created.
    #[error("Cannot listen on serial socket {0}")]
    Socket(PathBuf, #[source] io::Error),
    /// The input thread could not be started.
    #[error("Cannot start the serial input thread")]
    Thread(#[source] io::Error),
    /// A console handed over by another baton is not a socket console here.
    #[error("A serial socket came from the source, but the serial port here is not a socket")]
    NotASocket,
}

enum Sink {
    Discard,
    Stdout,
    File(File),
    Socket {
        backlog: VecDeque<u8>,
        client: Option<UnixStream>,
    },
}

/// Where the serial device writes; cheap to clone.
#[derive(Clone)]
pub struct ConsoleOutput(Arc<Mutex<Sink>>);

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut sink = self.0.lock().expect("console lock poisoned");
        match &mut *sink {
            Sink::Discard => {}
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                // The guest must not stall or fail because our stdout went away.
                let _ = out.write_all(buf).and_then(|_| out.flush());
            }
            Sink::File(f) => {
                if let Err(e) = f.write_all(buf) {
                    log::warn!("serial output file: {e}");
                }
            }
            Sink::Socket { backlog, client } => {
                backlog.extend(buf);
                let excess = backlog.len().saturating_sub(BACKLOG);
                backlog.drain(..excess);
                if let Some(c) = client {
                    if c.write_all(buf).is_err() {
                        *client = None;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where typed input goes: the current serial device (none between VMs), and whether the
/// console that reads it is gone.
#[derive(Default)]
struct Input {
    device: Mutex<Option<Arc<Mutex<Serial>>>>,
    closed: AtomicBool,
    /// (device, inode) of the socket file this console bound, once bound: at the end only
    /// that file is removed, not one another baton bound at the same path since.
    socket_file: Mutex<Option<(u64, u64)>>,
}

/// (device, inode) of the file at `path`.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

type InputTarget = Arc<Input>;

/// Standard input has one reader for the life of the process: every tty console shares it.
static STDIN_TARGET: OnceLock<InputTarget> = OnceLock::new();

/// A socket console's serving, shared by its `serial-socket` thread and a migration's
/// hand-over.
struct Serving {
    state: Mutex<Served>,
    changed: Condvar,
    /// Readable while the thread must look at `state` (held or closed) rather than poll.
    wake: EventFd,
    /// A duplicate of the listening socket, once bound.
    listener: Mutex<Option<OwnedFd>>,
}

#[derive(Default)]
struct Served {
    /// A migration holds the console: nothing is accepted or read until it is released.
    held: bool,
    /// The console is gone: the thread ends.
    closed: bool,
    /// Another baton serves the socket now: nothing here may touch it.
    handed_over: bool,
    /// Input read from the client that the serial device has not taken yet.
    pending: Vec<u8>,
}

impl Serving {
    fn new() -> io::Result<Self> {
        Ok(Serving {
            state: Mutex::new(Served::default()),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            listener: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Served> {
        self.state.lock().expect("console lock poisoned")
    }

    /// Remembers the listening socket for a hand-over.
    fn bound(&self, listener: &UnixListener) {
        match listener.as_fd().try_clone_to_owned() {
            Ok(dup) => *self.listener.lock().expect("console lock poisoned") = Some(dup),
            Err(e) => log::warn!("serial socket: it cannot be handed over: {e}"),
        }
    }

    /// Ends the serving thread; `handed_over` says another baton serves the socket now.
    /// Returns whether the socket and its client must be left alone: handed over, or held
    /// for a hand-over whose outcome is unknown (another baton may serve them).
    fn close(&self, handed_over: bool) -> bool {
        let mut st = self.lock();
        st.closed = true;
        st.handed_over |= handed_over;
        let _ = self.wake.write(1);
        self.changed.notify_all();
        st.handed_over || st.held
    }
}

/// What a socket console hands to the console of another baton: its listening socket, its
/// client (if one is connected), the output kept for replay, and input the guest has not
/// taken yet.
#[derive(Debug)]
pub struct ConsoleHandOver {
    /// The listening socket.
    pub listener: OwnedFd,
    /// The connected client.
    pub client: Option<OwnedFd>,
    /// The last output, replayed to the next client.
    pub backlog: Vec<u8>,
    /// Input read from the client that the guest has not taken yet.
    pub input: Vec<u8>,
}

/// A socket console, as a migration thread holds, hands over and releases it.
#[derive(Clone)]
pub struct ConsoleHandle {
    serving: Arc<Serving>,
    output: ConsoleOutput,
}

impl ConsoleHandle {
    /// Whether the console serves its socket (one still waiting for another baton to let go
    /// of the path has nothing to hand over).
    pub fn is_bound(&self) -> bool {
        self.serving
            .listener
            .lock()
            .expect("console lock poisoned")
            .is_some()
    }

    /// Stops accepting clients and reading input (the guest is paused, so it writes
    /// nothing), and returns duplicates of what another baton needs to go on. Until
    /// [`ConsoleHandle::release`] or [`ConsoleHandle::handed_over`], clients and their
    /// input wait in the socket.
    pub fn hold(&self) -> io::Result<ConsoleHandOver> {
        let input = {
            let mut st = self.serving.lock();
            st.held = true;
            let _ = self.serving.wake.write(1);
            st.pending.clone()
        };
        let listener = self
            .serving
            .listener
            .lock()
            .expect("console lock poisoned")
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()?
            .ok_or_else(|| io::Error::other("the serial socket is not bound"))?;
        let sink = self.output.0.lock().expect("console lock poisoned");
        let Sink::Socket { backlog, client } = &*sink else {
            return Err(io::Error::other("not a socket console"));
        };
        Ok(ConsoleHandOver {
            listener,
            client: client
                .as_ref()
                .map(|c| c.as_fd().try_clone_to_owned())
                .transpose()?,
            backlog: backlog.iter().copied().collect(),
            input,
        })
    }

    /// Goes on serving after [`ConsoleHandle::hold`]: the VM runs here after all.
    pub fn release(&self) {
        let mut st = self.serving.lock();
        if st.held && !st.closed {
            st.held = false;
            // Non-blocking: the thread polls again.
            let _ = self.serving.wake.read();
            self.serving.changed.notify_all();
        }
    }

    /// Another baton serves the console now (or still does: a new baton whose VM did not
    /// start): this one ends without accepting, reading, disconnecting the client or
    /// removing the socket file.
    pub fn handed_over(&self) {
        self.serving.close(true);
    }
}

/// The console: output handle plus the input source feeding the current serial device.
pub struct Console {
    output: ConsoleOutput,
    target: InputTarget,
    socket: Option<PathBuf>,
    serving: Option<Arc<Serving>>,
}

impl Console {
    /// Sets up the console described by `config`.
    pub fn new(config: &ConsoleConfig) -> Result<Self, Error> {
        Self::build(config, false)
    }

    /// Sets up the console of a VM migrated from another baton on this host, which may
    /// still serve the same socket path until it exits: the socket is then taken over as soon
    /// as the other baton lets go of it (guest output waits in the backlog meanwhile).
    pub fn taking_over(config: &ConsoleConfig) -> Result<Self, Error> {
        Self::build(config, true)
    }

    /// Sets up the socket console `config` describes on what another baton's console handed
    /// over: its socket, its client, which stays connected, its backlog and pending input.
    /// It starts held, touching none of them, until [`ConsoleHandle::release`] once the VM
    /// runs here; dropped before that, it leaves them to the other baton.
    pub fn from_hand_over(config: &ConsoleConfig, h: ConsoleHandOver) -> Result<Self, Error> {
        let path = match (config.mode, &config.socket) {
            (ConsoleMode::Socket, Some(path)) => path.clone(),
            _ => return Err(Error::NotASocket),
        };
        let listener = UnixListener::from(h.listener);
        let reader = h.client.map(UnixStream::from);
        let writer = match &reader {
            Some(r) => {
                let w = r.try_clone().map_err(|e| Error::Socket(path.clone(), e))?;
                if let Err(e) = w.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT)) {
                    log::warn!("serial socket: {e}");
                }
                Some(w)
            }
            None => None,
        };
        let output = ConsoleOutput(Arc::new(Mutex::new(Sink::Socket {
            backlog: h.backlog.into(),
            client: writer,
        })));
        let serving = Arc::new(Serving::new().map_err(Error::Thread)?);
        serving.bound(&listener);
        {
            let mut st = serving.lock();
            st.pending = h.input;
            st.held = true;
            let _ = serving.wake.write(1);
        }
        let target = InputTarget::default();
        *target.socket_file.lock().expect("console lock poisoned") = file_identity(&path);
        let (out, s) = (output.clone(), serving.clone());
        spawn_input("serial-socket", target.clone(), move |t| {
            serve(listener, reader, out, t, s)
        })?;
        Ok(Console {
            output,
            target,
            socket: Some(path),
            serving: Some(serving),
        })
    }

    fn build(config: &ConsoleConfig, take_over: bool) -> Result<Self, Error> {
        let mut target = InputTarget::default();
        let sink = match config.mode {
            // Pty never gets here: VmConfig::validate refuses it.
            ConsoleMode::Off | ConsoleMode::Null | ConsoleMode::Pty => Sink::Discard,
            ConsoleMode::Tty => {
                target = match STDIN_TARGET.get() {
                    Some(t) => t.clone(),
                    None => {
                        spawn_input("serial-stdin", target.clone(), move |t| {
                            pump(io::stdin().lock(), t)
                        })?;
                        STDIN_TARGET.get_or_init(|| target).clone()
                    }
                };
                Sink::Stdout
            }
            ConsoleMode::File => {
                let path = config
                    .file
                    .as_deref()
                    .expect("validated: file mode has a path");
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| Error::File(path.to_owned(), e))?;
                Sink::File(file)
            }
            ConsoleMode::Socket => Sink::Socket {
                backlog: VecDeque::new(),
                client: None,
            },
        };
        let output = ConsoleOutput(Arc::new(Mutex::new(sink)));
        let mut socket = None;
        let mut serving = None;
        if config.mode == ConsoleMode::Socket {
            let path = config
                .socket
                .as_deref()
                .expect("validated: socket mode has a path");
            let listener = match bind(path) {
                Err(Error::SocketInUse(_)) if take_over => None,
                other => Some(other?),
            };
            let served = Arc::new(Serving::new().map_err(Error::Thread)?);
            if let Some(l) = &listener {
                *target.socket_file.lock().expect("console lock poisoned") = file_identity(path);
                served.bound(l);
            }
            let (out, s) = (output.clone(), served.clone());
            let owned = path.to_owned();
            spawn_input("serial-socket", target.clone(), move |t| {
                let listener = match listener {
                    Some(l) => l,
                    None => match wait_and_bind(&owned, &t) {
                        Some(l) => {
                            *t.socket_file.lock().expect("console lock poisoned") =
                                file_identity(&owned);
                            s.bound(&l);
                            l
                        }
                        None => return,
                    },
                };
                serve(listener, None, out, t, s)
            })?;
            socket = Some(path.to_owned());
            serving = Some(served);
        }
        Ok(Console {
            output,
            target,
            socket,
            serving,
        })
    }

    /// The output handle for a new serial device.
    pub fn output(&self) -> Box<dyn Write + Send> {
        Box::new(self.output.clone())
    }

    /// Makes `serial` the device that receives input.
    pub fn attach(&self, serial: Arc<Mutex<Serial>>) {
        *self.target.device.lock().expect("console lock poisoned") = Some(serial);
    }

    /// A socket console's handle for a migration's hand-over.
    pub fn handle(&self) -> Option<ConsoleHandle> {
        Some(ConsoleHandle {
            serving: self.serving.clone()?,
            output: self.output.clone(),
        })
    }
}

impl Drop for Console {
    /// Releases the console: input stops reaching the old device, the socket's client is
    /// disconnected, its thread ends and the socket file goes; unless the console was handed
    /// over, and another baton serves all that now.
    fn drop(&mut self) {
        *self.target.device.lock().expect("console lock poisoned") = None;
        let Some(path) = self.socket.take() else {
            return;
        };
        self.target.closed.store(true, Ordering::Release);
        let handed_over = self.serving.as_ref().is_some_and(|s| s.close(false));
        if handed_over {
            return;
        }
        if let Sink::Socket { client, .. } = &mut *self.output.0.lock().expect("console lock") {
            if let Some(c) = client.take() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let ours = *self
            .target
            .socket_file
            .lock()
            .expect("console lock poisoned");
        if ours.is_none() || ours != file_identity(&path) {
            // Never bound, or the path is another baton's now (it took the VM over).
            return;
        }
        let _ = fd_passing::remove_stale_socket(&path);
    }
}

/// Waits for the baton serving `path` to let go of it, then binds it; None if the console
/// closed first. The path is watched, not probed: a probe connection would replace the
/// other baton's console client. Only a file left for seconds is probed (its owner died).
fn wait_and_bind(path: &Path, target: &Input) -> Option<UnixListener> {
    let started = std::time::Instant::now();
    let mut last_probe = started;
    loop {
        if target.closed.load(Ordering::Acquire) {
            return None;
        }
        let probe = started.elapsed() > Duration::from_secs(5)
            && last_probe.elapsed() > Duration::from_secs(1);
        if !path.exists() || probe {
            last_probe = std::time::Instant::now();
            match bind(path) {
                Ok(l) => {
                    log::info!("serial socket {} taken over", path.display());
                    return Some(l);
                }
                Err(Error::SocketInUse(_)) => {}
                Err(e) if path.exists() => log::debug!("serial socket: {e}"),
                Err(e) => {
                    log::warn!("serial socket: {e}");
                    return None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds `path`, replacing a stale socket file left by a dead process.
fn bind(path: &Path) -> Result<UnixListener, Error> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::SocketInUse(path.to_owned()));
        }
        // Nobody answers: a leftover from a process that died (only a socket is removed).
        fd_passing::remove_stale_socket(path).map_err(|e| Error::Socket(path.to_owned(), e))?;
    }
    fd_passing::bind_owner_only(path).map_err(|e| Error::Socket(path.to_owned(), e))
}

fn spawn_input(
    name: &str,
    target: InputTarget,
    body: impl FnOnce(InputTarget) + Send + 'static,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            crate::seccomp::enter(crate::seccomp::Role::Serial);
            body(target)
        })
        .map(|_| ())
        .map_err(Error::Thread)
}

/// Feeds `bytes` to the current serial device, waiting while its FIFO is full.
fn deliver(target: &InputTarget, mut bytes: &[u8]) {
    while !bytes.is_empty() && !target.closed.load(Ordering::Acquire) {
        let sent = enqueue(target, bytes);
        bytes = &bytes[sent..];
        if sent == 0 {
            // The guest has not drained the FIFO yet (or no device exists during a reboot).
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Puts what the current serial device's FIFO takes of `bytes` into it; how much it took.
fn enqueue(target: &Input, bytes: &[u8]) -> usize {
    let current = target.device.lock().expect("console lock poisoned").clone();
    match current {
        Some(serial) => serial
            .lock()
            .expect("serial lock poisoned")
            .enqueue_input(bytes),
        None => 0,
    }
}

/// Copies everything from `input` into the serial device until end of file.
fn pump(mut input: impl Read, target: InputTarget) {
    let mut buf = [0u8; 512];
    loop {
        match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => deliver(&target, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input: {e}");
                return;
            }
        }
    }
}

fn poll_fd(fd: Option<std::os::fd::RawFd>) -> libc::pollfd {
    libc::pollfd {
        // A negative descriptor is ignored by poll.
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// The `serial-socket` thread: accepts clients one after another (each gets the backlog,
/// then live output, and replaces the one before) and reads the current one's input into
/// the serial device. Everything it reads, accepts and installs happens under the serving
/// lock and only while not held, so that once [`ConsoleHandle::hold`] returns nothing more
/// is taken from the socket here.
fn serve(
    listener: UnixListener,
    mut reader: Option<UnixStream>,
    output: ConsoleOutput,
    target: InputTarget,
    serving: Arc<Serving>,
) {
    // The client is read with MSG_DONTWAIT instead: its descriptor shares the flag with the
    // one output is written to, which waits for a slow client.
    // With fcntl: std's set_nonblocking is an ioctl, which the serial role does not make.
    // SAFETY: F_GETFL and F_SETFL on the listener's descriptor change only its flags.
    let set = unsafe {
        let flags = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
        flags >= 0
            && libc::fcntl(
                listener.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            ) == 0
    };
    if !set {
        log::warn!("serial socket: {}", io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    loop {
        let (input_waits, room) = {
            let mut st = serving.lock();
            while st.held && !st.closed {
                st = serving.changed.wait(st).expect("console lock poisoned");
            }
            if st.closed {
                return;
            }
            let sent = enqueue(&target, &st.pending);
            st.pending.drain(..sent);
            (!st.pending.is_empty(), st.pending.len() < PENDING_INPUT)
        };
        let mut fds = [
            poll_fd(Some(serving.wake.as_raw_fd())),
            poll_fd(Some(listener.as_raw_fd())),
            poll_fd(reader.as_ref().filter(|_| room).map(|r| r.as_raw_fd())),
        ];
        // While the guest has input to take, look again soon.
        let timeout = if input_waits { 2 } else { -1 };
        // SAFETY: three valid pollfds, and their count.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 || fds[0].revents != 0 {
            // Timed out, interrupted, or held or closed: the top of the loop says which.
            continue;
        }
        {
            let mut st = serving.lock();
            if st.held || st.closed {
                continue;
            }
            if fds[2].revents != 0 {
                if let Some(r) = &reader {
                    match recv_now(r, &mut buf) {
                        Ok(0) => reader = None,
                        Ok(n) => st.pending.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            log::warn!("serial socket client: {e}");
                            reader = None;
                        }
                    }
                }
            }
            if fds[1].revents == 0 {
                continue;
            }
            match listener.accept() {
                // Installed under the lock too: a hold then hands over this client, or the
                // one before, never one that is replaced behind its back.
                Ok((stream, _)) => {
                    if let Some(r) = install(stream, &output) {
                        reader = Some(r);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    drop(st);
                    log::warn!("serial socket accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Reads what `stream` has now, without waiting.
fn recv_now(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which is ours.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Makes `stream` the socket console's client: it gets the backlog, then live output, and
/// replaces the one before, which stops typing into the guest. Returns its reading end.
fn install(stream: UnixStream, output: &ConsoleOutput) -> Option<UnixStream> {
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => {
            log::warn!("serial socket: {e}");
            return None;
        }
    };
    // Output waits for a slow client, but not for ever.
    if let Err(e) = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT)) {
        log::warn!("serial socket: {e}");
    }
    let mut sink = output.0.lock().expect("console lock poisoned");
    let Sink::Socket { backlog, client } = &mut *sink else {
        return None;
    };
    if let Some(old) = client.take() {
        let _ = old.shutdown(std::net::Shutdown::Both);
    }
    let (a, b) = backlog.as_slices();
    let mut s = &stream;
    if s.write_all(a).and_then(|_| s.write_all(b)).is_err() {
        return None;
    }
    *client = Some(stream);
    Some(reader)
}
