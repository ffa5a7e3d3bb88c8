//! The HTTP server thread: accepts connections on the API socket, parses and routes each
//! request, hands it to the control loop through the internal API and writes the answer.
//!
//! One thread serves every connection from one epoll, with a bounded number of connections,
//! a deadline for each request to arrive and for idle connections, and answers written as
//! the control loop sends them, so a slow client or a long migration never holds up a
//! `vmm.ping`.
//!
//! The socket is owner-only. A lock file next to it (`PATH.lock`, held with `flock` for the
//! life of the process) keeps two VMMs off one path, while a socket file left by a process
//! that died is simply replaced.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::compat::Supported;
use crate::fds::{recv_with_fds, Fds};
use crate::http::{self, Parsed};
use crate::request::{shutting_down, ApiAction, ApiError, ApiReply, ApiResponse, ApiSender};
use crate::routes::{self, Endpoint, RouteError};

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process holds the socket's lock.
    #[error("API socket {0} is in use by another baton")]
    InUse(PathBuf),
    /// The lock file could not be opened.
    #[error("Cannot open lock file {0}")]
    Lock(PathBuf, #[source] std::io::Error),
    /// bind/listen failed.
    #[error("Cannot listen on API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    /// The inherited descriptor is not a listening UNIX socket.
    #[error("File descriptor {0} is not a listening UNIX socket")]
    BadFd(RawFd),
    /// The inherited lock descriptor is not an open regular file.
    #[error("File descriptor {0} is not an open lock file")]
    BadLockFd(RawFd),
    /// The server thread could not start.
    #[error("Cannot start the API server thread")]
    Thread(#[source] std::io::Error),
    /// `max_connections` out of range.
    #[error("max_connections={0} is not from 1 to 512")]
    MaxConnections(usize),
}

/// The integer socket option `opt` of `fd`, if `fd` is a socket.
fn socket_option(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// A bound API socket; the lock stays held while this lives.
pub struct ApiSocket {
    listener: UnixListener,
    _lock: Option<File>,
    max_connections: usize,
}

impl ApiSocket {
    /// Binds `path` owner-only, refusing if another live baton serves it.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        // Never through a symlink (O_NOFOLLOW), and owner-only if created.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| ServerError::Lock(lock_path.clone(), e))?;
        let regular = lock.metadata().map(|m| m.file_type().is_file());
        if !regular.map_err(|e| ServerError::Lock(lock_path.clone(), e))? {
            return Err(ServerError::Lock(
                lock_path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            ));
        }
        // SAFETY: flock on a descriptor we own, with valid flags.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ServerError::InUse(path.to_owned()));
        }
        // We hold the lock, so a socket file there belongs to a baton that is gone.
        fd_passing::remove_stale_socket(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
        let listener =
            fd_passing::bind_owner_only(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
        Ok(ApiSocket {
            listener,
            _lock: Some(lock),
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Takes over an inherited, already listening socket.
    pub fn from_fd(fd: RawFd) -> Result<Self, ServerError> {
        // The API is unauthenticated: it may only ever listen on a UNIX socket.
        let listening = socket_option(fd, libc::SO_ACCEPTCONN).is_some_and(|v| v != 0);
        // SAFETY: only borrowed for the check; `fd` stays the caller's until taken below.
        let unix = fd_passing::is_unix_socket(unsafe { BorrowedFd::borrow_raw(fd) });
        if !listening || !unix {
            return Err(ServerError::BadFd(fd));
        }
        // SAFETY: fcntl on a descriptor we checked: children baton starts must not inherit
        // the API.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller hands us `fd`, a listening socket nobody else owns.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        Ok(ApiSocket {
            listener,
            _lock: None,
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Holds the lock on the socket's path through `fd`, inherited from the baton that
    /// bound it (a live upgrade): while any process holds it, no other baton takes the path.
    pub fn with_lock_fd(mut self, fd: RawFd) -> Result<Self, ServerError> {
        // SAFETY: only borrowed for the check; `fd` stays the caller's until taken below.
        let regular = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map(File::from)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.file_type().is_file());
        if !regular {
            return Err(ServerError::BadLockFd(fd));
        }
        // SAFETY: fcntl on a descriptor we checked is open.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller hands us `fd`, an open file nobody else owns.
        self._lock = Some(unsafe { File::from_raw_fd(fd) });
        Ok(self)
    }

    /// Serves at most `n` connections at once instead of [`MAX_CONNECTIONS`]; `n` must
    /// pass [`check_max_connections`].
    pub fn max_connections(mut self, n: usize) -> Result<Self, ServerError> {
        self.max_connections = check_max_connections(n)?;
        Ok(self)
    }

    /// Serves the socket on its own thread, sending requests through `sender`.
    pub fn serve(self, sender: ApiSender) -> Result<Server, ServerError> {
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(ServerError::Thread);
        let handover = ApiHandover {
            listener: dup(self.listener.as_fd())?,
            lock: self._lock.as_ref().map(|l| dup(l.as_fd())).transpose()?,
            max_connections: self.max_connections,
        };
        self.listener
            .set_nonblocking(true)
            .map_err(ServerError::Thread)?;
        let in_flight = Arc::new(InFlight::default());
        let mut events = EventLoop::new(
            self.listener,
            sender,
            in_flight.clone(),
            self.max_connections,
        )?;
        let server = Server {
            in_flight,
            gate: AcceptGate {
                accepting: events.accepting.clone(),
                wake: events.wake.clone(),
            },
            handover,
        };
        let lock = self._lock;
        std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                if let Some(hook) = ON_THREAD_START.get() {
                    hook();
                }
                let _lock = lock;
                events.run();
            })
            .map_err(ServerError::Thread)?;
        Ok(server)
    }
}

/// What the server thread runs first, if set ([`on_thread_start`]).
static ON_THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Has the server thread, when [`ApiSocket::serve`] starts it, call `hook` first thing: the
/// VMM loads the API thread's seccomp filter there. Only the first hook set counts.
pub fn on_thread_start(hook: fn()) {
    let _ = ON_THREAD_START.set(hook);
}

/// Requests being handled: read, but their answers not yet written.
#[derive(Default)]
struct InFlight {
    /// Requests in flight, and whether [`Server::drain`] waits for them.
    count: Mutex<(usize, bool)>,
    idle: Condvar,
}

impl InFlight {
    fn start(&self) {
        self.count.lock().expect("API lock poisoned").0 += 1;
    }

    fn finish(&self) {
        let mut n = self.count.lock().expect("API lock poisoned");
        n.0 -= 1;
        // A wake-up is a system call: only when someone waits.
        if n.0 == 0 && n.1 {
            self.idle.notify_all();
        }
    }
}

/// What another baton needs to serve the same API socket: duplicates of the listening
/// socket and of the lock on its path (when this baton holds one), and the connection limit.
#[derive(Debug)]
pub struct ApiHandover {
    /// The listening socket.
    pub listener: OwnedFd,
    /// The lock file, held with `flock`.
    pub lock: Option<OwnedFd>,
    /// `max_connections`.
    pub max_connections: usize,
}

impl ApiHandover {
    /// New duplicates of the same descriptors.
    pub fn try_clone(&self) -> std::io::Result<ApiHandover> {
        Ok(ApiHandover {
            listener: self.listener.try_clone()?,
            lock: self.lock.as_ref().map(OwnedFd::try_clone).transpose()?,
            max_connections: self.max_connections,
        })
    }
}

/// Whether the server takes new connections. While it does not, clients that connect wait
/// in the socket's backlog (nobody is refused), for this server or another process serving
/// the same socket.
#[derive(Clone, Debug)]
pub struct AcceptGate {
    accepting: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl AcceptGate {
    /// Stops or resumes accepting; connections already taken are served either way.
    pub fn set(&self, accepting: bool) {
        self.accepting.store(accepting, Ordering::Release);
        // A full eventfd counter already wakes the server.
        let _ = self.wake.write(1);
    }
}

/// A running API server.
pub struct Server {
    in_flight: Arc<InFlight>,
    gate: AcceptGate,
    handover: ApiHandover,
}

impl Server {
    /// Its gate on new connections.
    pub fn gate(&self) -> AcceptGate {
        self.gate.clone()
    }

    /// Duplicates of the socket and lock another baton serves them with.
    pub fn handover(&self) -> std::io::Result<ApiHandover> {
        self.handover.try_clone()
    }

    /// Waits (up to `timeout`) until every answer has been written, so that a VMM ending on
    /// `vmm.shutdown` still answers it.
    pub fn drain(&self, timeout: Duration) {
        let mut n = self.in_flight.count.lock().expect("API lock poisoned");
        n.1 = true;
        let _ = self
            .in_flight
            .idle
            .wait_timeout_while(n, timeout, |n| n.0 > 0);
    }
}

/// Most connections served at once by default (`--api-socket ...,max_connections=N` sets
/// it). At the limit, a new connection takes the place of the one idle for longest; only
/// when every connection waits for an answer is it answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// The limits `max_connections` may take: each connection holds a descriptor, and under
/// the common soft limit of 1024 descriptors the rest stay for the VM.
pub const CONNECTIONS_RANGE: std::ops::RangeInclusive<usize> = 1..=512;

/// `n` if it is in [`CONNECTIONS_RANGE`]: checked before the socket is bound.
pub fn check_max_connections(n: usize) -> Result<usize, ServerError> {
    if CONNECTIONS_RANGE.contains(&n) {
        Ok(n)
    } else {
        Err(ServerError::MaxConnections(n))
    }
}
/// How long a request may take to arrive, from its first byte to its last.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may sit idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes buffered from one connection: one whole request of the largest size.
const INPUT_LIMIT: usize = http::MAX_HEADER_BYTES + http::MAX_BODY_BYTES;

const LISTENER: u64 = 0;
const WAKE: u64 = 1;

/// An answer the control loop has not sent yet.
struct Pending {
    answer: Receiver<ApiResponse>,
    close: bool,
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    /// Descriptors received and not yet claimed by a request.
    fds: Fds,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    written: usize,
    pending: Option<Pending>,
    /// Requests counted in flight: answers awaited or not yet written.
    counted: usize,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
    /// Close once `output` is written.
    closing: bool,
    /// The client shut its side.
    hung_up: bool,
    /// epoll said input came that has not been read to the end yet.
    readable: bool,
    /// epoll said the client shut its side: read to the end of the stream.
    peer_closed: bool,
    /// epoll reports when the socket takes more output (only while some waits).
    watching_out: bool,
    /// When the request being read began, or when the connection went idle.
    since: Instant,
}

/// The server's single thread: every connection on one epoll, requests handed to the control
/// loop without blocking, answers written as they come back. A client that holds its
/// connection open, or a long `vm.send-migration`, never stops the others.
struct EventLoop {
    epoll: Epoll,
    listener: UnixListener,
    sender: ApiSender,
    wake: Arc<EventFd>,
    in_flight: Arc<InFlight>,
    connections: HashMap<u64, Connection>,
    max_connections: usize,
    next_token: u64,
    /// Whether to take new connections ([`AcceptGate`]).
    accepting: Arc<AtomicBool>,
    /// Whether the listener is on the epoll.
    listening: bool,
}

impl EventLoop {
    fn new(
        listener: UnixListener,
        sender: ApiSender,
        in_flight: Arc<InFlight>,
        max_connections: usize,
    ) -> Result<Self, ServerError> {
        let epoll = Epoll::new().map_err(ServerError::Thread)?;
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::Thread)?);
        // The wake-up eventfd is edge-triggered: every write to an eventfd is an edge, so it
        // never needs reading (its counter cannot reach its 2^64 - 1 limit), which saves each
        // answer a system call.
        for (fd, token, set) in [
            (listener.as_raw_fd(), LISTENER, EventSet::IN),
            (
                wake.as_raw_fd(),
                WAKE,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
                .map_err(ServerError::Thread)?;
        }
        Ok(EventLoop {
            epoll,
            listener,
            sender,
            wake,
            in_flight,
            connections: HashMap::new(),
            max_connections,
            next_token: WAKE + 1,
            accepting: Arc::new(AtomicBool::new(true)),
            listening: true,
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout = self.next_timeout();
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API: epoll failed, the API stops: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    LISTENER => self.accept(),
                    WAKE => {
                        self.follow_gate();
                        let waiting: Vec<u64> = self
                            .connections
                            .iter()
                            .filter(|(_, c)| c.pending.is_some())
                            .map(|(t, _)| *t)
                            .collect();
                        for token in waiting {
                            self.advance(token);
                        }
                    }
                    token => {
                        if let Some(conn) = self.connections.get_mut(&token) {
                            let set = event.event_set();
                            conn.readable |= set.intersects(EventSet::IN | EventSet::READ_HANG_UP);
                            conn.peer_closed |=
                                set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP);
                        }
                        self.advance(token)
                    }
                }
            }
            self.expire();
        }
    }

    /// Takes the listener off the epoll, or puts it back, as the [`AcceptGate`] says.
    fn follow_gate(&mut self) {
        let wanted = self.accepting.load(Ordering::Acquire);
        if wanted == self.listening {
            return;
        }
        let (op, what) = if wanted {
            (ControlOperation::Add, "resume")
        } else {
            (ControlOperation::Delete, "stop")
        };
        match self.epoll.ctl(
            op,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        ) {
            Ok(()) => self.listening = wanted,
            Err(e) => log::warn!("API: cannot {what} accepting connections: {e}"),
        }
    }

    /// Takes one connection: the listener is level-triggered, so epoll reports the next one
    /// at once, without a last accept that finds none.
    fn accept(&mut self) {
        if !self.listening {
            // The gate closed after epoll reported the listener in this batch.
            return;
        }
        let stream = match accept_nonblocking(&self.listener) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(e) => {
                // Out of descriptors, say: the connection waits in the backlog until
                // one is closed.
                log::warn!("API: accept failed: {e}");
                return;
            }
        };
        if self.connections.len() >= self.max_connections {
            // Room is made by dropping the connection idle (or trickling a request in)
            // for longest: a flood of idle or slow clients cannot lock others out.
            let idlest = self
                .connections
                .iter()
                .filter(|(_, c)| c.pending.is_none() && c.output.is_empty())
                .min_by_key(|(_, c)| c.since)
                .map(|(t, _)| *t);
            if let Some(token) = idlest {
                self.drop_connection(token);
            }
        }
        if self.connections.len() >= self.max_connections {
            let mut out = Vec::new();
            let body = error_body(&[format!(
                "Too many API connections (at most {}); retry later",
                self.max_connections
            )]);
            http::write_response(&mut out, 503, Some(&body), true, None);
            // Best effort: a fresh socket's buffer takes a short answer at once.
            let _ = (&stream).write(&out);
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(interest(false), token),
        ) {
            log::warn!("API: cannot watch a connection: {e}");
            return;
        }
        self.connections.insert(
            token,
            Connection {
                stream,
                input: Vec::new(),
                fds: Vec::new(),
                output: Vec::new(),
                written: 0,
                pending: None,
                counted: 0,
                continued: false,
                closing: false,
                hung_up: false,
                // Adding the socket to epoll reports input that came already.
                readable: false,
                peer_closed: false,
                watching_out: false,
                since: Instant::now(),
            },
        );
    }

    /// Does everything connection `token` allows now: read, collect a finished answer,
    /// start the next request, write; then drops the connection if it is done.
    fn advance(&mut self, token: u64) {
        loop {
            let Some(conn) = self.connections.get_mut(&token) else {
                return;
            };
            if let Some(pending) = &conn.pending {
                let response = match pending.answer.try_recv() {
                    Ok(response) => response,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Err(shutting_down()),
                };
                let close = pending.close;
                conn.pending = None;
                write_answer(conn, response, close, None);
            }
            if let Some(e) = read_available(conn) {
                // Answered (unless an answer is on its way), then closed: the stream is out
                // of step with its descriptors.
                if conn.pending.is_none() {
                    conn.counted += 1;
                    self.in_flight.start();
                    let body = error_body(&[format!("Bad request: {e}")]);
                    http::write_response(&mut conn.output, 400, Some(&body), true, None);
                }
                break;
            }
            if conn.closing || conn.pending.is_some() || !self.next_request(token) {
                break;
            }
        }
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        flush(conn, &self.in_flight);
        // Watch for room to write only while output waits: a wake-up each time the client
        // reads an answer would cost every request a context switch.
        let blocked = !conn.output.is_empty();
        if blocked != conn.watching_out {
            conn.watching_out = blocked;
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(interest(blocked), token),
            );
        }
        let idle = conn.pending.is_none() && conn.output.is_empty();
        if idle && (conn.closing || conn.hung_up) {
            self.drop_connection(token);
        }
    }

    /// Parses and starts the next request buffered on `token`; false if there is none yet.
    fn next_request(&mut self, token: u64) -> bool {
        let conn = self.connections.get_mut(&token).expect("live connection");
        let request = match http::parse_request(&conn.input) {
            Ok(Parsed::Incomplete) => return false,
            Ok(Parsed::ExpectsContinue) => {
                if !conn.continued {
                    conn.continued = true;
                    conn.output.extend_from_slice(http::CONTINUE);
                }
                return false;
            }
            Ok(Parsed::Complete(request, used)) => {
                conn.input.drain(..used);
                conn.continued = false;
                conn.since = Instant::now();
                request
            }
            Err(e) => {
                // The stream is out of step after a bad request: answer, then close.
                conn.closing = true;
                let body = error_body(&ApiError::new(e.status(), &e).chain);
                conn.counted += 1;
                self.in_flight.start();
                http::write_response(&mut conn.output, e.status(), Some(&body), true, None);
                return false;
            }
        };
        // Descriptors sent with this request arrived with its bytes.
        let fds = std::mem::take(&mut conn.fds);
        self.in_flight.start();
        conn.counted += 1;
        let endpoint = match routes::route(&request.method, &request.path) {
            Ok(e) => e,
            Err(e) => {
                let allow = match &e {
                    RouteError::MethodNotAllowed { allowed, .. } => Some(*allowed),
                    _ => None,
                };
                write_answer(
                    conn,
                    Err(ApiError::new(e.status(), &e)),
                    request.close,
                    allow,
                );
                return true;
            }
        };
        match action_for(endpoint, &request.body, fds)
            .and_then(|action| self.sender.start(action, &self.wake))
        {
            Ok(answer) => {
                conn.pending = Some(Pending {
                    answer,
                    close: request.close,
                })
            }
            Err(e) => write_answer(conn, Err(e), request.close, None),
        }
        true
    }

    /// Closes connection `token`; closing its only descriptor also takes it off the epoll.
    fn drop_connection(&mut self, token: u64) {
        if let Some(conn) = self.connections.remove(&token) {
            for _ in 0..conn.counted {
                self.in_flight.finish();
            }
        }
    }

    /// When the earliest connection deadline passes, in epoll's milliseconds (-1: none).
    fn next_timeout(&self) -> i32 {
        let now = Instant::now();
        self.connections
            .values()
            .filter_map(deadline)
            .min()
            .map(|d| {
                d.saturating_duration_since(now)
                    .as_millis()
                    .min(i32::MAX as u128) as i32
                    + 1
            })
            .unwrap_or(-1)
    }

    /// Drops idle connections and answers 408 to requests that took too long to arrive.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| deadline(c).is_some_and(|d| d <= now))
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            let conn = self.connections.get_mut(&token).expect("listed");
            if conn.mid_request() && !conn.closing {
                conn.closing = true;
                conn.counted += 1;
                self.in_flight.start();
                let body = error_body(&[format!(
                    "The request did not arrive within {} s",
                    REQUEST_TIMEOUT.as_secs()
                )]);
                http::write_response(&mut conn.output, 408, Some(&body), true, None);
                flush(conn, &self.in_flight);
            }
            self.drop_connection(token);
        }
    }
}

/// What epoll watches on a connection: input, edge-triggered (every read drains the socket),
/// and room for output when `out`.
/// Accepts a connection that is non-blocking and close-on-exec from the start (one system
/// call, where accept and then fcntl take two).
fn accept_nonblocking(listener: &UnixListener) -> std::io::Result<UnixStream> {
    // SAFETY: accept4 with null address arguments writes nothing back; a descriptor it
    // returns is new and ours.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a connected socket no one else owns.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn interest(out: bool) -> EventSet {
    let set = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    if out {
        set | EventSet::OUT
    } else {
        set
    }
}

impl Connection {
    /// Whether part of a request has arrived (blank lines between requests do not count).
    fn mid_request(&self) -> bool {
        self.input.iter().any(|b| !b.is_ascii_whitespace())
    }
}

/// When `conn` times out, if it can: not while its answer is being worked out.
fn deadline(conn: &Connection) -> Option<Instant> {
    if conn.pending.is_some() {
        return None;
    }
    if conn.mid_request() {
        Some(conn.since + REQUEST_TIMEOUT)
    } else {
        Some(conn.since + IDLE_TIMEOUT)
    }
}

/// Reads what the client has sent, up to one request's worth beyond what is buffered.
///
/// Connections are edge-triggered: input is read until the socket has no more, which a read
/// shorter than asked already says (epoll(7)); then nothing is read until epoll reports more.
/// Every system call counts here, where one costs microseconds.
/// Returns the error that ends the connection, if the client sent more descriptors than a
/// request takes.
fn read_available(conn: &mut Connection) -> Option<std::io::Error> {
    let mut chunk = [0u8; 8192];
    while conn.readable && conn.input.len() < INPUT_LIMIT && !conn.hung_up {
        let fds_before = conn.fds.len();
        match recv_with_fds(&conn.stream, &mut chunk, &mut conn.fds) {
            Ok(0) => conn.hung_up = true,
            Ok(n) => {
                if !conn.mid_request() {
                    // A new request starts: its clock starts now.
                    conn.since = Instant::now();
                }
                conn.input.extend_from_slice(&chunk[..n]);
                // After a short read the socket is empty, unless the client also hung up
                // (the end of the stream is still to be read) or descriptors came: a UNIX
                // socket ends a read where they are attached, whatever follows. Only a
                // request still unfinished is worth one more read: its rest (the second
                // write of a client like Cloud Hypervisor's) may have come meanwhile.
                let fds_came = conn.fds.len() != fds_before;
                if n < chunk.len()
                    && !conn.peer_closed
                    && !fds_came
                    && !matches!(http::parse_request(&conn.input), Ok(Parsed::Incomplete))
                {
                    conn.readable = false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                conn.readable = false;
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                conn.hung_up = true;
                conn.closing = true;
                return Some(e);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                conn.hung_up = true;
                conn.closing = true;
            }
        }
    }
    None
}

/// Queues the answer to a request on `conn`.
fn write_answer(
    conn: &mut Connection,
    response: ApiResponse,
    close: bool,
    allow: Option<&'static str>,
) {
    let (status, body) = match response {
        Ok(ApiReply::Empty) => (204, None),
        Ok(ApiReply::Json(v)) => (
            200,
            Some(serde_json::to_vec(&v).expect("JSON values serialise")),
        ),
        Err(e) => (e.status, Some(error_body(&e.chain))),
    };
    http::write_response(&mut conn.output, status, body.as_deref(), close, allow);
    conn.since = Instant::now();
    if close {
        conn.closing = true;
    }
}

/// Writes what `conn` has queued, as far as the socket takes it.
fn flush(conn: &mut Connection, in_flight: &InFlight) {
    while conn.written < conn.output.len() {
        match (&conn.stream).write(&conn.output[conn.written..]) {
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The client is gone: nothing more can reach it.
                conn.output.clear();
                conn.written = 0;
                conn.hung_up = true;
                conn.closing = true;
                break;
            }
        }
    }
    conn.output.clear();
    conn.written = 0;
    let answered = conn.counted - usize::from(conn.pending.is_some());
    for _ in 0..answered {
        in_flight.finish();
    }
    conn.counted -= answered;
}

fn error_body(chain: &[String]) -> Vec<u8> {
    serde_json::to_vec(chain).expect("strings serialise")
}

/// `body` as the JSON of a `what` request, with every Cloud Hypervisor field at a value baton
/// honours.
fn parse_body<T: serde::de::DeserializeOwned + Supported>(
    body: &[u8],
    what: &str,
) -> Result<T, ApiError> {
    let invalid = format!("Invalid {what} configuration in request body");
    let value: T = serde_json::from_slice(body).map_err(|e| ApiError {
        status: 400,
        chain: vec![invalid.clone(), e.to_string()],
    })?;
    value.check_supported().map_err(|e| ApiError {
        status: 400,
        chain: vec![invalid, e.to_string()],
    })?;
    Ok(value)
}

/// The body of `vm.remove-device`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveDevice {
    id: String,
}

impl Supported for RemoveDevice {
    fn check_supported(&self) -> Result<(), crate::compat::Unsupported> {
        Ok(())
    }
}

/// The action for `endpoint` with `body` and the descriptors that came with it, or the error
/// to answer.
pub fn action_for(endpoint: Endpoint, body: &[u8], fds: Fds) -> Result<ApiAction, ApiError> {
    let takes_fds = matches!(
        endpoint,
        Endpoint::VmCreate
            | Endpoint::VmAddNet
            | Endpoint::VmRestore
            | Endpoint::VmReceiveMigration
    );
    if !takes_fds && !fds.is_empty() {
        return Err(ApiError::message(
            400,
            format!(
                "{} file descriptor(s) came with a request that takes none",
                fds.len()
            ),
        ));
    }
    Ok(match endpoint {
        Endpoint::VmmPing => ApiAction::VmmPing,
        Endpoint::VmmShutdown => ApiAction::VmmShutdown,
        Endpoint::VmmBackendTransferSupport => ApiAction::VmmBackendTransferSupport,
        Endpoint::VmmLiveUpgrade => ApiAction::VmmLiveUpgrade(parse_body(body, "live-upgrade")?),
        Endpoint::VmCreate => ApiAction::VmCreate(Box::new(parse_body(body, "VM")?), fds),
        Endpoint::VmAddNet => ApiAction::VmAddNet(Box::new(parse_body(body, "network")?), fds),
        Endpoint::VmSnapshot => ApiAction::VmSnapshot(parse_body(body, "snapshot")?),
        Endpoint::VmRestore => ApiAction::VmRestore(parse_body(body, "restore")?, fds),
        Endpoint::VmSendMigration => {
            ApiAction::VmSendMigration(parse_body(body, "send-migration")?)
        }
        Endpoint::VmReceiveMigration => {
            ApiAction::VmReceiveMigration(parse_body(body, "receive-migration")?, fds)
        }
        Endpoint::VmAddDisk => ApiAction::VmAddDisk(Box::new(parse_body(body, "disk")?)),
        Endpoint::VmRemoveDevice => {
            let data: RemoveDevice = parse_body(body, "remove-device")?;
            ApiAction::VmRemoveDevice(data.id)
        }
        Endpoint::NotSupported(why) => {
            return Err(ApiError::message(
                501,
                format!("This endpoint is not supported by baton: {why}"),
            ))
        }
        Endpoint::VmBoot => ApiAction::VmBoot,
        Endpoint::VmInfo => ApiAction::VmInfo,
        Endpoint::VmCounters => ApiAction::VmCounters,
        Endpoint::VmPause => ApiAction::VmPause,
        Endpoint::VmResume => ApiAction::VmResume,
        Endpoint::VmShutdown => ApiAction::VmShutdown,
        Endpoint::VmReboot => ApiAction::VmReboot,
        Endpoint::VmPowerButton => ApiAction::VmPowerButton,
        Endpoint::VmDelete => ApiAction::VmDelete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_errors_are_400_with_the_cause() {
        let e = action_for(Endpoint::VmCreate, b"{not json", Vec::new()).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.chain.len(), 2);
        let e = action_for(
            Endpoint::VmCreate,
            br#"{"payload":{},"bogus":1}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert!(e.chain[1].contains("bogus"), "{:?}", e.chain);
        let e = action_for(
            Endpoint::VmCreate,
            br#"{"payload":{},"cpus":{"boot_vcpus":"x","max_vcpus":1}}"#,
            Vec::new(),
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(matches!(
            action_for(
                Endpoint::VmCreate,
                br#"{"payload":{"kernel":"/k"}}"#,
                Vec::new()
            ),
            Ok(ApiAction::VmCreate(..))
        ));
    }

    /// Bodies as Cloud Hypervisor v53's ch-remote serialises them.
    const CH_BODIES: &[(Endpoint, &str)] = &[
        (
            Endpoint::VmAddNet,
            r#"{"pci_segment":0,"tap":"tap0","mac":"12:34:56:78:90:ab","num_queues":2,
                "queue_size":256,"vhost_user":false,"vhost_mode":"Client","offload_tso":true,
                "offload_ufo":true,"offload_csum":true}"#,
        ),
        // Before v53, unset optional fields went out as null.
        (
            Endpoint::VmAddNet,
            r#"{"tap":"tap0","ip":null,"mask":null,"mac":"12:34:56:78:90:ab","host_mac":null,
                "mtu":null,"iommu":false,"num_queues":2,"queue_size":256,"vhost_user":false,
                "vhost_socket":null,"vhost_mode":"Client","id":null,"fds":null,
                "rate_limiter_config":null,"pci_segment":0,"offload_tso":true,
                "offload_ufo":true,"offload_csum":true}"#,
        ),
        (
            Endpoint::VmAddDisk,
            r#"{"pci_segment":0,"path":"/img.raw","readonly":false,"direct":false,
                "num_queues":1,"queue_size":128,"vhost_user":false,"disable_io_uring":false,
                "disable_aio":false,"backing_files":false,"sparse":true,"image_type":"Unknown",
                "lock_granularity":"ByteRange"}"#,
        ),
        (
            Endpoint::VmRestore,
            r#"{"source_url":"file:///s","prefault":false,"memory_restore_mode":"Copy",
                "net_fds":[{"id":"net0","num_fds":2,"fds":null}],"resume":false}"#,
        ),
        (
            Endpoint::VmRestore,
            r#"{"source_url":"file:///s","prefault":false,"memory_restore_mode":"Copy",
                "net_fds":null,"resume":false}"#,
        ),
        (
            Endpoint::VmSendMigration,
            r#"{"destination_url":"unix:/tmp/m.sock","local":true,"downtime_ms":300,
                "timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,
                "memory_mode":"Precopy"}"#,
        ),
        (
            Endpoint::VmReceiveMigration,
            r#"{"receiver_url":"unix:/tmp/m.sock","tls_dir":null,"memory_mode":"Precopy"}"#,
        ),
        (Endpoint::VmSnapshot, r#"{"destination_url":"file:///s"}"#),
        (Endpoint::VmRemoveDevice, r#"{"id":"disk0"}"#),
        (
            Endpoint::VmCreate,
            r#"{"cpus":{"boot_vcpus":1,"max_vcpus":1,"kvm_hyperv":false,"max_phys_bits":46,
                "features":{"amx":false},"nested":true,"core_scheduling":"Vm"},
                "memory":{"size":536870912,"mergeable":false,"hotplug_method":"Acpi",
                "shared":false,"hugepages":false,"prefault":false,"reserve":false,"thp":true},
                "payload":{"kernel":"/k","cmdline":"console=ttyS0"},
                "rng":{"src":"/dev/urandom","pci_segment":0},
                "serial":{"mode":"Null"},"console":{"mode":"Off","pci_segment":0},
                "debug_console":{"mode":"Off","iobase":233},
                "disks":[{"path":"/d","pci_segment":0,"num_queues":1,"queue_size":128}],
                "pvpanic":false,"iommu":false,"watchdog":false,"landlock_enable":false,
                "fs":null,"pmem":[],"platform":{"num_pci_segments":1,
                "iommu_address_width_bits":64,"iommufd":false,"vfio_p2p_dma":true}}"#,
        ),
    ];

    #[test]
    fn every_body_cloud_hypervisor_sends_is_accepted() {
        for (endpoint, body) in CH_BODIES {
            if let Err(e) = action_for(*endpoint, body.as_bytes(), Vec::new()) {
                panic!("{endpoint:?} refused {body}: {:?}", e.chain);
            }
        }
    }

    #[test]
    fn values_baton_cannot_honour_are_refused_by_name() {
        for (endpoint, body, named) in [
            (
                Endpoint::VmAddNet,
                r#"{"tap":"t","vhost_user":true}"#,
                "net.vhost_user=true",
            ),
            (
                Endpoint::VmAddNet,
                r#"{"tap":"t","pci_segment":2}"#,
                "net.pci_segment=2",
            ),
            (
                Endpoint::VmAddDisk,
                r#"{"path":"/d","image_type":"Qcow2"}"#,
                "disk.image_type=\"Qcow2\"",
            ),
            (
                Endpoint::VmAddDisk,
                r#"{"path":"/d","num_queues":4}"#,
                "disk.num_queues=4",
            ),
            (
                Endpoint::VmRestore,
                r#"{"source_url":"file:///s","memory_restore_mode":"OnDemand"}"#,
                "memory_restore_mode=\"OnDemand\"",
            ),
            (
                Endpoint::VmSendMigration,
                r#"{"destination_url":"tcp:h:1","connections":4}"#,
                "connections=4",
            ),
            (
                Endpoint::VmSendMigration,
                r#"{"destination_url":"tcp:h:1","tls_dir":"/etc/tls"}"#,
                "tls_dir=\"/etc/tls\"",
            ),
            (
                Endpoint::VmReceiveMigration,
                r#"{"receiver_url":"tcp:h:1","memory_mode":"Postcopy"}"#,
                "memory_mode=\"Postcopy\"",
            ),
            (
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"fs":[{"tag":"t","socket":"/s"}]}"#,
                "fs=[",
            ),
            (
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"serial":{"mode":"Pty"}}"#,
                "serial.mode=\"Pty\"",
            ),
            (
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"memory":{"size":536870912,"hugepages":true}}"#,
                "memory.hugepages=true",
            ),
            (
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k","firmware":"/fw"}}"#,
                "payload.firmware=\"/fw\"",
            ),
            (
                Endpoint::VmCreate,
                r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/a"},{"path":"/b","vhost_user":true}]}"#,
                "disks[1].vhost_user=true",
            ),
        ] {
            let e = action_for(endpoint, body.as_bytes(), Vec::new()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert!(
                e.chain[1].starts_with(named) && e.chain[1].contains("not supported by baton"),
                "{body}: {:?}",
                e.chain
            );
        }
        // Unknown to both is still refused by name.
        let e = action_for(Endpoint::VmAddNet, br#"{"turbo":true}"#, Vec::new()).unwrap_err();
        assert!(e.chain[1].contains("turbo"), "{:?}", e.chain);
    }

    #[test]
    fn cloud_hypervisor_endpoints_baton_lacks_answer_501() {
        let e = action_for(Endpoint::NotSupported("no"), b"{}", Vec::new()).unwrap_err();
        assert_eq!(e.status, 501);
        assert!(
            e.chain[0].contains("not supported by baton"),
            "{:?}",
            e.chain
        );
    }

    #[test]
    fn socket_lock_refuses_a_second_server_and_replaces_stale_files() {
        let dir = std::env::temp_dir().join(format!("baton-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A regular file at the path (a typo naming a disk image) is never removed.
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::Bind(..))));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A socket file nobody serves, as a killed VMM leaves behind, is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let first = ApiSocket::bind(&path).expect("stale socket replaced");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::InUse(_))));
        drop(first);
        ApiSocket::bind(&path).expect("lock released with its holder");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
