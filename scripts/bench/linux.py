#!/usr/bin/env python3
"""Linux benchmark body, run by scripts/bench/linux.sh inside a network namespace of its own.

Each run boots the small Linux (scripts/linux-kernel.sh; 2 vCPUs, 512 MiB shared memory, a
4-queue card on TAP tap0 that baton creates with 10.0.0.1/24) in one baton and measures the
time from vm.boot to the kernel's "IP-Config: Complete" line. Once the guest answers, it
migrates the VM twice over UNIX sockets with local=on while the host pings it every 50 ms:
first to a second baton with backend transfer (the TAP's queues travel), then to a third
without it (the destination opens tap0 by name and attaches queues of its own). For each
migration: downtime_ms and total_ms as vm.send-migration reports them, the longest gap
between two ping replies (the downtime seen from outside) and the pings lost.
Before migrating it pings the guest for 5 s at the same rate: the longest gap there is
how long the guest goes silent on its own (kernel code is interpreted on nested PVM hosts).
Prints one line per row (boot, no migration, backend transfer, new TAP queues, live
upgrade) with the medians over the runs; each run's own figures go to stderr.
With HOPS, each run also moves the guest HOPS more times with backend transfer, from baton
to baton, under 3 s of pings each, and a last row gives min/median/max over all hops of
downtime and total (ms, from downtime_us and total_us) and of the longest ping gap, with
the median of each step of the pause on both sides under it.

Usage: linux.py WORKDIR KERNEL_DIR RUNS [HOPS]"""
import json, os, re, signal, statistics, subprocess, sys, tempfile, threading, time

import migration
from guest_console import Console
from migration import Baton, min_med_max, send, step_medians

# The guest's kernel answers one echo in about 23 ms (interpreted, nested PVM): a faster
# flood queues up in the TAP faster than it is answered, and the gaps measure that backlog,
# not the migration.
INTERVAL = "0.05"
COUNT = 300  # 15 s: longer than either migration.
CMDLINE = ("console=ttyS0 noxsave clearcpuid=151,308 "
           "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off rootdelay=100000 panic=0")


def config(kernel_dir, serial):
    return {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "template": "pvm"},
        "memory": {"size": 512 << 20, "shared": True},
        "payload": {"kernel": os.path.join(kernel_dir, "vmlinux"), "cmdline": CMDLINE},
        "serial": {"mode": "Socket", "socket": serial},
        "net": [{"id": "net0", "tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0",
                 "num_queues": 4}],
    }


def answers():
    return subprocess.run(["ping", "-c", "1", "-W", "1", "10.0.0.2"],
                          stdout=subprocess.DEVNULL).returncode == 0


class Pings:
    """ping -D every INTERVAL: replies' timestamps, for the longest gap and the loss."""

    def __init__(self, count=COUNT):
        self.p = subprocess.Popen(["ping", "-D", "-n", "-i", INTERVAL, "-c", str(count),
                                   "-W", "2", "10.0.0.2"], stdout=subprocess.PIPE, text=True)
        self.times = []
        self.summary = ""
        self.t = threading.Thread(target=self.read, daemon=True)
        self.t.start()

    def read(self):
        for line in self.p.stdout:
            m = re.match(r"\[(\d+\.\d+)\].*bytes from", line)
            if m:
                self.times.append(float(m.group(1)))
            elif "packets transmitted" in line:
                self.summary = line

    def wait_replies(self, n):
        deadline = time.time() + 60
        while len(self.times) < n:
            if time.time() > deadline:
                sys.exit("the pings got no replies")
            time.sleep(0.01)

    def finish(self):
        self.p.wait(timeout=120)
        self.t.join(timeout=10)
        m = re.match(r"(\d+) packets transmitted, (\d+) received", self.summary)
        if not m:
            sys.exit(f"no ping summary: {self.summary!r}")
        gap = max((b - a for a, b in zip(self.times, self.times[1:])), default=0) * 1000
        return {"lost": int(m.group(1)) - int(m.group(2)), "gap_ms": gap}


def migrate(src, dst, d, name, transfer, count=COUNT, settle=100):
    """Moves the VM from `src` to `dst` under `count` pings, once `settle` were answered."""
    url = f"unix:{os.path.join(d, name)}"
    received = {}

    def receive():
        received["answer"] = dst.request(
            "PUT", "vm.receive-migration", {"receiver_url": url, "backend_transfer": transfer},
            timeout=600)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    pings = Pings(count)
    pings.wait_replies(settle)
    stats = send(src, url, True, backend_transfer=transfer)
    src.proc.wait(timeout=60)
    receiver.join(timeout=60)
    if received.get("answer", (0,))[0] != 204:
        dst.fail(f"vm.receive-migration: {received.get('answer')}")
    result = pings.finish()
    if not answers():
        dst.fail("the guest does not answer after the migration")
    return {"downtime_ms": stats["downtime_ms"], "total_ms": stats["total_ms"],
            "downtime_us": stats["downtime_us"], "total_us": stats["total_us"],
            "breakdown": stats["breakdown"], **result}


def upgrade(baton):
    """vmm.live-upgrade of `baton` to a new process of the same binary, under the pings;
    the figures, and the new process's pid."""
    pings = Pings()
    pings.wait_replies(100)
    status, text = baton.request("PUT", "vmm.live-upgrade",
                                 {"binary": os.path.abspath(migration.BATON)}, timeout=600)
    if status != 200:
        baton.fail(f"vmm.live-upgrade: {status} {text}")
    stats = json.loads(text)
    baton.proc.wait(timeout=60)
    result = pings.finish()
    if not answers():
        sys.exit(f"the guest does not answer after the live upgrade (pid {stats['pid']})")
    return {"downtime_ms": stats["downtime_ms"], "total_ms": stats["total_ms"], **result}, \
        stats["pid"]


def one_run(workdir, kernel_dir, hops):
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        serial = os.path.join(d, "serial.sock")
        batons = []
        console = None
        successor = None
        try:
            src = Baton(d, "source")
            batons.append(src)
            src.expect("PUT", "vm.create", config(kernel_dir, serial), 204)
            start = time.time()
            src.expect("PUT", "vm.boot", None, 204)
            console = Console(serial, lambda: src.proc.poll() is None)
            console.line(lambda l: "IP-Config: Complete" in l, timeout=900)
            boot_s = time.time() - start
            # First contact: Linux drops replies it queues while it resolves the host.
            deadline = time.time() + 60
            while not answers():
                if time.time() > deadline:
                    src.fail("the guest never answered pings")
            console.close()
            console = None
            # The same pings without a migration: how long the guest itself goes silent.
            steady = Pings(100)  # 5 s
            steady.wait_replies(1)
            steady = steady.finish()
            second = Baton(d, "second")
            batons.append(second)
            transfer = migrate(src, second, d, "m1.sock", True)
            third = Baton(d, "third")
            batons.append(third)
            new_tap = migrate(second, third, d, "m2.sock", False)
            last, hopped = third, []
            for i in range(hops):
                nxt = Baton(d, f"hop{i}")
                batons.append(nxt)
                hopped.append(migrate(last, nxt, d, f"h{i}.sock", True, count=60, settle=20))
                last = nxt
            upgraded, successor = upgrade(last)
            return {"boot_s": boot_s, "steady": steady, "transfer": transfer, "new_tap": new_tap,
                    "upgrade": upgraded, "hops": hopped}
        finally:
            if console is not None:
                console.close()
            if successor is not None:
                try:
                    os.kill(successor, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for b in batons:
                b.stop()


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir, kernel_dir, count = sys.argv[1:4]
    hops = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    runs = []
    for _ in range(int(count)):
        runs.append(one_run(workdir, kernel_dir, hops))
        print(f"linux.py: {json.dumps(runs[-1])}", file=sys.stderr)

    def med(f):
        return statistics.median(f(r) for r in runs)

    print(f"{'boot to IP-Config (s)':<42} {med(lambda r: r['boot_s']):>11.1f}")
    print(f"{'no migration, 5 s of pings':<42} {'-':>11} {'-':>8} "
          f"{med(lambda r: r['steady']['gap_ms']):>11.1f} "
          f"{med(lambda r: r['steady']['lost']):>6.0f} {max(r['steady']['lost'] for r in runs):>6}")
    for key, label in (("transfer", "backend transfer"), ("new_tap", "new TAP queues, by name"),
                       ("upgrade", "live upgrade (vmm.live-upgrade)")):
        print(f"{label:<42} {med(lambda r: r[key]['downtime_ms']):>11.0f} "
              f"{med(lambda r: r[key]['total_ms']):>8.0f} "
              f"{med(lambda r: r[key]['gap_ms']):>11.1f} "
              f"{med(lambda r: r[key]['lost']):>6.0f} "
              f"{max(r[key]['lost'] for r in runs):>6}")
    hopped = [h for r in runs for h in r["hops"]]
    if hopped:
        print(f"backend transfer, {len(hopped)} hops: min/median/max downtime "
              f"{min_med_max(hopped, 'downtime_us', 1000)} ms, "
              f"total {min_med_max(hopped, 'total_us', 1000)} ms, "
              f"ping gap {min_med_max(hopped, 'gap_ms')} ms, "
              f"lost {sum(h['lost'] for h in hopped)}")
        print("\n".join(step_medians(hopped)))


if __name__ == "__main__":
    main()
