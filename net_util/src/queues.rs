//! One TAP interface's queues as a network card uses them, and the state that travels with
//! their descriptors when a migration hands the backend to another baton.
//!
//! [`TapQueues`] outlives the devices built on it (a reboot builds a new device on the same
//! queues), so it, not the device, remembers which queues are attached and which offloads
//! the TAP was given: that is what the kernel holds, and what a new device must not redo.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::tap::{Error, Offloads, Tap, VNET_HDR_LEN};

/// A TAP backend's settings, as the source sends them next to its descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapState {
    /// The interface name.
    pub name: String,
    /// Queues (one per queue pair), as many as the descriptors that follow.
    pub queues: usize,
    /// Whether each queue is attached (receives frames), in queue order.
    pub enabled: Vec<bool>,
    /// Bytes of vnet header on each frame.
    pub vnet_hdr_len: u32,
    /// The TUNSETOFFLOAD flags last set, if any were.
    pub offloads: Option<u32>,
    /// The interface MTU, when it could be read here.
    pub mtu: Option<u16>,
    /// The interface's MAC address, when it could be read here.
    pub mac: Option<[u8; 6]>,
}

/// The queues of one TAP, one per queue pair, with what the kernel was told about them.
#[derive(Debug)]
pub struct TapQueues {
    taps: Vec<Arc<Tap>>,
    /// A socket for the interface's settings, opened with the queues: asking for the MTU
    /// later (a driver activating the card, on a vCPU thread) creates none.
    control: OwnedFd,
    attached: Mutex<Vec<bool>>,
    offloads: Mutex<Option<u32>>,
}

/// A control socket for the interface of `taps`.
fn control(taps: &[Tap]) -> Result<OwnedFd, Error> {
    control_of(taps.first().map(Tap::name).unwrap_or_default())
}

fn control_of(name: &str) -> Result<OwnedFd, Error> {
    crate::tap::control_socket().map_err(|source| Error::Ioctl {
        name: name.to_string(),
        what: "open a control socket",
        source,
    })
}

impl TapQueues {
    /// Queues this process opened or was passed; each queue's attachment is read from the
    /// kernel.
    pub fn new(taps: Vec<Tap>) -> Result<Self, Error> {
        let attached = attachments(taps.iter())?;
        Ok(TapQueues {
            control: control(&taps)?,
            taps: taps.into_iter().map(Arc::new).collect(),
            attached: Mutex::new(attached),
            offloads: Mutex::new(None),
        })
    }

    /// The descriptors of a backend another baton handed over, in queue order, checked
    /// against the `state` it sent and taken as they are: nothing is set on them, because
    /// the sender shares their open files and may yet resume on them.
    pub fn from_transferred(fds: Vec<OwnedFd>, state: &TapState) -> Result<Self, Error> {
        let mismatch = |what: String| Error::Transferred(what);
        if state.queues == 0 || fds.len() != state.queues || state.enabled.len() != state.queues {
            return Err(mismatch(format!(
                "{} descriptor(s) and {} queue state(s) came for {} queue(s)",
                fds.len(),
                state.enabled.len(),
                state.queues
            )));
        }
        if state.vnet_hdr_len != VNET_HDR_LEN as u32 {
            return Err(mismatch(format!(
                "a vnet header of {} bytes, where baton needs {VNET_HDR_LEN}",
                state.vnet_hdr_len
            )));
        }
        let mut taps = Vec::with_capacity(fds.len());
        for (queue, fd) in fds.into_iter().enumerate() {
            let (tap, info) = Tap::adopt(fd)?;
            if info.name != state.name {
                return Err(mismatch(format!(
                    "queue {queue} belongs to '{}', not '{}'",
                    info.name, state.name
                )));
            }
            if (info.flags & libc::IFF_MULTI_QUEUE != 0) != (state.queues > 1) {
                return Err(mismatch(format!(
                    "queue {queue}: the TAP's multi-queue mode does not fit {} queue(s)",
                    state.queues
                )));
            }
            if info.attached() != state.enabled[queue] {
                return Err(mismatch(format!(
                    "queue {queue} is {}, the state says {}",
                    attachment(info.attached()),
                    attachment(state.enabled[queue])
                )));
            }
            if info.status & libc::O_NONBLOCK == 0 {
                return Err(mismatch(format!("queue {queue} is not non-blocking")));
            }
            if queue == 0 {
                let len = tap.vnet_hdr_len()?;
                if len != state.vnet_hdr_len {
                    return Err(mismatch(format!(
                        "the TAP's vnet header is {len} bytes, the state says {}",
                        state.vnet_hdr_len
                    )));
                }
            }
            taps.push(Arc::new(tap));
        }
        Ok(TapQueues {
            control: control_of(&state.name)?,
            taps,
            attached: Mutex::new(state.enabled.clone()),
            offloads: Mutex::new(state.offloads),
        })
    }

    /// The interface's MTU, as the kernel has it now.
    pub fn mtu(&self) -> Result<u16, Error> {
        match self.taps.first() {
            Some(tap) => tap.mtu_on(&self.control),
            None => Ok(1500),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        self.taps.first().map(|t| t.name()).unwrap_or_default()
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.taps.len()
    }

    /// Whether there are no queues (only in tests of devices without a backend).
    pub fn is_empty(&self) -> bool {
        self.taps.is_empty()
    }

    /// Queue `i`.
    pub fn queue(&self, i: usize) -> &Arc<Tap> {
        &self.taps[i]
    }

    /// Every queue's descriptor, in queue order: what a transfer sends.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.taps.iter().map(|t| t.file().as_fd()).collect()
    }

    /// How many queue pairs are attached (always the first ones).
    pub fn active_pairs(&self) -> usize {
        let attached = self.attached.lock().expect("TAP queue lock poisoned");
        attached.iter().take_while(|a| **a).count()
    }

    /// Attaches the first `pairs` queues and detaches the rest, so the kernel only queues
    /// frames where the driver reads. Queues already in the wanted state are left alone
    /// (the kernel refuses to attach an attached queue).
    pub fn set_active_pairs(&self, pairs: usize) {
        if self.taps.len() < 2 {
            return;
        }
        let mut attached = self.attached.lock().expect("TAP queue lock poisoned");
        for (i, tap) in self.taps.iter().enumerate() {
            let want = i < pairs;
            if attached[i] == want {
                continue;
            }
            match tap.set_queue_enabled(want) {
                Ok(()) => attached[i] = want,
                Err(e) => {
                    let cause = std::error::Error::source(&e).map(ToString::to_string);
                    log::warn!("{e}: {}", cause.unwrap_or_default());
                }
            }
        }
    }

    /// Sets which offloaded frames the TAP may hand over (a setting of the interface, so
    /// one queue carries it), unless it already has exactly these.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), Error> {
        let mut current = self.offloads.lock().expect("TAP offload lock poisoned");
        let flags = offloads.tun_flags();
        if *current == Some(flags) {
            return Ok(());
        }
        if let Some(first) = self.taps.first() {
            first.set_offloads(offloads)?;
        }
        *current = Some(flags);
        Ok(())
    }

    /// The state to send with the descriptors. The attachments come from the kernel, which
    /// is the truth the destination checks.
    pub fn state(&self) -> Result<TapState, Error> {
        let first = self
            .taps
            .first()
            .ok_or_else(|| Error::Transferred("no queues".into()))?;
        let enabled = attachments(self.taps.iter().map(|t| &**t))?;
        Ok(TapState {
            name: first.name().to_string(),
            queues: self.taps.len(),
            enabled,
            vnet_hdr_len: first.vnet_hdr_len()?,
            offloads: *self.offloads.lock().expect("TAP offload lock poisoned"),
            // Only readable by name in the interface's own network namespace.
            mtu: self.mtu().ok(),
            mac: first.mac().ok(),
        })
    }
}

/// Whether each queue is attached, as the kernel says.
fn attachments<'a>(taps: impl Iterator<Item = &'a Tap>) -> Result<Vec<bool>, Error> {
    taps.map(|t| t.info().map(|i| i.attached())).collect()
}

fn attachment(attached: bool) -> &'static str {
    if attached {
        "attached"
    } else {
        "detached"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(queues: usize) -> TapState {
        TapState {
            name: "tap0".into(),
            queues,
            enabled: vec![true; queues],
            vnet_hdr_len: VNET_HDR_LEN as u32,
            offloads: None,
            mtu: Some(1500),
            mac: None,
        }
    }

    #[test]
    fn a_state_that_cannot_fit_the_descriptors_is_refused_before_any_syscall() {
        let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let e = TapQueues::from_transferred(vec![null()], &state(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "The transferred TAP backend does not match its state: \
             1 descriptor(s) and 2 queue state(s) came for 2 queue(s)"
        );
        let mut s = state(1);
        s.enabled.clear();
        assert!(TapQueues::from_transferred(vec![null()], &s).is_err());
        assert!(TapQueues::from_transferred(vec![], &state(0)).is_err());
        let mut s = state(1);
        s.vnet_hdr_len = 10;
        let e = TapQueues::from_transferred(vec![null()], &s).unwrap_err();
        assert!(e.to_string().contains("vnet header of 10 bytes"), "{e}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let e = TapQueues::from_transferred(vec![null], &state(1)).unwrap_err();
        assert!(matches!(e, Error::NotTun(..)), "{e}");
    }

    #[test]
    fn the_state_round_trips_and_refuses_unknown_fields() {
        let s = state(4);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<TapState>(&json).unwrap(), s);
        let bad = json.replacen('{', "{\"ifindex\":3,", 1);
        assert!(serde_json::from_str::<TapState>(&bad).is_err());
    }
}
