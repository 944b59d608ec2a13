"""Take-over: this worker becomes the driver of sessions known only to Postgres — its own after a
restart, those whose worker died or drained (when this worker is their place on the ring of live
workers), and any a request reaches here — under a fresh lease and fencing token, and resumes them.
Never without a lease: while Redis cannot be reached a take-over is refused
(:class:`~shared.errors.LeaseUnavailable`), and this worker's own sessions that could not be
restored then are taken back by the orphan watch once it can.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import Any

from uhashring import HashRing

from shared import metrics
from shared.errors import LeaseUnavailable, SnapshotKeyUnknown, Unavailable
from shared.ids import new_profile_id
from shared.models import ENDED, Reason, SessionStatus
from worker.commits import Commits
from worker.context import DB_ERRORS, Context, NotOwner
from worker.hibernation import Hibernation
from worker.linking import Linking
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus


class TakeOver:
    def __init__(self, ctx: Context, linking: Linking, hibernation: Hibernation, commits: Commits) -> None:
        self._ctx = ctx
        self._linking = linking
        self._hibernation = hibernation
        self._commits = commits
        # one take-over at a time per session: its lock and how many callers use it (dropped at 0)
        self._loading: dict[str, tuple[asyncio.Lock, int]] = {}
        self._ring_cache: tuple[tuple[str, ...], HashRing] | None = None

    async def take_over(self, rec: dict[str, Any]) -> Session:
        """Become the driver of a session known only to Postgres (lease + fencing token)."""
        sid = rec["id"]
        lock, users = self._loading.get(sid) or (asyncio.Lock(), 0)
        self._loading[sid] = (lock, users + 1)
        try:
            async with lock:
                return await self._take_over_locked(rec)
        finally:
            lock, users = self._loading[sid]
            if users == 1:
                del self._loading[sid]
            else:
                self._loading[sid] = (lock, users - 1)

    async def _take_over_locked(self, rec: dict[str, Any]) -> Session:
        ctx = self._ctx
        sid = rec["id"]
        session = ctx.sessions.get(sid)
        if session is not None:
            return session
        if ctx.closing:
            raise Unavailable("this worker is shutting down; retry on another worker")
        token = await ctx.durable.acquire_or_take(
            sid, floor=int(rec.get("fencing_token") or 0), last_owner=rec.get("owner")
        )
        if token is None:
            owner = await ctx.durable.lease_owner(sid)
            raise NotOwner(f"session {sid} is driven by {owner or 'another worker'}")
        session = Session.from_record(rec)
        session.fencing_token = token
        session.needs_resume = True
        ctx.sessions[sid] = session
        ctx.keeper.hold(sid, token)
        return session

    async def resume(self, session: Session) -> int:
        """Drive a session just taken over: restore a linked one without a QR (1) — or, when this
        worker already runs or starts ``max_active_sessions`` browsers, hibernate it (its snapshot
        stored, no browser; woken when used) — and give a linking one a fresh QR (0). Only the
        first call after a take-over acts: a request and the orphan watcher may both reach a
        session taken over a moment ago."""
        if not session.needs_resume:
            return 0
        session.needs_resume = False
        if session.slot is not None or session.ended or session.status == S.HIBERNATED:
            return 0
        if session.status == S.READY and self._browsers_running_or_coming() >= (
            self._ctx.settings.max_active_sessions
        ):
            # no room for another browser: it comes back hibernated (woken when used)
            hibernate = self._hibernation.hibernate(session, Reason.LRU)
            self._ctx.tasks.spawn(session, self._ctx.tasks.quietly(hibernate), cancel_on_end=False)
            return 0
        if session.status == S.READY or (
            session.status in {S.STARTING, S.AUTHENTICATED} and session.phone_number
        ):
            return 1 if await self._hibernation.begin_restore(session, Reason.RESTORING) else 0
        shutil.rmtree(self._ctx.launcher.profile_dir(session.profile_id), ignore_errors=True)
        session.profile_id = new_profile_id()
        self._linking.reset_link_state(session)
        if session.status != S.STARTING:
            session.transition(S.STARTING, Reason.RESTART)
        session.mark("requested_at_ms")
        self._linking.start_link(session)
        await self._commits.write(session)
        return 0

    def _ring(self, serving: tuple[str, ...]) -> HashRing:
        """The ring of the live workers (built again only when they change: building one is
        the orphan watcher's main cost, every second)."""
        if self._ring_cache is None or self._ring_cache[0] != serving:
            self._ring_cache = (serving, HashRing(nodes=list(serving)))
        return self._ring_cache[1]

    def _browsers_running_or_coming(self) -> int:
        ctx = self._ctx
        return sum(1 for s in ctx.sessions.values() if s.slot is not None or s.id in ctx.restoring)

    async def restore_all(self) -> int:
        """Take back this worker's sessions: ``ready`` ones come back from their profiles (or
        snapshots) without a QR; linkings whose QR died with the process get a fresh QR.

        Their browsers start through the launch budget at ``RESTORE`` priority (after users and
        the warm pool, a few at a time), and only the ``max_active_sessions`` most recently
        used: the others come back hibernated (see :meth:`resume`)."""
        restored = 0
        for rec in await self._ctx.store.sessions_owned_by(self._ctx.name):
            if S(rec["status"]) in ENDED or rec["status"] == S.HIBERNATED:
                continue
            try:
                session = await self.take_over(rec)
                restored += await self.resume(session)
            except (NotOwner, SnapshotKeyUnknown):  # the latter: left as it was, for another worker
                continue
            except LeaseUnavailable as exc:
                # Redis is down: the orphan watch takes these back once a lease can be had
                log.warning("start: %s not restored yet: %s", rec["id"], exc)
                continue
        return restored

    async def adopt_orphans(self) -> int:
        """Take over sessions whose owner is gone (no heartbeat) or drained (lease released), when
        this worker is their place on the ring of live workers, and this worker's own sessions
        it does not drive (not restored at start while Redis was down). Returns how many were
        adopted."""
        ctx = self._ctx
        if ctx.closing:
            return 0
        live = await ctx.durable.live_workers()
        if live is None:
            return 0
        serving = sorted(name for name, beat in live.items() if not beat.get("draining"))
        if ctx.name not in serving:
            return 0
        ring = self._ring(tuple(serving))
        adopted = 0
        now = time.monotonic()
        for sid, until in list(ctx.unreadable.items()):
            if until <= now:
                del ctx.unreadable[sid]
        # this worker's own sessions it does not drive count too when it restores at start (those
        # it could not restore then, for want of a lease)
        own = {ctx.name} if ctx.settings.restore_on_start else set()
        for rec in await ctx.store.orphans(set(serving) - own):
            sid = rec["id"]
            if sid in ctx.sessions or sid in ctx.unreadable:
                continue
            if rec.get("owner") != ctx.name and ring.get_node(sid) != ctx.name:
                continue
            try:
                session = await self.take_over(rec)
            except (NotOwner, Unavailable):
                continue
            metrics.ADOPTED.labels(rec["status"]).inc()
            log.info("%s: adopted from %s (%s)", rec["id"], rec.get("owner"), rec["status"])
            try:
                await self.resume(session)
            except SnapshotKeyUnknown:
                continue  # let go as it was (logged, counted): a worker with the key can take it
            adopted += 1
        return adopted

    async def watch_orphans(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # the membership period
            try:
                await self.adopt_orphans()
            except DB_ERRORS as exc:
                log.warning("orphan check failed: %s", exc)
