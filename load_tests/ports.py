"""Free TCP ports for the processes the tests, the benchmark and the dev stack start.

``bind(0)`` hands out a port from the kernel's ephemeral range and forgets it once the socket
closes, so between that check and the server's own bind, any outgoing connection (to Postgres,
Redis, a worker) may take the same port as its source: the server then fails with ``EADDRINUSE``.
A port below that range is never chosen as a source port, and one process never hands out the
same port twice, so the only race left is with another program binding that very port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOWEST = 10_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_given: set[int] = set()
_rng = random.SystemRandom()


def _below_ephemeral() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        return 32_767  # Linux's default range starts at 32768


def free_port() -> int:
    """A port of 127.0.0.1 that is free now, below the ephemeral range, not handed out before."""
    highest = _below_ephemeral()
    for _ in range(1_000):
        port = _rng.randint(LOWEST, highest)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port between {LOWEST} and {highest}")
