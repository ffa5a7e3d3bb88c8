//! The small Linux guest: a kernel built from Debian's source by `scripts/linux-kernel.sh`
//! (whose cache directory `scripts/test.sh` exports as `BATON_LINUX_DIR`), booted with no
//! user space. Its network comes up by IP autoconfiguration and a long `rootdelay` keeps it
//! alive there, answering ping; the tests read the rest from its kernel log.
//!
//! Guest kernel code is interpreted on the nested PVM hosts of baton's CI, so a boot takes a
//! minute or two: every wait here is long, and tests boot one Linux per scenario.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Console, NetNs};

/// The guest's address on its first card.
pub const GUEST_IP: &str = "10.0.0.2";
/// The host's address on the TAP.
pub const HOST_IP: &str = "10.0.0.1";
/// From start to a configured network, with room for a loaded machine.
pub const BOOT: Duration = Duration::from_secs(600);
/// A kernel log line that comes after another one already seen.
pub const LATER: Duration = Duration::from_secs(300);
/// The kernel's line once its network is configured.
pub const NETWORK_UP: &str = "IP-Config: Complete";

/// The kernel command line: the serial console, the CPUID features nested PVM hosts need
/// hidden, a static address, and a root that is waited for forever so the kernel stays up
/// without user space. `loglevel=8` shows evbug's input events.
pub fn cmdline() -> String {
    format!(
        "console=ttyS0 earlyprintk=serial noxsave clearcpuid=151,308 loglevel=8 \
         ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off rootdelay=100000 panic=0"
    )
}

/// `file` (`vmlinux` or `bzImage`) of the small Linux; fails the test with what to run when
/// it is missing.
pub fn kernel(file: &str) -> PathBuf {
    let dir = std::env::var_os("BATON_LINUX_DIR").unwrap_or_else(|| {
        panic!(
            "BATON_LINUX_DIR is not set: run scripts/test.sh, or export \
             BATON_LINUX_DIR=$(scripts/linux-kernel.sh)"
        )
    });
    let path = PathBuf::from(dir).join(file);
    assert!(
        path.is_file(),
        "{} missing: rerun scripts/linux-kernel.sh",
        path.display()
    );
    path
}

/// What a Linux VM gets besides its kernel.
pub struct Setup<'a> {
    /// `vmlinux` or `bzImage`.
    pub kernel: &'a str,
    /// vCPUs.
    pub cpus: u8,
    /// Queues of the network card on TAP `tap0` (two per pair).
    pub queues: usize,
    /// Raw disk images, in order (`vda`, `vdb` ...).
    pub disks: Vec<PathBuf>,
    /// A virtio-rng device.
    pub rng: bool,
}

impl Setup<'_> {
    /// The VmConfig JSON: 512 MiB of shared memory (so it can migrate with local=on), the
    /// serial console on `serial`, the card on `tap0` (baton creates it with the host's
    /// address unless it exists).
    pub fn config(&self, serial: &Path) -> String {
        let disks: Vec<serde_json::Value> = self
            .disks
            .iter()
            .map(|p| serde_json::json!({ "path": p }))
            .collect();
        let mut config = serde_json::json!({
            "cpus": {"boot_vcpus": self.cpus, "max_vcpus": self.cpus, "template": "pvm"},
            "memory": {"size": 512u64 << 20, "shared": true},
            "payload": {"kernel": kernel(self.kernel), "cmdline": cmdline()},
            "serial": {"mode": "Socket", "socket": serial},
            "net": [{
                "id": "net0", "tap": "tap0", "ip": HOST_IP, "mask": "255.255.255.0",
                "num_queues": self.queues,
            }],
            "disks": disks,
        });
        if self.rng {
            config["rng"] = serde_json::json!({});
        }
        config.to_string()
    }
}

/// Lines of a kernel log that say the platform baton offers is wrong: a driver that refused
/// a device, PCI interrupt routing that is missing, ACPI errors, a kernel oops or warning.
pub fn platform_problems(lines: &[String]) -> Vec<String> {
    const BAD: &[&str] = &[
        "failed with error",
        "no GSI",
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Exception",
        "unable to parse",
        "WARNING:",
        "BUG:",
        "Oops",
        "rcu_sched detected stalls",
        "Call Trace",
    ];
    lines
        .iter()
        .filter(|l| BAD.iter().any(|b| l.contains(b)))
        .cloned()
        .collect()
}

/// Waits for the kernel's network to come up and checks that nothing on the way says the
/// platform is wrong; returns the whole log so far.
pub fn wait_network_up(console: &mut Console) -> Vec<String> {
    console.wait_for(NETWORK_UP, BOOT);
    let problems = platform_problems(&console.seen);
    assert!(
        problems.is_empty(),
        "the kernel log shows problems with the platform:\n{}",
        problems.join("\n")
    );
    console.seen.clone()
}

/// CPU time each vCPU thread of process `pid` used over `over`, as a fraction of that time.
pub fn vcpu_load(pid: u32, over: Duration) -> Vec<(String, f64)> {
    // utime + stime, fields 14 and 15 of /proc/PID/task/TID/stat, in clock ticks.
    fn ticks(pid: u32) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if !comm.starts_with("vcpu") {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The command is in parentheses and may hold spaces: count from after it.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            out.push((comm.to_string(), t));
        }
        out.sort();
        out
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before = ticks(pid);
    let start = Instant::now();
    std::thread::sleep(over);
    let after = ticks(pid);
    let secs = start.elapsed().as_secs_f64();
    after
        .iter()
        .map(|(name, t)| {
            let t0 = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, t)| *t);
            (name.clone(), t.saturating_sub(t0) as f64 / hz / secs)
        })
        .collect()
}

/// Fails the test unless every vCPU thread of `pid` goes mostly idle while the guest is: a
/// vCPU that spins (an interrupt storm, a driver polling a queue the device never serves)
/// stays busy and shows up here long before anything else notices. A guest still catching
/// up after a flood (slow where its kernel code is interpreted) is busy for a while, then
/// idle: 3-second windows are measured until one is idle, for up to 30 s.
pub fn assert_vcpus_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut windows = Vec::new();
    loop {
        let load = vcpu_load(pid, Duration::from_secs(3));
        assert!(!load.is_empty(), "no vCPU threads in process {pid}");
        if load.iter().all(|(_, busy)| *busy < 0.25) {
            return;
        }
        windows.push(load);
        assert!(
            Instant::now() < deadline,
            "a vCPU of process {pid} stayed busy while the guest is idle, in every 3 s \
             window for 30 s: {windows:?}"
        );
    }
}

/// Fails the test unless the guest answers `count` pings from the host within 90 s, asking
/// again every 15 s. Pings may go unanswered for seconds while the guest and the host
/// resolve each other's addresses (after a flood either side's entry may have gone stale),
/// or while the guest works through frames that queued up: its kernel code is interpreted
/// and answers one echo in about 23 ms. ping itself gives up early once the host reports
/// the guest unreachable.
pub fn assert_answers(ns: &NetNs, count: u32) {
    assert_answers_from(ns, count, None);
}

/// [`assert_answers`] with pings sent from host address `from`, when given.
pub fn assert_answers_from(ns: &NetNs, count: u32, from: Option<&str>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let count_arg = count.to_string();
    let mut args = vec!["ping", "-n", "-c", &count_arg, "-i", "0.2", "-w", "15"];
    if let Some(from) = from {
        args.extend(["-I", from]);
    }
    args.push(GUEST_IP);
    loop {
        let out = ns.output(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ...": replies in flight when the count was
        // reached come on top.
        let received = text
            .split(',')
            .find_map(|part| part.trim().strip_suffix(" received")?.parse::<u32>().ok())
            .unwrap_or(0);
        if out.status.success() && received >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not answer{}:\n{text}{}",
            from.map(|f| format!(" {f}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// ARP frames seen on an interface, captured with an AF_PACKET socket inside a namespace.
pub struct ArpWatch {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

/// An ARP packet's operation, sender and target IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sender_mac: [u8; 6],
    /// Sender protocol address.
    pub sender_ip: [u8; 4],
    /// Target protocol address.
    pub target_ip: [u8; 4],
}

impl Arp {
    /// A gratuitous ARP: a host announcing its own address (sender and target the same).
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

const ETH_P_ARP: u16 = 0x0806;

impl ArpWatch {
    /// Starts capturing the ARP frames of interface `ifname` in `ns`.
    pub fn start(ns: &NetNs, ifname: &str) -> Self {
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let sock = ns.enter(move || {
            // SAFETY: plain socket(2) call; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from(ETH_P_ARP.to_be()),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: `ifname` is a NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert_ne!(index, 0, "no interface {ifname:?}");
            // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ARP.to_be();
            addr.sll_ifindex = index as i32;
            // SAFETY: `addr` is a sockaddr_ll of the length passed.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval of the length passed.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
            sock
        });
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (s, f) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Acquire) {
                // SAFETY: `buf` is writable for its length.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    f.lock().expect("ARP lock").push(buf[..n as usize].to_vec());
                }
            }
        });
        ArpWatch {
            stop,
            frames,
            thread: Some(thread),
        }
    }

    /// The ARP packets seen so far.
    pub fn seen(&self) -> Vec<Arp> {
        self.frames
            .lock()
            .expect("ARP lock")
            .iter()
            .filter_map(|f| parse_arp(f))
            .collect()
    }

    /// Waits until a gratuitous ARP for `ip` shows; returns it.
    pub fn wait_gratuitous(&self, ip: [u8; 4], timeout: Duration) -> Arp {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self
                .seen()
                .into_iter()
                .find(|a| a.is_gratuitous() && a.sender_ip == ip)
            {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "no gratuitous ARP for {ip:?} within {timeout:?}; ARP seen: {:?}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ArpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An Ethernet frame carrying IPv4-over-Ethernet ARP, parsed.
fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let arp = frame.get(14..42)?;
    if u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_ARP || arp[4] != 6 || arp[5] != 4 {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([arp[6], arp[7]]),
        sender_mac: arp[8..14].try_into().ok()?,
        sender_ip: arp[14..18].try_into().ok()?,
        target_ip: arp[24..28].try_into().ok()?,
    })
}

/// Writes a raw disk image of `mib` MiB holding an MBR partition table with one Linux
/// partition from 1 MiB to the end, and nothing else.
pub fn partitioned_disk(path: &Path, mib: u32) {
    let sectors = mib * 2048;
    let mut mbr = vec![0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let file = std::fs::File::create(path).expect("create disk image");
    std::io::Write::write_all(&mut &file, &mbr).expect("write MBR");
    file.set_len(u64::from(mib) << 20).expect("size disk image");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_is_recognised() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        let a = parse_arp(&f).unwrap();
        assert!(a.is_gratuitous());
        assert_eq!((a.op, a.sender_ip), (1, [10, 0, 0, 2]));
        f[41] = 1;
        assert!(!parse_arp(&f).unwrap().is_gratuitous());
        assert_eq!(parse_arp(&f[..30]), None);
    }

    #[test]
    fn problems_are_the_lines_that_name_one() {
        let log: Vec<String> = [
            "[ 1.0] ACPI: Interpreter enabled",
            "[ 2.0] acpi-ged: probe of ACPI0013:00 failed with error -22",
            "[ 3.0] virtio-pci 0000:00:01.0: PCI INT A: no GSI",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(platform_problems(&log), log[1..].to_vec());
    }
}
