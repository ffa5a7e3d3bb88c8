//! Device sections of the VM configuration: network cards (`--net`), disks (`--disk`) and
//! the entropy device (`--rng`). Plain data with their option-string parsers and checks;
//! the VMM opens the TAPs and files.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::compat::{
    absent, only, pci_fields, ImageType, LockGranularity, Supported, Unsupported, VhostMode,
};

use crate::option_parser::{parse_fds, parse_int, parse_toggle, OptionError, OptionParser};

/// Most queue pairs a network card may have.
pub const MAX_QUEUE_PAIRS: usize = 16;
/// Longest TAP interface name.
pub const MAX_TAP_NAME: usize = 15;

/// Errors in a device section.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Two devices share an id.
    #[error("Device id '{0}' is used twice")]
    DuplicateId(String),
    /// An id is empty or has characters other than letters, digits, '-' and '_'.
    #[error("Invalid device id '{0}': use 1 to 32 letters, digits, '-' or '_'")]
    Id(String),
    /// A TAP name the kernel would refuse.
    #[error("Invalid TAP name '{0}': 1 to {MAX_TAP_NAME} bytes without '/', ':', NUL or spaces")]
    TapName(String),
    /// num_queues is not an even number in range.
    #[error("num_queues is {0}: it counts RX and TX queues, so it must be even, from 2 to {max}", max = 2 * MAX_QUEUE_PAIRS)]
    NumQueues(usize),
    /// queue_size is not a power of two in range.
    #[error("queue_size is {0}: it must be a power of two from 2 to 32768")]
    QueueSize(u16),
    /// MTU out of range.
    #[error("mtu is {0}: it must be from 68 to 65535")]
    Mtu(u16),
    /// Segmentation offloads without checksum offload.
    #[error("offload_tso and offload_ufo need offload_csum=on")]
    OffloadNeedsCsum,
    /// A disk without an image path.
    #[error("A disk needs a non-empty path")]
    EmptyPath,
    /// A MAC that is multicast or all zeros.
    #[error("MAC {0} is not a unicast address")]
    MacNotUnicast(MacAddr),
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("expected six hex bytes like 52:54:00:12:34:56, got '{s}'");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            // from_str_radix would take a sign ("+f").
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }

    /// A random, locally administered unicast address.
    pub fn random() -> Self {
        let mut mac = [0u8; 6];
        // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
        let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
        if n != mac.len() as isize {
            // Entropy is only needed for uniqueness; the time is a fallback.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            mac.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        mac[0] = (mac[0] & 0xfc) | 0x02;
        MacAddr(mac)
    }

    fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MacAddr::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn default_true() -> bool {
    true
}

fn default_num_queues() -> usize {
    2
}

fn default_queue_size() -> u16 {
    256
}

/// A virtio-net card on a TAP (`--net`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Device name; `net0`, `net1` ... when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// TAP interface to open, created if missing; with neither this nor passed descriptors,
    /// baton creates `batonN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The guest's MAC address; random when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// MAC of the host side of a TAP baton creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<MacAddr>,
    /// IPv4 address of the host side of a TAP baton creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Netmask for `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Ipv4Addr>,
    /// MTU announced to the guest, and set on a TAP baton creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// RX plus TX queues: twice the number of queue pairs (one TAP queue per pair).
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    /// Descriptors per queue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Offer TCP segmentation offload both ways.
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    /// Offer UDP fragmentation offload both ways.
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    /// Offer checksum offload both ways.
    #[serde(default = "default_true")]
    pub offload_csum: bool,
    /// Allow handing this card's TAP descriptors to the destination of a local migration.
    #[serde(default = "default_true")]
    pub backend_transfer: bool,
    /// Cloud Hypervisor's PCI segment; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
    /// Cloud Hypervisor's IOMMU switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    /// Cloud Hypervisor's PCI slot; only none (baton places devices itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Cloud Hypervisor's vhost-user switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<bool>,
    /// Cloud Hypervisor's vhost-user socket; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Cloud Hypervisor's vhost-user mode; only `Client` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_mode: Option<VhostMode>,
    /// Descriptor numbers as the client knows them: ignored, as descriptors only ever
    /// arrive with SCM_RIGHTS.
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
    /// Cloud Hypervisor's rate limiter; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            id: None,
            tap: None,
            mac: None,
            host_mac: None,
            ip: None,
            mask: None,
            mtu: None,
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
            backend_transfer: true,
            pci_segment: None,
            iommu: None,
            pci_device_id: None,
            vhost_user: None,
            vhost_socket: None,
            vhost_mode: None,
            fds: None,
            rate_limiter_config: None,
        }
    }
}

fn parse_mac(v: &str) -> Result<MacAddr, String> {
    MacAddr::parse(v)
}

fn parse_ipv4(v: &str) -> Result<Ipv4Addr, String> {
    v.parse()
        .map_err(|_| "expected an IPv4 address".to_string())
}

fn check_id(id: &str) -> Result<(), DeviceError> {
    let ok = (1..=32).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Id(id.into()))
    }
}

impl NetConfig {
    /// Help text for `--net`.
    pub const SYNTAX: &'static str = "Network card (repeatable): \"id=<name>,tap=<if>,\
        mac=<mac>,host_mac=<mac>,ip=<ipv4>,mask=<ipv4>,mtu=<n>,num_queues=<n>,queue_size=<n>,\
        offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off,backend_transfer=on|off,\
        fd=[<fd>,...]\" (tap: opened, or created if missing; num_queues counts RX+TX queues, \
        default 2; ip/mask/host_mac/mtu are set on a TAP baton creates; fd: open TAP queues \
        inherited from the caller instead of tap=, one per queue pair)";

    /// Parses a `--net` option string.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let keys = [
            "id",
            "tap",
            "mac",
            "host_mac",
            "ip",
            "mask",
            "mtu",
            "num_queues",
            "queue_size",
            "offload_tso",
            "offload_ufo",
            "offload_csum",
            "backend_transfer",
            "fd",
        ];
        let p = OptionParser::parse(s, &keys, None)?;
        let d = NetConfig::default();
        Ok(NetConfig {
            id: p.get("id").map(str::to_string),
            tap: p.get("tap").map(str::to_string),
            mac: p.convert("mac", parse_mac)?,
            host_mac: p.convert("host_mac", parse_mac)?,
            ip: p.convert("ip", parse_ipv4)?,
            mask: p.convert("mask", parse_ipv4)?,
            mtu: p.convert("mtu", parse_int::<u16>)?,
            num_queues: p
                .convert("num_queues", parse_int::<usize>)?
                .unwrap_or(d.num_queues),
            queue_size: p
                .convert("queue_size", parse_int::<u16>)?
                .unwrap_or(d.queue_size),
            offload_tso: p.convert("offload_tso", parse_toggle)?.unwrap_or(true),
            offload_ufo: p.convert("offload_ufo", parse_toggle)?.unwrap_or(true),
            offload_csum: p.convert("offload_csum", parse_toggle)?.unwrap_or(true),
            backend_transfer: p.convert("backend_transfer", parse_toggle)?.unwrap_or(true),
            fds: p.convert("fd", parse_fds)?,
            ..Default::default()
        })
    }

    /// Checks the section on its own.
    pub fn validate(&self) -> Result<(), DeviceError> {
        if let Some(id) = &self.id {
            check_id(id)?;
        }
        if let Some(tap) = &self.tap {
            let bad = tap.is_empty()
                || tap.len() > MAX_TAP_NAME
                || tap
                    .chars()
                    .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
            if bad {
                return Err(DeviceError::TapName(tap.clone()));
            }
        }
        if self.num_queues < 2 || self.num_queues % 2 != 0 || self.num_queues > 2 * MAX_QUEUE_PAIRS
        {
            return Err(DeviceError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(DeviceError::QueueSize(self.queue_size));
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return Err(DeviceError::Mtu(mtu));
            }
        }
        if (self.offload_tso || self.offload_ufo) && !self.offload_csum {
            return Err(DeviceError::OffloadNeedsCsum);
        }
        for mac in [self.mac, self.host_mac].into_iter().flatten() {
            if !mac.is_unicast() {
                return Err(DeviceError::MacNotUnicast(mac));
            }
        }
        Ok(())
    }

    /// Queue pairs.
    pub fn queue_pairs(&self) -> usize {
        self.num_queues / 2
    }
}

impl NetConfig {
    /// Checks Cloud Hypervisor's fields of the card at `at` (`net[0]`).
    pub fn check_at(&self, at: &str) -> Result<(), Unsupported> {
        pci_fields(at, &self.pci_segment, &self.iommu, &self.pci_device_id)?;
        let vhost = "baton's virtio-net runs in the VMM on a TAP; it has no vhost-user backend";
        only(
            &format!("{at}.vhost_user"),
            &self.vhost_user,
            &[false],
            vhost,
        )?;
        only(
            &format!("{at}.vhost_socket"),
            &self.vhost_socket,
            &[],
            vhost,
        )?;
        only(
            &format!("{at}.vhost_mode"),
            &self.vhost_mode,
            &[VhostMode::Client],
            vhost,
        )?;
        absent(
            &format!("{at}.rate_limiter_config"),
            &self.rate_limiter_config,
            "baton has no rate limiters",
        )
    }
}

impl Supported for NetConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        self.check_at("net")
    }
}

/// A virtio-blk disk on a raw image file (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Device name; `disk0`, `disk1` ... when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The raw image.
    pub path: PathBuf,
    /// Refuse guest writes (the file is opened read-only).
    #[serde(default)]
    pub readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[serde(default)]
    pub direct: bool,
    /// Allow handing this disk's open image to the destination of a local migration.
    #[serde(default = "default_true")]
    pub backend_transfer: bool,
    /// Cloud Hypervisor's PCI segment; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
    /// Cloud Hypervisor's IOMMU switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    /// Cloud Hypervisor's PCI slot; only none (baton places devices itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Cloud Hypervisor's queue count; only 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<usize>,
    /// Cloud Hypervisor's queue size; 128 (its default) or 256 (baton's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    /// Cloud Hypervisor's vhost-user switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<bool>,
    /// Cloud Hypervisor's vhost-user socket; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Cloud Hypervisor's rate limit group; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    /// Cloud Hypervisor's rate limiter; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    /// Cloud Hypervisor's io_uring switch; either value (baton uses plain reads and writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_io_uring: Option<bool>,
    /// Cloud Hypervisor's AIO switch; either value (baton uses plain reads and writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_aio: Option<bool>,
    /// Cloud Hypervisor's disk serial; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Cloud Hypervisor's per-queue CPU affinity; only none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<serde_json::Value>,
    /// Cloud Hypervisor's backing files switch; only `false` (raw images have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_files: Option<bool>,
    /// Cloud Hypervisor's sparse switch; only `true` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<bool>,
    /// Cloud Hypervisor's image format; `Raw` or `Unknown` (its default): baton reads raw
    /// images only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_type: Option<ImageType>,
    /// Cloud Hypervisor's lock granularity; only `ByteRange` (its default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_granularity: Option<LockGranularity>,
}

/// An empty path with every other field as a body that leaves it out gets it.
impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            id: None,
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            backend_transfer: true,
            pci_segment: None,
            iommu: None,
            pci_device_id: None,
            num_queues: None,
            queue_size: None,
            vhost_user: None,
            vhost_socket: None,
            rate_limit_group: None,
            rate_limiter_config: None,
            disable_io_uring: None,
            disable_aio: None,
            serial: None,
            queue_affinity: None,
            backing_files: None,
            sparse: None,
            image_type: None,
            lock_granularity: None,
        }
    }
}

impl DiskConfig {
    /// Help text for `--disk`.
    pub const SYNTAX: &'static str = "Disk (repeatable): \"path=<raw image>,readonly=on|off,\
        direct=on|off,id=<name>,backend_transfer=on|off\" (direct=on opens the image with \
        O_DIRECT; backend_transfer=off keeps the image from being handed to a local \
        migration's destination, which then opens it by path)";

    /// Parses a `--disk` option string.
    pub fn from_option_string(s: &str) -> Result<Self, OptionError> {
        let p = OptionParser::parse(
            s,
            &["path", "readonly", "direct", "id", "backend_transfer"],
            None,
        )?;
        let path = p.get("path").ok_or_else(|| OptionError::InvalidValue {
            key: "path".into(),
            value: String::new(),
            reason: "a disk needs path=<image>".into(),
        })?;
        Ok(DiskConfig {
            id: p.get("id").map(str::to_string),
            path: path.into(),
            readonly: p.convert("readonly", parse_toggle)?.unwrap_or(false),
            direct: p.convert("direct", parse_toggle)?.unwrap_or(false),
            backend_transfer: p.convert("backend_transfer", parse_toggle)?.unwrap_or(true),
            ..Default::default()
        })
    }

    /// Checks the section on its own.
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.path.as_os_str().is_empty() {
            return Err(DeviceError::EmptyPath);
        }
        match &self.id {
            Some(id) => check_id(id),
            None => Ok(()),
        }
    }
}

impl DiskConfig {
    /// Checks Cloud Hypervisor's fields of the disk at `at` (`disks[0]`).
    pub fn check_at(&self, at: &str) -> Result<(), Unsupported> {
        pci_fields(at, &self.pci_segment, &self.iommu, &self.pci_device_id)?;
        let field = |name: &str| format!("{at}.{name}");
        only(
            &field("num_queues"),
            &self.num_queues,
            &[1],
            "baton's virtio-blk has one queue",
        )?;
        only(
            &field("queue_size"),
            &self.queue_size,
            &[128, 256],
            "baton's virtio-blk offers a 256-entry queue",
        )?;
        let vhost = "baton's virtio-blk runs in the VMM; it has no vhost-user backend";
        only(&field("vhost_user"), &self.vhost_user, &[false], vhost)?;
        only(&field("vhost_socket"), &self.vhost_socket, &[], vhost)?;
        let no_limits = "baton has no rate limiters";
        only(
            &field("rate_limit_group"),
            &self.rate_limit_group,
            &[],
            no_limits,
        )?;
        absent(
            &field("rate_limiter_config"),
            &self.rate_limiter_config,
            no_limits,
        )?;
        only(
            &field("serial"),
            &self.serial,
            &[],
            "baton's virtio-blk reports no serial",
        )?;
        absent(
            &field("queue_affinity"),
            &self.queue_affinity,
            "baton does not pin queue threads",
        )?;
        let raw = "baton reads raw images only";
        only(&field("backing_files"), &self.backing_files, &[false], raw)?;
        only(
            &field("sparse"),
            &self.sparse,
            &[true],
            "baton leaves the image's allocation as it is",
        )?;
        only(
            &field("image_type"),
            &self.image_type,
            &[ImageType::Raw, ImageType::Unknown],
            raw,
        )?;
        only(
            &field("lock_granularity"),
            &self.lock_granularity,
            &[LockGranularity::ByteRange],
            "baton takes no image locks",
        )
    }
}

impl Supported for DiskConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        self.check_at("disk")
    }
}

/// The virtio entropy device (`--rng`), fed from the host's getrandom.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Device name; `rng0` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Cloud Hypervisor's entropy source; `/dev/urandom` (its default) or `/dev/random`:
    /// baton uses getrandom, which draws from the same pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<PathBuf>,
    /// Cloud Hypervisor's PCI segment; only 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segment: Option<u16>,
    /// Cloud Hypervisor's IOMMU switch; only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
    /// Cloud Hypervisor's PCI slot; only none (baton places devices itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}

impl Supported for RngConfig {
    fn check_supported(&self) -> Result<(), Unsupported> {
        only(
            "rng.src",
            &self.src,
            &[PathBuf::from("/dev/urandom"), PathBuf::from("/dev/random")],
            "baton's entropy comes from the kernel's getrandom",
        )?;
        pci_fields("rng", &self.pci_segment, &self.iommu, &self.pci_device_id)
    }
}

impl RngConfig {
    /// Help text for `--rng`.
    pub const SYNTAX: &'static str =
        "Entropy device fed from the host's getrandom: \"on|off\" or \"id=<name>\" (default off)";

    /// Parses `on`, `off` or `id=NAME`; `None` for off.
    pub fn from_option_string(s: &str) -> Result<Option<Self>, OptionError> {
        match s {
            "on" => return Ok(Some(RngConfig::default())),
            "off" => return Ok(None),
            _ => {}
        }
        let p = OptionParser::parse(s, &["id"], None)?;
        Ok(Some(RngConfig {
            id: p.get("id").map(str::to_string),
            ..Default::default()
        }))
    }
}

/// Gives every device without an id one (`net0`, `disk0`, `rng0` ...) and checks that ids
/// are unique across all devices.
pub fn assign_ids(
    nets: &mut [NetConfig],
    disks: &mut [DiskConfig],
    rng: Option<&mut RngConfig>,
) -> Result<(), DeviceError> {
    let mut taken: Vec<String> = nets
        .iter()
        .filter_map(|n| n.id.clone())
        .chain(disks.iter().filter_map(|d| d.id.clone()))
        .chain(rng.as_ref().and_then(|r| r.id.clone()))
        .collect();
    let mut sorted = taken.clone();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(DeviceError::DuplicateId(w[0].clone()));
    }
    let fresh = |prefix: &str, taken: &mut Vec<String>| {
        let id = (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|c| !taken.contains(c))
            .expect("an unused name exists");
        taken.push(id.clone());
        id
    };
    for n in nets.iter_mut().filter(|n| n.id.is_none()) {
        n.id = Some(fresh("net", &mut taken));
    }
    for d in disks.iter_mut().filter(|d| d.id.is_none()) {
        d.id = Some(fresh("disk", &mut taken));
    }
    if let Some(r) = rng {
        if r.id.is_none() {
            r.id = Some(fresh("rng", &mut taken));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_string() {
        let n = NetConfig::from_option_string(
            "tap=tap0,mac=52:54:00:12:34:56,num_queues=8,queue_size=512,mtu=9000,\
             offload_tso=off,backend_transfer=off",
        )
        .unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(n.queue_pairs(), 4);
        assert_eq!(n.queue_size, 512);
        assert_eq!(n.mtu, Some(9000));
        assert!(!n.offload_tso && n.offload_csum && !n.backend_transfer);
        n.validate().unwrap();
        assert!(NetConfig::from_option_string("mac=52:54:00:12:34").is_err());
        assert!(NetConfig::from_option_string("mac=52:54:00:12:34:zz").is_err());
        assert!(NetConfig::from_option_string("tapp=x").is_err());
        assert!(NetConfig::from_option_string("ip=10.0.0.300").is_err());
    }

    #[test]
    fn net_validation() {
        let ok = NetConfig::default();
        ok.validate().unwrap();
        let cases = [
            (
                NetConfig {
                    tap: Some("a-very-long-tap-name".into()),
                    ..ok.clone()
                },
                DeviceError::TapName("a-very-long-tap-name".into()),
            ),
            (
                NetConfig {
                    num_queues: 3,
                    ..ok.clone()
                },
                DeviceError::NumQueues(3),
            ),
            (
                NetConfig {
                    num_queues: 0,
                    ..ok.clone()
                },
                DeviceError::NumQueues(0),
            ),
            (
                NetConfig {
                    queue_size: 300,
                    ..ok.clone()
                },
                DeviceError::QueueSize(300),
            ),
            (
                NetConfig {
                    offload_csum: false,
                    ..ok.clone()
                },
                DeviceError::OffloadNeedsCsum,
            ),
            (
                NetConfig {
                    mac: Some(MacAddr([1, 0, 0, 0, 0, 1])),
                    ..ok.clone()
                },
                DeviceError::MacNotUnicast(MacAddr([1, 0, 0, 0, 0, 1])),
            ),
        ];
        for (config, want) in cases {
            assert_eq!(config.validate(), Err(want));
        }
    }

    #[test]
    fn mac_round_trips_and_random_is_local_unicast() {
        let m = MacAddr::parse("52:54:00:ab:cd:ef").unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        let r = MacAddr::random();
        assert!(r.is_unicast());
        assert_eq!(r.0[0] & 2, 2);
        // Exactly two hex digits per byte: from_str_radix alone would take a sign.
        for bad in [
            "+2:54:00:ab:cd:ef",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:254:00:ab:cd:ef",
        ] {
            assert!(MacAddr::parse(bad).is_err(), "{bad}");
        }
        let empty = DiskConfig::default();
        assert!(matches!(empty.validate(), Err(DeviceError::EmptyPath)));
    }

    #[test]
    fn disk_and_rng_option_strings() {
        let d = DiskConfig::from_option_string("path=/tmp/d.raw,readonly=on").unwrap();
        assert!(d.readonly && !d.direct && d.backend_transfer);
        assert!(DiskConfig::from_option_string("readonly=on").is_err());
        let d = DiskConfig::from_option_string("path=/d,backend_transfer=off").unwrap();
        assert!(!d.backend_transfer);
        // A body without the field gets what Default and the option string give.
        let j: DiskConfig = serde_json::from_str(r#"{"path":"/d"}"#).unwrap();
        assert_eq!(
            j,
            DiskConfig {
                path: "/d".into(),
                ..Default::default()
            }
        );
        assert!(j.backend_transfer);
        assert_eq!(RngConfig::from_option_string("off").unwrap(), None);
        assert_eq!(
            RngConfig::from_option_string("on").unwrap(),
            Some(RngConfig::default())
        );
        assert!(RngConfig::from_option_string("src=/dev/random").is_err());
    }

    #[test]
    fn ids_are_assigned_and_unique() {
        let mut nets = vec![
            NetConfig::default(),
            NetConfig {
                id: Some("net0".into()),
                ..Default::default()
            },
        ];
        let mut disks = vec![DiskConfig {
            path: "/d".into(),
            ..Default::default()
        }];
        let mut rng = RngConfig::default();
        assign_ids(&mut nets, &mut disks, Some(&mut rng)).unwrap();
        assert_eq!(nets[0].id.as_deref(), Some("net1"));
        assert_eq!(disks[0].id.as_deref(), Some("disk0"));
        assert_eq!(rng.id.as_deref(), Some("rng0"));
        disks[0].id = Some("net0".into());
        assert_eq!(
            assign_ids(&mut nets, &mut disks, None),
            Err(DeviceError::DuplicateId("net0".into()))
        );
    }
}
