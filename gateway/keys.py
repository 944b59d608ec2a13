"""Typed application keys of the gateway app."""

from __future__ import annotations

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from gateway.auth import AUTH, CALLER
from gateway.health import HealthChecker
from gateway.membership import Membership
from gateway.proxy import Proxy
from gateway.ring import Ring
from gateway.routing import Router
from gateway.sse import Streams
from shared.settings import Settings

__all__ = [
    "AUTH",
    "CALLER",
    "HEALTH",
    "HTTP",
    "MEMBERSHIP",
    "PROXY",
    "REDIS",
    "RING",
    "ROUTER",
    "SETTINGS",
    "STARTED_AT",
    "STREAMS",
]

SETTINGS = web.AppKey("settings", Settings)
STARTED_AT = web.AppKey("started_at", float)
HTTP = web.AppKey("http", aiohttp.ClientSession)
REDIS = web.AppKey("redis", aioredis.Redis)
MEMBERSHIP = web.AppKey("membership", Membership)
RING = web.AppKey("ring", Ring)
ROUTER = web.AppKey("router", Router)
HEALTH = web.AppKey("health", HealthChecker)
PROXY = web.AppKey("proxy", Proxy)
STREAMS = web.AppKey("streams", Streams)
