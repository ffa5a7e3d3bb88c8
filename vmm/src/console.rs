//! Plumbing between the serial port and the outside: stdout/stdin, a file, or a UNIX socket.
//!
//! The plumbing outlives any one VM (a guest reboot builds a new serial device), so the
//! device gets a [`ConsoleOutput`] handle for its output and the console keeps a reference to
//! the current device to push input into.
//!
//! In socket mode, the last [`BACKLOG`] bytes of output are replayed to each client that
//! connects, so a client that connects after boot still sees the boot messages. A new client
//! replaces (disconnects) the previous one. Dropping the console releases its socket.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use api::{ConsoleConfig, ConsoleMode};
use devices::legacy::Serial;

/// Output bytes kept for replay to a new socket client.
pub const BACKLOG: usize = 256 * 1024;
/// How long a stalled socket client may block the guest's output before it is dropped.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// The console: output handle plus the input source feeding the current serial device.
pub struct Console {
    output: ConsoleOutput,
    target: InputTarget,
    socket: Option<PathBuf>,
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
        if config.mode == ConsoleMode::Socket {
            let path = config
                .socket
                .as_deref()
                .expect("validated: socket mode has a path");
            let listener = match bind(path) {
                Err(Error::SocketInUse(_)) if take_over => None,
                other => Some(other?),
            };
            if listener.is_some() {
                *target.socket_file.lock().expect("console lock poisoned") = file_identity(path);
            }
            let out = output.clone();
            let owned = path.to_owned();
            spawn_input("serial-socket", target.clone(), move |t| {
                let listener = match listener {
                    Some(l) => l,
                    None => match wait_and_bind(&owned, &t) {
                        Some(l) => {
                            *t.socket_file.lock().expect("console lock poisoned") =
                                file_identity(&owned);
                            l
                        }
                        None => return,
                    },
                };
                serve(listener, out, t)
            })?;
            socket = Some(path.to_owned());
        }
        Ok(Console {
            output,
            target,
            socket,
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
}

impl Drop for Console {
    /// Releases the console: input stops reaching the old device, the socket's client is
    /// disconnected, its listener thread ends and the socket file goes.
    fn drop(&mut self) {
        *self.target.device.lock().expect("console lock poisoned") = None;
        let Some(path) = self.socket.take() else {
            return;
        };
        self.target.closed.store(true, Ordering::Release);
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
        // Wake the accept loop so it sees the console closed and drops the listener.
        let _ = UnixStream::connect(&path);
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
        let sent = {
            let current = target.device.lock().expect("console lock poisoned").clone();
            match current {
                Some(serial) => serial
                    .lock()
                    .expect("serial lock poisoned")
                    .enqueue_input(bytes),
                None => 0,
            }
        };
        bytes = &bytes[sent..];
        if sent == 0 {
            // The guest has not drained the FIFO yet (or no device exists during a reboot).
            std::thread::sleep(Duration::from_millis(2));
        }
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

/// Accepts socket clients one after another; each gets the backlog, then live output.
fn serve(listener: UnixListener, output: ConsoleOutput, target: InputTarget) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                log::warn!("serial socket accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if target.closed.load(Ordering::Acquire) {
            return;
        }
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("serial socket: {e}");
                continue;
            }
        };
        if let Err(e) = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT)) {
            log::warn!("serial socket: {e}");
        }
        {
            let mut sink = output.0.lock().expect("console lock poisoned");
            if let Sink::Socket { backlog, client } = &mut *sink {
                // A new client replaces the old one, which stops typing into the guest.
                if let Some(old) = client.take() {
                    let _ = old.shutdown(std::net::Shutdown::Both);
                }
                let (a, b) = backlog.as_slices();
                let mut s = &stream;
                if s.write_all(a).and_then(|_| s.write_all(b)).is_ok() {
                    *client = Some(stream);
                }
            }
        }
        let t = target.clone();
        let spawned = std::thread::Builder::new()
            .name("serial-client".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::Role::Serial);
                pump(reader, t)
            });
        if let Err(e) = spawned {
            log::warn!("serial socket: cannot read from client: {e}");
        }
    }
}
