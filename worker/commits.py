"""Committing a session: its state and pending events go to Postgres in one transaction, fenced
by the session's lease token, and only then are the events delivered (SSE, Redis, webhooks).

A commit, once started, is never cancelled: it runs in a task of its own that the caller awaits
through :func:`asyncio.shield`, so a cancelled caller (a shutdown cancelling the session's work,
a client that went away) cannot lose events it already took from ``pending``. Shutdown waits for
the commits in flight (:meth:`Commits.drain`, within a deadline below supervisord's
``stopwaitsecs``). A commit that cannot reach Postgres is retried under the project's backoff
policy (:mod:`shared.retry`: bounded attempts and time, with jitter); when that budget is spent,
its events go back to the front of ``pending`` for the next round, or — for a caller that must
know (``strict``, e.g. DELETE) — :class:`~shared.errors.DatabaseUnavailable` (503).

Once an ended session's end is committed, it is retired: nothing of it stays on this worker.
"""

from __future__ import annotations

import asyncio
import logging

from shared import metrics, retry
from shared.errors import DatabaseUnavailable, StaleOwner
from shared.models import EventType, Reason, SessionStatus
from shared.outbox import OutboxEvent
from worker.context import DB_ERRORS, Context
from worker.ending import Ending
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus


class Commits:
    def __init__(self, ctx: Context, ending: Ending) -> None:
        self._ctx = ctx
        self._ending = ending
        self._in_flight: set[asyncio.Task[None]] = set()

    def flush(self, session: Session) -> None:
        if session.pending:
            self._ctx.tasks.spawn(session, self.write(session), cancel_on_end=False)

    async def write(self, session: Session, *, deleted: bool = False, strict: bool = False) -> None:
        """Commit the session's state with its pending events, then deliver them (in order).

        ``strict``: raise :class:`DatabaseUnavailable` when it could not be committed (the events
        are back in ``pending``, the caller takes out its own) instead of retrying in a later round."""
        task = asyncio.ensure_future(self._commit(session, deleted=deleted, strict=strict))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        await asyncio.shield(task)

    async def drain(self, deadline_s: float) -> int:
        """Shutdown: every session's pending events committed, and every commit in flight finished,
        within ``deadline_s``; returns how many events are still not committed (logged)."""
        for session in list(self._ctx.sessions.values()):
            if session.pending:
                task = asyncio.ensure_future(self._commit(session, deleted=False, strict=False))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=deadline_s)
        left = sum(len(s.pending) for s in self._ctx.sessions.values())
        if self._in_flight or left:
            log.error(
                "shutdown: %d commit(s) still running, %d event(s) not committed after %.1f s",
                len(self._in_flight),
                left,
                deadline_s,
            )
        return left

    async def _commit(self, session: Session, *, deleted: bool, strict: bool) -> None:
        ctx = self._ctx
        async with session.write_lock:
            events, session.pending = session.pending, []
            if not events and not deleted:
                return
            rec = session.record()
            replaced: list[str] = []
            written: list[OutboxEvent] = []
            try:
                async for attempt in retry.attempts(DB_ERRORS):
                    with attempt:
                        if attempt.num > 1:
                            metrics.COMMIT_RETRIES.inc()
                            log.warning("%s: commit attempt %d", session.id, attempt.num)
                            # the connection may have been lost during an earlier COMMIT that landed
                            landed = await ctx.store.committed_events([e.event_id for e in events])
                            if landed:
                                written = landed
                                _learn_primary(session, landed)
                                break
                        if any(e.type == EventType.SESSION_READY for e in events) and session.phone_number:
                            result = await ctx.store.mark_ready(
                                rec, owner=ctx.name, token=session.fencing_token, events=events
                            )
                            written, replaced = result.events, result.replaced
                            session.is_primary = result.is_primary
                        else:
                            written = await ctx.store.save(
                                rec,
                                owner=ctx.name,
                                token=session.fencing_token,
                                events=events,
                                deleted=deleted,
                            )
            except StaleOwner as exc:
                log.warning("%s", exc)
                self._ending.let_go(session, Reason.LEASE_LOST)
                return
            except DB_ERRORS as exc:
                metrics.COMMIT_FAILURES.inc()
                if strict:
                    session.pending[:0] = events  # the caller takes back what it added, if anything
                    raise DatabaseUnavailable(
                        f"session {session.id}: Postgres cannot be reached ({type(exc).__name__}); "
                        "nothing was changed, retry later"
                    ) from exc
                session.pending[:0] = events
                log.error(
                    "%s: cannot commit %d event(s) (%s: %s); kept for the next round",
                    session.id,
                    len(events),
                    type(exc).__name__,
                    exc,
                )
                if not ctx.closing:
                    ctx.tasks.spawn(session, self._write_later(session), cancel_on_end=False)
                return
            committed = [e.session_event() for e in written]
            # the cached view first: whoever hears of an event then reads that state on any worker
            await ctx.durable.cache_put(session.public(ctx.name))
            for event in committed:
                session.deliver(event)
            await ctx.durable.publish(session.id, [e.to_dict() for e in committed])
        for other in replaced:
            self.end_replaced(other, by=session.id)
        if session.ended and session.status != S.DELETED and not session.pending:
            self._ending.retire(session)  # its end is in Postgres: lease and memory go

    async def _write_later(self, session: Session) -> None:
        # a round's budget was spent (Postgres down for a while): the next round after the longest wait
        await asyncio.sleep(retry.BACKOFF.wait_max_s)
        await self.write(session)

    def end_replaced(self, session_id: str, *, by: str | None) -> None:
        """An older session of the same phone was soft-deleted by a newer link (``by``; None when
        this worker learnt it from Postgres, see :mod:`worker.duplicates`): end it here and
        unlink its device from the phone."""
        session = self._ctx.sessions.get(session_id)
        if session is None or session.ended:
            return
        log.info("%s: replaced by %s (same phone in the workspace)", session_id, by or "a newer link")
        session.phone_number = None
        self._ending.end(session, S.FAILED, Reason.REPLACED, unlink=True)
        self.flush(session)


def _learn_primary(session: Session, written: list[OutboxEvent]) -> None:
    """``is_primary`` from a ``session_ready`` that an earlier attempt committed."""
    for event in written:
        if event.type == EventType.SESSION_READY:
            session.is_primary = bool((event.payload.get("data") or {}).get("is_primary"))
