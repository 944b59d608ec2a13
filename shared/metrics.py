"""Prometheus metrics (prometheus-client). Labels are bounded: statuses, reasons, outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 15.0, 20.0, 30.0, 60.0)

QR_SECONDS = Histogram(
    "walink_qr_generation_seconds",
    "From 'add account' (or restart) to the first QR of the session",
    ["source"],
    buckets=_LATENCY_BUCKETS_S,
)
PHONE_SECONDS = Histogram(
    "walink_phone_extraction_seconds",
    "From the phone's scan being accepted (authenticated) to the phone number known (ready)",
    buckets=_LATENCY_BUCKETS_S,
)
WAKE_SECONDS = Histogram(
    "walink_restore_seconds",
    "From a restore or wake request to ready, without a QR",
    buckets=_LATENCY_BUCKETS_S,
)
LINKS = Counter("walink_links_total", "Linkings that ended, by outcome and reason", ["outcome", "reason"])
SESSIONS = Gauge("walink_sessions", "Sessions on this worker by status", ["status"])
QUEUE_ACTIVE = Gauge("walink_qr_queue_active", "Cold browser starts running now")
QUEUE_WAITING = Gauge("walink_qr_queue_waiting", "Cold browser starts waiting for the QR queue")
POOL_READY = Gauge("walink_warm_pool_ready", "Warm browsers showing a QR, ready to hand out")
WEB_VERSION_UNPINNED = Counter(
    "walink_web_version_unpinned_total",
    "Pinned WhatsApp Web builds dropped because the server refused them (DEPRECATED_VERSION)",
)
BROWSERS = Gauge("walink_browsers", "Chromium browsers running on this worker")
BROWSER_MEMORY = Gauge("walink_browser_memory_bytes", "Proportional set size of all browsers of this worker")

HEARTBEATS_REFUSED = Counter(
    "walink_heartbeats_refused_total",
    "Worker heartbeats ignored: unsigned, bad_signature, stale, bad_name, or not_loopback (no token)",
    ["reason"],
)

# --- gateway (labels: route templates, outcome classes and worker names, all bounded)
_GATEWAY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GATEWAY_REQUESTS = Counter(
    "walink_gateway_requests_total",
    "Requests the gateway proxied, by route and outcome (2xx, 4xx, 5xx, error)",
    ["route", "outcome"],
)
GATEWAY_LATENCY = Histogram(
    "walink_gateway_request_seconds",
    "Gateway latency by route: whole answer, or until the stream started for SSE",
    ["route"],
    buckets=_GATEWAY_BUCKETS_S,
)
GATEWAY_RETRIES = Counter(
    "walink_gateway_retries_total",
    "Proxied attempts retried, by reason (connect, timeout, server_error, not_owner, unavailable, "
    "snapshot_key, driver)",
    ["reason"],
)
GATEWAY_FAILOVERS = Counter(
    "walink_gateway_failovers_total",
    "Requests served by a worker other than the session's owner because the owner was down",
)
GATEWAY_BREAKER_STATE = Gauge(
    "walink_gateway_breaker_state", "Breaker state per worker: 0 closed, 1 half-open, 2 open", ["worker"]
)
GATEWAY_WORKERS_UP = Gauge("walink_gateway_workers_up", "Workers reachable with their breaker not open")
GATEWAY_SSE_RESUMES = Counter(
    "walink_gateway_sse_resumes_total", "Event streams resumed on another worker after the upstream ended"
)
SNAPSHOT_KEY_UNKNOWN = Counter(
    "walink_snapshot_key_unknown_total",
    "Restores refused because the snapshot's key is not among this worker's keys (the session is "
    "left as it was), by the missing key's id ('v1': an old snapshot that no key opens)",
    ["key_id"],
)
ADOPTED = Counter(
    "walink_sessions_adopted_total",
    "Sessions this worker took over from a worker that died, drained or paused",
    ["status"],
)
WEBHOOK_DELIVERIES = Counter(
    "walink_webhook_deliveries_total",
    "Webhook delivery attempts by outcome (delivered, retry, dead = dead-lettered, lost = claim lost,"
    " refused = destination refused by the SSRF rules, filtered = not in the session's events filter)",
    ["outcome"],
)
WEBHOOK_LAG = Histogram(
    "walink_webhook_lag_seconds",
    "From an event's commit to its successful delivery",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

# --- durable writes (docs/durability.md)
COMMIT_RETRIES = Counter(
    "walink_commit_retries_total", "Session commits tried again after Postgres could not be reached"
)
COMMIT_FAILURES = Counter(
    "walink_commit_failures_total",
    "Session commits whose retry budget ran out (events kept for the next round, or a 503)",
)
REPLACED_UNLINKS = Counter(
    "walink_replaced_unlinks_total",
    "Replaced hibernated sessions whose device was to be unlinked (worker.unlinking), by outcome:"
    " 'unlinked' (logged out through the page), 'not_linked' (the page showed no login: nothing"
    " left to unlink), 'failed' (an attempt failed; retried later), 'gave_up' (no profile nor"
    " snapshot to log in with)",
    ["outcome"],
)
KEEPALIVE_WAKES = Counter(
    "walink_keepalive_wakes_total", "Hibernated sessions woken by the keep-alive so their device stays linked"
)
SESSIONS_AT_RISK = Counter(
    "walink_sessions_at_risk_total", "session_at_risk events: a session unused for 80 % of the device TTL"
)
DEVICES_EXPIRED = Counter(
    "walink_devices_expired_total", "Sessions logged out by WhatsApp because their device went unused"
)
HIBERNATE_FAILURES = Counter(
    "walink_hibernate_failures_total",
    "Hibernations given up because the snapshot could not be packed or stored (session kept ready)",
)
SNAPSHOT_REFUSED = Counter(
    "walink_snapshot_refused_total",
    "Live snapshots not stored because the page lacked a database or key its login needs",
)
RETENTION_PURGED = Counter(
    "walink_retention_purged_total",
    "Rows changed by the retention job: delivered outbox rows deleted, deleted sessions' phones purged",
    ["what"],
)
# --- limits (labels: the quota's name, never the workspace)
QUOTA_REFUSALS = Counter(
    "walink_quota_refusals_total",
    "Requests refused over a limit, by quota (sessions, linkings, rate, streams_workspace, "
    "streams_gateway) or because the quota could not be checked (unavailable)",
    ["quota"],
)
GATEWAY_SSE_STREAMS = Gauge("walink_gateway_sse_streams", "Event streams open on this gateway")
GATEWAY_SSE_STREAMS_MAX = Gauge(
    "walink_gateway_sse_streams_max", "Event streams this gateway allows at once (WALINK_SSE_MAX_PER_GATEWAY)"
)
