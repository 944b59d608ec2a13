"""Bad user input is refused whole, before any side effect: no row, no Redis key, no browser.

Postgres ``text``/``jsonb`` refuse the NUL character; a NUL that got through would fail the write
halfway through "add account" (after the workspace row and the lease), as a 500. The worker here
is real (Postgres, Redis, Playwright); no browser is started by any of these requests.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from shared.errors import BadRequest, InvalidMetadata
from shared.inputs import MAX_METADATA_BYTES, MAX_METADATA_DEPTH, check_create_body, check_metadata
from tests.conftest import Sim, WorkerFactory, create, events, get_json, manager_of

pytestmark = pytest.mark.chromium  # a real worker (Playwright), though no browser starts

NUL = "\x00"

BAD_CREATES: list[tuple[dict[str, Any], str]] = [
    ({"id": "nul-label", "label": f"shop{NUL}"}, "invalid_text"),
    ({"id": "nul-webhook", "webhook_url": f"http://example.test/{NUL}"}, "invalid_text"),
    ({"id": "nul-meta-key", "metadata": {f"k{NUL}": 1}}, "invalid_metadata"),
    ({"id": "nul-meta-value", "metadata": {"k": ["ok", {"deep": f"v{NUL}"}]}}, "invalid_metadata"),
    ({"id": "nul-workspace", "workspace_id": f"ws{NUL}"}, "invalid_text"),
    ({"id": "newline-workspace", "workspace_id": "ws\r\nX-Evil: 1"}, "invalid_text"),
    ({"id": "big-meta", "metadata": {"blob": "x" * MAX_METADATA_BYTES}}, "invalid_metadata"),
    ({"id": "list-meta", "metadata": ["not", "an", "object"]}, "invalid_metadata"),
]


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_metadata_is_capped_in_size_and_depth_and_refuses_nul() -> None:
    assert check_metadata(None) == {}
    assert check_metadata(_nested(MAX_METADATA_DEPTH)) == _nested(MAX_METADATA_DEPTH)
    with pytest.raises(InvalidMetadata, match="deeper"):
        check_metadata(_nested(MAX_METADATA_DEPTH + 1))
    just_fits = {"b": "x" * (MAX_METADATA_BYTES - len('{"b":""}'))}
    assert check_metadata(just_fits) is just_fits
    with pytest.raises(InvalidMetadata, match="bytes"):
        check_metadata({"b": "x" * (MAX_METADATA_BYTES - len('{"b":""}') + 1)})
    with pytest.raises(InvalidMetadata, match="NUL"):
        check_metadata({"a": [{"b": NUL}]})
    with pytest.raises(BadRequest, match="unknown field"):
        check_create_body({"labels": "x"})


@pytest.mark.parametrize(("body", "code"), BAD_CREATES, ids=[b["id"] for b, _ in BAD_CREATES])
async def test_bad_create_input_is_a_400_with_no_side_effect(
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    body: dict[str, Any],
    code: str,
) -> None:
    client = await start_worker()
    workspaces = await pg_pool.fetchval("SELECT count(*) FROM workspaces")
    resp = await client.post("/v1/sessions", json=body)
    answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["error"]["code"] == code, answer
    assert await pg_pool.fetchval("SELECT count(*) FROM whatsapp_accounts") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM workspaces") == workspaces
    session_keys = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}*{body['id']}*")]
    assert session_keys == []
    manager = manager_of(client)
    assert manager.sessions == {}
    assert manager.launcher.launched_total == 0


async def test_nul_in_a_workspace_query_is_a_400_not_a_500(start_worker: WorkerFactory) -> None:
    client = await start_worker()
    for path in ("/v1/accounts", "/v1/events"):
        resp = await client.get(path, params={"workspace_id": f"ws{NUL}"})
        assert resp.status == 400, (path, await resp.text())
        assert (await resp.json())["error"]["code"] == "invalid_text"


async def test_a_push_name_with_a_nul_still_links_and_is_stored_without_it(
    sim: Sim, start_worker: WorkerFactory, pg_pool: asyncpg.Pool
) -> None:
    """The phone's owner chooses the push name: walink cannot refuse it, so it stores it without NULs."""
    client = await start_worker()
    sid = (await create(client))["id"]
    stream = await events(client, sid)
    try:
        await sim.scan_linking(stream, "14155550177", push_name=f"An{NUL}a")
        ready = await stream.until("session_ready")
    finally:
        stream.close()
    assert ready["push_name"] == "Ana"
    assert (await get_json(client, f"/v1/sessions/{sid}"))["push_name"] == "Ana"
    row = await pg_pool.fetchrow("SELECT session_status, push_name FROM whatsapp_accounts WHERE id = $1", sid)
    assert row is not None and (row["session_status"], row["push_name"]) == ("ready", "Ana")
