"""The error hierarchy of walink.

Every error a client can cause is a :class:`WalinkError` with a stable ``code`` and an HTTP
``status``; the HTTP edge (:mod:`shared.web`) turns it into ``{"error": {"code", "message"}}``.
Anything that is not a ``WalinkError`` is a bug and becomes a logged 500.
"""

from __future__ import annotations

import math
from typing import Any


class WalinkError(Exception):
    """Root of every error walink raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"error": {"code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        """HTTP headers of the error's answer (e.g. ``Retry-After``)."""
        return {}


class SettingsError(WalinkError, ValueError):
    """The environment holds a bad or unknown ``WALINK_*`` value."""

    code = "invalid_settings"


class SchemaNotCurrent(WalinkError):
    """The database lacks migrations, and this process may not apply them (``migrate_on_start`` off)."""

    code = "schema_not_current"


class BadRequest(WalinkError, ValueError):
    status = 400
    code = "invalid_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class InvalidSessionId(BadRequest):
    code = "invalid_session_id"


class WebhookUrlRefused(BadRequest):
    """A ``webhook_url`` the SSRF rules refuse when it is set (:mod:`shared.webhook_guard`)."""

    code = "webhook_url_refused"


class SessionIdOutsideWorkspace(InvalidSessionId):
    """A client-chosen session id that is not in the caller's workspace's namespace (``<workspace>.``)."""

    code = "session_id_outside_workspace"


class InvalidWorkspaceId(BadRequest):
    code = "invalid_workspace_id"


class InvalidPhoneNumber(BadRequest):
    code = "invalid_phone_number"


class InvalidText(BadRequest):
    """A string holds a character it may not (a NUL, which Postgres refuses; a control character
    in an id that travels in a header)."""

    code = "invalid_text"


class InvalidMetadata(BadRequest):
    """``metadata`` is not an object, holds a NUL, nests too deep or is too large."""

    code = "invalid_metadata"


class Unauthorized(WalinkError):
    status = 401
    code = "unauthorized"


class NotFound(WalinkError, LookupError):
    status = 404
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class EventNotFound(NotFound):
    code = "event_not_found"


class Conflict(WalinkError):
    status = 409
    code = "conflict"


class SessionExists(Conflict):
    code = "session_exists"


class InvalidState(Conflict):
    """The session is not in a state that allows the operation (e.g. a QR of a ready session)."""

    code = "invalid_state"


class PayloadTooLarge(WalinkError):
    status = 413
    code = "payload_too_large"


class Unavailable(WalinkError):
    """The process cannot take the request now (shutting down, over capacity)."""

    status = 503
    code = "unavailable"


class LeaseUnavailable(Unavailable):
    """No lease can be had now (Redis unreachable, or just back and owners still renewing): a
    session is never taken over, woken or created without one. Retry shortly."""

    code = "lease_unavailable"


class BrowserError(WalinkError):
    """Chromium or the page did not do what it had to (launch failure, crash, page script error)."""

    status = 502
    code = "browser_error"


class BrowserTimeout(BrowserError, TimeoutError):
    code = "browser_timeout"


class StaleOwner(Conflict):
    """A write carried a fencing token older than the session's: another worker owns it now."""

    code = "stale_owner"


class SnapshotInvalid(WalinkError):
    """A profile snapshot failed authentication (tampered, wrong key, other session) or is malformed."""

    status = 422
    code = "snapshot_invalid"


class SnapshotIncomplete(SnapshotInvalid):
    """A live page lacks a database (or localStorage key) its login needs: a snapshot of it would
    restore logged out, so none is stored (the previous one stays)."""

    code = "snapshot_incomplete"


class DatabaseUnavailable(Unavailable):
    """Postgres cannot be reached now: nothing was changed; the same request can be retried."""

    code = "database_unavailable"


# --------------------------------------------------------------------------- limits (docs/limits.md)
class Forbidden(WalinkError):
    """The key is valid but may not do this (e.g. an admin route with a workspace key)."""

    status = 403
    code = "forbidden"


class TooManyRequests(WalinkError):
    """Over a limit: ``429`` with ``Retry-After`` (whole seconds, at least 1) and, in the body, the
    limit and the current use (``error.limit``, ``error.used``, ``error.retry_after_s``)."""

    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, limit: int, used: int, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.used = used
        self.retry_after_s = max(1, math.ceil(retry_after_s))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        body = super().to_dict()
        body["error"] |= {"limit": self.limit, "used": self.used, "retry_after_s": self.retry_after_s}
        return body

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QuotaSessions(TooManyRequests):
    """The workspace has as many live sessions (not ended) as its quota allows."""

    code = "quota_sessions"


class QuotaLinkings(TooManyRequests):
    """The workspace has as many sessions linking at once as its quota allows."""

    code = "quota_linkings"


class RateLimited(TooManyRequests):
    """The workspace created sessions faster than its rate (a token bucket) allows."""

    code = "rate_limited"


class QuotaStreams(TooManyRequests):
    """The workspace has as many event streams open on this gateway as allowed."""

    code = "quota_streams"


class StreamsFull(TooManyRequests):
    """This gateway has as many event streams open as it allows (another gateway may have room)."""

    code = "streams_full"


class QuotaUnavailable(Unavailable):
    """The quota cannot be checked now (Redis or Postgres unreachable): the create is refused."""

    code = "quota_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class SnapshotKeyUnknown(Unavailable):
    """A snapshot was sealed with a key this worker lacks (or, v1, none of its keys opens it).

    The snapshot may be perfectly good: the session is left as it was (hibernated or ready, its
    stored snapshot untouched, its lease released) for a worker that holds the key. ``key_id`` is
    the hex id of the missing key (``"v1"`` for an old snapshot, which names none)."""

    code = "snapshot_key_unknown"

    def __init__(self, message: str, *, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


# --------------------------------------------------------------------------- passkeys (docs/passkey.md)
class InvalidPasskeyAssertion(BadRequest):
    """The body is not a WebAuthn assertion (``AuthenticationResponseJSON`` with base64url fields)."""

    code = "invalid_passkey_assertion"


class PasskeyNotRequested(Conflict):
    """The session is not waiting for a passkey assertion (or the one it waited for was given)."""

    code = "passkey_not_requested"


class PasskeyChallengeMismatch(Conflict):
    """The assertion's ``clientDataJSON.challenge`` is not the challenge the page waits for."""

    code = "passkey_challenge_mismatch"


class PasskeyExpired(WalinkError):
    """The passkey challenge's time ran out before the assertion came."""

    status = 410
    code = "passkey_expired"


class PasskeyTokenUnknown(NotFound):
    """No pending passkey request has this token."""

    code = "passkey_token_unknown"


class PasskeyTokenUsed(WalinkError):
    """This one-time passkey token already carried an assertion."""

    status = 410
    code = "passkey_token_used"
