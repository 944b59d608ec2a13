"""The simulator's aiohttp application: the WhatsApp Web page, its assets, and the APIs."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from simulator import page_api, phone_api
from simulator.httputil import MAX_BODY_BYTES, api_middleware
from simulator.keys import STATE
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
    return web.Response(
        body=request.app[ASSETS_KEY]["index.html"],
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound(reason="no such asset")
    return web.Response(
        body=request.app[ASSETS_KEY][name],
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
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/rsrc/{name}", asset)
    page_api.add_routes(app)
    phone_api.add_routes(app)
    return app
