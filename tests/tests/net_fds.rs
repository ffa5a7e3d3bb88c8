//! TAP descriptors handed to baton with SCM_RIGHTS, as management software does: with
//! vm.create for cards without a TAP name, and with vm.add-net before boot.

use std::os::fd::AsRawFd;
use std::time::Duration;

use baton_tests::{guest_config_json, ApiVmm, NetNs, READY};

const BOOT: Duration = Duration::from_secs(60);

fn ping_ok(ns: &NetNs) {
    let out = ns.output(&["ping", "-q", "-c", "5", "-i", "0.05", "-W", "5", "10.0.0.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "{text}"
    );
}

fn configure_host_side(ns: &NetNs, tap: &str) {
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", tap]);
    ns.run(&["ip", "link", "set", tap, "up"]);
}

fn config(vmm: &ApiVmm, net: serde_json::Value) -> String {
    let serial = vmm.dir().join("serial.sock");
    let mut c: serde_json::Value = serde_json::from_str(&guest_config_json(
        &serial,
        1,
        "heartbeat_ms=0 net=10.0.0.2/24",
    ))
    .unwrap();
    c["net"] = net;
    c.to_string()
}

fn call(vmm: &ApiVmm, endpoint: &str, body: Option<&str>, fds: &[i32]) -> (u16, String) {
    let r =
        api::client::request_with_fds(&vmm.socket, "PUT", endpoint, body.map(str::as_bytes), fds)
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

#[test]
fn add_net_with_a_passed_tap_before_boot() {
    let ns = NetNs::new("addnet");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    let tap = ns.open_tap("tapfd", false);
    configure_host_side(&ns, "tapfd");
    assert_eq!(
        call(
            &vmm,
            "vm.create",
            Some(&config(&vmm, serde_json::json!([]))),
            &[]
        )
        .0,
        204
    );

    // Descriptors where none belong are refused, and closed.
    let (status, body) = call(&vmm, "vm.boot", None, &[tap.as_raw_fd()]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("file descriptor(s) came with a request that takes none"),
        "{body}"
    );
    // Something that is not a TAP.
    let null = std::fs::File::open("/dev/null").unwrap();
    let (status, body) = call(&vmm, "vm.add-net", Some("{}"), &[null.as_raw_fd()]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is not a TAP"), "{body}");
    // More descriptors than a request takes: refused, closed, and baton serves on.
    let many = vec![null.as_raw_fd(); api::fds::MAX_FDS + 1];
    let (status, body) = call(&vmm, "vm.add-net", Some("{}"), &many);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("More than 64 descriptor(s)"), "{body}");
    vmm.expect("GET", "vmm.ping", None, 200);
    // Two descriptors for a card with one queue pair.
    let (status, body) = call(
        &vmm,
        "vm.add-net",
        Some("{}"),
        &[tap.as_raw_fd(), tap.as_raw_fd()],
    );
    assert_eq!(status, 400, "{body}");

    let (status, body) = call(
        &vmm,
        "vm.add-net",
        Some(r#"{"id":"lan"}"#),
        &[tap.as_raw_fd()],
    );
    assert_eq!(status, 204, "{body}");
    // baton holds its own copy: ours can go.
    drop(tap);
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["config"]["net"][0]["id"], "lan");
    assert_eq!(info["config"]["net"][0]["tap"], "tapfd");

    vmm.expect("PUT", "vm.boot", None, 204);
    let serial = vmm.dir().join("serial.sock");
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    ping_ok(&ns);

    // Hot-plugged from a descriptor while the guest runs, as ch-remote add-net fd=[..] does.
    let tap2 = ns.open_tap("tapfd2", false);
    let (status, body) = call(
        &vmm,
        "vm.add-net",
        Some(r#"{"id":"lan2"}"#),
        &[tap2.as_raw_fd()],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""id":"lan2""#), "{body}");
    let added = console.wait_for("hotplug: added", BOOT);
    assert!(added.contains("kind=net"), "{added}");
}

#[test]
fn create_takes_queue_descriptors_for_cards_without_a_tap_name() {
    let ns = NetNs::new("createfds");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    // Two queue pairs on a multi-queue TAP the test owns.
    let q0 = ns.open_tap("tapmq", true);
    let q1 = ns.open_tap("tapmq", true);
    configure_host_side(&ns, "tapmq");
    let net = serde_json::json!([{"num_queues": 4}]);
    // One descriptor short.
    let (status, body) = call(
        &vmm,
        "vm.create",
        Some(&config(&vmm, net.clone())),
        &[q0.as_raw_fd()],
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("needs 2 TAP descriptor(s)"), "{body}");
    let (status, body) = call(
        &vmm,
        "vm.create",
        Some(&config(&vmm, net)),
        &[q0.as_raw_fd(), q1.as_raw_fd()],
    );
    assert_eq!(status, 204, "{body}");
    drop((q0, q1));
    vmm.expect("PUT", "vm.boot", None, 204);
    let serial = vmm.dir().join("serial.sock");
    vmm.console(&serial).wait_for(READY, BOOT);
    ping_ok(&ns);
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["config"]["net"][0]["tap"], "tapmq");
}

/// Makes `fd` descriptor 3 of the process `cmd` starts, as a shell's `3<&N` would.
fn pass_as_fd3(cmd: &mut std::process::Command, fd: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 is async-signal-safe; it only duplicates a descriptor this process holds
    // (and clears close-on-exec on the copy) in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `baton-remote` passes TAP descriptors it inherited, named as ch-remote names them:
/// `add-net fd=[3]` and `restore ...,net_fds=[net0@[3]]`.
#[test]
fn baton_remote_passes_inherited_descriptors() {
    let ns = NetNs::new("remotefds");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    vmm.expect(
        "PUT",
        "vm.create",
        Some(&config(&vmm, serde_json::json!([]))),
        204,
    );
    let socket = vmm.socket.clone();
    let remote = |args: &[&str], fd: Option<i32>| {
        let mut cmd = std::process::Command::new(baton_tests::remote_bin());
        cmd.arg("--api-socket").arg(&socket).args(args);
        if let Some(fd) = fd {
            pass_as_fd3(&mut cmd, fd);
        }
        let out = cmd.output().expect("run baton-remote");
        assert!(
            out.status.success(),
            "baton-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A descriptor baton-remote does not have is refused before anything is sent.
    let out = std::process::Command::new(baton_tests::remote_bin())
        .arg("--api-socket")
        .arg(&vmm.socket)
        .args(["add-net", "id=net0,fd=[77]"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Descriptor 77 is not open"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tap = ns.open_tap("tapremote", false);
    configure_host_side(&ns, "tapremote");
    remote(&["add-net", "id=net0,fd=[3]"], Some(tap.as_raw_fd()));
    drop(tap);
    vmm.expect("PUT", "vm.boot", None, 204);
    let serial = vmm.dir().join("serial.sock");
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    ping_ok(&ns);

    remote(&["pause"], None);
    let snapshot = vmm.dir().join("snap");
    remote(
        &["snapshot", &format!("file://{}", snapshot.display())],
        None,
    );
    remote(&["delete"], None);
    // The TAP went with the VM; the restored card takes a new one of the same name.
    let tap = ns.open_tap("tapremote", false);
    configure_host_side(&ns, "tapremote");
    remote(
        &[
            "restore",
            &format!(
                "source_url=file://{},net_fds=[net0@[3]],resume=on",
                snapshot.display()
            ),
        ],
        Some(tap.as_raw_fd()),
    );
    drop(tap);
    ping_ok(&ns);
}

/// `baton --net fd=3`: a TAP queue baton inherited, as management software passes it.
#[test]
fn command_line_net_on_an_inherited_descriptor() {
    let ns = NetNs::new("clifd");
    let tap = ns.open_tap("tapcli", false);
    configure_host_side(&ns, "tapcli");
    let dir = baton_tests::TempDir::new("clifd");
    let serial = dir.path().join("serial.sock");
    let api = dir.path().join("api.sock");
    let mut cmd = ns.command(&baton_tests::baton_bin());
    cmd.args([
        "--kernel",
        &baton_tests::guest_bin().display().to_string(),
        "--cmdline",
        "heartbeat_ms=0 net=10.0.0.2/24",
        "--memory",
        "size=256M",
        "--serial",
        &format!("socket={}", serial.display()),
        "--net",
        "id=net0,fd=[3]",
        "--api-socket",
        &format!("path={}", api.display()),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    pass_as_fd3(&mut cmd, tap.as_raw_fd());
    let mut child = cmd.spawn().expect("start baton");
    drop(tap);
    let mut console = baton_tests::Console::connect(&serial, &mut child, Duration::from_secs(20));
    console.wait_for(READY, BOOT);
    ping_ok(&ns);
    let info = api::client::request(&api, "GET", "vm.info", None).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["config"]["net"][0]["tap"], "tapcli");
    let _ = child.kill();
    let _ = child.wait();

    // Descriptors that cannot be a TAP queue are refused with the reason.
    for (net, reason) in [
        ("fd=[1]", "standard input, output and error"),
        ("fd=[99]", "not an open descriptor"),
        ("fd=[5],tap=x", "either tap= or fd="),
        ("num_queues=4,fd=[5]", "1 descriptor(s) for 2 queue pair(s)"),
    ] {
        let out = std::process::Command::new(baton_tests::baton_bin())
            .args(["--kernel", "/nonexistent", "--net", net])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(reason),
            "{net}: {err}"
        );
    }
}
