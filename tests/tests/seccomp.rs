//! seccomp: every thread of a running baton is filtered by default, with NO_NEW_PRIVS, and a
//! call no role allows ends baton naming it (`--seccomp true`), is let through (`log`), or
//! is not filtered at all (`false`). Every other test runs with the default, so a call some
//! code path needs and its role lacks fails that test.

use std::process::{Command, Stdio};
use std::time::Duration;

use baton_tests::{baton_bin, eventually, require_kvm, run_baton, NetNs, TempDir, Vm, READY};

const BOOT: Duration = Duration::from_secs(60);

/// Each thread of `pid`: its name, and its `Seccomp` and `NoNewPrivs` fields.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("baton's threads") {
        let dir = task.expect("a thread").path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // it ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("NoNewPrivs:"),
        ));
    }
    out
}

#[test]
fn every_thread_of_a_running_baton_is_filtered_by_default() {
    let ns = NetNs::new("seccomp");
    let files = TempDir::new("seccomp");
    let api = files.path().join("api.sock");
    let disk = files.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("a disk image");
    let mut vm = Vm::start_test_guest_in(
        Some(&ns),
        &[
            &format!("--api-socket=path={}", api.display()),
            "--net=tap=tap0,ip=10.0.0.1,mask=255.255.255.0,num_queues=4",
            &format!("--disk=path={}", disk.display()),
            "--rng=id=rng0",
            "--cpus=boot=2",
        ],
        "heartbeat_ms=0 net=10.0.0.2/24",
    );
    vm.console().wait_for(READY, BOOT);
    let ping = ns.output(&["ping", "-q", "-c", "3", "-W", "5", "10.0.0.2"]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let roles = [
        "http-server",
        "vcpu0",
        "vcpu1",
        "virtio-net-0",
        "virtio-blk",
        "virtio-rng",
        "serial-socket",
    ];
    eventually(
        "every role's thread to run",
        Duration::from_secs(30),
        || {
            let names: Vec<String> = threads(vm.pid()).into_iter().map(|t| t.0).collect();
            roles.iter().all(|r| names.iter().any(|n| n == r))
        },
    );
    for (name, seccomp, no_new_privs) in threads(vm.pid()) {
        assert_eq!(seccomp, "2", "thread {name} is not filtered");
        assert_eq!(no_new_privs, "1", "thread {name} may gain privileges");
    }
}

/// Runs baton with `args` and `BATON_SECCOMP_SELFTEST=selftest`; checks it stopped with
/// status 159, naming the `role` thread and the call `nr`.
fn stops_on(args: &[&str], selftest: &str, role: &str, nr: i64) {
    require_kvm();
    let out = Command::new(baton_bin())
        .args(args)
        .env("BATON_SECCOMP_SELFTEST", selftest)
        .stdin(Stdio::null())
        .output()
        .expect("run baton");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(159), "{err}");
    let said =
        format!("baton: seccomp: a {role} thread made a forbidden system call (number {nr})");
    assert!(err.contains(&said), "{err}");
}

#[test]
fn a_forbidden_call_ends_baton_naming_it() {
    let files = TempDir::new("seccomp-trap");
    let api = format!(
        "--api-socket=path={}",
        files.path().join("api.sock").display()
    );
    stops_on(&[&api], "1", "vmm", libc::SYS_getppid);
}

#[test]
fn a_vcpu_may_make_kvm_requests_only() {
    let guest = baton_tests::guest_bin().to_string_lossy().into_owned();
    let args = ["--kernel", &guest, "--serial", "off"];
    stops_on(&args, "vcpu-ioctl", "vcpu", libc::SYS_ioctl);
}

#[test]
fn log_lets_a_forbidden_call_through_and_false_filters_nothing() {
    require_kvm();
    for (mode, filtered) in [("log", "2"), ("false", "0")] {
        let files = TempDir::new("seccomp-log");
        let socket = files.path().join("api.sock");
        let mut child = Command::new(baton_bin())
            .arg(format!("--api-socket=path={}", socket.display()))
            .arg(format!("--seccomp={mode}"))
            .env("BATON_SECCOMP_SELFTEST", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn baton");
        eventually("the API to answer", Duration::from_secs(20), || {
            api::client::request(&socket, "GET", "vmm.ping", None).is_ok()
        });
        let pid = child.id();
        for (name, seccomp, _) in threads(pid) {
            assert_eq!(seccomp, filtered, "--seccomp={mode}: thread {name}");
        }
        let r = api::client::request(&socket, "PUT", "vmm.shutdown", None).expect("shutdown");
        assert_eq!(r.status, 204);
        let status = baton_tests::wait_child(&mut child, Duration::from_secs(20));
        assert!(status.success(), "--seccomp={mode}: {status}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("read stderr");
        assert!(
            err.contains("seccomp self-test: getppid() returned"),
            "{mode}: {err}"
        );
    }
}

#[test]
fn a_bad_seccomp_value_is_refused_by_the_command_line() {
    let out = run_baton(&["--seccomp=maybe"], Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--seccomp"), "{err}");
    assert!(err.contains("true") && err.contains("log"), "{err}");
}
