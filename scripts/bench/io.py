#!/usr/bin/env python3
"""Device benchmark body, run inside a fresh network namespace by scripts/bench/io.sh.

Starts a VMM on the test guest with a TAP in this namespace and a disk image, then measures
TCP throughput both ways, ping round-trip time and block sequential write/read, and prints
one line of results. The VMM command comes from the environment (BENCH_VMM_CMD, a JSON list
with {serial}, {disk} and {guest} placeholders)."""
import json, os, socket, subprocess, sys, tempfile, time

from guest_console import Console, field

GUEST = "10.0.0.2"
MIB = 1 << 20


def stream_block(offset, n):
    # Bytes of the guest's sequence stream from `offset` (a multiple of 8), n a multiple of 8.
    first = offset // 8
    return b"".join((first + i).to_bytes(8, "little") for i in range(n // 8))


def tcp_from_guest(size):
    s = socket.create_connection((GUEST, 5001), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
    got, t0 = 0, time.perf_counter()
    buf = bytearray(MIB)
    while got < size:
        n = s.recv_into(buf)
        if n == 0:
            sys.exit("stream closed")
        got += n
    dt = time.perf_counter() - t0
    s.close()
    return size / dt / 1e6


def tcp_to_guest(console, size):
    block = stream_block(0, MIB)
    s = socket.create_connection((GUEST, 5002), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MIB)
    t0 = time.perf_counter()
    sent = 0
    while sent < size:
        s.sendall(stream_block(sent, MIB) if sent else block)
        sent += MIB
    s.shutdown(socket.SHUT_WR)
    # Done when the guest has checked every byte.
    while True:
        l = console.command("net", "net:")
        if field(l, "sink_bytes") >= size:
            break
    dt = time.perf_counter() - t0
    s.close()
    if field(l, "sink_errors"):
        sys.exit(f"stream errors: {l}")
    return size / dt / 1e6


def ping_rtt():
    out = subprocess.run(["ping", "-q", "-c", "500", "-i", "0.002", GUEST],
                         capture_output=True, text=True).stdout
    # rtt min/avg/max/mdev = a/b/c/d ms
    stats = out.strip().splitlines()[-1].split("=")[1].split("/")
    return float(stats[1]) * 1000, float(stats[0]) * 1000


def disk(console, mib):
    sectors = mib * MIB // 512
    t0 = time.perf_counter()
    console.command(f"disk write 0 {sectors} 90", "disk:")
    w = mib / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    console.command(f"disk read 0 {sectors}", "disk:")
    r = mib / (time.perf_counter() - t0)
    return w, r


def main():
    size = int(os.environ.get("BENCH_TCP_MIB", "256")) * MIB
    disk_mib = int(os.environ.get("BENCH_DISK_MIB", "256"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as d:
        serial = os.path.join(d, "serial.sock")
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(disk_mib * MIB)
        cmd = [a.replace("{serial}", serial).replace("{disk}", image)
               for a in json.loads(os.environ["BENCH_VMM_CMD"])]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            console = Console(serial, lambda: proc.poll() is None)
            console.line(lambda l: "baton-test-guest: ready" in l, 120)
            # The TAP exists now; give the host side its address if the VMM did not.
            subprocess.run(["ip", "addr", "add", "10.0.0.1/24", "dev", "tap0"],
                           stderr=subprocess.DEVNULL)
            subprocess.run(["ip", "link", "set", "tap0", "up"], check=True)
            rtt_avg, rtt_min = ping_rtt()
            g2h = tcp_from_guest(size)
            h2g = tcp_to_guest(console, size)
            w, r = disk(console, disk_mib)
            print(f"tcp_guest_to_host_MBps={g2h:.0f} tcp_host_to_guest_MBps={h2g:.0f} "
                  f"ping_avg_us={rtt_avg:.0f} ping_min_us={rtt_min:.0f} "
                  f"disk_write_MBps={w:.0f} disk_read_MBps={r:.0f}")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
