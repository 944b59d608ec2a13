"""The gateway's own routes: health, cluster health, metrics, the API docs and the dashboard."""

from __future__ import annotations

import time
from functools import cache
from importlib import resources

import orjson
from aiohttp import web
from prometheus_async.aio.web import server_stats

from gateway import openapi
from gateway.auth import is_local_visit
from gateway.health import cluster_view
from gateway.keys import HEALTH, MEMBERSHIP, RING, SETTINGS, STARTED_AT, STREAMS
from shared.web import json_response

CONFIG_MARK = "/*__WALINK_CONFIG__*/null"


async def health(request: web.Request) -> web.Response:
    """This gateway: it answers while it runs; ``degraded`` when it cannot serve everything."""
    app = request.app
    membership = app[MEMBERSHIP]
    workers = membership.all()
    checker = app[HEALTH]
    up = membership.up_count()
    taking = len(app[RING].nodes)
    status = "healthy" if up and taking and checker.redis_ok else "degraded"
    return json_response(
        {
            "status": status,
            "role": "gateway",
            "uptime": round(time.monotonic() - app[STARTED_AT], 3),
            "workers": {"total": len(workers), "up": up, "taking_sessions": taking},
            "redis": checker.redis_ok,
            "health_rounds": checker.rounds,
            "open_streams": len(app[STREAMS]),
        }
    )


async def cluster_health(request: web.Request) -> web.Response:
    app = request.app
    app[HEALTH].sync()
    return json_response(cluster_view(app[MEMBERSHIP], app[RING]))


async def metrics_endpoint(request: web.Request) -> web.Response:
    request.app[HEALTH].sync()  # gauges as of now
    response: web.Response = await server_stats(request)
    return response


@cache
def _openapi_json() -> bytes:
    return orjson.dumps(openapi.document())


@cache
def _docs_html() -> str:
    return openapi.render_html(openapi.document())


async def openapi_json(_request: web.Request) -> web.Response:
    return web.Response(body=_openapi_json(), content_type="application/json")


async def docs(_request: web.Request) -> web.Response:
    return web.Response(text=_docs_html(), content_type="text/html")


@cache
def _dashboard_template() -> str:
    return resources.files("gateway").joinpath("static/dashboard.html").read_text(encoding="utf-8")


async def dashboard(request: web.Request) -> web.Response:
    """The try-it page; in development (``dev_api_key`` set) its key field comes filled in, but
    only for a local visit (:func:`is_local_visit`): everyone else signs in with a key."""
    settings = request.app[SETTINGS]
    config = {
        "dev_api_key": (settings.dev_api_key or None) if is_local_visit(request) else None,
        "simulator_url": settings.simulator_url if settings.target == "simulator" else None,
    }
    # '</' cannot appear inside the JSON, so the value cannot end the <script> element early
    blob = orjson.dumps(config).decode().replace("</", "<\\/")
    html = _dashboard_template().replace(CONFIG_MARK, blob)
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def favicon(_request: web.Request) -> web.Response:
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", dashboard)
    r.add_get("/favicon.ico", favicon)
    r.add_get("/health", health)
    r.add_get("/health/cluster", cluster_health)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/openapi.json", openapi_json)
    r.add_get("/docs", docs)
