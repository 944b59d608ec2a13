"""walink links through every behaviour of the 2026 page (docs/whatsapp-web-2026.md).

The fidelity matrix: the QR path and the pairing-code path each link end to end under each
behaviour of the simulator alone, and under ``strict`` (all at once). Every case checks that the
phone read from walink's API is the one the phone linked with, that no LID is taken for it, and
that no QR was published while a pairing code was active. Each case prints one ``FIDELITY`` line
(behaviour, path, time to phone) for the record; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    EventStream,
    Sim,
    WorkerFactory,
    WorkerProcess,
    create,
    events,
    free_port,
    get_json,
    link_id,
    manager_of,
)
from worker import chromium
from worker import whatsapp_web as wa
from worker.linking import MAX_TAKEOVERS

pytestmark = pytest.mark.chromium

PHONE = "14155550123"

BEHAVIOURS: dict[str, dict[str, Any]] = {
    "adv_refresh=first_scan": {"adv_refresh": "first_scan"},
    "adv_refresh=timer": {"adv_refresh": "timer", "adv_refresh_ms": 150},
    "sync_signal=never": {"sync_signal": "never"},
    "sync_signal=late": {"sync_signal": "late", "late_sync_ms": 1500},
    "sync_signal=flap": {"sync_signal": "flap", "late_sync_ms": 300},
    "lid+me_pn_delay": {"lid": True, "me_pn_delay_ms": 400},
    "lazy_modules": {"lazy_modules_ms": 800},
    "conflict=strict": {"conflict": "strict"},
    "slow_history_sync": {"pairing_ms": 800, "sync_ms": 8000, "heap_mb": 150},
    "strict": {"name": "strict"},
}


PATHS = {"qr": "14155550123", "code": "14155550124"}  # the phone that links by each path


async def _link(sim: Sim, client: Any, behaviour: str, path: str) -> dict[str, Any]:
    phone = PATHS[path]
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    try:
        first = (await stream.until("qr"))["qr"]
        if path == "qr":
            await sim.scan_linking(stream, phone, first)
        else:
            resp = await client.post(f"/v1/sessions/{sid}/pairing-code", json={"phone_number": phone})
            body = await resp.json()
            assert resp.status == 200, body
            mark = len(stream.seen)
            qr = await client.get(f"/v1/sessions/{sid}/qr")
            assert qr.status == 409  # no QR while the code is active
            await sim.post("/phone/pair", {"code": body["code"], "phone": phone})
        await stream.until("session_ready")
        if path == "code":  # nothing after the code was a QR, and never a string with a null part
            assert [kind for kind, _ in stream.seen[mark:] if kind == "qr"] == []
        qrs = [data["qr"] for kind, data in stream.seen if kind == "qr"]
        assert all("null" not in q.split(",") and len(q.split(",")) == 5 for q in qrs)
    finally:
        stream.close()
    session = await get_json(client, f"/v1/sessions/{sid}")
    assert session["status"] == "ready" and session["phone_number"] == phone
    assert session["lid"] is None or session["lid"].endswith("@lid")
    assert [d["device_index"] for d in await sim.devices(phone)] == [1]
    print(
        f"FIDELITY {behaviour:24} {path:4} linked phone {session['timings'].get('phone_extraction_ms')} ms"
        f" after pairing success; synced when read back: {session['synced']}"
    )
    return session


async def adding_account(
    sim: Sim, start_worker: WorkerFactory, **profile: Any
) -> tuple[Any, str, EventStream]:
    """``strict`` (plus ``profile``), a worker without a warm pool, a new session and its events."""
    await sim.profile(name="strict", **profile)
    client = await start_worker(warm_pool_size=0)
    sid = (await create(client))["id"]
    return client, sid, await events(client, sid)


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
async def test_links_under_each_behaviour(sim: Sim, start_worker: WorkerFactory, behaviour: str) -> None:
    """The QR path and the pairing-code path at once, each on its own cold-started page."""
    await sim.profile(**({"name": "instant"} | BEHAVIOURS[behaviour]))
    client = await start_worker(warm_pool_size=0)  # cold starts: each page boots with this profile
    await asyncio.gather(*(_link(sim, client, behaviour, path) for path in PATHS))


async def test_a_refreshed_secret_is_published_and_the_old_string_fails(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    client, sid, stream = await adding_account(sim, start_worker)
    try:
        first = (await stream.until("qr"))["qr"]
        await sim.scan(first, PHONE, expect=409)  # "Couldn't link device": the page refreshes the secret
        second = (await stream.until("qr"))["qr"]
        assert second.split(",")[0] == first.split(",")[0] and second != first  # same ref, new secret
        api = await get_json(client, f"/v1/sessions/{sid}/qr")
        assert api["qr"] == second
        page = manager_of(client).get(sid).slot.page
        assert await page.get_attribute(wa.QR_CONTAINER, "data-ref") == second
        await sim.scan(first, PHONE, expect=409)  # the old string stays refused
        await sim.scan(second, PHONE)  # walink's published QR links
        ready = await stream.until("session_ready")
    finally:
        stream.close()
    assert ready["phone_number"] == PHONE
    feed = await get_json(client, "/v1/events?limit=1000")
    published = [
        e["payload"]["data"]["qr"]
        for e in feed["events"]
        if e["session_id"] == sid and e["type"] == "qr_code_generated"
    ]
    assert published[:2] == [first, second]  # the webhook feed has the re-rendered QR too


async def test_the_lid_is_kept_apart_and_the_phone_waited_for(sim: Sim, start_worker: WorkerFactory) -> None:
    # the phone long before the sync
    client, sid, stream = await adding_account(sim, start_worker, me_pn_delay_ms=600, sync_ms=3000)
    try:
        await sim.scan_linking(stream, PHONE)
        await stream.until("session_authenticated")
        authenticated = await get_json(client, f"/v1/sessions/{sid}")
        ready = await stream.until("session_ready")
        synced = await stream.until("session_synced")
    finally:
        stream.close()
    assert authenticated["phone_number"] is None  # the LID alone is known: no phone yet
    assert ready["phone_number"] == PHONE
    assert synced["signal"] in {"main_loaded", "stream_main"}  # hasSynced never came
    session = await get_json(client, f"/v1/sessions/{sid}")
    assert session["phone_number"] == PHONE and session["lid"].endswith("@lid")
    assert session["synced"] is True
    kinds = [kind for kind, _ in stream.seen]
    assert kinds.index("session_ready") < kinds.index("session_synced")


async def test_pairing_code_back_to_qr_and_a_new_code(sim: Sim, start_worker: WorkerFactory) -> None:
    client, sid, stream = await adding_account(sim, start_worker)
    try:
        first_qr = (await stream.until("qr"))["qr"]
        code1 = await client.post(f"/v1/sessions/{sid}/pairing-code", json={"phone_number": PHONE})
        assert code1.status == 200
        assert (await get_json(client, f"/v1/sessions/{sid}"))["qr_available"] is False
        mark = len(stream.seen)
        back = await client.delete(f"/v1/sessions/{sid}/pairing-code")
        assert back.status == 202, await back.text()
        qr = (await stream.until("qr"))["qr"]
        assert qr != first_qr and "null" not in qr.split(",")
        assert (await get_json(client, f"/v1/sessions/{sid}/qr"))["qr"] == qr
        again = await client.delete(f"/v1/sessions/{sid}/pairing-code")
        assert again.status == 409  # no code is active any more
        code2 = await client.post(f"/v1/sessions/{sid}/pairing-code", json={"phone_number": PHONE})
        body = await code2.json()
        assert code2.status == 200 and body["code"] != (await code1.json())["code"]
        await sim.post("/phone/pair", {"code": body["code"], "phone": PHONE})
        await stream.until("session_ready")
        assert [k for k, _ in stream.seen[mark:]].count("qr") == 1  # the one QR between the codes
    finally:
        stream.close()


async def test_takeovers_are_bounded(sim: Sim, start_worker: WorkerFactory) -> None:
    """WhatsApp open elsewhere again and again: a few takeovers, then ``failed``/``conflict``."""
    client, sid, stream = await adding_account(sim, start_worker)
    try:
        await sim.scan_linking(stream, PHONE)
        await stream.until("session_ready")
        page = manager_of(client).get(sid).slot.page
        await page.evaluate(
            "() => { window.__states = []; window.require('WAWebSocketModel').Socket"
            ".on('change:state', (_m, s) => window.__states.push(s)); }"
        )
        for n in range(1, MAX_TAKEOVERS + 1):
            await sim.post("/phone/conflict", {"phone": PHONE})
            await page.wait_for_function(
                "n => window.__states.filter((s) => s === 'CONFLICT').length === n"
                " && window.__states[window.__states.length - 1] === 'CONNECTED'",
                arg=n,
            )
        assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "ready"
        await sim.post("/phone/conflict", {"phone": PHONE})
        failed = await stream.until("session_failed")
    finally:
        stream.close()
    assert failed["reason"] == "conflict"
    await asyncio.wait_for(manager_of(client).settle(), 30)
    assert manager_of(client).local(sid) is None and not manager_of(client).browsers()


async def test_reconnecting_blocked_and_deprecated_socket_states(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    await sim.profile(name="strict")
    client = await start_worker(warm_pool_size=0)
    phones = {"timeout": "14155550001", "deprecated": "14155550002", "tos": "14155550003"}
    sids = {name: await link_id(client, sim, phone) for name, phone in phones.items()}
    manager = manager_of(client)

    # TIMEOUT: the socket re-opens by itself; the session stays ready and /health says so meanwhile
    stream = await events(client, sids["timeout"], after=manager.get(sids["timeout"]).last_seq)
    await sim.post(
        "/admin/socket-state", {"phone": phones["timeout"], "state": "TIMEOUT", "duration_ms": 1500}
    )
    health = await _until(client, lambda h: h["sessions"]["reconnecting"] == 1)
    assert health["sessions"]["authenticated"] == 3
    assert (await get_json(client, f"/v1/sessions/{sids['timeout']}"))["status"] == "ready"
    await _until(client, lambda h: h["sessions"]["reconnecting"] == 0)
    # PROXYBLOCK and TOS_BLOCK: the page cannot go on; the sessions fail with those reasons
    await sim.post("/admin/socket-state", {"phone": phones["timeout"], "state": "PROXYBLOCK"})
    assert (await stream.until("session_failed"))["reason"] == "proxyblock"
    stream.close()
    stream = await events(client, sids["tos"], after=manager.get(sids["tos"]).last_seq)
    await sim.post("/admin/socket-state", {"phone": phones["tos"], "state": "TOS_BLOCK"})
    assert (await stream.until("session_failed"))["reason"] == "tos_block"
    stream.close()

    # DEPRECATED_VERSION that a reload does not cure: one reload of the live page, then failed
    session = manager.get(sids["deprecated"])
    stream = await events(client, sids["deprecated"], after=session.last_seq)
    body = {"phone": phones["deprecated"], "state": "DEPRECATED_VERSION", "sticky": True}
    await sim.post("/admin/socket-state", body)
    failed = await stream.until("session_failed")
    stream.close()
    assert failed["reason"] == "deprecated_version" and session.version_reloads == 1
    assert manager.launcher.web_cache.pinned_version is None  # no pinned build any more
    await asyncio.wait_for(manager.settle(), 30)
    assert manager.browsers() == []


async def _until(client: Any, done: Any) -> dict[str, Any]:
    """``/health`` until ``done(health)``: the worker notices a page state on its own schedule."""
    for _ in range(300):
        health = await get_json(client, "/health")
        if done(health):
            return health
        await asyncio.sleep(0.05)  # another component changes this; we can only look again
    raise AssertionError("the worker's /health never got there")


async def test_one_snapshot_restored_by_two_workers_at_once_runs_one_browser(
    tmp_path: Path,
    sim: Sim,
    start_worker: WorkerFactory,
    pg_dsn: str,
    redis_prefix: str,
) -> None:
    """Two workers asked at once to bring back one hibernated session: one browser in the cluster,
    one device on the phone, and no conflict ping-pong."""
    await sim.profile(name="strict")
    client = await start_worker(idle_timeout_s=1.0)
    sid = await link_id(client, sim, PHONE)
    stream = await events(client, sid)
    await stream.until("status", status="hibernated")
    stream.close()
    await manager_of(client).settle()
    before = await sim.get("/admin/state")

    workers = [
        WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, data_dir=tmp_path / f"w{n}")
        for n in range(2)
    ]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        async with aiohttp.ClientSession() as http:

            async def ask(worker: WorkerProcess) -> int:
                async with http.get(f"{worker.url}/v1/sessions/{sid}") as resp:
                    return resp.status

            assert await asyncio.gather(*(ask(w) for w in workers)) == [200, 200]
            for _ in range(600):  # the workers restore on their own schedule: look until it is done
                async with http.get(f"{workers[1].url}/v1/sessions/{sid}") as resp:
                    session = await resp.json()
                if session["status"] == "ready":
                    break
                await asyncio.sleep(0.1)
        assert session["status"] == "ready" and session["phone_number"] == PHONE
        groups = chromium.groups_under(tmp_path)
        assert len(groups) == 1, f"browsers of one session: {groups}"
        assert len(await sim.devices(PHONE)) == 1
        after = await sim.get("/admin/state")
        assert after["conflicts_sent"] == before["conflicts_sent"]  # no second browser, no ping-pong
    finally:
        codes = [await w.stop(signal.SIGTERM) for w in workers if w.proc is not None]
    assert codes == [0, 0]


async def test_a_conflict_with_the_lease_elsewhere_lets_go_without_a_takeover(
    sim: Sim, start_worker: WorkerFactory, redis_client: Any, redis_prefix: str
) -> None:
    """Another worker holds the lease (and so drives the other browser): this one lets go."""
    await sim.profile(name="strict")
    client = await start_worker(warm_pool_size=0)
    sid = await link_id(client, sim, PHONE)
    manager = manager_of(client)
    slot = manager.get(sid).slot
    before = await sim.get("/admin/state")
    await redis_client.set(f"{redis_prefix}lease:{sid}", "127.0.0.1:9", px=60_000)  # another's now
    await sim.post("/phone/conflict", {"phone": PHONE})
    await asyncio.wait_for(slot.dead.wait(), 30)  # its browser was ended, not taken back
    assert manager.local(sid) is None
    assert (await sim.get("/admin/state"))["takeovers"] == before["takeovers"]
    assert len(await sim.devices(PHONE)) == 1  # the device stays linked for the other driver


async def test_an_unused_pairing_code_expires(sim: Sim, start_worker: WorkerFactory) -> None:
    """No QR batch runs out while a code is shown: the code's own deadline ends the linking."""
    await sim.profile(name="strict")
    client = await start_worker(warm_pool_size=0, pairing_code_timeout_s=1.0)
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    try:
        await stream.until("qr")
        resp = await client.post(f"/v1/sessions/{sid}/pairing-code", json={"phone_number": PHONE})
        assert resp.status == 200
        expired = await stream.until("status", status="expired")
    finally:
        stream.close()
    assert expired["reason"] == "qr_timeout"
    manager = manager_of(client)
    await asyncio.wait_for(manager.settle(), 30)
    assert manager.local(sid) is None and not manager.browsers()  # ended: nothing of it stays
