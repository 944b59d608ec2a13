"""A worker's view of durable state: Postgres (truth) and Redis (leases, cache, fan-out).

Redis is best effort except for leases: every Redis call has a short timeout, and a Redis that
is down never stops a link — the API falls back to Postgres, and Postgres' fencing tokens keep a
stale owner from writing while leases cannot be checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

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

    async def _redis(self, what: str, aw: Awaitable[T]) -> T | None:
        try:
            result = await asyncio.wait_for(aw, self.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.redis_ok:
                log.warning(
                    "Redis unavailable (%s: %s); continuing on Postgres", what, exc or type(exc).__name__
                )
            self.redis_ok = False
            return None
        if not self.redis_ok:
            log.info("Redis is back")
        self.redis_ok = True
        return result

    async def acquire(self, session_id: str, *, floor: int) -> int | None:
        """A fencing token if this worker may drive the session, None if another owner holds it.

        Without Redis the token is ``floor + 1``: Postgres still refuses any older writer."""
        try:
            return await asyncio.wait_for(self.leases.acquire(session_id, floor=floor), self.redis_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("%s: no lease (Redis: %s); fencing with Postgres alone", session_id, exc)
            self.redis_ok = False
            return floor + 1

    async def live_workers(self) -> dict[str, dict[str, Any]] | None:
        """Heartbeats of the workers alive now (name → heartbeat), None when Redis cannot say."""
        return await self._redis("membership", scan_heartbeats(self.redis, self.keys, self.heartbeat_auth))

    async def acquire_or_take(self, session_id: str, *, floor: int) -> int | None:
        """Like :meth:`acquire`, but a lease whose holder has no heartbeat any more is taken at once
        (a dead or paused worker) instead of after its TTL."""
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
