"""The launch budget: how many cold Chromium starts run at once on one machine, across workers.

A cold start (Chromium launch, WhatsApp Web's page load, the hook, up to the first QR) is the
CPU-heavy part of linking: a handful at once on two cores saturate them, and more only make each
one slower while event loops starve. The budget is therefore per *machine* (``launch_scope``,
the host name by default), sized to its cores, and shared through Redis by every worker on it —
not a limit per worker, which four workers would multiply by four.

Redis holds, per scope:

- ``…:queue`` — waiting tickets, ordered by priority then arrival (a user's "add account"
  before a warm-pool refill before a restore at start-up), so a user on one worker goes before
  a refill on another;
- ``…:alive`` — each waiting ticket's expiry, refreshed by its waiter: the tickets of a worker
  that died are dropped;
- ``…:holders`` — the starts running now with their expiry, refreshed while they run: a start
  held by a worker that died frees its place within ``HOLD_TTL_MS``.

One Lua script drops what expired, queues the ticket and grants it when its rank is within the
free places, atomically. A release or a grant publishes on ``…:released``; waiters wake on that
message (or at once on a local one, or after ``RECHECK_S`` for places freed by expiry) and ask
again. Their queue
position and an estimate of the wait are reported to ``on_wait`` whenever they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.aio import stop_loops
from shared.redis_keys import Keys

log = logging.getLogger("walink.launch")

HOLD_TTL_MS = 10_000
ALIVE_TTL_MS = 5_000
RECHECK_S = 1.0
# priorities are spread so an arrival time (ms since the epoch) fits below the next one
PRIORITY_SPAN = 10**14
# a first estimate of one cold start (launch to QR), until this process has measured some
DEFAULT_START_MS = 1_500.0

REDIS_ERRORS = (RedisError, OSError, TimeoutError)

OnWait = Callable[[int, int], None]
"""``(position, eta_ms)``: 1 is the next start to be granted."""

_ACQUIRE = """
local queue, alive, holders = KEYS[1], KEYS[2], KEYS[3]
local ticket, score, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, hold_until, alive_until = tonumber(ARGV[4]), ARGV[5], ARGV[6]
redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', alive, '-inf', now)
for _, t in ipairs(dead) do
  redis.call('ZREM', queue, t)
  redis.call('ZREM', alive, t)
end
if not redis.call('ZSCORE', queue, ticket) then
  redis.call('ZADD', queue, score, ticket)
end
local held = redis.call('ZCARD', holders)
local rank = redis.call('ZRANK', queue, ticket)
if rank < limit - held then
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', alive, ticket)
  redis.call('ZADD', holders, hold_until, ticket)
  redis.call('PEXPIRE', holders, 600000)
  redis.call('PUBLISH', ARGV[7], '1')  -- the ranks behind it moved up
  return {1, 0, held + 1}
end
redis.call('ZADD', alive, alive_until, ticket)
redis.call('PEXPIRE', queue, 600000)
redis.call('PEXPIRE', alive, 600000)
return {0, rank, held}
"""


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_scope() -> str:
    return socket.gethostname() or "local"


class LaunchBudget:
    """At most ``limit`` cold starts at once in ``scope``, cluster-wide, through Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        worker_name: str,
        scope: str,
        limit: int,
        timeout_s: float,
        hold_ttl_ms: int = HOLD_TTL_MS,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.redis = redis
        self.limit = limit
        self.scope = scope
        self.timeout_s = timeout_s
        self.hold_ttl_ms = hold_ttl_ms
        base = f"{keys.prefix}launch:{scope}:"
        self.keys = [base + "queue", base + "alive", base + "holders"]
        self.channel = base + "released"
        self._ticket_prefix = f"{worker_name}|{os.getpid()}|"
        self._seq = itertools.count()
        self._acquire = redis.register_script(_ACQUIRE)
        self._released = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._held: dict[str, float] = {}  # ticket → when it was granted (monotonic)
        self._start_ms = DEFAULT_START_MS
        self.granted_total = 0
        self.max_held_seen = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Drop tickets an earlier run of this worker left, then listen for releases."""
        await self._clear_own()
        self._listener = asyncio.create_task(self._listen(), name="launch-budget-listener")
        self._refresher = asyncio.create_task(self._refresh_holds(), name="launch-budget-holds")

    async def close(self) -> None:
        await stop_loops(*(t for t in (self._listener, self._refresher) if t is not None))
        held, self._held = list(self._held), {}
        if held:
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(self.redis.zrem(self.keys[2], *held), self.timeout_s)

    async def _clear_own(self) -> None:
        worker = self._ticket_prefix.split("|", 1)[0] + "|"
        try:
            for key in self.keys:
                members = await asyncio.wait_for(self.redis.zrange(key, 0, -1), self.timeout_s)
                own = [t for t in map(_text, members) if t.startswith(worker)]
                if own:
                    await asyncio.wait_for(self.redis.zrem(key, *own), self.timeout_s)
                    log.info("launch budget: dropped %d ticket(s) of an earlier run", len(own))
        except REDIS_ERRORS as exc:
            log.warning("launch budget: earlier tickets not checked: %s", exc)

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await asyncio.wait_for(pubsub.subscribe(self.channel), self.timeout_s)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=RECHECK_S)
                    if message is not None:
                        self._wake()
            except REDIS_ERRORS as exc:
                log.debug("launch budget: release channel lost: %s", exc)
                await asyncio.sleep(RECHECK_S)  # Redis is away: waiters re-check on their own
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await asyncio.wait_for(pubsub.aclose(), self.timeout_s)  # type: ignore[no-untyped-call]

    async def _refresh_holds(self) -> None:
        while True:
            await asyncio.sleep(self.hold_ttl_ms / 3000)  # the refresh period: several per TTL
            if not self._held:
                continue
            until = _now_ms() + self.hold_ttl_ms
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(
                    self.redis.zadd(self.keys[2], dict.fromkeys(self._held, until), xx=True), self.timeout_s
                )

    def _wake(self) -> None:
        fired, self._released = self._released, asyncio.Event()
        fired.set()

    # ------------------------------------------------------------------ a start
    def eta_ms(self, position: int) -> int:
        """How long until the start at ``position`` runs and shows its QR, as measured here."""
        return int(math.ceil(position / self.limit) * self._start_ms + self._start_ms)

    def stats(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "limit": self.limit,
            "held_here": len(self._held),
            "granted_total": self.granted_total,
            "max_held_seen": self.max_held_seen,
            "start_ms_estimate": round(self._start_ms),
        }

    async def acquire(self, priority: int, on_wait: OnWait | None = None) -> str:
        """Wait for one of the scope's places; its ticket, for :meth:`release`. Raises RedisError,
        OSError or TimeoutError when Redis cannot grant it (the ticket is then withdrawn)."""
        ticket = f"{self._ticket_prefix}{next(self._seq)}"
        score = priority * PRIORITY_SPAN + _now_ms()
        await self._wait_for_grant(ticket, score, on_wait)
        self._held[ticket] = time.monotonic()
        self.granted_total += 1
        return ticket

    async def release(self, ticket: str) -> None:
        started = self._held.pop(ticket, None)
        if started is not None:
            elapsed_ms = (time.monotonic() - started) * 1000
            self._start_ms = 0.8 * self._start_ms + 0.2 * elapsed_ms
        await asyncio.shield(self._release(ticket))

    async def _wait_for_grant(self, ticket: str, score: int, on_wait: OnWait | None) -> None:
        last: tuple[int, int] | None = None
        try:
            while True:
                released = self._released
                now = _now_ms()
                granted, rank, held = await asyncio.wait_for(
                    self._acquire(
                        keys=self.keys,
                        args=[
                            ticket,
                            score,
                            now,
                            self.limit,
                            now + self.hold_ttl_ms,
                            now + ALIVE_TTL_MS,
                            self.channel,
                        ],
                    ),
                    self.timeout_s,
                )
                if granted:
                    self.max_held_seen = max(self.max_held_seen, int(held))
                    self._wake()  # waiters here moved up: they hear it at once
                    return
                position = int(rank) + 1
                seen = (position, self.eta_ms(position))
                if on_wait is not None and seen[0] != (last or (0, 0))[0]:
                    on_wait(*seen)
                last = seen
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), RECHECK_S)
        except BaseException:
            await asyncio.shield(self._forget(ticket))
            raise

    async def _forget(self, ticket: str) -> None:
        """A waiter that gave up (cancelled, or Redis failed): its ticket goes, wherever it is."""
        with contextlib.suppress(*REDIS_ERRORS):
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in self.keys:
                    pipe.zrem(key, ticket)
                pipe.publish(self.channel, b"1")
                await asyncio.wait_for(pipe.execute(), self.timeout_s)

    async def _release(self, ticket: str) -> None:
        self._wake()  # waiters here need not wait for the message's round trip
        with contextlib.suppress(*REDIS_ERRORS):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys[2], ticket)
                pipe.publish(self.channel, b"1")
                await asyncio.wait_for(pipe.execute(), self.timeout_s)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
