"""The simulator's passkey check (no browser): only a strictly valid assertion links."""

from __future__ import annotations

import time
from typing import Any

import pytest

from simulator.passkeys import PasskeyError, Passkeys
from simulator.profiles import PROFILES
from simulator.state import SimState
from tests.webauthn import assertion, new_private_key

PHONE = "447911123456"
DEVICE = "device-0001"


def _registered() -> tuple[Passkeys, dict[str, Any]]:
    keys = Passkeys()
    reg = keys.register(PHONE, None, None)
    return keys, reg


def _challenge(keys: Passkeys, ttl_ms: int = 60_000) -> str:
    return str(keys.issue(DEVICE, PHONE, ttl_ms).request(ttl_ms)["challenge"])


def test_a_valid_assertion_links_the_phone() -> None:
    keys, reg = _registered()
    challenge = _challenge(keys)
    assert keys.verify(DEVICE, assertion(reg["private_key"], reg["credential_id"], challenge)) == PHONE
    with pytest.raises(PasskeyError) as again:  # the challenge is spent
        keys.verify(DEVICE, assertion(reg["private_key"], reg["credential_id"], challenge, sign_count=2))
    assert (again.value.status, again.value.code) == (409, "no_pending_passkey")


def test_a_registered_public_key_is_used() -> None:
    _keys, reg = _registered()
    other = Passkeys()
    given = other.register(PHONE, "Y3JlZC0x", reg["public_key"])
    assert given["credential_id"] == "Y3JlZC0x" and "private_key" not in given
    chal = _challenge(other)
    assert other.verify(DEVICE, assertion(reg["private_key"], "Y3JlZC0x", chal)) == PHONE


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"origin": "https://evil.example"}, "passkey_invalid"),
        ({"rp_id": "example.com"}, "passkey_invalid"),
        ({"flags": 0x01}, "passkey_invalid"),  # no user verification
        ({"flags": 0x04}, "passkey_invalid"),  # no user presence
        ({"kind": "webauthn.create"}, "passkey_invalid"),
    ],
)
def test_a_bad_assertion_is_refused(change: dict[str, Any], code: str) -> None:
    keys, reg = _registered()
    challenge = _challenge(keys)
    with pytest.raises(PasskeyError) as refused:
        keys.verify(DEVICE, assertion(reg["private_key"], reg["credential_id"], challenge, **change))
    assert (refused.value.status, refused.value.code) == (403, code)


def test_wrong_key_wrong_challenge_unknown_credential() -> None:
    keys, reg = _registered()
    cases: list[tuple[str, str, str, str]] = [
        (new_private_key(), reg["credential_id"], "", "the signature does not verify"),
        (
            reg["private_key"],
            reg["credential_id"],
            "c3RhbGUtY2hhbGxlbmdl",
            "the assertion is for another challenge",
        ),
        (reg["private_key"], "b3RoZXItaWQ", "", "unknown credential for this account"),
    ]
    for key, cred_id, stale, message in cases:
        challenge = _challenge(keys)
        with pytest.raises(PasskeyError) as refused:
            keys.verify(DEVICE, assertion(key, cred_id, stale or challenge))
        assert (refused.value.status, refused.value.message) == (403, message)


def test_a_late_assertion_fails_expired() -> None:
    keys, reg = _registered()
    challenge = _challenge(keys)
    keys.pending[DEVICE].expires_at = time.monotonic() - 0.001  # its lifetime is over
    with pytest.raises(PasskeyError) as late:
        keys.verify(DEVICE, assertion(reg["private_key"], reg["credential_id"], challenge))
    assert (late.value.status, late.value.code) == (410, "passkey_expired")


def test_a_counter_that_goes_back_is_refused() -> None:
    keys, reg = _registered()
    assert keys.verify(
        DEVICE, assertion(reg["private_key"], reg["credential_id"], _challenge(keys), sign_count=5)
    )
    with pytest.raises(PasskeyError) as cloned:
        keys.verify(
            DEVICE, assertion(reg["private_key"], reg["credential_id"], _challenge(keys), sign_count=5)
        )
    assert "counter" in cloned.value.message


def test_malformed_assertions_are_400() -> None:
    keys, _reg = _registered()
    for body in (
        {"type": "public-key"},
        {"type": "x", "response": {}},
        {"type": "public-key", "rawId": "!!", "response": {}},
    ):
        _challenge(keys)
        with pytest.raises(PasskeyError) as bad:
            keys.verify(DEVICE, body)
        assert bad.value.status == 400


def test_a_public_key_that_is_not_p256_is_refused() -> None:
    with pytest.raises(PasskeyError) as bad:
        Passkeys().register(PHONE, None, "bm90LWEta2V5")
    assert (bad.value.status, bad.value.code) == (400, "invalid_request")


def test_only_strict_asks_for_the_passkey_and_links_only_after_it() -> None:
    for name, asks in (("instant", False), ("strict", True)):
        state = SimState(PROFILES[name])
        reg = state.register_passkey(PHONE, None, None)
        client = state.client(DEVICE)
        linked = state._link(client, PHONE, None)
        assert linked["passkey"] is asks
        assert (DEVICE in state.devices) is not asks  # strict: not linked before the assertion
        if asks:
            challenge = str(client.events[-1]["passkey"]["challenge"])
            body = assertion(reg["private_key"], reg["credential_id"], challenge)
            assert state.verify_passkey(DEVICE, body) == {"ok": True, "phone": PHONE}
            assert DEVICE in state.devices
