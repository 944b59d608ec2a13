"""The public API as an OpenAPI 3.1 document (hand-written), and a plain HTML page of it.

The page is rendered on the server from the same document: a table of paths, methods and
descriptions, then the schemas — no script, no CDN (the network may be closed).
"""

from __future__ import annotations

import html
import re
from typing import Any

import orjson

from shared.ids import CHOSEN_SESSION_ID_RE, SESSION_ID_RE
from shared.inputs import (
    MAX_LABEL_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_WEBHOOK_URL_CHARS,
    MAX_WORKSPACE_ID_CHARS,
)
from shared.models import EventType, SessionStatus
from shared.webhook_config import WEBHOOK_EVENT_TYPES

JSON = "application/json"

SESSION_ID = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": SESSION_ID_RE.pattern},
}
WORKSPACE_QUERY = {
    "name": "workspace_id",
    "in": "query",
    "required": False,
    "description": "Admin keys only: the workspace to act on. A workspace key may only name its own.",
    "schema": {"type": "string", "maxLength": 64},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _op(
    summary: str,
    description: str,
    responses: dict[str, Any],
    *,
    tag: str = "sessions",
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    errors: tuple[int, ...] = (400, 401, 404, 503),
    security: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [tag],
        "summary": summary,
        "description": description,
        "responses": responses | _errors(*errors),
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
        op["responses"] |= _errors(413)  # a body beyond max_body_bytes
    if not security:
        op["security"] = []
    return op


def _required_body(op: dict[str, Any]) -> dict[str, Any]:
    op["requestBody"]["required"] = True
    return op


SSE_DESCRIPTION = (
    "Server-sent events of one session. Each frame is `id: <seq>`, `event: <name>`, "
    "`data: <json>`; the events are `status`, `qr`, `session_authenticated`, `session_ready`, "
    "`session_synced`, `session_at_risk`, `passkey_prompt`, `session_disconnected` and "
    "`session_failed` (`passkey_prompt`: the page asks for a passkey, see `POST …/passkey`; "
    "`session_at_risk`: `{last_used_at_ms, expires_at_ms}`, a hibernated session unused for 80 % of "
    "the device TTL; a device WhatsApp logged out for going unused ends `session_disconnected` with "
    "reason `device_expired`, see docs/keepalive.md). A new listener first gets the "
    "latest `status` and, while linking, the latest `qr`. While the session's browser waits for a "
    "place to start (the machine's launch budget, during a burst), `event: qr_pending` frames "
    "with `data: {session_id, position, eta_ms}` (no `id:`: they are not events of the record and "
    "have no webhook) say where it stands, on connect and each time it moves up. "
    "Send `Last-Event-ID` (or `?after=<seq>`) to resume "
    "after an event: every committed event after it is replayed, then live events follow. "
    "Comment lines (`: keepalive`) arrive every 15 s. Through the gateway the stream survives "
    "a worker restart or crash: it is resumed on the session's next worker without a gap."
)

WEBHOOK_DESCRIPTION = (
    "Webhooks (`qr_code_generated`, `session_authenticated`, `session_ready`, `session_synced`, "
    "`session_at_risk`, `passkey_prompt`, `session_disconnected`, `session_failed`) are POSTed as JSON "
    "with the headers "
    "`X-Walink-Event`, `X-Walink-Event-Id` and `X-Walink-Signature: t=<unix>,v1=<hex>` where "
    "`hex = HMAC-SHA256(workspace secret, t + '.' + raw body)`; for a while after a secret rotation "
    "the header carries one `v1=` per secret (`t=<unix>,v1=<new>,v1=<old>`): accept the request when "
    "one matches. Check the signature over the exact bytes received, in constant time, and refuse a "
    "`t` older than 5 minutes. Delivery is at least once (deduplicate on `event_id`), with "
    "exponential backoff and jitter; after the retry budget an event is dead-lettered and can be "
    "replayed with `POST /v1/webhooks/replay`. Webhook URLs must resolve to public addresses "
    "(loopback, private, link-local, CGNAT, multicast and other internal addresses are refused "
    "unless the operator admits them with `WALINK_WEBHOOK_ALLOW`); a refused delivery is "
    "dead-lettered at once with the reason in its delivery log."
)
PASSKEY_TOKEN = {
    "name": "token",
    "in": "path",
    "required": True,
    "description": "The `passkey_token` of a `passkey_prompt` event (`<session id>~<random>`)",
    "schema": {"type": "string", "maxLength": 128},
}
EVENT_ID = {
    "name": "event_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}


def document() -> dict[str, Any]:
    sessions_tag = {"name": "sessions", "description": "Link a WhatsApp account by QR code or pairing code."}
    paths: dict[str, Any] = {
        "/v1/sessions": {
            "post": _op(
                "Add an account (start a linking session)",
                "Creates a session and starts its browser; the QR follows on the event stream and at "
                "`qr_url`. The gateway chooses the id unless one is given; the create is idempotent "
                "for that id. " + QUOTA_DESCRIPTION,
                {"201": _json(_ref("Created"), "The session, starting") | {"headers": RATE_LIMIT_HEADERS}},
                body=_ref("CreateSession"),
                errors=(400, 401, 404, 409, 413, 429, 503),
            ),
            "get": _op(
                "Sessions driven now",
                "The sessions the workers drive right now (not hibernated or ended ones: see "
                "`/v1/accounts`). `partial` is true when a worker could not be asked.",
                {"200": _json(_ref("SessionList"), "Sessions")},
                params=[WORKSPACE_QUERY],
            ),
        },
        "/v1/sessions/{session_id}": {
            "get": _op(
                "A session",
                "Status, phone number as soon as it is known, history of transitions, timings.",
                {"200": _json(_ref("Session"), "The session")},
                params=[SESSION_ID],
            ),
            "delete": _op(
                "Delete a session",
                "Committed first, then the browser ends, the device is unlinked (a hibernated "
                "session is woken for that) and the profile and snapshot are removed. "
                "503 `database_unavailable` when Postgres cannot be reached: nothing was changed, retry.",
                {"204": {"description": "Deleted"}},
                params=[SESSION_ID],
            ),
        },
        "/v1/sessions/{session_id}/qr": {
            "get": _op(
                "The current QR",
                "By `Accept` (`image/png`, `image/svg+xml`, `application/json`) or `?format=png|svg|raw`. "
                "409 `invalid_state` when the session shows no QR.",
                {
                    "200": {
                        "description": "The QR",
                        "content": {
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                            "image/svg+xml": {"schema": {"type": "string"}},
                            JSON: {"schema": _ref("Qr")},
                        },
                    }
                },
                params=[
                    SESSION_ID,
                    {
                        "name": "format",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["png", "svg", "raw"]},
                    },
                ],
                errors=(400, 401, 404, 409, 503),
            ),
        },
        "/v1/sessions/{session_id}/events": {
            "get": _op(
                "Event stream (SSE)",
                SSE_DESCRIPTION,
                {
                    "200": {
                        "description": "text/event-stream",
                        "content": {"text/event-stream": {"schema": _ref("Event")}},
                    }
                },
                params=[
                    SESSION_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                errors=(400, 401, 404, 429, 503),
            ),
        },
        "/v1/sessions/{session_id}/pairing-code": {
            "post": _op(
                "Link without a camera",
                "An 8-character code to type on the phone (WhatsApp → Linked devices → Link with phone "
                "number).",
                {"200": _json(_ref("PairingCode"), "The code")},
                params=[SESSION_ID],
                body={
                    "type": "object",
                    "required": ["phone_number"],
                    "properties": {"phone_number": {"type": "string", "examples": ["12025550108"]}},
                },
                errors=(400, 401, 404, 409, 502, 503),
            ),
            "delete": _op(
                "Back to the QR",
                "Leaves the pairing code: WhatsApp Web shows a QR again, sent as the session's next `qr` "
                "event (and `GET …/qr`). While a code is active no QR is published. 409 when no code is "
                "active.",
                {"202": _json(_ref("Created"), "Going back to the QR")},
                params=[SESSION_ID],
                errors=(400, 401, 404, 409, 502, 503),
            ),
        },
        "/v1/sessions/{session_id}/passkey": {
            "post": _required_body(
                _op(
                    "Answer a passkey request",
                    "The session is `passkey_required` (WhatsApp asks this account for a passkey; the "
                    "`passkey_prompt` event carries the request): send the assertion the user's "
                    "authenticator made, as WebAuthn JSON (`AuthenticationResponseJSON`, base64url fields). "
                    "It resolves the page's `navigator.credentials.get`; the answer is the session after "
                    "WhatsApp's verdict: 200 `ready`-bound (`authenticated`/`ready`) or `failed` with reason "
                    "`passkey_invalid` / `passkey_expired`; 202 while the page has not answered yet. "
                    "400 `invalid_passkey_assertion` (not an assertion), 409 `passkey_not_requested` (the "
                    "session does not wait for one, or it was answered) or `passkey_challenge_mismatch` (the "
                    "assertion is for another challenge: a stale request), 410 `passkey_expired`. See "
                    "docs/passkey.md.",
                    {
                        "200": _json(_ref("PasskeyVerdict"), "WhatsApp's verdict"),
                        "202": _json(_ref("PasskeyVerdict"), "Given to the page; no verdict yet"),
                    },
                    params=[SESSION_ID],
                    body=_ref("PasskeyAssertion"),
                    errors=(400, 401, 404, 409, 410, 502, 503),
                )
            ),
        },
        "/v1/passkey/{token}": {
            "get": _op(
                "The passkey request of a one-time token",
                "No API key: the `passkey_token` of a `passkey_prompt` event authorises (it is what the "
                "browser extension on web.whatsapp.com uses). The request as "
                "`PublicKeyCredentialRequestOptionsJSON`. 404 `passkey_token_unknown`, 410 "
                "`passkey_token_used` or `passkey_expired`.",
                {"200": _json(_ref("PasskeyRequest"), "The pending request")},
                tag="passkeys",
                params=[PASSKEY_TOKEN],
                errors=(404, 410, 502, 503),
                security=False,
            ),
            "post": _required_body(
                _op(
                    "Answer the passkey request of a one-time token",
                    "As `POST /v1/sessions/{session_id}/passkey`, authorised by the token (no API key); "
                    "the token is spent by an assertion that reaches the page.",
                    {
                        "200": _json(_ref("PasskeyVerdict"), "WhatsApp's verdict"),
                        "202": _json(_ref("PasskeyVerdict"), "Given to the page; no verdict yet"),
                    },
                    tag="passkeys",
                    params=[PASSKEY_TOKEN],
                    body=_ref("PasskeyAssertion"),
                    errors=(400, 404, 409, 410, 502, 503),
                    security=False,
                )
            ),
        },
        "/v1/sessions/{session_id}/restart": {
            "post": _op(
                "Restart",
                "A linked session reconnects from its profile (no scan); a linking one gets a fresh QR. "
                "Admitted like a create (live sessions, linkings; not the create rate): 429 "
                "`quota_sessions` or `quota_linkings` over a quota.",
                {"202": _json(_ref("Created"), "Restarting")},
                params=[SESSION_ID],
                errors=(400, 401, 404, 409, 429, 503),
            ),
        },
        "/v1/sessions/{session_id}/logout": {
            "post": _op(
                "Log out",
                "Unlinks the device from the phone; the session ends `logged_out`.",
                {"200": _json(_ref("Session"), "Logged out")},
                params=[SESSION_ID],
            ),
        },
        "/v1/accounts": {
            "get": _op(
                "Linked accounts",
                "The workspace's accounts with the seed's status (`pending`, `connected`, `disconnected`, "
                "`failed`), phone, primary flag.",
                {"200": _json(_ref("AccountList"), "Accounts")},
                tag="accounts",
                params=[WORKSPACE_QUERY],
                errors=(400, 401, 404, 503),
            ),
        },
        "/v1/events": {
            "get": _op(
                "Committed events (the outbox)",
                "Every event of the workspace with `id > after`, in order; page with `next_after`. "
                "Gap-free: ids become visible in commit order, so passing the last id seen never "
                "skips an event. Delivered events are kept for `WALINK_OUTBOX_RETENTION_S`.",
                {"200": _json(_ref("EventPage"), "Events")},
                tag="events",
                params=[
                    WORKSPACE_QUERY,
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                errors=(400, 401, 404, 503),
            ),
        },
        "/v1/webhook": {
            "get": _op(
                "The workspace's webhook",
                "Its URL (events of sessions created without a `webhook_url` go there) and the state of "
                "its signing secret. The secret itself is never returned here: rotate it to get one.",
                {"200": _json(_ref("WebhookConfig"), "The webhook configuration")},
                tag="webhooks",
                params=[WORKSPACE_QUERY],
                errors=(400, 401, 404, 503),
            ),
            "put": _op(
                "Set the workspace's webhook URL",
                "`url` null clears it. Applies to events written from now on. A URL whose host is an "
                "internal address or name is refused with 400 `webhook_url_refused` and why; the real "
                "check is at delivery (DNS), where a refusal dead-letters the event with its reason.",
                {"200": _json(_ref("WebhookConfig"), "The webhook configuration")},
                tag="webhooks",
                params=[WORKSPACE_QUERY],
                body=_ref("SetWebhook"),
                errors=(400, 401, 404, 413, 503),
            ),
        },
        "/v1/webhook/secret": {
            "post": _op(
                "Rotate the signing secret",
                "A new secret, returned in this answer only (store it: no route shows it again). "
                "Deliveries are signed with both the new and the replaced secret until "
                "`previous_secret_valid_until_ms` (the operator's `WALINK_WEBHOOK_SECRET_OVERLAP_S`, "
                "24 h by default), so a receiver can switch without losing a delivery. Not retried "
                "by the gateway.",
                {"201": _json(_ref("WebhookSecret"), "The new secret")},
                tag="webhooks",
                params=[WORKSPACE_QUERY],
                errors=(400, 401, 404, 502, 503),
            ),
        },
        "/v1/sessions/{session_id}/webhook-events": {
            "get": _op(
                "A session's webhook event filter",
                "The event types the session's webhook receives (`null`: all of them).",
                {"200": _json(_ref("WebhookEvents"), "The filter")},
                tag="webhooks",
                params=[SESSION_ID],
            ),
            "put": _op(
                "Set a session's webhook event filter",
                "Only these types are POSTed from now on (events not delivered yet included); the "
                "others are kept as `skipped` and still listed by `GET /v1/events` and the event "
                "stream. `null`: every type; `[]`: none.",
                {"200": _json(_ref("WebhookEvents"), "The filter")},
                tag="webhooks",
                params=[SESSION_ID],
                body=_ref("SetWebhookEvents"),
                errors=(400, 401, 404, 413, 503),
            ),
        },
        "/v1/events/{event_id}/deliveries": {
            "get": _op(
                "An event's delivery log",
                "The event's delivery state and every attempt, oldest first: when, the receiver's "
                "status code or the error (a refusal by the address rules says why), how long it took. "
                "Another workspace's event is 404.",
                {"200": _json(_ref("DeliveryLog"), "The delivery log")},
                tag="webhooks",
                params=[EVENT_ID, WORKSPACE_QUERY],
                errors=(400, 401, 404, 503),
            ),
        },
        "/v1/webhooks/replay": {
            "post": _op(
                "Replay webhooks",
                "Delivers dead-lettered (or the given) events again. " + WEBHOOK_DESCRIPTION,
                {"200": _json({"type": "object", "properties": {"replayed": {"type": "integer"}}}, "Queued")},
                tag="events",
                params=[WORKSPACE_QUERY],
                body={
                    "type": "object",
                    "properties": {"event_ids": {"type": "array", "items": {"type": "string"}}},
                },
                errors=(400, 401, 404, 502, 503),
            ),
        },
        "/v1/quota": {
            "get": _op(
                "The workspace's quota",
                "Limits and use of the caller's workspace (an admin key may name any): live sessions, "
                "sessions linking at once, the create bucket (`remaining`: null while Redis cannot be "
                "asked), and event streams open on this gateway. " + QUOTA_DESCRIPTION,
                {"200": _json(_ref("Quota"), "Limits and use")},
                tag="quotas",
                params=[WORKSPACE_QUERY],
                errors=(400, 401, 404, 503),
            ),
            "put": _required_body(
                _op(
                    "Set a workspace's own limits (admin)",
                    "Replaces the workspace's own limits; a field left out or null is the cluster's default "
                    "(`WALINK_QUOTA_*`). Answers the workspace's quota as it is now. Admin key only.",
                    {"200": _json(_ref("Quota"), "Limits and use")},
                    tag="quotas",
                    body=_ref("SetQuota"),
                    errors=(400, 401, 403, 404, 413, 503),
                )
            ),
        },
        "/health": {
            "get": _op(
                "Gateway health",
                "This gateway process: always answers while it runs.",
                {"200": _json({"type": "object"}, "Health")},
                tag="operations",
                errors=(),
                security=False,
            ),
        },
        "/health/cluster": {
            "get": _op(
                "Cluster health",
                "Every worker's `/health` (the seed's shape: status, uptime, memory, sessions, performance; "
                "plus queue, pool, worker) with its breaker state, ring share, owned sessions and queue "
                "depth. `status` is `healthy`, `degraded` (a worker is down, tripped or draining) or "
                "`down` (none can serve). Answers 200 even when workers are down. Admin key (open in "
                "development, when a dev key is configured).",
                {"200": _json(_ref("ClusterHealth"), "Cluster")},
                tag="operations",
                errors=(401, 403),
            ),
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                "Requests by route and outcome, latency, retries, failovers, breaker states, workers up.",
                {
                    "200": {
                        "description": "text/plain",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                tag="operations",
                errors=(),
                security=False,
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "walink",
            "version": "1",
            "description": (
                "Link WhatsApp accounts by QR code and keep the linked sessions alive. Authenticate with "
                "`Authorization: Bearer <API key>` or `X-API-Key`. Errors are JSON "
                '`{"error": {"code", "message"}}`. ' + WEBHOOK_DESCRIPTION
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "tags": [
            sessions_tag,
            {
                "name": "passkeys",
                "description": "One-time passkey links for the user's browser (no API key).",
            },
            {"name": "accounts", "description": "Linked accounts of the workspace."},
            {"name": "events", "description": "The event record and webhooks."},
            {"name": "webhooks", "description": "Webhook URL, signing secret, event filters, delivery log."},
            {"name": "quotas", "description": "Per-workspace limits and their use."},
            {"name": "operations", "description": "Health and metrics."},
        ],
        "paths": paths,
        "webhooks": {
            "sessionEvent": {
                "post": {
                    "summary": "A session event, delivered to the workspace's (or the session's) webhook URL",
                    "description": WEBHOOK_DESCRIPTION,
                    "parameters": [
                        {
                            "name": "X-Walink-Signature",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Walink-Event",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "X-Walink-Event-Id",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {"content": {JSON: {"schema": _ref("Webhook")}}},
                    "responses": {"2XX": {"description": "Received; any other answer is retried"}},
                }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "responses": {
                "E429": _json(_ref("LimitError"), "Over a limit: " + ", ".join(LIMIT_CODES))
                | {"headers": {"Retry-After": RETRY_AFTER_HEADER}}
            }
            | {
                f"E{status}": _json(_ref("Error"), text)
                for status, text in {
                    400: "Invalid input: invalid_request, invalid_session_id, invalid_text (a NUL or "
                    "control character), invalid_metadata, invalid_phone_number, invalid_passkey_assertion",
                    401: "Missing or invalid API key",
                    403: "Not allowed for this key",
                    404: "Not found (in the caller's workspace)",
                    409: "Conflict: invalid_state, session_exists, passkey_not_requested, "
                    "passkey_challenge_mismatch",
                    410: "Gone: passkey_expired, passkey_token_used",
                    413: "Body too large",
                    502: "Upstream error",
                    503: "Unavailable: no_worker_available, unavailable, quota_unavailable, "
                    "lease_unavailable (retry), database_unavailable (retry), snapshot_key_unknown (no "
                    "worker reached holds the key of the session's snapshot; the session is left as it "
                    "was, see docs/snapshot-keys.md)",
                    504: "Upstream timeout",
                }.items()
            },
            "schemas": SCHEMAS,
        },
    }


STATUSES = [s.value for s in SessionStatus]

LIMIT_CODES = ("quota_sessions", "quota_linkings", "rate_limited", "quota_streams", "streams_full")
QUOTA_DESCRIPTION = (
    "Per-workspace quotas, for the whole cluster: live sessions (429 `quota_sessions`), sessions "
    "linking at once (429 `quota_linkings`) and creates per minute (a token bucket; 429 "
    "`rate_limited`), each with `Retry-After` (seconds) and the limit and use in the error. While "
    "the quota cannot be checked (Redis or Postgres unreachable) a create answers 503 "
    "`quota_unavailable`."
)
RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 1},
}
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": {
        "description": "The workspace's create bucket: creates at once",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Remaining": {
        "description": "Creates left in the bucket now (it refills at the rate per minute)",
        "schema": {"type": "integer", "minimum": 0},
    },
}
_LIMIT = {"type": "integer", "minimum": 0}
_OWN_LIMIT = {"type": ["integer", "null"], "minimum": 0, "maximum": 1_000_000}
_SOURCE = {"type": "string", "enum": ["default", "workspace"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "examples": ["session_not_found", "invalid_state"]},
                    "message": {"type": "string"},
                },
            }
        },
    },
    "LimitError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "limit", "used", "retry_after_s"],
                "properties": {
                    "code": {"type": "string", "enum": list(LIMIT_CODES)},
                    "message": {"type": "string"},
                    "limit": _LIMIT,
                    "used": _LIMIT,
                    "retry_after_s": {"type": "integer", "minimum": 1},
                },
            }
        },
    },
    "Quota": {
        "type": "object",
        "required": ["workspace_id", "sessions", "linkings", "creates", "streams"],
        "properties": {
            "workspace_id": {"type": "string"},
            "sessions": {
                "type": "object",
                "description": "Live sessions (not ended: linking, ready, hibernated)",
                "required": ["limit", "used", "source"],
                "properties": {"limit": _LIMIT, "used": _LIMIT, "source": _SOURCE},
            },
            "linkings": {
                "type": "object",
                "description": "Sessions linking at once (starting, qr, authenticated, passkey_required)",
                "required": ["limit", "used", "source"],
                "properties": {"limit": _LIMIT, "used": _LIMIT, "source": _SOURCE},
            },
            "creates": {
                "type": "object",
                "required": ["per_minute", "burst", "remaining", "source"],
                "properties": {
                    "per_minute": _LIMIT,
                    "burst": _LIMIT,
                    "remaining": {"type": ["integer", "null"], "minimum": 0},
                    "source": _SOURCE,
                },
            },
            "streams": {
                "type": "object",
                "description": "Event streams open on this gateway (the limits are per gateway)",
                "required": ["limit", "used", "gateway_limit", "gateway_used", "scope"],
                "properties": {
                    "limit": _LIMIT,
                    "used": _LIMIT,
                    "gateway_limit": _LIMIT,
                    "gateway_used": _LIMIT,
                    "scope": {"type": "string", "enum": ["gateway"]},
                },
            },
        },
    },
    "SetQuota": {
        "type": "object",
        "additionalProperties": False,
        "required": ["workspace_id"],
        "properties": {
            "workspace_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "sessions": _OWN_LIMIT,
            "linkings": _OWN_LIMIT,
            "creates_per_minute": _OWN_LIMIT,
            "create_burst": _OWN_LIMIT,
        },
    },
    "CreateSession": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {
                "type": "string",
                "pattern": CHOSEN_SESSION_ID_RE.pattern,
                "description": "Your own id for the session, in your workspace's namespace: "
                "`<workspace id>.<name>` (e.g. `acme.acct-1`); anything else is refused with 400 "
                "`session_id_outside_workspace`. Leave it out for a generated `s_…` id.",
            },
            "workspace_id": {
                "type": "string",
                "maxLength": MAX_WORKSPACE_ID_CHARS,
                "description": "Admin keys only (else your own). No control characters.",
            },
            "label": {"type": "string", "maxLength": MAX_LABEL_CHARS, "description": "No NUL (\\u0000)"},
            "webhook_url": {
                "type": "string",
                "format": "uri",
                "maxLength": MAX_WEBHOOK_URL_CHARS,
                "description": "This session's webhook (else the workspace's); internal hosts are refused",
            },
            "metadata": {
                "type": "object",
                "description": (
                    "Echoed in every event and webhook of the session: at most "
                    f"{MAX_METADATA_BYTES} bytes as JSON and {MAX_METADATA_DEPTH} levels deep, no NUL "
                    "(\\u0000) in any key or string (400 `invalid_metadata`)"
                ),
            },
            "events": {
                "type": ["array", "null"],
                "maxItems": 16,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)},
                "description": "The event types this session's webhook receives (default: all)",
            },
        },
    },
    "WebhookConfig": {
        "type": "object",
        "required": ["url", "secret_rotated_at_ms", "previous_secret_valid_until_ms"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": ["string", "null"]},
            "secret_rotated_at_ms": {
                "type": ["integer", "null"],
                "description": "When the secret was last rotated (null: never handed out)",
            },
            "previous_secret_valid_until_ms": {
                "type": ["integer", "null"],
                "description": "Until when the replaced secret also signs (null: no overlap now)",
            },
        },
    },
    "SetWebhook": {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {"url": {"type": ["string", "null"], "format": "uri", "maxLength": 2048}},
    },
    "WebhookSecret": {
        "type": "object",
        "required": ["secret", "url", "secret_rotated_at_ms", "previous_secret_valid_until_ms"],
        "additionalProperties": False,
        "properties": {
            "secret": {"type": "string", "description": "The new signing secret (shown once)"},
            "url": {"type": ["string", "null"]},
            "secret_rotated_at_ms": {"type": "integer"},
            "previous_secret_valid_until_ms": {"type": ["integer", "null"]},
        },
    },
    "WebhookEvents": {
        "type": "object",
        "required": ["id", "events"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "events": {
                "type": ["array", "null"],
                "items": {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)},
            },
        },
    },
    "SetWebhookEvents": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {
            "events": {
                "type": ["array", "null"],
                "maxItems": 16,
                "items": {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)},
            }
        },
    },
    "DeliveryLog": {
        "type": "object",
        "required": [
            "event_id",
            "session_id",
            "seq",
            "type",
            "state",
            "attempts",
            "last_error",
            "deliveries",
        ],
        "additionalProperties": False,
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "session_id": {"type": "string"},
            "seq": {"type": "integer"},
            "type": {"type": "string"},
            "state": {"type": "string", "enum": ["pending", "delivered", "dead", "skipped"]},
            "attempts": {"type": "integer", "description": "Attempts since the last replay"},
            "last_error": {"type": ["string", "null"]},
            "deliveries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["attempt", "at_ms", "status_code", "error", "duration_ms"],
                    "additionalProperties": False,
                    "properties": {
                        "attempt": {"type": "integer"},
                        "at_ms": {"type": "integer"},
                        "status_code": {"type": ["integer", "null"]},
                        "error": {"type": ["string", "null"]},
                        "duration_ms": {"type": "integer"},
                    },
                },
            },
        },
    },
    "Created": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": STATUSES},
            "qr_url": {"type": "string"},
            "events_url": {"type": "string"},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "workspace_id": {"type": "string"},
            "status": {"type": "string", "enum": STATUSES},
            "reason": {"type": "string"},
            "phone_number": {"type": ["string", "null"]},
            "push_name": {"type": ["string", "null"]},
            "lid": {
                "type": ["string", "null"],
                "description": "WhatsApp's own id of the account (`…@lid`); never a phone number",
            },
            "synced": {
                "type": "boolean",
                "description": "The history sync is done (`session_synced`); `ready` never waits for it",
            },
            "is_primary": {"type": "boolean"},
            "label": {"type": ["string", "null"]},
            "metadata": {"type": "object"},
            "worker": {"type": ["string", "null"], "description": "The worker driving it"},
            "history": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string"},
                        "reason": {"type": "string"},
                        "at_ms": {"type": "integer"},
                    },
                },
            },
            "timings": {"type": "object", "additionalProperties": {"type": "integer"}},
            "passkey": {
                "type": "object",
                "description": "While `passkey_required`: the page's WebAuthn request (docs/passkey.md)",
                "properties": {
                    "public_key": {"type": "object"},
                    "expires_at_ms": {"type": "integer"},
                    "answered": {"type": "boolean"},
                },
            },
            "qr_url": {"type": "string"},
            "events_url": {"type": "string"},
        },
    },
    "PasskeyAssertion": {
        "type": "object",
        "description": "WebAuthn `AuthenticationResponseJSON` (`PublicKeyCredential.toJSON()`), "
        "base64url without padding",
        "required": ["id", "rawId", "type", "response"],
        "properties": {
            "id": {"type": "string"},
            "rawId": {"type": "string"},
            "type": {"type": "string", "const": "public-key"},
            "authenticatorAttachment": {
                "type": ["string", "null"],
                "enum": ["platform", "cross-platform", None],
            },
            "clientExtensionResults": {"type": "object"},
            "response": {
                "type": "object",
                "required": ["clientDataJSON", "authenticatorData", "signature"],
                "properties": {
                    "clientDataJSON": {"type": "string"},
                    "authenticatorData": {"type": "string"},
                    "signature": {"type": "string"},
                    "userHandle": {"type": ["string", "null"]},
                },
            },
        },
    },
    "PasskeyRequest": {
        "type": "object",
        "properties": {
            "public_key": {
                "type": "object",
                "description": "`PublicKeyCredentialRequestOptionsJSON`: challenge, rpId, allowCredentials, "
                "userVerification, timeout",
            },
            "expires_at_ms": {"type": "integer"},
            "origin": {"type": "string", "examples": ["https://web.whatsapp.com"]},
        },
    },
    "PasskeyVerdict": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": STATUSES},
            "reason": {"type": "string"},
        },
    },
    "SessionList": {
        "type": "object",
        "properties": {
            "sessions": {"type": "array", "items": _ref("Session")},
            "partial": {"type": "boolean"},
        },
    },
    "Qr": {
        "type": "object",
        "properties": {
            "qr": {"type": "string", "description": "The raw string the phone scans"},
            "expires_at_ms": {"type": "integer"},
            "n": {"type": "integer"},
        },
    },
    "PairingCode": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "examples": ["ABCD-EFGH"]},
            "phone_number": {"type": "string"},
        },
    },
    "Event": {
        "type": "object",
        "description": "The `data:` of an SSE frame; `event:` is its type (`qr` for QR codes).",
        "properties": {
            "seq": {"type": "integer"},
            "type": {
                "type": "string",
                "enum": [e.value for e in EventType],
            },
            "event_id": {"type": "string"},
            "at_ms": {"type": "integer"},
            "session_id": {"type": "string"},
            "status": {"type": "string", "description": "status events"},
            "reason": {"type": "string"},
            "qr": {"type": "string", "description": "qr events"},
            "phone_number": {"type": "string", "description": "session_ready"},
            "push_name": {"type": "string"},
            "signal": {"type": "string", "description": "session_synced: main_loaded|stream_main|hasSynced"},
        },
    },
    "Account": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "connected", "disconnected", "failed"]},
            "session_status": {"type": "string", "enum": STATUSES},
            "phone_number": {"type": ["string", "null"]},
            "push_name": {"type": ["string", "null"]},
            "is_primary": {"type": "boolean"},
            "label": {"type": ["string", "null"]},
            "metadata": {"type": "object"},
            "created_at_ms": {"type": "integer"},
            "updated_at_ms": {"type": "integer"},
        },
    },
    "AccountList": {
        "type": "object",
        "properties": {"accounts": {"type": "array", "items": _ref("Account")}},
    },
    "EventPage": {
        "type": "object",
        "properties": {
            "events": {"type": "array", "items": {"type": "object"}},
            "next_after": {"type": "integer"},
        },
    },
    "Webhook": {
        "type": "object",
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "event": {"type": "string"},
            "seq": {"type": "integer"},
            "session_id": {"type": "string"},
            "workspace_id": {"type": "string"},
            "occurred_at_ms": {"type": "integer"},
            "metadata": {"type": "object"},
            "data": {"type": "object"},
        },
    },
    "ClusterHealth": {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["healthy", "degraded", "down"]},
            "workers_total": {"type": "integer"},
            "workers_up": {"type": "integer"},
            "workers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "status": {"type": "string"},
                        "reachable": {"type": "boolean"},
                        "draining": {"type": "boolean"},
                        "breaker": {"type": "object"},
                        "ring_share": {"type": "number"},
                        "sessions_owned": {"type": ["integer", "null"]},
                        "queue_depth": {"type": ["integer", "null"]},
                        "health": {"type": ["object", "null"]},
                    },
                },
            },
        },
    },
}

METHODS = ("get", "post", "put", "patch", "delete")


def _inline(text: str) -> str:
    """Escaped text with its `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(doc: dict[str, Any]) -> str:
    """A readable page of the document: a table of every operation, then the JSON itself."""
    esc = html.escape
    rows = []
    for path, item in doc["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(
                f"<tr><td class=m>{method.upper()}</td><td><code>{esc(path)}</code></td>"
                f"<td><b>{esc(op.get('summary', ''))}</b><br>{_inline(op.get('description', ''))}</td>"
                f"<td class=c>{esc(codes)}</td></tr>"
            )
    info = doc["info"]
    schema_json = esc(orjson.dumps(doc["components"]["schemas"], option=orjson.OPT_INDENT_2).decode())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(info["title"])} API</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1b1f23; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-top: 1px solid #d0d7de;
padding: .45rem; vertical-align: top; text-align: left; }} .m {{ font-weight: 700; width: 4rem; }}
.c {{ color: #57606a; width: 9rem; }}
code, pre {{ background: #f6f8fa; border-radius: 4px; padding: 0 .25rem; }}
pre {{ padding: .8rem; overflow: auto; max-height: 40rem; }}
</style></head><body>
<h1>{esc(info["title"])} API <small>v{esc(info["version"])}</small></h1>
<p>{_inline(info["description"])}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI {esc(doc["openapi"])}).</p>
<table><tr><th>Method</th><th>Path</th><th>What it does</th><th>Answers</th></tr>
{"".join(rows)}
</table>
<h2>Schemas</h2><pre>{schema_json}</pre>
</body></html>
"""
