"""A hibernation whose snapshot cannot be stored leaves the session ready with its browser.

The fault is real: a trigger in the test database refuses every write to ``profile_snapshots``
(as a full disk, a revoked grant or a constraint would). Live snapshots after ready are put off
(``live_snapshot_delay_s``) so the session has no snapshot when the fault hits.
"""

from __future__ import annotations

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.conftest import Sim, WorkerFactory, events, get_json, link_id, manager_of

pytestmark = pytest.mark.chromium

PHONE = "4915111122233"

_REFUSE_SNAPSHOTS = """
CREATE OR REPLACE FUNCTION test_refuse_snapshots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'test fault: snapshot store refused'; END $$;
CREATE TRIGGER test_refuse_snapshots BEFORE INSERT OR UPDATE ON profile_snapshots
    FOR EACH ROW EXECUTE FUNCTION test_refuse_snapshots();
"""
_ALLOW_SNAPSHOTS = """
DROP TRIGGER IF EXISTS test_refuse_snapshots ON profile_snapshots;
DROP FUNCTION IF EXISTS test_refuse_snapshots();
"""


def _failures() -> float:
    return REGISTRY.get_sample_value("walink_hibernate_failures_total") or 0.0


async def test_a_failed_hibernation_keeps_the_session_ready_with_its_browser(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker(live_snapshot_delay_s=3600.0)
    sid = await link_id(client, sim, PHONE)
    manager = manager_of(client)
    session = manager.get(sid)
    assert await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid) == 0

    failures_before = _failures()
    await pg_pool.execute(_REFUSE_SNAPSHOTS)
    try:
        await manager.hibernate(session)
        # still ready, still driven by a running browser, and it says why it did not hibernate
        assert session.status.value == "ready"
        assert session.slot is not None and session.slot.hooked.is_set()
        assert _failures() == failures_before + 1
        view = await get_json(client, f"/v1/sessions/{sid}")
        assert view["status"] == "ready" and view["phone_number"] == PHONE
    finally:
        await pg_pool.execute(_ALLOW_SNAPSHOTS)

    # the fault cleared: a later hibernation succeeds, with a snapshot stored and the browser closed
    await manager.hibernate(session)
    assert session.status.value == "hibernated" and session.slot is None
    assert await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid) == 1
    # and it wakes from it without a new scan
    stream = await events(client, sid)
    await client.post(f"/v1/sessions/{sid}/restart")
    await stream.until("session_ready")
    stream.close()
    assert "qr" not in [kind for kind, _ in stream.seen]
    assert len(await sim.devices(PHONE)) == 1


_REFUSE_SNAPSHOT_UPDATES = """
CREATE OR REPLACE FUNCTION test_refuse_snapshots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'test fault: snapshot update refused'; END $$;
CREATE TRIGGER test_refuse_snapshots BEFORE UPDATE ON profile_snapshots
    FOR EACH ROW EXECUTE FUNCTION test_refuse_snapshots();
"""


async def test_a_refused_closed_snapshot_hibernates_on_the_live_one_and_keeps_the_profile(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    """The live snapshot (an insert) is stored, the closed profile's (an update of it) is refused:
    the session hibernates with the live snapshot and its profile, and wakes without a scan."""
    client = await start_worker(live_snapshot_delay_s=3600.0)
    sid = await link_id(client, sim, PHONE)
    manager = manager_of(client)
    session = manager.get(sid)
    profile = manager.launcher.profile_dir(session.profile_id)

    await pg_pool.execute(_REFUSE_SNAPSHOT_UPDATES)
    try:
        await manager.hibernate(session)
    finally:
        await pg_pool.execute(_ALLOW_SNAPSHOTS)
    assert session.status.value == "hibernated" and session.slot is None
    assert await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid) == 1
    assert profile.is_dir() and any(profile.iterdir())  # kept: it is the exact login

    stream = await events(client, sid)
    await client.post(f"/v1/sessions/{sid}/restart")
    await stream.until("session_ready")
    stream.close()
    assert "qr" not in [kind for kind, _ in stream.seen]
    assert len(await sim.devices(PHONE)) == 1
