"""Per-workspace quotas, enforced at the gateway for the whole cluster (docs/limits.md).

Three limits guard what one workspace can take of the cluster: its **live sessions** (not ended:
linking, ready or hibernated), its sessions **linking** at once (each holds a browser on the QR
screen), and its **creates per minute** (a token bucket). The counts are derived from Postgres,
the record of every session's state, so nothing can drift: a session that ends or is deleted
leaves the count as soon as its worker commits that, and a crash leaves nothing behind.

What Postgres cannot see yet is a create in flight (admitted, its row not yet written). Those are
*reservations* in Redis: a sorted set per workspace of session ids scored by their expiry. An
admission

1. reads the reservations and the workspace's *generation* (a counter bumped whenever a
   reservation is removed), pruning the expired ones;
2. counts the workspace's sessions in Postgres **without** the reserved ids (each is counted
   once, as a reservation), and reads the workspace's own limits;
3. runs one Lua script that, if the generation is unchanged (else: again from 1), checks the
   counts plus the reservations against the limits, takes a token from the bucket (Redis time,
   so gateways agree) and adds the reservation — all or nothing.

A reservation goes when the answer shows the row is written (a create's ``201``), shortly after a
restart's answer (its state is committed just after), at once when nothing was created (``4xx``),
and otherwise (timeout, an error after the request may have landed) when it expires, after the
longest a create can take. Several gateways share the counts exactly; an admission never counts
less than is there (at worst a create in flight is counted twice for a moment).

Without Redis (or Postgres) the quota cannot be checked: creates and restarts answer ``503
quota_unavailable`` with ``Retry-After: 1`` — fail safe (a limit not enforced during a Redis
outage is none, and a new session's lease needs Redis too); every other route works as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from shared import metrics
from shared.errors import (
    NotFound,
    QuotaLinkings,
    QuotaSessions,
    QuotaUnavailable,
    RateLimited,
    TooManyRequests,
)
from shared.models import ENDED, LINKING
from shared.redis_keys import Keys
from shared.settings import Settings

log = logging.getLogger("walink.gateway.quotas")

T = TypeVar("T")

# a cold start of a browser to its QR, conservatively (DESIGN.md: 0.75 s headless shell, 1.6 s full)
COLD_START_S = 2.0
# the Retry-After of a refusal for a count (a place frees when a session ends; no time is known)
LINKINGS_RETRY_S = 10.0
SESSIONS_RETRY_S = 60.0
# a restart's state reaches Postgres just after its answer: its reservation stays this long
SETTLE_S = 5.0
# admissions that found the reservations changed under them (a busy workspace) before giving up
MAX_ADMISSION_TRIES = 20
# the largest limit an admin may set
MAX_LIMIT = 1_000_000
LIMIT_FIELDS = ("sessions", "linkings", "creates_per_minute", "create_burst")

HEADER_LIMIT = "X-RateLimit-Limit"  # the bucket's size: creates at once
HEADER_REMAINING = "X-RateLimit-Remaining"  # creates left in it now

_ENDED = sorted(s.value for s in ENDED)
_LINKING = sorted(s.value for s in LINKING)

_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError, TimeoutError)
_PG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)

# KEYS: reserved, generation, bucket. Prunes the expired reservations (a removal bumps the
# generation); returns {generation, now (ms, Redis's clock), bucket tokens, its at_ms, ids...}.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], 86400000)
end
local b = redis.call('HMGET', KEYS[3], 'tokens', 'at_ms')
local out = {redis.call('GET', KEYS[2]) or '0', tostring(now), b[1] or '', b[2] or ''}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do out[#out + 1] = id end
return out
"""

# KEYS: reserved, generation, bucket. ARGV: seen generation, live and linking in Postgres (without
# the reserved ids), their limits, the bucket's rate (tokens per ms) and size, the session id, the
# reservation's life (ms), 1 to take a token. Returns {verdict, live, linking, tokens, retry ms}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[1]) then
  return {'again', 0, 0, '0', 0}
end
local reserved = redis.call('ZCARD', KEYS[1])
local extra = 1
if redis.call('ZSCORE', KEYS[1], ARGV[8]) then extra = 0 end
local live = tonumber(ARGV[2]) + reserved
local linking = tonumber(ARGV[3]) + reserved
local rate = tonumber(ARGV[6])
local burst = tonumber(ARGV[7])
local b = redis.call('HMGET', KEYS[3], 'tokens', 'at_ms')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
if live + extra > tonumber(ARGV[4]) then return {'sessions', live, linking, tostring(tokens), 0} end
if linking + extra > tonumber(ARGV[5]) then return {'linkings', live, linking, tostring(tokens), 0} end
if ARGV[10] == '1' then
  if tokens < 1 then
    local wait = 60000
    if rate > 0 then wait = math.ceil((1 - tokens) / rate) end
    return {'rate', live, linking, tostring(tokens), wait}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[3], 'tokens', tostring(tokens), 'at_ms', now)
  local full = 60000
  if rate > 0 then full = math.ceil((burst - tokens) / rate) + 1000 end
  redis.call('PEXPIRE', KEYS[3], full)
end
local hold = tonumber(ARGV[9])
redis.call('ZADD', KEYS[1], now + hold, ARGV[8])
if redis.call('PTTL', KEYS[1]) < hold + 1000 then redis.call('PEXPIRE', KEYS[1], hold + 1000) end
return {'ok', live + extra, linking + extra, tostring(tokens), 0}
"""

# KEYS: reserved, generation. ARGV: session id, ms to keep it (0: remove now).
_RELEASE = """
if ARGV[2] == '0' then
  if redis.call('ZREM', KEYS[1], ARGV[1]) > 0 then
    redis.call('INCR', KEYS[2])
    redis.call('PEXPIRE', KEYS[2], 86400000)
  end
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', 'LT', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# the workspace's sessions, without the reserved ids, and its own limits (NULL: the default)
_USAGE_SQL = (
    "SELECT (SELECT count(*) FROM whatsapp_accounts a"
    "         WHERE a.workspace_id = $1 AND a.deleted_at IS NULL"
    "           AND a.session_status <> ALL($2::text[]) AND a.id <> ALL($4::text[])) AS live,"
    "       (SELECT count(*) FROM whatsapp_accounts a"
    "         WHERE a.workspace_id = $1 AND a.deleted_at IS NULL"
    "           AND a.session_status = ANY($3::text[]) AND a.id <> ALL($4::text[])) AS linking,"
    "       q.sessions, q.linkings, q.creates_per_minute, q.create_burst,"
    "       EXISTS (SELECT 1 FROM workspaces w WHERE w.id = $1) AS known"
    " FROM (SELECT 1) AS one LEFT JOIN workspace_quotas q ON q.workspace_id = $1"
)


@dataclass(frozen=True, slots=True)
class Limits:
    sessions: int
    linkings: int
    creates_per_minute: int
    create_burst: int

    @property
    def rate_per_ms(self) -> float:
        return self.creates_per_minute / 60_000


def default_limits(settings: Settings) -> Limits:
    """The cluster's default limits: ``WALINK_QUOTA_*``, or a ``quota_share`` of the cluster.

    The cluster is its configured workers (``WALINK_WORKERS``; every gateway reads the same, so
    they agree): live sessions are a share of the browsers they keep active
    (``max_active_sessions`` each), linkings a share of the browsers they can put on a QR screen
    quickly (warm pool up to ``warm_pool_max`` plus ``qr_concurrency`` cold starts), creates per
    minute a share of the cold starts they can do in a minute; the bucket holds a linkings quota.
    """
    workers = max(1, len([w for w in settings.workers.split(",") if w.strip()]))
    share = settings.quota_share
    sessions = settings.quota_sessions or max(1, math.floor(share * workers * settings.max_active_sessions))
    linkings = settings.quota_linkings or max(
        1, math.floor(share * workers * (settings.warm_pool_max + settings.qr_concurrency))
    )
    per_minute = settings.quota_creates_per_minute or max(
        1, math.floor(share * workers * settings.qr_concurrency * 60 / COLD_START_S)
    )
    burst = settings.quota_create_burst or linkings
    return Limits(sessions, linkings, per_minute, burst)


@dataclass(frozen=True, slots=True)
class Usage:
    workspace_id: str
    limits: Limits
    overridden: frozenset[str]
    live: int
    linking: int
    tokens: float | None  # None: Redis could not be asked

    def view(self) -> dict[str, Any]:
        """The body of ``GET /v1/quota``."""

        def source(name: str) -> str:
            return "workspace" if name in self.overridden else "default"

        return {
            "workspace_id": self.workspace_id,
            "sessions": {"limit": self.limits.sessions, "used": self.live, "source": source("sessions")},
            "linkings": {"limit": self.limits.linkings, "used": self.linking, "source": source("linkings")},
            "creates": {
                "per_minute": self.limits.creates_per_minute,
                "burst": self.limits.create_burst,
                "remaining": None if self.tokens is None else math.floor(self.tokens),
                "source": "workspace"
                if self.overridden & {"creates_per_minute", "create_burst"}
                else "default",
            },
        }


@dataclass(frozen=True, slots=True)
class _State:
    """A workspace's reservations and create bucket as Redis holds them now."""

    generation: int
    now_ms: int
    tokens: float | None  # None: a full bucket (no key)
    at_ms: int | None
    reserved: list[str]

    def bucket(self, limits: Limits) -> float:
        """The tokens in the bucket now, refilled since it was last taken from (as the script does)."""
        if self.tokens is None or self.at_ms is None:
            return float(limits.create_burst)
        refilled = self.tokens + max(0, self.now_ms - self.at_ms) * limits.rate_per_ms
        return float(min(limits.create_burst, refilled))


@dataclass(frozen=True, slots=True)
class Admission:
    """A create (or restart) let through: its reservation, and the bucket after it."""

    workspace_id: str
    session_id: str
    limits: Limits
    tokens: float

    def headers(self) -> dict[str, str]:
        return {
            HEADER_LIMIT: str(self.limits.create_burst),
            HEADER_REMAINING: str(max(0, math.floor(self.tokens))),
        }


class Quotas:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings) -> None:
        self.pool = pool
        self.redis = redis
        self.keys = Keys(settings.redis_prefix)
        self.defaults = default_limits(settings)
        self.burst_is_linkings = settings.quota_create_burst == 0
        self.redis_timeout_s = settings.redis_timeout_s
        self.db_timeout_s = settings.db_timeout_s
        # the longest a create can take (its attempts, a take-over's wait), and then some
        self.hold_ms = round((2 * settings.proxy_timeout_s + settings.lease_ttl_ms / 1000 + 10) * 1000)
        self._read = redis.register_script(_READ)
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, workspace_id: str) -> list[str]:
        k = self.keys
        return [
            k.quota_reserved(workspace_id),
            k.quota_generation(workspace_id),
            k.quota_bucket(workspace_id),
        ]

    async def _redis(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            return await asyncio.wait_for(call(), self.redis_timeout_s)
        except _REDIS_ERRORS as exc:
            log.warning("quota: %s: Redis: %s", what, exc or type(exc).__name__)
            raise QuotaUnavailable(
                "cannot check the workspace's quota now (Redis cannot be reached); retry shortly"
            ) from exc

    async def _counts(
        self, workspace_id: str, exclude: list[str]
    ) -> tuple[Limits, frozenset[str], int, int, bool]:
        try:
            row = await asyncio.wait_for(
                self.pool.fetchrow(_USAGE_SQL, workspace_id, _ENDED, _LINKING, exclude), self.db_timeout_s
            )
        except _PG_ERRORS as exc:
            log.warning("quota: Postgres: %s", exc or type(exc).__name__)
            raise QuotaUnavailable(
                "cannot check the workspace's quota now (Postgres cannot be reached); retry shortly"
            ) from exc
        assert row is not None
        own = {name: row[name] for name in LIMIT_FIELDS if row[name] is not None}
        d = self.defaults
        burst = own.get("create_burst")
        if burst is None:  # the bucket holds a linkings quota unless its size is set
            burst = own["linkings"] if "linkings" in own and self.burst_is_linkings else d.create_burst
        limits = Limits(
            own.get("sessions", d.sessions),
            own.get("linkings", d.linkings),
            own.get("creates_per_minute", d.creates_per_minute),
            burst,
        )
        return limits, frozenset(own), int(row["live"]), int(row["linking"]), bool(row["known"])

    async def _read_state(self, workspace_id: str) -> _State:
        raw: list[bytes] = await self._redis(
            functools.partial(self._read, keys=self._keys(workspace_id)), "read"
        )
        return _State(
            generation=int(raw[0]),
            now_ms=int(raw[1]),
            tokens=float(raw[2]) if raw[2] else None,
            at_ms=int(raw[3]) if raw[3] else None,
            reserved=[r.decode() for r in raw[4:]],
        )

    async def admit(self, workspace_id: str, session_id: str, *, take_token: bool) -> Admission:
        """Let a create (``take_token``) or a restart of ``session_id`` through, or raise the 429
        (or 503) that says why not."""
        try:
            return await self._admit_agreed(workspace_id, session_id, take_token=take_token)
        except QuotaUnavailable:
            metrics.QUOTA_REFUSALS.labels("unavailable").inc()
            raise

    async def _admit_agreed(self, workspace_id: str, session_id: str, *, take_token: bool) -> Admission:
        for _ in range(MAX_ADMISSION_TRIES):
            state = await self._read_state(workspace_id)
            limits, _, live, linking, _ = await self._counts(workspace_id, [*state.reserved, session_id])
            args: list[str | int] = [
                state.generation,
                live,
                linking,
                limits.sessions,
                limits.linkings,
                repr(limits.rate_per_ms),
                limits.create_burst,
                session_id,
                self.hold_ms,
                1 if take_token else 0,
            ]
            result: list[Any] = await self._redis(
                functools.partial(self._admit, keys=self._keys(workspace_id), args=args), "admit"
            )
            verdict = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
            if verdict == "again":
                continue
            used_live, used_linking, tokens, wait_ms = (
                int(result[1]),
                int(result[2]),
                float(result[3]),
                int(result[4]),
            )
            if verdict == "ok":
                return Admission(workspace_id, session_id, limits, tokens)
            raise self._refusal(verdict, limits, used_live, used_linking, tokens, wait_ms)
        raise QuotaUnavailable("the workspace's quota is busy (many creates at once); retry shortly")

    @staticmethod
    def _refusal(
        verdict: str, limits: Limits, live: int, linking: int, tokens: float, wait_ms: int
    ) -> TooManyRequests:
        metrics.QUOTA_REFUSALS.labels(verdict).inc()
        if verdict == "sessions":
            return QuotaSessions(
                f"the workspace has {live} live sessions, its limit is {limits.sessions}; "
                "end or delete one first",
                limit=limits.sessions,
                used=live,
                retry_after_s=SESSIONS_RETRY_S,
            )
        if verdict == "linkings":
            return QuotaLinkings(
                f"the workspace has {linking} sessions linking at once, its limit is {limits.linkings}; "
                "wait for one to link, expire or be deleted",
                limit=limits.linkings,
                used=linking,
                retry_after_s=LINKINGS_RETRY_S,
            )
        return RateLimited(
            f"the workspace may create {limits.create_burst} sessions at once and "
            f"{limits.creates_per_minute} per minute; the next one in {math.ceil(wait_ms / 1000)} s",
            limit=limits.create_burst,
            used=limits.create_burst - max(0, math.floor(tokens)),
            retry_after_s=wait_ms / 1000,
        )

    async def release(self, admission: Admission, *, created: bool | None, settle: bool = False) -> None:
        """After the answer: ``created`` True (the row is written), False (nothing was created) or
        None (unknown: it may still land; the reservation lives out its time). ``settle``: keep it
        for ``SETTLE_S`` (the state is committed just after the answer)."""
        if created is None:
            return
        keep_ms = round(SETTLE_S * 1000) if settle and created else 0
        try:
            await asyncio.wait_for(
                self._release(
                    keys=self._keys(admission.workspace_id)[:2], args=[admission.session_id, keep_ms]
                ),
                self.redis_timeout_s,
            )
        except _REDIS_ERRORS as exc:  # it expires on its own
            log.info("quota: could not release %s: %s", admission.session_id, exc or type(exc).__name__)

    async def usage(self, workspace_id: str, *, must_exist: bool) -> Usage:
        """The workspace's limits and use now (``GET /v1/quota``); the bucket is None without Redis."""
        state: _State | None = None
        with contextlib.suppress(QuotaUnavailable):
            state = await self._read_state(workspace_id)
        reserved = state.reserved if state is not None else []
        limits, overridden, live, linking, known = await self._counts(workspace_id, reserved)
        if must_exist and not known:
            raise NotFound(f"no workspace {workspace_id!r}")
        tokens = state.bucket(limits) if state is not None else None
        return Usage(workspace_id, limits, overridden, live + len(reserved), linking + len(reserved), tokens)

    async def workspace_of(self, session_id: str) -> str | None:
        """The workspace of a session (for an admin's call that names none), or None."""
        try:
            value = await asyncio.wait_for(
                self.pool.fetchval("SELECT workspace_id FROM whatsapp_accounts WHERE id = $1", session_id),
                self.db_timeout_s,
            )
        except _PG_ERRORS as exc:
            raise QuotaUnavailable("cannot check the workspace's quota now; retry shortly") from exc
        return str(value) if value is not None else None

    async def set_limits(self, workspace_id: str, limits: dict[str, int | None]) -> None:
        """A workspace's own limits (None: the default), replacing the ones it had."""
        values = [limits.get(name) for name in LIMIT_FIELDS]
        try:
            await asyncio.wait_for(  # shielded: a client that leaves does not cut the write short
                asyncio.shield(
                    self.pool.execute(
                        "INSERT INTO workspace_quotas (workspace_id, sessions, linkings, creates_per_minute,"
                        " create_burst) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace_id) DO UPDATE SET"
                        " sessions = EXCLUDED.sessions, linkings = EXCLUDED.linkings,"
                        " creates_per_minute = EXCLUDED.creates_per_minute,"
                        " create_burst = EXCLUDED.create_burst, updated_at = now()",
                        workspace_id,
                        *values,
                    )
                ),
                self.db_timeout_s,
            )
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(f"no workspace {workspace_id!r}") from exc
        except _PG_ERRORS as exc:
            raise QuotaUnavailable("cannot store the workspace's quota now; retry shortly") from exc
