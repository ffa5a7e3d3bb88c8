//! TAP interfaces: opened by name (created if missing) with one descriptor per queue pair, or
//! taken from descriptors a caller passed in; the vnet header and offloads; and the few
//! interface settings baton applies to a TAP it created (address, MAC, MTU, up).
//!
//! Every descriptor is non-blocking and close-on-exec, and carries the 12-byte virtio-net
//! header (VERSION_1 layout) on every frame, so the device passes frames between guest
//! memory and the TAP without copying or rewriting headers.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

/// Bytes of the vnet header on every frame (virtio 1.x layout, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name, without the terminating NUL.
pub const IFNAMSIZ: usize = 15;

/// The TUN/TAP ioctls (`linux/if_tun.h`: type 'T'), encoded by vmm-sys-util's macros.
mod tun {
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    const TUNTAP: libc::c_uint = b'T' as libc::c_uint;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
    ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, libc::c_uint);
    ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, libc::c_int);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);
    ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, libc::c_int);
}
use tun::{TUNGETIFF, TUNGETVNETHDRSZ, TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};

// The interface ioctls on a socket (SIOC*) are plain numbers, not _IOC encodings: libc's.
const ARPHRD_ETHER: u16 = 1;

/// Errors opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is empty, too long or has a NUL.
    #[error("Invalid TAP name '{0}': 1 to 15 bytes, no NUL")]
    Name(String),
    /// /dev/net/tun could not be opened.
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF refused: usually an existing TAP whose queue mode or type differs.
    #[error("Cannot attach to TAP '{name}' with {queues} queue(s) (an existing interface with another queue mode, type or owner refuses this)")]
    Attach {
        /// Interface name.
        name: String,
        /// Queue pairs asked for.
        queues: usize,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A TAP ioctl failed.
    #[error("TAP '{name}': cannot {what}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// What was attempted.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A passed descriptor is not a TUN/TAP queue at all.
    #[error("Descriptor {0} is not a TAP: TUNGETIFF refused it")]
    NotTun(RawFd, #[source] io::Error),
    /// A passed descriptor is a TUN/TAP queue, but not a TAP with a vnet header.
    #[error("Descriptor {0} is not a TAP opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    NotTap(RawFd),
    /// Passed descriptors name different interfaces.
    #[error("Descriptors belong to different interfaces ('{0}' and '{1}')")]
    Mixed(String, String),
    /// Transferred descriptors do not match the state that came with them.
    #[error("The transferred TAP backend does not match its state: {0}")]
    Transferred(String),
}

/// `struct ifreq`: an interface name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes(self.data[..4].try_into().expect("4 bytes"))
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > IFNAMSIZ || name.contains('\0') || name.contains('/') {
        return Err(Error::Name(name.into()));
    }
    Ok(())
}

/// vmm-sys-util's ioctl calls answer -1 with errno set; this turns that into the error.
fn ioctl_result(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What TUNGETIFF says about a queue's descriptor.
#[derive(Debug)]
pub(crate) struct TunInfo {
    /// The interface.
    pub name: String,
    /// IFF_* flags, IFF_DETACH_QUEUE included when the queue is detached.
    pub flags: i32,
    /// File status flags (O_NONBLOCK ...).
    pub status: i32,
}

impl TunInfo {
    fn of(fd: &impl AsRawFd) -> Result<Self, Error> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::new("");
        // SAFETY: `req` is a full `struct ifreq` that TUNGETIFF fills.
        ioctl_result(unsafe { ioctl_with_mut_ref(fd, TUNGETIFF(), &mut req) })
            .map_err(|e| Error::NotTun(raw, e))?;
        let flags = i32::from(req.short()) & 0xffff;
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & want != want {
            return Err(Error::NotTap(raw));
        }
        // SAFETY: F_GETFL only reads the descriptor's status flags.
        let status = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        Ok(TunInfo {
            name: req.name(),
            flags,
            status,
        })
    }

    /// Whether the queue receives frames.
    pub fn attached(&self) -> bool {
        self.flags & libc::IFF_DETACH_QUEUE == 0
    }
}

/// One queue of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// How the guest's acked offloads map to what the TAP may hand us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (GUEST_CSUM).
    pub csum: bool,
    /// TCP segmentation offload (GUEST_TSO4/6).
    pub tso4: bool,
    /// TCP segmentation offload over IPv6.
    pub tso6: bool,
    /// ECN with TSO.
    pub tso_ecn: bool,
    /// UDP fragmentation offload (GUEST_UFO).
    pub ufo: bool,
}

impl Offloads {
    /// The TUNSETOFFLOAD flags.
    pub fn tun_flags(&self) -> libc::c_uint {
        let mut f = 0;
        if self.csum {
            f |= libc::TUN_F_CSUM;
            if self.tso4 {
                f |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                f |= libc::TUN_F_TSO6;
            }
            if self.tso_ecn && (self.tso4 || self.tso6) {
                f |= libc::TUN_F_TSO_ECN;
            }
            if self.ufo {
                f |= libc::TUN_F_UFO;
            }
        }
        f
    }
}

/// Whether an interface called `name` exists in this network namespace.
pub fn exists(name: &str) -> bool {
    interface_index(name).is_ok()
}

/// The kernel's index of interface `name`.
pub fn interface_index(name: &str) -> io::Result<i32> {
    if check_name(name).is_err() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let sock = control_socket()?;
    let mut req = IfReq::new(name);
    // SAFETY: `req` is a full `struct ifreq`.
    ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFINDEX, &mut req) })?;
    Ok(req.int())
}

pub(crate) fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Opens `queues` queues of TAP `name`, creating the interface if it does not exist
    /// (the kernel removes a TAP it created when the last queue closes).
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<Tap>, Error> {
        check_name(name)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        (0..queues)
            .map(|_| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open("/dev/net/tun")
                    .map_err(Error::OpenTun)?;
                let mut req = IfReq::new(name);
                req.set_short(flags as i16);
                // SAFETY: `req` is a full `struct ifreq` that TUNSETIFF reads and fills.
                ioctl_result(unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) }).map_err(
                    |source| Error::Attach {
                        name: name.into(),
                        queues,
                        source,
                    },
                )?;
                let tap = Tap {
                    file,
                    name: req.name(),
                };
                tap.set_vnet_hdr_len()?;
                Ok(tap)
            })
            .collect()
    }

    /// Wraps descriptors of one TAP interface (one per queue pair) passed by a caller. They
    /// must carry the vnet header; they are made non-blocking and close-on-exec.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Result<Vec<Tap>, Error> {
        let mut taps: Vec<Tap> = Vec::with_capacity(fds.len());
        for fd in fds {
            let raw = fd.as_raw_fd();
            let name = TunInfo::of(&fd)?.name;
            if let Some(first) = taps.first() {
                if first.name != name {
                    return Err(Error::Mixed(first.name.clone(), name));
                }
            }
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(raw, libc::F_GETFL);
                libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
                libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            let tap = Tap {
                file: File::from(fd),
                name,
            };
            tap.set_vnet_hdr_len()?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Wraps a descriptor another baton handed over, exactly as it is: no TUNSETIFF, no
    /// vnet header or flag change, since the source shares its open file. Returns the
    /// descriptor's interface name, and whether it is attached.
    pub(crate) fn adopt(fd: OwnedFd) -> Result<(Tap, TunInfo), Error> {
        let info = TunInfo::of(&fd)?;
        let tap = Tap {
            file: File::from(fd),
            name: info.name.clone(),
        };
        Ok((tap, info))
    }

    /// Wraps any descriptor as a TAP queue, unchecked: the fuzz targets give a network
    /// card's queues a datagram socket, which frames move through as through a TAP.
    #[cfg(feature = "fuzzing")]
    pub fn unchecked(fd: OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
            name: "fuzz".into(),
        }
    }

    /// What the kernel says about this queue.
    pub(crate) fn info(&self) -> Result<TunInfo, Error> {
        TunInfo::of(&self.file)
    }

    /// The vnet header length the TAP uses (shared by every queue).
    pub fn vnet_hdr_len(&self) -> Result<u32, Error> {
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int.
        ioctl_result(unsafe { ioctl_with_mut_ref(&self.file, TUNGETVNETHDRSZ(), &mut len) })
            .map_err(self.ioctl_error("read the vnet header length"))?;
        Ok(len as u32)
    }

    fn ioctl_error(&self, what: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    fn set_vnet_hdr_len(&self) -> Result<(), Error> {
        let mut len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        ioctl_result(unsafe { ioctl_with_mut_ref(&self.file, TUNSETVNETHDRSZ(), &mut len) })
            .map_err(self.ioctl_error("set the vnet header length"))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Sets which offloaded frames the TAP may hand to the guest.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), Error> {
        let flags = offloads.tun_flags().into();
        // SAFETY: TUNSETOFFLOAD takes an integer, not a pointer.
        ioctl_result(unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags) })
            .map_err(self.ioctl_error("set offloads"))
    }

    /// Attaches (`true`) or detaches this queue from a multi-queue TAP: a detached queue
    /// receives nothing, so frames go to queues the guest uses.
    pub fn set_queue_enabled(&self, enabled: bool) -> Result<(), Error> {
        let mut req = IfReq::new("");
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.set_short(flag as i16);
        // SAFETY: `req` is a full `struct ifreq` that TUNSETQUEUE reads.
        ioctl_result(unsafe { ioctl_with_mut_ref(&self.file, TUNSETQUEUE(), &mut req) })
            .map_err(self.ioctl_error("attach or detach a queue"))
    }

    /// Sets the interface's IPv4 address and netmask.
    pub fn set_ipv4(&self, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        for (request, value, what) in [
            (libc::SIOCSIFADDR, addr, "set the address"),
            (libc::SIOCSIFNETMASK, mask, "set the netmask"),
        ] {
            let mut req = IfReq::new(&self.name);
            // struct sockaddr_in: family, port, address.
            req.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            req.data[4..8].copy_from_slice(&value.octets());
            // SAFETY: `req` is a full `struct ifreq` holding a sockaddr_in.
            ioctl_result(unsafe { ioctl_with_mut_ref(&sock, request, &mut req) })
                .map_err(self.ioctl_error(what))?;
        }
        Ok(())
    }

    /// Sets the interface's own MAC address (the host side of the link).
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        let mut req = IfReq::new(&self.name);
        req.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        req.data[2..8].copy_from_slice(&mac);
        // SAFETY: `req` is a full `struct ifreq` holding a sockaddr with the address.
        ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCSIFHWADDR, &mut req) })
            .map_err(self.ioctl_error("set the MAC address"))
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> Result<[u8; 6], Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        let mut req = IfReq::new(&self.name);
        // SAFETY: `req` is a full `struct ifreq` that SIOCGIFHWADDR fills.
        ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFHWADDR, &mut req) })
            .map_err(self.ioctl_error("read the MAC address"))?;
        Ok(req.data[2..8].try_into().expect("6 bytes"))
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        let mut req = IfReq::new(&self.name);
        req.set_int(i32::from(mtu));
        // SAFETY: `req` is a full `struct ifreq` holding an int.
        ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCSIFMTU, &mut req) })
            .map_err(self.ioctl_error("set the MTU"))
    }

    /// The interface MTU.
    pub fn mtu(&self) -> Result<u16, Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        self.mtu_on(&sock)
    }

    /// The interface MTU, asked on `sock`, a socket from [`control_socket`] (kept open by
    /// a caller that must not create sockets later: a vCPU thread, under its seccomp filter).
    pub(crate) fn mtu_on(&self, sock: &OwnedFd) -> Result<u16, Error> {
        let mut req = IfReq::new(&self.name);
        // SAFETY: `req` is a full `struct ifreq` that SIOCGIFMTU fills.
        ioctl_result(unsafe { ioctl_with_mut_ref(sock, libc::SIOCGIFMTU, &mut req) })
            .map_err(self.ioctl_error("read the MTU"))?;
        Ok(req.int().clamp(0, i32::from(u16::MAX)) as u16)
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> Result<(), Error> {
        let sock = control_socket().map_err(self.ioctl_error("open a control socket"))?;
        let mut req = IfReq::new(&self.name);
        // SAFETY: `req` is a full `struct ifreq` that SIOCGIFFLAGS fills.
        ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) })
            .map_err(self.ioctl_error("read the interface flags"))?;
        let flags = req.short() | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        req.set_short(flags);
        // SAFETY: as above, with the flags set.
        ioctl_result(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCSIFFLAGS, &mut req) })
            .map_err(self.ioctl_error("bring the interface up"))
    }

    /// Reads one frame (vnet header first) into the vectors; `Ok(None)` when none is queued.
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the caller's vectors describe writable memory; readv writes at most that.
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len().min(libc::c_int::MAX as usize) as libc::c_int,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (vnet header first) from the vectors.
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's vectors describe readable memory; writev reads at most that.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len().min(libc::c_int::MAX as usize) as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tun_ioctls_encode_as_the_kernel_headers_say() {
        assert_eq!(TUNSETIFF(), libc::TUNSETIFF as libc::c_ulong);
        assert_eq!(TUNSETOFFLOAD(), libc::TUNSETOFFLOAD as libc::c_ulong);
        assert_eq!(TUNGETIFF(), libc::TUNGETIFF as libc::c_ulong);
        assert_eq!(TUNGETVNETHDRSZ(), libc::TUNGETVNETHDRSZ as libc::c_ulong);
        assert_eq!(TUNSETVNETHDRSZ(), libc::TUNSETVNETHDRSZ as libc::c_ulong);
        assert_eq!(TUNSETQUEUE(), libc::TUNSETQUEUE as libc::c_ulong);
    }

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "0123456789abcdef", "a\0b", "a/b"] {
            assert!(matches!(check_name(bad), Err(Error::Name(_))), "{bad:?}");
        }
        check_name("tap0").unwrap();
        check_name("0123456789abcde").unwrap();
    }

    #[test]
    fn offload_flags_need_checksums() {
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            ufo: true,
        };
        assert_eq!(all.tun_flags(), 0x1f);
        // Segmentation without checksum offload is meaningless; the kernel refuses it.
        let no_csum = Offloads { csum: false, ..all };
        assert_eq!(no_csum.tun_flags(), 0);
        assert_eq!(Offloads::default().tun_flags(), 0);
    }
}
