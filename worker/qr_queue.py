"""The QR queue: this worker's cold browser starts, each waiting for a place to run.

Starting Chromium and loading WhatsApp Web is the CPU-heavy part of linking. Places come from
the machine's launch budget, shared by every worker on it through Redis
(:mod:`worker.launch_budget`); while Redis cannot be reached, from this worker alone, at most
``limit`` at once. Waiters are served by priority then arrival: a user's "add account" or wake
(``USER``) before the warm pool's refills (``BACKGROUND``) before the sessions a worker restores
at start-up or takes over (``RESTORE``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from worker.launch_budget import REDIS_ERRORS, LaunchBudget, OnWait

log = logging.getLogger("walink.queue")

USER = 0
BACKGROUND = 1
RESTORE = 2


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
        self.budget: LaunchBudget | None = None
        """The machine's budget (set once Redis is there); None: this worker's ``limit`` alone."""
        self.active = 0
        self.max_active_seen = 0
        self.started_total = 0
        self.fallbacks_total = 0
        self._local_active = 0
        self._budget_waiting = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return self._budget_waiting + sum(1 for w in self._waiters if not w.future.done())

    def stats(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "active": self.active,
            "waiting": self.waiting,
            "max_active_seen": self.max_active_seen,
            "started_total": self.started_total,
            "budget": self.budget.stats() if self.budget is not None else None,
            "fallbacks_total": self.fallbacks_total,
        }

    def _grant(self) -> None:
        self._local_active += 1

    async def _acquire_local(self, priority: int) -> None:
        if self._local_active < self.limit and not any(not w.future.done() for w in self._waiters):
            self._grant()
            return
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release_local()  # granted and cancelled at once: hand the place on
            raise

    def _release_local(self) -> None:
        self._local_active -= 1
        while self._waiters and self._local_active < self.limit:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                self._grant()
                waiter.future.set_result(None)

    async def _acquire(self, priority: int, on_wait: OnWait | None) -> str | None:
        """A place: the budget's ticket, or None for one of this worker's own places."""
        budget = self.budget
        if budget is not None:
            self._budget_waiting += 1
            try:
                return await budget.acquire(priority, on_wait)
            except REDIS_ERRORS as exc:
                self.fallbacks_total += 1
                log.warning("launch budget unavailable (%s): this worker's own limit of %d", exc, self.limit)
            finally:
                self._budget_waiting -= 1
        await self._acquire_local(priority)
        return None

    @asynccontextmanager
    async def slot(self, priority: int = USER, on_wait: OnWait | None = None) -> AsyncIterator[None]:
        """Hold a place to start a browser for the body; ``on_wait(position, eta_ms)`` is told
        where a waiter stands each time that changes (1: next to go)."""
        ticket = await self._acquire(priority, on_wait)
        self.active += 1
        self.started_total += 1
        self.max_active_seen = max(self.max_active_seen, self.active)
        try:
            yield
        finally:
            self.active -= 1
            if ticket is None:
                self._release_local()
            elif self.budget is not None:
                await self.budget.release(ticket)
