"""A SIGTERM never loses a commit: a real worker process is stopped while the session it links is
being committed as ready, and every transition it made is in the outbox after it restarts.

The commit is held in flight by a real Postgres fault — a trigger that makes the insert of the
session's ``session_ready`` event wait (``pg_sleep``) — and the SIGTERM is sent once Postgres
shows that insert waiting, so the shutdown always meets a commit it must not cancel.
"""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from tests.conftest import WAIT_S, EventStream, Sim, WorkerProcess, free_port, sse_until

pytestmark = pytest.mark.chromium

PHONE = "5511977770015"
COMMIT_DELAY_S = 4.0  # how long the ready commit is held in flight by the trigger

_SLOW_READY_TRIGGER = f"""
CREATE OR REPLACE FUNCTION test_slow_ready_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.type = 'session_ready' THEN PERFORM pg_sleep({COMMIT_DELAY_S}); END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_slow_ready_commit AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION test_slow_ready_commit();
"""
_DROP_SLOW_READY_TRIGGER = """
DROP TRIGGER IF EXISTS test_slow_ready_commit ON outbox;
DROP FUNCTION IF EXISTS test_slow_ready_commit();
"""


async def _until_ready_commit_waits(pool: asyncpg.Pool) -> None:
    """Until a backend of this database sleeps inside the trigger (the commit is in flight)."""
    for _ in range(int(WAIT_S / 0.02)):
        if await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event = 'PgSleep'"
        ):
            return
        await asyncio.sleep(0.02)  # another process changes this; we can only look again
    raise AssertionError("the ready commit never reached Postgres")


def _transitions(log: list[str], session_id: str) -> list[tuple[str, str]]:
    """(status, reason) of every transition the worker logged for the session, in order."""
    pattern = re.compile(re.escape(session_id) + r" (\w+) → (\w+) \(([\w-]+)\)")
    return [(m[2], m[3]) for line in log if (m := pattern.search(line))]


async def _outbox(pool: asyncpg.Pool, session_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT seq, type, payload::text AS payload FROM outbox WHERE session_id = $1 ORDER BY seq",
        session_id,
    )
    return [{"seq": r["seq"], "type": r["type"], **orjson.loads(r["payload"])} for r in rows]


async def test_sigterm_during_the_ready_commit_loses_no_event(
    tmp_path: Path, sim: Sim, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> None:
    port = free_port()
    first = WorkerProcess(tmp_path, sim, port, pg_dsn, redis_prefix)
    await first.start()
    seen: list[tuple[str, dict[str, Any]]] = []
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(first.url + "/v1/sessions", json={"label": "sigterm"}) as resp:
                assert resp.status == 201
                sid = (await resp.json())["id"]
            stream = EventStream(await http.get(f"{first.url}/v1/sessions/{sid}/events"))
            await pg_pool.execute(_SLOW_READY_TRIGGER)
            try:
                await sim.scan_linking(stream, PHONE)
                await _until_ready_commit_waits(pg_pool)
                assert await first.stop(signal.SIGTERM) == 0
            finally:
                await pg_pool.execute(_DROP_SLOW_READY_TRIGGER)
                seen = list(stream.seen)
                stream.close()
    finally:
        if first.proc is not None and first.proc.returncode is None:
            await first.stop(signal.SIGKILL)

    transitions = _transitions(first.log, sid)
    assert any(s == "ready" for s, _ in transitions), transitions
    events = await _outbox(pg_pool, sid)
    statuses = [(e["data"]["status"], e["data"]["reason"]) for e in events if e["type"] == "status"]
    # every transition the worker made before the SIGTERM was committed with its event, in order
    assert statuses[1:] == transitions, (statuses, transitions)
    assert [e["type"] for e in events].count("session_ready") == 1
    ready = next(e for e in events if e["type"] == "session_ready")
    assert ready["data"]["phone_number"] == PHONE
    # every event the client saw (only committed events are streamed) is there too
    for kind, data in seen:
        if kind == "status":
            assert (data["status"], data["reason"]) in statuses, (kind, data)
    assert (
        await pg_pool.fetchval("SELECT session_status FROM whatsapp_accounts WHERE id = $1", sid) == "ready"
    )

    # the restarted worker brings it back ready from its profile (no re-scan) and writes after it
    second = WorkerProcess(tmp_path, sim, port, pg_dsn, redis_prefix)
    await second.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{second.url}/v1/sessions/{sid}") as resp:
                status = (await resp.json())["status"]
            if status != "ready":
                await sse_until(await http.get(f"{second.url}/v1/sessions/{sid}/events"), "session_ready")
        after = await _outbox(pg_pool, sid)
        assert [e["seq"] for e in after] == list(range(1, len(after) + 1))  # no gap in the session's seq
        assert after[: len(events)] == events
        assert len(await sim.devices(PHONE)) == 1
    finally:
        assert await second.stop(signal.SIGTERM) == 0
