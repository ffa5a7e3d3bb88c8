//! Bad command lines fail with a clear message and no panic.

use std::time::Duration;

use baton_tests::{guest_bin, require_kvm, run_baton, TempDir};

fn fails_with(args: &[&str], expected: &[&str]) {
    let out = run_baton(args, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{args:?}: expected {e:?} in: {stderr}");
    }
}

#[test]
fn missing_kernel_option() {
    fails_with(&["--serial", "off"], &["No kernel given"]);
}

#[test]
fn kernel_file_missing() {
    require_kvm();
    fails_with(
        &["--kernel", "/nonexistent/vmlinux", "--serial", "off"],
        &["Cannot open kernel /nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    require_kvm();
    let dir = TempDir::new("badkernel");
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, "this is not a kernel\n".repeat(200)).unwrap();
    let junk = junk.to_string_lossy().into_owned();
    fails_with(
        &["--kernel", &junk, "--serial", "off"],
        &["is not a kernel baton can boot"],
    );
}

#[test]
fn zero_vcpus() {
    let guest = guest_bin().to_string_lossy().into_owned();
    fails_with(
        &["--kernel", &guest, "--cpus", "boot=0", "--serial", "off"],
        &["Number of vCPUs must be between 1 and 254, got 0"],
    );
}

#[test]
fn too_many_vcpus() {
    let guest = guest_bin().to_string_lossy().into_owned();
    fails_with(
        &["--kernel", &guest, "--cpus", "boot=999", "--serial", "off"],
        &["Invalid --cpus option", "'999'"],
    );
}

#[test]
fn more_memory_than_the_host_has() {
    require_kvm();
    let guest = guest_bin().to_string_lossy().into_owned();
    fails_with(
        &[
            "--kernel", &guest, "--memory", "size=64T", "--serial", "off",
        ],
        &["Cannot create guest memory", "exceeds the host's"],
    );
}

#[test]
fn unknown_option_keys() {
    let guest = guest_bin().to_string_lossy().into_owned();
    fails_with(
        &["--kernel", &guest, "--cpus", "bot=2", "--serial", "off"],
        &["Invalid --cpus option", "Unknown option 'bot'"],
    );
    fails_with(
        &["--kernel", &guest, "--memory", "sise=1G", "--serial", "off"],
        &["Invalid --memory option", "Unknown option 'sise'"],
    );
    fails_with(
        &["--kernel", &guest, "--serial", "pty"],
        &["Invalid --serial option"],
    );
    fails_with(
        &[
            "--kernel",
            &guest,
            "--cpus",
            "boot=1,mask=[warp]",
            "--serial",
            "off",
        ],
        &["Unknown CPU feature 'warp'"],
    );
}

#[test]
fn api_connection_limit_out_of_range_binds_nothing() {
    let dir = TempDir::new("api-limit");
    let socket = dir.path().join("api.sock");
    for (n, expected) in [
        ("0", "max_connections=0 is not from 1 to 512"),
        ("513", "max_connections=513 is not from 1 to 512"),
        ("-1", "Invalid --api-socket option"),
    ] {
        let spec = format!("path={},max_connections={n}", socket.display());
        fails_with(&["--api-socket", &spec], &[expected]);
        assert!(!socket.exists(), "{spec} left a socket behind");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = run_baton(&["--frobnicate"], Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--frobnicate"), "{stderr}");
}
