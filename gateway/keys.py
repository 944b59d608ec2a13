"""Typed application keys of the gateway app."""

from __future__ import annotations

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from gateway.auth import AUTH, CALLER
from gateway.health import HealthChecker
from gateway.membership import Membership
from gateway.proxy import Proxy
from gateway.quotas import Quotas
from gateway.ring import Ring
from gateway.routing import Router
from gateway.sse import Streams
from shared.settings import Settings

__all__ = [
    "AUTH",
    "CALLER",
    "HEALTH",
    "HEALTH_HTTP",
    "HTTP",
    "MEMBERSHIP",
    "POOL",
    "PROXY",
    "QUOTAS",
    "REDIS",
    "RING",
    "ROUTER",
    "SETTINGS",
    "STARTED_AT",
    "STREAMS",
    "STREAM_HTTP",
]

SETTINGS = web.AppKey("settings", Settings)
STARTED_AT = web.AppKey("started_at", float)
HTTP = web.AppKey("http", aiohttp.ClientSession)
# event streams, and health probes: each its own connection pool, so neither starves the other
STREAM_HTTP = web.AppKey("stream_http", aiohttp.ClientSession)
HEALTH_HTTP = web.AppKey("health_http", aiohttp.ClientSession)
POOL = web.AppKey("pool", asyncpg.Pool)
QUOTAS = web.AppKey("quotas", Quotas)
REDIS = web.AppKey("redis", aioredis.Redis)
MEMBERSHIP = web.AppKey("membership", Membership)
RING = web.AppKey("ring", Ring)
ROUTER = web.AppKey("router", Router)
HEALTH = web.AppKey("health", HealthChecker)
PROXY = web.AppKey("proxy", Proxy)
STREAMS = web.AppKey("streams", Streams)
