//! Cloud Hypervisor's own clients drive baton unchanged: a client that writes requests,
//! bodies and descriptors exactly as `ch-remote` v53 does, and reads answers as its
//! `api_client` does, takes one test guest through every verb: create, add-net with passed
//! TAP descriptors, add-disk, remove-device, boot, info, counters, hot-plug and unplug of a
//! disk, pause, snapshot, resume, reboot, a local migration with backend transfer, shutdown,
//! delete, restore with net_fds, power-button, and shutdown-vmm. Each step's effect is checked, on the guest where it shows.

use std::os::fd::AsRawFd;
use std::time::Duration;

use baton_tests::ch::{bodies, ChClient, ChError};
use baton_tests::{eventually, guest_bin, hotplug_slot, ApiVmm, NetNs, TempDir, READY};

const BOOT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:56";
const TAP: &str = "chtap";

fn ok(
    client: &ChClient,
    method: &str,
    command: &str,
    body: Option<&serde_json::Value>,
) -> Option<serde_json::Value> {
    ok_with_fds(client, method, command, body, &[])
}

fn ok_with_fds(
    client: &ChClient,
    method: &str,
    command: &str,
    body: Option<&serde_json::Value>,
    fds: &[i32],
) -> Option<serde_json::Value> {
    let body = body.map(serde_json::Value::to_string);
    match client.call(method, command, body.as_deref(), fds) {
        Ok(answer) => answer.map(|b| serde_json::from_str(&b).expect("a JSON answer")),
        Err(e) => panic!("ch-remote {command} would exit 1: {e:?}"),
    }
}

/// A TAP in the namespace, with the host side at 10.0.0.1/24, and its queue descriptor.
fn open_tap(ns: &NetNs) -> std::os::fd::OwnedFd {
    let fd = ns.open_tap(TAP, false);
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", TAP]);
    ns.run(&["ip", "link", "set", TAP, "up"]);
    fd
}

fn guest_answers_ping(ns: &NetNs) {
    // Three replies within the deadline (a request sent while the guest's ARP entry for the
    // host is being resolved may go unanswered).
    let out = ns.output(&["ping", "-q", "-c", "3", "-i", "0.1", "-w", "30", "10.0.0.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
}

#[test]
fn ch_remote_drives_every_verb() {
    let ns = NetNs::new("chremote");
    let files = TempDir::new("chremote");
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    let ch = ChClient::new(&src.socket);

    let ping = ok(&ch, "GET", "vmm.ping", None).expect("ping answers with a body");
    assert_eq!(ping["pid"], src.pid());
    assert!(
        ping["version"].is_string() && ping["build_version"].is_string(),
        "{ping}"
    );

    let serial = files.path().join("serial.sock");
    let config = bodies::vm_config(
        &guest_bin().display().to_string(),
        "heartbeat_ms=0 net=10.0.0.2/24",
        &serial.display().to_string(),
        256 << 20,
    );
    assert_eq!(ok(&ch, "PUT", "vm.create", Some(&config)), None);

    // The TAP travels with SCM_RIGHTS on the request's first write; baton keeps its own copy.
    let tap = open_tap(&ns);
    ok_with_fds(
        &ch,
        "PUT",
        "vm.add-net",
        Some(&bodies::add_net("net0", MAC, 2)),
        &[tap.as_raw_fd()],
    );
    drop(tap);

    let image = files.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let image = image.display().to_string();
    ok(
        &ch,
        "PUT",
        "vm.add-disk",
        Some(&bodies::add_disk("disk0", &image)),
    );
    ok(
        &ch,
        "PUT",
        "vm.add-disk",
        Some(&bodies::add_disk("scratch", &image)),
    );
    ok(
        &ch,
        "PUT",
        "vm.remove-device",
        Some(&bodies::remove_device("scratch")),
    );

    // What baton does not have says so, in the error chain ch-remote prints.
    match ch.call(
        "PUT",
        "vm.add-fs",
        Some(r#"{"tag":"t","socket":"/s"}"#),
        &[],
    ) {
        Err(ChError::ServerResponse(501, Some(body))) => {
            let chain: Vec<String> = serde_json::from_str(&body).expect("an error chain");
            assert!(chain[0].contains("not supported by baton"), "{chain:?}");
        }
        other => panic!("vm.add-fs: {other:?}"),
    }
    // A value baton cannot honour names the field.
    let mut vhost = bodies::add_disk("vhost", &image);
    vhost["vhost_user"] = true.into();
    match ch.call("PUT", "vm.add-disk", Some(&vhost.to_string()), &[]) {
        Err(ChError::ServerResponse(400, Some(body))) => {
            assert!(
                body.contains("disk.vhost_user=true is not supported by baton"),
                "{body}"
            )
        }
        other => panic!("vhost-user disk: {other:?}"),
    }

    ok(&ch, "PUT", "vm.boot", None);
    let mut console = src.console(&serial);
    console.wait_for(READY, BOOT);
    guest_answers_ping(&ns);

    let info = ok(&ch, "GET", "vm.info", None).expect("info has a body");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["net"][0]["mac"], MAC);
    let disks = info["config"]["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 1, "{info}");
    assert_eq!(disks[0]["id"], "disk0");
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    let counters = ok(&ch, "GET", "vm.counters", None).expect("counters have a body");
    assert!(
        counters["net0"]["rx_frames"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );

    // Hot-plug: ch-remote prints the PciDeviceInfo; the guest sees the disk come and go.
    let hot = ok(
        &ch,
        "PUT",
        "vm.add-disk",
        Some(&bodies::add_disk("hot", &image)),
    )
    .expect("a hot-plug answers with the device's address");
    assert_eq!(hot["id"], "hot", "{hot}");
    let slot = hotplug_slot(&hot);
    // The guest drives its first disk only: it sees this one arrive without starting it.
    let added = console.wait_for("hotplug: added", BOOT);
    assert!(added.contains(&format!("slot={slot} ")), "{added}");
    ok(
        &ch,
        "PUT",
        "vm.remove-device",
        Some(&bodies::remove_device("hot")),
    );
    let ejected = console.wait_for("hotplug: ejected", BOOT);
    assert!(ejected.contains(&format!("slot={slot} ")), "{ejected}");
    eventually("the hot disk leaves vm.info", BOOT, || {
        ok(&ch, "GET", "vm.info", None).expect("info")["config"]["disks"]
            .as_array()
            .is_some_and(|d| d.len() == 1)
    });

    ok(&ch, "PUT", "vm.pause", None);
    let snapshot = format!("file://{}", files.path().join("snapshot").display());
    ok(
        &ch,
        "PUT",
        "vm.snapshot",
        Some(&bodies::snapshot(&snapshot)),
    );
    ok(&ch, "PUT", "vm.resume", None);
    guest_answers_ping(&ns);

    ok(&ch, "PUT", "vm.reboot", None);
    console.wait_for(READY, BOOT);
    guest_answers_ping(&ns);

    // Local migration with backend transfer: ch-remote's bodies plus baton's one switch on
    // each side. The TAP moves; the destination opens nothing.
    let mut dst = ApiVmm::start_in(Some(&ns), &[]);
    let dst_ch = ChClient::new(&dst.socket);
    let url = format!("unix:{}", files.path().join("migration.sock").display());
    let mut receive = bodies::receive_migration(&url);
    receive["backend_transfer"] = true.into();
    let receiving = {
        let socket = dst.socket.clone();
        let body = receive.to_string();
        std::thread::spawn(move || {
            ChClient::new(&socket)
                .call("PUT", "vm.receive-migration", Some(&body), &[])
                .map_err(|e| format!("{e:?}"))
        })
    };
    let mut send = bodies::send_migration(&url, true);
    send["backend_transfer"] = true.into();
    // The destination listens once its request has arrived: retry until it does.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match ch.call("PUT", "vm.send-migration", Some(&send.to_string()), &[]) {
            Ok(_) => break,
            Err(ChError::ServerResponse(_, Some(body)))
                if body.contains("Connection refused") || body.contains("No such file") =>
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "destination never listened: {body}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("send-migration: {e:?}"),
        }
    }
    receiving
        .join()
        .unwrap()
        .expect("receive-migration succeeds");
    let (exit, stderr) = src.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "the source did not exit cleanly: {stderr}");
    assert_eq!(
        ok(&dst_ch, "GET", "vm.info", None).unwrap()["state"],
        "Running"
    );
    guest_answers_ping(&ns);

    ok(&dst_ch, "PUT", "vm.shutdown", None);
    assert_eq!(
        ok(&dst_ch, "GET", "vm.info", None).unwrap()["state"],
        "Shutdown"
    );
    ok(&dst_ch, "PUT", "vm.delete", None);

    // Restore the snapshot onto a new TAP of the same name, passed as net_fds.
    let tap = open_tap(&ns);
    ok_with_fds(
        &dst_ch,
        "PUT",
        "vm.restore",
        Some(&bodies::restore(&snapshot, "net0", 1)),
        &[tap.as_raw_fd()],
    );
    drop(tap);
    assert_eq!(
        ok(&dst_ch, "GET", "vm.info", None).unwrap()["state"],
        "Paused"
    );
    ok(&dst_ch, "PUT", "vm.resume", None);
    guest_answers_ping(&ns);

    // The power button: the guest powers off, and baton with it.
    let mut console = dst.console(&serial);
    ok(&dst_ch, "PUT", "vm.power-button", None);
    console.wait_for("power-button: pressed", BOOT);
    let (exit, stderr) = dst.wait_exit(Duration::from_secs(30));
    assert!(
        exit.success(),
        "baton did not end cleanly on power-off: {stderr}"
    );

    let idle = ApiVmm::start(&[]);
    ok(&ChClient::new(&idle.socket), "PUT", "vmm.shutdown", None);
    let (exit, stderr) = idle.wait_exit(Duration::from_secs(30));
    assert!(
        exit.success(),
        "baton did not end cleanly on vmm.shutdown: {stderr}"
    );
}
