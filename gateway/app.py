"""The gateway's aiohttp application: one cleanup context per resource, in dependency order.

Start: HTTP clients (to the workers: calls, streams, health probes) → Postgres (API keys) →
Redis (heartbeats, leases, quotas) → cluster (membership, breakers, ring, health checks: one
round before the first request, then every ``health_interval_s``). SIGTERM/SIGINT: stop
listening, end the open event streams (clients resume on another gateway), let running requests
finish within ``shutdown_deadline_s``, then release the resources backwards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway import api, pages
from gateway.auth import Authenticator, KeyCache, auth_middleware
from gateway.breaker import BreakerPolicy
from gateway.health import HealthChecker, probe_timeout_s, stop
from gateway.keys import (
    AUTH,
    HEALTH,
    HEALTH_HTTP,
    HTTP,
    MEMBERSHIP,
    POOL,
    PROXY,
    QUOTAS,
    REDIS,
    RING,
    ROUTER,
    SETTINGS,
    STARTED_AT,
    STREAM_HTTP,
    STREAMS,
)
from gateway.membership import Membership, read_heartbeats
from gateway.proxy import Proxy
from gateway.quotas import Quotas
from gateway.ring import Ring
from gateway.routing import Router, lease_reader
from gateway.sse import Streams
from shared import aio, metrics, resources
from shared import store as store_mod
from shared.heartbeats import HeartbeatAuth
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.web import error_middleware, serve_until_signalled

log = logging.getLogger("walink.gateway")

# connections to one worker of the calls aiohttp carries (streams and probes have their own)
CONNECTIONS_PER_WORKER = 512
# a health probe at a time per worker, and one to spare for a probe that is timing out
HEALTH_CONNECTIONS_PER_WORKER = 2
# below the workers' server keep-alive (aiohttp: 75 s), so a socket is never reused as it closes
KEEPALIVE_S = 30.0


def _client(limit: int, limit_per_host: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=limit_per_host, keepalive_timeout=KEEPALIVE_S
    )
    # no cookie jar: a proxy must never carry one client's cookies to another (and it is faster)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    """Three connection pools to the workers: calls (aiohttp's, for what the gateway's own client
    does not handle, and listings), event streams (one connection each for their lifetime, as many
    as the gateway allows streams) and health probes (small: one probe per worker at a time), so
    that open streams or heavy traffic never keep a health probe waiting for a connection."""
    settings = app[SETTINGS]
    async with (
        _client(0, CONNECTIONS_PER_WORKER) as http,
        _client(settings.sse_max_per_gateway, settings.sse_max_per_gateway) as stream_http,
        _client(0, HEALTH_CONNECTIONS_PER_WORKER) as health_http,
    ):
        app[HTTP] = http
        app[STREAM_HTTP] = stream_http
        app[HEALTH_HTTP] = health_http
        yield


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    """Postgres for API keys (created and migrated if missing, like the workers do)."""
    settings = app[SETTINGS]
    async with resources.open_pool(settings, max_size=5) as pool:
        app[POOL] = pool
        app[AUTH] = Authenticator(
            store_mod.Store(pool).key_scope,
            dev_api_key=settings.dev_api_key,
            timeout_s=settings.db_timeout_s,
            cache=KeyCache(),
        )
        yield


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    async with resources.open_redis(app[SETTINGS]) as client:
        app[REDIS] = client
        app[QUOTAS] = Quotas(app[POOL], client, app[SETTINGS])
        yield


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Membership, breakers, the ring and the health checks; the proxy that uses them."""
    settings = app[SETTINGS]
    keys = Keys(settings.redis_prefix)
    policy = BreakerPolicy(
        failures=settings.breaker_failures,
        failure_rate=settings.breaker_failure_rate,
        window_s=settings.breaker_window_s,
        open_s=settings.breaker_open_s,
    )
    membership = Membership(settings.workers.split(","), policy)
    ring = Ring()
    redis = app[REDIS]
    app[MEMBERSHIP] = membership
    app[RING] = ring
    app[ROUTER] = Router(
        membership,
        ring,
        lease_reader(redis, keys, timeout_s=settings.redis_timeout_s),
        load_bound=settings.load_bound,
    )
    app[PROXY] = Proxy(
        app[HTTP],
        stream_http=app[STREAM_HTTP],
        internal_token=settings.internal_token,
        timeout_s=settings.proxy_timeout_s,
        stream_idle_s=2 * settings.sse_keepalive_s + 5,
        takeover_budget_s=settings.lease_ttl_ms / 1000 + 1,
    )
    checker = HealthChecker(
        app[HEALTH_HTTP],
        membership,
        ring,
        functools.partial(
            read_heartbeats,
            redis,
            keys,
            auth=HeartbeatAuth(settings.internal_token),
            timeout_s=settings.redis_timeout_s,
        ),
        interval_s=settings.health_interval_s,
    )
    app[HEALTH] = checker
    try:  # know the workers before the first request; a slow round must not stop the gateway
        await asyncio.wait_for(
            checker.round(), probe_timeout_s(settings.health_interval_s) + settings.redis_timeout_s + 1
        )
    except TimeoutError:
        log.warning("the first health round did not finish in time; serving with what is known")
    log.info(
        "workers: %s; ring: %s",
        ", ".join(f"{w.name}{'' if w.reachable else ' (down)'}" for w in membership.all()) or "none",
        ", ".join(sorted(ring.nodes)) or "empty",
    )
    task = asyncio.create_task(checker.run(), name="health-checks")
    try:
        yield
    finally:
        await stop(task)
        app[PROXY].close()


async def on_shutdown(app: web.Application) -> None:
    """End the open event streams so the runner need not wait for them (clients resume)."""
    app[STREAMS].close_all()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, auth_middleware, api.metrics_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[STARTED_AT] = time.monotonic()
    app[STREAMS] = Streams(
        max_total=settings.sse_max_per_gateway, max_per_workspace=settings.sse_max_per_workspace
    )
    metrics.GATEWAY_SSE_STREAMS_MAX.set(settings.sse_max_per_gateway)
    app.cleanup_ctx.extend([http_ctx, db_ctx, redis_ctx, cluster_ctx])
    app.on_shutdown.append(on_shutdown)
    pages.add_routes(app)
    api.add_routes(app)
    return app


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down in order within the deadline."""
    await serve_until_signalled(
        create_app(settings),
        host=settings.host,
        port=settings.gateway_port,
        shutdown_timeout_s=settings.shutdown_deadline_s,
        stopping="stopping",
        handler_cancellation=True,  # a client that leaves cancels its upstream call (and stream)
    )
    log.info("stopped")


def main(settings: Settings | None = None) -> None:
    from shared.logs import setup_logging

    settings = settings or Settings.from_env()
    setup_logging(settings.log_level)
    log.info("gateway %s:%d, workers %s", settings.host, settings.gateway_port, settings.workers)
    aio.run(serve(settings))
