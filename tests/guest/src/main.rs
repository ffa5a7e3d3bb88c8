//! baton's test guest: a `no_std` program that boots through the PVH entry
//! point, then serves a line protocol on COM1 (see
//! [`baton_test_guest::protocol`]).
//!
//! [`entry`] gets from the 32-bit PVH entry to [`baton_main`] at CPL3, where
//! everything else runs. The pure logic is in the library crate
//! (`src/lib.rs`); the modules here reach hardware.
//!
//! It is built for the host target by the workspace's `cargo build`, as a
//! static, non-PIE ELF laid out by `linker.ld` (flags in `build.rs`): load
//! segments from 1 MiB, and a PT_NOTE with the Xen PHYS32_ENTRY note that PVH
//! loaders (linux-loader, QEMU, Cloud Hypervisor, Firecracker) look for. By
//! hand, with QEMU: `qemu-system-x86_64 -machine q35 -m 512 -smp 4 -kernel
//! target/debug/baton-test-guest -append heartbeat_ms=200 -nographic -nic none`.

#![no_std]
#![no_main]

// rustc refuses a `no_std` binary that unwinds ("unwinding panics are not
// supported without std"): the `eh_personality` lang item only exists in std.
// Say what to change rather than leave that message to be decoded.
#[cfg(not(panic = "abort"))]
compile_error!(
    "baton-test-guest must be built with panic = \"abort\": set it in the workspace's \
     [profile.dev] and [profile.release] (tests and build scripts still unwind)"
);

extern crate alloc;

mod card;
mod chaos;
mod cpus;
mod devices;
mod dirtier;
mod entry;
mod hal;
mod heap;
mod hotplug;
mod io;
mod irq;
mod lapic;
mod mem;
mod net;
mod paging;
mod phys;
mod power;
mod serial;
mod shell;
mod time;

use baton_test_guest::acpi::{self, PhysMem};
use baton_test_guest::protocol::{self, Ready};
use baton_test_guest::{cmdline, start_info};

use crate::phys::IdentityMap;
use crate::serial::emit;

/// The Rust entry point, called at CPL3 by the entry stub with the physical
/// address of `hvm_start_info`.
pub extern "C" fn baton_main(start_info_paddr: u64) -> ! {
    serial::init();
    emit(protocol::booting);

    let mem = IdentityMap::new();
    let info = read_start_info(&mem, start_info_paddr);
    let cmdline = mem.c_string(info.cmdline_paddr, start_info::MAX_CMDLINE);
    let options = cmdline::parse(cmdline, |w| emit(|out| protocol::option_warning(out, &w)));

    let memmap = mem.read(info.memmap_paddr, info.memmap_len());
    if info.memmap_entries == 0 || memmap.is_none() {
        emit(|w| protocol::warning(w, "start_info", &"no memory map"));
    }
    let mem_bytes = start_info::ram_bytes(memmap.unwrap_or_default());

    let tables = acpi::parse(&mem, info.rsdp_paddr, |e| {
        emit(|w| protocol::warning(w, "acpi", &e));
    })
    .unwrap_or_else(|e| {
        emit(|w| protocol::warning(w, "acpi", &e));
        acpi::Tables::default()
    });
    if tables.cpus.is_none() {
        emit(|w| protocol::warning(w, "acpi", &"no MADT"));
    }
    if tables.fadt.is_none() {
        emit(|w| protocol::warning(w, "acpi", &"no FADT"));
    }
    let power_button = match tables.power_button {
        None => {
            emit(|w| protocol::warning(w, "acpi", &"no power button"));
            None
        }
        Some(addr) => power::GedEvents::new(addr, &mem).or_else(|| {
            let problem = format_args!("power button register {addr:#x} is not accessible");
            emit(|w| protocol::warning(w, "acpi", &problem));
            None
        }),
    };

    let hotplug = tables.pci_hotplug.and_then(|addr| {
        hotplug::HotplugRegs::new(addr, &mem).or_else(|| {
            let problem = format_args!("PCI hot-plug registers {addr:#x} are not accessible");
            emit(|w| protocol::warning(w, "acpi", &problem));
            None
        })
    });

    init_heap(&mem, memmap.unwrap_or_default());
    let devices = match tables.ecam {
        Some(ecam) => devices::probe(
            ecam,
            &options.net,
            options.services,
            options.interrupts,
            options.net_tuning,
        ),
        None => {
            emit(|w| protocol::warning(w, "acpi", &"no MCFG: no PCI devices"));
            devices::Devices::default()
        }
    };

    let clock = time::Clock::calibrate();
    // What the start-up code of the other CPUs must not overwrite: the
    // command line is printed below, the rest is kept for good measure.
    let boot_info = [
        start_info_paddr..start_info_paddr + start_info::SIZE as u64,
        info.memmap_paddr..info.memmap_paddr + info.memmap_len() as u64,
        info.cmdline_paddr..info.cmdline_paddr + cmdline.len() as u64 + 1,
    ];
    let memmap = memmap.unwrap_or_default();
    cpus::start(&clock, tables.apic_ids.as_slice(), memmap, &boot_info);
    // CPU 1 dirties memory if it is there, so that the main loop stays responsive.
    dirtier::init(clock.khz(), usize::from(cpus::running(1)));
    let cpus = tables.cpus.unwrap_or(0);
    emit(|w| {
        protocol::ready(
            w,
            &Ready {
                cpus,
                mem_bytes,
                tsc_khz: clock.khz(),
                tsc_source: clock.source(),
                cmdline,
            },
        )
    });
    shell::run(shell::Machine {
        cpus,
        mem_bytes,
        heartbeat_ms: options.heartbeat_ms,
        fadt: tables.fadt,
        ged: power_button,
        hotplug,
        mem,
        clock,
        devices,
        interrupts: options.interrupts,
    })
}

/// Gives the heap the RAM after the image, up to [`heap::MAX_HEAP`].
fn init_heap(mem: &IdentityMap, memmap: &[u8]) {
    let start = phys::image_end().next_multiple_of(4096);
    let ram = start_info::memmap(memmap)
        .filter(|e| e.kind == start_info::MEMMAP_TYPE_RAM)
        .find(|e| (e.addr..e.addr.saturating_add(e.size)).contains(&start));
    let Some(ram) = ram else {
        emit(|w| protocol::warning(w, "heap", &"no RAM after the image"));
        return;
    };
    let end = (ram.addr + ram.size).min(start + heap::MAX_HEAP);
    if !mem.may_access(start, (end - start) as usize) {
        emit(|w| protocol::warning(w, "heap", &"RAM after the image is not mapped"));
        return;
    }
    // SAFETY: RAM from the memory map, past the image (so past every static
    // and stack), identity-mapped below 4 GiB (checked), and used by nothing
    // else.
    unsafe { heap::init(start, end - start) };
}

fn read_start_info(mem: &IdentityMap, paddr: u64) -> start_info::StartInfo {
    let bytes = mem
        .read(paddr, start_info::SIZE)
        .or_else(|| mem.read(paddr, start_info::SIZE_V0))
        .unwrap_or_default();
    start_info::parse(bytes).unwrap_or_else(|e| {
        emit(|w| protocol::warning(w, "start_info", &e));
        start_info::StartInfo::default()
    })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    emit(|w| protocol::panic(w, &info.message(), file, line));
    entry::halt_forever()
}

/// The prebuilt `core` is compiled for unwinding and refers to this symbol;
/// nothing here unwinds (the panic handler halts), so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The prebuilt `alloc` is compiled for unwinding and refers to this symbol;
/// nothing here unwinds, so it is never called.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    entry::halt_forever()
}
