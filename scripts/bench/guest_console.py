"""The test guest's serial console over baton's serial socket, for the benchmark scripts:
typed commands and the lines that answer them (protocol in tests/guest/src/protocol.rs)."""

import socket
import sys
import time


class Console:
    def __init__(self, path, alive, timeout=30):
        """Connects to the socket at `path`, waiting while `alive()` says the VMM runs."""
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if not alive() or time.time() > deadline:
                    sys.exit("the VMM never opened its serial socket")
                time.sleep(0.01)
        self.buf = b""

    def line(self, pred, timeout=120):
        """The next line satisfying `pred`."""
        deadline = time.time() + timeout
        while True:
            while b"\n" in self.buf:
                l, self.buf = self.buf.split(b"\n", 1)
                l = l.decode(errors="replace").strip()
                if pred(l):
                    return l
            self.s.settimeout(max(0.01, deadline - time.time()))
            try:
                d = self.s.recv(65536)
            except socket.timeout:
                d = b""
            if not d and time.time() > deadline:
                sys.exit("no expected console line")
            self.buf += d

    def command(self, cmd, prefix):
        """Types `cmd`; its reply line (starting with `prefix`)."""
        self.s.sendall(cmd.encode() + b"\n")
        l = self.line(lambda l: l.startswith(prefix) or l.startswith("error:"))
        if l.startswith("error:"):
            sys.exit(f"{cmd}: {l}")
        return l

    def close(self):
        self.s.close()


def field(line, key):
    """The integer after `key=` in a console line."""
    for w in line.split():
        if w.startswith(key + "="):
            return int(w.split("=", 1)[1])
    raise KeyError(key)
