"""Locust load test of walink's session API (optional extra: ``pip install -e '.[load]'``).

``make load`` (``python -m load_tests.load``) starts a cluster and runs this file headless against
it. By hand, against the gateway (or one worker, whose API is the same without auth)::

    BENCH_API_KEY=wlk_… BENCH_SESSION_IDS=s_a,s_b BENCH_LINKERS=2 \\
        locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 --users 20 --spawn-rate 5

Environment (``BENCH_*``, never ``WALINK_*``: walink's processes refuse unknown ``WALINK_*`` names):

* ``BENCH_API_KEY`` — API key sent as ``Authorization: Bearer`` (empty: no header, e.g. a worker);
* ``BENCH_SESSION_IDS`` — comma-separated ids of ready sessions that ``Reader`` users read;
* ``BENCH_SIMULATOR_URL`` — the simulator (default ``http://127.0.0.1:3100``);
* ``BENCH_LINK`` — ``1`` (default): ``AddAccount`` users scan their QR with the simulated phone,
  wait for ``ready`` and log out; ``0``: they stop at the QR and delete the session;
* ``BENCH_LINKERS`` — how many ``AddAccount`` users, whatever ``--users`` is (Locust's
  ``fixed_count``; each linking costs a real Chromium on a worker); ``0`` (default): by weight.

Users:

* ``Reader`` (weight 10): a SaaS backend reading sessions it linked (``GET /v1/sessions/{id}``:
  must be ``ready``) and a monitor reading ``/health`` (must be ``healthy``).
* ``AddAccount`` (weight 1): a user clicking "add account": ``POST /v1/sessions``, the QR from the
  session's event stream (``GET /v1/sessions/{id}/events``, server-sent events), a scan with the
  simulated phone (``POST {simulator}/phone/scan``), ``session_ready`` on the same stream, a few
  status reads, then ``POST …/logout`` (two times in three) or ``DELETE``. As a user does on the
  2026 page (the simulator's ``strict`` profile), a scan refused with 409 ``couldnt_link_device``
  ("Couldn't link device": the page re-renders the same ref with a new secret) or 410
  ``qr_expired`` is followed by a scan of the next QR walink sends on the stream, at most 4 scans;
  those refusals are not errors.

Each step is its own Locust name, so the statistics show them apart:

=========================== ======= ===========================================================
name                        type    time
=========================== ======= ===========================================================
``add account``             POST    ``POST /v1/sessions``
``events stream``           GET     ``GET /v1/sessions/{id}/events`` until its headers
``QR on SSE``               SSE     from the ``POST /v1/sessions`` to the first ``qr`` event
``phone scan``              POST    the simulated phone's ``POST /phone/scan``
``next QR on SSE``          SSE     from a refused scan to the next ``qr`` event
``scan → ready on SSE``     SSE     from the scan the phone took to ``session_ready``
``status read``             GET     ``GET /v1/sessions/{id}`` of the session just linked
``logout`` / ``delete``     POST/…  ``POST /v1/sessions/{id}/logout`` / ``DELETE``
``/v1/sessions/[id]``       GET     ``Reader``: a ready session
``/health``                 GET     ``Reader``: the gateway's health
=========================== ======= ===========================================================

Every wait is bounded: each request by ``REQUEST_TIMEOUT_S``, each wait for an event by
``QR_WAIT_S`` or ``READY_WAIT_S`` (a gevent timeout: Locust users are greenlets).

The numbers of ``make bench`` come from ``load_tests/bench.py``, not from here: Locust measures
request rates and failures under a mixed load, the benchmark what a user waits for, against a
baseline.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What this file uses of Locust and gevent, so that it type-checks whether or not the optional
    # extra is installed (mypy does not analyse the ``else`` branch).
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    class _Response(Protocol):
        status_code: int

        def json(self) -> Any: ...
        def success(self) -> None: ...
        def failure(self, exc: Any) -> None: ...
        def iter_content(self, chunk_size: int | None = ...) -> Iterator[bytes]: ...
        def close(self) -> None: ...
        def __enter__(self) -> _Response: ...
        def __exit__(self, *exc: object) -> None: ...

    class _Client(Protocol):
        def get(self, url: str, **kwargs: Any) -> _Response: ...
        def post(self, url: str, **kwargs: Any) -> _Response: ...
        def delete(self, url: str, **kwargs: Any) -> _Response: ...

    class HttpUser:
        abstract: bool
        weight: int
        fixed_count: int
        host: str | None
        client: _Client
        environment: Any
        wait_time: Callable[..., float]

        def on_start(self) -> None: ...

    _F = TypeVar("_F", bound=Callable[..., None])

    def task(weight: int = 1) -> Callable[[_F], _F]: ...

    def between(min_wait: float, max_wait: float) -> Callable[..., float]: ...

    class Timeout(BaseException):
        def __init__(self, seconds: float | None = None) -> None: ...
        def __enter__(self) -> Timeout: ...
        def __exit__(self, *exc: object) -> None: ...

    class RequestException(OSError): ...

    class _EventHook(Protocol):
        def add_listener(self, handler: _F) -> _F: ...

    class _Events(Protocol):
        init: _EventHook
        quit: _EventHook

    events: _Events
    CSV_STATS_INTERVAL_SEC: float

    def sleep(seconds: float = 0) -> None: ...

else:
    try:
        from gevent import Timeout, sleep
        from locust import HttpUser, between, events, task
        from locust.stats import CSV_STATS_INTERVAL_SEC
        from requests import RequestException
    except ImportError as exc:  # pragma: no cover - the optional extra
        raise SystemExit("locust is not installed: pip install -e '.[load]'") from exc

API_KEY = os.environ.get("BENCH_API_KEY", "")
SESSION_IDS = [s for s in os.environ.get("BENCH_SESSION_IDS", "").split(",") if s]
SIMULATOR_URL = os.environ.get("BENCH_SIMULATOR_URL", "http://127.0.0.1:3100").rstrip("/")
LINK = os.environ.get("BENCH_LINK", "1") != "0"
LINKERS = int(os.environ.get("BENCH_LINKERS", "0") or 0)
REQUEST_TIMEOUT_S = 30.0  # any one request (a cold start on a busy worker can take seconds)
STREAM_TIMEOUT = (10.0, 60.0)  # the event stream: connect, then between two reads (keep-alive 15 s)
QR_WAIT_S = 60.0  # POST → first QR, refused scan → next QR: a cold start on a loaded 2-core machine
READY_WAIT_S = 60.0  # the scan the phone took → session_ready
MAX_SCANS = 4
STATUS_READS = 3  # of a session just linked, before its logout
LOGOUT_SHARE = 2 / 3  # of the linked sessions end with a logout, the others with a DELETE
# what the phone answers when the user should scan the next QR the page shows
RESCAN = frozenset({(409, "couldnt_link_device"), (410, "qr_expired")})
ENDED = frozenset({"failed", "expired", "logged_out", "deleted"})

_phones = itertools.count(1)

Event = tuple[str, dict[str, Any]]


_csv = False


@events.init.add_listener
def _note_csv(environment: Any, **_kwargs: Any) -> None:
    global _csv
    _csv = bool(getattr(environment.parsed_options, "csv_prefix", None))


@events.quit.add_listener
def _last_csv_write(**_kwargs: Any) -> None:
    """Let Locust's CSV writer (a greenlet, every ``CSV_STATS_INTERVAL_SEC``) write once more after
    the last user stopped: it is not asked to at exit, so ``--csv`` files otherwise miss what the
    users did in their last second, e.g. the logouts of ``--stop-timeout`` (locust issue #1806)."""
    if _csv:
        sleep(CSV_STATS_INTERVAL_SEC + 0.5)


class FlowError(Exception):
    """A step of a user's flow that did not happen as it should (reported to Locust as a failure)."""


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def _phone() -> str:
    """A phone number no other linker of this run uses (12 digits, ``19…``)."""
    return f"19{os.getpid() % 10_000:04d}{next(_phones):06d}"


def _error_code(resp: _Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _json(resp: _Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def is_qr(ev: Event) -> bool:
    return ev[0] == "qr" and bool(ev[1].get("qr"))


def is_new_qr(old: str) -> Callable[[Event], bool]:
    """A ``qr`` event with another string than ``old`` (a new ref, or a new ADV secret)."""
    return lambda ev: is_qr(ev) and str(ev[1]["qr"]) != old


def is_ready(ev: Event) -> bool:
    """``session_ready``, or a ``status`` of ready (a stream opened late shows the latest status)."""
    return ev[0] == "session_ready" or (ev[0] == "status" and ev[1].get("status") == "ready")


def is_ended(ev: Event) -> bool:
    return ev[0] in {"session_failed", "session_disconnected"} or (
        ev[0] == "status" and ev[1].get("status") in ENDED
    )


class EventStream:
    """A session's open ``GET /v1/sessions/{id}/events``, read event by event (``event:`` and
    ``data:`` lines, a blank line ends an event; comments and ``retry:`` are skipped)."""

    def __init__(self, resp: _Response) -> None:
        self._resp = resp
        self._chunks = resp.iter_content(chunk_size=None)  # each chunk as it arrives
        self._buf = b""
        self.seen: list[str] = []

    def _line(self) -> str | None:
        while b"\n" not in self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")

    def next(self) -> Event | None:
        """The next event; None when the stream ended."""
        event: str | None = None
        data: dict[str, Any] = {}
        while (line := self._line()) is not None:
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                parsed = json.loads(line[5:].strip())
                data = parsed if isinstance(parsed, dict) else {"value": parsed}
            elif line == "" and event is not None:
                self.seen.append(event)
                return event, data
        return None

    def until(self, wanted: Callable[[Event], bool], timeout_s: float) -> dict[str, Any]:
        """The data of the first event ``wanted`` accepts, within ``timeout_s``; else FlowError."""
        try:
            with Timeout(timeout_s):
                while (ev := self.next()) is not None:
                    if wanted(ev):
                        return ev[1]
                    if is_ended(ev):
                        raise FlowError(f"session ended: {ev[0]} {ev[1].get('status') or ''}".strip())
                raise FlowError(f"event stream ended (after {self.seen[-5:]})")
        except Timeout:
            raise FlowError(f"no such event within {timeout_s:.0f}s (after {self.seen[-5:]})") from None
        except (RequestException, ValueError) as exc:
            raise FlowError(f"event stream broke: {exc!r}"[:300]) from exc

    def close(self) -> None:
        self._resp.close()


class Reader(HttpUser):
    """A SaaS backend reading sessions it already linked, and a monitor reading health."""

    weight = 10
    wait_time = between(0.05, 0.2)

    @task(10)
    def get_session(self) -> None:
        if not SESSION_IDS:
            self.health()
            return
        sid = random.choice(SESSION_IDS)
        with self.client.get(
            f"/v1/sessions/{sid}",
            headers=_headers(),
            name="/v1/sessions/[id]",
            timeout=REQUEST_TIMEOUT_S,
            catch_response=True,
        ) as resp:
            status = _json(resp).get("status")
            if resp.status_code == 200 and status != "ready":
                resp.failure(f"session {sid} is {status}, not ready")

    @task(1)
    def health(self) -> None:
        with self.client.get(
            "/health", name="/health", timeout=REQUEST_TIMEOUT_S, catch_response=True
        ) as resp:
            status = _json(resp).get("status")
            if resp.status_code == 200 and status != "healthy":
                resp.failure(f"/health says {status}")


class AddAccount(HttpUser):
    """A user clicking "add account": create, the QR on SSE, scan, ready on SSE, reads, logout."""

    weight = 1
    fixed_count = LINKERS
    wait_time = between(1.0, 3.0)

    def _report(self, name: str, since: float, error: Exception | None = None) -> None:
        """A step that is not one request (a wait on the event stream) as its own Locust entry."""
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=(time.perf_counter() - since) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    def _wait(
        self,
        name: str,
        since: float,
        stream: EventStream,
        wanted: Callable[[Event], bool],
    ) -> dict[str, Any] | None:
        """The data of the event ``wanted`` on the stream, reported as ``name`` timed from ``since``."""
        try:
            data = stream.until(wanted, QR_WAIT_S)
        except FlowError as exc:
            self._report(name, since, exc)
            return None
        self._report(name, since)
        return data

    @task(1)
    def add_account(self) -> None:
        t0 = time.perf_counter()
        with self.client.post(
            "/v1/sessions",
            json={"label": "locust"},
            headers=_headers(),
            name="add account",
            timeout=REQUEST_TIMEOUT_S,
            catch_response=True,
        ) as resp:
            sid = str(_json(resp).get("id") or "")
            if resp.status_code != 201 or not sid:
                resp.failure(f"{resp.status_code}, not 201 with an id")
                return
        phone: str | None = None
        try:
            phone = self._link(sid, t0)
            if phone is not None:
                self._read(sid, phone)
        finally:
            self._end(sid, linked=phone is not None)

    def _link(self, sid: str, t0: float) -> str | None:
        """The QR from the event stream; with ``BENCH_LINK`` the scan and ``session_ready``: the
        phone number linked, or None."""
        resp = self.client.get(
            f"/v1/sessions/{sid}/events",
            headers=_headers(),
            name="events stream",
            stream=True,
            timeout=STREAM_TIMEOUT,
        )
        try:
            if resp.status_code != 200:
                return None  # Locust counted the failed GET
            stream = EventStream(resp)
            first = self._wait("QR on SSE", t0, stream, is_qr)
            if first is None or not LINK:
                return None
            phone = _phone()
            scanned_at = self._scan(stream, str(first["qr"]), phone)
            if scanned_at is None:
                return None
            try:
                ready = stream.until(is_ready, READY_WAIT_S)
                if ready.get("phone_number") not in (None, phone):  # a ``status`` event has no phone
                    raise FlowError(f"ready with phone {ready.get('phone_number')}, not {phone}")
            except FlowError as exc:
                self._report("scan → ready on SSE", scanned_at, exc)
                return None
            self._report("scan → ready on SSE", scanned_at)
            return phone
        finally:
            resp.close()

    def _scan(self, stream: EventStream, qr: str, phone: str) -> float | None:
        """Scan as a user does: after "Couldn't link device" or an expired QR, scan the next QR
        that walink sends on the stream; when the phone took a scan, the time it was sent."""
        for n in range(1, MAX_SCANS + 1):
            sent = time.perf_counter()
            with self.client.post(
                f"{SIMULATOR_URL}/phone/scan",
                json={"qr": qr, "phone": phone},
                name="phone scan",
                timeout=REQUEST_TIMEOUT_S,
                catch_response=True,
            ) as resp:
                if resp.status_code == 200:
                    return sent
                code = _error_code(resp)
                if (resp.status_code, code) not in RESCAN or n == MAX_SCANS:
                    resp.failure(f"{resp.status_code} {code or 'error'} after {n} scan(s)")
                    return None
                resp.success()  # the phone says to scan the new QR: what the user does next
            refused = time.perf_counter()
            data = self._wait("next QR on SSE", refused, stream, is_new_qr(qr))
            if data is None:
                return None
            qr = str(data["qr"])
        return None

    def _read(self, sid: str, phone: str) -> None:
        """The app shows the new account: a few reads, each ready with the phone just linked."""
        for _ in range(STATUS_READS):
            with self.client.get(
                f"/v1/sessions/{sid}",
                headers=_headers(),
                name="status read",
                timeout=REQUEST_TIMEOUT_S,
                catch_response=True,
            ) as resp:
                body = _json(resp)
                if resp.status_code == 200 and (body.get("status"), body.get("phone_number")) != (
                    "ready",
                    phone,
                ):
                    resp.failure(f"{body.get('status')} with phone {body.get('phone_number')}")
            time.sleep(random.uniform(0.2, 0.6))  # gevent: this yields

    def _end(self, sid: str, linked: bool) -> None:
        """Log the account out (mostly), else delete the session; a session not linked is deleted."""
        if linked and random.random() < LOGOUT_SHARE:
            with self.client.post(
                f"/v1/sessions/{sid}/logout",
                headers=_headers(),
                name="logout",
                timeout=REQUEST_TIMEOUT_S,
                catch_response=True,
            ) as resp:
                status = _json(resp).get("status")
                if resp.status_code == 200 and status != "logged_out":
                    resp.failure(f"logout answered {status}, not logged_out")
            return
        with self.client.delete(
            f"/v1/sessions/{sid}",
            headers=_headers(),
            name="delete",
            timeout=REQUEST_TIMEOUT_S,
            catch_response=True,
        ) as resp:
            if resp.status_code != 204:
                resp.failure(f"{resp.status_code}, not 204")
