"""Issue 10 item 14: a replaced duplicate that is hibernated has no browser to log out with; its
device is unlinked apart (worker.unlinking) — on the worker that committed the newer link, or
the one that holds it — and nothing of its login is left (profile, snapshot, lease, Chromium)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from tests.conftest import WAIT_S, Sim, WorkerFactory, get_json, link_id, manager_of
from worker import chromium

PHONE = "351911000222"


def _unlinked_total() -> float:
    return REGISTRY.get_sample_value("walink_replaced_unlinks_total", {"outcome": "unlinked"}) or 0.0


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until ``check()`` holds (bounded): state of the simulator, Postgres, another worker."""
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"never true: {what}"
        await asyncio.sleep(0.05)


async def _hibernated(client: TestClient[Any, Any], sid: str, pg_pool: asyncpg.Pool) -> str:
    """Hibernate the session on ``client``'s worker; its profile id (the snapshot holds the login)."""
    manager = manager_of(client)
    await manager.hibernate(manager.get(sid))
    assert manager.get(sid).status.value == "hibernated" and manager.get(sid).slot is None
    assert await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid) == 1
    profile_id = await pg_pool.fetchval("SELECT profile_id FROM whatsapp_accounts WHERE id = $1", sid)
    assert isinstance(profile_id, str)
    return profile_id


async def _assert_only_the_new_link_is_left(
    *,
    sim: Sim,
    old: str,
    old_devices: set[str],
    new: str,
    new_client: TestClient[Any, Any],
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    profiles: list[Path],
    var_dirs: list[Path],
) -> None:
    async def only_the_new_device() -> bool:
        devices = {d["device_id"] for d in await sim.devices(PHONE)}
        return len(devices) == 1 and not devices & old_devices

    await _until(only_the_new_device, "the replaced hibernated session's device is unlinked")

    async def snapshot_gone() -> bool:
        left = await pg_pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", old)
        return bool(left == 0)

    await _until(snapshot_gone, "the replaced session's snapshot is deleted")
    manager = manager_of(new_client)

    async def no_unlink_running() -> bool:
        return not manager.unlinking

    await _until(no_unlink_running, "the unlink job is done on the new link's worker")
    for profile in profiles:
        assert not profile.exists(), f"the replaced session's profile is left: {profile}"
    # the old session stays as the ready transaction left it: replaced, deleted, never ready again
    row = await pg_pool.fetchrow(
        "SELECT session_status, reason, deleted_at IS NOT NULL AS deleted"
        " FROM whatsapp_accounts WHERE id = $1",
        old,
    )
    assert row is not None and (row["session_status"], row["reason"], row["deleted"]) == (
        "failed",
        "replaced",
        True,
    )
    assert manager.local(old) is None
    old_view = await get_json(new_client, f"/v1/sessions/{old}")
    assert (old_view["status"], old_view["reason"]) == ("failed", "replaced")
    assert await redis_client.exists(f"{redis_prefix}lease:{old}") == 0
    # the new session is still ready, live and not soft-deleted
    new_row = await pg_pool.fetchrow(
        "SELECT session_status, deleted_at IS NULL AS live, phone_number"
        " FROM whatsapp_accounts WHERE id = $1",
        new,
    )
    assert new_row is not None and (new_row["session_status"], new_row["live"], new_row["phone_number"]) == (
        "ready",
        True,
        PHONE,
    )
    view = await get_json(new_client, f"/v1/sessions/{new}")
    assert view["status"] == "ready" and view["phone_number"] == PHONE
    new_slot = manager.get(new).slot
    assert new_slot is not None and new_slot.pid is not None
    # no Chromium left for the old session: only the new session's browser runs
    groups = set().union(*(chromium.groups_under(var) for var in var_dirs))
    assert groups == {new_slot.pid}


async def test_a_replaced_hibernated_session_has_its_device_unlinked_and_its_login_removed(
    tmp_path: Path,
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await start_worker()
    old = await link_id(client, sim, PHONE)
    profile_id = await _hibernated(client, old, pg_pool)
    old_devices = {d["device_id"] for d in await sim.devices(PHONE)}
    assert len(old_devices) == 1
    unlinked_before = _unlinked_total()

    new = await link_id(client, sim, PHONE)  # the same phone links again: the old one is replaced

    await _assert_only_the_new_link_is_left(
        sim=sim,
        old=old,
        old_devices=old_devices,
        new=new,
        new_client=client,
        pg_pool=pg_pool,
        redis_client=redis_client,
        redis_prefix=redis_prefix,
        profiles=[manager_of(client).launcher.profile_dir(profile_id)],
        var_dirs=[tmp_path / "var"],
    )
    assert _unlinked_total() == unlinked_before + 1  # once, though two paths noticed it


async def test_a_session_hibernated_by_a_worker_that_is_gone_is_unlinked_by_the_worker_of_the_new_link(
    tmp_path: Path,
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    a = await start_worker(worker_name="worker-a")
    old = await link_id(a, sim, PHONE)
    profile_id = await _hibernated(a, old, pg_pool)
    old_devices = {d["device_id"] for d in await sim.devices(PHONE)}
    assert len(old_devices) == 1
    profile_a = manager_of(a).launcher.profile_dir(profile_id)
    await a.close()  # worker A is gone: the login is only the snapshot in Postgres

    b = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b")
    new = await link_id(b, sim, PHONE)

    await _assert_only_the_new_link_is_left(
        sim=sim,
        old=old,
        old_devices=old_devices,
        new=new,
        new_client=b,
        pg_pool=pg_pool,
        redis_client=redis_client,
        redis_prefix=redis_prefix,
        profiles=[profile_a, manager_of(b).launcher.profile_dir(profile_id)],
        var_dirs=[tmp_path / "var", tmp_path / "b"],
    )


async def test_an_unlink_left_undone_is_taken_up_by_the_periodic_look(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    """The worker that replaced the session died before unlinking it (here: the row is replaced
    while no worker runs): the stored snapshot is the record of the unlink still owed, and any
    worker's look every ``unlink_retry_s`` does it."""
    a = await start_worker(worker_name="worker-a")
    old = await link_id(a, sim, PHONE)
    await _hibernated(a, old, pg_pool)
    assert len(await sim.devices(PHONE)) == 1
    await a.close()
    # what mark_ready writes for a replaced hibernated row, with nobody left to act on it
    await pg_pool.execute(
        "UPDATE whatsapp_accounts SET status = 'failed', session_status = 'failed', reason = 'replaced',"
        " phone_number = NULL, deleted_at = now(), is_primary = false WHERE id = $1",
        old,
    )

    b = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b", unlink_retry_s=0.5)
    manager = manager_of(b)

    async def device_gone() -> bool:
        return await sim.devices(PHONE) == []

    await _until(device_gone, "the look unlinks the device left linked")

    async def done() -> bool:
        snapshots = await pg_pool.fetchval(
            "SELECT count(*) FROM profile_snapshots WHERE session_id = $1", old
        )
        return bool(snapshots == 0) and not manager.unlinking

    await _until(done, "the snapshot is deleted and the job is over")
    assert manager.local(old) is None and not manager.browsers()
    assert chromium.groups_under(tmp_path / "b") == set()
