"""Typed application keys of the worker app."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from playwright.async_api import Playwright

from shared.settings import Settings
from worker.browser import BrowserLauncher
from worker.qr_queue import QrQueue
from worker.sessions import SessionManager
from worker.warm_pool import WarmPool

SETTINGS = web.AppKey("settings", Settings)
STARTED_AT = web.AppKey("started_at", float)
HTTP = web.AppKey("http", aiohttp.ClientSession)
PLAYWRIGHT = web.AppKey("playwright", Playwright)
LAUNCHER = web.AppKey("launcher", BrowserLauncher)
QUEUE = web.AppKey("queue", QrQueue)
POOL = web.AppKey("pool", WarmPool)
MANAGER = web.AppKey("manager", SessionManager)
