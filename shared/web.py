"""The HTTP edge shared by gateway and workers: JSON in and out, errors as JSON 4xx."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from shared.errors import BadRequest, InvalidJson, PayloadTooLarge, WalinkError

log = logging.getLogger("walink.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# between the gateway and the workers
WORKSPACE_HEADER = "X-Walink-Workspace"  # the caller's workspace, set by the gateway
DRIVER_HEADER = "X-Walink-Driver"  # set by a worker answering for a session another worker drives
DEFAULT_WORKSPACE = "default"  # the workspace of the dev key and of callers that name none


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to ``{"error": {"code", "message"}}``; only bugs become a 500."""
    try:
        return await handler(request)
    except WalinkError as exc:
        if exc.status >= 500:
            log.warning("%s %s → %d %s: %s", request.method, request.path, exc.status, exc.code, exc)
        return json_response(exc.to_dict(), status=exc.status, headers=exc.headers() or None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; it has been logged")


async def read_json_object(request: web.Request, *, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object; an empty body is ``{}``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes") from exc
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes")
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidJson("request body must be a JSON object")
    return data


def optional_str(data: dict[str, Any], key: str, *, max_len: int = 512) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise BadRequest(f"{key} must be a string of at most {max_len} characters")
    return value


def check_keys(data: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise BadRequest(f"unknown field(s): {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


async def serve_until_signalled(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout_s: float,
    stopping: str,
    handler_cancellation: bool = False,
) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then shut it down in order within ``shutdown_timeout_s``
    (the app's cleanup contexts, in reverse)."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        handler_cancellation=handler_cancellation,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("ready on http://%s:%d", host, port)
        await stop.wait()
        log.info("%s (deadline %.0fs)", stopping, shutdown_timeout_s)
    finally:
        await runner.cleanup()
