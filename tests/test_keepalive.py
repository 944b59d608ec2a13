"""Keep-alive and link health (issue 11 §4): real Chromium, the simulator's device TTL and its
admin clock, walink's injectable clock moved with it (no real waits of days)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.clock import Clock
from shared.errors import SettingsError
from shared.models import SessionStatus
from shared.settings import Settings
from simulator.keys import STATE
from tests.conftest import WAIT_S, Sim, WorkerFactory, link_id, manager_of

DAY_S = 86_400
TTL_S = 30 * DAY_S  # the strict profile's device_ttl_s


async def _jump(sim: Sim, client: TestClient[Any, Any], seconds: int) -> dict[str, Any]:
    """Move the simulator's clock and walink's together."""
    manager_of(client).clock.advance(seconds)
    return await sim.post("/admin/clock", {"advance_s": seconds})


async def _until(session: Any, status: SessionStatus, reason: str | None = None) -> None:
    async with asyncio.timeout(WAIT_S):
        while not (session.status == status and (reason is None or session.reason == reason)):
            await session.changed.wait()


async def _hibernate(sim: Sim, manager: Any, session: Any) -> None:
    """Hibernate the session and wait until its page's connection to the simulator is gone (a
    page still connected during a clock jump counts as used all along)."""
    await manager.hibernate(session)
    assert session.status == SessionStatus.HIBERNATED
    for _ in range(int(WAIT_S / 0.05)):
        if not (await sim.get("/admin/state"))["pending_polls"]:
            return
        await asyncio.sleep(0.05)  # another server's state: we can only look again
    raise AssertionError("the hibernated page never let go of its connection")


async def _metric(client: TestClient[Any, Any], name: str) -> float:
    resp = await client.get("/metrics")
    text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_keepalive_wakes_a_hibernated_session_before_the_device_ttl_and_it_stays_linked(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    assert (await sim.get("/admin/profile"))["device_ttl_s"] == TTL_S
    client = await start_worker(keepalive_s=7 * DAY_S, device_ttl_s=TTL_S, keepalive_check_s=3600.0)
    phone = "+15550110001"
    sid = await link_id(client, sim, phone)
    manager = manager_of(client)
    session = manager.get(sid)
    await _hibernate(sim, manager, session)

    # not due yet: nothing woken
    await _jump(sim, client, 3 * DAY_S)
    assert await manager.keep_alive_check() == 0
    before = (await sim.devices(phone))[0]["last_used_s"]

    # past keepalive_s: woken, its page connects (a use on the phone's side), hibernated again
    assert (await _jump(sim, client, 5 * DAY_S))["expired"] == 0
    assert await manager.keep_alive_check() == 1
    await _until(session, SessionStatus.HIBERNATED, "keepalive")
    assert session.slot is None
    after = (await sim.devices(phone))[0]["last_used_s"]
    assert after >= before + 5 * DAY_S, (before, after)
    assert await _metric(client, "walink_keepalive_wakes_total") >= 1

    # 33 days after the link (25 after the keep-alive's use): still linked on the phone
    assert (await _jump(sim, client, 25 * DAY_S))["expired"] == 0
    assert [d["device_index"] for d in await sim.devices(phone)] == [1]
    await manager.wake(session)
    await _until(session, SessionStatus.READY)


async def _committed(session: Any, type_: str) -> dict[str, Any]:
    """The data of the session's first committed ``type_`` event (waited for, bounded)."""
    for _ in range(int(WAIT_S / 0.05)):
        found = [e.data for e in session.events if e.type == type_]
        if found:
            return dict(found[0])
        await asyncio.sleep(0.05)  # committed by a background task: we can only look again
    raise AssertionError(f"no {type_} event was committed")


async def test_without_keepalive_an_unused_device_is_reported_at_risk_then_expired(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    client = await start_worker(keepalive_s=0.0, device_ttl_s=TTL_S, keepalive_check_s=3600.0)
    phone = "+15550110002"
    sid = await link_id(client, sim, phone)
    manager = manager_of(client)
    session = manager.get(sid)
    await _hibernate(sim, manager, session)
    # read in-process: an API request (an event stream too) would wake the session, a use
    expired_before = await _metric(client, "walink_devices_expired_total")
    at_risk_before = await _metric(client, "walink_sessions_at_risk_total")

    # 20 days unused (less than 80 % of the TTL): nothing to report
    await _jump(sim, client, 20 * DAY_S)
    assert await manager.keep_alive_check() == 0
    assert not [e for e in session.events if e.type == "session_at_risk"]

    # 25 days unused: more than 80 % of the TTL — reported once, not woken (keep-alive off)
    await _jump(sim, client, 5 * DAY_S)
    assert await manager.keep_alive_check() == 0
    at_risk = await _committed(session, "session_at_risk")
    assert at_risk["expires_at_ms"] - at_risk["last_used_at_ms"] == TTL_S * 1000
    assert await manager.keep_alive_check() == 0
    assert len([e for e in session.events if e.type == "session_at_risk"]) == 1
    assert await _metric(client, "walink_sessions_at_risk_total") == at_risk_before + 1
    assert session.status == SessionStatus.HIBERNATED

    # past the TTL: WhatsApp logs the device out; the next wake learns it from the page
    assert (await _jump(sim, client, 6 * DAY_S))["expired"] == 1
    assert await sim.devices(phone) == []
    await manager.wake(session)
    await _until(session, SessionStatus.LOGGED_OUT, "device_expired")
    gone = await _committed(session, "session_disconnected")
    assert gone["reason"] == "device_expired", gone
    assert await _metric(client, "walink_devices_expired_total") == expired_before + 1
    feed = await client.get(f"/v1/sessions/{sid}")
    assert (await feed.json())["reason"] == "device_expired"


def test_keepalive_settings_are_read_and_bad_ones_refused() -> None:
    s = Settings.from_env({"WALINK_KEEPALIVE_S": "0", "WALINK_DEVICE_TTL_S": "1209600"})
    assert (s.keepalive_s, s.device_ttl_s) == (0.0, 1_209_600.0)
    assert Settings().keepalive_s == 7 * DAY_S  # on by default, well inside the 14-day TTL's 80 %
    assert Settings().keepalive_s < 0.8 * Settings().device_ttl_s
    for env in (
        {"WALINK_KEEPALIVE_S": "-1"},
        {"WALINK_DEVICE_TTL_S": "-5"},
        {"WALINK_KEEPALIVE_CHECK_S": "0"},
    ):
        with pytest.raises(SettingsError, match="WALINK_KEEPALIVE"):
            Settings.from_env(env)


def test_the_clock_only_moves_ahead() -> None:
    clock = Clock()
    before = clock.now_s()
    clock.advance(DAY_S)
    assert clock.now_s() >= before + DAY_S
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_simulator_clock_expires_only_unused_devices_and_refuses_bad_jumps(sim: Sim) -> None:
    """No browser: a device linked through the state, its page never connected after the link."""
    for bad in ({"advance_s": -1}, {"advance_s": "1"}, {"advance_s": True}, {}, {"advance_s": 10**12}):
        data = await sim.post("/admin/clock", bad, expect=400)
        assert data["error"]["code"] == "invalid_request"
    assert (await sim.post("/admin/clock", {"advance_s": 0}))["offset_s"] == 0
    await sim.profile(device_ttl_s=100)
    state = sim.server.app[STATE]
    client, refs, texts = state.begin_batch("dev-expiry-01", "n", "i", "a", "web")
    state.commit_batch(client, refs, texts, [[[0]] for _ in refs])
    await sim.scan(texts[0], "+15550110003", expect=409)  # strict: the first scan refreshes the secret
    _, texts = state.refresh_adv("dev-expiry-01", "a2")
    await sim.scan(texts[0], "+15550110003")
    assert (await sim.post("/admin/clock", {"advance_s": 60}))["expired"] == 0
    assert state.settle("dev-expiry-01", "final")  # as the page does creds_settle_ms after the link
    assert state.login("dev-expiry-01", creds_digest="final")["linked"] is True  # a use: the TTL restarts
    assert (await sim.post("/admin/clock", {"advance_s": 90}))["expired"] == 0
    assert (await sim.post("/admin/clock", {"advance_s": 20}))["expired"] == 1
    assert await sim.devices("+15550110003") == []
    assert [e["reason"] for e in client.events if e["type"] == "logout"] == ["device_expired"]
    assert state.login("dev-expiry-01") == {
        "linked": False,
        "seq": client.seq,
        "logout_reason": "device_expired",
    }
    await sim.post("/admin/reset", {})
    assert (await sim.post("/admin/clock", {"advance_s": 0}))["offset_s"] == 0


async def test_keepalive_wakes_a_hibernated_session_only_postgres_knows_after_a_restart(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    """A restart does not load hibernated sessions into memory: the look finds them in Postgres."""
    settings: dict[str, Any] = {
        "worker_name": "worker-ka",
        "keepalive_s": 7 * DAY_S,
        "device_ttl_s": TTL_S,
        "keepalive_check_s": 3600.0,
    }
    first = await start_worker(**settings)
    phone = "+15550110004"
    sid = await link_id(first, sim, phone)
    await _hibernate(sim, manager_of(first), manager_of(first).get(sid))
    await first.close()

    client = await start_worker(**settings)
    manager = manager_of(client)
    assert manager.local(sid, None) is None  # not in memory: only Postgres knows it
    assert await manager.keep_alive_check() == 0  # not due: left alone, nothing taken over
    assert manager.local(sid, None) is None
    assert (await _jump(sim, client, 8 * DAY_S))["expired"] == 0
    assert await manager.keep_alive_check() == 1
    session = manager.get(sid)
    await _until(session, SessionStatus.HIBERNATED, "keepalive")
    assert (await _jump(sim, client, 25 * DAY_S))["expired"] == 0
    assert [d["device_index"] for d in await sim.devices(phone)] == [1]
