"""Committing a session: its state and pending events go to Postgres in one transaction, fenced
by the session's lease token, and only then are the events delivered (SSE, Redis, webhooks).
Once an ended session's end is committed, it is retired: nothing of it stays on this worker.
"""

from __future__ import annotations

import asyncio
import logging

from shared.errors import StaleOwner
from shared.models import EventType, Reason, SessionStatus
from worker.context import DB_ERRORS, Context
from worker.ending import Ending
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus


class Commits:
    def __init__(self, ctx: Context, ending: Ending) -> None:
        self._ctx = ctx
        self._ending = ending

    def flush(self, session: Session) -> None:
        if session.pending:
            self._ctx.tasks.spawn(session, self.write(session), cancel_on_end=False)

    async def write(self, session: Session, *, deleted: bool = False) -> None:
        """Commit the session's state with its pending events, then deliver them (in order)."""
        ctx = self._ctx
        async with session.write_lock:
            events, session.pending = session.pending, []
            if not events and not deleted:
                return
            rec = session.record()
            replaced: list[str] = []
            try:
                if any(e.type == EventType.SESSION_READY for e in events) and session.phone_number:
                    result = await ctx.store.mark_ready(
                        rec, owner=ctx.name, token=session.fencing_token, events=events
                    )
                    written, replaced = result.events, result.replaced
                    session.is_primary = result.is_primary
                else:
                    written = await ctx.store.save(
                        rec, owner=ctx.name, token=session.fencing_token, events=events, deleted=deleted
                    )
            except StaleOwner as exc:
                log.warning("%s", exc)
                self._ending.let_go(session, Reason.LEASE_LOST)
                return
            except DB_ERRORS as exc:
                session.pending[:0] = events
                log.warning("%s: cannot commit (%s); retrying", session.id, exc)
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
        await asyncio.sleep(0.5)  # back off while Postgres is unreachable
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
