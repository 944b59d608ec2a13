"""Process settings, read from the environment once per process.

Every field ``name`` is read from ``WALINK_<NAME>``; ``CHROMIUM_PATH`` is also honoured for the
browser binary (it is the name used by the rest of the tooling). An unknown ``WALINK_*`` key is
an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from shared.errors import SettingsError
from shared.loopback import is_loopback_host
from shared.webhook_guard import WebhookAllow

ENV_PREFIX = "WALINK_"

Target = Literal["simulator", "whatsapp"]

# the binaries themselves, not Debian's /usr/bin wrapper scripts (which would sit between
# Playwright and the browser as an extra process in its group)
HEADLESS_SHELL = Path("/usr/lib/chromium/chromium-headless-shell")
FULL_CHROMIUM = Path("/usr/bin/chromium")


@dataclass(frozen=True, slots=True)
class Settings:
    # --- where this process listens
    host: str = "127.0.0.1"
    worker_port: int = 3001
    # this worker's name on the ring and in leases (default host:port); stable across restarts
    worker_name: str = ""
    # the URL the gateway uses to reach this worker (default http://host:port)
    advertise_url: str = ""
    # --- files
    data_dir: Path = Path("var")
    # Debian's chromium-headless-shell (the old headless shell Playwright uses for headless runs):
    # about half the CPU and memory of full Chromium per browser; CHROMIUM_PATH=/usr/bin/chromium
    # selects the full browser (needed for WALINK_HEADLESS=false)
    chromium_path: Path = HEADLESS_SHELL
    headless: bool = True
    # Chromium's own sandbox when the worker does not run as root (as root it cannot have one);
    # false: --no-sandbox always, for containers whose seccomp profile forbids the user namespaces
    # the sandbox needs (infra/k8s/workers-statefulset.yaml says how to keep it there)
    chromium_sandbox: bool = True
    # --- what the browsers talk to
    target: Target = "simulator"
    simulator_url: str = "http://127.0.0.1:3100"
    # --- the WhatsApp Web version cache (worker/web_cache.py, docs/whatsapp-web-2026.md)
    # "latest": the live build, each new build captured into <data dir>/webcache/<version>.html;
    # a version (2.3000.1017054665): that build pinned, from the local cache, else from
    # wa_version_url ("{version}" replaced, the wa-version layout), else live with a warning
    wa_version: str = "latest"
    wa_version_url: str = ""
    wa_version_fetch_timeout_s: float = 15.0
    # --- linking
    # cold browser starts at once on this machine, shared by all its workers through Redis
    # (0: its cores); the scope is the machine (default: the host name)
    launch_budget: int = 0
    launch_scope: str = ""
    # cold starts at once on this worker alone, while Redis cannot be reached
    qr_concurrency: int = 2
    # warm browsers on the QR screen: at least this many (0: no pool), more after a burst of
    # "add account" (the asks of the last minute), up to the max and the memory budget (PSS)
    warm_pool_size: int = 2
    warm_pool_max: int = 6
    warm_pool_memory_mb: int = 600
    qr_batches: int = 1
    start_timeout_s: float = 45.0
    link_timeout_s: float = 120.0
    passkey_timeout_s: float = 300.0
    # the gateway's URL as the users' browsers reach it, put in passkey links (docs/passkey.md);
    # empty: http://127.0.0.1:<gateway_port>
    public_url: str = ""
    # a pairing code nobody typed: WhatsApp renews it every ~3 min a few times, then shows "Code expired"
    pairing_code_timeout_s: float = 1200.0
    takeover_on_conflict: bool = True
    restore_on_start: bool = True
    # --- gateway and membership
    gateway_port: int = 8080
    # workers known from configuration (host:port, comma separated); more join by Redis heartbeat
    workers: str = "127.0.0.1:3001,127.0.0.1:3002,127.0.0.1:3003,127.0.0.1:3004"
    # a worker is gone when it misses this long of heartbeats (it beats every second)
    heartbeat_ttl_ms: int = 6000
    breaker_failures: int = 3
    breaker_window_s: float = 10.0
    breaker_failure_rate: float = 0.5
    breaker_open_s: float = 2.0
    health_interval_s: float = 1.0
    proxy_timeout_s: float = 30.0
    load_bound: float = 1.25
    # an API key the gateway accepts for the default workspace (development and `make run` only)
    dev_api_key: str = field(default="", repr=False)
    # --- durable state
    database_url: str = field(default="postgresql://postgres@127.0.0.1:5432/walink", repr=False)
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    redis_prefix: str = "walink:"
    # short, but not so short that a CPU-starved event loop reads as Redis being down
    redis_timeout_s: float = 2.0
    db_timeout_s: float = 5.0
    # create the database and apply migrations at start (development); false: the schema is owned
    # by another role (`walink migrate`, a Job in infra/k8s), this process's role has no DDL rights
    # and it only checks at start that every migration is applied
    migrate_on_start: bool = True
    lease_ttl_ms: int = 10_000
    # AES-256-GCM key of profile snapshots: base64 of 32 bytes (empty: snapshots disabled)
    snapshot_key: str = field(default="", repr=False)
    # several snapshot keys, comma separated, instead of snapshot_key: the first seals new
    # snapshots, every one opens them (rotation: docs/snapshot-keys.md; `walink rekey`)
    snapshot_keys: str = field(default="", repr=False)
    # a snapshot of a ready session's live profile this long after ready, for crash failover
    # (Chromium commits localStorage to disk in batches up to ~5 s late, so not sooner)
    live_snapshot_delay_s: float = 8.0
    # WhatsApp Web's credentials are final only some seconds after pairing success (the simulator's
    # strict page: 5 s; whatsapp-web.js RemoteAuth waits 60 s after ready before its first backup):
    # a new link's first snapshot, and any hibernation, waits until this long after its ready
    # (docs/durability.md, "The credential settle"); at most 600
    creds_settle_s: float = 6.0
    # a replaced hibernated session's device is unlinked by logging in on its profile and out
    # again (worker.unlinking): one attempt is bounded by this; a failed one is tried again after
    # unlink_retry_s (also how often every worker looks for such sessions left undone)
    unlink_timeout_s: float = 120.0
    unlink_retry_s: float = 60.0
    # --- keep-alive (docs/keepalive.md): WhatsApp logs out a linked device unused for ~30 days
    # (14 with the phone offline). A hibernated session unused for keepalive_s is woken until its
    # page connects, then hibernated again (0: off); checked every keepalive_check_s. device_ttl_s
    # is the TTL walink assumes: unused for 80 % of it, a session emits session_at_risk.
    keepalive_s: float = 7 * 86400.0
    keepalive_check_s: float = 600.0
    device_ttl_s: float = 14 * 86400.0
    # --- hibernation (the seed's LRU of 20 and 5-minute idle timeout)
    idle_timeout_s: float = 300.0
    max_active_sessions: int = 20
    # --- webhooks
    webhook_timeout_s: float = 5.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_s: float = 0.5
    webhook_backoff_max_s: float = 300.0
    # --- retention (shared.retention): delivered/skipped outbox rows are deleted after this long
    # (GET /v1/events and SSE resume reach back that far); a deleted session's phone number, push
    # name and LID leave its events and account row this long after the delete, once delivered
    outbox_retention_s: float = 7 * 24 * 3600.0
    deleted_phone_retention_s: float = 24 * 3600.0
    # how often a worker runs a retention pass (one worker at a time), and its batch size
    retention_interval_s: float = 60.0
    retention_batch_size: int = 500
    # destinations admitted despite not being public addresses (SSRF guard, shared/webhook_guard.py):
    # comma-separated CIDRs, addresses or host names (".example.com" for a zone); `make run` and
    # the tests set 127.0.0.0/8,::1 explicitly; empty: public addresses only
    webhook_allow: str = ""
    # after a secret rotation, deliveries are signed with the old secret too for this long
    webhook_secret_overlap_s: float = 24 * 3600.0
    # deliveries in flight at once to one endpoint (scheme://host:port), so a slow endpoint only
    # holds its own lane; and in flight at once per dispatcher, all endpoints together
    webhook_lane_concurrency: int = 4
    webhook_concurrency: int = 32
    # --- HTTP edge
    max_body_bytes: int = 64 * 1024
    # the bearer token between gateway and workers, and the root of the heartbeats' signing key;
    # required by a worker that listens on anything but loopback (see validate_worker)
    internal_token: str = field(default="", repr=False)
    sse_keepalive_s: float = 15.0
    # open event streams through one gateway: in all, and of one workspace (429 beyond either);
    # the streams have their own connection pool of this size, apart from calls and health probes
    sse_max_per_gateway: int = 1000
    sse_max_per_workspace: int = 250
    # --- per-workspace quotas (docs/limits.md), enforced cluster-wide; 0: derived from the cluster
    # (its configured workers and their browser capacity) so that one workspace takes at most
    # quota_share of it; a workspace's own limits (PUT /v1/quota, admin) override these
    quota_share: float = 0.25
    # live sessions (not ended: linking, ready or hibernated)
    quota_sessions: int = 0
    # sessions linking at once (starting, qr, authenticated, passkey_required): each holds a browser
    quota_linkings: int = 0
    # creates per minute (a token bucket in Redis) and its burst (0: the linkings quota)
    quota_creates_per_minute: int = 0
    quota_create_burst: int = 0
    # --- lifecycle
    shutdown_deadline_s: float = 20.0
    # of that deadline, how long shutdown waits for session commits in flight (and commits what is
    # still pending) before browsers end; Postgres down longer than this loses those events
    shutdown_commit_deadline_s: float = 8.0
    browser_close_timeout_s: float = 5.0
    log_level: str = "INFO"

    @property
    def worker_data_dir(self) -> Path:
        """This worker's own directory: profiles, session sidecars, the web version cache."""
        return self.data_dir / f"worker-{self.worker_port}"

    @property
    def profiles_dir(self) -> Path:
        return self.worker_data_dir / "profiles"

    @property
    def webcache_dir(self) -> Path:
        return self.data_dir / "webcache"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(
            k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in known
        )
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(unknown)}; known: "
                + ", ".join(ENV_PREFIX + n.upper() for n in sorted(known))
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None and f.name == "chromium_path":
                raw = env.get("CHROMIUM_PATH")
            if raw is not None:
                values[f.name] = _parse(key, raw, hints[f.name])
        settings = cls(**values)
        settings.validate()
        return settings

    def _validate_durability(self) -> None:
        """Retention and shutdown commits (docs/durability.md)."""
        self._validate_snapshots()
        if (
            self.outbox_retention_s < 0
            or self.deleted_phone_retention_s < 0
            or self.retention_interval_s <= 0
        ):
            raise SettingsError(
                "WALINK_OUTBOX_RETENTION_S and WALINK_DELETED_PHONE_RETENTION_S must not be negative,"
                " WALINK_RETENTION_INTERVAL_S must be positive"
            )
        if not 0 < self.shutdown_commit_deadline_s <= self.shutdown_deadline_s:
            raise SettingsError(
                "WALINK_SHUTDOWN_COMMIT_DEADLINE_S must be > 0 and at most WALINK_SHUTDOWN_DEADLINE_S"
            )

    def _validate_snapshots(self) -> None:
        """When snapshots are taken (docs/durability.md)."""
        if not 0 <= self.creds_settle_s <= 600:
            raise SettingsError("WALINK_CREDS_SETTLE_S must be between 0 and 600 (seconds after ready)")

    def _validate_keepalive(self) -> None:
        """Keep-alive and link health (docs/keepalive.md)."""
        if self.keepalive_s < 0 or self.device_ttl_s < 0 or self.keepalive_check_s <= 0:
            raise SettingsError(
                "WALINK_KEEPALIVE_S and WALINK_DEVICE_TTL_S must not be negative (0: off),"
                " WALINK_KEEPALIVE_CHECK_S must be positive"
            )

    def _validate_web_cache(self) -> None:
        """The WhatsApp Web version cache (worker/web_cache.py)."""
        from worker.whatsapp_web import is_version  # the version format is page knowledge

        if self.wa_version != "latest" and not is_version(self.wa_version):
            raise SettingsError(
                f"WALINK_WA_VERSION must be 'latest' or a WhatsApp Web version such as"
                f" 2.3000.1017054665, not {self.wa_version!r}"
            )
        url = self.wa_version_url
        if url and (not url.startswith(("http://", "https://")) or "{version}" not in url):
            raise SettingsError(
                "WALINK_WA_VERSION_URL must be an http(s) URL template containing {version}, e.g."
                " https://raw.githubusercontent.com/wppconnect-team/wa-version/main/html/{version}.html"
            )
        if self.wa_version_fetch_timeout_s <= 0:
            raise SettingsError("WALINK_WA_VERSION_FETCH_TIMEOUT_S must be positive")

    @property
    def passkey_base_url(self) -> str:
        """Where passkey links send the user's browser (``public_url``, else the local gateway)."""
        return (self.public_url or f"http://127.0.0.1:{self.gateway_port}").rstrip("/")

    def _validate_public_url(self) -> None:
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise SettingsError("WALINK_PUBLIC_URL must be an http:// or https:// URL (or empty)")

    def validate(self) -> None:
        self._validate_web_cache()
        if self.target not in get_args(Target):
            raise SettingsError(f"WALINK_TARGET must be one of {get_args(Target)}, not {self.target!r}")
        self._validate_public_url()
        for name in (
            "qr_concurrency",
            "qr_batches",
            "max_body_bytes",
            "max_active_sessions",
            "webhook_max_attempts",
            "webhook_lane_concurrency",
            "webhook_concurrency",
            "lease_ttl_ms",
            "retention_batch_size",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"WALINK_{name.upper()} must be at least 1")
        for name in ("sse_max_per_gateway", "sse_max_per_workspace"):
            if getattr(self, name) < 1:
                raise SettingsError(f"WALINK_{name.upper()} must be at least 1")
        for name in ("quota_sessions", "quota_linkings", "quota_creates_per_minute", "quota_create_burst"):
            if getattr(self, name) < 0:
                raise SettingsError(f"WALINK_{name.upper()} must not be negative (0: derived)")
        if not 0 < self.quota_share <= 1:
            raise SettingsError("WALINK_QUOTA_SHARE must be a fraction in (0, 1]")
        if self.launch_budget < 0:
            raise SettingsError("WALINK_LAUNCH_BUDGET must not be negative (0: the machine's cores)")
        if self.warm_pool_max < self.warm_pool_size:
            raise SettingsError("WALINK_WARM_POOL_MAX must be at least WALINK_WARM_POOL_SIZE")
        if self.warm_pool_size < 0:
            raise SettingsError("WALINK_WARM_POOL_SIZE must not be negative")
        self._validate_durability()
        self._validate_keepalive()
        if self.webhook_secret_overlap_s < 0:
            raise SettingsError("WALINK_WEBHOOK_SECRET_OVERLAP_S must not be negative")
        WebhookAllow.parse(self.webhook_allow)  # a bad entry fails at start, not at the first delivery
        if not 0 < self.worker_port < 65536:
            raise SettingsError("WALINK_WORKER_PORT must be a TCP port")
        if not self.headless and self.chromium_path.name == HEADLESS_SHELL.name:
            raise SettingsError(
                "WALINK_HEADLESS=false needs full Chromium: set CHROMIUM_PATH=/usr/bin/chromium"
            )

    def validate_worker(self) -> None:
        """What a worker checks before it starts: never open to the network without a token."""
        if not self.internal_token and not is_loopback_host(self.host):
            raise SettingsError(
                f"WALINK_HOST={self.host!r} is not a loopback address, and WALINK_INTERNAL_TOKEN is not "
                "set: the worker would take commands from anyone who can reach it. Set "
                "WALINK_INTERNAL_TOKEN (the same on every gateway and worker) or listen on 127.0.0.1"
            )


def _parse(key: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected true/false")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind is str or kind == Target:
            return raw
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r}: {exc}") from exc
    raise SettingsError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover
