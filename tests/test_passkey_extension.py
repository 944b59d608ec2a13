"""The user's side of passkey linking: the browser extension (``extension/``) in full Chromium
with a virtual authenticator (CDP WebAuthn domain) that holds the account's passkey. Passkey
account → QR scan → the user opens the passkey link → the extension signs → ``ready`` with the
phone; and a passkey WhatsApp refuses ends the link ``failed`` with its reason."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, Playwright, Route

from shared import passkeys as wire
from tests.browser import ARGS
from tests.conftest import Sim, WorkerFactory, get_json
from tests.test_passkey import PHONE, until_passkey
from tests.webauthn import new_private_key, virtual_authenticator

pytestmark = pytest.mark.chromium

FULL_CHROMIUM = Path("/usr/lib/chromium/chromium")  # the binary (extensions need the full browser)
EXTENSION = Path(__file__).resolve().parent.parent / "extension"
WHATSAPP_PAGE = (
    b"<!doctype html><html><head><title>WhatsApp</title></head><body><div id=app></div></body></html>"
)


async def _whatsapp(route: Route) -> None:
    """The user's browser: a minimal page stands in for web.whatsapp.com (no internet here)."""
    await route.fulfill(status=200, content_type="text/html", body=WHATSAPP_PAGE)


@asynccontextmanager
async def user_browser(pw: Playwright, tmp_path: Path, walink_origin: str) -> AsyncIterator[BrowserContext]:
    """Full Chromium (new headless), the extension loaded, allowed to talk to ``walink_origin``."""
    ext = tmp_path / "extension"
    shutil.copytree(EXTENSION, ext)
    (ext / "config.js").write_text(f'self.WALINK_ALLOWED_ORIGINS = ["{walink_origin}"];\n')
    context = await pw.chromium.launch_persistent_context(
        user_data_dir=str(tmp_path / "user-profile"),
        executable_path=str(FULL_CHROMIUM),
        headless=True,
        args=[*ARGS, f"--disable-extensions-except={ext}", f"--load-extension={ext}"],
        ignore_default_args=["--disable-extensions"],
    )
    try:
        await context.route(wire.WHATSAPP_ORIGIN + "/**", _whatsapp)
        yield context
    finally:
        await context.close()


async def _with_authenticator(context: BrowserContext, reg: dict[str, Any], private_key: str) -> Page:
    page = context.pages[0] if context.pages else await context.new_page()
    await virtual_authenticator(context, page, reg["credential_id"], private_key)
    return page


async def _open_link(page: Page, link: str) -> tuple[str | None, str]:
    """The user opens the passkey link: the extension's verdict (its banner's state and text)."""
    await page.goto(link)
    banner = page.locator('[data-walink-passkey="done"], [data-walink-passkey="failed"]')
    await banner.wait_for()
    return await banner.get_attribute("data-walink-passkey"), await banner.inner_text()


async def test_extension_signs_and_the_session_is_ready(
    sim: Sim, start_worker: WorkerFactory, pw: Playwright, tmp_path: Path
) -> None:
    client = await start_worker()
    walink = str(client.make_url("")).rstrip("/")
    sid, stream, prompt, reg = await until_passkey(client, sim)
    async with user_browser(pw, tmp_path, walink) as context:
        page = await _with_authenticator(context, reg, reg["private_key"])
        state, text = await _open_link(page, wire.link(walink, prompt["passkey_token"]))
        assert state == "done", text
        assert wire.LINK_FRAGMENT not in page.url  # the link is taken off the address bar
    ready = await stream.until("session_ready")
    assert ready["phone_number"] == PHONE
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "ready"
    stream.close()


async def test_extension_with_a_wrong_passkey_fails_the_link(
    sim: Sim, start_worker: WorkerFactory, pw: Playwright, tmp_path: Path
) -> None:
    client = await start_worker()
    walink = str(client.make_url("")).rstrip("/")
    _sid, stream, prompt, reg = await until_passkey(client, sim)
    async with user_browser(pw, tmp_path, walink) as context:
        # the authenticator holds the registered credential id with another key
        page = await _with_authenticator(context, reg, new_private_key())
        state, text = await _open_link(page, wire.link(walink, prompt["passkey_token"]))
        assert state == "failed"
        assert "passkey_invalid" in text
    failed = await stream.until("session_failed")
    assert failed["reason"] == "passkey_invalid"
    stream.close()


async def test_extension_refuses_a_link_to_another_server(
    sim: Sim, start_worker: WorkerFactory, pw: Playwright, tmp_path: Path
) -> None:
    client = await start_worker()
    walink = str(client.make_url("")).rstrip("/")
    sid, stream, prompt, reg = await until_passkey(client, sim)
    async with user_browser(pw, tmp_path, walink) as context:
        page = await _with_authenticator(context, reg, reg["private_key"])
        state, text = await _open_link(page, wire.link("http://127.0.0.1:9", prompt["passkey_token"]))
        assert state == "failed"
        assert "not an allowed service" in text
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "passkey_required"
    stream.close()
