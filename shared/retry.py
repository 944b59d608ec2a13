"""The project's one backoff policy for retrying a write to Postgres (or Redis) that failed
because the server could not be reached: exponential, capped, with random jitter, and bounded in
attempts and in total time — implemented by `stamina <https://stamina.hynek.me>`_.

Retry only what is safe to repeat: a whole transaction that either committed or did not (a
connection lost during ``COMMIT`` can leave that unknown — callers make such writes idempotent or
fenced, as the session commits are).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import stamina


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits of ``wait_initial_s * 2**n + uniform(0, wait_jitter_s)``, at most ``wait_max_s``; at
    most ``attempts`` tries and ``timeout_s`` in all."""

    attempts: int = 6
    timeout_s: float = 10.0
    wait_initial_s: float = 0.1
    wait_max_s: float = 2.0
    wait_jitter_s: float = 0.5


# a commit: worth waiting a while for (a Postgres restart, a failover)
BACKOFF = Backoff()
# a check on a request's path before it changes anything: the same waits, a small budget
QUICK_CHECK = Backoff(attempts=3, timeout_s=3.0)


async def attempts(
    on: type[Exception] | tuple[type[Exception], ...], policy: Backoff = BACKOFF
) -> AsyncIterator[stamina.Attempt]:
    """``async for attempt in attempts(DB_ERRORS): with attempt: await write()`` — the last failure
    is raised once the policy's budget is spent."""
    async for attempt in stamina.retry_context(
        on=on,
        attempts=policy.attempts,
        timeout=policy.timeout_s,
        wait_initial=policy.wait_initial_s,
        wait_max=policy.wait_max_s,
        wait_jitter=policy.wait_jitter_s,
    ):
        yield attempt
