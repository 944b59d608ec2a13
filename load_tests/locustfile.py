"""Locust load test of walink's session API (optional extra: ``pip install -e '.[load]'``).

Against the gateway (or one worker, whose API is the same without auth)::

    BENCH_API_KEY=wlk_… BENCH_SESSION_IDS=s_a,s_b \\
        locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 --users 50 --spawn-rate 5

Environment (``BENCH_*``, never ``WALINK_*``: walink's processes refuse unknown ``WALINK_*`` names):

* ``BENCH_API_KEY`` — API key sent as ``Authorization: Bearer`` (empty: no header, e.g. a worker);
* ``BENCH_SESSION_IDS`` — comma-separated ids of ready sessions that ``Reader`` users read;
* ``BENCH_SIMULATOR_URL`` — the simulator (default ``http://127.0.0.1:3100``);
* ``BENCH_LINK=1`` — ``AddAccount`` users also scan their QR with the simulated phone and wait
  for ``ready`` (each one then costs a real Chromium on a worker until it is deleted). As a user
  does on the 2026 page (the simulator's default ``strict`` profile), a scan refused with 409
  ``couldnt_link_device`` ("Couldn't link device": the page re-renders the same ref with a new
  secret) or 410 ``qr_expired`` is followed by a scan of the next QR walink publishes
  (``GET /v1/sessions/{id}/qr`` until it changes), at most 4 scans; those refusals are not errors.

Users: ``Reader`` (weight 10) reads sessions and ``/health``; ``AddAccount`` (weight 1) creates a
session, fetches its QR, optionally links it, then deletes it. Every loop is bounded.

The numbers of ``make bench`` come from ``load_tests/bench.py``, not from here: Locust measures
request rates under load, the benchmark measures what a user waits for, against a baseline.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What this file uses of Locust, so that it type-checks whether or not the optional extra is
    # installed (mypy does not analyse the ``else`` branch).
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    class _Response(Protocol):
        status_code: int

        def json(self) -> Any: ...
        def success(self) -> None: ...
        def failure(self, exc: Any) -> None: ...
        def __enter__(self) -> _Response: ...
        def __exit__(self, *exc: object) -> None: ...

    class _Client(Protocol):
        def get(self, url: str, **kwargs: Any) -> _Response: ...
        def post(self, url: str, **kwargs: Any) -> _Response: ...
        def delete(self, url: str, **kwargs: Any) -> _Response: ...

    class HttpUser:
        abstract: bool
        weight: int
        host: str | None
        client: _Client
        wait_time: Callable[..., float]

        def on_start(self) -> None: ...

    _F = TypeVar("_F", bound=Callable[..., None])

    def task(weight: int = 1) -> Callable[[_F], _F]: ...

    def between(min_wait: float, max_wait: float) -> Callable[..., float]: ...

else:
    try:
        from locust import HttpUser, between, task
    except ImportError as exc:  # pragma: no cover - the optional extra
        raise SystemExit("locust is not installed: pip install -e '.[load]'") from exc

API_KEY = os.environ.get("BENCH_API_KEY", "")
SESSION_IDS = [s for s in os.environ.get("BENCH_SESSION_IDS", "").split(",") if s]
SIMULATOR_URL = os.environ.get("BENCH_SIMULATOR_URL", "http://127.0.0.1:3100").rstrip("/")
LINK = os.environ.get("BENCH_LINK", "") == "1"
QR_TRIES = 50  # every 0.2 s: a cold start on a busy worker
READY_TRIES = 100  # every 0.2 s
MAX_SCANS = 4
# what the phone answers when the user should scan the next QR the page shows
RESCAN = frozenset({(409, "couldnt_link_device"), (410, "qr_expired")})

_phones = itertools.count(1)


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def _phone() -> str:
    return f"19{os.getpid() % 10_000:04d}{next(_phones):06d}"


def _error_code(resp: _Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


class Reader(HttpUser):
    """A SaaS backend reading sessions it already linked, and a monitor reading health."""

    weight = 10
    wait_time = between(0.05, 0.2)

    @task(10)
    def get_session(self) -> None:
        if not SESSION_IDS:
            self.client.get("/health", name="/health")
            return
        sid = random.choice(SESSION_IDS)
        self.client.get(f"/v1/sessions/{sid}", headers=_headers(), name="/v1/sessions/[id]")

    @task(1)
    def health(self) -> None:
        self.client.get("/health", name="/health")


class AddAccount(HttpUser):
    """A user clicking "add account": create, show the QR, (scan, wait for ready,) delete."""

    weight = 1
    wait_time = between(1.0, 3.0)

    @task(1)
    def add_account(self) -> None:
        resp = self.client.post(
            "/v1/sessions", json={"label": "locust"}, headers=_headers(), name="/v1/sessions"
        )
        if resp.status_code != 201:
            return
        sid = str(resp.json()["id"])
        try:
            qr = self._qr(sid)
            if qr is not None and LINK and self._scan(sid, qr, _phone()):
                self._until_ready(sid)
        finally:
            self.client.delete(f"/v1/sessions/{sid}", headers=_headers(), name="/v1/sessions/[id] DELETE")

    def _scan(self, sid: str, qr: str | None, phone: str) -> bool:
        """Scan as a user does: after "Couldn't link device" or an expired QR, scan the next QR
        that walink publishes; True once the phone took a scan."""
        for n in range(1, MAX_SCANS + 1):
            if qr is None:
                return False
            with self.client.post(
                f"{SIMULATOR_URL}/phone/scan",
                json={"qr": qr, "phone": phone},
                name="simulator /phone/scan",
                catch_response=True,
            ) as resp:
                if resp.status_code == 200:
                    return True
                code = _error_code(resp)
                if (resp.status_code, code) not in RESCAN or n == MAX_SCANS:
                    resp.failure(f"{resp.status_code} {code or 'error'} after {n} scan(s)")
                    return False
                resp.success()  # the phone says to scan the new QR: what the user does next
            qr = self._qr(sid, after=qr)
        return False

    def _qr(self, sid: str, after: str | None = None) -> str | None:
        """The session's QR (one other than ``after``: the next one walink publishes)."""
        for _ in range(QR_TRIES):
            with self.client.get(
                f"/v1/sessions/{sid}/qr", headers=_headers(), name="/v1/sessions/[id]/qr", catch_response=True
            ) as resp:
                if resp.status_code == 200:
                    qr = str(resp.json()["qr"])
                    if qr != after:
                        return qr
                elif resp.status_code == 409:
                    resp.success()  # "no QR yet": the browser is still starting; not an error
            time.sleep(0.2)  # Locust users are gevent greenlets: this yields
        return None

    def _until_ready(self, sid: str) -> None:
        for _ in range(READY_TRIES):
            resp = self.client.get(f"/v1/sessions/{sid}", headers=_headers(), name="/v1/sessions/[id]")
            if resp.status_code == 200 and resp.json().get("status") == "ready":
                return
            time.sleep(0.2)
