"""Hibernation: a ready session that is idle (or beyond the worker's capacity, least recently used
first) closes its browser and keeps its login as an encrypted snapshot in Postgres; any request
wakes it, on any worker, from its profile or that snapshot. Snapshots are also taken shortly
after ready (for a worker that dies without a goodbye) and when a worker hands its sessions over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from shared import metrics
from shared.errors import SnapshotIncomplete, SnapshotInvalid, SnapshotKeyUnknown, WalinkError
from shared.models import Reason, SessionStatus
from shared.private_files import make_private_dirs
from worker import qr_queue, snapshot
from worker.commits import Commits
from worker.context import DB_ERRORS, Context, NotOwner
from worker.ending import Ending
from worker.keepalive import mark_connected
from worker.session import Session

log = logging.getLogger("walink.sessions")

S = SessionStatus
UNREADABLE_RETRY_S = 60.0
# a live snapshot that failed (Postgres away, a full disk) is tried again, a bounded number of
# times with growing, jittered pauses: without it a crash would need a re-scan until hibernation
LIVE_SNAPSHOT_ATTEMPTS = 8
LIVE_SNAPSHOT_RETRY_MAX_S = 60.0
"""A session whose snapshot key this worker lacks is not adopted again for this long (requests
still try: the answer is a clear 503 each time)."""

# what packing or storing a snapshot can fail with (a full disk, a refusing or unreachable Postgres)
SNAPSHOT_ERRORS = (WalinkError, OSError, *DB_ERRORS)


class Hibernation:
    def __init__(
        self, ctx: Context, ending: Ending, commits: Commits, *, restore: Callable[[Session, int], None]
    ) -> None:
        """``restore(session, priority)`` starts the session's browser on its profile, its start
        queued at ``priority`` (see :mod:`worker.linking`)."""
        self._ctx = ctx
        self._ending = ending
        self._commits = commits
        self._restore = restore
        self.keepalive_wakes: set[str] = set()
        """Sessions woken by the keep-alive (:mod:`worker.keepalive`): hibernated again once ready."""

    # ------------------------------------------------------------------ idle and capacity
    def after_ready(self, session: Session) -> None:
        """A session just became ready: its idle clock, the capacity check, its live snapshot (a
        keep-alive wake instead hibernates again at once: its page connected, that was the use)."""
        mark_connected(session, self._ctx.clock)
        if session.reason == Reason.LINKED:
            # a new link: its credentials are final only some seconds from now (module docstring)
            session.creds_settle_at = time.monotonic() + self._ctx.settings.creds_settle_s
        if session.id in self.keepalive_wakes:
            self.keepalive_wakes.discard(session.id)
            hibernate = self._ctx.tasks.quietly(self.hibernate(session, Reason.KEEPALIVE))
            self._ctx.tasks.spawn(session, hibernate, cancel_on_end=False)
            return
        self.arm_idle(session)
        self._ctx.tasks.spawn(session, self._enforce_capacity(), cancel_on_end=False)
        if self._ctx.snapshot_keys is not None:
            self._ctx.tasks.spawn(session, self._live_snapshot(session))

    def arm_idle(self, session: Session) -> None:
        self.cancel_idle(session)
        remaining_s = session.last_used + self._ctx.settings.idle_timeout_s - time.monotonic()
        self._ctx.idle_timers.call_later(session.id, max(0.0, remaining_s), self._idle_check, session)

    def _idle_check(self, session: Session) -> None:
        ctx = self._ctx
        ctx.idle_timers.fired(session.id)
        if session.status != S.READY or ctx.sessions.get(session.id) is not session:
            return
        if time.monotonic() - session.last_used < ctx.settings.idle_timeout_s:
            self.arm_idle(session)  # used since the timer was set
            return
        ctx.tasks.spawn(session, ctx.tasks.quietly(self.hibernate(session, Reason.IDLE)), cancel_on_end=False)

    def cancel_idle(self, session: Session) -> None:
        self._ctx.idle_timers.cancel(session.id)

    async def _enforce_capacity(self) -> None:
        """Keep at most ``max_active_sessions`` browsers of ready sessions: hibernate the LRU ones."""
        ctx = self._ctx
        active = [s for s in ctx.sessions.values() if s.status == S.READY and s.slot is not None]
        excess = len(active) - ctx.settings.max_active_sessions
        if excess <= 0:
            return
        for session in sorted(active, key=lambda s: s.last_used)[:excess]:
            await ctx.tasks.quietly(self.hibernate(session, Reason.LRU))

    # ------------------------------------------------------------------ hibernate / wake
    async def hibernate(self, session: Session, reason: Reason = Reason.IDLE) -> None:
        """Close the browser, keep the login: an encrypted snapshot goes to Postgres, the lease is freed.

        The browser closes only once a snapshot is stored: first the live profile's (proof that
        packing and Postgres work, and a fallback), then, after the close, the closed profile's
        (the exact one). When the first cannot be stored the browser keeps running and the
        session stays ready (logged, ``walink_hibernate_failures_total``; the idle clock starts
        again). When only the second cannot, the session hibernates on the live snapshot and
        keeps its profile here. A session is never ready without a browser, nor hibernated
        without a snapshot or a profile."""
        ctx = self._ctx
        async with session.op_lock:
            if session.status != S.READY:
                return
            self.cancel_idle(session)
            await until_settled(session)  # a copy taken sooner would restore logged out
            if not _is_ready(session):  # it may have ended meanwhile
                return
            started = time.monotonic()
            had_browser = session.slot is not None
            # Only a profile whose browser this call closed is packed. A session taken over
            # without its browser (a restore or an adoption beyond max_active_sessions) keeps the
            # snapshot its last browser's close stored, and its profile here if it has one: this
            # worker never re-packs a profile it did not see close (it could be a dead worker's,
            # or torn by a helper process still flushing), nor overwrites a newer snapshot.
            packed = ctx.snapshot_keys is not None and had_browser
            if packed:
                try:
                    session.timings["live_snapshot_bytes"] = await self.store_snapshot(session, live=True)
                except SNAPSHOT_ERRORS as exc:
                    metrics.HIBERNATE_FAILURES.inc()
                    log.error(
                        "%s: not hibernated (%s): its snapshot cannot be stored (%s: %s); "
                        "the browser keeps running, the session stays ready",
                        session.id,
                        reason.value,
                        type(exc).__name__,
                        exc,
                    )
                    self.arm_idle(session)
                    return
            if had_browser:
                mark_connected(session, ctx.clock)  # its page was connected until now
            await self._ending.end_browser(session, wipe=False)
            profile = ctx.launcher.profile_dir(session.profile_id)
            if packed:
                try:
                    session.timings["snapshot_bytes"] = await self.store_snapshot(session)
                except SNAPSHOT_ERRORS as exc:
                    packed = False  # the profile stays: it is the exact login, the live snapshot a copy
                    log.warning(
                        "%s: the closed profile's snapshot cannot be stored (%s: %s); hibernated on "
                        "the live snapshot, the profile kept here",
                        session.id,
                        type(exc).__name__,
                        exc,
                    )
            session.timings["hibernate_ms"] = int((time.monotonic() - started) * 1000)
            session.transition(S.HIBERNATED, reason)
            await self._commits.write(session)
            if packed:
                shutil.rmtree(profile, ignore_errors=True)  # the snapshot is the profile now
            await ctx.durable.release(session.id)
            ctx.keeper.drop(session.id)

    async def wake(self, session: Session) -> None:
        """Bring a hibernated session back to ready on this worker, from its snapshot if needed."""
        ctx = self._ctx
        async with session.op_lock:
            if session.status != S.HIBERNATED:
                return
            if session.id not in ctx.keeper.held:
                token = await ctx.durable.acquire(session.id, floor=session.fencing_token)
                if token is None:
                    raise NotOwner(f"session {session.id} is driven by another worker")
                session.fencing_token = token
                ctx.keeper.hold(session.id, token)
            session.needs_resume = False  # woken here: nothing else to resume
            await self.begin_restore(session, Reason.WAKE)

    def wake_soon(self, session: Session) -> None:
        if session.status == S.HIBERNATED and not self._ctx.closing:
            self._ctx.tasks.spawn(session, self._ctx.tasks.quietly(self.wake(session)), cancel_on_end=False)

    async def begin_restore(self, session: Session, reason: Reason) -> bool:
        """Start bringing a linked session back from its profile (restored from its snapshot if
        need be); False when that cannot be had and the session ended ``failed`` instead.

        A snapshot sealed with a key this worker lacks changes nothing: the session is let go as
        it was (see :meth:`cannot_open`) and :class:`~shared.errors.SnapshotKeyUnknown` raised."""
        # a restore from here on, also while its profile is unpacked: a restart that comes
        # meanwhile must keep the profile (it is the login), not start a new link
        self._ctx.restoring.add(session.id)
        # the profile first, before any transition: nothing is written unless it can be had
        if not await self._profile_or_fail(session):
            return False
        session.transition(S.STARTING, reason)  # no-op (no event) when already starting
        session.mark("requested_at_ms")
        self._restore(session, qr_queue.USER if reason == Reason.WAKE else qr_queue.RESTORE)
        await self._commits.write(session)
        return True

    async def cannot_open(self, session: Session, exc: SnapshotKeyUnknown) -> None:
        """This worker lacks the key of the session's snapshot: leave the session exactly as it is
        in Postgres (status, snapshot, device), stop driving it here and free its lease, so a
        worker that holds the key can take it. Nothing is committed."""
        ctx = self._ctx
        log.error("%s: cannot restore here: %s; left as it was for a worker with that key", session.id, exc)
        metrics.SNAPSHOT_KEY_UNKNOWN.labels(exc.key_id).inc()
        ctx.unreadable[session.id] = time.monotonic() + UNREADABLE_RETRY_S
        ctx.tasks.cancel_work(session)
        self._ending.stand_down(session)
        session.pending.clear()  # e.g. a restart's transition: never written
        self._ending.forget(session)
        await ctx.durable.release(session.id)

    async def before_handover(self, session: Session) -> bool:
        """While its browser still runs: wait for a new link's credentials to settle, then check
        its page's login storage. False: no snapshot may be taken at the handover (logged)."""
        if session.status != S.READY or session.slot is None or self._ctx.snapshot_keys is None:
            return True
        await until_settled(session)
        try:
            await self.check_login_storage(session)
        except SnapshotIncomplete as exc:
            log.error("%s: no snapshot at the handover: %s; the stored one (if any) stays", session.id, exc)
            return False
        except WalinkError as exc:  # the page cannot say (closing, hung): its closed profile is packed
            log.warning("%s: login storage not checked before the handover: %s", session.id, exc)
        return True

    async def handover(self, session: Session, *, snapshot_ok: bool = True) -> None:
        """Leave the session ready for another worker: a fresh snapshot (unless ``snapshot_ok``
        is false, see :meth:`before_handover`), then the lease freed."""
        with contextlib.suppress(WalinkError, *DB_ERRORS):
            if snapshot_ok and session.status == S.READY and self._ctx.snapshot_keys is not None:
                await self.store_snapshot(session)
        await self._ctx.durable.release(session.id)

    # ------------------------------------------------------------------ snapshots
    async def _live_snapshot(self, session: Session) -> None:
        """Shortly after ready, snapshot the live profile so any worker can restore the session if
        this one dies without a goodbye. Not at once: Chromium commits localStorage (where WhatsApp
        keeps WANoiseInfo) to disk in batches up to ~5 s late; a copy taken sooner shows a QR. A
        new link's first one also waits for its credentials to settle (``creds_settle_s``): the
        deadline is the later of the two. A failure (Postgres or the disk) is retried with backoff;
        losing the lease, or a page without its login's storage, ends the tries."""
        first_at = max(time.monotonic() + self._ctx.settings.live_snapshot_delay_s, session.creds_settle_at)
        delay_s = first_at - time.monotonic()
        for attempt in range(1, LIVE_SNAPSHOT_ATTEMPTS + 1):
            await asyncio.sleep(max(0.0, delay_s))  # a deadline, not a poll
            if session.status != S.READY or session.slot is None or self._ctx.snapshot_keys is None:
                return
            try:
                size = await self.store_snapshot(session, live=True)
            except NotOwner as exc:
                log.warning("%s: live snapshot refused: %s", session.id, exc)
                return
            except SnapshotIncomplete as exc:
                log.error("%s: live snapshot refused: %s; the stored one (if any) stays", session.id, exc)
                return
            except SNAPSHOT_ERRORS as exc:
                retry = attempt < LIVE_SNAPSHOT_ATTEMPTS
                log.warning(
                    "%s: live snapshot failed (attempt %d): %s%s",
                    session.id,
                    attempt,
                    exc,
                    "; trying again" if retry else "; giving up until it hibernates",
                )
                delay_s = min(LIVE_SNAPSHOT_RETRY_MAX_S, 2.0 * 2**attempt) * random.uniform(0.5, 1.0)
                continue
            session.timings["live_snapshot_bytes"] = size
            return

    async def check_login_storage(self, session: Session) -> dict[str, str] | None:
        """Raise :class:`~shared.errors.SnapshotIncomplete` when the session's page lacks storage
        its login needs (a snapshot of it would restore logged out; nothing is stored then, and
        the previous snapshot stays). Checked on the live page: a closed profile cannot say.
        The answer is the page's localStorage (None without a page), for a live snapshot."""
        if session.slot is None:
            return None
        missing, entries = await session.slot.login_storage()
        if missing:
            metrics.SNAPSHOT_REFUSED.inc()
            raise SnapshotIncomplete(
                f"the page lacks {', '.join(missing)}: a snapshot would restore logged out"
            )
        return entries

    async def store_snapshot(self, session: Session, *, live: bool = False) -> int:
        """Pack the session's profile (``live``: under a running Chromium) and store it, fenced by
        the session's lease token; the answer is the snapshot's size in bytes. The snapshot goes
        through a private file and is stored a chunk at a time: memory stays flat and the event
        loop free whatever the size of WhatsApp's storage."""
        ctx = self._ctx
        assert ctx.snapshot_keys is not None  # callers check: snapshots are enabled
        page_local_storage = await self.check_login_storage(session) if live else None
        profile = ctx.launcher.profile_dir(session.profile_id)
        started = time.monotonic()
        async with _snapshot_file(ctx, session, "pack") as path:
            size = await snapshot.pack_profile_file_async(
                profile,
                path,
                key=ctx.snapshot_keys,
                session_id=session.id,
                live=live,
                page_local_storage=page_local_storage,
            )
            packed = time.monotonic()
            await ctx.store.put_snapshot_file(session.id, path, token=session.fencing_token)
        session.timings["snapshot_pack_ms"] = int((packed - started) * 1000)
        session.timings["snapshot_store_ms"] = int((time.monotonic() - packed) * 1000)
        return size

    async def _profile_or_fail(self, session: Session) -> bool:
        """The session's profile on disk (from its snapshot if need be); if it cannot be had, the
        session ends ``failed``/``client_fatal`` (committed) and the answer is False. A snapshot
        whose key this worker lacks is not a failure of the session (see :meth:`cannot_open`)."""
        try:
            await self.materialize_profile(session)
        except SnapshotKeyUnknown as exc:
            await self.cannot_open(session, exc)
            raise
        except SnapshotInvalid as exc:
            log.error("%s: cannot restore: %s", session.id, exc)
            self._ending.end(session, S.FAILED, Reason.CLIENT_FATAL)
            await self._commits.write(session)
            return False
        return True

    async def materialize_profile(self, session: Session) -> None:
        ctx = self._ctx
        profile: Path = ctx.launcher.profile_dir(session.profile_id)
        if _has_files(profile):
            return
        if ctx.snapshot_keys is None:
            raise SnapshotInvalid("no local profile and snapshots are disabled (WALINK_SNAPSHOT_KEY unset)")
        async with _snapshot_file(ctx, session, "restore") as path:
            if not await ctx.store.get_snapshot_file(session.id, path):
                raise SnapshotInvalid(f"no snapshot stored for {session.id}")
            await asyncio.to_thread(shutil.rmtree, profile, True)
            await snapshot.unpack_profile_file_async(
                path, profile, key=ctx.snapshot_keys, session_id=session.id
            )


@contextlib.asynccontextmanager
async def _snapshot_file(ctx: Context, session: Session, purpose: str) -> AsyncIterator[Path]:
    """A path for one snapshot file of ``session`` in the worker's private snapshot directory
    (the file itself is made by whoever writes it, 0600), removed afterwards whatever happens."""
    directory = ctx.settings.worker_data_dir / "snapshots"
    await asyncio.to_thread(make_private_dirs, directory)
    path = directory / f"{session.profile_id}.{purpose}.{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        await asyncio.to_thread(path.unlink, True)


async def until_settled(session: Session) -> None:
    """Wait (a deadline, at most ``creds_settle_s``) until a new link's credentials are final."""
    remaining_s = session.creds_settle_at - time.monotonic()
    if remaining_s > 0:
        log.info("%s: a snapshot waits %.1f s for the credentials to settle", session.id, remaining_s)
        await asyncio.sleep(remaining_s)


def _is_ready(session: Session) -> bool:
    return session.status == S.READY


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())
