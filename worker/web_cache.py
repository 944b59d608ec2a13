"""The WhatsApp Web version cache: which build's app shell the browsers of this worker load.

whatsapp-web.js's ``webVersionCache`` (``LocalWebCache``/``RemoteWebCache``), done in front of the
origin's upstream (the simulator in tests, the live site for target ``whatsapp``), so the same code
is what the tests run:

* ``WALINK_WA_VERSION=latest`` (default): app-shell navigations go upstream; each page's shell is
  recorded, and once the page has loaded (its hook reported ``Debug.VERSION`` and the server
  accepted the build) the shell is kept as ``<data dir>/webcache/<version>.html``.
* ``WALINK_WA_VERSION=<version>``: that build is *pinned*: every app-shell navigation (``/``,
  ``/?post_logout=1…``, ``/send?…``, ``/accept?…``) is answered with its shell, from the local cache,
  else from ``WALINK_WA_VERSION_URL`` (``{version}`` replaced; validated, then kept locally), else
  the live page is loaded (with a warning) until a live page of that build is captured.
* A pinned build the server refuses (``DEPRECATED_VERSION``) is dropped for this process: pages
  load the live build from then on, and it is captured like any other.

File writes run off the event loop and are atomic (a temporary file renamed over the name), with
private modes; several workers sharing the data dir write the same bytes under the same name.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from shared import metrics
from shared.private_files import make_private_dirs, write_private_file
from worker import whatsapp_web as wa

log = logging.getLogger("walink.web_cache")

LATEST = "latest"
Source = Literal["local", "remote", "live"]


@dataclass(frozen=True, slots=True)
class ServedBuild:
    """What ``/health`` says of the build this worker's browsers load."""

    version: str | None
    """The pinned build, else the build the last live page reported (None before any)."""
    pinned: bool
    source: Source
    wanted: str
    """``WALINK_WA_VERSION``: ``latest`` or a version."""

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "pinned": self.pinned, "source": self.source, "wanted": self.wanted}


class WebCache:
    """The pinned app shell (if any), and the capture of the shells live pages loaded."""

    def __init__(
        self,
        directory: Path,
        wanted: str,
        *,
        url_template: str = "",
        fetch_timeout_s: float = 15.0,
    ) -> None:
        if wanted != LATEST and not wa.is_version(wanted):
            raise ValueError(f"not a WhatsApp Web version: {wanted!r}")
        self.directory = directory
        self.wanted = wanted
        self.url_template = url_template
        self.fetch_timeout_s = fetch_timeout_s
        self._pinned: tuple[str, bytes] | None = None
        self._source: Source = "live"
        self._live_version: str | None = None
        self._captured: set[str] = set()
        self._refused: set[str] = set()
        """Builds the server refused in this process: never pinned again."""
        self._tasks: set[asyncio.Task[None]] = set()

    # ----- what is served
    @property
    def pinned_version(self) -> str | None:
        return self._pinned[0] if self._pinned is not None else None

    def pinned_shell(self) -> bytes | None:
        """The app shell to answer app-shell navigations with, or None: go upstream."""
        return self._pinned[1] if self._pinned is not None else None

    def served(self) -> ServedBuild:
        if self._pinned is not None:
            return ServedBuild(self._pinned[0], True, self._source, self.wanted)
        return ServedBuild(self._live_version, False, "live", self.wanted)

    # ----- start-up
    def path(self, version: str) -> Path:
        if not wa.is_version(version):
            raise ValueError(f"not a WhatsApp Web version: {version!r}")
        return self.directory / f"{version}.html"

    async def prepare(self, http: aiohttp.ClientSession) -> None:
        """Pin ``WALINK_WA_VERSION``: from the local cache, else the remote template, else live."""
        version = self.wanted
        if version == LATEST:
            log.info("WhatsApp Web: the live build, each new build captured into %s", self.directory)
            return
        html = await asyncio.to_thread(self._read, version)
        if html is not None and wa.shell_is_build(html, version):
            self._pin(version, html, "local")
            return
        if html is not None:
            log.warning("the cached %s is not an app shell of that build; ignored", self.path(version))
        if self.url_template:
            html = await self._fetch_remote(http, version)
            if html is not None:
                await asyncio.to_thread(self._write, version, html)
                self._captured.add(version)
                self._pin(version, html, "remote")
                return
        log.warning(
            "WhatsApp Web %s is neither in %s nor%s available remotely: loading the live build"
            " (pinned once a live page of %s is captured)",
            version,
            self.directory,
            "" if self.url_template else " (WALINK_WA_VERSION_URL unset)",
            version,
        )

    async def _fetch_remote(self, http: aiohttp.ClientSession, version: str) -> bytes | None:
        url = self.url_template.replace("{version}", version)
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=self.fetch_timeout_s)) as resp:
                if resp.status != 200:
                    log.warning("WhatsApp Web %s: %s answered %d", version, url, resp.status)
                    return None
                html = await resp.content.read(wa.SHELL_MAX_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("WhatsApp Web %s: %s failed: %s", version, url, exc or type(exc).__name__)
            return None
        if not wa.shell_is_build(html, version):
            log.warning("WhatsApp Web %s: %s is not an app shell of that build; ignored", version, url)
            return None
        log.info("WhatsApp Web %s fetched from %s (%d bytes)", version, url, len(html))
        return html

    def _pin(self, version: str, html: bytes, source: Source) -> None:
        self._pinned = (version, html)
        self._source = source
        log.info("WhatsApp Web %s pinned (%s, %d bytes)", version, source, len(html))

    # ----- what pages report
    def loaded(self, shell: bytes | None, version: str) -> None:
        """A page of build ``version`` loaded and its build was accepted; ``shell`` is the app shell
        it got from upstream (None: it got the pinned one). Keeps the shell (in the background)."""
        if not wa.is_version(version):
            return
        if self._pinned is None:
            self._live_version = version
        if shell is None or version in self._captured or not wa.shell_is_build(shell, version):
            return
        self._captured.add(version)
        task = asyncio.create_task(self._capture(shell, version), name=f"webcache-{version}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _capture(self, shell: bytes, version: str) -> None:
        try:
            await asyncio.to_thread(self._write, version, shell)
        except OSError as exc:
            self._captured.discard(version)  # a later load tries again
            log.warning("could not keep WhatsApp Web %s: %s", version, exc)
            return
        if self._pinned is None and version == self.wanted and version not in self._refused:
            self._pin(version, shell, "local")

    def refused(self, version: str | None) -> None:
        """A page of ``version`` got ``DEPRECATED_VERSION``: if that is the pinned build (or the
        build is unknown), drop the pin for this process; pages load the live build from now on."""
        if version is not None:
            self._refused.add(version)
        pinned = self.pinned_version
        if pinned is None or (version is not None and version != pinned):
            return
        self._refused.add(pinned)
        self._pinned = None
        metrics.WEB_VERSION_UNPINNED.inc()
        log.warning("WhatsApp Web %s is deprecated: no longer pinned; loading the live build", pinned)

    async def idle(self) -> None:
        """Wait for the captures in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.fetch_timeout_s)

    # ----- files (called in a thread)
    def _read(self, version: str) -> bytes | None:
        try:
            return self.path(version).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, version: str, html: bytes) -> Path:
        path = self.path(version)
        make_private_dirs(self.directory)
        write_private_file(path, html)
        log.info("kept WhatsApp Web %s (%d bytes) in %s", version, len(html), path)
        return path
