"""One owner per session (docs/ownership.md): no take-over without a lease, strict fencing,
batched lease renewal, ended sessions that let go of everything, and a replaced duplicate ended
on whichever worker drives it. Real Redis (private ones where a test stops it), Postgres,
Chromium and simulator."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import RedisError

from shared.errors import LeaseUnavailable, StaleOwner
from shared.heartbeats import HeartbeatAuth
from shared.leases import LeaseKeeper, Leases
from shared.redis_keys import Keys
from shared.store import Store
from tests.conftest import (
    WAIT_S,
    Sim,
    WorkerFactory,
    create,
    events,
    free_port,
    get_json,
    link_id,
    manager_of,
)
from tests.test_durable import private_redis
from worker import chromium
from worker import whatsapp_web as wa
from worker.durable import Durable

PHONE = "351911000111"


def _rec(sid: str, status: str = "qr") -> dict[str, Any]:
    return {
        "id": sid,
        "workspace_id": "default",
        "status": status,
        "reason": "qr_shown",
        "history": [],
        "timings": {},
        "profile_id": "p_" + sid,
    }


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until ``check()`` holds (bounded): for state of another process or of Redis itself."""
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"never true: {what}"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------- fencing
async def test_an_equal_token_from_another_worker_is_refused_and_a_new_owner_needs_a_greater_one(
    pg_pool: asyncpg.Pool,
) -> None:
    store = Store(pg_pool)
    await store.ensure_workspace("default")
    rec = _rec("s_strict")
    await store.insert_session(rec, owner="worker-a", token=5)
    # the driver writes on its own token
    await store.save({**rec, "status": "authenticated"}, owner="worker-a", token=5, events=[])
    # another worker with the same token (e.g. both "fenced with Postgres alone") is refused
    with pytest.raises(StaleOwner):
        await store.save({**rec, "status": "failed"}, owner="worker-b", token=5, events=[])
    # a new owner with a greater token takes the row over with its first write; from then on the
    # old one is refused, on its old token and on the new owner's token alike
    await store.save({**rec, "status": "authenticated"}, owner="worker-b", token=6, events=[])
    with pytest.raises(StaleOwner):
        await store.save({**rec, "status": "failed"}, owner="worker-c", token=6, events=[])
    with pytest.raises(StaleOwner):
        await store.save({**rec, "status": "failed"}, owner="worker-a", token=5, events=[])
    with pytest.raises(StaleOwner):
        await store.save({**rec, "status": "failed"}, owner="worker-a", token=6, events=[])
    await store.save({**rec, "status": "ready"}, owner="worker-b", token=6, events=[])
    row = await pg_pool.fetchrow(
        "SELECT session_status, owner, fencing_token FROM whatsapp_accounts WHERE id = 's_strict'"
    )
    assert row is not None
    assert (row["session_status"], row["owner"], row["fencing_token"]) == ("ready", "worker-b", 6)


async def test_no_lease_and_no_token_while_redis_cannot_be_reached(pg_pool: asyncpg.Pool) -> None:
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        durable = Durable(
            Store(pg_pool),
            dead,
            Keys("walink_test:nolease:"),
            "worker-a",
            lease_ttl_ms=3000,
            redis_timeout_s=0.5,
            heartbeat_auth=HeartbeatAuth(""),
        )
        with pytest.raises(LeaseUnavailable) as refused:
            await durable.acquire("s_nolease", floor=7)
        assert refused.value.status == 503 and refused.value.code == "lease_unavailable"
        with pytest.raises(LeaseUnavailable):
            await durable.acquire_or_take("s_nolease", floor=7, last_owner="worker-b")
        assert not durable.redis_ok
    finally:
        await dead.aclose()


# ---------------------------------------------------------------------------- batched renewal
async def test_renewal_is_one_round_trip_for_all_leases_and_reports_the_lost_ones() -> None:
    async with private_redis() as (port, _start):
        redis = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            keys = Keys("walink:")
            leases = Leases(redis, keys, "worker-a", ttl_ms=10_000)
            other = Leases(redis, keys, "worker-b", ttl_ms=10_000)
            lost_seen: list[str] = []
            tokens_seen: dict[str, int] = {}
            keeper = LeaseKeeper(leases, lost_seen.append, tokens_seen.__setitem__, timeout_s=5.0)
            ids = [f"s_{i:03d}" for i in range(60)]
            for sid in ids:
                token = await leases.acquire(sid)
                assert token is not None
                keeper.hold(sid, token)
            stolen, expired = ids[:3], ids[3:5]
            for sid in stolen:  # expired, then taken by another worker
                await redis.delete(keys.lease(sid))
                assert await other.acquire(sid, floor=keeper.held[sid]) is not None
            for sid in expired:  # expired (e.g. during an outage) and free
                await redis.delete(keys.lease(sid))
            await keeper.renew_all()  # the script is loaded once; what follows is a steady tick
            assert sorted(lost_seen) == stolen and sorted(tokens_seen) == expired
            held_before = dict(keeper.held)
            await redis.pexpire(keys.lease(ids[20]), 500)
            await redis.config_resetstat()
            assert await keeper.renew_all() == []
            stats = await redis.info("commandstats")
            # the commands the client sent (those the script ran inside Redis aside)
            scripted = {"cmdstat_get", "cmdstat_pexpire", "cmdstat_set", "cmdstat_incr"}
            calls = {
                name: int(stat["calls"])
                for name, stat in stats.items()
                if name not in scripted and not name.startswith(("cmdstat_info", "cmdstat_config"))
            }
            assert calls == {"cmdstat_evalsha": 1}, calls  # one round trip for 57 leases
            assert keeper.held == held_before
            assert await redis.pttl(keys.lease(ids[20])) > 5000  # renewed to the full TTL
            for sid in expired:
                assert tokens_seen[sid] > 1 and keeper.held[sid] == tokens_seen[sid]
                assert await redis.get(keys.lease(sid)) == b"worker-a"
            for sid in stolen:
                assert sid not in keeper.held and await redis.get(keys.lease(sid)) == b"worker-b"
        finally:
            await redis.aclose()


# ---------------------------------------------------------------------------- ended sessions
async def _lease_keys(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    found = [k async for k in redis.scan_iter(match=prefix + "lease:*", count=1000)]
    return found + [k async for k in redis.scan_iter(match=prefix + "fence:*", count=1000)]


async def test_two_hundred_expired_qrs_leave_no_lease_and_no_session_in_memory(
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    """Two sessions expire through real browsers (the QR batch runs out on the page); 198 more
    are driven through the same state machine by the page events that end a QR batch (no
    browser: each is ended before its queued start gets a place, so none is launched)."""
    await sim.profile(qr_first_ms=300, qr_next_ms=200)
    client = await start_worker(qr_batches=1, qr_concurrency=1, launch_budget=1)
    manager = manager_of(client)
    real = [(await create(client))["id"] for _ in range(2)]
    for sid in real:
        stream = await events(client, sid)
        try:
            assert (await stream.until("status", status="expired"))["reason"] == "qr_timeout"
        finally:
            stream.close()
    launched = manager.launcher.launched_total
    linking = manager._linking
    driven: list[str] = []
    async with manager.queue.slot():  # the one place to start a browser is taken meanwhile
        for i in range(198):
            session = await manager.create(session_id=f"s_exp{i:03d}", workspace_id="default")
            linking._on_qr(session, {"qr": f"ref{i},key,adv", "ttl_ms": 60_000})
            linking._on_state(session, wa.STATE_UNPAIRED_IDLE)  # the page: the batch ran out
            manager._commits.flush(session)
            driven.append(session.id)
    await asyncio.wait_for(manager.settle(), WAIT_S)
    assert manager.launcher.launched_total == launched  # the 198 never had a browser
    statuses = await pg_pool.fetch(
        "SELECT session_status, reason FROM whatsapp_accounts WHERE id = ANY($1::text[])", real + driven
    )
    assert len(statuses) == 200
    assert {(r["session_status"], r["reason"]) for r in statuses} == {("expired", "qr_timeout")}
    assert manager.sessions == {} and manager.keeper.held == {}
    assert await _lease_keys(redis_client, redis_prefix) == []
    assert not manager.browsers()
    # reads still answer from the record (the cached view, then Postgres)
    view = await get_json(client, f"/v1/sessions/{driven[0]}")
    assert view["status"] == "expired"
    await redis_client.delete(manager.durable.keys.session(driven[1]))
    assert (await get_json(client, f"/v1/sessions/{driven[1]}"))["status"] == "expired"
    assert manager.sessions == {}


async def test_an_ended_session_a_command_brought_back_is_retired_when_unused(
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    client = await start_worker()
    manager = manager_of(client)
    await Store(pg_pool).insert_session(
        _rec("default.oldend", status="expired"), owner="worker-gone", token=3
    )
    taken = await client.post("/v1/sessions", json={"id": "default.oldend"})
    assert taken.status == 409 and (await taken.json())["error"]["code"] == "session_exists"
    assert await redis_client.exists(manager.durable.keys.lease("default.oldend")) == 0  # not kept
    resp = await client.get("/v1/sessions/default.oldend/qr")  # a command takes it over from Postgres
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "invalid_state"
    assert "default.oldend" in manager.sessions and await _lease_keys(redis_client, redis_prefix) != []
    assert manager.retire_ended() == 0  # just used: it stays a while
    assert manager.retire_ended(grace_s=0) == 1
    await asyncio.wait_for(manager.settle(), WAIT_S)
    assert manager.sessions == {} and manager.keeper.held == {}
    assert await _lease_keys(redis_client, redis_prefix) == []
    assert (await get_json(client, "/v1/sessions/default.oldend"))["status"] == "expired"


# ---------------------------------------------------------------------------- Redis down
def _drivers(sid: str, *managers: Any) -> list[str]:
    """The workers that have a browser for the session now."""
    return [m.name for m in managers if (s := m.sessions.get(sid)) is not None and s.slot is not None]


async def test_redis_stopped_mid_run_leaves_exactly_one_browser_per_session_on_two_workers(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    async with private_redis() as (port, _start):
        redis_url = f"redis://127.0.0.1:{port}/0"
        common: dict[str, Any] = {"redis_url": redis_url, "redis_timeout_s": 0.2, "lease_ttl_ms": 3000}
        a = await start_worker(worker_name="worker-a", **common)
        b = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b", **common)
        ma, mb = manager_of(a), manager_of(b)
        sid = await link_id(a, sim, PHONE)
        token_before = ma.get(sid).fencing_token
        fresh = aioredis.from_url(redis_url)
        keys = ma.durable.keys
        try:
            assert await fresh.get(keys.lease(sid)) == b"worker-a"
            server_pid = int((await fresh.info("server"))["process_id"])
            samples = 0

            async def sample(client_b: TestClient[Any, Any]) -> None:
                """Requests for the session hit both workers; one browser throughout."""
                nonlocal samples
                on_a = await a.get(f"/v1/sessions/{sid}")
                assert on_a.status == 200 and (await on_a.json())["status"] == "ready"
                on_b = await client_b.get(f"/v1/sessions/{sid}")
                assert on_b.status == 200, await on_b.text()
                assert (await on_b.json())["status"] == "ready"
                restart = await client_b.post(f"/v1/sessions/{sid}/restart")
                body = await restart.json()
                assert restart.status in {409, 503}, body
                assert body["error"]["code"] in {"lease_unavailable", "not_owner"}, body
                assert _drivers(sid, ma, mb) == ["worker-a"]
                assert mb.local(sid) is None
                assert chromium.groups_under(tmp_path / "b") == set()
                assert len(chromium.groups_under(tmp_path / "var")) == 1
                samples += 1

            # Redis stops (SIGSTOP: connections hang, as with a partition) for longer than a lease
            os.kill(server_pid, signal.SIGSTOP)
            try:
                stopped_at = time.monotonic()
                while time.monotonic() - stopped_at < 4.0:  # the outage lasts past the lease TTL
                    await sample(b)
                    created = await b.post("/v1/sessions", json={})
                    assert created.status == 503
                    assert (await created.json())["error"]["code"] == "lease_unavailable"
                assert (await get_json(b, "/health"))["redis"] == "unreachable"
            finally:
                os.kill(server_pid, signal.SIGCONT)
            # Redis is back: the lease expired meanwhile; the owner takes it back, nobody else
            back_at = time.monotonic()
            while time.monotonic() - back_at < 4.0:  # past the settling window of one lease TTL
                await sample(b)

            async def owner_holds() -> bool:
                return bool(await fresh.get(keys.lease(sid)) == b"worker-a")

            await _until(owner_holds, "worker-a holds the lease again")
            await sample(b)
            session = ma.get(sid)
            assert session.status.value == "ready" and session.fencing_token >= token_before
            # A's renewals sent while Redis was stopped may have run when it resumed (and taken
            # the expired lease back for A at once): either way A holds it and writes on its token
            await ma.store.save(session.record(), owner="worker-a", token=session.fencing_token, events=[])

            # Redis stops for good (SIGTERM: its data is gone), then a new one starts empty
            token_before = session.fencing_token
            os.kill(server_pid, signal.SIGTERM)

            async def redis_gone() -> bool:
                try:
                    await fresh.ping()
                except (OSError, RedisError):
                    return True
                return False

            await _until(redis_gone, "Redis stopped")
            for _ in range(3):
                await sample(b)
            _start()
            await _until(owner_holds, "worker-a holds the lease of the new Redis")
            back_at = time.monotonic()
            while time.monotonic() - back_at < 4.0:  # past the settling window of one lease TTL
                await sample(b)
            assert samples >= 8
            session = ma.get(sid)
            # the new Redis had no counter: the token is floored by the one A held
            assert session.status.value == "ready" and session.fencing_token > token_before
            assert int(await fresh.get(keys.fence(sid)) or 0) == session.fencing_token
            await ma.store.save(session.record(), owner="worker-a", token=session.fencing_token, events=[])
            row = await pg_pool.fetchrow(
                "SELECT owner, session_status, fencing_token FROM whatsapp_accounts WHERE id = $1", sid
            )
            assert row is not None
            assert (row["owner"], row["session_status"], row["fencing_token"]) == (
                "worker-a",
                "ready",
                session.fencing_token,
            )
            assert len(await sim.devices(PHONE)) == 1  # no second device, no re-scan
        finally:
            await fresh.aclose()


async def test_a_worker_started_while_redis_is_down_restores_its_sessions_only_with_their_leases(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    async with private_redis() as (port, start_redis):
        redis_url = f"redis://127.0.0.1:{port}/0"
        common: dict[str, Any] = {
            "worker_name": "worker-a",
            "redis_url": redis_url,
            "redis_timeout_s": 0.2,
            "lease_ttl_ms": 3000,
        }
        first = await start_worker(**common)
        sid = await link_id(first, sim, PHONE)
        await first.close()  # hands its session over: snapshot stored, lease freed, profile kept
        fresh = aioredis.from_url(redis_url)
        try:
            os.kill(int((await fresh.info("server"))["process_id"]), signal.SIGTERM)

            async def redis_gone() -> bool:
                try:
                    await fresh.ping()
                except (OSError, RedisError):
                    return True
                return False

            await _until(redis_gone, "Redis stopped")
            second = await start_worker(**common)  # the same worker again, Redis still down
            manager = manager_of(second)
            assert manager.local(sid) is None and not manager.browsers()  # not without a lease
            view = await get_json(second, f"/v1/sessions/{sid}")  # the record answers meanwhile
            assert view["status"] == "ready" and view["phone_number"] == PHONE
            restart = await second.post(f"/v1/sessions/{sid}/restart")
            assert restart.status == 503
            assert (await restart.json())["error"]["code"] == "lease_unavailable"
            assert manager.local(sid) is None and not manager.browsers()

            start_redis()  # Redis is back (empty): the orphan watch takes the session back

            async def restored() -> bool:
                session = manager.sessions.get(sid)
                return session is not None and session.status.value == "ready"

            await _until(restored, "the session is restored once its lease can be had")
            assert await fresh.get(manager.durable.keys.lease(sid)) == b"worker-a"
            assert len(manager.browsers()) == 1
            assert len(await sim.devices(PHONE)) == 1  # no re-scan
        finally:
            await fresh.aclose()


async def test_a_worker_cut_off_from_redis_lets_go_of_a_session_taken_over_in_postgres(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    """A worker that alone cannot reach Redis cannot learn from its lease that another worker took
    its session over; it learns it from the row (the record) and lets the session go."""
    async with private_redis() as (port, _start):
        client = await start_worker(
            worker_name="worker-a", redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2
        )
        manager = manager_of(client)
        sid = await link_id(client, sim, PHONE)
        session = manager.get(sid)
        fresh = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        server_pid = int((await fresh.info("server"))["process_id"])
        await fresh.aclose()
        os.kill(server_pid, signal.SIGSTOP)  # only this worker's Redis: a partition
        try:
            # another worker (on a Redis this one cannot reach) took the session over
            await Store(pg_pool).save(
                session.record(), owner="worker-b", token=session.fencing_token + 1, events=[]
            )

            async def let_go() -> bool:
                return manager.local(sid) is None and not chromium.groups_under(tmp_path / "var")

            await _until(let_go, "worker-a lets the session go and its browser ends")
            assert not manager.browsers()
            with pytest.raises(StaleOwner):  # and anything it still tried to write is refused
                await manager.store.save(
                    session.record(), owner="worker-a", token=session.fencing_token, events=[]
                )
        finally:
            os.kill(server_pid, signal.SIGCONT)
        row = await pg_pool.fetchrow("SELECT owner, session_status FROM whatsapp_accounts WHERE id = $1", sid)
        assert row is not None and (row["owner"], row["session_status"]) == ("worker-b", "ready")


# ---------------------------------------------------------------------------- duplicates
async def test_a_duplicate_replaced_on_another_worker_ends_there_and_its_device_is_unlinked(
    tmp_path: Path, sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    a = await start_worker(worker_name="worker-a")
    b = await start_worker(worker_name="worker-b", data_dir=tmp_path / "b")
    ma = manager_of(a)
    old = await link_id(a, sim, PHONE)
    old_session = ma.get(old)
    assert len(await sim.devices(PHONE)) == 1
    new = await link_id(b, sim, PHONE)  # the same phone links again, on the other worker
    async with asyncio.timeout(WAIT_S):
        while not old_session.ended:
            await old_session.changed.wait()
    assert (old_session.status.value, old_session.reason) == ("failed", "replaced")
    await asyncio.wait_for(ma.settle(), WAIT_S)

    async def old_device_gone() -> bool:
        return len(await sim.devices(PHONE)) == 1

    await _until(old_device_gone, "the replaced session's device is unlinked from the phone")
    assert ma.local(old) is None and not ma.browsers()  # nothing of it on A
    assert chromium.groups_under(tmp_path / "var") == set()
    row = await pg_pool.fetchrow(
        "SELECT session_status, reason, deleted_at IS NOT NULL AS deleted, phone_number"
        " FROM whatsapp_accounts WHERE id = $1",
        old,
    )
    assert row is not None
    assert (row["session_status"], row["reason"], row["deleted"], row["phone_number"]) == (
        "failed",
        "replaced",
        True,
        None,
    )
    view = await get_json(b, f"/v1/sessions/{new}")
    assert view["status"] == "ready" and view["phone_number"] == PHONE


async def test_the_gateway_answers_lease_unavailable_at_once_without_blaming_the_worker(
    aiohttp_server: Any,
) -> None:
    from gateway.proxy import Call
    from gateway.routing import Kind
    from tests.test_gateway_units import fake_cluster, forward

    sid = "s_nolease"
    refused = (503, {"error": {"code": "lease_unavailable", "message": "Redis unreachable; retry"}})
    membership, router, fakes = await fake_cluster(aiohttp_server, {"w1": [refused], "w2": [refused]})
    for _ in range(5):
        sleeps: list[float] = []
        call = Call("POST", f"/v1/sessions/{sid}/restart", {}, b"")
        answer = await forward(router, call, Kind.SESSION, sid, sleeps)
        assert answer.status == 503 and answer.code == "lease_unavailable" and sleeps == []
    assert len(fakes.seen) == 5  # one attempt each: every worker would say the same
    for name in ("w1", "w2"):  # Redis is down, not the worker: its breaker stays closed
        worker = membership.get(name)
        assert worker is not None and worker.breaker.snapshot()["consecutive_failures"] == 0
