"""The worker's HTTP routes: the session API (README, OpenAPI), health, metrics and the try-it page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_async.aio.web import server_stats

from shared import metrics, outbox, webhook_config, webhook_guard
from shared import passkeys as passkey_wire
from shared.errors import BadRequest, DatabaseUnavailable, InvalidState, Unauthorized
from shared.ids import check_new_session_id, check_session_id, normalize_phone
from shared.inputs import MAX_WEBHOOK_URL_CHARS, check_create_body, check_workspace_id, optional_text
from shared.models import ENDED, SessionStatus
from shared.settings import Settings
from shared.web import (
    DEFAULT_WORKSPACE,
    DRIVER_HEADER,
    WORKSPACE_HEADER,
    check_keys,
    json_response,
    read_json_object,
)
from worker import qr_image, sse
from worker.context import DB_ERRORS
from worker.keys import DISPATCHER, MANAGER, POOL, PSS, QUEUE, REMOTE_STREAMS, SETTINGS, STARTED_AT
from worker.session import Session
from worker.sessions import SessionManager


def _driver_headers(manager: SessionManager, sid: str, body: dict[str, Any]) -> dict[str, str]:
    driver = body.get("worker")
    if manager.local(sid) is not None or not driver or driver == manager.name:
        return {}
    if body.get("status") in ENDED:  # StrEnum: the JSON string compares equal
        return {}
    return {DRIVER_HEADER: str(driver)}


PUBLIC_PATHS = frozenset({"/", "/health", "/metrics", "/dashboard/config"})


def _workspace(request: web.Request) -> str | None:
    """The workspace the caller may see (set by the gateway); None = this worker's own operator."""
    value = request.headers.get(WORKSPACE_HEADER)
    return None if value is None else check_workspace_id(value, WORKSPACE_HEADER)


def _session_id(request: web.Request) -> str:
    return check_session_id(request.match_info["session_id"])


async def _session(request: web.Request) -> Session:
    """A session this worker drives (taking over a hibernated or orphaned one)."""
    return await request.app[MANAGER].for_command(_session_id(request), _workspace(request))


def _links_for(session_id: str) -> dict[str, str]:
    base = f"/v1/sessions/{session_id}"
    return {"qr_url": base + "/qr", "events_url": base + "/events"}


def _links(session: Session) -> dict[str, str]:
    return _links_for(session.id)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[SETTINGS].internal_token
    if token and request.path not in PUBLIC_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong bearer token")
    response: web.StreamResponse = await handler(request)
    return response


async def create_session(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    data = await read_json_object(request, max_bytes=settings.max_body_bytes)
    body = check_create_body(data)  # every field checked before anything is written or started
    caller_ws = _workspace(request)
    workspace_id = body.workspace_id or caller_ws or DEFAULT_WORKSPACE
    if caller_ws is not None and workspace_id != caller_ws:
        raise BadRequest("workspace_id does not match the caller's workspace")
    if body.webhook_url is not None:
        webhook_guard.check_url(body.webhook_url, _webhook_allow(settings))
    if body.id is not None:  # made by the gateway, or chosen in the workspace's namespace
        check_new_session_id(body.id, workspace_id)
    session = await request.app[MANAGER].create(
        session_id=body.id,
        workspace_id=workspace_id,
        label=body.label,
        webhook_url=body.webhook_url,
        metadata=body.metadata,
        webhook_events=body.events,
    )
    reply = {"id": session.id, "status": session.status.value, **_links(session)}
    return json_response(reply, status=201, headers={"Location": f"/v1/sessions/{session.id}"})


async def list_sessions(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    items = [s.public(manager.name) for s in manager.in_workspace(_workspace(request))]
    return json_response({"sessions": items})


async def get_session(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    sid = _session_id(request)
    body = await manager.describe(sid, _workspace(request))
    body.update(_links_for(sid))
    session = manager.local(sid)
    if session is not None and session.pairing_code and session.status.value == "qr":
        body["pairing_code"] = session.pairing_code
    return json_response(body, headers=_driver_headers(manager, sid, body))


def _qr_format(request: web.Request) -> str:
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in {"png", "svg", "raw", "json"}:
            raise BadRequest("format must be png, svg or raw")
        return "raw" if fmt == "json" else fmt
    accept = request.headers.get("Accept", "")
    if "image/png" in accept:
        return "png"
    if "image/svg+xml" in accept:
        return "svg"
    return "raw"


async def get_qr(request: web.Request) -> web.Response:
    session = await _session(request)
    fmt = _qr_format(request)
    if session.qr is None:
        if session.pairing_code:
            raise InvalidState("no QR while a pairing code is active (DELETE …/pairing-code to go back)")
        raise InvalidState(f"no QR to show: the session is {session.status.value}")
    headers = {"Cache-Control": "no-store"}
    if fmt == "png":
        return web.Response(body=qr_image.png(session.qr), content_type="image/png", headers=headers)
    if fmt == "svg":
        return web.Response(body=qr_image.svg(session.qr), content_type="image/svg+xml", headers=headers)
    return json_response(
        {"qr": session.qr, "expires_at_ms": session.qr_expires_at_ms, "n": session.qr_count}, headers=headers
    )


async def session_events(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    sid = _session_id(request)
    keepalive_s = request.app[SETTINGS].sse_keepalive_s
    workspace = _workspace(request)
    session = manager.local(sid, workspace)
    if session is not None:
        session.touch()
        manager.wake_soon(session)  # a request for a hibernated session wakes it
    else:
        body = await manager.describe(sid, workspace)
        session = manager.local(sid)  # taken over here; else not driven by this worker
        if session is None:
            return await _stream_remote(request, manager, sid, body, keepalive_s)
    return await sse.stream_local(request, session, manager.store.pool, keepalive_s=keepalive_s)


async def _stream_remote(
    request: web.Request, manager: SessionManager, sid: str, body: dict[str, Any], keepalive_s: float
) -> web.StreamResponse:
    """The events of a session another worker drives (Redis pub/sub, the outbox as the record)."""
    durable = manager.durable
    driver = _driver_headers(manager, sid, body)
    task = asyncio.current_task()
    streams = request.app[REMOTE_STREAMS]
    if task is not None:
        streams.add(task)  # ended at shutdown (local streams end with their sessions' subscribers)
    try:
        return await sse.stream_remote(
            request,
            sid,
            str(body["status"]),
            manager.store.pool,
            durable.redis,
            durable.keys.events(sid),
            keepalive_s=keepalive_s,
            headers=driver,
        )
    finally:
        if task is not None:
            streams.discard(task)


async def pairing_code(request: web.Request) -> web.Response:
    session = await _session(request)
    data = await read_json_object(request, max_bytes=request.app[SETTINGS].max_body_bytes)
    check_keys(data, {"phone_number"})
    phone = normalize_phone(data.get("phone_number"))
    code = await request.app[MANAGER].pairing_code(session, phone)
    return json_response({"code": code, "phone_number": phone})


async def cancel_pairing_code(request: web.Request) -> web.Response:
    """Back from the pairing code to the QR: the session's next ``qr`` event carries the new QR."""
    session = await _session(request)
    await request.app[MANAGER].back_to_qr(session)
    return json_response({"id": session.id, "status": session.status.value, **_links(session)}, status=202)


async def _passkey_answer(request: web.Request, session: Session, token: str | None) -> web.Response:
    data = await read_json_object(request, max_bytes=request.app[SETTINGS].max_body_bytes)
    session = await request.app[MANAGER].answer_passkey(session, data, token)
    waiting = session.status == SessionStatus.PASSKEY_REQUIRED
    body = {"id": session.id, "status": session.status.value, "reason": session.reason}
    return json_response(body, status=202 if waiting else 200)


async def answer_passkey(request: web.Request) -> web.Response:
    """The user's passkey assertion (``AuthenticationResponseJSON``) for the session's page."""
    return await _passkey_answer(request, await _session(request), None)


def _passkey_token(request: web.Request) -> str:
    return request.match_info["token"]


async def get_passkey_by_token(request: web.Request) -> web.Response:
    """The pending passkey request a one-time token names (the extension reads it; no API key)."""
    token = _passkey_token(request)
    _session_of, pending = request.app[MANAGER].by_passkey_token(token)
    body = {
        "public_key": pending.options,
        "expires_at_ms": pending.expires_at_ms,
        "origin": passkey_wire.WHATSAPP_ORIGIN,
    }
    return json_response(body, headers={"Cache-Control": "no-store"})


async def answer_passkey_by_token(request: web.Request) -> web.Response:
    token = _passkey_token(request)
    session, _pending = request.app[MANAGER].by_passkey_token(token)
    return await _passkey_answer(request, session, token)


async def restart_session(request: web.Request) -> web.Response:
    session = await request.app[MANAGER].restart(await _session(request))
    return json_response({"id": session.id, "status": session.status.value, **_links(session)}, status=202)


async def logout_session(request: web.Request) -> web.Response:
    session = await request.app[MANAGER].logout(await _session(request))
    return json_response({"id": session.id, "status": session.status.value, "reason": session.reason})


async def delete_session(request: web.Request) -> web.Response:
    await request.app[MANAGER].delete(await _session(request))
    return web.Response(status=204)


def _scope(request: web.Request) -> str:
    """The workspace of a listing: the caller's (gateway header), else ``?workspace_id=``."""
    caller = _workspace(request)
    asked = request.query.get("workspace_id")
    if caller is not None and asked is not None and asked != caller:
        raise BadRequest("workspace_id does not match the caller's workspace")
    return check_workspace_id(caller or asked or DEFAULT_WORKSPACE)


def _int_query(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


@contextlib.asynccontextmanager
async def _reading_postgres(request: web.Request, what: str) -> AsyncIterator[None]:
    """A read of Postgres for a route, bounded by ``db_timeout_s``: while Postgres cannot be
    reached the answer is 503 ``database_unavailable`` (nothing changed; retry), not a 500."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].db_timeout_s):
            yield
    except DB_ERRORS as exc:
        raise DatabaseUnavailable(
            f"{what} cannot be read now (Postgres: {type(exc).__name__}); retry"
        ) from exc


async def list_accounts(request: web.Request) -> web.Response:
    store = request.app[MANAGER].store
    async with _reading_postgres(request, "the accounts"):
        rows = await store.list_accounts(_scope(request))
    accounts = [
        {
            "id": r["id"],
            "status": r["account_status"],
            "session_status": r["status"],
            "phone_number": r["phone_number"],
            "push_name": r["push_name"],
            "is_primary": r["is_primary"],
            "label": r["label"],
            "metadata": r["metadata"],
            "created_at_ms": r.get("created_at"),
            "updated_at_ms": r.get("updated_at"),
        }
        for r in rows
    ]
    return json_response({"accounts": accounts})


async def list_events(request: web.Request) -> web.Response:
    after = _int_query(request, "after", 0, low=0, high=2**62)
    limit = _int_query(request, "limit", 100, low=1, high=1000)
    pool = request.app[MANAGER].store.pool
    async with _reading_postgres(request, "the event feed"):
        events = await outbox.events_after(pool, workspace_id=_scope(request), after_id=after, limit=limit)
    next_after = events[-1]["id"] if events else after
    return json_response({"events": events, "next_after": next_after})


async def replay_webhooks(request: web.Request) -> web.Response:
    data = await read_json_object(request, max_bytes=request.app[SETTINGS].max_body_bytes)
    check_keys(data, {"event_ids"})
    event_ids = data.get("event_ids")
    if event_ids is not None and (
        not isinstance(event_ids, list)
        or not all(isinstance(e, str) for e in event_ids)
        or len(event_ids) > 1000
    ):
        raise BadRequest("event_ids must be a list of at most 1000 event ids")
    replayed = await request.app[DISPATCHER].replay(workspace_id=_scope(request), event_ids=event_ids)
    return json_response({"replayed": replayed})


# ---------------------------------------------------------------------------------- webhook configuration
def _webhook_allow(settings: Settings) -> webhook_guard.WebhookAllow:
    return webhook_guard.WebhookAllow.parse(settings.webhook_allow)  # checked at start: cannot fail here


async def get_webhook(request: web.Request) -> web.Response:
    pool = request.app[MANAGER].store.pool
    return json_response(await webhook_config.read_config(pool, _scope(request)))


async def put_webhook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    data = await read_json_object(request, max_bytes=settings.max_body_bytes)
    check_keys(data, {"url"})
    if "url" not in data:
        raise BadRequest("url is required (null clears it)")
    url = optional_text(data, "url", max_len=MAX_WEBHOOK_URL_CHARS)
    if url is not None:
        webhook_guard.check_url(url, _webhook_allow(settings))
    pool = request.app[MANAGER].store.pool
    return json_response(await webhook_config.set_url(pool, _scope(request), url))


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    pool = request.app[MANAGER].store.pool
    body = await webhook_config.rotate_secret(
        pool, _scope(request), overlap_s=settings.webhook_secret_overlap_s
    )
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


async def get_session_webhook_events(request: web.Request) -> web.Response:
    sid = _session_id(request)
    pool = request.app[MANAGER].store.pool
    events = await webhook_config.session_events_filter(pool, _workspace(request), sid)
    return json_response({"id": sid, "events": events})


async def put_session_webhook_events(request: web.Request) -> web.Response:
    sid = _session_id(request)
    data = await read_json_object(request, max_bytes=request.app[SETTINGS].max_body_bytes)
    check_keys(data, {"events"})
    if "events" not in data:
        raise BadRequest("events is required (null: every event type)")
    events = webhook_config.check_event_filter(data["events"])
    pool = request.app[MANAGER].store.pool
    stored = await webhook_config.set_session_events(pool, _workspace(request), sid, events)
    return json_response({"id": sid, "events": stored})


async def event_deliveries(request: web.Request) -> web.Response:
    pool = request.app[MANAGER].store.pool
    return json_response(
        await webhook_config.deliveries(pool, _scope(request), request.match_info["event_id"])
    )


def _own_rss_pages() -> int:
    with open("/proc/self/statm") as fh:  # procfs: answers from memory, never blocks
        return int(fh.read().split()[1])


async def memory_info(app: web.Application) -> dict[str, int]:
    """This process's RSS and its browsers' PSS (walked in the background, see ``PssGauge``)."""
    manager = app[MANAGER]
    pss = await app[PSS].read(lambda: {slot.pid for slot in manager.browsers() if slot.pid})
    return {"rss": _own_rss_pages() * os.sysconf("SC_PAGE_SIZE"), "browsers_pss": pss}


async def health(request: web.Request) -> web.Response:
    app = request.app
    manager = app[MANAGER]
    sessions = manager.stats()
    queue = app[QUEUE].stats()
    pool = app[POOL].stats()
    memory = await memory_info(app)
    metrics.BROWSER_MEMORY.set(memory["browsers_pss"])
    status = "shutting_down" if manager.closing else "healthy"
    body = {
        "status": status,
        "uptime": round(time.monotonic() - app[STARTED_AT], 3),
        "memory": memory,
        "sessions": sessions,
        "performance": manager.performance(),
        "queue": queue,
        "pool": pool,
        "worker": {
            "name": manager.name,
            "pid": os.getpid(),
            "chromium": manager.launcher.version,
            "browsers_launched": manager.launcher.launched_total,
        },
        "redis": "ok" if manager.durable.redis_ok else "unreachable",
        # the WhatsApp Web build this worker's browsers load (worker/web_cache.py)
        "web_version": manager.launcher.web_cache.served().to_dict(),
        "webhooks": {"dispatcher_listening": app[DISPATCHER].is_listening()},
    }
    return json_response(body, status=503 if manager.closing else 200)


async def metrics_endpoint(request: web.Request) -> web.Response:
    app = request.app
    manager = app[MANAGER]
    by_status = manager.stats()["by_status"]
    for status in SessionStatus:  # every status, so one that emptied reads 0, not its last value
        metrics.SESSIONS.labels(status.value).set(by_status.get(status.value, 0))
    metrics.BROWSER_MEMORY.set((await memory_info(app))["browsers_pss"])
    queue = app[QUEUE]
    metrics.QUEUE_ACTIVE.set(queue.active)
    metrics.QUEUE_WAITING.set(queue.waiting)
    metrics.POOL_READY.set(app[POOL].stats()["ready"])
    metrics.BROWSERS.set(len(manager.browsers()))
    response: web.Response = await server_stats(request)
    return response


async def dashboard(_request: web.Request) -> web.Response:
    html = resources.files("worker").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def dashboard_config(request: web.Request) -> web.Response:
    settings: Settings = request.app[SETTINGS]
    return json_response(
        {"simulator_url": settings.simulator_url if settings.target == "simulator" else None}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", dashboard)
    app.router.add_get("/dashboard/config", dashboard_config)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_get("/v1/sessions/{session_id}/qr", get_qr)
    app.router.add_get("/v1/sessions/{session_id}/events", session_events)
    app.router.add_post("/v1/sessions/{session_id}/pairing-code", pairing_code)
    app.router.add_delete("/v1/sessions/{session_id}/pairing-code", cancel_pairing_code)
    app.router.add_post("/v1/sessions/{session_id}/passkey", answer_passkey)
    app.router.add_get(passkey_wire.TOKEN_PATH, get_passkey_by_token)
    app.router.add_post(passkey_wire.TOKEN_PATH, answer_passkey_by_token)
    app.router.add_post("/v1/sessions/{session_id}/restart", restart_session)
    app.router.add_post("/v1/sessions/{session_id}/logout", logout_session)
    app.router.add_get("/v1/accounts", list_accounts)
    app.router.add_get("/v1/events", list_events)
    app.router.add_post("/v1/webhooks/replay", replay_webhooks)
    app.router.add_get("/v1/webhook", get_webhook)
    app.router.add_put("/v1/webhook", put_webhook)
    app.router.add_post("/v1/webhook/secret", rotate_webhook_secret)
    app.router.add_get("/v1/sessions/{session_id}/webhook-events", get_session_webhook_events)
    app.router.add_put("/v1/sessions/{session_id}/webhook-events", put_session_webhook_events)
    app.router.add_get("/v1/events/{event_id}/deliveries", event_deliveries)
