"""Page-internal API under /sim/api/ (used only by wa.js)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from simulator.builds import FIRST_BUILD, check_version
from simulator.httputil import json_response, opt_str, read_json, req_param, req_str
from simulator.keys import BUILDS, STATE
from simulator.qr import qr_matrices
from simulator.state import SimError, check_device_id

VERSION = FIRST_BUILD
"""The build the simulator starts with (more: ``POST /admin/builds``, simulator/builds.py)."""
POLL_TIMEOUT_S = 20.0
_KEY_MAX = 128


def _qr_part(body: dict[str, Any], key: str, max_len: int = _KEY_MAX) -> str:
    value = req_str(body, key, max_len)
    if "," in value:
        raise SimError(400, "invalid_request", f"{key!r} must not contain a comma")
    return value


async def boot(request: web.Request) -> web.Response:
    """The page's first call: it names its build (``build``, from its bundle); with
    ``version_check`` the answer says whether the server refuses that build."""
    state = request.app[STATE]
    builds = request.app[BUILDS]
    version = check_version(request.query.get("build", builds.current))
    conn_id = request.query.get("conn_id", "")[:64]
    build = builds.booted(version, conn_id)
    if not state.profile.version_check:
        build["deprecated"] = False
    return json_response({"version": version, "build": build, "profile": state.profile.to_dict()})


async def pair_device(request: web.Request) -> web.Response:
    body = await read_json(request)
    state = request.app[STATE]
    client, refs, texts = state.begin_batch(
        check_device_id(req_str(body, "device_id", 64)),
        _qr_part(body, "noise_pub"),
        _qr_part(body, "identity_pub"),
        _qr_part(body, "adv_secret"),
        _qr_part(body, "platform", 8),
        _conn_id(body),
    )
    # ~15 ms of CPU per QR (segno's mask selection): keep the event loop free for long-polls meanwhile
    matrices = await asyncio.to_thread(qr_matrices, texts)
    return json_response(state.commit_batch(client, refs, texts, matrices))


def _conn_id(body: dict[str, Any]) -> str:
    """The page instance (one tab/browser) speaking; optional for older callers."""
    value = body.get("conn_id", "")
    if not isinstance(value, str) or len(value) > 64:
        raise SimError(400, "invalid_request", "'conn_id' must be a string of at most 64 characters")
    return value


async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    digest = opt_str(body, "creds_digest", _KEY_MAX) or ""
    return json_response(request.app[STATE].login(req_str(body, "device_id", 64), _conn_id(body), digest))


async def settle(request: web.Request) -> web.Response:
    """The page's credentials are final (``creds_settle_ms`` after pairing success)."""
    body = await read_json(request)
    device_id = check_device_id(req_str(body, "device_id", 64))
    settled = request.app[STATE].settle(device_id, req_str(body, "creds_digest", _KEY_MAX))
    if not settled:
        raise SimError(409, "not_linked", "this device is not linked")
    return json_response({"ok": True})


async def adv_secret(request: web.Request) -> web.Response:
    """The page answered ``companion_reg_refresh`` with a new ADV secret: the live batch's QR texts."""
    body = await read_json(request)
    state = request.app[STATE]
    _client, texts = state.refresh_adv(
        check_device_id(req_str(body, "device_id", 64)), _qr_part(body, "adv_secret")
    )
    matrices = await asyncio.to_thread(qr_matrices, texts)
    return json_response({"qrs": [{"text": t, "matrix": m} for t, m in zip(texts, matrices, strict=True)]})


async def takeover(request: web.Request) -> web.Response:
    body = await read_json(request)
    device_id = check_device_id(req_str(body, "device_id", 64))
    return json_response(request.app[STATE].takeover(device_id, req_str(body, "conn_id", 64)))


async def pair_code(request: web.Request) -> web.Response:
    body = await read_json(request)
    state = request.app[STATE]
    code = state.request_pair_code(req_str(body, "device_id", 64), req_str(body, "phone", 32))
    return json_response({"code": code})


async def unpair(request: web.Request) -> web.Response:
    body = await read_json(request)
    removed = request.app[STATE].unpair(check_device_id(req_str(body, "device_id", 64)))
    return json_response({"ok": True, "removed": removed})


async def passkey(request: web.Request) -> web.Response:
    """The page's answer to the passkey challenge: ``{device_id, credential}`` where ``credential``
    is the ``PublicKeyCredential`` as ``AuthenticationResponseJSON`` (base64url fields)."""
    body = await read_json(request)
    credential = body.get("credential")
    if not isinstance(credential, dict):
        raise SimError(400, "invalid_assertion", "'credential' must be an object")
    device_id = check_device_id(req_str(body, "device_id", 64))
    return json_response(request.app[STATE].verify_passkey(device_id, credential))


async def poll(request: web.Request) -> web.Response:
    client = request.app[STATE].client(req_param(request, "device_id"))
    raw_after = request.query.get("after", "0")
    if not (raw_after.isascii() and raw_after.isdigit()) or len(raw_after) > 18:
        raise SimError(400, "invalid_request", "'after' must be a non-negative integer")
    conn_id = request.query.get("conn_id", "")
    if len(conn_id) > 64:
        raise SimError(400, "invalid_request", "'conn_id' must be at most 64 characters")
    request.app[STATE].use_device(client.device_id)  # a connected page is a use of its device
    build = request.query.get("build")
    if build is not None:  # the build this page runs: pushed DEPRECATED_VERSION if it is refused
        request.app[BUILDS].note_device(client.device_id, check_version(build))
    events = await client.wait_events(int(raw_after), POLL_TIMEOUT_S, conn_id)
    return json_response({"events": events})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sim/api/boot", boot)
    app.router.add_post("/sim/api/pair-device", pair_device)
    app.router.add_post("/sim/api/login", login)
    app.router.add_post("/sim/api/settle", settle)
    app.router.add_post("/sim/api/adv-secret", adv_secret)
    app.router.add_post("/sim/api/takeover", takeover)
    app.router.add_post("/sim/api/pair-code", pair_code)
    app.router.add_post("/sim/api/unpair", unpair)
    app.router.add_post("/sim/api/passkey", passkey)
    app.router.add_get("/sim/api/poll", poll)
