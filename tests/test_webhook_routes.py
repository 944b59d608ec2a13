"""The webhook configuration routes on a real worker (Postgres, Redis; Chromium only where a session
is created): the workspace's URL (checked by the SSRF rules), its secret (returned once, on
rotation), per-session event filters and the tenant's delivery log; and the gateway's side of them
(every route in the OpenAPI document that the fuzzer reads)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.api import add_routes as add_gateway_routes
from gateway.openapi import document
from shared import outbox
from shared.web import WORKSPACE_HEADER
from tests.conftest import WorkerFactory, create, manager_of

pytestmark = pytest.mark.timeout(300)

Client = TestClient[Any, Any]


async def call(
    client: Client, method: str, path: str, expect: int, *, json: Any = None, workspace: str | None = None
) -> dict[str, Any]:
    headers = {WORKSPACE_HEADER: workspace} if workspace else {}
    resp = await client.request(method, path, json=json, headers=headers)
    body: dict[str, Any] = await resp.json() if resp.status != 204 else {}
    assert resp.status == expect, (method, path, resp.status, body)
    return body


async def test_the_workspace_webhook_url_is_checked_and_the_secret_is_returned_only_on_rotation(
    start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    ws = "ws_routes"
    assert await call(client, "GET", "/v1/webhook", 200, workspace=ws) == {
        "url": None,
        "secret_rotated_at_ms": None,
        "previous_secret_valid_until_ms": None,
    }

    refused = await call(
        client, "PUT", "/v1/webhook", 400, json={"url": "http://169.254.169.254/"}, workspace=ws
    )
    assert refused["error"]["code"] == "webhook_url_refused"
    assert "169.254.169.254 is link-local" in refused["error"]["message"]
    for bad in ({}, {"url": 5}, {"url": "https://a.example/", "extra": 1}, {"url": "http://x.example/\x00"}):
        await call(client, "PUT", "/v1/webhook", 400, json=bad, workspace=ws)
    assert await pg_pool.fetchval("SELECT webhook_url FROM workspaces WHERE id = $1", ws) is None

    set_ = await call(
        client, "PUT", "/v1/webhook", 200, json={"url": "https://hooks.example.com/w"}, workspace=ws
    )
    assert set_["url"] == "https://hooks.example.com/w"
    assert (await call(client, "GET", "/v1/webhook", 200, workspace=ws))[
        "url"
    ] == "https://hooks.example.com/w"
    # the test workers admit loopback explicitly (WALINK_WEBHOOK_ALLOW), so a local receiver can be set
    await call(client, "PUT", "/v1/webhook", 200, json={"url": "http://127.0.0.1:9/hook"}, workspace=ws)

    rotated = await call(client, "POST", "/v1/webhook/secret", 201, workspace=ws)
    stored = await pg_pool.fetchrow(
        "SELECT webhook_secret, webhook_secret_previous FROM workspaces WHERE id = $1", ws
    )
    assert stored is not None and rotated["secret"] == stored["webhook_secret"]
    assert rotated["previous_secret_valid_until_ms"] > rotated["secret_rotated_at_ms"]
    read = await call(client, "GET", "/v1/webhook", 200, workspace=ws)
    assert read["secret_rotated_at_ms"] == rotated["secret_rotated_at_ms"]
    shown = str(read)
    assert rotated["secret"] not in shown and stored["webhook_secret_previous"] not in shown


async def test_a_session_with_an_internal_webhook_url_is_refused_before_anything_happens(
    start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    for body, why in (
        ({"id": "s_internal", "webhook_url": "http://10.1.2.3/hook"}, "10.1.2.3 is private"),
        ({"id": "s_internal", "webhook_url": "http://localhost/hook"}, "internal name"),
        ({"id": "s_internal", "events": ["status"]}, "not a webhook event type"),
        ({"id": "s_internal", "events": "session_ready"}, "events must be null or a list"),
    ):
        answer = await call(client, "POST", "/v1/sessions", 400, json=body)
        assert why in answer["error"]["message"], answer
    assert await pg_pool.fetchval("SELECT count(*) FROM whatsapp_accounts WHERE id = 's_internal'") == 0
    assert manager_of(client).local("s_internal") is None


async def test_a_sessions_event_filter_is_set_on_create_and_changed_by_its_route(
    start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    created = await create(client, events=["session_ready", "session_failed", "session_ready"])
    sid = created["id"]
    try:
        path = f"/v1/sessions/{sid}/webhook-events"
        stored = await pg_pool.fetchval("SELECT webhook_events FROM whatsapp_accounts WHERE id = $1", sid)
        assert stored == ["session_ready", "session_failed"]  # repeats dropped
        assert await call(client, "GET", path, 200) == {
            "id": sid,
            "events": ["session_ready", "session_failed"],
        }

        assert await call(client, "PUT", path, 200, json={"events": []}) == {"id": sid, "events": []}
        assert await call(client, "PUT", path, 200, json={"events": None}) == {"id": sid, "events": None}
        await call(client, "PUT", path, 400, json={"events": ["nope"]})
        await call(client, "PUT", path, 400, json={})
        # another workspace's caller cannot see or change it: the same 404 as for no session
        await call(client, "GET", path, 404, workspace="someone_else")
        await call(client, "PUT", path, 404, json={"events": []}, workspace="someone_else")
        assert (
            await pg_pool.fetchval("SELECT webhook_events FROM whatsapp_accounts WHERE id = $1", sid) is None
        )
    finally:
        await call(client, "DELETE", f"/v1/sessions/{sid}", 204)


async def test_an_events_delivery_log_is_read_by_its_workspace_only(
    start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    client = await start_worker()
    async with pg_pool.acquire() as conn:
        event = await outbox.enqueue(
            conn,
            workspace_id="ws_log",
            session_id="s_log",
            type="session_ready",
            data={},
            metadata={},
            webhook_url=None,
        )
    log = await call(client, "GET", f"/v1/events/{event.event_id}/deliveries", 200, workspace="ws_log")
    assert (log["event_id"], log["state"], log["deliveries"]) == (event.event_id, "skipped", [])
    other = await call(client, "GET", f"/v1/events/{event.event_id}/deliveries", 404, workspace="ws_other")
    assert other["error"]["code"] == "event_not_found"
    await call(client, "GET", "/v1/events/not-an-id/deliveries", 404, workspace="ws_log")


def test_every_gateway_route_is_in_the_openapi_document() -> None:
    app = web.Application()
    add_gateway_routes(app)
    paths = document()["paths"]
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert routes
    missing = sorted((m, p) for m, p in routes if m not in paths.get(p, {}))
    assert missing == []
    for method, path in (
        ("get", "/v1/webhook"),
        ("put", "/v1/webhook"),
        ("post", "/v1/webhook/secret"),
        ("get", "/v1/sessions/{session_id}/webhook-events"),
        ("put", "/v1/sessions/{session_id}/webhook-events"),
        ("get", "/v1/events/{event_id}/deliveries"),
    ):
        assert (method, path) in routes
