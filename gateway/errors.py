"""Errors the gateway itself answers with (``{"error": {"code", "message"}}`` like every error)."""

from __future__ import annotations

from shared.errors import Unavailable, WalinkError


class NoWorkerAvailable(Unavailable):
    """No worker could be reached (all down, tripped, or refusing connections)."""

    code = "no_worker_available"


class UpstreamError(WalinkError):
    """The worker failed after the request may have reached it; a non-idempotent call is not retried."""

    status = 502
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
