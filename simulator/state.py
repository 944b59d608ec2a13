"""The simulator's world: pages (clients), their QR refs and pairing codes, and the phones' linked devices."""

from __future__ import annotations

import random
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from simulator.clients import Client
from simulator.passkeys import PasskeyError, Passkeys
from simulator.profiles import PROFILES, Profile
from simulator.qr import full_text, new_ref, parse_qr

MAX_DEVICES_PER_PHONE = 4
CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"
FORCIBLE_STATES = ("TIMEOUT", "OPENING", "DEPRECATED_VERSION", "TOS_BLOCK", "PROXYBLOCK", "CONFLICT")
"""Socket states the admin API can force on a page (``POST /admin/socket-state``)."""
REF_GRACE_S = 0.25
"""A ref stays scannable this long (at most a quarter of its window) past its end: the page's timers
start when the batch reaches it, a little after the server opened the windows."""
RETENTION_S = 900.0
"""Expired refs/codes and idle unlinked clients are forgotten after this long."""
GC_INTERVAL_S = 30.0
MAX_CLOCK_JUMP_S = 315_360_000
"""One ``POST /admin/clock`` jumps at most ten years."""

_PHONE_RE = re.compile(r"\+?([0-9]{6,15})")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


class SimError(Exception):
    """A 4xx answer: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class RefEntry:
    ref: str
    device_id: str
    batch_id: int
    valid_from: float
    valid_until: float


@dataclass(slots=True)
class LinkedDevice:
    device_id: str
    phone: str
    push_name: str
    device_index: int
    linked_at: str
    platform: str
    last_used_s: float = 0.0
    """When its page last connected, on the simulator's clock (:meth:`SimState.now_s`)."""
    settle_required: bool = False
    """Linked under a profile with ``creds_settle_ms``: a login needs the settled credentials."""
    settled_digest: str | None = None
    """The digest of the final credentials the page uploaded ``creds_settle_ms`` after pairing."""

    def public(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_index": self.device_index,
            "push_name": self.push_name,
            "platform": self.platform,
            "linked_at": self.linked_at,
            "last_used_s": self.last_used_s,
            "creds_settled": self.settled_digest is not None or not self.settle_required,
        }


@dataclass(slots=True)
class PairCode:
    code: str
    device_id: str
    phone: str
    expires_at: float


def check_phone(value: str) -> str:
    """6-15 digits, optional leading ``+``; returns the digits."""
    match = _PHONE_RE.fullmatch(value.strip())
    if match is None:
        raise SimError(400, "invalid_phone", "phone must be 6-15 digits, optionally with a leading +")
    return match.group(1)


def check_device_id(value: str) -> str:
    if _DEVICE_ID_RE.fullmatch(value) is None:
        raise SimError(400, "invalid_request", "device_id must be 8-64 characters [A-Za-z0-9_-]")
    return value


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SimState:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.clients: dict[str, Client] = {}
        self.refs: dict[str, RefEntry] = {}
        self.codes: dict[str, PairCode] = {}
        self.devices: dict[str, LinkedDevice] = {}
        self.last_index: dict[str, int] = {}
        self.passkeys = Passkeys()
        self.awaiting_passkey: dict[str, LinkedDevice] = {}
        """device id -> the link that waits for the account's passkey assertion (``passkey``)."""
        self.live_conn: dict[str, str] = {}
        """device id -> the page instance holding its one live connection (``conflict: strict``)."""
        self.conflicts_sent = 0
        """``conflict`` events pushed to pages (a takeover ping-pong shows here)."""
        self.takeovers = 0
        self.clock_offset_s = 0.0
        """How far the admin clock (``POST /admin/clock``) was moved ahead of the real one."""
        self.expired: set[str] = set()
        """Devices logged out by ``device_ttl_s``: their page learns why when it next connects."""
        self.takeovers = 0
        """"Use Here" (``Socket.takeover()``) calls that reached the server."""
        self.unsettled_logins = 0
        """Logins refused for credentials from before the settle (``creds_settle_ms``)."""
        self._last_gc = time.monotonic()

    # ----- the clock and device expiry ---------------------------------------------------------------
    def now_s(self) -> float:
        """The simulator's wall clock: real time plus what the admin clock jumped."""
        return time.time() + self.clock_offset_s

    def use_device(self, device_id: str) -> None:
        """The device's page is connected: that is a use (it resets the device's TTL)."""
        device = self.devices.get(device_id)
        if device is not None:
            device.last_used_s = self.now_s()

    def advance_clock(self, advance_s: Any) -> int:
        """Jump the clock ahead. A device whose page is connected all along stays in use; the
        others whose last use is now older than ``device_ttl_s`` are logged out; how many."""
        number = isinstance(advance_s, int | float) and not isinstance(advance_s, bool)
        if not number or not 0 <= advance_s <= MAX_CLOCK_JUMP_S:
            raise SimError(400, "invalid_request", "'advance_s' must be a number in [0, 315360000]")
        self.clock_offset_s += float(advance_s)
        for device in self.devices.values():
            client = self.clients.get(device.device_id)
            if client is not None and client.waiters > 0:  # a long-poll open now: connected
                device.last_used_s = self.now_s()
        return self.expire_devices()

    def expire_devices(self) -> int:
        ttl_s = self.profile.device_ttl_s
        if ttl_s <= 0:
            return 0
        now = self.now_s()
        stale = [d for d in self.devices.values() if now - d.last_used_s > ttl_s]
        for device in stale:
            del self.devices[device.device_id]
            self.live_conn.pop(device.device_id, None)
            self._drop_passkey(device.device_id)
            self.expired.add(device.device_id)
            client = self.clients.get(device.device_id)
            if client is not None:
                client.push("logout", reason="device_expired")
        return len(stale)

    # ----- pages -------------------------------------------------------------------------------------
    def client(self, device_id: str) -> Client:
        client = self.clients.get(check_device_id(device_id))
        if client is None:
            client = self.clients[device_id] = Client(device_id)
        client.last_seen = time.monotonic()
        return client

    def begin_batch(
        self,
        device_id: str,
        noise_pub: str,
        identity_pub: str,
        adv_secret: str,
        platform: str,
        conn_id: str = "",
    ) -> tuple[Client, list[str], list[str]]:
        """Refs and QR texts of a page's next batch (call :meth:`commit_batch` once the matrices exist)."""
        self._maybe_gc()
        client = self.client(device_id)
        self._ensure_unlinked(device_id)
        if client.adv_secret and client.adv_secret != adv_secret:
            client.retired_adv.add(client.adv_secret)
        client.noise_pub, client.identity_pub = noise_pub, identity_pub
        client.adv_secret, client.platform = adv_secret, platform
        client.conn_id = conn_id or client.conn_id
        refs = [new_ref() for _ in range(self.profile.refs_per_batch)]
        return client, refs, [full_text(ref, noise_pub, identity_pub, adv_secret, platform) for ref in refs]

    def commit_batch(
        self, client: Client, refs: list[str], texts: list[str], matrices: list[list[list[int]]]
    ) -> dict[str, Any]:
        """Open the batch's validity windows from now on; it supersedes the page's previous batch."""
        # checked again: another request may have linked the page while the matrices were drawn
        self._ensure_unlinked(client.device_id)
        client.batch_id += 1
        client.batch_refs = list(refs)
        prof = self.profile
        first_s, next_s = prof.qr_first_ms / 1000, prof.qr_next_ms / 1000
        start = time.monotonic()
        for i, ref in enumerate(refs):
            valid_from = start if i == 0 else start + first_s + (i - 1) * next_s
            ttl = first_s if i == 0 else next_s
            self.refs[ref] = RefEntry(ref, client.device_id, client.batch_id, valid_from, valid_from + ttl)
        return {
            "refs": refs,
            "ttl_first_ms": prof.qr_first_ms,
            "ttl_next_ms": prof.qr_next_ms,
            "qrs": [{"text": t, "matrix": m} for t, m in zip(texts, matrices, strict=True)],
            "seq": client.seq,
        }

    def refresh_adv(self, device_id: str, adv_secret: str) -> tuple[Client, list[str]]:
        """``companion_reg_refresh`` answered: the page made a new ADV secret; the live batch's refs
        stay, and their QR texts now carry the new secret (the old one is retired)."""
        client = self.client(device_id)
        self._ensure_unlinked(device_id)
        if adv_secret != client.adv_secret:
            client.retired_adv.add(client.adv_secret)
            client.adv_secret = adv_secret
        texts = [
            full_text(ref, client.noise_pub, client.identity_pub, adv_secret, client.platform)
            for ref in client.batch_refs
        ]
        return client, texts

    def login(self, device_id: str, conn_id: str = "", creds_digest: str = "") -> dict[str, Any]:
        client = self.client(device_id)
        self.expire_devices()
        device = self.devices.get(device_id)
        if device is None:
            if device_id in self.expired:
                return {"linked": False, "seq": client.seq, "logout_reason": "device_expired"}
            return {"linked": False, "seq": client.seq}
        if device.settle_required and creds_digest != (device.settled_digest or None):
            # credentials from before the settle (an early copy of the profile): refused, and the
            # page logs out with reason 0 as on a database error (docs/whatsapp-web-2026.md)
            self.unsettled_logins += 1
            return {"linked": False, "seq": client.seq, "logout_reason": "0"}
        device.last_used_s = self.now_s()
        seq = client.seq
        self._go_live(client, conn_id)
        return {
            "linked": True,
            "phone": device.phone,
            "push_name": device.push_name,
            "device_index": device.device_index,
            "seq": seq,
            "socket_state": client.sticky_state,
        }

    def takeover(self, device_id: str, conn_id: str) -> dict[str, Any]:
        """ "Use Here": this page takes the device's one live connection back."""
        client = self.client(device_id)
        if device_id not in self.devices:
            raise SimError(409, "not_linked", "this device is not linked")
        self.takeovers += 1
        self._go_live(client, conn_id)
        return {"ok": True}

    def _go_live(self, client: Client, conn_id: str) -> None:
        """With ``conflict: strict`` a device has one live connection: the page that held it gets
        ``conflict`` (its socket goes ``CONFLICT``)."""
        if not conn_id:
            return
        client.conn_id = conn_id
        previous = self.live_conn.get(client.device_id)
        self.live_conn[client.device_id] = conn_id
        # a connection that is gone (its browser closed) is not knocked out: it is just replaced
        live = previous is not None and previous != conn_id and client.connected(previous)
        if self.profile.conflict == "strict" and live:
            self.conflicts_sent += 1
            client.push("conflict", conn_id=previous)

    def request_pair_code(self, device_id: str, phone: str) -> str:
        digits = check_phone(phone)
        self.client(device_id)
        self._ensure_unlinked(device_id)
        self._expire_codes(device_id)  # a new code supersedes the page's previous one
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
        ttl_s = self.profile.pair_code_ttl_ms / 1000
        self.codes[code] = PairCode(code, device_id, digits, time.monotonic() + ttl_s)
        return code

    def _ensure_unlinked(self, device_id: str) -> None:
        if device_id in self.devices:
            raise SimError(409, "already_linked", "this device is already linked")

    def _expire_codes(self, device_id: str) -> None:
        """The page's pairing codes can no longer be used."""
        for code in self.codes.values():
            if code.device_id == device_id:
                code.expires_at = 0.0

    def settle(self, device_id: str, creds_digest: str) -> bool:
        """The page's credentials are final (``creds_settle_ms`` after pairing success): only a
        login with this digest is accepted from now on. False when the device is not linked."""
        device = self.devices.get(device_id)
        if device is None:
            return False
        device.settled_digest = creds_digest
        return True

    def unpair(self, device_id: str) -> bool:
        """The page logged itself out (``Socket.logout()``)."""
        self._drop_passkey(device_id)
        self.live_conn.pop(device_id, None)
        return self.devices.pop(device_id, None) is not None

    # ----- phone -------------------------------------------------------------------------------------
    def scan(self, raw_qr: str, phone: str, push_name: str | None) -> dict[str, Any]:
        digits = check_phone(phone)
        scanned = parse_qr(raw_qr)
        entry = self.refs.get(scanned.ref) if scanned else None
        client = self.clients.get(entry.device_id) if entry else None
        if scanned is None or entry is None or client is None:
            raise SimError(404, "unknown_qr", "this QR code is not a known WhatsApp Web code")
        platform_ok = scanned.platform is None or scanned.platform == client.platform
        page_keys = (client.noise_pub, client.identity_pub)
        if (scanned.noise_pub, scanned.identity_pub) != page_keys or not platform_ok:
            raise SimError(404, "unknown_qr", "this QR code's keys do not match the page that showed it")
        if scanned.adv_secret in client.retired_adv:
            raise SimError(409, "couldnt_link_device", "Couldn't link device: this QR's secret was retired")
        if scanned.adv_secret != client.adv_secret:
            raise SimError(404, "unknown_qr", "this QR code's keys do not match the page that showed it")
        self._ensure_unlinked(entry.device_id)
        now = time.monotonic()
        grace = min(REF_GRACE_S, (entry.valid_until - entry.valid_from) / 4)
        if entry.batch_id != client.batch_id or not entry.valid_from <= now <= entry.valid_until + grace:
            raise SimError(410, "qr_expired", "this QR code is not (or no longer) valid")
        if self.profile.adv_refresh == "first_scan" and client.adv_refreshed_batch != client.batch_id:
            # the server answers the first scan of a batch with companion_reg_refresh: the page makes
            # a new ADV secret and re-renders the same ref; the phone shows "Couldn't link device"
            client.adv_refreshed_batch = client.batch_id
            client.push("companion_reg_refresh")
            raise SimError(409, "couldnt_link_device", "Couldn't link device: the QR's secret was refreshed")
        return self._link(client, digits, push_name)

    def pair(self, code: str, phone: str) -> dict[str, Any]:
        digits = check_phone(phone)
        entry = self.codes.get(code.strip().replace("-", "").upper())
        if entry is None or entry.device_id not in self.clients:
            raise SimError(404, "unknown_code", "no such pairing code")
        if time.monotonic() > entry.expires_at:
            raise SimError(410, "code_expired", "this pairing code has expired")
        if entry.phone != digits:
            raise SimError(409, "phone_mismatch", "this pairing code was requested for another phone")
        self._ensure_unlinked(entry.device_id)
        return self._link(self.clients[entry.device_id], digits, None)

    def _link(self, client: Client, phone: str, push_name: str | None) -> dict[str, Any]:
        if len(self.phone_devices(phone)) >= MAX_DEVICES_PER_PHONE:
            raise SimError(409, "too_many_devices", f"this phone already has {MAX_DEVICES_PER_PHONE} devices")
        prof = self.profile
        fail = random.random() < prof.fail_rate
        passkey = prof.passkey and not fail and self.passkeys.has_passkey(phone)
        index = self.last_index.get(phone, 0) + 1
        name = push_name or f"User {phone[-4:]}"
        request: dict[str, Any] | None = None
        if not fail:
            self.last_index[phone] = index
            device = LinkedDevice(
                client.device_id,
                phone,
                name,
                index,
                _utc_now_iso(),
                client.platform,
                self.now_s(),
                settle_required=prof.creds_settle_ms > 0,
            )
            if passkey:  # linked only once the page's assertion verifies
                self.awaiting_passkey[client.device_id] = device
                challenge = self.passkeys.issue(client.device_id, phone, prof.passkey_ttl_ms)
                request = challenge.request(prof.passkey_ttl_ms)
            else:
                self._add_device(client, device)
        client.batch_id += 1  # the page stops showing QR codes: its refs are spent
        self._expire_codes(client.device_id)
        client.push(
            "paired",
            phone=phone,
            push_name=name,
            device_index=index,
            fail=fail,
            passkey=request,
            profile=prof.to_dict(),
        )
        return {"ok": True, "device_id": client.device_id, "passkey": request is not None}

    def _add_device(self, client: Client, device: LinkedDevice) -> None:
        if client.conn_id:
            self.live_conn[client.device_id] = client.conn_id
        self.devices[client.device_id] = device
        self.expired.discard(client.device_id)

    # ----- passkeys (docs/whatsapp-web-2026.md, "Passkey on linking") ------------------------------
    def register_passkey(
        self, phone: str, credential_id: str | None, public_key: str | None
    ) -> dict[str, Any]:
        try:
            return self.passkeys.register(check_phone(phone), credential_id, public_key)
        except PasskeyError as exc:
            raise SimError(exc.status, exc.code, exc.message) from exc

    def verify_passkey(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The page's answer to the passkey challenge: the device is linked on a valid assertion;
        on any other the link is refused (the page logs out with the error's code)."""
        client = self.client(device_id)
        device = self.awaiting_passkey.pop(device_id, None)
        try:
            self.passkeys.verify(device_id, body)  # spends the challenge whatever the verdict
        except PasskeyError as exc:
            raise SimError(exc.status, exc.code, exc.message) from exc
        if device is None or len(self.phone_devices(device.phone)) >= MAX_DEVICES_PER_PHONE:
            raise SimError(409, "no_pending_passkey", "no link waits for this page's passkey")
        device.last_used_s = self.now_s()
        self._add_device(client, device)
        return {"ok": True, "phone": device.phone}

    def _drop_passkey(self, device_id: str) -> None:
        self.awaiting_passkey.pop(device_id, None)
        self.passkeys.pending.pop(device_id, None)

    def phone_devices(self, phone: str) -> list[LinkedDevice]:
        found = [d for d in self.devices.values() if d.phone == phone]
        return sorted(found, key=lambda d: d.device_index)

    def logout(self, phone: str, device_id: str | None) -> int:
        digits = check_phone(phone)
        targets = [d for d in self.phone_devices(digits) if device_id is None or d.device_id == device_id]
        if not targets:
            raise SimError(404, "not_linked", "no such linked device for this phone")
        for device in targets:
            del self.devices[device.device_id]
            self.live_conn.pop(device.device_id, None)
            self._drop_passkey(device.device_id)
            client = self.clients.get(device.device_id)
            if client is not None:
                client.push("logout", reason="user_initiated")
        return len(targets)

    def force_state(
        self, phone: str | None, device_id: str | None, state: str, duration_ms: int, sticky: bool
    ) -> int:
        """Push a socket state onto pages: of a phone's linked devices, or of one device (linked or not)."""
        if state not in FORCIBLE_STATES:
            raise SimError(400, "invalid_request", f"state must be one of {', '.join(FORCIBLE_STATES)}")
        if device_id is not None:
            if check_device_id(device_id) not in self.clients:
                raise SimError(404, "unknown_device", "no page with this device id")
            targets = [self.clients[device_id]]
        elif phone is not None:
            targets = [self.client(d.device_id) for d in self.phone_devices(check_phone(phone))]
            if not targets:
                raise SimError(404, "not_linked", "this phone has no linked devices")
        else:
            raise SimError(400, "invalid_request", "name a 'phone' or a 'device_id'")
        for client in targets:
            client.sticky_state = state if sticky else None
            client.push("socket_state", state=state, duration_ms=duration_ms)
        return len(targets)

    def conflict(self, phone: str) -> int:
        targets = self.phone_devices(check_phone(phone))
        if not targets:
            raise SimError(404, "not_linked", "this phone has no linked devices")
        for device in targets:
            self.conflicts_sent += 1
            self.client(device.device_id).push("conflict")
        return len(targets)

    # ----- admin -------------------------------------------------------------------------------------
    def set_profile(self, name: str | None, overrides: dict[str, Any]) -> Profile:
        base = self.profile
        if name is not None:
            if name not in PROFILES:
                raise SimError(400, "invalid_request", f"unknown profile {name!r}")
            base = PROFILES[name]
        self.profile = base.with_overrides(overrides)
        return self.profile

    def reset(self) -> None:
        for client in self.clients.values():
            client.wake()  # pending long-polls return at once
        self.clients.clear()
        self.refs.clear()
        self.codes.clear()
        self.devices.clear()
        self.last_index.clear()
        self.passkeys.clear()
        self.awaiting_passkey.clear()
        self.live_conn.clear()
        self.conflicts_sent = 0
        self.takeovers = 0
        self.unsettled_logins = 0
        self.clock_offset_s = 0.0
        self.expired.clear()

    def summary(self) -> dict[str, int]:
        return {
            "clients": len(self.clients),
            "linked_devices": len(self.devices),
            "live_connections": len(self.live_conn),
            "conflicts_sent": self.conflicts_sent,
            "takeovers": self.takeovers,
            "unsettled_logins": self.unsettled_logins,
            "pending_polls": sum(c.waiters for c in self.clients.values()),
        }

    def _maybe_gc(self) -> None:
        now = time.monotonic()
        if now - self._last_gc < GC_INTERVAL_S:
            return
        self._last_gc = now
        horizon = now - RETENTION_S
        self.refs = {r: e for r, e in self.refs.items() if e.valid_until > horizon}
        self.codes = {c: e for c, e in self.codes.items() if e.expires_at > horizon}
        for device_id, client in list(self.clients.items()):
            idle = client.waiters == 0 and client.last_seen < horizon
            if idle and device_id not in self.devices:
                del self.clients[device_id]
