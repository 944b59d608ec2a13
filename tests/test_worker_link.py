"""A worker links accounts end to end: real Chromium, the real simulator page, the HTTP API."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image, ImageOps

from tests.conftest import Sim, WorkerFactory, create, events, get_json, link_id, manager_of
from worker import whatsapp_web as wa
from worker.keys import HEARTBEAT, POOL

pytestmark = pytest.mark.chromium

PHONE = "14155550101"


def decode(png: bytes) -> list[str]:
    image = ImageOps.expand(Image.open(io.BytesIO(png)).convert("RGB"), border=24, fill="white")
    return [r.text for r in zxingcpp.read_barcodes(image)]


async def link(client: Any, sim: Sim, phone: str = PHONE, **body: Any) -> dict[str, Any]:
    """Create a session, scan its QR from the phone, wait until it is ready; the session."""
    return await get_json(client, f"/v1/sessions/{await link_id(client, sim, phone, **body)}")


async def test_add_account_end_to_end(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker(warm_pool_size=1)
    await asyncio.wait_for(client.app[POOL].wait_full(), 60)
    created = await create(client, label="shop", metadata={"crm_id": 7})
    sid = created["id"]
    assert created["qr_url"] == f"/v1/sessions/{sid}/qr"
    stream = await events(client, sid)
    qr_event = await stream.until("qr")
    raw = (await get_json(client, f"/v1/sessions/{sid}/qr"))["qr"]
    assert raw == qr_event["qr"]
    parts = raw.split(",")
    assert len(parts) == 5 and parts[0].startswith("2@")

    # the QR drawn in WhatsApp Web's canvas, read back by a real decoder, is the API's QR
    page = manager_of(client).get(sid).slot.page
    assert await page.get_attribute(wa.QR_CONTAINER, "data-ref") == raw
    assert decode(await page.locator(wa.QR_CANVAS).screenshot()) == [raw]
    png = await client.get(f"/v1/sessions/{sid}/qr", headers={"Accept": "image/png"})
    assert png.content_type == "image/png" and decode(await png.read()) == [raw]
    svg = await client.get(f"/v1/sessions/{sid}/qr?format=svg")
    assert svg.content_type == "image/svg+xml" and b"<svg" in await svg.read()

    await sim.scan_linking(stream, PHONE, qr=raw, push_name="Ana")
    ready = await stream.until("session_ready")
    stream.close()
    assert ready["phone_number"] == PHONE and ready["push_name"] == "Ana"

    session = await get_json(client, f"/v1/sessions/{sid}")
    assert session["status"] == "ready" and session["phone_number"] == PHONE
    assert session["metadata"] == {"crm_id": 7} and session["label"] == "shop"
    assert [h["status"] for h in session["history"]] == ["starting", "qr", "authenticated", "ready"]
    assert [h["reason"] for h in session["history"]][1:] == ["warm_pool", "scanned", "linked"]
    assert {"qr_ms", "phone_extraction_ms", "ready_at_ms"} <= set(session["timings"])
    assert [d["push_name"] for d in await sim.devices(PHONE)] == ["Ana"]
    # a ready session has no QR to show
    resp = await client.get(f"/v1/sessions/{sid}/qr")
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "invalid_state"

    health = await get_json(client, "/health")
    assert health["status"] == "healthy"
    assert health["sessions"]["authenticated"] == 1
    assert health["performance"]["avg_qr_time_ms"] is not None
    assert health["performance"]["avg_phone_extraction_ms"] is not None
    assert {"limit", "active", "waiting", "max_active_seen"} <= set(health["queue"])
    assert health["pool"]["target"] == 1
    assert health["memory"]["browsers_pss"] > 10 * 1024 * 1024  # its live Chromium, walked in /proc
    metrics = await (await client.get("/metrics")).text()
    assert "walink_qr_generation_seconds_count" in metrics
    assert "walink_phone_extraction_seconds_count" in metrics


async def test_cold_start_without_pool_reaches_qr(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker(warm_pool_size=0)
    session = await link(client, sim)
    assert [h["reason"] for h in session["history"]][1] == "cold_start"
    assert session["status"] == "ready"


async def test_phone_from_last_wid_md_when_the_module_is_missing(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    await sim.profile(me_module=False)
    client = await start_worker()
    session = await link(client, sim, phone="4915112345678")
    assert session["phone_number"] == "4915112345678"
    assert manager_of(client).get(session["id"]).phone_method == "last-wid-md"


async def test_qr_rotates_then_expires(sim: Sim, start_worker: WorkerFactory, tmp_path: Path) -> None:
    await sim.profile(qr_first_ms=400, qr_next_ms=250)
    client = await start_worker(qr_batches=1)
    sid = (await create(client))["id"]
    profile_id = manager_of(client).get(sid).profile_id
    stream = await events(client, sid)
    expired = await stream.until("status", status="expired")
    qrs = [d["qr"] for kind, d in stream.seen if kind == "qr"]
    stream.close()
    assert len(qrs) == 6 and len(set(qrs)) == 6  # 6 refs per batch, each a new QR
    assert expired["reason"] == "qr_timeout"
    # an expired ref cannot be scanned any more, and the browser is gone
    await sim.scan(qrs[0], PHONE, expect=410)
    manager = manager_of(client)
    await asyncio.wait_for(manager.settle(), 30)
    assert manager.local(sid) is None and not manager.browsers()  # ended: nothing of it stays
    assert not any((tmp_path / "var").glob("worker-*/profiles/" + profile_id))


class ReplyWithTheCancel:
    """The heartbeat's Redis, with one reply that arrives in the loop iteration in which the
    shutdown cancels the heartbeat task. Python 3.11's ``asyncio.wait_for`` then returns that
    reply instead of raising, the cancellation is lost and the heartbeat loop beats on. By chance
    that is rare (reply and cancel must meet within a loop iteration or two, likelier on a loaded
    machine); here it is certain."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.waiting = asyncio.Event()
        self.reply: asyncio.Future[bool] | None = None

    def set(self, *args: Any, **kwargs: Any) -> Any:
        task = asyncio.current_task()
        if self.reply is not None or task is None or task.get_name() != "heartbeat":
            return self.real.set(*args, **kwargs)  # the shutdown's drain beat, later beats
        loop = asyncio.get_running_loop()
        reply = self.reply = loop.create_future()
        asked = task.cancelling()

        def arrive_with_the_cancel() -> None:  # looks at every loop iteration until then
            if reply.done():
                return
            if task.cancelling() > asked:
                reply.set_result(True)
            else:
                loop.call_soon(arrive_with_the_cancel)

        arrive_with_the_cancel()
        self.waiting.set()
        return reply

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.delete(*args, **kwargs)


async def test_shutdown_ends_a_heartbeat_that_lost_its_cancel(
    start_worker: WorkerFactory, redis_client: Any
) -> None:
    client = await start_worker(redis_timeout_s=30.0)  # the held reply must not time out first
    heartbeat = client.app[HEARTBEAT]
    stand_in = ReplyWithTheCancel(heartbeat.redis)
    heartbeat.redis = stand_in
    await asyncio.wait_for(stand_in.waiting.wait(), 5)  # the heartbeat task awaits the held reply
    closing = asyncio.ensure_future(client.close())
    done, _ = await asyncio.wait({closing}, timeout=15)
    if not done:  # unstick the shutdown so that the test ends, then fail
        for task in asyncio.all_tasks():
            if task.get_name() == "heartbeat":
                task.cancel()
        await closing
    assert stand_in.reply is not None and stand_in.reply.result()  # the reply won: a cancel was lost
    assert done, "the worker's shutdown still waited for its heartbeat task after 15 s"
    await closing
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "heartbeat"]
    assert await redis_client.exists(heartbeat.key) == 0  # it left: peers see the worker gone


async def test_qr_reload_starts_a_new_batch(sim: Sim, start_worker: WorkerFactory) -> None:
    await sim.profile(qr_first_ms=400, qr_next_ms=250)
    client = await start_worker(qr_batches=2)
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    await stream.until("status", status="expired")
    qrs = [d["qr"] for kind, d in stream.seen if kind == "qr"]
    stream.close()
    assert len(qrs) == 12 and len(set(qrs)) == 12  # "Click to reload QR code" gave a second batch


async def test_scan_within_second_batch_links(sim: Sim, start_worker: WorkerFactory) -> None:
    await sim.profile(qr_first_ms=300, qr_next_ms=200)
    client = await start_worker(qr_batches=3)
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    for _ in range(8):  # into the second batch
        qr = (await stream.until("qr"))["qr"]
    await sim.profile(qr_first_ms=60_000, qr_next_ms=20_000)
    await sim.scan_linking(stream, PHONE, qr=qr)
    await stream.until("session_ready")
    stream.close()


async def test_logout_from_phone(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid = (await link(client, sim))["id"]
    stream = await events(client, sid)
    await sim.post("/phone/logout", {"phone": PHONE})
    disconnected = await stream.until("session_disconnected")
    stream.close()
    assert disconnected["reason"] == "phone_logout"
    session = await get_json(client, f"/v1/sessions/{sid}")
    assert session["status"] == "logged_out" and session["reason"] == "phone_logout"
    assert await sim.devices(PHONE) == []


async def test_logout_through_the_api(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid = (await link(client, sim))["id"]
    resp = await client.post(f"/v1/sessions/{sid}/logout")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "logged_out" and body["reason"] == "api_logout"
    assert await sim.devices(PHONE) == []
    again = await client.post(f"/v1/sessions/{sid}/logout")
    assert again.status == 409


async def test_link_with_pairing_code(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    await stream.until("qr")
    resp = await client.post(f"/v1/sessions/{sid}/pairing-code", json={"phone_number": "+44 7911 123456"})
    body = await resp.json()
    assert resp.status == 200, body
    code = body["code"]
    assert len(code) == 9 and code[4] == "-"
    assert set(code.replace("-", "")) <= set("123456789ABCDEFGHJKLMNPQRSTVWXYZ")
    await sim.post("/phone/pair", {"code": code, "phone": "447911123456"})
    ready = await stream.until("session_ready")
    stream.close()
    assert ready["phone_number"] == "447911123456"


async def test_failed_sync_is_a_failure_with_reason(sim: Sim, start_worker: WorkerFactory) -> None:
    await sim.profile(fail_rate=1.0)
    client = await start_worker()
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    await sim.scan_linking(stream, PHONE)
    failed = await stream.until("session_failed")
    stream.close()
    assert failed["reason"] == "sync_failed"
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "failed"


async def test_restart_endpoint_keeps_a_ready_session(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid = (await link(client, sim))["id"]
    stream = await events(client, sid, after=manager_of(client).get(sid).last_seq)
    resp = await client.post(f"/v1/sessions/{sid}/restart")
    assert resp.status == 202
    await stream.until("session_ready")
    seen = [kind for kind, _ in stream.seen]
    stream.close()
    assert "qr" not in seen
    session = await get_json(client, f"/v1/sessions/{sid}")
    assert session["status"] == "ready" and session["phone_number"] == PHONE
    assert len(await sim.devices(PHONE)) == 1


async def test_worker_restart_brings_ready_sessions_back_without_qr(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    first = await start_worker()
    ids = [(await link(first, sim, phone=f"1415555{n:04d}"))["id"] for n in range(2)]
    await first.close()  # graceful shutdown: browsers end, profiles and sidecars stay

    second = await start_worker()
    for n, sid in enumerate(ids):
        stream = await events(second, sid)
        session = await get_json(second, f"/v1/sessions/{sid}")
        if session["status"] != "ready":
            await stream.until("session_ready")
        stream.close()
        session = await get_json(second, f"/v1/sessions/{sid}")
        assert session["status"] == "ready" and session["phone_number"] == f"1415555{n:04d}"
        after_restart = [h for h in session["history"] if h["reason"] == "restoring"]
        assert after_restart, session["history"]
        tail = session["history"][session["history"].index(after_restart[-1]) :]
        assert [h["status"] for h in tail] == ["starting", "authenticated", "ready"]
        assert len(await sim.devices(f"1415555{n:04d}")) == 1


async def test_a_restart_brings_back_only_max_active_sessions_and_hibernates_the_rest(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    """Sessions beyond ``max_active_sessions`` come back hibernated (a snapshot, no browser), not
    launched; one of them wakes on its first request, without a QR."""
    first = await start_worker()
    ids = [(await link(first, sim, phone=f"1415556{n:04d}"))["id"] for n in range(3)]
    await first.close()

    second = await start_worker(max_active_sessions=1)
    manager = manager_of(second)
    for sid in ids:
        session = manager.get(sid)
        if session.status.value not in {"ready", "hibernated"}:
            async with asyncio.timeout(60):
                while session.status.value not in {"ready", "hibernated"}:
                    await session.changed.wait()
    statuses = sorted(manager.get(sid).status.value for sid in ids)
    assert statuses == ["hibernated", "hibernated", "ready"], statuses
    assert sum(1 for sid in ids if manager.get(sid).slot is not None) == 1
    sleeping = next(sid for sid in ids if manager.get(sid).status.value == "hibernated")
    assert manager.get(sleeping).reason == "lru"
    stream = await events(second, sleeping)
    resp = await second.post(f"/v1/sessions/{sleeping}/restart")
    assert resp.status == 202
    await stream.until("session_ready")
    assert "qr" not in [kind for kind, _ in stream.seen]
    stream.close()
    woken = await get_json(second, f"/v1/sessions/{sleeping}")
    assert woken["status"] == "ready" and woken["phone_number"] == f"1415556{ids.index(sleeping):04d}"


async def test_twenty_at_once_all_get_a_qr_within_the_launch_budget(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    """A burst of 20: two from the warm pool, 18 cold starts never more than the launch budget
    at once (counted in Redis, where every worker of the machine takes its places), and each
    client that waits for a place hears ``qr_pending`` with its position before its QR."""
    client = await start_worker(launch_budget=2, warm_pool_size=2)
    await manager_of(client).pool.wait_full()
    created = await asyncio.gather(*(create(client) for _ in range(20)))
    streams = [await events(client, c["id"]) for c in created]
    firsts = await asyncio.gather(*(s.first_of("qr_pending", "qr") for s in streams))
    await asyncio.gather(
        *(s.until("qr") for s, (event, _) in zip(streams, firsts, strict=True) if event != "qr")
    )
    for s in streams:
        s.close()
    health = await get_json(client, "/health")
    assert health["sessions"]["qr_scanning"] == 20
    budget = health["queue"]["budget"]
    # the pool's two, the 18 cold starts, and the pool's refills after the burst (last in line)
    assert budget["limit"] == 2 and 2 + 18 <= budget["granted_total"] <= 2 + 18 + 2
    assert 1 <= budget["max_held_seen"] <= 2
    assert health["queue"]["fallbacks_total"] == 0  # (the pool's refills may be starting now)
    pending = [data for event, data in firsts if event == "qr_pending"]
    assert len(pending) >= 10, firsts  # most of the 18 had to wait for a place, and heard so first
    assert all(p["position"] >= 1 and p["eta_ms"] > 0 for p in pending)
    raws = {(await get_json(client, f"/v1/sessions/{c['id']}/qr"))["qr"] for c in created}
    assert len(raws) == 20


async def test_delete_ends_the_browser_and_forgets_the_session(
    sim: Sim, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    client = await start_worker()
    sid = (await link(client, sim))["id"]
    profile = manager_of(client).get(sid).profile_id
    resp = await client.delete(f"/v1/sessions/{sid}")
    assert resp.status == 204
    await get_json(client, f"/v1/sessions/{sid}", expect=404)
    assert not list((tmp_path / "var").glob(f"worker-*/profiles/{profile}"))
    assert not list((tmp_path / "var").glob(f"worker-*/sessions/{sid}.json"))


async def test_bad_input_gets_clear_4xx_and_changes_nothing(
    sim: Sim, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    client = await start_worker()
    sid = (await create(client, id="default.shop-42"))["id"]  # chosen ids: <workspace>.<name>
    await (await events(client, sid)).until("qr")
    # the profile (WhatsApp's keys) and every directory walink made above it: 0700
    (profile,) = (tmp_path / "var").glob("worker-*/profiles/*")
    for directory in (profile, profile.parent, profile.parent.parent, tmp_path / "var"):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    before = sorted(
        p.name for p in (tmp_path / "var").rglob("*") if p.parent.name in {"sessions", "profiles"}
    )

    cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/v1/sessions/s_doesnotexist00000000", None, 404, "session_not_found"),
        ("GET", "/v1/sessions/NOT_VALID", None, 400, "invalid_session_id"),
        ("GET", "/v1/sessions/..%2F..%2Fetc%2Fpasswd", None, 400, "invalid_session_id"),
        ("GET", "/v1/sessions/..%2Fdefault.shop-42/qr", None, 400, "invalid_session_id"),
        ("DELETE", "/v1/sessions/%2E%2E", None, 404, "not_found"),  # normalized to /v1: no route
        ("POST", "/v1/sessions", {"id": "../../tmp/x"}, 400, "invalid_session_id"),
        ("POST", "/v1/sessions", {"id": "default.shop-42"}, 409, "session_exists"),
        ("POST", "/v1/sessions", {"id": "shop-43"}, 400, "session_id_outside_workspace"),
        ("POST", "/v1/sessions", {"id": "other.shop-42"}, 400, "session_id_outside_workspace"),
        ("POST", "/v1/sessions", {"colour": "blue"}, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"metadata": [1, 2]}, 400, "invalid_metadata"),
        ("POST", "/v1/sessions", {"webhook_url": "ftp://x"}, 400, "invalid_request"),
        ("POST", "/v1/sessions", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/sessions", b"x" * 200_000, 413, "payload_too_large"),
        ("POST", f"/v1/sessions/{sid}/pairing-code", {"phone_number": "12ab"}, 400, "invalid_phone_number"),
        ("POST", f"/v1/sessions/{sid}/pairing-code", {"phone_number": 123}, 400, "invalid_phone_number"),
        ("POST", f"/v1/sessions/{sid}/pairing-code", {}, 400, "invalid_phone_number"),
        ("GET", f"/v1/sessions/{sid}/qr?format=gif", None, 400, "invalid_request"),
        ("PUT", f"/v1/sessions/{sid}", {}, 405, "method_not_allowed"),
    ]
    for method, path, body, status, code in cases:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        resp = await client.request(method, path, **kwargs)
        data = await resp.json()
        assert (resp.status, data["error"]["code"]) == (status, code), (method, path, data)
        assert data["error"]["message"]

    after = sorted(p.name for p in (tmp_path / "var").rglob("*") if p.parent.name in {"sessions", "profiles"})
    assert after == before
    assert [s["id"] for s in (await get_json(client, "/v1/sessions"))["sessions"]] == [sid]
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "qr"
