"""Postgres: the connection pool and versioned migrations (``shared/migrations/NNNN_name.sql``).

Who may change the schema: in development every process migrates at start (``migrate_on_start``).
In production one role owns the schema and runs ``walink migrate --grant <role>…`` (a Job in
``infra/k8s``), which applies the migrations and grants the gateway's and the workers' roles data
rights only (:func:`grant_data_access`); those processes start with ``migrate_on_start=false`` and
only check that the schema is current (:func:`pending_migrations`)."""

from __future__ import annotations

import logging
import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger("walink.db")

# pg_advisory_lock key so that several processes starting at once migrate one after the other
MIGRATION_LOCK = 0x77616C696E6B  # "walink"

Conn = asyncpg.Connection | PoolConnectionProxy


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("shared").joinpath("migrations")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), folder.joinpath(name).read_text(encoding="utf-8")) for name in names]


async def migrate(conn: Conn) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; returns their names."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
            log.info("applied migration %s", name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


async def pending_migrations(conn: Conn) -> list[str]:
    """The migrations not applied to this database yet (all of them on an empty one). Reads only."""
    try:
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        done = set()
    return [name for name, _ in migration_files() if name not in done]


ROLE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# data rights, no DDL: the role can read and write rows, never create, alter or drop anything
DATA_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


async def grant_data_access(conn: Conn, role: str) -> None:
    """Give ``role`` rights on the rows of every table (and its sequences) of the schema, and no
    more; run by the schema's owner after each migration, so new tables are covered too."""
    if not ROLE_RE.fullmatch(role):
        raise ValueError(f"not a plain role name: {role!r}")
    quoted = f'"{role}"'  # checked above: no quote can be inside
    async with conn.transaction():
        await conn.execute(f"GRANT USAGE ON SCHEMA public TO {quoted}")
        await conn.execute(f"GRANT {DATA_PRIVILEGES} ON ALL TABLES IN SCHEMA public TO {quoted}")
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}")
    log.info("granted %s to %s", DATA_PRIVILEGES, role)


async def ensure_database(dsn: str, *, timeout_s: float = 10.0) -> None:
    """Create the database named in ``dsn`` when it does not exist (a bare machine just works)."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not name:
        return
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin, timeout=timeout_s)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')  # name comes from our own setting
            log.info("created database %s", name)
    finally:
        await conn.close()


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 10.0
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, timeout=timeout_s, command_timeout=timeout_s
    )
    assert pool is not None
    return pool
