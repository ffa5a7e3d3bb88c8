//! Bad device configurations fail with a clear message, before the guest starts.

use std::process::Output;
use std::time::Duration;

use baton_tests::{guest_bin, require_kvm, run_baton, wait_child, NetNs, TempDir};

fn check(args: &[&str], out: Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: expected {e:?} in: {stderr}");
    }
}

fn guest_args<'a>(guest: &'a str, device: &'a [&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--kernel", guest, "--serial", "off"];
    args.extend_from_slice(device);
    args
}

fn fails_with(device: &[&str], expected: &[&str]) {
    let guest = guest_bin().to_string_lossy().into_owned();
    let args = guest_args(&guest, device);
    check(&args, run_baton(&args, Duration::from_secs(30)), expected);
}

/// Runs baton inside `ns` (for configurations that open a TAP).
fn fails_in(ns: &NetNs, device: &[&str], expected: &[&str]) {
    require_kvm();
    let guest = guest_bin().to_string_lossy().into_owned();
    let args = guest_args(&guest, device);
    let mut child = ns
        .command(&baton_tests::baton_bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn baton");
    wait_child(&mut child, Duration::from_secs(30));
    check(&args, child.wait_with_output().expect("output"), expected);
}

#[test]
fn tap_name_too_long() {
    fails_with(
        &["--net", "tap=a-very-long-tap-name"],
        &["Invalid TAP name 'a-very-long-tap-name'", "1 to 15 bytes"],
    );
}

#[test]
fn odd_number_of_queues() {
    fails_with(
        &["--net", "tap=tap0,num_queues=3"],
        &["num_queues is 3", "must be even"],
    );
}

#[test]
fn bad_mac_addresses() {
    fails_with(
        &["--net", "tap=tap0,mac=52:54:00:12:34"],
        &["Invalid --net option", "'52:54:00:12:34'", "six hex bytes"],
    );
    fails_with(
        &["--net", "tap=tap0,mac=01:00:5e:00:00:01"],
        &["MAC 01:00:5e:00:00:01 is not a unicast address"],
    );
}

#[test]
fn segmentation_offload_without_checksums() {
    fails_with(
        &["--net", "tap=tap0,offload_csum=off"],
        &["offload_tso and offload_ufo need offload_csum=on"],
    );
}

#[test]
fn missing_disk_file() {
    require_kvm();
    fails_with(
        &["--disk", "path=/nonexistent/disk.raw"],
        &[
            "Disk 'disk0': cannot open /nonexistent/disk.raw",
            "No such file",
        ],
    );
}

#[test]
fn disk_that_is_a_directory() {
    require_kvm();
    let dir = TempDir::new("diskdir");
    let path = format!("path={}", dir.path().display());
    fails_with(
        &["--disk", &path],
        &["Disk 'disk0': cannot open", "Is a directory"],
    );
    let readonly = format!("{path},readonly=on");
    fails_with(
        &["--disk", &readonly],
        &["is not a regular file or a block device"],
    );
}

#[test]
fn duplicate_device_ids() {
    fails_with(
        &[
            "--disk",
            "path=/dev/null,id=data",
            "--net",
            "tap=tap0,id=data",
        ],
        &["Device id 'data' is used twice"],
    );
}

#[test]
fn existing_tap_with_the_wrong_queue_mode() {
    let ns = NetNs::new("qmode");
    // A single-queue TAP: opening it with two queue pairs needs IFF_MULTI_QUEUE.
    ns.run(&["ip", "tuntap", "add", "dev", "tapsq", "mode", "tap"]);
    fails_in(
        &ns,
        &["--net", "tap=tapsq,num_queues=4"],
        &[
            "Network card 'net0'",
            "Cannot attach to TAP 'tapsq' with 2 queue(s)",
            "Invalid argument",
        ],
    );
    // And the other way round.
    ns.run(&[
        "ip",
        "tuntap",
        "add",
        "dev",
        "tapmq",
        "mode",
        "tap",
        "multi_queue",
    ]);
    fails_in(
        &ns,
        &["--net", "tap=tapmq"],
        &["Cannot attach to TAP 'tapmq' with 1 queue(s)"],
    );
}
