"""Quotas and stream limits (docs/limits.md), through the gateway app itself.

Real Redis and Postgres; the workers are small aiohttp apps that keep their sessions where real
workers do (``whatsapp_accounts`` rows, so the gateway's counts come from the real record) and
hold event streams open, so that no Chromium is needed to reach a limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.keys import HEALTH, MEMBERSHIP, PROXY, STREAMS
from gateway.quotas import Quotas
from shared.errors import QuotaSessions
from shared.settings import Settings
from shared.store import Store
from tests.conftest import (
    REDIS_URL,
    WAIT_S,
    AiohttpClient,
    AiohttpServer,
    EventStream,
    Sim,
    WorkerProcess,
    free_port,
    scan_until_linked,
)


@dataclass
class FakeWorker:
    """A worker stand-in on the test's database: creates, restarts and deletes are rows."""

    pool: asyncpg.Pool
    creates: list[str] = field(default_factory=list)
    most_live: int = 0  # the most live sessions of a workspace seen just after a create's insert
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    streams_open: int = 0

    def app(self) -> web.Application:
        async def health(_request: web.Request) -> web.Response:
            return web.json_response(
                {"status": "healthy", "sessions": {"active": 0}, "queue": {"waiting": 0}}
            )

        async def create(request: web.Request) -> web.Response:
            data = await request.json()
            sid, ws = data["id"], data["workspace_id"]
            self.creates.append(sid)
            await Store(self.pool).ensure_workspace(ws)
            try:
                await self.pool.execute(
                    "INSERT INTO whatsapp_accounts (id, workspace_id, session_status) VALUES ($1, $2, 'qr')",
                    sid,
                    ws,
                )
            except asyncpg.UniqueViolationError:
                return web.json_response({"error": {"code": "session_exists", "message": sid}}, status=409)
            live = await self.pool.fetchval(
                "SELECT count(*) FROM whatsapp_accounts WHERE workspace_id = $1 AND deleted_at IS NULL",
                ws,
            )
            self.most_live = max(self.most_live, live)
            return web.json_response({"id": sid, "status": "starting"}, status=201)

        async def get(request: web.Request) -> web.Response:
            sid = request.match_info["sid"]
            status = await self.pool.fetchval(
                "SELECT session_status FROM whatsapp_accounts WHERE id = $1", sid
            )
            if status is None:
                return web.json_response({"error": {"code": "session_not_found", "message": sid}}, status=404)
            return web.json_response({"id": sid, "status": status})

        async def restart(request: web.Request) -> web.Response:
            sid = request.match_info["sid"]
            await self.pool.execute(
                "UPDATE whatsapp_accounts SET session_status = 'starting' WHERE id = $1", sid
            )
            return web.json_response({"id": sid, "status": "starting"}, status=202)

        async def delete(request: web.Request) -> web.Response:
            await self.pool.execute(
                "UPDATE whatsapp_accounts SET session_status = 'deleted', deleted_at = now() WHERE id = $1",
                request.match_info["sid"],
            )
            return web.Response(status=204)

        async def events(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            self.streams_open += 1
            try:
                await response.write(b'id: 1\nevent: status\ndata: {"status": "qr"}\n\n')
                while not self.stop.is_set():  # a keep-alive comment now and then, as workers do
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), 0.5)
                    await response.write(b": keepalive\n\n")
            except (ConnectionResetError, RuntimeError):
                pass
            finally:
                self.streams_open -= 1
            return response

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/sessions", create)
        app.router.add_get("/v1/sessions/{sid}", get)
        app.router.add_delete("/v1/sessions/{sid}", delete)
        app.router.add_post("/v1/sessions/{sid}/restart", restart)
        app.router.add_get("/v1/sessions/{sid}/events", events)
        return app


@dataclass
class Setup:
    worker: FakeWorker
    server: TestServer
    keys: dict[str, str]  # ws_a, ws_b, ws_c, admin
    settings: Settings
    pool: asyncpg.Pool

    def h(self, who: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[who]}

    async def rows(self, workspace_id: str) -> int:
        n: int = await self.pool.fetchval(
            "SELECT count(*) FROM whatsapp_accounts WHERE workspace_id = $1 AND deleted_at IS NULL",
            workspace_id,
        )
        return n


GatewayFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def setup(
    aiohttp_server: AiohttpServer, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> AsyncIterator[Setup]:
    worker = FakeWorker(pg_pool)
    server = await aiohttp_server(worker.app())
    store = Store(pg_pool)
    keys = {}
    for ws in ("ws_a", "ws_b", "ws_c"):
        await store.ensure_workspace(ws)
        keys[ws] = await store.create_api_key(ws)
    keys["admin"] = await store.create_api_key(None, admin=True)
    settings = Settings(
        workers=f"127.0.0.1:{server.port}",
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        health_interval_s=0.2,
        quota_sessions=100,
        quota_linkings=100,
        quota_creates_per_minute=6000,
        quota_create_burst=100,
    )
    yield Setup(worker, server, keys, settings, pg_pool)
    worker.stop.set()


@pytest.fixture
def gateway(setup: Setup, aiohttp_client: AiohttpClient) -> GatewayFactory:
    async def start(**overrides: Any) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(setup.settings.replace(**overrides)))

    return start


async def _create(gw: TestClient[Any, Any], s: Setup, who: str) -> aiohttp.ClientResponse:
    return await gw.post("/v1/sessions", json={"label": "x"}, headers=s.h(who))


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    body = await resp.json()
    assert resp.status == status, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, body
    return error


async def _until(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Look again until ``check()`` (another component changes it; there is no event to await)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                done = check()
                if done if isinstance(done, bool) else await done:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


# ------------------------------------------------------------------------------------------ quotas
async def test_over_the_linkings_quota_a_create_gets_429_with_retry_after_and_creates_nothing(
    setup: Setup, gateway: GatewayFactory
) -> None:
    gw = await gateway(quota_linkings=2)
    for _ in range(2):
        assert (await _create(gw, setup, "ws_a")).status == 201
    refused = await _create(gw, setup, "ws_a")
    error = await _error(refused, 429, "quota_linkings")
    assert int(refused.headers["Retry-After"]) >= 1
    assert (error["limit"], error["used"]) == (2, 2)
    assert "2" in error["message"]
    assert len(setup.worker.creates) == 2 and await setup.rows("ws_a") == 2  # nothing created
    # another workspace is not held back by ws_a's use
    assert (await _create(gw, setup, "ws_b")).status == 201
    # a linking that ends (linked, or its QR expired) frees its place
    sid = await setup.pool.fetchval("SELECT id FROM whatsapp_accounts WHERE workspace_id = 'ws_a' LIMIT 1")
    await setup.pool.execute("UPDATE whatsapp_accounts SET session_status = 'ready' WHERE id = $1", sid)
    assert (await _create(gw, setup, "ws_a")).status == 201
    assert (await _error(await _create(gw, setup, "ws_a"), 429, "quota_linkings"))["used"] == 2
    # a restart links again: admitted like a create
    restart = await gw.post(f"/v1/sessions/{sid}/restart", headers=setup.h("ws_a"))
    assert (await _error(restart, 429, "quota_linkings"))["limit"] == 2
    view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
    assert view["linkings"] == {"limit": 2, "used": 2, "source": "default"}
    assert view["sessions"]["used"] == 3
    metrics = await (await gw.get("/metrics")).text()
    assert 'walink_quota_refusals_total{quota="linkings"}' in metrics


async def test_over_the_sessions_quota_deleting_or_ending_a_session_frees_its_place(
    setup: Setup, gateway: GatewayFactory
) -> None:
    gw = await gateway(quota_sessions=2)
    ids = [(await (await _create(gw, setup, "ws_a")).json())["id"] for _ in range(2)]
    error = await _error(await _create(gw, setup, "ws_a"), 429, "quota_sessions")
    assert (error["limit"], error["used"]) == (2, 2)
    # hibernated and ready sessions are live: they count
    await setup.pool.execute(
        "UPDATE whatsapp_accounts SET session_status = 'hibernated' WHERE id = $1", ids[0]
    )
    await _error(await _create(gw, setup, "ws_a"), 429, "quota_sessions")
    deleted = await gw.delete(f"/v1/sessions/{ids[0]}", headers=setup.h("ws_a"))
    assert deleted.status == 204
    third = await _create(gw, setup, "ws_a")
    assert third.status == 201
    await setup.pool.execute("UPDATE whatsapp_accounts SET session_status = 'expired' WHERE id = $1", ids[1])
    assert (await _create(gw, setup, "ws_a")).status == 201
    # an ended session restarted becomes live again: over the quota, refused
    restart = await gw.post(f"/v1/sessions/{ids[1]}/restart", headers=setup.h("ws_a"))
    await _error(restart, 429, "quota_sessions")
    # an admin's restart names no workspace: the session's own quota applies
    by_admin = await gw.post(f"/v1/sessions/{ids[1]}/restart", headers=setup.h("admin"))
    await _error(by_admin, 429, "quota_sessions")
    assert await setup.rows("ws_a") == 3  # two live, one expired
    status = await setup.pool.fetchval("SELECT session_status FROM whatsapp_accounts WHERE id = $1", ids[1])
    assert status == "expired"  # the refused restart changed nothing


async def test_creates_per_minute_is_a_token_bucket_that_refills(
    setup: Setup, gateway: GatewayFactory
) -> None:
    gw = await gateway(quota_creates_per_minute=120, quota_create_burst=2)
    first = await _create(gw, setup, "ws_a")
    assert first.status == 201
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("2", "1")
    second = await _create(gw, setup, "ws_a")
    assert second.status == 201 and second.headers["X-RateLimit-Remaining"] == "0"
    refused = await _create(gw, setup, "ws_a")
    error = await _error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1 and error["limit"] == 2
    assert len(setup.worker.creates) == 2
    assert (await _create(gw, setup, "ws_b")).status == 201  # a bucket per workspace

    async def refilled() -> bool:
        view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
        remaining: int = view["creates"]["remaining"]
        return remaining >= 1

    await _until(refilled, "the bucket refills")
    assert (await _create(gw, setup, "ws_a")).status == 201
    assert await setup.rows("ws_a") == 3


async def test_two_gateways_share_one_count(setup: Setup, gateway: GatewayFactory) -> None:
    one = await gateway(quota_sessions=3)
    two = await gateway(quota_sessions=3)
    answers = await asyncio.gather(*(_create((one, two)[i % 2], setup, "ws_a") for i in range(10)))
    statuses = sorted(r.status for r in answers)
    assert statuses == [201] * 3 + [429] * 7
    assert await setup.rows("ws_a") == 3
    for resp in answers:
        if resp.status == 429:
            await _error(resp, 429, "quota_sessions")
    for gw in (one, two):
        view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
        assert view["sessions"]["used"] == 3


async def test_two_gateways_never_admit_over_the_limit_while_sessions_come_and_go(
    setup: Setup, gateway: GatewayFactory
) -> None:
    """Creates through two gateways while every created session is deleted again at once: the
    places freed are reused, and at no moment does the workspace have more than its limit."""
    gws = (await gateway(quota_sessions=3), await gateway(quota_sessions=3))
    created = 0

    async def one(i: int) -> None:
        nonlocal created
        gw = gws[i % 2]
        resp = await _create(gw, setup, "ws_a")
        if resp.status == 201:
            created += 1
            sid = (await resp.json())["id"]
            deleted = await gws[(i + 1) % 2].delete(f"/v1/sessions/{sid}", headers=setup.h("ws_a"))
            assert deleted.status == 204
        else:
            await _error(resp, 429, "quota_sessions")

    for _ in range(4):
        await asyncio.gather(*(one(i) for i in range(12)))
    assert created >= 4 * 3  # each round gets at least the limit through
    assert setup.worker.most_live <= 3
    assert await setup.rows("ws_a") == 0


async def test_an_admission_that_read_before_a_reservation_went_reads_again(
    setup: Setup, redis_client: aioredis.Redis
) -> None:
    """The race the generation guards, step by step: gateway B reads the reservations (A's create
    in flight) and counts Postgres without them; A's row lands and its reservation goes; B's
    check must not count neither (the row was excluded, the reservation is gone)."""
    quotas = Quotas(setup.pool, redis_client, setup.settings.replace(quota_sessions=1))
    a = await quotas.admit("ws_a", "s_a", take_token=True)
    seen = await quotas._read_state("ws_a")  # B, step 1
    limits, _, live, linking, _ = await quotas._counts("ws_a", [*seen.reserved, "s_b"])  # B, step 2
    assert (seen.reserved, live) == (["s_a"], 0)
    await setup.pool.execute(  # A's create lands, and A's answer releases its reservation
        "INSERT INTO whatsapp_accounts (id, workspace_id, session_status) VALUES ('s_a', 'ws_a', 'qr')"
    )
    await quotas.release(a, created=True)
    args: list[str | int] = [seen.generation, live, linking, limits.sessions, limits.linkings]
    args += [repr(limits.rate_per_ms), limits.create_burst, "s_b", quotas.hold_ms, 1]
    verdict = await quotas._admit(keys=quotas._keys("ws_a"), args=args)  # B, step 3
    assert verdict[0] == b"again"  # not admitted on a count that missed s_a
    with pytest.raises(QuotaSessions):  # read again: s_a is in Postgres now
        await quotas.admit("ws_a", "s_b", take_token=True)


async def test_an_admin_sets_a_workspaces_own_limits(setup: Setup, gateway: GatewayFactory) -> None:
    gw = await gateway(quota_sessions=5)
    body = {"workspace_id": "ws_a", "sessions": 1}
    denied = await gw.put("/v1/quota", json=body, headers=setup.h("ws_a"))
    await _error(denied, 403, "forbidden")
    bad = await gw.put("/v1/quota", json={"workspace_id": "ws_a", "sessions": -1}, headers=setup.h("admin"))
    await _error(bad, 400, "invalid_request")
    unknown = await gw.put("/v1/quota", json={"workspace_id": "ws_nope"}, headers=setup.h("admin"))
    await _error(unknown, 404, "not_found")
    put = await gw.put("/v1/quota", json=body, headers=setup.h("admin"))
    assert put.status == 200
    view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
    assert view["sessions"] == {"limit": 1, "used": 0, "source": "workspace"}
    assert (await _create(gw, setup, "ws_a")).status == 201
    await _error(await _create(gw, setup, "ws_a"), 429, "quota_sessions")
    assert (await _create(gw, setup, "ws_b")).status == 201  # ws_b keeps the default of 5
    other = await (await gw.get("/v1/quota?workspace_id=ws_b", headers=setup.h("admin"))).json()
    assert other["sessions"] == {"limit": 5, "used": 1, "source": "default"}
    hidden = await gw.get("/v1/quota?workspace_id=ws_b", headers=setup.h("ws_a"))
    assert hidden.status == 404  # a workspace key sees its own quota only


async def test_without_redis_creates_are_refused_with_a_clear_503_and_nothing_is_created(
    setup: Setup, gateway: GatewayFactory
) -> None:
    gw = await gateway(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)
    refused = await _create(gw, setup, "ws_a")
    error = await _error(refused, 503, "quota_unavailable")
    assert "Redis" in error["message"] and refused.headers["Retry-After"] == "1"
    assert setup.worker.creates == [] and await setup.rows("ws_a") == 0
    view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
    assert view["creates"]["remaining"] is None and view["sessions"]["used"] == 0


def test_default_quotas_are_a_share_of_the_cluster() -> None:
    from gateway.quotas import default_limits

    four = Settings(workers="a:1,b:2,c:3,d:4", max_active_sessions=20, warm_pool_max=6, qr_concurrency=2)
    limits = default_limits(four)
    # a quarter of 4 x 20 active browsers; of 4 x (6 warm + 2 cold starts); of 4 x 2 starts per 2 s
    assert (limits.sessions, limits.linkings, limits.creates_per_minute, limits.create_burst) == (
        20,
        8,
        60,
        8,
    )
    one = default_limits(four.replace(workers="a:1"))
    assert one.linkings == 2 and one.sessions == 5
    assert default_limits(four.replace(quota_linkings=3)).create_burst == 3  # the bucket follows


# ------------------------------------------------------------------------------------------ streams
async def _stream(gw: TestClient[Any, Any], s: Setup, who: str, sid: str) -> aiohttp.ClientResponse:
    return await gw.get(f"/v1/sessions/{sid}/events", headers=s.h(who))


async def test_event_streams_are_limited_per_workspace_and_per_gateway_and_an_ended_stream_frees_its_place(
    setup: Setup, gateway: GatewayFactory
) -> None:
    gw = await gateway(sse_max_per_workspace=1, sse_max_per_gateway=2)
    streams = gw.app[STREAMS]
    a = await _stream(gw, setup, "ws_a", "s_one")
    assert a.status == 200
    a_events = EventStream(a)
    assert (await a_events.next())[0] == "status"
    second = await _stream(gw, setup, "ws_a", "s_two")
    error = await _error(second, 429, "quota_streams")
    assert (error["limit"], error["used"]) == (1, 1) and int(second.headers["Retry-After"]) >= 1
    b = await _stream(gw, setup, "ws_b", "s_three")
    assert b.status == 200
    full = await _stream(gw, setup, "ws_c", "s_four")
    error = await _error(full, 429, "streams_full")
    assert (error["limit"], error["used"]) == (2, 2)
    view = await (await gw.get("/v1/quota", headers=setup.h("ws_a"))).json()
    assert view["streams"] == {
        "limit": 1,
        "used": 1,
        "gateway_limit": 2,
        "gateway_used": 2,
        "scope": "gateway",
    }
    a_events.close()  # the client leaves: its place is free again

    await _until(
        lambda: streams.clients == 1 and streams.open_of("ws_a") == 0, "the ended stream's place is freed"
    )
    again = await _stream(gw, setup, "ws_a", "s_two")
    assert again.status == 200
    metrics = await (await gw.get("/metrics")).text()
    assert 'walink_quota_refusals_total{quota="streams_workspace"}' in metrics
    assert 'walink_quota_refusals_total{quota="streams_gateway"}' in metrics
    again.close()
    b.close()


async def test_health_probes_and_calls_answer_while_the_stream_pool_is_full(
    setup: Setup, gateway: GatewayFactory
) -> None:
    """The streams' pool is as large as the streams allowed (2 here): with both open to the one
    worker, its health probes and the proxied calls still get connections of their own."""
    gw = await gateway(sse_max_per_workspace=2, sse_max_per_gateway=2)
    held = [await _stream(gw, setup, "ws_a", f"s_{n}") for n in range(2)]
    assert [r.status for r in held] == [200, 200]
    await _until(lambda: setup.worker.streams_open == 2, "both streams reach the worker")
    checker = gw.app[HEALTH]
    rounds = checker.rounds
    await _until(lambda: checker.rounds >= rounds + 3, "health rounds go on")
    (worker,) = gw.app[MEMBERSHIP].all()
    assert checker.http is not gw.app[PROXY].stream_http
    assert worker.reachable and worker.error is None and worker.up
    health = await (await gw.get("/health")).json()
    assert health["status"] == "healthy" and health["workers"]["up"] == 1
    sid = (await (await _create(gw, setup, "ws_a")).json())["id"]
    got = await gw.get(f"/v1/sessions/{sid}", headers=setup.h("ws_a"))
    assert got.status == 200
    for resp in held:
        resp.close()


# ------------------------------------------------------------------------------------------ real worker
@pytest.mark.chromium
async def test_a_real_linking_that_becomes_ready_frees_its_place_in_the_linkings_quota(
    tmp_path: Path,
    sim: Sim,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
    aiohttp_client: AiohttpClient,
) -> None:
    """A real worker (Chromium, the simulator) behind the gateway, one linking allowed: the second
    "add account" waits for the first to link — the count follows the states the worker commits."""
    port = free_port()
    worker = WorkerProcess(tmp_path, sim, port, pg_dsn, redis_prefix)
    await worker.start()
    try:
        store = Store(pg_pool)
        await store.ensure_workspace("ws_a")
        headers = {"X-API-Key": await store.create_api_key("ws_a")}
        settings = Settings(
            workers=f"127.0.0.1:{port}",
            database_url=pg_dsn,
            redis_url=REDIS_URL,
            redis_prefix=redis_prefix,
            health_interval_s=0.2,
            quota_linkings=1,
            quota_create_burst=10,  # the bucket is not what this test is about
        )
        gw = await aiohttp_client(create_app(settings))
        first = await gw.post("/v1/sessions", json={}, headers=headers)
        assert first.status == 201, await first.text()
        sid = (await first.json())["id"]
        refused = await gw.post("/v1/sessions", json={}, headers=headers)
        assert (await _error(refused, 429, "quota_linkings"))["used"] == 1
        stream = EventStream(await gw.get(f"/v1/sessions/{sid}/events", headers=headers))
        try:
            await scan_until_linked(sim.url, stream.next_qr, "15550001111")
            await stream.until("session_ready")
        finally:
            stream.close()
        second = await gw.post("/v1/sessions", json={}, headers=headers)
        assert second.status == 201, await second.text()
        view = await (await gw.get("/v1/quota", headers=headers)).json()
        assert (view["sessions"]["used"], view["linkings"]["used"]) == (2, 1)
        for made in (sid, (await second.json())["id"]):
            assert (await gw.delete(f"/v1/sessions/{made}", headers=headers)).status == 204
        view = await (await gw.get("/v1/quota", headers=headers)).json()
        assert (view["sessions"]["used"], view["linkings"]["used"]) == (0, 0)
    finally:
        assert await worker.stop(signal.SIGTERM) == 0
