#!/usr/bin/env python3
"""Migration benchmark body, run by scripts/bench/migration.sh for one row of its table.

Each run starts two batons with --api-socket, boots the test guest on the source through the
API (shared memory, serial console on a socket), waits for its ready marker, optionally
starts the guest's memory dirtier, puts the destination in vm.receive-migration (in the
background: it answers when the migration ends), sends the VM with vm.send-migration
(retried while the destination is not listening yet), waits for the source to exit and
checks that the VM runs on the destination (and, when dirtying, that no page was lost).
Prints one line: the medians over the runs of total_ms, downtime_ms, memory_bytes and
iterations as vm.send-migration reports them, and of memory_bytes / memory_ms (the time
spent sending memory) in GB/s.
Each run's own answer goes to stderr.

Usage: migration.py WORKDIR MEM_MIB unix|tcp on|off RUNS [DIRTY_COMMAND]"""
import ctypes, http.client, json, os, signal, socket, statistics, subprocess, sys, tempfile
import threading, time

from guest_console import Console, field

BATON = os.path.abspath("target/release/baton")
GUEST = os.path.abspath("target/release/baton-test-guest")
READY = "baton-test-guest: ready"
TIMEOUT = 120


def die_with_parent():
    # A baton must not outlive this helper, even one killed with SIGKILL.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Baton:
    def __init__(self, d, name):
        self.api = os.path.join(d, name + ".api.sock")
        self.log = os.path.join(d, name + ".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([BATON, "--api-socket", f"path={self.api}"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=log, preexec_fn=die_with_parent)
        deadline = time.time() + 20
        while True:
            try:
                self.request("GET", "vmm.ping")
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.fail("its API socket never answered")
                time.sleep(0.005)

    def request(self, method, endpoint, body=None, timeout=TIMEOUT):
        c = UnixHTTPConnection(self.api, timeout)
        try:
            c.request(method, "/api/v1/" + endpoint,
                      body=None if body is None else json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            c.close()

    def expect(self, method, endpoint, body, status):
        got, text = self.request(method, endpoint, body)
        if got != status:
            self.fail(f"{method} {endpoint}: {got} {text}")
        return text

    def fail(self, why):
        with open(self.log, errors="replace") as f:
            tail = f.read()[-2000:]
        sys.exit(f"baton: {why}\n{tail}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(serial, mem_mib):
    return {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": mem_mib << 20, "shared": True},
        "payload": {"kernel": GUEST, "cmdline": "heartbeat_ms=0"},
        "serial": {"mode": "Socket", "socket": serial},
    }


def send(src, url, local, **extra):
    """vm.send-migration (with any `extra` fields), retried while the destination does not
    listen yet; its answer."""
    deadline = time.time() + 30
    body = {"destination_url": url, "local": local, **extra}
    while True:
        status, text = src.request("PUT", "vm.send-migration", body, timeout=3600)
        if status != 200 and "Cannot connect" in text and time.time() < deadline:
            time.sleep(0.02)
            continue
        if status != 200:
            src.fail(f"vm.send-migration: {status} {text}")
        return json.loads(text)


def min_med_max(runs, key, scale=1):
    """min/median/max of `key` over `runs` (divided by `scale`), as text."""
    values = [r[key] / scale for r in runs]
    return f"{min(values):.2f}/{statistics.median(values):.2f}/{max(values):.2f}"


def step_medians(runs):
    """Lines with the median of each step of the pause, on both sides, over `runs` (each
    with the breakdown of vm.send-migration's answer)."""
    lines = []
    for side in ("source_paused", "destination_paused"):
        steps = []
        for i, step in enumerate(runs[0]["breakdown"][side]):
            us = [r["breakdown"][side][i]["us"] for r in runs
                  if len(r["breakdown"][side]) > i]
            steps.append(f"{step['name']} {statistics.median(us):.0f}")
        lines.append(f"    {side.replace('_', ' ')}, median us: " + ", ".join(steps))
    return lines


def one_run(workdir, mem_mib, transport, local, dirty):
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        serial = os.path.join(d, "serial.sock")
        src = dst = console = None
        try:
            src, dst = Baton(d, "source"), Baton(d, "destination")
            src.expect("PUT", "vm.create", config(serial, mem_mib), 204)
            src.expect("PUT", "vm.boot", None, 204)
            console = Console(serial, lambda: src.proc.poll() is None)
            console.line(lambda l: READY in l)
            if dirty:
                console.command(dirty, "dirty:")
                # Migrate in the steady state: once the whole buffer has been written.
                while field(console.command("dirty", "dirty:"), "passes") < 1:
                    time.sleep(0.1)
            url = (f"unix:{os.path.join(d, 'migration.sock')}" if transport == "unix"
                   else f"tcp:127.0.0.1:{free_tcp_port()}")
            received = {}

            def receive():
                try:
                    received["answer"] = dst.request(
                        "PUT", "vm.receive-migration", {"receiver_url": url}, timeout=3600)
                except OSError as e:
                    received["answer"] = (0, str(e))

            receiver = threading.Thread(target=receive, daemon=True)
            receiver.start()
            stats = send(src, url, local)
            try:
                src.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                src.fail("the source did not exit after migrating")
            if src.proc.returncode != 0:
                src.fail(f"the source exited with {src.proc.returncode}")
            receiver.join(timeout=30)
            status, text = received.get("answer", (0, "no answer"))
            if status != 204:
                dst.fail(f"vm.receive-migration: {status} {text}")
            state = json.loads(dst.expect("GET", "vm.info", None, 200))["state"]
            if state != "Running":
                dst.fail(f"the VM is {state} on the destination")
            if local and stats["memory_bytes"] != 0:
                sys.exit(f"local=on copied memory: {stats}")
            if dirty:
                # Figures of a migration that lost a page would be worth nothing.
                console.close()
                console = Console(serial, lambda: dst.proc.poll() is None)
                check = console.command("dirty check", "dirty:")
                if not check.startswith("dirty: ok"):
                    sys.exit(f"the guest lost memory: {check}")
            return stats
        finally:
            for x in (console, src, dst):
                if x is not None:
                    (x.close if x is console else x.stop)()


def main():
    # SIGTERM from migration.sh's clean-up unwinds like Ctrl-C, so the batons are killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir, mem_mib, transport, local, count = sys.argv[1:6]
    dirty = sys.argv[6] if len(sys.argv) > 6 else None
    runs = []
    for _ in range(int(count)):
        runs.append(one_run(workdir, int(mem_mib), transport, local == "on", dirty))
        # Each run's own figures: the row's medians are taken field by field.
        print(f"migration.py: {mem_mib} MiB {transport} local={local} {dirty or 'idle'}: "
              f"{json.dumps(runs[-1])}", file=sys.stderr)

    def med(key):
        return statistics.median(r[key] for r in runs)

    # bytes per ms / 1e6 = GB/s
    gbps = statistics.median(r["memory_bytes"] / max(r["memory_ms"], 1) / 1e6 for r in runs)
    print(f"{med('total_ms'):>9.0f} {med('downtime_ms'):>11.0f} "
          f"{med('memory_bytes'):>14.0f} {med('iterations'):>10.0f} "
          f"{'-' if local == 'on' else f'{gbps:.2f}':>7}")


if __name__ == "__main__":
    main()
