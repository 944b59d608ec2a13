"""JSON request/response helpers, error mapping and CORS for the simulator's HTTP API."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from simulator.state import SimError

MAX_BODY_BYTES = 64 * 1024
CORS_PREFIXES = ("/phone/", "/admin/")
log = logging.getLogger("simulator")

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (at most 64 KiB)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise SimError(413, "body_too_large", f"request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise SimError(413, "body_too_large", f"request body exceeds {MAX_BODY_BYTES} bytes") from exc
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SimError(400, "invalid_json", "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise SimError(400, "invalid_request", "request body must be a JSON object")
    return body


def req_str(body: dict[str, Any], key: str, max_len: int = 4096) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise SimError(400, "invalid_request", f"{key!r} must be a non-empty string (max {max_len} chars)")
    return value


def opt_str(body: dict[str, Any], key: str, max_len: int = 4096) -> str | None:
    """An optional string field; absent, null and "" all mean "not given"."""
    if body.get(key) in (None, ""):
        return None
    return req_str(body, key, max_len)


def req_param(request: web.Request, key: str) -> str:
    value = request.query.get(key)
    if not value:
        raise SimError(400, "invalid_request", f"query parameter {key!r} is required")
    return value


def _add_cors(response: web.StreamResponse, request: web.Request) -> None:
    response.headers["Access-Control-Allow-Origin"] = "*"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        asked = request.headers.get("Access-Control-Request-Headers")
        response.headers["Access-Control-Allow-Headers"] = asked or "Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON (never a 500 for bad input); CORS + preflight for /phone/* and /admin/*."""
    cors = request.path.startswith(CORS_PREFIXES)
    response: web.StreamResponse
    if cors and request.method == "OPTIONS":
        response = web.Response(status=204)
    else:
        try:
            response = await handler(request)
        except SimError as exc:
            response = error_response(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "http_error")
            response = error_response(exc.status, code, exc.reason)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(500, "internal_error", "internal error")
    if cors:
        _add_cors(response, request)
    return response
