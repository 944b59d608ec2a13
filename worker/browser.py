"""One Chromium per profile: launching it on WhatsApp Web, routing the origin, relaying page events.

A :class:`BrowserSlot` is a persistent Chromium context on one profile directory (the only
place WhatsApp's non-extractable keys survive) with one page on ``https://web.whatsapp.com/``.
Page events arrive through the exposed binding and are handed to the slot's current *sink*:
the warm pool while the slot waits, then the session that took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import BrowserContext, Frame, Page, Playwright, Route
from playwright.async_api import Error as PlaywrightError

from shared.aio import stop_loops
from shared.errors import BrowserError, BrowserTimeout
from shared.private_files import make_private_dirs
from shared.settings import Settings
from worker import chromium, snapshot
from worker import whatsapp_web as wa
from worker.web_cache import WebCache

log = logging.getLogger("walink.browser")

PageEventSink = Callable[[str, Any], None]

_UPSTREAM_TIMEOUT_S = 60.0
_NO_STORE = {"Cache-Control": "no-store"}
_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host", "upgrade"}
)


class BrowserSlot:
    """A running Chromium on one profile, showing WhatsApp Web."""

    def __init__(
        self, profile_id: str, profile_dir: Path, close_timeout_s: float, web_cache: WebCache | None = None
    ) -> None:
        self.profile_id = profile_id
        self.profile_dir = profile_dir
        self.context: BrowserContext | None = None
        self.page: Page | None = None
        self.pid: int | None = None
        self.last_qr: str | None = None
        self.last_qr_ref: str | None = None
        self.last_qr_ttl_ms: int | None = None
        self.socket_state: str | None = None
        self.first_qr = asyncio.Event()
        self.hooked = asyncio.Event()
        self.dead = asyncio.Event()
        self._sink: PageEventSink | None = None
        self._on_idle: Callable[[BrowserSlot], None] | None = None
        self._on_dead: Callable[[BrowserSlot], None] | None = None
        self._closing = False
        self._close_timeout_s = close_timeout_s
        self._hook_needed = asyncio.Event()
        self._hook_task: asyncio.Task[None] | None = None
        self._hook_timeout_s = 30.0
        self.requests: set[asyncio.Task[Any]] = set()
        """The page's requests being forwarded (ended with the browser, as its sockets would be)."""
        self.web_cache = web_cache
        self.shell: bytes | None = None
        """The app shell of the page's last app-shell navigation, as upstream sent it (None: the
        pinned shell was served); kept by the web cache once the page has loaded."""
        self.page_version: str | None = None
        """``Debug.VERSION`` of the document on the page (the build it runs), from the hook."""
        self._version_loaded = False

    # ----- who receives the page's events
    def set_sink(self, sink: PageEventSink | None) -> None:
        self._sink = sink

    def set_pool_callbacks(
        self, on_idle: Callable[[BrowserSlot], None] | None, on_dead: Callable[[BrowserSlot], None] | None
    ) -> None:
        self._on_idle = on_idle
        self._on_dead = on_dead

    @property
    def closing(self) -> bool:
        return self._closing

    def _dispatch(self, kind: str, data: Any) -> None:
        if kind == "qr" and isinstance(data, dict):
            self.last_qr = str(data.get("qr") or "") or None
            self.last_qr_ref = str(data.get("ref") or "") or None
            ttl = data.get("ttl_ms")
            self.last_qr_ttl_ms = int(ttl) if isinstance(ttl, int | float) else None
            if self.last_qr:
                self.first_qr.set()
        elif kind == "state":
            self.socket_state = str(data)
            self._note_build_state(self.socket_state)
        elif kind == "hooked" and isinstance(data, dict):
            version = data.get("version")
            self.page_version = version if isinstance(version, str) and wa.is_version(version) else None
            self._version_loaded = False
            self.hooked.set()
        elif kind in {"crashed", "closed"}:
            self.dead.set()
        if self._sink is not None:
            self._sink(kind, data)
            return
        if kind == "state" and data == wa.STATE_UNPAIRED_IDLE and self._on_idle is not None:
            self._on_idle(self)
        elif kind in {"crashed", "closed"} and self._on_dead is not None:
            self._on_dead(self)
        elif kind == "state" and data == wa.STATE_DEPRECATED_VERSION and self._on_dead is not None:
            self._on_dead(self)  # a warm browser on a refused build: replaced by a fresh one

    def _note_build_state(self, state: str) -> None:
        """Tell the web cache that the page's build loaded (accepted) or was refused."""
        cache = self.web_cache
        if cache is None or self.page_version is None:
            return
        if state == wa.STATE_DEPRECATED_VERSION:
            cache.refused(self.page_version)
        elif state in wa.LOADED_STATES and not self._version_loaded:
            self._version_loaded = True
            cache.loaded(self.shell, self.page_version)

    # ----- wiring done by the launcher
    def _on_binding(self, _source: Any, kind: str, data: Any = None) -> None:
        self._dispatch(str(kind), data)

    def _on_navigated(self, frame: Frame) -> None:
        if self.page is None or frame != self.page.main_frame:
            return
        notice = wa.parse_logout_url(frame.url)
        if notice is not None:
            self._dispatch("logged_out", notice)
        self._hook_needed.set()

    def _on_crash(self, _page: Page) -> None:
        if not self._closing:
            self._dispatch("crashed", None)

    def _on_context_close(self, _ctx: BrowserContext) -> None:
        if not self._closing:
            self._dispatch("closed", None)
        self.dead.set()

    def start_hooking(self, timeout_s: float) -> None:
        self._hook_timeout_s = timeout_s
        self._hook_task = asyncio.create_task(self._hook_loop(), name=f"hook-{self.profile_id}")

    async def _hook_loop(self) -> None:
        """After every navigation, wait for WhatsApp's module system and install the hooks."""
        while not self._closing:
            await self._hook_needed.wait()
            self._hook_needed.clear()
            page = self.page
            if page is None or page.is_closed():
                return
            try:
                await page.wait_for_function(wa.MODULES_READY, timeout=self._hook_timeout_s * 1000)
                await page.evaluate(
                    wa.HOOK_SCRIPT,
                    {
                        "qrSelector": wa.QR_CONTAINER,
                        "codeSelector": wa.PAIRING_CODE_CELLS,
                    },
                )
            except PlaywrightError as exc:
                if self._closing or page.is_closed():
                    return
                if self._hook_needed.is_set():
                    continue  # navigated again while we waited: hook the new document
                if "Timeout" in str(exc) or "timeout" in str(exc):
                    self._dispatch("hook_timeout", str(exc))
                else:
                    log.debug("hook of %s interrupted: %s", self.profile_id, exc)

    # ----- commands
    async def _evaluate(self, script: str, arg: Any = None, *, timeout_s: float = 10.0) -> Any:
        page = self.page
        if page is None or self._closing:
            raise BrowserError("the browser of this session is not running")
        try:
            return await asyncio.wait_for(page.evaluate(script, arg), timeout_s)
        except TimeoutError as exc:
            raise BrowserTimeout("the page did not answer in time") from exc
        except PlaywrightError as exc:
            raise BrowserError(f"page script failed: {exc.message}") from exc

    async def login_storage(self, timeout_s: float = 10.0) -> tuple[list[str], dict[str, str]]:
        """In one look at the page: what it lacks of the storage its login needs
        (``wa.LOGIN_DATABASES`` and ``wa.LOGIN_LOCAL_STORAGE``; empty when a snapshot of it can
        restore the login), and its localStorage as the page sees it (ahead of what Chromium
        has on disk)."""
        keys = list(wa.LOGIN_LOCAL_STORAGE)
        found = await self._evaluate(wa.LOGIN_STORAGE_SCRIPT, keys, timeout_s=timeout_s)
        entries = found.get("entries") if isinstance(found, dict) else None
        local = (
            {str(k): v for k, v in entries.items() if isinstance(v, str)} if isinstance(entries, dict) else {}
        )
        return wa.missing_login_storage(found), local

    async def missing_login_storage(self, timeout_s: float = 10.0) -> list[str]:
        """What the page lacks of the storage its login needs (see :meth:`login_storage`)."""
        missing, _entries = await self.login_storage(timeout_s)
        return missing

    async def request_pairing_code(self, phone: str) -> str:
        code = await self._evaluate(wa.PAIRING_CODE_SCRIPT, phone, timeout_s=30.0)
        if not isinstance(code, str) or not code:
            raise BrowserError("WhatsApp Web returned no pairing code")
        return code

    async def refresh_qr(self) -> None:
        await self._evaluate(wa.REFRESH_QR_SCRIPT, wa.QR_RELOAD_BUTTON)

    async def back_to_qr(self) -> None:
        """Leave a pairing code for the QR (new refs, the QR screen)."""
        await self._evaluate(wa.QR_LINKING_SCRIPT, timeout_s=30.0)

    async def reload(self, timeout_s: float) -> None:
        """Load WhatsApp Web again in this browser (the hook is installed again after it)."""
        page = self.page
        if page is None or self._closing:
            raise BrowserError("the browser of this session is not running")
        try:
            await page.goto(wa.APP_URL, wait_until="commit", timeout=timeout_s * 1000)
        except PlaywrightError as exc:
            raise BrowserError(f"WhatsApp Web did not load again: {exc.message}") from exc

    async def resolve_passkey(self, assertion: dict[str, Any]) -> bool:
        """Settle the page's pending ``navigator.credentials.get`` with this assertion; False if
        no call is pending."""
        return bool(await self._evaluate(wa.PASSKEY_RESOLVE_SCRIPT, assertion))

    async def takeover(self) -> None:
        await self._evaluate(wa.TAKEOVER_SCRIPT)

    async def logout(self) -> None:
        await self._evaluate(wa.LOGOUT_SCRIPT)

    async def close(self) -> None:
        """End the browser and its whole process group; the profile directory stays."""
        if self._closing:
            await self.dead.wait()
            return
        self._closing = True
        self._sink = None
        if self._hook_task is not None:
            await stop_loops(self._hook_task)
        for request in list(self.requests):
            request.cancel()  # the page's long-poll ends with its browser, as a socket would
        closed = False
        if self.context is not None:
            with contextlib.suppress(PlaywrightError, TimeoutError):
                await asyncio.wait_for(self.context.close(), self._close_timeout_s)
                closed = True
        # a browser that closed is let finish: its helpers may still flush the profile's storage
        if self.pid is not None and not (
            closed and await chromium.wait_group_gone(self.pid, self._close_timeout_s)
        ):
            chromium.kill_group(self.pid)
        chromium.remove_profile_locks(self.profile_dir)
        self.dead.set()


class BrowserLauncher:
    """Starts :class:`BrowserSlot` s: Chromium on a profile, the origin routed, WhatsApp Web open."""

    def __init__(self, settings: Settings, playwright: Playwright, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.playwright = playwright
        self.http = http
        self.version = chromium.chromium_version(settings.chromium_path)
        self.user_agent = wa.user_agent_for(self.version)
        self.web_cache = WebCache(
            settings.webcache_dir,
            settings.wa_version,
            url_template=settings.wa_version_url,
            fetch_timeout_s=settings.wa_version_fetch_timeout_s,
        )
        self.launched_total = 0
        self.sandbox = chromium.sandboxed(settings.chromium_sandbox)

    def profile_dir(self, profile_id: str) -> Path:
        return self.settings.profiles_dir / profile_id

    async def launch(self, profile_id: str) -> BrowserSlot:
        settings = self.settings
        profile_dir = self.profile_dir(profile_id)
        make_private_dirs(profile_dir)  # 0700, like the directories Chromium makes inside it
        chromium.remove_profile_locks(profile_dir)
        slot = BrowserSlot(profile_id, profile_dir, settings.browser_close_timeout_s, self.web_cache)
        timeout_ms = settings.start_timeout_s * 1000
        launching = asyncio.ensure_future(
            self.playwright.chromium.launch_persistent_context(
                str(profile_dir.resolve()),
                executable_path=str(settings.chromium_path),
                headless=settings.headless,
                args=chromium.launch_args(sandbox=self.sandbox),
                chromium_sandbox=self.sandbox,
                service_workers="block",
                user_agent=self.user_agent,
                viewport={"width": 1024, "height": 768},
                timeout=timeout_ms,
            )
        )
        try:
            context = await asyncio.shield(launching)
        except asyncio.CancelledError:
            # Playwright's driver goes on launching: close what it starts, so that no browser is
            # left on the profile (the next launch on it would find it taken)
            await asyncio.shield(self._discard_launch(launching, profile_dir))
            raise
        except PlaywrightError as exc:
            hint = chromium.sandbox_hint(exc.message) if self.sandbox else ""
            raise BrowserError(f"Chromium did not start: {exc.message}{hint}") from exc
        self.launched_total += 1
        slot.context = context
        try:
            # walks /proc: off the event loop; inside the try so a cancel here still closes Chromium
            slot.pid = await asyncio.to_thread(chromium.browser_pid_for_profile, profile_dir)
            context.set_default_timeout(timeout_ms)
            await context.expose_binding(wa.BINDING_NAME, slot._on_binding)
            await context.add_init_script(wa.PASSKEY_INIT_SCRIPT)
            # a restored live snapshot's localStorage, as its page held it (worker/snapshot.py)
            restored = await asyncio.to_thread(snapshot.take_page_local_storage, profile_dir)
            if restored is not None:
                await context.add_init_script(wa.local_storage_restore_script(restored))
            # the simulator serves the whole origin; the live site only its app shell goes through
            # walink (the web cache), everything else goes to the network untouched
            routed = wa.ROUTE_PATTERN if settings.target == "simulator" else wa.is_app_shell_url
            await context.route(routed, partial(self._route_origin, slot))
            page = context.pages[0] if context.pages else await context.new_page()
            slot.page = page
            page.on("framenavigated", slot._on_navigated)
            page.on("crash", slot._on_crash)
            context.on("close", slot._on_context_close)
            slot.start_hooking(settings.start_timeout_s)
            await page.goto(wa.APP_URL, wait_until="commit", timeout=timeout_ms)
        except PlaywrightError as exc:
            await slot.close()
            raise BrowserError(f"WhatsApp Web did not open: {exc.message}") from exc
        except BaseException:
            await slot.close()
            raise
        return slot

    async def _discard_launch(self, launching: asyncio.Future[BrowserContext], profile_dir: Path) -> None:
        close_s = self.settings.browser_close_timeout_s
        with contextlib.suppress(PlaywrightError, TimeoutError):
            context = await asyncio.wait_for(launching, self.settings.start_timeout_s)
            await asyncio.wait_for(context.close(), close_s)
        pid = await asyncio.to_thread(chromium.browser_pid_for_profile, profile_dir)
        if pid is not None and not await chromium.wait_group_gone(pid, close_s):
            chromium.kill_group(pid)
        chromium.remove_profile_locks(profile_dir)

    async def _route_origin(self, slot: BrowserSlot, route: Route) -> None:
        """A request of the page to ``https://web.whatsapp.com``: an app-shell navigation goes
        through the web cache; the rest to the simulator (same origin, same storage keys) or, for
        the live site, to the network."""
        task = asyncio.current_task()
        if task is None or slot.closing:
            return
        slot.requests.add(task)
        try:
            request = route.request
            navigation = request.method == "GET" and request.is_navigation_request()
            if navigation and wa.is_app_shell_url(request.url):
                await self._serve_shell(slot, route)
            elif self.settings.target == "simulator":
                await self._forward(route)
            else:
                await route.fallback()
        except asyncio.CancelledError:
            if not slot.closing:
                raise
        except PlaywrightError:
            pass  # the page went away while the request was in flight
        finally:
            slot.requests.discard(task)

    async def _serve_shell(self, slot: BrowserSlot, route: Route) -> None:
        """The pinned build's app shell, else upstream's (recorded for the web cache)."""
        pinned = self.web_cache.pinned_shell()
        if pinned is not None:
            slot.shell = None
            await route.fulfill(
                status=200, content_type="text/html; charset=utf-8", body=pinned, headers=_NO_STORE
            )
            return
        if self.settings.target != "simulator":
            try:
                response = await route.fetch(timeout=_UPSTREAM_TIMEOUT_S * 1000)
                body = await response.body()
            except PlaywrightError:
                slot.shell = None
                await route.abort("failed")  # the live site could not be reached: as the browser would
                return
            slot.shell = body if response.status == 200 else None
            await route.fulfill(response=response, body=body)
            return
        fetched = await self._upstream(route)
        if fetched is None:
            slot.shell = None
            await route.abort("connectionrefused")
            return
        status, headers, body = fetched
        slot.shell = body if status == 200 else None
        await route.fulfill(status=status, headers=headers, body=body)

    async def _upstream(self, route: Route) -> tuple[int, dict[str, str], bytes] | None:
        """The simulator's answer to the page's request (None: it could not be reached)."""
        request = route.request
        path = request.url[len(wa.ORIGIN) :] or "/"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            async with self.http.request(
                request.method,
                self.settings.simulator_url.rstrip("/") + path,
                headers=headers,
                data=request.post_data_buffer,
                timeout=aiohttp.ClientTimeout(total=_UPSTREAM_TIMEOUT_S),
            ) as resp:
                body = await resp.read()
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
                return resp.status, out_headers, body
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _forward(self, route: Route) -> None:
        fetched = await self._upstream(route)
        if fetched is None:
            with contextlib.suppress(PlaywrightError):
                await route.abort("connectionrefused")
            return
        status, headers, body = fetched
        await route.fulfill(status=status, headers=headers, body=body)
