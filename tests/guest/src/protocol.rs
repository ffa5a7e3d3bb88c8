//! The serial protocol: every line the guest prints, and the commands it takes.
//!
//! Integration tests match these lines exactly, so changing one is a protocol
//! change. All output goes to COM1 (I/O port 0x3f8); every line ends with
//! `\r\n`. Numbers are unsigned decimal unless written `0x…`.
//!
//! # Boot
//!
//! ```text
//! baton-test-guest: booting
//! warning: …                              (zero or more, see below)
//! baton-test-guest: ready cpus=N mem_bytes=B tsc_khz=K tsc_source=S cmdline="C"
//! ```
//!
//! `booting` is printed first thing at CPL3. `cpus` counts enabled processors
//! in the ACPI MADT (0 if there is none), which the guest starts before
//! `ready` (see Processors below); `mem_bytes` sums the RAM (type 1)
//! entries of the PVH memory map; `tsc_source` is `hypervisor` (CPUID leaf
//! 0x40000010), `pit` (calibrated against PIT channel 2) or `assumed` (neither
//! worked; 1 GHz assumed). `C` is the kernel command line with non-printable
//! bytes shown as `?`. Commands are accepted once `ready` is out.
//!
//! Warnings: `warning: unknown option KEY`, `warning: bad value for KEY: VALUE`,
//! `warning: start_info: …`, `warning: acpi: …`. Among the last,
//! `warning: acpi: no power button` means the DSDT has no Generic Event Device
//! (see below), and `warning: acpi: power button register 0xA is not
//! accessible` that its register is outside what the guest may touch; either
//! way the guest does not watch for the power button. `warning: smp: …` says
//! that some processor was not started (below).
//!
//! # Processors
//!
//! Before `ready`, the boot CPU starts every other enabled processor in the
//! MADT (INIT and STARTUP IPIs through its xAPIC) and waits up to a second for
//! them all. Each one enters CPL3 and loops forever incrementing its own
//! 64-bit counter; the boot CPU counts its main-loop iterations. CPU index 0
//! is the boot CPU, then the others in MADT order. One that did not start in
//! time gets `warning: smp: cpu I (apic id A) did not start` (it may still
//! start later); one that cannot be asked gets `warning: smp: cpu I (apic id
//! A) cannot be started: …` (an APIC ID of 255 or more, no memory for its
//! stacks). A `warning: smp: …` that names no CPU means none was started:
//! there is no free page below 1 MiB for the start-up code, or the boot CPU's
//! APIC ID is not in the MADT (its APIC is not an xAPIC at 0xfee00000).
//!
//! # Heartbeat
//!
//! `heartbeat N`, N = 1, 2, 3 … every `heartbeat_ms` (kernel command line,
//! default 1000, 0 = off). N never repeats or goes back; after the guest was
//! held up (paused, migrated) it continues at the next N without catching up.
//!
//! # Commands
//!
//! One per line; CR or LF ends a line, blank lines are ignored, nothing is
//! echoed. Each command gets exactly one reply line:
//!
//! | command     | reply                                                      |
//! |-------------|------------------------------------------------------------|
//! | `status`    | `status: cpus=N mem_bytes=B heartbeat=N uptime_ms=T uptime_us=U` (T and U: time since just before `ready`, from the TSC; not corrected, so they go back if the TSC does) |
//! | `cpus`      | `cpus: n=N started=S counts=C0,C1,…` (N from the MADT; S processors running, the boot CPU included; Ci the loop counter of CPU i, 0 for one that never started; at least one entry, at most 256) |
//! | `mem`       | `mem: bytes=B mib=M` (M = B / 2^20, rounded down)          |
//! | `echo TEXT` | `echo: TEXT` (TEXT trimmed of surrounding blanks)          |
//! | `poweroff`  | `poweroff: bye`, then ACPI S5                              |
//! | `reboot`    | `reboot: bye`, then a reset                                |
//! | `help`      | `help: status cpus mem echo net disk rng ping dirty poweroff reboot help` |
//! | `net [N]`   | `net: nic=N mac=M ip=A/P rx_frames=.. tx_frames=.. echo_bytes=.. source_bytes=.. sink_bytes=.. sink_errors=.. udp_sent=.. connections=.. pairs=P pair_rx_frames=a/b/.. irqs=I mrg_rxbuf=0|1 indirect=0|1 merged=.. merge_errors=..` (frames received per queue pair; MSI-X interrupts taken; the virtio features in use; frames that came in several receive buffers) |
//! | `disk info` | `disk: sectors=N readonly=0|1 id=ID`                       |
//! | `disk read S C` | `disk: read sector=S count=C fnv=0xH` (FNV-1a 64 of the C sectors from S) |
//! | `disk write S C B` | `disk: wrote sector=S count=C` (C sectors from S filled with byte B) |
//! | `rng N`     | `rng: bytes=N hex=H` (N bytes read, H the first 32 in hex) |
//! | `chaos`     | `chaos: posted=N used=U needs_reset=0|1`: a hostile driver posted N malformed chains (a loop, memory that does not exist, a zero length, a read-only buffer, a `next` outside the table) to the entropy device, which returned U of them; then an available index far past the ring, after which the device asked for a reset (1) or not; then the guest resets the device and starts its driver again |
//! | `ping A [C]` | `ping: dst=A sent=C received=R` once C echo requests (default 5, 10 ms apart) went out from the first card and a second passed after the last |
//! | `dirty`     | `dirty: mib=M rate=R pages=N passes=P cursor=C written=W cpu=I` (the memory dirtier's state, see below) |
//! | `dirty M R` | the same line, once the buffer is M MiB and the writer runs at R MiB/s (0: stopped) |
//! | `dirty check` | `dirty: ok pages=N checked=K passes=P cursor=C`, or `dirty: bad pages=N checked=K bad_pages=B page=I word=W want=0xH got=0xH want_gen=G got_page=J got_gen=H passes=P cursor=C` (K pages written so far and checked, B of them wrong; the first is page I, word W) |
//! | other       | `error: unknown command 'WORD'`                            |
//!
//! A device command that cannot be done replies `error: TOPIC: PROBLEM`
//! (`error: disk: no disk`, `error: net: no nic 1` ...); one with bad
//! arguments replies `error: usage: …`.
//!
//! # Memory dirtier
//!
//! `dirty M R` allocates an M MiB buffer from the heap (1 to 32768; the first
//! time, or when M changes, which starts over with a new buffer) and keeps
//! rewriting its 4 KiB pages in order, page 0 to the last and again, at about
//! R MiB/s (paced on the TSC; after a stall it does not catch up). Pass P
//! (from 0, the first write of each page) writes generation P into every u64
//! of each page, as [`crate::dirty::stamp`]. `dirty M 0` stops the writer and
//! keeps the buffer; `dirty M R` with the same M changes the rate and goes on
//! where the writer was. The writer runs on CPU 1 when it started (`cpu=1`),
//! otherwise in slices of at most 64 pages in the boot CPU's main loop
//! (`cpu=0`). In the state line, N is the buffer's pages, P the passes
//! completed, C the next page to write, W the pages written since the buffer
//! was allocated (W / 256 / seconds is the rate achieved). The first pass may
//! fall behind R: the hypervisor provides memory at the first touch of a page.
//!
//! `dirty check` holds the writer back and compares every page written so far
//! with what was last written there: generation P before page C, P - 1 from C
//! on (nothing from C on during the first pass). It runs on the boot CPU,
//! which serves nothing else meanwhile; it reads at native speed (GiB/s).
//! A wrong page is reported with what its first wrong word should hold
//! (`want`, generation `want_gen`) and holds (`got`, decoded as page
//! `got_page` and generation `got_gen`; generations modulo 2^32): an older
//! generation means a write was lost. `error: dirty: no buffer` before the
//! first `dirty M R`, and `error: dirty: cannot allocate M MiB` when the heap
//! (up to 256 MiB, less what the devices and CPUs use) cannot hold it.
//!
//! # Network services
//!
//! Every network card with an address (`net=` on the command line) answers
//! ARP and ping, and serves (all unless `services=` names fewer), over TCP: port 7, echo; port 5001, the sequence
//! stream ([`crate::stream`]) sent from offset 0 to whoever connects, as fast
//! as the connection takes it; port 5002, a sink that checks the sequence
//! stream it receives (`sink_errors` counts wrong bytes). Over UDP, port 5003:
//! a datagram from the host subscribes its sender to one datagram per
//! millisecond, each holding the next u64 sequence number (little-endian);
//! another datagram from the same sender unsubscribes it. Each TCP port takes
//! up to four connections at once, each with its own stream from offset 0. A
//! card with several queue pairs (MQ) uses them all: frames leave on the pair
//! their TCP or UDP ports hash to.
//!
//! A line longer than 128 bytes is dropped with `error: line too long`. If the
//! machine is still running about a second after `poweroff` or `reboot`, the
//! guest prints `error: poweroff failed` or `error: reboot failed` and goes on
//! taking commands. After `reboot` the sequence starts again at `booting`.
//!
//! # Power button
//!
//! If the DSDT (from the FADT) has a Generic Event Device (`_HID "ACPI0013"`)
//! with a `Memory32Fixed` event register in its `_CRS`, the guest reads that
//! byte about every 10 ms (each read is a VM exit; reading clears it).
//! Interrupts stay off, so the GED's interrupt is not used. When bit 0 (power
//! button) is set, the guest prints `power-button: pressed` and then does
//! exactly what `poweroff` does: `poweroff: bye`, ACPI S5, and
//! `error: poweroff failed` if the machine is still on a second later.
//!
//! # Crashes
//!
//! `panic: MESSAGE at FILE:LINE` for a Rust panic, or
//! `EXCEPTION vec=V err=0xE rip=0xR cs=0xC rsp=0xS cr2=0xA` for a CPU
//! exception (V decimal); then the CPU halts for good.

use core::fmt::{self, Display, Write};

use crate::cmdline::Warning;
use crate::command::Command;
use crate::dirty::{self, Mismatch, Progress};
use crate::text::Printable;

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    /// CPUID leaf 0x40000010 (EAX, kHz), as set by the hypervisor.
    Hypervisor,
    /// Timed against PIT channel 2.
    Pit,
    /// Nothing worked; a guess.
    Assumed,
}

impl Display for TscSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hypervisor => "hypervisor",
            Self::Pit => "pit",
            Self::Assumed => "assumed",
        })
    }
}

/// What the `ready` line reports.
#[derive(Clone, Copy, Debug)]
pub struct Ready<'a> {
    /// Enabled processors in the MADT.
    pub cpus: u32,
    /// RAM in the PVH memory map.
    pub mem_bytes: u64,
    /// TSC frequency.
    pub tsc_khz: u64,
    /// Where `tsc_khz` came from.
    pub tsc_source: TscSource,
    /// The kernel command line.
    pub cmdline: &'a [u8],
}

/// Counters for the `status` reply.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    /// Enabled processors in the MADT.
    pub cpus: u32,
    /// RAM in the PVH memory map.
    pub mem_bytes: u64,
    /// The last heartbeat number printed (0 before the first).
    pub heartbeat: u64,
    /// Microseconds since the guest started timing (just before `ready`).
    pub uptime_us: u64,
}

/// What the caller must do after a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing: wait for the next line.
    Continue,
    /// Enter ACPI S5.
    Poweroff,
    /// Reset the machine.
    Reboot,
    /// A command about the machine (devices, processors, the memory
    /// dirtier): the code that drives it replies.
    Device,
}

/// One network card's state for the `net` reply.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStatus {
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its IPv4 address and prefix length, if configured.
    pub ip: Option<([u8; 4], u8)>,
    /// Frames received and sent.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes echoed on TCP port 7.
    pub echo_bytes: u64,
    /// Bytes of the stream sent on TCP port 5001.
    pub source_bytes: u64,
    /// Bytes of the stream received on TCP port 5002.
    pub sink_bytes: u64,
    /// Wrong bytes among them.
    pub sink_errors: u64,
    /// Datagrams sent on UDP port 5003.
    pub udp_sent: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// Queue pairs in use.
    pub pairs: u64,
    /// Frames received on each of the first 8 pairs.
    pub pair_rx_frames: [u64; 8],
    /// MSI-X interrupts the guest took (all devices).
    pub irqs: u64,
    /// VIRTIO_NET_F_MRG_RXBUF is in use.
    pub mrg_rxbuf: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC is in use.
    pub indirect: bool,
    /// Frames that came in several receive buffers.
    pub merged: u64,
    /// Frames whose further buffers were missing or did not fit.
    pub merge_errors: u64,
}

/// `net: nic=N mac=M ip=A/P rx_frames=.. ...`
pub fn net(w: &mut impl Write, nic: u64, s: &NetStatus) -> fmt::Result {
    let m = s.mac;
    write!(
        w,
        "net: nic={nic} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )?;
    match s.ip {
        Some((a, p)) => write!(w, "ip={}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])?,
        None => w.write_str("ip=none")?,
    }
    write!(
        w,
        " rx_frames={} tx_frames={} echo_bytes={} source_bytes={} sink_bytes={} sink_errors={} \
         udp_sent={} connections={} pairs={} pair_rx_frames=",
        s.rx_frames,
        s.tx_frames,
        s.echo_bytes,
        s.source_bytes,
        s.sink_bytes,
        s.sink_errors,
        s.udp_sent,
        s.connections,
        s.pairs
    )?;
    let shown = (s.pairs as usize).clamp(1, s.pair_rx_frames.len());
    for (i, n) in s.pair_rx_frames[..shown].iter().enumerate() {
        let sep = if i == 0 { "" } else { "/" };
        write!(w, "{sep}{n}")?;
    }
    write!(
        w,
        " irqs={} mrg_rxbuf={} indirect={} merged={} merge_errors={}\r\n",
        s.irqs,
        u8::from(s.mrg_rxbuf),
        u8::from(s.indirect),
        s.merged,
        s.merge_errors
    )
}

/// `cpus: n=N started=S counts=C0,C1,…`; `counts` has one entry per CPU
/// index, 0 for one that is not running.
pub fn cpus(w: &mut impl Write, n: u32, counts: &[u64]) -> fmt::Result {
    let started = counts.iter().filter(|&&c| c != 0).count();
    write!(w, "cpus: n={n} started={started} counts=")?;
    for (i, c) in counts.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        write!(w, "{sep}{c}")?;
    }
    w.write_str("\r\n")
}

/// The memory dirtier's state, for the `dirty` replies.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirtyStatus {
    /// Buffer size in MiB (0: no buffer yet).
    pub mib: u64,
    /// Rate in MiB/s; 0 when stopped.
    pub rate: u64,
    /// Where the writer is.
    pub progress: Progress,
    /// Pages written since the buffer was allocated.
    pub written: u64,
    /// The CPU index that runs the writer.
    pub cpu: u32,
}

/// `dirty: mib=M rate=R pages=N passes=P cursor=C written=W cpu=I`
pub fn dirty_status(w: &mut impl Write, s: &DirtyStatus) -> fmt::Result {
    let p = s.progress;
    write!(
        w,
        "dirty: mib={} rate={} pages={} passes={} cursor={} written={} cpu={}\r\n",
        s.mib, s.rate, p.pages, p.passes, p.cursor, s.written, s.cpu
    )
}

/// The first wrong page `dirty check` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadPage {
    /// Its index.
    pub page: u64,
    /// Its first wrong word.
    pub mismatch: Mismatch,
}

/// `dirty: ok pages=N checked=K passes=P cursor=C` or `dirty: bad pages=N
/// checked=K bad_pages=B page=I word=W want=0xH got=0xH want_gen=G got_page=J
/// got_gen=H passes=P cursor=C`, for `bad_pages` wrong pages among the
/// written ones, the first of them `first`.
pub fn dirty_check(
    w: &mut impl Write,
    p: &Progress,
    bad_pages: u64,
    first: Option<BadPage>,
) -> fmt::Result {
    let (pages, checked, passes, cursor) = (p.pages, p.written(), p.passes, p.cursor);
    let Some(BadPage { page, mismatch: m }) = first else {
        return write!(
            w,
            "dirty: ok pages={pages} checked={checked} passes={passes} cursor={cursor}\r\n"
        );
    };
    let (got_page, got_gen, _) = dirty::decode(m.got);
    let want_gen = p.generation(page).unwrap_or_default() & 0xffff_ffff;
    write!(
        w,
        "dirty: bad pages={pages} checked={checked} bad_pages={bad_pages} page={page} word={} \
         want={:#018x} got={:#018x} want_gen={want_gen} got_page={got_page} got_gen={got_gen} \
         passes={passes} cursor={cursor}\r\n",
        m.word, m.want, m.got
    )
}

/// `error: TOPIC: PROBLEM`
pub fn device_error(w: &mut impl Write, topic: &str, problem: &dyn Display) -> fmt::Result {
    write!(w, "error: {topic}: {problem}\r\n")
}

/// `disk: sectors=N readonly=0|1 id=ID`
pub fn disk_info(w: &mut impl Write, sectors: u64, readonly: bool, id: &[u8]) -> fmt::Result {
    write!(
        w,
        "disk: sectors={sectors} readonly={} id={}\r\n",
        u8::from(readonly),
        Printable(id)
    )
}

/// `disk: read sector=S count=C fnv=0xH`
pub fn disk_read(w: &mut impl Write, sector: u64, count: u64, fnv: u64) -> fmt::Result {
    write!(
        w,
        "disk: read sector={sector} count={count} fnv={fnv:#018x}\r\n"
    )
}

/// `disk: wrote sector=S count=C`
pub fn disk_wrote(w: &mut impl Write, sector: u64, count: u64) -> fmt::Result {
    write!(w, "disk: wrote sector={sector} count={count}\r\n")
}

/// `ping: dst=A.B.C.D sent=N received=M`
pub fn ping(w: &mut impl Write, dst: [u8; 4], sent: u64, received: u64) -> fmt::Result {
    let [a, b, c, d] = dst;
    write!(
        w,
        "ping: dst={a}.{b}.{c}.{d} sent={sent} received={received}\r\n"
    )
}

/// `chaos: posted=N used=U needs_reset=0|1`
pub fn chaos(w: &mut impl Write, posted: u16, used: u16, needs_reset: bool) -> fmt::Result {
    write!(
        w,
        "chaos: posted={posted} used={used} needs_reset={}\r\n",
        u8::from(needs_reset)
    )
}

/// `rng: bytes=N hex=H` (H: the first 32 bytes)
pub fn rng(w: &mut impl Write, bytes: &[u8]) -> fmt::Result {
    write!(w, "rng: bytes={} hex=", bytes.len())?;
    for b in bytes.iter().take(32) {
        write!(w, "{b:02x}")?;
    }
    w.write_str("\r\n")
}

/// `hotplug: added slot=N kind=KIND` (KIND: net, disk, rng, or none when
/// nothing was started on it)
pub fn hotplug_added(w: &mut impl Write, slot: u8, kind: &str) -> fmt::Result {
    write!(w, "hotplug: added slot={slot} kind={kind}\r\n")
}

/// `hotplug: ejected slot=N kind=KIND` (KIND as for [`hotplug_added`])
pub fn hotplug_ejected(w: &mut impl Write, slot: u8, kind: &str) -> fmt::Result {
    write!(w, "hotplug: ejected slot={slot} kind={kind}\r\n")
}

/// `baton-test-guest: booting`
pub fn booting(w: &mut impl Write) -> fmt::Result {
    w.write_str("baton-test-guest: booting\r\n")
}

/// The `ready` line.
pub fn ready(w: &mut impl Write, r: &Ready<'_>) -> fmt::Result {
    write!(
        w,
        "baton-test-guest: ready cpus={} mem_bytes={} tsc_khz={} tsc_source={} cmdline=\"{}\"\r\n",
        r.cpus,
        r.mem_bytes,
        r.tsc_khz,
        r.tsc_source,
        Printable(r.cmdline)
    )
}

/// A warning about the kernel command line.
pub fn option_warning(w: &mut impl Write, warning: &Warning<'_>) -> fmt::Result {
    match warning {
        Warning::UnknownOption(key) => {
            write!(w, "warning: unknown option {}\r\n", Printable(key))
        }
        Warning::BadValue { key, value } => write!(
            w,
            "warning: bad value for {}: {}\r\n",
            Printable(key),
            Printable(value)
        ),
    }
}

/// `warning: TOPIC: PROBLEM`, for boot information that is missing or bad.
pub fn warning(w: &mut impl Write, topic: &str, problem: &dyn Display) -> fmt::Result {
    write!(w, "warning: {topic}: {problem}\r\n")
}

/// `heartbeat N`
pub fn heartbeat(w: &mut impl Write, n: u64) -> fmt::Result {
    write!(w, "heartbeat {n}\r\n")
}

/// `power-button: pressed`
pub fn power_button_pressed(w: &mut impl Write) -> fmt::Result {
    w.write_str("power-button: pressed\r\n")
}

/// `error: line too long`
pub fn line_too_long(w: &mut impl Write) -> fmt::Result {
    w.write_str("error: line too long\r\n")
}

/// `error: poweroff failed` or `error: reboot failed`, once the machine
/// outlived the request.
pub fn action_failed(w: &mut impl Write, action: Action) -> fmt::Result {
    match action {
        Action::Continue | Action::Device => Ok(()),
        Action::Poweroff => w.write_str("error: poweroff failed\r\n"),
        Action::Reboot => w.write_str("error: reboot failed\r\n"),
    }
}

/// `panic: MESSAGE at FILE:LINE`
pub fn panic(w: &mut impl Write, message: &dyn Display, file: &str, line: u32) -> fmt::Result {
    write!(w, "panic: {message} at {file}:{line}\r\n")
}

/// Writes the reply to `command` and says what to do next.
pub fn reply(w: &mut impl Write, command: &Command<'_>, s: &Status) -> Result<Action, fmt::Error> {
    match command {
        Command::Status => write!(
            w,
            "status: cpus={} mem_bytes={} heartbeat={} uptime_ms={} uptime_us={}\r\n",
            s.cpus,
            s.mem_bytes,
            s.heartbeat,
            s.uptime_us / 1000,
            s.uptime_us
        )?,
        Command::Mem => write!(
            w,
            "mem: bytes={} mib={}\r\n",
            s.mem_bytes,
            s.mem_bytes >> 20
        )?,
        Command::Echo(text) => write!(w, "echo: {}\r\n", Printable(text))?,
        Command::Poweroff => {
            w.write_str("poweroff: bye\r\n")?;
            return Ok(Action::Poweroff);
        }
        Command::Reboot => {
            w.write_str("reboot: bye\r\n")?;
            return Ok(Action::Reboot);
        }
        Command::Help => w.write_str(
            "help: status cpus mem echo net disk rng ping dirty poweroff reboot help\r\n",
        )?,
        Command::Usage(usage) => write!(w, "error: usage: {usage}\r\n")?,
        // Device commands are answered by the device code with the functions below.
        Command::Net(_)
        | Command::DiskInfo
        | Command::DiskRead { .. }
        | Command::DiskWrite { .. }
        | Command::Rng(_)
        | Command::Ping { .. }
        | Command::Chaos
        | Command::Cpus
        | Command::DirtyStatus
        | Command::Dirty { .. }
        | Command::DirtyCheck => return Ok(Action::Device),
        Command::Unknown(word) => write!(w, "error: unknown command '{}'\r\n", Printable(word))?,
    }
    Ok(Action::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parse;

    const STATUS: Status = Status {
        cpus: 4,
        mem_bytes: 512 << 20,
        heartbeat: 7,
        uptime_us: 1_234_567,
    };

    fn run(line: &[u8]) -> (String, Action) {
        let mut out = String::new();
        let command = parse(line).expect("not blank");
        let action = reply(&mut out, &command, &STATUS).expect("String never fails");
        (out, action)
    }

    #[test]
    fn boot_lines() {
        let mut out = String::new();
        booting(&mut out).unwrap();
        option_warning(&mut out, &Warning::UnknownOption(b"quiet")).unwrap();
        option_warning(
            &mut out,
            &Warning::BadValue {
                key: b"heartbeat_ms",
                value: b"x",
            },
        )
        .unwrap();
        warning(&mut out, "acpi", &"no RSDP").unwrap();
        ready(
            &mut out,
            &Ready {
                cpus: 4,
                mem_bytes: 536870912,
                tsc_khz: 2_000_000,
                tsc_source: TscSource::Pit,
                cmdline: b"heartbeat_ms=200\n",
            },
        )
        .unwrap();
        heartbeat(&mut out, 1).unwrap();
        assert_eq!(
            out,
            "baton-test-guest: booting\r\n\
             warning: unknown option quiet\r\n\
             warning: bad value for heartbeat_ms: x\r\n\
             warning: acpi: no RSDP\r\n\
             baton-test-guest: ready cpus=4 mem_bytes=536870912 tsc_khz=2000000 \
             tsc_source=pit cmdline=\"heartbeat_ms=200?\"\r\n\
             heartbeat 1\r\n"
        );
    }

    #[test]
    fn replies() {
        let cases: [(&[u8], &str); 6] = [
            (
                b"status",
                "status: cpus=4 mem_bytes=536870912 heartbeat=7 uptime_ms=1234 \
                 uptime_us=1234567\r\n",
            ),
            (b"mem", "mem: bytes=536870912 mib=512\r\n"),
            (b"echo hi  there ", "echo: hi  there\r\n"),
            (b"echo", "echo: \r\n"),
            (
                b"help",
                "help: status cpus mem echo net disk rng ping dirty poweroff reboot help\r\n",
            ),
            (b"bogus\x1b arg", "error: unknown command 'bogus?'\r\n"),
        ];
        for (line, expected) in cases {
            assert_eq!(run(line), (expected.to_string(), Action::Continue));
        }
    }

    #[test]
    fn machine_commands_are_left_to_the_caller() {
        for line in [
            &b"cpus"[..],
            b"dirty",
            b"dirty 64 200",
            b"dirty check",
            b"net",
        ] {
            assert_eq!(run(line), (String::new(), Action::Device), "{line:?}");
        }
    }

    #[test]
    fn cpus_line() {
        let mut out = String::new();
        cpus(&mut out, 4, &[123, 456, 0, 1011]).unwrap();
        cpus(&mut out, 0, &[7]).unwrap();
        assert_eq!(
            out,
            "cpus: n=4 started=3 counts=123,456,0,1011\r\ncpus: n=0 started=1 counts=7\r\n"
        );
    }

    #[test]
    fn dirty_lines() {
        let progress = Progress {
            pages: 16384,
            passes: 3,
            cursor: 100,
        };
        let mut out = String::new();
        dirty_status(&mut out, &DirtyStatus::default()).unwrap();
        dirty_status(
            &mut out,
            &DirtyStatus {
                mib: 64,
                rate: 200,
                progress,
                written: 49252,
                cpu: 1,
            },
        )
        .unwrap();
        dirty_check(&mut out, &progress, 0, None).unwrap();
        let first_pass = Progress {
            passes: 0,
            ..progress
        };
        dirty_check(&mut out, &first_pass, 0, None).unwrap();
        // Page 5 should be in generation 3 but still holds generation 2: a lost write.
        let bad = BadPage {
            page: 5,
            mismatch: Mismatch {
                word: 0,
                want: dirty::stamp(5, 3, 0),
                got: dirty::stamp(5, 2, 0),
            },
        };
        dirty_check(&mut out, &progress, 2, Some(bad)).unwrap();
        assert_eq!(
            out,
            format!(
                "dirty: mib=0 rate=0 pages=0 passes=0 cursor=0 written=0 cpu=0\r\n\
                 dirty: mib=64 rate=200 pages=16384 passes=3 cursor=100 written=49252 cpu=1\r\n\
                 dirty: ok pages=16384 checked=16384 passes=3 cursor=100\r\n\
                 dirty: ok pages=16384 checked=100 passes=0 cursor=100\r\n\
                 dirty: bad pages=16384 checked=16384 bad_pages=2 page=5 word=0 want={:#018x} \
                 got={:#018x} want_gen=3 got_page=5 got_gen=2 passes=3 cursor=100\r\n",
                dirty::stamp(5, 3, 0),
                dirty::stamp(5, 2, 0)
            )
        );
    }

    #[test]
    fn power_commands_say_bye_then_act() {
        assert_eq!(
            run(b"poweroff"),
            ("poweroff: bye\r\n".to_string(), Action::Poweroff)
        );
        assert_eq!(
            run(b"reboot"),
            ("reboot: bye\r\n".to_string(), Action::Reboot)
        );
        let mut out = String::new();
        action_failed(&mut out, Action::Poweroff).unwrap();
        action_failed(&mut out, Action::Reboot).unwrap();
        line_too_long(&mut out).unwrap();
        power_button_pressed(&mut out).unwrap();
        assert_eq!(
            out,
            "error: poweroff failed\r\nerror: reboot failed\r\nerror: line too long\r\n\
             power-button: pressed\r\n"
        );
    }
}
