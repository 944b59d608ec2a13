"""The warm pool: browsers already on WhatsApp Web's QR screen, waiting for an "add account".

Taking a slot is synchronous and instant (the QR is already on the page), so the first QR of a
new session costs no browser launch and no page load. The pool refills in the background through
the QR queue at background priority, and keeps its QRs live by reloading them when a batch ends.

Its size follows demand: at least ``size`` (0 turns the pool off), and as many as "add account"
asked for in the last ``demand_window_s`` — up to ``max_size`` and to what ``memory_budget_bytes``
holds at the PSS its browsers are measured at. After a burst it grows; when asks stop, it shrinks
back to ``size`` (the extra browsers are closed, oldest first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable

from shared.aio import stop_loops
from shared.errors import WalinkError
from shared.ids import new_profile_id
from worker import chromium, qr_queue
from worker.browser import BrowserLauncher, BrowserSlot
from worker.qr_queue import QrQueue

log = logging.getLogger("walink.pool")


class WarmPool:
    def __init__(
        self,
        size: int,
        launcher: BrowserLauncher,
        queue: QrQueue,
        first_qr_timeout_s: float,
        *,
        max_size: int | None = None,
        memory_budget_bytes: int = 0,
        demand_window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.max_size = max(size, size if max_size is None else max_size)
        self.memory_budget_bytes = memory_budget_bytes
        self.demand_window_s = demand_window_s
        self.clock = clock
        self.browser_pss_bytes = 0
        """The mean PSS of a warm browser, last measured (0: not yet)."""
        self._asks: deque[float] = deque()
        self.launcher = launcher
        self.queue = queue
        self.first_qr_timeout_s = first_qr_timeout_s
        self._ready: deque[BrowserSlot] = deque()
        self._full = asyncio.Event()
        self._filling = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fills: set[asyncio.Task[None]] = set()
        self._closed = False
        self.taken_total = 0
        self.failed_fills = 0

    @property
    def target(self) -> int:
        """How many warm browsers to keep now: the demand of the last window, within bounds."""
        if self.size == 0:
            return 0
        horizon = self.clock() - self.demand_window_s
        while self._asks and self._asks[0] < horizon:
            self._asks.popleft()
        cap = self.max_size
        if self.memory_budget_bytes and self.browser_pss_bytes:
            cap = min(cap, max(self.size, self.memory_budget_bytes // self.browser_pss_bytes))
        return min(cap, max(self.size, len(self._asks)))

    def stats(self) -> dict[str, int]:
        return {
            "target": self.target,
            "floor": self.size,
            "max": self.max_size,
            "ready": len(self._ready),
            "filling": self._filling,
            "taken_total": self.taken_total,
            "asks_in_window": len(self._asks),
            "browser_pss_bytes": self.browser_pss_bytes,
        }

    def is_closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        if self.size > 0:
            self._task = asyncio.create_task(self._keep_full(), name="warm-pool")
            self._wake.set()

    async def wait_full(self) -> None:
        """Until every warm browser shows a QR (used at start-up checks, tests and benchmarks)."""
        await self._full.wait()

    def take(self) -> BrowserSlot | None:
        """A slot showing a QR, or None when the pool is empty. Every call is an "add account":
        the demand the pool's size follows."""
        if self.size > 0:
            self._asks.append(self.clock())
        self._full.clear()
        while self._ready:
            slot = self._ready.popleft()
            if slot.dead.is_set() or slot.closing or not slot.last_qr:
                continue
            slot.set_pool_callbacks(None, None)
            self.taken_total += 1
            self._wake.set()
            return slot
        self._wake.set()
        return None

    async def _keep_full(self) -> None:
        while not self._closed:
            # above the floor, demand ages out with time: look again a few times per window
            grown = self.target > self.size or len(self._ready) > self.size
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.demand_window_s / 4 if grown else None)
            self._wake.clear()
            target = self.target
            while not self._closed and len(self._ready) + self._filling < target:
                self._filling += 1
                task = asyncio.create_task(self._fill_one(), name="warm-pool-fill")
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)
            while not self._closed and len(self._ready) > target:
                extra = self._ready.popleft()  # the oldest: its QR batch is the most used
                log.info("warm pool: demand fell; closing a warm browser (%d left)", len(self._ready))
                task = asyncio.create_task(self._discard(extra), name="warm-pool-shrink")
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)

    async def _fill_one(self) -> None:
        slot: BrowserSlot | None = None
        try:
            async with self.queue.slot(qr_queue.BACKGROUND):
                if self._closed:
                    return
                slot = await self.launcher.launch(new_profile_id())
                slot.set_pool_callbacks(self._on_idle, self._on_dead)
                await asyncio.wait_for(slot.first_qr.wait(), self.first_qr_timeout_s)
            if self.is_closed():
                return  # the finally clause discards the slot
            self._ready.append(slot)
            if len(self._ready) >= self.target:
                self._full.set()
            if len(self._ready) > self.size:
                await self._measure()
            slot = None
        except (WalinkError, TimeoutError) as exc:
            self.failed_fills += 1
            log.warning("warm pool could not start a browser: %s", exc)
        finally:
            self._filling -= 1
            if slot is not None:
                await self._discard(slot)
            if not self._closed and self.failed_fills < 1000:
                self._wake.set()

    async def _measure(self) -> None:
        """The mean PSS of the warm browsers (a /proc walk, off the event loop)."""
        pids = {slot.pid for slot in self._ready if slot.pid}
        if pids:
            totals = await asyncio.to_thread(chromium.pss_by_group, pids)
            measured = [v for v in totals.values() if v > 0]
            if measured:
                self.browser_pss_bytes = sum(measured) // len(measured)

    def _on_idle(self, slot: BrowserSlot) -> None:
        """The QR batch ran out while waiting in the pool: ask WhatsApp Web for a new one."""
        task = asyncio.create_task(self._refresh(slot))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _refresh(self, slot: BrowserSlot) -> None:
        try:
            await slot.refresh_qr()
        except WalinkError as exc:
            log.info("dropping a warm browser whose QR could not be reloaded: %s", exc)
            await self._discard(slot)

    def _on_dead(self, slot: BrowserSlot) -> None:
        task = asyncio.create_task(self._discard(slot))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _discard(self, slot: BrowserSlot) -> None:
        with contextlib.suppress(ValueError):
            self._ready.remove(slot)
        await slot.close()
        shutil.rmtree(slot.profile_dir, ignore_errors=True)
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await stop_loops(*([self._task] if self._task is not None else []), *self._fills)
        slots = list(self._ready)
        self._ready.clear()
        await asyncio.gather(*(s.close() for s in slots), return_exceptions=True)
        for s in slots:
            shutil.rmtree(s.profile_dir, ignore_errors=True)
