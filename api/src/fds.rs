//! File descriptors riding along with API requests (SCM_RIGHTS, through `fd_passing`), as
//! TAP queues for `vm.create` and `vm.add-net` do. Descriptor numbers never appear in JSON:
//! what the receiver gets are its own new descriptors, owned and closed on drop.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors that came with one request.
pub type Fds = Vec<OwnedFd>;

/// Most descriptors one request may carry.
pub const MAX_FDS: usize = 64;

/// Whether `fd` is an open descriptor of this process (one named on a command line).
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Receives bytes from `stream` into `buf` like `read`, adding the descriptors that came
/// with them to `fds`. More than [`MAX_FDS`] in all is an error (InvalidData), and those of
/// that message are closed.
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Fds) -> io::Result<usize> {
    let (n, got) = fd_passing::recv(stream, buf, MAX_FDS - fds.len().min(MAX_FDS))?;
    fds.extend(got);
    Ok(n)
}

/// Writes all of `data` to `stream`, passing `fds` with the first bytes.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = if fds.is_empty() {
        0
    } else {
        fd_passing::send(stream, data, fds)?
    };
    io::Write::write_all(&mut &*stream, &data[sent..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn descriptors_arrive_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_with_fds(&a, b"hello", &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        (&a).write_all(b" world").unwrap();
        drop(a);
        let mut fds = Vec::new();
        let mut text = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            let n = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        assert_eq!(text, b"hello world");
        assert_eq!(fds.len(), 2);
        // They are new descriptors of the same file.
        assert_ne!(fds[0].as_raw_fd(), file.as_raw_fd());
    }
}
