"""The builds' HTTP surface: ``/admin/builds``, ``/check-update`` and a wa-version archive.

``GET /admin/builds`` lists the builds, the current one, the app-shell requests served and the
pages that booted; ``POST /admin/builds`` ``{"version", "current"?, "deprecated"?, "removed"?}``
publishes or changes a build. ``GET /wa-version/html/{version}.html`` serves a build's shell the
way ``https://raw.githubusercontent.com/wppconnect-team/wa-version/main/html/{version}.html`` does
(404 once removed, as wa-version deletes expired versions).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from simulator.builds import check_version
from simulator.httputil import json_response, read_json, req_param
from simulator.keys import BUILDS, STATE
from simulator.state import SimError

APP_SHELL_PATHS = ("/", "/send", "/accept")
"""Paths of the origin that answer with the app shell (any query): ``/`` (also
``/?post_logout=1&logout_reason=…`` after a logout), ``/send`` (click-to-chat,
``/send?phone=…&text=…``) and ``/accept`` (group invites, ``/accept?code=…``)."""


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise SimError(400, "invalid_request", f"{key!r} must be a boolean")
    return value


async def get_builds(request: web.Request) -> web.Response:
    return json_response(request.app[BUILDS].summary())


async def post_builds(request: web.Request) -> web.Response:
    body = await read_json(request)
    state = request.app[STATE]
    build = request.app[BUILDS].publish(
        state,
        check_version(body.get("version")),
        current=_flag(body, "current", not body.get("deprecated") and not body.get("removed")),
        deprecated=_flag(body, "deprecated", False),
        removed=_flag(body, "removed", False),
        version_check=state.profile.version_check,
    )
    return json_response({**build.public(), "current": request.app[BUILDS].current})


async def check_update(request: web.Request) -> web.Response:
    return json_response(request.app[BUILDS].check_update(check_version(req_param(request, "version"))))


async def archived_html(request: web.Request) -> web.Response:
    html = request.app[BUILDS].archived_shell(check_version(request.match_info["version"]))
    if html is None:
        raise web.HTTPNotFound(reason="no such version")
    return web.Response(body=html, content_type="text/html", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/builds", get_builds)
    app.router.add_post("/admin/builds", post_builds)
    app.router.add_get("/check-update", check_update)
    app.router.add_get("/wa-version/html/{version}.html", archived_html)
