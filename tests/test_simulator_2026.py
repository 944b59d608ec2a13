"""The simulator's 2026 behaviours (docs/whatsapp-web-2026.md), each seen from a real Chromium.

These check the *simulator*: that it is at least as strict as the real page in each way the issue
names. The worker's handling of the same behaviours is tested in ``test_worker_fidelity.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.async_api import Error, Page, Playwright

from simulator.profiles import PROFILES
from tests.browser import ORIGIN
from tests.test_simulator import (
    MAIN_SEL,
    PHONE,
    REQUEST_CODE,
    SOCKET_STATE,
    Sim,
    current_qr,
    open_qr,
    persistent,
)
from tests.test_simulator import sim as sim  # the fixture of the simulator's own tests

pytestmark = pytest.mark.chromium


def has_module(name: str) -> str:
    return f"() => {{ try {{ return !!window.require('{name}'); }} catch (e) {{ return false; }} }}"


def state_is(state: str) -> str:
    return f"() => {{ try {{ return ({SOCKET_STATE})() === '{state}'; }} catch (e) {{ return false; }} }}"


DATA_REF = "() => document.querySelector('div[data-ref]')?.getAttribute('data-ref') || null"
# Every Conn change:ref, every advSecretEventEmitter change, and the me users at CONNECTED.
RECORD = """() => {
  window.__rec = {refs: [], adv: 0, atConnected: null, wids: [], mainLoaded: 0, synced: []};
  const r = window.require;
  const {Conn} = r('WAWebConnModel');
  const {Socket} = r('WAWebSocketModel');
  Conn.on('change:ref', (_m, ref) => window.__rec.refs.push(ref));
  Conn.on('change:wid', (_m, wid) => window.__rec.wids.push(String(wid)));
  r('WAWebCmd').Cmd.on('main_loaded', () => window.__rec.mainLoaded++);
  Socket.on('change:hasSynced', (_m, v) => window.__rec.synced.push(v));
  Socket.on('change:state', (_m, state) => {
    if (state !== 'CONNECTED' || window.__rec.atConnected) return;
    const me = r('WAWebUserPrefsMeUser');
    window.__rec.atConnected = {
      pn: me.getMaybeMePnUser() ? String(me.getMaybeMePnUser()) : null,
      lid: me.getMaybeMeLidUser() ? String(me.getMaybeMeLidUser()) : null,
      wid: Conn.wid ? String(Conn.wid) : null,
    };
  });
  r('WAWebUserPrefsMultiDevice').advSecretEventEmitter.on('change', () => window.__rec.adv++);
}"""


async def boot_recording(page: Page) -> str:
    qr = await open_qr(page)
    await page.wait_for_function(has_module("WAWebUserPrefsMultiDevice"))
    await page.evaluate(RECORD)
    return qr


async def test_profiles_strict_and_realistic_turn_every_behaviour_on(sim: Sim) -> None:
    strict = await sim.ok("POST", "/admin/profile", {"name": "strict"})
    assert strict["adv_refresh"] == "first_scan"
    assert strict["sync_signal"] == "never"
    assert strict["lid"] is True and strict["me_pn_delay_ms"] > 0 and strict["lazy_modules_ms"] > 0
    assert strict["conflict"] == "strict"
    realistic = PROFILES["realistic"].to_dict()
    assert realistic["load_ms"] == [3000, 5000] and realistic["pairing_ms"] == [500, 1500]
    assert realistic["sync_ms"] == [10_000, 60_000] and realistic["heap_mb"] >= 150
    for key in ("adv_refresh", "sync_signal", "lid", "conflict"):
        assert realistic[key] == strict[key]
    for bad in ({"adv_refresh": "sometimes"}, {"sync_ms": [5, 1]}, {"conflict": True}, {"lid": 1}):
        status, data = await sim.call("POST", "/admin/profile", bad)
        assert (status, data["error"]["code"]) == (400, "invalid_request"), bad
    status, data = await sim.call("POST", "/admin/socket-state", {"phone": PHONE, "state": "NOPE"})
    assert (status, data["error"]["code"]) == (400, "invalid_request")


async def test_first_scan_refreshes_the_adv_secret_under_the_same_ref(
    sim: Sim, pw: Playwright, tmp_path: Path
) -> None:
    await sim.ok("POST", "/admin/profile", {"adv_refresh": "first_scan"})
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        first = await boot_recording(page)
        status, data = await sim.call("POST", "/phone/scan", {"qr": first, "phone": PHONE})
        assert (status, data["error"]["code"]) == (409, "couldnt_link_device")
        handle = await page.wait_for_function(f"old => ({DATA_REF})() !== old && ({DATA_REF})()", arg=first)
        second = await handle.json_value()
        assert second.split(",")[0] == first.split(",")[0]  # the same ref
        assert second.split(",")[3] != first.split(",")[3]  # a new ADV secret
        rec = await page.evaluate("() => window.__rec")
        assert rec["refs"] == [] and rec["adv"] == 1  # no change:ref, one advSecret change
        status, data = await sim.call("POST", "/phone/scan", {"qr": first, "phone": PHONE})
        assert (status, data["error"]["code"]) == (409, "couldnt_link_device")  # the retired secret
        await sim.ok("POST", "/phone/scan", {"qr": second, "phone": PHONE})
        await page.wait_for_selector(MAIN_SEL)


async def test_timer_refresh_lid_first_late_phone_and_no_sync(
    sim: Sim, pw: Playwright, tmp_path: Path
) -> None:
    await sim.ok(
        "POST",
        "/admin/profile",
        {
            "adv_refresh": "timer",
            "adv_refresh_ms": 200,
            "lid": True,
            "me_pn_delay_ms": 300,
            "sync_signal": "never",
        },
    )
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await boot_recording(page)
        # every data-ref value since the first byte (WATCH_QR): the refresh may come before we look
        await page.wait_for_function("() => window.__refs.length >= 2")
        first, refreshed = (await page.evaluate("() => window.__refs"))[:2]
        assert refreshed.split(",")[0] == first.split(",")[0]  # the same ref
        assert refreshed.split(",")[3] != first.split(",")[3]  # a new ADV secret
        await sim.ok("POST", "/phone/scan", {"qr": await current_qr(page), "phone": PHONE})
        await page.wait_for_function("() => window.__rec.mainLoaded > 0 && window.__rec.wids.length >= 2")
        rec = await page.evaluate("() => window.__rec")
        assert rec["atConnected"]["pn"] is None  # the phone number is not known at pairing success
        assert rec["atConnected"]["lid"].endswith("@lid")
        assert rec["atConnected"]["wid"].endswith("@lid")
        assert rec["wids"][-1] == f"{PHONE}@c.us"
        assert await page.evaluate("() => window.require('WAWebStreamModel').Stream.mode") == "MAIN"
        assert rec["synced"] == []  # hasSynced never came
        assert await page.evaluate("() => window.require('WAWebSocketModel').Socket.hasSynced") is False


async def test_lazy_modules_no_cmd_refresh_and_alt_linking(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    await sim.ok("POST", "/admin/profile", {"lazy_modules_ms": 1500})
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await page.goto(f"{ORIGIN}/")
        await page.wait_for_function("() => window.Debug?.VERSION")
        with pytest.raises(Error, match='Requiring unknown module "WAWebAltDeviceLinkingApi"'):
            await page.evaluate("() => window.require('WAWebAltDeviceLinkingApi')")
        first = await current_qr(page)  # the QR does not wait for the modules
        await page.wait_for_function(has_module("WAWebAltDeviceLinkingApi"))
        assert await page.evaluate("() => typeof window.require('WAWebCmd').Cmd.refreshQR") == "undefined"
        code = await page.evaluate(REQUEST_CODE, PHONE)
        assert len(code) == 8
        assert await page.evaluate("() => window.require('WAWebAdvSignatureApi').getADVSecretKey()") is None
        assert await page.evaluate(DATA_REF) is None
        # back to the QR: initializeQRLinking alone brings no refs; refreshQR() brings them
        await page.evaluate("() => window.require('WAWebAltDeviceLinkingApi').initializeQRLinking()")
        await page.wait_for_selector("[data-testid=qr-spinner]")
        assert await page.evaluate(DATA_REF) is None
        await page.evaluate("() => window.require('WAWebLaunchSocketUtils').refreshQR()")
        back = await current_qr(page)
        assert back != first and not back.endswith(",null")
        await sim.ok("POST", "/phone/scan", {"qr": back, "phone": PHONE})
        await page.wait_for_selector(MAIN_SEL)


async def test_one_live_connection_per_device(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    await sim.ok("POST", "/admin/profile", {"conflict": "strict"})
    async with persistent(pw, sim, tmp_path / "a") as (_ctx, page):
        await sim.ok("POST", "/phone/scan", {"qr": await open_qr(page), "phone": PHONE})
        await page.wait_for_selector(MAIN_SEL)
    # the same credentials in two browsers (as two workers restoring one snapshot would)
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("Singleton*"))
    async with persistent(pw, sim, tmp_path / "a") as (_ctx, page):
        await page.goto(f"{ORIGIN}/")
        await page.wait_for_selector(MAIN_SEL)
        async with persistent(pw, sim, tmp_path / "b") as (_ctx2, page2):
            await page2.goto(f"{ORIGIN}/")
            await page2.wait_for_selector(MAIN_SEL)
            await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'CONFLICT'")
            assert await page2.evaluate(SOCKET_STATE) == "CONNECTED"
            await page.get_by_role("button", name="Use Here").click()
            await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'CONNECTED'")
            await page2.wait_for_function(f"() => ({SOCKET_STATE})() === 'CONFLICT'")
    assert len(await sim.devices()) == 1


async def test_forced_socket_states(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await sim.ok("POST", "/phone/scan", {"qr": await open_qr(page), "phone": PHONE})
        await page.wait_for_selector(MAIN_SEL)
        await page.evaluate(
            "() => { window.__states = []; window.require('WAWebSocketModel').Socket"
            ".on('change:state', (_m, s) => window.__states.push(s)); }"
        )
        await sim.ok("POST", "/admin/socket-state", {"phone": PHONE, "state": "TIMEOUT", "duration_ms": 100})
        await page.wait_for_function("() => window.__states.join() === 'TIMEOUT,CONNECTED'")
        body = {"phone": PHONE, "state": "DEPRECATED_VERSION", "sticky": True}
        assert await sim.ok("POST", "/admin/socket-state", body) == {"forced": 1}
        await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'DEPRECATED_VERSION'")
        await page.reload()  # a sticky state comes back on every boot
        await page.wait_for_function(state_is("DEPRECATED_VERSION"))
        await sim.ok("POST", "/admin/socket-state", {"phone": PHONE, "state": "TOS_BLOCK"})
        await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'TOS_BLOCK'")
