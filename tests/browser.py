"""What the tests that drive Chromium themselves (not through a worker) share: flags, the launch
of a persistent profile, and the route that sends WhatsApp's origin to the simulator."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import BrowserContext, Error, Playwright, Route

from tests.conftest import CHROMIUM

ORIGIN = "https://web.whatsapp.com"
ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    *(["--no-sandbox"] if os.geteuid() == 0 else []),  # Chromium refuses its sandbox as root
]


async def launch(pw: Playwright, profile: Path, **options: Any) -> BrowserContext:
    """Headless Chromium on the persistent ``profile`` (``options`` go to Playwright as they are)."""
    return await pw.chromium.launch_persistent_context(
        user_data_dir=str(profile), executable_path=str(CHROMIUM), headless=True, args=ARGS, **options
    )


def forward_to(base: str, *, timeout_ms: float = 30_000) -> Callable[[Route], Awaitable[None]]:
    """Route handler: https://web.whatsapp.com/<path+query> -> <base>/<path+query>."""

    async def handle(route: Route) -> None:
        parts = urlsplit(route.request.url)
        target = base + parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            response = await route.fetch(url=target, timeout=timeout_ms)
            await route.fulfill(response=response)
        except Error:
            with suppress(Error):
                await route.abort()

    return handle
