"""The session manager: creates, drives, persists, hibernates, restores and ends sessions.

Page events (see :mod:`worker.whatsapp_web`) arrive per session through its browser slot and are
turned into state transitions (:mod:`worker.linking`); nothing waits on a timer for the page to do
something. Every transition is committed to Postgres (fenced by the session's lease token) with
its events in the outbox, and only then delivered to SSE subscribers, Redis and webhooks
(:mod:`worker.commits`). Idle sessions hibernate (:mod:`worker.hibernation`), sessions known only
to Postgres are taken over (:mod:`worker.takeover`), sessions end or are let go
(:mod:`worker.ending`) — an ended one leaves this worker once its end is committed — and a
session replaced by a newer link of its phone on another worker ends here
(:mod:`worker.duplicates`). :class:`SessionManager` is the façade the routes and the app use; the
parts share one :class:`~worker.context.Context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from typing import Any

from shared import passkeys as passkey_wire
from shared import retry
from shared.clock import Clock
from shared.errors import (
    DatabaseUnavailable,
    InvalidState,
    LeaseUnavailable,
    SessionExists,
    SessionNotFound,
    Unavailable,
    WalinkError,
)
from shared.ids import check_session_id, new_profile_id, new_session_id
from shared.leases import LeaseKeeper
from shared.models import ENDED, Reason, SessionStatus, Transition
from shared.settings import Settings
from shared.store import ChangedUnder
from worker import snapshot
from worker.browser import BrowserLauncher, BrowserSlot
from worker.commits import Commits
from worker.context import DB_ERRORS, Context, NotOwner
from worker.duplicates import Duplicates
from worker.durable import Durable
from worker.ending import Ending
from worker.hibernation import Hibernation
from worker.keepalive import KeepAlive
from worker.linking import MAX_CRASH_RESTARTS, Linking
from worker.membership import RecentCreates
from worker.passkey import PendingPasskey
from worker.qr_queue import QrQueue
from worker.session import Session, public_from_record
from worker.takeover import TakeOver
from worker.unlinking import Unlinking
from worker.warm_pool import WarmPool

PASSKEY_VERDICT_S = 15.0
"""How long ``POST …/passkey`` waits for the page's verdict on the assertion before it answers 202."""

__all__ = ["DB_ERRORS", "MAX_CRASH_RESTARTS", "NotOwner", "SessionManager", "close_with_deadline"]

log = logging.getLogger("walink.sessions")

S = SessionStatus
ENDED_GRACE_S = 10.0
"""An ended session still here this long after its last use (one a command took over from
Postgres and left ended, e.g. asked for its QR) is retired by the housekeeping round."""


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        launcher: BrowserLauncher,
        queue: QrQueue,
        pool: WarmPool,
        durable: Durable,
        name: str,
    ) -> None:
        self.settings = settings
        self.launcher = launcher
        self.queue = queue
        self.pool = pool
        self.durable = durable
        self.store = durable.store
        self.name = name
        self._creating = 0  # creates between their first await and memory (see placement_load)
        self.recent_creates = RecentCreates()  # named in the heartbeat (worker.membership)
        keys = snapshot.SnapshotKeys.from_settings(settings.snapshot_key, settings.snapshot_keys)
        self.snapshot_keys = keys
        self.keeper = LeaseKeeper(
            durable.leases,
            on_lost=self._lease_lost,
            on_token=self._lease_token,
            timeout_s=durable.redis_timeout_s,
        )
        self._ctx = ctx = Context(
            settings=settings,
            launcher=launcher,
            queue=queue,
            pool=pool,
            durable=durable,
            name=name,
            keeper=self.keeper,
            snapshot_keys=self.snapshot_keys,
        )
        self.sessions: dict[str, Session] = ctx.sessions
        self._ending = Ending(ctx)
        # a replaced hibernated session's device is unlinked apart (built below, on hibernation)
        self._commits = Commits(ctx, self._ending, unlink=lambda sid: self._unlinking.start(sid))
        # linking starts browsers and is built on hibernation, which restores through it
        self._hibernation = Hibernation(
            ctx,
            self._ending,
            self._commits,
            restore=lambda session, priority: self._linking.restore(session, priority),
        )
        self._linking = Linking(ctx, self._ending, self._commits, self._hibernation)
        self._takeover = TakeOver(ctx, self._linking, self._hibernation, self._commits)
        self._duplicates = Duplicates(ctx, self._commits)
        self._unlinking = Unlinking(ctx, self._ending, self._hibernation)
        self._keepalive = KeepAlive(ctx, self._hibernation, self._commits, take_over=self._take_over)
        self.qr_times_ms: deque[int] = self._linking.qr_times_ms
        self.phone_times_ms: deque[int] = self._linking.phone_times_ms

    @property
    def closing(self) -> bool:
        return self._ctx.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self._ctx.closing = value

    # ------------------------------------------------------------------ lookups
    def local(self, session_id: str, workspace_id: str | None = None) -> Session | None:
        check_session_id(session_id)
        session = self.sessions.get(session_id)
        if session is None or session.status == S.DELETED:
            return None
        if workspace_id is not None and session.workspace_id != workspace_id:
            raise SessionNotFound(f"no session {session_id}")  # same answer: no existence leak
        return session

    def get(self, session_id: str, workspace_id: str | None = None) -> Session:
        """A session driven by this worker (tests and internal callers)."""
        session = self.local(session_id, workspace_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id}")
        return session

    async def _record(self, session_id: str, workspace_id: str | None) -> dict[str, Any]:
        try:
            rec = await self.store.load_session(session_id)
        except DB_ERRORS as exc:
            raise DatabaseUnavailable(
                f"session {session_id}: Postgres cannot be reached ({type(exc).__name__}); retry later"
            ) from exc
        if (
            rec is None
            or rec.get("deleted")
            or (workspace_id is not None and rec["workspace_id"] != workspace_id)
        ):
            raise SessionNotFound(f"no session {session_id}")
        return rec

    async def describe(self, session_id: str, workspace_id: str | None) -> dict[str, Any]:
        """The API view: from memory when driven here, else the Redis cache while its owner is alive,
        else Postgres. A request for a hibernated or orphaned session takes it over and wakes it."""
        session = self.local(session_id, workspace_id)
        if session is None:
            cached = await self.durable.cache_get(session_id)
            if (
                cached is not None
                and (workspace_id is None or cached.get("workspace_id") == workspace_id)
                and await self._cache_still_true(cached)
            ):
                return cached
            rec = await self._record(session_id, workspace_id)
            if rec["status"] in ENDED or self.closing:
                return public_from_record(rec)
            try:
                session = await self._take_over(rec)
            except NotOwner:
                return public_from_record(rec)  # driven by a live worker: the gateway routes there
            except LeaseUnavailable:
                return public_from_record(rec)  # no lease now: the record, taken over later
            if rec["status"] != S.HIBERNATED:
                await self._resume(session)
        session.touch()
        if session.status == S.HIBERNATED:
            try:
                await self.wake(session)
            except LeaseUnavailable as exc:
                log.warning("%s: not woken now: %s", session_id, exc)  # the view still answers
        return session.public(self.name)

    async def _cache_still_true(self, cached: dict[str, Any]) -> bool:
        """A cached view holds while it is final, or while its worker still holds the lease."""
        status = cached.get("status")
        if status in ENDED:
            return True
        if status == S.HIBERNATED:
            return False  # a request wakes it
        owner = cached.get("worker")
        return bool(owner) and await self.durable.lease_owner(str(cached["id"])) == owner

    async def for_command(self, session_id: str, workspace_id: str | None) -> Session:
        """A session this worker can act on: driven here, or taken over (hibernated or orphaned)."""
        session = self.local(session_id, workspace_id)
        if session is None:
            rec = await self._record(session_id, workspace_id)
            session = await self._take_over(rec)
            if rec["status"] not in ENDED and rec["status"] != S.HIBERNATED:
                await self._resume(session)
        session.touch()
        return session

    def in_workspace(self, workspace_id: str | None = None) -> list[Session]:
        return [
            s
            for s in self.sessions.values()
            if s.status != S.DELETED and (workspace_id is None or s.workspace_id == workspace_id)
        ]

    # ------------------------------------------------------------------ take-over
    async def _take_over(self, rec: dict[str, Any]) -> Session:
        """Become the driver of a session known only to Postgres (lease + fencing token)."""
        return await self._takeover.take_over(rec)

    async def _resume(self, session: Session) -> int:
        """Drive a session just taken over (see :meth:`worker.takeover.TakeOver.resume`)."""
        return await self._takeover.resume(session)

    async def restore_all(self) -> int:
        """Take back this worker's sessions (see :meth:`worker.takeover.TakeOver.restore_all`)."""
        return await self._takeover.restore_all()

    async def adopt_orphans(self) -> int:
        """Take over orphaned sessions this worker is the place of; returns how many."""
        return await self._takeover.adopt_orphans()

    async def watch_orphans(self, interval_s: float) -> None:
        await self._takeover.watch_orphans(interval_s)

    # ------------------------------------------------------------------ duplicates, ended sessions
    async def check_rows(self) -> ChangedUnder:
        """What Postgres says changed under the sessions driven here, acted on: one another worker
        took over (its row carries a newer token than ours) is let go — also when this worker
        cannot reach Redis to learn it from the lease — and one a newer link of its phone replaced
        ends here (see :mod:`worker.duplicates`)."""
        asked = {sid: (s, s.fencing_token) for sid, s in self.sessions.items() if not s.ended}
        changed = await self.store.changed_under({sid: token for sid, (_, token) in asked.items()})
        for sid in changed.taken:
            session, token = asked[sid]
            # unless it was taken (back) here meanwhile, with a newer token: then the answer is old
            if self.sessions.get(sid) is session and session.fencing_token == token:
                self._ending.let_go(session, Reason.LEASE_LOST)
        self._duplicates.end_replaced(changed.replaced)
        return changed

    async def keep_house(self, interval_s: float) -> None:
        """Every ``interval_s``: sessions another worker took over are let go, those replaced by a
        link on another worker end here (:meth:`check_rows`), and ended sessions left here retire."""
        while True:
            await asyncio.sleep(interval_s)  # the housekeeping period, not a wait for a state
            self.retire_ended()
            try:
                await self.check_rows()
            except DB_ERRORS as exc:
                log.warning("session row check failed: %s", exc)

    async def watch_unlinks(self, interval_s: float) -> None:
        """Every ``interval_s``: unlink the devices of replaced hibernated sessions left linked
        (an attempt that failed, a worker that died mid-way; see :mod:`worker.unlinking`)."""
        await self._unlinking.watch(interval_s)

    async def keep_alive_check(self) -> int:
        """One keep-alive look (see :mod:`worker.keepalive`); how many sessions it woke."""
        return await self._keepalive.check()

    async def watch_keepalive(self, interval_s: float) -> None:
        await self._keepalive.watch(interval_s)

    @property
    def clock(self) -> Clock:
        """The wall clock of link health (tests move it with the simulator's)."""
        return self._ctx.clock

    @property
    def unlinking(self) -> frozenset[str]:
        """The replaced hibernated sessions whose device this worker is unlinking now."""
        return self._unlinking.running

    def retire_ended(self, *, grace_s: float = ENDED_GRACE_S) -> int:
        """Retire the ended sessions left here unused for ``grace_s`` (one with uncommitted events
        is committed first, and retired by that commit); how many."""
        now = time.monotonic()
        stale = [
            s
            for s in self.sessions.values()
            if s.ended
            and s.status != S.DELETED
            and not s.write_lock.locked()
            and now - s.last_used >= grace_s
        ]
        for session in stale:
            if session.pending:
                self._commits.flush(session)
            else:
                self._ending.retire(session)
        return len(stale)

    # ------------------------------------------------------------------ commands
    async def create(
        self,
        *,
        session_id: str | None,
        workspace_id: str,
        label: str | None = None,
        webhook_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_events: list[str] | None = None,
    ) -> Session:
        if self.closing:
            raise Unavailable("this worker is shutting down; retry on another worker")
        sid = check_session_id(session_id) if session_id is not None else new_session_id()
        if sid in self.sessions:
            raise SessionExists(f"session {sid} already exists")
        session = Session(
            id=sid,
            workspace_id=workspace_id,
            profile_id=new_profile_id(),
            label=label,
            webhook_url=webhook_url,
            metadata=metadata or {},
            reason=Reason.CREATED,
        )
        session.mark("requested_at_ms")
        # counted in the heartbeat's load from now on, and named in it: a gateway stops counting
        # its placement of this session once a beat names it (no earlier, no later)
        self._creating += 1
        self.recent_creates.add(sid)
        try:
            await self.store.ensure_workspace(workspace_id)
            token = await self.durable.acquire(sid, floor=0)
            if token is None:
                raise NotOwner(f"session {sid} is being created elsewhere")
            session.fencing_token = token
            try:
                await self.store.insert_session(
                    session.record(), owner=self.name, token=token, webhook_events=webhook_events
                )
            except SessionExists:
                await self.durable.release(sid)  # the lease of an id already taken is not ours to keep
                raise
            self.sessions[sid] = session
        finally:
            self._creating -= 1
        self.keeper.hold(sid, token)
        self._linking.start_link(session)
        await self._commits.write(session)  # the answer to "add account" already carries a committed state
        return session

    async def restart(self, session: Session) -> Session:
        return await self._linking.restart(session)

    async def pairing_code(self, session: Session, phone: str) -> str:
        return await self._linking.pairing_code(session, phone)

    async def back_to_qr(self, session: Session) -> None:
        await self._linking.back_to_qr(session)

    # ----- passkeys (docs/passkey.md)
    def by_passkey_token(self, token: str) -> tuple[Session, PendingPasskey]:
        """The session a passkey token names and its pending request (404/410 otherwise)."""
        session = self.local(passkey_wire.session_of_token(token))
        if session is None:
            self._linking.gone_passkey(token)
        return session, self._linking.passkey_request(session, token)

    async def answer_passkey(
        self, session: Session, body: dict[str, Any], token: str | None = None
    ) -> Session:
        """Give the page the user's assertion; the session as WhatsApp's verdict left it (or
        still ``passkey_required`` if the page has not answered within ``PASSKEY_VERDICT_S``)."""
        await self._linking.answer_passkey(session, body, token)
        self._commits.flush(session)
        await self._linking.passkey_verdict(session, PASSKEY_VERDICT_S)
        return session

    async def logout(self, session: Session) -> Session:
        if session.ended:
            raise InvalidState(f"session {session.id} is already {session.status}")
        if session.status == S.HIBERNATED:
            await self.wake(session)
            await self._until(session, {S.READY} | ENDED, self.settings.start_timeout_s)
        slot = session.slot
        if (
            slot is not None
            and slot.hooked.is_set()
            and session.status
            in {
                S.READY,
                S.AUTHENTICATED,
                S.PASSKEY_REQUIRED,
            }
        ):
            session.logout_requested = True
            try:
                await slot.logout()
                await self._until(session, ENDED, 15.0)
            except (WalinkError, TimeoutError) as exc:
                log.warning(
                    "%s: logout through WhatsApp Web did not finish (%s); ending here", session.id, exc
                )
        if not session.ended:
            self._ctx.tasks.cancel_work(session)
            self._ending.end(session, S.LOGGED_OUT, Reason.API_LOGOUT)
        await self._commits.write(session)
        return session

    @staticmethod
    async def _until(
        session: Session, statuses: set[SessionStatus] | frozenset[SessionStatus], timeout_s: float
    ) -> None:
        async def wait() -> None:
            while session.status not in statuses:
                await session.changed.wait()

        await asyncio.wait_for(wait(), timeout_s)

    async def delete(self, session: Session) -> None:
        """DELETE, durable first: the deletion is committed before anything is torn down, so while
        Postgres cannot be reached the answer is 503 ``database_unavailable`` and nothing changed
        (the session goes on as it was). A linked session's device is then unlinked through its
        page; a hibernated one is woken for that (its browser back from its profile or snapshot),
        so the phone's device list never keeps a deleted session's device."""
        await self._database_reachable(session.id)
        if session.status == S.HIBERNATED:
            await self._wake_to_unlink(session)
        was_linked = session.status == S.READY
        if session.status != S.DELETED:
            before = Transition(session.status, session.reason)
            qr = (session.qr, session.qr_expires_at_ms)
            queued = len(session.pending)
            session.transition(S.DELETED, Reason.DELETED)
            added = session.pending[queued:]
            try:
                await self._commits.write(session, deleted=True, strict=True)
            except DatabaseUnavailable:
                session.undo_transition(before, qr, added)
                self._commits.flush(session)  # what was pending before the DELETE is still to commit
                raise
        else:
            await self._commits.write(session, deleted=True, strict=True)
        self._ctx.tasks.cancel_work(session)
        self._ending.stand_down(session)
        await self._ending.end_browser(session, wipe=True, unlink=was_linked)
        with contextlib.suppress(*DB_ERRORS):
            await self.store.delete_snapshot(session.id)
        await self.durable.release(session.id)
        await self.durable.cache_drop(session.id)
        self._ending.forget(session)

    async def _database_reachable(self, session_id: str) -> None:
        """Refuse (503) before any side effect when Postgres cannot be reached."""
        try:
            # a few quick tries: a connection that died with an earlier outage is replaced on the next
            async for attempt in retry.attempts(DB_ERRORS, retry.QUICK_CHECK):
                with attempt:
                    await asyncio.wait_for(self.store.pool.fetchval("SELECT 1"), self.settings.db_timeout_s)
        except DB_ERRORS as exc:
            raise DatabaseUnavailable(
                f"session {session_id}: Postgres cannot be reached ({type(exc).__name__}); "
                "nothing was changed, retry later"
            ) from exc

    async def _wake_to_unlink(self, session: Session) -> None:
        """A hibernated session has no browser to log out with: bring it back to ready first."""
        try:
            await self.wake(session)
            await self._until(session, {S.READY} | ENDED, self.settings.start_timeout_s)
        except (WalinkError, TimeoutError) as exc:
            log.warning(
                "%s: could not wake it to unlink its device (%s); deleted without unlinking", session.id, exc
            )

    # ------------------------------------------------------------------ hibernation
    async def hibernate(self, session: Session, reason: Reason = Reason.IDLE) -> None:
        """Close the browser, keep the login: an encrypted snapshot goes to Postgres, the lease is freed."""
        await self._hibernation.hibernate(session, reason)

    async def wake(self, session: Session) -> None:
        """Bring a hibernated session back to ready on this worker, from its snapshot if needed."""
        await self._hibernation.wake(session)

    def wake_soon(self, session: Session) -> None:
        self._hibernation.wake_soon(session)

    # ------------------------------------------------------------------ leases
    def _lease_lost(self, session_id: str) -> None:
        self._ending.lease_lost(session_id)

    def _lease_token(self, session_id: str, token: int) -> None:
        self._ending.lease_token(session_id, token)

    # ------------------------------------------------------------------ shutdown
    async def close(self) -> None:
        """Stop: no new work, end every browser, snapshot ready sessions, free their leases."""
        ctx = self._ctx
        ctx.closing = True
        ctx.deadlines.cancel_all()
        ctx.idle_timers.cancel_all()
        # the session's work stops; the commits it started are shielded and finish (or are retried)
        # within their own deadline, and events still pending are committed before browsers end
        await ctx.tasks.cancel_all()
        await self._commits.drain(self.settings.shutdown_commit_deadline_s)
        sessions = list(self.sessions.values())
        # before the browsers end: new links' credentials settled, and their pages' login storage
        # complete, or the handover stores no snapshot of them (docs/durability.md)
        snapshot_ok = await asyncio.gather(*(self._hibernation.before_handover(s) for s in sessions))
        await asyncio.gather(
            *(self._ending.end_browser(s, wipe=False) for s in sessions), return_exceptions=True
        )
        await asyncio.gather(
            *(
                self._hibernation.handover(s, snapshot_ok=ok)
                for s, ok in zip(sessions, snapshot_ok, strict=True)
            ),
            return_exceptions=True,
        )
        for session in sessions:
            session.close_subscribers()

    async def settle(self) -> None:
        """Until the background work running now (writes, browser ends, restarts) has finished."""
        await self._ctx.tasks.settle()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for s in self.sessions.values():
            by_status[s.status.value] = by_status.get(s.status.value, 0) + 1
        authenticated = {S.AUTHENTICATED, S.PASSKEY_REQUIRED, S.READY}
        return {
            "active": sum(1 for s in self.sessions.values() if s.slot is not None),
            "authenticated": sum(1 for s in self.sessions.values() if s.status in authenticated),
            "qr_scanning": by_status.get(S.QR.value, 0),
            "hibernated": by_status.get(S.HIBERNATED.value, 0),
            "reconnecting": sum(
                1 for s in self.sessions.values() if s.slot is not None and s.connection == "reconnecting"
            ),
            "by_status": by_status,
        }

    def placement_load(self) -> dict[str, int]:
        """What new sessions are placed by: sessions with a browser or starting one (not
        hibernated, not ended) and those being created, and of them those showing a QR."""
        sessions, qr = self._creating, 0
        for s in self.sessions.values():
            if s.slot is not None or s.status == S.STARTING:
                sessions += 1
                qr += s.status == S.QR
        return {"sessions": sessions, "qr": qr}

    def performance(self) -> dict[str, float | None]:
        return {
            "avg_qr_time_ms": round(statistics.fmean(self.qr_times_ms), 1) if self.qr_times_ms else None,
            "avg_phone_extraction_ms": (
                round(statistics.fmean(self.phone_times_ms), 1) if self.phone_times_ms else None
            ),
            "qr_samples": len(self.qr_times_ms),
            "phone_samples": len(self.phone_times_ms),
        }

    def browsers(self) -> list[BrowserSlot]:
        return [s.slot for s in self.sessions.values() if s.slot is not None]


async def close_with_deadline(manager: SessionManager, deadline_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(manager.close(), deadline_s)
