"""The user's phone (/phone/*) and the simulator's knobs (/admin/*)."""

from __future__ import annotations

from aiohttp import web

from simulator.httputil import json_response, opt_str, read_json, req_param, req_str
from simulator.keys import STATE
from simulator.profiles import ProfileError
from simulator.state import SimError, check_phone

_QR_MAX = 2048


async def scan(request: web.Request) -> web.Response:
    body = await read_json(request)
    qr = req_str(body, "qr", _QR_MAX)
    phone = req_str(body, "phone", 32)
    push_name = opt_str(body, "push_name", 64)
    return json_response(request.app[STATE].scan(qr, phone, push_name))


async def pair(request: web.Request) -> web.Response:
    body = await read_json(request)
    code, phone = req_str(body, "code", 32), req_str(body, "phone", 32)
    return json_response(request.app[STATE].pair(code, phone))


async def logout(request: web.Request) -> web.Response:
    body = await read_json(request)
    phone, device_id = req_str(body, "phone", 32), opt_str(body, "device_id", 64)
    return json_response({"logged_out": request.app[STATE].logout(phone, device_id)})


async def conflict(request: web.Request) -> web.Response:
    body = await read_json(request)
    return json_response({"conflicted": request.app[STATE].conflict(req_str(body, "phone", 32))})


async def socket_state(request: web.Request) -> web.Response:
    """Force a socket state on pages (``TIMEOUT``, ``OPENING``, ``DEPRECATED_VERSION``, …)."""
    body = await read_json(request)
    duration = body.get("duration_ms", 1000)
    if isinstance(duration, bool) or not isinstance(duration, int) or not 0 <= duration <= 3_600_000:
        raise SimError(400, "invalid_request", "'duration_ms' must be an integer in [0, 3600000]")
    sticky = body.get("sticky", False)
    if not isinstance(sticky, bool):
        raise SimError(400, "invalid_request", "'sticky' must be a boolean")
    count = request.app[STATE].force_state(
        opt_str(body, "phone", 32),
        opt_str(body, "device_id", 64),
        req_str(body, "state", 32),
        duration,
        sticky,
    )
    return json_response({"forced": count})


async def passkey(request: web.Request) -> web.Response:
    """Register a passkey for a phone: ``{phone, credential_id?, public_key?}`` (SPKI DER and the
    id in base64url); without ``public_key`` a P-256 key pair is made and its private key returned."""
    body = await read_json(request)
    state = request.app[STATE]
    registered = state.register_passkey(
        req_str(body, "phone", 32), opt_str(body, "credential_id", 2048), opt_str(body, "public_key", 1024)
    )
    return json_response(registered, status=201)


async def devices(request: web.Request) -> web.Response:
    phone = check_phone(req_param(request, "phone"))
    found = request.app[STATE].phone_devices(phone)
    return json_response({"phone": phone, "devices": [d.public() for d in found]})


async def get_profile(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].profile.to_dict())


async def set_profile(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise SimError(400, "invalid_request", "'name' must be a string")
    try:
        profile = request.app[STATE].set_profile(name, body)
    except ProfileError as exc:
        raise SimError(400, "invalid_request", str(exc)) from exc
    return json_response(profile.to_dict())


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return json_response({"ok": True})


async def clock(request: web.Request) -> web.Response:
    """``{"advance_s": N}``: jump the simulator's clock ahead (devices past ``device_ttl_s`` expire)."""
    body = await read_json(request)
    state = request.app[STATE]
    expired = state.advance_clock(body.get("advance_s"))
    return json_response({"now_s": state.now_s(), "offset_s": state.clock_offset_s, "expired": expired})


async def admin_state(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].summary())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/phone/scan", scan)
    app.router.add_post("/phone/pair", pair)
    app.router.add_post("/phone/logout", logout)
    app.router.add_post("/phone/conflict", conflict)
    app.router.add_post("/phone/passkey", passkey)
    app.router.add_get("/phone/devices", devices)
    app.router.add_get("/admin/profile", get_profile)
    app.router.add_post("/admin/profile", set_profile)
    app.router.add_post("/admin/reset", reset)
    app.router.add_post("/admin/socket-state", socket_state)
    app.router.add_get("/admin/state", admin_state)
    app.router.add_post("/admin/clock", clock)
