"""The WhatsApp Web version cache: capture → pin → deprecated → re-capture (real Chromium, the real
simulator serving several builds), the remote template, and the cache's units."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared import metrics
from shared.errors import SettingsError
from shared.settings import Settings
from simulator.builds import FIRST_BUILD
from simulator.keys import BUILDS
from tests.conftest import Sim, WorkerFactory, create, events, get_json, link_id, manager_of
from worker import whatsapp_web as wa
from worker.web_cache import WebCache

NEW_BUILD = "2.3000.1040000001"
OLD_BUILD = "2.3000.1020000002"
PHONE = "14155550177"
DEBUG_VERSION = "() => window.Debug && window.Debug.VERSION"


def shell_of(version: str) -> bytes:
    return (
        b'<!DOCTYPE html>\n<html><head><link rel="stylesheet" href="/rsrc/'
        + version.encode()
        + b'/wa.css"></head><body></body></html>'
    )


def web_version(health: dict[str, Any]) -> dict[str, Any]:
    served: dict[str, Any] = health["web_version"]
    return served


# ----- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["../../etc/passwd", "2.3000", "latest2", "2.3000.1/x", "2.3000.1-UPPER", ""]
)
def test_bad_wa_version_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="WALINK_WA_VERSION"):
        Settings.from_env({"WALINK_WA_VERSION": value})


@pytest.mark.parametrize("value", ["https://example.com/html/latest.html", "file:///x/{version}.html"])
def test_bad_wa_version_url_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="WALINK_WA_VERSION_URL"):
        Settings.from_env({"WALINK_WA_VERSION_URL": value})


def test_wa_version_settings() -> None:
    assert Settings.from_env({}).wa_version == "latest"
    settings = Settings.from_env(
        {
            "WALINK_WA_VERSION": "2.3000.1014522270-alpha",
            "WALINK_WA_VERSION_URL": "https://example.com/html/{version}.html",
        }
    )
    assert settings.wa_version == "2.3000.1014522270-alpha"
    assert settings.wa_version_url == "https://example.com/html/{version}.html"


# ----- page knowledge ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "shell"),
    [
        ("https://web.whatsapp.com/", True),
        ("https://web.whatsapp.com", True),
        ("https://web.whatsapp.com/?post_logout=1&logout_reason=0", True),
        ("https://web.whatsapp.com/send?phone=14155550177&text=hi", True),
        ("https://web.whatsapp.com/accept?code=AbCdEf", True),
        ("https://web.whatsapp.com/rsrc/2.3000.1/wa.js", False),
        ("https://web.whatsapp.com/sim/api/boot", False),
        ("https://evil.example/", False),
        ("http://web.whatsapp.com/", False),
    ],
)
def test_app_shell_urls(url: str, shell: bool) -> None:
    assert wa.is_app_shell_url(url) is shell


def test_shell_names_its_build_as_a_whole_token() -> None:
    html = shell_of("2.3000.101")
    assert wa.shell_is_build(html, "2.3000.101")
    assert not wa.shell_is_build(html, "2.3000.10")  # a prefix of the build is another build
    assert not wa.shell_is_build(html, "3000.101")
    assert not wa.shell_is_build(b"<html>2.3000.101", "../2.3000.101")
    assert not wa.shell_is_build(b'{"not": "html", "v": "2.3000.101"}', "2.3000.101")


# ----- the simulator's builds (HTTP only) ---------------------------------------------------------------
async def test_simulator_builds_admin_and_assets(sim: Sim) -> None:
    client = sim.client
    assert (await sim.get("/admin/builds"))["current"] == FIRST_BUILD
    await sim.post("/admin/builds", {"version": NEW_BUILD})
    shell = await (await client.get("/accept?code=AbC")).text()
    assert f"/rsrc/{NEW_BUILD}/wa.js" in shell and FIRST_BUILD not in shell
    bundle = await (await client.get(f"/rsrc/{FIRST_BUILD}/wa.js")).text()
    assert f'const SIM_BUILD = "{FIRST_BUILD}";' in bundle  # an old build's assets are kept
    assert (await client.get("/rsrc/2.3000.999/wa.js")).status == 404  # never published
    await sim.post("/admin/builds", {"version": NEW_BUILD, "deprecated": True}, expect=409)  # current
    await sim.post("/admin/builds", {"version": "../x"}, expect=400)
    # deprecated: the server refuses it at boot (strict: version_check), and says so in check-update
    await sim.post("/admin/builds", {"version": FIRST_BUILD, "deprecated": True})
    boot = await sim.get(f"/sim/api/boot?build={FIRST_BUILD}")
    assert boot["build"] == {"version": FIRST_BUILD, "deprecated": True, "current": NEW_BUILD}
    assert (await sim.get(f"/check-update?version={FIRST_BUILD}&platform=web"))["isBelowHard"] is True
    # removed: its assets and its archived shell are gone
    await sim.post("/admin/builds", {"version": FIRST_BUILD, "removed": True})
    assert (await client.get(f"/rsrc/{FIRST_BUILD}/wa.js")).status == 404
    assert (await client.get(f"/wa-version/html/{FIRST_BUILD}.html")).status == 404
    assert (await client.get(f"/wa-version/html/{NEW_BUILD}.html")).status == 200
    # the kind 2024 page (instant): no version check
    await sim.profile(name="instant")
    assert (await sim.get(f"/sim/api/boot?build={FIRST_BUILD}"))["build"]["deprecated"] is False


# ----- the cache's units -------------------------------------------------------------------------------
async def test_latest_captures_each_build_privately(tmp_path: Path) -> None:
    cache = WebCache(tmp_path / "webcache", "latest")
    cache.loaded(shell_of(OLD_BUILD), OLD_BUILD)
    cache.loaded(b"<!DOCTYPE html><html>another build</html>", NEW_BUILD)  # not a shell of NEW_BUILD
    await cache.idle()
    path = tmp_path / "webcache" / f"{OLD_BUILD}.html"
    assert path.read_bytes() == shell_of(OLD_BUILD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not (tmp_path / "webcache" / f"{NEW_BUILD}.html").exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert cache.served().to_dict() == {
        "version": NEW_BUILD,
        "pinned": False,
        "source": "live",
        "wanted": "latest",
    }
    assert cache.pinned_shell() is None


async def test_pinned_from_the_local_cache_then_refused(tmp_path: Path) -> None:
    (tmp_path / f"{OLD_BUILD}.html").write_bytes(shell_of(OLD_BUILD))
    cache = WebCache(tmp_path, OLD_BUILD)
    async with aiohttp.ClientSession() as http:
        await cache.prepare(http)
    assert cache.pinned_shell() == shell_of(OLD_BUILD)
    assert cache.served().to_dict()["source"] == "local"
    before = metrics.WEB_VERSION_UNPINNED._value.get()
    cache.refused(NEW_BUILD)  # another build refused: the pin stays
    assert cache.pinned_version == OLD_BUILD
    cache.refused(OLD_BUILD)
    assert not cache.served().pinned and cache.served().source == "live"
    assert metrics.WEB_VERSION_UNPINNED._value.get() == before + 1
    cache.loaded(shell_of(OLD_BUILD), OLD_BUILD)  # a refused build is never pinned again
    await cache.idle()
    assert not cache.served().pinned


async def test_a_pinned_build_missing_everywhere_loads_live_until_captured(tmp_path: Path) -> None:
    (tmp_path / f"{OLD_BUILD}.html").write_bytes(b"<!DOCTYPE html><html>truncated")  # not that build
    cache = WebCache(tmp_path, OLD_BUILD)
    async with aiohttp.ClientSession() as http:
        await cache.prepare(http)
    assert cache.pinned_shell() is None
    cache.loaded(shell_of(OLD_BUILD), OLD_BUILD)  # a live page of the wanted build: kept, pinned
    await cache.idle()
    assert cache.pinned_shell() == shell_of(OLD_BUILD)
    assert cache.served().to_dict() == {
        "version": OLD_BUILD,
        "pinned": True,
        "source": "local",
        "wanted": OLD_BUILD,
    }


def test_versions_are_checked_before_they_touch_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WebCache(tmp_path, "../../etc/passwd")
    cache = WebCache(tmp_path, "latest")
    with pytest.raises(ValueError):
        cache.path("../x")
    cache.loaded(shell_of("2.3000.1"), "../2.3000.1")  # ignored: not a version
    assert list(tmp_path.iterdir()) == []


async def test_remote_template_is_validated(sim: Sim, tmp_path: Path) -> None:
    builds = sim.server.app[BUILDS]
    template = sim.url + "/wa-version/html/{version}.html"
    async with aiohttp.ClientSession() as http:
        missing = WebCache(tmp_path / "a", OLD_BUILD, url_template=template)
        await missing.prepare(http)  # the archive has no such build (404): live
        assert missing.pinned_shell() is None
        await sim.post("/admin/builds", {"version": OLD_BUILD, "current": False})
        wrong = WebCache(
            tmp_path / "b",
            OLD_BUILD,
            url_template=sim.url + "/wa-version/html/" + FIRST_BUILD + ".html?{version}",
        )
        await wrong.prepare(http)  # an app shell, but of another build: refused
        assert wrong.pinned_shell() is None and not (tmp_path / "b").exists()
        remote = WebCache(tmp_path / "c", OLD_BUILD, url_template=template)
        await remote.prepare(http)
    assert remote.pinned_shell() == builds.archived_shell(OLD_BUILD)
    assert remote.served().to_dict()["source"] == "remote"
    assert (tmp_path / "c" / f"{OLD_BUILD}.html").read_bytes() == builds.archived_shell(OLD_BUILD)


# ----- end to end --------------------------------------------------------------------------------------
@pytest.mark.chromium
async def test_capture_pin_deprecated_recapture(
    sim: Sim, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """The required test: a worker pinning the simulator's build captures it on the first load,
    serves it to a later browser and on other app-shell paths while the simulator's current build is
    newer, and, once the pinned build is deprecated, reloads the session's page live and captures
    the new build; ``/health`` names the build at each step."""
    builds = sim.server.app[BUILDS]
    client = await start_worker(wa_version=FIRST_BUILD)  # not cached yet: the live page, then captured
    assert web_version(await get_json(client, "/health")) == {
        "version": None,
        "pinned": False,
        "source": "live",
        "wanted": FIRST_BUILD,
    }
    cache = manager_of(client).launcher.web_cache
    webcache_dir = tmp_path / "var" / "webcache"

    # 1. the first page loads the live build: captured on its successful load, then pinned
    sid1 = await link_id(client, sim, PHONE)
    await cache.idle()
    assert (webcache_dir / f"{FIRST_BUILD}.html").read_bytes() == builds.archived_shell(FIRST_BUILD)
    assert stat.S_IMODE((webcache_dir / f"{FIRST_BUILD}.html").stat().st_mode) == 0o600
    assert web_version(await get_json(client, "/health")) == {
        "version": FIRST_BUILD,
        "pinned": True,
        "source": "local",
        "wanted": FIRST_BUILD,
    }

    # 2. a newer build is published; a later browser still gets the pinned one, from the cache
    await sim.post("/admin/builds", {"version": NEW_BUILD})
    assert builds.current == NEW_BUILD
    shell_requests = len(builds.shell_requests)
    sid2 = (await create(client))["id"]
    stream2 = await events(client, sid2)
    await stream2.until("qr")
    page2 = manager_of(client).get(sid2).slot.page
    assert await page2.evaluate(DEBUG_VERSION) == FIRST_BUILD
    assert len(builds.shell_requests) == shell_requests  # the simulator never saw that app shell

    # ... on a non-"/" app-shell path too: a logout reloads to /?post_logout=1&logout_reason=…
    stream1 = await events(client, sid1, after=manager_of(client).get(sid1).last_seq)
    await sim.post("/phone/logout", {"phone": PHONE})
    # (the worker learns the logout from the page's navigation to /?post_logout=1…: that app shell
    # was requested, and answered by the worker)
    assert (await stream1.until("session_disconnected"))["reason"] == "phone_logout"
    stream1.close()
    assert len(builds.shell_requests) == shell_requests
    # ... and /send?phone=… (click-to-chat) opened in the session's page
    await page2.goto(wa.ORIGIN + "/send?phone=14155550178", wait_until="commit")
    await page2.wait_for_function(DEBUG_VERSION)
    assert await page2.evaluate(DEBUG_VERSION) == FIRST_BUILD
    assert len(builds.shell_requests) == shell_requests  # neither post_logout nor /send went upstream
    await stream2.until("qr")  # the session goes on, on the pinned build

    # 3. the pinned build is deprecated: the session's page gets DEPRECATED_VERSION, the worker
    #    drops the pin, reloads the page live and captures the new build
    unpinned = metrics.WEB_VERSION_UNPINNED._value.get()
    await sim.post("/admin/builds", {"version": FIRST_BUILD, "deprecated": True})
    await stream2.until("qr")  # a QR of the reloaded page
    await page2.wait_for_function(f"() => window.Debug && window.Debug.VERSION === {NEW_BUILD!r}")
    assert builds.shell_requests[-1]["build"] == NEW_BUILD
    assert (await get_json(client, f"/v1/sessions/{sid2}"))["status"] == "qr"
    await cache.idle()
    assert (webcache_dir / f"{NEW_BUILD}.html").read_bytes() == builds.archived_shell(NEW_BUILD)
    assert metrics.WEB_VERSION_UNPINNED._value.get() == unpinned + 1
    assert web_version(await get_json(client, "/health")) == {
        "version": NEW_BUILD,
        "pinned": False,
        "source": "live",
        "wanted": FIRST_BUILD,
    }
    stream2.close()


@pytest.mark.chromium
async def test_pinned_build_from_the_remote_template(
    sim: Sim, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    """``WALINK_WA_VERSION=<version>`` not in the local cache: fetched from
    ``WALINK_WA_VERSION_URL`` (the simulator's wa-version archive), kept, and what pages run while
    the simulator's current build is another."""
    builds = sim.server.app[BUILDS]
    await sim.post("/admin/builds", {"version": OLD_BUILD, "current": False})
    client = await start_worker(
        wa_version=OLD_BUILD, wa_version_url=sim.url + "/wa-version/html/{version}.html"
    )
    assert web_version(await get_json(client, "/health")) == {
        "version": OLD_BUILD,
        "pinned": True,
        "source": "remote",
        "wanted": OLD_BUILD,
    }
    assert (tmp_path / "var" / "webcache" / f"{OLD_BUILD}.html").read_bytes() == builds.archived_shell(
        OLD_BUILD
    )
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    await stream.until("qr")
    stream.close()
    page = manager_of(client).get(sid).slot.page
    assert await page.evaluate(DEBUG_VERSION) == OLD_BUILD != builds.current
    assert builds.shell_requests == []  # no app shell went upstream
    assert builds.boots[-1]["build"] == OLD_BUILD and not builds.boots[-1]["deprecated"]
