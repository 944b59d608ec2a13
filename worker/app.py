"""The worker's aiohttp application: one cleanup context per resource, in dependency order.

Start: HTTP client → Playwright (reaping what an earlier run left) → warm pool → sessions
(restored from their profiles). Shutdown runs the same list backwards under a deadline that stays
below supervisord's ``stopwaitsecs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import async_playwright

from shared import aio, resources
from shared import store as store_mod
from shared.aio import stop_loops
from shared.heartbeats import HeartbeatAuth
from shared.outbox import WebhookDispatcher
from shared.private_files import make_private_dirs
from shared.redis_keys import Keys
from shared.retention import RetentionJob
from shared.settings import Settings
from shared.web import DEFAULT_WORKSPACE, error_middleware, serve_until_signalled
from shared.webhook_guard import WebhookAllow
from worker import chromium, snapshot
from worker.browser import BrowserLauncher
from worker.durable import Durable
from worker.keys import (
    DB,
    DISPATCHER,
    DURABLE,
    HEARTBEAT,
    HTTP,
    LAUNCHER,
    MANAGER,
    NAME,
    POOL,
    PSS,
    QUEUE,
    REDIS,
    REMOTE_STREAMS,
    SETTINGS,
    STARTED_AT,
    STORE,
)
from worker.launch_budget import LaunchBudget, default_scope, machine_cores
from worker.membership import Heartbeat
from worker.qr_queue import QrQueue
from worker.routes import add_routes, auth_middleware
from worker.sessions import SessionManager, close_with_deadline
from worker.warm_pool import WarmPool

log = logging.getLogger("walink.worker")


async def http_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=256, limit_per_host=256, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as http:
        app[HTTP] = http
        yield


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    """Postgres, the source of truth: created if missing, migrated, the default workspace present."""
    async with resources.open_pool(app[SETTINGS]) as pool:
        app[DB] = pool
        app[STORE] = store_mod.Store(pool)
        await app[STORE].ensure_workspace(DEFAULT_WORKSPACE)
        yield


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Redis for leases, the session cache and event fan-out; short timeouts, never required to answer."""
    settings = app[SETTINGS]
    async with resources.open_redis(settings) as client:
        app[REDIS] = client
        app[DURABLE] = Durable(
            app[STORE],
            client,
            Keys(settings.redis_prefix),
            app[NAME],
            lease_ttl_ms=settings.lease_ttl_ms,
            redis_timeout_s=settings.redis_timeout_s,
            heartbeat_auth=HeartbeatAuth(settings.internal_token),
        )
        yield


async def launch_budget_ctx(app: web.Application) -> AsyncIterator[None]:
    """The machine's launch budget in Redis, shared by its workers (see :mod:`worker.launch_budget`)."""
    settings = app[SETTINGS]
    budget = LaunchBudget(
        app[REDIS],
        Keys(settings.redis_prefix),
        worker_name=app[NAME],
        scope=settings.launch_scope or default_scope(),
        limit=settings.launch_budget or machine_cores(),
        timeout_s=settings.redis_timeout_s,
    )
    await budget.start()
    app[QUEUE].budget = budget
    log.info("launch budget: %d cold start(s) at once on %s", budget.limit, budget.scope)
    try:
        yield
    finally:
        app[QUEUE].budget = None
        await budget.close()


async def playwright_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    for private in (settings.worker_data_dir, settings.profiles_dir):  # WhatsApp's keys: 0700
        await asyncio.to_thread(make_private_dirs, private)
    killed, locks = chromium.reap(settings.profiles_dir)
    if killed or locks:
        log.info("start: reaped %d orphan browser group(s), %d stale lock(s)", killed, locks)
    # snapshot files a killed run left half-written (worker/hibernation.py), restores and live
    # copies it left half-done next to the profiles: never read again
    await asyncio.to_thread(shutil.rmtree, settings.worker_data_dir / "snapshots", True)
    leftovers = await asyncio.to_thread(snapshot.remove_leftovers, settings.profiles_dir)
    if leftovers:
        log.info("start: removed %d half-done snapshot file(s) and restore(s)", leftovers)
    pw = await asyncio.wait_for(async_playwright().start(), 60)
    app[LAUNCHER] = BrowserLauncher(settings, pw, app[HTTP])
    # the pinned WhatsApp Web build (local cache or WALINK_WA_VERSION_URL; bounded by its timeout)
    await app[LAUNCHER].web_cache.prepare(app[HTTP])
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(pw.stop(), 10)
        finally:
            chromium.reap(settings.profiles_dir)  # nothing of ours outlives the worker


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = WarmPool(
        settings.warm_pool_size,
        app[LAUNCHER],
        app[QUEUE],
        settings.start_timeout_s,
        max_size=settings.warm_pool_max,
        memory_budget_bytes=settings.warm_pool_memory_mb * 1024 * 1024,
    )
    app[POOL] = pool
    pool.start()
    try:
        yield
    finally:
        await asyncio.wait_for(pool.close(), settings.shutdown_deadline_s)


async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    manager = SessionManager(settings, app[LAUNCHER], app[QUEUE], app[POOL], app[DURABLE], app[NAME])
    app[MANAGER] = manager
    if settings.restore_on_start:
        restored = await manager.restore_all()
        if restored:
            log.info("start: restoring %d linked session(s) without a QR", restored)
    loops = [
        asyncio.create_task(manager.keeper.run(), name="lease-keeper"),
        asyncio.create_task(manager.watch_orphans(1.0), name="orphans"),
        asyncio.create_task(manager.keep_house(1.0), name="housekeeping"),
        asyncio.create_task(manager.watch_unlinks(settings.unlink_retry_s), name="unlinks"),
        asyncio.create_task(manager.watch_keepalive(settings.keepalive_check_s), name="keepalive"),
    ]
    try:
        yield
    finally:
        await stop_loops(*loops)
        await app[PSS].close()
        started = time.monotonic()
        await close_with_deadline(manager, settings.shutdown_deadline_s)
        log.info(
            "shutdown ◆ %d session(s) kept for the next start ◆ %.2fs",
            len(manager.sessions),
            time.monotonic() - started,
        )


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """Membership: a Redis heartbeat with this worker's URL; deleted when the worker is gone."""
    settings = app[SETTINGS]
    heartbeat = Heartbeat(
        app[REDIS],
        Keys(settings.redis_prefix),
        name=app[NAME],
        url=settings.advertise_url or f"http://{settings.host}:{settings.worker_port}",
        ttl_ms=settings.heartbeat_ttl_ms,
        timeout_s=settings.redis_timeout_s,
        auth=HeartbeatAuth(settings.internal_token),
    )
    app[HEARTBEAT] = heartbeat

    def load() -> dict[str, Any]:
        manager, queue = app.get(MANAGER), app[QUEUE]
        sessions = manager.placement_load() if manager is not None else {"sessions": 0, "qr": 0}
        return {
            "sessions": sessions["sessions"],
            "in_flight": sessions["qr"] + queue.waiting + queue.active,
            "warm": int(app[POOL].stats()["ready"]),
            "recent": manager.recent_creates.ids() if manager is not None else [],
        }

    heartbeat.load = load
    task = asyncio.create_task(heartbeat.run(), name="heartbeat")
    try:
        yield
    finally:
        try:
            await stop_loops(task)
        finally:
            await heartbeat.leave()


async def dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Webhook delivery from the outbox; every worker runs one, claims keep them apart."""
    settings = app[SETTINGS]
    dispatcher = WebhookDispatcher(
        app[DB],
        app[HTTP],
        worker_name=app[NAME],
        allow=WebhookAllow.parse(settings.webhook_allow),
        attempt_timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        backoff_base_s=settings.webhook_backoff_base_s,
        backoff_max_s=settings.webhook_backoff_max_s,
        claim_ttl_s=max(2.0, settings.webhook_timeout_s * 3),
        batch_size=settings.webhook_concurrency,
        lane_concurrency=settings.webhook_lane_concurrency,
    )
    app[DISPATCHER] = dispatcher
    task = asyncio.create_task(dispatcher.run(), name="webhooks")
    try:
        yield
    finally:
        await asyncio.wait_for(dispatcher.close(), 10)
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """The retention job (see :mod:`shared.retention`): every worker runs it, one pass at a time."""
    settings = app[SETTINGS]
    job = RetentionJob(
        app[DB],
        outbox_retention_s=settings.outbox_retention_s,
        deleted_phone_retention_s=settings.deleted_phone_retention_s,
        batch_size=settings.retention_batch_size,
        interval_s=settings.retention_interval_s,
        timeout_s=settings.db_timeout_s * 6,
    )
    task = asyncio.create_task(job.run(), name="retention")
    try:
        yield
    finally:
        await stop_loops(task)


async def on_shutdown(app: web.Application) -> None:
    """Stop intake and end open event streams before the runner waits for handlers."""
    heartbeat = app.get(HEARTBEAT)
    if heartbeat is not None:
        await heartbeat.drain()
    manager = app.get(MANAGER)
    if manager is not None:
        manager.closing = True
        for session in manager.sessions.values():
            session.close_subscribers()
    streams: set[asyncio.Task[Any]] = app[REMOTE_STREAMS]
    for task in list(streams):
        task.cancel()


def create_app(settings: Settings) -> web.Application:
    settings.validate_worker()
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[STARTED_AT] = time.monotonic()
    app[NAME] = settings.worker_name or f"{settings.host}:{settings.worker_port}"
    app[QUEUE] = QrQueue(settings.qr_concurrency)
    app[REMOTE_STREAMS] = set()
    app[PSS] = chromium.PssGauge()
    app.cleanup_ctx.extend(
        # the heartbeat outlives the sessions at shutdown: peers see "draining" until every lease is free
        [
            http_ctx,
            db_ctx,
            redis_ctx,
            launch_budget_ctx,
            dispatcher_ctx,
            retention_ctx,
            playwright_ctx,
            pool_ctx,
            heartbeat_ctx,
            sessions_ctx,
        ]
    )
    app.on_shutdown.append(on_shutdown)
    add_routes(app)
    return app


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down in order within the deadline."""
    await serve_until_signalled(
        create_app(settings),
        host=settings.host,
        port=settings.worker_port,
        shutdown_timeout_s=settings.shutdown_deadline_s,
        stopping="stopping: no new sessions; ending browsers",
    )


def main(settings: Settings | None = None) -> None:
    from shared.logs import setup_logging

    settings = settings or Settings.from_env()
    setup_logging(settings.log_level)
    log.info(
        "worker %s:%d, data in %s, target %s",
        settings.host,
        settings.worker_port,
        settings.worker_data_dir,
        settings.target,
    )
    aio.run(serve(settings))
