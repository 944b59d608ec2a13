"""The worker's heartbeat in Redis: how gateways learn that it is alive, where, and if it drains.

``{prefix}worker:{name}`` holds ``{"name", "url", "pid", "started_at_ms", "draining", "load"}``,
signed with a key derived from the internal token when one is set (see :mod:`shared.heartbeats`),
with a TTL of ``heartbeat_ttl_ms`` (6 s), refreshed every second, so a busy worker must miss several
beats before peers adopt its sessions. A worker told to stop marks itself draining at once
(gateways stop sending new sessions) and deletes the key when it is done.

``load`` is what every gateway places new sessions by (:mod:`gateway.routing`), the same for
all of them: ``{"sessions", "in_flight", "warm", "recent", "at_ms"}`` — sessions with a browser
here or starting one, linkings in flight (QR shown, or a start waiting or running), warm browsers
showing a QR, the ids of sessions whose create reached this worker lately (:class:`RecentCreates`),
and when that was counted. ``recent`` is what makes a gateway's count exact: a placement it made
is in ``sessions`` exactly when its id is in ``recent`` (or older than the window), whatever the
order in which the create's answer and the beat reach the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.heartbeats import PLACEMENT_WINDOW_S, RECENT_CREATES_MAX, HeartbeatAuth
from shared.models import now_ms
from shared.redis_keys import Keys

log = logging.getLogger("walink.membership")


class RecentCreates:
    """The sessions whose create reached this worker within ``PLACEMENT_WINDOW_S`` (the newest
    ``RECENT_CREATES_MAX``), named from the create's first step, before any await."""

    def __init__(self, *, window_s: float = PLACEMENT_WINDOW_S, limit: int = RECENT_CREATES_MAX) -> None:
        self.window_s = window_s
        self._ids: deque[tuple[float, str]] = deque(maxlen=limit)

    def add(self, session_id: str) -> None:
        self._ids.append((time.monotonic(), session_id))

    def ids(self) -> list[str]:
        horizon = time.monotonic() - self.window_s
        while self._ids and self._ids[0][0] < horizon:
            self._ids.popleft()
        return [sid for _, sid in self._ids]


class Heartbeat:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        name: str,
        url: str,
        ttl_ms: int,
        timeout_s: float,
        auth: HeartbeatAuth,
    ) -> None:
        self.redis = redis
        self.auth = auth
        self.key = keys.worker(name)
        self.name = name
        self.url = url
        self.ttl_ms = ttl_ms
        self.timeout_s = timeout_s
        self.started_at_ms = now_ms()
        self.draining = False
        self.load: Callable[[], dict[str, Any]] | None = None
        """What the worker carries now (see the module's docstring); set once sessions run."""

    def payload(self) -> bytes:
        beat: dict[str, Any] = {
            "name": self.name,
            "url": self.url,
            "pid": os.getpid(),
            "started_at_ms": self.started_at_ms,
            "draining": self.draining,
        }
        if self.load is not None:
            beat["load"] = {**self.load(), "at_ms": now_ms()}
        return orjson.dumps(self.auth.sign(beat))

    async def beat(self) -> bool:
        try:
            await asyncio.wait_for(self.redis.set(self.key, self.payload(), px=self.ttl_ms), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("heartbeat not written: %s", exc)
            return False
        return True

    async def run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(min(1.0, self.ttl_ms / 3000))  # the heartbeat period: several per TTL

    async def drain(self) -> None:
        self.draining = True
        await self.beat()

    async def leave(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.redis.delete(self.key), self.timeout_s)
