//! Live migration between batons with the test guest: over UNIX copying memory and sharing
//! it (local=on), and over TCP on 127.0.0.1. The guest must not notice beyond a pause: its
//! heartbeat counter, its clock, every vCPU's counter, the pages it keeps rewriting and its
//! TCP streams carry on. Failures (nobody listening, either side killed mid-stream, a wrong
//! protocol version, local=on where it cannot work) each give a clear error and leave the
//! surviving side working.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_tests::{
    fd_count, field, heartbeat_number, num, ApiVmm, Console, NetNs, SeqStream, TempDir, READY,
};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// A guest with `cpus` vCPUs, `mem` MiB of RAM (shared or not), its serial console on
/// `serial`, and optionally a network card on TAP `tap`.
fn config(serial: &Path, cpus: u8, mem: u64, shared: bool, tap: Option<&str>) -> String {
    let mut c = serde_json::json!({
        "cpus": {"boot_vcpus": cpus, "max_vcpus": cpus},
        "memory": {"size": mem << 20, "shared": shared},
        "payload": {"kernel": baton_tests::guest_bin(), "cmdline": "heartbeat_ms=20 net=10.0.0.2/24"},
        "serial": {"mode": "Socket", "socket": serial},
    });
    if let Some(tap) = tap {
        c["net"] = serde_json::json!([{"id": "net0", "tap": tap}]);
    }
    c.to_string()
}

fn boot(vmm: &mut ApiVmm, config: &str, serial: &Path) -> Console {
    vmm.expect("PUT", "vm.create", Some(config), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(serial);
    console.wait_for(READY, BOOT);
    console.wait_for("heartbeat 2", REPLY);
    console
}

/// Starts vm.receive-migration on `dst` (it answers when the migration ends).
fn receive(dst: &ApiVmm, url: &str) -> std::thread::JoinHandle<api::client::Response> {
    dst.receive_migration(serde_json::json!({ "receiver_url": url }), Vec::new())
}

/// Sends the VM from `src`, retrying while the destination is not listening yet.
fn send(src: &ApiVmm, body: serde_json::Value) -> (u16, serde_json::Value) {
    src.send_migration(body)
}

/// Migrates from `src` to `dst` over `url`; checks both answers and that the source exits.
fn migrate(src: ApiVmm, dst: &ApiVmm, url: &str, local: bool) -> serde_json::Value {
    let receiving = receive(dst, url);
    let (status, stats) = send(
        &src,
        serde_json::json!({ "destination_url": url, "local": local }),
    );
    assert_eq!(status, 200, "send-migration: {stats}");
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let (exit, stderr) = src.wait_exit(REPLY);
    assert!(exit.success(), "the source did not exit cleanly: {stderr}");
    let info = dst.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    baton_tests::assert_breakdown(&stats, local, &[]);
    stats
}

/// Each vCPU's counter, from the guest's `cpus` line.
fn cpu_counts(console: &mut Console) -> Vec<u64> {
    let line = console.command("cpus", "cpus:", REPLY);
    field(&line, "counts")
        .unwrap_or_else(|| panic!("no counts in {line}"))
        .split(',')
        .map(|c| c.parse().expect("a count"))
        .collect()
}

/// Everything the guest shows keeps going: heartbeat, clock, every vCPU.
struct Watch {
    heartbeat: u64,
    uptime_us: u64,
    counts: Vec<u64>,
}

fn watch(console: &mut Console) -> Watch {
    let status = console.command("status", "status:", REPLY);
    let counts = cpu_counts(console);
    Watch {
        heartbeat: 0,
        uptime_us: num(&status, "uptime_us"),
        counts,
    }
}

/// After a migration: nothing went back, every vCPU still counts, the heartbeat has no gap.
fn still_going(console: &mut Console, before: &Watch) -> Watch {
    let heartbeat = console.heartbeat_continues(before.heartbeat, 5, REPLY);
    let mut now = watch(console);
    now.heartbeat = heartbeat;
    assert!(
        now.uptime_us > before.uptime_us,
        "the guest's clock went back: {} then {}",
        before.uptime_us,
        now.uptime_us
    );
    assert_eq!(now.counts.len(), before.counts.len());
    // Every vCPU runs: its counter grows, looked at a heartbeat apart (the boot CPU counts
    // main-loop passes, and two commands typed quickly may share one) until it has. The
    // host has two cores for two busy vCPUs and the batons around them, so one vCPU
    // thread can wait for a core longer than a heartbeat.
    let deadline = Instant::now() + REPLY;
    loop {
        console.wait_for_match(|l| heartbeat_number(l).is_some(), "a heartbeat", REPLY);
        let later = cpu_counts(console);
        let stuck = now.counts.iter().zip(&later).position(|(a, b)| b <= a);
        let Some(i) = stuck else { break };
        assert!(
            Instant::now() < deadline,
            "vCPU {i} stopped counting: {} then {}",
            now.counts[i],
            later[i]
        );
    }
    for (i, (a, b)) in before.counts.iter().zip(&now.counts).enumerate() {
        assert!(b > a, "vCPU {i}'s counter went back: {a} then {b}");
    }
    now
}

fn urls(dir: &Path, name: &str) -> String {
    format!("unix:{}", dir.join(name).display())
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn guest_carries_on_across_unix_copy_unix_shared_and_tcp() {
    let files = TempDir::new("mig-chain");
    let serial = files.path().join("serial.sock");
    let mut a = ApiVmm::start(&[]);
    let mut console = boot(&mut a, &config(&serial, 2, 256, true, None), &serial);
    // The guest keeps rewriting 32 MiB while it moves.
    console.command("dirty 32 50", "dirty:", REPLY);
    let mut before = watch(&mut console);
    assert_eq!(before.counts.len(), 2);

    let hops: Vec<(&str, bool)> = match std::env::var("HOPS").as_deref() {
        Ok("shared") => vec![("unix", true), ("unix", true)],
        Ok("copy") => vec![("unix", false), ("unix", false)],
        _ => vec![("unix", false), ("unix", true), ("tcp", false)],
    };
    let mut src = a;
    for (i, (kind, local)) in hops.into_iter().enumerate() {
        let dst = ApiVmm::start(&[]);
        let url = match kind {
            "unix" => urls(files.path(), &format!("m{i}.sock")),
            _ => format!("tcp:127.0.0.1:{}", free_tcp_port()),
        };
        before.heartbeat = 0;
        let stats = migrate(src, &dst, &url, local);
        before.heartbeat = console.last_heartbeat();
        for key in ["total_ms", "downtime_ms", "memory_bytes", "iterations"] {
            assert!(stats[key].is_u64(), "{key} missing: {stats}");
        }
        if local {
            assert_eq!(
                stats["memory_bytes"], 0,
                "local=on copies no memory: {stats}"
            );
        } else {
            assert!(stats["memory_bytes"].as_u64().unwrap() > MIB, "{stats}");
            assert!(stats["iterations"].as_u64().unwrap() >= 1, "{stats}");
        }
        let mut next = dst;
        console = next.console(&serial);
        before = still_going(&mut console, &before);
        let check = console.command("dirty check", "dirty:", REPLY);
        assert!(check.starts_with("dirty: ok"), "after {url}: {check}");
        src = next;
    }
}

/// A running guest, alone: for the failure cases.
fn lone_guest(files: &TempDir, shared: bool) -> (ApiVmm, Console, PathBuf) {
    let serial = files.path().join("serial.sock");
    let mut vmm = ApiVmm::start(&[]);
    let console = boot(&mut vmm, &config(&serial, 1, 128, shared, None), &serial);
    (vmm, console, serial)
}

fn still_beating(console: &mut Console) {
    let last = console.wait_for_match(|l| heartbeat_number(l).is_some(), "a heartbeat", REPLY);
    console.heartbeat_continues(heartbeat_number(&last).unwrap(), 3, REPLY);
}

#[test]
fn refused_migrations_say_why_and_the_vm_runs_on() {
    let files = TempDir::new("mig-refused");
    let (vmm, mut console, _) = lone_guest(&files, false);
    let nobody = urls(files.path(), "nobody.sock");
    let cases = [
        (
            serde_json::json!({"destination_url": nobody}),
            500,
            "Cannot connect",
        ),
        (
            serde_json::json!({"destination_url": nobody, "local": true}),
            400,
            "shared=on",
        ),
        (
            serde_json::json!({"destination_url": "tcp:127.0.0.1:1", "local": true}),
            400,
            "unix:",
        ),
        (
            serde_json::json!({"destination_url": "file:///tmp/x"}),
            400,
            "unix:/path",
        ),
        (
            serde_json::json!({"destination_url": "tcp:127.0.0.1"}),
            400,
            "tcp:",
        ),
        (
            serde_json::json!({"destination": nobody}),
            400,
            "unknown field",
        ),
    ];
    for (body, status, why) in cases {
        let r = vmm.http("PUT", "vm.send-migration", Some(&body.to_string()));
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, status, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
        still_beating(&mut console);
    }
    // A destination that already has a VM refuses to receive one.
    let r = vmm.http(
        "PUT",
        "vm.receive-migration",
        Some(&serde_json::json!({"receiver_url": nobody}).to_string()),
    );
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running");
}

/// Plays a destination that reads the next `n` requests (Start, then Config) and answers
/// each with Ok, taking over no backend.
fn answer(channel: &mut migration::Channel, n: usize) {
    for _ in 0..n {
        let h = channel.recv_request_header().unwrap();
        channel.read_payload(h.length).unwrap();
        let reply = match h.command {
            migration::Command::Start => br#"{"accepted":[]}"#.to_vec(),
            _ => Vec::new(),
        };
        channel
            .send_response(&migration::Response::Ok(reply))
            .unwrap();
    }
}

#[test]
fn a_destination_that_dies_mid_stream_leaves_the_source_running() {
    let files = TempDir::new("mig-dst-dies");
    let (src, mut console, _) = lone_guest(&files, false);
    console.command("dirty 16 50", "dirty:", REPLY);
    let url = urls(files.path(), "m.sock");
    // A destination that takes Start and Config, reads part of the memory, and dies.
    let listener = std::os::unix::net::UnixListener::bind(files.path().join("m.sock")).unwrap();
    let peer = std::thread::spawn(move || {
        let mut channel = migration::Channel::from(listener.accept().unwrap().0);
        answer(&mut channel, 2);
        let h = channel.recv_request_header().unwrap();
        assert_eq!(h.command, migration::Command::Memory);
        channel.read_payload(h.length.min(MIB)).unwrap();
        // Gone, like a killed process: the socket closes mid-message.
    });
    let (status, body) = send(&src, serde_json::json!({"destination_url": url}));
    peer.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.to_string().contains("Migration protocol"), "{body}");
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert!(info.get("migration").is_none(), "{info}");
    still_beating(&mut console);
    let check = console.command("dirty check", "dirty:", REPLY);
    assert!(check.starts_with("dirty: ok"), "{check}");
    // It can still migrate for real.
    let dst = ApiVmm::start(&[]);
    migrate(src, &dst, &urls(files.path(), "again.sock"), false);
}

/// Plays a source at `url` that sends Start and the VM configuration `config`, then 1 MiB
/// of a 64 MiB Memory request, and stops there; returns its channel.
fn partial_source(url: &str, config: &str) -> migration::Channel {
    use std::io::Write;
    let mut channel = baton_tests::connect_migration(url);
    let start = migration::protocol::Start {
        version: migration::protocol::PROTOCOL_VERSION,
        local: false,
        backend_transfer: false,
        devices: Vec::new(),
        software: None,
        start_notice: false,
    };
    migration::session::start(&mut channel, &start).unwrap();
    channel
        .request(migration::Command::Config, config.as_bytes())
        .unwrap();
    let ranges = migration::protocol::MemoryRanges(vec![(0, 64 * MIB)]);
    let header = migration::protocol::RequestHeader {
        command: migration::Command::Memory,
        length: ranges.payload_len().unwrap(),
    };
    channel.write_all(&header.encode()).unwrap();
    channel.write_all(&ranges.encode_table()).unwrap();
    channel.write_all(&vec![7u8; MIB as usize]).unwrap();
    channel
}

#[test]
fn a_source_that_dies_mid_stream_leaves_the_destination_empty_and_usable() {
    let files = TempDir::new("mig-src-dies");
    let serial = files.path().join("serial.sock");
    let dst = ApiVmm::start(&[]);
    let url = urls(files.path(), "m.sock");
    let receiving = receive(&dst, &url);
    // A source that sends Start and Config, then part of the memory, and dies.
    drop(partial_source(&url, &config(&serial, 1, 128, false, None)));
    let r = receiving.join().unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{text}");
    assert!(text.contains("nothing was kept"), "{text}");
    dst.expect("GET", "vm.info", None, 404);
    // The destination can take a VM again, and its memory is its own (fresh).
    let mut again = dst;
    let _ = std::fs::remove_file(&serial);
    let mut console = boot(&mut again, &config(&serial, 1, 128, false, None), &serial);
    still_beating(&mut console);
}

#[test]
fn a_source_speaking_another_protocol_version_is_refused() {
    let files = TempDir::new("mig-version");
    let dst = ApiVmm::start(&[]);
    let url = urls(files.path(), "m.sock");
    let receiving = receive(&dst, &url);
    let mut channel = baton_tests::connect_migration(&url);
    let start = migration::protocol::Start {
        version: migration::protocol::PROTOCOL_VERSION + 1,
        local: false,
        backend_transfer: false,
        devices: Vec::new(),
        software: None,
        start_notice: false,
    };
    let e = channel
        .request(
            migration::Command::Start,
            &migration::protocol::to_json(&start),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("version") || format!("{e:?}").contains("version"),
        "{e:?}"
    );
    let r = receiving.join().unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{text}");
    assert!(text.contains("version"), "{text}");
    dst.expect("GET", "vm.info", None, 404);
}

/// Starts the guest writing 64 MiB at `rate` MiB/s and waits until the buffer was written
/// whole: then the first pass copies it (tens of ms, not the 1 MiB of a fresh guest), long
/// enough that the writer, however it is scheduled, dirties pages meanwhile.
fn fast_writer(console: &mut Console, rate: u64) {
    console.command(&format!("dirty 64 {rate}"), "dirty:", REPLY);
    let deadline = Instant::now() + REPLY;
    while num(&console.command("dirty", "dirty:", REPLY), "passes") < 1 {
        assert!(
            Instant::now() < deadline,
            "the dirtier never finished a pass"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn auto_converge_slows_a_guest_that_writes_too_fast_until_pre_copy_fits() {
    let files = TempDir::new("mig-converge");
    let serial = files.path().join("serial.sock");
    // Pre-copy sends at most 50 MB/s here: less than the guest writes.
    let mut src = ApiVmm::start_with(None, "", &[("BATON_TEST_PRECOPY_MBPS", "50")], &[]);
    let mut console = boot(&mut src, &config(&serial, 1, 128, false, None), &serial);
    fast_writer(&mut console, 1 << 20);
    let dst = ApiVmm::start(&[]);
    let url = urls(files.path(), "m.sock");
    let receiving = receive(&dst, &url);
    // 5 ms is far less than what the writer leaves after a pass at full speed.
    let (status, stats) = send(
        &src,
        serde_json::json!({
            "destination_url": url, "downtime_limit_ms": 5, "timeout_s": 300,
            "auto_converge": true,
        }),
    );
    assert_eq!(status, 200, "{stats}");
    eprintln!(
        "auto-converge: {} passes, throttle {}%, {} B/s dirtied in the last pass",
        stats["iterations"], stats["throttle_percent"], stats["dirty_bytes_per_s"]
    );
    assert!(stats["throttle_percent"].as_u64().unwrap() >= 20, "{stats}");
    assert!(stats["iterations"].as_u64().unwrap() >= 3, "{stats}");
    assert!(stats["dirty_bytes_per_s"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(receiving.join().unwrap().status, 204);
    src.wait_exit(REPLY);
    let mut dst = dst;
    let mut console = dst.console(&serial);
    still_beating(&mut console);
    // Every page the guest wrote while slowed down arrived.
    let check = console.command("dirty check", "dirty:", REPLY);
    assert!(check.starts_with("dirty: ok"), "{check}");
}

#[test]
fn pre_copy_that_cannot_converge_times_out_and_the_vm_runs_on() {
    let files = TempDir::new("mig-timeout");
    let (src, mut console, _) = lone_guest(&files, false);
    // Faster than pre-copy sends.
    fast_writer(&mut console, 4000);
    let dst = ApiVmm::start(&[]);
    let url = urls(files.path(), "m.sock");
    let receiving = receive(&dst, &url);
    // downtime_ms 0: pause only once nothing is dirty; timeout_s 0: give up after the first
    // pass, which leaves pages dirty while the guest keeps writing.
    let (status, body) = send(
        &src,
        serde_json::json!({"destination_url": url, "downtime_ms": 0, "timeout_s": 0}),
    );
    assert_eq!(status, 500, "{body}");
    assert!(body.to_string().contains("timeout_s"), "{body}");
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    still_beating(&mut console);
    // The same guest, dirtying slower, converges with the default downtime.
    console.command("dirty 64 20", "dirty:", REPLY);
    let receiving = receive(&dst, &url);
    let (status, stats) = send(&src, serde_json::json!({"destination_url": url}));
    assert_eq!(status, 200, "{stats}");
    assert_eq!(receiving.join().unwrap().status, 204);
    src.wait_exit(REPLY);
    let mut dst = dst;
    let mut console = dst.console(&files.path().join("serial.sock"));
    still_beating(&mut console);
    let check = console.command("dirty check", "dirty:", REPLY);
    assert!(check.starts_with("dirty: ok"), "{check}");
}

/// vm.receive-migration with TAP descriptors for card `net0`, as management passes them
/// when the source still holds its TAP.
fn receive_with_tap(
    dst: &ApiVmm,
    url: &str,
    tap: std::os::fd::OwnedFd,
) -> std::thread::JoinHandle<api::client::Response> {
    let body = serde_json::json!({
        "receiver_url": url,
        "net_fds": [{"id": "net0", "num_fds": 1}],
    });
    dst.receive_migration(body, vec![tap])
}

#[test]
fn tcp_streams_both_ways_carry_on_across_migrations_to_a_new_tap() {
    let ns = NetNs::new("migtcp");
    ns.run(&["ip", "link", "add", "br0", "type", "bridge"]);
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.run(&["ip", "link", "set", "br0", "up"]);
    for tap in ["tap0", "tap1"] {
        ns.run(&["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ns.run(&["ip", "link", "set", tap, "master", "br0"]);
        ns.run(&["ip", "link", "set", tap, "up"]);
    }
    let files = TempDir::new("mig-tcp");
    let serial = files.path().join("serial.sock");
    let mut a = ApiVmm::start_in(Some(&ns), &[]);
    let mut console = boot(
        &mut a,
        &config(&serial, 1, 256, true, Some("tap0")),
        &serial,
    );
    let (mut from_guest, mut to_guest) = ns.enter(|| {
        let mut r = SeqStream::connect("10.0.0.2", 5001, REPLY);
        let mut w = SeqStream::connect("10.0.0.2", 5002, REPLY);
        r.read(4 * MIB);
        w.write(4 * MIB);
        (r, w)
    });
    let mut src = a;
    // Management creates a new TAP on the bridge for each destination (the source holds
    // its own) and passes it with receive-migration.
    let hops = [
        ("tap1", "unix", false),
        ("tap0", "unix", true),
        ("tap1", "tcp", false),
    ];
    for (i, (tap, kind, local)) in hops.into_iter().enumerate() {
        let dst = ApiVmm::start_in(Some(&ns), &[]);
        let url = match kind {
            // 127.0.0.1 of the namespace both batons run in.
            "tcp" => format!("tcp:127.0.0.1:{}", 7000 + i),
            _ => urls(files.path(), &format!("m{i}.sock")),
        };
        let receiving = receive_with_tap(&dst, &url, ns.open_tap(tap, false));
        let (status, stats) = send(
            &src,
            serde_json::json!({"destination_url": url, "local": local}),
        );
        assert_eq!(status, 200, "{stats}");
        let r = receiving.join().unwrap();
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        src.wait_exit(REPLY);
        let info = dst.expect("GET", "vm.info", None, 200).unwrap();
        assert_eq!(info["config"]["net"][0]["tap"], tap, "{info}");
        (from_guest, to_guest) = ns.enter(move || {
            from_guest.read(8 * MIB);
            to_guest.write(8 * MIB);
            (from_guest, to_guest)
        });
        src = dst;
        console = src.console(&serial);
    }
    // The guest got every byte sent to it, in order.
    console.sink_reaches(to_guest.offset, REPLY);
}

#[test]
fn five_migrations_back_and_forth() {
    let files = TempDir::new("mig-five");
    let serial = files.path().join("serial.sock");
    let mut a = ApiVmm::start(&[]);
    let mut console = boot(&mut a, &config(&serial, 2, 128, true, None), &serial);
    console.command("dirty 16 20", "dirty:", REPLY);
    let mut before = watch(&mut console);
    let mut src = a;
    for i in 0..5 {
        let dst = ApiVmm::start(&[]);
        // Back and forth between two socket paths, copying and sharing memory in turn.
        let url = urls(
            files.path(),
            if i % 2 == 0 {
                "there.sock"
            } else {
                "back.sock"
            },
        );
        migrate(src, &dst, &url, i % 2 == 1);
        before.heartbeat = console.last_heartbeat();
        let mut next = dst;
        console = next.console(&serial);
        before = still_going(&mut console, &before);
        src = next;
    }
    let check = console.command("dirty check", "dirty:", REPLY);
    assert!(check.starts_with("dirty: ok"), "{check}");
}

#[test]
fn a_disk_write_in_flight_during_migration_lands() {
    let files = TempDir::new("mig-disk");
    let serial = files.path().join("serial.sock");
    let image = files.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&config(&serial, 1, 256, false, None)).unwrap();
    c["disks"] = serde_json::json!([{"path": image}]);
    let mut src = ApiVmm::start(&[]);
    let mut old = boot(&mut src, &c.to_string(), &serial);
    // 64 MiB in 32 KiB requests: still going while the memory is copied (most of the time;
    // either way it must land, once).
    const SECTORS: u64 = 64 * MIB / 512;
    old.send(&format!("disk write 0 {SECTORS} 171"));
    let dst = ApiVmm::start(&[]);
    migrate(src, &dst, &urls(files.path(), "m.sock"), false);
    let mut dst = dst;
    let mut console = dst.console(&serial);
    while old.try_next(Duration::from_millis(200)).is_some() {}
    let done_before: Vec<&String> = old
        .seen
        .iter()
        .filter(|l| l.contains("disk: wrote"))
        .collect();
    let wrote = match done_before.first() {
        Some(line) => line.to_string(),
        None => console.wait_for("disk: wrote", REPLY),
    };
    assert_eq!(wrote, format!("disk: wrote sector=0 count={SECTORS}"));
    let data = std::fs::read(&image).unwrap();
    let (written, rest) = data.split_at((64 * MIB) as usize);
    assert!(
        written.iter().all(|b| *b == 171),
        "part of the write is missing"
    );
    assert!(
        rest.iter().all(|b| *b == 0),
        "a write landed outside its range"
    );
    // The device carries on after the move.
    let wrote = console.command("disk write 0 8 172", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=0 count=8");
    let data = std::fs::read(&image).unwrap();
    assert!(data[..4096].iter().all(|b| *b == 172));
    assert!(data[4096..8192].iter().all(|b| *b == 171));
}

/// A destination at `url` that takes everything, reads Complete and goes without a word.
/// `notice` is whether it agrees to tell before it runs the VM: then its silence says it
/// never did.
fn gone_at_complete(url_path: &Path, notice: bool) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(url_path).unwrap();
    std::thread::spawn(move || {
        let mut channel = migration::Channel::from(listener.accept().unwrap().0);
        loop {
            let h = channel.recv_request_header().unwrap();
            let payload = channel.read_payload(h.length).unwrap();
            let reply = match h.command {
                migration::Command::Start if notice => {
                    br#"{"accepted":[],"start_notice":true}"#.to_vec()
                }
                migration::Command::Start => br#"{"accepted":[]}"#.to_vec(),
                migration::Command::MemoryFds => {
                    let regions: Vec<migration::protocol::MemoryRegion> =
                        serde_json::from_slice(&payload).unwrap();
                    channel.recv_fds(regions.len()).unwrap();
                    Vec::new()
                }
                migration::Command::Complete => return,
                _ => Vec::new(),
            };
            channel
                .send_response(&migration::Response::Ok(reply))
                .unwrap();
        }
    })
}

#[test]
fn a_destination_that_never_answers_complete_leaves_the_source_paused_not_running_twice() {
    let files = TempDir::new("mig-no-answer");
    let (src, mut console, _) = lone_guest(&files, true);
    still_beating(&mut console);
    let url = urls(files.path(), "m.sock");
    // Sends the VM to a destination that goes at Complete; returns the failure's answer.
    let send_to_gone = |notice: bool, says: &str| {
        let socket = files.path().join("m.sock");
        let _ = std::fs::remove_file(&socket);
        let peer = gone_at_complete(&socket, notice);
        let (status, body) = send(
            &src,
            serde_json::json!({"destination_url": url, "local": true}),
        );
        peer.join().unwrap();
        assert_eq!(status, 500, "{body}");
        assert!(body.to_string().contains(says), "{body}");
    };
    // Without the start notice, a destination that read Complete may have started the VM.
    send_to_gone(false, "did not answer Complete");
    // Paused, not resumed: the destination may be running it.
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Paused", "{info}");
    // Lines the guest wrote before the pause may still be on their way.
    while console.try_next(Duration::from_millis(500)).is_some() {}
    assert!(
        console.try_next(Duration::from_secs(2)).is_none(),
        "the guest ran on"
    );
    // The operator, knowing the destination has no VM, resumes it here.
    src.expect("PUT", "vm.resume", None, 204);
    still_beating(&mut console);

    // One that agreed to say so before it runs the VM, and ended without saying it, never
    // ran it: the source resumes it at once.
    send_to_gone(true, "ended before it ran the VM");
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    still_beating(&mut console);
}

#[test]
fn a_source_that_stalls_mid_stream_is_dropped_after_step_timeout_s() {
    let ns = NetNs::new("migstall");
    ns.run(&[
        "ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
    ]);
    let files = TempDir::new("mig-src-stalls");
    let serial = files.path().join("serial.sock");
    let dst = ApiVmm::start_in(Some(&ns), &[]);
    let fds_before = fd_count(dst.pid());
    let url = urls(files.path(), "m.sock");
    let receiving = dst.receive_migration(
        serde_json::json!({"receiver_url": url, "step_timeout_s": 2}),
        Vec::new(),
    );
    // A source that sends Start, Config (the destination opens the TAP and maps 64 MiB) and
    // part of the memory, then goes silent with the socket open, like a stopped process.
    let mut channel = partial_source(&url, &config(&serial, 1, 64, false, Some("tap0")));
    let r = receiving.join().unwrap();
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 500, "{text}");
    assert!(text.contains("nothing for 2 s (step_timeout_s)"), "{text}");
    // The destination closed its end: the silent source reads its error, then the end.
    use std::io::Read;
    let mut rest = Vec::new();
    channel.set_read_timeout(Some(REPLY)).unwrap();
    channel.read_to_end(&mut rest).unwrap();
    dst.expect("GET", "vm.info", None, 404);
    // The TAP, the memory and the socket went with what arrived. (Not more than before: the
    // count before may hold an API connection the server had not closed yet.)
    let deadline = Instant::now() + REPLY;
    loop {
        let now = fd_count(dst.pid());
        if now <= fds_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the destination holds {now} descriptors, {fds_before} before the migration"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The TAP is free again: it takes one queue, so this would fail were it still held.
    drop(ns.open_tap("tap0", false));
    // And the destination takes a VM again.
    let mut src = ApiVmm::start(&[]);
    let _ = std::fs::remove_file(&serial);
    let mut console = boot(&mut src, &config(&serial, 1, 64, false, None), &serial);
    still_beating(&mut console);
    migrate(src, &dst, &urls(files.path(), "again.sock"), false);
    let mut dst = dst;
    let mut console = dst.console(&serial);
    still_beating(&mut console);
}

/// Sends the VM from `src` with `step_timeout_s` 2 to a destination played at `sock` in
/// `files` that answers the first `answered` requests (Start, then Config) and then neither
/// reads nor answers, with the socket open; checks the source gave up on it and the VM
/// runs on, and returns the error.
fn send_to_stalled_destination(
    src: &ApiVmm,
    files: &TempDir,
    sock: &str,
    answered: usize,
) -> String {
    let url = urls(files.path(), sock);
    let listener = std::os::unix::net::UnixListener::bind(files.path().join(sock)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let mut channel = migration::Channel::from(listener.accept().unwrap().0);
        answer(&mut channel, answered);
        // Holds the socket open until the source is done with it.
        let _ = done_rx.recv();
    });
    let (status, body) = send(
        src,
        serde_json::json!({"destination_url": url, "step_timeout_s": 2}),
    );
    done_tx.send(()).unwrap();
    peer.join().unwrap();
    assert_eq!(status, 500, "{body}");
    let text = body.to_string();
    assert!(text.contains("nothing for 2 s (step_timeout_s)"), "{text}");
    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert!(info.get("migration").is_none(), "{info}");
    text
}

#[test]
fn a_destination_that_goes_silent_or_stops_reading_is_given_up_and_the_vm_runs_on() {
    let files = TempDir::new("mig-dst-stalls");
    let (src, mut console, _) = lone_guest(&files, false);
    // Silent: Start is never answered.
    let text = send_to_stalled_destination(&src, &files, "silent.sock", 0);
    assert!(text.contains("reading the response"), "{text}");
    still_beating(&mut console);
    // Stops reading: it takes Start and Config, then leaves the memory unread. The test
    // guest keeps a buffer dirty, so there is more memory than the socket holds.
    console.command("dirty 16 50", "dirty:", REPLY);
    let text = send_to_stalled_destination(&src, &files, "full.sock", 2);
    assert!(text.contains("writing a Memory request"), "{text}");
    still_beating(&mut console);
    let check = console.command("dirty check", "dirty:", REPLY);
    assert!(check.starts_with("dirty: ok"), "{check}");
    // It still migrates for real.
    let dst = ApiVmm::start(&[]);
    migrate(src, &dst, &urls(files.path(), "again.sock"), false);
}

#[test]
fn batons_that_lay_out_the_state_differently_refuse_before_anything_pauses() {
    let files = TempDir::new("mig-skew");
    let (src, mut console, _) = lone_guest(&files, false);
    let ours = format!(
        "baton {} (state format {})",
        env!("CARGO_PKG_VERSION"),
        migration::snapshot::FORMAT_VERSION
    );
    let theirs = format!("baton {} (state format 99)", env!("CARGO_PKG_VERSION"));
    let refused = |body: &serde_json::Value| {
        let text = body.to_string();
        assert!(
            text.contains(&format!(
                "The source runs {ours} and the destination {theirs}"
            )),
            "{text}"
        );
        assert!(text.contains("Nothing was paused"), "{text}");
    };

    // A destination built with another layout refuses Start.
    let dst = ApiVmm::start_with(None, "", &[("BATON_TEST_STATE_FORMAT", "99")], &[]);
    let receiving = receive(&dst, &urls(files.path(), "newer.sock"));
    let (status, body) = send(
        &src,
        serde_json::json!({"destination_url": urls(files.path(), "newer.sock")}),
    );
    assert_eq!(status, 500, "{body}");
    refused(&body);
    let r = receiving.join().unwrap();
    assert_eq!(r.status, 500);
    refused(&serde_json::Value::String(
        String::from_utf8_lossy(&r.body).into_owned(),
    ));
    dst.expect("GET", "vm.info", None, 404);

    // One that does not check (another VMM, an older baton) but says what it runs: the
    // source refuses its answer to Start and abandons.
    let sock = files.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peer = std::thread::spawn(move || {
        let mut channel = migration::Channel::from(listener.accept().unwrap().0);
        let h = channel.recv_request_header().unwrap();
        channel.read_payload(h.length).unwrap();
        let reply = serde_json::json!({
            "accepted": [],
            "software": {"vmm": format!("baton {}", env!("CARGO_PKG_VERSION")), "state_format": 99},
        });
        channel
            .send_response(&migration::Response::Ok(reply.to_string().into_bytes()))
            .unwrap();
        // What comes next is Abandon, nothing else.
        let h = channel.recv_request_header().unwrap();
        assert_eq!(h.command, migration::Command::Abandon);
    });
    let (status, body) = send(
        &src,
        serde_json::json!({"destination_url": urls(files.path(), "other.sock")}),
    );
    peer.join().unwrap();
    assert_eq!(status, 500, "{body}");
    refused(&body);

    let info = src.expect("GET", "vm.info", None, 200).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    still_beating(&mut console);
    // A destination of the same layout takes it.
    let dst = ApiVmm::start(&[]);
    migrate(src, &dst, &urls(files.path(), "same.sock"), false);
}
