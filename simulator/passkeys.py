"""Passkeys of the simulated accounts, and the WebAuthn assertion the 2026 page asks for.

A phone registers a passkey (``POST /phone/passkey``): a P-256 public key (SPKI DER, base64url)
and a credential id, or the simulator makes a key pair and hands the private key (PKCS#8,
base64url) back so that a test can load it into a virtual authenticator. When an account with a
passkey is scanned (profile knob ``passkey``), the server issues a random challenge with a
lifetime (``passkey_ttl_ms``) and links the device only on an assertion that verifies strictly,
as a WebAuthn relying party must (https://www.w3.org/TR/webauthn-3/#sctn-verifying-assertion):
``type`` ``webauthn.get``, the challenge, the origin, the rpId hash, the UP and UV flags, an
ES256 signature over ``authenticatorData || SHA-256(clientDataJSON)`` with the registered key, a
registered credential id, and a signature counter that moves forward.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

RP_ID = "whatsapp.com"
ORIGIN = "https://web.whatsapp.com"
CHALLENGE_BYTES = 32
FLAG_UP = 0x01
FLAG_UV = 0x04
MAX_FIELD_CHARS = 8192


class PasskeyError(Exception):
    """An assertion (or registration) the server refuses: ``status``, ``code``, ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: object, what: str) -> bytes:
    if not isinstance(text, str) or not text or len(text) > MAX_FIELD_CHARS:
        raise PasskeyError(400, "invalid_assertion", f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise PasskeyError(400, "invalid_assertion", f"{what} is not base64url") from exc


@dataclass(slots=True)
class Credential:
    credential_id: bytes
    public_key: ec.EllipticCurvePublicKey
    user_handle: bytes
    sign_count: int = 0


@dataclass(slots=True)
class Challenge:
    """An assertion the server waits for from one page (device)."""

    phone: str
    challenge: bytes
    expires_at: float
    credential_ids: list[bytes] = field(default_factory=list)

    def request(self, ttl_ms: int) -> dict[str, Any]:
        """What the page passes to ``navigator.credentials.get({publicKey})`` (base64url fields)."""
        return {
            "challenge": b64url(self.challenge),
            "rp_id": RP_ID,
            "allow_credentials": [b64url(c) for c in self.credential_ids],
            "timeout_ms": ttl_ms,
            "user_verification": "required",
        }


class Passkeys:
    """The phones' registered passkeys and the challenges pending on pages."""

    def __init__(self) -> None:
        self.by_phone: dict[str, list[Credential]] = {}
        self.pending: dict[str, Challenge] = {}
        """device id -> the challenge its page must answer."""

    def clear(self) -> None:
        self.by_phone.clear()
        self.pending.clear()

    def register(self, phone: str, credential_id: str | None, public_key: str | None) -> dict[str, Any]:
        """Register a passkey for ``phone``; without ``public_key`` a key pair is made and the
        private key returned (PKCS#8 DER, base64url) with the public one."""
        private_b64: str | None = None
        if public_key is None:
            private = ec.generate_private_key(ec.SECP256R1())
            key = private.public_key()
            der = private.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            private_b64 = b64url(der)
        else:
            try:
                loaded = serialization.load_der_public_key(unb64url(public_key, "public_key"))
            except (PasskeyError, ValueError) as exc:
                raise PasskeyError(
                    400, "invalid_request", "public_key must be a P-256 SPKI DER, base64url"
                ) from exc
            if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
                raise PasskeyError(400, "invalid_request", "public_key must be a P-256 (ES256) key")
            key = loaded
        raw_id = (
            unb64url(credential_id, "credential_id") if credential_id is not None else secrets.token_bytes(16)
        )
        if len(raw_id) > 1023:
            raise PasskeyError(400, "invalid_request", "credential_id is longer than 1023 bytes")
        user_handle = hashlib.sha256(phone.encode()).digest()[:16]
        creds = [c for c in self.by_phone.get(phone, []) if c.credential_id != raw_id]
        creds.append(Credential(raw_id, key, user_handle))
        self.by_phone[phone] = creds
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        out: dict[str, Any] = {
            "phone": phone,
            "credential_id": b64url(raw_id),
            "public_key": b64url(spki),
            "user_handle": b64url(user_handle),
            "rp_id": RP_ID,
        }
        if private_b64 is not None:
            out["private_key"] = private_b64
        return out

    def has_passkey(self, phone: str) -> bool:
        return bool(self.by_phone.get(phone))

    def issue(self, device_id: str, phone: str, ttl_ms: int) -> Challenge:
        challenge = Challenge(
            phone,
            secrets.token_bytes(CHALLENGE_BYTES),
            time.monotonic() + ttl_ms / 1000,
            [c.credential_id for c in self.by_phone.get(phone, [])],
        )
        self.pending[device_id] = challenge
        return challenge

    def verify(self, device_id: str, body: dict[str, Any]) -> str:
        """Check the page's assertion (``AuthenticationResponseJSON``); the phone it links. The
        challenge is spent whatever the verdict (one assertion per challenge)."""
        pending = self.pending.pop(device_id, None)
        if pending is None:
            raise PasskeyError(409, "no_pending_passkey", "this page was not asked for a passkey")
        if time.monotonic() > pending.expires_at:
            raise PasskeyError(410, "passkey_expired", "the passkey challenge expired before the assertion")
        response = body.get("response")
        if not isinstance(response, dict) or body.get("type") != "public-key":
            raise PasskeyError(400, "invalid_assertion", "not a public-key credential")
        raw_id = unb64url(body.get("rawId") or body.get("id"), "rawId")
        client_data_raw = unb64url(response.get("clientDataJSON"), "clientDataJSON")
        auth_data = unb64url(response.get("authenticatorData"), "authenticatorData")
        signature = unb64url(response.get("signature"), "signature")
        cred = next((c for c in self.by_phone.get(pending.phone, []) if c.credential_id == raw_id), None)
        if cred is None or raw_id not in pending.credential_ids:
            raise PasskeyError(403, "passkey_invalid", "unknown credential for this account")
        try:
            client_data = json.loads(client_data_raw)
        except ValueError as exc:
            raise PasskeyError(400, "invalid_assertion", "clientDataJSON is not JSON") from exc
        if not isinstance(client_data, dict) or client_data.get("type") != "webauthn.get":
            raise PasskeyError(403, "passkey_invalid", "clientDataJSON.type is not webauthn.get")
        if not secrets.compare_digest(str(client_data.get("challenge", "")), b64url(pending.challenge)):
            raise PasskeyError(403, "passkey_invalid", "the assertion is for another challenge")
        if client_data.get("origin") != ORIGIN:
            raise PasskeyError(
                403, "passkey_invalid", f"origin {client_data.get('origin')!r} is not {ORIGIN}"
            )
        if client_data.get("crossOrigin") is True:
            raise PasskeyError(403, "passkey_invalid", "the assertion was made cross-origin")
        if len(auth_data) < 37 or auth_data[:32] != hashlib.sha256(RP_ID.encode()).digest():
            raise PasskeyError(403, "passkey_invalid", "authenticatorData is not for rpId whatsapp.com")
        flags = auth_data[32]
        if not flags & FLAG_UP or not flags & FLAG_UV:
            raise PasskeyError(403, "passkey_invalid", "user presence and verification are required")
        signed = auth_data + hashlib.sha256(client_data_raw).digest()
        try:
            cred.public_key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise PasskeyError(403, "passkey_invalid", "the signature does not verify") from exc
        count = int.from_bytes(auth_data[33:37], "big")
        if (count or cred.sign_count) and count <= cred.sign_count:
            raise PasskeyError(403, "passkey_invalid", "the signature counter went back (a cloned key?)")
        cred.sign_count = count
        return pending.phone
