"""The error hierarchy of walink.

Every error a client can cause is a :class:`WalinkError` with a stable ``code`` and an HTTP
``status``; the HTTP edge (:mod:`shared.web`) turns it into ``{"error": {"code", "message"}}``.
Anything that is not a ``WalinkError`` is a bug and becomes a logged 500.
"""

from __future__ import annotations


class WalinkError(Exception):
    """Root of every error walink raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class SettingsError(WalinkError, ValueError):
    """The environment holds a bad or unknown ``WALINK_*`` value."""

    code = "invalid_settings"


class BadRequest(WalinkError, ValueError):
    status = 400
    code = "invalid_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class InvalidSessionId(BadRequest):
    code = "invalid_session_id"


class InvalidPhoneNumber(BadRequest):
    code = "invalid_phone_number"


class Unauthorized(WalinkError):
    status = 401
    code = "unauthorized"


class NotFound(WalinkError, LookupError):
    status = 404
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


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
