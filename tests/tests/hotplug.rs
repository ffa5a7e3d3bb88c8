//! PCI hot-plug on a running VM: `vm.add-disk`, `vm.add-net` and `vm.remove-device` while the
//! test guest runs. The guest learns of each change as an operating system does — the GED's
//! interrupt event, then the hot-plug registers the DSDT names — starts a driver on a device
//! that arrived, and lets go of and ejects one baton asks back. baton then releases it: the
//! image or TAP is closed, and its descriptors, threads and interrupts are given back.

use std::time::{Duration, Instant};

use baton_tests::flood::{fd_count, thread_count};
use baton_tests::netns::NetNs;
use baton_tests::{
    eventually, field, guest_config_json, hotplug_slot, num, sector_image, ApiVmm, TempDir, READY,
    SECTOR,
};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);

#[test]
fn the_test_guest_sees_disks_come_and_go() {
    let dir = TempDir::new("hotplug");
    let (image, data) = sector_image(&dir, "hot.raw", 64, 0x40);

    let mut vmm = ApiVmm::start(&[]);
    let serial = vmm.dir().join("serial.sock");
    let config = guest_config_json(&serial, 1, "heartbeat_ms=0");
    vmm.expect("PUT", "vm.create", Some(&config), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    let missing = console.command("disk info", "disk:", REPLY);
    assert!(missing.starts_with("error: disk:"), "{missing}");

    let add = json!({"path": image, "id": "hot0"}).to_string();
    let remove = json!({"id": "hot0"}).to_string();
    let mut baseline = None;
    for round in 0..4 {
        let info = vmm
            .expect("PUT", "vm.add-disk", Some(&add), 200)
            .expect("a PciDeviceInfo body");
        assert_eq!(info["id"], "hot0", "{info}");
        let slot = hotplug_slot(&info);
        let added = console.wait_for("hotplug: added", REPLY);
        assert_eq!(num(&added, "slot"), u64::from(slot), "{added}");
        assert_eq!(field(&added, "kind"), Some("disk"), "{added}");
        assert!(vmm.device_ids().contains(&"hot0".to_string()));

        console.assert_disk_reads(&data, 2, 30);
        let disk = console.command("disk info", "disk:", REPLY);
        assert!(disk.contains("id=hot0"), "{disk}");

        // Its id is taken while it is there.
        let again = vmm.http("PUT", "vm.add-disk", Some(&add));
        assert_eq!(again.status, 400, "round {round}");

        vmm.expect("PUT", "vm.remove-device", Some(&remove), 204);
        let ejected = console.wait_for("hotplug: ejected", REPLY);
        assert_eq!(num(&ejected, "slot"), u64::from(slot), "{ejected}");
        assert_eq!(field(&ejected, "kind"), Some("disk"), "{ejected}");
        eventually("the disk leaves vm.info", REPLY, || {
            !vmm.device_ids().contains(&"hot0".to_string())
        });
        let gone = console.command("disk info", "disk:", REPLY);
        assert!(gone.starts_with("error: disk:"), "{gone}");
        let unknown = vmm.http("PUT", "vm.remove-device", Some(&remove));
        assert_eq!(unknown.status, 404, "round {round}");

        // The image, the device's thread and eventfds are released every round.
        let counts = (fd_count(vmm.pid()), thread_count(vmm.pid()));
        match baseline {
            None => baseline = Some(counts),
            Some(b) => {
                let now = || (fd_count(vmm.pid()), thread_count(vmm.pid()));
                let deadline = Instant::now() + REPLY;
                let mut counts = now();
                // Round 0's count may include an API connection baton has yet to see
                // closed: no growth is what matters.
                while (counts.0 > b.0 || counts.1 > b.1) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    counts = now();
                }
                assert!(
                    counts.0 <= b.0 && counts.1 <= b.1,
                    "(fds, threads) after round {round}: {counts:?}, after round 0: {b:?}"
                );
            }
        }
    }
    // The guest runs on.
    let rng_less = console.command("cpus", "cpus:", REPLY);
    assert!(rng_less.starts_with("cpus:"), "{rng_less}");
}

/// Whether one ping of `addr` from `ns` is answered.
fn answers(ns: &NetNs, addr: &str) -> bool {
    ns.output(&["ping", "-q", "-c", "1", "-W", "1", addr])
        .status
        .success()
}

#[test]
fn a_hot_plugged_card_answers_pings_and_its_tap_goes_with_it() {
    let ns = NetNs::new("hotnet");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    let serial = vmm.dir().join("serial.sock");
    let config = guest_config_json(&serial, 1, "heartbeat_ms=0 net=10.0.9.2/24");
    vmm.expect("PUT", "vm.create", Some(&config), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);

    let add = json!({
        "tap": "hot0", "ip": "10.0.9.1", "mask": "255.255.255.0", "id": "net0",
    })
    .to_string();
    let tap_exists = || ns.output(&["ip", "link", "show", "hot0"]).status.success();
    for _ in 0..2 {
        let info = vmm
            .expect("PUT", "vm.add-net", Some(&add), 200)
            .expect("a PciDeviceInfo body");
        let added = console.wait_for("hotplug: added", REPLY);
        assert_eq!(num(&added, "slot"), u64::from(hotplug_slot(&info)));
        assert_eq!(field(&added, "kind"), Some("net"), "{added}");
        eventually("the hot-plugged card answers a ping", REPLY, || {
            answers(&ns, "10.0.9.2")
        });

        vmm.expect("PUT", "vm.remove-device", Some(r#"{"id":"net0"}"#), 204);
        let ejected = console.wait_for("hotplug: ejected", REPLY);
        assert_eq!(field(&ejected, "kind"), Some("net"), "{ejected}");
        eventually("the card leaves vm.info", REPLY, || {
            !vmm.device_ids().contains(&"net0".to_string())
        });
        // baton created the TAP: with its last queue closed, it is gone.
        eventually("the TAP goes with the card", REPLY, || !tap_exists());
    }
    // A device that cannot be built is refused, and the VM keeps running.
    let bad = json!({"path": "/nonexistent/disk.raw", "id": "bad"}).to_string();
    let r = vmm.http("PUT", "vm.add-disk", Some(&bad));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(console.command("cpus", "cpus:", REPLY).starts_with("cpus:"));
}

#[test]
fn a_hot_plugged_disk_keeps_its_slot_across_a_migration() {
    let files = TempDir::new("hotmig");
    let (image, data) = sector_image(&files, "hot.raw", 64, 0x80);
    let serial = files.path().join("serial.sock");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config_json(&serial, 1, "heartbeat_ms=0")).unwrap();
    config["rng"] = json!({"id": "rng0"});

    let mut src = ApiVmm::start(&[]);
    src.expect("PUT", "vm.create", Some(&config.to_string()), 204);
    src.expect("PUT", "vm.boot", None, 204);
    let mut console = src.console(&serial);
    console.wait_for(READY, BOOT);
    // The entropy device sits in the first slot, the disk comes after it; then the first
    // slot is emptied. Placed in configuration order, the disk would move to the first slot
    // on the destination, under the feet of the guest's driver.
    let info = src
        .expect(
            "PUT",
            "vm.add-disk",
            Some(&json!({"path": image, "id": "hot0"}).to_string()),
            200,
        )
        .expect("a PciDeviceInfo body");
    let slot = hotplug_slot(&info);
    console.wait_for("hotplug: added", REPLY);
    src.expect("PUT", "vm.remove-device", Some(r#"{"id":"rng0"}"#), 204);
    let ejected = console.wait_for("hotplug: ejected", REPLY);
    assert_eq!(field(&ejected, "kind"), Some("rng"), "{ejected}");
    assert!(
        num(&ejected, "slot") < u64::from(slot),
        "{ejected} before slot {slot}"
    );
    eventually("the entropy device leaves vm.info", REPLY, || {
        let info = src.expect("GET", "vm.info", None, 200).unwrap();
        info["config"]["rng"].is_null()
    });

    let dst = ApiVmm::start(&[]);
    let url = format!("unix:{}", files.path().join("mig.sock").display());
    baton_tests::migrate(src, &dst, &url, false, false);
    let mut dst = dst;
    let mut console = dst.console(&serial);
    console.assert_disk_reads(&data, 5, 40);
    let wrote = console.command("disk write 60 2 7", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=60 count=2");
    let after = std::fs::read(&image).expect("read the image");
    assert!(after[60 * SECTOR..62 * SECTOR].iter().all(|b| *b == 7));
    assert_eq!(dst.device_ids(), vec!["hot0".to_string()]);
    let info = dst.expect("GET", "vm.info", None, 200).unwrap();
    assert!(info["config"]["rng"].is_null(), "{info}");
    // The guest still finds it where it was: the slot its driver knows is the one asked
    // back.
    dst.expect("PUT", "vm.remove-device", Some(r#"{"id":"hot0"}"#), 204);
    let ejected = console.wait_for("hotplug: ejected", REPLY);
    assert_eq!(num(&ejected, "slot"), u64::from(slot), "{ejected}");
    assert_eq!(field(&ejected, "kind"), Some("disk"), "{ejected}");
    eventually("the disk leaves vm.info", REPLY, || {
        dst.device_ids().is_empty()
    });
}
