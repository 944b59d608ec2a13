"""Timing and behaviour profiles of the simulator (``instant`` for tests, ``realistic`` for benchmarks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ProfileError(ValueError):
    """An override names an unknown field or has a wrong type/range."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    load_ms: int = 0
    """App load (splash) before the first screen."""
    ready_delay_ms: int = 50
    """Scan -> synced/ready (the loading screen)."""
    resume_ms: int = 0
    """Restored login -> synced."""
    jitter_ms: int = 0
    """Uniform +/- applied to load_ms, ready_delay_ms and resume_ms."""
    qr_first_ms: int = 60_000
    qr_next_ms: int = 20_000
    refs_per_batch: int = 6
    fail_rate: float = 0.0
    passkey: bool = False
    heap_mb: int = 0
    me_module: bool = True
    pair_code_ttl_ms: int = 195_000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> Profile:
        """Return a copy with ``overrides`` applied; ``name`` is not a field override."""
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            changes[key] = _check_field(key, value)
        return dataclasses.replace(self, **changes)


_INT_FIELDS = {
    "load_ms": (0, 3_600_000),
    "ready_delay_ms": (0, 3_600_000),
    "resume_ms": (0, 3_600_000),
    "jitter_ms": (0, 600_000),
    "qr_first_ms": (50, 3_600_000),
    "qr_next_ms": (50, 3_600_000),
    "refs_per_batch": (1, 20),
    "heap_mb": (0, 4096),
    "pair_code_ttl_ms": (100, 3_600_000),
}
_BOOL_FIELDS = {"passkey", "me_module"}


def _check_field(key: str, value: Any) -> Any:
    if key in _INT_FIELDS:
        lo, hi = _INT_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ProfileError(f"{key} must be an integer in [{lo}, {hi}]")
        return value
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ProfileError(f"{key} must be a boolean")
        return value
    if key == "fail_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ProfileError("fail_rate must be a number in [0.0, 1.0]")
        return float(value)
    raise ProfileError(f"unknown profile field {key!r}")


PROFILES: dict[str, Profile] = {
    "instant": Profile(name="instant", load_ms=0, ready_delay_ms=50, resume_ms=0, jitter_ms=0),
    "realistic": Profile(name="realistic", load_ms=3500, ready_delay_ms=2500, resume_ms=1500, jitter_ms=500),
}
