"""Server-sent events for one session: the backlog since ``Last-Event-ID``, then live events.

On the worker that drives the session, live events come from memory right after commit. On any
other process they come from Redis pub/sub (a hint) and, at every keep-alive, from the outbox
(the record), so a missed publish costs at most one keep-alive period and never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from shared import outbox
from shared.models import EventType, SessionEvent, sse_name
from worker.session import Notice, Session


def frame(event: SessionEvent) -> bytes:
    return (
        b"id: "
        + str(event.seq).encode()
        + b"\nevent: "
        + sse_name(event.type).encode()
        + b"\ndata: "
        + orjson.dumps(event.to_dict())
        + b"\n\n"
    )


def notice_frame(notice: Notice) -> bytes:
    """A notice has no ``id:``: a resumed stream's ``Last-Event-ID`` stays the last event's."""
    return b"event: " + notice.name.encode() + b"\ndata: " + orjson.dumps(notice.data) + b"\n\n"


MAX_SEQ = 2**62


def last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None:
        return None
    try:
        return min(max(0, int(raw)), MAX_SEQ)  # a bigint in Postgres: larger means "after all of them"
    except ValueError:
        return None


def present(events: list[SessionEvent], status: str | None) -> list[SessionEvent]:
    """What a new listener needs: the latest status and, while linking, the latest QR."""
    latest_status = [e for e in events if e.type == EventType.STATUS][-1:]
    latest_qr = [e for e in events if e.type == EventType.QR][-1:] if status == "qr" else []
    return sorted(latest_status + latest_qr, key=lambda e: e.seq)


async def events_after(
    pool: Any, session_id: str, after_seq: int, *, limit: int | None = None
) -> list[SessionEvent]:
    """The session's committed events with ``seq > after_seq``, from the outbox (its default page
    size unless ``limit`` is given)."""
    page = {} if limit is None else {"limit": limit}
    rows = await outbox.session_events_after(pool, session_id=session_id, after_seq=after_seq, **page)
    return [e.session_event() for e in rows]


async def _open(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            **(headers or {}),
        }
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    return response


async def stream_local(
    request: web.Request, session: Session, pool: Any, *, keepalive_s: float
) -> web.StreamResponse:
    queue = session.subscribe()
    response: web.StreamResponse | None = None
    try:
        response = await _open(request)
        after = last_event_id(request)
        if after is None:
            backlog = present(list(session.events), session.status.value)
        else:
            memory = session.backlog_after(after)
            backlog = memory if memory is not None else await events_after(pool, session.id, after)
        sent = after or 0
        for event in backlog:
            await response.write(frame(event))
            sent = max(sent, event.seq)
        if session.queued is not None and session.status.value == "starting":
            await response.write(notice_frame(session.queued))
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                if queue not in session.subscribers:
                    break
                await response.write(b": keepalive\n\n")
                continue
            if item is None:
                break
            if isinstance(item, Notice):
                await response.write(notice_frame(item))
                continue
            if item.seq <= sent:
                continue
            await response.write(frame(item))
            sent = item.seq
    except ConnectionResetError:
        pass
    finally:
        session.unsubscribe(queue)
    if response is not None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response
    return web.Response(status=204)


async def _pubsub(redis: aioredis.Redis, channel: str) -> AsyncGenerator[SessionEvent | None, None]:
    """Live events from Redis; yields None when Redis is unreachable (the caller uses the outbox)."""
    try:
        pubsub = redis.pubsub()
        await pubsub.subscribe(channel)
    except (RedisError, OSError):
        while True:
            yield None
    try:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError):
                yield None
                continue
            if message is None:
                yield None
                continue
            data = orjson.loads(message["data"])
            kind = str(data.pop("type"))
            seq = int(data.pop("seq"))
            at_ms = int(data.pop("at_ms", 0))
            event_id = str(data.pop("event_id", ""))
            yield SessionEvent(seq, kind, data, at_ms=at_ms, event_id=event_id)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def stream_remote(
    request: web.Request,
    session_id: str,
    status: str,
    pool: Any,
    redis: aioredis.Redis,
    channel: str,
    *,
    keepalive_s: float,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """The stream of a session driven by another process."""
    response = await _open(request, headers)
    live = _pubsub(redis, channel)
    after = last_event_id(request)
    try:
        if after is None:
            history = await events_after(pool, session_id, 0, limit=5000)
            backlog = present(history, status)
            sent = history[-1].seq if history else 0
        else:
            backlog = await events_after(pool, session_id, after)
            sent = after
        for event in backlog:
            await response.write(frame(event))
        sent = max([sent, *(e.seq for e in backlog)])
        quiet_s = 0.0
        async for item in live:
            if item is None:
                quiet_s += 1.0
                if quiet_s < keepalive_s:
                    continue
                quiet_s = 0.0
                # the record: anything pub/sub did not bring
                for ev in await events_after(pool, session_id, sent):
                    await response.write(frame(ev))
                    sent = ev.seq
                await response.write(b": keepalive\n\n")
                continue
            if item.seq <= sent:
                continue
            if item.seq > sent + 1:  # a gap: fill it from the outbox first
                for ev in await events_after(pool, session_id, sent):
                    if ev.seq < item.seq:
                        await response.write(frame(ev))
            await response.write(frame(item))
            sent = item.seq
    except ConnectionResetError:
        pass
    finally:
        await live.aclose()
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response
