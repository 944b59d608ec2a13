"""Session states, their allowed transitions, and the events a session emits."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SessionStatus(enum.StrEnum):
    STARTING = "starting"
    QR = "qr"
    AUTHENTICATED = "authenticated"
    PASSKEY_REQUIRED = "passkey_required"
    READY = "ready"
    HIBERNATED = "hibernated"
    LOGGED_OUT = "logged_out"
    EXPIRED = "expired"
    FAILED = "failed"
    DELETED = "deleted"


S = SessionStatus

ENDED: frozenset[SessionStatus] = frozenset({S.LOGGED_OUT, S.EXPIRED, S.FAILED, S.DELETED})
LINKING: frozenset[SessionStatus] = frozenset({S.STARTING, S.QR, S.AUTHENTICATED, S.PASSKEY_REQUIRED})

TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    S.STARTING: frozenset({S.QR, S.AUTHENTICATED, S.READY, S.LOGGED_OUT, S.FAILED, S.DELETED}),
    S.QR: frozenset(
        {S.STARTING, S.AUTHENTICATED, S.PASSKEY_REQUIRED, S.EXPIRED, S.FAILED, S.LOGGED_OUT, S.DELETED}
    ),
    S.AUTHENTICATED: frozenset({S.STARTING, S.PASSKEY_REQUIRED, S.READY, S.FAILED, S.LOGGED_OUT, S.DELETED}),
    S.PASSKEY_REQUIRED: frozenset({S.STARTING, S.AUTHENTICATED, S.READY, S.FAILED, S.LOGGED_OUT, S.DELETED}),
    S.READY: frozenset({S.STARTING, S.HIBERNATED, S.LOGGED_OUT, S.FAILED, S.DELETED}),
    S.HIBERNATED: frozenset({S.STARTING, S.LOGGED_OUT, S.FAILED, S.DELETED}),
    S.LOGGED_OUT: frozenset({S.STARTING, S.DELETED}),
    S.EXPIRED: frozenset({S.STARTING, S.DELETED}),
    S.FAILED: frozenset({S.STARTING, S.DELETED}),
    S.DELETED: frozenset(),
}


class Reason(enum.StrEnum):
    """Why a transition happened. Stable strings: clients and dashboards match on them."""

    CREATED = "created"
    RESTORING = "restoring"
    RESTART = "restart"
    WARM_POOL = "warm_pool"
    COLD_START = "cold_start"
    QR_SHOWN = "qr_shown"
    SCANNED = "scanned"
    PAIRING_CODE = "pairing_code"
    SYNCED = "synced"
    LINKED = "linked"
    RESTORED = "restored"
    PASSKEY = "passkey_prompt"
    QR_TIMEOUT = "qr_timeout"
    PHONE_LOGOUT = "phone_logout"
    API_LOGOUT = "api_logout"
    CLIENT_FATAL = "client_fatal"
    SYNC_FAILED = "sync_failed"
    HISTORY_SYNC_TIMEOUT = "history_sync_timeout"
    ACCOUNT_LOCKED = "account_locked"
    CONFLICT = "conflict"
    DEPRECATED_VERSION = "deprecated_version"
    TOS_BLOCK = "tos_block"
    PROXYBLOCK = "proxyblock"
    START_TIMEOUT = "start_timeout"
    LINK_TIMEOUT = "link_timeout"
    PASSKEY_TIMEOUT = "passkey_timeout"
    PASSKEY_INVALID = "passkey_invalid"
    """WhatsApp refused the passkey assertion (wrong key, challenge, origin or flags)."""
    PASSKEY_EXPIRED = "passkey_expired"
    """The assertion reached WhatsApp after its challenge had expired."""
    PASSKEY_CANCELLED = "passkey_cancelled"
    """The page's passkey request ended without an assertion (NotAllowedError)."""
    PHONE_UNAVAILABLE = "phone_unavailable"
    BROWSER_CRASHED = "browser_crashed"
    BROWSER_LAUNCH_FAILED = "browser_launch_failed"
    SHUTDOWN = "shutdown"
    DELETED = "deleted"
    WAKE = "wake"
    IDLE = "idle"
    LRU = "lru"
    REPLACED = "replaced"
    LEASE_LOST = "lease_lost"
    KEEPALIVE = "keepalive"
    """Hibernated again after a keep-alive wake (its page connected: the device's use counted)."""
    DEVICE_EXPIRED = "device_expired"
    """WhatsApp logged the device out because it went unused too long (``session_disconnected``)."""


class EventType(enum.StrEnum):
    """Event types as written to the outbox. Webhooks get all but ``status``; SSE gets all, with
    ``qr_code_generated`` named ``qr`` on the stream."""

    STATUS = "status"
    QR = "qr_code_generated"
    SESSION_AUTHENTICATED = "session_authenticated"
    SESSION_READY = "session_ready"
    SESSION_SYNCED = "session_synced"
    SESSION_DISCONNECTED = "session_disconnected"
    SESSION_FAILED = "session_failed"
    PASSKEY_PROMPT = "passkey_prompt"
    """The page asks for a passkey: the request and a one-time token (``shared.passkeys``)."""
    SESSION_AT_RISK = "session_at_risk"
    """``{last_used_at_ms, expires_at_ms}``: unused for 80 % of the device TTL walink assumes."""


# SSE-only notices (no ``id:``, not in the outbox, no webhook)
QR_PENDING = "qr_pending"
"""``{session_id, position, eta_ms}``: the session's browser waits for a place in the machine's
launch budget (1: next to start); sent each time the position changes, and on connect."""


def sse_name(event_type: str) -> str:
    return "qr" if event_type == EventType.QR else event_type


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Transition:
    status: SessionStatus
    reason: str
    at_ms: int = field(default_factory=now_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "reason": self.reason, "at_ms": self.at_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transition:
        return cls(SessionStatus(data["status"]), str(data["reason"]), int(data["at_ms"]))


@dataclass(slots=True)
class SessionEvent:
    """A committed event of one session (its ``seq`` is the outbox's per-session sequence)."""

    seq: int
    type: str
    data: dict[str, Any]
    at_ms: int = field(default_factory=now_ms)
    event_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "type": self.type,
            "event_id": self.event_id,
            "at_ms": self.at_ms,
            **self.data,
        }
