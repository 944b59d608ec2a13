"""DELETE is durable or refused: while Postgres is down it answers 503 and changes nothing, and a
deleted session's device is gone from the phone, also when the session was hibernated."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import Sim, WorkerFactory, get_json, link_id, manager_of
from tests.private_pg import PrivatePostgres

pytestmark = pytest.mark.chromium

PHONE = "5521988887777"


@pytest.fixture
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    server = PrivatePostgres()
    await server.init()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_delete_while_postgres_is_down_answers_503_and_changes_nothing(
    private_pg: PrivatePostgres, sim: Sim, start_worker: WorkerFactory
) -> None:
    client = await start_worker(database_url=private_pg.dsn)
    sid = await link_id(client, sim, PHONE)
    session = manager_of(client).get(sid)
    assert len(await sim.devices(PHONE)) == 1

    await private_pg.stop()
    resp = await client.delete(f"/v1/sessions/{sid}")
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["code"] == "database_unavailable"
    # nothing changed: still ready, still driven by its browser, still linked on the phone
    assert session.status.value == "ready" and session.slot is not None
    assert manager_of(client).local(sid) is session
    assert len(await sim.devices(PHONE)) == 1

    await private_pg.start()
    resp = await client.delete(f"/v1/sessions/{sid}")
    assert resp.status == 204, await resp.text()
    assert await sim.devices(PHONE) == []
    conn = await asyncpg.connect(private_pg.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT session_status, deleted_at FROM whatsapp_accounts WHERE id = $1", sid
        )
        statuses = [
            r["status"]
            for r in await conn.fetch(
                "SELECT payload->'data'->>'status' AS status FROM outbox"
                " WHERE session_id = $1 AND type = 'status' ORDER BY seq",
                sid,
            )
        ]
    finally:
        await conn.close()
    assert row is not None and row["session_status"] == "deleted" and row["deleted_at"] is not None
    assert statuses.count("deleted") == 1  # the refused DELETE left no event behind
    await get_json(client, f"/v1/sessions/{sid}", expect=404)


async def test_delete_of_a_hibernated_session_unlinks_its_device(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    sid = await link_id(client, sim, PHONE)
    manager = manager_of(client)
    await manager.hibernate(manager.get(sid))
    assert manager.get(sid).status.value == "hibernated" and manager.get(sid).slot is None
    assert len(await sim.devices(PHONE)) == 1

    resp = await client.delete(f"/v1/sessions/{sid}")
    assert resp.status == 204, await resp.text()
    assert await sim.devices(PHONE) == []
    assert await pg_pool.fetchval("SELECT deleted_at IS NOT NULL FROM whatsapp_accounts WHERE id = $1", sid)
    assert await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid) == 0
