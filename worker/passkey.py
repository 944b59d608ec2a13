"""A passkey request of a session's page, and the assertions answered to it.

The page's ``navigator.credentials.get`` is wrapped (``worker.whatsapp_web.PASSKEY_INIT_SCRIPT``):
the request options arrive as a ``passkey_request`` page event in the WebAuthn JSON shape
(``PublicKeyCredentialRequestOptionsJSON``), and an assertion (``AuthenticationResponseJSON``)
sent to walink resolves the page's call. walink does not verify the signature (WhatsApp's server
does): it checks the shape, the challenge and the time, so that a wrong answer is refused clearly
before it can spend the page's one attempt.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from typing import Any

import orjson

from shared.errors import InvalidPasskeyAssertion

_B64URL = re.compile(r"[A-Za-z0-9_-]{1,8192}")
_MAX_ID_CHARS = 1400
MAX_ASSERTION_BYTES = 32_768
DEFAULT_TIMEOUT_MS = 300_000


@dataclass(slots=True)
class PendingPasskey:
    """The page waits for an assertion to this request."""

    options: dict[str, Any]
    expires_at_ms: int
    token_digest: bytes
    used: bool = False

    def public(self) -> dict[str, Any]:
        """``GET /v1/sessions/{id}``'s ``passkey``: the request (the token is only in the event)."""
        return {"public_key": self.options, "expires_at_ms": self.expires_at_ms, "answered": self.used}


def _b64url(value: object, what: str) -> str:
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        raise InvalidPasskeyAssertion(f"{what} must be a base64url string (no padding)")
    return value


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidPasskeyAssertion(f"{what} is not base64url") from exc


def options_from_page(data: object) -> dict[str, Any] | None:
    """The page's request as ``PublicKeyCredentialRequestOptionsJSON``, or None if unusable."""
    if not isinstance(data, dict):
        return None
    challenge, rp_id = data.get("challenge"), data.get("rpId")
    if not isinstance(challenge, str) or not _B64URL.fullmatch(challenge) or not isinstance(rp_id, str):
        return None
    allow = []
    for item in data.get("allowCredentials") or []:
        if isinstance(item, dict) and isinstance(item.get("id"), str) and _B64URL.fullmatch(item["id"]):
            allow.append({"type": "public-key", "id": item["id"]})
    timeout = data.get("timeout")
    verification = data.get("userVerification")
    return {
        "challenge": challenge,
        "rpId": rp_id[:253],
        "allowCredentials": allow,
        "userVerification": verification
        if verification in {"required", "preferred", "discouraged"}
        else "preferred",
        "timeout": int(timeout) if isinstance(timeout, int | float) and 0 < timeout <= 86_400_000 else None,
    }


@dataclass(frozen=True, slots=True)
class Assertion:
    """A checked ``AuthenticationResponseJSON`` and the challenge its client data names."""

    json: dict[str, Any]
    challenge: str


def check_assertion(body: dict[str, Any]) -> Assertion:
    """The assertion in ``body`` (400 ``invalid_passkey_assertion`` if it is not one)."""
    if body.get("type") != "public-key":
        raise InvalidPasskeyAssertion("type must be 'public-key'")
    raw_id = _b64url(body.get("rawId", body.get("id")), "rawId")
    cred_id = body.get("id", raw_id)
    if not isinstance(cred_id, str) or len(cred_id) > _MAX_ID_CHARS or cred_id != raw_id:
        raise InvalidPasskeyAssertion("id must equal rawId (base64url)")
    response = body.get("response")
    if not isinstance(response, dict):
        raise InvalidPasskeyAssertion("response must be an object")
    client_data = _b64url(response.get("clientDataJSON"), "response.clientDataJSON")
    auth_data = _b64url(response.get("authenticatorData"), "response.authenticatorData")
    signature = _b64url(response.get("signature"), "response.signature")
    handle = response.get("userHandle")
    if handle is not None:
        _b64url(handle, "response.userHandle")
    if len(_decode(auth_data, "authenticatorData")) < 37:
        raise InvalidPasskeyAssertion("response.authenticatorData is shorter than 37 bytes")
    try:
        parsed = orjson.loads(_decode(client_data, "clientDataJSON"))
    except orjson.JSONDecodeError as exc:
        raise InvalidPasskeyAssertion("response.clientDataJSON is not JSON") from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("challenge"), str):
        raise InvalidPasskeyAssertion("response.clientDataJSON names no challenge")
    attachment = body.get("authenticatorAttachment")
    if attachment is not None and attachment not in {"platform", "cross-platform"}:
        raise InvalidPasskeyAssertion("authenticatorAttachment must be platform or cross-platform")
    extensions = body.get("clientExtensionResults", {})
    if not isinstance(extensions, dict):
        raise InvalidPasskeyAssertion("clientExtensionResults must be an object")
    clean = {
        "id": raw_id,
        "rawId": raw_id,
        "type": "public-key",
        "authenticatorAttachment": attachment,
        "clientExtensionResults": extensions,
        "response": {
            "clientDataJSON": client_data,
            "authenticatorData": auth_data,
            "signature": signature,
            "userHandle": handle,
        },
    }
    return Assertion(clean, str(parsed["challenge"]))


def same_challenge(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
