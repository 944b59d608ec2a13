"""How a session stops being driven here: it ends (logged out, failed, expired), or this worker
lets it go because another one owns it now; either way its browser and profile go."""

from __future__ import annotations

import contextlib
import logging
import shutil

from shared import metrics
from shared.errors import WalinkError
from shared.models import LINKING, EventType, Reason, SessionStatus
from worker.context import Context
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus


class Ending:
    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def end(self, session: Session, status: SessionStatus, reason: Reason, *, unlink: bool = False) -> None:
        """Move to an ended state, tell subscribers, and let the browser and profile go."""
        if session.ended or not session.can_move_to(status):
            return
        self.stand_down(session)
        was_linking = session.status in LINKING and session.id not in self._ctx.restoring
        session.transition(status, reason)
        if was_linking:  # the success rate is about linkings, not about sessions ending later
            metrics.LINKS.labels(status.value, reason.value).inc()
        event = EventType.SESSION_DISCONNECTED if status == S.LOGGED_OUT else EventType.SESSION_FAILED
        session.publish(event, {"status": status.value, "reason": reason.value})
        self._ctx.tasks.spawn(
            session, self.end_browser(session, wipe=True, unlink=unlink), cancel_on_end=False
        )

    async def end_browser(self, session: Session, *, wipe: bool, unlink: bool = False) -> None:
        slot, session.slot = session.slot, None
        if slot is not None:
            if unlink and slot.hooked.is_set():
                with contextlib.suppress(WalinkError):
                    await slot.logout()
            await slot.close()
        if wipe:
            shutil.rmtree(self._ctx.launcher.profile_dir(session.profile_id), ignore_errors=True)

    def let_go(self, session: Session, reason: Reason) -> None:
        """Another worker owns the session now: stop driving it, write nothing more."""
        if self._ctx.sessions.get(session.id) is not session:
            return
        log.warning("%s: no longer ours (%s); letting go", session.id, reason.value)
        self._ctx.tasks.cancel_work(session)
        self.stand_down(session)
        session.pending.clear()
        self.forget(session)
        self._ctx.tasks.spawn(session, self.end_browser(session, wipe=True), cancel_on_end=False)

    def lease_lost(self, session_id: str) -> None:
        session = self._ctx.sessions.get(session_id)
        if session is not None:
            self.let_go(session, Reason.LEASE_LOST)

    def lease_token(self, session_id: str, token: int) -> None:
        session = self._ctx.sessions.get(session_id)
        if session is not None:
            session.fencing_token = token

    def stand_down(self, session: Session) -> None:
        """No deadline, no idle timer, no restore in progress: the session is ending or let go."""
        self._ctx.deadlines.cancel(session.id)
        self._ctx.idle_timers.cancel(session.id)
        self._ctx.restoring.discard(session.id)

    def retire(self, session: Session) -> None:
        """An ended session whose end is committed: nothing of it stays here. Its lease and
        fencing counter leave Redis, it leaves the table (its browser, if any, is already being
        ended); reads are answered by its cached view and Postgres, and a restart takes it
        over again from Postgres."""
        if self._ctx.sessions.get(session.id) is not session:
            return
        self.stand_down(session)
        self.forget(session)
        self._ctx.tasks.spawn(session, self._ctx.durable.release_ended(session.id), cancel_on_end=False)

    def forget(self, session: Session) -> None:
        """No longer driven here: its lease not renewed, out of the table, its streams ended."""
        self._ctx.keeper.drop(session.id)
        self._ctx.sessions.pop(session.id, None)
        session.close_subscribers()
