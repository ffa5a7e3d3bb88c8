//! A host ping flood to a guest, run inside the guest's network namespace, that says how many
//! echo requests went unanswered and the longest silence between two replies (the downtime
//! as seen from outside).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NetNs;

/// A running `ping -D -i INTERVAL -c COUNT`.
pub struct PingFlood {
    child: Child,
    /// Echo requests asked for.
    count: u64,
    replies: Arc<AtomicU64>,
    reader: Option<JoinHandle<Vec<String>>>,
    started: Instant,
    last_lines: Arc<Mutex<Vec<String>>>,
}

/// What a flood saw.
#[derive(Debug, Clone)]
pub struct FloodResult {
    /// Echo requests asked for: only these count.
    pub asked: u64,
    /// Echo requests sent. With a deadline ping goes on sending past `asked` until that
    /// many replies came, and stops as soon as they did: requests beyond `asked` still on
    /// their way then are not losses.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// The longest gap between two consecutive replies, in milliseconds.
    pub max_gap_ms: f64,
    /// The sequence numbers (from 1 to `asked`) that got no reply, to tell a burst from
    /// stray losses.
    pub missing: Vec<u64>,
}

impl FloodResult {
    /// Requests asked for and never answered.
    pub fn lost(&self) -> u64 {
        self.missing.len() as u64
    }

    /// Requests from sequence number `seq` on never answered.
    pub fn lost_from(&self, seq: u64) -> usize {
        self.missing.iter().filter(|s| **s >= seq).count()
    }
}

impl PingFlood {
    /// Starts `count` echo requests to `addr`, one every `interval`, from inside `ns`.
    pub fn start(ns: &NetNs, addr: &str, interval: Duration, count: u64) -> Self {
        // With a deadline, ping waits for every reply (until the deadline) instead of giving
        // the last ones twice the round trip seen so far: a late last reply is not a loss.
        let deadline = (interval.as_secs_f64() * count as f64).ceil() as u64 + 5;
        let mut child = ns
            .command(Path::new("ping"))
            .args(["-D", "-n", "-W", "2", "-i"])
            .arg(format!("{:.3}", interval.as_secs_f64()))
            .arg("-c")
            .arg(count.to_string())
            .arg("-w")
            .arg(deadline.to_string())
            .arg(addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ping");
        let stdout = child.stdout.take().expect("piped stdout");
        let replies = Arc::new(AtomicU64::new(0));
        let last_lines = Arc::new(Mutex::new(Vec::new()));
        let (r, last) = (replies.clone(), last_lines.clone());
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("bytes from") {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                let mut tail = last.lock().expect("flood lock");
                tail.push(line.clone());
                if tail.len() > 5 {
                    tail.remove(0);
                }
                drop(tail);
                lines.push(line);
            }
            lines
        });
        PingFlood {
            child,
            count,
            replies,
            reader: Some(reader),
            started: Instant::now(),
            last_lines,
        }
    }

    /// Waits until `n` replies came.
    pub fn wait_replies(&mut self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.replies.load(Ordering::Relaxed) < n {
            if let Some(status) = self.child.try_wait().expect("poll ping") {
                panic!(
                    "ping ended ({status}) after {} replies: {:?}",
                    self.replies.load(Ordering::Relaxed),
                    self.last_lines.lock().expect("flood lock")
                );
            }
            assert!(
                Instant::now() < deadline,
                "only {} ping replies in {timeout:?}: {:?}",
                self.replies.load(Ordering::Relaxed),
                self.last_lines.lock().expect("flood lock")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether ping still sends.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll ping").is_none()
    }

    /// How long the flood has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for ping to finish (it waits for the last replies itself) and reads its summary.
    pub fn finish(mut self, timeout: Duration) -> FloodResult {
        crate::wait_child(&mut self.child, timeout);
        let lines = self
            .reader
            .take()
            .expect("finished once")
            .join()
            .expect("ping reader");
        let summary = lines
            .iter()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| {
                panic!(
                    "no ping summary in {:?}",
                    &lines[lines.len().saturating_sub(5)..]
                )
            });
        let number_before = |word: &str| -> u64 {
            let words: Vec<&str> = summary
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .collect();
            let at = words
                .iter()
                .position(|w| *w == word)
                .unwrap_or_else(|| panic!("no '{word}' in {summary}"));
            words[at - 1]
                .parse()
                .unwrap_or_else(|_| panic!("no count before '{word}' in {summary}"))
        };
        let times: Vec<f64> = lines
            .iter()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        let max_gap_ms = times
            .windows(2)
            .map(|w| (w[1] - w[0]) * 1000.0)
            .fold(0.0, f64::max);
        let answered: std::collections::BTreeSet<u64> = lines
            .iter()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| crate::field(l, "icmp_seq")?.parse().ok())
            .collect();
        let sent = number_before("packets");
        let missing = (1..=self.count).filter(|s| !answered.contains(s)).collect();
        FloodResult {
            asked: self.count,
            sent,
            received: number_before("received"),
            max_gap_ms,
            missing,
        }
    }
}

impl Drop for PingFlood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Open descriptors of process `pid` once the count holds for 100 ms (a request's
/// connection may still be closing), or after 10 s.
pub fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = fd_count(pid);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        if now == last || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Threads of process `pid`.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .count()
}
