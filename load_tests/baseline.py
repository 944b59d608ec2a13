"""The seed architecture, rebuilt with Playwright against the same simulator: the baseline.

What the Node (whatsapp-web.js) + Laravel system did for one "add account"
(``docs/seed-baseline.md``), and what this module does:

* **A new browser per session, launched on demand**: a persistent Chromium profile in a fresh
  directory (``LocalAuth``), the seed's Puppeteer flags (minus ``--single-process``, which crashes
  this Chromium at the first new page), ``https://web.whatsapp.com/**`` routed to the
  simulator exactly as ``worker/browser.py`` does, ``goto https://web.whatsapp.com/``.
* **The QR** is read when ``div[data-ref]`` carries a ref (``data-ref`` non-empty).
* **A refused scan** (the 2026 page, ``strict``/``realistic``: 409 "Couldn't link device" on the
  first scan of a batch, or 410 ``qr_expired``): the seed's page draws a new ``data-ref`` (the same
  ref with a new ADV secret) and the phone scans that one, at most 4 scans in all
  (:data:`load_tests.client.MAX_SCANS`). The new QR would reach the seed's client at its next 3 s
  poll; that is counted (``refused_to_qr_at_client_s``), but the rescan is sent as soon as the page
  has the new ref, so the timed scan → phone below starts at the scan that succeeded, as walink's.
* **The phone** (``extractPhoneNumberSafely``): after the scan a FIXED 2.5 s wait, then
  ``getMaybeMePnUser()`` every 500 ms, at most 15 times. The 2.5 s are counted from the moment
  the phone's scan call returns — the seed learned of the scan a little later (whatsapp-web.js's
  ``authenticated`` event), so this favours the baseline.
* **The client polls every 3 s**: the browser page of the SaaS asks for the status every 3 s; a
  value becomes visible at the first poll tick at or after the moment it is available. The ticks
  are ``t0 + phase + 3k`` with a random ``phase`` in [0, 3) per sample (``t0`` = "add account"
  for the QR, the scan for the phone, the restore for a wake).
* Not modelled (all favour the baseline): Laravel's webhook hop, its database update, the
  frontend's own request time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from playwright.async_api import BrowserContext, Page, Playwright, Route, async_playwright
from playwright.async_api import Error as PlaywrightError

from load_tests.client import MAX_SCANS, Scan, ScanRefused
from worker import chromium

ORIGIN = "https://web.whatsapp.com"
APP_URL = ORIGIN + "/"
ROUTE_PATTERN = ORIGIN + "/**"

# the seed's Puppeteer flags (docs/seed-baseline.md), without --single-process (crashes)
SEED_ARGS = [
    "--no-sandbox",
    "--disable-setuid-sandbox",
    "--disable-dev-shm-usage",
    "--no-zygote",
    "--disable-gpu",
    "--disable-web-security",
    "--disable-features=IsolateOrigins,site-per-process",
]
FIXED_WAIT_S = 2.5
RETRY_S = 0.5
MAX_RETRIES = 15
CLIENT_POLL_S = 3.0
TIMEOUT_MS = 60_000

QR_SELECTOR = 'div[data-ref]:not([data-ref=""])'
NEW_QR_SCRIPT = """old => {
  const ref = document.querySelector('div[data-ref]')?.getAttribute('data-ref');
  return ref && ref !== old ? ref : null;
}"""
LOGGED_IN_SELECTOR = "#pane-side"
ME_SCRIPT = """() => {
  try {
    const wid = window.require('WAWebUserPrefsMeUser').getMaybeMePnUser();
    return wid && wid.user ? String(wid.user) : null;
  } catch (e) { return null; }
}"""

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host", "upgrade"}
)


class BaselineError(RuntimeError):
    pass


def client_sees(available_s: float, phase_s: float, period_s: float = CLIENT_POLL_S) -> float:
    """When a client polling at ``phase + k·period`` (k ≥ 0) first sees a value available at
    ``available_s``."""
    if available_s <= phase_s:
        return phase_s
    return phase_s + math.ceil((available_s - phase_s) / period_s - 1e-9) * period_s


@dataclass
class SeedSession:
    profile_dir: Path
    context: BrowserContext | None = None
    page: Page | None = None
    qr: str | None = None
    phone: str | None = None


@dataclass(frozen=True)
class QrSample:
    available_s: float  # "add account" → the QR in the seed's Node process
    at_client_s: float  # → the QR on the client's screen (next 3 s poll tick)
    phase_s: float


@dataclass(frozen=True)
class PhoneSample:
    available_s: float  # the scan that succeeded → phone extracted by the seed
    at_client_s: float  # the scan that succeeded → phone on the client's screen
    phase_s: float
    attempts: int  # getMaybeMePnUser() calls
    scans: int = 1  # scans it took (the refused ones and the one that succeeded)
    refused_to_qr_s: tuple[float, ...] = ()  # a refused scan → the new data-ref on the seed's page
    refused_to_qr_at_client_s: tuple[float, ...] = ()  # → the new QR at the seed's client (3 s poll)
    refused: tuple[str, ...] = ()  # the refused scans' answers, e.g. "409 couldnt_link_device"


@dataclass(frozen=True)
class RestoreSample:
    logged_in_s: float  # relaunch → WhatsApp Web shows the logged-in UI
    available_s: float  # relaunch → phone extracted (fixed wait + polling)
    at_client_s: float
    phase_s: float


class SeedBaseline:
    def __init__(self, sim_url: str, chromium_path: Path, profiles_root: Path, rng: random.Random) -> None:
        self.sim_url = sim_url.rstrip("/")
        self.chromium_path = chromium_path
        self.profiles_root = profiles_root
        self.rng = rng
        self.playwright: Playwright | None = None
        self.http: aiohttp.ClientSession | None = None
        self.sessions: list[SeedSession] = []
        self._n = 0

    async def start(self) -> None:
        self.profiles_root.mkdir(parents=True, exist_ok=True)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self.playwright = await asyncio.wait_for(async_playwright().start(), 60)

    async def close(self) -> None:
        await asyncio.gather(*(self.discard(s) for s in list(self.sessions)), return_exceptions=True)
        if self.playwright is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.playwright.stop(), 15)
            self.playwright = None
        if self.http is not None:
            await self.http.close()
            self.http = None
        # whatever Playwright could not close: the profiles' process groups
        for pgid in chromium.groups_under(self.profiles_root):
            chromium.kill_group(pgid)

    # ------------------------------------------------------------------ browser
    async def _forward(self, route: Route) -> None:
        """``https://web.whatsapp.com/**`` → the simulator (the same forwarding as ``worker/browser.py``)."""
        assert self.http is not None
        request = route.request
        path = request.url[len(ORIGIN) :] or "/"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            async with self.http.request(
                request.method,
                self.sim_url + path,
                headers=headers,
                data=request.post_data_buffer,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as resp:
                body = await resp.read()
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}
            await route.fulfill(status=resp.status, headers=out_headers, body=body)
        except (aiohttp.ClientError, TimeoutError):
            with contextlib.suppress(PlaywrightError):
                await route.abort("connectionrefused")
        except PlaywrightError:
            pass  # the page went away while the request was in flight

    async def _open(self, session: SeedSession) -> None:
        """Launch Chromium on the session's profile and open WhatsApp Web (the seed's ``initialize``)."""
        assert self.playwright is not None
        session.profile_dir.mkdir(parents=True, exist_ok=True)
        chromium.remove_profile_locks(session.profile_dir)
        try:
            context = await self.playwright.chromium.launch_persistent_context(
                str(session.profile_dir.resolve()),
                executable_path=str(self.chromium_path),
                headless=True,
                args=SEED_ARGS,
                timeout=TIMEOUT_MS,
            )
            session.context = context
            context.set_default_timeout(TIMEOUT_MS)
            await context.route(ROUTE_PATTERN, self._forward)
            page = context.pages[0] if context.pages else await context.new_page()
            session.page = page
            await page.goto(APP_URL, timeout=TIMEOUT_MS)
        except PlaywrightError as exc:
            await self.stop_browser(session)
            raise BaselineError(f"seed browser did not open WhatsApp Web: {exc.message}") from exc

    async def stop_browser(self, session: SeedSession) -> None:
        """Close the browser and its process group; the profile (LocalAuth) stays."""
        context, session.context, session.page = session.context, None, None
        if context is not None:
            with contextlib.suppress(PlaywrightError, TimeoutError):
                await asyncio.wait_for(context.close(), 10)
        pid = chromium.browser_pid_for_profile(session.profile_dir)
        if pid is not None:
            chromium.kill_group(pid)
        chromium.remove_profile_locks(session.profile_dir)

    async def discard(self, session: SeedSession) -> None:
        await self.stop_browser(session)
        shutil.rmtree(session.profile_dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            self.sessions.remove(session)

    def pss(self, session: SeedSession) -> int:
        """PSS (bytes) of the session's whole Chromium process group."""
        pid = chromium.browser_pid_for_profile(session.profile_dir)
        return chromium.pss_by_group({pid})[pid] if pid else 0

    # ------------------------------------------------------------------ the seed's flows
    async def add_account(self) -> tuple[SeedSession, QrSample]:
        """A new browser for a new session; the QR when ``div[data-ref]`` has a ref."""
        self._n += 1
        session = SeedSession(self.profiles_root / f"seed-{self._n}")
        self.sessions.append(session)
        phase = self.rng.uniform(0, CLIENT_POLL_S)
        t0 = time.perf_counter()
        await self._open(session)
        assert session.page is not None
        try:
            handle = await session.page.wait_for_selector(QR_SELECTOR, timeout=TIMEOUT_MS)
            qr = await handle.get_attribute("data-ref") if handle is not None else None
        except PlaywrightError as exc:
            raise BaselineError(f"no QR on the seed's page: {exc.message}") from exc
        available = time.perf_counter() - t0
        if not qr:
            raise BaselineError("div[data-ref] without a ref")
        session.qr = qr
        return session, QrSample(available, client_sees(available, phase), phase)

    async def _extract_phone(self, session: SeedSession) -> tuple[str, int]:
        """``extractPhoneNumberSafely``: a fixed 2.5 s, then every 500 ms, at most 15 tries."""
        await asyncio.sleep(FIXED_WAIT_S)
        for attempt in range(1, MAX_RETRIES + 1):
            page = session.page
            if page is None:
                raise BaselineError("the seed's browser is gone")
            try:
                phone = await page.evaluate(ME_SCRIPT)
            except PlaywrightError:
                phone = None  # navigating (e.g. after the sync): like the seed, try again
            if phone:
                return str(phone), attempt
            await asyncio.sleep(RETRY_S)
        raise BaselineError(f"no phone after {FIXED_WAIT_S}s + {MAX_RETRIES} tries")

    async def _next_qr(self, session: SeedSession, old: str) -> str:
        """The page's next ``data-ref`` (a new ref, or the same ref with a new ADV secret)."""
        if session.page is None:
            raise BaselineError("the seed's browser is gone")
        try:
            handle = await session.page.wait_for_function(NEW_QR_SCRIPT, arg=old, timeout=TIMEOUT_MS)
            qr = await handle.json_value()
        except PlaywrightError as exc:
            raise BaselineError(f"no new QR on the seed's page after a refused scan: {exc.message}") from exc
        if not isinstance(qr, str) or not qr:
            raise BaselineError("div[data-ref] without a ref")
        session.qr = qr
        return qr

    async def scan_to_phone(self, session: SeedSession, scan: Scan, phone: str) -> PhoneSample:
        """The phone scans the QR (the page's next QR again after "Couldn't link device" or an
        expired QR); the seed extracts the phone; the client sees it at its next poll. Timed from
        the scan that succeeded."""
        if session.qr is None:
            raise BaselineError("the session shows no QR")
        phase = self.rng.uniform(0, CLIENT_POLL_S)
        qr = session.qr
        refused: list[float] = []
        refused_at_client: list[float] = []
        codes: list[str] = []
        scans = 0
        while True:
            scans += 1
            t0 = time.perf_counter()
            try:
                await scan(qr, phone)
                break
            except ScanRefused as exc:
                if not exc.rescan or scans >= MAX_SCANS:
                    raise
                codes.append(f"{exc.status} {exc.code}")
                t_refused = time.perf_counter()
                qr = await self._next_qr(session, qr)
                shown = time.perf_counter() - t_refused
                refused.append(shown)
                refused_at_client.append(client_sees(shown, self.rng.uniform(0, CLIENT_POLL_S)))
        found, attempts = await self._extract_phone(session)
        available = time.perf_counter() - t0
        if found != phone:
            raise BaselineError(f"seed extracted {found}, expected {phone}")
        session.phone = found
        return PhoneSample(
            available,
            client_sees(available, phase),
            phase,
            attempts,
            scans,
            tuple(refused),
            tuple(refused_at_client),
            tuple(codes),
        )

    async def link(self, scan: Scan, phone: str) -> SeedSession:
        """A linked seed session (not timed): for memory and restore measurements."""
        session, _ = await self.add_account()
        await self.scan_to_phone(session, scan, phone)
        return session

    async def restore(self, session: SeedSession) -> RestoreSample:
        """The seed's way back for a session whose browser was closed: relaunch on the LocalAuth
        profile, wait for the logged-in UI, then the same fixed wait and polling for the phone."""
        await self.stop_browser(session)
        phase = self.rng.uniform(0, CLIENT_POLL_S)
        t0 = time.perf_counter()
        await self._open(session)
        assert session.page is not None
        try:
            await session.page.wait_for_selector(LOGGED_IN_SELECTOR, timeout=TIMEOUT_MS)
        except PlaywrightError as exc:
            raise BaselineError(f"the seed's profile did not restore the login: {exc.message}") from exc
        logged_in = time.perf_counter() - t0
        found, _ = await self._extract_phone(session)
        available = time.perf_counter() - t0
        if session.phone is not None and found != session.phone:
            raise BaselineError(f"restored phone {found}, expected {session.phone}")
        return RestoreSample(logged_in, available, client_sees(available, phase), phase)
