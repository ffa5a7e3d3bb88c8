//! virtio-blk and virtio-rng with the test guest: data written on one side is read on the
//! other, read-only disks refuse writes, entropy arrives, and a hostile driver's malformed
//! descriptor chains leave baton working.

use std::time::Duration;

use baton_tests::{fnv1a, num, Vm, READY};

const BOOT: Duration = Duration::from_secs(60);
const REPLY: Duration = Duration::from_secs(30);
const SECTOR: usize = 512;

fn image(dir: &baton_tests::TempDir, contents: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, contents).expect("write the image");
    path
}

#[test]
fn guest_writes_are_on_the_host_and_host_data_reaches_the_guest() {
    let dir = baton_tests::TempDir::new("disk");
    // Host data: sector i is filled with byte i.
    let mut data = vec![0u8; 64 * SECTOR];
    for (i, s) in data.chunks_mut(SECTOR).enumerate() {
        s.fill(i as u8);
    }
    let path = image(&dir, &data);
    let disk = format!("--disk=path={}", path.display());
    let mut vm = Vm::start_test_guest(&[&disk], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);

    let info = c.command("disk info", "disk:", REPLY);
    assert_eq!(num(&info, "sectors"), 64, "{info}");
    assert_eq!(num(&info, "readonly"), 0, "{info}");
    assert!(info.contains("id=disk0"), "{info}");

    let read = c.command("disk read 3 20", "disk:", REPLY);
    let want = fnv1a(&data[3 * SECTOR..23 * SECTOR]);
    assert_eq!(
        read,
        format!("disk: read sector=3 count=20 fnv={want:#018x}")
    );

    let wrote = c.command("disk write 40 8 165", "disk:", REPLY);
    assert_eq!(wrote, "disk: wrote sector=40 count=8");
    let after = std::fs::read(&path).expect("read the image");
    assert!(after[40 * SECTOR..48 * SECTOR].iter().all(|b| *b == 165));
    // Nothing around it changed.
    assert_eq!(after[..40 * SECTOR], data[..40 * SECTOR]);
    assert_eq!(after[48 * SECTOR..], data[48 * SECTOR..]);

    // Past the end: an error status, and the device goes on working.
    let past = c.command("disk read 60 8", "disk:", REPLY);
    assert!(past.starts_with("error: disk:"), "{past}");
    let again = c.command("disk read 40 1", "disk:", REPLY);
    assert_eq!(num(&again, "count"), 1, "{again}");
}

#[test]
fn readonly_disk_refuses_writes() {
    let dir = baton_tests::TempDir::new("disk-ro");
    let data = vec![7u8; 16 * SECTOR];
    let path = image(&dir, &data);
    let disk = format!("--disk=path={},readonly=on", path.display());
    let mut vm = Vm::start_test_guest(&[&disk], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);
    let info = c.command("disk info", "disk:", REPLY);
    assert_eq!(num(&info, "readonly"), 1, "{info}");
    let refused = c.command("disk write 0 1 9", "disk:", REPLY);
    assert!(refused.starts_with("error: disk:"), "{refused}");
    assert_eq!(std::fs::read(&path).expect("read the image"), data);
    // Reads still work.
    let read = c.command("disk read 0 16", "disk:", REPLY);
    assert_eq!(
        read,
        format!("disk: read sector=0 count=16 fnv={:#018x}", fnv1a(&data))
    );
}

#[test]
fn entropy_device_gives_random_bytes() {
    let mut vm = Vm::start_test_guest(&["--rng", "on"], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);
    let a = c.command("rng 64", "rng:", REPLY);
    let b = c.command("rng 64", "rng:", REPLY);
    assert_eq!(num(&a, "bytes"), 64, "{a}");
    let hex = |l: &str| baton_tests::field(l, "hex").unwrap_or_default().to_string();
    assert_eq!(hex(&a).len(), 64, "the first 32 bytes in hex: {a}");
    assert_ne!(hex(&a), hex(&b), "two draws were equal");
    assert_ne!(hex(&a), "0".repeat(64));
}

#[test]
fn hostile_driver_gets_chains_back_and_a_reset_request_and_baton_carries_on() {
    let mut vm = Vm::start_test_guest(&["--rng", "on"], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);
    let report = c.command("chaos", "chaos:", REPLY);
    // Every malformed chain came back used; the runaway index got DEVICE_NEEDS_RESET.
    assert_eq!(report, "chaos: posted=5 used=5 needs_reset=1");
    // Reset and started again, the device serves an honest driver.
    let a = c.command("rng 32", "rng:", REPLY);
    assert_eq!(num(&a, "bytes"), 32, "{a}");
    // And again: nothing in baton was left broken.
    assert_eq!(
        c.command("chaos", "chaos:", REPLY),
        "chaos: posted=5 used=5 needs_reset=1"
    );
    assert!(c.command("status", "status:", REPLY).starts_with("status:"));
}

#[test]
fn guest_without_devices_says_so() {
    let mut vm = Vm::start_test_guest(&[], "heartbeat_ms=0");
    let c = vm.console();
    c.wait_for(READY, BOOT);
    assert_eq!(
        c.command("disk info", "disk:", REPLY),
        "error: disk: none found"
    );
    assert_eq!(c.command("rng 8", "rng:", REPLY), "error: rng: none found");
    assert_eq!(c.command("net", "net:", REPLY), "error: net: no nic 0");
}
