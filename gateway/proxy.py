"""Forwarding one request to the workers, with the retries that are safe.

Each attempt goes to the first worker of the request's :class:`~gateway.routing.Plan` whose
breaker lets it through. What happens next depends on how the attempt ended:

- not sent (connection refused, connect timeout): any method → the next worker, at once;
- maybe sent (timeout, reset, disconnect after sending): idempotent calls only → next worker;
- ``503 unavailable`` (the worker is draining) on any route → next worker, short backoff;
- ``503 snapshot_key_unknown`` (the worker lacks the key of the session's snapshot, during a key
  rotation) on any route → next worker, short backoff (nothing was changed there);
- ``503 database_unavailable`` (a dependency every worker shares is down; nothing was changed):
  the answer as is, and the worker's breaker hears a success (the worker itself is fine);
- ``409 not_owner`` on any route → the lease holder (read again), short backoff; while that
  holder is down the budget stretches to the lease TTL, after which the worker tried takes over;
- ``503 lease_unavailable`` (no lease can be had: Redis is down or just back) → the answer as
  is, at once: every worker would say the same, and the worker is healthy (not a failure);
- other 5xx: idempotent calls only → next worker; otherwise the answer as is;
- an answer from a worker that does not drive the session (``X-Walink-Driver`` names another):
  the lease is read again and, when its holder is up, the request goes there once, at once;
  otherwise (driver down, no lease) the answer stands;
- anything else is the answer.

Backoff is 50, 100, 200, 400, 800 ms then 1 s, within ``budget_s`` (5 s) of the first attempt.
The breaker hears of every attempt: connection errors, timeouts and 5xx are failures, a 503 from
a draining worker is neither failure nor success.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Set
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import upstream
from gateway.breaker import BreakerState
from gateway.errors import NoWorkerAvailable, UpstreamError, UpstreamTimeout
from gateway.membership import Worker
from gateway.routing import Plan
from shared import metrics
from shared.errors import DatabaseUnavailable, LeaseUnavailable, SnapshotKeyUnknown, WalinkError
from shared.web import DRIVER_HEADER, WORKSPACE_HEADER

log = logging.getLogger("walink.gateway.proxy")

WORKER_HEADER = "X-Walink-Worker"
REQUEST_HEADERS = ("Accept", "Accept-Language", "Content-Type", "Last-Event-ID", "User-Agent", "X-Request-ID")
RESPONSE_HEADERS = (
    "Content-Type",
    "Cache-Control",
    "Location",
    "Retry-After",
    "Content-Encoding",
    "Content-Disposition",
    "ETag",
    "Last-Modified",
    "Vary",
)
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 1.0

# a worker that did not get the request at all
NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    upstream.NotSent,
)
# a worker that may have got it (and may have acted on it)
MAYBE_SENT: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, upstream.Broken)

Sleep = Callable[[float], Awaitable[None]]


# 503s that say a dependency all workers share is down (Postgres; Redis, so no lease can be had):
# no other worker would do better
SHARED_OUTAGES = frozenset({DatabaseUnavailable.code, LeaseUnavailable.code})


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str  # with the query string
    headers: Mapping[str, str]
    body: bytes | None = None
    idempotent: bool = False
    stream: bool = False  # SSE: a 200 answer is handed over open


@dataclass(slots=True)
class Answer:
    worker: Worker
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    code: str | None = None  # the ``error.code`` of a JSON error body
    stream: aiohttp.ClientResponse | None = None
    attempts: int = 1
    maybe_landed: bool = False  # an earlier attempt may have reached a worker
    failover: bool = False


@dataclass(slots=True)
class _Try:
    """The state of one request's attempts."""

    exclude: set[str] = field(default_factory=set)
    attempts: int = 0
    backoffs: int = 0
    maybe_landed: bool = False
    owner_failed: bool = False
    rerouted: bool = False  # sent on to the session's driver once already
    last: Answer | None = None
    error: WalinkError | None = None


def error_code(status: int, body: bytes, content_type: str) -> str | None:
    if status < 400 or not body or "json" not in content_type:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def backoff_s(n: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**n))


class Proxy:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        stream_http: aiohttp.ClientSession | None = None,
        internal_token: str,
        timeout_s: float,
        stream_idle_s: float,
        budget_s: float = 5.0,
        takeover_budget_s: float = 11.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        # event streams hold a connection each: their own pool (default: the calls' one)
        self.stream_http = stream_http or http
        self.internal_token = internal_token
        connect_s = min(timeout_s, 2.0)
        self.timeout_s = timeout_s
        # calls (not streams) go through the gateway's own lean HTTP/1.1 client
        self.upstream = upstream.Upstream(connect_timeout_s=connect_s)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s)
        # streams: no total; a silent upstream (no keep-alive comment) is a dead one
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_s, sock_read=stream_idle_s
        )
        self.budget_s = budget_s
        self.takeover_budget_s = max(budget_s, takeover_budget_s)
        self.sleep = sleep
        self.clock = clock

    def close(self) -> None:
        """End the calls' idle connections (the streams' are aiohttp's, closed with its session)."""
        self.upstream.close()

    def worker_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """``headers`` plus the internal token that workers ask of the gateway (when one is set)."""
        sent = dict(headers)
        if self.internal_token:
            sent["Authorization"] = f"Bearer {self.internal_token}"
        return sent

    # ------------------------------------------------------------------ one attempt
    async def _send(
        self, worker: Worker, call: Call
    ) -> tuple[int, CIMultiDictProxy[str], bytes, aiohttp.ClientResponse | None]:
        """``(status, headers, body, the open stream of a 200 SSE answer)``."""
        if not call.stream and self.upstream.handles(worker.url):
            status, headers, body = await self.upstream.request(
                worker.url,
                call.method,
                call.path,
                self.worker_headers(call.headers),
                call.body,
                timeout_s=self.timeout_s,
            )
            return status, headers, body, None
        http = self.stream_http if call.stream else self.http
        resp = await http.request(
            call.method,
            worker.url + call.path,
            headers=self.worker_headers(call.headers),
            data=call.body,
            timeout=self.stream_timeout if call.stream else self.timeout,
            allow_redirects=False,
        )
        if call.stream and resp.status == 200:
            return resp.status, resp.headers, b"", resp
        try:
            body = await resp.read()
        finally:
            resp.release()
        return resp.status, resp.headers, body, None

    # ------------------------------------------------------------------ the attempts of a request
    async def forward(self, call: Call, plan: Plan, *, avoid: Set[str] = frozenset()) -> Answer:
        """The answer to give the client, after the retries that are safe for this call.

        ``avoid``: workers not to try first (they come back only if every other one fails)."""
        await plan.start()
        started = self.clock()
        budget_s = self.budget_s
        t = _Try(exclude=set(avoid))
        while True:
            worker = self._pick(plan, t.exclude)
            if worker is None:
                remaining = budget_s - (self.clock() - started)
                if remaining <= 0 or not (t.exclude or self._worth_waiting(plan)):
                    break
                t.exclude.clear()  # everyone failed once: wait, then give them another chance
                await self.sleep(min(backoff_s(t.backoffs), remaining))
                t.backoffs += 1
                continue
            t.attempts += 1
            plan.attempting(worker)
            reason, answer = await self._attempt(worker, call, plan, t)
            if reason is None and answer is not None:
                if not t.rerouted and await self._driven_elsewhere(answer, plan, t):
                    t.rerouted = True
                    metrics.GATEWAY_RETRIES.labels("driver").inc()
                    continue
                return self._final(answer, plan, t)
            if worker.name == plan.owner:
                t.owner_failed = reason != "not_owner"
            if reason == "not_owner":
                holder = await plan.redirect()
                held_by = plan.router.membership.get(holder) if holder else None
                if holder is not None and (held_by is None or not held_by.up):
                    budget_s = self.takeover_budget_s  # a dead owner's lease: wait for it to expire
            remaining = budget_s - (self.clock() - started)
            if remaining <= 0:
                break
            metrics.GATEWAY_RETRIES.labels(reason).inc()
            if reason != "connect":
                await self.sleep(min(backoff_s(t.backoffs), remaining))
                t.backoffs += 1
        if t.last is not None:
            return self._final(t.last, plan, t)
        raise t.error or NoWorkerAvailable("no worker is available to serve this request")

    @staticmethod
    async def _driven_elsewhere(answer: Answer, plan: Plan, t: _Try) -> bool:
        """Did a worker answer for a session that another worker, up now, drives?

        If so the answer is dropped (a read: nothing was changed) and the driver comes first."""
        driver = answer.headers.get(DRIVER_HEADER)
        if not driver or driver == answer.worker.name or answer.status >= 300:
            return False
        holder = await plan.redirect()
        target = plan.router.membership.get(holder) if holder is not None else None
        if target is None or holder == answer.worker.name or holder in t.exclude or not target.routable():
            state = "unknown" if target is None else target.breaker.state.value
            log.info(
                "%s: %s answered for %s; lease holder %s (%s): answer kept",
                plan.key,
                answer.worker.name,
                driver,
                holder,
                state,
            )
            return False
        if answer.stream is not None:
            answer.stream.close()
        return True

    @staticmethod
    def _worth_waiting(plan: Plan) -> bool:
        """With no worker to try: is one about to come back (draining for a restart, or probed)?"""
        return any(
            w.draining or w.breaker.state is BreakerState.HALF_OPEN for w in plan.router.membership.all()
        )

    def _pick(self, plan: Plan, exclude: set[str]) -> Worker | None:
        for worker in plan.candidates(exclude):
            if worker.breaker.acquire():
                return worker
        return None

    def _final(self, answer: Answer, plan: Plan, t: _Try) -> Answer:
        answer.attempts = t.attempts
        answer.maybe_landed = t.maybe_landed
        if (
            plan.owner is not None
            and answer.worker.name != plan.owner
            and (t.owner_failed or plan.owner_down)
        ):
            answer.failover = True
            metrics.GATEWAY_FAILOVERS.inc()
        plan.served(answer.worker, answer.status)
        return answer

    async def _attempt(
        self, worker: Worker, call: Call, plan: Plan, t: _Try
    ) -> tuple[str | None, Answer | None]:
        """(retry reason, None) to try again, or (None, answer) to stop."""
        breaker = worker.breaker
        try:
            status, headers, body, stream = await self._send(worker, call)
        except NOT_SENT as exc:
            breaker.failure()
            plan.not_landed(worker)
            if isinstance(exc, aiohttp.ClientConnectorError | upstream.Refused):
                worker.reachable = False
            t.exclude.add(worker.name)
            t.error = NoWorkerAvailable(f"no worker could be reached (last: {worker.name}: {exc})")
            log.info(
                "%s %s: %s unreachable (%s); trying the next worker", call.method, call.path, worker.name, exc
            )
            return "connect", None
        except MAYBE_SENT as exc:
            breaker.failure()
            t.maybe_landed = True
            timed_out = isinstance(exc, TimeoutError)
            what = "timed out" if timed_out else f"failed: {type(exc).__name__}: {exc}"
            error: WalinkError = (UpstreamTimeout if timed_out else UpstreamError)(
                f"worker {worker.name} {what}; the request may or may not have been applied"
            )
            if not call.idempotent:
                raise error from exc
            t.exclude.add(worker.name)
            t.error = error
            return "timeout" if timed_out else "server_error", None
        except BaseException:
            breaker.release()
            raise
        code = error_code(status, body, headers.get("Content-Type", ""))
        answer = Answer(worker, status, headers, body, code, stream)
        if status == 503 and code == "unavailable":
            breaker.release()  # draining on purpose
            worker.draining = True  # no new sessions there until a health check says otherwise
            plan.not_landed(worker)
            t.exclude.add(worker.name)
            t.last = answer
            return "unavailable", None
        if status == 503 and code == SnapshotKeyUnknown.code:
            breaker.success()  # a healthy worker without that snapshot key: another may have it
            plan.not_landed(worker)
            t.exclude.add(worker.name)
            t.last = answer
            return "snapshot_key", None
        if status == 503 and code in SHARED_OUTAGES:
            breaker.success()  # the worker is fine; what it needs is down for every worker alike
            return None, answer
        if status == 409 and code == "not_owner":
            breaker.success()
            plan.not_landed(worker)
            t.last = answer
            return "not_owner", None
        if status >= 500:
            breaker.failure()
            if not call.idempotent:
                return None, answer
            t.maybe_landed = True
            t.exclude.add(worker.name)
            t.last = answer
            return "server_error", None
        breaker.success()
        worker.reachable = True
        return None, answer


def forward_headers(request: web.Request, workspace_id: str | None) -> dict[str, str]:
    """The client's headers a worker may see (never its API key), plus the caller's workspace."""
    headers = {name: value for name in REQUEST_HEADERS if (value := request.headers.get(name))}
    if workspace_id is not None:
        headers[WORKSPACE_HEADER] = workspace_id
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    return headers


def response_headers(answer: Answer) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name in RESPONSE_HEADERS:
        value = answer.headers.get(name)
        if value is not None:
            headers[name] = value
    headers[WORKER_HEADER] = answer.worker.name
    return headers


def to_response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, headers=response_headers(answer))
