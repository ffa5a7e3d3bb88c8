//! Snapshot and restore with the test guest: a guest restored in a new baton carries on (its
//! heartbeat counter without a gap, its clock, its TCP stream), and every bad request gets a
//! clear error while the VM keeps working.

use std::time::Duration;

use baton_tests::{
    assert_card_merges, guest_config_json, heartbeat_number, num, ApiVmm, NetNs, SeqStream,
    TempDir, READY,
};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A persistent TAP `tap0` in `ns` with the host side at 10.0.0.1, as management sets up:
/// it outlives the baton that uses it.
fn host_tap(ns: &NetNs) {
    ns.run(&[
        "ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
    ]);
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    ns.run(&["ip", "link", "set", "tap0", "up"]);
}

fn guest_config(serial: &std::path::Path, cpus: u8, with_net: bool) -> String {
    let mut c: serde_json::Value = serde_json::from_str(&guest_config_json(
        serial,
        cpus,
        // Small receive buffers: full-size frames arrive spread over mergeable buffers.
        "heartbeat_ms=20 net=10.0.0.2/24 rx_buffer=512",
    ))
    .unwrap();
    if with_net {
        c["net"] = serde_json::json!([{"id": "net0", "tap": "tap0"}]);
    }
    c.to_string()
}

fn put(vmm: &ApiVmm, endpoint: &str, body: serde_json::Value) -> (u16, String) {
    let r = vmm.http("PUT", endpoint, Some(&body.to_string()));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

#[test]
fn restored_guest_continues_in_a_new_baton() {
    let ns = NetNs::new("snap");
    host_tap(&ns);
    let files = TempDir::new("snap-files");
    let serial = files.path().join("serial.sock");
    let url = format!("file://{}/snap", files.path().display());

    let mut a = ApiVmm::start_in(Some(&ns), &[]);
    a.expect(
        "PUT",
        "vm.create",
        Some(&guest_config(&serial, 2, true)),
        204,
    );
    a.expect("PUT", "vm.boot", None, 204);
    let mut console = a.console(&serial);
    console.wait_for(READY, BOOT);
    console.wait_for("heartbeat 3", REPLY);
    let before = console.command("status", "status:", REPLY);

    let mut stream = ns.enter(|| {
        let mut s = SeqStream::connect("10.0.0.2", 5001, REPLY);
        s.read(4 * MIB);
        s
    });
    a.expect("PUT", "vm.pause", None, 204);
    a.expect(
        "PUT",
        "vm.snapshot",
        Some(&serde_json::json!({ "destination_url": url }).to_string()),
        204,
    );
    let last = console.last_heartbeat();
    a.expect("PUT", "vmm.shutdown", None, 204);
    a.wait_exit(REPLY);

    let mut b = ApiVmm::start_in(Some(&ns), &[]);
    b.expect(
        "PUT",
        "vm.restore",
        Some(&serde_json::json!({ "source_url": url }).to_string()),
        204,
    );
    let info = b.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Paused", "{info}");
    assert_eq!(info["config"]["net"][0]["tap"], "tap0", "{info}");
    let mut console = b.console(&serial);
    b.expect("PUT", "vm.resume", None, 204);
    console.heartbeat_continues(last, 10, REPLY);
    let after = console.command("status", "status:", REPLY);
    assert!(
        num(&after, "uptime_us") > num(&before, "uptime_us"),
        "the guest's clock went back: {before} then {after}"
    );
    assert_eq!(num(&after, "cpus"), 2, "{after}");
    // The TCP connection opened before the snapshot carries on, every byte in order.
    ns.enter(move || stream.read(8 * MIB));
    let out = ns.output(&[
        "ping", "-q", "-c", "5", "-i", "0.05", "-W", "5", "-s", "1400", "10.0.0.2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The restored card kept the features the driver negotiated, and used them.
    assert_card_merges(&console.command("net", "net:", REPLY), 1);
}

#[test]
fn bad_snapshot_requests_are_refused_and_the_vm_keeps_running() {
    let files = TempDir::new("snap-bad");
    let serial = files.path().join("serial.sock");
    let url = format!("file://{}/snap", files.path().display());
    let mut vmm = ApiVmm::start(&[]);
    let body = serde_json::json!({ "destination_url": url });

    let (status, err) = put(&vmm, "vm.snapshot", body.clone());
    assert_eq!(status, 404, "no VM yet: {err}");
    // With a device, so that a device's own state can be spoiled below.
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config(&serial, 1, false)).unwrap();
    config["rng"] = serde_json::json!({"id": "rng0"});
    vmm.expect("PUT", "vm.create", Some(&config.to_string()), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);

    let (status, err) = put(&vmm, "vm.snapshot", body.clone());
    assert_eq!(status, 409, "{err}");
    assert!(err.contains("Running"), "{err}");
    vmm.expect("PUT", "vm.pause", None, 204);
    for bad in ["/tmp/x", "unix:/tmp/x", "file://relative", ""] {
        let (status, err) = put(
            &vmm,
            "vm.snapshot",
            serde_json::json!({ "destination_url": bad }),
        );
        assert_eq!(status, 400, "{bad}: {err}");
        assert!(err.contains("file:///"), "{bad}: {err}");
    }
    let (status, err) = put(&vmm, "vm.snapshot", serde_json::json!({ "url": url }));
    assert_eq!(status, 400, "{err}");
    vmm.expect("PUT", "vm.snapshot", Some(&body.to_string()), 204);
    // A second snapshot into the same directory would overwrite the first.
    let (status, err) = put(&vmm, "vm.snapshot", body.clone());
    assert_eq!(status, 409, "{err}");
    assert!(err.contains("already holds a snapshot"), "{err}");
    // A VM exists: restoring over it is refused.
    let (status, err) = put(&vmm, "vm.restore", serde_json::json!({ "source_url": url }));
    assert_eq!(status, 409, "{err}");

    // The VM still runs after all that.
    vmm.expect("PUT", "vm.resume", None, 204);
    let last = console.wait_for("heartbeat", REPLY);
    console.heartbeat_continues(heartbeat_number(&last).unwrap(), 3, REPLY);

    // Restores of broken snapshots, into a fresh baton: each a clear 400.
    let dir = files.path().join("snap");
    let fresh = ApiVmm::start(&[]);
    let restore = |path: &std::path::Path| {
        put(
            &fresh,
            "vm.restore",
            serde_json::json!({ "source_url": format!("file://{}", path.display()) }),
        )
    };
    let (status, err) = restore(&files.path().join("nothing-here"));
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("config.json"), "{err}");

    let state = std::fs::read(dir.join("state.bin")).unwrap();
    let mut flipped = state.clone();
    let last_byte = flipped.len() - 1;
    flipped[last_byte] ^= 0x55;
    std::fs::write(dir.join("state.bin"), &flipped).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");
    assert!(err.to_lowercase().contains("checksum"), "{err}");

    let mut newer = state.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(dir.join("state.bin"), &newer).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("version"), "{err}");

    // The format before device states were typed and versioned.
    let mut older = state.clone();
    older[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(dir.join("state.bin"), &older).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");
    assert!(
        err.contains("Snapshot format version 1 is not supported (this baton reads version 3)"),
        "{err}"
    );

    // A device's own state in a layout version this baton does not read. The restore gets
    // as far as the console, so the first VM lets go of the serial socket first.
    let (status, err) = put(&vmm, "vm.delete", serde_json::json!({}));
    assert_eq!(status, 204, "{err}");
    let mut payload: serde_json::Value = migration::snapshot::decode(&state).unwrap();
    let device = &mut payload["devices"][0];
    let id = device[0].as_str().expect("a device id").to_string();
    let own = device[1]["device"]
        .as_object_mut()
        .and_then(|kinds| kinds.values_mut().next())
        .expect("the device's own state, by kind");
    own["version"] = serde_json::json!(9);
    let other_layout = migration::snapshot::encode(&payload).unwrap();
    std::fs::write(dir.join("state.bin"), &other_layout).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");
    assert!(err.contains(&format!("Device '{id}'")), "{err}");
    assert!(
        err.contains("state version 9 is not supported (this baton reads version 1)"),
        "{err}"
    );

    std::fs::write(dir.join("state.bin"), &state[..state.len() / 2]).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");

    std::fs::write(dir.join("state.bin"), &state).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.bin"))
        .unwrap();
    memory.set_len(4096).unwrap();
    let (status, err) = restore(&dir);
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("memory.bin"), "{err}");
    // The fresh baton is still empty and answers.
    let (status, _) = put(&fresh, "vm.resume", serde_json::json!({}));
    assert_eq!(status, 404);
}
