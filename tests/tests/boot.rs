//! Boot tests with baton's test guest: ready marker, heartbeat, CPUs and memory, serial
//! commands, power-off, reboot and SIGTERM.

use std::time::Duration;

use baton_tests::{Vm, BOOTING, READY};

const BOOT: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(30);

/// The value of `key=` in a console line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

#[test]
fn reaches_ready_marker_and_heartbeat_counts_up() {
    let mut vm = Vm::start_test_guest(&[], "heartbeat_ms=50");
    let c = vm.console();
    c.wait_for(BOOTING, BOOT);
    c.wait_for(READY, BOOT);
    let first = c.wait_for("heartbeat ", BOOT);
    let n1: u64 = first
        .trim_start_matches("heartbeat ")
        .parse()
        .expect("counter");
    let later = c.wait_for_match(
        |l| {
            l.strip_prefix("heartbeat ")
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= n1 + 3)
        },
        "a heartbeat three beats later",
        BOOT,
    );
    assert!(later.starts_with("heartbeat "));
    // The counter is monotonic: every heartbeat seen increases by one.
    let beats: Vec<u64> = c
        .seen
        .iter()
        .filter_map(|l| l.strip_prefix("heartbeat ")?.parse().ok())
        .collect();
    assert!(beats.windows(2).all(|w| w[1] == w[0] + 1), "{beats:?}");
}

#[test]
fn four_cpus_and_five_gib() {
    let mut vm = Vm::start_test_guest(
        &["--cpus", "boot=4", "--memory", "size=5G"],
        "heartbeat_ms=0",
    );
    let ready = vm.console().wait_for(READY, BOOT);
    assert_eq!(field(&ready, "cpus"), 4, "{ready}");
    let mem = field(&ready, "mem_bytes");
    let five_gib = 5u64 << 30;
    // All of it but the legacy BIOS area below 1 MiB.
    assert!(mem <= five_gib && mem > five_gib - (1 << 20), "{ready}");
    let line = vm.console().command("cpus", "cpus:", BOOT);
    assert_eq!(baton_tests::num(&line, "n"), 4, "{line}");
    assert_eq!(baton_tests::num(&line, "started"), 4, "{line}");
}

#[test]
fn serial_commands_are_answered() {
    let mut vm = Vm::start_test_guest(&["--memory", "size=256M"], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);
    c.send("echo hello from the host");
    assert_eq!(c.wait_for("echo: ", BOOT), "echo: hello from the host");
    c.send("status");
    let status = c.wait_for("status: ", BOOT);
    assert_eq!(field(&status, "cpus"), 1, "{status}");
    c.send("frobnicate");
    assert_eq!(
        c.wait_for("error: ", BOOT),
        "error: unknown command 'frobnicate'"
    );
    // The guest keeps serving after an error.
    c.send("echo still here");
    assert_eq!(c.wait_for("echo: ", BOOT), "echo: still here");
}

#[test]
fn guest_poweroff_ends_baton_with_status_zero() {
    let mut vm = Vm::start_test_guest(&["--cpus", "boot=2"], "heartbeat_ms=0");
    vm.console().wait_for(READY, BOOT);
    vm.console().send("poweroff");
    vm.console().wait_for("poweroff: bye", BOOT);
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn guest_reboot_boots_a_second_time() {
    let mut vm = Vm::start_test_guest(&["--cpus", "boot=2"], "heartbeat_ms=0");
    let pid = vm.pid();
    vm.console().wait_for(READY, BOOT);
    vm.console().send("reboot");
    vm.console().wait_for("reboot: bye", BOOT);
    vm.console().wait_for(BOOTING, BOOT);
    let ready = vm.console().wait_for(READY, BOOT);
    assert_eq!(field(&ready, "cpus"), 2, "{ready}");
    assert_eq!(vm.pid(), pid, "same process");
    // The rebooted guest works and can still power off.
    vm.console().send("poweroff");
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut vm = Vm::start_test_guest(&["--cpus", "boot=2"], "heartbeat_ms=50");
    vm.console().wait_for("heartbeat ", BOOT);
    vm.signal(libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sixteen_vcpus_from_the_madt() {
    let mut vm = Vm::start_test_guest(&["--cpus", "boot=16"], "heartbeat_ms=0");
    let ready = vm.console().wait_for(READY, BOOT);
    assert_eq!(field(&ready, "cpus"), 16, "{ready}");
}

#[test]
fn shared_memory_backing_boots() {
    let mut vm = Vm::start_test_guest(&["--memory", "size=4G,shared=on"], "heartbeat_ms=0");
    let ready = vm.console().wait_for(READY, BOOT);
    let mem = field(&ready, "mem_bytes");
    assert!(mem > (4u64 << 30) - (1 << 20), "{ready}");
    vm.console().send("poweroff");
    let (status, stderr) = vm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn serial_output_to_a_file() {
    baton_tests::require_kvm();
    let dir = baton_tests::TempDir::new("serial-file");
    let log = dir.path().join("console.log");
    let guest = baton_tests::guest_bin();
    let mut child = std::process::Command::new(baton_tests::baton_bin())
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", "heartbeat_ms=20", "--serial"])
        .arg(format!("file={}", log.display()))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn baton");
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(READY) && text.contains("heartbeat 2") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "no ready marker and heartbeat in {}: {text:?}",
                log.display()
            );
        }
        assert!(
            child.try_wait().expect("poll baton").is_none(),
            "baton exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = baton_tests::wait_child(&mut child, EXIT);
    assert_eq!(status.code(), Some(0));
}
