"""A workspace's webhook configuration in Postgres: its URL, its signing secret and its rotation,
and each session's event filter (which event types its webhook receives).

The secret is handed out once, by :func:`rotate_secret` (``POST /v1/webhook/secret``): no read
returns it, and it is never logged. After a rotation the previous secret keeps signing next to
the new one until ``webhook_secret_previous_until`` (``WALINK_WEBHOOK_SECRET_OVERLAP_S``), so
receivers can switch without dropping a delivery. A second rotation within the window ends the
first one's overlap: only the secret being replaced signs alongside the new one.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import asyncpg

from shared.errors import BadRequest, EventNotFound, SessionNotFound
from shared.models import EventType

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MAX_FILTER_TYPES = 16

# event types a webhook can receive (status is for SSE only), in a stable order for answers
WEBHOOK_EVENT_TYPES: tuple[str, ...] = tuple(e.value for e in EventType if e is not EventType.STATUS)

_CONFIG_COLUMNS = """
    webhook_url,
    (extract(epoch FROM webhook_secret_rotated_at) * 1000)::bigint AS rotated_at_ms,
    CASE WHEN webhook_secret_previous_until > now()
         THEN (extract(epoch FROM webhook_secret_previous_until) * 1000)::bigint END AS previous_until_ms
"""
_READ_SQL = "SELECT CONFIG FROM workspaces WHERE id = $1".replace("CONFIG", _CONFIG_COLUMNS)
_SET_URL_SQL = "UPDATE workspaces SET webhook_url = $2 WHERE id = $1 RETURNING CONFIG".replace(
    "CONFIG", _CONFIG_COLUMNS
)
_ROTATE_SQL = (
    "UPDATE workspaces SET webhook_secret_previous = webhook_secret,"
    " webhook_secret_previous_until = now() + $3 * interval '1 second',"
    " webhook_secret = $2, webhook_secret_rotated_at = now()"
    " WHERE id = $1 RETURNING CONFIG"
).replace("CONFIG", _CONFIG_COLUMNS)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _config(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "url": row["webhook_url"],
        "secret_rotated_at_ms": row["rotated_at_ms"],
        "previous_secret_valid_until_ms": row["previous_until_ms"],
    }


async def _ensure_workspace(conn: asyncpg.Pool | asyncpg.Connection, workspace_id: str) -> None:
    await conn.execute(
        "INSERT INTO workspaces (id, name, webhook_secret) VALUES ($1, $1, $2) ON CONFLICT (id) DO NOTHING",
        workspace_id,
        new_secret(),
    )


async def read_config(pool: asyncpg.Pool, workspace_id: str) -> dict[str, Any]:
    """The workspace's webhook URL and the state of its secret (never the secret itself)."""
    await _ensure_workspace(pool, workspace_id)
    row = await pool.fetchrow(_READ_SQL, workspace_id)
    assert row is not None
    return _config(row)


async def set_url(pool: asyncpg.Pool, workspace_id: str, url: str | None) -> dict[str, Any]:
    """Set (or, with None, clear) the workspace's webhook URL; ``url`` is checked by the caller.

    It applies to events written from now on (an event keeps the URL it was written with).
    """
    await _ensure_workspace(pool, workspace_id)
    row = await pool.fetchrow(_SET_URL_SQL, workspace_id, url)
    assert row is not None
    return _config(row)


async def rotate_secret(pool: asyncpg.Pool, workspace_id: str, *, overlap_s: float) -> dict[str, Any]:
    """A new signing secret, returned here once; the replaced one signs too for ``overlap_s``."""
    await _ensure_workspace(pool, workspace_id)
    secret = new_secret()
    row = await pool.fetchrow(_ROTATE_SQL, workspace_id, secret, float(overlap_s))
    assert row is not None
    return {"secret": secret, **_config(row)}


def check_event_filter(value: object) -> list[str] | None:
    """An ``events`` filter as given: None (every type) or a list of webhook event types."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_FILTER_TYPES:
        raise BadRequest(f"events must be null or a list of at most {MAX_FILTER_TYPES} event types")
    chosen: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in WEBHOOK_EVENT_TYPES:
            shown = repr(item)[:64]
            raise BadRequest(
                f"events: {shown} is not a webhook event type ({', '.join(WEBHOOK_EVENT_TYPES)})"
            )
        if item not in chosen:
            chosen.append(item)
    return chosen


async def set_session_events(
    pool: asyncpg.Pool, workspace_id: str | None, session_id: str, events: list[str] | None
) -> list[str] | None:
    """Set a session's event filter (None: every type); it applies to events not delivered yet."""
    row = await pool.fetchrow(
        "UPDATE whatsapp_accounts SET webhook_events = $3::text[], updated_at = now()"
        " WHERE id = $1 AND ($2::text IS NULL OR workspace_id = $2) AND deleted_at IS NULL"
        " RETURNING webhook_events",
        session_id,
        workspace_id,
        events,
    )
    if row is None:
        raise SessionNotFound(f"no session {session_id}")
    value = row["webhook_events"]
    return None if value is None else list(value)


async def session_events_filter(
    pool: asyncpg.Pool, workspace_id: str | None, session_id: str
) -> list[str] | None:
    row = await pool.fetchrow(
        "SELECT webhook_events FROM whatsapp_accounts"
        " WHERE id = $1 AND ($2::text IS NULL OR workspace_id = $2) AND deleted_at IS NULL",
        session_id,
        workspace_id,
    )
    if row is None:
        raise SessionNotFound(f"no session {session_id}")
    value = row["webhook_events"]
    return None if value is None else list(value)


async def deliveries(pool: asyncpg.Pool, workspace_id: str, event_id: str) -> dict[str, Any]:
    """One event's delivery state and every attempt, oldest first; another workspace's event is 404."""
    try:
        checked = str(uuid.UUID(event_id))
    except ValueError:
        raise EventNotFound(f"no event {event_id[:64]!r}") from None
    event = await pool.fetchrow(
        "SELECT event_id::text AS event_id, session_id, seq, type, state, attempts, last_error"
        " FROM outbox WHERE event_id = $1::uuid AND workspace_id = $2",
        checked,
        workspace_id,
    )
    if event is None:
        raise EventNotFound(f"no event {checked}")
    rows = await pool.fetch(
        "SELECT attempt, (extract(epoch FROM at) * 1000)::bigint AS at_ms, status_code, error, duration_ms"
        " FROM delivery_attempts WHERE event_id = $1::uuid ORDER BY id",
        checked,
    )
    return {
        "event_id": event["event_id"],
        "session_id": event["session_id"],
        "seq": event["seq"],
        "type": event["type"],
        "state": event["state"],
        "attempts": event["attempts"],
        "last_error": event["last_error"],
        "deliveries": [dict(r) for r in rows],
    }
