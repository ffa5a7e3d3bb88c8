#!/usr/bin/env python3
"""API latency: times GET vmm.ping against the API socket given as argv[1], on a new
connection per request and on one kept-alive connection, and prints min/median/p99 in
microseconds. The request is written as Cloud Hypervisor's api_client writes it: request line
and Host header in one write, Content-Length and the blank line in a second."""
import socket
import statistics
import sys
import time

PATH = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
HEAD = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
TAIL = b"Content-Length: 0\r\n\r\n"


def read_answer(s, buf):
    """Reads one answer (headers and Content-Length body) from s; returns the rest of buf."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed mid-answer")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected status line {status!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed mid-body")
        rest += chunk
    return rest[length:]


def new_connection():
    t = time.perf_counter_ns()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(PATH)
    s.sendall(HEAD)
    s.sendall(TAIL)
    read_answer(s, b"")
    s.close()
    return (time.perf_counter_ns() - t) / 1000


def kept_alive(s, buf):
    t = time.perf_counter_ns()
    s.sendall(HEAD)
    s.sendall(TAIL)
    buf = read_answer(s, buf)
    return (time.perf_counter_ns() - t) / 1000, buf


def report(name, samples):
    samples.sort()
    p99 = samples[int(len(samples) * 0.99) - 1]
    print(f"{name:<28} {samples[0]:8.0f} {statistics.median(samples):8.0f} {p99:8.0f}")


for _ in range(50):
    new_connection()
print(f"{'vmm.ping (' + str(RUNS) + ' runs)':<28} {'min us':>8} {'median':>8} {'p99':>8}")
report("new connection", [new_connection() for _ in range(RUNS)])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(PATH)
buf = b""
samples = []
for _ in range(RUNS):
    us, buf = kept_alive(s, buf)
    samples.append(us)
report("kept-alive connection", samples)
