"""Retention of what Postgres keeps about events and deleted sessions (docs/durability.md).

- Delivered (and never-to-be-delivered ``skipped``) outbox rows are deleted once older than
  ``WALINK_OUTBOX_RETENTION_S`` (their delivery attempts with them). Dead-lettered and pending rows
  stay: they are still owed. ``GET /v1/events?after=`` and SSE resume reach back that far.
- A deleted session's phone number, push name and LID are purged from its events' payloads and
  from its account row ``WALINK_DELETED_PHONE_RETENTION_S`` after the delete, once none of its
  events is still pending (each was delivered first, with the phone, as promised).

Every worker runs :class:`RetentionJob`; a pass runs only where it takes a Postgres advisory lock
(one worker at a time), works in bounded batches, each its own short transaction, at most
``max_batches`` of each kind per pass, and is idempotent (a batch interrupted is redone).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from shared import metrics
from shared.db import Conn

log = logging.getLogger("walink.retention")

_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# a session-level advisory lock: held by the pass's connection, gone with it if the process dies
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('walink.retention', 0))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtextextended('walink.retention', 0))"

_PURGE_FINISHED_SQL = """
WITH batch AS (
    SELECT id FROM outbox
    WHERE state IN ('delivered', 'skipped')
      AND coalesce(delivered_at, created_at) < now() - $1 * interval '1 second'
    ORDER BY coalesce(delivered_at, created_at)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox o USING batch WHERE o.id = batch.id
"""

# what identifies the person behind a deleted session in its events' data
PHONE_KEYS = ["phone_number", "push_name", "lid"]
_PURGE_PHONES_SQL = """
WITH due AS (
    SELECT a.id FROM whatsapp_accounts a
    WHERE a.deleted_at IS NOT NULL AND a.phone_purged_at IS NULL
      AND a.deleted_at < now() - $1 * interval '1 second'
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.session_id = a.id AND o.state = 'pending')
    ORDER BY a.deleted_at
    LIMIT $2
    FOR UPDATE OF a SKIP LOCKED
), events AS (
    UPDATE outbox o
    SET payload = jsonb_set(o.payload, '{data}', (o.payload -> 'data') - $3::text[])
    FROM due
    WHERE o.session_id = due.id AND (o.payload -> 'data') ?| $3::text[]
    RETURNING o.id
), accounts AS (
    UPDATE whatsapp_accounts a
    SET phone_number = NULL, push_name = NULL, lid = NULL, phone_purged_at = now()
    FROM due
    WHERE a.id = due.id
    RETURNING a.id
)
SELECT (SELECT count(*) FROM accounts) AS sessions, (SELECT count(*) FROM events) AS events
"""


@dataclass(frozen=True, slots=True)
class Purged:
    outbox_rows: int = 0
    sessions: int = 0
    events: int = 0


class RetentionJob:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        outbox_retention_s: float,
        deleted_phone_retention_s: float,
        batch_size: int = 500,
        max_batches: int = 20,
        interval_s: float = 60.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.pool = pool
        self.outbox_retention_s = outbox_retention_s
        self.deleted_phone_retention_s = deleted_phone_retention_s
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def run_once(self) -> Purged | None:
        """One pass; None when another worker's pass holds the lock."""
        async with self.pool.acquire(timeout=self.timeout_s) as conn:
            if not await conn.fetchval(_LOCK_SQL, timeout=self.timeout_s):
                return None
            try:
                rows = await self._purge_finished(conn)
                sessions = events = 0
                for _ in range(self.max_batches):
                    record = await conn.fetchrow(
                        _PURGE_PHONES_SQL,
                        self.deleted_phone_retention_s,
                        self.batch_size,
                        PHONE_KEYS,
                        timeout=self.timeout_s,
                    )
                    assert record is not None
                    sessions += int(record["sessions"])
                    events += int(record["events"])
                    if record["sessions"] < self.batch_size:
                        break
            finally:
                await conn.fetchval(_UNLOCK_SQL, timeout=self.timeout_s)
        purged = Purged(rows, sessions, events)
        metrics.RETENTION_PURGED.labels("outbox_rows").inc(rows)
        metrics.RETENTION_PURGED.labels("deleted_phones").inc(sessions)
        if rows or sessions:
            log.info(
                "retention: %d delivered outbox row(s) deleted, phone purged from %d deleted session(s)"
                " (%d event(s))",
                rows,
                sessions,
                events,
            )
        return purged

    async def _purge_finished(self, conn: Conn) -> int:
        total = 0
        for _ in range(self.max_batches):
            status = await conn.execute(
                _PURGE_FINISHED_SQL, self.outbox_retention_s, self.batch_size, timeout=self.timeout_s
            )
            done = int(status.rsplit(" ", 1)[-1])
            total += done
            if done < self.batch_size:
                break
        return total

    async def run(self) -> None:
        """A pass every ``interval_s`` until cancelled; failures are logged and the next pass retries."""
        while True:
            try:
                await self.run_once()
            except _ERRORS as exc:
                log.warning(
                    "retention pass failed (%s: %s); next in %.0f s", type(exc).__name__, exc, self.interval_s
                )
            await asyncio.sleep(self.interval_s)
