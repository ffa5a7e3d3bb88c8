#!/usr/bin/env python3
"""Network rows of scripts/bench/migration.sh: a local migration of the test guest with a
network card, seen from the host, with backend transfer or onto a new TAP.

Runs inside a network namespace of its own (migration.sh creates it and runs this script
with `ip netns exec`). Each run builds bridge br0 (10.0.0.1/24) with TAPs tap0 and tap1 on it,
as management software would (persistent; multi-queue when the card has several pairs),
boots the test guest (1 GiB shared memory, 1 vCPU, 10.0.0.2) on tap0, and while the host
reads the guest's sequence stream (port 5001) and runs `ping -i 0.002` at it, migrates it
over a UNIX socket to a second baton:
- transfer: both sides ask for backend_transfer; the destination takes over tap0's queues.
- new-tap:  no backend transfer; management opens tap1's queues and passes them with
            vm.receive-migration (net_fds), the work backend transfer removes.
- upgrade:  no second baton: vmm.live-upgrade hands the VM to a new process of the same
            binary (memory, TAP queues and the API socket as descriptors), while a client
            pings the API over a new connection every millisecond; connections refused or
            failed are counted.
Prints one line: medians over the runs of downtime_ms and total_ms as vm.send-migration
reports them, pings lost and the longest gap in the guest's stream (the downtime as seen
from outside, in ms). With BENCH_TABLE=minmax (scripts/bench/downtime.sh) it prints
min/median/max of downtime_us and total_us, the longest gap between two ping replies and
in the stream, and the worst loss, then the median of each step of the breakdown.
Each run's own figures go to stderr.

Environment: BENCH_CPUS (vCPUs, default 1), BENCH_MEMORY_GIB (default 1),
BENCH_PING_INTERVAL (seconds between pings, default 0.002; 0.001 and below need root).

Usage: migration_net.py WORKDIR transfer|new-tap|upgrade on|off PAIRS RUNS"""
import fcntl, http.client, json, os, signal, socket, statistics, struct, subprocess, sys
import tempfile, threading, time

from guest_console import Console
from migration import BATON, Baton, READY, GUEST, min_med_max, step_medians

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100
CPUS = int(os.environ.get("BENCH_CPUS", "1"))
MEMORY_GIB = int(os.environ.get("BENCH_MEMORY_GIB", "1"))
PING_INTERVAL = float(os.environ.get("BENCH_PING_INTERVAL", "0.002"))
# 5 s of pings: longer than any migration here.
FLOOD_COUNT = int(5 / PING_INTERVAL)


def ip(*args):
    subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL)


def network(pairs):
    for link in ("br0", "tap0", "tap1"):
        subprocess.run(["ip", "link", "del", link], stderr=subprocess.DEVNULL)
    ip("link", "add", "br0", "type", "bridge")
    ip("addr", "add", "10.0.0.1/24", "dev", "br0")
    ip("link", "set", "br0", "up")
    for tap in ("tap0", "tap1"):
        mq = ["multi_queue"] if pairs > 1 else []
        ip("tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", *mq)
        ip("link", "set", tap, "master", "br0")
        ip("link", "set", tap, "up")


def open_queues(name, pairs):
    """What management does for a new TAP: one open queue per pair."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if pairs > 1 else 0)
    fds = []
    for _ in range(pairs):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fds.append(fd)
    return fds


def request_with_fds(api, endpoint, body, fds):
    """PUT with descriptors riding along (SCM_RIGHTS), as baton-remote add-net does."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(api)
    data = json.dumps(body).encode()
    head = (f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode()
    socket.send_fds(s, [head + data], fds)
    r = http.client.HTTPResponse(s)
    r.begin()
    return r.status, r.read().decode(errors="replace")


class Stream:
    """Reads the guest's sequence stream, keeping when each read returned."""

    def __init__(self):
        deadline = time.time() + 60
        while True:
            try:
                self.s = socket.create_connection(("10.0.0.2", 5001), timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("cannot connect to the guest's stream")
                time.sleep(0.05)
        self.times = []
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                if not self.s.recv(1 << 16):
                    break
            except OSError:
                break
            self.times.append(time.monotonic())

    def longest_gap_ms(self, start, end):
        ts = [t for t in self.times if start <= t <= end]
        return max((b - a for a, b in zip(ts, ts[1:])), default=float("inf")) * 1000

    def close(self):
        self.stop = True
        self.s.close()
        self.t.join(timeout=5)


def config(serial, pairs):
    return {
        "cpus": {"boot_vcpus": CPUS, "max_vcpus": CPUS},
        "memory": {"size": MEMORY_GIB << 30, "shared": True},
        "payload": {"kernel": GUEST, "cmdline": "heartbeat_ms=0 net=10.0.0.2/24"},
        "serial": {"mode": "Socket", "socket": serial},
        "net": [{"id": "net0", "tap": "tap0", "num_queues": 2 * pairs}],
    }


class ApiPinger:
    """GET vmm.ping over a new connection every millisecond; counts the failures."""

    def __init__(self, baton):
        self.baton, self.stop, self.answered, self.failed = baton, False, 0, 0
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                status, _ = self.baton.request("GET", "vmm.ping", timeout=10)
                if status == 200:
                    self.answered += 1
                else:
                    self.failed += 1
            except OSError:
                self.failed += 1
            time.sleep(0.001)

    def close(self):
        self.stop = True
        self.t.join(timeout=15)


def ping_summary(text):
    for line in text.splitlines():
        if "packets transmitted" in line:
            words = line.replace(",", " ").split()
            return int(words[words.index("packets") - 1]), int(words[words.index("received") - 1])
    sys.exit(f"no ping summary in: {text[-500:]}")


def ping_gap_ms(text, start, end):
    """The longest time between two ping replies (ping -D stamps each with the wall clock)
    that arrived within [start, end]."""
    stamps = []
    for line in text.splitlines():
        if line.startswith("[") and "bytes from" in line:
            t = float(line[1:line.index("]")])
            if start <= t <= end:
                stamps.append(t)
    return max((b - a for a, b in zip(stamps, stamps[1:])), default=float("inf")) * 1000


def figures(ping, stream, stats, started, ended):
    """A run's figures once the VM moved: baton's own, the pings lost, the longest gap
    between ping replies and in the guest's stream, read once the stream flows again.
    `started` and `ended` are (monotonic, wall clock) pairs."""
    ping.wait(timeout=60)
    with open(ping.out) as f:
        out = f.read()
    sent, got = ping_summary(out)
    (started, wall_started), (ended, wall_ended) = started, ended
    deadline = time.time() + 30
    while (not stream.times or stream.times[-1] < ended + 0.2) and time.time() < deadline:
        time.sleep(0.01)
    return {
        "ping_gap_ms": ping_gap_ms(out, wall_started - 0.05, wall_ended + 0.2),
        "downtime_ms": stats["downtime_ms"],
        "total_ms": stats["total_ms"],
        "downtime_us": stats["downtime_us"],
        "total_us": stats["total_us"],
        "breakdown": stats["breakdown"],
        "lost": sent - got,
        "stream_gap_ms": stream.longest_gap_ms(started - 0.05, ended + 0.2),
    }


def one_run(workdir, mode, local, pairs):
    network(pairs)
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        serial = os.path.join(d, "serial.sock")
        src = dst = console = stream = ping = api = None
        successor = None
        try:
            src = Baton(d, "source")
            if mode != "upgrade":
                dst = Baton(d, "destination")
            src.expect("PUT", "vm.create", config(serial, pairs), 204)
            src.expect("PUT", "vm.boot", None, 204)
            console = Console(serial, lambda: src.proc.poll() is None)
            console.line(lambda l: READY in l)
            stream = Stream()
            # A reply a line, to a file: a pipe read only at the end would fill and stall it.
            with open(os.path.join(d, "ping.out"), "w") as out:
                ping = subprocess.Popen(
                    ["ping", "-D", "-n", "-W", "2", "-i", str(PING_INTERVAL),
                     "-c", str(FLOOD_COUNT), "10.0.0.2"],
                    stdout=out, stderr=subprocess.STDOUT, text=True)
            ping.out = out.name
            # Migrate once both are flowing.
            deadline = time.time() + 30
            while len(stream.times) < 100 and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            if mode == "upgrade":
                api = ApiPinger(src)
                started = (time.monotonic(), time.time())
                status, text = src.request("PUT", "vmm.live-upgrade",
                                           {"binary": os.path.abspath(BATON)}, timeout=3600)
                ended = (time.monotonic(), time.time())
                if status != 200:
                    src.fail(f"vmm.live-upgrade: {status} {text}")
                stats = json.loads(text)
                successor = stats["pid"]
                src.proc.wait(timeout=30)
                time.sleep(0.2)
                api.close()
                if ping.poll() is not None:
                    sys.exit("the ping flood ended before the upgrade did")
                return {**figures(ping, stream, stats, started, ended),
                        "api_failed": api.failed, "api_answered": api.answered}
            url = f"unix:{os.path.join(d, 'migration.sock')}"
            transfer = mode == "transfer"
            received = {}
            queues = [] if transfer else open_queues("tap1", pairs)

            def receive():
                body = {"receiver_url": url, "backend_transfer": transfer}
                try:
                    if transfer:
                        received["answer"] = dst.request("PUT", "vm.receive-migration", body,
                                                         timeout=3600)
                    else:
                        body["net_fds"] = [{"id": "net0", "num_fds": pairs}]
                        received["answer"] = request_with_fds(
                            dst.api, "vm.receive-migration", body, queues)
                except OSError as e:
                    received["answer"] = (0, str(e))

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            started = (time.monotonic(), time.time())
            body = {"destination_url": url, "local": local, "backend_transfer": transfer}
            while True:
                status, text = src.request("PUT", "vm.send-migration", body, timeout=3600)
                if status != 200 and "Cannot connect" in text and time.monotonic() < started[0] + 30:
                    time.sleep(0.02)
                    continue
                break
            ended = (time.monotonic(), time.time())
            if status != 200:
                src.fail(f"vm.send-migration: {status} {text}")
            stats = json.loads(text)
            src.proc.wait(timeout=30)
            receiver.join(timeout=30)
            for fd in queues:
                os.close(fd)
            answer = received.get("answer", (0, "no answer"))
            if answer[0] != 204:
                dst.fail(f"vm.receive-migration: {answer}")
            if ping.poll() is not None:
                sys.exit("the ping flood ended before the migration did")
            # The socket console goes along with the card.
            if stats["transferred_backends"] != (["net0", "serial"] if transfer else []):
                sys.exit(f"unexpected transferred_backends: {stats}")
            return figures(ping, stream, stats, started, ended)
        finally:
            if ping is not None and ping.poll() is None:
                ping.kill()
            for x in (stream, console):
                if x is not None:
                    x.close()
            if api is not None:
                api.close()
            for b in (src, dst):
                if b is not None:
                    b.stop()
            if successor is not None:
                try:
                    os.kill(successor, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def minmax(runs):
    """min/median/max of each figure over `runs`, then the median of each paused step."""
    figures = " ".join(f"{min_med_max(runs, key, scale):>20}" for key, scale in (
        ("downtime_us", 1000), ("total_us", 1000), ("ping_gap_ms", 1), ("stream_gap_ms", 1)))
    return "\n".join([f"{figures} {max(r['lost'] for r in runs):>5}", *step_medians(runs)])


def main():
    # SIGTERM from the caller's clean-up unwinds like Ctrl-C, so the batons are killed,
    # including a live upgrade's new one, which is no child of this script.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir, mode, local, pairs, count = sys.argv[1:6]
    runs = []
    for _ in range(int(count)):
        runs.append(one_run(workdir, mode, local == "on", int(pairs)))
        print(f"migration_net.py: {mode} local={local} pairs={pairs}: {json.dumps(runs[-1])}",
              file=sys.stderr)

    if os.environ.get("BENCH_TABLE") == "minmax":
        print(minmax(runs))
        return

    def med(key):
        return statistics.median(r[key] for r in runs)

    line = (f"{med('downtime_ms'):>11.0f} {med('total_ms'):>8.0f} {med('lost'):>10.0f} "
            f"{max(r['lost'] for r in runs):>8.0f} {med('stream_gap_ms'):>13.1f}")
    if mode == "upgrade":
        line += f" {sum(r['api_failed'] for r in runs):>10} of {sum(r['api_answered'] + r['api_failed'] for r in runs)}"
    print(line)


if __name__ == "__main__":
    main()
