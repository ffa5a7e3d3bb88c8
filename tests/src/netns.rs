//! Network namespaces for tests that give a guest a network: each test makes its own,
//! creates its TAP and runs baton inside it, and the namespace is deleted when the test
//! ends, so no guest traffic leaves it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace, deleted on drop (with every interface in it).
pub struct NetNs {
    name: String,
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl NetNs {
    /// A new namespace with loopback up.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("baton-{tag}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        check(
            "ip netns add",
            Command::new("ip").args(["netns", "add", &name]).output(),
        );
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `args` inside the namespace; fails the test if it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        check(
            &args.join(" "),
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args)
                .output(),
        )
    }

    /// Runs `args` inside the namespace and returns its output, success or not.
    pub fn output(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{}: cannot run: {e}", args.join(" ")))
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens belong to the namespace
    /// and may be used from any thread afterwards.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace file we hold open; it changes only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }
}

impl NetNs {
    /// Opens one queue of TAP `name` in the namespace the way management software would
    /// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, multi-queue when asked), creating it if needed.
    pub fn open_tap(&self, name: &str, multi_queue: bool) -> OwnedFd {
        self.enter(|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            let mut req = [0u8; 40];
            req[..name.len()].copy_from_slice(name.as_bytes());
            let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            if multi_queue {
                flags |= libc::IFF_MULTI_QUEUE;
            }
            req[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
            // SAFETY: TUNSETIFF reads and fills a 40-byte struct ifreq, which `req` is.
            let rc =
                unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, req.as_mut_ptr()) };
            assert_eq!(
                rc,
                0,
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            );
            OwnedFd::from(file)
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
