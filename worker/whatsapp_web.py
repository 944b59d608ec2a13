"""Everything that knows WhatsApp Web's page: origin, selectors, in-page modules, page scripts.

This is the only module that knows how WhatsApp Web looks from the inside. It follows what
whatsapp-web.js and wa-js read from the live page, as the 2026 page behaves (each behaviour and
its public source: ``docs/whatsapp-web-2026.md``): the QR is the string the page renders in
``div[data-ref]`` (a new ref and a refreshed ADV secret both re-render it); the link is ``Socket``
``state``; the phone is ``WAWebUserPrefsMeUser.getMaybeMePnUser()`` (``c.us`` only, the LID kept
apart) with the ``last-wid-md`` localStorage key as the fallback, known shortly after pairing
success and long before the history sync; the sync is ``Cmd`` ``main_loaded``, Stream ``MAIN`` or
``hasSynced``, whichever comes first; a logout reloads to ``/?post_logout=1``.

Events reach Python through one exposed binding (``BINDING_NAME``); nothing here sleeps or polls
for a state, except Playwright's own ``wait_for_function`` for the module system to boot and a
short retry while a late module is not registered yet.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from shared.private_files import make_private_dirs

log = logging.getLogger("walink.whatsapp_web")

ORIGIN = "https://web.whatsapp.com"
APP_URL = ORIGIN + "/"
ROUTE_PATTERN = ORIGIN + "/**"

# DOM selectors (used by tests, screenshots and the fallback path; the driving uses the modules)
QR_CONTAINER = "div[data-ref]"
QR_CANVAS = "div[data-ref] canvas"
QR_RELOAD_BUTTON = "div[data-ref] button"
PASSKEY_PROMPT = '[data-testid="passkey-prompt"]'
PAIRING_CODE_CELLS = "[data-link-code]"

BINDING_NAME = "__walinkEmit"

# The module system is up (whatsapp-web.js waits for the same thing before ExposeAuthStore).
MODULES_READY = "() => Boolean(window.Debug && window.Debug.VERSION && typeof window.require === 'function')"

# Socket states (WAWebSocketModel / wa-js SOCKET_STATE)
STATE_OPENING = "OPENING"
STATE_UNPAIRED = "UNPAIRED"
STATE_UNPAIRED_IDLE = "UNPAIRED_IDLE"
STATE_PAIRING = "PAIRING"
STATE_CONNECTED = "CONNECTED"
STATE_CONFLICT = "CONFLICT"
STATE_TIMEOUT = "TIMEOUT"
STATE_DEPRECATED_VERSION = "DEPRECATED_VERSION"
STATE_TOS_BLOCK = "TOS_BLOCK"
STATE_PROXYBLOCK = "PROXYBLOCK"
RECONNECTING_STATES = frozenset({STATE_TIMEOUT, STATE_OPENING})
"""The socket is re-opening: a linked session waits (whatsapp-web.js keeps these after ready)."""
BLOCKED_STATES = frozenset({STATE_TOS_BLOCK, STATE_PROXYBLOCK})
"""The page cannot go on: the session fails with the state's name as reason."""

# Default QR ref lifetimes when the page does not say (Baileys/whatsmeow/WAHA: 60 s, then 20 s)
QR_FIRST_TTL_MS = 60_000
QR_NEXT_TTL_MS = 20_000

# The phone number's server part (a LID is ``…@lid`` and is never a phone number)
PHONE_SERVER = "c.us"
LID_SERVER = "lid"
_PHONE_DIGITS = re.compile(r"[0-9]{6,15}")
_LID = re.compile(r"[0-9]{1,20}@" + LID_SERVER)


def phone_of(value: object) -> str | None:
    """The digits of a phone number the hook read from a ``c.us`` user, or None."""
    return value if isinstance(value, str) and _PHONE_DIGITS.fullmatch(value) else None


def lid_of(value: object) -> str | None:
    """A LID (``<digits>@lid``) as the hook reports it, or None."""
    return value if isinstance(value, str) and _LID.fullmatch(value) else None


# Waits for a module that is registered late (``requireDeferred``): ``require`` throws
# ``Requiring unknown module "X"`` until then; retried with a short backoff, other errors thrown.
_WHEN_MODULE = """
const whenModule = (name, timeoutMs = 60000) => new Promise((resolve, reject) => {
  const started = Date.now();
  const attempt = (waitMs) => {
    try { resolve(window.require(name)); return; } catch (e) {
      const unknown = /Requiring unknown module/.test(String(e && e.message));
      if (!unknown || Date.now() - started > timeoutMs) { reject(e); return; }
    }
    setTimeout(() => attempt(Math.min(waitMs * 2, 250)), waitMs);
  };
  attempt(10);
});
"""

# Installed once per document. Emits: hooked, state, qr {qr, ref, ttl_ms}, pairing_code {code},
# passkey, me {phone, method, push_name, lid}, lid {lid}, synced {signal}, progress, logout.
#  * the QR is whatever string the page renders in div[data-ref] (a MutationObserver on the
#    attribute): a new ref (Conn change:ref) and a new ADV secret under the same ref
#    (companion_reg_refresh → advSecretEventEmitter 'change') both re-render it;
#  * the phone comes from getMaybeMePnUser() (server c.us), else last-wid-md, checked on every
#    event that can follow it (state, Conn change:wid, main_loaded, Stream mode, hasSynced);
#    the LID is kept apart and never taken for a phone number;
#  * the sync is reported on its own, on the first of Cmd main_loaded, Stream mode MAIN, hasSynced.
HOOK_SCRIPT = (
    """
async ({passkeySelector, qrSelector, codeSelector}) => {
  if (window.__walinkHooked) { return 'already'; }
  window.__walinkHooked = true;
  const emit = (kind, data) => window.__walinkEmit(kind, data === undefined ? null : data);
"""
    + _WHEN_MODULE
    + """
  const Socket = (await whenModule('WAWebSocketModel')).Socket;
  const Conn = (await whenModule('WAWebConnModel')).Conn;
  const Cmd = (await whenModule('WAWebCmd')).Cmd;
  let Stream = null;
  try { Stream = window.require('WAWebStreamModel').Stream; } catch (e) { Stream = null; }
  const optional = (name) => { try { return window.require(name); } catch (e) { return null; } };

  let lastQr = null;
  const readQr = () => {
    const box = document.querySelector(qrSelector);
    const value = box ? box.getAttribute('data-ref') : null;
    if (!value || value === lastQr) { return; }
    const parts = value.split(',');
    if (parts.length < 4 || parts.some((p) => !p || p === 'null' || p === 'undefined')) { return; }
    lastQr = value;
    emit('qr', {qr: value, ref: parts[0], ttl_ms: Conn.refTTL || null});
  };
  let lastCode = null;
  const readCode = () => {
    const cells = document.querySelector(codeSelector);
    const code = cells ? (cells.getAttribute('data-link-code') || '').split(',').join('') : '';
    if (code && code !== lastCode) { lastCode = code; emit('pairing_code', {code}); }
    if (!cells) { lastCode = null; }
  };
  let passkeyShown = false;
  const checkPasskey = () => {
    const shown = Boolean(document.querySelector(passkeySelector));
    if (shown && !passkeyShown) { emit('passkey', null); }
    passkeyShown = shown;
  };

  // the user of WAWebUserPrefsMeUser's `getter` when its server is `server` (the module may be late)
  const meUser = (getter, server) => {
    const mod = optional('WAWebUserPrefsMeUser');
    try {
      const wid = mod && mod[getter]();
      if (wid && wid.user && String(wid.server) === server) { return String(wid.user); }
    } catch (e) { /* not known yet */ }
    return null;
  };
  const lid = () => {
    const user = meUser('getMaybeMeLidUser', '"""
    + LID_SERVER
    + """');
    return user ? user + '@"""
    + LID_SERVER
    + """' : null;
  };
  const phone = () => {
    const user = meUser('getMaybeMePnUser', '"""
    + PHONE_SERVER
    + """');
    if (user) { return {phone: user, method: 'getMaybeMePnUser'}; }
    const raw = window.localStorage.getItem('last-wid-md');
    if (raw) {
      try {
        const [user, server] = String(JSON.parse(raw)).split('@');
        const digits = (user || '').split(':')[0];
        if (server === '"""
    + PHONE_SERVER
    + """' && /^[0-9]+$/.test(digits)) { return {phone: digits, method: 'last-wid-md'}; }
      } catch (e) { /* unreadable */ }
    }
    return null;
  };
  let meSent = false;
  let lidSent = null;
  const checkMe = () => {
    if (meSent || Socket.state === 'UNPAIRED' || Socket.state === 'UNPAIRED_IDLE') { return; }
    if (!Conn.wid && !window.localStorage.getItem('last-wid-md')) { return; }
    const l = lid();
    if (l && l !== lidSent) { lidSent = l; emit('lid', {lid: l}); }
    const who = phone();
    if (!who) { return; }
    meSent = true;
    emit('me', {...who, push_name: Conn.pushname || null, lid: l});
  };
  let syncedSent = false;
  const synced = (signal) => {
    if (syncedSent) { return; }
    syncedSent = true;
    emit('synced', {signal});
    checkMe();
  };

  Socket.on('change:state', (_m, state) => { emit('state', state); checkMe(); });
  Socket.on('change:hasSynced', (_m, value) => { if (value) { synced('hasSynced'); } });
  Conn.on('change:wid', () => checkMe());
  Cmd.on('main_loaded', () => synced('main_loaded'));
  if (Stream) {
    Stream.on('change:mode', (_m, mode) => { if (mode === 'MAIN') { synced('stream_main'); } });
  }
  Cmd.on('logout', () => emit('logout', null));
  Cmd.on('offline_progress_update_from_bridge', () => {
    const mod = optional('WAWebOfflineHandler');
    try { if (mod) { emit('progress', mod.OfflineMessageHandler.getOfflineDeliveryProgress()); } }
    catch (e) { /* progress is informative only */ }
  });
  whenModule('WAWebUserPrefsMeUser').then(checkMe, () => {});
  new MutationObserver(() => { readQr(); readCode(); checkPasskey(); }).observe(
    document.documentElement,
    {childList: true, subtree: true, attributes: true, attributeFilter: ['data-ref', 'data-link-code']},
  );
  emit('hooked', {version: window.Debug.VERSION});
  emit('state', Socket.state);
  readQr();
  readCode();
  checkPasskey();
  checkMe();
  if (Socket.hasSynced) { synced('hasSynced'); }
  else if (Stream && Stream.mode === 'MAIN') { synced('stream_main'); }
  return 'hooked';
}
"""
)

# whatsapp-web.js Client.requestPairingCode: ALT_DEVICE_LINKING, then startAltLinkingFlow. From
# then on the page issues no QR refs and getADVSecretKey() is null (no QR is published meanwhile).
PAIRING_CODE_SCRIPT = (
    "async (phone) => {"
    + _WHEN_MODULE
    + """
  const api = await whenModule('WAWebAltDeviceLinkingApi');
  api.setPairingType('ALT_DEVICE_LINKING');
  await api.initializeAltDeviceLinking();
  return await api.startAltLinkingFlow(phone, true);
}
"""
)

# Back from a pairing code to the QR (whatsapp-web.js cancelPairingCode): new refs from the
# socket, and the QR linking screen.
QR_LINKING_SCRIPT = (
    "async () => {"
    + _WHEN_MODULE
    + """
  const launch = await whenModule('WAWebLaunchSocketUtils');
  const api = await whenModule('WAWebAltDeviceLinkingApi');
  await launch.refreshQR();
  await api.initializeQRLinking();
  return true;
}
"""
)

# "Click to reload QR code" (the overlay button WhatsApp shows when a batch of refs ran out; its
# handler goes through the backend event bus to WAWebLaunchSocketUtils.refreshQR()). There is no
# Cmd.refreshQR on the 2026 page.
REFRESH_QR_SCRIPT = (
    "async (reloadSelector) => {"
    + _WHEN_MODULE
    + """
  const button = document.querySelector(reloadSelector);
  if (button) { button.click(); return 'button'; }
  const launch = await whenModule('WAWebLaunchSocketUtils', 5000);
  await launch.refreshQR();
  return 'launch';
}
"""
)

TAKEOVER_SCRIPT = "async () => { await window.require('WAWebSocketModel').Socket.takeover(); }"
LOGOUT_SCRIPT = "() => window.require('WAWebSocketModel').Socket.logout()"


@dataclass(frozen=True, slots=True)
class LogoutNotice:
    """A navigation to ``/?post_logout=1&logout_reason=…`` (WAWebReloadAfterLogout)."""

    reason_code: str | None

    @property
    def reason(self) -> str:
        """walink's reason string for WhatsApp's LOGOUT_REASON_CODE."""
        return {
            "0": "client_fatal",
            "1": "sync_failed",
            "2": "history_sync_timeout",
            "3": "account_locked",
            # the simulator's code for a device logged out for going unused (simulator/README.md)
            "device_expired": "device_expired",
        }.get(self.reason_code or "", "phone_logout")

    @property
    def is_failure(self) -> bool:
        """A link that broke (sync) rather than a device that was logged out."""
        return self.reason_code in {"1", "2"}


# ----- the storage that holds the login (docs/durability.md, "What a snapshot needs")
LOGIN_DATABASES: tuple[str, ...] = ("wawc_db_enc", "wawc", "signal-storage", "model-storage")
"""IndexedDB databases (``WAWebSchemaVersions.DatabaseNames``) a restored login cannot do without:
the non-extractable key, the device, the Signal keys and sessions, and (strict: nothing public
says WhatsApp rebuilds it) the chats and contacts."""
LOGIN_LOCAL_STORAGE: tuple[str, ...] = ("WANoiseInfo", "WebEncKeySalt", "last-wid-md")
"""localStorage keys of the login: the encrypted credentials, their salt, the linked account."""
LOGIN_STORAGE_SCRIPT = (
    "async (keys) => ({ databases: (await indexedDB.databases()).map((d) => d.name).filter(Boolean),"
    " local_storage: keys.filter((k) => localStorage.getItem(k) !== null) })"
)
"""The page's IndexedDB database names and which of ``LOGIN_LOCAL_STORAGE`` it holds."""


def missing_login_storage(found: object) -> list[str]:
    """What ``LOGIN_STORAGE_SCRIPT``'s answer lacks of the login (empty: nothing)."""
    databases = found.get("databases") if isinstance(found, dict) else None
    keys = found.get("local_storage") if isinstance(found, dict) else None
    have = {str(n) for n in databases} if isinstance(databases, list) else set()
    stored = {str(k) for k in keys} if isinstance(keys, list) else set()
    return [f"IndexedDB {n}" for n in LOGIN_DATABASES if n not in have] + [
        f"localStorage {k}" for k in LOGIN_LOCAL_STORAGE if k not in stored
    ]


def parse_logout_url(url: str) -> LogoutNotice | None:
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" != ORIGIN:
        return None
    query = parse_qs(parts.query)
    if query.get("post_logout") != ["1"]:
        return None
    reason = query.get("logout_reason", [None])[0]
    return LogoutNotice(reason)


def user_agent_for(chromium_version: str) -> str:
    """A desktop Chrome UA: WhatsApp refuses ``HeadlessChrome``."""
    major = chromium_version.split(".")[0] if chromium_version else "140"
    return (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/{major}.0.0.0 Safari/537.36"
    )


class WebVersionCache:
    """The seed's ``webVersionCache: {type: 'local'}``: a pinned WhatsApp Web bootstrap HTML.

    ``resolve`` returns the cached HTML of the pinned version (served for ``https://web.whatsapp.com/``
    instead of the live one); ``persist`` stores the HTML of the version that is running, named by
    ``window.Debug.VERSION``, as whatsapp-web.js's LocalWebCache does after the page has synced.
    """

    def __init__(self, directory: Path, version: str | None) -> None:
        self.directory = directory
        self.version = version

    def unpin(self) -> None:
        """The server refused the pinned build (``DEPRECATED_VERSION``): load the live page from now on."""
        if self.version is not None:
            log.warning("WhatsApp Web %s is deprecated; no longer pinned", self.version)
        self.version = None

    def _path(self, version: str) -> Path:
        safe = "".join(c for c in version if c.isalnum() or c in ".-")
        if not safe or safe != version:
            raise ValueError(f"not a WhatsApp Web version: {version!r}")
        return self.directory / f"{safe}.html"

    def resolve(self) -> bytes | None:
        if self.version is None:
            return None
        try:
            return self._path(self.version).read_bytes()
        except FileNotFoundError:
            return None

    def persist(self, html: bytes, version: str) -> Path:
        path = self._path(version)
        make_private_dirs(self.directory)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(html)
        tmp.replace(path)
        log.info("cached WhatsApp Web %s (%d bytes)", version, len(html))
        return path
