"""Fixtures: a real simulator, real workers with real Chromium, and an SSE reader.

Nothing here is mocked: each test gets its own simulator (aiohttp, in-process) and its own worker
data directory under ``tmp_path``, and every test checks that no Chromium of its own is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from playwright.async_api import Playwright, async_playwright

from load_tests.ports import free_port as free_port  # the tests take it from here
from shared import db
from shared.settings import HEADLESS_SHELL, Settings
from simulator.app import create_app as create_simulator
from worker import chromium
from worker.app import create_app as create_worker
from worker.keys import MANAGER

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", str(HEADLESS_SHELL)))
WAIT_S = 60.0  # how long a test waits for an event before calling it lost (not a speed check)

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
AiohttpServer = Callable[..., Awaitable[TestServer]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not CHROMIUM.exists():
        skip = pytest.mark.skip(reason=f"no Chromium at {CHROMIUM}; `make test` installs it")
        for item in items:
            if "chromium" in item.keywords:
                item.add_marker(skip)


PG_ADMIN_DSN = os.environ.get("WALINK_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("WALINK_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = f"{os.getpid()}_{os.urandom(3).hex()}"
TABLES = ("delivery_attempts", "outbox", "profile_snapshots", "whatsapp_accounts", "api_keys", "workspaces")


@pytest.fixture(scope="session")
def pg_dsn() -> Any:
    """A database of this test run (created, migrated, dropped at the end): runs never collide."""
    name = f"walink_test_{RUN_ID}"
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name

    async def setup() -> None:
        await db.ensure_database(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(setup())
    yield dsn
    asyncio.run(teardown())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client for a test (webhook dispatchers, direct calls)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def pg_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the run's database, with every table emptied before the test."""
    pool = await db.create_pool(pg_dsn, max_size=10)
    await pool.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test (``walink_test:<run>:<n>:``); its keys are deleted afterwards."""
    prefix = f"walink_test:{RUN_ID}:{os.urandom(3).hex()}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


class Sim:
    """The simulator under test and its phone/admin API."""

    def __init__(self, server: TestServer, client: TestClient[Any, Any]) -> None:
        self.server = server
        self.client = client
        self.url = str(server.make_url("")).rstrip("/")

    async def post(self, path: str, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        resp = await self.client.post(path, json=body)
        data: dict[str, Any] = await resp.json()
        assert resp.status == expect, (path, resp.status, data)
        return data

    async def get(self, path: str) -> dict[str, Any]:
        resp = await self.client.get(path)
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200, (path, resp.status, data)
        return data

    async def profile(self, **fields: Any) -> dict[str, Any]:
        return await self.post("/admin/profile", fields)

    async def scan(self, qr: str, phone: str, expect: int = 200, **extra: Any) -> dict[str, Any]:
        return await self.post("/phone/scan", {"qr": qr, "phone": phone, **extra}, expect)

    async def scan_linking(
        self, stream: EventStream, phone: str, qr: str | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Scan the QRs that walink publishes on ``stream`` until the phone links."""
        return await scan_until_linked(self.url, stream.next_qr, phone, qr, **extra)

    async def devices(self, phone: str) -> list[dict[str, Any]]:
        resp = await self.client.get("/phone/devices", params={"phone": phone})
        data = await resp.json()
        devices: list[dict[str, Any]] = data["devices"]
        return devices


@pytest.fixture
async def sim(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> Sim:
    server = await aiohttp_server(create_simulator("strict"))
    client = await aiohttp_client(server)
    return Sim(server, client)


LOOPBACK_WEBHOOKS = "127.0.0.0/8,::1"  # WALINK_WEBHOOK_ALLOW of test workers
# gateway settings for a test where one workspace takes a whole (small) cluster on purpose: its
# bursts are larger than the fair share the default quotas give it (tests/test_limits.py)
LIFTED_QUOTAS: dict[str, Any] = {
    "quota_sessions": 1000,
    "quota_linkings": 1000,
    "quota_creates_per_minute": 100_000,
}
SNAPSHOT_KEY = "q0v4cXmW2m5W8Ck3tM2o3H3n5F3n2kq9yA8fQ6pL1xE="  # test-only key (base64 of 32 bytes)


TEST_CREDS_SETTLE_S = 3.0


def worker_settings(tmp_path: Path, sim: Sim, pg_dsn: str, redis_prefix: str, **overrides: Any) -> Settings:
    base = Settings(
        data_dir=tmp_path / "var",
        chromium_path=CHROMIUM,
        simulator_url=sim.url,
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        snapshot_key=SNAPSHOT_KEY,
        warm_pool_size=0,
        start_timeout_s=45.0,
        shutdown_deadline_s=10.0,
        # the strict page settles 1 s after pairing success (simulator/profiles.py): 3 s leaves room
        # for a loaded machine, and keeps what waits for the settle (hibernation, the shutdown
        # handover) short; the default 6 s is for pages whose settle is not known
        creds_settle_s=TEST_CREDS_SETTLE_S,
        webhook_backoff_base_s=0.05,
        webhook_backoff_max_s=0.5,
        webhook_allow=LOOPBACK_WEBHOOKS,  # the test receivers listen on loopback: admitted explicitly
    )
    # a test's warm pool stays the size it asks for (growth after bursts: tests/test_units.py)
    overrides.setdefault("warm_pool_max", overrides.get("warm_pool_size", 0))
    return base.replace(**overrides)


WorkerFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def start_worker(
    tmp_path: Path,
    sim: Sim,
    aiohttp_client: AiohttpClient,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> AsyncIterator[WorkerFactory]:
    """Start a worker app (real Playwright + Chromium, Postgres, Redis) on this test's data dir."""
    started: list[TestClient[Any, Any]] = []

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        app = create_worker(worker_settings(tmp_path, sim, pg_dsn, redis_prefix, **overrides))
        client = await aiohttp_client(app)
        started.append(client)
        return client

    yield start
    for client in started:
        await client.close()


@pytest.fixture
async def pw() -> AsyncIterator[Playwright]:
    async with async_playwright() as playwright:
        yield playwright


@pytest.fixture(autouse=True)
def no_leaked_chromium(tmp_path: Path) -> Any:
    """After each test: no Chromium running on a profile of this test, no profile lock left."""
    yield
    left = chromium.processes_under(tmp_path)
    assert not left, f"Chromium left running: {[p.pid for p in left]}"
    locks = [p for p in tmp_path.rglob("Singleton*")]
    assert not locks, f"profile locks left: {locks}"


async def scan_until_linked(
    sim_url: str, next_qr: Callable[[], Awaitable[str]], phone: str, qr: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Scan a QR as a user does: "Couldn't link device" (the page refreshed the QR's secret,
    ``adv_refresh``) or an expired QR means scanning the next QR that walink publishes."""
    qr = qr or await next_qr()
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            async with http.post(sim_url + "/phone/scan", json={"qr": qr, "phone": phone, **extra}) as resp:
                data: dict[str, Any] = await resp.json()
                status = resp.status
            if status == 200:
                return data
            retry = (status, data["error"]["code"]) in {(409, "couldnt_link_device"), (410, "qr_expired")}
            assert retry, (status, data)
            qr = await next_qr()
    raise AssertionError("the phone could not link after four scans")


class EventStream:
    """Reads a session's SSE stream: ``await stream.until("status", status="ready")``."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def next(self) -> tuple[str, dict[str, Any]]:
        event: str | None = None
        data: dict[str, Any] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("event stream ended")
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = orjson.loads(line[6:])
            elif line == "" and event is not None:
                self.seen.append((event, data))
                return event, data

    async def until(self, kind: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while True:
                event, data = await self.next()
                if event == kind and all(data.get(k) == v for k, v in match.items()):
                    return data

    async def first_of(self, *kinds: str) -> tuple[str, dict[str, Any]]:
        """The next event of one of ``kinds``: its name and data."""
        async with asyncio.timeout(WAIT_S):
            while True:
                event, data = await self.next()
                if event in kinds:
                    return event, data

    async def next_qr(self) -> str:
        """The QR of the stream's next ``qr`` event."""
        return str((await self.until("qr"))["qr"])

    def close(self) -> None:
        self.resp.close()


async def sse_until(resp: ClientResponse, kind: str, **match: Any) -> dict[str, Any]:
    """The data of the first ``kind`` event of an open SSE answer (closed afterwards)."""
    assert resp.status == 200, resp.status
    stream = EventStream(resp)
    try:
        return await stream.until(kind, **match)
    finally:
        stream.close()


async def events(client: TestClient[Any, Any], session_id: str, after: int | None = None) -> EventStream:
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    resp = await client.get(f"/v1/sessions/{session_id}/events", headers=headers)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return EventStream(resp)


async def create(client: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    resp = await client.post("/v1/sessions", json=body)
    data: dict[str, Any] = await resp.json()
    assert resp.status == 201, data
    return data


async def get_json(client: TestClient[Any, Any], path: str, expect: int = 200) -> dict[str, Any]:
    resp = await client.get(path)
    data: dict[str, Any] = await resp.json()
    assert resp.status == expect, (path, resp.status, data)
    return data


async def link_id(client: TestClient[Any, Any], sim: Sim, phone: str, **body: Any) -> str:
    """Create a session, scan its QR with ``phone``, wait until it is ready; its id."""
    sid: str = (await create(client, **body))["id"]
    stream = await events(client, sid)
    try:
        await sim.scan_linking(stream, phone)
        await stream.until("session_ready")
    finally:
        stream.close()
    return sid


def cluster_worker(view: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry of worker ``name`` in a ``/health/cluster`` answer."""
    for entry in view["workers"]:
        if entry.get("name") == name:
            return dict(entry)
    raise AssertionError(f"{name} not in /health/cluster")


def manager_of(client: TestClient[Any, Any]) -> Any:
    app = client.app
    assert isinstance(app, web.Application)
    return app[MANAGER]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the suite: no Chromium started by a test may still run (the suite fails otherwise)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    left = [p.pid for p in chromium.processes_under(Path(factory.getbasetemp()))]
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nChromium processes left after the suite: {left}")


def _stop_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no worker outlives a killed run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class WorkerProcess:
    """A real ``python -m worker`` process on this test's database, Redis prefix and simulator."""

    def __init__(
        self,
        tmp_path: Path,
        sim: Sim,
        port: int,
        pg_dsn: str,
        redis_prefix: str,
        data_dir: Path | None = None,
        **env: str,
    ) -> None:
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WALINK_")},
            "WALINK_WORKER_PORT": str(port),
            "WALINK_DATA_DIR": str(data_dir or tmp_path / "var"),
            "WALINK_SIMULATOR_URL": sim.url,
            "WALINK_DATABASE_URL": pg_dsn,
            "WALINK_REDIS_URL": REDIS_URL,
            "WALINK_REDIS_PREFIX": redis_prefix,
            "WALINK_SNAPSHOT_KEY": SNAPSHOT_KEY,
            "WALINK_WARM_POOL_SIZE": "0",
            "WALINK_SHUTDOWN_DEADLINE_S": "10",
            "WALINK_CREDS_SETTLE_S": str(TEST_CREDS_SETTLE_S),
            "WALINK_WEBHOOK_BACKOFF_BASE_S": "0.05",
            "WALINK_WEBHOOK_BACKOFF_MAX_S": "0.5",
            "WALINK_WEBHOOK_ALLOW": LOOPBACK_WEBHOOKS,
            "CHROMIUM_PATH": str(CHROMIUM),
            **env,
        }
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._logged = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(self._until_log("ready on"), WAIT_S)
        except BaseException:
            # a worker that never got ready (its port taken, too slow) is not left running behind the
            # test: it would go on claiming this run's outbox rows and sessions in later tests
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            raise
        self._drainer = asyncio.get_running_loop().create_task(self._drain())

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
            self._logged.set()

    async def wait_log(self, needle: str, *, after: int = 0) -> str:
        """The first log line (from index ``after``) containing ``needle``, as it is written."""
        async with asyncio.timeout(WAIT_S):
            seen = after
            while True:
                for line in self.log[seen:]:
                    if needle in line:
                        return line
                seen = len(self.log)
                self._logged.clear()
                await self._logged.wait()

    async def stop(self, sig: int) -> int:
        assert self.proc is not None, "stop of a worker that was never started"
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), WAIT_S)
        if self._drainer is not None:
            await self._drainer
        return code
