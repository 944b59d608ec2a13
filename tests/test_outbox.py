"""The webhook outbox against real Postgres and real HTTP receivers: signing, order, retries, dead letters.

Receivers are aiohttp apps that verify every signature and record what they accepted. Nothing is
mocked; the only sleeps are inside receivers that play a hanging endpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from shared import outbox
from shared.errors import BadRequest
from shared.outbox import DispatcherRunning, OutboxEvent, WebhookDispatcher
from shared.webhook_guard import LOOPBACK_ALLOW
from shared.webhooks import SIGNATURE_HEADER, USER_AGENT, build_payload, sign, verify

SECRET = "whsec_test_0123456789"
WS = "w1"
LOSS_S = 10.0  # how long a test waits before calling something lost (not a speed check)

# small budgets so retries take milliseconds
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "attempt_timeout_s": 0.3}


class Receiver:
    """A webhook endpoint that verifies signatures and records what it accepted, in order."""

    def __init__(
        self,
        *,
        fail_first: int = 0,
        hang_first: int = 0,
        hang_s: float = 0.6,
        always_fail: bool = False,
        expect: int = 0,
        before_accept: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.fail_first = fail_first
        self.hang_first = hang_first
        self.hang_s = hang_s
        self.always_fail = always_fail
        self.expect = expect
        self.before_accept = before_accept
        self.requests = 0
        self.accepted: list[tuple[str, int, str]] = []  # (event_id, seq, session_id)
        self.seqs: dict[str, list[int]] = defaultdict(list)
        self.bad: list[str] = []  # bad signatures or headers: must stay empty
        self.order_violations: list[tuple[str, int, list[int]]] = []
        self.done = asyncio.Event()
        self.arrived = asyncio.Event()  # set at the first request that passed the checks
        self.app = web.Application()
        self.app.router.add_post("/hook", self.handle)
        self.url = ""

    async def start(self, aiohttp_server: AiohttpServer) -> Receiver:
        server = await aiohttp_server(self.app)
        self.url = str(server.make_url("/hook"))
        return self

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET, body, request.headers.get(SIGNATURE_HEADER, "")):
            self.bad.append("signature")
            return web.Response(status=401, text="bad signature")
        payload = orjson.loads(body)
        expected_headers = {
            "Content-Type": "application/json",
            "X-Walink-Event": payload["event"],
            "X-Walink-Event-Id": payload["event_id"],
            "User-Agent": USER_AGENT,
        }
        for name, value in expected_headers.items():
            if request.headers.get(name) != value:
                self.bad.append(f"{name}: {request.headers.get(name)!r}")
                return web.Response(status=400, text="bad header")
        self.requests += 1
        number = self.requests
        self.arrived.set()
        session_id, seq = payload["session_id"], payload["seq"]
        # seq k+1 of a session must never arrive before seq k was accepted
        if not set(range(1, seq)) <= set(self.seqs[session_id]):
            self.order_violations.append((session_id, seq, list(self.seqs[session_id])))
        if number <= self.hang_first:
            await asyncio.sleep(self.hang_s)  # longer than the dispatcher's attempt timeout
            return web.Response(status=504, text="too late")
        if self.always_fail or number <= self.fail_first:
            return web.Response(status=500, text="refused")
        if self.before_accept is not None:
            await self.before_accept(payload)
        self.accepted.append((payload["event_id"], seq, session_id))
        self.seqs[session_id].append(seq)
        if self.expect and len(self.accepted) >= self.expect:
            self.done.set()
        return web.Response(status=204)


@pytest.fixture
async def pool(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    await pg_pool.execute(
        "INSERT INTO workspaces (id, name, webhook_secret) VALUES ($1, 'W1', $2), ('w2', 'W2', 'other')",
        WS,
        SECRET,
    )
    return pg_pool


async def add(
    pool: asyncpg.Pool,
    session_id: str,
    url: str | None,
    *,
    workspace_id: str = WS,
    type: str = "session_ready",
) -> OutboxEvent:
    async with pool.acquire() as conn:
        event = await outbox.enqueue(
            conn,
            workspace_id=workspace_id,
            session_id=session_id,
            type=type,
            data={"phone_number": "15550001"},
            metadata={"customer": "c-1"},
            webhook_url=url,
        )
        await outbox.notify(conn)
    return event


async def add_many(pool: asyncpg.Pool, sessions: dict[str, str], per_session: int) -> list[OutboxEvent]:
    """``per_session`` events for each session (session id -> url), interleaved across sessions."""
    return [await add(pool, sid, url) for _ in range(per_session) for sid, url in sessions.items()]


async def pending(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'")
    return count


async def drain(pool: asyncpg.Pool, dispatcher: WebhookDispatcher) -> None:
    """Deliver until nothing is pending; between passes wait as run() does (until the next due event)."""
    async with asyncio.timeout(LOSS_S):
        while await pending(pool):
            if not await dispatcher.deliver_due():
                await dispatcher.wait_for_work()


async def states(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


def dispatcher(pool: asyncpg.Pool, http: aiohttp.ClientSession, **options: Any) -> WebhookDispatcher:
    options.setdefault("allow", LOOPBACK_ALLOW)  # the receivers listen on loopback, admitted explicitly
    return WebhookDispatcher(pool, http, worker_name=options.pop("worker_name", "w-test"), **options)


async def running(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, **options: Any
) -> tuple[WebhookDispatcher, asyncio.Task[None]]:
    """A dispatcher whose run() loop has started and is idle (listening, nothing to do)."""
    d = dispatcher(pool, http, **options)
    task = asyncio.create_task(d.run())
    try:
        await asyncio.wait_for(d.idle.wait(), LOSS_S)
    except BaseException:
        await d.close()
        raise
    return d, task


async def claim(pool: asyncpg.Pool, outbox_id: int) -> tuple[str, int, str | None]:
    """An outbox row's delivery state: (state, attempts, claimed_by)."""
    row = await pool.fetchrow("SELECT state, attempts, claimed_by FROM outbox WHERE id = $1", outbox_id)
    assert row is not None
    return row["state"], row["attempts"], row["claimed_by"]


def assert_in_order(receiver: Receiver, sessions: list[str], per_session: int) -> None:
    assert receiver.bad == []
    assert receiver.order_violations == []
    for sid in sessions:
        assert receiver.seqs[sid] == list(range(1, per_session + 1)), sid
    event_ids = [event_id for event_id, _, _ in receiver.accepted]
    assert len(event_ids) == len(set(event_ids)), "an event was accepted twice"


# ------------------------------------------------------------------------------------------------ 1


def test_sign_and_verify() -> None:
    body = b'{"event":"session_ready","seq":1}'
    now = time.time()
    header = sign(SECRET, body, timestamp=int(now))
    mac = hmac.new(SECRET.encode(), f"{int(now)}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={int(now)},v1={mac}"
    assert verify(SECRET, body, header)
    assert verify(SECRET, body, sign(SECRET, body))  # signed now by default
    assert not verify(SECRET, body + b" ", header)  # tampered body
    assert not verify("another-secret", body, header)
    assert not verify(SECRET, body, sign(SECRET, body, timestamp=int(now) - 301), now=now)  # stale
    assert verify(SECRET, body, sign(SECRET, body, timestamp=int(now) - 299), now=now)
    assert not verify(SECRET, body, sign(SECRET, body, timestamp=int(now) + 400), now=now)  # far future
    assert not verify(SECRET, body, header, tolerance_s=10, now=now + 11)
    # several v1 entries (secret rotation): one match is enough
    assert verify(SECRET, body, header + ",v1=" + "0" * 64)
    other = sign("old", body, timestamp=int(now)).split(",")[1]
    assert verify(SECRET, body, f"{header},{other}")
    for bad in [
        "",
        "garbage",
        f"t={int(now)}",
        f"v1={mac}",
        f"t=abc,v1={mac}",
        f"t=+{int(now)},v1={mac}",
        f"t={int(now)},v1=zz",
        f"t={int(now)},v1={mac[:-1]}",
        f"t={int(now)},t={int(now)},v1={mac}",
        f"t={int(now)},v1={mac}," + "x" * 5000,
        f"t={int(now)},v1={'é' * 64}",
        f"t={int(now)};v1={mac}",
    ]:
        assert not verify(SECRET, body, bad), bad
    assert not verify(SECRET, body, None)  # type: ignore[arg-type]
    assert not verify(SECRET, "text", header)  # type: ignore[arg-type]


def test_build_payload_shape() -> None:
    payload = build_payload(
        event_id="e",
        type="session_ready",
        seq=3,
        session_id="s_1",
        workspace_id=WS,
        occurred_at_ms=1,
        metadata=None,
        data={"phone_number": "1555"},
    )
    assert payload == {
        "event_id": "e",
        "event": "session_ready",
        "seq": 3,
        "session_id": "s_1",
        "workspace_id": WS,
        "occurred_at_ms": 1,
        "metadata": {},
        "data": {"phone_number": "1555"},
    }


# ------------------------------------------------------------------------------------------------ 2


async def test_happy_path_delivers_each_event_once_in_session_order(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver().start(aiohttp_server)
    sessions = ["s_a", "s_b", "s_c"]
    events = await add_many(pool, dict.fromkeys(sessions, receiver.url), 5)
    assert {e.state for e in events} == {"pending"}
    assert [e.seq for e in events if e.session_id == "s_b"] == [1, 2, 3, 4, 5]

    await drain(pool, dispatcher(pool, http))

    assert_in_order(receiver, sessions, 5)
    assert sorted(e for e, _, _ in receiver.accepted) == sorted(e.event_id for e in events)
    assert await states(pool) == {"delivered": 15}
    rows = await pool.fetch(
        "SELECT o.attempts, o.delivered_at, o.claimed_by, count(a.id) AS n, min(a.status_code) AS code,"
        " min(a.worker) AS worker, min(a.attempt) AS attempt"
        " FROM outbox o JOIN delivery_attempts a USING (event_id) GROUP BY o.id"
    )
    assert len(rows) == 15
    for row in rows:
        summary = (row["attempts"], row["n"], row["code"], row["worker"], row["attempt"])
        assert summary == (1, 1, 204, "w-test", 1)
        assert row["delivered_at"] is not None and row["claimed_by"] is None


# ------------------------------------------------------------------------------------------------ 3


async def test_refusing_and_hanging_receivers_lose_nothing_and_keep_order(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    refusing = await Receiver(fail_first=7).start(aiohttp_server)
    hanging = await Receiver(hang_first=3, hang_s=0.6).start(aiohttp_server)
    routes = {"s_r1": refusing.url, "s_r2": refusing.url, "s_h1": hanging.url, "s_h2": hanging.url}
    await add_many(pool, routes, 4)

    await drain(pool, dispatcher(pool, http, max_attempts=20, **FAST))

    assert_in_order(refusing, ["s_r1", "s_r2"], 4)
    assert_in_order(hanging, ["s_h1", "s_h2"], 4)
    assert await states(pool) == {"delivered": 16}
    assert refusing.requests == 7 + 8
    log = await pool.fetch("SELECT status_code, error FROM delivery_attempts")
    assert sum(r["status_code"] == 500 for r in log) == 7
    assert sum((r["error"] or "").startswith("timeout") for r in log) >= 3
    assert sum(r["status_code"] == 204 for r in log) == 16
    total_attempts = await pool.fetchval("SELECT sum(attempts) FROM outbox")
    assert total_attempts == len(log)


# ------------------------------------------------------------------------------------------------ 4


async def test_dead_letter_then_replay(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver(always_fail=True).start(aiohttp_server)
    first, second = await add_many(pool, {"s_d": receiver.url}, 2)
    d = dispatcher(pool, http, max_attempts=3, **FAST)

    await drain(pool, d)  # seq 1 dies, which unblocks seq 2, which dies too

    rows = await pool.fetch("SELECT state, attempts, last_error, claimed_by FROM outbox ORDER BY seq")
    assert [(r["state"], r["attempts"], r["claimed_by"]) for r in rows] == [("dead", 3, None)] * 2
    assert rows[0]["last_error"] == "HTTP 500: refused"
    assert [a["status_code"] for a in await outbox.delivery_log(pool, first.event_id)] == [500] * 3
    assert receiver.accepted == []

    receiver.always_fail = False  # the receiver is fixed
    with pytest.raises(BadRequest):
        await d.replay(event_ids=["not-a-uuid"])
    assert await d.replay(workspace_id="w2") == 0
    assert await d.replay(event_ids=[first.event_id]) == 1
    await drain(pool, d)
    assert [e for e, _, _ in receiver.accepted] == [first.event_id]
    assert await d.replay(workspace_id=WS) == 1
    await drain(pool, d)
    assert [e for e, _, _ in receiver.accepted] == [first.event_id, second.event_id]
    assert await states(pool) == {"delivered": 2}
    assert await d.replay() == 0  # nothing dead any more
    attempts = await outbox.delivery_log(pool, first.event_id)
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 500), (4, 204)]


# ------------------------------------------------------------------------------------------------ 5


async def test_concurrent_dispatchers_never_post_twice(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver().start(aiohttp_server)
    sessions = [f"s_{i}" for i in range(6)]
    await add_many(pool, dict.fromkeys(sessions, receiver.url), 6)
    dispatchers = [dispatcher(pool, http, worker_name=f"w{i}", batch_size=4) for i in range(3)]
    made = dict.fromkeys(range(3), 0)

    async def loop(index: int) -> None:
        while await pending(pool):
            # 0: the other dispatchers hold every due head right now; try again
            made[index] += await dispatchers[index].deliver_due()
            await asyncio.sleep(0)

    async with asyncio.timeout(LOSS_S):
        await asyncio.gather(*(loop(i) for i in range(3)))

    assert_in_order(receiver, sessions, 6)
    assert len(receiver.accepted) == 36
    assert sum(made.values()) == 36  # one attempt per event, all dispatchers together
    assert await states(pool) == {"delivered": 36}
    assert await pool.fetchval("SELECT count(*) FROM delivery_attempts") == 36


# ------------------------------------------------------------------------------------------------ 6


async def test_expired_claim_is_taken_over_and_live_claim_respected(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver().start(aiohttp_server)
    ghost = await add(pool, "s_ghost", receiver.url)
    alive = await add(pool, "s_alive", receiver.url)
    await pool.execute(
        "UPDATE outbox SET claimed_by = 'ghost', claimed_until = now() - interval '1 second' WHERE id = $1",
        ghost.id,
    )
    await pool.execute(
        "UPDATE outbox SET claimed_by = 'alive', claimed_until = now() + interval '1 minute' WHERE id = $1",
        alive.id,
    )
    d = dispatcher(pool, http)

    assert await d.deliver_due() == 1
    assert await d.deliver_due() == 0

    assert [e for e, _, _ in receiver.accepted] == [ghost.event_id]
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, state, claimed_by FROM outbox")}
    assert (rows[ghost.id]["state"], rows[ghost.id]["claimed_by"]) == ("delivered", None)
    assert (rows[alive.id]["state"], rows[alive.id]["claimed_by"]) == ("pending", "alive")
    due_in_s = await d.next_due_in_s()
    assert due_in_s is not None and 30 < due_in_s <= 60  # the live claim's expiry, not "now"


async def test_dispatcher_that_lost_its_claim_does_not_overwrite(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    async def steal(payload: dict[str, Any]) -> None:
        # while the POST is in flight, the claim expires and another dispatcher takes it
        await pool.execute(
            "UPDATE outbox SET claimed_by = 'thief', claimed_until = now() + interval '1 minute'"
            " WHERE event_id = $1::uuid",
            payload["event_id"],
        )

    receiver = await Receiver(before_accept=steal).start(aiohttp_server)
    event = await add(pool, "s_x", receiver.url)

    assert await dispatcher(pool, http).deliver_due() == 1

    assert await claim(pool, event.id) == ("pending", 0, "thief")
    log = await outbox.delivery_log(pool, event.event_id)
    assert [(a["status_code"], a["worker"]) for a in log] == [(204, "w-test")]  # the attempt is still logged


# ------------------------------------------------------------------------------------------------ 7


async def test_run_wakes_on_notify_and_stops_cleanly(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver(expect=1).start(aiohttp_server)
    d, task = await running(pool, http, idle_wait_s=30)  # listening, nothing to do, waiting up to 30 s
    assert d.is_listening()
    with pytest.raises(DispatcherRunning):
        await d.run()

    event = await add(pool, "s_n", receiver.url)  # enqueue + NOTIFY
    await asyncio.wait_for(receiver.done.wait(), LOSS_S)
    assert receiver.accepted == [(event.event_id, 1, "s_n")]

    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled()
    assert not d.is_listening()  # the listener connection went back to the pool

    # close() stops a running loop the same way
    again, task = await running(pool, http, idle_wait_s=30)
    await again.close()
    assert task.done() and not again.is_listening()
    with pytest.raises(DispatcherRunning):
        await again.run()


async def test_run_listens_again_after_its_connection_is_killed(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver(expect=1).start(aiohttp_server)
    d, task = await running(pool, http, idle_wait_s=30)
    try:
        listener = d._listen_conn
        assert listener is not None
        killed = await pool.fetchval("SELECT pg_terminate_backend($1)", listener.get_server_pid())
        assert killed
        await add(pool, "s_k", receiver.url)  # its NOTIFY may reach the dead connection only
        await asyncio.wait_for(receiver.done.wait(), LOSS_S)  # long before the 30 s idle wait
        assert not task.done()
    finally:
        await d.close()
    assert not d.is_listening()


async def test_cancel_during_a_post_hands_the_claim_back(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver(hang_first=1, hang_s=0.5).start(aiohttp_server)
    event = await add(pool, "s_c", receiver.url)
    d = dispatcher(pool, http, attempt_timeout_s=5.0)
    task = asyncio.create_task(d.run())
    await asyncio.wait_for(receiver.arrived.wait(), LOSS_S)  # the POST is in flight
    await d.close()
    assert task.cancelled()
    assert await claim(pool, event.id) == ("pending", 0, None)
    await drain(pool, dispatcher(pool, http, worker_name="w-next"))  # at once, not after claim_ttl_s
    assert [e for e, _, _ in receiver.accepted] == [event.event_id]


async def test_a_local_fault_does_not_burn_the_retry_budget(pool: asyncpg.Pool) -> None:
    closed = aiohttp.ClientSession()
    await closed.close()
    event = await add(pool, "s_l", "http://127.0.0.1:9/hook")
    with pytest.raises(RuntimeError):
        await dispatcher(pool, closed).deliver_due()
    assert await claim(pool, event.id) == ("pending", 0, None)


async def test_unreachable_receiver_is_a_failed_attempt(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    event = await add(pool, "s_u", "http://127.0.0.1:9/hook")  # nothing listens on port 9
    assert await dispatcher(pool, http, **FAST).deliver_due() == 1
    row = await pool.fetchrow("SELECT state, attempts, last_error FROM outbox WHERE id = $1", event.id)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("pending", 1)
    assert row["last_error"].startswith("ClientConnectorError")
    (attempt,) = await outbox.delivery_log(pool, event.event_id)
    assert attempt["status_code"] is None and attempt["error"].startswith("ClientConnectorError")


def test_dispatcher_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        WebhookDispatcher(None, None, worker_name="w", attempt_timeout_s=30, claim_ttl_s=30)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WebhookDispatcher(None, None, worker_name="w", max_attempts=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ 8


async def test_skipped_events_and_cursors(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    receiver = await Receiver().start(aiohttp_server)
    first = await add(pool, "s_1", None)
    other = await add(pool, "s_2", None, workspace_id="w2")
    second = await add(pool, "s_1", receiver.url, type="session_disconnected")
    third = await add(pool, "s_1", None)
    assert (first.state, first.seq, second.seq, third.seq) == ("skipped", 1, 2, 3)

    await drain(pool, dispatcher(pool, http))
    assert [e for e, _, _ in receiver.accepted] == [second.event_id]  # skipped ones never POSTed
    assert await states(pool) == {"skipped": 3, "delivered": 1}

    page = await outbox.events_after(pool, workspace_id=WS, after_id=0)
    assert [e["id"] for e in page] == [first.id, second.id, third.id]  # w2's event is not there
    assert [e["state"] for e in page] == ["skipped", "delivered", "skipped"]
    assert page[1]["payload"] == second.payload and page[1]["payload"]["event"] == "session_disconnected"
    assert set(page[0]) == {
        "id",
        "event_id",
        "session_id",
        "seq",
        "type",
        "state",
        "attempts",
        "payload",
        "created_at_ms",
    }
    after = await outbox.events_after(pool, workspace_id=WS, after_id=first.id, limit=1)
    assert [e["event_id"] for e in after] == [second.event_id]
    assert await outbox.events_after(pool, workspace_id=WS, after_id=third.id) == []
    assert [e["event_id"] for e in await outbox.events_after(pool, workspace_id="w2", after_id=0)] == [
        other.event_id
    ]

    resumed = await outbox.session_events_after(pool, session_id="s_1", after_seq=1)
    assert [(e.seq, e.event_id) for e in resumed] == [(2, second.event_id), (3, third.event_id)]
    assert resumed[0].payload["metadata"] == {"customer": "c-1"}


async def test_enqueue_uses_the_account_sequence_and_the_callers_transaction(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO whatsapp_accounts (id, workspace_id) VALUES ('s_acc', $1)", WS)
    assert [(await add(pool, "s_acc", None)).seq for _ in range(2)] == [1, 2]
    assert await pool.fetchval("SELECT last_seq FROM whatsapp_accounts WHERE id = 's_acc'") == 2

    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await outbox.enqueue(
                    conn,
                    workspace_id=WS,
                    session_id="s_acc",
                    type="session_failed",
                    data={},
                    metadata={},
                    webhook_url="http://127.0.0.1:9/hook",
                )
                raise RuntimeError("the state change failed")
    # rolled back with the caller's transaction: no event, no gap in the sequence
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2
    assert (await add(pool, "s_acc", None)).seq == 3
