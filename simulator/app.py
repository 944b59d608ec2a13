"""The simulator's aiohttp application: the WhatsApp Web page, its assets, and the APIs."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from simulator import builds_api, page_api, phone_api
from simulator.builds import Builds
from simulator.httputil import MAX_BODY_BYTES, api_middleware
from simulator.keys import BUILDS, STATE
from simulator.profiles import DEFAULT_PROFILE, PROFILES
from simulator.state import SimState

_ASSETS = {
    "wa.js": "application/javascript",
    "wa.css": "text/css",
}
ASSETS_KEY = web.AppKey("simulator_assets", dict[str, bytes])


STATIC_DIR = Path(__file__).resolve().parent / "static"


def _load(name: str) -> bytes:
    # A path relative to the module (not importlib.resources): it also works when an editable
    # install registered ``simulator`` as a namespace package.
    return (STATIC_DIR / name).read_bytes()


async def index(request: web.Request) -> web.Response:
    """The app shell of the current build (every app-shell path: ``builds_api.APP_SHELL_PATHS``)."""
    return web.Response(
        body=request.app[BUILDS].shell(request.path_qs),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if name not in _ASSETS:
        raise web.HTTPNotFound(reason="no such asset")
    builds = request.app[BUILDS]
    if version is not None and not builds.assets_available(version):
        raise web.HTTPNotFound(reason="no such build")
    body = builds.bundle(version) if name == "wa.js" else request.app[ASSETS_KEY][name]
    if body is None:
        raise web.HTTPNotFound(reason="no such build")
    return web.Response(
        body=body,
        content_type=_ASSETS[name],
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def favicon(_request: web.Request) -> web.Response:
    return web.Response(status=204)


def create_app(profile: str = DEFAULT_PROFILE) -> web.Application:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    app = web.Application(
        middlewares=[api_middleware],
        client_max_size=MAX_BODY_BYTES,
        # a long-poll whose client went away is cancelled at once instead of waiting out its 20 s
        handler_args={"handler_cancellation": True},
    )
    app[STATE] = SimState(PROFILES[profile])
    app[ASSETS_KEY] = {name: _load(name) for name in ("index.html", *_ASSETS)}
    app[BUILDS] = Builds(app[ASSETS_KEY]["index.html"], app[ASSETS_KEY]["wa.js"])
    for path in builds_api.APP_SHELL_PATHS:
        app.router.add_get(path, index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/rsrc/{name}", asset)
    app.router.add_get("/rsrc/{version}/{name}", asset)
    builds_api.add_routes(app)
    page_api.add_routes(app)
    phone_api.add_routes(app)
    return app
