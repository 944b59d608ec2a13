"""The public session API: each route checked, scoped to the caller's workspace, and proxied.

The gateway names new sessions itself (``shared.ids.new_session_id()``, or the client's checked
``id``) so that it can place them on the ring and retry their creation safely: the id makes the
create idempotent, and a ``409`` after a retry means an earlier attempt landed — the answer is
then the session as it is.

A client-chosen id must be in the caller's workspace's namespace (``<workspace>.<name>``, see
:mod:`shared.ids`), so a ``409`` only ever speaks of the caller's own sessions; an id in another
workspace's namespace is answered ``404`` by the gateway itself, exactly as an unknown id, without
asking any worker (nothing about it can differ: body, headers or time).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import NoWorkerAvailable
from gateway.keys import CALLER, MEMBERSHIP, PROXY, QUOTAS, ROUTER, SETTINGS, STREAMS
from gateway.proxy import WORKER_HEADER, Answer, Call, forward_headers, to_response
from gateway.quotas import LIMIT_FIELDS, MAX_LIMIT, Admission
from gateway.routing import Kind, Plan
from gateway.sse import STARTED_AT, relay
from shared import metrics, passkeys
from shared.errors import BadRequest, EventNotFound, Forbidden, SessionNotFound, WalinkError
from shared.ids import check_chosen_session_id, check_session_id, namespace_of, new_session_id
from shared.inputs import check_create_body
from shared.web import DEFAULT_WORKSPACE, Handler, check_keys, json_response, read_json_object

LIST_TIMEOUT_S = 5.0


def _query(request: web.Request) -> str:
    """The query string as it came, still percent-encoded (it goes on the wire to a worker)."""
    raw = request.rel_url.raw_query_string
    return f"?{raw}" if raw else ""


def _visible_session_id(request: web.Request) -> str:
    """The route's session id, checked; one in another workspace's namespace is not found (404),
    with the very answer a worker gives for an id that does not exist."""
    session_id = check_session_id(request.match_info["session_id"])
    caller = request[CALLER]
    namespace = namespace_of(session_id)
    if not caller.is_admin and namespace is not None and namespace != caller.workspace_id:
        raise SessionNotFound(f"no session {session_id}")
    return session_id


def _session_plan(request: web.Request, session_id: str) -> Plan:
    return Plan(request.app[ROUTER], Kind.SESSION, session_id)


async def _forward(request: web.Request, call: Call, plan: Plan) -> Answer:
    return await request.app[PROXY].forward(call, plan)


async def _pass_on(
    request: web.Request, path: str, workspace_id: str | None, plan: Plan, *, idempotent: bool
) -> Answer:
    """The request as it came (its query string; its body on POST and PUT) to ``path`` on a worker."""
    # at most max_body_bytes, else 413
    body = await request.read() if request.method in {"POST", "PUT"} else None
    headers = forward_headers(request, workspace_id)
    call = Call(request.method, path + _query(request), headers, body, idempotent)
    return await _forward(request, call, plan)


class _Answering(Protocol):
    def __call__(self, request: web.Request, path: str, /, *, idempotent: bool) -> Awaitable[Answer]: ...


def _forwarding(answering: _Answering, path: str, *, idempotent: bool) -> Handler:
    """A route that only forwards: the worker's answer to ``answering(request, path)`` as is."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return to_response(await answering(request, path, idempotent=idempotent))

    return handler


# ---------------------------------------------------------------------------------- quotas
def _quota_workspace(workspace_id: str | None) -> str:
    """The workspace a session will be in (a worker puts one of no workspace in the default)."""
    workspace = workspace_id or DEFAULT_WORKSPACE
    if "\x00" in workspace:
        raise BadRequest("workspace_id must not contain NUL")
    return workspace


def _outcome(status: int, *, ok: int) -> bool | None:
    """Did the call create what its admission reserved: yes, no, or None (it may still land:
    an upstream error or timeout after the request may have reached a worker)?"""
    if status == ok:
        return True
    return None if status >= 500 and status != 503 else False


async def _release(request: web.Request, admission: Admission, created: bool | None, *, settle: bool) -> None:
    # shielded: a client that leaves must not leave the reservation to run out its time
    await asyncio.shield(request.app[QUOTAS].release(admission, created=created, settle=settle))


# ---------------------------------------------------------------------------------- sessions
async def create_session(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    caller = request[CALLER]
    data = await read_json_object(request, max_bytes=settings.max_body_bytes)
    body = check_create_body(data)  # refused here whole: nothing reaches a worker that would fail there
    workspace_id = caller.scope(body.workspace_id)
    given = body.id
    if given is not None:  # in the namespace of the workspace the session is made in
        session_id = check_chosen_session_id(given, workspace_id or DEFAULT_WORKSPACE)
    else:
        session_id = new_session_id()
    admission = await request.app[QUOTAS].admit(_quota_workspace(workspace_id), session_id, take_token=True)
    created: bool | None = None
    try:
        response = await _create(request, data, workspace_id, session_id)
        created = _outcome(response.status, ok=201)
    except NoWorkerAvailable:
        created = False  # no worker got it
        raise
    finally:
        await _release(request, admission, created, settle=False)
    response.headers.update(admission.headers())
    return response


async def _create(
    request: web.Request, data: dict[str, Any], workspace_id: str | None, session_id: str
) -> web.Response:
    data["id"] = session_id
    if workspace_id is not None:
        data["workspace_id"] = workspace_id
    headers = forward_headers(request, workspace_id)
    headers["Content-Type"] = "application/json"
    call = Call("POST", "/v1/sessions", headers, orjson.dumps(data), idempotent=True)
    answer = await _forward(request, call, Plan(request.app[ROUTER], Kind.NEW, session_id))
    if answer.status == 409 and answer.code in {"session_exists", "not_owner"} and answer.maybe_landed:
        # an earlier attempt created it: answer with the session as it is now
        get = Call(
            "GET", f"/v1/sessions/{session_id}", forward_headers(request, workspace_id), idempotent=True
        )
        existing = await _forward(request, get, _session_plan(request, session_id))
        if existing.status == 200:
            response = to_response(existing)
            response.set_status(201)
            response.headers["Location"] = f"/v1/sessions/{session_id}"
            return response
    return to_response(answer)


async def _session_answer(request: web.Request, suffix: str, *, idempotent: bool) -> Answer:
    """A session's route (``suffix`` after its id), routed to the session's owner."""
    session_id = _visible_session_id(request)
    workspace_id = request[CALLER].scope(request.query.get("workspace_id"), own_by_default=False)
    path = f"/v1/sessions/{session_id}{suffix}"
    return await _pass_on(
        request, path, workspace_id, _session_plan(request, session_id), idempotent=idempotent
    )


def _as_not_found(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """A 404 of a session route tells a workspace key nothing of where it was looked up: which
    worker answers an id depends on whether some workspace's session holds a lease on it."""
    if response.status == 404 and not request[CALLER].is_admin:
        response.headers.pop(WORKER_HEADER, None)
    return response


def _session_forwarding(suffix: str, *, idempotent: bool) -> Handler:
    """A session route that only forwards (see :func:`_forwarding`), its 404 as an unknown id's."""
    forwarding = _forwarding(_session_answer, suffix, idempotent=idempotent)

    async def handler(request: web.Request) -> web.StreamResponse:
        return _as_not_found(request, await forwarding(request))

    return handler


get_session = _session_forwarding("", idempotent=True)


async def delete_session(request: web.Request) -> web.StreamResponse:
    answer = await _session_answer(request, "", idempotent=True)
    if answer.status == 404 and answer.maybe_landed:
        # an earlier attempt may have deleted it: for the client the delete happened
        return web.Response(status=204, headers={WORKER_HEADER: answer.worker.name})
    return _as_not_found(request, to_response(answer))


get_qr = _session_forwarding("/qr", idempotent=True)
pairing_code = _session_forwarding("/pairing-code", idempotent=False)
cancel_pairing_code = _session_forwarding("/pairing-code", idempotent=False)


async def restart_session(request: web.Request) -> web.StreamResponse:
    """A restart brings the session (back) to linking: it is admitted like a create, without a
    token of the create rate (an ended session becomes live again; a ready one links anew)."""
    session_id = _visible_session_id(request)
    quotas = request.app[QUOTAS]
    workspace_id = request[CALLER].scope(request.query.get("workspace_id"), own_by_default=False)
    if workspace_id is None:  # an admin across workspaces: the session's own
        workspace_id = await quotas.workspace_of(session_id)
    if workspace_id is None:  # no such session: the worker says so
        return _as_not_found(
            request, to_response(await _session_answer(request, "/restart", idempotent=False))
        )
    admission = await quotas.admit(_quota_workspace(workspace_id), session_id, take_token=False)
    created: bool | None = None
    try:
        answer = await _session_answer(request, "/restart", idempotent=False)
        created = _outcome(answer.status, ok=202)
    except NoWorkerAvailable:
        created = False
        raise
    finally:
        await _release(request, admission, created, settle=True)
    return _as_not_found(request, to_response(answer))


logout_session = _session_forwarding("/logout", idempotent=False)
answer_passkey = _session_forwarding("/passkey", idempotent=False)


async def _passkey_token_answer(request: web.Request, path: str, *, idempotent: bool) -> Answer:
    """A token-scoped passkey route (no API key: the token authorises), routed to the owner of
    the session the token names; the worker checks the token itself."""
    token = request.match_info["token"]
    session_id = passkeys.session_of_token(token)
    return await _pass_on(request, path, None, _session_plan(request, session_id), idempotent=idempotent)


async def passkey_by_token(request: web.Request) -> web.StreamResponse:
    token = request.match_info["token"]
    idempotent = request.method == "GET"
    answer = await _passkey_token_answer(request, f"/v1/passkey/{token}", idempotent=idempotent)
    response = to_response(answer)
    response.headers.pop(WORKER_HEADER, None)  # an end user's browser learns nothing of the cluster
    return response


async def session_events(request: web.Request) -> web.StreamResponse:
    session_id = _visible_session_id(request)
    workspace_id = request[CALLER].scope(request.query.get("workspace_id"), own_by_default=False)
    path = f"/v1/sessions/{session_id}/events{_query(request)}"
    streams = request.app[STREAMS]
    with streams.slot(workspace_id):  # held until the stream ends
        response = await relay(
            request,
            request.app[PROXY],
            _session_plan(request, session_id),
            path,
            forward_headers(request, workspace_id),
            streams,
        )
    return _as_not_found(request, response)


async def list_sessions(request: web.Request) -> web.Response:
    """The sessions every reachable worker drives now, merged (each worker knows its own)."""
    workspace_id = request[CALLER].scope(request.query.get("workspace_id"))
    proxy = request.app[PROXY]
    headers = proxy.worker_headers(forward_headers(request, workspace_id))
    workers = [w for w in request.app[MEMBERSHIP].all() if w.routable()]
    timeout = aiohttp.ClientTimeout(total=min(LIST_TIMEOUT_S, request.app[SETTINGS].proxy_timeout_s))

    async def one(url: str) -> list[dict[str, Any]]:
        async with proxy.http.get(url + "/v1/sessions", headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                raise WalinkError(f"worker answered {resp.status}")
            data = await resp.json(loads=orjson.loads)
        sessions: list[dict[str, Any]] = data.get("sessions") or []
        return sessions

    results = await asyncio.gather(*(one(w.url) for w in workers), return_exceptions=True)
    merged: dict[str, dict[str, Any]] = {}
    failed = []
    for worker, result in zip(workers, results, strict=True):
        if isinstance(result, BaseException):
            failed.append(worker.name)
            continue
        for session in result:
            merged.setdefault(str(session.get("id")), session)
    return json_response(
        {"sessions": list(merged.values()), "partial": bool(failed) or not workers, "unreachable": failed}
    )


# ---------------------------------------------------------------------------------- workspace-wide
async def _workspace_answer(request: web.Request, path: str, *, idempotent: bool) -> Answer:
    """A workspace-wide route, routed by the caller's workspace (any worker can answer)."""
    workspace_id = request[CALLER].scope(request.query.get("workspace_id"))
    plan = Plan(request.app[ROUTER], Kind.ANY, workspace_id or "default")
    return await _pass_on(request, path, workspace_id, plan, idempotent=idempotent)


list_accounts = _forwarding(_workspace_answer, "/v1/accounts", idempotent=True)
list_events = _forwarding(_workspace_answer, "/v1/events", idempotent=True)
replay_webhooks = _forwarding(_workspace_answer, "/v1/webhooks/replay", idempotent=False)
get_webhook = _forwarding(_workspace_answer, "/v1/webhook", idempotent=True)
put_webhook = _forwarding(_workspace_answer, "/v1/webhook", idempotent=True)
# not retried: a second attempt would rotate again, and the first answer's secret would be lost
rotate_webhook_secret = _forwarding(_workspace_answer, "/v1/webhook/secret", idempotent=False)
get_session_webhook_events = _forwarding(_session_answer, "/webhook-events", idempotent=True)
put_session_webhook_events = _forwarding(_session_answer, "/webhook-events", idempotent=True)


async def event_deliveries(request: web.Request) -> web.Response:
    """The delivery log of one of the workspace's events (another workspace's event: 404)."""
    event_id = request.match_info["event_id"]
    try:
        checked = str(uuid.UUID(event_id))
    except ValueError:
        raise EventNotFound(f"no event {event_id[:64]!r}") from None
    answer = await _workspace_answer(request, f"/v1/events/{checked}/deliveries", idempotent=True)
    return to_response(answer)


# ---------------------------------------------------------------------------------- quotas
async def get_quota(request: web.Request) -> web.Response:
    """The caller's workspace's limits and use (an admin may name any workspace)."""
    caller = request[CALLER]
    requested = request.query.get("workspace_id")
    workspace_id = _quota_workspace(caller.scope(requested))
    must_exist = caller.is_admin and requested is not None
    usage = await request.app[QUOTAS].usage(workspace_id, must_exist=must_exist)
    return json_response(_quota_view(request, usage.view()))


def _quota_view(request: web.Request, view: dict[str, Any]) -> dict[str, Any]:
    streams = request.app[STREAMS]
    view["streams"] = {
        "limit": streams.max_per_workspace,
        "used": streams.open_of(view["workspace_id"]),
        "gateway_limit": streams.max_total,
        "gateway_used": streams.clients,
        "scope": "gateway",
    }
    return view


def _limit(name: str, value: object) -> int | None:
    """A limit of ``PUT /v1/quota``: null, or a whole number (``3.0`` is one, as in JSON Schema)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and 0 <= value <= MAX_LIMIT:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LIMIT:
        return value
    raise BadRequest(f"{name} must be null or a whole number from 0 to {MAX_LIMIT}")


async def set_quota(request: web.Request) -> web.Response:
    """An admin sets a workspace's own limits; a field left out or null keeps the default."""
    caller = request[CALLER]
    if not caller.is_admin:
        raise Forbidden("setting a workspace's quota needs an admin key")
    data = await read_json_object(request, max_bytes=request.app[SETTINGS].max_body_bytes)
    check_keys(data, {"workspace_id", *LIMIT_FIELDS})
    requested = data.get("workspace_id")
    if not isinstance(requested, str) or not 0 < len(requested) <= 64:
        raise BadRequest("workspace_id must be a string of 1-64 characters")
    workspace_id = _quota_workspace(requested)
    limits: dict[str, int | None] = {}
    for name in LIMIT_FIELDS:
        limits[name] = _limit(name, data.get(name))
    quotas = request.app[QUOTAS]
    await quotas.set_limits(workspace_id, limits)
    usage = await quotas.usage(workspace_id, must_exist=True)
    return json_response(_quota_view(request, usage.view()))


# ---------------------------------------------------------------------------------- metrics
@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count proxied requests by route and outcome; time them (SSE: until the stream started)."""
    route = request.match_info.route.name
    if route is None or not route.startswith("v1."):
        return await handler(request)
    started = time.monotonic()
    outcome = "5xx"
    try:
        response = await handler(request)
        outcome = f"{response.status // 100}xx"
        return response
    except WalinkError as exc:
        outcome = f"{exc.status // 100}xx"
        raise
    except web.HTTPException as exc:
        outcome = f"{exc.status // 100}xx"
        raise
    finally:
        ended = request.get(STARTED_AT, time.monotonic())
        metrics.GATEWAY_REQUESTS.labels(route, outcome).inc()
        metrics.GATEWAY_LATENCY.labels(route).observe(ended - started)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/sessions", create_session, name="v1.sessions.create")
    r.add_get("/v1/sessions", list_sessions, name="v1.sessions.list")
    r.add_get("/v1/sessions/{session_id}", get_session, name="v1.sessions.get")
    r.add_delete("/v1/sessions/{session_id}", delete_session, name="v1.sessions.delete")
    r.add_get("/v1/sessions/{session_id}/qr", get_qr, name="v1.sessions.qr")
    r.add_get("/v1/sessions/{session_id}/events", session_events, name="v1.sessions.events")
    r.add_post("/v1/sessions/{session_id}/pairing-code", pairing_code, name="v1.sessions.pairing_code")
    r.add_delete(
        "/v1/sessions/{session_id}/pairing-code", cancel_pairing_code, name="v1.sessions.cancel_pairing_code"
    )
    r.add_post("/v1/sessions/{session_id}/passkey", answer_passkey, name="v1.sessions.passkey")
    r.add_get(passkeys.TOKEN_PATH, passkey_by_token, name="v1.passkey.get")
    r.add_post(passkeys.TOKEN_PATH, passkey_by_token, name="v1.passkey.answer")
    r.add_post("/v1/sessions/{session_id}/restart", restart_session, name="v1.sessions.restart")
    r.add_post("/v1/sessions/{session_id}/logout", logout_session, name="v1.sessions.logout")
    r.add_get("/v1/accounts", list_accounts, name="v1.accounts")
    r.add_get("/v1/events", list_events, name="v1.events")
    r.add_post("/v1/webhooks/replay", replay_webhooks, name="v1.webhooks.replay")
    r.add_get("/v1/webhook", get_webhook, name="v1.webhook.get")
    r.add_put("/v1/webhook", put_webhook, name="v1.webhook.put")
    r.add_post("/v1/webhook/secret", rotate_webhook_secret, name="v1.webhook.secret")
    r.add_get(
        "/v1/sessions/{session_id}/webhook-events",
        get_session_webhook_events,
        name="v1.sessions.webhook_events",
    )
    r.add_put(
        "/v1/sessions/{session_id}/webhook-events",
        put_session_webhook_events,
        name="v1.sessions.set_webhook_events",
    )
    r.add_get("/v1/events/{event_id}/deliveries", event_deliveries, name="v1.events.deliveries")
    r.add_get("/v1/quota", get_quota, name="v1.quota.get")
    r.add_put("/v1/quota", set_quota, name="v1.quota.set")
