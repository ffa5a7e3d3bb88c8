//! Descriptors over UNIX domain sockets (SCM_RIGHTS): the one place baton passes them, for
//! the API (TAP queues riding with `vm.create`, `vm.add-net`, `vm.restore` and
//! `vm.receive-migration`) and for migration (shared memory, backend transfer), and the one
//! place that asks whether a socket is a UNIX domain socket, and ([`path`]) the one place
//! that binds a UNIX socket path and removes a stale one.
//!
//! Built on vmm-sys-util's [`ScmSocket`], with what it leaves to its callers: received
//! descriptors are owned (closed on drop) and close-on-exec (its `recvmsg` does not ask for
//! MSG_CMSG_CLOEXEC, so they are marked right after), interrupted calls are retried, and a
//! message carrying more descriptors than the caller takes is an error that says so (the
//! kernel, or vmm-sys-util, closes them all).
#![warn(missing_docs)]

pub mod path;

pub use path::{bind_owner_only, remove_stale_socket};

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_PER_MESSAGE: usize = 253;

/// Sends `data` with `fds` attached to its first byte; returns how many bytes went (at least
/// one if `data` is not empty: the descriptors went with it). The receiver gets duplicates;
/// ours stay open.
pub fn send(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("At most {MAX_PER_MESSAGE} descriptors go in one message"),
        ));
    }
    loop {
        match stream.send_with_fds(&[data], fds) {
            Ok(n) => return Ok(n),
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

/// Receives bytes into `buf`, like `read`, and the descriptors attached to them, at most
/// `max_fds`: more is an error (the bytes are consumed and the descriptors closed), as is a
/// message the kernel had to cut short.
pub fn recv(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw = vec![-1 as RawFd; max_fds.min(MAX_PER_MESSAGE)];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let (n, count) = loop {
        // SAFETY: the iovec points at `buf`, which is ours and writable for its length.
        match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
            Ok(got) => break got,
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) if e.errno() == libc::ENOBUFS => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "More than {max_fds} descriptor(s) came in one message (or the \
                         process is out of descriptors); they were closed"
                    ),
                ))
            }
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    let fds: Vec<OwnedFd> = raw[..count]
        .iter()
        // SAFETY: the kernel just made these descriptors for us; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &fds {
        // SAFETY: F_SETFD on a descriptor we own changes only its close-on-exec flag.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((n, fds))
}

/// Whether `fd` is a UNIX domain socket (a socket of family AF_UNIX).
pub fn is_unix_socket(fd: BorrowedFd<'_>) -> bool {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && domain == libc::AF_UNIX
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn descriptors_arrive_with_their_bytes_owned_and_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            send(&a, b"hello", &[file.as_raw_fd(), file.as_raw_fd()]).unwrap(),
            5
        );
        (&a).write_all(b" world").unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(&b, &mut buf, 8).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        assert!(fds.iter().all(cloexec));
        assert_ne!(fds[0].as_raw_fd(), file.as_raw_fd(), "new descriptors");
        // A read ends where descriptors are attached: the rest comes next, without any.
        let (n, fds) = recv(&b, &mut buf, 8).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b" world"[..], 0));
    }

    #[test]
    fn too_many_descriptors_are_an_error_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send(&a, b"x", &[file.as_raw_fd(); 3]).unwrap();
        let mut buf = [0u8; 4];
        let e = recv(&b, &mut buf, 2).unwrap_err();
        assert!(e.to_string().contains("More than 2 descriptor(s)"), "{e}");
        // None taken at all: still an error, not a silent drop.
        send(&a, b"y", &[file.as_raw_fd()]).unwrap();
        assert!(recv(&b, &mut buf, 0).is_err());
        let many = vec![file.as_raw_fd(); MAX_PER_MESSAGE + 1];
        assert_eq!(
            send(&a, b"z", &many).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn only_unix_sockets_are_unix_sockets() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(is_unix_socket(a.as_fd()));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!is_unix_socket(tcp.as_fd()));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(!is_unix_socket(file.as_fd()));
    }
}
