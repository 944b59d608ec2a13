"""Webhook bodies and their signature.

Every webhook is a JSON body signed with the workspace's secret::

    X-Walink-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

Receivers check it with :func:`verify` (or the same few lines in their own language): recompute
the HMAC over the exact bytes received, compare in constant time, and refuse a timestamp older
than a few minutes so a captured request cannot be replayed later. Several ``v1=`` entries may
appear in one header: after a rotation (``POST /v1/webhook/secret``) deliveries carry
``t=<t>,v1=<HMAC with the new secret>,v1=<HMAC with the old one>`` for
``WALINK_WEBHOOK_SECRET_OVERLAP_S``; one match is enough. Secrets are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

SIGNATURE_HEADER = "X-Walink-Signature"
EVENT_HEADER = "X-Walink-Event"
EVENT_ID_HEADER = "X-Walink-Event-Id"
USER_AGENT = "walink-webhooks/1"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0

_MAX_HEADER_LEN = 2048  # a real header is ~80 characters; anything huge is refused unparsed
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
_HEX_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def sign(
    secret: str, body: bytes, *, timestamp: int | None = None, previous_secrets: Sequence[str] = ()
) -> str:
    """The ``X-Walink-Signature`` value of ``body``, signed now (or at ``timestamp``, unix seconds).

    While a rotation's overlap lasts, the previous secret signs too: ``t=<t>,v1=<new>,v1=<old>``
    (the current secret's entry first), so receivers that still hold the old secret keep verifying.
    """
    t = int(time.time()) if timestamp is None else int(timestamp)
    entries = [f"{SIGNATURE_VERSION}={_mac(s, t, body)}" for s in (secret, *previous_secrets)]
    return ",".join([f"t={t}", *entries])


def _parse(header: str) -> tuple[int, list[str]] | None:
    timestamp: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            if timestamp is not None or not _TIMESTAMP_RE.fullmatch(value):
                return None
            timestamp = int(value)
        elif key == SIGNATURE_VERSION:
            if not _HEX_SHA256_RE.fullmatch(value):
                return None
            macs.append(value.lower())
        # other keys (future versions) are ignored, so receivers keep working when one is added
    if timestamp is None or not macs:
        return None
    return timestamp, macs


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``header`` is a valid signature of ``body`` with ``secret``, made within ``tolerance_s``.

    Never raises: a malformed header, a stale (or far-future) timestamp, another secret or a changed
    body all give False. The comparison runs in constant time.
    """
    untrusted: tuple[object, object, object] = (secret, body, header)  # callers may pass anything
    if not (
        isinstance(untrusted[0], str) and isinstance(untrusted[1], bytes) and isinstance(untrusted[2], str)
    ):
        return False
    if not header or len(header) > _MAX_HEADER_LEN:
        return False
    parsed = _parse(header)
    if parsed is None:
        return False
    timestamp, macs = parsed
    current_s = time.time() if now is None else now
    if abs(current_s - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode()
    ok = False
    for candidate in macs:  # every candidate is compared: no early exit that would leak which matched
        ok |= hmac.compare_digest(expected, candidate.encode())
    return ok


def delivery_headers(
    *,
    secret: str,
    body: bytes,
    event_type: str,
    event_id: str,
    timestamp: int | None = None,
    previous_secrets: Sequence[str] = (),
) -> dict[str, str]:
    """The headers of one delivery attempt (signed at the time of the call, by every secret given)."""
    return {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, body, timestamp=timestamp, previous_secrets=previous_secrets),
        EVENT_HEADER: event_type,
        EVENT_ID_HEADER: event_id,
        "User-Agent": USER_AGENT,
    }


def build_payload(
    *,
    event_id: str,
    type: str,
    seq: int,
    session_id: str,
    workspace_id: str,
    occurred_at_ms: int,
    metadata: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The webhook JSON body: stored in the outbox as is, POSTed as ``orjson`` writes it."""
    return {
        "event_id": event_id,
        "event": type,
        "seq": seq,
        "session_id": session_id,
        "workspace_id": workspace_id,
        "occurred_at_ms": occurred_at_ms,
        "metadata": dict(metadata or {}),
        "data": dict(data or {}),
    }
