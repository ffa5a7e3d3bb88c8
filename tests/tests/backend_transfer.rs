//! Backend transfer: a local migration hands the network card's TAP descriptors to the
//! destination, so nothing on the host changes and frames that arrive during the switch wait
//! in the kernel. Each test runs in its own network namespace: a host ping flood to the test
//! guest must lose nothing, its TCP streams carry on byte for byte, and the TAP keeps its
//! name, index, MAC and addresses. Every way it can go wrong leaves the source running on its
//! own descriptors, with as many descriptors open as before.

use std::path::Path;
use std::time::{Duration, Instant};

use baton_tests::{num, ApiVmm, Console, NetNs, PingFlood, SeqStream, TempDir, READY};

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
        "payload": {"kernel": baton_tests::guest_bin(), "cmdline": format!("heartbeat_ms=20 net={GUEST}/24")},
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

/// Migrates from `src` to `dst` with backend transfer on both sides; checks both answers
/// and that the source exits. Returns the source's statistics.
fn hand_over(src: ApiVmm, dst: &ApiVmm, url: &str, local: bool) -> serde_json::Value {
    let receiving = dst.receive_migration(
        serde_json::json!({"receiver_url": url, "backend_transfer": true}),
        Vec::new(),
    );
    let (status, stats) = src.send_migration(serde_json::json!({
        "destination_url": url, "local": local, "backend_transfer": true,
    }));
    assert_eq!(status, 200, "send-migration: {stats}");
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let (exit, stderr) = src.wait_exit(REPLY);
    assert!(exit.success(), "the source did not exit cleanly: {stderr}");
    stats
}

/// What the host sees of interface `name`: index, MAC, MTU, bridge and addresses.
fn host_view(ns: &NetNs, name: &str) -> serde_json::Value {
    let out = ns.run(&["ip", "-j", "addr", "show", "dev", name]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let link = &all[0];
    let addrs: Vec<String> = link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| format!("{}/{}", i["local"], i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({
        "ifname": link["ifname"], "ifindex": link["ifindex"], "mac": link["address"],
        "mtu": link["mtu"], "master": link["master"], "addresses": addrs,
    })
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

/// The guest took every byte of the stream sent to it, in order.
fn guest_got(console: &mut Console, to_guest: &SeqStream) {
    let deadline = Instant::now() + REPLY;
    loop {
        let net = console.command("net", "net:", REPLY);
        assert_eq!(num(&net, "sink_errors"), 0, "{net}");
        if num(&net, "sink_bytes") == to_guest.offset {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's sink is short of {}: {net}",
            to_guest.offset
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
        let stats = hand_over(src, &dst, &url(&files, &format!("m{i}.sock")), local);
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
            result.sent
        );
        assert_eq!(stats["transferred_backends"], serde_json::json!(["net0"]));
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
    guest_got(&mut console, &streams.1);
}

#[test]
fn a_ping_flood_loses_nothing_across_backend_transfer_with_one_queue_pair() {
    flood_across_migrations("bt1", 1);
}

#[test]
fn a_ping_flood_loses_nothing_across_backend_transfer_with_four_queue_pairs() {
    flood_across_migrations("bt4", 4);
}
