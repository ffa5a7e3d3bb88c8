#!/usr/bin/env python3
"""API under a connection flood: opens N idle connections and N that send an unfinished
request (argv[3], default 4000 each), then times GET vmm.ping on a new connection 200 times
and prints min/median/p99/max in microseconds, the pings that failed, and baton's open
descriptors and threads (argv[2] is its pid) before and during the flood."""
import os
import resource
import socket
import statistics
import sys
import time

PATH, PID = sys.argv[1], int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
PING = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n"


def counts():
    return len(os.listdir(f"/proc/{PID}/fd")), len(os.listdir(f"/proc/{PID}/task"))


def ping():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(PATH)
        s.sendall(PING)
        answer = s.recv(4096)
        return answer.startswith(b"HTTP/1.1 200")
    finally:
        s.close()


soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * N + 1000), hard))
before = counts()
flood = []
refused = 0
for i in range(2 * N):
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(PATH)
        if i % 2:
            s.send(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Len")
        flood.append(s)
    except OSError:
        refused += 1
        s.close()
during = counts()
times, failed = [], 0
for _ in range(200):
    t = time.perf_counter()
    try:
        ok = ping()
    except OSError:
        ok = False
    if ok:
        times.append((time.perf_counter() - t) * 1e6)
    else:
        failed += 1
after = counts()
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))] if times else float("nan")
print(f"flood: {N} idle + {N} unfinished connections ({refused} refused at connect)")
print(f"baton fds/threads: before {before[0]}/{before[1]}, flooded {during[0]}/{during[1]}, "
      f"after the pings {after[0]}/{after[1]}")
print(f"vmm.ping under the flood, new connection each (us): min {q(0):.0f} "
      f"median {statistics.median(times) if times else float('nan'):.0f} p99 {q(0.99):.0f} "
      f"max {q(1.0):.0f}; {failed} of 200 failed")
