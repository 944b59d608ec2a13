"""A real worker process: SIGKILL leaves no orphan behind a restart, and ready sessions come back."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import EventStream, Sim, WorkerProcess, free_port, sse_until
from worker import chromium

pytestmark = pytest.mark.chromium

PHONE = "5511987654321"


async def test_sigkill_then_restart_restores_without_qr_and_reaps(
    tmp_path: Path, sim: Sim, pg_pool: Any, pg_dsn: str, redis_prefix: str
) -> None:
    port = free_port()
    first = WorkerProcess(tmp_path, sim, port, pg_dsn, redis_prefix)
    await first.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(first.url + "/v1/sessions", json={"label": "k"}) as resp:
            sid = (await resp.json())["id"]
        events = f"{first.url}/v1/sessions/{sid}/events"
        stream = EventStream(await http.get(events))
        try:
            await sim.scan_linking(stream, PHONE)
            assert (await stream.until("session_ready"))["phone_number"] == PHONE
        finally:
            stream.close()

        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL

        second = WorkerProcess(tmp_path, sim, port, pg_dsn, redis_prefix)
        await second.start()
        async with http.get(f"{second.url}/v1/sessions/{sid}") as resp:
            status = (await resp.json())["status"]
        if status != "ready":
            await sse_until(await http.get(f"{second.url}/v1/sessions/{sid}/events"), "session_ready")
        async with http.get(f"{second.url}/v1/sessions/{sid}") as resp:
            session = await resp.json()
        assert session["status"] == "ready" and session["phone_number"] == PHONE
        statuses = [h["status"] for h in session["history"]]
        assert statuses == ["starting", "qr", "authenticated", "ready", "starting", "authenticated", "ready"]
        assert len(await sim.devices(PHONE)) == 1  # the same linked device, no new scan
        # exactly one browser runs on the session's profile: whatever the killed worker left is gone
        profiles = tmp_path / "var" / f"worker-{port}" / "profiles"
        assert len(chromium.groups_under(profiles)) == 1

        assert await second.stop(signal.SIGTERM) == 0
    assert any("shutdown ◆" in line for line in second.log), "".join(second.log)
