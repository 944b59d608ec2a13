"""What the chaos suite watches while it breaks things.

- :class:`Receiver`: the webhook receiver (its own aiohttp server; it can be taken down and
  brought back on the same port).
- :class:`ApiProbe`: a background poller of the gateway's ``/health`` and ``GET /v1/sessions/{id}``
  that records every answer (status, error code) under the fault in progress; a request that
  gets no answer within ``ANSWER_S`` is a hang.
- :class:`FeedReader`: the client's ``GET /v1/events?after=`` feed, followed all along.
- :class:`DriverSampler`: which workers say they drive which sessions, sampled all along (two at
  once is a split brain).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from shared.models import ENDED, SessionStatus

ANSWER_S = 35.0  # longer than the gateway's proxy timeout (30 s): no answer by then is a hang
PROBE_EVERY_S = 0.25
FEED_EVERY_S = 0.5
SAMPLE_EVERY_S = 1.0


class Receiver:
    """Records every webhook POST by ``event_id`` (a redelivery counts as a duplicate)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.events: dict[str, dict[str, Any]] = {}
        self.posts = 0
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.posts += 1
        self.events.setdefault(str(body["event_id"]), body)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class Answer:
    """One answer the API gave (or did not give) while a fault was in progress."""

    phase: str
    what: str
    status: int  # 0: no HTTP answer (``code`` says why)
    code: str
    clear: bool  # a JSON ``{error: {code, message}}`` (or a 2xx)


def _error_code(status: int, body: bytes, content_type: str) -> tuple[str, bool]:
    if 200 <= status < 300:
        return "", True
    if not content_type.startswith("application/json"):
        return f"non-json {content_type or '?'}", False
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return "bad json", False
    code = str(error.get("code") or "")
    return code or "no code", bool(code and error.get("message"))


async def answer_of(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, str, bool, Any]:
    """``(status, error code, clear, JSON body or None)``; status 0 when no answer came."""
    try:
        async with http.request(method, url, timeout=aiohttp.ClientTimeout(total=ANSWER_S), **kwargs) as resp:
            raw = await resp.read()
            code, clear = _error_code(resp.status, raw, resp.content_type)
            body = orjson.loads(raw) if resp.content_type == "application/json" and raw else None
            return resp.status, code, clear, body
    except TimeoutError:
        return 0, "hang", False, None
    except aiohttp.ClientConnectorError:
        return 0, "connection refused", False, None
    except (aiohttp.ClientError, OSError) as exc:
        return 0, type(exc).__name__, False, None


class ApiProbe:
    """Polls ``/health`` and one tracked session per round, recording every answer."""

    def __init__(self, http: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> None:
        self.http = http
        self.base = base
        self.headers = headers
        self.phase = "setup"
        self.session_ids: list[str] = []
        self.answers: list[Answer] = []
        self.calls: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def _one(self, what: str, path: str) -> None:
        phase = self.phase
        status, code, clear, _ = await answer_of(self.http, "GET", self.base + path, headers=self.headers)
        self.calls[phase] += 1
        if not 200 <= status < 300:
            self.answers.append(Answer(phase, what, status, code, clear))

    async def _run(self) -> None:
        turn = 0
        while True:
            await self._one("health", "/health")
            if self.session_ids:
                sid = self.session_ids[turn % len(self.session_ids)]
                turn += 1
                await self._one("get_session", f"/v1/sessions/{sid}")
            await asyncio.sleep(PROBE_EVERY_S)  # a steady client: one round per period

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-api-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def during(self, phase: str) -> list[Answer]:
        return [a for a in self.answers if a.phase == phase]


class FeedReader:
    """Follows ``GET /v1/events?after=`` as a client would; remembers what it saw, in order."""

    def __init__(self, http: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> None:
        self.http = http
        self.base = base
        self.headers = headers
        self.after = 0
        self.seen: dict[str, dict[str, Any]] = {}
        self.duplicates = 0
        self.out_of_order: list[tuple[str, int, int]] = []  # (session, seq seen, after seq)
        self._last_seq: dict[str, int] = {}
        self.phase = "setup"
        self.answers: list[Answer] = []
        self._task: asyncio.Task[None] | None = None

    async def read_once(self) -> None:
        phase = self.phase
        url = f"{self.base}/v1/events?after={self.after}&limit=1000"
        status, code, clear, body = await answer_of(self.http, "GET", url, headers=self.headers)
        if status != 200 or body is None:
            self.answers.append(Answer(phase, "events_feed", status, code, clear))
            return
        for event in body["events"]:
            eid = str(event["event_id"])
            if eid in self.seen:
                self.duplicates += 1
                continue
            self.seen[eid] = event
            sid, seq = str(event["session_id"]), int(event["seq"])
            if seq <= self._last_seq.get(sid, 0):
                self.out_of_order.append((sid, seq, self._last_seq[sid]))
            self._last_seq[sid] = max(seq, self._last_seq.get(sid, 0))
        self.after = int(body["next_after"])

    async def _run(self) -> None:
        while True:
            await self.read_once()
            await asyncio.sleep(FEED_EVERY_S)  # a polling client

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


LIVE = {s.value for s in SessionStatus} - {s.value for s in ENDED} - {SessionStatus.HIBERNATED.value}


@dataclass
class DriverSampler:
    """Asks every running worker (straight, not through the gateway) which sessions it drives."""

    http: aiohttp.ClientSession
    workers: Callable[[], dict[str, str]]  # name -> URL of the workers running (not paused) now
    headers: dict[str, str] = field(default_factory=dict)  # the internal token
    phase: str = "setup"
    doubles: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # (phase, sid, workers)
    _task: asyncio.Task[None] | None = None

    async def sample(self) -> dict[str, set[str]]:
        """session id -> the workers that hold it live (not ended, not hibernated) right now."""
        drivers: dict[str, set[str]] = {}

        async def one(name: str, url: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with self.http.get(
                    url + "/v1/sessions", headers=self.headers, timeout=aiohttp.ClientTimeout(total=3)
                ) as resp:
                    if resp.status != 200:
                        return
                    data = await resp.json(loads=orjson.loads)
                for s in data.get("sessions") or []:
                    if s.get("status") in LIVE:
                        drivers.setdefault(str(s["id"]), set()).add(name)

        await asyncio.gather(*(one(n, u) for n, u in self.workers().items()))
        return drivers

    async def _run(self) -> None:
        while True:
            phase = self.phase
            for sid, names in (await self.sample()).items():
                if len(names) > 1:
                    self.doubles.append((phase, sid, tuple(sorted(names))))
            await asyncio.sleep(SAMPLE_EVERY_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos-drivers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def monotonic() -> float:
    return time.monotonic()
