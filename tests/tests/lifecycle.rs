//! A VM's whole life through the API, many times over in one baton: vm.delete and vm.reboot
//! release everything the VM held (descriptors, threads, memory), so a VMM that serves
//! VMs for a long time does not grow, and the TAP a deleted VM used is free at once.

use std::time::{Duration, Instant};

use baton_tests::{fd_count, guest_config_json, thread_count, ApiVmm, Console, NetNs, READY};

const BOOT: Duration = Duration::from_secs(60);
const ROUNDS: usize = 20;

/// What baton holds: open descriptors, threads, resident memory in KiB.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    Usage {
        fds: fd_count(pid),
        threads: thread_count(pid),
        rss_kib,
    }
}

/// Waits until baton is back to `baseline` descriptors and threads (threads end
/// asynchronously), failing with what it holds after the deadline.
fn settles_to(pid: u32, baseline: Usage, what: &str) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = usage(pid);
        if now.fds <= baseline.fds && now.threads <= baseline.threads {
            return now;
        }
        if Instant::now() > deadline {
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            panic!("after {what}: {now:?}, baseline {baseline:?}; open: {fds:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(vmm: &ApiVmm, tap: &str) -> String {
    let serial = vmm.dir().join("serial.sock");
    let mut c: serde_json::Value =
        serde_json::from_str(&guest_config_json(&serial, 2, "heartbeat_ms=0")).unwrap();
    c["net"] = serde_json::json!([{"tap": tap, "num_queues": 2}]);
    c["rng"] = serde_json::json!({});
    c.to_string()
}

/// Creates and boots a VM on `tap` and waits for the guest; returns its console once the
/// guest is ready.
fn create_and_boot(vmm: &mut ApiVmm, tap: &str) -> Console {
    let body = config(vmm, tap);
    vmm.expect("PUT", "vm.create", Some(&body), 204);
    vmm.expect("PUT", "vm.boot", None, 204);
    let serial = vmm.dir().join("serial.sock");
    let mut console = vmm.console(&serial);
    console.wait_for(READY, BOOT);
    console
}

#[test]
fn delete_and_reboot_release_everything_the_vm_held() {
    let ns = NetNs::new("life");
    // A single-queue TAP can be opened by one process at a time: if a deleted VM kept it,
    // the next create would fail with EBUSY.
    let mut vmm = ApiVmm::start_in(Some(&ns), &[]);
    let pid = vmm.pid();

    // One round first: anything baton sets up once (the console thread, allocator arenas)
    // belongs to the baseline.
    create_and_boot(&mut vmm, "life0");
    vmm.expect("PUT", "vm.delete", None, 204);
    let baseline = usage(pid);

    for round in 0..ROUNDS {
        create_and_boot(&mut vmm, "life0");
        vmm.expect("PUT", "vm.delete", None, 204);
        settles_to(pid, baseline, &format!("delete round {round}"));
    }
    let after_deletes = usage(pid);

    // The console outlives reboots: each one brings the next ready marker on it.
    let mut console = create_and_boot(&mut vmm, "life0");
    let running = usage(pid);
    for round in 0..ROUNDS {
        vmm.expect("PUT", "vm.reboot", None, 204);
        console.wait_for(READY, BOOT);
        let now = usage(pid);
        assert!(
            now.fds <= running.fds && now.threads <= running.threads,
            "reboot round {round}: {now:?}, before the reboots {running:?}"
        );
    }
    vmm.expect("PUT", "vm.delete", None, 204);
    let end = settles_to(pid, baseline, "the reboots");

    // Memory: guest RAM is unmapped with its VM, so what stays is the heap's slack.
    let grown = end.rss_kib.saturating_sub(baseline.rss_kib);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB over {} VMs: baseline {baseline:?}, after deletes \
         {after_deletes:?}, end {end:?}",
        2 * ROUNDS
    );

    // The TAP is free: a new VM opens it at once.
    create_and_boot(&mut vmm, "life0");
    vmm.expect("PUT", "vm.delete", None, 204);
}
