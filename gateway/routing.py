"""Where a request goes: the worker order to try, per request.

- A new session (``POST /v1/sessions``): its id's ring walk over the workers taking new sessions,
  reordered by bounded load over the sessions each carries (from its Redis heartbeat: the same
  figures for every gateway), a worker with a warm browser first (:func:`gateway.ring.place`).
- An existing session: the owner named by its Redis lease (cached ``owner_ttl_s`` in memory; a
  missing lease is not cached) first, then the ring walk. A worker that answers for a session
  driven elsewhere says so (``X-Walink-Driver``): the proxy reads the lease again and asks the
  driver when it is up. An owner that is down or tripped is skipped: the next worker on the
  ring takes the session over (the worker side does that once the lease has expired).
- Anything else (accounts, events, replay): the ring walk of a routing key.

Draining workers are not on the ring; they come last, for an existing session's reads only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Set

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.membership import Clock, Membership, Worker
from gateway.ring import Ring, place
from shared.leases import lease_holder
from shared.redis_keys import Keys

log = logging.getLogger("walink.gateway.routing")

LeaseReader = Callable[[str], Awaitable[str | None]]
OWNER_CACHE_MAX = 100_000


class Kind(enum.Enum):
    NEW = "new"
    SESSION = "session"
    ANY = "any"


class Router:
    def __init__(
        self,
        membership: Membership,
        ring: Ring,
        read_lease: LeaseReader,
        *,
        load_bound: float,
        owner_ttl_s: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.membership = membership
        self.ring = ring
        self.read_lease = read_lease
        self.load_bound = load_bound
        self.owner_ttl_s = owner_ttl_s
        self.clock = clock
        self._owners: dict[str, tuple[float, str]] = {}

    # ------------------------------------------------------------------ owners
    async def owner_of(self, session_id: str, *, fresh: bool = False) -> str | None:
        now = self.clock()
        cached = self._owners.get(session_id)
        if not fresh and cached is not None and cached[0] > now:
            return cached[1]
        owner = await self.read_lease(session_id)
        if owner is None:
            # no lease (yet, or Redis did not answer): not remembered, so the next request looks
            # again instead of following the ring to a worker that does not drive the session
            self.forget(session_id)
        else:
            self.remember(session_id, owner)
        return owner

    def remember(self, session_id: str, owner: str) -> None:
        now = self.clock()
        if len(self._owners) >= OWNER_CACHE_MAX:
            self._owners = {k: v for k, v in self._owners.items() if v[0] > now}
            if len(self._owners) >= OWNER_CACHE_MAX:
                self._owners.clear()
        self._owners[session_id] = (now + self.owner_ttl_s, owner)

    def forget(self, session_id: str) -> None:
        self._owners.pop(session_id, None)

    # ------------------------------------------------------------------ orders
    def sync(self) -> None:
        self.ring.sync(w.name for w in self.membership.for_new_sessions())

    def _walk(self, key: str, exclude: Set[str]) -> list[Worker]:
        self.sync()
        order: list[Worker] = []
        for name in self.ring.walk(key):
            worker = self.membership.get(name)
            if worker is not None and name not in exclude and worker.routable():
                order.append(worker)
        return order

    def for_new_session(self, session_id: str, exclude: Set[str] = frozenset()) -> list[Worker]:
        walk = self._walk(session_id, exclude)
        now = self.clock()
        loads = {w.name: w.load(now) for w in walk}
        warm = {w.name: w.warm(now) for w in walk}
        by_name = {w.name: w for w in walk}
        return [by_name[n] for n in place([w.name for w in walk], loads, self.load_bound, warm)]

    def for_session(
        self, session_id: str, owner: str | None, exclude: Set[str] = frozenset()
    ) -> Iterator[Worker]:
        """Lazily: the owner first; the ring walk is computed only when the owner is not taken."""
        known = self.membership.get(owner) if owner is not None else None
        if known is not None and owner not in exclude and known.routable():
            yield known
        seen = {owner}
        for worker in self._walk(session_id, exclude):
            if worker.name not in seen:
                seen.add(worker.name)
                yield worker
        # last resort for reads: draining workers still answer them
        for worker in self.membership.all():
            if (
                worker.draining
                and worker.name not in seen
                and worker.name not in exclude
                and worker.routable()
            ):
                yield worker

    def for_any(self, key: str, exclude: Set[str] = frozenset()) -> list[Worker]:
        return self._walk(key, exclude)


class Plan:
    """The routing of one request across its attempts (see :mod:`gateway.proxy`)."""

    def __init__(self, router: Router, kind: Kind, key: str) -> None:
        self.router = router
        self.kind = kind
        self.key = key
        self.owner: str | None = None  # the owner known when the request arrived
        self._prefer: str | None = None
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.kind is Kind.SESSION:
            self.owner = self._prefer = await self.router.owner_of(self.key)

    def candidates(self, exclude: Set[str]) -> Iterable[Worker]:
        """The workers to try, best first (lazily for an existing session: its owner is enough)."""
        if self.kind is Kind.ANY:
            return self.router.for_any(self.key, exclude)
        if self.kind is Kind.NEW and self._prefer is None:
            return self.router.for_new_session(self.key, exclude)
        return self.router.for_session(self.key, self._prefer, exclude)

    async def redirect(self) -> str | None:
        """A worker said it is not the owner: read the lease again and prefer its holder."""
        self._prefer = await self.router.owner_of(self.key, fresh=True)
        return self._prefer

    def attempting(self, worker: Worker) -> None:
        if self.kind is Kind.NEW and self._prefer is None:
            worker.placed(self.router.clock(), self.key)

    def not_landed(self, worker: Worker) -> None:
        if self.kind is Kind.NEW and self._prefer is None:
            worker.unplaced(self.key)

    def served(self, worker: Worker, status: int) -> None:
        if self.kind is Kind.NEW and status == 201:
            self.router.remember(self.key, worker.name)
        elif self.kind is Kind.NEW and 400 <= status < 500 and self._prefer is None:
            worker.unplaced(self.key)  # refused there: no session to count (a 5xx may have landed)
        elif self.kind is Kind.SESSION and status == 404:
            self.router.forget(self.key)

    @property
    def owner_down(self) -> bool:
        """Was the owner known on arrival but not usable (down, tripped, or failing now)?"""
        if self.owner is None:
            return False
        worker = self.router.membership.get(self.owner)
        return worker is None or not worker.up or worker.draining


def lease_reader(redis: aioredis.Redis, keys: Keys, *, timeout_s: float) -> LeaseReader:
    """The session's lease holder from Redis; None when there is none or Redis cannot say."""

    async def read(session_id: str) -> str | None:
        try:
            return await asyncio.wait_for(lease_holder(redis, keys, session_id), timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            log.debug("lease of %s not read: %s", session_id, exc)
            return None

    return read
