"""The gateway's own HTTP/1.1 client for its calls to workers (everything but event streams).

A gateway request is two HTTP exchanges, and a profile of the gateway under load showed a third
of its CPU in aiohttp's client (request and response objects, timeouts, the connector) for what is
here a small, fixed conversation: one keep-alive connection per call to a worker we run, a request
with a few headers, an answer with ``Content-Length`` (or chunked). This client does only that, as
an :class:`asyncio.Protocol` — a write of one buffer, a parse of one buffer.

It tells a call that never reached the worker (:class:`NotSent`: refused, or no connection in
``connect_timeout_s``) from one that may have (:class:`Broken`, or ``TimeoutError``), as the proxy's
retry rules need. Idle connections are dropped after ``idle_s`` (below the workers' keep-alive of
75 s, so a connection is never reused as the worker closes it) and on any sign of closing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024


class NotSent(OSError):
    """The call did not reach the worker (no connection): any call may go elsewhere."""


class Refused(NotSent):
    """The worker's port refused the connection: it is not running there."""


class Broken(Exception):
    """The connection broke after the call was sent: the worker may have acted on it."""


Reply = tuple[int, CIMultiDictProxy[str], bytes]


Parsed = tuple[int, CIMultiDictProxy[str], bytes, bool, int]
"""``(status, headers, body, keep_alive, bytes consumed)``"""


def _head(buf: bytearray) -> tuple[int, CIMultiDict[str], bool, int] | None:
    """``(status, headers, keep_alive, body start)`` once the answer's head is in ``buf``."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise Broken("answer head too large")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        version, code = lines[0].split(" ", 2)[:2]
        status = int(code)
    except ValueError as exc:
        raise Broken(f"not an HTTP answer: {lines[0][:80]!r}") from exc
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise Broken("malformed header line")
        headers.add(name.strip(), value.strip())
    keep = version == "HTTP/1.1" and headers.get("Connection", "").lower() != "close"
    return status, headers, keep, end + 4


def _chunks(buf: bytearray, at: int) -> tuple[bytes, int] | None:
    """A chunked body from ``at``: ``(body, bytes consumed)`` once its last chunk is in."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[at:eol]).split(b";", 1)[0], 16)
        except ValueError as exc:
            raise Broken("malformed chunk size") from exc
        if size == 0:
            trailer = buf.find(b"\r\n\r\n", eol)
            return None if trailer < 0 else (bytes(body), trailer + 4)
        if eol + 2 + size + 2 > len(buf):
            return None
        body += buf[eol + 2 : eol + 2 + size]
        if len(body) > MAX_BODY_BYTES:
            raise Broken("answer too large")
        at = eol + 2 + size + 2


def _parse(buf: bytearray) -> Parsed | None:
    """A complete answer in ``buf``, or None while it is not (an answer delimited by the end of
    the connection is completed by :func:`_until_close`)."""
    head = _head(buf)
    if head is None:
        return None
    status, headers, keep, start = head
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        chunked = _chunks(buf, start)
        if chunked is None:
            return None
        del headers["Transfer-Encoding"]
        return status, CIMultiDictProxy(headers), chunked[0], keep, chunked[1]
    length = headers.get("Content-Length")
    if length is None:
        if status in (204, 304) or 100 <= status < 200:
            return status, CIMultiDictProxy(headers), b"", keep, start
        return None
    try:
        size = int(length)
    except ValueError as exc:
        raise Broken("malformed Content-Length") from exc
    if size > MAX_BODY_BYTES:
        raise Broken("answer too large")
    if len(buf) - start < size:
        return None
    return status, CIMultiDictProxy(headers), bytes(buf[start : start + size]), keep, start + size


def _until_close(buf: bytearray) -> Reply | None:
    """At the end of the connection: an answer whose body ended with it (no length, not
    chunked), or None when the answer was cut short."""
    head = _head(buf)
    if head is None:
        return None
    status, headers, _, start = head
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        return None
    return status, CIMultiDictProxy(headers), bytes(buf[start:])


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.keep = False
        self.closed = False
        self.idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        if self.transport is None or self.closed:
            raise NotSent("the connection is not open")
        self.buf.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection is not in a known state
            return
        self.buf += data
        try:
            parsed = _parse(self.buf)
        except Broken as exc:
            self._fail(exc)
            return
        if parsed is not None:
            status, headers, body, self.keep, consumed = parsed
            if consumed != len(self.buf):
                self.keep = False
            self.waiter.set_result((status, headers, body))

    def eof_received(self) -> bool:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            try:
                closed_answer = _until_close(self.buf)
            except Broken as exc:
                self._fail(exc)
                return False
            if closed_answer is None:
                self._fail(Broken("the worker closed the connection"))
            else:
                self.keep = False
                waiter.set_result(closed_answer)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(Broken(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, exc: Exception) -> None:
        self.keep = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """Keep-alive HTTP/1.1 connections to workers, one call at a time on each."""

    def __init__(
        self, *, connect_timeout_s: float, idle_s: float = 30.0, max_idle_per_worker: int = 64
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.max_idle_per_worker = max_idle_per_worker
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}
        self._busy: set[_Connection] = set()

    @staticmethod
    def handles(base_url: str) -> bool:
        return base_url.startswith("http://")

    def _address(self, base_url: str) -> tuple[str, int]:
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            address = (parts.hostname or "127.0.0.1", parts.port or 80)
            self._addresses[base_url] = address
        return address

    def _take_idle(self, address: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            transport = conn.transport
            if (
                conn.closed
                or transport is None
                or transport.is_closing()
                or now - conn.idle_since > self.idle_s
            ):
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, address: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, address[0], address[1]), self.connect_timeout_s
            )
        except ConnectionRefusedError as exc:
            raise Refused(f"connection to {address[0]}:{address[1]} refused") from exc
        except (OSError, TimeoutError) as exc:
            raise NotSent(f"no connection to {address[0]}:{address[1]}: {exc or type(exc).__name__}") from exc
        return conn

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        timeout_s: float,
    ) -> Reply:
        address = self._address(base_url)
        conn = self._take_idle(address) or await self._connect(address)
        head = [f"{method} {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                continue  # never a header that would split the request
            head.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body or b'')}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + (body or b"")
        self._busy.add(conn)
        try:
            reply = await asyncio.wait_for(conn.send(data), timeout_s)
        except BaseException:
            conn.close()
            raise
        finally:
            self._busy.discard(conn)
        if conn.keep and not conn.closed:
            conn.idle_since = time.monotonic()
            idle = self._idle.setdefault(address, deque())
            if len(idle) < self.max_idle_per_worker:
                idle.append(conn)
            else:
                conn.close()
        else:
            conn.close()
        return reply

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
