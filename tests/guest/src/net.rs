//! A network card: `virtio-drivers`' raw virtio-net driver with our own
//! buffer pools, under smoltcp, serving ping, TCP echo, the sequence streams
//! and the UDP sequence feed (see the protocol's "Network services").

extern crate alloc;

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use baton_test_guest::cmdline::Cidr;
use baton_test_guest::protocol::NetStatus;
use baton_test_guest::stream::{Sink, Source};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;

use crate::hal::IdentityHal;
use crate::serial::emit;

const QUEUE_SIZE: usize = 256;
/// Receive buffers posted at once, and transmit buffers in flight.
const RX_BUFFERS: usize = 128;
const TX_BUFFERS: usize = 128;
/// Room for a 9000-byte MTU frame and the 12-byte header.
const BUFFER_LEN: usize = 9216;
/// Largest frame handed to smoltcp.
const MTU: usize = BUFFER_LEN - 12;
const TCP_BUFFER: usize = 256 * 1024;
const UDP_PERIOD_US: u64 = 1000;

const ECHO_PORT: u16 = 7;
const SOURCE_PORT: u16 = 5001;
const SINK_PORT: u16 = 5002;
const UDP_PORT: u16 = 5003;

type Raw = VirtIONetRaw<IdentityHal, PciTransport, QUEUE_SIZE>;

struct Inner {
    raw: Raw,
    rx: Vec<Box<[u8]>>,
    /// Receive buffer index by descriptor token.
    rx_slot: Vec<usize>,
    tx: Vec<Box<[u8]>>,
    tx_free: Vec<usize>,
    /// Transmit buffer index by descriptor token.
    tx_slot: Vec<usize>,
    rx_frames: u64,
    tx_frames: u64,
}

impl Inner {
    fn post_rx(&mut self, index: usize) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer is a boxed slice that stays put and is not
        // touched again until the device returns it (`receive_complete`).
        let token = unsafe { self.raw.receive_begin(&mut self.rx[index])? };
        self.rx_slot[usize::from(token)] = index;
        Ok(())
    }

    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let index = self.tx_slot[usize::from(token)];
            // SAFETY: the token and buffer are the pair `transmit_begin` used.
            if unsafe { self.raw.transmit_complete(token, &self.tx[index]) }.is_ok() {
                self.tx_free.push(index);
            }
        }
    }
}

/// smoltcp's view of the card.
struct Device(Rc<RefCell<Inner>>);

struct RxToken {
    inner: Rc<RefCell<Inner>>,
    index: usize,
    start: usize,
    len: usize,
}

struct TxToken(Rc<RefCell<Inner>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        // smoltcp may answer from inside `f` (the TxToken borrows the card too).
        let buf = core::mem::take(&mut self.inner.borrow_mut().rx[self.index]);
        let r = f(&buf[self.start..self.start + self.len]);
        let mut inner = self.inner.borrow_mut();
        inner.rx[self.index] = buf;
        // A buffer that cannot be reposted is lost; the ring has more.
        let _ = inner.post_rx(self.index);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut guard = self.0.borrow_mut();
        let inner = &mut *guard;
        inner.reclaim_tx();
        let index = inner
            .tx_free
            .pop()
            .expect("transmit() checked for a free buffer");
        let mut buf = core::mem::take(&mut inner.tx[index]);
        let hdr = inner.raw.fill_buffer_header(&mut buf).unwrap_or(12);
        let r = f(&mut buf[hdr..hdr + len]);
        inner.tx[index] = buf;
        // SAFETY: the boxed buffer stays put and untouched until
        // `transmit_complete` gives it back.
        match unsafe { inner.raw.transmit_begin(&inner.tx[index][..hdr + len]) } {
            Ok(token) => {
                inner.tx_slot[usize::from(token)] = index;
                inner.tx_frames += 1;
            }
            Err(_) => inner.tx_free.push(index),
        }
        r
    }
}

impl phy::Device for Device {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken)> {
        let mut inner = self.0.borrow_mut();
        inner.reclaim_tx();
        if inner.tx_free.is_empty() {
            return None;
        }
        let token = inner.raw.poll_receive()?;
        let index = inner.rx_slot[usize::from(token)];
        let mut buf = core::mem::take(&mut inner.rx[index]);
        // SAFETY: the token and buffer are the pair `receive_begin` used.
        let done = unsafe { inner.raw.receive_complete(token, &mut buf) };
        inner.rx[index] = buf;
        match done {
            Ok((start, len)) => {
                inner.rx_frames += 1;
                drop(inner);
                Some((
                    RxToken {
                        inner: self.0.clone(),
                        index,
                        start,
                        len,
                    },
                    TxToken(self.0.clone()),
                ))
            }
            Err(_) => {
                let _ = inner.post_rx(index);
                None
            }
        }
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken> {
        let mut inner = self.0.borrow_mut();
        inner.reclaim_tx();
        (!inner.tx_free.is_empty()).then(|| TxToken(self.0.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(TX_BUFFERS);
        caps
    }
}

/// A TCP service on one port, one connection at a time.
struct Service {
    handle: SocketHandle,
    port: u16,
    connected: bool,
}

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
    stack: Option<Stack>,
}

struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    echo: Service,
    source: Service,
    sink: Service,
    feed: Feed,
    icmp: SocketHandle,
    icmp_ident: u16,
    ping: Option<PingRun>,
    source_state: Source,
    sink_state: Sink,
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
    ) -> Result<Self, virtio_drivers::Error> {
        let raw = Raw::new(transport)?;
        let mac = raw.mac_address();
        let mut inner = Inner {
            raw,
            rx: (0..RX_BUFFERS)
                .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                .collect(),
            rx_slot: vec![0; QUEUE_SIZE],
            tx: (0..TX_BUFFERS)
                .map(|_| vec![0u8; BUFFER_LEN].into_boxed_slice())
                .collect(),
            tx_free: (0..TX_BUFFERS).collect(),
            tx_slot: vec![0; QUEUE_SIZE],
            rx_frames: 0,
            tx_frames: 0,
        };
        for i in 0..RX_BUFFERS {
            inner.post_rx(i)?;
        }
        let mut nic = Nic {
            device: Device(Rc::new(RefCell::new(inner))),
            mac,
            address,
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
        let mut service = |port| Service {
            handle: sockets.add(tcp_socket()),
            port,
            connected: false,
        };
        let echo = service(ECHO_PORT);
        let source = service(SOURCE_PORT);
        let sink = service(SINK_PORT);
        let udp_buffer =
            || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * 1024]);
        let mut udp = udp::Socket::new(udp_buffer(), udp_buffer());
        let _ = udp.bind(UDP_PORT);
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
            echo,
            source,
            sink,
            feed,
            icmp,
            icmp_ident: ident,
            ping: None,
            source_state: Source::default(),
            sink_state: Sink::default(),
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
        let inner = self.device.0.borrow();
        let mut s = self.stack.as_ref().map(|s| s.status).unwrap_or_default();
        s.mac = self.mac;
        s.ip = self.address.map(|c| (c.addr, c.prefix));
        s.rx_frames = inner.rx_frames;
        s.tx_frames = inner.tx_frames;
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
        for s in [&mut self.echo, &mut self.source, &mut self.sink] {
            if keep_listening(&mut self.sockets, s) {
                self.status.connections += 1;
                if s.port == SOURCE_PORT {
                    self.source_state = Source::default();
                }
                if s.port == SINK_PORT {
                    self.sink_state = Sink::default();
                }
            }
        }

        let echo = self.sockets.get_mut::<tcp::Socket>(self.echo.handle);
        while echo.can_recv() && echo.can_send() {
            let room = echo.send_capacity() - echo.send_queue();
            let want = room.min(buf.len());
            match echo.recv_slice(&mut buf[..want]) {
                Ok(n) if n > 0 => {
                    let _ = echo.send_slice(&buf[..n]);
                    self.status.echo_bytes += n as u64;
                }
                _ => break,
            }
        }

        let source = self.sockets.get_mut::<tcp::Socket>(self.source.handle);
        while source.may_send() && source.can_send() {
            self.source_state.peek(&mut buf);
            match source.send_slice(&buf) {
                Ok(n) if n > 0 => {
                    self.source_state.advance(n);
                    self.status.source_bytes += n as u64;
                }
                _ => break,
            }
        }

        let sink = self.sockets.get_mut::<tcp::Socket>(self.sink.handle);
        while sink.can_recv() {
            match sink.recv_slice(&mut buf) {
                Ok(n) if n > 0 => {
                    self.sink_state.check(&buf[..n]);
                    self.status.sink_bytes += n as u64;
                    self.status.sink_errors = self.sink_state.errors;
                }
                _ => break,
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
