"""The QR queue: at most ``limit`` cold browser starts at once (the seed's QRQueue, default 3).

Starting Chromium and loading WhatsApp Web is the CPU-heavy part of linking; the queue smooths
it. Waiters are served by priority then arrival: a user's "add account" (priority 0) goes before
the warm pool's refills (priority 1).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

USER = 0
BACKGROUND = 1


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class QrQueue:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.active = 0
        self.max_active_seen = 0
        self.started_total = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    def stats(self) -> dict[str, int]:
        return {
            "limit": self.limit,
            "active": self.active,
            "waiting": self.waiting,
            "max_active_seen": self.max_active_seen,
            "started_total": self.started_total,
        }

    def _grant(self) -> None:
        self.active += 1
        self.started_total += 1
        self.max_active_seen = max(self.max_active_seen, self.active)

    async def acquire(self, priority: int = USER) -> None:
        if self.active < self.limit and not self.waiting:
            self._grant()
            return
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()  # granted and cancelled at once: hand the place on
            raise

    def release(self) -> None:
        self.active -= 1
        while self._waiters and self.active < self.limit:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                self._grant()
                waiter.future.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: int = USER) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
