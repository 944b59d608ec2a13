"""Which workers exist: the configured list plus the workers that heartbeat in Redis.

A worker's heartbeat (``{prefix}worker:{name}``, written by :mod:`worker.membership`) brings its
URL and whether it is draining. A configured worker without a heartbeat stays known and is
probed; a worker known only by heartbeat is forgotten when its heartbeat goes. What the gateway
learns by probing and proxying (reachable, last ``/health``, breaker) lives on :class:`Worker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.breaker import Breaker, BreakerPolicy, BreakerState
from shared.heartbeats import PLACEMENT_WINDOW_S, HeartbeatAuth, scan_heartbeats
from shared.redis_keys import Keys

log = logging.getLogger("walink.gateway.membership")

Clock = Callable[[], float]

# placements younger than this at a probe's start may not be in that probe's report yet (health
# reports, and heartbeats without ``recent``; one with it says exactly which it includes)
REPORT_LAG_S = 1.0


def parse_worker(entry: str) -> tuple[str, str]:
    """``host:port`` (or ``http://host:port``) → (name, base URL)."""
    entry = entry.strip().rstrip("/")
    if entry.startswith(("http://", "https://")):
        return entry.split("://", 1)[1], entry
    return entry, f"http://{entry}"


@dataclass(eq=False)
class Worker:
    name: str
    url: str
    configured: bool
    breaker: Breaker
    heartbeat: dict[str, Any] | None = None
    draining: bool = False
    reachable: bool | None = None  # None: not probed yet
    health: dict[str, Any] | None = None
    checked_at: float | None = None
    probe_ms: float | None = None
    error: str | None = None
    reported_in_flight: int = 0
    placements: deque[tuple[float, str]] = field(default_factory=deque)
    """New sessions sent there and not yet in a report: (clock time, session id)."""
    beat_sessions: int | None = None
    """Sessions the worker carries, from its heartbeat (None: its heartbeat says nothing of load)."""
    beat_warm: int = 0
    beat_at_ms: int = 0

    @property
    def tripped(self) -> bool:
        return self.breaker.state is BreakerState.OPEN

    @property
    def up(self) -> bool:
        """Reachable as far as we know and not cut off by its breaker."""
        return self.reachable is not False and not self.tripped

    @property
    def takes_new_sessions(self) -> bool:
        return self.up and not self.draining

    def routable(self) -> bool:
        """May a request go there now (its breaker would let one through)?"""
        return self.reachable is not False and self.breaker.available()

    def _expire(self, now: float) -> None:
        """A placement stays counted for PLACEMENT_WINDOW_S at most: as long as a worker names a
        create in its heartbeat's ``recent``."""
        self._forget_before(now - PLACEMENT_WINDOW_S)

    def in_flight(self, now: float) -> int:
        """Linkings in flight: the last report plus placements that report cannot include yet."""
        self._expire(now)
        return self.reported_in_flight + len(self.placements)

    def load(self, now: float) -> int:
        """What a new session is placed by: the sessions the worker carries (its heartbeat, the
        same for every gateway) plus this gateway's placements since; without a heartbeat's
        figure, its linkings in flight."""
        self._expire(now)
        base = self.beat_sessions if self.beat_sessions is not None else self.reported_in_flight
        return base + len(self.placements)

    def warm(self, now: float) -> int:
        """Warm browsers left there as far as we know: the heartbeat's, less placements since."""
        self._expire(now)
        return max(0, self.beat_warm - len(self.placements))

    def placed(self, now: float, session_id: str) -> None:
        self.placements.append((now, session_id))

    def beat(self, load: dict[str, Any], *, now: float) -> None:
        """A heartbeat's ``load``: the base of placement. Its ``sessions`` include exactly the
        creates it names in ``recent`` (and older ones), so those placements are dropped and the
        rest (still on their way to the worker) stay counted: never twice, never missed."""
        at_ms = _int(load.get("at_ms"))
        if at_ms <= self.beat_at_ms:
            return
        self.beat_sessions = _int(load.get("sessions"))
        self.beat_warm = _int(load.get("warm"))
        self.reported_in_flight = _int(load.get("in_flight"))
        self.beat_at_ms = at_ms
        recent = load.get("recent")
        if isinstance(recent, list):
            named = {sid for sid in recent if isinstance(sid, str)}
            self.placements = deque(p for p in self.placements if p[1] not in named)
        else:  # a worker that does not name its creates: as a health report
            self._forget_before(now - REPORT_LAG_S)

    def unplaced(self, session_id: str) -> None:
        """The create did not land there (refused, or never sent)."""
        for placement in reversed(self.placements):
            if placement[1] == session_id:
                self.placements.remove(placement)
                return

    def _forget_before(self, horizon: float) -> None:
        while self.placements and self.placements[0][0] < horizon:
            self.placements.popleft()

    def report(self, health: dict[str, Any], *, probe_started: float) -> None:
        """A ``/health`` answer: in-flight = sessions in QR + cold starts running or queued."""
        self.health = health
        if self.beat_sessions is not None:
            return  # placement follows the heartbeat (one figure for every gateway)
        sessions = health.get("sessions") or {}
        queue = health.get("queue") or {}
        self.reported_in_flight = (
            _int(sessions.get("qr_scanning")) + _int(queue.get("waiting")) + _int(queue.get("active"))
        )
        self._forget_before(probe_started - REPORT_LAG_S)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


class Membership:
    def __init__(
        self,
        configured: Iterable[str],
        policy: BreakerPolicy,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self._aliases: dict[str, Worker] = {}  # configured entries known by another name now
        for entry in configured:
            if entry.strip():
                name, url = parse_worker(entry)
                self.workers[name] = self._new(name, url, configured=True)

    def _new(self, name: str, url: str, *, configured: bool) -> Worker:
        def changed(state: BreakerState) -> None:
            log.info("worker %s: breaker %s", name, state.value)

        return Worker(name, url, configured, Breaker(self.policy, clock=self.clock, on_change=changed))

    def get(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def all(self) -> list[Worker]:
        return sorted(self.workers.values(), key=lambda w: w.name)

    def for_new_sessions(self) -> list[Worker]:
        return [w for w in self.all() if w.takes_new_sessions]

    def up_count(self) -> int:
        """Workers up that a probe or an answer has shown reachable (the health views' "up")."""
        return sum(1 for w in self.workers.values() if w.up and w.reachable)

    def apply_heartbeats(self, beats: dict[str, dict[str, Any]]) -> None:
        """Bring the worker list in line with the heartbeats read from Redis.

        A configured ``host:port`` whose process heartbeats under another name (``worker_name``)
        is the same worker: it is set aside while that heartbeat lives, so it is not counted twice."""
        urls: dict[str, str] = {}
        for name, beat in beats.items():
            url = str(beat.get("url") or parse_worker(name)[1]).rstrip("/")
            urls[url] = name
            worker = self.workers.get(name) or self._aliases.pop(name, None)
            if worker is None:
                log.info("worker %s joined (%s)", name, url)
                worker = self._new(name, url, configured=False)
            self.workers[name] = worker
            draining = bool(beat.get("draining"))
            if draining and not worker.draining:
                log.info("worker %s is draining: no new sessions", name)
            worker.url = url
            worker.heartbeat = beat
            worker.draining = draining
            if isinstance(beat.get("load"), dict):
                worker.beat(beat["load"], now=self.clock())
        for name, worker in list(self.workers.items()):
            if name in beats:
                continue
            if not worker.configured:
                log.info("worker %s left (no heartbeat)", name)
                del self.workers[name]
            elif worker.url in urls:
                log.info("worker %s heartbeats as %s", name, urls[worker.url])
                self._aliases[name] = self.workers.pop(name)
            else:
                worker.heartbeat = None
                worker.draining = False
                worker.beat_sessions = None
        for name, worker in list(self._aliases.items()):
            if worker.url not in urls:
                self.workers[name] = self._aliases.pop(name)


async def read_heartbeats(
    redis: aioredis.Redis, keys: Keys, *, auth: HeartbeatAuth, timeout_s: float
) -> dict[str, dict[str, Any]] | None:
    """Every live heartbeat that ``auth`` believes (signed with the internal token; without one,
    naming a loopback URL), by worker name; None when Redis cannot tell (keep what we know).

    So the gateway probes, and sends its token to, only configured workers and authentic ones."""
    try:
        return await asyncio.wait_for(scan_heartbeats(redis, keys, auth), timeout_s)
    except (RedisError, OSError, TimeoutError) as exc:
        log.debug("heartbeats not read: %s", exc)
        return None
