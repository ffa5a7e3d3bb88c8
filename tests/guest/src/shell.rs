//! The main loop: heartbeat, serial input, commands, power button, and the
//! memory dirtier when no other CPU runs it.
//!
//! Interrupts stay off; the loop spins on the TSC (native speed at CPL3) and
//! only touches the UART about once a millisecond and the GED's event
//! register (power button, PCI hot-plug) about every 10 ms, since every port
//! or MMIO access is a VM exit. Each iteration counts on the boot CPU's counter (`cpus`).

use baton_test_guest::acpi::{self, Fadt, MAX_CPUS};
use baton_test_guest::command::{self, Command};
use baton_test_guest::line::{Event, LineBuffer};
use baton_test_guest::periodic::Periodic;
use baton_test_guest::protocol::{self, Action, Status};

use crate::devices::{self, Devices};
use crate::hotplug::HotplugRegs;
use crate::phys::IdentityMap;
use crate::power::{self, GedEvents};
use crate::serial::{self, emit};
use crate::time::Clock;

const INPUT_POLL_MS: u64 = 1;
const POWER_BUTTON_POLL_MS: u64 = 10;

/// What the loop needs from boot.
pub struct Machine {
    /// Enabled processors.
    pub cpus: u32,
    /// RAM bytes.
    pub mem_bytes: u64,
    /// Heartbeat period; 0 = none.
    pub heartbeat_ms: u64,
    /// Power registers, if ACPI had a FADT.
    pub fadt: Option<Fadt>,
    /// The GED's event register, if ACPI had a usable GED.
    pub ged: Option<GedEvents>,
    /// The PCI hot-plug registers, if ACPI named them.
    pub hotplug: Option<HotplugRegs>,
    /// Guest memory access, for memory-mapped power registers.
    pub mem: IdentityMap,
    /// The calibrated TSC.
    pub clock: Clock,
    /// virtio devices.
    pub devices: Devices,
    /// Devices signal with MSI-X rather than being polled.
    pub interrupts: bool,
}

/// Runs forever (until the machine powers off or resets).
pub fn run(mut machine: Machine) -> ! {
    let clock = machine.clock;
    let now = clock.now();
    let mut heartbeat_timer =
        (machine.heartbeat_ms != 0).then(|| Periodic::new(now, clock.ticks(machine.heartbeat_ms)));
    let mut poll_timer = Periodic::new(now, clock.ticks(INPUT_POLL_MS));
    let mut button_timer = Periodic::new(now, clock.ticks(POWER_BUTTON_POLL_MS));
    let mut heartbeat = 0u64;
    let mut seen_irqs = 0u64;
    let mut timer_poll = Periodic::new(now, clock.ticks(10));
    let mut lines = LineBuffer::new();
    loop {
        crate::cpus::tick_boot_cpu();
        crate::dirtier::step(0);
        let now = clock.now();
        if heartbeat_timer.as_mut().is_some_and(|t| t.due(now)) {
            heartbeat += 1;
            emit(|w| protocol::heartbeat(w, heartbeat));
        }
        let events = match &machine.ged {
            Some(ged) if button_timer.due(now) => ged.take(),
            _ => 0,
        };
        if events & acpi::GED_EVENT_PCI_HOTPLUG != 0 {
            if let Some(regs) = &machine.hotplug {
                devices::hotplug(&mut machine.devices, regs);
            }
        }
        if events & acpi::GED_EVENT_POWER_BUTTON != 0 {
            emit(protocol::power_button_pressed);
            let status = status(&machine, heartbeat);
            execute(&Command::Poweroff, &status, &mut machine);
        }
        let uptime_us = clock.uptime_us();
        // In interrupt mode the rings are looked at when an interrupt came, and every
        // 10 ms for smoltcp's timers.
        let irqs = crate::irq::count();
        let due = !machine.interrupts || irqs != seen_irqs || timer_poll.due(now);
        if due {
            seen_irqs = irqs;
            for nic in &mut machine.devices.nics {
                nic.poll(uptime_us);
            }
        }
        if poll_timer.due(now) {
            while let Some(byte) = serial::read_byte() {
                match lines.push(byte) {
                    Some(Event::Line(line)) => {
                        if let Some(command) = command::parse(line) {
                            let status = status(&machine, heartbeat);
                            execute(&command, &status, &mut machine);
                        }
                    }
                    Some(Event::TooLong) => emit(protocol::line_too_long),
                    None => {}
                }
            }
        }
        core::hint::spin_loop();
    }
}

fn status(machine: &Machine, heartbeat: u64) -> Status {
    Status {
        cpus: machine.cpus,
        mem_bytes: machine.mem_bytes,
        heartbeat,
        uptime_us: machine.clock.uptime_us(),
    }
}

/// Replies to `command`, then powers off or resets if it says so.
fn execute(command: &Command<'_>, status: &Status, machine: &mut Machine) {
    let mut action = Action::Continue;
    emit(|w| {
        action = protocol::reply(w, command, status)?;
        Ok(())
    });
    let fadt = machine.fadt.as_ref();
    match action {
        Action::Continue => return,
        Action::Device => {
            let clock = machine.clock;
            return device_command(command, machine.cpus, &mut machine.devices, &clock);
        }
        Action::Poweroff => power::poweroff(fadt, &machine.mem, &machine.clock),
        Action::Reboot => power::reboot(fadt, &machine.mem, &machine.clock),
    }
    emit(|w| protocol::action_failed(w, action));
}

/// Answers a command about the machine.
fn device_command(command: &Command<'_>, cpus: u32, d: &mut Devices, clock: &Clock) {
    let now_us = clock.uptime_us();
    let missing = |what: &'static str| emit(|w| protocol::device_error(w, what, &"none found"));
    match *command {
        Command::Net(n) => match d.nics.get(n as usize) {
            Some(nic) => emit(|w| protocol::net(w, n, &nic.status())),
            None => emit(|w| protocol::device_error(w, "net", &format_args!("no nic {n}"))),
        },
        Command::DiskInfo => match &mut d.disk {
            Some(disk) => devices::disk_info(disk),
            None => missing("disk"),
        },
        Command::DiskRead { sector, count } => match &mut d.disk {
            Some(disk) => devices::disk_read(disk, sector, count),
            None => missing("disk"),
        },
        Command::DiskWrite {
            sector,
            count,
            byte,
        } => match &mut d.disk {
            Some(disk) => devices::disk_write(disk, sector, count, byte),
            None => missing("disk"),
        },
        Command::Ping { addr, count } => match d.nics.first_mut() {
            Some(nic) => {
                if let Err(e) = nic.start_ping(addr, count, now_us) {
                    emit(|w| protocol::device_error(w, "ping", &e));
                }
            }
            None => emit(|w| protocol::device_error(w, "ping", &"no nic 0")),
        },
        Command::Chaos => devices::chaos(d, clock),
        Command::Cpus => {
            let mut counts = [0u64; MAX_CPUS];
            let counts = &mut counts[..crate::cpus::slots()];
            crate::cpus::counts(counts);
            emit(|w| protocol::cpus(w, cpus, counts));
        }
        Command::DirtyStatus => crate::dirtier::status(),
        Command::Dirty { mib, rate } => crate::dirtier::set(mib, rate),
        Command::DirtyCheck => crate::dirtier::check(),
        Command::Rng(n) => match &mut d.rng {
            Some(rng) => devices::rng(rng, n as usize),
            None => missing("rng"),
        },
        _ => {}
    }
}
