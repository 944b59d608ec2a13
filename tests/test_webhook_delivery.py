"""Webhook delivery against real Postgres and real HTTP receivers: the SSRF guard at delivery (and
DNS rebinding), signatures during a secret rotation, per-session event filters, and per-endpoint
lanes (a slow endpoint does not hold up the others). Nothing is mocked but the DNS answers."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from shared import outbox, webhook_config
from shared.errors import EventNotFound
from shared.outbox import WebhookDispatcher
from shared.webhook_guard import LOOPBACK_ALLOW, IPAddress, WebhookAllow
from shared.webhooks import SIGNATURE_HEADER, verify

WS = "ws_hooks"
LOSS_S = 10.0  # how long a test waits before calling something lost (not a speed check)
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


class Hook:
    """An endpoint that records what reached it; ``hold`` keeps every request open until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.received: list[dict[str, Any]] = []
        self.signatures: list[str] = []
        self.bodies: list[bytes] = []
        self.hosts: list[str] = []
        self.open = 0
        self.most_open = 0
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.changed = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/hook", self.handle)
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self.changed.set()
        try:
            await self.release.wait()
        finally:
            self.open -= 1
        self.bodies.append(body)
        self.signatures.append(request.headers.get(SIGNATURE_HEADER, ""))
        self.hosts.append(request.headers.get("Host", ""))
        self.received.append(orjson.loads(body))
        self.changed.set()
        return web.Response(status=204)

    async def until(self, condition: Any) -> None:
        async with asyncio.timeout(LOSS_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def serve(hook: Hook, aiohttp_server: AiohttpServer, **kwargs: Any) -> Hook:
    server = await aiohttp_server(hook.app, **kwargs)
    hook.url = str(server.make_url("/hook"))
    return hook


@pytest.fixture
async def pool(pg_pool: asyncpg.Pool) -> asyncpg.Pool:
    await pg_pool.execute(
        "INSERT INTO workspaces (id, name, webhook_secret) VALUES ($1, 'W', $2)", WS, "whsec_first"
    )
    return pg_pool


async def add(
    pool: asyncpg.Pool, session_id: str, url: str, *, type: str = "session_ready"
) -> outbox.OutboxEvent:
    async with pool.acquire() as conn:
        event = await outbox.enqueue(
            conn,
            workspace_id=WS,
            session_id=session_id,
            type=type,
            data={"phone_number": "15550001"},
            metadata={},
            webhook_url=url,
        )
        await outbox.notify(conn)
    return event


async def row(pool: asyncpg.Pool, event: outbox.OutboxEvent) -> asyncpg.Record:
    record = await pool.fetchrow("SELECT state, attempts, last_error FROM outbox WHERE id = $1", event.id)
    assert record is not None
    return record


def dispatcher(pool: asyncpg.Pool, http: aiohttp.ClientSession, **options: Any) -> WebhookDispatcher:
    return WebhookDispatcher(pool, http, worker_name="w-hooks", **{**FAST, **options})


async def drain(pool: asyncpg.Pool, d: WebhookDispatcher) -> None:
    async with asyncio.timeout(LOSS_S):
        while await pool.fetchval("SELECT count(*) FROM outbox WHERE state = 'pending'"):
            if not await d.deliver_due():
                await d.wait_for_work()


# ---------------------------------------------------------------------------- item 1: SSRF at delivery


async def test_webhook_to_loopback_without_the_allowlist_is_refused_and_recorded(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    hook = await serve(Hook(), aiohttp_server)  # on 127.0.0.1: what a tenant must not reach
    event = await add(pool, "s_ssrf", hook.url)
    d = dispatcher(pool, http)  # no allowlist: public addresses only

    assert await d.deliver_due() == 1
    assert await d.deliver_due() == 0  # dead at once: not retried

    assert hook.received == []
    state = await row(pool, event)
    assert (state["state"], state["attempts"]) == ("dead", 1)
    assert state["last_error"] == "refused: 127.0.0.1 is loopback (not in WALINK_WEBHOOK_ALLOW)"
    log = await webhook_config.deliveries(pool, WS, event.event_id)
    assert [(a["status_code"], a["error"]) for a in log["deliveries"]] == [(None, state["last_error"])]
    assert await d.next_due_in_s() is None  # nothing left to try

    # the operator admits loopback: a replay delivers it
    admitted = dispatcher(pool, http, allow=LOOPBACK_ALLOW)
    assert await admitted.replay(workspace_id=WS) == 1
    await drain(pool, admitted)
    assert [h["event_id"] for h in hook.received] == [event.event_id]


async def test_dns_rebinding_cannot_reach_loopback(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    # two endpoints on one port: the admitted one on 127.0.0.2, the forbidden one on 127.0.0.1
    admitted = await serve(Hook(), aiohttp_server, host="127.0.0.2")
    port = int(admitted.url.split(":")[2].split("/")[0])
    forbidden = Hook()
    try:
        await serve(forbidden, aiohttp_server, host="127.0.0.1", port=port)
    except OSError:
        pytest.skip(f"port {port} is taken on 127.0.0.1")
    asked: list[str] = []

    async def rebinding(host: str, port: int) -> list[IPAddress]:
        # the first answer is the admitted address, every later one the forbidden address
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.2" if len(asked) == 1 else "127.0.0.1")]

    event = await add(pool, "s_rebind", f"http://hooks.rebind.example:{port}/hook")
    d = dispatcher(pool, http, allow=WebhookAllow.parse("127.0.0.2/32"), resolve=rebinding)
    await drain(pool, d)

    assert forbidden.received == []
    assert [h["event_id"] for h in admitted.received] == [event.event_id]
    assert asked == ["hooks.rebind.example"]  # looked up once: the vetted answer is what was used
    assert admitted.hosts == [f"hooks.rebind.example:{port}"]  # the receiver sees its own name
    assert (await row(pool, event))["state"] == "delivered"


async def test_a_name_that_resolves_to_an_internal_address_is_refused_at_delivery(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    async def metadata(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("169.254.169.254")]

    event = await add(pool, "s_meta", "http://totally-public.example/hook")
    await drain(pool, dispatcher(pool, http, resolve=metadata))
    state = await row(pool, event)
    assert state["state"] == "dead"
    assert state["last_error"] == (
        "refused: 169.254.169.254 is link-local (not in WALINK_WEBHOOK_ALLOW);"
        " totally-public.example resolved to 169.254.169.254"
    )


async def test_an_unknown_name_is_a_failed_attempt_that_is_retried(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    async def nxdomain(host: str, port: int) -> list[IPAddress]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    event = await add(pool, "s_nx", "http://no-such-host.example/hook")
    assert await dispatcher(pool, http, resolve=nxdomain).deliver_due() == 1
    state = await row(pool, event)
    assert (state["state"], state["attempts"]) == ("pending", 1)
    assert "cannot resolve no-such-host.example" in state["last_error"]


# ---------------------------------------------------------------------------- item 7: secrets, filters


async def test_deliveries_are_signed_by_both_secrets_during_the_overlap_then_by_the_new_one(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    hook = await serve(Hook(), aiohttp_server)
    rotated = await webhook_config.rotate_secret(pool, WS, overlap_s=3600)
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != "whsec_first"
    assert rotated["previous_secret_valid_until_ms"] > rotated["secret_rotated_at_ms"]
    config = await webhook_config.read_config(pool, WS)
    assert "secret" not in config and new not in orjson.dumps(config).decode()  # never read back

    d = dispatcher(pool, http, allow=LOOPBACK_ALLOW)
    await add(pool, "s_rot", hook.url)
    await drain(pool, d)
    header = hook.signatures[0]
    assert header.count("v1=") == 2
    assert verify(new, hook.bodies[0], header) and verify("whsec_first", hook.bodies[0], header)

    # the overlap is over: only the new secret signs
    await pool.execute("UPDATE workspaces SET webhook_secret_previous_until = now() WHERE id = $1", WS)
    await add(pool, "s_rot", hook.url)
    await drain(pool, d)
    header = hook.signatures[1]
    assert header.count("v1=") == 1
    assert verify(new, hook.bodies[1], header) and not verify("whsec_first", hook.bodies[1], header)
    assert (await webhook_config.read_config(pool, WS))["previous_secret_valid_until_ms"] is None


async def test_only_the_event_types_of_a_sessions_filter_are_delivered(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    hook = await serve(Hook(), aiohttp_server)
    await pool.execute(
        "INSERT INTO whatsapp_accounts (id, workspace_id, webhook_events) VALUES ('s_f', $1, $2::text[])",
        WS,
        ["session_ready"],
    )
    qr = await add(pool, "s_f", hook.url, type="qr_code_generated")
    ready = await add(pool, "s_f", hook.url, type="session_ready")
    await drain(pool, dispatcher(pool, http, allow=LOOPBACK_ALLOW))

    assert [h["event_id"] for h in hook.received] == [ready.event_id]
    assert (await row(pool, qr))["state"] == "skipped"
    listed = await outbox.events_after(pool, workspace_id=WS, after_id=0)
    assert [e["event_id"] for e in listed] == [qr.event_id, ready.event_id]  # /v1/events shows all

    # the filter changed: later events of the type go out again
    assert await webhook_config.set_session_events(pool, WS, "s_f", None) is None
    again = await add(pool, "s_f", hook.url, type="qr_code_generated")
    await drain(pool, dispatcher(pool, http, allow=LOOPBACK_ALLOW))
    assert [h["event_id"] for h in hook.received] == [ready.event_id, again.event_id]


async def test_the_delivery_log_is_the_tenants_own(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    hook = await serve(Hook(), aiohttp_server)
    event = await add(pool, "s_log", hook.url)
    await drain(pool, dispatcher(pool, http, allow=LOOPBACK_ALLOW))
    log = await webhook_config.deliveries(pool, WS, event.event_id)
    assert (log["state"], log["attempts"], log["type"]) == ("delivered", 1, "session_ready")
    assert [(a["attempt"], a["status_code"]) for a in log["deliveries"]] == [(1, 204)]
    with pytest.raises(EventNotFound):
        await webhook_config.deliveries(pool, "another_ws", event.event_id)
    with pytest.raises(EventNotFound):
        await webhook_config.deliveries(pool, WS, "not-a-uuid")


# ---------------------------------------------------------------------------- item 17: lanes


async def test_a_slow_endpoint_does_not_delay_another_endpoints_events(
    pool: asyncpg.Pool, http: aiohttp.ClientSession, aiohttp_server: AiohttpServer
) -> None:
    slow = await serve(Hook(hold=True), aiohttp_server)  # answers nothing until released
    fast = await serve(Hook(), aiohttp_server)
    slow_events = [await add(pool, f"s_slow{i}", slow.url) for i in range(5)]
    # one session's events go out one after the other: each needs a new claim after the last one
    fast_events = [await add(pool, "s_fast", fast.url) for _ in range(4)]
    d = dispatcher(
        pool, http, allow=LOOPBACK_ALLOW, attempt_timeout_s=60, claim_ttl_s=120, lane_concurrency=2
    )
    task = asyncio.create_task(d.run())
    try:
        await slow.until(lambda: slow.open == 2)
        await fast.until(lambda: len(fast.received) == len(fast_events))
        # every fast event went out while the slow endpoint still held its (two) places
        assert [h["seq"] for h in fast.received] == [1, 2, 3, 4]
        assert slow.received == [] and slow.open == 2
        assert d.in_flight()[outbox.lane_of(slow.url)] == 2
        states = [(await row(pool, e))["state"] for e in slow_events]
        assert states == ["pending"] * 5

        slow.release.set()
        await slow.until(lambda: len(slow.received) == len(slow_events))
    finally:
        await d.close()
    assert slow.most_open == 2  # never more than the lane's places at once
    assert sorted(h["event_id"] for h in slow.received) == sorted(e.event_id for e in slow_events)
    assert task.done()
