//! The test guest on another VMM: QEMU (Debian's `qemu-system-x86`, KVM where it runs here,
//! else TCG), booted through the PVH note with `-kernel`, on a q35 machine whose firmware
//! (SeaBIOS) builds the ACPI tables and places the virtio-pci devices' BARs. The guest must
//! reach its ready marker, answer pings over a TAP and serve its disk and entropy commands:
//! proof that it is not tuned to baton's layout, and the basis for side-by-side figures.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use baton_tests::netns::NetNs;
use baton_tests::{num, sector_image, Console, TempDir, READY};

/// TCG, if KVM does not take QEMU here, boots the guest in well under a minute too.
const BOOT: Duration = Duration::from_secs(120);
const REPLY: Duration = Duration::from_secs(60);

/// QEMU's x86 system emulator; fails the test, naming the package, when it is missing.
fn qemu() -> PathBuf {
    let path = PathBuf::from("/usr/bin/qemu-system-x86_64");
    assert!(
        path.is_file(),
        "{} is missing: scripts/test.sh installs Debian's qemu-system-x86",
        path.display()
    );
    path
}

/// Kills QEMU when the test ends, however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_test_guest_boots_on_qemu_and_drives_its_devices() {
    let files = TempDir::new("qemu");
    let (image, data) = sector_image(&files, "disk.raw", 32, 0x20);
    let serial = files.path().join("serial.sock");

    let ns = NetNs::new("qemu");
    ns.run(&[
        "ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
    ]);
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    ns.run(&["ip", "link", "set", "tap0", "up"]);

    let child = ns
        .command(&qemu())
        .args([
            "-machine", "q35", "-accel", "kvm", "-accel", "tcg", "-m", "256",
        ])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("unix:{},server=on,wait=on", serial.display()))
        .arg("-kernel")
        .arg(baton_tests::guest_bin())
        .args(["-append", "heartbeat_ms=0 net=10.0.0.2/24"])
        .args([
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
        ])
        .args([
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:12:34:56",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,cache=none",
            image.display()
        ))
        .args([
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qdisk",
        ])
        .args(["-device", "virtio-rng-pci,disable-legacy=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let mut qemu = Qemu(child);
    let mut console = Console::connect(&serial, &mut qemu.0, BOOT);
    let ready = console.wait_for(READY, BOOT);
    assert!(ready.contains("cpus=1"), "{ready}");

    // The disk: its serial and size, then its contents.
    let info = console.command("disk info", "disk:", REPLY);
    assert_eq!(num(&info, "sectors"), 32, "{info}");
    assert!(info.contains("id=qdisk"), "{info}");
    console.assert_disk_reads(&data, 1, 30);
    // Entropy.
    let rng = console.command("rng 16", "rng:", REPLY);
    assert_eq!(num(&rng, "bytes"), 16, "{rng}");

    // The network: the host pings the guest across the TAP.
    let deadline = Instant::now() + REPLY;
    loop {
        let out = ns.output(&["ping", "-q", "-c", "1", "-W", "1", "10.0.0.2"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest on QEMU never answered a ping; console:\n{}",
            console.tail()
        );
    }
    let out = ns.output(&[
        "ping", "-q", "-c", "20", "-i", "0.05", "-W", "2", "10.0.0.2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 0% packet loss"), "{text}");
}
