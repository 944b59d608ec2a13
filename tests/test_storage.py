"""A login's storage as heavy and as spread out as the real page's (simulator ``idb_mb``, the
credential settle ``creds_settle_ms``), against real Chromium, the simulator, Postgres and Redis.

* a login with 50 MB of history restores from its snapshot alone, its chats and messages intact;
* a worker killed right after ``ready`` (before the credentials settled) leaves a session that
  needs a new scan, as an early copy would on the real site; killed once the first snapshot after
  the settle is stored, another worker takes the session over without a scan;
* a page without ``signal-storage`` is not snapshotted (the stored snapshot stays), and a copy of
  it, forced into a profile, logs out at boot (``logout_reason=0``).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from playwright.async_api import Page
from prometheus_client import REGISTRY

from load_tests.ports import free_port
from shared.errors import SnapshotIncomplete
from tests.browser import CREDS_SETTLED, MODEL_STORAGE_TOTALS, ORIGIN, forward_to, launch
from tests.conftest import (
    WAIT_S,
    Sim,
    WorkerFactory,
    WorkerProcess,
    events,
    get_json,
    link_id,
    manager_of,
    scan_until_linked,
)
from tests.test_snapshot import KEY, PHONE, SESSION, link, whatsapp
from worker import chromium, snapshot
from worker import whatsapp_web as wa
from worker.hibernation import until_settled

pytestmark = pytest.mark.chromium

IDB_MB = 50
MIB = 1 << 20


async def eventually(probe: Callable[[], Awaitable[Any]], until: Callable[[Any], bool]) -> Any:
    """``probe()`` until its answer satisfies ``until`` (bounded by WAIT_S)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            value = await probe()
            if until(value):
                return value
            await asyncio.sleep(0.1)  # a poll of Postgres/HTTP for a state another process reaches


async def link_on(worker: WorkerProcess, sim: Sim, pool: asyncpg.Pool, phone: str) -> str:
    """Create a session on ``worker``, scan its QRs (read from the outbox) until ready; its id."""
    async with aiohttp.ClientSession() as http, http.post(worker.url + "/v1/sessions", json={}) as resp:
        assert resp.status in (200, 201), await resp.text()
        sid: str = (await resp.json())["id"]
    seen: list[str] = []

    async def next_qr() -> str:
        async def probe() -> Any:
            return await pool.fetchval(
                "SELECT payload->'data'->>'qr' FROM outbox WHERE session_id = $1"
                " AND type = 'qr_code_generated' ORDER BY seq DESC LIMIT 1",
                sid,
            )

        qr: str = await eventually(probe, lambda v: v is not None and v not in seen)
        seen.append(qr)
        return qr

    await scan_until_linked(sim.url, next_qr, phone)

    async def ready() -> Any:
        return await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE session_id = $1 AND type = 'session_ready'", sid
        )

    await eventually(ready, lambda n: n == 1)
    return sid


async def session_on(worker: WorkerProcess, sid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{worker.url}/v1/sessions/{sid}") as resp:
        body: dict[str, Any] = await resp.json()
        return body


def page_of(session: Any) -> Page:
    """The page of a session's running browser."""
    assert session.slot is not None and session.slot.page is not None
    page: Page = session.slot.page
    return page


async def snapshot_count(pool: asyncpg.Pool, sid: str) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM profile_snapshots WHERE session_id = $1", sid)
    return count


# ------------------------------------------------------------------------------ 1. idb_mb 50


async def test_a_login_with_50_mb_of_history_restores_from_its_snapshot_alone(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    await sim.profile(idb_mb=IDB_MB)
    client = await start_worker()
    manager = manager_of(client)
    sid = await link_id(client, sim, "4917700000050")
    session = manager.get(sid)
    # walink is ready once the page knows the phone; the history sync goes on after (as it does
    # on the real page): its data is all written once the page marks it done
    await page_of(session).wait_for_function(
        "() => localStorage.getItem('WaInitialHistorySynced') === 'true'", polling=100, timeout=WAIT_S * 1000
    )
    before = await page_of(session).evaluate(MODEL_STORAGE_TOTALS)
    assert before["message"][1] >= IDB_MB * MIB  # the history sync wrote its 50 MB
    devices = len(await sim.devices("4917700000050"))

    started = time.monotonic()
    await manager.hibernate(session)  # waits for the settle, packs, stores, closes
    hibernate_s = time.monotonic() - started
    assert session.status.value == "hibernated" and session.slot is None
    profile = manager.launcher.profile_dir(session.profile_id)
    assert not profile.exists(), "a hibernated session keeps nothing on this worker's disk"
    size = await pg_pool.fetchval("SELECT size_bytes FROM profile_snapshots WHERE session_id = $1", sid)
    assert size >= IDB_MB * MIB  # the history is in the snapshot (incompressible bytes)

    stream = await events(client, sid, after=session.last_seq)
    started = time.monotonic()
    await manager.wake(session)  # from the snapshot alone, into a new, empty profile
    await stream.until("session_ready")
    wake_s = time.monotonic() - started
    stream.close()
    print(
        f"\nidb_mb {IDB_MB}: snapshot {size / MIB:.1f} MiB, hibernate (2 packs + stores) {hibernate_s:.1f} s,"
        f" wake -> ready {wake_s:.1f} s"
    )
    view = await get_json(client, f"/v1/sessions/{sid}")
    assert view["status"] == "ready" and view["phone_number"] == "4917700000050"
    assert "qr" not in [h["status"] for h in view["history"]][-4:]
    assert len(await sim.devices("4917700000050")) == devices, "restored, not linked again"
    after = await page_of(session).evaluate(MODEL_STORAGE_TOTALS)
    assert after == before, "the chats, contacts and messages came back intact"


# ------------------------------------------------------------------------------ 2. crashes


async def test_a_worker_killed_right_after_ready_leaves_a_session_that_needs_a_new_scan(
    tmp_path: Path, sim: Sim, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> None:
    first = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix)
    await first.start()
    try:
        sid = await link_on(first, sim, pg_pool, "4917700000001")
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL  # before the credentials settled
    finally:
        chromium.reap(tmp_path / "var")
    # walink stores no snapshot of credentials that are not final: there is nothing to restore
    assert await snapshot_count(pg_pool, sid) == 0

    second = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, data_dir=tmp_path / "other")
    await second.start()
    try:
        view = await eventually(lambda: session_on(second, sid), lambda b: b.get("status") == "failed")
    finally:
        assert await second.stop(signal.SIGTERM) == 0
    # the session ended: a new link (a new QR scan) is needed, as after an early crash on the real site
    assert view["reason"] == "client_fatal", view
    assert any("no snapshot stored" in line for line in second.log), "the reason is in the log"


async def test_a_worker_killed_after_the_settle_hands_the_session_over_without_a_scan(
    tmp_path: Path, sim: Sim, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> None:
    phone = "4917700000002"
    first = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix)
    await first.start()
    try:
        sid = await link_on(first, sim, pg_pool, phone)
        ready_at = time.monotonic()
        # the first live snapshot, taken once the credentials settled
        await eventually(lambda: snapshot_count(pg_pool, sid), lambda n: n == 1)
        print(f"\nfirst snapshot stored {time.monotonic() - ready_at:.1f} s after ready")
        assert (await sim.devices(phone))[0]["creds_settled"] is True
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        chromium.reap(tmp_path / "var")

    second = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, data_dir=tmp_path / "other")
    second_name = f"127.0.0.1:{second.port}"
    await second.start()
    try:
        view = await eventually(
            lambda: session_on(second, sid),
            lambda b: b.get("status") in {"ready", "failed", "logged_out"} and b.get("worker") == second_name,
        )
    finally:
        assert await second.stop(signal.SIGTERM) == 0
    assert view["status"] == "ready" and view["phone_number"] == phone, view
    assert len(await sim.devices(phone)) == 1, "the same linked device: no new scan"
    statuses = [h["status"] for h in view["history"]]
    assert "qr" not in statuses[statuses.index("ready") :], "no QR after the link"


# ------------------------------------------------------------------------------ 3. signal-storage


def _refusals() -> float:
    return REGISTRY.get_sample_value("walink_snapshot_refused_total") or 0.0


async def test_a_page_without_signal_storage_is_not_snapshotted_and_a_copy_logs_out(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool, pw: Any
) -> None:
    client = await start_worker(live_snapshot_delay_s=3600.0)
    manager = manager_of(client)
    sid = await link_id(client, sim, "4917700000003")
    session = manager.get(sid)
    assert session.slot is not None and session.slot.page is not None
    page = session.slot.page
    await page.wait_for_function(CREDS_SETTLED, polling=100, timeout=WAIT_S * 1000)
    await until_settled(session)  # walink's own deadline
    assert await session.slot.missing_login_storage() == []
    good = await manager._hibernation.store_snapshot(session, live=True)
    stored = await pg_pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sid)
    assert good == len(stored)

    deleted = await page.evaluate(
        "() => new Promise((ok) => { const r = indexedDB.deleteDatabase('signal-storage');"
        " r.onsuccess = () => ok(true); r.onerror = r.onblocked = () => ok(false); })"
    )
    assert deleted is True
    assert await session.slot.missing_login_storage() == ["IndexedDB signal-storage"]
    refusals = _refusals()
    with pytest.raises(SnapshotIncomplete, match="signal-storage"):
        await manager._hibernation.store_snapshot(session, live=True)
    await manager.hibernate(session)  # refused as well: the browser keeps running
    assert session.status.value == "ready" and session.slot is not None
    assert _refusals() == refusals + 2
    after = await pg_pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sid)
    assert after == stored, "the previous snapshot stays"

    # forced into a profile anyway (packed past walink's check), the copy logs out at boot. Packed
    # from the closed profile: Chromium writes localStorage to disk up to ~5 s late (a live copy
    # this early may lack `last-wid-md` and boot as never linked), and a close writes everything
    profile = manager.launcher.profile_dir(session.profile_id)
    key = manager._ctx.snapshot_keys
    await manager._ending.end_browser(session, wipe=False)
    forced = await asyncio.to_thread(snapshot.pack_profile, profile, key=key, session_id=sid)
    target = tmp_path / "forced"
    await asyncio.to_thread(snapshot.unpack_profile, forced, target, key=key, session_id=sid)
    context = await launch(pw, target, service_workers="block")
    try:
        await context.route(f"{ORIGIN}/**", forward_to(sim.url, timeout_ms=60_000))
        copy = context.pages[0] if context.pages else await context.new_page()
        urls: list[str] = []
        copy.on("framenavigated", lambda frame: urls.append(frame.url))
        await copy.goto(f"{ORIGIN}/")
        await copy.wait_for_selector('[data-testid="logout-reason-banner"]', timeout=WAIT_S * 1000)
        notices = [n for n in map(wa.parse_logout_url, urls) if n is not None]
        assert [n.reason for n in notices] == ["client_fatal"], urls  # logout_reason=0
        assert "database error" in await copy.inner_text('[data-testid="logout-reason-banner"]')
    finally:
        await context.unroute_all(behavior="ignoreErrors")
        await context.close()


# ------------------------------------------------------------------------------ 4. the simulator


async def boots_to_logout(pw: Any, profile: Path, sim: Sim) -> list[str]:
    """Open ``profile`` on the simulator; the logout reasons of its navigations once it landed on
    the logged-out screen with its banner."""
    async with whatsapp(pw, profile, sim) as page:
        urls: list[str] = []
        page.on("framenavigated", lambda frame: urls.append(frame.url))
        await page.wait_for_selector('[data-testid="logout-reason-banner"]', timeout=WAIT_S * 1000)
        assert "database error" in await page.inner_text('[data-testid="logout-reason-banner"]')
    return [n.reason for n in map(wa.parse_logout_url, urls) if n is not None]


async def test_a_copy_taken_before_the_credentials_settled_restores_logged_out(
    pw: Any, sim: Sim, tmp_path: Path
) -> None:
    await sim.profile(creds_settle_ms=600_000)  # the copy is surely taken before the settle
    source = tmp_path / "early"
    await link(pw, source, sim, settled=False)
    assert (await sim.devices(PHONE))[0]["creds_settled"] is False
    blob = await asyncio.to_thread(snapshot.pack_profile, source, key=KEY, session_id=SESSION)
    target = tmp_path / "restored"
    await asyncio.to_thread(snapshot.unpack_profile, blob, target, key=KEY, session_id=SESSION)
    assert await boots_to_logout(pw, target, sim) == ["client_fatal"]  # logout_reason=0
    assert (await sim.get("/admin/state"))["unsettled_logins"] == 1


async def test_a_copy_without_its_blob_files_logs_out(pw: Any, sim: Sim, tmp_path: Path) -> None:
    source = tmp_path / "linked"
    await link(pw, source, sim)
    blobs = source / snapshot.IDB_BLOBS
    assert any(p.is_file() for p in blobs.rglob("*")), "the page's value over 64 KiB is a blob file"
    shutil.rmtree(blobs)  # as a copy of the leveldb alone would be
    assert await boots_to_logout(pw, source, sim) == ["client_fatal"]


# ------------------------------------------------------------------------------ 5. localStorage


async def test_a_live_snapshot_carries_the_pages_localstorage_and_a_restored_browser_puts_it_back_once(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    # Chromium writes localStorage to disk in batches (at least 5 s late, minutes under its rate
    # limit): a copy of its files can lack keys the page holds; the chaos suite saw restored pages
    # without last-wid-md boot as never linked
    client = await start_worker(live_snapshot_delay_s=3600.0)
    manager = manager_of(client)
    sid = await link_id(client, sim, "4917700000005")
    session = manager.get(sid)
    await until_settled(session)
    page = page_of(session)
    await page.evaluate("() => localStorage.setItem('walink-late-key', 'late-value')")
    await manager._hibernation.store_snapshot(session, live=True)
    blob = await manager._ctx.store.get_snapshot(sid)
    assert blob is not None
    profile_id = "p_restoredcopy000000001"
    target = manager.launcher.profile_dir(profile_id)
    key = manager._ctx.snapshot_keys
    assert key is not None
    await asyncio.to_thread(snapshot.unpack_profile, blob, target, key=key, session_id=sid)
    sidecar = target / snapshot.PAGE_LOCAL_STORAGE
    carried = orjson.loads(sidecar.read_bytes())
    assert carried["walink-late-key"] == "late-value"  # the page's view, taken with the copy
    assert {"WANoiseInfo", "WebEncKeySalt", "last-wid-md"} <= set(carried)
    # a key certainly not in Chromium's files: only the sidecar can bring it back
    sidecar.write_bytes(orjson.dumps({**carried, "walink-probe": "from-the-snapshot"}))

    slot = await manager.launcher.launch(profile_id)
    try:
        await asyncio.wait_for(slot.hooked.wait(), WAIT_S)
        assert slot.page is not None
        restored = await slot.page.evaluate(
            "() => [localStorage.getItem('walink-probe'), localStorage.getItem('walink-late-key')]"
        )
        assert restored == ["from-the-snapshot", "late-value"]
        assert not sidecar.exists(), "put back once: the file is gone from the profile"
        # once per tab: a reload sees what the page itself left (as after a logout's reload)
        await slot.page.evaluate("() => localStorage.removeItem('walink-probe')")
        await slot.page.reload()
        assert await slot.page.evaluate("() => localStorage.getItem('walink-probe')") is None
    finally:
        await slot.close()
