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


# For page.wait_for_function: has WhatsApp's device row (``wawc``) its settled credentials yet?
# (``creds_settle_ms``). The predicate must answer at once, so each call starts one read of the
# database and answers with what the last one found; it is only opened once it exists (opening a
# missing one would create it empty).
CREDS_SETTLED = """() => {
  if (!window.__testSettleRead) {
    window.__testSettleRead = (async () => {
      if (!(await indexedDB.databases()).some((d) => d.name === "wawc")) return false;
      const db = await new Promise((ok, fail) => {
        const req = indexedDB.open("wawc");
        req.onsuccess = () => ok(req.result);
        req.onerror = () => fail(req.error);
      });
      try {
        if (!db.objectStoreNames.contains("user")) return false;
        const row = await new Promise((ok, fail) => {
          const req = db.transaction("user").objectStore("user").get("me");
          req.onsuccess = () => ok(req.result);
          req.onerror = () => fail(req.error);
        });
        return Boolean(row && row.settled);
      } finally {
        db.close();
      }
    })()
      .catch(() => false)
      .then((settled) => {
        window.__testSettled = settled;
        window.__testSettleRead = null;
      });
  }
  return window.__testSettled === true;
}"""

# In the page: {store: [row count, bytes of the binary fields]} of model-storage's chats, contacts
# and messages (the history sync's data, `idb_mb`)
MODEL_STORAGE_TOTALS = """async () => {
  const db = await new Promise((ok, fail) => {
    const req = indexedDB.open("model-storage");
    req.onsuccess = () => ok(req.result);
    req.onerror = () => fail(req.error);
  });
  try {
    const out = {};
    for (const store of ["chat", "contact", "message"]) {
      out[store] = await new Promise((ok, fail) => {
        let rows = 0, bytes = 0;
        const req = db.transaction(store).objectStore(store).openCursor();
        req.onsuccess = () => {
          const cursor = req.result;
          if (!cursor) return ok([rows, bytes]);
          rows += 1;
          if (cursor.value.body) bytes += cursor.value.body.byteLength;
          cursor.continue();
        };
        req.onerror = () => fail(req.error);
      });
    }
    return out;
  } finally {
    db.close();
  }
}"""
