"""Active health checks of the workers, the monitor loop, and the cluster's aggregated health.

Every ``health_interval_s`` the monitor reads the heartbeats, then ``GET /health`` of every known
worker with a short timeout. A probe's outcome feeds the worker's breaker when the breaker lets a
call through (so an open breaker's half-open probe is usually a health check); a 503 from a
draining worker is not a failure, nor is a timeout in a round where every probe timed out (that
is the gateway or the machine starved, not one worker). The answers are kept for
``/health/cluster`` and for the bounded-load placement (in-flight linkings per worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.breaker import STATE_VALUE, BreakerState
from gateway.membership import Membership, Worker
from gateway.ring import Ring
from shared import metrics
from shared.aio import stop_loops

log = logging.getLogger("walink.gateway.health")

HeartbeatReader = Callable[[], Awaitable[dict[str, dict[str, Any]] | None]]


def probe_timeout_s(interval_s: float) -> float:
    """Short, but not so short that a worker busy starting browsers on a small machine looks dead."""
    return max(2.0, min(5.0, 3 * interval_s))


@dataclass(frozen=True, slots=True)
class Probe:
    worker: Worker
    counted: bool  # the breaker let it through: it owes the breaker an outcome
    verdict: bool | None  # True healthy, False failed, None neither (draining on purpose)
    timed_out: bool

    def feed(self, *, starved: bool = False) -> None:
        if not self.counted:
            return
        breaker = self.worker.breaker
        if self.verdict is True:
            breaker.success()
        elif self.verdict is False and not (starved and self.timed_out):
            breaker.failure()
        else:
            breaker.release()


class HealthChecker:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        membership: Membership,
        ring: Ring,
        read_heartbeats: HeartbeatReader,
        *,
        interval_s: float,
    ) -> None:
        self.http = http
        self.membership = membership
        self.ring = ring
        self.read_heartbeats = read_heartbeats
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=probe_timeout_s(interval_s))
        self.rounds = 0
        self.redis_ok = True

    async def probe(self, worker: Worker) -> Probe:
        """One ``GET /health``; what it says of the worker is recorded, its breaker is not fed."""
        counted = worker.breaker.acquire()
        started = time.monotonic()
        verdict: bool | None = False
        timed_out = False
        try:
            async with self.http.get(worker.url + "/health", timeout=self.timeout) as resp:
                body = await resp.read()
            health = orjson.loads(body) if body else None
            if resp.status == 200 and isinstance(health, dict):
                worker.reachable, worker.error, worker.draining, verdict = True, None, False, True
                worker.report(health, probe_started=started)
            elif resp.status == 503 and isinstance(health, dict):
                # shutting down on purpose: alive, takes no new sessions, not a failure
                worker.reachable, worker.error, worker.draining, verdict = True, None, True, None
                worker.report(health, probe_started=started)
            else:
                worker.reachable, worker.error = True, f"/health answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            worker.reachable = not isinstance(exc, aiohttp.ClientConnectorError)
            worker.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            worker.health = None
            log.info(
                "worker %s: /health failed after %.0f ms: %s",
                worker.name,
                (time.monotonic() - started) * 1000,
                worker.error,
            )
        except BaseException:
            if counted:
                worker.breaker.release()
            raise
        worker.checked_at = time.monotonic()
        worker.probe_ms = round((worker.checked_at - started) * 1000, 1)
        return Probe(worker, counted, verdict, timed_out)

    async def round(self) -> None:
        beats = await self.read_heartbeats()
        self.redis_ok = beats is not None
        if beats is not None:
            self.membership.apply_heartbeats(beats)
        probes = await asyncio.gather(*(self.probe(w) for w in self.membership.all()))
        starved = len(probes) > 1 and all(p.timed_out for p in probes)
        if starved:
            # every worker slow at once: this process or the machine is starved (CPU), which says
            # nothing about any one worker; refused connections and errors still count
            log.warning("every /health timed out in this round: not held against the workers")
        for probe in probes:
            probe.feed(starved=starved)
        self.sync()
        self.rounds += 1

    def sync(self) -> None:
        """The ring follows the workers that take new sessions; the gauges follow the workers."""
        if self.ring.sync(w.name for w in self.membership.for_new_sessions()):
            log.info("ring: %s", ", ".join(sorted(self.ring.nodes)) or "empty")
        metrics.GATEWAY_WORKERS_UP.set(sum(1 for w in self.membership.all() if w.up))
        for worker in self.membership.all():
            metrics.GATEWAY_BREAKER_STATE.labels(worker.name).set(STATE_VALUE[worker.breaker.state])

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.round()
            except Exception:  # a bug in one round must not stop health checking
                log.exception("health round failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


async def stop(task: asyncio.Task[None]) -> None:
    await stop_loops(task)  # a single cancel can be lost on Python 3.11 (see stop_loops)


def worker_view(worker: Worker, share: float, now: float) -> dict[str, Any]:
    health = worker.health or {}
    sessions = health.get("sessions") or {}
    queue = health.get("queue") or {}
    if not worker.reachable:
        status = "down" if worker.reachable is False else "unknown"
    elif worker.tripped:
        status = "tripped"
    elif worker.draining:
        status = "draining"
    else:
        status = str(health.get("status") or "unknown")
    return {
        "name": worker.name,
        "url": worker.url,
        "status": status,
        "reachable": bool(worker.reachable),
        "configured": worker.configured,
        "heartbeat": worker.heartbeat is not None,
        "draining": worker.draining,
        "breaker": worker.breaker.snapshot(),
        "ring_share": share,
        "sessions_owned": sessions.get("active"),
        "queue_depth": queue.get("waiting"),
        "in_flight_linkings": worker.in_flight(now),
        "last_check_ms_ago": (None if worker.checked_at is None else round((now - worker.checked_at) * 1000)),
        "probe_ms": worker.probe_ms,
        "error": worker.error,
        "web_version": health.get("web_version"),  # the WhatsApp Web build it serves
        "health": worker.health,
    }


def cluster_view(membership: Membership, ring: Ring) -> dict[str, Any]:
    """``GET /health/cluster``: every worker's health plus breaker state and ring share."""
    now = time.monotonic()
    shares = ring.shares()
    workers = [worker_view(w, shares.get(w.name, 0.0), now) for w in membership.all()]
    up = membership.up_count()
    taking = len(ring.nodes)
    if up == 0 or taking == 0:
        status = "down"
    elif all(
        w.reachable and not w.draining and w.breaker.state is BreakerState.CLOSED for w in membership.all()
    ):
        status = "healthy"
    else:
        status = "degraded"  # some worker is down, tripped, being probed (half-open) or draining
    return {
        "status": status,
        "workers_total": len(workers),
        "workers_up": up,
        "workers_taking_sessions": taking,
        "ring": {"nodes": sorted(ring.nodes), "sample_keys": ring.sample_size, "vnodes": ring.vnodes},
        "workers": workers,
    }
