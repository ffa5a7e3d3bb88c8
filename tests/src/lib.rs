//! Harness for baton's integration tests: finds the binaries, starts baton with a serial
//! socket, reads the guest's console line by line and waits for conditions with deadlines.
//!
//! Tests never sleep a fixed time: every wait polls for a condition until a deadline and
//! fails with what was seen so far. Without `/dev/kvm` the tests fail loudly.
#![warn(missing_docs)]

pub mod ch;
pub mod flood;
pub mod linux;
pub mod netns;

pub use flood::{fd_count, settled_fds, thread_count, FloodResult, PingFlood};
pub use netns::NetNs;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The test guest's ready marker.
pub const READY: &str = "baton-test-guest: ready";
/// The test guest's first boot line.
pub const BOOTING: &str = "baton-test-guest: booting";

/// Fails the test unless KVM is usable: integration tests must never pass vacuously.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "/dev/kvm is not usable ({e}): baton's integration tests boot real guests and need \
             KVM; run them on a host with KVM enabled and access to /dev/kvm"
        );
    }
}

/// The cargo target directory holding the binaries (`target/debug` or `target/release`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

fn binary(env: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join(name));
    assert!(
        path.is_file(),
        "{} not found: build the workspace first (`cargo build --workspace`) or set {env}",
        path.display()
    );
    path
}

/// Path of the `baton` binary.
pub fn baton_bin() -> PathBuf {
    binary("BATON_BIN", "baton")
}

/// Path of `baton-remote`.
pub fn remote_bin() -> PathBuf {
    binary("BATON_REMOTE", "baton-remote")
}

/// Path of the test guest ELF.
pub fn guest_bin() -> PathBuf {
    binary("BATON_GUEST", "baton-test-guest")
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("baton-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs baton to completion with `args` and returns its output (for argument errors).
pub fn run_baton(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(baton_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn baton");
    wait_child(&mut child, timeout);
    child.wait_with_output().expect("collect baton output")
}

/// Waits up to `timeout` for `child` to exit; kills it and fails the test past that.
pub fn wait_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A command running baton, inside `ns` when given.
fn baton_command(ns: Option<&NetNs>) -> Command {
    match ns {
        Some(ns) => ns.command(&baton_bin()),
        None => Command::new(baton_bin()),
    }
}

/// A baton process, killed if a test ends without waiting for it.
struct Process(Child);

impl Process {
    /// Waits for exit; returns the status and standard error.
    fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = wait_child(&mut self.0, timeout);
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, err)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A running baton with its serial console on a UNIX socket.
pub struct Vm {
    process: Process,
    console: Console,
    _dir: TempDir,
}

/// The guest console: lines read so far and a channel of new ones.
pub struct Console {
    writer: UnixStream,
    lines: Receiver<String>,
    /// Every line received, in order.
    pub seen: Vec<String>,
}

impl Console {
    /// Connects to the serial socket at `path`, waiting up to `timeout` for it to appear.
    pub fn connect(path: &Path, child: &mut Child, timeout: Duration) -> Self {
        Self::connect_while(path, timeout, || {
            child
                .try_wait()
                .expect("poll baton")
                .map(|status| format!("baton exited with {status}"))
        })
    }

    /// Connects to the serial socket at `path`, waiting up to `timeout` for it to appear,
    /// unless `ended` says (why) its baton is gone.
    pub fn connect_while(
        path: &Path,
        timeout: Duration,
        mut ended: impl FnMut() -> Option<String>,
    ) -> Self {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(why) = ended() {
                        panic!("{why} before its serial socket appeared");
                    }
                    assert!(
                        Instant::now() < deadline,
                        "serial socket {} did not appear: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let reader = stream.try_clone().expect("clone console stream");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let whole = buf.ends_with(b"\n");
                        let mut line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if !whole {
                            // The console closed mid-line (the VM moved away): say so, so
                            // that "heartbeat 1" cut from "heartbeat 14" reads as no beat.
                            line.push_str(" [cut]");
                        }
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Console {
            writer: stream,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// A line containing `needle` that came already, or else the next one within
    /// `timeout`.
    pub fn seen_or_wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        match self.seen.iter().find(|l| l.contains(needle)) {
            Some(line) => line.clone(),
            None => self.wait_for(needle, timeout),
        }
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_match(|l| l.contains(needle), needle, timeout)
    }

    /// Waits for a line satisfying `pred`; `what` describes it in the failure message.
    pub fn wait_for_match(
        &mut self,
        pred: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no console line matching {what:?} within {timeout:?}; last lines:\n{}",
                    self.tail()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "console closed while waiting for {what:?}; last lines:\n{}",
                    self.tail()
                ),
            }
        }
    }

    /// The next line, if one arrives within `timeout` (recorded in `seen`).
    pub fn try_next(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// The last lines seen, for failure messages.
    pub fn tail(&self) -> String {
        let start = self.seen.len().saturating_sub(30);
        self.seen[start..].join("\n")
    }

    /// Types `command` and returns its reply: the next line starting with `reply` (such as
    /// `disk:`) or with `error:`.
    pub fn command(&mut self, command: &str, reply: &str, timeout: Duration) -> String {
        self.send(command);
        self.wait_for_match(
            |l| l.starts_with(reply) || l.starts_with("error:"),
            reply,
            timeout,
        )
    }

    /// Types a line into the console.
    pub fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to console");
    }
}

impl Vm {
    /// Starts baton on the test guest with extra arguments (`--cpus`, `--memory` ...). The
    /// guest's heartbeat runs every 100 ms unless `cmdline` says otherwise.
    pub fn start_test_guest(args: &[&str], cmdline: &str) -> Self {
        Self::start_test_guest_in(None, args, cmdline)
    }

    /// [`Vm::start_test_guest`] inside a network namespace, when given.
    pub fn start_test_guest_in(ns: Option<&NetNs>, args: &[&str], cmdline: &str) -> Self {
        require_kvm();
        let guest = guest_bin();
        let mut full: Vec<String> = vec![
            "--kernel".into(),
            guest.to_string_lossy().into_owned(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        Self::start_in(ns, &full)
    }

    /// Starts baton with `args` plus a serial socket, and connects to it.
    pub fn start(args: &[String]) -> Self {
        Self::start_in(None, args)
    }

    /// [`Vm::start`] inside a network namespace, when given.
    pub fn start_in(ns: Option<&NetNs>, args: &[String]) -> Self {
        require_kvm();
        let dir = TempDir::new("vm");
        let socket = dir.path().join("serial.sock");
        let mut child = baton_command(ns)
            .args(args)
            .arg("--serial")
            .arg(format!("socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton");
        let console = Console::connect(&socket, &mut child, Duration::from_secs(20));
        Vm {
            process: Process(child),
            console,
            _dir: dir,
        }
    }

    /// The guest console.
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// baton's process id.
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill baton: {}", std::io::Error::last_os_error());
    }

    /// Waits for baton to exit; returns its status and standard error.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        if self.process.0.try_wait().expect("poll baton").is_none() {
            // Say what the guest printed if baton hangs.
            eprintln!(
                "waiting for baton; console so far:\n{}",
                self.console.tail()
            );
        }
        self.process.wait_exit(timeout)
    }
}

/// A baton serving its API on a socket, started with `--api-socket` and optional VM options.
pub struct ApiVmm {
    process: Process,
    /// The baton a live upgrade handed the VM to, which now serves the socket.
    successor: Successor,
    dir: TempDir,
    /// The API socket.
    pub socket: PathBuf,
}

/// The new baton of a live upgrade: not a child of the test, so killed when dropped.
#[derive(Default)]
struct Successor(Option<u32>);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) with a valid signal; the pid is the baton the test upgraded
            // to, which nothing but this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// A field of `/proc/PID/status` in kB (VmRSS, RssAnon ...).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

impl ApiVmm {
    /// Starts baton with `--api-socket` plus `args`, and waits for the socket to answer.
    pub fn start(args: &[&str]) -> Self {
        Self::start_in(None, args)
    }

    /// [`ApiVmm::start`] inside a network namespace, when given.
    pub fn start_in(ns: Option<&NetNs>, args: &[&str]) -> Self {
        Self::start_with(ns, "", &[], args)
    }

    /// [`ApiVmm::start_in`] with `api_options` (such as `max_connections=16`) added to
    /// `--api-socket path=...`, and the environment variables `env`.
    pub fn start_with(
        ns: Option<&NetNs>,
        api_options: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        require_kvm();
        let dir = TempDir::new("api");
        let socket = dir.path().join("api.sock");
        let mut spec = format!("path={}", socket.display());
        if !api_options.is_empty() {
            spec = format!("{spec},{api_options}");
        }
        let mut child = baton_command(ns)
            .envs(env.iter().copied())
            .arg("--api-socket")
            .arg(spec)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton");
        let deadline = Instant::now() + Duration::from_secs(20);
        while api::client::request(&socket, "GET", "vmm.ping", None).is_err() {
            if let Some(status) = child.try_wait().expect("poll baton") {
                panic!("baton exited with {status} before serving its API");
            }
            assert!(Instant::now() < deadline, "API socket never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
        ApiVmm {
            process: Process(child),
            successor: Successor::default(),
            dir,
            socket,
        }
    }

    /// baton's process id (after a live upgrade, the new baton's).
    pub fn pid(&self) -> u32 {
        self.successor.0.unwrap_or_else(|| self.process.0.id())
    }

    /// Asks for a live upgrade with `body`; returns the status and the answer. On success
    /// the old baton must exit cleanly, and this follows the new one from then on.
    pub fn live_upgrade(&mut self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.http("PUT", "vmm.live-upgrade", Some(&body.to_string()));
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let json = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::String(text));
        if r.status != 200 {
            return (r.status, json);
        }
        let new = json["pid"].as_u64().expect("the new pid") as u32;
        assert_ne!(new, self.pid(), "{json}");
        self.follow(new);
        (r.status, json)
    }

    /// Follows `new`, the baton a live upgrade handed the VM to, once the old one has
    /// exited (cleanly, if it was the test's child).
    pub fn follow(&mut self, new: u32) {
        let old = self.pid();
        match self.successor.0.replace(new) {
            // The first baton is the test's child: its exit status is known.
            None => {
                let status = wait_child(&mut self.process.0, Duration::from_secs(60));
                assert!(status.success(), "the old baton ended with {status}");
            }
            Some(_) => eventually("the old baton to exit", Duration::from_secs(60), || {
                !process_alive(old)
            }),
        }
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill baton: {}", std::io::Error::last_os_error());
    }

    /// A scratch directory that lives as long as this baton.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends a request; returns status and body.
    pub fn http(&self, method: &str, endpoint: &str, body: Option<&str>) -> api::client::Response {
        api::client::request(&self.socket, method, endpoint, body.map(str::as_bytes))
            .unwrap_or_else(|e| panic!("{method} {endpoint}: {e}"))
    }

    /// Sends a request that must succeed with `status`; returns the JSON body, if any.
    pub fn expect(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
        status: u16,
    ) -> Option<serde_json::Value> {
        let r = self.http(method, endpoint, body);
        assert_eq!(
            r.status,
            status,
            "{method} {endpoint}: {}",
            String::from_utf8_lossy(&r.body)
        );
        (!r.body.is_empty()).then(|| serde_json::from_slice(&r.body).expect("JSON body"))
    }

    /// The ids of the VM's disks and network cards, as `vm.info` lists them.
    pub fn device_ids(&self) -> Vec<String> {
        let info = self
            .expect("GET", "vm.info", None, 200)
            .expect("vm.info body");
        ["disks", "net"]
            .iter()
            .flat_map(|k| info["config"][k].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect()
    }

    /// Runs `baton-remote --api-socket SOCKET args...`.
    pub fn remote(&self, args: &[&str]) -> Output {
        let mut child = Command::new(remote_bin())
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton-remote");
        wait_child(&mut child, Duration::from_secs(60));
        child.wait_with_output().expect("baton-remote output")
    }

    /// Starts `vm.receive-migration` with `body`, passing `fds` with it, on a thread: the
    /// answer comes when the migration ends.
    pub fn receive_migration(
        &self,
        body: serde_json::Value,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> std::thread::JoinHandle<api::client::Response> {
        use std::os::fd::AsRawFd;
        let socket = self.socket.clone();
        std::thread::spawn(move || {
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let body = body.to_string();
            api::client::request_with_fds(
                &socket,
                "PUT",
                "vm.receive-migration",
                Some(body.as_bytes()),
                &raw,
            )
            .expect("receive-migration request")
        })
    }

    /// `vm.send-migration` with `body`, retried while the destination does not listen yet;
    /// returns the answer's status and body (JSON, or the error text as a string).
    pub fn send_migration(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.http("PUT", "vm.send-migration", Some(&body.to_string()));
            let text = String::from_utf8_lossy(&r.body).into_owned();
            if r.status != 200 && text.contains("Cannot connect") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let json = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::String(text));
            return (r.status, json);
        }
    }

    /// Connects to the VM's serial socket at `path`.
    pub fn console(&mut self, path: &Path) -> Console {
        match self.successor.0 {
            Some(pid) => Console::connect_while(path, Duration::from_secs(20), || {
                (!process_alive(pid)).then(|| format!("baton {pid} ended"))
            }),
            None => Console::connect(path, &mut self.process.0, Duration::from_secs(20)),
        }
    }

    /// Waits for baton to exit; returns its status and standard error.
    /// After a live upgrade, the status is the first baton's and the wait is for the last.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        if let Some(pid) = self.successor.0.take() {
            eventually(&format!("baton {pid} to exit"), timeout, || {
                !process_alive(pid)
            });
        }
        self.process.wait_exit(timeout)
    }
}

/// A migration channel to `url`, retried until something listens there (a destination that
/// was just asked to receive), within 30 s: tests play a source with it.
pub fn connect_migration(url: &str) -> migration::Channel {
    let parsed: migration::MigrationUrl = url.parse().expect("a migration URL");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match migration::Channel::connect(&parsed) {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "{url}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What the host sees of interface `name` in `ns`: index, MAC, MTU, bridge and addresses.
pub fn host_view(ns: &NetNs, name: &str) -> serde_json::Value {
    let out = ns.run(&["ip", "-j", "addr", "show", "dev", name]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let link = &all[0];
    let addrs: Vec<String> = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| format!("{}/{}", i["local"], i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "ifname": link["ifname"], "ifindex": link["ifindex"], "mac": link["address"],
        "mtu": link["mtu"], "master": link["master"], "addresses": addrs,
    })
}

/// Migrates `src` to `dst` over `url` with `local` and, on both sides, `backend_transfer`;
/// checks both answers and that the source exits cleanly. Returns the source's statistics.
pub fn migrate(
    src: ApiVmm,
    dst: &ApiVmm,
    url: &str,
    local: bool,
    backend_transfer: bool,
) -> serde_json::Value {
    let receiving = dst.receive_migration(
        serde_json::json!({"receiver_url": url, "backend_transfer": backend_transfer}),
        Vec::new(),
    );
    let (status, stats) = src.send_migration(serde_json::json!({
        "destination_url": url, "local": local, "backend_transfer": backend_transfer,
    }));
    assert_eq!(status, 200, "send-migration: {stats}");
    let r = receiving.join().expect("receive-migration thread");
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let (exit, stderr) = src.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "the source did not exit cleanly: {stderr}");
    let handed: Vec<&str> = stats["transferred_backends"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_breakdown(&stats, local, &handed);
    stats
}

/// Checks the downtime breakdown of a migration's (or live upgrade's) answer `stats`: the
/// source's paused steps, in order, add up to `downtime_us`; memory went paused only
/// without `local`; each backend in `handed` was handed over and taken over; and the
/// destination reported its own steps, from the state to the resumed vCPUs.
pub fn assert_breakdown(stats: &serde_json::Value, local: bool, handed: &[&str]) {
    let b = &stats["breakdown"];
    let names = |side: &str| -> Vec<String> {
        b[side]
            .as_array()
            .unwrap_or_else(|| panic!("no {side} in {stats}"))
            .iter()
            .map(|p| p["name"].as_str().expect("a step's name").to_string())
            .collect()
    };
    let source = names("source_paused");
    let mut want = vec!["pause vCPUs", "pause devices"];
    if !local {
        want.extend(["read the dirty log", "last memory"]);
    }
    want.extend(["save state", "encode state", "send state"]);
    let hand_overs: Vec<String> = handed.iter().map(|id| format!("hand over {id}")).collect();
    want.extend(hand_overs.iter().map(String::as_str));
    want.push("complete");
    assert_eq!(source, want, "{stats}");
    let sum: u64 = b["source_paused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["us"].as_u64().expect("microseconds"))
        .sum();
    assert_eq!(stats["downtime_us"].as_u64(), Some(sum), "{stats}");
    assert!(stats["total_us"].as_u64().unwrap() >= sum, "{stats}");
    assert_eq!(stats["downtime_ms"].as_u64(), Some(sum / 1000), "{stats}");
    assert!(
        names("source_before_pause").contains(&"config".into()),
        "{stats}"
    );
    let destination = names("destination_paused");
    assert_eq!(
        destination.first().map(String::as_str),
        Some("decode state")
    );
    for id in handed {
        assert!(destination.contains(&format!("take over {id}")), "{stats}");
    }
    for step in ["virtio devices", "vCPU state", "resume devices", "announce"] {
        assert!(destination.contains(&step.into()), "no {step}: {stats}");
    }
    assert!(
        names("destination_before_pause").contains(&"create vCPUs".into()),
        "{stats}"
    );
}

/// Checks a test guest's `net` line: the card uses mergeable receive buffers and indirect
/// descriptors, at least `merged` frames came in several buffers, and none went missing.
pub fn assert_card_merges(line: &str, merged: u64) {
    assert_eq!(
        (num(line, "mrg_rxbuf"), num(line, "indirect")),
        (1, 1),
        "{line}"
    );
    assert!(num(line, "merged") >= merged, "{line}");
    assert_eq!(num(line, "merge_errors"), 0, "{line}");
}

/// A played migration destination listening at `path` that accepts a backend-transfer
/// migration of card `net0` up to the TAP descriptors, takes them, and dies without
/// answering: the source must resume on its own. The thread returns what travelled: the
/// descriptors' header and how many arrived.
pub fn dying_destination(
    path: &Path,
) -> std::thread::JoinHandle<(migration::protocol::FdsHeader, usize)> {
    use migration::protocol::{FdsHeader, MemoryRegion};
    use migration::{Command, Response};
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind migration socket");
    std::thread::spawn(move || {
        let mut ch = migration::Channel::from(listener.accept().expect("accept").0);
        loop {
            let h = ch.recv_request_header().expect("request");
            let payload = ch.read_payload(h.length).expect("payload");
            let reply = match h.command {
                Command::Start => br#"{"accepted":["net0"]}"#.to_vec(),
                Command::MemoryFds => {
                    let regions: Vec<MemoryRegion> =
                        serde_json::from_slice(&payload).expect("memory regions");
                    ch.recv_fds(regions.len()).expect("memory descriptors");
                    Vec::new()
                }
                Command::Config | Command::State => Vec::new(),
                Command::Fds => {
                    let header: FdsHeader = serde_json::from_slice(&payload).expect("Fds");
                    let fds = ch.recv_fds(header.count as usize).expect("TAP descriptors");
                    return (header, fds.len());
                }
                other => panic!("unexpected {other}"),
            };
            ch.send_response(&Response::Ok(reply)).expect("answer");
        }
    })
}

/// A VmConfig JSON for the test guest with its serial console on `serial`.
pub fn guest_config_json(serial: &Path, cpus: u8, cmdline: &str) -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": cpus, "max_vcpus": cpus},
        "memory": {"size": 256u64 << 20},
        "payload": {"kernel": guest_bin(), "cmdline": cmdline},
        "serial": {"mode": "Socket", "socket": serial},
    })
    .to_string()
}

/// The value of `key=` in a console line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The numeric value of `key=` in a console line; fails the test if there is none.
pub fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// Byte `offset` of the test guest's sequence stream (the little-endian bytes of the
/// counter 0, 1, 2 ... as u64s).
pub fn stream_byte(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Polls `cond` every 20 ms until it holds; fails the test after `timeout`, saying `what`
/// did not happen.
pub fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The slot of a hot-plug answer (`{"id", "bdf": "0000:00:SS.0"}`).
pub fn hotplug_slot(info: &serde_json::Value) -> u8 {
    let slot = info["bdf"]
        .as_str()
        .and_then(|b| b.strip_prefix("0000:00:")?.strip_suffix(".0"))
        .unwrap_or_else(|| panic!("no 0000:00:SS.0 address: {info}"));
    u8::from_str_radix(slot, 16).unwrap_or_else(|_| panic!("bad slot in {info}"))
}

/// Bytes of a sector, as the test guest's disk commands count them.
pub const SECTOR: usize = 512;

/// Writes raw image `name` in `dir`: `sectors` sectors, sector i filled with byte
/// `first + i` (wrapping). Returns its path and contents.
pub fn sector_image(dir: &TempDir, name: &str, sectors: usize, first: u8) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0u8; sectors * SECTOR];
    for (i, s) in data.chunks_mut(SECTOR).enumerate() {
        s.fill(first.wrapping_add(i as u8));
    }
    let path = dir.path().join(name);
    std::fs::write(&path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    (path, data)
}

impl Console {
    /// Has the test guest read `count` sectors of its disk from `sector`, and checks they
    /// are those of `data` (the image's contents).
    pub fn assert_disk_reads(&mut self, data: &[u8], sector: usize, count: usize) {
        let line = self.command(
            &format!("disk read {sector} {count}"),
            "disk:",
            Duration::from_secs(60),
        );
        let want = fnv1a(&data[sector * SECTOR..(sector + count) * SECTOR]);
        assert_eq!(
            line,
            format!("disk: read sector={sector} count={count} fnv={want:#018x}")
        );
    }
}

/// FNV-1a 64, as the test guest's `disk read` reports it.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A TCP connection to one of the test guest's sequence-stream ports, remembering where the
/// stream is: port 5001 sends the stream (every byte read is checked), port 5002 takes it
/// (the guest checks). Made for following a stream across a pause, snapshot or migration.
pub struct SeqStream {
    socket: std::net::TcpStream,
    /// Bytes moved so far.
    pub offset: u64,
}

impl SeqStream {
    /// Connects to `addr:port` (call inside the guest's network namespace).
    pub fn connect(addr: &str, port: u16, timeout: Duration) -> Self {
        let to = format!("{addr}:{port}").parse().expect("socket address");
        let socket = std::net::TcpStream::connect_timeout(&to, timeout)
            .unwrap_or_else(|e| panic!("connect to {addr}:{port}: {e}"));
        socket.set_read_timeout(Some(timeout)).expect("timeout");
        socket.set_write_timeout(Some(timeout)).expect("timeout");
        SeqStream { socket, offset: 0 }
    }

    /// Reads `len` more bytes of the guest's stream, checking each.
    pub fn read(&mut self, len: u64) {
        let mut buf = vec![0u8; 256 << 10];
        let end = self.offset + len;
        while self.offset < end {
            let want = buf.len().min((end - self.offset) as usize);
            let n = self.socket.read(&mut buf[..want]).unwrap_or_else(|e| {
                panic!("read the guest's stream at offset {}: {e}", self.offset)
            });
            assert!(n > 0, "the guest closed its stream at {}", self.offset);
            for (i, b) in buf[..n].iter().enumerate() {
                let at = self.offset + i as u64;
                assert_eq!(*b, stream_byte(at), "wrong byte at offset {at}");
            }
            self.offset += n as u64;
        }
    }

    /// Writes `len` more bytes of the stream to the guest.
    pub fn write(&mut self, len: u64) {
        let mut buf = vec![0u8; 256 << 10];
        let end = self.offset + len;
        while self.offset < end {
            let n = buf.len().min((end - self.offset) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = stream_byte(self.offset + i as u64);
            }
            self.socket.write_all(&buf[..n]).unwrap_or_else(|e| {
                panic!(
                    "write the stream to the guest at offset {}: {e}",
                    self.offset
                )
            });
            self.offset += n as u64;
        }
    }
}

/// The number of a `heartbeat N` console line.
pub fn heartbeat_number(line: &str) -> Option<u64> {
    line.strip_prefix("heartbeat ")?.trim().parse().ok()
}

impl Console {
    /// Waits until the guest's sequence-stream sink (port 5002) has taken `offset` bytes,
    /// every one of them right and in order (its `net` line counts them and any error).
    pub fn sink_reaches(&mut self, offset: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let net = self.command("net", "net:", timeout);
            assert_eq!(num(&net, "sink_errors"), 0, "{net}");
            if num(&net, "sink_bytes") == offset {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest's sink is short of {offset}: {net}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Console {
    /// Reads until the console is quiet; the last heartbeat number it showed.
    pub fn last_heartbeat(&mut self) -> u64 {
        while self.try_next(Duration::from_millis(200)).is_some() {}
        self.seen
            .iter()
            .rev()
            .find_map(|l| heartbeat_number(l))
            .expect("the guest printed a heartbeat")
    }

    /// Checks the guest's heartbeat goes on from `last` for `count` beats, without a gap
    /// and without the guest starting over; returns the last beat. The first may follow
    /// one that a pause cut in half.
    pub fn heartbeat_continues(&mut self, last: u64, count: u64, timeout: Duration) -> u64 {
        let mut prev = None;
        for _ in 0..count {
            let line = self.wait_for_match(
                |l| heartbeat_number(l).is_some() || l.contains(READY) || l.contains("booting"),
                "a heartbeat",
                timeout,
            );
            let n = heartbeat_number(&line)
                .unwrap_or_else(|| panic!("the guest started over: {line}\n{}", self.tail()));
            match prev {
                None => assert!(
                    n > last && n <= last + 2,
                    "heartbeat {n} after {last}: {}",
                    self.tail()
                ),
                Some(p) => assert_eq!(n, p + 1, "heartbeat gap: {}", self.tail()),
            }
            prev = Some(n);
        }
        prev.unwrap_or(last)
    }
}
