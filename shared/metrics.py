"""Prometheus metrics (prometheus-client). Labels are bounded: statuses, reasons, outcomes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0)

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
BROWSERS = Gauge("walink_browsers", "Chromium browsers running on this worker")
BROWSER_MEMORY = Gauge("walink_browser_memory_bytes", "Proportional set size of all browsers of this worker")
