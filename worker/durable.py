"""A worker's view of durable state: Postgres (truth) and Redis (leases, cache, fan-out).

Redis is best effort except for leases: every Redis call has a short timeout, and a Redis that
is down never stops a link this worker already drives — the API falls back to Postgres, and
Postgres' fencing tokens keep a stale owner from writing while leases cannot be checked. But no
session is created, taken over or woken without a lease: while Redis cannot be reached, and for
one lease TTL after it comes back (the owners renew or take back their leases first), that is
refused with :class:`~shared.errors.LeaseUnavailable` (503, retry). See ``docs/ownership.md``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.errors import LeaseUnavailable
from shared.heartbeats import HeartbeatAuth, heartbeat_alive, scan_heartbeats
from shared.leases import Leases
from shared.redis_keys import Keys
from shared.store import Store

log = logging.getLogger("walink.durable")

T = TypeVar("T")
CACHE_TTL_S = 24 * 3600


class Durable:
    def __init__(
        self,
        store: Store,
        redis: aioredis.Redis,
        keys: Keys,
        owner: str,
        *,
        lease_ttl_ms: int,
        redis_timeout_s: float,
        heartbeat_auth: HeartbeatAuth,
    ) -> None:
        self.store = store
        self.heartbeat_auth = heartbeat_auth  # which peers' heartbeats to believe
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.redis_timeout_s = redis_timeout_s
        self.leases = Leases(redis, keys, owner, ttl_ms=lease_ttl_ms)
        self.redis_ok = True
        # when Redis answered again after failing (monotonic s); None: no outage seen
        self._back_at: float | None = None

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.redis_ok:
            log.warning("Redis unavailable (%s: %s); continuing on Postgres", what, exc or type(exc).__name__)
        self.redis_ok = False

    def _answered(self) -> None:
        if not self.redis_ok:
            log.info("Redis is back; no take-over for %.1f s while owners renew", self.settle_s)
            self._back_at = time.monotonic()
        self.redis_ok = True

    @property
    def settle_s(self) -> float:
        """How long after an outage take-overs wait: one lease TTL, so that every owner has
        renewed (or taken back) its leases before anyone else may take one."""
        return self.leases.ttl_ms / 1000

    def settling_for_s(self) -> float:
        """How much longer take-overs from other owners wait after an outage (0: they may)."""
        if self._back_at is None:
            return 0.0
        return max(0.0, self._back_at + self.settle_s - time.monotonic())

    async def _redis(self, what: str, aw: Awaitable[T]) -> T | None:
        try:
            result = await asyncio.wait_for(aw, self.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(what, exc)
            return None
        self._answered()
        return result

    async def acquire(self, session_id: str, *, floor: int) -> int | None:
        """A fencing token above ``floor`` if this worker may drive the session, None if another
        owner holds it. Without Redis there is no lease and so no token: :class:`LeaseUnavailable`
        (the caller must not drive the session)."""
        try:
            token = await asyncio.wait_for(self.leases.acquire(session_id, floor=floor), self.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("lease", exc)
            raise LeaseUnavailable(
                f"cannot take the lease of session {session_id} now (Redis unreachable); retry shortly"
            ) from exc
        self._answered()
        return token

    async def live_workers(self) -> dict[str, dict[str, Any]] | None:
        """Heartbeats of the workers alive now (name → heartbeat), None when Redis cannot say."""
        return await self._redis("membership", scan_heartbeats(self.redis, self.keys, self.heartbeat_auth))

    async def acquire_or_take(
        self, session_id: str, *, floor: int, last_owner: str | None = None
    ) -> int | None:
        """Like :meth:`acquire`, but a lease whose holder has no heartbeat any more is taken at once
        (a dead or paused worker) instead of after its TTL.

        ``last_owner`` is the worker Postgres names as the session's driver: a session another
        worker drove is not taken while Redis is just back from an outage (:meth:`settling_for_s`)
        — its lease may only have expired during the outage, and its owner is taking it back."""
        wait_s = self.settling_for_s()
        if last_owner not in (None, self.owner) and wait_s > 0:
            raise LeaseUnavailable(
                f"Redis is just back; {last_owner} may still drive session {session_id}:"
                f" retry in {wait_s:.1f} s"
            )
        token = await self.acquire(session_id, floor=floor)
        if token is not None:
            return token
        holder = await self.lease_owner(session_id)
        if holder is None or holder == self.owner:
            return await self.acquire(session_id, floor=floor)
        alive = await self._redis(
            "membership", heartbeat_alive(self.redis, self.keys, self.heartbeat_auth, holder)
        )
        if alive is None or alive:
            return None
        log.warning("%s: owner %s has no heartbeat; taking the session over", session_id, holder)
        return await self._redis("take lease", self.leases.take_from(session_id, holder, floor=floor))

    async def release(self, session_id: str) -> None:
        await self._redis("release lease", self.leases.release(session_id))

    async def release_ended(self, session_id: str) -> None:
        """An ended session's lease and fencing counter go (Postgres keeps its token)."""
        await self._redis("release lease", self.leases.release_ended(session_id))

    async def lease_owner(self, session_id: str) -> str | None:
        return await self._redis("lease owner", self.leases.owner_of(session_id))

    async def cache_put(self, public: dict[str, Any]) -> None:
        await self._redis(
            "cache", self.redis.set(self.keys.session(public["id"]), orjson.dumps(public), ex=CACHE_TTL_S)
        )

    async def cache_get(self, session_id: str) -> dict[str, Any] | None:
        raw = await self._redis("cache", self.redis.get(self.keys.session(session_id)))
        if raw is None:
            return None
        data: dict[str, Any] = orjson.loads(raw)
        return data

    async def cache_drop(self, session_id: str) -> None:
        await self._redis("cache", self.redis.delete(self.keys.session(session_id)))

    async def publish(self, session_id: str, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        channel = self.keys.events(session_id)

        async def send() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.publish(channel, orjson.dumps(event))
                await pipe.execute()

        await self._redis("publish", send())
