//! Options on the kernel command line (`start_info.cmdline_paddr`).
//!
//! Space-separated `key=value` words. Known keys:
//!
//! | key            | value                                      | default |
//! |----------------|--------------------------------------------|---------|
//! | `heartbeat_ms` | period of the `heartbeat N` line; 0 = none | 1000    |
//! | `virtio`       | `poll`: look at the virtio rings all the time; `irq`: when an MSI-X interrupt came (and every 10 ms) | `poll` |
//! | `services`     | which network services run: a comma-separated subset of `echo,source,sink,udp`, or `none` | all |
//! | `net`          | `A.B.C.D/P[,A.B.C.D/P…]`: the address of each network card, in PCI order | none |
//! | `net_features` | virtio-net features the cards take when offered: a comma-separated subset of `mrg_rxbuf,indirect`, or `none` | both |
//! | `rx_buffer`    | bytes of each receive buffer a card posts, header included (64 to 9216); smaller than a frame needs `mrg_rxbuf` | 9216 |
//!
//! A VMM may add options meant for Linux (`console=ttyS0`, ...), so unknown
//! words are reported as warnings, never refused.

use crate::text::{parse_u64, words};

/// Heartbeat period when the command line does not set one.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;

/// Most network cards the guest configures.
pub const MAX_NICS: usize = 4;

/// An IPv4 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: [u8; 4],
    /// Prefix length, 0 to 32.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `A.B.C.D/P`.
    pub fn parse(text: &[u8]) -> Option<Self> {
        let slash = text.iter().position(|&b| b == b'/')?;
        let prefix = parse_u64(&text[slash + 1..]).filter(|p| *p <= 32)? as u8;
        let mut addr = [0u8; 4];
        let mut parts = text[..slash].split(|&b| b == b'.');
        for a in &mut addr {
            *a = u8::try_from(parse_u64(parts.next()?)?).ok()?;
        }
        parts.next().is_none().then_some(Cidr { addr, prefix })
    }
}

/// The options the guest understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Milliseconds between heartbeat lines; 0 disables them.
    pub heartbeat_ms: u64,
    /// Each network card's address, in PCI order.
    pub net: [Option<Cidr>; MAX_NICS],
    /// Network cards signal with MSI-X interrupts instead of being polled.
    pub interrupts: bool,
    /// The network services to run.
    pub services: Services,
    /// How network cards drive their queues.
    pub net_tuning: NetTuning,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            net: [None; MAX_NICS],
            interrupts: false,
            services: Services::ALL,
            net_tuning: NetTuning::default(),
        }
    }
}

/// Largest receive buffer a card posts: a 9000-byte MTU frame and its header.
pub const MAX_RX_BUFFER: usize = 9216;
/// Smallest: a header and a little more.
pub const MIN_RX_BUFFER: usize = 64;

/// How network cards drive their queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetTuning {
    /// Take VIRTIO_NET_F_MRG_RXBUF when offered: a frame may span receive buffers.
    pub mrg_rxbuf: bool,
    /// Take VIRTIO_RING_F_INDIRECT_DESC when offered: chains of several buffers go in an
    /// indirect table.
    pub indirect: bool,
    /// Bytes of each receive buffer, header included.
    pub rx_buffer: usize,
}

impl Default for NetTuning {
    fn default() -> Self {
        NetTuning {
            mrg_rxbuf: true,
            indirect: true,
            rx_buffer: MAX_RX_BUFFER,
        }
    }
}

/// Parses `net_features`' value into `t`.
fn parse_net_features(value: &[u8], t: NetTuning) -> Option<NetTuning> {
    let mut t = NetTuning {
        mrg_rxbuf: false,
        indirect: false,
        ..t
    };
    if value == b"none" {
        return Some(t);
    }
    for name in value.split(|&b| b == b',') {
        match name {
            b"mrg_rxbuf" => t.mrg_rxbuf = true,
            b"indirect" => t.indirect = true,
            _ => return None,
        }
    }
    Some(t)
}

/// The network services a card with an address runs (ping is always answered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Services {
    /// TCP echo on port 7.
    pub echo: bool,
    /// The sequence stream sent on TCP port 5001.
    pub source: bool,
    /// The sequence stream checked on TCP port 5002.
    pub sink: bool,
    /// The UDP sequence feed on port 5003.
    pub udp: bool,
}

impl Services {
    /// Every service.
    pub const ALL: Services = Services {
        echo: true,
        source: true,
        sink: true,
        udp: true,
    };

    fn parse(value: &[u8]) -> Option<Self> {
        let mut s = Services {
            echo: false,
            source: false,
            sink: false,
            udp: false,
        };
        if value == b"none" {
            return Some(s);
        }
        for name in value.split(|&b| b == b',') {
            match name {
                b"echo" => s.echo = true,
                b"source" => s.source = true,
                b"sink" => s.sink = true,
                b"udp" => s.udp = true,
                _ => return None,
            }
        }
        Some(s)
    }
}

fn parse_net(value: &[u8]) -> Option<[Option<Cidr>; MAX_NICS]> {
    let mut net = [None; MAX_NICS];
    let mut parts = value.split(|&b| b == b',');
    for slot in &mut net {
        match parts.next() {
            Some(p) => *slot = Some(Cidr::parse(p)?),
            None => break,
        }
    }
    parts.next().is_none().then_some(net)
}

/// Something on the command line that was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warning<'a> {
    /// A word whose key is not known (the whole word when it has no `=`).
    UnknownOption(&'a [u8]),
    /// A known key with a value that does not parse; the value is ignored.
    BadValue {
        /// The option's key.
        key: &'a [u8],
        /// The value as given.
        value: &'a [u8],
    },
}

/// Parses `cmdline`, reporting each ignored word to `warn`, in order.
pub fn parse<'a>(cmdline: &'a [u8], mut warn: impl FnMut(Warning<'a>)) -> Options {
    let mut options = Options::default();
    for word in words(cmdline) {
        let (key, value) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], Some(&word[i + 1..])),
            None => (word, None),
        };
        match (key, value) {
            (b"heartbeat_ms", value) => match value.and_then(parse_u64) {
                Some(ms) => options.heartbeat_ms = ms,
                None => warn(Warning::BadValue {
                    key,
                    value: value.unwrap_or_default(),
                }),
            },
            (b"virtio", Some(b"poll")) => options.interrupts = false,
            (b"virtio", Some(b"irq")) => options.interrupts = true,
            (b"virtio", value) => warn(Warning::BadValue {
                key,
                value: value.unwrap_or_default(),
            }),
            (b"services", value) => match value.and_then(Services::parse) {
                Some(s) => options.services = s,
                None => warn(Warning::BadValue {
                    key,
                    value: value.unwrap_or_default(),
                }),
            },
            (b"net_features", value) => {
                match value.and_then(|v| parse_net_features(v, options.net_tuning)) {
                    Some(t) => options.net_tuning = t,
                    None => warn(Warning::BadValue {
                        key,
                        value: value.unwrap_or_default(),
                    }),
                }
            }
            (b"rx_buffer", value) => match value
                .and_then(parse_u64)
                .map(|n| n as usize)
                .filter(|n| (MIN_RX_BUFFER..=MAX_RX_BUFFER).contains(n))
            {
                Some(n) => options.net_tuning.rx_buffer = n,
                None => warn(Warning::BadValue {
                    key,
                    value: value.unwrap_or_default(),
                }),
            },
            (b"net", value) => match value.and_then(parse_net) {
                Some(net) => options.net = net,
                None => warn(Warning::BadValue {
                    key,
                    value: value.unwrap_or_default(),
                }),
            },
            _ => warn(Warning::UnknownOption(key)),
        }
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(cmdline: &[u8]) -> (Options, Vec<Warning<'_>>) {
        let mut warnings = Vec::new();
        let options = parse(cmdline, |w| warnings.push(w));
        (options, warnings)
    }

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(parse_all(b""), (Options::default(), vec![]));
        assert_eq!(parse_all(b"   ").0.heartbeat_ms, 1000);
    }

    #[test]
    fn heartbeat_is_parsed() {
        assert_eq!(parse_all(b"heartbeat_ms=200").0.heartbeat_ms, 200);
        assert_eq!(parse_all(b"  heartbeat_ms=0 ").0.heartbeat_ms, 0);
        // The last one wins, as on Linux.
        assert_eq!(
            parse_all(b"heartbeat_ms=1 heartbeat_ms=2").0.heartbeat_ms,
            2
        );
    }

    #[test]
    fn services() {
        assert_eq!(parse_all(b"").0.services, Services::ALL);
        let s = parse_all(b"services=echo,udp").0.services;
        assert!(s.echo && s.udp && !s.source && !s.sink);
        assert_eq!(
            parse_all(b"services=none").0.services,
            Services::parse(b"none").unwrap()
        );
        let (o, w) = parse_all(b"services=echo,telnet");
        assert_eq!(o.services, Services::ALL);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn virtio_mode() {
        assert!(!parse_all(b"").0.interrupts);
        assert!(parse_all(b"virtio=irq").0.interrupts);
        assert!(!parse_all(b"virtio=irq virtio=poll").0.interrupts);
        let (o, w) = parse_all(b"virtio=msi");
        assert!(!o.interrupts);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn net_addresses() {
        let (o, w) = parse_all(b"net=10.0.0.2/24,192.168.1.10/16");
        assert!(w.is_empty());
        assert_eq!(
            o.net[0],
            Some(Cidr {
                addr: [10, 0, 0, 2],
                prefix: 24
            })
        );
        assert_eq!(o.net[1].unwrap().prefix, 16);
        assert_eq!(o.net[2], None);
        for bad in [
            &b"net=10.0.0.2"[..],
            b"net=10.0.0.256/24",
            b"net=10.0.0/24",
            b"net=10.0.0.1/33",
            b"net=1.1.1.1/1,2.2.2.2/2,3.3.3.3/3,4.4.4.4/4,5.5.5.5/5",
        ] {
            let (o, w) = parse_all(bad);
            assert_eq!(o.net, [None; MAX_NICS], "{bad:?}");
            assert_eq!(w.len(), 1, "{bad:?}");
        }
    }

    #[test]
    fn net_tuning() {
        assert_eq!(parse_all(b"").0.net_tuning, NetTuning::default());
        let t = parse_all(b"net_features=indirect rx_buffer=256")
            .0
            .net_tuning;
        assert_eq!(
            t,
            NetTuning {
                mrg_rxbuf: false,
                indirect: true,
                rx_buffer: 256
            }
        );
        let t = parse_all(b"rx_buffer=128 net_features=none").0.net_tuning;
        assert!(!t.mrg_rxbuf && !t.indirect && t.rx_buffer == 128);
        for bad in [&b"rx_buffer=9217"[..], b"rx_buffer=10", b"net_features=tso"] {
            let (o, w) = parse_all(bad);
            assert_eq!(o.net_tuning, NetTuning::default(), "{bad:?}");
            assert_eq!(w.len(), 1, "{bad:?}");
        }
    }

    #[test]
    fn unknown_words_warn_and_are_ignored() {
        let (options, warnings) = parse_all(b"console=ttyS0 heartbeat_ms=5 quiet");
        assert_eq!(options.heartbeat_ms, 5);
        assert_eq!(
            warnings,
            [
                Warning::UnknownOption(b"console"),
                Warning::UnknownOption(b"quiet")
            ]
        );
    }

    #[test]
    fn bad_values_keep_the_default() {
        let (options, warnings) = parse_all(b"heartbeat_ms=fast heartbeat_ms");
        assert_eq!(options.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        assert_eq!(
            warnings,
            [
                Warning::BadValue {
                    key: b"heartbeat_ms",
                    value: b"fast"
                },
                Warning::BadValue {
                    key: b"heartbeat_ms",
                    value: b""
                },
            ]
        );
    }
}
