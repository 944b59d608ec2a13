"""One simulated WhatsApp Web page (a companion "client"): its keys and its long-poll event queue."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_QUEUED_EVENTS = 256
CONN_LINGER_S = 3.0
"""A page instance counts as connected this long after its last long-poll ended (between polls)."""


@dataclass(eq=False)
class Client:
    device_id: str
    noise_pub: str = ""
    identity_pub: str = ""
    adv_secret: str = ""
    platform: str = ""
    batch_id: int = 0
    """Id of the live ref batch; refs of older batches are superseded."""
    batch_refs: list[str] = field(default_factory=list)
    """The refs of the live batch (an ADV refresh re-renders them with the new secret)."""
    retired_adv: set[str] = field(default_factory=set)
    """ADV secrets replaced by ``companion_reg_refresh``: a QR carrying one gets "Couldn't link device"."""
    adv_refreshed_batch: int = -1
    """The batch whose first scan was already refused (``adv_refresh: first_scan``)."""
    conn_id: str = ""
    """The page instance (one browser tab) that last spoke for this device."""
    sticky_state: str | None = None
    """A socket state the page enters again on every boot (e.g. a build the server keeps refusing)."""
    conn_polls: dict[str, int] = field(default_factory=dict)
    conn_seen: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    waiters: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_QUEUED_EVENTS))
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, event_type: str, **fields: Any) -> dict[str, Any]:
        """Queue an event for the page and wake every pending long-poll."""
        self.seq += 1
        event = {"seq": self.seq, "type": event_type, **fields}
        self.events.append(event)
        self.wake()
        return event

    def wake(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def events_after(self, after: int) -> list[dict[str, Any]]:
        if after > self.seq:  # the page's cursor predates a reset of the simulator: replay all
            after = 0
        return [event for event in self.events if event["seq"] > after]

    def connected(self, conn_id: str) -> bool:
        """Is this page instance still connected (a long-poll open, or one that just ended)?"""
        if self.conn_polls.get(conn_id, 0) > 0:
            return True
        seen = self.conn_seen.get(conn_id)
        return seen is not None and time.monotonic() - seen < CONN_LINGER_S

    async def wait_events(self, after: int, max_wait_s: float, conn_id: str = "") -> list[dict[str, Any]]:
        """Long-poll: events with seq > after, waiting up to ``max_wait_s`` for the next push."""
        self.last_seen = time.monotonic()
        if conn_id:
            self.conn_seen[conn_id] = self.last_seen
        ready = self.events_after(after)
        if ready:
            return ready
        wake = self._wake
        self.waiters += 1
        if conn_id:
            self.conn_polls[conn_id] = self.conn_polls.get(conn_id, 0) + 1
        try:
            async with asyncio.timeout(max_wait_s):
                await wake.wait()
        except TimeoutError:
            pass
        finally:  # also runs when the handler is cancelled because the client went away
            self.waiters -= 1
            self.last_seen = time.monotonic()
            if conn_id:
                self.conn_polls[conn_id] -= 1
                self.conn_seen[conn_id] = self.last_seen
        return self.events_after(after)
