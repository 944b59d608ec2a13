"""What the parts of the session manager share: the worker's services, the table of sessions
driven here, the flags and timer tables they all read, and the errors they raise and catch."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from shared.clock import Clock
from shared.errors import Conflict
from shared.leases import LeaseKeeper
from shared.settings import Settings
from shared.store import Store
from worker.browser import BrowserLauncher
from worker.durable import Durable
from worker.qr_queue import QrQueue
from worker.session import Session
from worker.snapshot import SnapshotKeys
from worker.tasks import Tasks, Timers
from worker.warm_pool import WarmPool

DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class NotOwner(Conflict):
    code = "not_owner"


@dataclass(eq=False)
class Context:
    settings: Settings
    launcher: BrowserLauncher
    queue: QrQueue
    pool: WarmPool
    durable: Durable
    name: str
    keeper: LeaseKeeper
    # the snapshot keys (the first seals, every one opens); None: snapshots disabled
    snapshot_keys: SnapshotKeys | None
    # the sessions this worker drives
    sessions: dict[str, Session] = field(default_factory=dict)
    # no new work: the worker is shutting down
    closing: bool = False
    # sessions whose browser is coming back on their profile (a restore, not a fresh link)
    restoring: set[str] = field(default_factory=set)
    # sessions whose snapshot key this worker lacks → until when (monotonic) not to adopt them
    unreadable: dict[str, float] = field(default_factory=dict)
    tasks: Tasks = field(default_factory=Tasks)
    # a linking step's deadline (see :mod:`worker.linking`), the idle check of a ready session
    deadlines: Timers = field(default_factory=Timers)
    idle_timers: Timers = field(default_factory=Timers)
    # the wall clock of link health (keep-alive, expiry): injectable, tests move it
    clock: Clock = field(default_factory=Clock)

    @property
    def store(self) -> Store:
        return self.durable.store
