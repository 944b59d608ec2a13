"""Migrations against the real Postgres: applied once, idempotent, with the invariants' indexes."""

from __future__ import annotations

import asyncpg
import pytest

from shared import db


async def test_migrations_are_idempotent(pg_pool: asyncpg.Pool) -> None:
    async with pg_pool.acquire() as conn:
        assert await db.migrate(conn) == []  # the fixture applied them already
        names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in db.migration_files()]


async def test_partial_unique_index_refuses_two_live_accounts_per_phone(pg_pool: asyncpg.Pool) -> None:
    await pg_pool.execute("INSERT INTO workspaces (id, name, webhook_secret) VALUES ('w1', 'W', 's')")
    insert = "INSERT INTO whatsapp_accounts (id, workspace_id, phone_number) VALUES ($1, 'w1', '15550001')"
    await pg_pool.execute(insert, "s_a")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg_pool.execute(insert, "s_b")
    await pg_pool.execute("UPDATE whatsapp_accounts SET deleted_at = now() WHERE id = 's_a'")
    await pg_pool.execute(insert, "s_b")  # a soft-deleted account does not count
    indexes = {r["indexname"] for r in await pg_pool.fetch("SELECT indexname FROM pg_indexes")}
    assert {"idx_cleanup", "whatsapp_accounts_live_phone", "whatsapp_accounts_one_primary"} <= indexes
