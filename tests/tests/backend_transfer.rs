//! Backend transfer: a local migration hands the network card's TAP descriptors to the
//! destination, so nothing on the host changes and frames that arrive during the switch wait
//! in the kernel. Each test runs in its own network namespace: a host ping flood to the test
//! guest must lose nothing, its TCP streams carry on byte for byte, and the TAP keeps its
//! name, index, MAC and addresses. Every way it can go wrong leaves the source running on its
//! own descriptors, with as many descriptors open as before.

use std::path::Path;
use std::time::Duration;

use baton_tests::{
    assert_card_merges, dying_destination, host_view, migrate, settled_fds, ApiVmm, Console, NetNs,
    PingFlood, SeqStream, TempDir, READY,
};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;
const GUEST: &str = "10.0.0.2";
/// One echo request every 2 ms.
const FLOOD_INTERVAL: Duration = Duration::from_millis(2);

/// The test guest with `pairs` queue pairs on TAP `tap`, which baton creates with 10.0.0.1/24
/// unless it exists; `net` is merged into the card's configuration.
fn config(serial: &Path, pairs: usize, tap: &str, net: serde_json::Value) -> String {
    let mut card = serde_json::json!({
        "id": "net0", "tap": tap, "ip": "10.0.0.1", "mask": "255.255.255.0",
        "num_queues": 2 * pairs,
    });
    for (k, v) in net.as_object().expect("an object") {
        card[k] = v.clone();
    }
    serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20, "shared": true},
        // Small receive buffers: full-size frames arrive spread over mergeable buffers, whose
        // use must survive every hand-over.
        "payload": {"kernel": baton_tests::guest_bin(), "cmdline": format!("heartbeat_ms=20 net={GUEST}/24 rx_buffer=512")},
        "serial": {"mode": "Socket", "socket": serial},
        "net": [card],
    })
    .to_string()
}

fn boot(vmm: &mut ApiVmm, config: &str, serial: &Path) -> Console {
    vmm.expect("PUT", "vm.create", Some(config), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(serial);
    console.wait_for(READY, BOOT);
    console
}

fn url(files: &TempDir, name: &str) -> String {
    format!("unix:{}", files.path().join(name).display())
}

/// The guest's sequence streams: one it sends (checked here), one it takes (checked there).
fn open_streams(ns: &NetNs) -> (SeqStream, SeqStream) {
    ns.enter(|| {
        let mut from_guest = SeqStream::connect(GUEST, 5001, REPLY);
        let mut to_guest = SeqStream::connect(GUEST, 5002, REPLY);
        from_guest.read(MIB);
        to_guest.write(MIB);
        (from_guest, to_guest)
    })
}

fn more_stream(ns: &NetNs, streams: (SeqStream, SeqStream)) -> (SeqStream, SeqStream) {
    let (mut from_guest, mut to_guest) = streams;
    ns.enter(move || {
        from_guest.read(2 * MIB);
        to_guest.write(2 * MIB);
        (from_guest, to_guest)
    })
}

/// Starts a flood long enough to cover a migration, once replies flow.
fn flood(ns: &NetNs) -> PingFlood {
    let mut flood = PingFlood::start(ns, GUEST, FLOOD_INTERVAL, 2500);
    flood.wait_replies(50, REPLY);
    flood
}

/// Migrates a guest with `pairs` queue pairs twice with backend transfer, local=on then
/// local=off, under a ping flood and with both TCP streams open.
fn flood_across_migrations(tag: &str, pairs: usize) {
    let ns = NetNs::new(tag);
    let files = TempDir::new(tag);
    let serial = files.path().join("serial.sock");
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    let mut console = boot(
        &mut src,
        &config(&serial, pairs, "tap0", serde_json::json!({})),
        &serial,
    );
    let mut streams = open_streams(&ns);
    let view = host_view(&ns, "tap0");
    assert_eq!(view["addresses"][0], "\"10.0.0.1\"/24", "{view}");
    for (i, local) in [true, false].into_iter().enumerate() {
        let dst = ApiVmm::start_in(Some(&ns), &[]);
        let mut pings = flood(&ns);
        let stats = migrate(src, &dst, &url(&files, &format!("m{i}.sock")), local, true);
        assert!(
            pings.running(),
            "the flood ended before the migration did ({:?}): lengthen it",
            pings.elapsed()
        );
        let result = pings.finish(REPLY);
        assert_eq!(
            result.lost(),
            0,
            "local={local}: {} of {} pings lost across the migration ({stats})",
            result.lost(),
            result.asked
        );
        assert_eq!(
            stats["transferred_backends"],
            serde_json::json!(["net0", "serial"])
        );
        eprintln!(
            "{pairs} pair(s), local={local}: downtime {} ms, total {} ms, longest ping gap {:.1} ms",
            stats["downtime_ms"], stats["total_ms"], result.max_gap_ms
        );
        // The host sees the same interface, with what was set on it.
        assert_eq!(host_view(&ns, "tap0"), view);
        let info = dst.expect("GET", "vm.info", None, 200).unwrap();
        assert_eq!(info["config"]["net"][0]["tap"], "tap0", "{info}");
        streams = more_stream(&ns, streams);
        src = dst;
        console = src.console(&serial);
    }
    // The guest took every byte of the stream sent to it, in order.
    console.sink_reaches(streams.1.offset, REPLY);
    // Full-size frames still arrive over several buffers, put together without a miss.
    let out = ns.output(&["ping", "-q", "-c", "5", "-i", "0.05", "-s", "1400", GUEST]);
    assert!(out.status.success(), "{out:?}");
    assert_card_merges(&console.command("net", "net:", REPLY), 1);
}

#[test]
fn a_ping_flood_loses_nothing_across_backend_transfer_with_one_queue_pair() {
    flood_across_migrations("bt1", 1);
}

#[test]
fn a_ping_flood_loses_nothing_across_backend_transfer_with_four_queue_pairs() {
    flood_across_migrations("bt4", 4);
}

/// A namespace with bridge br0 (10.0.0.1/24) and the TAPs `taps` on it, made by the test
/// the way management software would (persistent, single queue).
fn bridged(tag: &str, taps: &[&str]) -> NetNs {
    let ns = NetNs::new(tag);
    ns.run(&["ip", "link", "add", "br0", "type", "bridge"]);
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.run(&["ip", "link", "set", "br0", "up"]);
    for tap in taps {
        ns.run(&["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ns.run(&["ip", "link", "set", tap, "master", "br0"]);
        ns.run(&["ip", "link", "set", tap, "up"]);
    }
    ns
}

#[test]
fn twenty_migrations_back_and_forth_lose_nothing_and_leak_no_descriptor() {
    let ns = bridged("bt20", &["tap0"]);
    let files = TempDir::new("bt20");
    let serial = files.path().join("serial.sock");
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    boot(
        &mut src,
        &config(&serial, 1, "tap0", serde_json::json!({})),
        &serial,
    );
    let view = host_view(&ns, "tap0");
    assert_eq!(view["master"], "br0", "{view}");
    let mut fds_after: Vec<usize> = Vec::new();
    for i in 0..20 {
        let dst = ApiVmm::start_in(Some(&ns), &[]);
        // 3 s of pings: a pre-copy hop, and the source tearing its VM down before it exits,
        // took more than the 1 s this once had on a loaded host.
        let mut pings = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 1500);
        pings.wait_replies(20, REPLY);
        let name = if i % 2 == 0 {
            "there.sock"
        } else {
            "back.sock"
        };
        let stats = migrate(src, &dst, &url(&files, name), i % 2 == 1, true);
        assert!(
            pings.running(),
            "hop {i}: the flood ended first: lengthen it"
        );
        let result = pings.finish(REPLY);
        assert_eq!(result.lost(), 0, "hop {i}: {result:?} ({stats})");
        assert_eq!(
            stats["transferred_backends"],
            serde_json::json!(["net0", "serial"])
        );
        assert_eq!(host_view(&ns, "tap0"), view, "hop {i}");
        fds_after.push(settled_fds(dst.pid()));
        src = dst;
    }
    // Every destination holds as many descriptors as the first did.
    assert!(
        fds_after.iter().all(|n| *n == fds_after[0]),
        "open descriptors after each hop: {fds_after:?}"
    );
}

#[test]
fn without_backend_transfer_management_passes_a_new_tap_and_frames_are_lost() {
    let ns = bridged("btctl", &["tap0", "tap1"]);
    let files = TempDir::new("btctl");
    let serial = files.path().join("serial.sock");
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    // The card never hands its backend over.
    boot(
        &mut src,
        &config(
            &serial,
            1,
            "tap0",
            serde_json::json!({"backend_transfer": false}),
        ),
        &serial,
    );
    let support = src
        .expect("GET", "vmm.backend-transfer-support", None, 200)
        .unwrap();
    assert_eq!(
        support["devices"],
        serde_json::json!([{"id": "serial", "kind": "serial-socket", "fds": 2}]),
        "{support}"
    );
    // Hop 1, the control case: no backend transfer asked; hop 2: asked on both sides, but
    // the card's flag is off, so it takes the ordinary path. Each destination gets a new
    // TAP on the bridge from management (the source holds its own).
    for (hop, (tap, asked)) in [("tap1", false), ("tap0", true)].into_iter().enumerate() {
        let dst = ApiVmm::start_in(Some(&ns), &[]);
        let u = url(&files, &format!("c{hop}.sock"));
        let receiving = dst.receive_migration(
            serde_json::json!({
                "receiver_url": u, "backend_transfer": asked,
                "net_fds": [{"id": "net0", "num_fds": 1}],
            }),
            vec![ns.open_tap(tap, false)],
        );
        let pings = flood(&ns);
        let (status, stats) = src.send_migration(serde_json::json!({
            "destination_url": u, "local": true, "backend_transfer": asked,
        }));
        assert_eq!(status, 200, "{stats}");
        let r = receiving.join().unwrap();
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        src.wait_exit(REPLY);
        // Only the console goes when asked: the card's flag is off.
        let console: &[&str] = if asked { &["serial"] } else { &[] };
        assert_eq!(stats["transferred_backends"], serde_json::json!(console));
        let info = dst.expect("GET", "vm.info", None, 200).unwrap();
        assert_eq!(info["config"]["net"][0]["tap"], tap, "{info}");
        let result = pings.finish(REPLY);
        // What backend transfer avoids: frames queued on the old TAP are gone with it, and
        // the bridge sends to the old port until it learns the new one.
        eprintln!(
            "new TAP (backend_transfer asked: {asked}): {} of {} pings lost, longest gap {:.1} ms, downtime {} ms",
            result.lost(),
            result.asked,
            result.max_gap_ms,
            stats["downtime_ms"]
        );
        assert!(result.received > 0, "{result:?}");
        // The guest is reachable on its new TAP.
        let after = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 100).finish(REPLY);
        assert_eq!(after.lost(), 0, "after the migration: {after:?}");
        src = dst;
    }
}

#[test]
fn refusals_leave_the_source_on_its_own_descriptors() {
    let ns = NetNs::new("btref");
    let files = TempDir::new("btref");
    let serial = files.path().join("serial.sock");
    let empty = ApiVmm::start_in(Some(&ns), &[]);
    let support = empty
        .expect("GET", "vmm.backend-transfer-support", None, 200)
        .unwrap();
    assert_eq!(
        support,
        serde_json::json!({"kinds": ["virtio-net-tap", "virtio-blk-file", "serial-socket"], "devices": []})
    );
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&config(&serial, 1, "tap0", serde_json::json!({}))).unwrap();
    // A second card that never hands its TAP over.
    cfg["net"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"id": "net1", "tap": "tap1", "num_queues": 4, "backend_transfer": false}));
    boot(&mut src, &cfg.to_string(), &serial);
    let support = src
        .expect("GET", "vmm.backend-transfer-support", None, 200)
        .unwrap();
    let want = serde_json::json!({
        "kinds": ["virtio-net-tap", "virtio-blk-file", "serial-socket"],
        "devices": [
            {"id": "net0", "kind": "virtio-net-tap", "fds": 1},
            {"id": "serial", "kind": "serial-socket", "fds": 2},
        ],
    });
    assert_eq!(support, want);
    let out = src.remote(&["backend-transfer-support"]);
    assert!(out.status.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, want);

    // TCP cannot carry descriptors: both sides refuse before anything moves.
    let (status, body) = src.send_migration(serde_json::json!({
        "destination_url": "tcp:127.0.0.1:7100", "backend_transfer": true,
    }));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("needs a unix: URL"), "{body}");
    let r = empty
        .receive_migration(
            serde_json::json!({"receiver_url": "tcp:127.0.0.1:7100", "backend_transfer": true}),
            Vec::new(),
        )
        .join()
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("needs a unix: URL"));

    // A destination not asked for backend transfer takes the ordinary path: it opens tap0 by
    // name, which the source holds (single queue), so the migration fails before the
    // source pauses, and says why.
    let before = settled_fds(src.pid());
    let pings = flood(&ns);
    let u = url(&files, "m.sock");
    let receiving = empty.receive_migration(serde_json::json!({"receiver_url": u}), Vec::new());
    let (status, body) = src.send_migration(serde_json::json!({
        "destination_url": u, "local": true, "backend_transfer": true,
    }));
    assert_eq!(status, 500, "{body}");
    assert!(
        body.to_string().contains("Cannot attach to TAP 'tap0'"),
        "{body}"
    );
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    let result = pings.finish(REPLY);
    assert_eq!(result.lost(), 0, "{result:?}");
    assert_eq!(settled_fds(src.pid()), before);
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");

    // The destination stays empty and takes the VM when asked properly.
    let stats = migrate(src, &empty, &url(&files, "m2.sock"), true, true);
    assert_eq!(
        stats["transferred_backends"],
        serde_json::json!(["net0", "serial"])
    );
}

#[test]
fn a_destination_that_dies_after_taking_the_descriptors_leaves_the_source_its_network() {
    let ns = NetNs::new("btdie");
    let files = TempDir::new("btdie");
    let serial = files.path().join("serial.sock");
    let mut src = ApiVmm::start_in(Some(&ns), &[]);
    boot(
        &mut src,
        &config(&serial, 2, "tap0", serde_json::json!({})),
        &serial,
    );
    let before = settled_fds(src.pid());
    let view = host_view(&ns, "tap0");
    let path = files.path().join("m.sock");
    let peer = dying_destination(&path);
    let pings = flood(&ns);
    let (status, body) = src.send_migration(serde_json::json!({
        "destination_url": format!("unix:{}", path.display()), "local": true, "backend_transfer": true,
    }));
    let (header, got) = peer.join().unwrap();
    assert_eq!(status, 500, "{body}");
    // What travelled: both queues, and the TAP's state.
    assert_eq!((header.id.as_str(), header.count, got), ("net0", 2, 2));
    assert_eq!(header.state["name"], "tap0", "{:?}", header.state);
    assert_eq!(header.state["queues"], 2);
    assert_eq!(header.state["enabled"], serde_json::json!([true, true]));
    assert_eq!(header.state["vnet_hdr_len"], 12);
    let result = pings.finish(REPLY);
    assert_eq!(result.lost(), 0, "{result:?}");
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(settled_fds(src.pid()), before);
    assert_eq!(host_view(&ns, "tap0"), view);
    let after = PingFlood::start(&ns, GUEST, FLOOD_INTERVAL, 100).finish(REPLY);
    assert_eq!(after.lost(), 0, "{after:?}");
}

#[test]
fn a_destination_refuses_descriptors_that_do_not_fit_and_closes_them() {
    use migration::protocol::ProposedBackend;
    use migration::protocol::{to_json, FdsHeader, Start, PROTOCOL_VERSION};
    use migration::Command;
    use std::os::fd::AsFd;
    let ns = NetNs::new("btfit");
    let files = TempDir::new("btfit");
    let serial = files.path().join("serial.sock");
    // A real VM's configuration and state, from a snapshot.
    let mut a = ApiVmm::start_in(Some(&ns), &[]);
    boot(
        &mut a,
        &config(&serial, 1, "tap0", serde_json::json!({})),
        &serial,
    );
    a.expect("PUT", "vm.pause", None, 204);
    let snap = files.path().join("snap");
    let body = serde_json::json!({"destination_url": format!("file://{}", snap.display())});
    a.expect("PUT", "vm.snapshot", Some(&body.to_string()), 204);
    a.expect("PUT", "vmm.shutdown", None, 204);
    a.wait_exit(REPLY);
    let config_bytes = std::fs::read(snap.join("config.json")).unwrap();
    let state_bytes = std::fs::read(snap.join("state.bin")).unwrap();

    let dst = ApiVmm::start_in(Some(&ns), &[]);
    let baseline = settled_fds(dst.pid());
    let tap = ns.open_tap("tapx", false);
    let null = std::fs::File::open("/dev/null").unwrap();
    let tap_state = |name: &str, queues: usize| {
        serde_json::json!({
            "name": name, "queues": queues, "enabled": vec![true; queues],
            "vnet_hdr_len": 12, "offloads": null, "mtu": 1500, "mac": null,
        })
    };
    let cases = [
        (
            tap_state("tapx", 2),
            tap.as_fd(),
            "1 queue pair(s), but its transferred backend has 2",
        ),
        (
            tap_state("tapy", 1),
            tap.as_fd(),
            "queue 0 belongs to 'tapx', not 'tapy'",
        ),
        (tap_state("tapx", 1), null.as_fd(), "is not a TAP"),
    ];
    for (i, (state, fd, why)) in cases.into_iter().enumerate() {
        let u = url(&files, &format!("f{i}.sock"));
        let receiving = dst.receive_migration(
            serde_json::json!({"receiver_url": u, "backend_transfer": true}),
            Vec::new(),
        );
        let mut ch = baton_tests::connect_migration(&u);
        let start = Start {
            version: PROTOCOL_VERSION,
            local: false,
            backend_transfer: true,
            devices: vec![ProposedBackend {
                id: "net0".into(),
                kind: "virtio-net-tap".into(),
                fds: 1,
            }],
            software: None,
            start_notice: false,
        };
        ch.request(Command::Start, &to_json(&start)).unwrap();
        ch.request(Command::Config, &config_bytes).unwrap();
        ch.request(Command::State, &state_bytes).unwrap();
        let header = FdsHeader {
            id: "net0".into(),
            count: 1,
            state,
        };
        let e = ch
            .request_with_fds(Command::Fds, &to_json(&header), &[fd])
            .unwrap_err();
        assert!(e.to_string().contains(why), "case {i}: {e}");
        let r = receiving.join().unwrap();
        assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
        // Nothing kept: no VM, and every descriptor it received is closed.
        dst.expect("GET", "vm.info", None, 404);
        assert_eq!(settled_fds(dst.pid()), baseline, "case {i}");
    }
}

/// FNV-1a 64, as the test guest digests what it reads.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn a_disk_hands_over_its_open_image_even_once_its_path_is_gone() {
    use std::io::Read;
    let files = TempDir::new("btdisk");
    let serial = files.path().join("serial.sock");
    let image = files.path().join("disk.raw");
    std::fs::File::create(&image).unwrap().set_len(MIB).unwrap();
    let cfg = serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20, "shared": true},
        "payload": {"kernel": baton_tests::guest_bin(), "cmdline": "heartbeat_ms=20"},
        "serial": {"mode": "Socket", "socket": serial},
        "disks": [{"id": "disk0", "path": image}],
    });
    let mut src = ApiVmm::start(&[]);
    let mut console = boot(&mut src, &cfg.to_string(), &serial);
    let support = src
        .expect("GET", "vmm.backend-transfer-support", None, 200)
        .unwrap();
    assert_eq!(
        support["devices"],
        serde_json::json!([
            {"id": "disk0", "kind": "virtio-blk-file", "fds": 1},
            {"id": "serial", "kind": "serial-socket", "fds": 2},
        ])
    );
    let wrote = console.command("disk write 0 8 171", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=0 count=8");
    // The image's path goes away (a cleaned-up directory, another mount namespace): only
    // the descriptor the source holds still reaches it.
    let mut kept = std::fs::File::open(&image).unwrap();
    std::fs::remove_file(&image).unwrap();

    // Without backend transfer the destination opens the image by path, and cannot: the
    // source runs on.
    let dst = ApiVmm::start(&[]);
    let receiving = dst.receive_migration(
        serde_json::json!({"receiver_url": url(&files, "plain.sock")}),
        Vec::new(),
    );
    let (status, body) = src.send_migration(serde_json::json!({
        "destination_url": url(&files, "plain.sock"), "local": true,
    }));
    assert_eq!(status, 500, "{body}");
    assert!(body.to_string().contains("disk.raw"), "{body}");
    assert_eq!(receiving.join().unwrap().status, 500);
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    let wrote = console.command("disk write 8 8 172", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=8 count=8");

    // With it, the destination runs the disk on the source's open image.
    let stats = migrate(src, &dst, &url(&files, "transfer.sock"), true, true);
    assert_eq!(
        stats["transferred_backends"],
        serde_json::json!(["disk0", "serial"])
    );
    // The console's client stays connected: the console was handed over too.
    let wrote = console.command("disk write 16 8 173", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=16 count=8");
    let mut data = vec![0u8; 24 * 512];
    kept.read_exact(&mut data).unwrap();
    for (i, byte) in [171u8, 172, 173].into_iter().enumerate() {
        let part = &data[i * 4096..(i + 1) * 4096];
        assert!(
            part.iter().all(|b| *b == byte),
            "sectors {}.. are not {byte}",
            i * 8
        );
    }
    let read = console.command("disk read 0 24", "disk:", REPLY);
    assert_eq!(
        read,
        format!("disk: read sector=0 count=24 fnv={:#018x}", fnv(&data))
    );
    let info = dst.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["config"]["disks"][0]["path"], serde_json::json!(image));
}
