"""The event outbox: events written with the state change, then delivered to webhooks at least once.

Writing: :func:`enqueue` runs on the caller's connection, inside the transaction that changes the
session, so an event exists if and only if its state change committed. It takes the session's next
``seq`` from ``whatsapp_accounts.last_seq`` (the row lock serialises a session's writers, so commit
order is ``seq`` order). :func:`notify` wakes the dispatchers (``NOTIFY`` is delivered at commit, so
it may be sent inside the transaction or after it).

Reading: the feed's cursor ``outbox.id`` is in commit order. A trigger (migration 0008) draws each
id under one transaction-scoped advisory lock held until commit, so a transaction that draws ids
after another waits until that one has ended: once ``id = N`` is visible, no id below ``N`` can
appear later, and ``GET /v1/events?after=`` never skips an event whose transaction committed late.
SSE resume (``Last-Event-ID``) reads by the session's ``seq``, which the session row lock already
keeps in commit order. See docs/durability.md.

Delivering: :class:`WebhookDispatcher` claims due events with ``FOR UPDATE SKIP LOCKED`` in a
one-statement transaction (``claimed_by``/``claimed_until``), POSTs them outside any transaction and
records each attempt. Only the lowest pending ``seq`` of a session can be claimed, so a session's
events go out strictly in order and never two at once, while different sessions go in parallel.
A failed attempt is retried after full-jitter exponential backoff; after ``max_attempts`` the event
is dead-lettered (``state='dead'``), which unblocks the session's later events, and
:meth:`WebhookDispatcher.replay` puts it back. A dispatcher that dies leaves claims that expire after
``claim_ttl_s``; another one takes them over. A result is only written while the claim is still
ours, so a dispatcher that lost its claim cannot overwrite the new owner's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from shared import metrics
from shared.aio import stop_loops
from shared.db import Conn
from shared.errors import BadRequest, WalinkError
from shared.models import SessionEvent, now_ms
from shared.webhook_guard import PUBLIC_ONLY, DeliveryRefused, Resolve, WebhookAllow, resolve_system, vet
from shared.webhooks import build_payload, delivery_headers

log = logging.getLogger("walink.webhooks")

CHANNEL = "walink_outbox"
MIN_RETRY_DELAY_S = 0.05  # the floor of a retry's backoff
MIN_IDLE_WAIT_S = 0.05  # the floor of an idle wait, so a race can never turn the loop into a spin
ERROR_BACKOFF_MAX_S = 5.0  # run(): the longest pause after Postgres or the network failed
_EXPECTED_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_SNIPPET_BYTES = 300  # how much of a refusing receiver's body is kept in last_error

_EVENT_COLUMNS = """
    id, event_id::text AS event_id, workspace_id, session_id, seq, type, payload::text AS payload,
    webhook_url, state, attempts, (extract(epoch FROM created_at) * 1000)::bigint AS created_at_ms
"""
_SELECT_EVENTS = "SELECT" + _EVENT_COLUMNS + "FROM outbox"

_INSERT_SQL = (
    """
INSERT INTO outbox (event_id, workspace_id, session_id, seq, type, payload, webhook_url, state)
VALUES ($1::uuid, $2, $3, $4, $5, $6::text::jsonb, $7, $8)
RETURNING"""
    + _EVENT_COLUMNS
)

# an event's endpoint lane: its URL's scheme://authority, lower-cased (the same as lane_of() below)
_LANE_SQL = r"coalesce(lower(substring(o.webhook_url from '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*')), '')"

# The due events that can start now. Only the lowest pending seq of its session (nothing earlier of
# the same session is still pending) is claimable: strict per-session order, never two at once.
# Endpoints are lanes: $4/$5 are the lanes with deliveries in flight and how many, $6 a lane's cap;
# a full lane is not even scanned, and at most its free places are taken from a partly full one, so
# a slow endpoint only ever holds its own lane's places (and a claim is only taken to start at once).
_CLAIM_SQL = """
WITH busy AS (
    SELECT b.lane, b.in_flight FROM unnest($4::text[], $5::int[]) AS b(lane, in_flight)
), candidates AS (
    SELECT o.id, o.next_attempt_at, LANE AS lane
    FROM outbox o
    WHERE o.state = 'pending'
      AND o.next_attempt_at <= now()
      AND (o.claimed_until IS NULL OR o.claimed_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM outbox e
          WHERE e.session_id = o.session_id AND e.state = 'pending' AND e.seq < o.seq
      )
      AND NOT EXISTS (SELECT 1 FROM busy b WHERE b.lane = LANE AND b.in_flight >= $6)
    ORDER BY o.next_attempt_at, o.id
    LIMIT $7
    FOR UPDATE OF o SKIP LOCKED
), ranked AS (
    SELECT c.id, c.next_attempt_at,
           row_number() OVER (PARTITION BY c.lane ORDER BY c.next_attempt_at, c.id) AS place,
           $6 - coalesce((SELECT b.in_flight FROM busy b WHERE b.lane = c.lane), 0) AS free
    FROM candidates c
), due AS (
    SELECT r.id FROM ranked r WHERE r.place <= r.free ORDER BY r.next_attempt_at, r.id LIMIT $3
)
UPDATE outbox o
SET claimed_by = $1, claimed_until = now() + $2 * interval '1 second'
FROM due
WHERE o.id = due.id
RETURNING o.id, o.event_id::text AS event_id, o.workspace_id, o.session_id, o.seq, o.type,
    o.payload::text AS payload, o.webhook_url, o.state, o.attempts,
    (extract(epoch FROM o.created_at) * 1000)::bigint AS created_at_ms,
    (SELECT w.webhook_secret FROM workspaces w WHERE w.id = o.workspace_id) AS secret,
    (SELECT w.webhook_secret_previous FROM workspaces w
     WHERE w.id = o.workspace_id AND w.webhook_secret_previous_until > now()) AS previous_secret,
    (SELECT a.webhook_events FROM whatsapp_accounts a WHERE a.id = o.session_id) AS event_filter
""".replace("LANE", _LANE_SQL)

# seconds until the next event becomes claimable (negative: already due), leaving out the full
# lanes ($1); NULL: nothing pending
_NEXT_DUE_SQL = """
SELECT extract(epoch FROM min(greatest(o.next_attempt_at, coalesce(o.claimed_until, o.next_attempt_at)))
               - clock_timestamp())::float8
FROM outbox o
WHERE o.state = 'pending' AND NOT EXISTS (
    SELECT 1 FROM outbox e
    WHERE e.session_id = o.session_id AND e.state = 'pending' AND e.seq < o.seq
) AND NOT (LANE = ANY($1::text[]))
""".replace("LANE", _LANE_SQL)

_DELIVERED_SQL = """
UPDATE outbox
SET state = 'delivered', delivered_at = now(), attempts = attempts + 1, last_error = NULL,
    claimed_by = NULL, claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND state = 'pending'
RETURNING state
"""

_FAILED_SQL = """
UPDATE outbox
SET attempts = attempts + 1,
    state = CASE WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END,
    next_attempt_at = CASE WHEN attempts + 1 >= $3 THEN next_attempt_at
                           ELSE now() + $4 * interval '1 second' END,
    last_error = $5, claimed_by = NULL, claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND state = 'pending'
RETURNING state
"""

# refused by the SSRF guard: dead at once (retrying would ask the same question again); a replay
# after the operator changed WALINK_WEBHOOK_ALLOW (or the tenant its URL's DNS) tries again
_REFUSED_SQL = """
UPDATE outbox
SET attempts = attempts + 1, state = 'dead', last_error = $3, claimed_by = NULL, claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND state = 'pending'
RETURNING state
"""

# not a type the session's events filter names: kept for GET /v1/events, never POSTed
_FILTERED_SQL = """
UPDATE outbox
SET state = 'skipped', last_error = $3, claimed_by = NULL, claimed_until = NULL
WHERE id = $1 AND claimed_by = $2 AND state = 'pending'
RETURNING state
"""

# attempt: 1, 2, 3... over the event's whole life (a replay goes on counting, unlike outbox.attempts)
_ATTEMPT_SQL = """
INSERT INTO delivery_attempts (event_id, attempt, worker, status_code, error, duration_ms)
VALUES ($1::uuid, (SELECT count(*) + 1 FROM delivery_attempts WHERE event_id = $1::uuid), $2, $3, $4, $5)
"""

_RELEASE_SQL = """
UPDATE outbox SET claimed_by = NULL, claimed_until = NULL
WHERE id = ANY($1::bigint[]) AND claimed_by = $2 AND state = 'pending'
"""

_LANE_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def lane_of(webhook_url: str) -> str:
    """An endpoint's delivery lane: its URL's ``scheme://authority``, lower-cased (as ``_LANE_SQL``)."""
    match = _LANE_RE.match(webhook_url)
    return match.group(0).lower() if match else ""


class InvalidDispatcherConfig(WalinkError, ValueError):
    code = "invalid_dispatcher_config"


class DispatcherRunning(WalinkError, RuntimeError):
    """``run()`` was called on a dispatcher whose loop already runs (or that was closed)."""

    code = "dispatcher_running"


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: int
    event_id: str
    workspace_id: str
    session_id: str
    seq: int
    type: str
    payload: dict[str, Any]
    webhook_url: str | None
    state: str
    attempts: int
    created_at_ms: int

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> OutboxEvent:
        raw = record["payload"]
        payload: dict[str, Any] = orjson.loads(raw) if isinstance(raw, str | bytes) else dict(raw)
        return cls(
            id=int(record["id"]),
            event_id=str(record["event_id"]),
            workspace_id=str(record["workspace_id"]),
            session_id=str(record["session_id"]),
            seq=int(record["seq"]),
            type=str(record["type"]),
            payload=payload,
            webhook_url=record["webhook_url"],
            state=str(record["state"]),
            attempts=int(record["attempts"]),
            created_at_ms=int(record["created_at_ms"]),
        )

    def session_event(self) -> SessionEvent:
        """The committed event as SSE subscribers get it (seq, type, the payload's data)."""
        data = dict(self.payload.get("data") or {})
        return SessionEvent(
            self.seq,
            self.type,
            {"session_id": self.session_id, **data},
            at_ms=int(self.payload.get("occurred_at_ms") or self.created_at_ms),
            event_id=self.event_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """The shape of ``GET /v1/events`` items."""
        return {
            "id": self.id,
            "event_id": self.event_id,
            "session_id": self.session_id,
            "seq": self.seq,
            "type": self.type,
            "state": self.state,
            "attempts": self.attempts,
            "payload": self.payload,
            "created_at_ms": self.created_at_ms,
        }


# --------------------------------------------------------------------------------------------- writing


async def _next_seq(conn: Conn, session_id: str) -> int:
    # greatest(...): a session whose events were written before its account row existed keeps counting
    seq = await conn.fetchval(
        "UPDATE whatsapp_accounts"
        " SET last_seq = greatest(last_seq, (SELECT coalesce(max(seq), 0) FROM outbox WHERE session_id = $1))"
        " + 1"
        " WHERE id = $1 RETURNING last_seq",
        session_id,
    )
    if seq is None:
        # no account row (tests, tools): serialise this session's writers with a transaction lock
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", "walink.outbox:" + session_id
        )
        seq = await conn.fetchval(
            "SELECT coalesce(max(seq), 0) + 1 FROM outbox WHERE session_id = $1", session_id
        )
    return int(seq)


async def enqueue(
    conn: Conn,
    *,
    workspace_id: str,
    session_id: str,
    type: str,
    data: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    webhook_url: str | None,
    occurred_at_ms: int | None = None,
    event_id: str | None = None,
) -> OutboxEvent:
    """Write one event (call it inside the transaction of the state change it reports).

    ``event_id`` (a UUID) may be chosen by the caller, so a retried write can find out whether
    an earlier attempt committed (:func:`events_by_id`); otherwise a new one is drawn.
    ``webhook_url`` None (or empty) writes the event as ``skipped``: it is kept for ``GET /v1/events``
    and SSE resume but never POSTed. Outside a transaction the seq bump and the insert get their own.
    """
    own_transaction = contextlib.nullcontext() if conn.is_in_transaction() else conn.transaction()
    async with own_transaction:
        seq = await _next_seq(conn, session_id)
        event_id = str(uuid.UUID(event_id)) if event_id is not None else str(uuid.uuid4())
        payload = build_payload(
            event_id=event_id,
            type=type,
            seq=seq,
            session_id=session_id,
            workspace_id=workspace_id,
            occurred_at_ms=now_ms() if occurred_at_ms is None else occurred_at_ms,
            metadata=metadata,
            data=data,
        )
        record = await conn.fetchrow(
            _INSERT_SQL,
            event_id,
            workspace_id,
            session_id,
            seq,
            type,
            orjson.dumps(payload).decode(),
            webhook_url,
            "pending" if webhook_url else "skipped",
        )
        assert record is not None
        return OutboxEvent.from_record(record)


async def notify(conn: Conn) -> None:
    """Wake the dispatchers (delivered at commit when sent inside a transaction)."""
    await conn.execute(f"NOTIFY {CHANNEL}")


# --------------------------------------------------------------------------------------------- reading


def _clamp_limit(limit: int, maximum: int) -> int:
    return max(1, min(int(limit), maximum))


async def events_after(
    pool: asyncpg.Pool, *, workspace_id: str, after_id: int, limit: int = 100
) -> list[dict[str, Any]]:
    """A workspace's events with ``id > after_id`` in id order (``GET /v1/events?after=``).

    Gap-free: ids become visible in increasing order (see the module's "Reading"), so a client
    that passes the last ``id`` it saw gets every later event exactly once."""
    rows = await pool.fetch(
        _SELECT_EVENTS + " WHERE workspace_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        workspace_id,
        int(after_id),
        _clamp_limit(limit, 1000),
    )
    return [OutboxEvent.from_record(r).to_dict() for r in rows]


async def session_events_after(
    pool: asyncpg.Pool, *, session_id: str, after_seq: int, limit: int = 500
) -> list[OutboxEvent]:
    """A session's events with ``seq > after_seq`` in seq order (SSE ``Last-Event-ID`` resume).

    Gap-free per session: a session's ``seq`` is drawn under its account row's lock (held until
    commit), so its events commit in ``seq`` order."""
    rows = await pool.fetch(
        _SELECT_EVENTS + " WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        session_id,
        int(after_seq),
        _clamp_limit(limit, 5000),
    )
    return [OutboxEvent.from_record(r) for r in rows]


async def events_by_id(pool: asyncpg.Pool, event_ids: list[str]) -> list[OutboxEvent]:
    """The outbox events with these ids, in session and ``seq`` order (absent ids are left out)."""
    rows = await pool.fetch(
        _SELECT_EVENTS + " WHERE event_id = ANY($1::uuid[]) ORDER BY session_id, seq",
        _check_event_ids(event_ids),
    )
    return [OutboxEvent.from_record(r) for r in rows]


def _check_event_ids(event_ids: Iterable[str]) -> list[str]:
    checked: list[str] = []
    for value in event_ids:
        try:
            checked.append(str(uuid.UUID(str(value))))
        except ValueError:
            raise BadRequest(f"not an event id: {str(value)[:64]!r}") from None
    return checked


async def delivery_log(pool: asyncpg.Pool, event_id: str) -> list[dict[str, Any]]:
    """Every delivery attempt of an event, oldest first."""
    (checked,) = _check_event_ids([event_id])
    rows = await pool.fetch(
        "SELECT attempt, (extract(epoch FROM at) * 1000)::bigint AS at_ms, worker, status_code, error,"
        " duration_ms FROM delivery_attempts WHERE event_id = $1::uuid ORDER BY id",
        checked,
    )
    return [dict(r) for r in rows]


# --------------------------------------------------------------------------------------------- delivering


@dataclass(frozen=True, slots=True)
class _Claimed:
    event: OutboxEvent
    secret: str | None = field(repr=False)  # secrets never reach a log line, not even by repr()
    previous_secret: str | None = field(default=None, repr=False)  # signs too during an overlap
    event_filter: tuple[str, ...] | None = None  # the session's webhook event types (None: all)

    @property
    def lane(self) -> str:
        return lane_of(self.event.webhook_url or "")

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> _Claimed:
        raw_filter = record["event_filter"]
        return cls(
            OutboxEvent.from_record(record),
            record["secret"],
            record["previous_secret"],
            None if raw_filter is None else tuple(raw_filter),
        )


@dataclass(frozen=True, slots=True)
class _Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int
    detail: str  # for last_error and logs
    refused: bool = False  # the SSRF guard refused the destination: dead at once

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookDispatcher:
    """Delivers the outbox. Any number may run at once, in one process or many.

    Each endpoint (``scheme://host:port`` of the URL) is a lane with at most ``lane_concurrency``
    deliveries in flight, and the dispatcher has at most ``batch_size`` in flight overall. ``run()``
    starts a delivery as soon as it is claimed and claims more as places free up, so a slow or
    hanging endpoint holds its own lane's places and nothing else; each attempt is bounded by
    ``attempt_timeout_s``. Destinations pass the SSRF guard (:mod:`shared.webhook_guard`) with
    ``allow`` as the operator's allowlist (default: public addresses only).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        http: aiohttp.ClientSession,
        *,
        worker_name: str,
        allow: WebhookAllow = PUBLIC_ONLY,
        resolve: Resolve = resolve_system,
        attempt_timeout_s: float = 5.0,
        max_attempts: int = 8,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 300.0,
        claim_ttl_s: float = 30.0,
        batch_size: int = 32,
        lane_concurrency: int = 4,
        idle_wait_s: float = 5.0,
    ) -> None:
        if attempt_timeout_s <= 0 or claim_ttl_s <= attempt_timeout_s:
            # a claim must outlive the attempt (its DNS lookup included), or another dispatcher
            # could start a second POST
            raise InvalidDispatcherConfig("need 0 < attempt_timeout_s < claim_ttl_s")
        if (
            max_attempts < 1
            or batch_size < 1
            or lane_concurrency < 1
            or idle_wait_s <= 0
            or backoff_base_s < 0
            or backoff_max_s < 0
        ):
            raise InvalidDispatcherConfig(
                "max_attempts, batch_size and lane_concurrency must be >= 1, idle_wait_s > 0, backoffs >= 0"
            )
        self.pool = pool
        self.http = http
        self.worker_name = worker_name
        self.allow = allow
        self.resolve = resolve
        # claimed_by: the worker's name plus an instance tag, so two dispatchers never share a claim
        self.claim_id = f"{worker_name}:{uuid.uuid4().hex[:8]}"
        self.attempt_timeout_s = attempt_timeout_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.claim_ttl_s = claim_ttl_s
        self.batch_size = batch_size
        self.lane_concurrency = lane_concurrency
        self.idle_wait_s = idle_wait_s
        self.idle = asyncio.Event()  # set while run() waits with nothing in flight (tests, health)
        self._wake = asyncio.Event()
        self._listen_conn: PoolConnectionProxy | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._closed = False
        # outbox id -> (lane, task) of every delivery started and not finished
        self._in_flight: dict[int, tuple[str, asyncio.Task[int]]] = {}

    def is_listening(self) -> bool:
        """True while run() holds its LISTEN connection (taken from the pool)."""
        return self._listen_conn is not None

    def in_flight(self) -> dict[str, int]:
        """Deliveries in flight now, by lane (``scheme://host:port``)."""
        counts: dict[str, int] = {}
        for lane, _task in self._in_flight.values():
            counts[lane] = counts.get(lane, 0) + 1
        return counts

    def retry_delay_s(self, attempts: int) -> float:
        """Full-jitter exponential backoff after the ``attempts``-th failed attempt."""
        exponent = min(max(0, attempts - 1), 60)  # bounded: 2**1100 would not fit in a float
        cap_s = min(self.backoff_max_s, self.backoff_base_s * 2**exponent)
        return max(MIN_RETRY_DELAY_S, random.uniform(0, cap_s))

    def _full_lanes(self) -> list[str]:
        return [lane for lane, n in self.in_flight().items() if n >= self.lane_concurrency]

    # ----------------------------------------------------------------------------------------- one pass

    async def _claim(self, limit: int) -> list[_Claimed]:
        busy = self.in_flight()
        rows = await self.pool.fetch(
            _CLAIM_SQL,
            self.claim_id,
            self.claim_ttl_s,
            limit,
            list(busy),
            list(busy.values()),
            self.lane_concurrency,
            max(64, limit * 4),  # scanned: enough that a partly full lane leaves room for the others
        )
        return [_Claimed.from_record(r) for r in rows]

    async def start_due(self) -> list[asyncio.Task[int]]:
        """Claim what may start now (overall and per-lane places) and start delivering it."""
        free = self.batch_size - len(self._in_flight)
        if free <= 0:
            return []
        started = []
        for claim in await self._claim(free):
            task = asyncio.create_task(self._deliver(claim), name=f"webhook-{claim.event.event_id}")
            self._in_flight[claim.event.id] = (claim.lane, task)
            task.add_done_callback(functools.partial(self._finished, claim.event.id))
            started.append(task)
        return started

    def _finished(self, outbox_id: int, _task: asyncio.Task[int]) -> None:
        self._in_flight.pop(outbox_id, None)
        self._wake.set()  # a place is free: the loop may claim again

    async def deliver_due(self) -> int:
        """Claim due events, deliver them and wait for the outcomes; returns attempts made.

        (``run()`` does not wait: it claims again as soon as places free up.)
        """
        started = await self.start_due()
        if not started:
            return 0
        results = await asyncio.gather(*started, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        attempts = sum(r for r in results if isinstance(r, int))
        if errors and not attempts:
            raise errors[0]  # nothing could be done (Postgres down? a closed client?): let run() back off
        return attempts

    async def _release(self, ids: set[int]) -> None:
        """Best effort: give back claims whose outcome was not written (they expire anyway)."""
        if not ids:
            return
        try:
            await asyncio.wait_for(self.pool.execute(_RELEASE_SQL, list(ids), self.claim_id), 2.0)
        except Exception as exc:
            log.warning("releasing %d webhook claims: %s: %s", len(ids), type(exc).__name__, exc)

    async def _post(self, claim: _Claimed) -> _Outcome:
        """One attempt, its DNS lookup included, within ``attempt_timeout_s``."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.attempt_timeout_s):
                return await self._attempt(claim, started)
        except TimeoutError:
            error = f"timeout after {self.attempt_timeout_s:g} s"
            return _Outcome(None, error, int((time.perf_counter() - started) * 1000), error)

    async def _attempt(self, claim: _Claimed, started: float) -> _Outcome:
        event = claim.event

        def elapsed_ms() -> int:
            return int((time.perf_counter() - started) * 1000)

        if not claim.secret:
            return _Outcome(None, "workspace has no webhook secret", 0, "workspace has no webhook secret")
        assert event.webhook_url is not None  # a pending event always has a URL
        try:
            destination = await vet(event.webhook_url, self.allow, self.resolve)
        except DeliveryRefused as exc:
            return _Outcome(None, exc.message, elapsed_ms(), exc.message, refused=True)
        except OSError as exc:  # DNS failed: the receiver's side, retried
            error = f"{type(exc).__name__}: {exc}"[:500]
            return _Outcome(None, error, elapsed_ms(), error)
        body = orjson.dumps(event.payload)
        headers = delivery_headers(
            secret=claim.secret,
            previous_secrets=[claim.previous_secret] if claim.previous_secret else [],
            body=body,
            event_type=event.type,
            event_id=event.event_id,
        )
        headers["Host"] = destination.host_header
        tls_name = destination.host if event.webhook_url.lower().startswith("https:") else None
        last_error = "no address"
        for address in destination.addresses:  # the vetted addresses only, as literals: no second lookup
            try:
                async with self.http.post(
                    destination.url_for(address),
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.attempt_timeout_s),
                    allow_redirects=False,  # a redirect is a failure: the signed body goes to one place only
                    server_hostname=tls_name,
                ) as resp:
                    status = resp.status
                    snippet = b"" if 200 <= status < 300 else await resp.content.read(_SNIPPET_BYTES)
            except aiohttp.ClientConnectorError as exc:  # not reached: try the next vetted address
                last_error = f"{type(exc).__name__}: {exc}"[:500]
                continue
            except TimeoutError:
                raise  # the attempt's deadline: _post() says so
            except (aiohttp.ClientError, OSError, ValueError) as exc:  # the receiver's side: failed attempt
                # (a local fault such as a closed ClientSession propagates instead: it must not burn the
                # event's retry budget, and the claim is handed back)
                error = f"{type(exc).__name__}: {exc}"[:500]
                return _Outcome(None, error, elapsed_ms(), error)
            detail = f"HTTP {status}"
            if snippet:
                detail += ": " + snippet.decode("utf-8", "replace")
            return _Outcome(status, None, elapsed_ms(), detail)
        return _Outcome(None, last_error, elapsed_ms(), last_error)

    async def _record(self, claim: _Claimed, outcome: _Outcome | None) -> str | None:
        """Write an attempt's outcome (None: filtered out, nothing was sent); returns the new state."""
        event = claim.event
        async with self.pool.acquire() as conn, conn.transaction():
            if outcome is None:
                state: str | None = await conn.fetchval(
                    _FILTERED_SQL, event.id, self.claim_id, "filtered: not in the session's events filter"
                )
                return state
            if outcome.ok:
                state = await conn.fetchval(_DELIVERED_SQL, event.id, self.claim_id)
            elif outcome.refused:
                state = await conn.fetchval(_REFUSED_SQL, event.id, self.claim_id, outcome.detail)
            else:
                state = await conn.fetchval(
                    _FAILED_SQL,
                    event.id,
                    self.claim_id,
                    self.max_attempts,
                    self.retry_delay_s(event.attempts + 1),
                    outcome.detail,
                )
            await conn.execute(
                _ATTEMPT_SQL,
                event.event_id,
                self.worker_name,
                outcome.status_code,
                outcome.error,
                outcome.duration_ms,
            )
        return state

    async def _deliver(self, claim: _Claimed) -> int:
        """One claimed event: POST it (unless filtered out) and record the outcome; returns attempts made."""
        event = claim.event
        try:
            filtered = claim.event_filter is not None and event.type not in claim.event_filter
            outcome = None if filtered else await self._post(claim)
            # the outcome is written even if we are cancelled meanwhile (shutdown): a POST that was
            # made is recorded, so it is not made again for nothing
            writing = asyncio.ensure_future(self._record(claim, outcome))
            try:
                state = await asyncio.shield(writing)
            except asyncio.CancelledError:
                await asyncio.wait({writing}, timeout=2.0)
                raise
        except BaseException as exc:
            await self._release({event.id})
            if not isinstance(exc, asyncio.CancelledError):
                log.error(
                    "webhook %s (session %s seq %d): delivery broke off: %s: %s",
                    event.event_id,
                    event.session_id,
                    event.seq,
                    type(exc).__name__,
                    exc,
                )
            raise
        self._log_outcome(claim, outcome, state)
        return 0 if outcome is None else 1

    def _log_outcome(self, claim: _Claimed, outcome: _Outcome | None, state: str | None) -> None:
        event = claim.event
        if outcome is None:
            label = "filtered" if state == "skipped" else "lost"
        elif outcome.refused and state == "dead":
            label = "refused"
        else:
            label = {"delivered": "delivered", "dead": "dead", None: "lost"}.get(state, "retry")
        metrics.WEBHOOK_DELIVERIES.labels(label).inc()
        attempt = event.attempts + 1
        detail = "filtered out" if outcome is None else outcome.detail
        if state == "delivered" and outcome is not None:
            metrics.WEBHOOK_LAG.observe(
                max(0.0, now_ms() - int(event.payload.get("occurred_at_ms") or 0)) / 1000
            )
            log.debug(
                "webhook %s %s session %s seq %d delivered in %d ms",
                event.event_id,
                event.type,
                event.session_id,
                event.seq,
                outcome.duration_ms,
            )
        elif state is None:
            log.warning(
                "webhook %s (session %s seq %d): claim lost before the result was written (%s)",
                event.event_id,
                event.session_id,
                event.seq,
                detail,
            )
        elif state == "skipped":
            log.debug("webhook %s %s session %s filtered out", event.event_id, event.type, event.session_id)
        elif state == "dead":
            log.error(
                "webhook %s %s session %s seq %d dead-lettered after %d attempts: %s",
                event.event_id,
                event.type,
                event.session_id,
                event.seq,
                attempt,
                detail,
            )
        else:
            log.warning(
                "webhook %s session %s seq %d attempt %d failed: %s",
                event.event_id,
                event.session_id,
                event.seq,
                attempt,
                detail,
            )

    # ----------------------------------------------------------------------------------------- the loop

    def _on_notify(self, con_ref: object, pid: int, channel: str, payload: object, /) -> None:
        self._wake.set()

    def _on_terminate(self, con_ref: object, /) -> None:
        self._wake.set()  # the loop notices the closed connection and listens again

    async def _listen(self) -> None:
        if self._listen_conn is not None and not self._listen_conn.is_closed():
            return
        await self._unlisten()
        conn = await self.pool.acquire()
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(self._on_terminate)
        except BaseException:
            await self.pool.release(conn)
            raise
        self._listen_conn = conn

    async def _unlisten(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is None:
            return
        try:
            conn.remove_termination_listener(self._on_terminate)
            if not conn.is_closed():
                await asyncio.wait_for(conn.remove_listener(CHANNEL, self._on_notify), 2.0)
            await asyncio.wait_for(self.pool.release(conn), 2.0)
        except Exception as exc:
            log.warning("closing the outbox listener connection: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                conn.terminate()
                await self.pool.release(conn)

    async def next_due_in_s(self) -> float | None:
        """Seconds until an event of a lane with room becomes claimable (<= 0: now); None: nothing pending."""
        value = await self.pool.fetchval(_NEXT_DUE_SQL, self._full_lanes())
        return None if value is None else float(value)

    async def wait_for_work(self) -> None:
        """Sleep until a NOTIFY, a finished delivery, the next due event or ``idle_wait_s`` (the first)."""
        if len(self._in_flight) >= self.batch_size:
            due_in_s: float | None = None  # no place free: only a finished delivery (or a NOTIFY) helps
        else:
            due_in_s = await self.next_due_in_s()
        wait_s = self.idle_wait_s if due_in_s is None else min(self.idle_wait_s, due_in_s)
        wait_s = max(MIN_IDLE_WAIT_S, wait_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait_s)

    async def run(self) -> None:
        """Deliver until cancelled (or :meth:`close`). Errors are logged and retried, never fatal."""
        if self._closed or (self._run_task is not None and not self._run_task.done()):
            raise DispatcherRunning("this dispatcher is closed or its loop already runs")
        self._run_task = asyncio.current_task()
        failures = 0
        log.info("webhook dispatcher %s started", self.claim_id)
        try:
            while True:
                try:
                    await self._listen()  # before the pass, so no NOTIFY of a later commit is missed
                    self._wake.clear()
                    self.idle.clear()
                    if await self.start_due():
                        failures = 0
                        continue
                    failures = 0
                    if not self._in_flight:
                        self.idle.set()
                    await self.wait_for_work()
                except Exception as exc:  # Postgres or the network failed: log, back off, go on
                    failures += 1
                    pause_s = random.uniform(0.5, 1.0) * min(ERROR_BACKOFF_MAX_S, 0.1 * 2**failures)
                    log.warning(
                        "webhook dispatcher %s: %s: %s; retrying in %.2f s",
                        self.claim_id,
                        type(exc).__name__,
                        exc,
                        pause_s,
                        exc_info=not isinstance(exc, _EXPECTED_ERRORS),
                    )
                    await self._unlisten()
                    await asyncio.sleep(pause_s)
        finally:
            self.idle.clear()
            await self._stop_deliveries()
            await self._unlisten()
            log.info("webhook dispatcher %s stopped", self.claim_id)

    async def _stop_deliveries(self) -> None:
        """Cancel the deliveries in flight; each hands its claim back (or records what it sent)."""
        tasks = [task for _lane, task in self._in_flight.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def close(self) -> None:
        """Stop the loop (if running) and give the listener connection back to the pool."""
        self._closed = True
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            await stop_loops(task)
        await self._stop_deliveries()
        await self._unlisten()

    # ----------------------------------------------------------------------------------------- operations

    async def replay(self, *, workspace_id: str | None = None, event_ids: list[str] | None = None) -> int:
        """Dead-lettered events (optionally only these) back to pending, due now; returns how many."""
        ids = None if event_ids is None else _check_event_ids(event_ids)
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = now(),"
                " claimed_by = NULL, claimed_until = NULL, last_error = NULL"
                " WHERE state = 'dead' AND webhook_url IS NOT NULL"
                " AND ($1::text IS NULL OR workspace_id = $1)"
                " AND ($2::uuid[] IS NULL OR event_id = ANY($2::uuid[]))"
                " RETURNING id",
                workspace_id,
                ids,
            )
            if rows:
                await notify(conn)
        log.info("replayed %d dead webhook events (workspace %s)", len(rows), workspace_id or "*")
        return len(rows)
