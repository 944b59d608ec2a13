"""Unlinking the device of a replaced session that is hibernated.

When a phone links again, the newer link's ready transaction soft-deletes the older sessions of
that phone (:meth:`Store.mark_ready`). One that runs a browser logs out through its page where
it runs (:mod:`worker.duplicates`). One that is **hibernated** has no browser: its login is only
a profile on some worker's disk and/or a snapshot in Postgres, and its device would stay linked
on the phone for ever. This module logs it out apart from the session state machine:

1. the replaced session's lease is taken (``Durable.acquire``, floored by its Postgres token):
   whoever is noticed first — the worker that committed the newer link (``mark_ready`` says
   which replaced rows were hibernated), the worker that holds the hibernated session in memory
   (:meth:`Commits.end_replaced`), or any worker's periodic look for such rows left undone
   (:meth:`Unlinking.watch`) — only the lease's winner goes on; the lease is renewed meanwhile;
2. its profile is had (the local one, else unpacked from its snapshot, as a wake does);
3. a browser is launched on it through the normal launcher, in the QR queue / launch budget at
   ``RESTORE`` priority;
4. once the page is logged in (socket ``CONNECTED``, hooks installed), it logs out through the
   page — :meth:`Ending.end_browser` with ``unlink=True``, the same as a live replaced session —
   and the browser's process group ends; a page that shows no login (a QR, a logout notice)
   has nothing left to unlink;
5. the profile and the stored snapshot are removed, and the lease and fencing counter released.

Nothing of this is committed as a session state: the session is not in the worker's table,
never goes through :class:`~worker.commits.Commits` or ``mark_ready`` (a ``ready`` committed for
the old session would soft-delete the phone's other sessions — the new one). Its row stays as
``mark_ready`` left it (``failed``/``replaced``, deleted).

The stored snapshot of a deleted, replaced session is the durable record of an unlink still
owed: every worker looks for those every ``unlink_retry_s`` (so a worker that died mid-way, or
an attempt that failed, is taken up again). One attempt is bounded by ``unlink_timeout_s``; a
failure is logged and counted (``walink_replaced_unlinks_total{outcome="failed"}``), its
profile or snapshot kept for the next try. A snapshot whose key this worker lacks is left for a
worker that has it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from shared import metrics
from shared.aio import first_set
from shared.errors import BrowserError, SnapshotInvalid, SnapshotKeyUnknown, WalinkError
from shared.models import Reason, SessionStatus
from worker import qr_queue
from worker import whatsapp_web as wa
from worker.browser import BrowserSlot
from worker.context import DB_ERRORS, Context
from worker.ending import Ending
from worker.hibernation import Hibernation
from worker.session import Session, public_from_record

log = logging.getLogger("walink.unlinking")

S = SessionStatus
LOGGED_IN = "logged_in"
NOT_LINKED = "not_linked"
_NOT_LINKED_STATES = {wa.STATE_UNPAIRED, wa.STATE_UNPAIRED_IDLE}
# what one attempt can fail with and be tried again later
UNLINK_ERRORS = (WalinkError, TimeoutError, OSError, *DB_ERRORS)


class Unlinking:
    def __init__(self, ctx: Context, ending: Ending, hibernation: Hibernation) -> None:
        self._ctx = ctx
        self._ending = ending
        self._hibernation = hibernation
        self._running: set[str] = set()

    @property
    def running(self) -> frozenset[str]:
        """The sessions being unlinked by this worker now."""
        return frozenset(self._running)

    def start(self, session_id: str) -> None:
        """Unlink the device of this replaced hibernated session, in the background (once per
        session on this worker; the lease makes it once cluster-wide)."""
        ctx = self._ctx
        if session_id in self._running or ctx.closing or _driven_here(ctx, session_id):
            return
        self._running.add(session_id)
        # a stand-in, never in the table: it carries the id and profile for the helpers it reuses
        ghost = Session(
            id=session_id, workspace_id="", profile_id="", status=S.FAILED, reason=Reason.REPLACED
        )
        ctx.tasks.spawn(ghost, self._attempt(ghost), cancel_on_end=False)

    async def _attempt(self, ghost: Session) -> None:
        try:
            outcome = await asyncio.wait_for(self.unlink(ghost), self._ctx.settings.unlink_timeout_s)
        except UNLINK_ERRORS as exc:
            metrics.REPLACED_UNLINKS.labels("failed").inc()
            log.error(
                "%s: the replaced session's device could not be unlinked now (%s: %s); tried again later",
                ghost.id,
                type(exc).__name__,
                exc,
            )
        else:
            if outcome is not None:
                metrics.REPLACED_UNLINKS.labels(outcome).inc()
        finally:
            self._running.discard(ghost.id)

    async def unlink(self, ghost: Session) -> str | None:
        """One attempt; the outcome counted, or None when there was nothing for this worker to do
        (not a replaced session, or another worker holds its lease)."""
        ctx = self._ctx
        rec = await asyncio.wait_for(ctx.store.load_session(ghost.id), ctx.settings.db_timeout_s)
        if rec is None or not rec.get("deleted") or rec.get("reason") != Reason.REPLACED.value:
            return None
        if _driven_here(ctx, ghost.id):
            return None  # a wake took it here meanwhile: it ends as a live replaced session does
        # its cached view said hibernated: now what the record says (failed/replaced), as a live
        # replaced session's view does once its end is committed
        await ctx.durable.cache_put(public_from_record(rec))
        token = await ctx.durable.acquire(ghost.id, floor=int(rec.get("fencing_token") or 0))
        if token is None:
            return None  # driven or being unlinked by another worker
        ghost.workspace_id = str(rec["workspace_id"])
        ghost.profile_id = str(rec["profile_id"])
        ghost.fencing_token = token
        ctx.keeper.hold(ghost.id, token)
        try:
            return await self._unlink_held(ghost)
        finally:
            ctx.keeper.drop(ghost.id)
            await ctx.durable.release_ended(ghost.id)

    async def _unlink_held(self, ghost: Session) -> str | None:
        ctx = self._ctx
        try:
            await self._hibernation.materialize_profile(ghost)
        except SnapshotKeyUnknown as exc:
            metrics.SNAPSHOT_KEY_UNKNOWN.labels(exc.key_id).inc()
            log.error("%s: cannot unlink here: %s; left for a worker with that key", ghost.id, exc)
            return None
        except SnapshotInvalid as exc:
            # no login to log out with: nothing more can be done for this device here
            log.error("%s: the replaced session's device cannot be unlinked: %s", ghost.id, exc)
            await self._forget_login(ghost)
            return "gave_up"
        async with ctx.queue.slot(qr_queue.RESTORE):
            slot = await ctx.launcher.launch(ghost.profile_id)
            ghost.slot = slot
            try:
                seen = await asyncio.wait_for(_login_shown(slot), ctx.settings.start_timeout_s)
            except BaseException:
                await asyncio.shield(self._ending.end_browser(ghost, wipe=False))  # kept for a retry
                raise
        # the page logs out (the same call as a live replaced session's), the process group ends
        await asyncio.shield(self._ending.end_browser(ghost, wipe=False, unlink=seen == LOGGED_IN))
        await self._forget_login(ghost)
        log.info(
            "%s: replaced while hibernated; its device %s",
            ghost.id,
            "is unlinked from the phone" if seen == LOGGED_IN else "was not linked any more",
        )
        return "unlinked" if seen == LOGGED_IN else NOT_LINKED

    async def _forget_login(self, ghost: Session) -> None:
        """Its profile and its snapshot go: nothing of the old login is kept."""
        profile = self._ctx.launcher.profile_dir(ghost.profile_id)
        await asyncio.to_thread(shutil.rmtree, profile, True)
        await asyncio.wait_for(self._ctx.store.delete_snapshot(ghost.id), self._ctx.settings.db_timeout_s)

    # ------------------------------------------------------------------ the look for undone ones
    async def watch(self, interval_s: float) -> None:
        """Every ``interval_s``: start the unlinks still owed (replaced, deleted sessions whose
        snapshot is still stored) that no worker is doing; a failed attempt is tried again here."""
        ctx = self._ctx
        while True:
            await asyncio.sleep(interval_s)  # the retry period, not a wait for a state
            try:
                owed = await asyncio.wait_for(ctx.store.replaced_with_snapshot(), ctx.settings.db_timeout_s)
            except DB_ERRORS as exc:
                log.warning("look for replaced sessions still linked failed: %s", exc)
                continue
            for session_id in owed:
                if session_id not in ctx.sessions:
                    self.start(session_id)


async def _login_shown(slot: BrowserSlot) -> str:
    """Until the page shows whether it is logged in: :data:`LOGGED_IN` (socket connected and the
    page hooked, so it can log out) or :data:`NOT_LINKED` (a QR, a logout notice)."""
    changed = asyncio.Event()
    shown: list[str] = []

    def sink(kind: str, data: Any) -> None:
        if kind in {"qr", "logged_out"} or (kind == "state" and str(data) in _NOT_LINKED_STATES):
            shown.append(NOT_LINKED)
        changed.set()

    slot.set_sink(sink)
    while True:
        if shown:
            return shown[0]
        if slot.socket_state == wa.STATE_CONNECTED and slot.hooked.is_set():
            return LOGGED_IN
        if slot.dead.is_set():
            raise BrowserError("the browser closed before the page showed its login")
        await first_set(changed, slot.dead)
        changed.clear()


def _driven_here(ctx: Context, session_id: str) -> bool:
    """This worker drives the session (its lease is this worker's, so acquiring it again would
    succeed): a live one that is replaced ends on its own browser (:meth:`Commits.end_replaced`)."""
    return session_id in ctx.sessions or session_id in ctx.keeper.held
