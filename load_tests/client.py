"""The benchmark's client side: the session API over HTTP, its SSE stream, a webhook receiver.

This is how a SaaS backend talks to walink: ``POST /v1/sessions``, then the events stream
(``qr``, ``session_ready``, ``session_synced``) — no polling. Every wait is bounded.

The phone side is what a user does (``tests/conftest.py`` ``scan_until_linked``): a scan the phone
refuses with "Couldn't link device" (409 ``couldnt_link_device``: the 2026 page refreshed the QR's
ADV secret, ``adv_refresh``) or 410 ``qr_expired`` (the ref rotated) means scanning the next QR
that walink publishes, a few times at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from shared.webhooks import SIGNATURE_HEADER, verify

LOOPBACK = "127.0.0.1"


class ClientError(RuntimeError):
    """An unexpected answer, a closed stream or a wait that ran out of time."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: dict[str, Any]
    at: float = field(default=0.0, compare=False)  # time.perf_counter() when the client read it


def is_qr(ev: SseEvent) -> bool:
    return ev.event == "qr" and bool(ev.data.get("qr"))


def is_new_qr(old: str) -> Callable[[SseEvent], bool]:
    """A ``qr`` event with another string than ``old``: a new ref, or the same ref re-rendered with
    a new ADV secret."""
    return lambda ev: is_qr(ev) and str(ev.data["qr"]) != old


def is_synced(ev: SseEvent) -> bool:
    """``session_synced``: the history sync is done (it comes after ``session_ready``)."""
    return ev.event == "session_synced"


def is_ready(ev: SseEvent) -> bool:
    """``session_ready``, or a ``status`` of ready (a stream opened late shows the latest status)."""
    return ev.event == "session_ready" or (ev.event == "status" and ev.data.get("status") == "ready")


def is_ended(ev: SseEvent) -> bool:
    return ev.event in {"session_failed", "session_disconnected"} or (
        ev.event == "status" and ev.data.get("status") in {"failed", "expired", "logged_out", "deleted"}
    )


class SseStream:
    """One open ``GET /v1/sessions/{id}/events``."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.seen: list[SseEvent] = []

    @classmethod
    async def open(
        cls, http: aiohttp.ClientSession, url: str, *, headers: dict[str, str] | None = None, timeout_s: float
    ) -> SseStream:
        try:
            resp = await asyncio.wait_for(
                http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)),
                timeout_s,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"cannot open {url}: {exc!r}") from exc
        if resp.status != 200:
            body = await resp.text()
            resp.release()
            raise ClientError(f"GET {url} → {resp.status}: {body[:300]}")
        return cls(resp)

    async def next(self) -> SseEvent:
        event: str | None = None
        data: dict[str, Any] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise ClientError("event stream ended")
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = orjson.loads(line[5:].strip())
            elif line == "" and event is not None:
                ev = SseEvent(event, data, time.perf_counter())
                self.seen.append(ev)
                return ev

    async def until(self, wanted: Callable[[SseEvent], bool], timeout_s: float) -> SseEvent:
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    ev = await self.next()
                    if wanted(ev):
                        return ev
                    if is_ended(ev):
                        raise ClientError(f"session ended while waiting: {ev.event} {ev.data}")
        except TimeoutError:
            last = [e.event for e in self.seen[-5:]]
            raise ClientError(f"no such event within {timeout_s:.0f}s (last: {last})") from None

    async def seen_or_until(self, wanted: Callable[[SseEvent], bool], timeout_s: float) -> SseEvent:
        """The first event already read that matches, else :meth:`until`."""
        for ev in self.seen:
            if wanted(ev):
                return ev
        return await self.until(wanted, timeout_s)

    def close(self) -> None:
        self.resp.close()


# ---------------------------------------------------------------------------- the phone
RESCAN = frozenset({(409, "couldnt_link_device"), (410, "qr_expired")})
"""Answers of ``POST /phone/scan`` after which a user scans the next QR the page shows."""
MAX_SCANS = 4


class ScanRefused(ClientError):
    """``POST /phone/scan`` did not answer 200."""

    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(f"POST /phone/scan → {status} {code}: {message}"[:400])
        self.status = status
        self.code = code

    @property
    def rescan(self) -> bool:
        """The phone says to scan the next QR: "Couldn't link device" or an expired QR."""
        return (self.status, self.code) in RESCAN


Scan = Callable[[str, str], Awaitable[Any]]
"""``scan(qr, phone)``: the phone scans; raises :class:`ScanRefused` unless the scan is taken."""


@dataclass(frozen=True, slots=True)
class Scanned:
    at: float  # time.perf_counter() just before the scan that succeeded (the 200) was sent
    qr: str  # the QR that linked
    scans: int  # scans it took (1 when the page takes the first scan)
    refused_to_qr_s: tuple[float, ...]  # each refused scan's answer → the next QR read on the stream
    refused: tuple[str, ...] = ()  # the refused scans' answers, e.g. "409 couldnt_link_device"


async def scan_until_linked(
    scan: Scan, stream: SseStream, qr: str, phone: str, *, timeout_s: float = 60.0, max_scans: int = MAX_SCANS
) -> Scanned:
    """Scan ``qr`` with ``phone``; when the phone refuses it (:data:`RESCAN`), scan the next QR
    that walink publishes on ``stream``; at most ``max_scans`` scans."""
    to_qr: list[float] = []
    refused: list[str] = []
    for n in range(1, max_scans + 1):
        t0 = time.perf_counter()
        try:
            await scan(qr, phone)
        except ScanRefused as exc:
            if not exc.rescan or n == max_scans:
                raise
            t_refused = time.perf_counter()
            refused.append(f"{exc.status} {exc.code}")
            ev = await stream.until(is_new_qr(qr), timeout_s)
            to_qr.append(ev.at - t_refused)
            qr = str(ev.data["qr"])
            continue
        return Scanned(t0, qr, n, tuple(to_qr), tuple(refused))
    raise ClientError("max_scans must be at least 1")


class Api:
    """The session API of a worker or of the gateway (same routes)."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.headers = headers or {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _json(self, method: str, path: str, expect: set[int], body: Any = None) -> dict[str, Any]:
        try:
            async with self.http.request(
                method, self.base + path, json=body, headers=self.headers, timeout=self.timeout
            ) as resp:
                raw = await resp.read()
                if resp.status not in expect:
                    raise ClientError(f"{method} {path} → {resp.status}: {raw[:300]!r}")
                if not raw:
                    return {}
                data: dict[str, Any] = orjson.loads(raw)
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"{method} {path}: {exc!r}") from exc

    async def create(self, **body: Any) -> dict[str, Any]:
        return await self._json("POST", "/v1/sessions", {201}, body)

    async def get(self, session_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/sessions/{session_id}", {200})

    async def delete(self, session_id: str) -> None:
        await self._json("DELETE", f"/v1/sessions/{session_id}", {204, 404})

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/health", {200, 503})

    async def events(self, session_id: str, timeout_s: float = 30.0) -> SseStream:
        return await SseStream.open(
            self.http,
            f"{self.base}/v1/sessions/{session_id}/events",
            headers=self.headers,
            timeout_s=timeout_s,
        )

    @contextlib.asynccontextmanager
    async def stream(self, session_id: str, timeout_s: float = 30.0) -> AsyncIterator[SseStream]:
        """The session's events stream, open for the ``async with`` block and closed after it."""
        stream = await self.events(session_id, timeout_s)
        try:
            yield stream
        finally:
            stream.close()

    async def delete_where_possible(self, session_ids: list[str], concurrency: int = 6) -> list[str]:
        """Delete sessions, a few at a time; returns those that could not be deleted here."""
        gate = asyncio.Semaphore(concurrency)
        failed: list[str] = []

        async def one(sid: str) -> None:
            async with gate:
                try:
                    await self.delete(sid)
                except ClientError:
                    failed.append(sid)

        await asyncio.gather(*(one(s) for s in session_ids))
        return failed

    async def delete_all(self, session_ids: list[str], concurrency: int = 6) -> int:
        """Delete sessions; returns how many could not be deleted."""
        return len(await self.delete_where_possible(session_ids, concurrency))


async def wait_pool_full(api: Api, timeout_s: float) -> dict[str, Any]:
    """Until the worker's warm pool holds its target of browsers on the QR screen (polls /health)."""
    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        health = await api.health()
        pool = health.get("pool") or {}
        if int(pool.get("ready", 0)) >= int(pool.get("target", 0)):
            return health
        await asyncio.sleep(0.05)
    raise ClientError(f"warm pool not full after {timeout_s:.0f}s: {health.get('pool')}")


async def link(
    api: Api,
    scan: Scan,
    phone: str,
    *,
    timeout_s: float = 60.0,
    **body: Any,
) -> dict[str, Any]:
    """Create a session, scan its QR with ``phone`` (the next QR again when the phone says so),
    wait for ``session_ready``; the created body."""
    created = await api.create(**body)
    async with api.stream(created["id"]) as stream:
        qr = await stream.until(is_qr, timeout_s)
        await scan_until_linked(scan, stream, str(qr.data["qr"]), phone, timeout_s=timeout_s)
        ready = await stream.until(is_ready, timeout_s)
        if ready.event == "session_ready" and ready.data.get("phone_number") != phone:
            raise ClientError(f"session_ready with phone {ready.data.get('phone_number')}, expected {phone}")
    return created


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: str
    event: str
    session_id: str
    occurred_at_ms: int
    received_at_ms: float


class WebhookReceiver:
    """A local aiohttp receiver that checks ``X-Walink-Signature`` and notes when each event arrived."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self.bad_signatures = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        received_ms = time.time_ns() / 1e6
        if not verify(self.secret, body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        payload = orjson.loads(body)
        self.deliveries.append(
            Delivery(
                event_id=str(payload["event_id"]),
                event=str(payload["event"]),
                session_id=str(payload["session_id"]),
                occurred_at_ms=int(payload["occurred_at_ms"]),
                received_at_ms=received_ms,
            )
        )
        self._changed.set()
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        site = web.TCPSite(self._runner, LOOPBACK, port)
        await site.start()
        self.url = f"http://{LOOPBACK}:{port}/hook"
        return self.url

    async def wait_for(self, done: Callable[[list[Delivery]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done(self.deliveries):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
