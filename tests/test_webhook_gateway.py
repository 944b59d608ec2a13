"""The webhook configuration routes through the real gateway and a real worker process, with two
workspaces' API keys: each sees and changes only its own webhook, filters and delivery logs.
(No session is linked here, so no browser starts.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from shared import outbox
from tests.test_gateway import Cluster, _json, start_cluster  # noqa: F401 - start_cluster: a fixture

pytestmark = [pytest.mark.chromium, pytest.mark.timeout(300)]


async def test_webhook_routes_through_the_gateway_are_scoped_to_the_callers_workspace(
    start_cluster: Callable[[int], Any],  # noqa: F811 - the fixture imported above
    pg_pool: asyncpg.Pool,
) -> None:
    c: Cluster = await start_cluster(1)
    gw = c.gateway

    # the URL: refused with why when it is internal, kept when it is public
    refused = await _json(
        await gw.put("/v1/webhook", json={"url": "http://10.0.0.1/hook"}, headers=c.auth("a")), 400
    )
    assert refused["error"]["code"] == "webhook_url_refused"
    assert "10.0.0.1 is private" in refused["error"]["message"]
    await _json(
        await gw.put("/v1/webhook", json={"url": "https://a.example.com/h"}, headers=c.auth("a")), 200
    )
    assert (await _json(await gw.get("/v1/webhook", headers=c.auth("a")), 200))[
        "url"
    ] == "https://a.example.com/h"
    assert (await _json(await gw.get("/v1/webhook", headers=c.auth("b")), 200))["url"] is None
    # a workspace key cannot name another workspace
    await _json(await gw.get("/v1/webhook?workspace_id=ws_b", headers=c.auth("a")), 404)

    # the secret: only in the answer of a rotation, and it is the one that signs
    rotated = await _json(await gw.post("/v1/webhook/secret", headers=c.auth("a")), 201)
    assert rotated["secret"] == await pg_pool.fetchval(
        "SELECT webhook_secret FROM workspaces WHERE id = 'ws_a'"
    )
    assert rotated["secret"] not in await (await gw.get("/v1/webhook", headers=c.auth("a"))).text()

    # the delivery log and the event filter of workspace A's session: A's own, 404 for B
    # an ended session (an orphaned live one would be adopted by the worker, which starts a browser)
    await pg_pool.execute(
        "INSERT INTO whatsapp_accounts (id, workspace_id, session_status, status)"
        " VALUES ('s_gw_hooks', 'ws_a', 'expired', 'failed')"
    )
    async with pg_pool.acquire() as conn:
        event = await outbox.enqueue(
            conn,
            workspace_id="ws_a",
            session_id="s_gw_hooks",
            type="session_ready",
            data={},
            metadata={},
            webhook_url=None,
        )
    deliveries = f"/v1/events/{event.event_id}/deliveries"
    log = await _json(await gw.get(deliveries, headers=c.auth("a")), 200)
    assert (log["event_id"], log["state"]) == (event.event_id, "skipped")
    assert (await _json(await gw.get(deliveries, headers=c.auth("b")), 404))["error"][
        "code"
    ] == "event_not_found"
    await _json(await gw.get("/v1/events/not-an-event/deliveries", headers=c.auth("a")), 404)

    filters = "/v1/sessions/s_gw_hooks/webhook-events"
    await _json(await gw.put(filters, json={"events": ["session_ready"]}, headers=c.auth("b")), 404)
    assert await _json(
        await gw.put(filters, json={"events": ["session_ready"]}, headers=c.auth("a")), 200
    ) == {
        "id": "s_gw_hooks",
        "events": ["session_ready"],
    }
    assert (await _json(await gw.get(filters, headers=c.auth("a")), 200))["events"] == ["session_ready"]
    await _json(await gw.get(filters, headers=c.auth("b")), 404)
