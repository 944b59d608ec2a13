"""A session: its state machine with history, timings, current QR, and its committed events.

Transitions change the in-memory state at once (page events are handled against it), but the
events they produce wait in ``pending`` until the manager has committed them to Postgres; only
committed events reach SSE subscribers, Redis and webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidState
from shared.models import (
    ENDED,
    QR_PENDING,
    TRANSITIONS,
    EventType,
    SessionEvent,
    SessionStatus,
    Transition,
    now_ms,
)
from shared.store import NewEvent
from worker.browser import BrowserSlot
from worker.passkey import PendingPasskey

log = logging.getLogger("walink.session")

EVENT_BACKLOG = 256
SUBSCRIBER_QUEUE = 256


@dataclass(frozen=True, slots=True)
class Notice:
    """A live notice to the session's event streams that is not an event of the record (no
    ``seq``, not in the outbox, no webhook): e.g. ``qr_pending`` while its browser waits for a
    place to start."""

    name: str
    data: dict[str, Any]


StreamItem = SessionEvent | Notice | None


@dataclass(slots=True)
class Session:
    id: str
    workspace_id: str
    profile_id: str
    label: str | None = None
    webhook_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: SessionStatus = SessionStatus.STARTING
    reason: str = "created"
    phone_number: str | None = None
    push_name: str | None = None
    phone_method: str | None = None
    lid: str | None = None
    """WhatsApp's own id of the account (``…@lid``): kept, never taken for the phone number."""
    synced: bool = False
    """The history sync reported done (``main_loaded``, Stream ``MAIN`` or ``hasSynced``)."""
    is_primary: bool = False
    history: list[Transition] = field(default_factory=list)
    timings: dict[str, int] = field(default_factory=dict)
    qr: str | None = None
    qr_expires_at_ms: int | None = None
    qr_count: int = 0
    qr_in_batch: int = 0
    batches_used: int = 0
    pairing_code: str | None = None
    fencing_token: int = 0
    last_seq: int = 0
    # runtime only
    qr_ref: str | None = field(default=None, repr=False)
    connection: str = field(default="connected", repr=False)
    """``connected`` or ``reconnecting`` (socket ``TIMEOUT``/``OPENING`` while linked)."""
    takeovers: deque[float] = field(default_factory=lambda: deque(maxlen=8), repr=False)
    version_reloads: int = field(default=0, repr=False)
    crash_restarts: int = field(default=0, repr=False)
    """Browser crashes of this ready session restored from its profile (see ``MAX_CRASH_RESTARTS``)."""
    slot: BrowserSlot | None = field(default=None, repr=False)
    passkey: PendingPasskey | None = field(default=None, repr=False)
    """The page's last passkey request (kept after it, so that its token's use is known)."""
    pending: list[NewEvent] = field(default_factory=list, repr=False)
    events: deque[SessionEvent] = field(default_factory=lambda: deque(maxlen=EVENT_BACKLOG), repr=False)
    subscribers: set[asyncio.Queue[StreamItem]] = field(default_factory=set, repr=False)
    queued: Notice | None = field(default=None, repr=False)
    """The last ``qr_pending`` while the browser waits for a place; None once it starts."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    op_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    logout_requested: bool = False
    last_used: float = field(default_factory=time.monotonic, repr=False)
    # taken over from Postgres and not yet driven: the first ``_resume`` claims it (only one may)
    needs_resume: bool = field(default=False, repr=False)
    creds_settle_at: float = field(default=0.0, repr=False)
    """``time.monotonic()`` after which a new link's credentials are final (``creds_settle_s``
    after its ready): no snapshot of its profile before then (0: nothing to wait for)."""

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append(Transition(self.status, self.reason))
            self.publish(EventType.STATUS, {"status": self.status.value, "reason": self.reason})
        self.timings.setdefault("created_at_ms", self.history[0].at_ms)

    # ----- state machine
    def can_move_to(self, status: SessionStatus) -> bool:
        return status in TRANSITIONS[self.status]

    def transition(self, status: SessionStatus, reason: str) -> None:
        if status == self.status:
            return
        if not self.can_move_to(status):
            raise InvalidState(f"session {self.id} cannot go from {self.status} to {status}")
        log.info("%s %s → %s (%s)", self.id, self.status, status, reason)
        self.status = status
        self.reason = reason
        self.history.append(Transition(status, reason))
        if status != SessionStatus.QR:
            self.qr = None
            self.qr_expires_at_ms = None
        self.publish(EventType.STATUS, {"status": status.value, "reason": reason})
        fired, self.changed = self.changed, asyncio.Event()
        fired.set()

    def undo_transition(
        self, previous: Transition, qr: tuple[str | None, int | None], events: list[NewEvent]
    ) -> None:
        """Take back the last transition, whose commit was refused (a DELETE while Postgres is
        down): the state before it (``previous``, its QR) and without the events it added."""
        self.history.pop()
        self.status = previous.status
        self.reason = previous.reason
        self.qr, self.qr_expires_at_ms = qr
        self.pending = [e for e in self.pending if not any(e is added for added in events)]
        fired, self.changed = self.changed, asyncio.Event()
        fired.set()

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def touch(self) -> None:
        self.last_used = time.monotonic()

    # ----- events: pending until committed, then delivered
    def publish(self, type_: EventType, data: dict[str, Any]) -> None:
        self.pending.append(NewEvent(type_.value, data))

    def deliver(self, event: SessionEvent) -> None:
        """A committed event: to the backlog and every live subscriber."""
        self.last_seq = max(self.last_seq, event.seq)
        self.events.append(event)
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # a stalled reader: drop it; it reconnects with Last-Event-ID and misses nothing
                self.subscribers.discard(queue)

    def notify(self, name: str, data: dict[str, Any]) -> None:
        """A :class:`Notice` to every live subscriber (a full queue just misses it)."""
        notice = Notice(name, data)
        if name == QR_PENDING:
            self.queued = notice
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(notice)

    def subscribe(self) -> asyncio.Queue[StreamItem]:
        queue: asyncio.Queue[StreamItem] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[StreamItem]) -> None:
        self.subscribers.discard(queue)

    def close_subscribers(self) -> None:
        for queue in list(self.subscribers):
            if not queue.full():
                queue.put_nowait(None)
        self.subscribers.clear()

    def backlog_after(self, seq: int) -> list[SessionEvent] | None:
        """Committed events after ``seq`` from memory, or None when memory no longer reaches back."""
        if self.events and self.events[0].seq > seq + 1:
            return None
        if not self.events and self.last_seq > seq:
            return None
        return [e for e in self.events if e.seq > seq]

    def mark(self, name: str) -> int:
        at = now_ms()
        self.timings[name] = at
        return at

    # ----- representations
    def public(self, worker: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "workspace_id": self.workspace_id,
            "status": self.status.value,
            "reason": self.reason,
            "phone_number": self.phone_number,
            "push_name": self.push_name,
            "lid": self.lid,
            "synced": self.synced,
            "is_primary": self.is_primary,
            "label": self.label,
            "metadata": self.metadata,
            "worker": worker,
            "qr_available": self.qr is not None,
            **(
                {"passkey": self.passkey.public()}
                if self.passkey and self.status == "passkey_required"
                else {}
            ),
            "history": [t.to_dict() for t in self.history],
            "timings": dict(self.timings),
        }

    def record(self) -> dict[str, Any]:
        """The row written to Postgres."""
        return {
            "id": self.id,
            "workspace_id": self.workspace_id,
            "profile_id": self.profile_id,
            "label": self.label,
            "webhook_url": self.webhook_url,
            "metadata": self.metadata,
            "status": self.status.value,
            "reason": self.reason,
            "phone_number": self.phone_number,
            "push_name": self.push_name,
            "lid": self.lid,
            "synced": self.synced,
            "history": [t.to_dict() for t in self.history],
            "timings": self.timings,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Session:
        return cls(
            id=str(data["id"]),
            workspace_id=str(data["workspace_id"]),
            profile_id=str(data.get("profile_id") or ""),
            label=data.get("label"),
            webhook_url=data.get("webhook_url"),
            metadata=dict(data.get("metadata") or {}),
            status=SessionStatus(data["status"]),
            reason=str(data.get("reason") or ""),
            phone_number=data.get("phone_number"),
            push_name=data.get("push_name"),
            lid=data.get("lid"),
            synced=bool(data.get("synced")),
            is_primary=bool(data.get("is_primary")),
            history=[Transition.from_dict(t) for t in data.get("history") or []],
            timings={str(k): int(v) for k, v in (data.get("timings") or {}).items()},
            fencing_token=int(data.get("fencing_token") or 0),
            last_seq=int(data.get("last_seq") or 0),
        )


def public_from_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The API view of a session that no worker holds in memory (read from Postgres)."""
    session = Session.from_record(rec)
    body = session.public(rec.get("owner"))
    if rec.get("deleted"):
        body["deleted"] = True
    return body
