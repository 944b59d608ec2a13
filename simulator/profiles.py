"""Timing and behaviour profiles of the simulator.

``instant`` is the page of 2024 at test speed (every 2026 behaviour off); ``strict`` turns on every
behaviour of the 2026 page with instant-like timings (what ``make run`` and the tests use);
``realistic`` is ``strict`` with the real page's timings (benchmarks). Each behaviour and the
public source it comes from is described in ``docs/whatsapp-web-2026.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class ProfileError(ValueError):
    """An override names an unknown field or has a wrong type/range."""


Delay = int | tuple[int, int]
"""A delay in ms: a fixed value, or ``[min, max]`` drawn uniformly each time it is used."""

ADV_REFRESH_MODES = ("off", "first_scan", "timer")
SYNC_SIGNALS = ("normal", "never", "late", "flap")
CONFLICT_MODES = ("off", "strict")


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    load_ms: Delay = 0
    """App load (splash) before the first screen."""
    pairing_ms: Delay = 0
    """Scan accepted -> pairing success (socket ``CONNECTED``)."""
    sync_ms: Delay = 50
    """Pairing success -> history sync done (``main_loaded``, Stream ``MAIN``, ``hasSynced``)."""
    resume_ms: Delay = 0
    """Restored login -> synced."""
    jitter_ms: int = 0
    """Uniform +/- applied to fixed delays (load, pairing, sync, resume)."""
    qr_first_ms: int = 60_000
    qr_next_ms: int = 20_000
    refs_per_batch: int = 6
    fail_rate: float = 0.0
    passkey: bool = False
    """An account whose phone registered a passkey (``POST /phone/passkey``) must answer a WebAuthn
    assertion (``navigator.credentials.get``, rpId ``whatsapp.com``) after the scan before the
    device links; ``passkey_ttl_ms`` is the challenge's lifetime (a late assertion fails)."""
    passkey_ttl_ms: int = 120_000
    heap_mb: int = 0
    me_module: bool = True
    pair_code_ttl_ms: int = 195_000
    # ----- the 2026 page (docs/whatsapp-web-2026.md)
    adv_refresh: str = "off"
    """``companion_reg_refresh``: the QR's ADV secret changes under the same ref. ``first_scan``: the
    first scan of each batch is refused (409 ``couldnt_link_device``) and triggers the refresh;
    ``timer``: a refresh ``adv_refresh_ms`` after each ref is shown."""
    adv_refresh_ms: int = 10_000
    sync_signal: str = "normal"
    """``normal``: ``hasSynced`` with ``main_loaded``; ``never``: ``hasSynced`` stays false; ``late``:
    ``hasSynced`` ``late_sync_ms`` after ``main_loaded``; ``flap``: true, false, then true again."""
    late_sync_ms: int = 5_000
    me_pn_delay_ms: int = 0
    """Pairing success -> ``getMaybeMePnUser()`` answers (null until then)."""
    lid: bool = False
    """The LID (``…@lid``) is known at pairing success, before the phone number, and ``Conn.wid``
    holds it until the phone number is known."""
    lazy_modules_ms: int = 0
    """Linking modules are registered this long after ``Debug.VERSION`` (``requireDeferred``)."""
    device_ttl_s: int = 0
    """A linked device whose last use (its page connected) is older than this on the simulator's
    clock is logged out, reason ``device_expired`` (0: never). WhatsApp logs a companion out after
    about 14 days with the phone offline and 30 days without use; ``strict`` uses the 30 days."""
    conflict: str = "off"
    """``strict``: one live connection per linked device; a second page that boots the same
    credentials knocks the first into ``CONFLICT`` (and ``takeover()`` back)."""
    # ----- builds (simulator/builds.py)
    version_check: bool = False
    """The server checks the build a page reports: a deprecated (or removed) build gets
    ``DEPRECATED_VERSION`` at boot, and pages running a build get it when it is deprecated."""
    # ----- storage (docs/whatsapp-web-2026.md, "Storage and the credential settle")
    idb_mb: int = 0
    """MB of chats, contacts and messages the history sync writes into ``model-storage`` (mostly
    incompressible, as encrypted message bodies are). The login databases (``wawc``,
    ``signal-storage``, a 128 KiB value kept as a blob file) are written whatever its value."""
    creds_settle_ms: int = 0
    """Pairing success -> the credentials are final (the signed pre-key is rotated and uploaded).
    A copy of the profile taken before then restores as logged out (0: final at once)."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def with_overrides(self, overrides: dict[str, Any]) -> Profile:
        """Return a copy with ``overrides`` applied; ``name`` is not a field override."""
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            changes[key] = _check_field(key, value)
        return dataclasses.replace(self, **changes)


_DELAY_FIELDS = {"load_ms", "pairing_ms", "sync_ms", "resume_ms"}
_DELAY_MAX = 3_600_000
_INT_FIELDS = {
    "jitter_ms": (0, 600_000),
    "qr_first_ms": (50, 3_600_000),
    "qr_next_ms": (50, 3_600_000),
    "refs_per_batch": (1, 20),
    "heap_mb": (0, 4096),
    "pair_code_ttl_ms": (100, 3_600_000),
    "adv_refresh_ms": (10, 3_600_000),
    "late_sync_ms": (0, 3_600_000),
    "me_pn_delay_ms": (0, 600_000),
    "lazy_modules_ms": (0, 600_000),
    "device_ttl_s": (0, 315_360_000),
    "passkey_ttl_ms": (100, 3_600_000),
    "idb_mb": (0, 1024),
    "creds_settle_ms": (0, 600_000),
}
_BOOL_FIELDS = {"passkey", "me_module", "lid", "version_check"}
_CHOICE_FIELDS = {"adv_refresh": ADV_REFRESH_MODES, "sync_signal": SYNC_SIGNALS, "conflict": CONFLICT_MODES}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(key: str, value: Any) -> Any:
    if key in _DELAY_FIELDS:
        if _is_int(value) and 0 <= value <= _DELAY_MAX:
            return value
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(_is_int(v) and 0 <= v <= _DELAY_MAX for v in value)
            and value[0] <= value[1]
        ):
            return (int(value[0]), int(value[1]))
        raise ProfileError(f"{key} must be an integer in [0, {_DELAY_MAX}] or a [min, max] pair of them")
    if key in _INT_FIELDS:
        lo, hi = _INT_FIELDS[key]
        if not _is_int(value) or not lo <= value <= hi:
            raise ProfileError(f"{key} must be an integer in [{lo}, {hi}]")
        return value
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ProfileError(f"{key} must be a boolean")
        return value
    if key in _CHOICE_FIELDS:
        if value not in _CHOICE_FIELDS[key]:
            raise ProfileError(f"{key} must be one of {', '.join(_CHOICE_FIELDS[key])}")
        return value
    if key == "fail_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ProfileError("fail_rate must be a number in [0.0, 1.0]")
        return float(value)
    raise ProfileError(f"unknown profile field {key!r}")


_INSTANT = Profile(name="instant", load_ms=0, pairing_ms=0, sync_ms=50, resume_ms=0, jitter_ms=0)
_STRICT_BEHAVIOURS: dict[str, Any] = {
    "adv_refresh": "first_scan",
    "sync_signal": "never",
    "me_pn_delay_ms": 40,
    "lid": True,
    "lazy_modules_ms": 150,
    "conflict": "strict",
    "device_ttl_s": 30 * 86_400,
    "version_check": True,
    "passkey": True,
    "creds_settle_ms": 1_000,
}

PROFILES: dict[str, Profile] = {
    "instant": _INSTANT,
    "strict": dataclasses.replace(_INSTANT, name="strict", pairing_ms=20, **_STRICT_BEHAVIOURS),
    "realistic": dataclasses.replace(
        _INSTANT,
        name="realistic",
        load_ms=(3000, 5000),
        pairing_ms=(500, 1500),
        sync_ms=(10_000, 60_000),
        resume_ms=(1000, 2000),
        heap_mb=150,
        **{**_STRICT_BEHAVIOURS, "me_pn_delay_ms": 300, "lazy_modules_ms": 1500, "creds_settle_ms": 8_000},
    ),
}
DEFAULT_PROFILE = "strict"
