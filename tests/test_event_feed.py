"""The event feed (``GET /v1/events?after=``) is gap-free: its cursor follows commit order.

Events are written through the store (the worker's own commit path) in 30 concurrent transactions
whose commits are delayed by a real Postgres trigger (``pg_sleep`` after each outbox insert), so
on an insert-ordered cursor later ids commit before earlier ones; a poller reads the feed every
20 ms the way a client does and must see every event, once, in order per session.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import asyncpg

from shared import outbox
from shared.store import NewEvent, Store

WS = "w_feed"
CREATES = 30
EVENTS_PER_CREATE = 2
POLL_EVERY_S = 0.02
CATCH_UP_S = 30.0  # how long the poller may take to see everything before it counts as lost

# delays each outbox insert's transaction by up to 30 ms: commits land out of id order
_DELAY_TRIGGER = """
CREATE OR REPLACE FUNCTION test_outbox_commit_delay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(random() * 0.03); RETURN NEW; END $$;
CREATE TRIGGER test_outbox_commit_delay AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION test_outbox_commit_delay();
"""
_DROP_DELAY_TRIGGER = """
DROP TRIGGER IF EXISTS test_outbox_commit_delay ON outbox;
DROP FUNCTION IF EXISTS test_outbox_commit_delay();
"""


def _record(session_id: str) -> dict[str, Any]:
    return {
        "id": session_id,
        "workspace_id": WS,
        "profile_id": "p_" + session_id,
        "status": "qr",
        "reason": "created",
        "history": [],
        "timings": {},
    }


async def test_event_feed_sees_every_event_once_in_order_under_out_of_order_commits(
    pg_pool: asyncpg.Pool,
) -> None:
    store = Store(pg_pool)
    await store.ensure_workspace(WS)
    sessions = [f"s_feed_{n:02d}" for n in range(CREATES)]
    for sid in sessions:
        await store.insert_session(_record(sid), owner="w", token=1)

    seen: list[dict[str, Any]] = []
    writers_done = asyncio.Event()

    async def poll() -> None:
        cursor = 0
        expected = CREATES * EVENTS_PER_CREATE
        async with asyncio.timeout(CATCH_UP_S):
            while True:
                page = await outbox.events_after(pg_pool, workspace_id=WS, after_id=cursor, limit=1000)
                seen.extend(page)
                if page:
                    cursor = page[-1]["id"]
                if writers_done.is_set() and not page:
                    # everything committed is visible now: one more empty page means caught up
                    total = await pg_pool.fetchval("SELECT count(*) FROM outbox WHERE workspace_id = $1", WS)
                    if total == expected or len(seen) >= expected:
                        return
                await asyncio.sleep(POLL_EVERY_S)

    async def create(sid: str) -> None:
        await asyncio.sleep(random.uniform(0, 0.05))  # spread the starts so commits interleave
        events = [NewEvent("status", {"status": "qr"}), NewEvent("qr_code_generated", {"qr": sid})]
        await store.save(_record(sid), owner="w", token=1, events=events)

    await pg_pool.execute(_DELAY_TRIGGER)
    try:
        poller = asyncio.create_task(poll())
        await asyncio.gather(*(create(sid) for sid in sessions))
        writers_done.set()
        await poller
    finally:
        await pg_pool.execute(_DROP_DELAY_TRIGGER)

    committed = await outbox.events_after(pg_pool, workspace_id=WS, after_id=0, limit=1000)
    assert len(committed) == CREATES * EVENTS_PER_CREATE
    seen_ids = [e["event_id"] for e in seen]
    missed = {e["event_id"] for e in committed} - set(seen_ids)
    assert not missed, f"the poller never saw {len(missed)} committed event(s)"
    assert len(seen_ids) == len(set(seen_ids)), "an event was returned twice"
    assert [e["id"] for e in seen] == sorted(e["id"] for e in seen), "the feed went backwards"
    per_session: dict[str, list[int]] = defaultdict(list)
    for event in seen:
        per_session[event["session_id"]].append(event["seq"])
    assert all(seqs == list(range(1, EVENTS_PER_CREATE + 1)) for seqs in per_session.values()), per_session


async def test_every_outbox_insert_draws_its_id_under_the_feed_lock(pg_pool: asyncpg.Pool) -> None:
    """A writer whose event is not committed yet holds the feed: another writer's insert waits
    until it has committed, so the later id can never become visible first."""
    store = Store(pg_pool)
    await store.ensure_workspace(WS)
    async with pg_pool.acquire() as first, pg_pool.acquire() as second:
        tx = first.transaction()
        await tx.start()
        early = await outbox.enqueue(
            first, workspace_id=WS, session_id="s_a", type="status", data={}, metadata={}, webhook_url=None
        )
        late = asyncio.create_task(
            outbox.enqueue(
                second,
                workspace_id=WS,
                session_id="s_b",
                type="status",
                data={},
                metadata={},
                webhook_url=None,
            )
        )
        # the second insert is waiting on the feed lock (pg_locks shows it), not done
        for _ in range(1000):
            if await pg_pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ):
                break
            await asyncio.sleep(0.01)  # another connection changes this; we can only look again
        else:
            raise AssertionError("the second insert never waited on the feed lock")
        assert not late.done()
        assert await outbox.events_after(pg_pool, workspace_id=WS, after_id=0) == []
        await tx.commit()
        later = await asyncio.wait_for(late, 10)
    assert later.id > early.id
    assert [e["id"] for e in await outbox.events_after(pg_pool, workspace_id=WS, after_id=0)] == [
        early.id,
        later.id,
    ]


async def test_a_retried_commit_finds_the_events_an_earlier_attempt_committed(pg_pool: asyncpg.Pool) -> None:
    """Event ids are chosen before the first attempt: after a lost connection, a retry can ask."""
    store = Store(pg_pool)
    await store.ensure_workspace(WS)
    await store.insert_session(_record("s_retry"), owner="w", token=1)
    events = [NewEvent("status", {"status": "qr"}), NewEvent("qr_code_generated", {"qr": "x"})]
    assert await store.committed_events([e.event_id for e in events]) == []
    written = await store.save(_record("s_retry"), owner="w", token=1, events=events)
    assert [e.event_id for e in written] == [e.event_id for e in events]
    landed = await store.committed_events([e.event_id for e in events])
    assert [(e.event_id, e.seq) for e in landed] == [(e.event_id, e.seq) for e in written]
