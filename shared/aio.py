"""Asyncio helpers shared by the gateway and the workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import uvloop

log = logging.getLogger("walink.aio")


async def first_set(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set (the waits on the others are cancelled)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def stop_loops(*tasks: asyncio.Task[Any], deadline_s: float = 5.0) -> None:
    """Cancel background loops and wait until they have ended, cancelling again while one runs on.

    One ``cancel()`` can be lost: on Python 3.11 ``asyncio.wait_for`` returns its awaitable's
    result instead of raising when that finishes in the loop iteration the cancellation arrives in
    (CPython gh-86296). The heartbeat (``Heartbeat.beat``), the orphan watcher
    (``Durable._redis``) and the lease keeper (redis-py's command send) all await one, and a
    loop that lost its cancel runs on, so awaiting it once would wait forever. A loop still
    running after ``deadline_s`` is logged and left behind: shutdown goes on."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    running = {task for task in tasks if not task.done()}
    while running:
        left = until - loop.time()
        if left <= 0:
            names = ", ".join(sorted(task.get_name() for task in running))
            log.error("shutdown: %s ignored cancellation for %.0fs; left running", names, deadline_s)
            return
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=min(0.1, left))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("shutdown: %s had failed", task.get_name(), exc_info=task.exception())


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop (libuv's event loop: the same asyncio API, less
    CPU per socket operation — the gateway's cost is mostly that)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
