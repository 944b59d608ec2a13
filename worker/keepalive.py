"""Keep-alive and link health: WhatsApp logs out a linked device that goes unused (about 30 days;
14 with the phone offline). A hibernated session has no page connected, so its device ages; this
wakes it on a schedule (``keepalive_s``) until its page connects — WhatsApp counts that as a use —
and hibernates it again. A session unused for 80 % of the TTL walink assumes (``device_ttl_s``)
emits ``session_at_risk`` once; one WhatsApp logged out anyway ends ``logged_out`` /
``device_expired`` (the page's logout reason, :mod:`worker.whatsapp_web`). See docs/keepalive.md.

"Used" is read on :attr:`Context.clock` (wall time, injectable) and kept in the session's
``timings`` (``last_connected_at_s``), so it survives a restart and a move to another worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared import metrics
from shared.clock import Clock
from shared.errors import WalinkError
from shared.models import EventType, SessionStatus
from worker.context import DB_ERRORS, Context
from worker.session import Session

if TYPE_CHECKING:  # hibernation marks uses through this module
    from worker.commits import Commits
    from worker.hibernation import Hibernation

log = logging.getLogger("walink.keepalive")

S = SessionStatus
LAST_CONNECTED_KEY = "last_connected_at_s"
"""``timings`` key: when the session's page was last connected (clock seconds)."""
AT_RISK_KEY = "at_risk_at_s"
"""``timings`` key: when ``session_at_risk`` was emitted (cleared by the next connection)."""
AT_RISK_FRACTION = 0.8


def mark_connected(session: Session, clock: Clock) -> None:
    """The session's page is connected now: its device was used."""
    session.timings[LAST_CONNECTED_KEY] = int(clock.now_s())
    session.timings.pop(AT_RISK_KEY, None)


class KeepAlive:
    def __init__(
        self,
        ctx: Context,
        hibernation: Hibernation,
        commits: Commits,
        *,
        take_over: Callable[[dict[str, Any]], Awaitable[Session]],
    ) -> None:
        """``take_over(record)`` makes this worker the driver of a session known only to Postgres
        (see :meth:`worker.takeover.TakeOver.take_over`)."""
        self._ctx = ctx
        self._hibernation = hibernation
        self._commits = commits
        self._take_over = take_over

    async def check(self) -> int:
        """One look at the hibernated sessions driven here: the at-risk ones are reported, the
        ones due are woken (and hibernated again once ready); how many were woken."""
        ctx = self._ctx
        settings = ctx.settings
        now_s = ctx.clock.now_s()
        woken = 0
        sessions = list(ctx.sessions.values()) + await self._hibernated_in_postgres(now_s)
        for session in sessions:
            if session.status != S.HIBERNATED or ctx.closing:
                continue
            last_s = session.timings.get(LAST_CONNECTED_KEY)
            if last_s is None:  # hibernated before walink kept it: its age starts now
                mark_connected(session, ctx.clock)
                continue
            unused_s = now_s - last_s
            if settings.device_ttl_s > 0 and unused_s >= AT_RISK_FRACTION * settings.device_ttl_s:
                await self._report_at_risk(session, last_s)
            due = settings.keepalive_s > 0 and unused_s >= settings.keepalive_s
            if due and session.id not in self._hibernation.keepalive_wakes:
                self._hibernation.keepalive_wakes.add(session.id)
                metrics.KEEPALIVE_WAKES.inc()
                log.info("%s: keep-alive wake (unused for %.0f s)", session.id, unused_s)
                ctx.tasks.spawn(session, self._wake(session), cancel_on_end=False)
                woken += 1
            elif session.id in ctx.keeper.held and session.id not in self._hibernation.keepalive_wakes:
                # taken over only to be looked at (from Postgres): not woken, its lease goes back
                await ctx.durable.release(session.id)
                ctx.keeper.drop(session.id)
        return woken

    async def _hibernated_in_postgres(self, now_s: float) -> list[Session]:
        """This worker's hibernated sessions that only Postgres knows (a restart does not load
        hibernated sessions into memory) and that need a look now: taken over (their lease held
        here) so they can be woken or reported like the others."""
        ctx = self._ctx
        settings = ctx.settings
        due_s = min(
            settings.keepalive_s or float("inf"),
            AT_RISK_FRACTION * settings.device_ttl_s if settings.device_ttl_s > 0 else float("inf"),
        )
        found: list[Session] = []
        for rec in await ctx.store.sessions_owned_by(ctx.name):
            last_s = (rec.get("timings") or {}).get(LAST_CONNECTED_KEY)
            if rec["status"] != S.HIBERNATED or rec["id"] in ctx.sessions or last_s is None:
                continue
            at_risk_sent = AT_RISK_KEY in (rec.get("timings") or {})
            keepalive_due = settings.keepalive_s > 0 and now_s - last_s >= settings.keepalive_s
            if now_s - last_s < due_s or (at_risk_sent and not keepalive_due):
                continue
            try:
                found.append(await self._take_over(rec))
            except WalinkError as exc:  # driven elsewhere now, or Redis away: the next look
                log.warning("%s: keep-alive look skipped: %s", rec["id"], exc)
        return found

    async def _report_at_risk(self, session: Session, last_s: int) -> None:
        if AT_RISK_KEY in session.timings:
            return
        session.timings[AT_RISK_KEY] = int(self._ctx.clock.now_s())
        metrics.SESSIONS_AT_RISK.inc()
        expires_s = last_s + self._ctx.settings.device_ttl_s
        session.publish(
            EventType.SESSION_AT_RISK,
            {"last_used_at_ms": last_s * 1000, "expires_at_ms": int(expires_s * 1000)},
        )
        await self._commits.write(session)

    async def _wake(self, session: Session) -> None:
        try:
            await self._hibernation.wake(session)
        except (WalinkError, *DB_ERRORS) as exc:
            self._hibernation.keepalive_wakes.discard(session.id)  # tried again at the next look
            log.warning("%s: keep-alive wake failed: %s", session.id, exc)

    async def watch(self, interval_s: float) -> None:
        """Every ``interval_s`` (the look's period, not a wait for a state): :meth:`check`."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except DB_ERRORS as exc:
                log.warning("keep-alive look failed: %s", exc)
