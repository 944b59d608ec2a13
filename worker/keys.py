"""Typed application keys of the worker app."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from shared.outbox import WebhookDispatcher
from shared.settings import Settings
from shared.store import Store
from worker.browser import BrowserLauncher
from worker.chromium import PssGauge
from worker.durable import Durable
from worker.membership import Heartbeat
from worker.qr_queue import QrQueue
from worker.sessions import SessionManager
from worker.warm_pool import WarmPool

SETTINGS = web.AppKey("settings", Settings)
NAME = web.AppKey("name", str)
STARTED_AT = web.AppKey("started_at", float)
HTTP = web.AppKey("http", aiohttp.ClientSession)
DB = web.AppKey("db", asyncpg.Pool)
STORE = web.AppKey("store", Store)
REDIS = web.AppKey("redis", aioredis.Redis)
DURABLE = web.AppKey("durable", Durable)
LAUNCHER = web.AppKey("launcher", BrowserLauncher)
QUEUE = web.AppKey("queue", QrQueue)
POOL = web.AppKey("pool", WarmPool)
MANAGER = web.AppKey("manager", SessionManager)
DISPATCHER = web.AppKey("dispatcher", WebhookDispatcher)
HEARTBEAT = web.AppKey("heartbeat", Heartbeat)
REMOTE_STREAMS = web.AppKey("remote_streams", set[asyncio.Task[Any]])
PSS = web.AppKey("pss", PssGauge)
