"""Passkey linking through a worker (real Chromium, the simulator's page, Postgres, Redis): the
session goes ``passkey_required`` with the page's request, walink refuses what is not an answer
to it, and WhatsApp's verdict on an assertion becomes the session's state."""

from __future__ import annotations

from typing import Any

import pytest

from shared import passkeys as wire
from tests.conftest import EventStream, Sim, WorkerFactory, create, events, get_json, manager_of
from tests.webauthn import assertion, new_private_key

pytestmark = pytest.mark.chromium

PHONE = "447911123456"


async def until_passkey(client: Any, sim: Sim) -> tuple[str, EventStream, dict[str, Any], dict[str, Any]]:
    """A session of a passkey account, scanned: its id, stream, the prompt and the registration."""
    reg = await sim.post("/phone/passkey", {"phone": PHONE}, expect=201)
    sid = str((await create(client))["id"])
    stream = await events(client, sid)
    await sim.scan_linking(stream, PHONE)
    prompt = await stream.until("passkey_prompt")
    return sid, stream, prompt, reg


async def test_passkey_required_then_a_valid_assertion_links(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid, stream, prompt, reg = await until_passkey(client, sim)
    assert prompt["rp_id"] == "whatsapp.com"
    assert prompt["user_verification"] == "required"
    assert prompt["allow_credentials"] == [reg["credential_id"]]
    assert prompt["public_key"]["challenge"] == prompt["challenge"]
    assert prompt["passkey_token"].startswith(sid + wire.TOKEN_SEPARATOR)
    assert prompt["passkey_link"].startswith(f"{wire.WHATSAPP_ORIGIN}/#{wire.LINK_FRAGMENT}=")
    body = await get_json(client, f"/v1/sessions/{sid}")
    assert body["status"] == "passkey_required"
    assert body["passkey"]["public_key"]["challenge"] == prompt["challenge"]

    signed = assertion(reg["private_key"], reg["credential_id"], prompt["challenge"])
    resp = await client.post(f"/v1/sessions/{sid}/passkey", json=signed)
    verdict = await resp.json()
    assert resp.status == 200, verdict
    assert verdict["status"] in {"authenticated", "ready"}
    ready = await stream.until("session_ready")
    assert ready["phone_number"] == PHONE
    again = await client.post(f"/v1/sessions/{sid}/passkey", json=signed)
    assert (again.status, (await again.json())["error"]["code"]) == (409, "passkey_not_requested")
    stream.close()


async def test_bad_assertions_are_refused_and_a_wrong_key_fails_the_link(
    sim: Sim, start_worker: WorkerFactory
) -> None:
    client = await start_worker()
    sid, stream, prompt, reg = await until_passkey(client, sim)
    url = f"/v1/sessions/{sid}/passkey"

    async def post(body: Any) -> tuple[int, dict[str, Any]]:
        resp = await client.post(url, json=body)
        return resp.status, await resp.json()

    status, body = await post({"type": "public-key", "id": "x", "rawId": "x", "response": {}})
    assert (status, body["error"]["code"]) == (400, "invalid_passkey_assertion")
    stale = assertion(reg["private_key"], reg["credential_id"], "c3RhbGUtY2hhbGxlbmdl")
    status, body = await post(stale)
    assert (status, body["error"]["code"]) == (409, "passkey_challenge_mismatch")
    unknown = await client.post("/v1/sessions/s_nosuchsessionnnnnnnn2/passkey", json=stale)
    assert unknown.status == 404
    # still waiting: the refusals above did not spend the page's one attempt
    assert (await get_json(client, f"/v1/sessions/{sid}"))["status"] == "passkey_required"

    wrong_key = assertion(new_private_key(), reg["credential_id"], prompt["challenge"])
    status, body = await post(wrong_key)
    assert status == 200, body
    assert (body["status"], body["reason"]) == ("failed", "passkey_invalid")
    failed = await stream.until("session_failed")
    assert failed["reason"] == "passkey_invalid"
    assert await sim.devices(PHONE) == []  # WhatsApp did not link the device
    stream.close()


async def test_wrong_origin_fails_the_link(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid, stream, prompt, reg = await until_passkey(client, sim)
    phished = assertion(
        reg["private_key"], reg["credential_id"], prompt["challenge"], origin="https://evil.example"
    )
    resp = await client.post(f"/v1/sessions/{sid}/passkey", json=phished)
    verdict = await resp.json()
    assert (resp.status, verdict["status"], verdict["reason"]) == (200, "failed", "passkey_invalid")
    stream.close()


async def test_no_answer_times_out_with_reason(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker(passkey_timeout_s=1.0)
    _sid, stream, prompt, _reg = await until_passkey(client, sim)
    failed = await stream.until("session_failed")
    assert failed["reason"] == "passkey_timeout"
    token = prompt["passkey_token"]
    late = await client.get(f"/v1/passkey/{token}")
    assert (late.status, (await late.json())["error"]["code"]) == (410, "passkey_expired")
    stream.close()


async def test_token_routes(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid, stream, prompt, reg = await until_passkey(client, sim)
    token = prompt["passkey_token"]
    got = await client.get(f"/v1/passkey/{token}")
    body = await got.json()
    assert got.status == 200, body
    assert body["public_key"]["challenge"] == prompt["challenge"]
    assert body["origin"] == "https://web.whatsapp.com"
    for bad in (token[:-2] + "zz", "nonsense", f"{sid}~" + "A" * 32):
        resp = await client.get(f"/v1/passkey/{bad}")
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "passkey_token_unknown"), bad
    signed = assertion(reg["private_key"], reg["credential_id"], prompt["challenge"])
    answered = await client.post(f"/v1/passkey/{token}", json=signed)
    assert answered.status == 200, await answered.json()
    await stream.until("session_ready")
    used = await client.post(f"/v1/passkey/{token}", json=signed)
    assert (used.status, (await used.json())["error"]["code"]) == (410, "passkey_token_used")
    stream.close()


async def test_the_wrapper_looks_native_to_the_page(sim: Sim, start_worker: WorkerFactory) -> None:
    client = await start_worker()
    sid, stream, _prompt, _reg = await until_passkey(client, sim)
    page = manager_of(client).local(sid).slot.page
    seen = await page.evaluate(
        """() => ({
          text: Function.prototype.toString.call(navigator.credentials.get),
          viaMethod: navigator.credentials.get.toString(),
          toStringText: Function.prototype.toString.toString(),
          name: navigator.credentials.get.name,
          length: navigator.credentials.get.length,
          own: Object.getOwnPropertyNames(navigator.credentials),
          passkeyKeys: Object.getOwnPropertyNames(window).filter((k) => /passkey/i.test(k)),
        })"""
    )
    assert seen["text"] == seen["viaMethod"] == "function get() { [native code] }"
    assert seen["toStringText"] == "function toString() { [native code] }"
    assert (seen["name"], seen["length"], seen["own"]) == ("get", 0, [])
    assert seen["passkeyKeys"] == []  # the controller is under a registered symbol only
    stream.close()
