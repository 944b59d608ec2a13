"""The session manager: creates, drives, restores and ends this worker's sessions.

Page events (see :mod:`worker.whatsapp_web`) arrive per session through its browser slot and are
turned into state transitions here; nothing waits on a timer for the page to do something.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import statistics
from collections import deque
from collections.abc import Coroutine
from functools import partial
from typing import Any

from shared import metrics
from shared.errors import (
    BrowserError,
    InvalidState,
    SessionExists,
    SessionNotFound,
    Unavailable,
    WalinkError,
)
from shared.ids import check_session_id, new_profile_id, new_session_id
from shared.models import LINKING, EventType, Reason, SessionStatus, now_ms
from shared.settings import Settings
from worker import qr_queue
from worker import whatsapp_web as wa
from worker.browser import BrowserLauncher, BrowserSlot
from worker.qr_queue import QrQueue
from worker.session import Session
from worker.session_store import SessionStore
from worker.warm_pool import WarmPool

log = logging.getLogger("walink.sessions")

S = SessionStatus
MAX_CRASH_RESTARTS = 3


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        launcher: BrowserLauncher,
        queue: QrQueue,
        pool: WarmPool,
        store: SessionStore,
    ) -> None:
        self.settings = settings
        self.launcher = launcher
        self.queue = queue
        self.pool = pool
        self.store = store
        self.name = f"{settings.host}:{settings.worker_port}"
        self.sessions: dict[str, Session] = {}
        self.closing = False
        self.qr_times_ms: deque[int] = deque(maxlen=1000)
        self.phone_times_ms: deque[int] = deque(maxlen=1000)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._crash_restarts: dict[str, int] = {}
        self._restoring: set[str] = set()

    # ------------------------------------------------------------------ lookups
    def get(self, session_id: str, workspace_id: str | None = None) -> Session:
        check_session_id(session_id)
        session = self.sessions.get(session_id)
        if session is None or session.status == S.DELETED:
            raise SessionNotFound(f"no session {session_id}")
        if workspace_id is not None and session.workspace_id != workspace_id:
            raise SessionNotFound(f"no session {session_id}")  # same answer: no existence leak
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
        self.sessions[sid] = session
        self._start_link(session)
        self._save(session)
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
            self._spawn(session, self._cold_start(session, Reason.COLD_START))

    async def restart(self, session: Session) -> Session:
        if self.closing:
            raise Unavailable("this worker is shutting down; retry on another worker")
        keep_profile = session.status in {S.READY, S.HIBERNATED} or (
            session.status == S.STARTING and session.id in self._restoring
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
        self._save(session)
        return session

    def _restore(self, session: Session) -> None:
        self._restoring.add(session.id)
        self._spawn(session, self._cold_start(session, Reason.RESTORING))

    def _reset_link_state(self, session: Session) -> None:
        session.batches_used = 0
        session.qr_in_batch = 0
        session.pairing_code = None
        session.logout_requested = False

    async def _cold_start(self, session: Session, reason: Reason) -> None:
        try:
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

    def _still_starting(self, session: Session) -> bool:
        return session.status == S.STARTING and not self.closing

    @staticmethod
    async def _left_starting(session: Session, slot: BrowserSlot) -> None:
        while session.status == S.STARTING and not slot.dead.is_set():
            changed = session.changed
            await asyncio.wait(
                [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(slot.dead.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )

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

    def _on_qr(self, session: Session, data: Any, reason: Reason = Reason.QR_SHOWN) -> None:
        if session.status not in {S.STARTING, S.QR} or not isinstance(data, dict) or not data.get("qr"):
            return
        session.qr = str(data["qr"])
        session.qr_count += 1
        session.qr_in_batch += 1
        ttl = data.get("ttl_ms")
        ttl_ms = (
            int(ttl)
            if isinstance(ttl, int | float) and ttl > 0
            else (wa.QR_FIRST_TTL_MS if session.qr_in_batch == 1 else wa.QR_NEXT_TTL_MS)
        )
        at = now_ms()
        session.qr_expires_at_ms = at + ttl_ms
        if session.status == S.STARTING:
            if reason == Reason.QR_SHOWN:
                reason = Reason.COLD_START
            session.transition(S.QR, reason)
            session.qr = str(data["qr"])
            session.qr_expires_at_ms = at + ttl_ms
            elapsed = at - session.timings.get("requested_at_ms", at)
            session.timings["qr_at_ms"] = at
            session.timings["qr_ms"] = elapsed
            self.qr_times_ms.append(elapsed)
            metrics.QR_SECONDS.labels("warm_pool" if reason == Reason.WARM_POOL else "cold").observe(
                elapsed / 1000
            )
            self._save(session)
        session.publish(
            EventType.QR, {"qr": session.qr, "expires_at_ms": session.qr_expires_at_ms, "n": session.qr_count}
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
        self._save(session)

    def _on_passkey(self, session: Session, _data: Any) -> None:
        if session.status in {S.QR, S.AUTHENTICATED}:
            session.transition(S.PASSKEY_REQUIRED, Reason.PASSKEY)
            self._arm(session, self.settings.passkey_timeout_s, S.PASSKEY_REQUIRED, Reason.PASSKEY_TIMEOUT)
            self._save(session)

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
        self._crash_restarts.pop(session.id, None)
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
        self._disarm(session)
        session.publish(
            EventType.SESSION_READY,
            {"phone_number": session.phone_number, "push_name": session.push_name, "restored": restoring},
        )
        self._save(session)

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

    # ------------------------------------------------------------------ ending
    def _fail(self, session: Session, reason: Reason) -> None:
        if not session.ended:
            self._end(session, S.FAILED, reason)

    def _end(self, session: Session, status: SessionStatus, reason: Reason) -> None:
        """Move to an ended state, tell subscribers, and let the browser and profile go."""
        if session.ended or not session.can_move_to(status):
            return
        self._disarm(session)
        self._restoring.discard(session.id)
        session.transition(status, reason)
        metrics.LINKS.labels(status.value, reason.value).inc()
        event = EventType.SESSION_DISCONNECTED if status == S.LOGGED_OUT else EventType.SESSION_FAILED
        session.publish(event, {"status": status.value, "reason": reason.value})
        self._save(session)
        self._spawn(session, self._end_browser(session, wipe=True), cancel_on_end=False)

    async def _end_browser(self, session: Session, *, wipe: bool) -> None:
        slot, session.slot = session.slot, None
        if slot is not None:
            await slot.close()
        if wipe:
            shutil.rmtree(self.launcher.profile_dir(session.profile_id), ignore_errors=True)

    # ------------------------------------------------------------------ commands
    async def logout(self, session: Session) -> Session:
        if session.ended:
            raise InvalidState(f"session {session.id} is already {session.status}")
        slot = session.slot
        if (
            slot is not None
            and slot.hooked.is_set()
            and session.status in {S.READY, S.AUTHENTICATED, S.PASSKEY_REQUIRED}
        ):
            session.logout_requested = True
            changed = session.changed
            try:
                await slot.logout()
                await asyncio.wait_for(self._until_ended(session, changed), 15.0)
            except (WalinkError, TimeoutError) as exc:
                log.warning(
                    "%s: logout through WhatsApp Web did not finish (%s); ending locally", session.id, exc
                )
        if not session.ended:
            self._cancel_work(session)
            self._end(session, S.LOGGED_OUT, Reason.API_LOGOUT)
        return session

    @staticmethod
    async def _until_ended(session: Session, changed: asyncio.Event) -> None:
        while not session.ended:
            await changed.wait()
            changed = session.changed

    async def pairing_code(self, session: Session, phone: str) -> str:
        if session.status != S.QR or session.slot is None:
            raise InvalidState(
                f"a pairing code needs a session waiting for its link; this one is {session.status}"
            )
        code = (await session.slot.request_pairing_code(phone)).upper().replace("-", "")
        session.pairing_code = f"{code[:4]}-{code[4:]}" if len(code) == 8 else code
        session.publish(
            EventType.STATUS, {"status": session.status.value, "reason": Reason.PAIRING_CODE.value}
        )
        return session.pairing_code

    async def delete(self, session: Session) -> None:
        self._cancel_work(session)
        self._disarm(session)
        self._restoring.discard(session.id)
        if session.status != S.DELETED:
            session.transition(S.DELETED, Reason.DELETED)
        await self._end_browser(session, wipe=True)
        self.store.delete(session.id)
        session.close_subscribers()
        self.sessions.pop(session.id, None)

    # ------------------------------------------------------------------ restore on start, shutdown
    def restore_all(self) -> int:
        """Load this worker's sessions; bring ``ready`` ones back from their profiles without a QR."""
        restored = 0
        for record in self.store.load_all():
            session = Session.from_record(record)
            self.sessions[session.id] = session
            profile = self.launcher.profile_dir(session.profile_id)
            if session.status in {S.READY, S.HIBERNATED} or (
                session.status in {S.STARTING, S.AUTHENTICATED} and session.phone_number
            ):
                if not profile.is_dir():
                    session.transition(S.FAILED, Reason.CLIENT_FATAL)
                    self._save(session)
                    continue
                if session.status != S.STARTING:
                    session.transition(S.STARTING, Reason.RESTORING)
                session.mark("requested_at_ms")
                self._restore(session)
                restored += 1
            elif session.status in LINKING:
                # the QR died with the previous process: start a fresh link for the same session
                shutil.rmtree(profile, ignore_errors=True)
                session.profile_id = new_profile_id()
                session.transition(S.STARTING, Reason.RESTART)
                session.mark("requested_at_ms")
                self._start_link(session)
            self._save(session)
        return restored

    async def close(self) -> None:
        """Stop: no new work, end every browser (profiles and sidecars stay for the next start)."""
        self.closing = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        sessions = list(self.sessions.values())
        await asyncio.gather(*(self._end_browser(s, wipe=False) for s in sessions), return_exceptions=True)
        for session in sessions:
            session.close_subscribers()

    async def settle(self) -> None:
        """Until the background work running now (browser ends, restarts) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for s in self.sessions.values():
            by_status[s.status.value] = by_status.get(s.status.value, 0) + 1
        return {
            "active": sum(1 for s in self.sessions.values() if s.slot is not None),
            "authenticated": sum(
                1
                for s in self.sessions.values()
                if s.status in {S.AUTHENTICATED, S.PASSKEY_REQUIRED, S.READY}
            ),
            "qr_scanning": by_status.get(S.QR.value, 0),
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
    def _save(self, session: Session) -> None:
        if session.status != S.DELETED:
            self.store.save(session.record())

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
        timer = self._timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()


async def close_with_deadline(manager: SessionManager, deadline_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(manager.close(), deadline_s)
