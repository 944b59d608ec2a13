"""Task plumbing of the session manager: its background tasks and its per-session timers.

Every task the manager starts is kept here until it ends (``settle`` waits for them, ``close``
cancels them); a task may also belong to its session, and is then cancelled when the session's
work is. A timer table holds at most one pending timer per session (a deadline, an idle check).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from shared.errors import WalinkError
from worker.session import Session

log = logging.getLogger("walink.sessions")


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, session: Session, coro: Coroutine[Any, Any, Any], *, cancel_on_end: bool = True) -> None:
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

    @staticmethod
    async def quietly(coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except WalinkError as exc:
            log.warning("%s", exc)

    @staticmethod
    def cancel_work(session: Session) -> None:
        current = asyncio.current_task()
        for task in list(session.tasks):
            if task is not current:
                task.cancel()

    @staticmethod
    async def stop_work(session: Session, timeout_s: float) -> None:
        """Cancel the session's work and wait (at most ``timeout_s``) until it has ended: a
        browser launch it was in is closed by then, so a new one can take the profile."""
        current = asyncio.current_task()
        tasks = [task for task in session.tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def settle(self) -> None:
        """Until the background work running now (writes, browser ends, restarts) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until they have all ended."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Timers:
    """At most one pending timer per session."""

    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def call_later(
        self, session_id: str, delay_s: float, callback: Callable[..., object], *args: Any
    ) -> None:
        self._handles[session_id] = asyncio.get_running_loop().call_later(delay_s, callback, *args)

    def fired(self, session_id: str) -> None:
        """Called by a timer's callback: the timer is no longer pending."""
        self._handles.pop(session_id, None)

    def cancel(self, session_id: str) -> None:
        timer = self._handles.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def cancel_all(self) -> None:
        for timer in self._handles.values():
            timer.cancel()
        self._handles.clear()
