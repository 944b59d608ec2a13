"""Postgres and Redis as the gateway's and the workers' cleanup contexts open them.

Each is an async context manager: every external await has a timeout, and what was opened is
closed on the way out (also when the body, or the rest of the startup, fails).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis

from shared import db
from shared.errors import SchemaNotCurrent
from shared.settings import Settings


@contextlib.asynccontextmanager
async def open_pool(settings: Settings, *, max_size: int = 10) -> AsyncIterator[asyncpg.Pool]:
    """A Postgres pool on ``settings.database_url``: the database created if missing, then migrated;
    with ``migrate_on_start`` off (a role without DDL rights), only checked to be current."""
    if settings.migrate_on_start:
        await asyncio.wait_for(db.ensure_database(settings.database_url, timeout_s=settings.db_timeout_s), 30)
    pool = await asyncio.wait_for(
        db.create_pool(settings.database_url, max_size=max_size, timeout_s=settings.db_timeout_s), 30
    )
    try:
        async with pool.acquire(timeout=settings.db_timeout_s) as conn:
            if settings.migrate_on_start:
                await asyncio.wait_for(db.migrate(conn), 60)
            else:
                pending = await asyncio.wait_for(db.pending_migrations(conn), settings.db_timeout_s)
                if pending:
                    raise SchemaNotCurrent(
                        f"the database lacks migration(s) {', '.join(pending)}; run `walink migrate` with "
                        "the schema owner's role (WALINK_MIGRATE_ON_START=false: this process does no DDL)"
                    )
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    """A Redis client on ``settings.redis_url`` with short timeouts (it connects lazily)."""
    client = aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=5,
    )
    try:
        yield client
    finally:
        await asyncio.wait_for(client.aclose(), 5)
