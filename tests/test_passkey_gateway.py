"""Passkey routes through the gateway: ``POST /v1/sessions/{id}/passkey`` keeps tenancy, the
token routes need no API key and are routed to the session's owner by the token alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.proxy import WORKER_HEADER
from tests.test_gateway import Cluster, _create, _events, _json, _scan, start_cluster
from tests.webauthn import assertion

pytestmark = pytest.mark.chromium
__all__ = ["start_cluster"]  # the fixture, used by name

PHONE = "447911123456"


async def test_passkey_through_the_gateway(start_cluster: Callable[[int], Any]) -> None:
    c: Cluster = await start_cluster(1)
    gw = c.gateway
    async with (
        aiohttp.ClientSession() as http,
        http.post(c.sim_url + "/phone/passkey", json={"phone": PHONE}) as resp,
    ):
        reg = await _json(resp, 201)
    created, _owner = await _create(c)
    sid = created["id"]
    stream = await _events(c, sid)
    await _scan(c, stream, PHONE)
    prompt = await stream.until("passkey_prompt")
    token = prompt["passkey_token"]
    signed = assertion(reg["private_key"], reg["credential_id"], prompt["challenge"])

    other = await gw.post(f"/v1/sessions/{sid}/passkey", json=signed, headers=c.auth("b"))
    assert other.status == 404  # another workspace's session: not found
    no_key = await gw.post(f"/v1/sessions/{sid}/passkey", json=signed)
    assert no_key.status == 401
    got = await gw.get(f"/v1/passkey/{token}")  # no API key: the token authorises
    body = await _json(got, 200)
    assert body["public_key"]["challenge"] == prompt["challenge"]
    assert WORKER_HEADER not in got.headers
    unknown = await gw.get("/v1/passkey/not-a-token")
    assert (await _json(unknown, 404))["error"]["code"] == "passkey_token_unknown"

    answered = await gw.post(f"/v1/passkey/{token}", json=signed)
    verdict = await _json(answered, 200)
    assert verdict["id"] == sid
    ready = await stream.until("session_ready")
    assert ready["phone_number"] == PHONE
    used = await gw.post(f"/v1/passkey/{token}", json=signed)
    assert (await _json(used, 410))["error"]["code"] == "passkey_token_used"
    stream.close()
