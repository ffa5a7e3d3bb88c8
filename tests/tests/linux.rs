//! Real-Linux smoke tests: the Debian cloud kernel, as an ELF vmlinux (PVH entry) and as a
//! bzImage (64-bit boot protocol entry), prints baton's e820 map and finds baton's ACPI
//! tables; the vmlinux also brings up every vCPU from the MADT.
//!
//! On the nested PVM-based KVM of baton's CI, guest kernel code is interpreted, so the kernel
//! boots slowly (the bzImage decompressor alone takes minutes) and later stops on an
//! instruction the interpreter cannot run; these tests look only at what it prints before
//! that. The command line carries the workarounds such hosts need (README, "Nested,
//! PVM-based KVM hosts"); on other hosts they only switch off XSAVE, POPCNT and SMAP. The kernel comes from `scripts/fetch-kernel.sh`, whose
//! cache directory `scripts/test.sh` exports as `BATON_LINUX_DIR`.

use std::path::PathBuf;
use std::time::Duration;

use baton_tests::Vm;

/// Generous: on an interpreting host the bzImage decompressor alone takes minutes.
const FIRST_LINE: Duration = Duration::from_secs(900);
const LATER: Duration = Duration::from_secs(600);

fn kernel(file: &str) -> PathBuf {
    let dir = std::env::var_os("BATON_LINUX_DIR").unwrap_or_else(|| {
        panic!(
            "BATON_LINUX_DIR is not set: run scripts/test.sh, or export \
             BATON_LINUX_DIR=$(scripts/fetch-kernel.sh)"
        )
    });
    let path = PathBuf::from(dir).join(file);
    assert!(
        path.is_file(),
        "{} missing: rerun scripts/fetch-kernel.sh",
        path.display()
    );
    path
}

/// Boots `file` with 2 vCPUs and 1 GiB, checks the kernel's view of baton's platform, and
/// returns the VM for further checks.
fn boots_far_enough(file: &str) -> Vm {
    let kernel = kernel(file);
    let args: Vec<String> = [
        "--kernel",
        &kernel.to_string_lossy(),
        "--cmdline",
        "console=ttyS0 earlyprintk=ttyS0 noxsave clearcpuid=151,308",
        "--cpus",
        "boot=2,template=pvm",
        "--memory",
        "size=1G",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = Vm::start(&args);
    let c = vm.console();
    c.wait_for("Linux version", FIRST_LINE);
    // baton's memory map, entry by entry.
    for range in [
        "[mem 0x0000000000000000-0x000000000009fbff] usable",
        "[mem 0x0000000000100000-0x000000003fffffff] usable",
        "[mem 0x00000000e0000000-0x00000000e00fffff] reserved",
    ] {
        c.wait_for_match(
            |l| l.contains("e820") && l.contains(range),
            &format!("e820 entry {range}"),
            LATER,
        );
    }
    // baton's ACPI tables, found through the RSDP.
    c.wait_for("ACPI: RSDP 0x00000000000E0000", LATER);
    for table in ["XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        c.wait_for_match(
            |l| l.contains(&format!("ACPI: {table} ")) && l.contains("BATON"),
            &format!("ACPI {table} table from baton"),
            LATER,
        );
    }
    vm
}

#[test]
fn debian_vmlinux_sees_e820_acpi_tables_and_every_cpu() {
    let mut vm = boots_far_enough("vmlinux");
    let c = vm.console();
    c.wait_for(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        LATER,
    );
    c.wait_for("smpboot: Allowing 2 CPUs, 0 hotplug CPUs", LATER);
    // The second vCPU answered INIT/SIPI and runs.
    c.wait_for("smp: Brought up 1 node, 2 CPUs", LATER);
}

#[test]
fn debian_bzimage_sees_e820_and_acpi_tables() {
    boots_far_enough("vmlinuz");
}
