"""Reading the workers' heartbeats (``{prefix}worker:{name}``, written by :mod:`worker.membership`)."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from shared.redis_keys import Keys


async def scan_heartbeats(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Every live heartbeat by worker name; an entry that is not a named JSON object is skipped.

    Redis errors are the caller's to handle (each caller has its own timeout and fallback)."""
    found = [k async for k in redis.scan_iter(match=keys.workers_pattern(), count=200)]
    if not found:
        return {}
    beats: dict[str, dict[str, Any]] = {}
    for raw in await redis.mget(found):
        if raw is None:
            continue
        try:
            beat = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(beat, dict) and isinstance(beat.get("name"), str):
            beats[beat["name"]] = beat
    return beats
