//! The destination's view of a session: which request may come next, how long its payload may
//! be, and what the payloads of Start, MemoryFds and Fds commit the session to.
//!
//! Drive it with [`Receiver::check`] for every request header, before reading the payload;
//! then, for Start, MemoryFds and Fds, hand the parsed payload to [`Receiver::started`],
//! [`Receiver::memory_fds`] or [`Receiver::fds`] before the next header. Any refusal is final:
//! the receiver fails, and the caller answers Error and closes the channel.

use std::fmt;

use super::{
    Command, FdsHeader, Limits, MemoryRegion, ProposedBackend, ProtocolError, RequestHeader, Start,
    StartReply, PROTOCOL_VERSION,
};

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    /// Nothing yet.
    WaitingForStart,
    /// Start accepted.
    Started,
    /// Memory descriptors received (local migration).
    MemoryShared,
    /// Config received; memory may still arrive.
    Configured,
    /// State received; backend descriptors may still arrive.
    StateReceived,
    /// Complete received.
    Completed,
    /// Abandon received.
    Abandoned,
    /// A request was refused.
    Failed,
}

impl fmt::Display for ReceiverState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReceiverState::WaitingForStart => "before Start",
            ReceiverState::Started => "after Start",
            ReceiverState::MemoryShared => "after MemoryFds",
            ReceiverState::Configured => "after Config",
            ReceiverState::StateReceived => "after State",
            ReceiverState::Completed => "after Complete",
            ReceiverState::Abandoned => "after Abandon",
            ReceiverState::Failed => "after an error",
        })
    }
}

/// The destination's protocol state machine.
#[derive(Debug)]
pub struct Receiver {
    limits: Limits,
    state: ReceiverState,
    /// A request whose payload must be handed over before the next header.
    awaiting: Option<Command>,
    local: bool,
    proposed: Vec<ProposedBackend>,
    /// Whether `accept` was called.
    replied: bool,
    /// Accepted devices whose descriptors have not arrived.
    pending: Vec<String>,
    /// Accepted devices whose descriptors arrived.
    received: Vec<String>,
    /// Start asked for the notice before the VM runs.
    start_notice: bool,
}

impl Receiver {
    /// A receiver waiting for Start.
    pub fn new(limits: Limits) -> Self {
        Receiver {
            limits,
            state: ReceiverState::WaitingForStart,
            awaiting: None,
            local: false,
            proposed: Vec::new(),
            replied: false,
            pending: Vec::new(),
            received: Vec::new(),
            start_notice: false,
        }
    }

    /// Where the session stands.
    pub fn state(&self) -> ReceiverState {
        self.state
    }

    /// Whether the session is over: completed, abandoned or failed.
    pub fn is_done(&self) -> bool {
        matches!(
            self.state,
            ReceiverState::Completed | ReceiverState::Abandoned | ReceiverState::Failed
        )
    }

    /// Whether Start asked to be told before the VM runs here ([`Start::start_notice`]).
    pub fn start_notice(&self) -> bool {
        self.start_notice
    }

    /// Whether Start asked for a local migration (memory shared, not copied).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Accepts or refuses the request `header` announces, before its payload is read.
    pub fn check(&mut self, header: &RequestHeader) -> Result<(), ProtocolError> {
        let result = self.check_inner(header);
        self.fail_on_error(result)
    }

    fn check_inner(&mut self, header: &RequestHeader) -> Result<(), ProtocolError> {
        let command = header.command;
        if self.is_done() {
            return Err(self.unexpected(command));
        }
        if self.awaiting.is_some() {
            return Err(ProtocolError::Misuse(
                "the previous request's payload was not handed to the receiver",
            ));
        }
        use Command::*;
        use ReceiverState::*;
        let next = match (self.state, command) {
            (_, Abandon) => Abandoned,
            (WaitingForStart, Start) => WaitingForStart,
            (Started, MemoryFds) if self.local => Started,
            (Started, Config) if !self.local => Configured,
            (MemoryShared, Config) => Configured,
            (Configured, Memory) if !self.local => Configured,
            (Configured, State) => StateReceived,
            (StateReceived, Fds) if !self.pending.is_empty() => StateReceived,
            (StateReceived, Complete) if self.pending.is_empty() => Completed,
            _ => return Err(self.unexpected(command)),
        };
        self.check_length(header)?;
        if matches!(command, Start | MemoryFds | Fds) {
            self.awaiting = Some(command);
        }
        self.state = next;
        Ok(())
    }

    fn check_length(&self, header: &RequestHeader) -> Result<(), ProtocolError> {
        let (command, length) = (header.command, header.length);
        let limit = match command {
            Command::Start | Command::MemoryFds | Command::Config | Command::Fds => {
                self.limits.max_json
            }
            Command::Memory => self.limits.max_memory_message,
            Command::State => self.limits.max_state,
            Command::Complete | Command::Abandon if length != 0 => {
                return Err(ProtocolError::NotEmpty { command, length })
            }
            Command::Complete | Command::Abandon => 0,
        };
        if length > limit {
            return Err(ProtocolError::TooLong {
                command,
                length,
                limit,
            });
        }
        Ok(())
    }

    /// What may come now, for error messages.
    fn expected(&self) -> String {
        let next = match self.state {
            ReceiverState::WaitingForStart => "Start".to_string(),
            ReceiverState::Started if self.local => "MemoryFds (local migration)".to_string(),
            ReceiverState::Started => "Config (memory is copied, not shared)".to_string(),
            ReceiverState::MemoryShared => "Config".to_string(),
            ReceiverState::Configured if self.local => {
                "State (memory is shared, not copied)".to_string()
            }
            ReceiverState::Configured => "Memory or State".to_string(),
            ReceiverState::StateReceived => match self.pending.first() {
                Some(id) => format!("Fds for device '{id}'"),
                None => "Complete".to_string(),
            },
            ReceiverState::Completed | ReceiverState::Abandoned | ReceiverState::Failed => {
                return "nothing more: the session is over".to_string();
            }
        };
        format!("{next} or Abandon")
    }

    fn unexpected(&self, command: Command) -> ProtocolError {
        ProtocolError::Unexpected {
            command,
            state: self.state,
            expected: self.expected(),
        }
    }

    fn fail_on_error<T>(&mut self, result: Result<T, ProtocolError>) -> Result<T, ProtocolError> {
        // A session that ended stays as it ended.
        if result.is_err() && !self.is_done() {
            self.state = ReceiverState::Failed;
            self.awaiting = None;
        }
        result
    }

    fn take_awaiting(&mut self, command: Command) -> Result<(), ProtocolError> {
        if self.awaiting != Some(command) {
            return Err(ProtocolError::Misuse(
                "a payload was handed over that no checked request announced",
            ));
        }
        self.awaiting = None;
        Ok(())
    }

    /// Takes the Start payload: the version must match, and proposed devices must make sense.
    pub fn started(&mut self, start: &Start) -> Result<(), ProtocolError> {
        let result = self.started_inner(start);
        self.fail_on_error(result)
    }

    fn started_inner(&mut self, start: &Start) -> Result<(), ProtocolError> {
        self.take_awaiting(Command::Start)?;
        if start.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version {
                found: start.version,
                supported: PROTOCOL_VERSION,
            });
        }
        if !start.backend_transfer && !start.devices.is_empty() {
            return Err(ProtocolError::InvalidStart(
                "devices proposed without backend_transfer".into(),
            ));
        }
        for (i, device) in start.devices.iter().enumerate() {
            if device.id.is_empty() {
                return Err(ProtocolError::InvalidStart("a device id is empty".into()));
            }
            if start.devices[..i].iter().any(|d| d.id == device.id) {
                return Err(ProtocolError::InvalidStart(format!(
                    "device '{}' is proposed twice",
                    device.id
                )));
            }
            if device.fds == 0 || device.fds > self.limits.max_fds {
                return Err(ProtocolError::InvalidStart(format!(
                    "device '{}' proposes {} descriptors; 1 to {} are allowed",
                    device.id, device.fds, self.limits.max_fds
                )));
            }
        }
        self.local = start.local;
        self.start_notice = start.start_notice;
        self.proposed = start.devices.clone();
        self.state = ReceiverState::Started;
        Ok(())
    }

    /// Records which proposed devices hand over their backends (the rest take the ordinary
    /// path) and gives the reply to Start. Not calling it accepts none.
    pub fn accept(&mut self, ids: &[String]) -> Result<StartReply, ProtocolError> {
        let result = self.accept_inner(ids);
        self.fail_on_error(result)
    }

    fn accept_inner(&mut self, ids: &[String]) -> Result<StartReply, ProtocolError> {
        if self.state != ReceiverState::Started || self.awaiting.is_some() || self.replied {
            return Err(ProtocolError::Misuse("accept belongs right after started"));
        }
        for (i, id) in ids.iter().enumerate() {
            if !self.proposed.iter().any(|d| &d.id == id) || ids[..i].contains(id) {
                return Err(ProtocolError::BadAccept(id.clone()));
            }
        }
        self.replied = true;
        self.pending = ids.to_vec();
        Ok(StartReply {
            accepted: ids.to_vec(),
            software: None,
            start_notice: self.start_notice,
        })
    }

    /// Takes the MemoryFds payload: at least one region, within the descriptor limit, none
    /// empty, overflowing or overlapping another. One descriptor per region follows.
    pub fn memory_fds(&mut self, regions: &[MemoryRegion]) -> Result<(), ProtocolError> {
        let result = self.memory_fds_inner(regions);
        self.fail_on_error(result)
    }

    fn memory_fds_inner(&mut self, regions: &[MemoryRegion]) -> Result<(), ProtocolError> {
        self.take_awaiting(Command::MemoryFds)?;
        if regions.is_empty() {
            return Err(ProtocolError::NoRegions);
        }
        if regions.len() as u64 > u64::from(self.limits.max_fds) {
            return Err(ProtocolError::TooManyFds {
                count: regions.len() as u64,
                limit: self.limits.max_fds,
            });
        }
        let mut sorted = Vec::with_capacity(regions.len());
        for r in regions {
            if r.len == 0 {
                return Err(ProtocolError::EmptyRange(r.gpa));
            }
            let end = r
                .gpa
                .checked_add(r.len)
                .ok_or(ProtocolError::RangeOverflow {
                    gpa: r.gpa,
                    len: r.len,
                })?;
            sorted.push((r.gpa, end));
        }
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(ProtocolError::Overlap(w[1].0));
        }
        self.state = ReceiverState::MemoryShared;
        Ok(())
    }

    /// Takes an Fds payload: an accepted device, once, with as many descriptors as proposed.
    pub fn fds(&mut self, header: &FdsHeader) -> Result<(), ProtocolError> {
        let result = self.fds_inner(header);
        self.fail_on_error(result)
    }

    fn fds_inner(&mut self, header: &FdsHeader) -> Result<(), ProtocolError> {
        self.take_awaiting(Command::Fds)?;
        let id = &header.id;
        let Some(pos) = self.pending.iter().position(|p| p == id) else {
            if self.received.contains(id) {
                return Err(ProtocolError::FdsTwice(id.clone()));
            }
            return Err(ProtocolError::UnknownDevice(id.clone()));
        };
        let proposed = self
            .proposed
            .iter()
            .find(|d| &d.id == id)
            .map_or(0, |d| d.fds);
        if header.count != proposed {
            return Err(ProtocolError::FdCount {
                id: id.clone(),
                count: header.count,
                proposed,
            });
        }
        self.received.push(self.pending.remove(pos));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Start as StartMsg;
    use Command::*;
    use Command::{Start, State};

    fn header(command: Command, length: u64) -> RequestHeader {
        RequestHeader { command, length }
    }

    fn start(local: bool, devices: &[(&str, u32)]) -> StartMsg {
        StartMsg {
            version: PROTOCOL_VERSION,
            local,
            backend_transfer: !devices.is_empty(),
            devices: devices
                .iter()
                .map(|(id, fds)| ProposedBackend {
                    id: id.to_string(),
                    kind: "virtio-net-tap".into(),
                    fds: *fds,
                })
                .collect(),
            software: None,
            start_notice: false,
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A receiver that took Start and accepted `accepted`.
    fn started(local: bool, devices: &[(&str, u32)], accepted: &[&str]) -> Receiver {
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 10)).unwrap();
        r.started(&start(local, devices)).unwrap();
        let reply = r.accept(&ids(accepted)).unwrap();
        assert_eq!(reply.accepted, ids(accepted));
        r
    }

    fn region(gpa: u64, len: u64) -> MemoryRegion {
        MemoryRegion { gpa, len }
    }

    #[test]
    fn copying_session() {
        let mut r = started(false, &[], &[]);
        assert!(!r.is_local());
        r.check(&header(Config, 100)).unwrap();
        for _ in 0..3 {
            r.check(&header(Memory, 1 << 20)).unwrap();
        }
        r.check(&header(State, 1000)).unwrap();
        assert_eq!(r.state(), ReceiverState::StateReceived);
        assert!(!r.is_done());
        r.check(&header(Complete, 0)).unwrap();
        assert_eq!(r.state(), ReceiverState::Completed);
        assert!(r.is_done());
    }

    #[test]
    fn local_session_with_backend_transfer() {
        let mut r = started(
            true,
            &[("net0", 2), ("net1", 4), ("net2", 1)],
            &["net1", "net0"],
        );
        r.check(&header(MemoryFds, 50)).unwrap();
        r.memory_fds(&[region(1 << 32, 1 << 30), region(0, 3 << 30)])
            .unwrap();
        assert_eq!(r.state(), ReceiverState::MemoryShared);
        r.check(&header(Config, 100)).unwrap();
        r.check(&header(State, 1000)).unwrap();
        // Complete is refused while a device waits for its descriptors.
        let mut early = started(true, &[("net0", 2)], &["net0"]);
        for (c, len) in [(MemoryFds, 1), (Config, 1), (State, 1)] {
            early.check(&header(c, len)).unwrap();
            if c == MemoryFds {
                early.memory_fds(&[region(0, 4096)]).unwrap();
            }
        }
        let e = early.check(&header(Complete, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unexpected Complete request after State; expected Fds for device 'net0' or Abandon"
        );
        assert_eq!(early.state(), ReceiverState::Failed);

        for (id, count) in [("net0", 2), ("net1", 4)] {
            r.check(&header(Fds, 30)).unwrap();
            r.fds(&FdsHeader {
                id: id.into(),
                count,
                ..Default::default()
            })
            .unwrap();
        }
        // All arrived: no more Fds.
        let mut more = started(false, &[], &[]);
        more.check(&header(Config, 1)).unwrap();
        more.check(&header(State, 1)).unwrap();
        assert!(more.check(&header(Fds, 1)).is_err());
        r.check(&header(Complete, 0)).unwrap();
        assert!(r.is_done());
    }

    /// Every command in every state, against a table of what is allowed.
    #[test]
    fn every_transition() {
        // (how to reach the state, local, allowed commands)
        let setups: Vec<(&str, bool, Vec<Command>)> = vec![
            ("fresh", false, vec![Start, Abandon]),
            ("started", false, vec![Config, Abandon]),
            ("started", true, vec![MemoryFds, Abandon]),
            ("shared", true, vec![Config, Abandon]),
            ("configured", false, vec![Memory, State, Abandon]),
            ("configured", true, vec![State, Abandon]),
            ("state", false, vec![Complete, Abandon]),
            ("state+pending", true, vec![Fds, Abandon]),
            ("completed", false, vec![]),
            ("abandoned", false, vec![]),
            ("failed", false, vec![]),
        ];
        let reach = |name: &str, local: bool| -> Receiver {
            let devices: &[(&str, u32)] = if name == "state+pending" {
                &[("n", 1)]
            } else {
                &[]
            };
            let accepted: &[&str] = if name == "state+pending" { &["n"] } else { &[] };
            let mut r = match name {
                "fresh" => return Receiver::new(Limits::default()),
                _ => started(local, devices, accepted),
            };
            let steps: &[Command] = match name {
                "started" => &[],
                "shared" => &[MemoryFds],
                "configured" if local => &[MemoryFds, Config],
                "configured" => &[Config],
                "state" | "completed" => &[Config, State],
                "state+pending" => &[MemoryFds, Config, State],
                "abandoned" => &[Abandon],
                "failed" => &[Complete],
                _ => unreachable!(),
            };
            for &c in steps {
                let _ = r.check(&header(c, 0));
                if c == MemoryFds {
                    r.memory_fds(&[region(0, 4096)]).unwrap();
                }
            }
            if name == "completed" {
                r.check(&header(Complete, 0)).unwrap();
            }
            r
        };
        for (name, local, allowed) in setups {
            for command in Command::ALL {
                let mut r = reach(name, local);
                let before = r.state();
                let result = r.check(&header(command, 0));
                let should = allowed.contains(&command);
                assert_eq!(
                    result.is_ok(),
                    should,
                    "{command} in {name} (local {local})"
                );
                if let Err(e) = result {
                    assert!(
                        matches!(e, ProtocolError::Unexpected { command: c, state, .. }
                            if c == command && state == before),
                        "{e}"
                    );
                    // A session that already ended keeps its ending.
                    let after = match before {
                        ReceiverState::Completed | ReceiverState::Abandoned => before,
                        _ => ReceiverState::Failed,
                    };
                    assert_eq!(r.state(), after);
                    assert!(r.is_done());
                }
            }
        }
    }

    #[test]
    fn messages_name_the_command_and_state() {
        let mut r = Receiver::new(Limits::default());
        let e = r.check(&header(Memory, 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unexpected Memory request before Start; expected Start or Abandon"
        );
        let mut r = started(false, &[], &[]);
        let e = r.check(&header(MemoryFds, 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unexpected MemoryFds request after Start; \
             expected Config (memory is copied, not shared) or Abandon"
        );
        let mut r = started(true, &[], &[]);
        r.check(&header(MemoryFds, 10)).unwrap();
        r.memory_fds(&[region(0, 1)]).unwrap();
        r.check(&header(Config, 10)).unwrap();
        let e = r.check(&header(Memory, 10)).unwrap_err();
        assert!(e
            .to_string()
            .contains("expected State (memory is shared, not copied)"));
        let mut r = started(false, &[], &[]);
        r.check(&header(Config, 10)).unwrap();
        let e = r.check(&header(Config, 10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unexpected Config request after Config; expected Memory or State or Abandon"
        );
        let e = r.check(&header(Abandon, 0)).unwrap_err();
        assert!(e
            .to_string()
            .contains("after an error; expected nothing more"));
    }

    #[test]
    fn lengths_are_limited_per_command() {
        let limits = Limits::default();
        let mut r = Receiver::new(limits);
        let e = r.check(&header(Start, limits.max_json + 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { command: Start, .. }));
        assert_eq!(r.state(), ReceiverState::Failed);

        let mut r = started(false, &[], &[]);
        r.check(&header(Config, limits.max_json)).unwrap();
        r.check(&header(Memory, limits.max_memory_message)).unwrap();
        assert!(r
            .check(&header(Memory, limits.max_memory_message + 1))
            .is_err());

        let mut r = started(false, &[], &[]);
        r.check(&header(Config, 1)).unwrap();
        let e = r.check(&header(State, limits.max_state + 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::TooLong { command: State, .. }));

        let mut r = started(false, &[], &[]);
        r.check(&header(Config, 1)).unwrap();
        r.check(&header(State, 1)).unwrap();
        let e = r.check(&header(Complete, 1)).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::NotEmpty {
                command: Complete,
                length: 1
            }
        ));

        let mut r = Receiver::new(limits);
        let e = r.check(&header(Abandon, u64::MAX)).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::NotEmpty {
                command: Abandon,
                ..
            }
        ));
    }

    #[test]
    fn abandon_is_valid_anywhere_before_the_end() {
        let mut r = started(true, &[("n", 1)], &["n"]);
        r.check(&header(MemoryFds, 1)).unwrap();
        r.memory_fds(&[region(0, 1)]).unwrap();
        r.check(&header(Config, 1)).unwrap();
        r.check(&header(State, 1)).unwrap();
        r.check(&header(Abandon, 0)).unwrap();
        assert_eq!(r.state(), ReceiverState::Abandoned);
        assert!(r.check(&header(Abandon, 0)).is_err());
    }

    #[test]
    fn version_mismatch() {
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 10)).unwrap();
        let mut s = start(false, &[]);
        s.version = 1;
        let e = r.started(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Peer speaks migration protocol version 1, this baton speaks 2"
        );
        assert!(r.is_done());
    }

    #[test]
    fn bad_proposals() {
        let cases: &[(bool, &[(&str, u32)])] = &[
            (false, &[("n", 1)]),
            (true, &[("", 1)]),
            (true, &[("n", 1), ("n", 2)]),
            (true, &[("n", 0)]),
            (true, &[("n", 513)]),
        ];
        for (transfer, devices) in cases {
            let mut r = Receiver::new(Limits::default());
            r.check(&header(Start, 10)).unwrap();
            let mut s = start(false, devices);
            s.backend_transfer = *transfer;
            let e = r.started(&s).unwrap_err();
            assert!(
                matches!(e, ProtocolError::InvalidStart(_)),
                "{devices:?}: {e}"
            );
        }
    }

    #[test]
    fn accept_only_proposed_devices() {
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 10)).unwrap();
        r.started(&start(true, &[("a", 1)])).unwrap();
        assert!(matches!(
            r.accept(&ids(&["b"])),
            Err(ProtocolError::BadAccept(_))
        ));
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 10)).unwrap();
        r.started(&start(true, &[("a", 1)])).unwrap();
        assert!(r.accept(&ids(&["a", "a"])).is_err());
        // Twice, or later, is misuse.
        let mut r = started(true, &[("a", 1)], &[]);
        assert!(matches!(
            r.accept(&ids(&["a"])),
            Err(ProtocolError::Misuse(_))
        ));
    }

    #[test]
    fn accepting_nothing_by_default() {
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 10)).unwrap();
        r.started(&start(false, &[("a", 1)])).unwrap();
        r.check(&header(Config, 1)).unwrap();
        r.check(&header(State, 1)).unwrap();
        r.check(&header(Complete, 0)).unwrap();
    }

    #[test]
    fn bad_memory_regions() {
        let limits = Limits {
            max_fds: 2,
            ..Limits::default()
        };
        let cases: &[&[MemoryRegion]] = &[
            &[],
            &[region(0, 1), region(10, 1), region(20, 1)],
            &[region(0, 0)],
            &[region(u64::MAX, 1)],
            &[region(0x1000, 0x1000), region(0, 0x1001)],
        ];
        for regions in cases {
            let mut r = Receiver::new(limits);
            r.check(&header(Start, 10)).unwrap();
            r.started(&start(true, &[])).unwrap();
            r.check(&header(MemoryFds, 10)).unwrap();
            assert!(r.memory_fds(regions).is_err(), "{regions:?}");
            assert!(r.is_done());
        }
        let mut r = Receiver::new(limits);
        r.check(&header(Start, 10)).unwrap();
        r.started(&start(true, &[])).unwrap();
        r.check(&header(MemoryFds, 10)).unwrap();
        // Adjacent is not overlapping.
        r.memory_fds(&[region(0x1000, 0x1000), region(0, 0x1000)])
            .unwrap();
    }

    #[test]
    fn bad_fds_headers() {
        let reach = || {
            let mut r = started(true, &[("a", 2), ("b", 1)], &["a"]);
            r.check(&header(MemoryFds, 1)).unwrap();
            r.memory_fds(&[region(0, 1)]).unwrap();
            r.check(&header(Config, 1)).unwrap();
            r.check(&header(State, 1)).unwrap();
            r.check(&header(Fds, 1)).unwrap();
            r
        };
        let fds = |id: &str, count| FdsHeader {
            id: id.into(),
            count,
            ..Default::default()
        };
        let e = reach().fds(&fds("b", 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::UnknownDevice(_)));
        let e = reach().fds(&fds("zz", 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::UnknownDevice(_)));
        let e = reach().fds(&fds("a", 3)).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::FdCount {
                count: 3,
                proposed: 2,
                ..
            }
        ));
        // Twice: the second is already refused by check (nothing pending), or by fds when
        // another device is still pending.
        let mut r = started(true, &[("a", 1), ("b", 1)], &["a", "b"]);
        r.check(&header(MemoryFds, 1)).unwrap();
        r.memory_fds(&[region(0, 1)]).unwrap();
        r.check(&header(Config, 1)).unwrap();
        r.check(&header(State, 1)).unwrap();
        r.check(&header(Fds, 1)).unwrap();
        r.fds(&fds("a", 1)).unwrap();
        r.check(&header(Fds, 1)).unwrap();
        assert!(matches!(
            r.fds(&fds("a", 1)),
            Err(ProtocolError::FdsTwice(_))
        ));
    }

    #[test]
    fn payloads_must_be_handed_over_in_order() {
        let mut r = Receiver::new(Limits::default());
        assert!(matches!(
            r.started(&start(false, &[])),
            Err(ProtocolError::Misuse(_))
        ));
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 1)).unwrap();
        let e = r.check(&header(Config, 1)).unwrap_err();
        assert!(matches!(e, ProtocolError::Misuse(_)));
        let mut r = Receiver::new(Limits::default());
        r.check(&header(Start, 1)).unwrap();
        assert!(r.memory_fds(&[region(0, 1)]).is_err());
    }
}
