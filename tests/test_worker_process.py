"""A real worker process: SIGKILL leaves no orphan behind a restart, and ready sessions come back."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import CHROMIUM, WAIT_S, Sim
from worker import chromium

pytestmark = pytest.mark.chromium

PHONE = "5511987654321"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class WorkerProcess:
    def __init__(self, tmp_path: Path, sim: Sim, port: int) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WALINK_")},
            "WALINK_WORKER_PORT": str(port),
            "WALINK_DATA_DIR": str(tmp_path / "var"),
            "WALINK_SIMULATOR_URL": sim.url,
            "WALINK_WARM_POOL_SIZE": "0",
            "WALINK_SHUTDOWN_DEADLINE_S": "10",
            "CHROMIUM_PATH": str(CHROMIUM),
        }
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._until_log("ready on"), WAIT_S)
        asyncio.get_running_loop().create_task(self._drain())

    async def _until_log(self, needle: str) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                raise AssertionError("worker exited:\n" + "".join(self.log))
            self.log.append(line.decode())
            if needle in self.log[-1]:
                return

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), WAIT_S)


async def sse_until(http: aiohttp.ClientSession, url: str, kind: str) -> dict[str, Any]:
    import orjson

    async with http.get(url) as resp:
        event = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == kind:
                data: dict[str, Any] = orjson.loads(line[6:])
                return data
    raise AssertionError(f"stream ended before {kind}")


async def test_sigkill_then_restart_restores_without_qr_and_reaps(tmp_path: Path, sim: Sim) -> None:
    port = free_port()
    first = WorkerProcess(tmp_path, sim, port)
    await first.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(first.url + "/v1/sessions", json={"label": "k"}) as resp:
            sid = (await resp.json())["id"]
        qr = await asyncio.wait_for(sse_until(http, f"{first.url}/v1/sessions/{sid}/events", "qr"), WAIT_S)
        ready = asyncio.ensure_future(
            sse_until(http, f"{first.url}/v1/sessions/{sid}/events", "session_ready")
        )
        await sim.scan(qr["qr"], PHONE)
        assert (await asyncio.wait_for(ready, WAIT_S))["phone_number"] == PHONE

        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL

        second = WorkerProcess(tmp_path, sim, port)
        await second.start()
        async with http.get(f"{second.url}/v1/sessions/{sid}") as resp:
            status = (await resp.json())["status"]
        if status != "ready":
            await asyncio.wait_for(
                sse_until(http, f"{second.url}/v1/sessions/{sid}/events", "session_ready"), WAIT_S
            )
        async with http.get(f"{second.url}/v1/sessions/{sid}") as resp:
            session = await resp.json()
        assert session["status"] == "ready" and session["phone_number"] == PHONE
        statuses = [h["status"] for h in session["history"]]
        assert statuses == ["starting", "qr", "authenticated", "ready", "starting", "authenticated", "ready"]
        assert len(await sim.devices(PHONE)) == 1  # the same linked device, no new scan
        # exactly one browser runs on the session's profile: whatever the killed worker left is gone
        profiles = tmp_path / "var" / f"worker-{port}" / "profiles"
        groups = {
            p.pgid
            for p in chromium._processes()
            if (chromium._user_data_dir(p) or "").startswith(str(profiles.resolve()))
        }
        assert len(groups) == 1

        assert await second.stop(signal.SIGTERM) == 0
    assert any("shutdown ◆" in line for line in second.log), "".join(second.log)
