//! File descriptors riding along with API requests (SCM_RIGHTS), as TAP queues for
//! `vm.create` and `vm.add-net` do. Descriptor numbers never appear in JSON: what the
//! receiver gets are its own new descriptors, owned and closed on drop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Descriptors that came with one request.
pub type Fds = Vec<OwnedFd>;

/// Most descriptors one connection may pass; more are closed on arrival.
pub const MAX_FDS: usize = 64;
/// Descriptors one sendmsg carries at most (the kernel's SCM_MAX_FD is 253).
const PER_MESSAGE: usize = 253;

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Room for one message's ancillary data with [`PER_MESSAGE`] descriptors, in u64s.
const CONTROL_WORDS: usize = 130;

/// Whether `fd` is an open descriptor of this process (one named on a command line).
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Receives bytes from `stream` into `buf` like `read`, adding the descriptors that came
/// with them to `fds` (beyond [`MAX_FDS`] in all, they are closed on arrival).
pub fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Fds) -> io::Result<usize> {
    let mut control = [0u64; CONTROL_WORDS];
    debug_assert!(cmsg_space(PER_MESSAGE) <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg writes at most `iov_len` bytes into `buf` and `msg_controllen` bytes
    // into `control`, both owned here.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, within
    // `msg_controllen`; each SCM_RIGHTS payload holds whole descriptors, which are new and
    // ours to own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if fds.len() < MAX_FDS {
                        fds.push(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(n as usize)
}

/// Writes all of `data` to `stream`, passing `fds` with the first bytes.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {PER_MESSAGE} descriptors per request"),
        ));
    }
    let mut sent = 0;
    if !fds.is_empty() {
        let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len());
        // SAFETY: the control buffer has room for one SCM_RIGHTS message with `fds`;
        // sendmsg only reads the buffers.
        let n = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
            libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        sent = n as usize;
    }
    io::Write::write_all(&mut &*stream, &data[sent..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
