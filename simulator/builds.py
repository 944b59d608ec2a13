"""WhatsApp Web builds: the app shell of each build, which build is current, which are deprecated.

The real origin ships a new build several times a day; the bootstrap HTML (the *app shell*) names
the build's script bundle, and the bundle carries the version that ``window.Debug.VERSION`` shows
(so an old HTML, pinned by a web version cache, runs the old build). The server refuses a build it
no longer supports: the page shows the update screen with socket state ``DEPRECATED_VERSION``.
``docs/whatsapp-web-2026.md`` ("Builds and the web version cache") gives the public sources.

Here every build's shell is ``static/index.html`` with the build's version in its asset URLs
(``/rsrc/<version>/wa.js``); ``wa.js`` is served with the version compiled in. The simulator keeps
the assets of every build it published (an old pinned shell still boots, to be refused by the
server if deprecated) until a build is *removed*: then its assets and its archive page answer 404,
as a build gone from ``static.whatsapp.net`` and from wa-version would, and a shell of it no
longer boots.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from simulator.state import SimError, SimState

VERSION_RE = re.compile(r"[0-9]{1,4}\.[0-9]{1,6}\.[0-9]{1,12}(?:-[a-z0-9]{1,16})?")
"""A build's version: ``2.3000.1031415926`` or ``2.3000.1014522270-alpha`` (wa-version's names)."""
FIRST_BUILD = "2.3000.1031415926-sim"
BUILD_PLACEHOLDER = "__SIM_BUILD__"
"""The token replaced by the build's version in ``index.html`` and ``wa.js``."""
MAX_RECORDED = 1000
"""The last this many app-shell requests and page boots are kept for ``GET /admin/builds``."""


def check_version(value: Any) -> str:
    if not isinstance(value, str) or VERSION_RE.fullmatch(value) is None:
        raise SimError(400, "invalid_request", "'version' must look like 2.3000.1031415926[-tag]")
    return value


@dataclass(slots=True)
class Build:
    version: str
    published_s: float
    deprecated: bool = False
    removed: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "published_s": self.published_s,
            "deprecated": self.deprecated,
            "removed": self.removed,
        }


class Builds:
    """The builds the simulator serves, and what pages asked for and booted."""

    def __init__(self, shell_template: bytes, bundle_template: bytes) -> None:
        self._shell = shell_template
        self._bundle = bundle_template
        self.builds: dict[str, Build] = {FIRST_BUILD: Build(FIRST_BUILD, time.time())}
        self.current = FIRST_BUILD
        self.shell_requests: list[dict[str, Any]] = []
        """App-shell requests served: ``{"path": path with query, "build": the build served}``."""
        self.boots: list[dict[str, Any]] = []
        """Pages that booted: ``{"build", "conn_id", "deprecated"}`` (the page names its build)."""
        self.device_build: dict[str, str] = {}
        """device id -> the build its page last reported (pushed ``DEPRECATED_VERSION`` on deprecation)."""

    # ----- what pages get
    def shell(self, path_qs: str) -> bytes:
        """The current build's app shell, for a request of ``path_qs``."""
        self._record(self.shell_requests, {"path": path_qs, "build": self.current})
        return self._shell.replace(BUILD_PLACEHOLDER.encode(), self.current.encode())

    def archived_shell(self, version: str) -> bytes | None:
        """A build's app shell as a wa-version archive keeps it (None: unknown or removed)."""
        build = self.builds.get(version)
        if build is None or build.removed:
            return None
        return self._shell.replace(BUILD_PLACEHOLDER.encode(), version.encode())

    def bundle(self, version: str | None) -> bytes | None:
        """``wa.js`` of a build (the current one for ``None``); None if the build is gone."""
        build = self.builds.get(version or self.current)
        if build is None or build.removed:
            return None
        return self._bundle.replace(f'"{BUILD_PLACEHOLDER}"'.encode(), f'"{build.version}"'.encode())

    def assets_available(self, version: str) -> bool:
        build = self.builds.get(version)
        return build is not None and not build.removed

    def booted(self, version: str, conn_id: str) -> dict[str, Any]:
        """A page of ``version`` boots: what the server says of its build."""
        build = self.builds.get(version)
        deprecated = build is None or build.deprecated or build.removed
        self._record(self.boots, {"build": version, "conn_id": conn_id, "deprecated": deprecated})
        return {"version": version, "deprecated": deprecated, "current": self.current}

    def note_device(self, device_id: str, version: str) -> None:
        self.device_build[device_id] = version

    def check_update(self, version: str) -> dict[str, Any]:
        """``/check-update?version=…&platform=web`` (the fields wa-version's checkUpdate.ts reads)."""
        build = self.builds.get(version)
        below_hard = build is None or build.deprecated or build.removed
        return {
            "isBroken": False,
            "isBelowSoft": below_hard or version != self.current,
            "isBelowHard": below_hard,
            "hardUpdateTime": None,
            "beta": None,
            "currentVersion": self.current,
        }

    # ----- the admin API
    def publish(
        self,
        state: SimState,
        version: str,
        *,
        current: bool,
        deprecated: bool,
        removed: bool,
        version_check: bool,
    ) -> Build:
        """Add or change a build. Deprecating (or removing) it pushes ``DEPRECATED_VERSION`` to the
        pages running it when ``version_check`` is on (the real page learns it from the server's
        version check and shows the update screen)."""
        build = self.builds.get(version)
        if build is None:
            build = self.builds[version] = Build(version, time.time())
        refused_before = build.deprecated or build.removed
        build.deprecated, build.removed = deprecated, removed
        if current and not (deprecated or removed):
            self.current = version
        elif self.current == version and (deprecated or removed):
            raise SimError(409, "current_build", "publish another current build before refusing this one")
        if version_check and (deprecated or removed) and not refused_before:
            for device_id, running in self.device_build.items():
                client = state.clients.get(device_id)
                if running == version and client is not None:
                    client.push("socket_state", state="DEPRECATED_VERSION", duration_ms=0)
        return build

    def summary(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "builds": [b.public() for b in self.builds.values()],
            "shell_requests": list(self.shell_requests),
            "boots": list(self.boots),
        }

    @staticmethod
    def _record(log: list[dict[str, Any]], entry: dict[str, Any]) -> None:
        log.append(entry)
        del log[:-MAX_RECORDED]
