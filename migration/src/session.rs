//! A whole session over a [`Channel`], minus the VM: the destination's request loop, which the
//! VMM drives through the [`Destination`] trait, and the source's opening handshake.
//!
//! Keeping the loop here means the strict protocol handling (checks before reads, one
//! response per request, an Error response on any failure) is tested without KVM, and the VMM
//! only supplies what each request does to its VM.

use std::io;
use std::os::fd::OwnedFd;

use crate::protocol::{
    self, check_transport, parse_json, to_json, Command, CompleteReply, FdsHeader, Limits,
    MemoryRegion, ProtocolError, Receiver, Response, Software, Start, StartReply, START_NOTICE,
};
use crate::transport::Channel;
use crate::BoxError;

/// What a destination VMM does with each request. Every method may fail; the session then
/// answers Error and ends, and the VMM drops whatever it built, including the descriptors it
/// was given.
pub trait Destination {
    /// Start passed the version, transport and sanity checks. Returns the ids of the proposed
    /// devices whose backends this destination takes; the others take the ordinary path.
    fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError>;
    /// The software this destination runs, for the reply to Start.
    fn software(&self) -> Option<Software> {
        None
    }
    /// The shared guest memory of a local migration: one descriptor per region, in order.
    fn memory_fds(&mut self, regions: Vec<MemoryRegion>, fds: Vec<OwnedFd>)
        -> Result<(), BoxError>;
    /// The VM configuration, as the source's VMM encoded it.
    fn config(&mut self, config: Vec<u8>) -> Result<(), BoxError>;
    /// Guest memory contents: must refuse ranges outside guest memory.
    fn write_memory(&mut self, gpa: u64, data: &[u8]) -> io::Result<()>;
    /// vCPU and device state, a [`snapshot`](crate::snapshot) blob.
    fn state(&mut self, state: Vec<u8>) -> Result<(), BoxError>;
    /// An accepted device's backend descriptors, in the order the source sent them, with the
    /// header that announced them (the device id and the backend's state).
    fn backend_fds(&mut self, header: FdsHeader, fds: Vec<OwnedFd>) -> Result<(), BoxError>;
    /// Build the VM and its devices from their state, ready to run but not running.
    fn complete(&mut self) -> Result<(), BoxError>;
    /// Run the VM [`Destination::complete`] built: everything but letting its vCPUs go
    /// (resume its devices, announce it). Called only once the source was told, when it
    /// asked ([`Start::start_notice`]); the source learns of success only when this returns.
    fn run(&mut self) -> Result<(), BoxError>;
    /// Let the vCPUs of the VM [`Destination::run`] readied go, right after the source was
    /// answered (or could not be): the answer goes before a running guest competes with it
    /// for the host's cores.
    fn release(&mut self) {}
    /// How long this destination's steps took, sent to the source with the last answer to
    /// Complete.
    fn timings(&mut self) -> CompleteReply {
        CompleteReply::default()
    }
}

/// How a session that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs here now.
    Completed,
    /// The source gave up; nothing should be kept.
    Abandoned,
}

/// Serves one session on `channel`, from Start to Complete or Abandon. On failure, the
/// source is sent the error chain (if it still listens) and the error is returned. Set read
/// and write timeouts on the channel first if a silent source must not hold the destination.
pub fn receive(
    channel: &mut Channel,
    limits: Limits,
    destination: &mut impl Destination,
) -> Result<Outcome, ProtocolError> {
    let mut receiver = Receiver::new(limits);
    loop {
        match step(channel, &mut receiver, destination) {
            Ok(None) => {}
            Ok(Some(outcome)) => return Ok(outcome),
            Err(e) => {
                // Best effort: the source may be gone, which is then the error to report.
                let _ = channel.send_response(&Response::error(&e));
                return Err(e);
            }
        }
    }
}

/// One request and its response.
fn step(
    channel: &mut Channel,
    receiver: &mut Receiver,
    destination: &mut impl Destination,
) -> Result<Option<Outcome>, ProtocolError> {
    let header = channel.recv_request_header()?;
    receiver.check(&header)?;
    let command = header.command;
    log::debug!("migration: {command} request, {} bytes", header.length);
    let applying = |source| ProtocolError::Destination { command, source };
    let mut reply = Vec::new();
    let mut outcome = None;
    match command {
        Command::Start => {
            let start: Start = parse_json(command, &channel.read_payload(header.length)?)?;
            check_transport(&start, channel.is_unix())?;
            receiver.started(&start)?;
            let ids = destination.start(&start).map_err(applying)?;
            let mut accepted = receiver.accept(&ids)?;
            accepted.software = destination.software();
            reply = to_json(&accepted);
        }
        Command::MemoryFds => {
            let regions: Vec<MemoryRegion> =
                parse_json(command, &channel.read_payload(header.length)?)?;
            receiver.memory_fds(&regions)?;
            let fds = channel
                .recv_fds(regions.len())
                .map_err(|e| ProtocolError::Io("receiving memory descriptors", e))?;
            destination.memory_fds(regions, fds).map_err(applying)?;
        }
        Command::Config => {
            let config = channel.read_payload(header.length)?;
            destination.config(config).map_err(applying)?;
        }
        Command::Memory => {
            protocol::recv_memory(channel, &header, receiver.limits(), |gpa, data| {
                destination.write_memory(gpa, data)
            })?;
        }
        Command::State => {
            let state = channel.read_payload(header.length)?;
            destination.state(state).map_err(applying)?;
        }
        Command::Fds => {
            let fds_header: FdsHeader = parse_json(command, &channel.read_payload(header.length)?)?;
            receiver.fds(&fds_header)?;
            let fds = channel
                .recv_fds(fds_header.count as usize)
                .map_err(|e| ProtocolError::Io("receiving backend descriptors", e))?;
            destination.backend_fds(fds_header, fds).map_err(applying)?;
        }
        Command::Complete => {
            destination.complete().map_err(applying)?;
            if receiver.start_notice() {
                // Without the notice sent, the VM must not run here: the source, on seeing
                // the connection end without it, resumes the VM there.
                channel.send_response(&Response::Ok(START_NOTICE.to_vec()))?;
            }
            destination.run().map_err(applying)?;
            // The VM runs here now, whether or not the source hears so: a source that gets
            // no answer stays paused (it cannot tell), so neither dropping this VM nor
            // resuming that one could be right.
            let timings = to_json(&destination.timings());
            let answered = channel.send_response(&Response::Ok(timings));
            destination.release();
            if let Err(e) = answered {
                log::warn!(
                    "migration: the VM runs here, but the source did not get the answer to \
                     Complete ({e}); it stays paused there"
                );
            }
            return Ok(Some(Outcome::Completed));
        }
        Command::Abandon => outcome = Some(Outcome::Abandoned),
    }
    channel.send_response(&Response::Ok(reply))?;
    Ok(outcome)
}

/// The source's opening: checks that the channel can carry what `start` asks, sends it, and
/// returns the destination's checked reply.
pub fn start(channel: &mut Channel, start: &Start) -> Result<StartReply, ProtocolError> {
    check_transport(start, channel.is_unix())?;
    let reply: StartReply = parse_json(
        Command::Start,
        &channel.request(Command::Start, &to_json(start))?,
    )?;
    start.check_reply(&reply)?;
    Ok(reply)
}

/// Why Complete did not end in the destination's Ok, as the source sees it.
#[derive(Debug)]
pub enum Unfinished {
    /// The destination refused Complete, or did not get it whole, or was silenced before it
    /// said it would run the VM: the VM never ran there, and runs on at the source.
    NotRun(ProtocolError),
    /// The destination ended before it said it would run the VM: it never ran there.
    Ended(ProtocolError),
    /// The destination may be running the VM: it said it would, or the source cannot tell.
    MayRun(ProtocolError),
}

/// The source's last step: sends Complete and reads what the destination makes of it.
/// `earlier` requests went before it without their answers read (State and Fds, sent one
/// after the other so the destination works on each while the source prepares the next).
/// Their answers are read first, and Complete goes only once they all came: a destination
/// that refuses, stalls or ends on one of them then never got Complete, so the VM runs on
/// at the source. `notice` is whether both agreed on [`Start::start_notice`]. If no answer
/// to Complete comes in time, `silence` is asked to end the destination (a local child can
/// be killed); if it could, what the destination left in the channel decides whether the
/// VM may have run there. Returns the destination's timings (none if it sent none, or none
/// that parse).
pub fn complete(
    channel: &mut Channel,
    earlier: usize,
    notice: bool,
    silence: &mut dyn FnMut() -> bool,
) -> Result<CompleteReply, Unfinished> {
    let limits = Limits::default();
    for _ in 0..earlier {
        match channel.recv_response(&limits) {
            Ok(Response::Ok(_)) => {}
            Ok(Response::Error(m)) => return Err(Unfinished::NotRun(ProtocolError::Remote(m))),
            Err(e) => return Err(Unfinished::NotRun(e)),
        }
    }
    // A Complete the destination did not get whole cannot have started the VM there.
    if let Err(e) = channel.send_request(Command::Complete, &[]) {
        return Err(Unfinished::NotRun(channel.refusal(e, 0)));
    }
    let first = match channel.recv_response(&limits) {
        Ok(r) => r,
        Err(e) if !notice => return Err(Unfinished::MayRun(e)),
        // Ended without the notice: it never ran the VM.
        Err(e) if ended(&e, channel.is_unix()) => return Err(Unfinished::Ended(e)),
        Err(e) if silence() => match channel.recv_response(&limits) {
            Ok(Response::Ok(p)) if p == START_NOTICE => return Err(Unfinished::MayRun(e)),
            Ok(Response::Ok(p)) => return Ok(timings(&p)),
            Ok(Response::Error(m)) => return Err(Unfinished::NotRun(ProtocolError::Remote(m))),
            Err(_) => return Err(Unfinished::NotRun(e)),
        },
        Err(e) => return Err(Unfinished::MayRun(e)),
    };
    match first {
        Response::Error(m) => Err(Unfinished::NotRun(ProtocolError::Remote(m))),
        Response::Ok(p) if notice && p == START_NOTICE => match channel.recv_response(&limits) {
            Ok(Response::Ok(p)) => Ok(timings(&p)),
            Ok(Response::Error(m)) => Err(Unfinished::MayRun(ProtocolError::Remote(m))),
            Err(e) => Err(Unfinished::MayRun(e)),
        },
        Response::Ok(p) => Ok(timings(&p)),
    }
}

/// The destination's timings in the payload `p` of its last answer: the VM runs there
/// whatever they say, so timings that do not parse are only logged.
fn timings(p: &[u8]) -> CompleteReply {
    if p.is_empty() {
        return CompleteReply::default();
    }
    parse_json(Command::Complete, p).unwrap_or_else(|e| {
        log::warn!("migration: the destination's timings do not parse: {e}");
        CompleteReply::default()
    })
}

/// Whether `e`, read on a channel that is a UNIX socket or not, is the peer closing the
/// connection (after everything it wrote), rather than its silence or a break on the way: a
/// reset counts only on a UNIX socket, where nothing between the two ends can cause one.
fn ended(e: &ProtocolError, unix: bool) -> bool {
    match e {
        ProtocolError::Io(_, io) => match io.kind() {
            io::ErrorKind::UnexpectedEof => true,
            io::ErrorKind::ConnectionReset => unix,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MemoryRanges, ProposedBackend, PROTOCOL_VERSION};
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const GUEST: usize = 64 << 10;

    /// A destination that records what it is given, and refuses one command if told to.
    struct Recorder {
        memory: Vec<u8>,
        config: Vec<u8>,
        state: Vec<u8>,
        memory_fds: usize,
        backends: Vec<(String, usize)>,
        completed: bool,
        ran: bool,
        refuse: Option<Command>,
    }

    impl Recorder {
        fn new() -> Self {
            Recorder {
                memory: vec![0; GUEST],
                config: vec![],
                state: vec![],
                memory_fds: 0,
                backends: vec![],
                completed: false,
                ran: false,
                refuse: None,
            }
        }

        fn refuse(&self, command: Command) -> Result<(), BoxError> {
            match self.refuse == Some(command) {
                true => Err("no room".into()),
                false => Ok(()),
            }
        }
    }

    impl Destination for Recorder {
        fn start(&mut self, start: &Start) -> Result<Vec<String>, BoxError> {
            self.refuse(Command::Start)?;
            Ok(start
                .devices
                .iter()
                .filter(|d| d.kind == "virtio-net-tap")
                .map(|d| d.id.clone())
                .collect())
        }

        fn memory_fds(
            &mut self,
            regions: Vec<MemoryRegion>,
            fds: Vec<OwnedFd>,
        ) -> Result<(), BoxError> {
            assert_eq!(regions.len(), fds.len());
            self.memory_fds = fds.len();
            self.refuse(Command::MemoryFds)
        }

        fn config(&mut self, config: Vec<u8>) -> Result<(), BoxError> {
            self.refuse(Command::Config)?;
            self.config = config;
            Ok(())
        }

        fn write_memory(&mut self, gpa: u64, data: &[u8]) -> io::Result<()> {
            let start = usize::try_from(gpa).unwrap_or(usize::MAX);
            self.memory
                .get_mut(start..start.saturating_add(data.len()))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "outside the guest"))?
                .copy_from_slice(data);
            Ok(())
        }

        fn state(&mut self, state: Vec<u8>) -> Result<(), BoxError> {
            self.state = state;
            self.refuse(Command::State)
        }

        fn backend_fds(&mut self, header: FdsHeader, fds: Vec<OwnedFd>) -> Result<(), BoxError> {
            self.backends.push((header.id, fds.len()));
            self.refuse(Command::Fds)
        }

        fn complete(&mut self) -> Result<(), BoxError> {
            self.refuse(Command::Complete)?;
            self.completed = true;
            Ok(())
        }

        fn run(&mut self) -> Result<(), BoxError> {
            self.ran = true;
            Ok(())
        }

        fn timings(&mut self) -> CompleteReply {
            CompleteReply {
                before_pause: vec![],
                paused: vec![crate::protocol::Phase {
                    name: "run".into(),
                    us: 42,
                }],
            }
        }
    }

    /// Runs `source` against `receive` over a UNIX socket pair.
    fn run<T: Send + 'static>(
        mut destination: Recorder,
        source: impl FnOnce(&mut Channel) -> T + Send + 'static,
    ) -> (Result<Outcome, ProtocolError>, Recorder, T) {
        let (a, b) = UnixStream::pair().unwrap();
        let source = thread::spawn(move || source(&mut Channel::from(a)));
        let mut channel = Channel::from(b);
        let result = receive(&mut channel, Limits::default(), &mut destination);
        drop(channel);
        (result, destination, source.join().unwrap())
    }

    fn start_msg(local: bool, devices: &[(&str, &str, u32)]) -> Start {
        Start {
            version: PROTOCOL_VERSION,
            local,
            backend_transfer: !devices.is_empty(),
            devices: devices
                .iter()
                .map(|(id, kind, fds)| ProposedBackend {
                    id: id.to_string(),
                    kind: kind.to_string(),
                    fds: *fds,
                })
                .collect(),
            software: None,
            start_notice: false,
        }
    }

    #[test]
    fn copying_session() {
        let (result, dest, sent) = run(Recorder::new(), |ch| {
            let reply = start(ch, &start_msg(false, &[])).unwrap();
            assert!(reply.accepted.is_empty());
            ch.request(Command::Config, b"{\"cpus\":1}").unwrap();
            let mut sent = 0;
            for pass in 0..2u8 {
                let ranges = MemoryRanges(vec![(0, 4096), (8192 + u64::from(pass), 5000)]);
                sent += ch
                    .send_memory(&ranges, |_, buf| {
                        buf.fill(pass + 1);
                        Ok(())
                    })
                    .unwrap();
            }
            ch.request(Command::State, b"state").unwrap();
            ch.request(Command::Complete, b"").unwrap();
            sent
        });
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert_eq!(sent, 2 * (4096 + 5000));
        assert!(dest.completed);
        assert_eq!(dest.config, b"{\"cpus\":1}");
        assert_eq!(dest.state, b"state");
        // The second pass overwrote the first.
        assert!(dest.memory[..4096].iter().all(|&b| b == 2));
        assert_eq!(dest.memory[8192], 1);
        assert!(dest.memory[8193..8193 + 5000].iter().all(|&b| b == 2));
        assert_eq!(dest.memory[8193 + 5000], 0);
    }

    #[test]
    fn local_session_with_backend_transfer() {
        let (result, dest, ()) = run(Recorder::new(), |ch| {
            let devices = [("net0", "virtio-net-tap", 2), ("blk0", "raw-file", 1)];
            let reply = start(ch, &start_msg(true, &devices)).unwrap();
            assert_eq!(reply.accepted, vec!["net0".to_string()]);
            let file = File::open("/dev/null").unwrap();
            let regions = vec![
                MemoryRegion {
                    gpa: 0,
                    len: 1 << 20,
                },
                MemoryRegion {
                    gpa: 1 << 32,
                    len: 1 << 20,
                },
            ];
            ch.request_with_fds(Command::MemoryFds, &to_json(&regions), &[file.as_fd(); 2])
                .unwrap();
            ch.request(Command::Config, b"{}").unwrap();
            ch.request(Command::State, b"s").unwrap();
            let fds = FdsHeader {
                id: "net0".into(),
                count: 2,
                ..Default::default()
            };
            ch.request_with_fds(Command::Fds, &to_json(&fds), &[file.as_fd(); 2])
                .unwrap();
            ch.request(Command::Complete, b"").unwrap();
        });
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert_eq!(dest.memory_fds, 2);
        assert_eq!(dest.backends, vec![("net0".to_string(), 2)]);
    }

    /// Runs a session up to Complete with the notice asked for, then `source`'s Complete,
    /// given how many answers are still to read (with `ahead`, State goes without waiting
    /// for its answer, as a paused source sends it) and whether the notice was agreed.
    fn up_to_complete<T: Send + 'static>(
        destination: Recorder,
        ahead: bool,
        source: impl FnOnce(&mut Channel, usize, bool) -> T + Send + 'static,
    ) -> (Result<Outcome, ProtocolError>, Recorder, T) {
        run(destination, move |ch| {
            let mut msg = start_msg(false, &[]);
            msg.start_notice = true;
            let reply = start(ch, &msg).unwrap();
            ch.request(Command::Config, b"{}").unwrap();
            let earlier = if ahead {
                ch.send_request(Command::State, b"s").unwrap();
                1
            } else {
                ch.request(Command::State, b"s").unwrap();
                0
            };
            source(ch, earlier, reply.start_notice)
        })
    }

    /// [`complete`] for a destination that needs no silencing.
    fn completed(ch: &mut Channel, earlier: usize, notice: bool) -> Done {
        complete(ch, earlier, notice, &mut || panic!("nothing to silence"))
    }

    #[test]
    fn the_destination_says_it_runs_the_vm_before_it_does() {
        let (result, dest, done) = up_to_complete(Recorder::new(), false, |ch, earlier, notice| {
            assert!(notice, "a destination agrees to the notice when asked");
            completed(ch, earlier, notice)
        });
        // The destination's timings come with its last answer.
        assert_eq!(done.unwrap().paused[0].us, 42);
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert!(dest.ran);
        // The same by hand: the notice, then the answer.
        let (result, _, ()) = run(Recorder::new(), |ch| {
            let mut msg = start_msg(false, &[]);
            msg.start_notice = true;
            start(ch, &msg).unwrap();
            ch.request(Command::Config, b"{}").unwrap();
            ch.request(Command::State, b"s").unwrap();
            assert_eq!(ch.request(Command::Complete, b"").unwrap(), START_NOTICE);
            let last = ch.recv_response(&Limits::default()).unwrap();
            assert!(matches!(last, Response::Ok(p) if p.starts_with(b"{")));
        });
        assert_eq!(result.unwrap(), Outcome::Completed);
    }

    #[test]
    fn a_refused_complete_never_ran_there() {
        let mut recorder = Recorder::new();
        recorder.refuse = Some(Command::Complete);
        let (_, dest, done) = up_to_complete(recorder, false, completed);
        assert!(matches!(done, Err(Unfinished::NotRun(_))), "{done:?}");
        assert!(!dest.ran);
    }

    type Done = Result<CompleteReply, Unfinished>;

    #[test]
    fn answers_to_requests_sent_ahead_come_before_complete_s() {
        let (result, dest, done) = up_to_complete(Recorder::new(), true, completed);
        assert_eq!(done.unwrap().paused[0].us, 42);
        assert_eq!(result.unwrap(), Outcome::Completed);
        assert_eq!(dest.state, b"s");
        assert!(dest.ran);
    }

    #[test]
    fn a_refused_request_sent_ahead_means_complete_never_ran() {
        let mut recorder = Recorder::new();
        recorder.refuse = Some(Command::State);
        let (result, dest, done) = up_to_complete(recorder, true, completed);
        match done {
            Err(Unfinished::NotRun(ProtocolError::Remote(m))) => {
                assert!(m.contains("no room"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(result.is_err());
        assert!(!dest.completed && !dest.ran);
    }

    #[test]
    fn complete_waits_for_the_answers_before_it() {
        // A destination that stalls after taking State: the source must not have sent
        // Complete, so the VM never ran there, with or without the notice agreed.
        for notice in [false, true] {
            let (a, b) = UnixStream::pair().unwrap();
            let destination = thread::spawn(move || {
                let mut ch = Channel::from(b);
                let header = ch.recv_request_header().unwrap();
                assert_eq!(header.command, Command::State);
                ch.read_payload(header.length).unwrap();
                // Nothing else came: Complete waits for this answer, which never comes.
                ch.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                let mut byte = [0u8; 1];
                assert!(std::io::Read::read(&mut ch, &mut byte).is_err());
            });
            let mut ch = Channel::from(a);
            ch.send_request(Command::State, b"s").unwrap();
            let done = complete(&mut ch, 1, notice, &mut || panic!("nothing to silence"));
            assert!(matches!(done, Err(Unfinished::NotRun(_))), "{done:?}");
            destination.join().unwrap();
        }
    }

    /// A destination that takes Complete and then ends or keeps silent, from a script: the
    /// notice or not, then the end of the connection or silence.
    fn scripted(notice_sent: bool, then_silent: bool) -> (Result<CompleteReply, Unfinished>, u32) {
        let (a, b) = UnixStream::pair().unwrap();
        let destination = thread::spawn(move || {
            let mut ch = Channel::from(b);
            let header = ch.recv_request_header().unwrap();
            assert_eq!(header.command, Command::Complete);
            if notice_sent {
                ch.send_response(&Response::Ok(START_NOTICE.to_vec()))
                    .unwrap();
            }
            if then_silent {
                // Until the source silences it.
                let mut byte = [0u8; 1];
                let _ = std::io::Read::read(&mut ch, &mut byte);
            }
        });
        a.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let shut = a.try_clone().unwrap();
        let mut silenced = 0;
        let done = complete(&mut Channel::from(a), 0, true, &mut || {
            // Ends the destination's wait: it closes its end.
            silenced += 1;
            shut.shutdown(std::net::Shutdown::Write).unwrap();
            true
        });
        // A destination still waiting (it sent the notice) waits no more.
        let _ = shut.shutdown(std::net::Shutdown::Both);
        destination.join().unwrap();
        (done, silenced)
    }

    #[test]
    fn without_the_notice_an_ended_or_silenced_destination_never_ran_the_vm() {
        let (done, silenced) = scripted(false, false);
        assert!(matches!(done, Err(Unfinished::Ended(_))), "{done:?}");
        assert_eq!(silenced, 0, "an end needs no silencing");
        let (done, silenced) = scripted(false, true);
        assert!(matches!(done, Err(Unfinished::NotRun(_))), "{done:?}");
        assert_eq!(silenced, 1);
    }

    #[test]
    fn after_the_notice_the_vm_may_run_there() {
        for silent in [false, true] {
            let (done, _) = scripted(true, silent);
            assert!(matches!(done, Err(Unfinished::MayRun(_))), "{done:?}");
        }
    }

    #[test]
    fn a_destination_failure_reaches_the_source() {
        let mut recorder = Recorder::new();
        recorder.refuse = Some(Command::Config);
        let (result, dest, e) = run(recorder, |ch| {
            start(ch, &start_msg(false, &[])).unwrap();
            ch.request(Command::Config, b"{}").unwrap_err()
        });
        assert!(
            matches!(&e, ProtocolError::Remote(m) if m == "Cannot apply Config: no room"),
            "{e}"
        );
        assert!(matches!(
            result,
            Err(ProtocolError::Destination {
                command: Command::Config,
                ..
            })
        ));
        assert!(!dest.completed);
    }

    #[test]
    fn a_protocol_violation_reaches_the_source() {
        let (result, _, e) = run(Recorder::new(), |ch| {
            start(ch, &start_msg(false, &[])).unwrap();
            let ranges = MemoryRanges(vec![(0, 10)]);
            ch.send_memory(&ranges, |_, _| Ok(())).unwrap_err()
        });
        assert_eq!(
            e.to_string(),
            "The other side failed: Unexpected Memory request after Start; \
             expected Config (memory is copied, not shared) or Abandon"
        );
        assert!(matches!(result, Err(ProtocolError::Unexpected { .. })));
    }

    #[test]
    fn memory_outside_the_guest_is_refused() {
        let (result, _, e) = run(Recorder::new(), |ch| {
            start(ch, &start_msg(false, &[])).unwrap();
            ch.request(Command::Config, b"{}").unwrap();
            let ranges = MemoryRanges(vec![(GUEST as u64 - 1, 2)]);
            ch.send_memory(&ranges, |_, _| Ok(())).unwrap_err()
        });
        assert!(
            e.to_string()
                .contains("Cannot access guest memory at 0xffff: outside the guest"),
            "{e}"
        );
        assert!(matches!(result, Err(ProtocolError::MemoryAccess { .. })));
    }

    #[test]
    fn abandon() {
        let (result, dest, ()) = run(Recorder::new(), |ch| {
            start(ch, &start_msg(false, &[])).unwrap();
            ch.request(Command::Config, b"{}").unwrap();
            ch.request(Command::Abandon, b"").unwrap();
        });
        assert_eq!(result.unwrap(), Outcome::Abandoned);
        assert!(!dest.completed);
    }

    #[test]
    fn a_vanished_source_is_an_error() {
        let (result, _, ()) = run(Recorder::new(), |ch| {
            start(ch, &start_msg(false, &[])).unwrap();
        });
        assert!(matches!(
            result,
            Err(ProtocolError::Io("reading the request header", _))
        ));
    }

    #[test]
    fn tcp_cannot_carry_local_migration_or_backends() {
        let listener = crate::Listener::bind_tcp("127.0.0.1:0").unwrap();
        let url = listener.local_url().unwrap();
        let mut client = Channel::connect(&url).unwrap();
        let mut server = listener.accept().unwrap();
        // The source refuses before sending anything.
        let e = start(&mut client, &start_msg(true, &[])).unwrap_err();
        assert!(matches!(e, ProtocolError::NeedsUnix(_)));
        // A source that does not check is refused by the destination.
        let source = thread::spawn(move || {
            let msg = start_msg(false, &[("net0", "virtio-net-tap", 1)]);
            client.request(Command::Start, &to_json(&msg)).unwrap_err()
        });
        let result = receive(&mut server, Limits::default(), &mut Recorder::new());
        assert!(matches!(
            result,
            Err(ProtocolError::NeedsUnix("Backend transfer"))
        ));
        let e = source.join().unwrap();
        assert!(
            e.to_string()
                .contains("Backend transfer needs a UNIX domain socket"),
            "{e}"
        );
    }
}
