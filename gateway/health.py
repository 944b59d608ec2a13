"""Active health checks of the workers, the monitor loop, and the cluster's aggregated health.

Every ``health_interval_s`` the monitor reads the heartbeats, then ``GET /health`` of every known
worker with a short timeout. A probe's outcome feeds the worker's breaker when the breaker lets a
call through (so an open breaker's half-open probe is usually a health check); a 503 from a
draining worker is not a failure. The answers are kept for ``/health/cluster`` and for the
bounded-load placement (in-flight linkings per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from gateway.breaker import STATE_VALUE, BreakerState
from gateway.membership import Membership, Worker
from gateway.ring import Ring
from shared import metrics

log = logging.getLogger("walink.gateway.health")

HeartbeatReader = Callable[[], Awaitable[dict[str, dict[str, Any]] | None]]


def probe_timeout_s(interval_s: float) -> float:
    """Short, but not so short that a worker busy starting browsers on a small machine looks dead."""
    return max(1.0, min(3.0, 2 * interval_s))


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

    async def probe(self, worker: Worker) -> None:
        counted = worker.breaker.acquire()
        started = time.monotonic()
        verdict: bool | None = False
        try:
            async with self.http.get(worker.url + "/health", timeout=self.timeout) as resp:
                body = await resp.read()
            health = orjson.loads(body) if body else None
            worker.health_status = resp.status
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
            worker.reachable = not isinstance(exc, aiohttp.ClientConnectorError)
            worker.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            worker.health = None
            worker.health_status = None
        except BaseException:
            if counted:
                worker.breaker.release()
            raise
        worker.checked_at = time.monotonic()
        worker.probe_ms = round((worker.checked_at - started) * 1000, 1)
        if not counted:
            return
        if verdict is True:
            worker.breaker.success()
        elif verdict is False:
            worker.breaker.failure()
        else:
            worker.breaker.release()

    async def round(self) -> None:
        beats = await self.read_heartbeats()
        self.redis_ok = beats is not None
        if beats is not None:
            self.membership.apply_heartbeats(beats)
        await asyncio.gather(*(self.probe(w) for w in self.membership.all()))
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
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
        "health": worker.health,
    }


def cluster_view(membership: Membership, ring: Ring) -> dict[str, Any]:
    """``GET /health/cluster``: every worker's health plus breaker state and ring share."""
    now = time.monotonic()
    shares = ring.shares()
    workers = [worker_view(w, shares.get(w.name, 0.0), now) for w in membership.all()]
    up = sum(1 for w in membership.all() if w.up and w.reachable)
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
