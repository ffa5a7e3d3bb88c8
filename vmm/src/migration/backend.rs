//! Backend transfer: the one place that knows which backends a migration can hand over, and
//! how.
//!
//! Three kinds go: a network card's TAP ([`TAP_KIND`]), as its queues' descriptors and the
//! TAP's state; a disk's image ([`DISK_KIND`]), as its open descriptor and what it was
//! opened as; and a socket serial console ([`CONSOLE_KIND`], as device [`CONSOLE_ID`]), as
//! its listening socket and its client with the backlog and pending input. The source offers every device whose `backend_transfer` flag is on
//! ([`transferable`], [`proposal`]); a destination asked with `backend_transfer` takes the
//! kinds it knows ([`accept`]) if they fit its configuration ([`check_accepted`]); while the
//! guest is paused the source sends each accepted device's backend ([`hand_over`]) and the
//! destination installs it on the waiting device ([`take_over`]). The source keeps its own
//! descriptors open until the destination answers Complete, so any failure before resumes
//! it on them. A destination that does not know a kind leaves that device to the ordinary
//! path (a TAP or image opened by name), which is how an older baton answers.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ::migration::protocol::{FdsHeader, ProposedBackend, Start};
use api::request::{BackendTransferSupport, TransferableDevice};
use api::VmConfig;
use net_util::{TapQueues, TapState};
use serde::{Deserialize, Serialize};

use crate::console::{ConsoleHandOver, ConsoleHandle};
use crate::device_manager::Backends;

/// The backend kind a network card's TAP hands over as.
pub const TAP_KIND: &str = "virtio-net-tap";

/// The backend kind a disk's image hands over as.
pub const DISK_KIND: &str = "virtio-blk-file";

/// The backend kind a socket serial console hands over as.
pub const CONSOLE_KIND: &str = "serial-socket";

/// The device id the serial console is offered as.
pub const CONSOLE_ID: &str = "serial";

/// Every kind this baton hands over and takes over.
pub const KINDS: [&str; 3] = [TAP_KIND, DISK_KIND, CONSOLE_KIND];

/// Most input bytes a console hand-over may carry (the console reads 4 KiB ahead at most).
const MAX_CONSOLE_INPUT: usize = 64 << 10;

/// Errors handing a backend over or taking it over.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TAP's state cannot be read for the hand-over.
    #[error("Cannot read the TAP state of network card '{0}'")]
    TapState(String, #[source] net_util::tap::Error),
    /// A disk's image cannot be described for the hand-over.
    #[error("Cannot read the image of disk '{0}'")]
    DiskState(String, #[source] std::io::Error),
    /// The source offers a device the configuration does not have.
    #[error("No network card or disk '{0}' for its backend")]
    NoDevice(String),
    /// The source offers a card with another number of queues than configured.
    #[error(
        "Network card '{id}' has {pairs} queue pair(s), but {offered} TAP queue(s) are offered"
    )]
    Offered {
        /// The card.
        id: String,
        /// Queue pairs configured.
        pairs: usize,
        /// Queues offered.
        offered: u32,
    },
    /// The source offers a disk with other than one descriptor.
    #[error("Disk '{id}' takes one image descriptor, but {offered} are offered")]
    OfferedDisk {
        /// The disk.
        id: String,
        /// Descriptors offered.
        offered: u32,
    },
    /// The state that came with the descriptors does not parse.
    #[error("The backend state of '{0}' does not parse")]
    BadState(String, #[source] serde_json::Error),
    /// Backend descriptors came for a device that does not wait for them.
    #[error("Device '{0}' does not wait for a transferred backend")]
    NotWaiting(String),
    /// A transferred backend has another number of queues than the card.
    #[error("Network card '{id}' has {configured} queue pair(s), but its transferred backend has {sent} queue(s)")]
    QueueCount {
        /// The card.
        id: String,
        /// Queues the source sent.
        sent: usize,
        /// Queue pairs configured.
        configured: usize,
    },
    /// The descriptors are not the TAP queues the state describes.
    #[error("Network card '{0}': the transferred descriptors")]
    Tap(String, #[source] net_util::tap::Error),
    /// The descriptor is not an image the disk can run on.
    #[error("Disk '{id}': the transferred descriptor {why}")]
    Disk {
        /// The disk.
        id: String,
        /// What does not fit.
        why: String,
    },
    /// The serial console cannot be held for the hand-over.
    #[error("Cannot hand the serial console over")]
    ConsoleHold(#[source] std::io::Error),
    /// The serial console that came does not fit.
    #[error("The serial console handed over {0}")]
    Console(String),
}

/// What a device hands over.
#[derive(Clone)]
pub enum Backend {
    /// A network card's TAP queues, one per queue pair.
    Tap(Arc<TapQueues>),
    /// A disk's open image (a duplicate of the disk's descriptor).
    Disk(Arc<File>, DiskHandOver),
    /// A socket serial console.
    Console(ConsoleHandle),
}

/// A backend this VM can hand over.
#[derive(Clone)]
pub struct Transferable {
    /// The device's id.
    pub id: String,
    /// What it hands over.
    pub backend: Backend,
}

impl Transferable {
    /// The kind Start proposes it as.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Tap(_) => TAP_KIND,
            Backend::Disk(..) => DISK_KIND,
            Backend::Console(_) => CONSOLE_KIND,
        }
    }

    /// How many descriptors go: a console's listening socket and its client (the listening
    /// socket again when no client is connected, as the count is fixed when offered).
    pub fn fds(&self) -> u32 {
        match &self.backend {
            Backend::Tap(taps) => taps.len() as u32,
            Backend::Disk(..) => 1,
            Backend::Console(_) => 2,
        }
    }

    /// The migration succeeded: a console stops serving here without touching what it
    /// handed over.
    pub fn handed_over(&self) {
        if let Backend::Console(h) = &self.backend {
            h.handed_over();
        }
    }

    /// The VM resumes here: a console held for the hand-over serves again.
    pub fn resumed(&self) {
        if let Backend::Console(h) = &self.backend {
            h.release();
        }
    }
}

/// What a console's hand-over carries besides its descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// The second descriptor is a connected client (not the listening socket again).
    pub client: bool,
    /// The last output, for the next client.
    pub backlog: Vec<u8>,
    /// Input the guest has not taken yet.
    pub input: Vec<u8>,
}

/// What a disk's image hands over with: how it was opened, which the destination's
/// configuration must match, and its size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskHandOver {
    /// The image's path on the source (for the log: the descriptor is what counts).
    pub path: std::path::PathBuf,
    /// Opened read-only.
    pub readonly: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Its size in bytes.
    pub size: u64,
}

/// The backends a migration with backend transfer offers: the network cards and disks of
/// `backends` whose `backend_transfer` flag is on, and `console` if it is a socket console
/// with the flag on, serving its socket.
pub fn transferable(
    backends: &Backends,
    console: Option<(&api::ConsoleConfig, &crate::console::Console)>,
) -> Vec<Transferable> {
    let console = console
        .filter(|(config, _)| config.hands_over() && !backends.has_device(CONSOLE_ID))
        .and_then(|(_, console)| console.handle())
        .filter(ConsoleHandle::is_bound)
        .map(|h| Transferable {
            id: CONSOLE_ID.into(),
            backend: Backend::Console(h),
        });
    let nets = backends
        .nets()
        .filter(|(config, _)| config.backend_transfer)
        .filter_map(|(config, taps)| {
            Some(Transferable {
                id: config.id.clone()?,
                backend: Backend::Tap(taps?.clone()),
            })
        });
    let disks = backends
        .disks()
        .filter(|(config, _)| config.backend_transfer)
        .filter_map(|(config, file)| {
            let id = config.id.clone()?;
            let file = file?;
            let dup_and_size = file
                .try_clone()
                .and_then(|dup| Ok((dup.metadata()?.len(), dup)));
            match dup_and_size {
                Ok((size, dup)) => Some(Transferable {
                    id,
                    backend: Backend::Disk(
                        Arc::new(dup),
                        DiskHandOver {
                            path: config.path.clone(),
                            readonly: config.readonly,
                            direct: config.direct,
                            size,
                        },
                    ),
                }),
                Err(e) => {
                    // Not offered: the destination opens it by path as before.
                    log::warn!("{}", Error::DiskState(id, e));
                    None
                }
            }
        });
    nets.chain(disks).chain(console).collect()
}

/// What `vmm.backend-transfer-support` answers for `backends` and `console`.
pub fn support(
    backends: &Backends,
    console: Option<(&api::ConsoleConfig, &crate::console::Console)>,
) -> BackendTransferSupport {
    BackendTransferSupport {
        kinds: KINDS.iter().map(|k| k.to_string()).collect(),
        devices: transferable(backends, console)
            .into_iter()
            .map(|t| TransferableDevice {
                fds: t.fds(),
                kind: t.kind().to_string(),
                id: t.id,
            })
            .collect(),
    }
}

/// The devices Start proposes for `offered`.
pub fn proposal(offered: &[Transferable]) -> Vec<ProposedBackend> {
    offered
        .iter()
        .map(|t| ProposedBackend {
            id: t.id.clone(),
            kind: t.kind().into(),
            fds: t.fds(),
        })
        .collect()
}

/// The devices of `start`'s proposal a destination takes over, with their descriptor
/// counts: none unless both the destination (`enabled`) and the source asked for backend
/// transfer, and only kinds this baton knows. The others take the ordinary path (their TAP
/// or image opened by name, or a TAP from `net_fds`); if that cannot work, Config fails,
/// before the source pauses.
pub fn accept(start: &Start, enabled: bool) -> Vec<(String, u32)> {
    if !(enabled && start.backend_transfer) {
        return Vec::new();
    }
    start
        .devices
        .iter()
        .filter(|d| KINDS.contains(&d.kind.as_str()))
        .map(|d| (d.id.clone(), d.fds))
        .collect()
}

/// Checks that every accepted device is a network card of `config` with as many queue pairs
/// as descriptors are offered, a disk of `config` offered one descriptor, or the serial
/// console, a socket console here, offered two.
pub fn check_accepted(config: &VmConfig, accepted: &[(String, u32)]) -> Result<(), Error> {
    for (id, fds) in accepted {
        if id == CONSOLE_ID
            && !config.net.iter().any(|n| n.id.as_deref() == Some(id))
            && !config.disks.iter().any(|d| d.id.as_deref() == Some(id))
        {
            if config.serial.mode != api::ConsoleMode::Socket || *fds != 2 {
                return Err(Error::Console(format!(
                    "with {fds} descriptor(s) does not fit the serial port here ({:?})",
                    config.serial.mode
                )));
            }
            continue;
        }
        let net = config.net.iter().find(|n| n.id.as_deref() == Some(id));
        let disk = config.disks.iter().find(|d| d.id.as_deref() == Some(id));
        match (net, disk) {
            (Some(n), _) if n.queue_pairs() != *fds as usize => {
                return Err(Error::Offered {
                    id: id.clone(),
                    pairs: n.queue_pairs(),
                    offered: *fds,
                })
            }
            (Some(_), _) => {}
            (None, Some(_)) if *fds != 1 => {
                return Err(Error::OfferedDisk {
                    id: id.clone(),
                    offered: *fds,
                })
            }
            (None, Some(_)) => {}
            (None, None) => return Err(Error::NoDevice(id.clone())),
        }
    }
    Ok(())
}

/// The descriptors of an Fds message: the device's own, or duplicates made for it.
pub enum HandedFds<'a> {
    /// The device's descriptors, which stay open here.
    Borrowed(Vec<BorrowedFd<'a>>),
    /// Duplicates, closed here once sent.
    Owned(Vec<OwnedFd>),
}

impl HandedFds<'_> {
    /// The descriptors to send.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            HandedFds::Borrowed(fds) => fds.clone(),
            HandedFds::Owned(fds) => fds.iter().map(|f| f.as_fd()).collect(),
        }
    }
}

/// The Fds message handing `t` over, while the guest is paused: its header (the backend's
/// state) and its descriptors. A console is held from here on: [`Transferable::resumed`]
/// or [`Transferable::handed_over`] ends that.
pub fn hand_over(t: &Transferable) -> Result<(FdsHeader, HandedFds<'_>), Error> {
    let (state, fds) = match &t.backend {
        Backend::Tap(taps) => {
            let tap = taps.state().map_err(|e| Error::TapState(t.id.clone(), e))?;
            let state = serde_json::to_value(&tap).expect("TAP state serialises");
            (state, HandedFds::Borrowed(taps.fds()))
        }
        Backend::Disk(file, disk) => {
            let state = serde_json::to_value(disk).expect("disk state serialises");
            (state, HandedFds::Borrowed(vec![file.as_fd()]))
        }
        Backend::Console(handle) => {
            let held = handle.hold().map_err(Error::ConsoleHold)?;
            let state = ConsoleState {
                client: held.client.is_some(),
                backlog: held.backlog,
                input: held.input,
            };
            let second = match held.client {
                Some(client) => client,
                None => held.listener.try_clone().map_err(Error::ConsoleHold)?,
            };
            let state = serde_json::to_value(&state).expect("console state serialises");
            (state, HandedFds::Owned(vec![held.listener, second]))
        }
    };
    let header = FdsHeader {
        id: t.id.clone(),
        count: t.fds(),
        state,
    };
    Ok((header, fds))
}

/// The console `header` and `fds` hand over, checked: a listening UNIX socket, a client
/// (if the state says one is connected) and a bounded backlog and input.
pub fn console_hand_over(header: FdsHeader, fds: Vec<OwnedFd>) -> Result<ConsoleHandOver, Error> {
    let state: ConsoleState =
        serde_json::from_value(header.state).map_err(|e| Error::BadState(header.id.clone(), e))?;
    let count = fds.len();
    let [listener, second] = <[OwnedFd; 2]>::try_from(fds)
        .map_err(|_| Error::Console(format!("comes with {count} descriptor(s), not 2")))?;
    if !fd_passing::is_unix_socket(listener.as_fd()) || !fd_passing::is_unix_socket(second.as_fd())
    {
        return Err(Error::Console("is not a UNIX socket".into()));
    }
    if state.backlog.len() > crate::console::BACKLOG || state.input.len() > MAX_CONSOLE_INPUT {
        return Err(Error::Console(format!(
            "carries {} bytes of output and {} of input, more than a console keeps",
            state.backlog.len(),
            state.input.len()
        )));
    }
    Ok(ConsoleHandOver {
        listener,
        client: state.client.then_some(second),
        backlog: state.backlog,
        input: state.input,
    })
}

/// A backend installed by [`take_over`], for the log.
#[derive(Debug)]
pub enum TakenOver {
    /// A network card's TAP.
    Tap(TapState),
    /// A disk's image.
    Disk(DiskHandOver),
}

impl std::fmt::Display for TakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakenOver::Tap(t) => write!(f, "TAP '{}' with {} queue(s)", t.name, t.queues),
            TakenOver::Disk(d) => write!(f, "image {} ({} bytes)", d.path.display(), d.size),
        }
    }
}

/// Installs the backend `header` and `fds` describe on the network card or disk of
/// `backends` that waits for it. The descriptors are checked and taken as they are: nothing
/// is set on them. On error they are closed, and the device still waits.
pub fn take_over(
    backends: &mut Backends,
    header: FdsHeader,
    fds: Vec<OwnedFd>,
) -> Result<TakenOver, Error> {
    let id = header.id;
    if backends.waiting_disk(&id).is_some() {
        let disk: DiskHandOver =
            serde_json::from_value(header.state).map_err(|e| Error::BadState(id.clone(), e))?;
        let waiting = backends.waiting_disk(&id).expect("looked up above");
        let file = check_image(&id, waiting.config(), &disk, fds)?;
        waiting.install_transferred(file);
        return Ok(TakenOver::Disk(disk));
    }
    let pairs = backends
        .waiting_net(&id)
        .ok_or_else(|| Error::NotWaiting(id.clone()))?
        .queue_pairs();
    let state: TapState =
        serde_json::from_value(header.state).map_err(|e| Error::BadState(id.clone(), e))?;
    if state.queues != pairs {
        return Err(Error::QueueCount {
            id,
            sent: state.queues,
            configured: pairs,
        });
    }
    let taps = TapQueues::from_transferred(fds, &state).map_err(|e| Error::Tap(id.clone(), e))?;
    backends
        .waiting_net(&id)
        .expect("looked up above")
        .install_transferred(taps);
    Ok(TakenOver::Tap(state))
}

/// The one descriptor of `fds` as disk `id`'s image, if it is a file or block device opened
/// the way `config` opens it (writable unless read-only, O_DIRECT when direct) and of the
/// size `sent` says.
fn check_image(
    id: &str,
    config: &api::DiskConfig,
    sent: &DiskHandOver,
    fds: Vec<OwnedFd>,
) -> Result<File, Error> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |why: String| Error::Disk {
        id: id.to_string(),
        why,
    };
    let count = fds.len();
    let [fd] =
        <[OwnedFd; 1]>::try_from(fds).map_err(|_| refuse(format!("count is {count}, not 1")))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("cannot be examined: {e}")))?;
    if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
        return Err(refuse("is not a file or block device".into()));
    }
    // SAFETY: F_GETFL on a descriptor we own reads its status flags and changes nothing.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
    if flags < 0 {
        return Err(refuse(format!(
            "has no status flags: {}",
            std::io::Error::last_os_error()
        )));
    }
    let writable = flags & libc::O_ACCMODE == libc::O_RDWR;
    if !config.readonly && !writable {
        return Err(refuse("is read-only, but the disk is not".into()));
    }
    if config.direct != (flags & libc::O_DIRECT != 0) {
        return Err(refuse(format!(
            "was opened {} O_DIRECT, but the disk has direct={}",
            if flags & libc::O_DIRECT != 0 {
                "with"
            } else {
                "without"
            },
            config.direct
        )));
    }
    if (sent.readonly, sent.direct) != (config.readonly, config.direct) {
        return Err(refuse(format!(
            "comes as readonly={} direct={}, but the disk has readonly={} direct={}",
            sent.readonly, sent.direct, config.readonly, config.direct
        )));
    }
    if meta.len() != sent.size && meta.file_type().is_file() {
        return Err(refuse(format!(
            "is {} bytes, but the source said {}",
            meta.len(),
            sent.size
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(backend_transfer: bool) -> Start {
        Start {
            version: ::migration::protocol::PROTOCOL_VERSION,
            local: true,
            backend_transfer,
            devices: vec![
                ProposedBackend {
                    id: "net0".into(),
                    kind: TAP_KIND.into(),
                    fds: 2,
                },
                ProposedBackend {
                    id: "disk0".into(),
                    kind: DISK_KIND.into(),
                    fds: 1,
                },
                ProposedBackend {
                    id: "fs0".into(),
                    kind: "virtio-fs-socket".into(),
                    fds: 1,
                },
            ],
            software: None,
            start_notice: false,
        }
    }

    #[test]
    fn accepts_only_known_kinds_and_only_when_both_sides_ask() {
        assert_eq!(
            accept(&start(true), true),
            vec![("net0".to_string(), 2), ("disk0".to_string(), 1)]
        );
        assert!(accept(&start(true), false).is_empty(), "destination off");
        assert!(accept(&start(false), true).is_empty(), "source off");
    }

    fn config(nets: &[(&str, usize)]) -> VmConfig {
        let mut config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k"},
        }))
        .expect("minimal config");
        for (id, pairs) in nets {
            config.net.push(api::NetConfig {
                id: Some(id.to_string()),
                num_queues: 2 * pairs,
                ..Default::default()
            });
        }
        config
    }

    #[test]
    fn an_accepted_card_must_exist_with_as_many_queue_pairs() {
        let c = config(&[("net0", 2)]);
        check_accepted(&c, &[("net0".into(), 2)]).expect("fits");
        check_accepted(&c, &[]).expect("nothing accepted");
        let e = check_accepted(&c, &[("net1".into(), 2)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "No network card or disk 'net1' for its backend"
        );
        let e = check_accepted(&c, &[("net0".into(), 1)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Network card 'net0' has 2 queue pair(s), but 1 TAP queue(s) are offered"
        );
    }

    #[test]
    fn taking_over_refuses_bad_state_and_cards_that_do_not_wait() {
        let mut c = config(&[("net0", 1)]);
        let mut backends = Backends::open_except(&mut c, Vec::new(), &["net0".into()])
            .expect("a waiting card opens nothing");
        let header = |id: &str, state| FdsHeader {
            id: id.into(),
            count: 1,
            state,
        };
        let e = take_over(
            &mut backends,
            header("net0", serde_json::json!({"nonsense": 1})),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadState(..)), "{e}");
        let tap = |queues| TapState {
            name: "t0".into(),
            queues,
            enabled: vec![true; queues],
            vnet_hdr_len: 12,
            offloads: None,
            mtu: None,
            mac: None,
        };
        let state = serde_json::to_value(tap(1)).expect("serialises");
        let e = take_over(&mut backends, header("net1", state.clone()), Vec::new()).unwrap_err();
        assert!(matches!(e, Error::NotWaiting(..)), "{e}");
        let two = serde_json::to_value(tap(2)).expect("serialises");
        let e = take_over(&mut backends, header("net0", two), Vec::new()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::QueueCount {
                    sent: 2,
                    configured: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            backends.waiting_net("net0").is_some(),
            "the card still waits"
        );
    }

    /// A configuration with disk `disk0` on `path`, and a scratch image there.
    fn disk_config(path: &std::path::Path, readonly: bool) -> VmConfig {
        std::fs::write(path, vec![7u8; 4096]).expect("scratch image");
        let mut c = config(&[]);
        c.disks.push(api::DiskConfig {
            id: Some("disk0".into()),
            path: path.into(),
            readonly,
            ..Default::default()
        });
        c
    }

    fn disk_header(size: u64, readonly: bool) -> FdsHeader {
        let sent = DiskHandOver {
            path: "/src/disk.raw".into(),
            readonly,
            direct: false,
            size,
        };
        FdsHeader {
            id: "disk0".into(),
            count: 1,
            state: serde_json::to_value(sent).expect("serialises"),
        }
    }

    #[test]
    fn a_disk_takes_one_descriptor_opened_as_it_would_open_it() {
        let dir = std::env::temp_dir().join(format!("baton-disk-take-over-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let path = dir.join("disk.raw");
        let mut c = disk_config(&path, false);
        check_accepted(&c, &[("disk0".into(), 1)]).expect("one descriptor");
        let e = check_accepted(&c, &[("disk0".into(), 2)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Disk 'disk0' takes one image descriptor, but 2 are offered"
        );
        let mut backends = Backends::open_except(&mut c, Vec::new(), &["disk0".into()])
            .expect("a waiting disk opens nothing");
        let open = |write: bool| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(&path)
                .expect("the image");
            vec![OwnedFd::from(f)]
        };
        // Read-only descriptor for a writable disk, another size, two descriptors.
        let refusals = [
            (open(false), disk_header(4096, false), "is read-only"),
            (open(true), disk_header(8192, false), "is 4096 bytes"),
            (
                open(true),
                disk_header(4096, true),
                "comes as readonly=true",
            ),
            (
                open(true).into_iter().chain(open(true)).collect(),
                disk_header(4096, false),
                "count is 2",
            ),
        ];
        for (fds, header, why) in refusals {
            let e = take_over(&mut backends, header, fds).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
            assert!(backends.waiting_disk("disk0").is_some(), "still waits");
        }
        let taken = take_over(&mut backends, disk_header(4096, false), open(true)).expect("fits");
        assert_eq!(taken.to_string(), "image /src/disk.raw (4096 bytes)");
        assert!(backends.waiting_disk("disk0").is_none(), "installed");
        let e = take_over(&mut backends, disk_header(4096, false), open(true)).unwrap_err();
        assert!(matches!(e, Error::NotWaiting(..)), "{e}");
        let offered = transferable(&backends, None);
        assert_eq!(offered.len(), 1);
        assert_eq!((offered[0].kind(), offered[0].fds()), (DISK_KIND, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_console_comes_as_a_listening_socket_and_a_client_within_bounds() {
        let header = |client: bool, backlog: usize| FdsHeader {
            id: CONSOLE_ID.into(),
            count: 2,
            state: serde_json::to_value(ConsoleState {
                client,
                backlog: vec![b'x'; backlog],
                input: b"ls\n".to_vec(),
            })
            .unwrap(),
        };
        let pair = || {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            vec![OwnedFd::from(a), OwnedFd::from(b)]
        };
        let taken = console_hand_over(header(true, 10), pair()).expect("fits");
        assert!(taken.client.is_some());
        assert_eq!(
            (taken.backlog.len(), taken.input.as_slice()),
            (10, &b"ls\n"[..])
        );
        let without = console_hand_over(header(false, 0), pair()).expect("fits");
        assert!(without.client.is_none(), "the second is the listener again");
        let file = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        for (fds, backlog, why) in [
            (vec![file(), file()], 0, "is not a UNIX socket"),
            (
                pair().into_iter().take(1).collect(),
                0,
                "comes with 1 descriptor(s)",
            ),
            (
                pair(),
                crate::console::BACKLOG + 1,
                "more than a console keeps",
            ),
        ] {
            let e = console_hand_over(header(true, backlog), fds).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }
}
