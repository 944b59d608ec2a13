"""The session manager: creates, drives, persists, hibernates, restores and ends sessions.

Page events (see :mod:`worker.whatsapp_web`) arrive per session through its browser slot and are
turned into state transitions here; nothing waits on a timer for the page to do something. Every
transition is committed to Postgres (fenced by the session's lease token) with its events in the
outbox, and only then delivered to SSE subscribers, Redis and webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import statistics
import time
from collections import deque
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from uhashring import HashRing

from shared import metrics
from shared.errors import (
    BrowserError,
    Conflict,
    InvalidState,
    SessionExists,
    SessionNotFound,
    SnapshotInvalid,
    StaleOwner,
    Unavailable,
    WalinkError,
)
from shared.ids import check_session_id, new_profile_id, new_session_id
from shared.leases import LeaseKeeper
from shared.models import ENDED, LINKING, EventType, Reason, SessionStatus, now_ms
from shared.settings import Settings
from worker import qr_queue, snapshot
from worker import whatsapp_web as wa
from worker.browser import BrowserLauncher, BrowserSlot
from worker.durable import Durable
from worker.qr_queue import QrQueue
from worker.session import Session, public_from_record
from worker.warm_pool import WarmPool

log = logging.getLogger("walink.sessions")

S = SessionStatus
MAX_CRASH_RESTARTS = 3
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class NotOwner(Conflict):
    code = "not_owner"


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
        self.snapshot_key = snapshot.load_key(settings.snapshot_key) if settings.snapshot_key else None
        self.sessions: dict[str, Session] = {}
        self.closing = False
        self.qr_times_ms: deque[int] = deque(maxlen=1000)
        self.phone_times_ms: deque[int] = deque(maxlen=1000)
        self.keeper = LeaseKeeper(durable.leases, on_lost=self._lease_lost, on_token=self._lease_token)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._crash_restarts: dict[str, int] = {}
        self._restoring: set[str] = set()
        self._loading: dict[str, asyncio.Lock] = {}

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
        rec = await self.store.load_session(session_id)
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
            if rec["status"] != S.HIBERNATED:
                await self._resume(session)
        session.touch()
        if session.status == S.HIBERNATED:
            await self.wake(session)
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

    async def _take_over(self, rec: dict[str, Any]) -> Session:
        """Become the driver of a session known only to Postgres (lease + fencing token)."""
        sid = rec["id"]
        lock = self._loading.setdefault(sid, asyncio.Lock())
        async with lock:
            session = self.sessions.get(sid)
            if session is not None:
                return session
            if self.closing:
                raise Unavailable("this worker is shutting down; retry on another worker")
            token = await self.durable.acquire_or_take(sid, floor=int(rec.get("fencing_token") or 0))
            if token is None:
                owner = await self.durable.lease_owner(sid)
                raise NotOwner(f"session {sid} is driven by {owner or 'another worker'}")
            session = Session.from_record(rec)
            session.fencing_token = token
            session.needs_resume = True
            self.sessions[sid] = session
            self.keeper.hold(sid, token)
            return session

    def in_workspace(self, workspace_id: str | None = None) -> list[Session]:
        return [
            s
            for s in self.sessions.values()
            if s.status != S.DELETED and (workspace_id is None or s.workspace_id == workspace_id)
        ]

    # ------------------------------------------------------------------ create / restart
    async def create(
        self,
        *,
        session_id: str | None,
        workspace_id: str,
        label: str | None = None,
        webhook_url: str | None = None,
        metadata: dict[str, Any] | None = None,
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
        await self.store.ensure_workspace(workspace_id)
        token = await self.durable.acquire(sid, floor=0)
        if token is None:
            raise NotOwner(f"session {sid} is being created elsewhere")
        session.fencing_token = token
        await self.store.insert_session(session.record(), owner=self.name, token=token)
        self.sessions[sid] = session
        self.keeper.hold(sid, token)
        self._start_link(session)
        await self._write(session)  # the answer to "add account" already carries a committed state
        return session

    def _start_link(self, session: Session) -> None:
        """A fresh link: a warm browser when there is one (instant QR), else a queued cold start."""
        slot = self.pool.take()
        if slot is not None:
            session.profile_id = slot.profile_id
            self._adopt(session, slot)
            if slot.last_qr and slot.socket_state == wa.STATE_UNPAIRED:
                self._on_qr(session, {"qr": slot.last_qr, "ttl_ms": slot.last_qr_ttl_ms}, Reason.WARM_POOL)
        else:
            self._spawn(session, self._cold_start(session))

    async def restart(self, session: Session) -> Session:
        if self.closing:
            raise Unavailable("this worker is shutting down; retry on another worker")
        if session.status == S.HIBERNATED:
            await self.wake(session)
            return session
        keep_profile = session.status == S.READY or (
            session.status in {S.STARTING, S.AUTHENTICATED} and session.id in self._restoring
        )
        self._cancel_work(session)
        await self._end_browser(session, wipe=not keep_profile)
        self._reset_link_state(session)
        session.transition(S.STARTING, Reason.RESTART)
        session.mark("requested_at_ms")
        if keep_profile:
            self._restore(session)
        else:
            session.phone_number = None
            session.push_name = None
            session.profile_id = new_profile_id()
            self._start_link(session)
        self._flush(session)
        return session

    def _restore(self, session: Session) -> None:
        self._restoring.add(session.id)
        self._spawn(session, self._cold_start(session))

    def _reset_link_state(self, session: Session) -> None:
        session.batches_used = 0
        session.qr_in_batch = 0
        session.pairing_code = None
        session.logout_requested = False

    async def _cold_start(self, session: Session) -> None:
        try:
            if session.id in self._restoring:
                await self._materialize_profile(session)
            async with self.queue.slot(qr_queue.USER):
                if not self._still_starting(session):
                    return
                slot = await self.launcher.launch(session.profile_id)
                if not self._still_starting(session):
                    await slot.close()
                    return
                self._adopt(session, slot)
                session.timings["browser_started_ms"] = now_ms() - session.timings["requested_at_ms"]
                # hold the queue place until the page shows something: loading it is the heavy part
                await asyncio.wait_for(self._left_starting(session, slot), self.settings.start_timeout_s)
        except TimeoutError:
            self._fail(session, Reason.START_TIMEOUT)
        except BrowserError as exc:
            log.warning("%s: %s", session.id, exc)
            self._fail(session, Reason.BROWSER_LAUNCH_FAILED)
        except SnapshotInvalid as exc:
            log.error("%s: cannot restore: %s", session.id, exc)
            self._fail(session, Reason.CLIENT_FATAL)

    def _still_starting(self, session: Session) -> bool:
        return session.status == S.STARTING and not self.closing and self.sessions.get(session.id) is session

    @staticmethod
    async def _left_starting(session: Session, slot: BrowserSlot) -> None:
        while session.status == S.STARTING and not slot.dead.is_set():
            changed = session.changed
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(slot.dead.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _adopt(self, session: Session, slot: BrowserSlot) -> None:
        session.slot = slot
        slot.set_sink(partial(self._on_page_event, session, slot))

    # ------------------------------------------------------------------ page events
    def _on_page_event(self, session: Session, slot: BrowserSlot, kind: str, data: Any) -> None:
        if session.slot is not slot:
            return  # a browser we already let go of
        try:
            handler = self._handlers.get(kind)
            if handler is not None:
                handler(self, session, data)
        except InvalidState as exc:
            log.debug("%s: ignoring page event %s: %s", session.id, kind, exc)
        self._flush(session)

    def _on_qr(self, session: Session, data: Any, reason: Reason = Reason.QR_SHOWN) -> None:
        if session.status not in {S.STARTING, S.QR} or not isinstance(data, dict) or not data.get("qr"):
            return
        qr = str(data["qr"])
        session.qr_count += 1
        session.qr_in_batch += 1
        ttl = data.get("ttl_ms")
        ttl_ms = (
            int(ttl)
            if isinstance(ttl, int | float) and ttl > 0
            else (wa.QR_FIRST_TTL_MS if session.qr_in_batch == 1 else wa.QR_NEXT_TTL_MS)
        )
        at = now_ms()
        if session.status == S.STARTING:
            if reason == Reason.QR_SHOWN:
                reason = Reason.COLD_START
            session.transition(S.QR, reason)
            elapsed = at - session.timings.get("requested_at_ms", at)
            session.timings["qr_at_ms"] = at
            session.timings["qr_ms"] = elapsed
            self.qr_times_ms.append(elapsed)
            metrics.QR_SECONDS.labels("warm_pool" if reason == Reason.WARM_POOL else "cold").observe(
                elapsed / 1000
            )
        session.qr = qr
        session.qr_expires_at_ms = at + ttl_ms
        session.publish(
            EventType.QR, {"qr": qr, "expires_at_ms": session.qr_expires_at_ms, "n": session.qr_count}
        )

    def _on_state(self, session: Session, data: Any) -> None:
        state = str(data)
        if state == wa.STATE_UNPAIRED_IDLE and session.status == S.QR:
            self._on_batch_end(session)
        elif state == wa.STATE_PAIRING and session.status == S.QR:
            session.mark("scanned_at_ms")
        elif state == wa.STATE_CONNECTED and session.status in {S.STARTING, S.QR, S.PASSKEY_REQUIRED}:
            self._authenticated(session)
        elif state == wa.STATE_CONFLICT and session.status == S.READY:
            if self.settings.takeover_on_conflict and session.slot is not None:
                log.info("%s: WhatsApp is open elsewhere; taking over", session.id)
                self._spawn(session, self._quietly(session.slot.takeover()))
            else:
                self._end(session, S.LOGGED_OUT, Reason.CONFLICT)

    def _authenticated(self, session: Session) -> None:
        restoring = session.id in self._restoring
        session.transition(S.AUTHENTICATED, Reason.RESTORED if restoring else Reason.SCANNED)
        session.mark("authenticated_at_ms")
        session.publish(EventType.SESSION_AUTHENTICATED, {"restored": restoring})
        self._arm(session, self.settings.link_timeout_s, S.AUTHENTICATED, Reason.LINK_TIMEOUT)

    def _on_passkey(self, session: Session, _data: Any) -> None:
        if session.status in {S.QR, S.AUTHENTICATED}:
            session.transition(S.PASSKEY_REQUIRED, Reason.PASSKEY)
            self._arm(session, self.settings.passkey_timeout_s, S.PASSKEY_REQUIRED, Reason.PASSKEY_TIMEOUT)

    def _on_ready(self, session: Session, data: Any) -> None:
        if session.status == S.READY or session.ended:
            return  # hasSynced fires more than once (whatsapp-web.js #5801)
        if not isinstance(data, dict) or not data.get("phone"):
            self._fail(session, Reason.PHONE_UNAVAILABLE)
            return
        if session.status in {S.STARTING, S.QR, S.PASSKEY_REQUIRED}:
            self._authenticated(session)
        restoring = session.id in self._restoring
        self._restoring.discard(session.id)
        session.phone_number = str(data["phone"])
        session.push_name = str(data["push_name"]) if data.get("push_name") else None
        session.phone_method = str(data.get("method") or "")
        at = session.mark("ready_at_ms")
        if restoring:
            elapsed = at - session.timings.get("requested_at_ms", at)
            session.timings["restore_ms"] = elapsed
            metrics.WAKE_SECONDS.observe(elapsed / 1000)
        else:
            elapsed = at - session.timings.get("authenticated_at_ms", at)
            session.timings["phone_extraction_ms"] = elapsed
            self.phone_times_ms.append(elapsed)
            metrics.PHONE_SECONDS.observe(elapsed / 1000)
            metrics.LINKS.labels("linked", Reason.SYNCED.value).inc()
        session.transition(S.READY, Reason.RESTORED if restoring else Reason.SYNCED)
        session.touch()  # becoming ready is a use: the idle clock starts here
        self._disarm(session)
        session.publish(
            EventType.SESSION_READY,
            {"phone_number": session.phone_number, "push_name": session.push_name, "restored": restoring},
        )
        self._arm_idle(session)
        self._spawn(session, self._enforce_capacity(), cancel_on_end=False)
        if self.snapshot_key is not None:
            self._spawn(session, self._live_snapshot(session))

    def _on_logged_out(self, session: Session, data: Any) -> None:
        if session.ended or not isinstance(data, wa.LogoutNotice):
            return
        if session.logout_requested:
            self._end(session, S.LOGGED_OUT, Reason.API_LOGOUT)
        elif data.is_failure:
            self._end(session, S.FAILED, Reason(data.reason))
        else:
            self._end(session, S.LOGGED_OUT, Reason(data.reason))

    def _on_browser_gone(self, session: Session, _data: Any) -> None:
        if session.ended or self.closing:
            return
        if session.status == S.READY:
            count = self._crash_restarts.get(session.id, 0) + 1
            self._crash_restarts[session.id] = count
            if count <= MAX_CRASH_RESTARTS:
                log.warning("%s: browser died; restoring it from its profile (%d)", session.id, count)
                self._spawn(session, self._quietly(self.restart(session)))
                return
        self._fail(session, Reason.BROWSER_CRASHED)

    def _on_hook_timeout(self, session: Session, _data: Any) -> None:
        if session.status in LINKING:
            self._fail(session, Reason.START_TIMEOUT)

    _handlers = {
        "qr": _on_qr,
        "state": _on_state,
        "passkey": _on_passkey,
        "ready": _on_ready,
        "logged_out": _on_logged_out,
        "crashed": _on_browser_gone,
        "closed": _on_browser_gone,
        "hook_timeout": _on_hook_timeout,
    }

    def _on_batch_end(self, session: Session) -> None:
        session.batches_used += 1
        if session.batches_used < self.settings.qr_batches and session.slot is not None:
            session.qr_in_batch = 0
            self._spawn(session, self._quietly(session.slot.refresh_qr()))
        else:
            self._end(session, S.EXPIRED, Reason.QR_TIMEOUT)

    # ------------------------------------------------------------------ persistence
    def _flush(self, session: Session) -> None:
        if session.pending:
            self._spawn(session, self._write(session), cancel_on_end=False)

    async def _write(self, session: Session, *, deleted: bool = False) -> None:
        """Commit the session's state with its pending events, then deliver them (in order)."""
        async with session.write_lock:
            events, session.pending = session.pending, []
            if not events and not deleted:
                return
            rec = session.record()
            replaced: list[str] = []
            try:
                if any(e.type == EventType.SESSION_READY for e in events) and session.phone_number:
                    result = await self.store.mark_ready(
                        rec, owner=self.name, token=session.fencing_token, events=events
                    )
                    written, replaced = result.events, result.replaced
                    session.is_primary = result.is_primary
                else:
                    written = await self.store.save(
                        rec, owner=self.name, token=session.fencing_token, events=events, deleted=deleted
                    )
            except StaleOwner as exc:
                log.warning("%s", exc)
                self._let_go(session, Reason.LEASE_LOST)
                return
            except DB_ERRORS as exc:
                session.pending[:0] = events
                log.warning("%s: cannot commit (%s); retrying", session.id, exc)
                self._spawn(session, self._write_later(session), cancel_on_end=False)
                return
            committed = [e.session_event() for e in written]
            # the cached view first: whoever hears of an event then reads that state on any worker
            await self.durable.cache_put(session.public(self.name))
            for event in committed:
                session.deliver(event)
            await self.durable.publish(session.id, [e.to_dict() for e in committed])
        for other in replaced:
            self._replaced(other, by=session.id)

    async def _write_later(self, session: Session) -> None:
        await asyncio.sleep(0.5)  # back off while Postgres is unreachable
        await self._write(session)

    def _replaced(self, session_id: str, *, by: str) -> None:
        """An older session of the same phone was soft-deleted by a newer link: end it here."""
        session = self.sessions.get(session_id)
        if session is None or session.ended:
            return
        log.info("%s: replaced by %s (same phone in the workspace)", session_id, by)
        session.phone_number = None
        self._end(session, S.FAILED, Reason.REPLACED, unlink=True)
        self._flush(session)

    # ------------------------------------------------------------------ ending
    def _fail(self, session: Session, reason: Reason) -> None:
        if not session.ended:
            self._end(session, S.FAILED, reason)
            self._flush(session)

    def _end(self, session: Session, status: SessionStatus, reason: Reason, *, unlink: bool = False) -> None:
        """Move to an ended state, tell subscribers, and let the browser and profile go."""
        if session.ended or not session.can_move_to(status):
            return
        self._stand_down(session)
        was_linking = session.status in LINKING and session.id not in self._restoring
        session.transition(status, reason)
        if was_linking:  # the success rate is about linkings, not about sessions ending later
            metrics.LINKS.labels(status.value, reason.value).inc()
        event = EventType.SESSION_DISCONNECTED if status == S.LOGGED_OUT else EventType.SESSION_FAILED
        session.publish(event, {"status": status.value, "reason": reason.value})
        self._spawn(session, self._end_browser(session, wipe=True, unlink=unlink), cancel_on_end=False)

    async def _end_browser(self, session: Session, *, wipe: bool, unlink: bool = False) -> None:
        slot, session.slot = session.slot, None
        if slot is not None:
            if unlink and slot.hooked.is_set():
                with contextlib.suppress(WalinkError):
                    await slot.logout()
            await slot.close()
        if wipe:
            shutil.rmtree(self.launcher.profile_dir(session.profile_id), ignore_errors=True)

    def _let_go(self, session: Session, reason: Reason) -> None:
        """Another worker owns the session now: stop driving it, write nothing more."""
        if self.sessions.get(session.id) is not session:
            return
        log.warning("%s: no longer ours (%s); letting go", session.id, reason.value)
        self._cancel_work(session)
        self._stand_down(session)
        session.pending.clear()
        self._forget(session)
        self._spawn(session, self._end_browser(session, wipe=True), cancel_on_end=False)

    def _lease_lost(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            self._let_go(session, Reason.LEASE_LOST)

    def _lease_token(self, session_id: str, token: int) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.fencing_token = token

    # ------------------------------------------------------------------ commands
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
            self._cancel_work(session)
            self._end(session, S.LOGGED_OUT, Reason.API_LOGOUT)
        await self._write(session)
        return session

    @staticmethod
    async def _until(
        session: Session, statuses: set[SessionStatus] | frozenset[SessionStatus], timeout_s: float
    ) -> None:
        async def wait() -> None:
            while session.status not in statuses:
                await session.changed.wait()

        await asyncio.wait_for(wait(), timeout_s)

    async def pairing_code(self, session: Session, phone: str) -> str:
        if session.status != S.QR or session.slot is None:
            raise InvalidState(
                f"a pairing code needs a session waiting for its link; this one is {session.status}"
            )
        code = (await session.slot.request_pairing_code(phone)).upper().replace("-", "")
        session.pairing_code = f"{code[:4]}-{code[4:]}" if len(code) == 8 else code
        return session.pairing_code

    async def delete(self, session: Session) -> None:
        self._cancel_work(session)
        self._stand_down(session)
        was_linked = session.status == S.READY
        if session.status != S.DELETED:
            session.transition(S.DELETED, Reason.DELETED)
        await self._end_browser(session, wipe=True, unlink=was_linked)
        await self._write(session, deleted=True)
        with contextlib.suppress(*DB_ERRORS):
            await self.store.delete_snapshot(session.id)
        await self.durable.release(session.id)
        await self.durable.cache_drop(session.id)
        self._forget(session)

    # ------------------------------------------------------------------ hibernation
    def _arm_idle(self, session: Session) -> None:
        self._cancel_idle(session)
        remaining_s = session.last_used + self.settings.idle_timeout_s - time.monotonic()
        self._idle_timers[session.id] = asyncio.get_running_loop().call_later(
            max(0.0, remaining_s), self._idle_check, session
        )

    def _idle_check(self, session: Session) -> None:
        self._idle_timers.pop(session.id, None)
        if session.status != S.READY or self.sessions.get(session.id) is not session:
            return
        if time.monotonic() - session.last_used < self.settings.idle_timeout_s:
            self._arm_idle(session)  # used since the timer was set
            return
        self._spawn(session, self._quietly(self.hibernate(session, Reason.IDLE)), cancel_on_end=False)

    def _cancel_idle(self, session: Session) -> None:
        _cancel_timer(self._idle_timers, session.id)

    async def _enforce_capacity(self) -> None:
        """Keep at most ``max_active_sessions`` browsers of ready sessions: hibernate the LRU ones."""
        active = [s for s in self.sessions.values() if s.status == S.READY and s.slot is not None]
        excess = len(active) - self.settings.max_active_sessions
        if excess <= 0:
            return
        for session in sorted(active, key=lambda s: s.last_used)[:excess]:
            await self._quietly(self.hibernate(session, Reason.LRU))

    async def hibernate(self, session: Session, reason: Reason = Reason.IDLE) -> None:
        """Close the browser, keep the login: an encrypted snapshot goes to Postgres, the lease is freed."""
        async with session.op_lock:
            if session.status != S.READY:
                return
            self._cancel_idle(session)
            started = time.monotonic()
            await self._end_browser(session, wipe=False)
            profile = self.launcher.profile_dir(session.profile_id)
            if self.snapshot_key is not None:
                session.timings["snapshot_bytes"] = await self._store_snapshot(session)
            session.timings["hibernate_ms"] = int((time.monotonic() - started) * 1000)
            session.transition(S.HIBERNATED, reason)
            await self._write(session)
            if self.snapshot_key is not None:
                shutil.rmtree(profile, ignore_errors=True)  # the snapshot is the profile now
            await self.durable.release(session.id)
            self.keeper.drop(session.id)

    async def wake(self, session: Session) -> None:
        """Bring a hibernated session back to ready on this worker, from its snapshot if needed."""
        async with session.op_lock:
            if session.status != S.HIBERNATED:
                return
            if session.id not in self.keeper.held:
                token = await self.durable.acquire(session.id, floor=session.fencing_token)
                if token is None:
                    raise NotOwner(f"session {session.id} is driven by another worker")
                session.fencing_token = token
                self.keeper.hold(session.id, token)
            session.needs_resume = False  # woken here: nothing else to resume
            await self._begin_restore(session, Reason.WAKE)

    def wake_soon(self, session: Session) -> None:
        if session.status == S.HIBERNATED and not self.closing:
            self._spawn(session, self._quietly(self.wake(session)), cancel_on_end=False)

    async def _live_snapshot(self, session: Session) -> None:
        """Shortly after ready, snapshot the live profile so any worker can restore the session if
        this one dies without a goodbye. Not at once: Chromium commits localStorage (where WhatsApp
        keeps WANoiseInfo) to disk in batches up to ~5 s late; a copy taken sooner shows a QR."""
        await asyncio.sleep(self.settings.live_snapshot_delay_s)
        if session.status != S.READY or session.slot is None or self.snapshot_key is None:
            return
        try:
            size = await self._store_snapshot(session, live=True)
        except (WalinkError, OSError, *DB_ERRORS) as exc:
            log.warning("%s: live snapshot failed: %s", session.id, exc)
            return
        session.timings["live_snapshot_bytes"] = size

    async def _store_snapshot(self, session: Session, *, live: bool = False) -> int:
        """Pack the session's profile (``live``: under a running Chromium) and store it, fenced by
        the session's lease token; the answer is the snapshot's size in bytes."""
        assert self.snapshot_key is not None  # callers check: snapshots are enabled
        pack = snapshot.pack_live_profile_async if live else snapshot.pack_profile_async
        profile = self.launcher.profile_dir(session.profile_id)
        blob = await pack(profile, key=self.snapshot_key, session_id=session.id)
        await self.store.put_snapshot(session.id, blob, token=session.fencing_token)
        return len(blob)

    async def _begin_restore(self, session: Session, reason: Reason) -> bool:
        """Start bringing a linked session back from its profile (restored from its snapshot if
        need be); False when that cannot be had and the session ended ``failed`` instead."""
        session.transition(S.STARTING, reason)  # no-op (no event) when already starting
        session.mark("requested_at_ms")
        if not await self._profile_or_fail(session):
            return False
        self._restore(session)
        await self._write(session)
        return True

    async def _profile_or_fail(self, session: Session) -> bool:
        """The session's profile on disk (from its snapshot if need be); if it cannot be had, the
        session ends ``failed``/``client_fatal`` (committed) and the answer is False."""
        try:
            await self._materialize_profile(session)
        except SnapshotInvalid as exc:
            log.error("%s: cannot restore: %s", session.id, exc)
            self._end(session, S.FAILED, Reason.CLIENT_FATAL)
            await self._write(session)
            return False
        return True

    async def _materialize_profile(self, session: Session) -> None:
        profile: Path = self.launcher.profile_dir(session.profile_id)
        if _has_files(profile):
            return
        if self.snapshot_key is None:
            raise SnapshotInvalid("no local profile and snapshots are disabled (WALINK_SNAPSHOT_KEY unset)")
        blob = await self.store.get_snapshot(session.id)
        if blob is None:
            raise SnapshotInvalid(f"no snapshot stored for {session.id}")
        shutil.rmtree(profile, ignore_errors=True)
        await snapshot.unpack_profile_async(blob, profile, key=self.snapshot_key, session_id=session.id)

    # ------------------------------------------------------------------ restore on start, shutdown
    async def restore_all(self) -> int:
        """Take back this worker's sessions: ``ready`` ones come back from their profiles (or
        snapshots) without a QR; linkings whose QR died with the process get a fresh QR."""
        restored = 0
        for rec in await self.store.sessions_owned_by(self.name):
            if S(rec["status"]) in ENDED or rec["status"] == S.HIBERNATED:
                continue
            try:
                session = await self._take_over(rec)
            except NotOwner:
                continue
            restored += await self._resume(session)
        return restored

    async def _resume(self, session: Session) -> int:
        """Drive a session just taken over: restore a linked one without a QR (1), give a linking
        one a fresh QR (0). Only the first call after a take-over acts: a request and the orphan
        watcher may both reach a session taken over a moment ago."""
        if not session.needs_resume:
            return 0
        session.needs_resume = False
        if session.slot is not None or session.ended or session.status == S.HIBERNATED:
            return 0
        if session.status == S.READY or (
            session.status in {S.STARTING, S.AUTHENTICATED} and session.phone_number
        ):
            return 1 if await self._begin_restore(session, Reason.RESTORING) else 0
        shutil.rmtree(self.launcher.profile_dir(session.profile_id), ignore_errors=True)
        session.profile_id = new_profile_id()
        self._reset_link_state(session)
        if session.status != S.STARTING:
            session.transition(S.STARTING, Reason.RESTART)
        session.mark("requested_at_ms")
        self._start_link(session)
        await self._write(session)
        return 0

    async def adopt_orphans(self) -> int:
        """Take over sessions whose owner is gone (no heartbeat) or drained (lease released), when
        this worker is their place on the ring of live workers. Returns how many were adopted."""
        if self.closing:
            return 0
        live = await self.durable.live_workers()
        if live is None:
            return 0
        serving = sorted(name for name, beat in live.items() if not beat.get("draining"))
        if self.name not in serving:
            return 0
        ring = HashRing(nodes=serving)
        adopted = 0
        for rec in await self.store.orphans(set(serving)):
            if rec["id"] in self.sessions or ring.get_node(rec["id"]) != self.name:
                continue
            try:
                session = await self._take_over(rec)
            except (NotOwner, Unavailable):
                continue
            metrics.ADOPTED.labels(rec["status"]).inc()
            log.info("%s: adopted from %s (%s)", rec["id"], rec.get("owner"), rec["status"])
            await self._resume(session)
            adopted += 1
        return adopted

    async def watch_orphans(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)  # the membership period
            try:
                await self.adopt_orphans()
            except DB_ERRORS as exc:
                log.warning("orphan check failed: %s", exc)

    async def close(self) -> None:
        """Stop: no new work, end every browser, snapshot ready sessions, free their leases."""
        self.closing = True
        for timer in [*self._timers.values(), *self._idle_timers.values()]:
            timer.cancel()
        self._timers.clear()
        self._idle_timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sessions = list(self.sessions.values())
        await asyncio.gather(*(self._end_browser(s, wipe=False) for s in sessions), return_exceptions=True)
        await asyncio.gather(*(self._handover(s) for s in sessions), return_exceptions=True)
        for session in sessions:
            session.close_subscribers()

    async def _handover(self, session: Session) -> None:
        """Leave the session ready for another worker: a fresh snapshot, then the lease freed."""
        with contextlib.suppress(WalinkError, *DB_ERRORS):
            if session.status == S.READY and self.snapshot_key is not None:
                await self._store_snapshot(session)
        await self.durable.release(session.id)

    async def settle(self) -> None:
        """Until the background work running now (writes, browser ends, restarts) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

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
            "by_status": by_status,
        }

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

    # ------------------------------------------------------------------ helpers
    def _spawn(self, session: Session, coro: Coroutine[Any, Any, Any], *, cancel_on_end: bool = True) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if cancel_on_end:
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
        task.add_done_callback(self._log_failure)

    @staticmethod
    def _log_failure(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception())

    async def _quietly(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except WalinkError as exc:
            log.warning("%s", exc)

    def _cancel_work(self, session: Session) -> None:
        current = asyncio.current_task()
        for task in list(session.tasks):
            if task is not current:
                task.cancel()

    def _arm(self, session: Session, timeout_s: float, status: SessionStatus, reason: Reason) -> None:
        """Fail the session if it is still in ``status`` after ``timeout_s`` (a deadline, not a poll)."""
        self._disarm(session)
        mark = len(session.history)

        def fire() -> None:
            self._timers.pop(session.id, None)
            if session.status == status and len(session.history) == mark:
                self._fail(session, reason)

        self._timers[session.id] = asyncio.get_running_loop().call_later(timeout_s, fire)

    def _disarm(self, session: Session) -> None:
        _cancel_timer(self._timers, session.id)

    def _stand_down(self, session: Session) -> None:
        """No deadline, no idle timer, no restore in progress: the session is ending or let go."""
        self._disarm(session)
        self._cancel_idle(session)
        self._restoring.discard(session.id)

    def _forget(self, session: Session) -> None:
        """No longer driven here: its lease not renewed, out of the table, its streams ended."""
        self.keeper.drop(session.id)
        self.sessions.pop(session.id, None)
        session.close_subscribers()


def _cancel_timer(table: dict[str, asyncio.TimerHandle], session_id: str) -> None:
    timer = table.pop(session_id, None)
    if timer is not None:
        timer.cancel()


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


async def close_with_deadline(manager: SessionManager, deadline_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(manager.close(), deadline_s)
