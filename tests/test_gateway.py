"""The gateway in front of real worker processes (real Chromium) and a real simulator process.

Nothing is mocked: a simulator process, worker processes (``python -m worker``) sharing this
test's Postgres database and Redis prefix, and the gateway app in-process. Processes are awaited
by their ``ready on`` log lines, session states by the event stream. Two polls, where there is
nothing to await: the simulator's port (it logs before it binds), and ``/health/cluster`` for
the gateway's own view of a worker (a SIGKILLed worker announces nothing; a restarted one is
trusted again only after its breaker's half-open probe).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.store import Store
from simulator.builds import FIRST_BUILD
from tests.conftest import (
    CHROMIUM,
    LIFTED_QUOTAS,
    LOOPBACK_WEBHOOKS,
    REDIS_URL,
    SNAPSHOT_KEY,
    WAIT_S,
    AiohttpClient,
    EventStream,
    cluster_worker,
    free_port,
    scan_until_linked,
)

pytestmark = [pytest.mark.chromium, pytest.mark.timeout(420)]  # real processes: slow on a busy box

PHONE = "5511912345678"
INTERNAL_TOKEN = "internal-test-token"
STOP_DEADLINE_S = 15.0


class Process:
    """A child process whose stderr is read line by line (kept for failure messages)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self, ready: str) -> None:
        self.log.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._until(ready), WAIT_S)
        self._drain = asyncio.create_task(self._until(None))

    async def _until(self, needle: str | None) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                if needle is None:
                    return
                raise AssertionError(f"{self.name} exited:\n" + "".join(self.log[-40:]))
            self.log.append(line.decode(errors="replace"))
            if needle is not None and needle in self.log[-1]:
                return

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the deadline; the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_DEADLINE_S)
            except TimeoutError:
                self.proc.send_signal(signal.SIGKILL)
                await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 5)
        return self.proc.returncode


def _env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WALINK_")}
    return {**base, **values}


@dataclass
class Cluster:
    sim_url: str
    workers: dict[str, Process]  # by worker name (host:port)
    gateway: TestClient[Any, Any]
    keys: dict[str, str]
    data_dir: Path

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


async def _wait_listening(url: str) -> None:
    """The simulator logs before it binds: poll its port (there is nothing else to await)."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                async with http.get(url + "/favicon.ico") as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)


@pytest.fixture
async def start_cluster(
    tmp_path: Path,
    aiohttp_client: AiohttpClient,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> AsyncIterator[Callable[[int], Any]]:
    """``await start_cluster(n)``: simulator + n workers + the gateway, with API keys."""
    processes: list[Process] = []
    gateways: list[TestClient[Any, Any]] = []

    async def start(n: int) -> Cluster:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        sim = Process("simulator", ["-m", "simulator", "--port", str(sim_port)], _env())
        processes.append(sim)
        ports = [free_port() for _ in range(n)]
        workers = {
            f"127.0.0.1:{port}": Process(
                f"worker {port}",
                ["-m", "worker"],
                _env(
                    WALINK_WORKER_PORT=str(port),
                    WALINK_DATA_DIR=str(tmp_path / "var"),
                    WALINK_SIMULATOR_URL=sim_url,
                    WALINK_DATABASE_URL=pg_dsn,
                    WALINK_REDIS_URL=REDIS_URL,
                    WALINK_REDIS_PREFIX=redis_prefix,
                    WALINK_SNAPSHOT_KEY=SNAPSHOT_KEY,
                    WALINK_WARM_POOL_SIZE="0",
                    WALINK_INTERNAL_TOKEN=INTERNAL_TOKEN,
                    WALINK_SHUTDOWN_DEADLINE_S="10",
                    WALINK_WEBHOOK_ALLOW=LOOPBACK_WEBHOOKS,
                    CHROMIUM_PATH=str(CHROMIUM),
                ),
            )
            for port in ports
        }
        processes.extend(workers.values())
        await asyncio.gather(
            sim.start("simulator listening"),
            _wait_listening(sim_url),
            *(w.start("ready on") for w in workers.values()),
        )
        store = Store(pg_pool)
        for ws in ("ws_a", "ws_b"):
            await store.ensure_workspace(ws)
        keys = {
            "a": await store.create_api_key("ws_a"),
            "b": await store.create_api_key("ws_b"),
            "admin": await store.create_api_key(None, admin=True),
        }
        settings = Settings(
            workers=",".join(workers),
            database_url=pg_dsn,
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            internal_token=INTERNAL_TOKEN,
            simulator_url=sim_url,
            health_interval_s=0.2,
            breaker_open_s=1.0,
            **LIFTED_QUOTAS,
        )
        gateway = await aiohttp_client(create_app(settings))
        gateways.append(gateway)
        return Cluster(sim_url, workers, gateway, keys, tmp_path / "var")

    yield start
    for client in gateways:  # the gateway first: it ends the event streams it relays
        await client.close()
    # workers first (their browsers hold long-polls to the simulator), then the simulator
    workers_first = sorted(processes, key=lambda p: p.name == "simulator")
    codes = await asyncio.gather(*(p.stop() for p in workers_first if p.name != "simulator"))
    codes += await asyncio.gather(*(p.stop() for p in workers_first if p.name == "simulator"))
    for process, code in zip(workers_first, codes, strict=True):
        if code != 0:  # a worker slow to stop is the worker's business; the leak check still runs
            print(f"{process.name} exited {code} (SIGKILL after {STOP_DEADLINE_S:.0f} s?):")
            print("".join(process.log[-15:]))


async def _json(resp: aiohttp.ClientResponse, expect: int) -> Any:
    body = await resp.json()
    assert resp.status == expect, (resp.status, body)
    return body


async def _events(c: Cluster, sid: str, who: str = "a") -> EventStream:
    resp = await c.gateway.get(f"/v1/sessions/{sid}/events", headers=c.auth(who))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return EventStream(resp)


async def _create(c: Cluster, who: str = "a", **body: Any) -> tuple[dict[str, Any], str]:
    resp = await c.gateway.post("/v1/sessions", json=body, headers=c.auth(who))
    created: dict[str, Any] = await _json(resp, 201)
    return created, resp.headers["X-Walink-Worker"]


async def _scan(c: Cluster, stream: EventStream, phone: str, qr: str | None = None) -> None:
    await scan_until_linked(c.sim_url, stream.next_qr, phone, qr)


async def test_link_spread_and_tenancy_through_the_gateway(start_cluster: Callable[[int], Any]) -> None:
    c: Cluster = await start_cluster(3)
    gw = c.gateway

    # ---- add account → QR → scan → ready, everything through the gateway
    created, owner = await _create(c, label="first")
    sid = created["id"]
    assert sid.startswith("s_") and created["status"] == "starting"
    assert created["qr_url"] == f"/v1/sessions/{sid}/qr" and owner in c.workers
    stream = await _events(c, sid)
    qr = (await stream.until("qr"))["qr"]
    raw = await _json(await gw.get(f"/v1/sessions/{sid}/qr?format=raw", headers=c.auth("a")), 200)
    assert raw["qr"] == qr
    png = await gw.get(f"/v1/sessions/{sid}/qr", headers={**c.auth("a"), "Accept": "image/png"})
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    assert (await png.read()).startswith(b"\x89PNG")
    svg = await gw.get(f"/v1/sessions/{sid}/qr?format=svg", headers=c.auth("a"))
    assert svg.headers["Content-Type"].startswith("image/svg+xml") and b"<svg" in await svg.read()
    await _scan(c, stream, PHONE, qr)
    ready = await stream.until("session_ready")
    assert ready["phone_number"] == PHONE
    stream.close()
    session = await _json(await gw.get(f"/v1/sessions/{sid}", headers=c.auth("a")), 200)
    assert session["status"] == "ready" and session["phone_number"] == PHONE
    assert session["worker"] in c.workers  # (the owner, unless a starved owner's session was adopted)

    # ---- tenancy: workspace B sees nothing of A's, through any route
    for method, path in [
        ("GET", f"/v1/sessions/{sid}"),
        ("GET", f"/v1/sessions/{sid}/qr"),
        ("GET", f"/v1/sessions/{sid}/events"),
        ("POST", f"/v1/sessions/{sid}/restart"),
        ("DELETE", f"/v1/sessions/{sid}"),
        ("GET", "/v1/accounts?workspace_id=ws_a"),
    ]:
        resp = await gw.request(method, path, headers=c.auth("b"))
        body = await resp.json()
        assert resp.status == 404, (method, path, resp.status, body)
        assert set(body["error"]) == {"code", "message"}
    accounts_b = await _json(await gw.get("/v1/accounts", headers=c.auth("b")), 200)
    assert accounts_b["accounts"] == []
    accounts_a = await _json(await gw.get("/v1/accounts", headers=c.auth("a")), 200)
    assert [(a["id"], a["phone_number"], a["status"]) for a in accounts_a["accounts"]] == [
        (sid, PHONE, "connected")
    ]
    admin_view = await gw.get(f"/v1/sessions/{sid}?workspace_id=ws_a", headers=c.auth("admin"))
    assert admin_view.status == 200
    unauthenticated = await gw.get(f"/v1/sessions/{sid}")
    assert unauthenticated.status == 401
    assert (await unauthenticated.json())["error"]["code"] == "unauthorized"
    assert (await gw.get("/v1/accounts", headers={"X-API-Key": "wlk_wrong"})).status == 401
    assert (await gw.get("/health/cluster", headers=c.auth("a"))).status == 403

    # ---- the ring: every worker on it, with its share of a fixed sample of 10 000 keys
    cluster = await _json(await gw.get("/health/cluster", headers=c.auth("admin")), 200)
    shares = {w["name"]: w["ring_share"] for w in cluster["workers"]}
    print(f"\nring shares (10 000 sample keys): {shares}")
    assert cluster["status"] == "healthy", [(w["name"], w["status"], w["error"]) for w in cluster["workers"]]
    assert set(shares) == set(c.workers)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    assert all(0.2 < s < 0.47 for s in shares.values()), shares
    assert sum(w["sessions_owned"] or 0 for w in cluster["workers"]) >= 1
    # each worker names the WhatsApp Web build it serves (the live one: WALINK_WA_VERSION=latest)
    served = [w["web_version"] for w in cluster["workers"]]
    assert all(v["wanted"] == "latest" and not v["pinned"] and v["source"] == "live" for v in served)
    assert FIRST_BUILD in {v["version"] for v in served} <= {FIRST_BUILD, None}, served

    # ---- new sessions spread over every worker: 7 at once, bounded to ceil(1.25 x 7 / 3) = 3 each
    burst = await asyncio.gather(*(_create(c, label=f"spread {i}") for i in range(7)))
    placed = Counter(worker for _, worker in burst)
    print(f"placement of 7 concurrent creates over 3 workers: {dict(placed)}")
    assert set(placed) == set(c.workers), placed
    # the cap is 3; a create retried after a worker timed out under load may land one further
    assert max(placed.values()) <= 4
    listed = await _json(await gw.get("/v1/sessions", headers=c.auth("a")), 200)
    missing = {s["id"] for s, _ in burst} - {s["id"] for s in listed["sessions"]}
    assert not missing or listed["partial"], (missing, listed["unreachable"])
    deleted = await asyncio.gather(
        *(gw.delete(f"/v1/sessions/{s['id']}", headers=c.auth("a")) for s, _ in burst)
    )
    assert [r.status for r in deleted] == [204] * len(burst)

    # ---- the gateway's own pages
    assert (await gw.get("/health")).status == 200
    doc = await _json(await gw.get("/openapi.json"), 200)
    assert doc["openapi"].startswith("3.1") and "/v1/sessions/{session_id}/events" in doc["paths"]
    docs = await gw.get("/docs")
    assert docs.status == 200 and "/v1/sessions/{session_id}/qr" in await docs.text()
    dashboard = await gw.get("/")
    assert dashboard.status == 200 and "/health/cluster" in await dashboard.text()
    metrics = await (await gw.get("/metrics")).text()
    assert 'walink_gateway_requests_total{outcome="2xx",route="v1.sessions.create"}' in metrics


async def _cluster_until(c: Cluster, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /health/cluster (each poll is an answer in itself; there is no event to await)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            resp = await c.gateway.get("/health/cluster", headers=c.auth("admin"))
            view: dict[str, Any] = await _json(resp, 200)
            if check(view):
                return view
            await asyncio.sleep(0.1)


async def test_a_killed_worker_is_reported_down_and_its_sessions_fail_over(
    start_cluster: Callable[[int], Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    c: Cluster = await start_cluster(2)
    gw = c.gateway
    created, owner = await _create(c, label="survivor")
    sid = created["id"]
    stream = await _events(c, sid)  # stays open through the kill
    first_qr = (await stream.until("qr"))["qr"]
    survivor = next(name for name in c.workers if name != owner)
    lease = await redis_client.get(Keys(redis_prefix).lease(sid))
    failovers_before = _metric(await (await gw.get("/metrics")).text(), "walink_gateway_failovers_total")
    resumes_before = _metric(await (await gw.get("/metrics")).text(), "walink_gateway_sse_resumes_total")

    await c.workers[owner].kill()

    # the session's next request goes to the other worker at once (the owner refuses connections)
    resp = await gw.get(f"/v1/sessions/{sid}", headers=c.auth("a"))
    body = await _json(resp, 200)
    assert resp.headers["X-Walink-Worker"] == survivor and body["id"] == sid
    # new sessions go to the survivor only
    for _ in range(3):
        again, placed = await _create(c, label="after the kill")
        assert placed == survivor
        assert (await gw.delete(f"/v1/sessions/{again['id']}", headers=c.auth("a"))).status == 204

    view = await _cluster_until(c, lambda v: cluster_worker(v, owner)["breaker"]["state"] == "open")
    dead = cluster_worker(view, owner)
    print(f"\nafter SIGKILL of {owner}: status {view['status']}, {dead}")
    assert view["status"] == "degraded" and view["workers_up"] == 1
    assert dead["reachable"] is False and dead["status"] == "down" and dead["health"] is None
    assert dead["ring_share"] == 0.0 and cluster_worker(view, survivor)["ring_share"] == 1.0
    assert cluster_worker(view, survivor)["status"] == "healthy"
    metrics = await (await gw.get("/metrics")).text()
    assert f'walink_gateway_breaker_state{{worker="{owner}"}} 2.0' in metrics
    if lease == owner.encode():  # (a worker that could not reach Redis fences with Postgres alone)
        assert _metric(metrics, "walink_gateway_failovers_total") > failovers_before

    # the worker comes back on its port (reaping what the killed one left): half-open, then closed
    await c.workers[owner].start("ready on")
    view = await _cluster_until(c, lambda v: v["status"] == "healthy")
    assert cluster_worker(view, owner)["breaker"]["state"] == "closed"
    assert 0.2 < cluster_worker(view, owner)["ring_share"] < 0.8

    # the client's event stream never broke: the gateway resumed it on another worker, and the
    # session's fresh QR (its browser died with the worker) arrives on the same stream
    await stream.until("status", status="starting")
    second_qr = (await stream.until("qr"))["qr"]
    assert second_qr != first_qr
    stream.close()
    metrics = await (await gw.get("/metrics")).text()
    assert _metric(metrics, "walink_gateway_sse_resumes_total") > resumes_before


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"no {name} in /metrics"
    return values[0]


async def test_a_rolling_restart_loses_no_request(start_cluster: Callable[[int], Any]) -> None:
    """SIGTERM a worker and start it again while clients keep calling: every call succeeds."""
    c: Cluster = await start_cluster(2)
    gw = c.gateway
    created, owner = await _create(c, label="rolling")
    sid = created["id"]
    stream = await _events(c, sid)
    await _scan(c, stream, PHONE)
    await stream.until("session_ready")
    stream.close()
    answers: Counter[str] = Counter()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            for method, path, expect in [
                ("GET", f"/v1/sessions/{sid}", 200),
                ("GET", "/v1/accounts", 200),
                ("GET", "/v1/events?after=0&limit=5", 200),
            ]:
                resp = await gw.request(method, path, headers=c.auth("a"))
                await resp.read()
                answers[f"{method} {path.split('?')[0]} {resp.status}"] += 1
                assert resp.status == expect, (method, path, resp.status, await resp.text())

    async def creator() -> None:
        for i in range(2):  # a few new sessions while the worker drains and comes back
            new, worker = await _create(c, label=f"during restart {i}")
            answers[f"POST /v1/sessions 201 on {'restarted' if worker == owner else 'other'}"] += 1
            resp = await gw.delete(f"/v1/sessions/{new['id']}", headers=c.auth("a"))
            assert resp.status == 204, await resp.text()
            if stop.is_set():
                return

    clients = [asyncio.create_task(client()), asyncio.create_task(creator())]
    restarting = c.workers[owner]
    assert await restarting.stop() == 0  # SIGTERM: drains, hands its ready session over, exits
    await restarting.start("ready on")
    await _cluster_until(c, lambda v: v["status"] == "healthy")
    stop.set()
    await asyncio.gather(*clients)
    print(f"\nanswers during the rolling restart of {owner}: {dict(answers)}")
    assert sum(answers.values()) > 10
    session = await _json(await gw.get(f"/v1/sessions/{sid}", headers=c.auth("a")), 200)
    assert session["phone_number"] == PHONE  # linked throughout, no re-scan


async def test_gateway_process_answers_without_workers_and_stops_on_sigterm(
    pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> None:
    port = free_port()
    dead_worker = f"127.0.0.1:{free_port()}"
    gateway = Process(
        "gateway",
        ["-m", "gateway"],
        _env(
            WALINK_GATEWAY_PORT=str(port),
            WALINK_WORKERS=dead_worker,
            WALINK_DATABASE_URL=pg_dsn,
            WALINK_REDIS_URL=REDIS_URL,
            WALINK_REDIS_PREFIX=redis_prefix,
            WALINK_DEV_API_KEY="dev-key",
            WALINK_HEALTH_INTERVAL_S="0.2",
        ),
    )
    await gateway.start("ready on")
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["workers"]["up"] == 0
            async with http.get(url + "/health/cluster") as resp:  # open: a dev key is set
                view = await _json(resp, 200)
            assert view["status"] == "down" and cluster_worker(view, dead_worker)["status"] == "down"
            headers = {"Authorization": "Bearer dev-key"}
            async with http.post(url + "/v1/sessions", json={}, headers=headers) as resp:
                error = await _json(resp, 503)
            assert error["error"]["code"] == "no_worker_available"
            async with http.get(url + "/") as resp:
                assert '"dev_api_key":"dev-key"' in await resp.text()
    finally:
        assert await gateway.stop() == 0, "".join(gateway.log)
    assert any("stopped" in line for line in gateway.log), gateway.log
