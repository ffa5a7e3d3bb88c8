//! What the process sets up first, while it still has a single thread.

/// Descriptors the table is grown to hold at start: the API server's connections (at most
/// 512), every device's queues, TAPs and images, and a migration's worth more.
const DESCRIPTOR_TABLE: u64 = 4096;

/// Grows this process's descriptor table to [`DESCRIPTOR_TABLE`] entries (or the soft
/// `RLIMIT_NOFILE`, if lower) now. When the table of a process with several threads grows,
/// the kernel waits for an RCU grace period, milliseconds on a busy host; a destination
/// that takes over a VM's descriptors and makes eventfds for its queues while the source
/// is paused must not wait for one. The table never shrinks, and an unused entry costs
/// a few bytes.
pub fn grow_descriptor_table() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let top = if got == 0 {
        limit.rlim_cur.min(DESCRIPTOR_TABLE)
    } else {
        DESCRIPTOR_TABLE
    };
    let Some(highest) = top.checked_sub(1) else {
        return;
    };
    let Ok(file) = std::fs::File::open("/dev/null") else {
        return;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: F_DUPFD_CLOEXEC only makes a new descriptor, closed again just below.
    let high = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            highest as libc::c_int,
        )
    };
    if high >= 0 {
        // SAFETY: `high` was just made here and nothing else knows it.
        unsafe { libc::close(high) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_what_is_reserved() {
        grow_descriptor_table();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let size: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize in /proc/self/status");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct it is given.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(got, 0);
        assert!(
            size >= limit.rlim_cur.min(DESCRIPTOR_TABLE),
            "FDSize {size}"
        );
    }
}
