"""API keys → the caller's workspace.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. It is looked up with
:meth:`shared.store.Store.key_scope`; answers are cached in memory for ``ttl_s`` (unknown keys for
a shorter time) under the key's SHA-256 digest — the clear key is never kept. While Postgres
cannot answer, a key seen valid in the last ``stale_s`` keeps working.

A workspace key acts on its own workspace only; an admin key may name any workspace
(``?workspace_id=`` or the body's ``workspace_id``) and may read ``/health/cluster``. The
settings' ``dev_api_key`` is a key of workspace ``default`` (``make run``), and with it set
``/health/cluster`` is open to a local visit (:func:`is_local_visit`), as the dashboard's filled-in
key is: anyone else signs in.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from shared.errors import NotFound, Unauthorized, Unavailable
from shared.inputs import check_workspace_id
from shared.loopback import PROXY_HEADERS, host_of_header, is_loopback_host
from shared.store import hash_key
from shared.web import DEFAULT_WORKSPACE, Handler, error_response

log = logging.getLogger("walink.gateway.auth")

DEV_WORKSPACE = DEFAULT_WORKSPACE
MAX_KEY_LEN = 256
OPEN_PATHS = frozenset({"/", "/health", "/metrics", "/docs", "/openapi.json", "/favicon.ico"})
CLUSTER_PATHS = frozenset({"/health/cluster"})
TOKEN_PREFIXES = ("/v1/passkey/",)
"""Routes authorised by a one-time token in their path, not an API key (``shared.passkeys``)."""

KeyLookup = Callable[[str], Awaitable[tuple[str | None, bool] | None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Caller:
    workspace_id: str | None
    is_admin: bool

    def scope(self, requested: str | None, *, own_by_default: bool = True) -> str | None:
        """The workspace a call acts on (None: an admin acting across workspaces).

        A workspace key naming another workspace gets the same 404 as for anything else of it."""
        if requested is not None and not 0 < len(requested) <= 64:
            raise NotFound(f"no workspace {requested[:64]!r}")
        if requested is not None:
            check_workspace_id(requested)  # it travels in a header to the workers
        if self.is_admin:
            return requested or (self.workspace_id if own_by_default else None)
        if requested is not None and requested != self.workspace_id:
            raise NotFound(f"no workspace {requested!r}")
        return self.workspace_id


@dataclass(slots=True)
class _Entry:
    caller: Caller | None
    stored_at: float
    expires_at: float


class KeyCache:
    """Key lookups by SHA-256 digest, with a TTL, a shorter TTL for unknown keys, and a bound."""

    def __init__(
        self,
        *,
        ttl_s: float = 30.0,
        negative_ttl_s: float = 5.0,
        stale_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_s = stale_s
        self.max_entries = max_entries
        self.clock = clock
        self.entries: dict[bytes, _Entry] = {}

    @staticmethod
    def digest(key: str) -> bytes:
        return hash_key(key)

    def get(self, key: str) -> tuple[bool, Caller | None]:
        """(hit, caller): a fresh entry, or a miss."""
        entry = self.entries.get(self.digest(key))
        if entry is None or entry.expires_at <= self.clock():
            return False, None
        return True, entry.caller

    def stale(self, key: str) -> Caller | None:
        """A valid key's expired entry, young enough to serve while the store cannot answer."""
        entry = self.entries.get(self.digest(key))
        if entry is None or entry.caller is None or self.clock() - entry.stored_at > self.stale_s:
            return None
        return entry.caller

    def put(self, key: str, caller: Caller | None) -> None:
        now = self.clock()
        if len(self.entries) >= self.max_entries:
            self._evict(now)
        ttl = self.ttl_s if caller is not None else self.negative_ttl_s
        self.entries[self.digest(key)] = _Entry(caller, now, now + ttl)

    def _evict(self, now: float) -> None:
        for digest in [d for d, e in self.entries.items() if now - e.stored_at > self.stale_s]:
            del self.entries[digest]
        while len(self.entries) >= self.max_entries:
            del self.entries[next(iter(self.entries))]  # the oldest insertion


CALLER = web.RequestKey("caller", Caller)


class Authenticator:
    def __init__(self, lookup: KeyLookup, *, dev_api_key: str, timeout_s: float, cache: KeyCache) -> None:
        self.lookup = lookup
        self.dev_api_key = dev_api_key
        self.timeout_s = timeout_s
        self.cache = cache

    @property
    def dev_mode(self) -> bool:
        return bool(self.dev_api_key)

    async def caller(self, key: str) -> Caller:
        if self.dev_api_key and hmac.compare_digest(key.encode(), self.dev_api_key.encode()):
            return Caller(DEV_WORKSPACE, is_admin=False)
        hit, caller = self.cache.get(key)
        if not hit:
            try:
                scope = await asyncio.wait_for(self.lookup(key), self.timeout_s)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                caller = self.cache.stale(key)
                if caller is None:
                    log.warning("cannot check an API key: %s", exc or type(exc).__name__)
                    raise Unavailable("cannot check the API key now; retry shortly") from exc
                return caller
            caller = None
            if scope is not None:
                workspace_id, is_admin = scope
                if is_admin or workspace_id is not None:
                    caller = Caller(workspace_id, is_admin)
            self.cache.put(key, caller)
        if caller is None:
            raise Unauthorized("invalid API key")
        return caller


AUTH = web.AppKey("auth", Authenticator)


def is_local_visit(request: web.Request) -> bool:
    """Does this request come from this machine, to this machine, with no proxy in between?

    The peer address must be loopback (``request.remote``, the socket's, not a header) AND the
    ``Host`` header a loopback name or address: a remote page that makes a browser here call us
    (DNS rebinding) names its own host, and a reverse proxy on this machine sets forwarding headers.
    """
    if any(name in request.headers for name in PROXY_HEADERS):
        return False
    return is_loopback_host(request.remote) and is_loopback_host(host_of_header(request.headers.get("Host")))


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


def _unauthorized(message: str) -> web.Response:
    response = error_response(401, "unauthorized", message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="walink"'
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in OPEN_PATHS or request.path.startswith(TOKEN_PREFIXES):
        return await handler(request)
    auth = request.app[AUTH]
    if request.path in CLUSTER_PATHS and auth.dev_mode and is_local_visit(request):
        return await handler(request)
    key = presented_key(request)
    if key is None:
        return _unauthorized("an API key is required: Authorization: Bearer <key> or X-API-Key")
    if len(key) > MAX_KEY_LEN:
        return _unauthorized("invalid API key")
    try:
        caller = await auth.caller(key)
    except Unauthorized as exc:
        return _unauthorized(exc.message)
    if request.path in CLUSTER_PATHS and not caller.is_admin:
        return error_response(403, "forbidden", "cluster routes need an admin key")
    request[CALLER] = caller
    return await handler(request)
