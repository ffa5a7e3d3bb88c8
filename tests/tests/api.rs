//! The REST API and baton-remote, driving the test guest: the VM lifecycle through raw HTTP
//! and through baton-remote, every bad input answered with a clear 4xx and followed by a
//! request that still succeeds, and the socket's ownership rules.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use baton_tests::{guest_config_json, ApiVmm, BOOTING, READY};

const BOOT: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(30);

fn beat(line: &str) -> Option<u64> {
    line.strip_prefix("heartbeat ")?.parse().ok()
}

#[test]
fn lifecycle_over_raw_http() {
    let mut vmm = ApiVmm::start(&[]);
    let ping = vmm.expect("GET", "vmm.ping", None, 200).unwrap();
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    assert!(ping["pid"].as_u64().unwrap() > 0);
    // No VM yet.
    vmm.expect("GET", "vm.info", None, 404);
    vmm.expect("PUT", "vm.boot", None, 404);

    let serial = vmm.dir().join("serial.sock");
    let config = guest_config_json(&serial, 2, "heartbeat_ms=50");
    vmm.expect("PUT", "vm.create", Some(&config), 204);
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    // Create twice is a conflict.
    vmm.expect("PUT", "vm.create", Some(&config), 409);

    vmm.expect("PUT", "vm.boot", None, 204);
    vmm.expect("PUT", "vm.boot", None, 409);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    console.wait_for("heartbeat 2", BOOT);
    assert_eq!(
        vmm.expect("GET", "vm.info", None, 200).unwrap()["state"],
        "Running"
    );

    // Pause: once vm.pause has answered no vCPU runs, so the heartbeat stops.
    vmm.expect("PUT", "vm.pause", None, 204);
    assert_eq!(
        vmm.expect("GET", "vm.info", None, 200).unwrap()["state"],
        "Paused"
    );
    vmm.expect("PUT", "vm.pause", None, 409);
    let seen = console.seen.len();
    let paused_at = Instant::now();
    // Whatever was already on its way out arrives at once; nothing follows for six beats.
    let mut last = console.seen.iter().rev().find_map(|l| beat(l)).unwrap();
    while paused_at.elapsed() < Duration::from_millis(300) {
        if let Some(line) = console.try_next(Duration::from_millis(20)) {
            if let Some(n) = beat(&line) {
                assert!(
                    paused_at.elapsed() < Duration::from_millis(50),
                    "heartbeat {n} while paused"
                );
                last = n;
            }
        }
    }
    assert!(console.seen.len() <= seen + 1);
    vmm.expect("PUT", "vm.resume", None, 204);
    vmm.expect("PUT", "vm.resume", None, 409);
    // The same guest continues: its counter goes on from where it stopped.
    let next = console.wait_for("heartbeat ", BOOT);
    assert_eq!(beat(&next), Some(last + 1), "{next}");

    // Reboot boots the guest a second time in the same process.
    vmm.expect("PUT", "vm.reboot", None, 204);
    console.wait_for(BOOTING, BOOT);
    console.wait_for(READY, BOOT);

    // The power button: the guest powers off and baton exits 0.
    vmm.expect("PUT", "vm.power-button", None, 204);
    console.wait_for("power-button: pressed", BOOT);
    let (status, stderr) = vmm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn lifecycle_through_baton_remote() {
    let mut vmm = ApiVmm::start(&[]);
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "baton-remote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ping: serde_json::Value = serde_json::from_str(&ok(vmm.remote(&["ping"]))).unwrap();
    assert!(ping["pid"].as_u64().is_some());

    let serial = vmm.dir().join("serial.sock");
    let config_file = vmm.dir().join("vm.json");
    std::fs::write(
        &config_file,
        guest_config_json(&serial, 1, "heartbeat_ms=50"),
    )
    .unwrap();
    ok(vmm.remote(&["create", config_file.to_str().unwrap()]));
    ok(vmm.remote(&["boot"]));
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    let info: serde_json::Value = serde_json::from_str(&ok(vmm.remote(&["info"]))).unwrap();
    assert_eq!(info["state"], "Running");
    ok(vmm.remote(&["pause"]));
    ok(vmm.remote(&["resume"]));
    console.wait_for("heartbeat ", BOOT);

    // A failing command prints the error chain and exits non-zero.
    let out = vmm.remote(&["resume"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Cannot resume a VM that is Running"),
        "{stderr}"
    );

    // Shut down, boot again, delete, and end the VMM.
    ok(vmm.remote(&["shutdown"]));
    let info: serde_json::Value = serde_json::from_str(&ok(vmm.remote(&["info"]))).unwrap();
    assert_eq!(info["state"], "Shutdown");
    ok(vmm.remote(&["boot"]));
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    ok(vmm.remote(&["delete"]));
    let out = vmm.remote(&["info"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No VM has been created"));
    ok(vmm.remote(&["shutdown-vmm"]));
    let (status, stderr) = vmm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn bad_requests_get_clear_errors_and_baton_keeps_serving() {
    let vmm = ApiVmm::start(&[]);
    let serial = vmm.dir().join("serial.sock");
    let good = guest_config_json(&serial, 1, "heartbeat_ms=0");
    let too_big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "PUT",
            "vm.create",
            Some("{not json"),
            400,
            "Invalid VM configuration",
        ),
        (
            "PUT",
            "vm.create",
            Some(r#"{"payload":{"kernel":"/k"},"turbo":true}"#),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "vm.create",
            Some(r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":"four","max_vcpus":4}}"#),
            400,
            "invalid type",
        ),
        (
            "PUT",
            "vm.create",
            Some(r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":0,"max_vcpus":0}}"#),
            400,
            "Number of vCPUs",
        ),
        ("PUT", "vm.create", Some(&too_big), 413, "exceeds the limit"),
        ("GET", "vm.teleport", None, 404, "Unknown API path"),
        ("PUT", "vmm.ping", None, 405, "use GET"),
        ("GET", "vm.boot", None, 405, "use PUT"),
        ("PUT", "vm.pause", None, 404, "No VM"),
        ("PUT", "vm.resume", None, 404, "No VM"),
    ];
    for (method, endpoint, body, status, text) in cases {
        let r = vmm.http(method, endpoint, *body);
        assert_eq!(r.status, *status, "{method} {endpoint}");
        let chain = r.error_chain().expect("errors are a JSON array of strings");
        assert!(
            chain.iter().any(|l| l.contains(text)),
            "{method} {endpoint}: {chain:?} lacks {text:?}"
        );
        // baton still serves the next request.
        vmm.expect("GET", "vmm.ping", None, 200);
    }
    // Wrong state once a VM exists.
    vmm.expect("PUT", "vm.create", Some(&good), 204);
    for endpoint in [
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
    ] {
        let r = vmm.http("PUT", endpoint, None);
        assert_eq!(r.status, 409, "{endpoint} before boot");
        vmm.expect("GET", "vm.info", None, 200);
    }
    // A request that is not HTTP at all.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&vmm.socket).unwrap();
    s.write_all(b"HELLO\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    vmm.expect("GET", "vmm.ping", None, 200);
}

#[test]
fn socket_is_owner_only_and_exclusive() {
    let vmm = ApiVmm::start(&[]);
    let mode = std::fs::metadata(&vmm.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = baton_tests::run_baton(
        &["--api-socket", &format!("path={}", vmm.socket.display())],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another baton"), "{stderr}");
    vmm.expect("GET", "vmm.ping", None, 200);
}

#[test]
fn the_socket_path_never_replaces_or_follows_what_is_not_a_socket() {
    let dir = baton_tests::TempDir::new("paths");
    let fails = |path: &std::path::Path, text: &str| {
        let out = baton_tests::run_baton(
            &["--api-socket", &format!("path={}", path.display())],
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(text),
            "{}: expected {text:?} in {stderr}",
            path.display()
        );
    };
    // A file where the socket would go (a typo naming a disk image) is left as it was.
    let image = dir.path().join("disk.img");
    std::fs::write(&image, b"precious").unwrap();
    fails(&image, "Address already in use");
    assert_eq!(std::fs::read(&image).unwrap(), b"precious");
    // A symlink at the socket path is not followed: nothing appears at its target.
    let link = dir.path().join("link.sock");
    let target = dir.path().join("elsewhere.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    fails(&link, "Address already in use");
    assert!(!target.exists());
    // A lock file that is a symlink is refused (O_NOFOLLOW), and its target not created.
    let sock = dir.path().join("api.sock");
    let lock_target = dir.path().join("victim");
    std::os::unix::fs::symlink(&lock_target, dir.path().join("api.sock.lock")).unwrap();
    fails(&sock, "Cannot open lock file");
    assert!(!lock_target.exists());
    assert!(!sock.exists());
}

#[test]
fn stale_socket_file_does_not_block_a_new_baton() {
    let dir = baton_tests::TempDir::new("stale");
    let socket = dir.path().join("api.sock");
    // A socket file nobody serves, as a killed baton leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let spec = format!("path={}", socket.display());
    let mut child = std::process::Command::new(baton_tests::baton_bin())
        .args(["--api-socket", &spec])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while api::client::request(&socket, "GET", "vmm.ping", None).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "baton exited");
        assert!(
            Instant::now() < deadline,
            "baton never served the stale path"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = api::client::request(&socket, "PUT", "vmm.shutdown", None).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(baton_tests::wait_child(&mut child, EXIT).code(), Some(0));
}

#[test]
fn command_line_vm_with_api_socket() {
    let guest = baton_tests::guest_bin();
    let vmm = ApiVmm::start(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "heartbeat_ms=0",
        "--serial",
        "off",
    ]);
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running");
    vmm.expect("PUT", "vm.create", Some("{\"payload\":{}}"), 409);
    vmm.expect("PUT", "vmm.shutdown", None, 204);
    let (status, stderr) = vmm.wait_exit(EXIT);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn inherited_listening_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let dir = baton_tests::TempDir::new("fd");
    let socket = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new(baton_tests::baton_bin());
    cmd.args(["--api-socket", &format!("fd={fd}")])
        .stderr(std::process::Stdio::piped());
    // SAFETY: runs in the child between fork and exec and only calls fcntl, which is
    // async-signal-safe, on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    // baton holds its own copy now; were it to die, requests fail instead of hanging.
    drop(listener);
    // The listener already exists: a request succeeds as soon as baton accepts.
    let r = api::client::request(&socket, "GET", "vmm.ping", None).unwrap();
    assert_eq!(r.status, 200);
    let r = api::client::request(&socket, "PUT", "vmm.shutdown", None).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(baton_tests::wait_child(&mut child, EXIT).code(), Some(0));
}

#[test]
fn bad_api_socket_options() {
    for (spec, text) in [
        ("fd=99", "File descriptor 99 is not a listening UNIX socket"),
        ("fd=x", "Invalid value 'x'"),
        ("path=/a,fd=3", "exactly one of path=PATH or fd=N"),
        ("port=80", "Unknown option 'port'"),
        (
            "path=/nonexistent-dir/api.sock",
            "Cannot open lock file /nonexistent-dir/api.sock.lock",
        ),
    ] {
        let out = baton_tests::run_baton(&["--api-socket", spec], Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {stderr}");
        assert!(
            stderr.contains(text),
            "{spec}: expected {text:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Regression: a failed vm.reboot left the state Running without a VM, and the next
/// vm.pause crashed baton.
#[test]
fn failed_reboot_leaves_the_vm_shut_down() {
    let vmm = ApiVmm::start(&[]);
    let kernel = vmm.dir().join("guest.elf");
    std::fs::copy(baton_tests::guest_bin(), &kernel).unwrap();
    let config = serde_json::json!({
        "payload": {"kernel": kernel, "cmdline": "heartbeat_ms=0"},
        "memory": {"size": 64u64 << 20},
    })
    .to_string();
    vmm.expect("PUT", "vm.create", Some(&config), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    std::fs::remove_file(&kernel).unwrap();
    let r = vmm.http("PUT", "vm.reboot", None);
    assert_eq!(r.status, 500);
    let chain = r.error_chain().unwrap();
    assert!(
        chain.iter().any(|l| l.contains("Cannot open kernel")),
        "{chain:?}"
    );
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Shutdown");
    vmm.expect("PUT", "vm.pause", None, 409);
    vmm.expect("PUT", "vm.power-button", None, 409);
    vmm.expect("GET", "vmm.ping", None, 200);
}

/// Regression: a deleted VM's console kept its serial socket, so the same VM could not be
/// created and booted again.
#[test]
fn delete_releases_the_serial_socket() {
    let mut vmm = ApiVmm::start(&[]);
    let serial = vmm.dir().join("serial.sock");
    let config = guest_config_json(&serial, 1, "heartbeat_ms=0");
    for round in 0..2 {
        vmm.expect("PUT", "vm.create", Some(&config), 204);
        vmm.expect("PUT", "vm.boot", None, 204);
        let mut console = vmm.console(&serial);
        console.wait_for(READY, BOOT);
        console.send("echo round");
        assert_eq!(
            console.wait_for("echo: ", BOOT),
            "echo: round",
            "round {round}"
        );
        vmm.expect("PUT", "vm.delete", None, 204);
    }
}

/// Reads one answer (head and Content-Length body) from `s`.
fn read_answer(s: &mut std::os::unix::net::UnixStream) -> String {
    use std::io::Read;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "answer cut short: {answer:?}"
        );
        answer.push(byte[0]);
    }
    let head = String::from_utf8(answer).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

#[test]
fn http_as_cloud_hypervisors_clients_speak_it() {
    use std::io::Write;
    let vmm = ApiVmm::start(&[]);
    let connect = || std::os::unix::net::UnixStream::connect(&vmm.socket).unwrap();

    // The status line has no reason phrase; a request may arrive in pieces, and several
    // requests share one connection.
    let mut s = connect();
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n")
        .unwrap();
    s.write_all(b"\r\n").unwrap();
    let answer = read_answer(&mut s);
    assert!(answer.starts_with("HTTP/1.1 200 \r\n"), "{answer}");
    assert!(answer.contains("\"pid\""), "{answer}");
    s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(read_answer(&mut s).starts_with("HTTP/1.1 404 \r\n"));

    // Expect: 100-continue gets its interim answer before the body is sent.
    let mut s = connect();
    s.write_all(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
    )
    .unwrap();
    let interim = read_answer(&mut s);
    assert!(interim.starts_with("HTTP/1.1 100 \r\n"), "{interim}");
    s.write_all(b"{not json").unwrap();
    let answer = read_answer(&mut s);
    assert!(answer.starts_with("HTTP/1.1 400 \r\n"), "{answer}");

    // Content-Length is digits only.
    for bad in ["+2", "-0", "2 2", "0x2"] {
        let mut s = connect();
        write!(
            s,
            "PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nxx"
        )
        .unwrap();
        let answer = read_answer(&mut s);
        assert!(answer.starts_with("HTTP/1.1 400 \r\n"), "{bad}: {answer}");
        assert!(answer.contains("Content-Length"), "{bad}: {answer}");
    }
    // A path that is not UTF-8.
    let mut s = connect();
    s.write_all(b"GET /api/v1/vm.\xff HTTP/1.1\r\n\r\n")
        .unwrap();
    assert!(read_answer(&mut s).starts_with("HTTP/1.1 400 \r\n"));
    // Cloud Hypervisor's endpoints baton lacks say so.
    let r = vmm.http("PUT", "vm.add-vsock", Some("{}"));
    assert_eq!(r.status, 501);
    assert!(r.error_chain().unwrap()[0].contains("not supported by baton"));
}

#[test]
fn idle_and_slow_clients_do_not_hold_up_the_api() {
    clients_beyond_the_limit("", api::server::MAX_CONNECTIONS, 1000);
}

#[test]
fn the_connection_limit_is_the_operators() {
    clients_beyond_the_limit("max_connections=16", 16, 100);
}

/// Opens `clients_wanted` connections to a baton started with `api_options`, which serves
/// `limit` at once, and checks `vmm.ping` still answers promptly and baton's descriptors
/// and threads stay bounded.
fn clients_beyond_the_limit(api_options: &str, limit: usize, clients_wanted: usize) {
    use std::io::Write;
    let vmm = ApiVmm::start_with(None, api_options, &[], &[]);
    let (fds_before, threads_before) = (
        baton_tests::fd_count(vmm.pid()),
        baton_tests::thread_count(vmm.pid()),
    );
    // More clients than baton serves at once: half idle, half sending a request one
    // byte at a time and never finishing it.
    let mut clients = Vec::new();
    for i in 0..clients_wanted {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&vmm.socket) else {
            continue;
        };
        if i % 2 == 1 {
            let _ = s.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Len");
        }
        clients.push(s);
    }
    for _ in 0..20 {
        let start = std::time::Instant::now();
        vmm.expect("GET", "vmm.ping", None, 200);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "vmm.ping took {:?} with {clients_wanted} idle and slow clients",
            start.elapsed()
        );
    }
    let (fds, threads_now) = (
        baton_tests::fd_count(vmm.pid()),
        baton_tests::thread_count(vmm.pid()),
    );
    assert!(
        fds <= fds_before + limit + 2,
        "{fds} descriptors open, {fds_before} before the clients came"
    );
    assert_eq!(
        threads_now, threads_before,
        "the server took threads for clients"
    );
    drop(clients);
}
