"""The warm pool: browsers already on WhatsApp Web's QR screen, waiting for an "add account".

Taking a slot is synchronous and instant (the QR is already on the page), so the first QR of a
new session costs no browser launch and no page load. The pool refills in the background through
the QR queue at background priority, and keeps its QRs live by reloading them when a batch ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections import deque

from shared.aio import stop_loops
from shared.errors import WalinkError
from shared.ids import new_profile_id
from worker import qr_queue
from worker.browser import BrowserLauncher, BrowserSlot
from worker.qr_queue import QrQueue

log = logging.getLogger("walink.pool")


class WarmPool:
    def __init__(
        self, size: int, launcher: BrowserLauncher, queue: QrQueue, first_qr_timeout_s: float
    ) -> None:
        self.size = size
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

    def stats(self) -> dict[str, int]:
        return {
            "target": self.size,
            "ready": len(self._ready),
            "filling": self._filling,
            "taken_total": self.taken_total,
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
        """A slot showing a QR, or None when the pool is empty."""
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
            await self._wake.wait()
            self._wake.clear()
            while not self._closed and len(self._ready) + self._filling < self.size:
                self._filling += 1
                task = asyncio.create_task(self._fill_one(), name="warm-pool-fill")
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
            if len(self._ready) >= self.size:
                self._full.set()
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
