"""The cluster with real processes: four workers behind the gateway, killed, paused, restarted.

Workers are real ``python -m worker`` processes (Chromium, Postgres, Redis); the gateway runs
in-process. Where a test must observe another process and there is nothing to await, it reads
through the gateway in a bounded loop (``eventually``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.app import create_app as create_gateway
from shared.heartbeats import HeartbeatAuth, scan_heartbeats
from shared.models import now_ms
from shared.redis_keys import Keys
from shared.settings import Settings
from tests.conftest import (
    LIFTED_QUOTAS,
    REDIS_URL,
    WAIT_S,
    AiohttpClient,
    EventStream,
    Sim,
    WorkerProcess,
    cluster_worker,
    free_port,
    scan_until_linked,
    sse_until,
)
from worker import chromium

pytestmark = [pytest.mark.chromium, pytest.mark.timeout(420)]  # real processes: slow on a busy box

API_KEY = "wlk_test_cluster_key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Cluster:
    def __init__(self, tmp_path: Path, sim: Sim, pg_dsn: str, redis_prefix: str) -> None:
        self.tmp_path = tmp_path
        self.sim = sim
        self.pg_dsn = pg_dsn
        self.redis_prefix = redis_prefix
        self.ports = [free_port() for _ in range(4)]
        self.workers: dict[int, WorkerProcess] = {}
        self.gateway: TestClient[Any, Any] | None = None

    async def stop_all(self) -> None:
        started = [w for w in self.workers.values() if w.proc is not None]
        for proc in started:
            if proc.proc is not None and proc.proc.returncode is None:
                proc.proc.send_signal(signal.SIGCONT)
        await asyncio.gather(*(w.stop(signal.SIGTERM) for w in started), return_exceptions=True)

    def name(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    async def start_worker(self, port: int) -> WorkerProcess:
        proc = WorkerProcess(self.tmp_path, self.sim, port, self.pg_dsn, self.redis_prefix)
        self.workers[port] = proc  # known before it starts: the fixture stops it whatever happens
        await proc.start()
        return proc

    @property
    def gw(self) -> TestClient[Any, Any]:
        assert self.gateway is not None
        return self.gateway

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        resp = await self.gw.request(method, path, headers=AUTH, **kwargs)
        body = await resp.json() if resp.content_type == "application/json" else await resp.read()
        return resp.status, body

    async def link(self, phone: str) -> dict[str, Any]:
        status, created = await self.call("POST", "/v1/sessions", json={})
        assert status == 201, created
        sid = created["id"]
        stream = EventStream(await self.gw.get(f"/v1/sessions/{sid}/events", headers=AUTH))
        try:
            await scan_until_linked(self.sim.url, stream.next_qr, phone)
            await stream.until("session_ready")
        finally:
            stream.close()
        status, body = await self.call("GET", f"/v1/sessions/{sid}")
        assert status == 200 and body["status"] == "ready", body
        return dict(body)

    async def sse_until(self, sid: str, kind: str) -> dict[str, Any]:
        return await sse_until(await self.gw.get(f"/v1/sessions/{sid}/events", headers=AUTH), kind)

    async def eventually(self, probe: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool]) -> Any:
        for _ in range(int(WAIT_S / 0.2)):
            value = await probe()
            if ok(value):
                return value
            await asyncio.sleep(0.2)  # another process changes this; we can only look again
        raise AssertionError("the cluster never got there")

    async def session(self, sid: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/sessions/{sid}")
        return dict(body) if status == 200 else {"status": f"http {status}"}

    async def cluster_health(self) -> dict[str, Any]:
        status, body = await self.call("GET", "/health/cluster")
        assert status == 200
        return dict(body)


@pytest.fixture
async def cluster(
    tmp_path: Path,
    sim: Sim,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
    aiohttp_client: AiohttpClient,
) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, sim, pg_dsn, redis_prefix)
    try:  # every worker that started is stopped, whatever fails, also during setup
        await asyncio.gather(*(c.start_worker(p) for p in c.ports))
        settings = Settings(
            workers=",".join(c.name(p) for p in c.ports),
            database_url=pg_dsn,
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            dev_api_key=API_KEY,
            health_interval_s=0.3,
            breaker_open_s=1.0,
            **LIFTED_QUOTAS,
        )
        c.gateway = await aiohttp_client(create_gateway(settings))
        await c.eventually(c.cluster_health, lambda h: all(w.get("reachable") for w in h["workers"]))
        yield c
    finally:
        for port, proc in c.workers.items():  # shown by pytest when the test failed
            print(f"--- worker {port} log (tail)\n" + "".join(proc.log[-60:]))
        await c.stop_all()
        # a SIGKILLed worker that was not started again leaves its browsers to its next start, which
        # reaps them; this test run is that next start
        for port in c.ports:
            chromium.reap(tmp_path / "var" / f"worker-{port}" / "profiles")


async def has_snapshot(cluster: Cluster, pool: asyncpg.Pool, sid: str) -> None:
    async def probe() -> Any:
        return await pool.fetchval("SELECT 1 FROM profile_snapshots WHERE session_id = $1", sid)

    await cluster.eventually(probe, lambda v: v == 1)


async def ready_elsewhere(cluster: Cluster, sid: str, not_on: str | None) -> dict[str, Any]:
    async def probe() -> dict[str, Any]:
        return await cluster.session(sid)

    body: dict[str, Any] = await cluster.eventually(
        probe, lambda b: b.get("status") == "ready" and b.get("worker") not in (None, not_on)
    )
    return body


async def test_sigkill_fails_over_without_rescan_and_the_breaker_recovers(
    cluster: Cluster, sim: Sim, pg_pool: asyncpg.Pool
) -> None:
    linked = [await cluster.link(f"3161234{n:04d}") for n in range(4)]
    victim_name = linked[0]["worker"]
    victim_port = int(victim_name.rsplit(":", 1)[1])
    theirs = [s for s in linked if s["worker"] == victim_name]
    # the live snapshot (shortly after ready) is what lets another worker restore without a scan
    for s in theirs:
        await has_snapshot(cluster, pg_pool, s["id"])

    assert await cluster.workers[victim_port].stop(signal.SIGKILL) == -signal.SIGKILL
    for s in theirs:
        back = await ready_elsewhere(cluster, s["id"], victim_name)
        assert back["phone_number"] == s["phone_number"]
        assert len(await sim.devices(s["phone_number"])) == 1  # the same device: no re-scan
        assert "qr" not in [h["status"] for h in back["history"][len(s["history"]) :]]
    health = await cluster.eventually(
        cluster.cluster_health, lambda h: cluster_worker(h, victim_name)["breaker"]["trips"] >= 1
    )
    assert cluster_worker(health, victim_name)["breaker"]["state"] in {"open", "half_open"}
    assert health["status"] == "degraded" and not cluster_worker(health, victim_name)["reachable"]

    await cluster.start_worker(victim_port)  # it comes back; the breaker closes again
    await cluster.eventually(
        cluster.cluster_health, lambda h: cluster_worker(h, victim_name)["breaker"]["state"] == "closed"
    )


async def test_rolling_restart_under_load_fails_no_call_and_rescans_nothing(
    cluster: Cluster, sim: Sim
) -> None:
    linked = [await cluster.link(f"3169876{n:04d}") for n in range(4)]
    failures: list[tuple[str, int]] = []
    calls = 0
    stop = asyncio.Event()

    async def steady_traffic() -> None:
        nonlocal calls
        while not stop.is_set():
            for s in linked:
                status, _ = await cluster.call("GET", f"/v1/sessions/{s['id']}")
                calls += 1
                if status != 200:
                    failures.append((s["id"], status))
            status, _ = await cluster.call("GET", "/v1/accounts")
            calls += 1
            if status != 200:
                failures.append(("accounts", status))

    traffic = asyncio.create_task(steady_traffic())
    try:
        for port in list(cluster.ports):
            t0 = asyncio.get_running_loop().time()
            assert await cluster.workers[port].stop(signal.SIGTERM) == 0
            t1 = asyncio.get_running_loop().time()
            await cluster.start_worker(port)
            t2 = asyncio.get_running_loop().time()
            print(f"worker {port}: stopped in {t1 - t0:.1f}s, started in {t2 - t1:.1f}s, calls {calls}")
    finally:
        stop.set()
        await traffic
    assert calls > 20 and failures == []
    for s in linked:
        back = await ready_elsewhere(cluster, s["id"], None)
        assert back["phone_number"] == s["phone_number"]
        assert len(await sim.devices(s["phone_number"])) == 1
        assert "qr" not in [h["status"] for h in back["history"][len(s["history"]) :]]


async def test_a_paused_worker_that_resumes_lets_go_and_nothing_is_driven_twice(
    cluster: Cluster, sim: Sim, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    first = await cluster.link("31655500001")
    victim_name = first["worker"]
    victim_port = int(victim_name.rsplit(":", 1)[1])
    victim = cluster.workers[victim_port]
    sid = first["id"]
    await has_snapshot(cluster, pg_pool, sid)
    old_profile = await pg_pool.fetchval("SELECT profile_id FROM whatsapp_accounts WHERE id = $1", sid)
    mark = len(victim.log)
    before = await sim.get("/admin/state")

    assert victim.proc is not None
    # paused past its lease and heartbeat; its Chromium goes on running and stays connected
    victim.proc.send_signal(signal.SIGSTOP)
    moved = await ready_elsewhere(cluster, sid, victim_name)
    token = await pg_pool.fetchval("SELECT fencing_token FROM whatsapp_accounts WHERE id = $1", sid)
    victim.proc.send_signal(signal.SIGCONT)
    await victim.wait_log(f"{sid}: no longer ours", after=mark)

    row = await pg_pool.fetchrow("SELECT owner, fencing_token FROM whatsapp_accounts WHERE id = $1", sid)
    assert row is not None and row["owner"] == moved["worker"] and row["fencing_token"] == token
    assert len(await sim.devices(first["phone_number"])) == 1
    # the resumed worker ended its browser for that session: one driver only
    old = str((tmp_path / "var" / f"worker-{victim_port}" / "profiles" / old_profile).resolve())

    async def browsers_on_old_profile() -> list[int]:
        return [p.pid for p in chromium._processes() if chromium._user_data_dir(p) == old]

    await cluster.eventually(browsers_on_old_profile, lambda pids: pids == [])
    assert (await cluster.session(sid))["status"] == "ready"
    # the restore may knock the paused browser into CONFLICT (if it still looked connected); the
    # resumed worker does not take the device back (the lease is another's), so the new driver is
    # never knocked out in turn
    after = await sim.get("/admin/state")
    assert after["conflicts_sent"] <= before["conflicts_sent"] + 1
    assert after["takeovers"] == before["takeovers"]


async def test_forty_sessions_at_once_spread_within_the_bound_and_the_launch_budget_holds(
    cluster: Cluster, redis_client: aioredis.Redis
) -> None:
    """40 "add account" at once through the gateway: placed by the workers' heartbeats within
    1.25x of the mean, their browsers started at most the machine's launch budget at a time
    across the four workers, every QR reached, and every route lands on the owner."""

    async def add() -> tuple[str, str]:
        resp = await cluster.gw.post("/v1/sessions", headers=AUTH, json={})
        body = await resp.json()
        assert resp.status == 201, body
        return str(body["id"]), resp.headers["X-Walink-Worker"]

    placed = dict(await asyncio.gather(*(add() for _ in range(40))))
    created = list(placed)
    answered_ms = now_ms()

    # each worker's next heartbeat names the creates it took: what makes every gateway's count exact
    # (a session is in a beat's "sessions" exactly when the beat names it, so none counts twice)
    async def beats() -> dict[str, dict[str, Any]]:
        return await scan_heartbeats(redis_client, Keys(cluster.redis_prefix), HeartbeatAuth(""))

    seen = await cluster.eventually(
        beats,
        lambda b: len(b) == 4 and all(int(beat["load"]["at_ms"]) > answered_ms for beat in b.values()),
    )
    for name, beat in seen.items():
        mine = {sid for sid, owner in placed.items() if owner == name}
        assert mine <= set(beat["load"]["recent"]), (name, mine - set(beat["load"]["recent"]))
    await asyncio.gather(*(cluster.sse_until(sid, "qr") for sid in created))
    owners: dict[str, str] = {}
    for sid in created:
        resp = await cluster.gw.get(f"/v1/sessions/{sid}", headers=AUTH)
        body = await resp.json()
        owners[sid] = body["worker"]
        assert resp.status == 200 and resp.headers["X-Walink-Worker"] == body["worker"]  # the owner
        qr = await cluster.gw.get(f"/v1/sessions/{sid}/qr", headers=AUTH)
        assert qr.status == 200 and qr.headers["X-Walink-Worker"] == body["worker"]
    shares = {name: sum(1 for o in owners.values() if o == name) for name in map(cluster.name, cluster.ports)}
    print(f"40 sessions at once over 4 workers: {sorted(shares.values(), reverse=True)} {shares}")
    assert sum(shares.values()) == 40 and max(shares.values()) <= 1.25 * 40 / 4, shares
    health = await cluster.cluster_health()
    budgets = [w["health"]["queue"]["budget"] for w in health["workers"]]
    limit = budgets[0]["limit"]
    assert {b["scope"] for b in budgets} == {budgets[0]["scope"]} and limit >= 1  # one budget
    assert sum(b["granted_total"] for b in budgets) == 40  # every start went through it
    assert max(b["max_held_seen"] for b in budgets) <= limit, budgets
    for sid in created:
        status, _ = await cluster.call("DELETE", f"/v1/sessions/{sid}")
        assert status == 204
