"""walink's one wall clock for link health (keep-alive, device expiry): real time plus an offset.

Only what must line up with WhatsApp's own notion of days (when a linked device was last used) reads
it; timeouts and deadlines stay on ``time.monotonic``. Tests move it together with the simulator's
admin clock (``POST /admin/clock``) instead of waiting days."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class Clock:
    offset_s: float = 0.0

    def now_s(self) -> float:
        """Seconds since the epoch, as the clock says."""
        return time.time() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the clock ahead (tests; never backwards)."""
        if seconds < 0:
            raise ValueError("the clock only moves ahead")
        self.offset_s += seconds
