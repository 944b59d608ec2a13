"""Durable state end to end: Postgres truth, Redis as a cache, webhooks that never lose an event,
hibernation and wake from a snapshot alone. Real Postgres, Redis, Chromium and simulator."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.errors import StaleOwner
from shared.leases import Leases
from shared.redis_keys import Keys
from shared.store import Store
from shared.webhooks import SIGNATURE_HEADER, verify
from tests.conftest import (
    WAIT_S,
    AiohttpServer,
    Sim,
    WorkerFactory,
    WorkerProcess,
    create,
    events,
    free_port,
    get_json,
    link_id,
    manager_of,
    scan_until_linked,
    sse_until,
)
from worker.keys import DISPATCHER

pytestmark = pytest.mark.chromium

PHONE = "351912345678"


class Receiver:
    """A SaaS webhook endpoint: verifies every signature, can refuse or hang for a while."""

    def __init__(self) -> None:
        self.secret = ""
        self.failures_left = 0
        self.hangs_left = 0
        self.refuse = False
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.attempts = 0
        self.arrived = asyncio.Event()
        self.on_event: Callable[[dict[str, Any]], Any] | None = None
        self.server: TestServer | None = None

    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hooks"))

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if not verify(self.secret, body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.refuse:
            return web.Response(status=500)
        if self.failures_left > 0:
            self.failures_left -= 1
            return web.Response(status=500)
        if self.hangs_left > 0:
            self.hangs_left -= 1
            await asyncio.sleep(5)  # longer than the worker's attempt timeout: a hanging endpoint
            return web.Response(status=200)
        event = orjson.loads(body)
        if self.on_event is not None:
            await self.on_event(event)
        self.received.append(event)
        self.arrived.set()
        return web.Response(status=204)

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while True:
                for event in self.received:
                    if predicate(event):
                        return event
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer, pg_pool: asyncpg.Pool) -> Receiver:
    """The receiver, with the secret of workspace "default" (created here if no worker did yet)."""
    hooks = Receiver()
    hooks.secret = (await Store(pg_pool).ensure_workspace("default")).webhook_secret
    app = web.Application()
    app.router.add_post("/hooks", hooks.handle)
    hooks.server = await aiohttp_server(app)
    return hooks


async def eventually(pool: asyncpg.Pool, query: str, *args: Any, until: Callable[[Any], bool]) -> Any:
    """Read Postgres until ``until(value)``: how a test observes another process or the dispatcher's
    own schedule (retries, dead letters), where there is nothing in this process to await."""
    for _ in range(int(WAIT_S / 0.05)):
        value = await pool.fetchval(query, *args)
        if until(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"never true: {query} {args}")


async def dispatcher_done(client: Any) -> None:
    """Until the worker's webhook dispatcher has finished what it was doing and waits for work."""
    dispatcher = client.app[DISPATCHER]
    await asyncio.wait_for(dispatcher.idle.wait(), WAIT_S)


async def test_same_phone_linked_twice_at_once_leaves_one_live_primary_account(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    ids = [(await create(client))["id"] for _ in range(2)]
    streams = [await events(client, sid) for sid in ids]
    qrs = [(await s.until("qr"))["qr"] for s in streams]
    await asyncio.gather(*(sim.scan_linking(s, PHONE, qr) for s, qr in zip(streams, qrs, strict=True)))
    await asyncio.gather(*(s.until("session_ready") for s in streams))
    for s in streams:
        s.close()
    await manager_of(client).settle()

    rows = await pg_pool.fetch(
        "SELECT id, phone_number, is_primary, deleted_at IS NOT NULL AS deleted, status"
        " FROM whatsapp_accounts WHERE id = ANY($1)",
        ids,
    )
    live = [r for r in rows if not r["deleted"]]
    gone = [r for r in rows if r["deleted"]]
    assert len(live) == 1 and len(gone) == 1
    assert live[0]["phone_number"] == PHONE and live[0]["status"] == "connected"
    assert gone[0]["status"] == "failed" and gone[0]["phone_number"] is None
    primaries = await pg_pool.fetchval(
        "SELECT count(*) FROM whatsapp_accounts"
        " WHERE workspace_id = 'default' AND is_primary AND deleted_at IS NULL"
    )
    assert primaries == 1
    accounts = (await get_json(client, "/v1/accounts"))["accounts"]
    assert [(a["id"], a["phone_number"], a["is_primary"]) for a in accounts] == [(live[0]["id"], PHONE, True)]
    # the older link was ended here too, with a reason
    loser = await get_json(client, f"/v1/sessions/{gone[0]['id']}")
    assert loser["status"] == "failed" and loser["reason"] == "replaced"


async def test_webhooks_survive_a_flaky_receiver_in_order_and_signed(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    client = await start_worker(webhook_timeout_s=0.5, webhook_max_attempts=30)
    receiver.failures_left = 3
    receiver.hangs_left = 1
    seen_phone: list[str | None] = []

    async def read_your_writes(event: dict[str, Any]) -> None:
        if event["event"] == "session_ready":
            session = await get_json(client, f"/v1/sessions/{event['session_id']}")
            seen_phone.append(session["phone_number"])

    receiver.on_event = read_your_writes
    sid = await link_id(client, sim, PHONE, webhook_url=receiver.url(), metadata={"crm_id": 42})
    ready = await receiver.until(lambda e: e["event"] == "session_ready")
    await dispatcher_done(client)
    assert ready["data"]["phone_number"] == PHONE and ready["metadata"] == {"crm_id": 42}
    assert seen_phone == [PHONE]  # whoever gets session_ready can read the phone at once

    outbox = await pg_pool.fetch(
        "SELECT seq, type, state FROM outbox WHERE session_id = $1 AND webhook_url IS NOT NULL ORDER BY seq",
        sid,
    )
    assert {r["state"] for r in outbox} == {"delivered"}
    got = [(e["seq"], e["event"]) for e in receiver.received if e["session_id"] == sid]
    assert got == [(r["seq"], r["type"]) for r in outbox]  # every event, once, in seq order
    assert {"qr_code_generated", "session_authenticated", "session_ready"} <= {t for _, t in got}
    assert receiver.bad_signatures == 0
    failures = await pg_pool.fetchval(
        "SELECT count(*) FROM delivery_attempts a JOIN outbox o USING (event_id)"
        " WHERE o.session_id = $1 AND (a.status_code IS NULL OR a.status_code >= 300)",
        sid,
    )
    assert failures == 4  # 3 refusals and 1 timeout, all retried


async def test_dead_letters_then_replay(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    client = await start_worker(webhook_timeout_s=0.5, webhook_max_attempts=2)
    receiver.refuse = True
    sid = await link_id(client, sim, PHONE, webhook_url=receiver.url())
    await eventually(
        pg_pool,
        "SELECT state FROM outbox WHERE session_id = $1 AND type = 'session_ready'",
        sid,
        until=lambda state: state == "dead",
    )
    receiver.refuse = False
    resp = await client.post("/v1/webhooks/replay", json={})
    assert resp.status == 200 and (await resp.json())["replayed"] >= 1
    ready = await receiver.until(lambda e: e["event"] == "session_ready")
    assert ready["session_id"] == sid
    await dispatcher_done(client)
    listed = await get_json(client, "/v1/events?after=0&limit=1000")
    assert any(e["type"] == "session_ready" and e["state"] == "delivered" for e in listed["events"])


@contextlib.asynccontextmanager
async def private_redis() -> AsyncIterator[tuple[int, Callable[[], subprocess.Popen[bytes]]]]:
    """A Redis of this test only, on a spare port (the machine's shared one is never restarted)."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"Ready to accept connections" in line:
                break
        procs.append(proc)
        return proc

    start()
    try:
        yield port, start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_redis_outage_mid_link_loses_nothing(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    async with private_redis() as (port, start_redis):
        client = await start_worker(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2)
        sid = (await create(client, webhook_url=receiver.url()))["id"]
        stream = await events(client, sid)
        qr = (await stream.until("qr"))["qr"]

        # Redis dies in the middle of the link
        cli = await asyncio.create_subprocess_exec(
            "redis-cli",
            "-p",
            str(port),
            "shutdown",
            "nosave",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await cli.wait()
        await sim.scan_linking(stream, PHONE, qr)
        await stream.until("session_ready")
        stream.close()
        session = await get_json(client, f"/v1/sessions/{sid}")
        assert session["status"] == "ready" and session["phone_number"] == PHONE
        health = await get_json(client, "/health")
        assert health["redis"] == "unreachable"
        await receiver.until(lambda e: e["event"] == "session_ready" and e["session_id"] == sid)
        types = [
            r["type"]
            for r in await pg_pool.fetch("SELECT type FROM outbox WHERE session_id = $1 ORDER BY seq", sid)
        ]
        assert types.count("session_ready") == 1 and "session_authenticated" in types

        # Redis comes back (empty): leases are taken again with a token above Postgres' one
        start_redis()
        manager = manager_of(client)
        await manager.keeper.renew_all()
        fresh = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            assert await fresh.get(manager.durable.keys.lease(sid)) == manager.name.encode()
        finally:
            await fresh.aclose()
        row_token = await pg_pool.fetchval("SELECT fencing_token FROM whatsapp_accounts WHERE id = $1", sid)
        assert manager.get(sid).fencing_token > row_token - 1
        resp = await client.post(f"/v1/sessions/{sid}/restart")
        assert resp.status == 202


async def test_event_committed_before_a_sigkill_is_still_delivered(
    tmp_path: Path, sim: Sim, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str, receiver: Receiver
) -> None:
    receiver.refuse = True
    first = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, WALINK_WEBHOOK_TIMEOUT_S="0.5")
    await first.start()
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(first.url + "/v1/sessions", json={"webhook_url": receiver.url()}) as resp:
            sid = (await resp.json())["id"]
        seen: list[str] = []

        async def next_qr() -> str:
            qr: str = await eventually(
                pg_pool,
                "SELECT payload->'data'->>'qr' FROM outbox WHERE session_id = $1"
                " AND type = 'qr_code_generated' ORDER BY seq DESC LIMIT 1",
                sid,
                until=lambda value: value is not None and value not in seen,
            )
            seen.append(qr)
            return qr

        await scan_until_linked(sim.url, next_qr, PHONE)
        await eventually(
            pg_pool,
            "SELECT attempts FROM outbox WHERE session_id = $1 AND type = 'session_ready'",
            sid,
            until=lambda attempts: bool(attempts),
        )
    # committed, tried, not delivered — and the worker dies
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (
        await pg_pool.fetchval(
            "SELECT state FROM outbox WHERE session_id = $1 AND type = 'session_ready'", sid
        )
        == "pending"
    )
    receiver.refuse = False
    second = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, data_dir=tmp_path / "other")
    await second.start()
    try:
        ready = await receiver.until(lambda e: e["event"] == "session_ready" and e["session_id"] == sid)
        assert ready["data"]["phone_number"] == PHONE
    finally:
        await second.stop(signal.SIGTERM)


async def test_a_write_with_a_stale_fencing_token_is_rejected(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    store = Store(pg_pool)
    keys = Keys(redis_prefix)
    await store.ensure_workspace("default")
    a = Leases(redis_client, keys, "worker-a", ttl_ms=10_000)
    b = Leases(redis_client, keys, "worker-b", ttl_ms=10_000)
    token_a = await a.acquire("s_fenced")
    assert token_a is not None and await b.acquire("s_fenced") is None
    rec = {
        "id": "s_fenced",
        "workspace_id": "default",
        "status": "qr",
        "reason": "qr_shown",
        "history": [],
        "timings": {},
        "profile_id": "p_1",
    }
    await store.insert_session(rec, owner="worker-a", token=token_a)
    # A's lease is gone (expired while A was paused); B takes the session with a higher token
    await redis_client.delete(keys.lease("s_fenced"))
    token_b = await b.acquire("s_fenced", floor=token_a)
    assert token_b is not None and token_b > token_a
    await store.save({**rec, "status": "authenticated"}, owner="worker-b", token=token_b, events=[])
    with pytest.raises(StaleOwner):
        await store.save({**rec, "status": "failed"}, owner="worker-a", token=token_a, events=[])
    assert not await a.renew("s_fenced") and not await a.release("s_fenced")
    row = await pg_pool.fetchrow("SELECT session_status, owner FROM whatsapp_accounts WHERE id = 's_fenced'")
    assert row is not None
    assert (row["session_status"], row["owner"]) == ("authenticated", "worker-b")


async def test_hibernate_then_wake_in_another_worker_process_from_the_snapshot_alone(
    tmp_path: Path,
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> None:
    client = await start_worker(idle_timeout_s=1.0)
    sid = await link_id(client, sim, PHONE)
    stream = await events(client, sid)
    hibernated = await stream.until("status", status="hibernated")
    stream.close()
    assert hibernated["reason"] == "idle"
    manager = manager_of(client)
    await manager.settle()
    profile = manager.launcher.profile_dir(manager.get(sid).profile_id)
    assert not profile.exists()
    size = await pg_pool.fetchval("SELECT size_bytes FROM profile_snapshots WHERE session_id = $1", sid)
    assert 0 < size < 1_000_000
    assert manager.browsers() == []

    other = WorkerProcess(tmp_path, sim, free_port(), pg_dsn, redis_prefix, data_dir=tmp_path / "empty")
    await other.start()
    import aiohttp

    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{other.url}/v1/sessions/{sid}") as resp:
                assert resp.status == 200  # the request wakes it there
            # the wake is fast (ready once the page knows the phone): it can be over before a new
            # stream would open, so the session's committed events are read from where it slept
            headers = {"Last-Event-ID": str(hibernated["seq"])}
            await sse_until(
                await http.get(f"{other.url}/v1/sessions/{sid}/events", headers=headers), "session_ready"
            )
            async with http.get(f"{other.url}/v1/sessions/{sid}") as resp:
                session = await resp.json()
        assert session["status"] == "ready" and session["phone_number"] == PHONE
        assert session["worker"] == f"127.0.0.1:{other.port}"
        tail = [h["status"] for h in session["history"]][-4:]
        assert tail == ["hibernated", "starting", "authenticated", "ready"]
        assert len(await sim.devices(PHONE)) == 1  # the same linked device: no new scan
    finally:
        assert await other.stop(signal.SIGTERM) == 0


async def test_lru_hibernates_beyond_max_active_sessions(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker(max_active_sessions=1)
    first = await link_id(client, sim, "4411111111")
    stream = await events(client, first)
    await link_id(client, sim, "4422222222")
    hibernated = await stream.until("status", status="hibernated")
    stream.close()
    assert hibernated["reason"] == "lru"
    # a request wakes it again (and now the other one is the least recently used)
    body = await get_json(client, f"/v1/sessions/{first}")
    assert body["status"] in {"starting", "authenticated", "ready"}


async def test_a_tampered_snapshot_is_refused_with_a_clear_reason(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    sid = await link_id(client, sim, PHONE)
    manager = manager_of(client)
    await manager.hibernate(manager.get(sid))
    await pg_pool.execute(
        "UPDATE profile_snapshots SET blob = overlay(blob placing '\\xff'::bytea from 40 for 1)"
        " WHERE session_id = $1",
        sid,
    )
    stream = await events(client, sid)
    failed = await stream.until("session_failed")
    stream.close()
    assert failed["reason"] == "client_fatal"
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "failed"


async def test_a_worker_answering_for_a_session_it_does_not_drive_names_the_driver(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory
) -> None:
    a = await start_worker(worker_name="worker-a")
    b = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b")
    sid = await link_id(a, sim, PHONE)
    on_a = await a.get(f"/v1/sessions/{sid}")
    assert on_a.status == 200 and "X-Walink-Driver" not in on_a.headers
    on_b = await b.get(f"/v1/sessions/{sid}")
    view = await on_b.json()
    # B answers from A's committed view and says who drives it (the gateway then asks A)
    assert on_b.status == 200 and view["worker"] == "worker-a" and view["status"] == "ready"
    assert on_b.headers["X-Walink-Driver"] == "worker-a"
    assert manager_of(b).local(sid) is None  # B did not take it over
    stream = await b.get(f"/v1/sessions/{sid}/events")
    assert stream.status == 200 and stream.headers["X-Walink-Driver"] == "worker-a"
    stream.close()
    assert (await a.delete(f"/v1/sessions/{sid}")).status == 204
    gone = await b.get(f"/v1/sessions/{sid}")
    assert gone.status == 404 and "X-Walink-Driver" not in gone.headers


async def test_a_session_taken_over_is_resumed_once_when_a_request_and_the_orphan_watch_race(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker(worker_name="worker-b")
    manager = manager_of(client)
    rec = {
        "id": "s_orphanrace",
        "workspace_id": "default",
        "status": "qr",
        "reason": "qr_shown",
        "history": [],
        "timings": {},
        "profile_id": "p_orphanrace",
    }
    await Store(pg_pool).insert_session(rec, owner="worker-gone", token=1)  # its worker died
    launched = manager.launcher.launched_total
    loaded = await Store(pg_pool).load_session("s_orphanrace")
    assert loaded is not None
    session = await manager._take_over(loaded)
    # the request path and the orphan watcher both try to drive it at once: one fresh link only
    assert sorted(await asyncio.gather(manager._resume(session), manager._resume(session))) == [0, 0]
    stream = await events(client, "s_orphanrace")
    await stream.until("qr")
    stream.close()
    assert manager.launcher.launched_total == launched + 1
    assert [s.id for s in manager.in_workspace()] == ["s_orphanrace"]
    assert (await client.delete("/v1/sessions/s_orphanrace")).status == 204


async def test_sessions_taken_over_beyond_max_active_come_back_hibernated_from_their_snapshots(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    """A worker that adopts more ready sessions than ``max_active_sessions`` launches only that
    many; the others come back hibernated — their stored snapshot kept as it is (this worker has
    no copy of their profile to snapshot) — and wake from it without a scan."""
    first = await start_worker(worker_name="worker-a")
    phones = ["4422222201", "4422222202"]
    ids = [await link_id(first, sim, phone) for phone in phones]
    await first.close()  # hands its sessions over: fresh snapshots stored, leases freed
    stored = {
        sid: await pg_pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sid)
        for sid in ids
    }
    assert all(stored.values())

    second = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b", max_active_sessions=1)
    manager = manager_of(second)
    assert await manager.adopt_orphans() == 2
    for sid in ids:
        session = manager.get(sid)
        async with asyncio.timeout(60):
            while session.status.value not in {"ready", "hibernated"}:
                await session.changed.wait()
    await manager.settle()
    by_status = {manager.get(sid).status.value: sid for sid in ids}
    assert sorted(by_status) == ["hibernated", "ready"], by_status
    sleeping = by_status["hibernated"]
    kept = await pg_pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sleeping)
    assert kept == stored[sleeping]  # not overwritten by an empty profile
    hibernated_seq = manager.get(sleeping).last_seq
    assert (await second.get(f"/v1/sessions/{sleeping}")).status == 200  # the request wakes it
    stream = await events(second, sleeping, after=hibernated_seq)
    await stream.until("session_ready")
    stream.close()
    woken = await get_json(second, f"/v1/sessions/{sleeping}")
    assert woken["phone_number"] == phones[ids.index(sleeping)]
    assert len(await sim.devices(woken["phone_number"])) == 1  # no new scan


async def test_a_restart_racing_the_wake_of_a_taken_over_session_keeps_its_login(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory
) -> None:
    """A request wakes a hibernated session another worker left (its profile unpacked from the
    snapshot) while a restart for it arrives: the restart must not cut the unpack short nor start
    a second browser on the profile — the session comes back ready, same phone, no new scan."""
    first = await start_worker(worker_name="worker-a")
    phone = "4422222211"
    sid = await link_id(first, sim, phone)
    await manager_of(first).hibernate(manager_of(first).get(sid))
    await first.close()

    second = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b")
    manager = manager_of(second)
    assert (await second.get(f"/v1/sessions/{sid}")).status == 200  # taken over; the request wakes it
    session = manager.get(sid)
    async with asyncio.timeout(30):
        while session.status.value == "hibernated":  # the wake has begun: its profile is unpacking
            await session.changed.wait()
    await manager.restart(session)
    async with asyncio.timeout(60):
        while session.status.value not in {"ready", "qr", "failed"}:
            await session.changed.wait()
    assert session.status.value == "ready", session.reason
    body = await get_json(second, f"/v1/sessions/{sid}")
    assert body["phone_number"] == phone
    assert len(await sim.devices(phone)) == 1  # the same device: no new link
    assert len(manager.browsers()) == 1
