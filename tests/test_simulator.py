"""The WhatsApp Web simulator, driven by a real Chromium through a route of https://web.whatsapp.com/**."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import zxingcpp
from PIL import Image, ImageOps
from playwright.async_api import BrowserContext, Error, Frame, Page, Playwright
from pytest_aiohttp import AiohttpServer

from simulator.app import create_app
from tests.browser import ARGS, ORIGIN, forward_to, launch
from tests.conftest import CHROMIUM
from tests.webauthn import new_private_key, virtual_authenticator

pytestmark = pytest.mark.chromium

PHONE = "15551234567"
CODE_RE = re.compile(r"[123456789ABCDEFGHJKLMNPQRSTVWXYZ]{8}")
QR_SEL = "div[data-ref] canvas"
MAIN_SEL = "#pane-side"

QR_FROM_MODULES = """async () => {
  const r = window.require;
  const noise = await r('WAWebUserPrefsInfoStore').waNoiseInfo.get();
  const reg = await r('WAWebSignalStoreApi').waSignalStore.getRegistrationInfo();
  const b64 = r('WABase64');
  return [
    r('WAWebConnModel').Conn.ref,
    b64.encodeB64(noise.staticKeyPair.pubKey),
    b64.encodeB64(reg.identityKeyPair.pubKey),
    await r('WAWebAdvSignatureApi').getADVSecretKey(),
    r('WAWebCompanionRegClientUtils').DEVICE_PLATFORM,
  ].join(',');
}"""
SOCKET_STATE = "() => window.require('WAWebSocketModel').Socket.state"
# whatsapp-web.js requestPairingCode
REQUEST_CODE = """async (phone) => {
  const alt = window.require('WAWebAltDeviceLinkingApi');
  alt.setPairingType('ALT_DEVICE_LINKING');
  await alt.initializeAltDeviceLinking();
  return await alt.startAltLinkingFlow(phone, true);
}"""
HAS_SYNCED = "() => window.require('WAWebSocketModel').Socket.hasSynced === true"
ME_USER = "() => window.require('WAWebUserPrefsMeUser').getMaybeMePnUser()?.user ?? null"
LAST_WID = "() => localStorage.getItem('last-wid-md')"
# Records every data-ref value and the elements carrying it, from the first byte of each document.
WATCH_QR = """(() => {
  window.__refs = []; window.__refEls = []; window.__sawQr = false;
  new MutationObserver((muts) => {
    for (const m of muts) {
      if (m.type === 'childList' && document.querySelector('[data-ref]')) window.__sawQr = true;
      if (m.type !== 'attributes') continue;
      const v = m.target.getAttribute('data-ref');
      if (!v) continue;
      window.__sawQr = true;
      if (window.__refs[window.__refs.length - 1] !== v) window.__refs.push(v);
      if (!window.__refEls.includes(m.target)) window.__refEls.push(m.target);
    }
  }).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-ref']});
})();"""


@dataclass
class Sim:
    base: str
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        async with self.http.request(method, self.base + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, body)
        assert status == 200, (path, status, data)
        return data

    async def devices(self, phone: str = PHONE) -> list[dict[str, Any]]:
        data = await self.ok("GET", f"/phone/devices?phone={phone}")
        devices: list[dict[str, Any]] = data["devices"]
        return devices


@pytest.fixture
async def sim(aiohttp_server: AiohttpServer) -> AsyncIterator[Sim]:
    server = await aiohttp_server(create_app("instant"))
    async with aiohttp.ClientSession() as http:
        yield Sim(str(server.make_url("")).rstrip("/"), http)


@asynccontextmanager
async def persistent(
    pw: Playwright, sim: Sim, profile_dir: Path
) -> AsyncIterator[tuple[BrowserContext, Page]]:
    ctx = await launch(pw, profile_dir, service_workers="block")
    try:
        await ctx.add_init_script(WATCH_QR)
        await ctx.route(f"{ORIGIN}/**", forward_to(sim.base))
        page = ctx.pages[0] if ctx.pages else await ctx.new_page()
        yield ctx, page
    finally:
        with suppress(Error):
            await ctx.unroute_all(behavior="ignoreErrors")
        await ctx.close()


async def open_qr(page: Page) -> str:
    """Load WhatsApp Web and return the QR's full string once the canvas shows it."""
    if not page.url.startswith(ORIGIN):
        await page.goto(f"{ORIGIN}/")
    return await current_qr(page)


async def current_qr(page: Page) -> str:
    await page.wait_for_selector(QR_SEL)
    handle = await page.wait_for_function(
        "() => document.querySelector('div[data-ref]')?.getAttribute('data-ref') || null"
    )
    value = await handle.json_value()
    assert isinstance(value, str)
    return value


async def link(sim: Sim, page: Page, phone: str = PHONE, push_name: str | None = "Alice") -> str:
    qr = await open_qr(page)
    body = {"qr": qr, "phone": phone} | ({"push_name": push_name} if push_name else {})
    data = await sim.ok("POST", "/phone/scan", body)
    await page.wait_for_selector(MAIN_SEL)
    await page.wait_for_function(HAS_SYNCED)
    device_id: str = data["device_id"]
    return device_id


async def fake_page(sim: Sim, n: int) -> dict[str, Any]:
    """A pair-device call as wa.js makes it, without a browser."""
    body = {
        "device_id": f"{n:032x}",
        "noise_pub": "bm9pc2U=",
        "identity_pub": "aWRlbnRpdHk=",
        "adv_secret": "YWR2",
        "platform": "1",
    }
    batch: dict[str, Any] = await sim.ok("POST", "/sim/api/pair-device", body)
    return batch


# ------------------------------------------------------------------------------------------------ tests
async def test_qr_canvas_decodes_to_data_ref_and_module_string(
    sim: Sim, pw: Playwright, tmp_path: Path
) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        data_ref = await open_qr(page)
        assert await page.title() == "WhatsApp Web"
        assert await page.evaluate("() => typeof window.Debug.VERSION") == "string"
        assert await page.evaluate("() => window.Store === undefined")
        assert await page.evaluate(SOCKET_STATE) == "UNPAIRED"
        with pytest.raises(Error, match='Requiring unknown module "WAWebNope"'):
            await page.evaluate("() => window.require('WAWebNope')")
        canvas = page.locator('canvas[aria-label="Scan this QR code to link a device!"][role="img"]')
        assert await canvas.get_attribute("width") == "228"
        assert await canvas.get_attribute("height") == "228"
        assert await page.locator("div[data-ref]").get_attribute("title") is None

        png = await canvas.screenshot()
        image = ImageOps.expand(Image.open(io.BytesIO(png)).convert("L"), border=40, fill=255)
        decoded = [result.text for result in zxingcpp.read_barcodes(image)]
        assert decoded == [data_ref]
        assert await page.evaluate(QR_FROM_MODULES) == data_ref
        parts = data_ref.split(",")
        assert len(parts) == 5
        assert parts[0].startswith("2@")
        assert parts[4] == "1"


async def test_refs_rotate_in_place_then_reload(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    await sim.ok("POST", "/admin/profile", {"qr_first_ms": 300, "qr_next_ms": 200})
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await open_qr(page)
        button = page.locator("div[data-ref] button", has_text="Click to reload QR code")
        await button.wait_for()
        refs: list[str] = await page.evaluate("() => window.__refs")
        assert len(refs) == 6
        assert len(set(refs)) == 6
        assert await page.evaluate("() => window.__refEls.length") == 1
        assert await page.evaluate(SOCKET_STATE) == "UNPAIRED_IDLE"
        assert await page.locator(QR_SEL).evaluate("c => c.style.opacity") == "0.04"

        await button.click()
        await page.wait_for_function(
            "last => window.require('WAWebSocketModel').Socket.state === 'UNPAIRED'"
            " && document.querySelector('div[data-ref]').getAttribute('data-ref') !== last",
            arg=refs[-1],
        )
        for old in (refs[0], refs[-1]):
            status, data = await sim.call("POST", "/phone/scan", {"qr": old, "phone": PHONE})
            assert (status, data["error"]["code"]) == (410, "qr_expired")


async def test_scan_links_and_exposes_phone(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await page.goto(f"{ORIGIN}/")
        await page.wait_for_function("() => window.Debug?.VERSION")
        await page.evaluate(
            """() => {
              window.__synced = [];
              const { Socket } = window.require('WAWebSocketModel');
              Socket.on('change:hasSynced', (model, value) => window.__synced.push(value));
            }"""
        )
        device_id = await link(sim, page)
        assert await page.locator(MAIN_SEL).is_visible()
        assert await page.locator('#side span[data-icon="search"]').count() == 1
        assert await page.get_attribute(MAIN_SEL, "aria-label") == "Chat list"
        assert await page.evaluate(ME_USER) == PHONE
        assert await page.evaluate(LAST_WID) == json.dumps(f"{PHONE}:1@c.us")
        assert await page.evaluate("() => window.__synced") == [True]
        conn = await page.evaluate("() => window.require('WAWebConnModel').Conn.serialize()")
        assert conn["pushname"] == "Alice"
        assert conn["platform"] == "android"
        assert conn["wid"]["_serialized"] == f"{PHONE}@c.us"
        assert await page.evaluate(SOCKET_STATE) == "CONNECTED"
        devices = await sim.devices()
        assert [(d["device_id"], d["device_index"], d["push_name"]) for d in devices] == [
            (device_id, 1, "Alice")
        ]


async def test_persistent_profile_restores_login(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    profile = tmp_path / "p"
    async with persistent(pw, sim, profile) as (_ctx, page):
        await link(sim, page)
    async with persistent(pw, sim, profile) as (_ctx, page):
        await page.goto(f"{ORIGIN}/")
        await page.wait_for_selector(MAIN_SEL)
        await page.wait_for_function(HAS_SYNCED)
        assert await page.evaluate(ME_USER) == PHONE
        assert await page.evaluate("() => window.__sawQr") is False
        assert await page.locator("div[data-ref]").count() == 0
        assert "post_logout" not in page.url


async def test_storage_state_copy_does_not_restore_login(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (ctx, page):
        await link(sim, page)
        state = await ctx.storage_state(indexed_db=True)
    origin_state = next(o for o in state["origins"] if o["origin"] == ORIGIN)
    keys = {item["name"] for item in origin_state["localStorage"]}
    assert {"WANoiseInfo", "WebEncKeySalt", "last-wid-md"} <= keys
    databases = cast(list[dict[str, Any]], origin_state.get("indexedDB", []))
    assert any(db["name"] == "wawc_db_enc" for db in databases)

    browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
    try:
        ctx2 = await browser.new_context(storage_state=state, service_workers="block")
        await ctx2.route(f"{ORIGIN}/**", forward_to(sim.base))
        page2 = await ctx2.new_page()
        async with page2.expect_event(
            "framenavigated", predicate=lambda f: "logout_reason=0" in f.url
        ) as navigated:
            await page2.goto(f"{ORIGIN}/")
        assert "post_logout=1" in (await navigated.value).url
        await current_qr(page2)
        assert await page2.evaluate(LAST_WID) is None
        banner = page2.get_by_text("A database error occurred on your browser. Please relink your device.")
        assert await banner.is_visible()
        await ctx2.unroute_all(behavior="ignoreErrors")
    finally:
        await browser.close()
    assert len(await sim.devices()) == 1  # the copy did not touch the original link


async def test_phone_logout_navigates_to_post_logout(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await link(sim, page)
        await page.evaluate(
            "() => { window.__cmdLogout = 0;"
            " window.require('WAWebCmd').Cmd.on('logout', () => window.__cmdLogout++); }"
        )

        def is_post_logout(frame: Frame) -> bool:
            return frame == page.main_frame and "post_logout=1" in frame.url

        async with page.expect_event("framenavigated", predicate=is_post_logout) as navigated:
            assert await sim.ok("POST", "/phone/logout", {"phone": PHONE}) == {"logged_out": 1}
        assert "logout_reason=user_initiated" in (await navigated.value).url
        await current_qr(page)
        assert await page.evaluate("() => location.search") == ""
        assert await page.evaluate(LAST_WID) is None
        assert await page.evaluate(SOCKET_STATE) == "UNPAIRED"
        assert await sim.devices() == []


async def test_pairing_code_links(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await open_qr(page)
        code = await page.evaluate(REQUEST_CODE, PHONE)
        assert isinstance(code, str)
        assert CODE_RE.fullmatch(code)
        cells = page.locator('div[data-testid="link-with-phone-number-code-cells"]')
        await cells.wait_for()
        assert await cells.get_attribute("data-link-code") == ",".join(code)
        assert await cells.get_attribute("aria-label") == "Enter code on phone:"
        assert await cells.locator(".code-cell").count() == 8
        assert await page.get_by_text("Enter code on phone", exact=True).is_visible()
        assert await page.get_by_text("Log in with QR code").is_visible()

        status, data = await sim.call("POST", "/phone/pair", {"code": code, "phone": "15550000000"})
        assert (status, data["error"]["code"]) == (409, "phone_mismatch")
        dashed = f"{code[:4]}-{code[4:]}".lower()
        await sim.ok("POST", "/phone/pair", {"code": dashed, "phone": f"+{PHONE}"})
        await page.wait_for_selector(MAIN_SEL)
        await page.wait_for_function(HAS_SYNCED)
        assert await page.evaluate(ME_USER) == PHONE
        assert [d["push_name"] for d in await sim.devices()] == ["User 4567"]


async def _register_passkey(sim: Sim) -> dict[str, Any]:
    await sim.ok("POST", "/admin/profile", {"passkey": True})
    status, reg = await sim.call("POST", "/phone/passkey", {"phone": PHONE})
    assert status == 201, reg
    assert set(reg) >= {"credential_id", "public_key", "private_key", "user_handle"}
    return cast(dict[str, Any], reg)


async def test_passkey_account_links_on_a_valid_assertion(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    reg = await _register_passkey(sim)
    async with persistent(pw, sim, tmp_path / "p") as (ctx, page):
        await virtual_authenticator(ctx, page, reg["credential_id"], reg["private_key"])
        qr = await open_qr(page)
        assert (await sim.ok("POST", "/phone/scan", {"qr": qr, "phone": PHONE}))["passkey"] is True
        await page.wait_for_selector(MAIN_SEL)
        assert await page.evaluate(ME_USER) == PHONE
        assert [d["push_name"] for d in await sim.devices()] == ["User 4567"]


async def test_passkey_account_with_a_wrong_key_is_not_linked(
    sim: Sim, pw: Playwright, tmp_path: Path
) -> None:
    reg = await _register_passkey(sim)
    async with persistent(pw, sim, tmp_path / "p") as (ctx, page):
        await virtual_authenticator(ctx, page, reg["credential_id"], new_private_key())
        qr = await open_qr(page)
        refused = "logout_reason=passkey_invalid"
        async with page.expect_event("framenavigated", lambda frame: refused in frame.url):
            await sim.ok("POST", "/phone/scan", {"qr": qr, "phone": PHONE})
        assert await sim.devices() == []


async def test_failed_link_logs_out_with_reason_1(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    await sim.ok("POST", "/admin/profile", {"fail_rate": 1.0})
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        qr = await open_qr(page)
        async with page.expect_event("framenavigated", predicate=lambda f: "logout_reason=1" in f.url):
            await sim.ok("POST", "/phone/scan", {"qr": qr, "phone": PHONE})
        await current_qr(page)
        banner = "Your device could not link due to a sync issue. Please relink your device."
        assert await page.get_by_text(banner).is_visible()
        assert await sim.devices() == []


async def test_conflict_and_takeover(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await link(sim, page)
        assert await sim.ok("POST", "/phone/conflict", {"phone": PHONE}) == {"conflicted": 1}
        await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'CONFLICT'")
        await page.get_by_text("WhatsApp is open on another computer or browser.").wait_for()
        assert await page.get_by_role("button", name="Log out").is_visible()
        await page.get_by_role("button", name="Use Here").click()
        await page.wait_for_function(f"() => ({SOCKET_STATE})() === 'CONNECTED'")
        await page.wait_for_selector(MAIN_SEL)


async def test_device_limit_and_bad_input(sim: Sim) -> None:
    batches = [await fake_page(sim, n) for n in range(1, 6)]
    poll = asyncio.create_task(sim.call("GET", f"/sim/api/poll?device_id={1:032x}&after=0"))
    for batch in batches[:4]:
        await sim.ok("POST", "/phone/scan", {"qr": batch["qrs"][0]["text"], "phone": f"+{PHONE}"})
    status, events = await poll
    assert status == 200
    assert events["events"][0]["type"] == "paired"
    assert events["events"][0]["device_index"] == 1
    devices = await sim.devices()
    assert [d["device_index"] for d in devices] == [1, 2, 3, 4]
    before = await sim.ok("GET", "/admin/state")
    assert before["linked_devices"] == 4

    fifth = batches[4]["qrs"][0]["text"]
    bad: list[tuple[str, Any, bytes | None, int, str]] = [
        ("/phone/scan", {"qr": fifth, "phone": PHONE}, None, 409, "too_many_devices"),
        ("/phone/scan", {"qr": batches[0]["qrs"][0]["text"], "phone": PHONE}, None, 409, "already_linked"),
        ("/phone/scan", None, b"{not json", 400, "invalid_json"),
        ("/phone/scan", None, b'{"qr": "' + b"x" * 70_000 + b'"}', 413, "body_too_large"),
        ("/phone/scan", {"qr": fifth, "phone": "12-34"}, None, 400, "invalid_phone"),
        ("/phone/scan", {"qr": fifth}, None, 400, "invalid_request"),
        ("/phone/scan", [fifth], None, 400, "invalid_request"),
        ("/phone/scan", {"qr": "2@nope,a,b,c,1", "phone": "15550001111"}, None, 404, "unknown_qr"),
        (
            "/phone/scan",
            {"qr": batches[4]["qrs"][1]["text"], "phone": "15550001111"},
            None,
            410,
            "qr_expired",
        ),
        ("/phone/pair", {"code": "ABCD-EFGH", "phone": PHONE}, None, 404, "unknown_code"),
        ("/phone/logout", {"phone": "15550001111"}, None, 404, "not_linked"),
        ("/admin/profile", {"bogus_ms": 1}, None, 400, "invalid_request"),
        ("/admin/profile", {"fail_rate": 2}, None, 400, "invalid_request"),
    ]
    for path, body, raw, want_status, want_code in bad:
        status, data = await sim.call("POST", path, body, raw=raw)
        assert (status, data["error"]["code"]) == (want_status, want_code), path
        assert isinstance(data["error"]["message"], str)
    assert await sim.ok("GET", "/admin/state") == before
    assert [d["device_index"] for d in await sim.devices()] == [1, 2, 3, 4]
    assert (await sim.ok("GET", "/admin/profile"))["name"] == "instant"

    # the wa.me prefix and the 4-part (wa-js) form are accepted
    other = await fake_page(sim, 6)
    text = other["qrs"][0]["text"]
    four_parts = ",".join(text.split(",")[:4])
    await sim.ok(
        "POST",
        "/phone/scan",
        {"qr": "https://wa.me/settings/linked_devices#" + four_parts, "phone": "44" * 4},
    )

    async with sim.http.options(
        sim.base + "/phone/scan",
        headers={"Origin": "http://localhost:9", "Access-Control-Request-Method": "POST"},
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
    async with sim.http.get(sim.base + "/phone/devices?phone=123") as resp:
        assert resp.status == 400
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_me_module_off_leaves_localstorage_fallback(sim: Sim, pw: Playwright, tmp_path: Path) -> None:
    await sim.ok("POST", "/admin/profile", {"me_module": False})
    async with persistent(pw, sim, tmp_path / "p") as (_ctx, page):
        await link(sim, page)
        assert await page.evaluate("() => window.require('WAWebUserPrefsMeUser').getMaybeMePnUser()") is None
        raw = await page.evaluate(LAST_WID)
        assert isinstance(raw, str)
        assert json.loads(raw).split(":")[0] == PHONE
