//! Live upgrade: `vmm.live-upgrade` starts a new baton binary that takes the VM over, with
//! its memory, TAP, disk and the API socket itself, and the old one exits. Each test runs
//! in its own network namespace: a ping flood loses nothing, the guest's TCP streams carry on
//! byte for byte, a client pinging the API throughout is never refused, and every failure of
//! the new binary leaves the VM running in the old baton with its backends, its API socket
//! and as many descriptors as before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_tests::{
    baton_bin, heartbeat_number, host_view, settled_fds, status_kb, ApiVmm, Console, NetNs,
    PingFlood, SeqStream, TempDir, READY,
};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const GUEST: &str = "10.0.0.2";
/// One echo request every 2 ms.
const FLOOD_INTERVAL: Duration = Duration::from_millis(2);

/// The test guest on TAP tap0 (one queue pair) with a 1 MiB disk `image`.
fn config(serial: &Path, image: &Path) -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20, "shared": true},
        "payload": {"kernel": baton_tests::guest_bin(), "cmdline": format!("heartbeat_ms=20 net={GUEST}/24")},
        "serial": {"mode": "Socket", "socket": serial},
        "net": [{"id": "net0", "tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0"}],
        "disks": [{"id": "disk0", "path": image}],
    })
    .to_string()
}

/// A booted test guest in `ns`, its files in `files`; returns baton and the console.
fn boot(ns: &NetNs, files: &TempDir) -> (ApiVmm, Console) {
    let serial = files.path().join("serial.sock");
    let image = files.path().join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let mut vmm = ApiVmm::start_in(Some(ns), &[]);
    vmm.expect("PUT", "vm.create", Some(&config(&serial, &image)), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    (vmm, console)
}

fn upgrade_to(binary: &Path) -> serde_json::Value {
    serde_json::json!({ "binary": binary })
}

/// A client that pings the API over a new connection every millisecond until stopped:
/// returns the answers it got and every failure (a refused connection above all).
struct ApiPinger {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<u32>, Vec<String>)>,
}

impl ApiPinger {
    fn start(socket: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, socket) = (stop.clone(), socket.to_owned());
        let thread = std::thread::spawn(move || {
            let (mut answered, mut pids, mut failures) = (0, Vec::new(), Vec::new());
            while !s.load(Ordering::Relaxed) {
                match api::client::request(&socket, "GET", "vmm.ping", None) {
                    Ok(r) if r.status == 200 => {
                        answered += 1;
                        let ping: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                        let pid = ping["pid"].as_u64().unwrap() as u32;
                        if pids.last() != Some(&pid) {
                            pids.push(pid);
                        }
                    }
                    Ok(r) => failures.push(format!(
                        "{}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (answered, pids, failures)
        });
        ApiPinger { stop, thread }
    }

    fn finish(self) -> (u64, Vec<u32>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the API pinger")
    }
}

#[test]
fn a_live_upgrade_loses_no_packet_byte_or_write_and_the_api_answers_throughout() {
    let ns = NetNs::new("lu");
    let files = TempDir::new("lu");
    let (mut vmm, mut console) = boot(&ns, &files);
    let old = vmm.pid();
    let view = host_view(&ns, "tap0");
    let wrote = console.command("disk write 0 8 171", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=0 count=8");
    let beat = |console: &mut Console| {
        let line = console.wait_for_match(
            |l| heartbeat_number(l).is_some() || l.contains(READY),
            "a heartbeat",
            REPLY,
        );
        heartbeat_number(&line).unwrap_or_else(|| panic!("the guest started over: {line}"))
    };
    let before = beat(&mut console);
    let (mut from_guest, mut to_guest) = ns.enter(|| {
        let mut from_guest = SeqStream::connect(GUEST, 5001, REPLY);
        let mut to_guest = SeqStream::connect(GUEST, 5002, REPLY);
        from_guest.read(MIB);
        to_guest.write(MIB);
        (from_guest, to_guest)
    });
    let mut flood = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 2500);
    flood.wait_replies(50, REPLY);
    let pinger = ApiPinger::start(&vmm.socket);
    std::thread::sleep(Duration::from_millis(100));

    let (status, answer) = vmm.live_upgrade(upgrade_to(&baton_bin()));
    assert_eq!(status, 200, "{answer}");
    eprintln!("live upgrade: {answer}");
    assert_eq!(
        answer["handed_over"],
        serde_json::json!(["memory", "net0", "disk0", "serial", "api-socket"])
    );
    assert_eq!(answer["binary"], serde_json::json!(baton_bin()));
    baton_tests::assert_breakdown(&answer, true, &["net0", "disk0", "serial"]);
    let new = vmm.pid();

    // The API keeps answering, now from the new baton.
    std::thread::sleep(Duration::from_millis(200));
    let (answered, pids, failures) = pinger.finish();
    assert!(
        failures.is_empty(),
        "API failures during the upgrade: {failures:?}"
    );
    assert_eq!(pids, [old, new], "{answered} pings answered");
    let ping = vmm.expect("GET", "vmm.ping", None, 200).unwrap();
    assert_eq!(ping["pid"], new);

    assert!(flood.running(), "the flood ended before the upgrade did");
    let result = flood.finish(REPLY);
    assert_eq!(result.lost(), 0, "{result:?}");
    eprintln!("longest ping gap {:.1} ms", result.max_gap_ms);
    ns.enter(|| {
        from_guest.read(2 * MIB);
        to_guest.write(2 * MIB);
    });
    assert_eq!(host_view(&ns, "tap0"), view);

    // The console's client stays connected across the upgrade and misses nothing: every
    // heartbeat from before it to a second after it, in order, on the same connection; and
    // what it types reaches the guest through the new baton.
    let until = Instant::now() + Duration::from_secs(1);
    let mut last = before;
    while Instant::now() < until {
        last = console.heartbeat_continues(last, 1, REPLY);
    }
    console.sink_reaches(3 * MIB, REPLY);
    let wrote = console.command("disk write 8 8 172", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=8 count=8");
    // A new client gets the backlog the old baton handed over, boot messages included.
    let serial = files.path().join("serial.sock");
    let mut again = vmm.console(&serial);
    again.seen_or_wait_for(READY, REPLY);
    let image = std::fs::read(files.path().join("disk.raw")).unwrap();
    assert!(image[..4096].iter().all(|b| *b == 171));
    assert!(image[4096..8192].iter().all(|b| *b == 172));
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
}

#[test]
fn ten_live_upgrades_in_a_row_keep_descriptors_and_memory_flat() {
    let ns = NetNs::new("lu10");
    let files = TempDir::new("lu10");
    let (mut vmm, _console) = boot(&ns, &files);
    let (mut fds, mut anon) = (Vec::new(), Vec::new());
    let mut downtimes = Vec::new();
    for i in 0..10 {
        let mut pings = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 1500);
        pings.wait_replies(20, REPLY);
        let (status, answer) = vmm.live_upgrade(upgrade_to(&baton_bin()));
        assert_eq!(status, 200, "upgrade {i}: {answer}");
        downtimes.push(answer["downtime_ms"].as_u64().unwrap());
        let result = pings.finish(REPLY);
        assert_eq!(result.lost(), 0, "upgrade {i}: {result:?}");
        fds.push(settled_fds(vmm.pid()));
        anon.push(status_kb(vmm.pid(), "RssAnon"));
    }
    eprintln!("downtimes {downtimes:?} ms; descriptors {fds:?}; RssAnon {anon:?} kB");
    assert!(
        fds.iter().all(|n| *n == fds[0]),
        "open descriptors after each upgrade: {fds:?}"
    );
    // Heap and stacks: each new baton starts from scratch, so no upgrade adds to them.
    let (low, high) = (anon.iter().min().unwrap(), anon.iter().max().unwrap());
    assert!(
        high - low < 8 << 10,
        "RssAnon after each upgrade: {anon:?} kB"
    );
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
}

/// A script that runs baton with `env` set, or does `body` instead.
fn script(files: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = files.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn every_failed_step_leaves_the_vm_running_in_the_old_baton_with_all_it_held() {
    let ns = NetNs::new("lufail");
    let files = TempDir::new("lufail");
    let (mut vmm, mut console) = boot(&ns, &files);
    let old = vmm.pid();
    let baton = baton_bin();
    let crash = |step: &str| {
        script(
            &files,
            &format!("crash-at-{step}"),
            &format!("BATON_TEST_CRASH={step} exec {} \"$@\"", baton.display()),
        )
    };
    let not_executable = files.path().join("not-executable");
    std::fs::copy(&baton, &not_executable).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    // Refused before anything starts.
    for (body, status, message) in [
        (
            upgrade_to(Path::new("/nonexistent/baton")),
            400,
            "Cannot run /nonexistent/baton: No such file",
        ),
        (upgrade_to(&not_executable), 400, "not executable"),
        (upgrade_to(files.path()), 400, "not a regular file"),
        (
            serde_json::json!({"binary": "baton"}),
            400,
            "binary 'baton' is not an absolute path",
        ),
    ] {
        let (got, answer) = vmm.live_upgrade(body);
        assert_eq!(got, status, "{answer}");
        assert!(answer.to_string().contains(message), "{answer}");
    }
    let before = settled_fds(old);

    // The new binary fails at each step, or never answers: the old baton keeps the VM.
    let hangs = script(&files, "hangs", "exec sleep 600");
    let skewed = script(
        &files,
        "skewed",
        &format!("BATON_TEST_STATE_FORMAT=99 exec {} \"$@\"", baton.display()),
    );
    for (binary, step_timeout_s, message) in [
        // Gone before or after the launcher watches it.
        (
            PathBuf::from("/bin/false"),
            60,
            "ended as soon as it started|Migration protocol",
        ),
        (skewed, 60, "they lay out the VM state differently"),
        (crash("config"), 60, "Migration protocol"),
        (crash("state"), 60, "Migration protocol"),
        (crash("complete"), 60, "ended without taking the VM"),
        (hangs, 2, "step_timeout_s"),
    ] {
        let mut pings = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 1500);
        pings.wait_replies(20, REPLY);
        let (status, answer) = vmm.live_upgrade(serde_json::json!({
            "binary": binary, "step_timeout_s": step_timeout_s,
        }));
        assert_eq!(status, 500, "{}: {answer}", binary.display());
        let text = answer.to_string();
        assert!(
            text.contains("the VM runs on in this baton")
                && message.split('|').any(|m| text.contains(m)),
            "{}: {answer}",
            binary.display()
        );
        let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
        assert_eq!(info["state"], "Running", "{}: {info}", binary.display());
        let result = pings.finish(REPLY);
        assert_eq!(result.lost(), 0, "{}: {result:?}", binary.display());
        assert_eq!(vmm.pid(), old);
        assert_eq!(
            settled_fds(old),
            before,
            "{}: descriptors before and after",
            binary.display()
        );
        let wrote = console.command("disk write 0 8 9", "disk:", REPLY);
        assert_eq!(wrote, "disk: wrote sector=0 count=8");
    }

    // A new baton that takes the last step and hangs before it says it would run the VM
    // is ended when the step times out, and the VM runs on here.
    let (status, answer) = vmm.live_upgrade(serde_json::json!({
        "binary": crash("hang-complete"), "step_timeout_s": 2,
    }));
    assert_eq!(status, 500, "{answer}");
    let text = answer.to_string();
    assert!(
        text.contains("step_timeout_s") && text.contains("the VM runs on in this baton"),
        "{answer}"
    );
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    let silenced = pid_in(&text);
    assert!(
        !baton_tests::process_alive(silenced),
        "pid {silenced} lives on"
    );
    let wrote = console.command("disk write 0 8 10", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=0 count=8");
    assert_eq!(settled_fds(old), before, "descriptors after the hung baton");

    // One that said it would run the VM may run it, whether it then ends or keeps silent
    // without answering: nothing resumes the VM here, the API answers, and the operator
    // resumes it once that process is gone. (These stop before they resume the VM.)
    for (step, message) in [
        ("run", "ended without answering"),
        ("hang-run", "does not answer"),
    ] {
        let (status, answer) = vmm.live_upgrade(serde_json::json!({
            "binary": crash(step), "step_timeout_s": 2,
        }));
        assert_eq!(status, 500, "{step}: {answer}");
        let text = answer.to_string();
        assert!(text.contains(message), "{step}: {answer}");
        let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
        assert_eq!(info["state"], "Paused", "{step}: {info}");
        let new = pid_in(&text);
        // SAFETY: kill(2) with a valid signal, on the new baton this test had started.
        unsafe { libc::kill(new as libc::pid_t, libc::SIGKILL) };
        baton_tests::eventually("the new baton to go", REPLY, || {
            !baton_tests::process_alive(new)
        });
        vmm.expect("PUT", "vm.resume", None, 204);
        let wrote = console.command("disk write 0 8 11", "disk:", REPLY);
        assert_eq!(wrote, "disk: wrote sector=0 count=8", "{step}");
        assert_eq!(settled_fds(old), before, "{step}: descriptors after");
    }

    // And then a good binary takes the VM over.
    let (status, answer) = vmm.live_upgrade(upgrade_to(&baton));
    assert_eq!(status, 200, "{answer}");
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
}

/// The new baton's pid, as a failed upgrade's answer names it: "(pid N)".
fn pid_in(answer: &str) -> u32 {
    answer
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {answer}"))
}

#[test]
fn baton_remote_live_upgrade_prints_the_new_pid() {
    let ns = NetNs::new("lurem");
    let files = TempDir::new("lurem");
    let (mut vmm, _console) = boot(&ns, &files);
    let old = vmm.pid();
    let out = vmm.remote(&["live-upgrade", "--binary", &baton_bin().to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let new = answer["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old);
    vmm.follow(new);
    let ping = vmm.expect("GET", "vmm.ping", None, 200).unwrap();
    assert_eq!(ping["pid"], new);

    let help = vmm.remote(&["live-upgrade", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--binary"), "{help}");
    let missing = vmm.remote(&["live-upgrade", "--binary", "/nonexistent/baton"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
