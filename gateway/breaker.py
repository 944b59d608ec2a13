"""A circuit breaker per worker: closed → open → half-open → closed (or open again).

Closed: calls go through; the breaker opens after ``failures`` consecutive failures, or when at
least ``min_calls`` calls in the last ``window_s`` seconds failed at a rate ≥ ``failure_rate``.
Open: no call goes through for ``open_s`` seconds. Half-open: one probe at a time; its success
closes the breaker, its failure opens it again. The clock is injected so tests need no sleeps.

Fed by proxied requests and by the gateway's active health checks (:mod:`gateway.health`).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# the value of the ``walink_gateway_breaker_state`` gauge
STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failures: int = 3
    failure_rate: float = 0.5
    window_s: float = 10.0
    open_s: float = 2.0
    min_calls: int = 5


class Breaker:
    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (at, failed)
        self._opened_at = 0.0
        self._probing = False
        self.trips = 0

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.policy.open_s:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def available(self) -> bool:
        """Would :meth:`acquire` let a call through now? (No probe slot is taken.)"""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def acquire(self) -> bool:
        """Take the right to call: always when closed, the single probe slot when half-open.

        Every ``True`` must be followed by :meth:`success`, :meth:`failure` or :meth:`release`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    # ------------------------------------------------------------------ outcomes
    def success(self) -> None:
        state = self.state
        self._probing = False
        if state is BreakerState.HALF_OPEN:
            self._close()
        elif state is BreakerState.CLOSED:
            self._consecutive = 0
            self._record(failed=False)
        # open: the late answer of a call made before the breaker opened proves nothing

    def failure(self) -> None:
        state = self.state
        self._probing = False
        if state is BreakerState.HALF_OPEN:
            self._open()
        elif state is BreakerState.CLOSED:
            self._consecutive += 1
            self._record(failed=True)
            if self._consecutive >= self.policy.failures or self._rate_exceeded():
                self._open()

    def release(self) -> None:
        """A call ended without a verdict (cancelled, or a worker that is draining on purpose)."""
        self._probing = False

    # ------------------------------------------------------------------ internals
    def _record(self, *, failed: bool) -> None:
        self._window.append((self._clock(), failed))
        self._prune()

    def _prune(self) -> None:
        horizon = self._clock() - self.policy.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _rate_exceeded(self) -> bool:
        calls = len(self._window)
        if calls < self.policy.min_calls:
            return False
        failed = sum(1 for _, f in self._window if f)
        return failed / calls >= self.policy.failure_rate

    def _open(self) -> None:
        self._opened_at = self._clock()
        self.trips += 1
        self._set(BreakerState.OPEN)

    def _close(self) -> None:
        self._consecutive = 0
        self._window.clear()
        self._set(BreakerState.CLOSED)

    def _set(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_change is not None:
            self._on_change(state)

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        self._prune()
        calls = len(self._window)
        failed = sum(1 for _, f in self._window if f)
        return {
            "state": state.value,
            "consecutive_failures": self._consecutive,
            "window_calls": calls,
            "window_failures": failed,
            "trips": self.trips,
            "open_for_s": (
                round(max(0.0, self.policy.open_s - (self._clock() - self._opened_at)), 3)
                if state is BreakerState.OPEN
                else 0.0
            ),
        }
