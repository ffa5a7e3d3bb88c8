//! A network card: `virtio-drivers`' raw virtio-net driver with our own
//! buffer pools, under smoltcp, serving ping, TCP echo, the sequence streams
//! and the UDP sequence feed (see the protocol's "Network services").

extern crate alloc;

use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use baton_test_guest::cmdline::{Cidr, NetTuning, Services};
use baton_test_guest::protocol::NetStatus;
use baton_test_guest::stream::{Sink, Source};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use virtio_drivers::transport::pci::PciTransport;

use crate::card::{Card, CardError, BUFFER_LEN, HEADER_LEN};
use crate::serial::emit;

/// Largest frame handed to smoltcp.
const MTU: usize = BUFFER_LEN - HEADER_LEN;
const TCP_BUFFER: usize = 256 * 1024;
const UDP_PERIOD_US: u64 = 1000;

const ECHO_PORT: u16 = 7;
const SOURCE_PORT: u16 = 5001;
const SINK_PORT: u16 = 5002;
const UDP_PORT: u16 = 5003;

/// smoltcp's view of the card.
struct Device(Rc<RefCell<Card>>);

struct RxToken {
    card: Rc<RefCell<Card>>,
    pair: usize,
    index: usize,
    len: usize,
}

struct TxToken(Rc<RefCell<Card>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // smoltcp may answer from inside `f` (the TxToken borrows the card too).
        let buf = self.card.borrow_mut().take_rx(self.pair, self.index);
        let r = f(&buf[HEADER_LEN..HEADER_LEN + self.len]);
        self.card.borrow_mut().return_rx(self.pair, self.index, buf);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut card = self.0.borrow_mut();
        card.reclaim_tx();
        card.send(len, f)
    }
}

impl phy::Device for Device {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken)> {
        let mut card = self.0.borrow_mut();
        card.reclaim_tx();
        if !card.can_send() {
            return None;
        }
        let (pair, index, len) = card.receive()?;
        drop(card);
        Some((
            RxToken {
                card: self.0.clone(),
                pair,
                index,
                len,
            },
            TxToken(self.0.clone()),
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken> {
        let mut card = self.0.borrow_mut();
        card.reclaim_tx();
        card.can_send().then(|| TxToken(self.0.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(64);
        caps
    }
}

/// A TCP service on one port, one connection at a time.
struct Service {
    handle: SocketHandle,
    port: u16,
    connected: bool,
    /// Where this connection's stream is (source and sink ports).
    source: Source,
    sink: Sink,
}

/// Sockets listening on each TCP port: a client may connect again while the last
/// connection is still closing.
const SOCKETS_PER_PORT: usize = 4;

/// The UDP sequence feed.
struct Feed {
    handle: SocketHandle,
    subscriber: Option<IpEndpoint>,
    next_us: u64,
    seq: u64,
}

/// A `ping` command in progress.
struct PingRun {
    dst: [u8; 4],
    count: u64,
    sent: u64,
    received: u64,
    next_us: u64,
    ident: u16,
}

/// Echo requests go out this far apart; replies are awaited this long after the last.
const PING_INTERVAL_US: u64 = 10_000;
const PING_WAIT_US: u64 = 1_000_000;

/// One network card with its stack and services.
pub struct Nic {
    device: Device,
    mac: [u8; 6],
    address: Option<Cidr>,
    services: Services,
    stack: Option<Stack>,
}

struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    services: Vec<Service>,
    feed: Feed,
    icmp: SocketHandle,
    icmp_ident: u16,
    ping: Option<PingRun>,
    status: NetStatus,
}

fn tcp_socket() -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    let tx = tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]);
    tcp::Socket::new(rx, tx)
}

impl Nic {
    /// Starts the driver; with an address, also the stack and its services.
    pub fn new(
        transport: PciTransport,
        address: Option<Cidr>,
        services: Services,
        msix: Option<crate::irq::Msix>,
        tuning: NetTuning,
    ) -> Result<Self, CardError> {
        let card = Card::new(transport, msix.as_ref(), tuning)?;
        let mac = card.mac();
        let mut nic = Nic {
            device: Device(Rc::new(RefCell::new(card))),
            mac,
            address,
            services,
            stack: None,
        };
        if let Some(cidr) = address {
            nic.stack = Some(nic.start_stack(cidr));
        }
        Ok(nic)
    }

    fn start_stack(&mut self, cidr: Cidr) -> Stack {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(self.mac)));
        config.random_seed = crate::io::rdtsc();
        let mut iface = Interface::new(config, &mut self.device, Instant::from_micros(0));
        let [a, b, c, d] = cidr.addr;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), cidr.prefix));
        });
        let mut sockets = SocketSet::new(Vec::new());
        let mut services = Vec::new();
        let wanted = [
            (ECHO_PORT, self.services.echo),
            (SOURCE_PORT, self.services.source),
            (SINK_PORT, self.services.sink),
        ];
        for port in wanted.iter().filter(|(_, on)| *on).map(|(p, _)| *p) {
            for _ in 0..SOCKETS_PER_PORT {
                let mut service = Service {
                    handle: sockets.add(tcp_socket()),
                    port,
                    connected: false,
                    source: Source::default(),
                    sink: Sink::default(),
                };
                // Listening before `ready` is printed, so a client that connects on `ready`
                // finds the port open.
                keep_listening(&mut sockets, &mut service);
                services.push(service);
            }
        }
        let udp_buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]);
        let mut udp = udp::Socket::new(udp_buffer(), udp_buffer());
        if self.services.udp {
            let _ = udp.bind(UDP_PORT);
        }
        let feed = Feed {
            handle: sockets.add(udp),
            subscriber: None,
            next_us: 0,
            seq: 0,
        };
        let icmp_buffer =
            || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0u8; 4096]);
        let ident = (crate::io::rdtsc() & 0xffff) as u16;
        let mut icmp = icmp::Socket::new(icmp_buffer(), icmp_buffer());
        let _ = icmp.bind(icmp::Endpoint::Ident(ident));
        let icmp = sockets.add(icmp);
        Stack {
            iface,
            sockets,
            services,
            feed,
            icmp,
            icmp_ident: ident,
            ping: None,
            status: NetStatus::default(),
        }
    }

    /// Moves frames and serves the services; call as often as possible.
    pub fn poll(&mut self, now_us: u64) {
        let Some(stack) = &mut self.stack else {
            // No address: keep the receive ring drained anyway.
            let now = Instant::from_micros(0);
            while let Some((rx, _)) = phy::Device::receive(&mut self.device, now) {
                phy::RxToken::consume(rx, |_| ());
            }
            return;
        };
        let now = Instant::from_micros(now_us as i64);
        stack.iface.poll(now, &mut self.device, &mut stack.sockets);
        stack.serve(now_us);
        // Send what the services queued without waiting for the next round.
        stack.iface.poll(now, &mut self.device, &mut stack.sockets);
    }

    /// Starts a `ping` run; its reply is printed when it ends.
    pub fn start_ping(
        &mut self,
        dst: [u8; 4],
        count: u64,
        now_us: u64,
    ) -> Result<(), &'static str> {
        let stack = self.stack.as_mut().ok_or("the card has no address")?;
        if stack.ping.is_some() {
            return Err("a ping is already running");
        }
        stack.ping = Some(PingRun {
            dst,
            count,
            sent: 0,
            received: 0,
            next_us: now_us,
            ident: stack.icmp_ident,
        });
        Ok(())
    }

    /// The `net` reply.
    pub fn status(&self) -> NetStatus {
        let card = self.device.0.borrow();
        let mut s = self.stack.as_ref().map(|s| s.status).unwrap_or_default();
        s.mac = self.mac;
        s.ip = self.address.map(|c| (c.addr, c.prefix));
        s.pairs = card.pairs() as u64;
        s.irqs = crate::irq::count();
        (s.mrg_rxbuf, s.indirect) = card.negotiated();
        (s.merged, s.merge_errors) = card.merges();
        for (i, (rx, tx)) in card.frames().enumerate() {
            s.rx_frames += rx;
            s.tx_frames += tx;
            if let Some(slot) = s.pair_rx_frames.get_mut(i) {
                *slot = rx;
            }
        }
        s
    }
}

/// Keeps a service's socket listening; says whether a new connection began.
fn keep_listening(sockets: &mut SocketSet<'static>, s: &mut Service) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(s.handle);
    match socket.state() {
        tcp::State::Closed => {
            let _ = socket.listen(s.port);
            s.connected = false;
            false
        }
        tcp::State::CloseWait => {
            socket.close();
            false
        }
        tcp::State::Listen | tcp::State::SynReceived => false,
        _ if !s.connected => {
            s.connected = true;
            true
        }
        _ => false,
    }
}

fn echo(socket: &mut tcp::Socket, buf: &mut [u8], status: &mut NetStatus) {
    while socket.can_recv() && socket.can_send() {
        let room = socket.send_capacity() - socket.send_queue();
        let want = room.min(buf.len());
        match socket.recv_slice(&mut buf[..want]) {
            Ok(n) if n > 0 => {
                let _ = socket.send_slice(&buf[..n]);
                status.echo_bytes += n as u64;
            }
            _ => break,
        }
    }
}

fn send_stream(
    socket: &mut tcp::Socket,
    buf: &mut [u8],
    source: &mut Source,
    status: &mut NetStatus,
) {
    while socket.may_send() && socket.can_send() {
        source.peek(buf);
        match socket.send_slice(buf) {
            Ok(n) if n > 0 => {
                source.advance(n);
                status.source_bytes += n as u64;
            }
            _ => break,
        }
    }
}

fn check_stream(socket: &mut tcp::Socket, buf: &mut [u8], sink: &mut Sink, status: &mut NetStatus) {
    while socket.can_recv() {
        match socket.recv_slice(buf) {
            Ok(n) if n > 0 => {
                let before = sink.errors;
                sink.check(&buf[..n]);
                status.sink_bytes += n as u64;
                status.sink_errors += sink.errors - before;
            }
            _ => break,
        }
    }
}

impl Stack {
    fn serve_ping(&mut self, now_us: u64) {
        let Some(run) = &mut self.ping else {
            return;
        };
        let socket = self.sockets.get_mut::<icmp::Socket>(self.icmp);
        while let Ok((packet, _)) = socket.recv() {
            if let Some((ident, seq)) = baton_test_guest::icmp::echo_reply(packet) {
                if ident == run.ident && u64::from(seq) < run.sent {
                    run.received += 1;
                }
            }
        }
        let [a, b, c, d] = run.dst;
        while run.sent < run.count && now_us >= run.next_us && socket.can_send() {
            let request = baton_test_guest::icmp::echo_request(run.ident, run.sent as u16);
            if socket
                .send_slice(&request, IpAddress::v4(a, b, c, d))
                .is_err()
            {
                break;
            }
            run.sent += 1;
            run.next_us = now_us + PING_INTERVAL_US;
        }
        let waited = run.sent == run.count && now_us >= run.next_us + PING_WAIT_US;
        if run.received == run.count || waited {
            let (dst, sent, received) = (run.dst, run.sent, run.received);
            emit(|w| baton_test_guest::protocol::ping(w, dst, sent, received));
            self.ping = None;
        }
    }

    fn serve(&mut self, now_us: u64) {
        let mut buf = [0u8; 16 * 1024];
        for service in &mut self.services {
            if keep_listening(&mut self.sockets, service) {
                self.status.connections += 1;
                service.source = Source::default();
                service.sink = Sink::default();
            }
            let socket = self.sockets.get_mut::<tcp::Socket>(service.handle);
            let status = &mut self.status;
            match service.port {
                ECHO_PORT => echo(socket, &mut buf, status),
                SOURCE_PORT => send_stream(socket, &mut buf, &mut service.source, status),
                _ => check_stream(socket, &mut buf, &mut service.sink, status),
            }
        }

        self.serve_ping(now_us);

        let feed = &mut self.feed;
        let udp = self.sockets.get_mut::<udp::Socket>(feed.handle);
        while let Ok((_, meta)) = udp.recv() {
            feed.subscriber = match feed.subscriber {
                Some(e) if e == meta.endpoint => None,
                _ => {
                    feed.seq = 0;
                    feed.next_us = now_us;
                    Some(meta.endpoint)
                }
            };
        }
        if let Some(to) = feed.subscriber {
            // After a pause, go on from now rather than burst to catch up.
            if now_us.saturating_sub(feed.next_us) > 10 * UDP_PERIOD_US {
                feed.next_us = now_us;
            }
            while now_us >= feed.next_us && udp.can_send() {
                if udp.send_slice(&feed.seq.to_le_bytes(), to).is_err() {
                    break;
                }
                feed.seq += 1;
                feed.next_us += UDP_PERIOD_US;
                self.status.udp_sent += 1;
            }
        }
    }
}
