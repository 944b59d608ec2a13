"""Passkey linking on the wire: what gateway, worker, the extension and clients share.

A session of an account that WhatsApp asks for a passkey goes ``passkey_required``; its event
``passkey_prompt`` (SSE, webhook, ``GET /v1/sessions/{id}`` as ``passkey``) carries the page's
WebAuthn request and a one-time ``passkey_token`` scoped to that session and that challenge.
The token is ``<session id>~<random>`` so that the gateway can route it to the session's owner
without a lookup; the random part is what authorises (compared as a SHA-256 digest in constant
time). See ``docs/passkey.md``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Any

import orjson

from shared.errors import PasskeyTokenUnknown
from shared.ids import SESSION_ID_RE

TOKEN_SEPARATOR = "~"  # noqa: S105 (a separator, not a secret)
TOKEN_RANDOM_BYTES = 24
TOKEN_PATH = "/v1/passkey/{token}"  # noqa: S105 (a route)
"""The token-scoped routes (no API key): ``GET`` the request options, ``POST`` the assertion."""
LINK_FRAGMENT = "walink-passkey"
"""``https://web.whatsapp.com/#walink-passkey=<base64url(JSON {"u": walink URL, "t": token})>``:
the page the extension acts on."""
WHATSAPP_ORIGIN = "https://web.whatsapp.com"
MAX_TOKEN_CHARS = 128
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

# payload keys of the passkey_prompt event and of GET /v1/passkey/{token}
KEY_CHALLENGE = "challenge"
KEY_RP_ID = "rp_id"
KEY_ALLOW = "allow_credentials"
KEY_TIMEOUT_MS = "timeout_ms"
KEY_USER_VERIFICATION = "user_verification"
KEY_EXPIRES_AT_MS = "expires_at_ms"
KEY_TOKEN = "passkey_token"  # noqa: S105 (a payload key)
KEY_LINK = "passkey_link"
KEY_OPTIONS = "public_key"
"""The request as ``PublicKeyCredentialRequestOptionsJSON`` (what ``PublicKeyCredential.
parseRequestOptionsFromJSON`` takes)."""


def new_token(session_id: str) -> tuple[str, bytes]:
    """A fresh token for ``session_id`` and the digest to keep (the token itself is not kept)."""
    token = f"{session_id}{TOKEN_SEPARATOR}{secrets.token_urlsafe(TOKEN_RANDOM_BYTES)}"
    return token, digest(token)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_matches(token: str, kept_digest: bytes) -> bool:
    return hmac.compare_digest(digest(token), kept_digest)


def session_of_token(token: str) -> str:
    """The session a token names; :class:`PasskeyTokenUnknown` (404) for anything else."""
    session_id, sep, secret = token.rpartition(TOKEN_SEPARATOR)
    well_formed = sep and _SECRET_RE.fullmatch(secret) and SESSION_ID_RE.fullmatch(session_id)
    if len(token) > MAX_TOKEN_CHARS or not well_formed:
        raise PasskeyTokenUnknown("no passkey request has this token")
    return session_id


def link(public_url: str, token: str) -> str:
    """The link the user opens in the browser that has the passkey (with the extension)."""
    blob = base64.urlsafe_b64encode(orjson.dumps({"u": public_url.rstrip("/"), "t": token}))
    return f"{WHATSAPP_ORIGIN}/#{LINK_FRAGMENT}={blob.rstrip(b'=').decode()}"


def prompt_payload(
    options: dict[str, Any], expires_at_ms: int, token: str, public_url: str
) -> dict[str, Any]:
    """The ``passkey_prompt`` event's data."""
    return {
        KEY_CHALLENGE: options["challenge"],
        KEY_RP_ID: options.get("rpId"),
        KEY_ALLOW: [c["id"] for c in options.get("allowCredentials", [])],
        KEY_TIMEOUT_MS: options.get("timeout"),
        KEY_USER_VERIFICATION: options.get("userVerification"),
        KEY_EXPIRES_AT_MS: expires_at_ms,
        KEY_OPTIONS: options,
        KEY_TOKEN: token,
        KEY_LINK: link(public_url, token),
    }
