//! virtio-net with the test guest, each test in a network namespace of its own with its
//! own TAP: ping both ways, TCP echo, 100 MiB sequence streams both ways, the UDP sequence feed,
//! jumbo frames, offloads off, traffic over four queue pairs, and vm.counters.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use baton_tests::{
    assert_card_merges, guest_config_json, num, stream_byte, ApiVmm, NetNs, Vm, READY,
};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const GUEST: &str = "10.0.0.2";
const CMDLINE: &str = "heartbeat_ms=0 net=10.0.0.2/24";
const MIB: u64 = 1 << 20;

/// The test guest on a TAP baton creates in `ns`, with extra `--net` options.
fn start(ns: &NetNs, net_options: &str) -> Vm {
    start_with(ns, net_options, CMDLINE)
}

fn start_with(ns: &NetNs, net_options: &str, cmdline: &str) -> Vm {
    let net = format!("--net=tap=tap0,ip=10.0.0.1,mask=255.255.255.0{net_options}");
    let mut vm = Vm::start_test_guest_in(Some(ns), &[&net], cmdline);
    vm.console().wait_for(READY, BOOT);
    vm
}

fn ping(ns: &NetNs, args: &[&str]) {
    let mut all = vec!["ping", "-q", "-W", "5"];
    all.extend_from_slice(args);
    all.push(GUEST);
    let out = ns.output(&all);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "ping {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&format!("{GUEST}:{port}").parse().unwrap(), REPLY)
        .unwrap_or_else(|e| panic!("connect to the guest's port {port}: {e}"));
    s.set_read_timeout(Some(REPLY)).unwrap();
    s.set_write_timeout(Some(REPLY)).unwrap();
    s
}

/// Reads `len` bytes of the guest's sequence stream and checks every byte.
fn read_stream(len: u64) {
    let mut s = connect(5001);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let want = buf.len().min((len - offset) as usize);
        let n = s.read(&mut buf[..want]).expect("read the stream");
        assert!(n > 0, "the guest closed the stream at {offset}");
        for (i, b) in buf[..n].iter().enumerate() {
            let at = offset + i as u64;
            assert_eq!(*b, stream_byte(at), "wrong byte at offset {at}");
        }
        offset += n as u64;
    }
}

/// Sends `len` bytes of the sequence stream to the guest's sink.
fn write_stream(len: u64) {
    let mut s = connect(5002);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = buf.len().min((len - offset) as usize);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = stream_byte(offset + i as u64);
        }
        s.write_all(&buf[..n]).expect("write the stream");
        offset += n as u64;
    }
    s.shutdown(Shutdown::Write).expect("shut down");
}

/// Polls the guest's `net` line until `done` holds for it.
fn wait_net(vm: &mut Vm, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = vm.console().command("net", "net:", REPLY);
        if done(&line) {
            return line;
        }
        assert!(Instant::now() < deadline, "never {what}: {line}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ping_both_ways_and_tcp_echo_works() {
    let ns = NetNs::new("ping");
    let mut vm = start(&ns, "");
    ping(&ns, &["-c", "20", "-i", "0.01"]);
    let reply = vm.console().command("ping 10.0.0.1 10", "ping:", REPLY);
    assert_eq!(reply, "ping: dst=10.0.0.1 sent=10 received=10");
    // Nobody there: every request goes unanswered, and the guest says so.
    let reply = vm.console().command("ping 10.0.0.99 2", "ping:", REPLY);
    assert_eq!(reply, "ping: dst=10.0.0.99 sent=2 received=0");
    ns.enter(|| {
        let mut s = connect(7);
        let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
        let mut back = vec![0u8; data.len()];
        let mut w = s.try_clone().unwrap();
        std::thread::scope(|t| {
            t.spawn(|| w.write_all(&data).expect("send"));
            s.read_exact(&mut back).expect("echo");
        });
        assert!(back == data, "echo differs");
    });
    let line = vm.console().command("net", "net:", REPLY);
    assert_eq!(num(&line, "echo_bytes"), MIB, "{line}");
}

#[test]
fn tcp_streams_of_100_mib_each_way_arrive_intact() {
    let ns = NetNs::new("tcp");
    let mut vm = start(&ns, "");
    ns.enter(|| read_stream(100 * MIB));
    ns.enter(|| write_stream(100 * MIB));
    let line = wait_net(&mut vm, "received the whole stream", |l| {
        num(l, "sink_bytes") >= 100 * MIB
    });
    assert_eq!(num(&line, "sink_bytes"), 100 * MIB, "{line}");
    assert_eq!(num(&line, "sink_errors"), 0, "{line}");
    assert!(num(&line, "source_bytes") >= 100 * MIB, "{line}");
}

#[test]
fn udp_sequence_feed_has_no_gap() {
    let ns = NetNs::new("udp");
    let _vm = start(&ns, "");
    ns.enter(|| {
        let s = UdpSocket::bind("10.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(REPLY)).unwrap();
        s.connect(format!("{GUEST}:5003")).unwrap();
        s.send(b"subscribe").unwrap();
        let mut buf = [0u8; 64];
        for want in 0..500u64 {
            let n = s.recv(&mut buf).expect("a datagram");
            assert_eq!(n, 8);
            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
            assert_eq!(seq, want, "sequence gap");
        }
        s.send(b"unsubscribe").unwrap();
    });
}

#[test]
fn jumbo_frames_with_mtu_9000() {
    let ns = NetNs::new("mtu");
    let _vm = start(&ns, ",mtu=9000");
    let link = ns.run(&["ip", "link", "show", "tap0"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("mtu 9000"),
        "baton set the MTU on the TAP it created"
    );
    // 8972 bytes of payload: a 9000-byte IP packet, not fragmented.
    ping(&ns, &["-c", "5", "-i", "0.05", "-s", "8972", "-M", "do"]);
}

#[test]
fn traffic_flows_with_offloads_off() {
    let ns = NetNs::new("nooffload");
    let mut vm = start(&ns, ",offload_tso=off,offload_ufo=off,offload_csum=off");
    ping(&ns, &["-c", "10", "-i", "0.01"]);
    ns.enter(|| read_stream(8 * MIB));
    let line = vm.console().command("net", "net:", REPLY);
    assert!(num(&line, "source_bytes") >= 8 * MIB, "{line}");
}

/// The virtio-net features Linux uses: the guest posts 256-byte receive buffers, so every
/// full-size frame arrives spread over several (VIRTIO_NET_F_MRG_RXBUF, num_buffers in the
/// first header), and sends each frame as header and payload in an indirect table
/// (VIRTIO_RING_F_INDIRECT_DESC).
#[test]
fn frames_spread_over_small_mergeable_buffers_and_indirect_chains_arrive_intact() {
    let ns = NetNs::new("mrg");
    let mut vm = start_with(
        &ns,
        ",num_queues=4",
        "heartbeat_ms=0 net=10.0.0.2/24 rx_buffer=256",
    );
    ping(&ns, &["-c", "20", "-i", "0.01", "-s", "1400"]);
    ns.enter(|| read_stream(16 * MIB));
    ns.enter(|| write_stream(16 * MIB));
    let line = wait_net(&mut vm, "received the whole stream", |l| {
        num(l, "sink_bytes") >= 16 * MIB
    });
    assert_eq!(num(&line, "sink_errors"), 0, "{line}");
    assert_card_merges(&line, 1000);
}

/// A driver that takes neither feature gets one receive buffer per frame, as before.
#[test]
fn traffic_flows_without_mergeable_buffers_or_indirect_descriptors() {
    let ns = NetNs::new("nomrg");
    let mut vm = start_with(&ns, "", "heartbeat_ms=0 net=10.0.0.2/24 net_features=none");
    ping(&ns, &["-c", "20", "-i", "0.01", "-s", "1400"]);
    ns.enter(|| read_stream(8 * MIB));
    ns.enter(|| write_stream(8 * MIB));
    let line = wait_net(&mut vm, "received the whole stream", |l| {
        num(l, "sink_bytes") >= 8 * MIB
    });
    assert_eq!(num(&line, "sink_errors"), 0, "{line}");
    assert_eq!(
        (
            num(&line, "mrg_rxbuf"),
            num(&line, "indirect"),
            num(&line, "merged")
        ),
        (0, 0, 0),
        "{line}"
    );
}

#[test]
fn traffic_spreads_over_four_queue_pairs() {
    let ns = NetNs::new("mq");
    let mut vm = start(&ns, ",num_queues=8,queue_size=512");
    // Connections from different ports hash to different pairs, both ways.
    ns.enter(|| {
        for i in 0..16u8 {
            let mut s = connect(7);
            let data = [i; 1000];
            s.write_all(&data).unwrap();
            let mut back = [0u8; 1000];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, data);
        }
    });
    ns.enter(|| read_stream(8 * MIB));
    let line = vm.console().command("net", "net:", REPLY);
    assert_eq!(num(&line, "pairs"), 4, "{line}");
    let per_pair: Vec<u64> = baton_tests::field(&line, "pair_rx_frames")
        .expect("per-pair counts")
        .split('/')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(per_pair.len(), 4, "{line}");
    let busy = per_pair.iter().filter(|n| **n > 0).count();
    assert!(busy >= 2, "frames arrived on only {busy} pair(s): {line}");
    // The TAP has four queues, and baton attached all of them for the guest.
    let link = ns.run(&["ip", "-d", "link", "show", "tap0"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("multi_queue"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );
}

#[test]
fn guest_runs_only_the_services_its_command_line_names() {
    let ns = NetNs::new("services");
    let _vm = start_with(&ns, "", &format!("{CMDLINE} services=echo"));
    ns.enter(|| {
        let mut s = connect(7);
        s.write_all(b"still here").unwrap();
        let mut back = [0u8; 10];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still here");
        let refused = TcpStream::connect_timeout(&format!("{GUEST}:5001").parse().unwrap(), REPLY);
        assert!(
            refused.is_err(),
            "the stream service runs though not asked for"
        );
    });
}

#[test]
fn msix_interrupts_carry_traffic() {
    let ns = NetNs::new("irq");
    let mut vm = start_with(&ns, ",num_queues=4", &format!("{CMDLINE} virtio=irq"));
    ping(&ns, &["-c", "10", "-i", "0.01"]);
    let reply = vm.console().command("ping 10.0.0.1 3", "ping:", REPLY);
    assert_eq!(reply, "ping: dst=10.0.0.1 sent=3 received=3");
    ns.enter(|| read_stream(8 * MIB));
    let line = vm.console().command("net", "net:", REPLY);
    // The guest only looks at its rings on an interrupt or every 10 ms: this many frames
    // in this little time need the interrupts.
    assert!(num(&line, "irqs") > 100, "{line}");
    assert_eq!(num(&line, "pairs"), 2, "{line}");
}

#[test]
fn vm_counters_match_what_the_guest_saw() {
    let ns = NetNs::new("counters");
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    let serial = vmm.dir().join("serial.sock");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config_json(&serial, 1, CMDLINE)).unwrap();
    config["net"] = serde_json::json!([{"tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0"}]);
    vmm.expect("PUT", "vm.create", Some(&config.to_string()), 204);
    // The MAC baton chose and the TAP show in vm.info.
    let info = vmm.expect("GET", "vm.info", None, 200).unwrap();
    let net = &info["config"]["net"][0];
    assert_eq!(net["id"], "net0");
    assert_eq!(net["tap"], "tap0");
    let mac = net["mac"].as_str().expect("a MAC").to_string();
    vmm.expect("PUT", "vm.boot", None, 204);
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    ping(&ns, &["-c", "50", "-i", "0.01"]);
    ns.enter(|| read_stream(4 * MIB));

    // Frames the device moved are the frames the guest saw, once traffic settles.
    let deadline = Instant::now() + REPLY;
    loop {
        let line = console.command("net", "net:", REPLY);
        assert!(line.contains(&format!("mac={mac}")), "{line}");
        let counters = vmm.expect("GET", "vm.counters", None, 200).unwrap();
        let c = &counters["net0"];
        let device = (c["rx_frames"].as_u64(), c["tx_frames"].as_u64());
        let guest = (Some(num(&line, "rx_frames")), Some(num(&line, "tx_frames")));
        if device == guest {
            assert!(c["rx_bytes"].as_u64().unwrap() > 50 * 84, "{counters}");
            assert!(c["tx_bytes"].as_u64().unwrap() >= 4 * MIB, "{counters}");
            break;
        }
        assert!(Instant::now() < deadline, "{counters} vs {line}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
