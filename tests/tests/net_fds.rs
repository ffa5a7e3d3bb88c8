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
    vmm.console(&serial).wait_for(READY, BOOT);
    ping_ok(&ns);

    // No hot-plug.
    let (status, body) = call(&vmm, "vm.add-net", Some(r#"{"tap":"other"}"#), &[]);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("add it before vm.boot"), "{body}");
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
