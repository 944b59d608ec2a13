"""Ownership leases in Redis: one driver per session, with fencing tokens.

``acquire`` is ``SET key owner NX PX ttl`` plus an ``INCR`` fencing token (never below the token
Postgres last saw, so a Redis that lost its data cannot hand out an old token); ``renew`` and
``release`` are compare-and-set scripts, so a worker can only extend or drop its own lease. A
renewal that finds another owner means the lease is lost: the caller must stop driving the
session. A renewal that cannot reach Redis proves nothing; Postgres' fencing check still stops
a stale owner's writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.redis_keys import Keys

log = logging.getLogger("walink.leases")

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  local floor = tonumber(ARGV[3])
  if token <= floor then
    token = floor + 1
    redis.call('SET', KEYS[2], token)
  end
  return token
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local token = tonumber(redis.call('GET', KEYS[2]) or '0')
  if token <= tonumber(ARGV[3]) then
    token = tonumber(ARGV[3]) + 1
    redis.call('SET', KEYS[2], token)
  end
  return token
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


_TAKE_FROM = (
    """
if redis.call('GET', KEYS[1]) == ARGV[4] then
  redis.call('DEL', KEYS[1])
end
"""
    + _ACQUIRE
)


async def lease_holder(redis: aioredis.Redis, keys: Keys, session_id: str) -> str | None:
    """The owner named by the session's lease now; None when nobody holds it."""
    value = await redis.get(keys.lease(session_id))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Leases:
    def __init__(self, redis: aioredis.Redis, keys: Keys, owner: str, *, ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._take_from = redis.register_script(_TAKE_FROM)

    async def acquire(self, session_id: str, *, floor: int = 0) -> int | None:
        """A fencing token above ``floor`` if the lease is (now) ours, None if another owner has it."""
        token = int(
            await self._acquire(
                keys=[self.keys.lease(session_id), self.keys.fence(session_id)],
                args=[self.owner, self.ttl_ms, floor],
            )
        )
        return token or None

    async def take_from(self, session_id: str, dead_owner: str, *, floor: int = 0) -> int | None:
        """Acquire a lease still held by ``dead_owner`` (whose heartbeat is gone): atomically drop
        its lease only if it is still that owner's, then acquire as usual."""
        token = int(
            await self._take_from(
                keys=[self.keys.lease(session_id), self.keys.fence(session_id)],
                args=[self.owner, self.ttl_ms, floor, dead_owner],
            )
        )
        return token or None

    async def renew(self, session_id: str) -> bool:
        return bool(await self._renew(keys=[self.keys.lease(session_id)], args=[self.owner, self.ttl_ms]))

    async def release(self, session_id: str) -> bool:
        return bool(await self._release(keys=[self.keys.lease(session_id)], args=[self.owner]))

    async def owner_of(self, session_id: str) -> str | None:
        return await lease_holder(self.redis, self.keys, session_id)


class LeaseKeeper:
    """Renews the leases a worker holds every ``ttl/3``.

    A lease that expired while Redis was unreachable is taken again when nobody else took it
    (with a new, higher token, reported through ``on_token``); one held by another owner is
    reported through ``on_lost`` and forgotten.
    """

    def __init__(
        self,
        leases: Leases,
        on_lost: Callable[[str], None],
        on_token: Callable[[str, int], None],
    ) -> None:
        self.leases = leases
        self.on_lost = on_lost
        self.on_token = on_token
        self.held: dict[str, int] = {}
        self.redis_ok = True

    def hold(self, session_id: str, token: int) -> None:
        self.held[session_id] = token

    def drop(self, session_id: str) -> None:
        self.held.pop(session_id, None)

    async def renew_all(self) -> list[str]:
        lost: list[str] = []
        for session_id, token in list(self.held.items()):
            try:
                ok = await self.leases.renew(session_id)
                new_token = None if ok else await self.leases.acquire(session_id, floor=token)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.redis_ok:
                    log.warning(
                        "cannot renew leases (Redis: %s); keeping sessions, Postgres fences writes", exc
                    )
                self.redis_ok = False
                return lost
            self.redis_ok = True
            if session_id not in self.held:
                continue
            if new_token is not None:
                self.held[session_id] = new_token
                self.on_token(session_id, new_token)
            elif not ok:
                del self.held[session_id]
                lost.append(session_id)
                self.on_lost(session_id)
        return lost

    async def run(self) -> None:
        interval_s = self.leases.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)  # the renewal period, not a wait for a state
            await self.renew_all()
