"""Retention against real Postgres: delivered outbox rows go after their period, a deleted
session's phone number leaves its events once they are delivered, one pass at a time."""

from __future__ import annotations

import asyncpg
import orjson

from shared import outbox
from shared.retention import RetentionJob

WS = "w_ret"
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S


def job(pool: asyncpg.Pool, **options: float) -> RetentionJob:
    settings: dict[str, float] = {"outbox_retention_s": DAY_S, "deleted_phone_retention_s": DAY_S}
    return RetentionJob(pool, **(settings | options))  # type: ignore[arg-type]


async def _workspace(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO workspaces (id, name, webhook_secret) VALUES ($1, $1, 's')", WS)


async def _event(
    pool: asyncpg.Pool, session_id: str, *, state: str, age_s: float, phone: str | None = None
) -> int:
    async with pool.acquire() as conn:
        event = await outbox.enqueue(
            conn,
            workspace_id=WS,
            session_id=session_id,
            type="session_ready",
            data={"phone_number": phone, "push_name": "Ana", "is_primary": True} if phone else {"x": 1},
            metadata={"crm": "c-9"},
            webhook_url="http://127.0.0.1:9/hook",
        )
    await pool.execute(
        "UPDATE outbox SET state = $2, created_at = now() - $3 * interval '1 second',"
        " delivered_at = CASE WHEN $2 = 'delivered' THEN now() - $3 * interval '1 second' END"
        " WHERE id = $1",
        event.id,
        state,
        age_s,
    )
    return event.id


async def _ids(pool: asyncpg.Pool) -> set[int]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM outbox")}


async def test_delivered_outbox_rows_are_purged_after_the_retention_period(pg_pool: asyncpg.Pool) -> None:
    await _workspace(pg_pool)
    old_delivered = [await _event(pg_pool, f"s_{n}", state="delivered", age_s=2 * DAY_S) for n in range(5)]
    old_skipped = await _event(pg_pool, "s_skip", state="skipped", age_s=2 * DAY_S)
    await pg_pool.execute(
        "INSERT INTO delivery_attempts (event_id, attempt, duration_ms)"
        " SELECT event_id, 1, 3 FROM outbox WHERE id = $1",
        old_delivered[0],
    )
    kept = {
        await _event(pg_pool, "s_new", state="delivered", age_s=HOUR_S),
        await _event(pg_pool, "s_pending", state="pending", age_s=2 * DAY_S),  # still owed
        await _event(pg_pool, "s_dead", state="dead", age_s=2 * DAY_S),  # replayable
    }

    purged = await job(pg_pool, batch_size=2).run_once()  # small batches: several per pass
    assert purged is not None and purged.outbox_rows == len(old_delivered) + 1
    assert await _ids(pg_pool) == kept
    assert old_skipped not in await _ids(pg_pool)
    assert await pg_pool.fetchval("SELECT count(*) FROM delivery_attempts") == 0
    again = await job(pg_pool).run_once()  # idempotent: nothing left to do
    assert again is not None and again.outbox_rows == 0


async def test_a_deleted_sessions_phone_is_purged_from_its_events_after_delivery(
    pg_pool: asyncpg.Pool,
) -> None:
    await _workspace(pg_pool)
    accounts = {  # id: (deleted how long ago, or None when live)
        "s_gone": 2 * DAY_S,
        "s_gone_pending": 2 * DAY_S,
        "s_just_deleted": HOUR_S,
        "s_live": None,
    }
    for sid, deleted_ago_s in accounts.items():
        await pg_pool.execute(
            "INSERT INTO whatsapp_accounts (id, workspace_id, phone_number, push_name, lid, deleted_at)"
            " VALUES ($1, $2, $3, 'Ana', '123@lid',"
            "         CASE WHEN $4::float8 IS NULL THEN NULL ELSE now() - $4 * interval '1 second' END)",
            sid,
            WS,
            "55" + str(abs(hash(sid)))[:9],
            deleted_ago_s,
        )
        await _event(pg_pool, sid, state="delivered", age_s=HOUR_S, phone="5511900000000")
    pending = await _event(pg_pool, "s_gone_pending", state="pending", age_s=HOUR_S, phone="5511900000000")

    purged = await job(pg_pool).run_once()
    assert purged is not None and (purged.sessions, purged.events) == (1, 1)

    async def event_data(sid: str) -> list[dict[str, object]]:
        rows = await pg_pool.fetch(
            "SELECT payload -> 'data' AS data FROM outbox WHERE session_id = $1 ORDER BY seq", sid
        )
        return [orjson.loads(r["data"]) for r in rows]

    assert await event_data("s_gone") == [{"is_primary": True}]  # the rest of the event is kept
    gone = await pg_pool.fetchrow(
        "SELECT phone_number, push_name, lid, phone_purged_at FROM whatsapp_accounts WHERE id = 's_gone'"
    )
    assert gone is not None and (gone["phone_number"], gone["push_name"], gone["lid"]) == (None, None, None)
    assert gone["phone_purged_at"] is not None
    for sid in ("s_gone_pending", "s_just_deleted", "s_live"):
        assert all(d.get("phone_number") == "5511900000000" for d in await event_data(sid)), sid
        assert await pg_pool.fetchval("SELECT phone_number FROM whatsapp_accounts WHERE id = $1", sid)

    # delivered at last: the next pass purges that session too, and only it
    await pg_pool.execute(
        "UPDATE outbox SET state = 'delivered', delivered_at = now() WHERE id = $1", pending
    )
    later = await job(pg_pool).run_once()
    assert later is not None and (later.sessions, later.events) == (1, 2)
    assert all("phone_number" not in d for d in await event_data("s_gone_pending"))
    assert (await job(pg_pool).run_once()) == type(later)()  # idempotent


async def test_one_retention_pass_at_a_time(pg_pool: asyncpg.Pool) -> None:
    await _workspace(pg_pool)
    old = await _event(pg_pool, "s_1", state="delivered", age_s=2 * DAY_S)
    async with pg_pool.acquire() as other:
        assert await other.fetchval("SELECT pg_try_advisory_lock(hashtextextended('walink.retention', 0))")
        try:
            assert await job(pg_pool).run_once() is None  # another worker's pass runs
            assert old in await _ids(pg_pool)
        finally:
            await other.fetchval("SELECT pg_advisory_unlock(hashtextextended('walink.retention', 0))")
    done = await job(pg_pool).run_once()
    assert done is not None and done.outbox_rows == 1
