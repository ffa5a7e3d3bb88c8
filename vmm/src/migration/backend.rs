//! Backend transfer: the one place that knows which backends a migration can hand over, and
//! how.
//!
//! Today one kind goes: a network card's TAP ([`TAP_KIND`]), as its queues' descriptors and
//! the TAP's state. The source offers every card whose `backend_transfer` flag is on
//! ([`transferable`], [`proposal`]); a destination asked with `backend_transfer` takes the
//! kinds it knows ([`accept`]) if they fit its configuration ([`check_accepted`]); while the
//! guest is paused the source sends each accepted card's TAP ([`hand_over`]) and the
//! destination installs it on the waiting card ([`take_over`]). The source keeps its own
//! descriptors open until the destination answers Complete, so any failure before resumes
//! it on them.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use ::migration::protocol::{FdsHeader, ProposedBackend, Start};
use api::request::{BackendTransferSupport, TransferableDevice};
use api::VmConfig;
use net_util::{TapQueues, TapState};

use crate::device_manager::Backends;

/// The backend kind a network card's TAP hands over as.
pub const TAP_KIND: &str = "virtio-net-tap";

/// Errors handing a backend over or taking it over.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TAP's state cannot be read for the hand-over.
    #[error("Cannot read the TAP state of network card '{0}'")]
    TapState(String, #[source] net_util::tap::Error),
    /// The source offers a card the configuration does not have.
    #[error("No network card '{0}' for its backend")]
    NoCard(String),
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
    /// The TAP state that came with the descriptors does not parse.
    #[error("The TAP state of '{0}' does not parse")]
    BadState(String, #[source] serde_json::Error),
    /// Backend descriptors came for a card that does not wait for them.
    #[error("Network card '{0}' does not wait for a transferred backend")]
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
}

/// A backend this VM can hand over: a network card's TAP queues.
#[derive(Clone)]
pub struct Transferable {
    /// The card's id.
    pub id: String,
    /// Its TAP queues, one per queue pair.
    pub taps: Arc<TapQueues>,
}

/// The backends of `backends` a migration with backend transfer offers: the network cards
/// whose `backend_transfer` flag is on.
pub fn transferable(backends: &Backends) -> Vec<Transferable> {
    backends
        .nets()
        .filter(|(config, _)| config.backend_transfer)
        .filter_map(|(config, taps)| {
            Some(Transferable {
                id: config.id.clone()?,
                taps: taps?.clone(),
            })
        })
        .collect()
}

/// What `vmm.backend-transfer-support` answers for `backends`.
pub fn support(backends: &Backends) -> BackendTransferSupport {
    BackendTransferSupport {
        kinds: vec![TAP_KIND.to_string()],
        devices: transferable(backends)
            .into_iter()
            .map(|t| TransferableDevice {
                fds: t.taps.len() as u32,
                id: t.id,
                kind: TAP_KIND.to_string(),
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
            kind: TAP_KIND.into(),
            fds: t.taps.len() as u32,
        })
        .collect()
}

/// The devices of `start`'s proposal a destination takes over, with their descriptor
/// counts: none unless both the destination (`enabled`) and the source asked for backend
/// transfer, and only kinds this baton knows. The others take the ordinary path (their TAP
/// opened by name or from `net_fds`); if that cannot work, Config fails, before the source
/// pauses.
pub fn accept(start: &Start, enabled: bool) -> Vec<(String, u32)> {
    if !(enabled && start.backend_transfer) {
        return Vec::new();
    }
    start
        .devices
        .iter()
        .filter(|d| d.kind == TAP_KIND)
        .map(|d| (d.id.clone(), d.fds))
        .collect()
}

/// Checks that every accepted device is a network card of `config` with as many queue pairs
/// as descriptors are offered.
pub fn check_accepted(config: &VmConfig, accepted: &[(String, u32)]) -> Result<(), Error> {
    for (id, fds) in accepted {
        let net = config.net.iter().find(|n| n.id.as_deref() == Some(id));
        match net {
            None => return Err(Error::NoCard(id.clone())),
            Some(n) if n.queue_pairs() != *fds as usize => {
                return Err(Error::Offered {
                    id: id.clone(),
                    pairs: n.queue_pairs(),
                    offered: *fds,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The Fds message handing `t` over, while the guest is paused: its header (the TAP's
/// state) and its queues' descriptors, which stay open here.
pub fn hand_over(t: &Transferable) -> Result<(FdsHeader, Vec<BorrowedFd<'_>>), Error> {
    let tap = t
        .taps
        .state()
        .map_err(|e| Error::TapState(t.id.clone(), e))?;
    let header = FdsHeader {
        id: t.id.clone(),
        count: t.taps.len() as u32,
        state: serde_json::to_value(&tap).expect("TAP state serialises"),
    };
    Ok((header, t.taps.fds()))
}

/// Installs the backend `header` and `fds` describe on the network card of `backends` that
/// waits for it. The descriptors are checked and taken as they are: nothing is set on them.
/// On error they are closed, and the card still waits.
pub fn take_over(
    backends: &mut Backends,
    header: FdsHeader,
    fds: Vec<OwnedFd>,
) -> Result<TapState, Error> {
    let id = header.id;
    let state: TapState =
        serde_json::from_value(header.state).map_err(|e| Error::BadState(id.clone(), e))?;
    let pairs = backends
        .waiting_net(&id)
        .ok_or_else(|| Error::NotWaiting(id.clone()))?
        .queue_pairs();
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
    Ok(state)
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
                    kind: "virtio-blk-file".into(),
                    fds: 1,
                },
            ],
        }
    }

    #[test]
    fn accepts_only_known_kinds_and_only_when_both_sides_ask() {
        assert_eq!(accept(&start(true), true), vec![("net0".to_string(), 2)]);
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
        assert_eq!(e.to_string(), "No network card 'net1' for its backend");
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
}
