"""Linking: a session's browser is started (a warm one, a queued cold start, or its own profile
for a restore) and its page events (see :mod:`worker.whatsapp_web`) are turned into state
transitions; nothing waits on a timer for the page to do something. A linking step that must
end in time has a deadline, not a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from functools import partial
from typing import Any, NoReturn

from shared import metrics
from shared import passkeys as wire
from shared.aio import first_set
from shared.errors import (
    BrowserError,
    InvalidState,
    PasskeyChallengeMismatch,
    PasskeyExpired,
    PasskeyNotRequested,
    PasskeyTokenUnknown,
    PasskeyTokenUsed,
    SnapshotInvalid,
    SnapshotKeyUnknown,
    Unavailable,
)
from shared.ids import new_profile_id
from shared.inputs import storable
from shared.models import LINKING, QR_PENDING, EventType, Reason, SessionStatus, now_ms
from worker import passkey, qr_queue
from worker import whatsapp_web as wa
from worker.browser import BrowserSlot
from worker.commits import Commits
from worker.context import Context
from worker.ending import Ending
from worker.hibernation import Hibernation, until_settled
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus
MAX_CRASH_RESTARTS = 3
MAX_TAKEOVERS = 3
"""Takeovers of one session within ``TAKEOVER_WINDOW_S``; one more and it ends ``failed``/``conflict``
(two browsers on one device would otherwise knock each other out for ever)."""
TAKEOVER_WINDOW_S = 60.0
MAX_VERSION_RELOADS = 1
PASSKEY_TOKENS_KEPT = 1024
_BLOCKED_REASONS = {wa.STATE_TOS_BLOCK: Reason.TOS_BLOCK, wa.STATE_PROXYBLOCK: Reason.PROXYBLOCK}


class Linking:
    def __init__(self, ctx: Context, ending: Ending, commits: Commits, hibernation: Hibernation) -> None:
        self._ctx = ctx
        self._ending = ending
        self._commits = commits
        self._hibernation = hibernation
        self.qr_times_ms: deque[int] = deque(maxlen=1000)
        self._passkey_tokens: OrderedDict[bytes, passkey.PendingPasskey] = OrderedDict()
        """The last ``PASSKEY_TOKENS_KEPT`` requests by token digest: a token whose session has
        ended since is answered ``used`` or ``expired``, not ``unknown``."""
        self.phone_times_ms: deque[int] = deque(maxlen=1000)

    # ------------------------------------------------------------------ starting a browser
    def start_link(self, session: Session) -> None:
        """A fresh link: a warm browser when there is one (instant QR), else a queued cold start."""
        slot = self._ctx.pool.take()
        if slot is not None:
            session.profile_id = slot.profile_id
            self._adopt(session, slot)
            if slot.last_qr and slot.socket_state == wa.STATE_UNPAIRED:
                warm = {"qr": slot.last_qr, "ref": slot.last_qr_ref, "ttl_ms": slot.last_qr_ttl_ms}
                self._on_qr(session, warm, Reason.WARM_POOL)
        else:
            self._ctx.tasks.spawn(session, self._cold_start(session, qr_queue.USER))

    async def restart(self, session: Session) -> Session:
        ctx = self._ctx
        if ctx.closing:
            raise Unavailable("this worker is shutting down; retry on another worker")
        if session.status == S.HIBERNATED:
            await self._hibernation.wake(session)
            return session
        async with session.op_lock:  # a wake unpacking the profile finishes that first
            pass
        if session.id in ctx.restoring and session.status in {S.STARTING, S.AUTHENTICATED}:
            # already coming back from its own profile (a wake or a restore): cancelling that
            # half-way would leave a half-unpacked profile, i.e. a QR instead of the login
            return session
        keep_profile = session.status == S.READY
        if keep_profile:
            # a page closed before a new link's credentials settled would boot logged out
            await until_settled(session)
        # the work in flight ends first: a launch it was in must let go of the profile
        await ctx.tasks.stop_work(session, ctx.settings.start_timeout_s)
        await self._ending.end_browser(session, wipe=not keep_profile)
        self.reset_link_state(session)
        session.transition(S.STARTING, Reason.RESTART)
        session.mark("requested_at_ms")
        if keep_profile:
            self.restore(session, qr_queue.USER)
        else:
            session.phone_number = None
            session.push_name = None
            session.profile_id = new_profile_id()
            self.start_link(session)
        self._commits.flush(session)
        return session

    def restore(self, session: Session, priority: int) -> None:
        """Start the session's browser on its own profile (a linked session coming back): a wake
        or restart asked for by a user at ``USER`` priority, restores at start-up and take-overs
        at ``RESTORE`` (after users and warm-pool refills)."""
        self._ctx.restoring.add(session.id)
        self._ctx.tasks.spawn(session, self._cold_start(session, priority))

    def reset_link_state(self, session: Session) -> None:
        session.batches_used = 0
        session.qr_in_batch = 0
        session.qr_ref = None
        session.pairing_code = None
        session.logout_requested = False

    async def _cold_start(self, session: Session, priority: int) -> None:
        ctx = self._ctx
        restoring = session.id in ctx.restoring
        try:
            if restoring:
                await self._hibernation.materialize_profile(session)
            on_wait = None if restoring else partial(self._on_queued, session)
            async with ctx.queue.slot(priority, on_wait):
                session.queued = None
                if not self._still_starting(session):
                    return
                slot = await ctx.launcher.launch(session.profile_id)
                if not self._still_starting(session):
                    await slot.close()
                    return
                self._adopt(session, slot)
                session.timings["browser_started_ms"] = now_ms() - session.timings["requested_at_ms"]
                # hold the queue place until the page shows something: loading it is the heavy part
                await asyncio.wait_for(self._left_starting(session, slot), ctx.settings.start_timeout_s)
        except TimeoutError:
            self.fail(session, Reason.START_TIMEOUT)
        except BrowserError as exc:
            log.warning("%s: %s", session.id, exc)
            self.fail(session, Reason.BROWSER_LAUNCH_FAILED)
        except SnapshotKeyUnknown as exc:  # not the session's fault: left as it was
            await self._hibernation.cannot_open(session, exc)
        except SnapshotInvalid as exc:
            log.error("%s: cannot restore: %s", session.id, exc)
            self.fail(session, Reason.CLIENT_FATAL)

    def _on_queued(self, session: Session, position: int, eta_ms: int) -> None:
        """Waiting for a place to start the browser: the client hears where it stands (SSE
        ``qr_pending``, not an outbox event: it says nothing the record needs)."""
        if session.status == S.STARTING:
            session.notify(QR_PENDING, {"session_id": session.id, "position": position, "eta_ms": eta_ms})

    def _still_starting(self, session: Session) -> bool:
        ctx = self._ctx
        return session.status == S.STARTING and not ctx.closing and ctx.sessions.get(session.id) is session

    @staticmethod
    async def _left_starting(session: Session, slot: BrowserSlot) -> None:
        while session.status == S.STARTING and not slot.dead.is_set():
            await first_set(session.changed, slot.dead)

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
        self._commits.flush(session)

    def _on_qr(self, session: Session, data: Any, reason: Reason = Reason.QR_SHOWN) -> None:
        if session.status not in {S.STARTING, S.QR} or not isinstance(data, dict) or not data.get("qr"):
            return
        qr = str(data["qr"])
        ref = str(data.get("ref") or qr.split(",", 1)[0])
        # the same ref drawn again with a new ADV secret (companion_reg_refresh): a new string to
        # publish, but the ref's lifetime goes on
        same_ref = session.status == S.QR and ref == session.qr_ref and session.qr_expires_at_ms is not None
        session.qr_count += 1
        session.qr_ref = ref
        session.pairing_code = None  # a QR on the page: no pairing code is active any more
        at = now_ms()
        if same_ref and session.qr_expires_at_ms is not None:
            ttl_ms = max(0, session.qr_expires_at_ms - at)
        else:
            session.qr_in_batch += 1
            ttl = data.get("ttl_ms")
            ttl_ms = (
                int(ttl)
                if isinstance(ttl, int | float) and ttl > 0
                else (wa.QR_FIRST_TTL_MS if session.qr_in_batch == 1 else wa.QR_NEXT_TTL_MS)
            )
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
        linked = session.status in {S.AUTHENTICATED, S.READY, S.PASSKEY_REQUIRED}
        if state == wa.STATE_UNPAIRED_IDLE and session.status == S.QR:
            self._on_batch_end(session)
        elif state == wa.STATE_PAIRING and session.status == S.QR:
            session.mark("scanned_at_ms")
        elif state == wa.STATE_CONNECTED:
            session.connection = "connected"
            if session.status in {S.STARTING, S.QR, S.PASSKEY_REQUIRED}:
                self._authenticated(session)
        elif state in wa.RECONNECTING_STATES and (linked or session.id in self._ctx.restoring):
            if session.connection != "reconnecting":
                log.info("%s: WhatsApp Web is reconnecting (%s)", session.id, state)
            session.connection = "reconnecting"  # wait: the socket comes back by itself
        elif state == wa.STATE_CONFLICT and (linked or session.id in self._ctx.restoring):
            self._on_conflict(session)
        elif state == wa.STATE_DEPRECATED_VERSION:
            self._on_deprecated(session)
        elif state in _BLOCKED_REASONS:
            log.warning("%s: WhatsApp Web is blocked (%s)", session.id, state)
            self.fail(session, _BLOCKED_REASONS[state])

    def _on_conflict(self, session: Session) -> None:
        """Another connection of this device (socket ``CONFLICT``). Take the device back only while
        this worker holds the session's lease, and only a few times a minute."""
        settings = self._ctx.settings
        if not settings.takeover_on_conflict or session.slot is None:
            self._ending.end(session, S.LOGGED_OUT, Reason.CONFLICT)
            return
        self._ctx.tasks.spawn(session, self._take_device_back(session, session.slot))

    async def _take_device_back(self, session: Session, slot: BrowserSlot) -> None:
        ctx = self._ctx
        holder = await ctx.durable.lease_owner(session.id)
        if session.slot is not slot or session.ended:
            return
        if holder != ctx.name:
            # another worker drives this session now: its browser is the one to keep
            log.warning("%s: open elsewhere and driven by %s; letting go", session.id, holder or "nobody")
            self._ending.let_go(session, Reason.CONFLICT)
            return
        now = time.monotonic()
        while session.takeovers and now - session.takeovers[0] > TAKEOVER_WINDOW_S:
            session.takeovers.popleft()
        if len(session.takeovers) >= MAX_TAKEOVERS:
            log.error(
                "%s: %d takeovers within %.0f s; giving up", session.id, MAX_TAKEOVERS, TAKEOVER_WINDOW_S
            )
            self.fail(session, Reason.CONFLICT)
            return
        session.takeovers.append(now)
        log.info("%s: WhatsApp is open elsewhere; taking over (%d)", session.id, len(session.takeovers))
        await ctx.tasks.quietly(slot.takeover())

    def _on_deprecated(self, session: Session) -> None:
        """The page's build is refused: drop any pinned build and load the live page once; if
        that build is refused too, the session fails ``deprecated_version``."""
        slot = session.slot
        if slot is None or session.version_reloads >= MAX_VERSION_RELOADS:
            self.fail(session, Reason.DEPRECATED_VERSION)
            return
        session.version_reloads += 1  # the web cache dropped a refused pinned build (BrowserSlot)
        log.warning("%s: WhatsApp Web's build is deprecated; reloading the live page", session.id)
        self._ctx.tasks.spawn(session, self._reload(session, slot))

    async def _reload(self, session: Session, slot: BrowserSlot) -> None:
        # a page reloaded before a new link's credentials settled would boot logged out
        await until_settled(session)
        try:
            await slot.reload(self._ctx.settings.start_timeout_s)
        except BrowserError as exc:
            log.warning("%s: %s", session.id, exc)
            if session.slot is slot:
                self.fail(session, Reason.DEPRECATED_VERSION)

    def _authenticated(self, session: Session) -> None:
        restoring = session.id in self._ctx.restoring
        session.transition(S.AUTHENTICATED, Reason.RESTORED if restoring else Reason.SCANNED)
        session.mark("authenticated_at_ms")
        session.publish(EventType.SESSION_AUTHENTICATED, {"restored": restoring})
        self._arm(session, self._ctx.settings.link_timeout_s, S.AUTHENTICATED, Reason.LINK_TIMEOUT)

    def _on_passkey_request(self, session: Session, data: Any) -> None:
        """The page asks for a passkey (its ``navigator.credentials.get``): the session waits for
        the user's assertion, until the request's own timeout or ``passkey_timeout_s``."""
        if session.status not in {S.QR, S.AUTHENTICATED, S.PASSKEY_REQUIRED}:
            return
        options = passkey.options_from_page(data)
        if options is None:
            log.warning("%s: unusable passkey request from the page: %r", session.id, data)
            return
        settings = self._ctx.settings
        timeout_s = settings.passkey_timeout_s
        if options["timeout"]:
            timeout_s = min(timeout_s, options["timeout"] / 1000)
        token, digest = wire.new_token(session.id)
        expires_at_ms = now_ms() + int(timeout_s * 1000)
        session.transition(S.PASSKEY_REQUIRED, Reason.PASSKEY)
        session.passkey = passkey.PendingPasskey(options, expires_at_ms, digest)
        self._passkey_tokens[digest] = session.passkey
        while len(self._passkey_tokens) > PASSKEY_TOKENS_KEPT:
            self._passkey_tokens.popitem(last=False)
        session.mark("passkey_at_ms")
        payload = wire.prompt_payload(options, expires_at_ms, token, settings.passkey_base_url)
        session.publish(EventType.PASSKEY_PROMPT, payload)
        self._arm(session, timeout_s, S.PASSKEY_REQUIRED, Reason.PASSKEY_TIMEOUT)

    def gone_passkey(self, token: str) -> NoReturn:
        """A token whose session this worker no longer drives: why it cannot be used (always raises)."""
        pending = self._passkey_tokens.get(wire.digest(token))
        if pending is None:
            raise PasskeyTokenUnknown("no passkey request has this token")
        if pending.used:
            raise PasskeyTokenUsed("this passkey link was already used")
        raise PasskeyExpired("the passkey request has expired")

    def passkey_request(self, session: Session, token: str | None = None) -> passkey.PendingPasskey:
        """The pending request, for its one-time token (when given) or for the session's API caller."""
        pending = session.passkey
        waiting = session.status == S.PASSKEY_REQUIRED
        if token is not None:
            if pending is None or not wire.token_matches(token, pending.token_digest):
                raise PasskeyTokenUnknown("no passkey request has this token")
            if pending.used:
                raise PasskeyTokenUsed("this passkey link was already used")
        elif not waiting or pending is None or pending.used:
            raise PasskeyNotRequested(f"the session is not waiting for a passkey ({session.status})")
        if not waiting or now_ms() > pending.expires_at_ms:
            raise PasskeyExpired("the passkey request has expired")
        return pending

    async def answer_passkey(self, session: Session, body: dict[str, Any], token: str | None = None) -> None:
        """Settle the page's passkey request with the user's assertion (``AuthenticationResponseJSON``):
        checked for shape, time and challenge first (a refusal here leaves the request pending);
        what WhatsApp answers to it becomes the session's state."""
        pending = self.passkey_request(session, token)
        assertion = passkey.check_assertion(body)
        if not passkey.same_challenge(assertion.challenge, pending.options["challenge"]):
            raise PasskeyChallengeMismatch("the assertion was made for another challenge (a stale request?)")
        slot = session.slot
        if slot is None:
            raise PasskeyNotRequested("the session's browser is not running")
        pending.used = True
        if not await slot.resolve_passkey(assertion.json):
            raise PasskeyNotRequested("the page no longer waits for a passkey")

    async def passkey_verdict(self, session: Session, timeout_s: float) -> None:
        """Until the page has answered the assertion (the session left ``passkey_required``),
        at most ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while session.status == S.PASSKEY_REQUIRED and not session.ended:
                    await session.changed.wait()

    def _on_lid(self, session: Session, data: Any) -> None:
        lid = wa.lid_of(data.get("lid")) if isinstance(data, dict) else None
        if lid is not None:
            session.lid = lid

    def _on_synced(self, session: Session, data: Any) -> None:
        """The history sync is done: reported on its own; the link never waited for it."""
        if session.synced or session.ended or session.status not in {S.AUTHENTICATED, S.READY}:
            return
        session.synced = True
        signal = str(data.get("signal") or "") if isinstance(data, dict) else ""
        at = session.mark("synced_at_ms")
        since = session.timings.get("authenticated_at_ms")
        if since is not None:
            session.timings["sync_ms"] = at - since
        session.publish(EventType.SESSION_SYNCED, {"signal": signal})

    def _on_me(self, session: Session, data: Any) -> None:
        """The page knows the account's phone number: the link is done (``session_ready``)."""
        if session.status == S.READY or session.ended:
            return
        phone = wa.phone_of(data.get("phone")) if isinstance(data, dict) else None
        if phone is None:
            log.warning("%s: the page gave no usable phone number (%r)", session.id, data)
            return  # a later event brings it; the link deadline ends a link that never gets one
        self._on_lid(session, data)
        if session.status in {S.STARTING, S.QR, S.PASSKEY_REQUIRED}:
            self._authenticated(session)
        restoring = session.id in self._ctx.restoring
        self._ctx.restoring.discard(session.id)
        session.phone_number = phone
        # the phone owner's name: a NUL in it must not keep the session from becoming ready
        session.push_name = storable(str(data["push_name"])) if data.get("push_name") else None
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
            metrics.LINKS.labels("linked", Reason.LINKED.value).inc()
        session.transition(S.READY, Reason.RESTORED if restoring else Reason.LINKED)
        session.touch()  # becoming ready is a use: the idle clock starts here
        self._disarm(session)
        session.publish(
            EventType.SESSION_READY,
            {"phone_number": session.phone_number, "push_name": session.push_name, "restored": restoring},
        )
        self._hibernation.after_ready(session)

    def _on_logged_out(self, session: Session, data: Any) -> None:
        if session.ended or not isinstance(data, wa.LogoutNotice):
            return
        if session.logout_requested:
            self._ending.end(session, S.LOGGED_OUT, Reason.API_LOGOUT)
        elif data.is_failure:
            self._ending.end(session, S.FAILED, Reason(data.reason))
        else:
            if data.reason == Reason.DEVICE_EXPIRED:
                metrics.DEVICES_EXPIRED.inc()
            self._ending.end(session, S.LOGGED_OUT, Reason(data.reason))

    def _on_browser_gone(self, session: Session, _data: Any) -> None:
        if session.ended or self._ctx.closing:
            return
        if session.status == S.READY:
            session.crash_restarts += 1
            count = session.crash_restarts
            if count <= MAX_CRASH_RESTARTS:
                log.warning("%s: browser died; restoring it from its profile (%d)", session.id, count)
                self._ctx.tasks.spawn(session, self._ctx.tasks.quietly(self.restart(session)))
                return
        self.fail(session, Reason.BROWSER_CRASHED)

    def _on_pairing_code(self, session: Session, data: Any) -> None:
        """The page renewed the pairing code it shows."""
        code = str(data.get("code") or "") if isinstance(data, dict) else ""
        if session.status == S.QR and session.pairing_code and len(code) == 8:
            session.pairing_code = f"{code[:4]}-{code[4:]}"

    def _on_hook_timeout(self, session: Session, _data: Any) -> None:
        if session.status in LINKING:
            self.fail(session, Reason.START_TIMEOUT)

    _handlers = {
        "qr": _on_qr,
        "state": _on_state,
        "passkey_request": _on_passkey_request,
        "me": _on_me,
        "lid": _on_lid,
        "synced": _on_synced,
        "pairing_code": _on_pairing_code,
        "logged_out": _on_logged_out,
        "crashed": _on_browser_gone,
        "closed": _on_browser_gone,
        "hook_timeout": _on_hook_timeout,
    }

    def _on_batch_end(self, session: Session) -> None:
        session.batches_used += 1
        if session.batches_used < self._ctx.settings.qr_batches and session.slot is not None:
            session.qr_in_batch = 0
            self._ctx.tasks.spawn(session, self._ctx.tasks.quietly(session.slot.refresh_qr()))
        else:
            self._ending.end(session, S.EXPIRED, Reason.QR_TIMEOUT)

    # ------------------------------------------------------------------ deadlines, failure
    def _arm(
        self,
        session: Session,
        timeout_s: float,
        status: SessionStatus,
        reason: Reason,
        *,
        ends: SessionStatus = S.FAILED,
    ) -> None:
        """End the session (``ends``, ``reason``) if it is still in ``status`` after ``timeout_s``
        (a deadline, not a poll)."""
        self._disarm(session)
        mark = len(session.history)

        def fire() -> None:
            self._ctx.deadlines.fired(session.id)
            if session.status == status and len(session.history) == mark and not session.ended:
                self._ending.end(session, ends, reason)
                self._commits.flush(session)

        self._ctx.deadlines.call_later(session.id, timeout_s, fire)

    def _disarm(self, session: Session) -> None:
        self._ctx.deadlines.cancel(session.id)

    def fail(self, session: Session, reason: Reason) -> None:
        if not session.ended:
            self._ending.end(session, S.FAILED, reason)
            self._commits.flush(session)

    # ------------------------------------------------------------------ pairing code
    async def pairing_code(self, session: Session, phone: str) -> str:
        if session.status != S.QR or session.slot is None:
            raise InvalidState(
                f"a pairing code needs a session waiting for its link; this one is {session.status}"
            )
        code = (await session.slot.request_pairing_code(phone)).upper().replace("-", "")
        # the page issues no QR from now on: the last one is no longer shown nor scannable
        session.qr = None
        session.qr_expires_at_ms = None
        session.qr_ref = None
        session.pairing_code = f"{code[:4]}-{code[4:]}" if len(code) == 8 else code
        # no QR batch runs out while a code is shown: the code's own deadline ends an unused link
        self._arm(session, self._ctx.settings.pairing_code_timeout_s, S.QR, Reason.QR_TIMEOUT, ends=S.EXPIRED)
        return session.pairing_code

    async def back_to_qr(self, session: Session) -> None:
        """Leave the pairing code for the QR; the new QR arrives as a ``qr`` event."""
        if session.status != S.QR or session.slot is None or not session.pairing_code:
            raise InvalidState(f"no pairing code is active on this session ({session.status})")
        await session.slot.back_to_qr()
        session.pairing_code = None
        self._disarm(session)  # the QR batches have their own end again
