"""Ownership leases in Redis: one driver per session, with fencing tokens.

``acquire`` is ``SET key owner NX PX ttl`` plus an ``INCR`` fencing token (never below the token
Postgres last saw, so a Redis that lost its data cannot hand out an old token); ``renew`` and
``release`` are compare-and-set scripts, so a worker can only extend or drop its own lease. A
renewal that finds another owner means the lease is lost: the caller must stop driving the
session. A renewal that cannot reach Redis proves nothing; Postgres' fencing check still stops
a stale owner's writes.

A worker renews all its leases in ONE script call per tick (:meth:`Leases.renew_many`): a lease
still its own is extended, one that expired and nobody took is taken again with a new token
above the one it held, one held by another owner is reported lost. Tokens come only from the
``INCR`` counter, so no two issues of a lease share a token (see ``docs/ownership.md``).
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


_RELEASE_ENDED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
end
return 0
"""

# KEYS: lease and fence key of each session, in pairs; ARGV: owner, ttl, then each session's
# token. Per session: -1 renewed (same token), 0 lost (another owner), or the new token of a
# lease that had expired and was free (taken again above the token held).
_RENEW_MANY = """
local out = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[#out + 1] = -1
  elseif holder then
    out[#out + 1] = 0
  else
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    local token = redis.call('INCR', KEYS[i + 1])
    local floor = tonumber(ARGV[2 + (i + 1) / 2])
    if token <= floor then
      token = floor + 1
      redis.call('SET', KEYS[i + 1], token)
    end
    out[#out + 1] = token
  end
end
return out
"""

RENEWED = -1
"""A :meth:`Leases.renew_many` answer: the lease is still ours, on the token it had."""


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
        self._release_ended = redis.register_script(_RELEASE_ENDED)
        self._renew_many = redis.register_script(_RENEW_MANY)

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

    async def release_ended(self, session_id: str) -> bool:
        """An ended session lets go of everything in Redis: its lease (if it is ours) and its
        fencing counter (when nobody holds the lease: a later owner's token is floored by the
        one Postgres holds, so the counter is not needed to keep tokens rising)."""
        keys = [self.keys.lease(session_id), self.keys.fence(session_id)]
        return bool(await self._release_ended(keys=keys, args=[self.owner]))

    async def renew_many(self, held: dict[str, int]) -> dict[str, int]:
        """Renew every lease in ``held`` (session id → token held) in one round trip: per session
        :data:`RENEWED`, 0 when another owner holds it (lost), or the new token of a lease that
        had expired and was taken again."""
        if not held:
            return {}
        ids = list(held)
        keys = [k for sid in ids for k in (self.keys.lease(sid), self.keys.fence(sid))]
        answers = await self._renew_many(keys=keys, args=[self.owner, self.ttl_ms, *(held[s] for s in ids)])
        return {sid: int(answer) for sid, answer in zip(ids, answers, strict=True)}

    async def owner_of(self, session_id: str) -> str | None:
        return await lease_holder(self.redis, self.keys, session_id)


class LeaseKeeper:
    """Renews the leases a worker holds every ``ttl/3``, all of them in one round trip.

    A lease that expired while Redis was unreachable is taken again when nobody else took it
    (with a new, higher token, reported through ``on_token``); one held by another owner is
    reported through ``on_lost`` and forgotten.
    """

    def __init__(
        self,
        leases: Leases,
        on_lost: Callable[[str], None],
        on_token: Callable[[str, int], None],
        *,
        timeout_s: float | None = None,
    ) -> None:
        self.leases = leases
        self.on_lost = on_lost
        self.on_token = on_token
        self.timeout_s = timeout_s
        self.held: dict[str, int] = {}
        self.redis_ok = True

    def hold(self, session_id: str, token: int) -> None:
        self.held[session_id] = token

    def drop(self, session_id: str) -> None:
        self.held.pop(session_id, None)

    async def renew_all(self) -> list[str]:
        """One renewal round; the sessions whose lease was lost."""
        asked = dict(self.held)
        try:
            answers = await asyncio.wait_for(self.leases.renew_many(asked), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.redis_ok:
                log.warning(
                    "cannot renew leases (Redis: %s); keeping the sessions driven here on their tokens,"
                    " Postgres fences writes",
                    exc or type(exc).__name__,
                )
            self.redis_ok = False
            return []
        self.redis_ok = True
        lost: list[str] = []
        for session_id, answer in answers.items():
            if self.held.get(session_id) != asked[session_id]:
                continue  # dropped or held again meanwhile: this answer is about an older hold
            if answer == RENEWED:
                continue
            if answer > 0:
                self.held[session_id] = answer
                self.on_token(session_id, answer)
            else:
                del self.held[session_id]
                lost.append(session_id)
                self.on_lost(session_id)
        return lost

    async def run(self) -> None:
        interval_s = self.leases.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval_s)  # the renewal period, not a wait for a state
            await self.renew_all()
