"""Postgres, the source of truth: workspaces and API keys, accounts (sessions), snapshots.

Every write by a worker carries its lease's fencing token and is fenced strictly
(:data:`FENCE`): the row's driver writes on the row's own token; a new owner must present a
strictly greater one (its first write takes the row over). Anything else is refused
(:class:`StaleOwner`): an owner that has been replaced, or another worker with an equal token.
Events are written to the outbox in the same transaction as the state they describe, and
published only after commit.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from shared import outbox, snapshot_store
from shared.db import Conn
from shared.errors import SessionExists, SessionNotFound, StaleOwner
from shared.ids import WORKSPACE_ID_RE, check_workspace_id
from shared.models import EventType

log = logging.getLogger("walink.store")

# the seed's account status for each session state
ACCOUNT_STATUS = {
    "starting": "pending",
    "qr": "pending",
    "authenticated": "pending",
    "passkey_required": "pending",
    "ready": "connected",
    "hibernated": "connected",
    "logged_out": "disconnected",
    "expired": "failed",
    "failed": "failed",
    "deleted": "disconnected",
}

# events that go to webhooks; the others (status) are for SSE only
WEBHOOK_EVENTS = frozenset(EventType) - {EventType.STATUS}

_SESSION_COLUMNS = (
    "id, workspace_id, status, session_status, reason, phone_number, push_name, is_primary, label, "
    "metadata, webhook_url, history, timings, profile_id, owner, fencing_token, last_seq, lid, synced, "
    "deleted_at IS NOT NULL AS deleted"
)


FENCE = "(fencing_token < $11 OR (fencing_token = $11 AND owner IS NOT DISTINCT FROM $10))"
"""The fencing compare of a session write (``$10`` the writer, ``$11`` its token): accepted when the
token is strictly greater than the row's (a new lease was issued: the writer takes the row over,
and from then on is its owner) or equal to it *and* the writer is the row's owner (the current
driver, on the token it holds). Equal tokens from two workers, or any older token, are refused.
Tokens come only from the lease counter in Redis (floored by the row's token), so each issue of
a lease has its own token."""


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    webhook_url: str | None
    webhook_secret: str = field(repr=False)  # never in a log line, not even by repr()


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    data: dict[str, Any]
    # chosen before the first attempt, so a retried commit can tell that an earlier one landed
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class ChangedUnder:
    """See :meth:`Store.changed_under`."""

    taken: list[str]
    replaced: list[str]


@dataclass(frozen=True, slots=True)
class ReadyResult:
    is_primary: bool
    replaced: list[str]
    events: list[outbox.OutboxEvent]
    hibernated: list[str] = field(default_factory=list)
    """Those of ``replaced`` that were hibernated (no browser anywhere to unlink their device)."""


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _column_values(rec: dict[str, Any]) -> dict[str, Any]:
    """A session's columns as they are written (JSON columns serialized), by column name."""
    status = rec["status"]
    return {
        "session_status": status,
        "status": ACCOUNT_STATUS[status],
        "reason": rec["reason"],
        "phone_number": rec.get("phone_number"),
        "push_name": rec.get("push_name"),
        "history": _json(rec["history"]),
        "timings": _json(rec["timings"]),
        "profile_id": rec["profile_id"],
        "label": rec.get("label"),
        "metadata": _json(rec.get("metadata") or {}),
        "webhook_url": rec.get("webhook_url"),
        "lid": rec.get("lid"),
        "synced": bool(rec.get("synced")),
    }


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # ------------------------------------------------------------------ workspaces and keys
    async def ensure_workspace(
        self, workspace_id: str, *, name: str | None = None, webhook_url: str | None = None
    ) -> Workspace:
        if not WORKSPACE_ID_RE.fullmatch(workspace_id):
            # a new workspace's id must be able to prefix its chosen session ids (shared.ids);
            # one made before that rule stays usable
            existing = await self.get_workspace(workspace_id)
            if existing is not None:
                return existing
            check_workspace_id(workspace_id)
        row = await self.pool.fetchrow(
            "INSERT INTO workspaces (id, name, webhook_url, webhook_secret) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id RETURNING id, name, webhook_url, webhook_secret",
            workspace_id,
            name or workspace_id,
            webhook_url,
            "whsec_" + secrets.token_urlsafe(24),
        )
        assert row is not None
        return Workspace(row["id"], row["name"], row["webhook_url"], row["webhook_secret"])

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        row = await self.pool.fetchrow(
            "SELECT id, name, webhook_url, webhook_secret FROM workspaces WHERE id = $1", workspace_id
        )
        return Workspace(row["id"], row["name"], row["webhook_url"], row["webhook_secret"]) if row else None

    async def create_api_key(self, workspace_id: str | None, *, admin: bool = False) -> str:
        """A new API key, returned once in clear; only its SHA-256 is stored."""
        key = ("wla_" if admin else "wlk_") + secrets.token_urlsafe(32)
        await self.pool.execute(
            "INSERT INTO api_keys (key_hash, prefix, workspace_id, is_admin) VALUES ($1, $2, $3, $4)",
            hash_key(key),
            key[:10],
            workspace_id,
            admin,
        )
        return key

    async def key_scope(self, key: str) -> tuple[str | None, bool] | None:
        """``(workspace_id, is_admin)`` of a live key, or None."""
        row = await self.pool.fetchrow(
            "SELECT workspace_id, is_admin FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            hash_key(key),
        )
        return (row["workspace_id"], row["is_admin"]) if row else None

    # ------------------------------------------------------------------ sessions
    async def insert_session(
        self, rec: dict[str, Any], *, owner: str, token: int, webhook_events: list[str] | None = None
    ) -> None:
        """The new session's row; ``webhook_events``: the types its webhook receives (None: all)."""
        values = _column_values(rec)
        try:
            await self.pool.execute(
                "INSERT INTO whatsapp_accounts (id, workspace_id, session_status, reason, label, metadata,"
                " webhook_url, history, timings, profile_id, owner, fencing_token, status, webhook_events)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14::text[])",
                rec["id"],
                rec["workspace_id"],
                values["session_status"],
                values["reason"],
                values["label"],
                values["metadata"],
                values["webhook_url"],
                values["history"],
                values["timings"],
                values["profile_id"],
                owner,
                token,
                values["status"],
                webhook_events,
            )
        except asyncpg.UniqueViolationError as exc:
            raise SessionExists(f"session {rec['id']} already exists") from exc

    async def load_session(self, session_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM whatsapp_accounts WHERE id = $1",  # noqa: S608 - constant
            session_id,
        )
        return _record(row) if row else None

    async def sessions_owned_by(self, owner: str) -> list[dict[str, Any]]:
        """The owner's sessions, the most recently changed first."""
        rows = await self.pool.fetch(
            f"SELECT {_SESSION_COLUMNS} FROM whatsapp_accounts"  # noqa: S608 - constant
            " WHERE owner = $1 AND deleted_at IS NULL ORDER BY updated_at DESC",
            owner,
        )
        return [_record(r) for r in rows]

    async def orphans(self, live_owners: set[str], *, limit: int = 500) -> list[dict[str, Any]]:
        """Sessions that should be driven (not ended, not hibernated) whose owner is not alive."""
        rows = await self.pool.fetch(
            f"SELECT {_SESSION_COLUMNS} FROM whatsapp_accounts"  # noqa: S608 - constant
            " WHERE deleted_at IS NULL AND session_status NOT IN"
            " ('logged_out', 'expired', 'failed', 'deleted', 'hibernated')"
            " AND (owner IS NULL OR NOT (owner = ANY($1::text[]))) ORDER BY updated_at LIMIT $2",
            sorted(live_owners),
            limit,
        )
        return [_record(r) for r in rows]

    async def changed_under(self, held: dict[str, int]) -> ChangedUnder:
        """What Postgres says changed under sessions a worker drives (``held``: id → the token it
        holds): those another worker has taken over since (the row carries a newer token), and
        those a newer link of the same phone replaced (soft-deleted by :meth:`mark_ready`)."""
        if not held:
            return ChangedUnder([], [])
        rows = await self.pool.fetch(
            "SELECT a.id, a.fencing_token > h.token AS taken FROM whatsapp_accounts a"
            " JOIN unnest($1::text[], $2::bigint[]) AS h(id, token) ON a.id = h.id"
            " WHERE a.fencing_token > h.token OR a.deleted_at IS NOT NULL",
            list(held),
            list(held.values()),
        )
        taken = [str(r["id"]) for r in rows if r["taken"]]
        replaced = [str(r["id"]) for r in rows if not r["taken"]]
        return ChangedUnder(taken=taken, replaced=replaced)

    async def list_accounts(
        self, workspace_id: str, *, include_deleted: bool = False
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {_SESSION_COLUMNS}, created_at, updated_at FROM whatsapp_accounts"  # noqa: S608
            " WHERE workspace_id = $1"
            + ("" if include_deleted else " AND deleted_at IS NULL")
            + " ORDER BY created_at",
            workspace_id,
        )
        return [_record(r) for r in rows]

    async def save(
        self,
        rec: dict[str, Any],
        *,
        owner: str | None,
        token: int,
        events: list[NewEvent],
        deleted: bool = False,
    ) -> list[outbox.OutboxEvent]:
        """Write the session's state and its events in one transaction (fenced)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._fenced_update(conn, rec, owner=owner, token=token, deleted=deleted)
            written = await self._enqueue(conn, rec, events)
        return written

    async def mark_ready(
        self, rec: dict[str, Any], *, owner: str, token: int, events: list[NewEvent]
    ) -> ReadyResult:
        """DESIGN step 4 in ONE transaction: connected + phone, older live duplicates soft-deleted
        (the seed's cleanup query), primary when the workspace has none, events in the outbox."""
        for attempt in range(3):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    # one linking transaction at a time per workspace: the cleanup sees every commit
                    await conn.execute(
                        "SELECT 1 FROM workspaces WHERE id = $1 FOR UPDATE", rec["workspace_id"]
                    )
                    # each replaced row with the status it had: a hibernated one has no browser
                    # to log out with, its device is unlinked apart (worker.unlinking)
                    rows = await conn.fetch(
                        "UPDATE whatsapp_accounts a"
                        " SET status = 'failed', phone_number = NULL, deleted_at = now(),"
                        "     is_primary = false,"
                        "     session_status = CASE WHEN a.session_status IN ('ready', 'hibernated')"
                        "                      THEN 'failed' ELSE a.session_status END,"
                        "     reason = 'replaced', updated_at = now()"
                        " FROM (SELECT id, session_status FROM whatsapp_accounts"
                        "       WHERE workspace_id = $1 AND phone_number = $2 AND id != $3"
                        "       AND deleted_at IS NULL FOR UPDATE) AS was"
                        " WHERE a.id = was.id"
                        " RETURNING a.id, was.session_status AS was_status",
                        rec["workspace_id"],
                        rec["phone_number"],
                        rec["id"],
                    )
                    replaced = [str(r["id"]) for r in rows]
                    hibernated = [str(r["id"]) for r in rows if r["was_status"] == "hibernated"]
                    await self._fenced_update(conn, rec, owner=owner, token=token)
                    is_primary = bool(
                        await conn.fetchval(
                            "UPDATE whatsapp_accounts SET is_primary = true WHERE id = $1 AND NOT EXISTS ("
                            " SELECT 1 FROM whatsapp_accounts WHERE workspace_id = $2 AND is_primary"
                            " AND deleted_at IS NULL) RETURNING true",
                            rec["id"],
                            rec["workspace_id"],
                        )
                    ) or bool(
                        await conn.fetchval(
                            "SELECT is_primary FROM whatsapp_accounts WHERE id = $1", rec["id"]
                        )
                    )
                    ready_events = [
                        NewEvent(
                            e.type, {**e.data, "is_primary": is_primary, "replaced": replaced}, e.event_id
                        )
                        if e.type == "session_ready"
                        else e
                        for e in events
                    ]
                    written = await self._enqueue(conn, rec, ready_events)
                return ReadyResult(is_primary, replaced, written, hibernated)
            except asyncpg.UniqueViolationError:
                if attempt == 2:
                    raise
                log.info("%s: concurrent link of the same phone; retrying the ready transaction", rec["id"])
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fenced_update(
        self,
        conn: Conn,
        rec: dict[str, Any],
        *,
        owner: str | None,
        token: int,
        deleted: bool = False,
    ) -> None:
        values = _column_values(rec)
        done = await conn.fetchval(
            "UPDATE whatsapp_accounts SET session_status = $2, status = $3,"  # noqa: S608 - constant
            " reason = $4, phone_number = $5, push_name = $6, history = $7, timings = $8,"
            " profile_id = $9, owner = $10, fencing_token = $11,"
            " label = $12, metadata = $13, webhook_url = $14, lid = $16, synced = $17, updated_at = now(),"
            " deleted_at = CASE WHEN $15 THEN coalesce(deleted_at, now()) ELSE deleted_at END"
            " WHERE id = $1 AND " + FENCE + " RETURNING true",
            rec["id"],
            values["session_status"],
            values["status"],
            values["reason"],
            values["phone_number"],
            values["push_name"],
            values["history"],
            values["timings"],
            values["profile_id"],
            owner,
            token,
            values["label"],
            values["metadata"],
            values["webhook_url"],
            deleted,
            values["lid"],
            values["synced"],
        )
        if done:
            return
        current = await conn.fetchrow(
            "SELECT fencing_token, owner FROM whatsapp_accounts WHERE id = $1", rec["id"]
        )
        if current is None:
            raise SessionNotFound(f"no session {rec['id']}")
        raise StaleOwner(
            f"session {rec['id']} is owned by {current['owner']} on token {current['fencing_token']};"
            f" a write by {owner} on token {token} is refused"
        )

    async def _enqueue(
        self, conn: Conn, rec: dict[str, Any], events: list[NewEvent]
    ) -> list[outbox.OutboxEvent]:
        if not events:
            return []
        webhook_url = rec.get("webhook_url") or await conn.fetchval(
            "SELECT webhook_url FROM workspaces WHERE id = $1", rec["workspace_id"]
        )
        written = []
        for event in events:
            written.append(
                await outbox.enqueue(
                    conn,
                    workspace_id=rec["workspace_id"],
                    session_id=rec["id"],
                    type=event.type,
                    data=event.data,
                    metadata=rec.get("metadata") or {},
                    webhook_url=webhook_url if event.type in WEBHOOK_EVENTS else None,
                    event_id=event.event_id,
                )
            )
        if any(e.webhook_url for e in written):
            await outbox.notify(conn)
        return written

    async def committed_events(self, event_ids: list[str]) -> list[outbox.OutboxEvent]:
        """The events of these ids that are in the outbox (a commit whose outcome was unknown)."""
        return await outbox.events_by_id(self.pool, event_ids)

    # ------------------------------------------------------------------ snapshots
    async def put_snapshot(self, session_id: str, blob: bytes, *, token: int) -> bool:
        """Store a snapshot held in memory (:mod:`shared.snapshot_store`); False when a snapshot
        with a greater fencing token is stored (nothing changes then)."""
        async with self.pool.acquire() as conn:
            return await snapshot_store.put_bytes(conn, session_id, blob, token=token)

    async def put_snapshot_file(self, session_id: str, path: Path, *, token: int) -> bool:
        """Store the snapshot file ``path`` a chunk at a time (flat memory whatever its size)."""
        async with self.pool.acquire() as conn:
            return await snapshot_store.put_file(conn, session_id, path, token=token)

    async def get_snapshot(self, session_id: str) -> bytes | None:
        async with self.pool.acquire() as conn:
            return await snapshot_store.get_bytes(conn, session_id)

    async def get_snapshot_file(self, session_id: str, path: Path) -> bool:
        """The stored snapshot into the new private file ``path``; False when none is stored."""
        async with self.pool.acquire() as conn:
            return await snapshot_store.get_file(conn, session_id, path)

    async def replaced_with_snapshot(self, limit: int = 20) -> list[str]:
        """Sessions a newer link of their phone replaced (deleted) whose snapshot is still stored:
        their device is still to be unlinked (see :mod:`worker.unlinking`), oldest first."""
        rows = await self.pool.fetch(
            "SELECT a.id FROM whatsapp_accounts a JOIN profile_snapshots s ON s.session_id = a.id"
            " WHERE a.deleted_at IS NOT NULL AND a.reason = 'replaced'"
            " ORDER BY a.updated_at LIMIT $1",
            limit,
        )
        return [str(r["id"]) for r in rows]

    async def delete_snapshot(self, session_id: str) -> None:
        await self.pool.execute("DELETE FROM profile_snapshots WHERE session_id = $1", session_id)


def _record(row: asyncpg.Record) -> dict[str, Any]:
    rec = dict(row)
    for key in ("metadata", "history", "timings"):
        if isinstance(rec.get(key), str):
            rec[key] = orjson.loads(rec[key])
    rec["status"] = rec.pop("session_status")
    rec["account_status"] = row["status"]
    for key in ("created_at", "updated_at"):
        if key in rec and rec[key] is not None:
            rec[key] = int(rec[key].timestamp() * 1000)
    return rec
