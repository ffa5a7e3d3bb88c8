//! Migration channels: a connected UNIX or TCP stream that speaks the framing of
//! [`protocol`](crate::protocol) and, over UNIX sockets, passes descriptors.
//!
//! A [`Channel`] reads unbuffered on purpose: descriptors ride on single bytes in the stream,
//! and a buffering reader would swallow the bytes (and drop the descriptors) of the next
//! message.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{
    read_exact, Command, Limits, ProtocolError, RequestHeader, Response, ResponseHeader, Status,
    HEADER_LEN,
};
use crate::url::MigrationUrl;

/// Descriptors in one message: the kernel's SCM_MAX_FD.
pub const MAX_FDS_PER_MESSAGE: usize = fd_passing::MAX_PER_MESSAGE;

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A connected migration stream.
#[derive(Debug)]
pub struct Channel {
    stream: Stream,
}

impl From<UnixStream> for Channel {
    fn from(stream: UnixStream) -> Self {
        Channel {
            stream: Stream::Unix(stream),
        }
    }
}

impl From<TcpStream> for Channel {
    fn from(stream: TcpStream) -> Self {
        // Requests and responses are small and strictly alternate: Nagle would only add delay.
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("migration: cannot set TCP_NODELAY: {e}");
        }
        Channel {
            stream: Stream::Tcp(stream),
        }
    }
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what.to_string())
}

impl Channel {
    /// Connects to a `unix:` or `tcp:` URL.
    pub fn connect(url: &MigrationUrl) -> io::Result<Channel> {
        match url {
            MigrationUrl::Unix(path) => UnixStream::connect(path).map(Channel::from),
            MigrationUrl::Tcp { host, port } => {
                TcpStream::connect((host.as_str(), *port)).map(Channel::from)
            }
            MigrationUrl::File(_) => Err(unsupported(
                "A file: URL names a snapshot directory; migrations need unix: or tcp:",
            )),
        }
    }

    /// Whether the connected socket is a UNIX domain socket, asked of the socket itself: only
    /// then can descriptors travel.
    pub fn is_unix(&self) -> bool {
        fd_passing::is_unix_socket(self.as_fd())
    }

    /// Bounds every read; `None` waits forever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    /// Bounds every write; `None` waits forever.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tcp(s) => s.set_write_timeout(timeout),
        }
    }

    /// A second handle on the same connection (to shut it down from another thread, say).
    pub fn try_clone(&self) -> io::Result<Channel> {
        let stream = match &self.stream {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        };
        Ok(Channel { stream })
    }

    /// Shuts down reading, writing or both, waking any thread blocked on the channel.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.stream {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// The UNIX domain socket descriptors travel on.
    fn unix_stream(&self) -> io::Result<&UnixStream> {
        match &self.stream {
            Stream::Unix(s) if self.is_unix() => Ok(s),
            _ => Err(unsupported(
                "Descriptors can only be passed over a UNIX domain socket",
            )),
        }
    }

    /// Sends `fds` as ceil(n / 253) one-byte messages, each byte the number of descriptors its
    /// message carries. The receiver gets duplicates; ours stay open.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let sock = self.unix_stream()?;
        for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
            let raw: Vec<RawFd> = chunk.iter().map(|fd| fd.as_raw_fd()).collect();
            send_fd_message(sock, &raw)?;
        }
        Ok(())
    }

    /// Receives exactly `n` descriptors sent by [`Channel::send_fds`]. On any error, the
    /// descriptors received so far are closed.
    pub fn recv_fds(&mut self, n: usize) -> io::Result<Vec<OwnedFd>> {
        let sock = self.unix_stream()?;
        let mut fds = Vec::with_capacity(n.min(1024));
        while fds.len() < n {
            let (count, mut got) = recv_fd_message(sock)?;
            if usize::from(count) != got.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "A descriptor message announces {count} descriptors but carries {}",
                        got.len()
                    ),
                ));
            }
            if count == 0 || fds.len() + got.len() > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "Expected {} more descriptors, got a message with {count}",
                        n - fds.len()
                    ),
                ));
            }
            fds.append(&mut got);
        }
        Ok(fds)
    }

    /// Sends a request frame.
    pub fn send_request(&mut self, command: Command, payload: &[u8]) -> Result<(), ProtocolError> {
        let header = RequestHeader {
            command,
            length: payload.len() as u64,
        };
        let err = |e| ProtocolError::Io("sending a request", e);
        self.write_all(&header.encode()).map_err(err)?;
        self.write_all(payload).map_err(err)
    }

    /// Reads the next request header.
    pub fn recv_request_header(&mut self) -> Result<RequestHeader, ProtocolError> {
        let mut bytes = [0u8; HEADER_LEN];
        read_exact(self, &mut bytes)
            .map_err(|e| ProtocolError::Io("reading the request header", e))?;
        RequestHeader::decode(&bytes)
    }

    /// Reads a payload of `len` bytes, which the caller checked against its limit. Memory is
    /// allocated as bytes arrive, so a peer that announces more than it sends costs nothing.
    pub fn read_payload(&mut self, len: u64) -> Result<Vec<u8>, ProtocolError> {
        let mut payload = Vec::new();
        let got = Read::by_ref(self)
            .take(len)
            .read_to_end(&mut payload)
            .map_err(|e| ProtocolError::Io("reading the payload", e))?;
        if (got as u64) < len {
            return Err(ProtocolError::Io(
                "reading the payload",
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("The peer closed the connection after {got} of {len} bytes"),
                ),
            ));
        }
        Ok(payload)
    }

    /// Sends a response frame.
    pub fn send_response(&mut self, response: &Response) -> Result<(), ProtocolError> {
        let err = |e| ProtocolError::Io("sending a response", e);
        self.write_all(&response.header().encode()).map_err(err)?;
        self.write_all(response.payload()).map_err(err)
    }

    /// Reads a response; its payload may be at most `limits.max_json` bytes.
    pub fn recv_response(&mut self, limits: &Limits) -> Result<Response, ProtocolError> {
        let mut bytes = [0u8; HEADER_LEN];
        read_exact(self, &mut bytes).map_err(|e| ProtocolError::Io("reading the response", e))?;
        let header = ResponseHeader::decode(&bytes)?;
        if header.length > limits.max_json {
            return Err(ProtocolError::ResponseTooLong {
                length: header.length,
                limit: limits.max_json,
            });
        }
        let payload = self.read_payload(header.length)?;
        Ok(match header.status {
            Status::Ok => Response::Ok(payload),
            Status::Error => Response::Error(String::from_utf8_lossy(&payload).into_owned()),
        })
    }

    /// Sends a request and waits for its response: the Ok payload, or the other side's error
    /// as [`ProtocolError::Remote`].
    pub fn request(&mut self, command: Command, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        let sent = self.send_request(command, payload);
        self.finish(sent)
    }

    /// Like [`Channel::request`], with descriptors after the payload (MemoryFds and Fds).
    pub fn request_with_fds(
        &mut self,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u8>, ProtocolError> {
        let sent = self.send_request_with_fds(command, payload, fds);
        self.finish(sent)
    }

    /// Sends a request frame with descriptors after the payload, not waiting for the answer.
    pub fn send_request_with_fds(
        &mut self,
        command: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        self.send_request(command, payload).and_then(|()| {
            self.send_fds(fds)
                .map_err(|e| ProtocolError::Io("sending descriptors", e))
        })
    }

    /// The better error for `e`, a failed send after `answers` requests whose answers were
    /// not read yet: a destination that refuses a request answers it and closes without
    /// reading the rest, so a later write fails, and its refusal says why.
    pub fn refusal(&mut self, e: ProtocolError, answers: usize) -> ProtocolError {
        if !closed(&e) {
            // The frame is half sent for another reason: no answer is coming.
            return e;
        }
        for _ in 0..answers + 1 {
            match self.recv_response(&Limits::default()) {
                Ok(Response::Ok(_)) => continue,
                Ok(Response::Error(message)) => return ProtocolError::Remote(message),
                Err(_) => break,
            }
        }
        e
    }

    /// Sends a Memory request, reading guest memory through `read(gpa, buf)`, and waits for
    /// its response. Returns the bytes of memory sent.
    pub fn send_memory(
        &mut self,
        ranges: &crate::protocol::MemoryRanges,
        read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<u64, ProtocolError> {
        let sent = crate::protocol::send_memory(self, ranges, read);
        let bytes = *sent.as_ref().unwrap_or(&0);
        self.finish(sent.map(|_| ())).map(|_| bytes)
    }

    /// The response to a request that was sent, or tried to be.
    fn finish(&mut self, sent: Result<(), ProtocolError>) -> Result<Vec<u8>, ProtocolError> {
        if let Err(e) = sent {
            return Err(self.refusal(e, 0));
        }
        match self.recv_response(&Limits::default())? {
            Response::Ok(payload) => Ok(payload),
            Response::Error(message) => Err(ProtocolError::Remote(message)),
        }
    }
}

/// Whether `e` is a write that failed because the peer closed the connection.
fn closed(e: &ProtocolError) -> bool {
    matches!(e, ProtocolError::Io(_, io)
        if matches!(io.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset))
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a vanished peer is an error to report, not a SIGPIPE to die of,
        // whatever the process did with that signal.
        // SAFETY: send reads at most `buf.len()` bytes from `buf`.
        let n = unsafe {
            libc::send(
                self.as_fd().as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// One byte, `fds.len()`, carrying `fds` (at most [`MAX_FDS_PER_MESSAGE`]).
fn send_fd_message(sock: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    match fd_passing::send(sock, &[fds.len() as u8], fds)? {
        1 => Ok(()),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// Reads one byte and the descriptors that came with it (owned, so closed on every error
/// path).
fn recv_fd_message(sock: &UnixStream) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut body = [0u8; 1];
    let (n, fds) = fd_passing::recv(sock, &mut body, MAX_FDS_PER_MESSAGE)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "The peer closed the connection before sending all descriptors",
        ));
    }
    Ok((body[0], fds))
}

#[derive(Debug)]
enum ListenerKind {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A listening socket for `vm.receive-migration`. A UNIX socket file is removed when the
/// listener is dropped.
#[derive(Debug)]
pub struct Listener {
    kind: ListenerKind,
    /// The socket file we created, with its device and inode, so that drop removes ours only.
    socket_file: Option<(PathBuf, u64, u64)>,
}

impl Listener {
    /// Listens on a `unix:` or `tcp:` URL. A socket file left by a listener that is gone is
    /// replaced; one with a live listener, or a file that is not a socket, is refused.
    pub fn bind(url: &MigrationUrl) -> io::Result<Listener> {
        match url {
            MigrationUrl::Unix(path) => {
                let listener = bind_unix(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                Ok(Listener {
                    kind: ListenerKind::Unix(listener),
                    socket_file: Some((path.clone(), meta.dev(), meta.ino())),
                })
            }
            MigrationUrl::Tcp { host, port } => Ok(Listener {
                kind: ListenerKind::Tcp(TcpListener::bind((host.as_str(), *port))?),
                socket_file: None,
            }),
            MigrationUrl::File(_) => Err(unsupported(
                "A file: URL names a snapshot directory; migrations listen on unix: or tcp:",
            )),
        }
    }

    /// Waits for a connection.
    pub fn accept(&self) -> io::Result<Channel> {
        match &self.kind {
            ListenerKind::Unix(l) => l.accept().map(|(s, _)| Channel::from(s)),
            ListenerKind::Tcp(l) => l.accept().map(|(s, _)| Channel::from(s)),
        }
    }

    /// Waits at most `timeout` for a connection; [`io::ErrorKind::TimedOut`] after that.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Channel> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so that the last fraction of a millisecond is slept, not spun.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd {
                fd: self.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, and a count of one.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r > 0 {
                return self.accept();
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("No migration connection within {timeout:?}"),
                ));
            }
        }
    }

    /// Where the listener listens, with the port the kernel picked if it was bound to port 0.
    pub fn local_url(&self) -> io::Result<MigrationUrl> {
        match &self.kind {
            ListenerKind::Unix(_) => Ok(MigrationUrl::Unix(
                self.socket_file
                    .as_ref()
                    .expect("unix listeners have a path")
                    .0
                    .clone(),
            )),
            ListenerKind::Tcp(l) => {
                let addr = l.local_addr()?;
                Ok(MigrationUrl::Tcp {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                })
            }
        }
    }

    /// Listens on TCP at `addr` (any port when it is 0, which URLs cannot say).
    pub fn bind_tcp(addr: impl std::net::ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener {
            kind: ListenerKind::Tcp(TcpListener::bind(addr)?),
            socket_file: None,
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.kind {
            ListenerKind::Unix(l) => l.as_fd(),
            ListenerKind::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some((path, dev, ino)) = &self.socket_file else {
            return;
        };
        // Only the file we created: someone may have replaced it since.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.dev() == *dev && m.ino() == *ino => {
                if let Err(e) = std::fs::remove_file(path) {
                    log::warn!("Cannot remove migration socket {}: {e}", path.display());
                }
            }
            _ => {}
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match fd_passing::bind_owner_only(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        other => return other,
    }
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if unix_listener_alive(path)? {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("Another process listens on {}", path.display()),
        ));
    }
    // A socket file whose listener is gone.
    fd_passing::remove_stale_socket(path)?;
    fd_passing::bind_owner_only(path)
}

/// Whether a listening socket is bound to `path`, by /proc/net/unix rather than by connecting:
/// a probe connection would be accepted by a live baton as its migration.
fn unix_listener_alive(path: &Path) -> io::Result<bool> {
    /// `__SO_ACCEPTCON` in the Flags column.
    const LISTENING: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix")?;
    let wanted = path.as_os_str().to_string_lossy();
    Ok(table
        .lines()
        .skip(1)
        .filter_map(proc_net_unix_entry)
        .any(|(flags, bound)| flags & LISTENING != 0 && bound == wanted))
}

/// Flags and path of a /proc/net/unix line: "Num RefCount Protocol Flags Type St Inode Path",
/// where the inode is space-padded and the path (which may hold spaces) ends the line.
fn proc_net_unix_entry(line: &str) -> Option<(u32, &str)> {
    let mut rest = line;
    let mut fields = [""; 7];
    for field in &mut fields {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let path = rest.strip_prefix(' ')?;
    Some((u32::from_str_radix(fields[3], 16).ok()?, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, Limits, Response};
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::thread;

    fn unix_pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::from(a), Channel::from(b))
    }

    fn tcp_pair() -> (Channel, Channel) {
        let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
        let url = listener.local_url().unwrap();
        assert!(
            matches!(&url, MigrationUrl::Tcp { host, port } if host == "127.0.0.1" && *port != 0)
        );
        let client = Channel::connect(&url).unwrap();
        let server = listener.accept_timeout(Duration::from_secs(10)).unwrap();
        (client, server)
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir();
        dir.join(format!("baton-migration-{}-{name}", std::process::id()))
    }

    /// Answers one request: Ok with the payload reversed, or Error for State.
    fn echo_reversed(mut server: Channel) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let header = server.recv_request_header().unwrap();
            let mut payload = server.read_payload(header.length).unwrap();
            payload.reverse();
            let response = match header.command {
                Command::State => Response::Error("bad state: really".into()),
                _ => Response::Ok(payload),
            };
            server.send_response(&response).unwrap();
        })
    }

    #[test]
    fn request_response_round_trip() {
        for (mut client, server) in [unix_pair(), tcp_pair()] {
            let t = echo_reversed(server);
            assert_eq!(client.request(Command::Config, b"hello").unwrap(), b"olleh");
            t.join().unwrap();
        }
        for (mut client, server) in [unix_pair(), tcp_pair()] {
            let t = echo_reversed(server);
            let e = client.request(Command::State, b"x").unwrap_err();
            assert!(
                matches!(&e, ProtocolError::Remote(m) if m == "bad state: really"),
                "{e}"
            );
            t.join().unwrap();
        }
    }

    #[test]
    fn is_unix_asks_the_socket() {
        let (a, _b) = unix_pair();
        assert!(a.is_unix());
        let (c, d) = tcp_pair();
        assert!(!c.is_unix() && !d.is_unix());
        // The Rust type does not decide: a TCP socket dressed as a UnixStream is still TCP.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let disguised = Channel::from(UnixStream::from(OwnedFd::from(tcp)));
        assert!(!disguised.is_unix());
    }

    /// Makes room for `n` more descriptors, if the hard limit allows.
    fn raise_fd_limit(n: u64) -> bool {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return false;
        }
        let want = n + 256;
        if lim.rlim_cur >= want {
            return true;
        }
        if lim.rlim_max < want {
            return false;
        }
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads the struct we own; the soft limit stays under the hard one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
    }

    fn identity(fd: BorrowedFd<'_>) -> (u64, u64) {
        let meta = File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap();
        (meta.dev(), meta.ino())
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn many_descriptors_arrive_in_order() {
        // Over two chunks of 253 at the very least; 600 when the limit allows.
        let n = if raise_fd_limit(600) { 600 } else { 300 };
        let (r1, _w1) = pipe();
        let (r2, _w2) = pipe();
        let null = OwnedFd::from(File::open("/dev/null").unwrap());
        let zero = OwnedFd::from(File::open("/dev/zero").unwrap());
        let originals = [r1, r2, null, zero];
        let ids: Vec<_> = originals.iter().map(|fd| identity(fd.as_fd())).collect();
        let (mut a, mut b) = unix_pair();
        let sender = thread::spawn(move || {
            let fds: Vec<BorrowedFd<'_>> = (0..n).map(|i| originals[i % 4].as_fd()).collect();
            a.send_fds(&fds).unwrap();
            a.write_all(b"after").unwrap();
        });
        let got = b.recv_fds(n).unwrap();
        sender.join().unwrap();
        assert_eq!(got.len(), n);
        for (i, fd) in got.iter().enumerate() {
            assert_eq!(identity(fd.as_fd()), ids[i % 4], "descriptor {i}");
            // SAFETY: F_GETFD on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        // The stream goes on where the descriptors end.
        let mut after = [0u8; 5];
        b.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"after");
    }

    #[test]
    fn descriptors_over_tcp_are_refused() {
        let (mut a, mut b) = tcp_pair();
        let file = File::open("/dev/null").unwrap();
        let e = a.send_fds(&[file.as_fd()]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("UNIX domain socket"));
        assert_eq!(
            b.recv_fds(1).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        let e = a
            .request_with_fds(Command::Fds, b"{}", &[file.as_fd()])
            .unwrap_err();
        assert!(
            matches!(e, ProtocolError::Io("sending descriptors", _)),
            "{e}"
        );
    }

    #[test]
    fn descriptor_stream_errors() {
        // A plain byte where descriptors should be.
        let (mut a, mut b) = unix_pair();
        a.write_all(&[1]).unwrap();
        let e = b.recv_fds(1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // The byte lies about the count.
        let (a, mut b) = unix_pair();
        let file = File::open("/dev/null").unwrap();
        send_fd_message(
            a.unix_stream().unwrap(),
            &[file.as_raw_fd(), file.as_raw_fd()],
        )
        .unwrap();
        let e = b.recv_fds(1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // The peer leaves halfway.
        let (mut a, mut b) = unix_pair();
        a.send_fds(&[file.as_fd(); 3]).unwrap();
        drop(a);
        let e = b.recv_fds(4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Zero descriptors need no message.
        let (_a, mut b) = unix_pair();
        assert!(b.recv_fds(0).unwrap().is_empty());
    }

    #[test]
    fn a_peer_closing_mid_frame_is_an_error() {
        for (mut a, mut b) in [unix_pair(), tcp_pair()] {
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let header = RequestHeader {
                command: Command::Config,
                length: 100,
            }
            .encode();
            a.write_all(&header[..8]).unwrap();
            drop(a);
            let e = b.recv_request_header().unwrap_err();
            assert!(
                matches!(&e, ProtocolError::Io("reading the request header", io)
                if io.kind() == io::ErrorKind::UnexpectedEof),
                "{e}"
            );
        }
        for (mut a, mut b) in [unix_pair(), tcp_pair()] {
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            a.write_all(&[7u8; 10]).unwrap();
            drop(a);
            let e = b.read_payload(100).unwrap_err();
            assert!(e.to_string().contains("reading the payload"), "{e}");
            assert!(crate::protocol::error_chain(&e).contains("after 10 of 100 bytes"));
        }
        for (a, mut b) in [unix_pair(), tcp_pair()] {
            drop(a);
            assert!(b.recv_response(&Limits::default()).is_err());
        }
    }

    #[test]
    fn a_refused_request_reports_the_refusal() {
        // The destination refuses after the header and closes without reading the payload:
        // the source's write fails, but what it reports is the destination's reason.
        let (mut client, mut server) = unix_pair();
        let t = thread::spawn(move || {
            server.recv_request_header().unwrap();
            server
                .send_response(&Response::Error("State payload too long".into()))
                .unwrap();
        });
        let e = client
            .request(Command::State, &vec![0u8; 8 << 20])
            .unwrap_err();
        t.join().unwrap();
        assert!(
            matches!(&e, ProtocolError::Remote(m) if m == "State payload too long"),
            "{e}"
        );
    }

    #[test]
    fn responses_are_limited() {
        let (mut a, mut b) = unix_pair();
        a.send_response(&Response::Ok(vec![0; 100])).unwrap();
        let limits = Limits {
            max_json: 99,
            ..Limits::default()
        };
        let e = b.recv_response(&limits).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::ResponseTooLong {
                length: 100,
                limit: 99
            }
        ));
    }

    #[test]
    fn file_urls_are_not_channels() {
        let url = MigrationUrl::File("/tmp".into());
        assert_eq!(
            Channel::connect(&url).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        assert_eq!(
            Listener::bind(&url).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
    }

    #[test]
    fn unix_listener_lifecycle() {
        let path = temp_path("lifecycle.sock");
        let _ = std::fs::remove_file(&path);
        let url = MigrationUrl::Unix(path.clone());

        // A socket file left behind by a listener that is gone is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = Listener::bind(&url).unwrap();
        assert_eq!(listener.local_url().unwrap(), url);

        // A live listener is not.
        let e = Listener::bind(&url).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");

        let client = Channel::connect(&url).unwrap();
        let server = listener.accept().unwrap();
        assert!(client.is_unix() && server.is_unix());

        let start = Instant::now();
        let e = listener
            .accept_timeout(Duration::from_millis(50))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(50));

        drop(listener);
        assert!(!path.exists(), "the socket file goes with the listener");

        // Not a socket: left alone.
        std::fs::write(&path, b"precious").unwrap();
        let e = Listener::bind(&url).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn listener_drop_spares_a_replaced_file() {
        let path = temp_path("replaced.sock");
        let _ = std::fs::remove_file(&path);
        let listener = Listener::bind(&MigrationUrl::Unix(path.clone())).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(listener);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn proc_net_unix_lines() {
        let line = "000000002b039239: 00000002 00000000 00010000 0001 01 12345 /run/a b.sock";
        assert_eq!(proc_net_unix_entry(line), Some((0x10000, "/run/a b.sock")));
        let unnamed = "000000006cb3a871: 00000003 00000000 00000000 0001 03  1600";
        assert_eq!(proc_net_unix_entry(unnamed), None);
    }
}
