"""A free TCP port on localhost, for the servers that tests, benchmarks and `bark-serve up` start.

The port is taken below the kernel's ephemeral range (``net.ipv4.ip_local_port_range``) and above Ray's
worker ports (10002-19999 by default). A port the OS hands out for ``bind(0)`` is an ephemeral one, and
between the moment it is found free and the moment the server binds it, any outgoing connection on the
machine (Ray opens hundreds while it starts) can be given the same number as its local port: the server
then fails with "address already in use". Outside that range only another picker can take it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 20000  # above Ray's default worker ports (--min-worker-port 10002 .. --max-worker-port 19999)
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for bind(0) and outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = (int(x) for x in RANGE_FILE.read_text().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, outside the ephemeral range where it can (another
    process may still take it before use)."""
    low, _ = ephemeral_range()
    if low - LOW >= 1000:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(LOW, low)
            if _bindable(port):
                return port
    with socket.socket() as s:  # a narrowed or exhausted range: the OS picks
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
