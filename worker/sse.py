"""Server-sent events for one session: backlog since ``Last-Event-ID``, then live events."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web

from shared.models import EventType, SessionEvent
from worker.session import Session


def _frame(event: SessionEvent) -> bytes:
    return (
        b"id: "
        + str(event.seq).encode()
        + b"\nevent: "
        + event.type.value.encode()
        + b"\ndata: "
        + orjson.dumps(event.to_dict())
        + b"\n\n"
    )


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None:
        return None
    try:
        return max(0, int(raw))
    except ValueError:
        return None


async def stream(request: web.Request, session: Session, *, keepalive_s: float) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
        }
    )
    queue = session.subscribe()
    try:
        await response.prepare(request)
        after = _last_event_id(request)
        if after is not None:
            backlog = session.events_after(after)
        else:
            # a new listener gets the present: the status and, while linking, the current QR
            backlog = [e for e in session.events if e.type == EventType.STATUS][-1:]
            if session.qr is not None:
                backlog += [e for e in session.events if e.type == EventType.QR][-1:]
        sent = 0
        await response.write(b"retry: 1000\n\n")
        for old in backlog:
            await response.write(_frame(old))
            sent = old.seq
        while True:
            try:
                event: SessionEvent | None = await asyncio.wait_for(queue.get(), keepalive_s)
            except TimeoutError:
                if queue not in session.subscribers:
                    break
                await response.write(b": keepalive\n\n")
                continue
            if event is None:
                break
            if event.seq <= sent:
                continue
            await response.write(_frame(event))
            sent = event.seq
    except ConnectionResetError:
        return response
    finally:
        session.unsubscribe(queue)
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response
