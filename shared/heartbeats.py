"""The workers' heartbeats (``{prefix}worker:{name}``, written by :mod:`worker.membership`): how
they are signed, and how gateways and workers read them.

A heartbeat names a URL that the gateway then probes and proxies to (with its internal token), so
a heartbeat is only believed when it is authentic. With ``WALINK_INTERNAL_TOKEN`` set, a worker
signs its beat: ``sig`` = hex HMAC-SHA256 over the canonical JSON of every other field (sorted
keys, incl. ``name``, ``url`` and ``signed_at_ms``), with a key derived from the token (never the
token itself, which is a bearer credential). A reader ignores a beat that is unsigned, signed
wrongly, or signed more than ``MAX_SKEW_MS`` from now (a replay). Without a token (development on
one machine) beats are unsigned and believed only when their URL is loopback. Each ignored beat
is counted (``walink_heartbeats_refused_total{reason}``) and logged once per worker name and reason.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared import metrics
from shared.loopback import is_loopback_url
from shared.models import now_ms
from shared.redis_keys import Keys

log = logging.getLogger("walink.heartbeats")

# the HMAC key of heartbeats is HMAC-SHA256(internal token, this label): one token, separate keys
KEY_LABEL = b"walink heartbeat v1"
# a signed beat is refused when signed this far from the reader's clock (either way): replays of an
# old beat stop working, while ordinary clock skew between machines does not matter
MAX_SKEW_MS = 30_000
# a heartbeat's ``load.recent`` names the sessions whose create reached the worker within this window
# (at most RECENT_CREATES_MAX of them, the newest): a gateway keeps counting a placement of its own
# until a beat names it, or for this long at most (gateway.membership.Worker.beat)
PLACEMENT_WINDOW_S = 30.0
RECENT_CREATES_MAX = 2_000
SIGNATURE_FIELD = "sig"
SIGNED_AT_FIELD = "signed_at_ms"


def beat_url(name: str, beat: dict[str, Any]) -> str:
    """The URL a heartbeat names: its ``url``, else ``http://<name>`` (names are ``host:port``)."""
    url = beat.get("url")
    if isinstance(url, str) and url:
        return url.rstrip("/")
    return name if name.startswith(("http://", "https://")) else f"http://{name}"


class HeartbeatAuth:
    """Signs this process's heartbeats and tells which heartbeats read from Redis to believe."""

    def __init__(
        self, internal_token: str, *, max_skew_ms: int = MAX_SKEW_MS, clock: Callable[[], int] = now_ms
    ) -> None:
        self.key = (
            hmac.new(internal_token.encode(), KEY_LABEL, hashlib.sha256).digest() if internal_token else None
        )
        self.max_skew_ms = max_skew_ms
        self.clock = clock
        self._logged: set[tuple[str, str]] = set()

    @property
    def signing(self) -> bool:
        return self.key is not None

    def _mac(self, beat: dict[str, Any]) -> str:
        assert self.key is not None
        fields = {k: v for k, v in beat.items() if k != SIGNATURE_FIELD}
        body = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
        return hmac.new(self.key, body, hashlib.sha256).hexdigest()

    def sign(self, beat: dict[str, Any]) -> dict[str, Any]:
        """``beat`` with ``signed_at_ms`` and ``sig`` (unchanged when there is no token)."""
        if self.key is None:
            return beat
        signed = {**beat, SIGNED_AT_FIELD: self.clock()}
        signed[SIGNATURE_FIELD] = self._mac(signed)
        return signed

    def refusal(self, name: str, beat: dict[str, Any]) -> str | None:
        """Why ``beat`` (read under ``name``) must be ignored, as a metric reason; None: believe it."""
        if beat.get("name") != name:
            return "bad_name"
        if self.key is None:
            return None if is_loopback_url(beat_url(name, beat)) else "not_loopback"
        sig = beat.get(SIGNATURE_FIELD)
        if not isinstance(sig, str):
            return "unsigned"
        if not hmac.compare_digest(sig.encode(), self._mac(beat).encode()):
            return "bad_signature"
        signed_at = beat.get(SIGNED_AT_FIELD)
        if not isinstance(signed_at, int) or abs(self.clock() - signed_at) > self.max_skew_ms:
            return "stale"
        return None

    def believe(self, name: str, beat: dict[str, Any]) -> bool:
        reason = self.refusal(name, beat)
        if reason is None:
            return True
        metrics.HEARTBEATS_REFUSED.labels(reason).inc()
        if (name, reason) not in self._logged:
            self._logged.add((name, reason))
            log.warning(
                "ignoring the heartbeat of %r (%s): %s",
                name[:100],
                reason,
                "set the same WALINK_INTERNAL_TOKEN on every gateway and worker"
                if self.key is not None
                else "without WALINK_INTERNAL_TOKEN only loopback workers are believed",
            )
        return False


def parse_beat(raw: bytes | str | None) -> dict[str, Any] | None:
    """A heartbeat's JSON object with a string ``name``; None for anything else."""
    if raw is None:
        return None
    try:
        beat = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(beat, dict) and isinstance(beat.get("name"), str):
        return beat
    return None


async def scan_heartbeats(
    redis: aioredis.Redis, keys: Keys, auth: HeartbeatAuth
) -> dict[str, dict[str, Any]]:
    """Every live heartbeat that ``auth`` believes, by worker name; an entry that is not a named
    JSON object is skipped.

    Redis errors are the caller's to handle (each caller has its own timeout and fallback)."""
    found = [k async for k in redis.scan_iter(match=keys.workers_pattern(), count=200)]
    if not found:
        return {}
    start = len(keys.worker(""))
    beats: dict[str, dict[str, Any]] = {}
    for key, raw in zip(found, await redis.mget(found), strict=True):
        beat = parse_beat(raw)
        name = (key.decode(errors="replace") if isinstance(key, bytes) else str(key))[start:]
        if beat is not None and auth.believe(name, beat):
            beats[name] = beat
    return beats


async def heartbeat_alive(redis: aioredis.Redis, keys: Keys, auth: HeartbeatAuth, name: str) -> bool:
    """Does worker ``name`` have a live heartbeat that ``auth`` believes?"""
    beat = parse_beat(await redis.get(keys.worker(name)))
    return beat is not None and auth.believe(name, beat)
