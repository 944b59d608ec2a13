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
from urllib.parse import parse_qs, urlsplit

import orjson

log = logging.getLogger("walink.whatsapp_web")

ORIGIN = "https://web.whatsapp.com"
APP_URL = ORIGIN + "/"
ROUTE_PATTERN = ORIGIN + "/**"

# DOM selectors (used by tests, screenshots and the fallback path; the driving uses the modules)
QR_CONTAINER = "div[data-ref]"
QR_CANVAS = "div[data-ref] canvas"
QR_RELOAD_BUTTON = "div[data-ref] button"
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
# me {phone, method, push_name, lid}, lid {lid}, synced {signal}, progress, logout.
#  * the QR is whatever string the page renders in div[data-ref] (a MutationObserver on the
#    attribute): a new ref (Conn change:ref) and a new ADV secret under the same ref
#    (companion_reg_refresh → advSecretEventEmitter 'change') both re-render it;
#  * the phone comes from getMaybeMePnUser() (server c.us), else last-wid-md, checked on every
#    event that can follow it (state, Conn change:wid, main_loaded, Stream mode, hasSynced);
#    the LID is kept apart and never taken for a phone number;
#  * the sync is reported on its own, on the first of Cmd main_loaded, Stream mode MAIN, hasSynced.
HOOK_SCRIPT = (
    """
async ({qrSelector, codeSelector}) => {
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
  new MutationObserver(() => { readQr(); readCode(); }).observe(
    document.documentElement,
    {childList: true, subtree: true, attributes: true, attributeFilter: ['data-ref', 'data-link-code']},
  );
  emit('hooked', {version: window.Debug.VERSION});
  emit('state', Socket.state);
  readQr();
  readCode();
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


# ----------------------------------------------------------------------- passkey on linking (2026)
# Since about 2026-06-30 WhatsApp asks some accounts for a passkey while a device links: the page
# calls navigator.credentials.get({publicKey: {rpId: "whatsapp.com", userVerification: "required",
# challenge, ...}}) in the linked browser (docs/whatsapp-web-2026.md, "Passkey on linking"). This
# init script (every document of the context, before the page's own scripts) wraps that call on
# the WhatsApp origin: the request goes to the worker as a ``passkey_request`` event in the
# WebAuthn JSON shape, and the returned promise is settled later by PASSKEY_RESOLVE_SCRIPT (a
# credential built from the user's AuthenticationResponseJSON), or by itself with NotAllowedError
# when the request's timeout has passed or its AbortSignal fires (the worker's own deadline, which
# comes first, ends the session and its browser).
# The wrapper keeps the native function's name, length and toString(); its controller is under a
# registered symbol, not an enumerable property.
PASSKEY_RP_ID = "whatsapp.com"
PASSKEY_CONTROLLER = "walink.passkey"
PASSKEY_TIMEOUT_GRACE_MS = 5_000
"""The wrapper gives up this long after the request's own timeout (the worker's deadline is first)."""
PASSKEY_LOGOUT_REASONS = {
    # the simulator's logout reasons after a passkey the server refused (simulator/README.md)
    "passkey_invalid": "passkey_invalid",
    "passkey_expired": "passkey_expired",
    "passkey_cancelled": "passkey_cancelled",
}
PASSKEY_INIT_SCRIPT = (
    """
(() => {
  if (location.origin !== '"""
    + ORIGIN
    + """' || window.top !== window) { return; }
  const proto = window.CredentialsContainer && CredentialsContainer.prototype;
  const desc = proto && Object.getOwnPropertyDescriptor(proto, 'get');
  if (!desc || typeof desc.value !== 'function') { return; }
  const original = desc.value;
  const binding = '"""
    + BINDING_NAME
    + """';
  const graceMs = """
    + str(PASSKEY_TIMEOUT_GRACE_MS)
    + """;
  const bytes = (buf) => ArrayBuffer.isView(buf)
    ? new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength) : new Uint8Array(buf);
  const b64u = (buf) => {
    let s = '';
    for (const b of bytes(buf)) { s += String.fromCharCode(b); }
    return btoa(s).replace(/[+]/g, '-').replace(/[/]/g, '_').replace(/=+$/, '');
  };
  const unb64u = (t) => {
    const s = atob(t.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (t.length % 4)) % 4));
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) { out[i] = s.charCodeAt(i); }
    return out.buffer;
  };
  const notAllowed = () => new DOMException(
    'The operation either timed out or was not allowed.', 'NotAllowedError');
  let pending = null;
  const settle = (value, error) => {
    const p = pending;
    if (!p) { return false; }
    pending = null;
    clearTimeout(p.timer);
    if (error) { p.reject(error); } else { p.resolve(value); }
    return true;
  };
  const own = (obj, props) => {
    for (const [k, v] of Object.entries(props)) {
      Object.defineProperty(obj, k, {value: v, enumerable: true, configurable: true});
    }
    return obj;
  };
  const credential = (j) => {
    const r = j.response;
    const RP = window.AuthenticatorAssertionResponse;
    const CP = window.PublicKeyCredential;
    const response = own(Object.create(RP ? RP.prototype : Object.prototype), {
      clientDataJSON: unb64u(r.clientDataJSON),
      authenticatorData: unb64u(r.authenticatorData),
      signature: unb64u(r.signature),
      userHandle: r.userHandle ? unb64u(r.userHandle) : null,
    });
    const ext = j.clientExtensionResults || {};
    const cred = own(Object.create(CP ? CP.prototype : Object.prototype), {
      id: j.id, rawId: unb64u(j.rawId), type: 'public-key',
      authenticatorAttachment: j.authenticatorAttachment || null, response,
    });
    Object.defineProperty(cred, 'getClientExtensionResults', {value: () => ext});
    Object.defineProperty(cred, 'toJSON', {value: () => j});
    return cred;
  };
  const wrapped = {
    get(options) {
      const pk = options && options.publicKey;
      if (!pk) { return original.apply(this, arguments); }
      if (pending) {
        return Promise.reject(new DOMException('A request is already pending.', 'NotAllowedError'));
      }
      let request;
      try {
        request = {
          challenge: b64u(pk.challenge),
          rpId: pk.rpId || location.hostname,
          allowCredentials: (pk.allowCredentials || []).map(
            (c) => ({type: c.type || 'public-key', id: b64u(c.id)})),
          userVerification: pk.userVerification || 'preferred',
          timeout: typeof pk.timeout === 'number' ? pk.timeout : null,
        };
      } catch (e) {
        return Promise.reject(new TypeError('Invalid publicKey request options.'));
      }
      const signal = options.signal;
      if (signal && signal.aborted) { return Promise.reject(signal.reason); }
      return new Promise((resolve, reject) => {
        const waitMs = Math.min(Math.max(request.timeout || 300000, 1000), 3600000) + graceMs;
        pending = {resolve, reject, timer: setTimeout(() => settle(null, notAllowed()), waitMs)};
        if (signal) { signal.addEventListener('abort', () => settle(null, signal.reason), {once: true}); }
        window[binding]('passkey_request', request);
      });
    },
  }.get;
  const nativeToString = Function.prototype.toString;
  const disguise = new WeakMap();
  const toString = {
    toString() { return disguise.has(this) ? disguise.get(this) : nativeToString.call(this); },
  }.toString;
  Object.defineProperty(wrapped, 'length', {value: original.length});
  disguise.set(wrapped, nativeToString.call(original));
  disguise.set(toString, nativeToString.call(nativeToString));
  Object.defineProperty(Function.prototype, 'toString', {
    value: toString, writable: true, configurable: true, enumerable: false,
  });
  Object.defineProperty(proto, 'get', {...desc, value: wrapped});
  Object.defineProperty(window, Symbol.for('"""
    + PASSKEY_CONTROLLER
    + """'), {
    value: Object.freeze({
      resolve: (j) => { if (!pending) { return false; } return settle(credential(j), null); },
      pending: () => Boolean(pending),
    }),
    enumerable: false,
  });
})();
"""
)
PASSKEY_RESOLVE_SCRIPT = (
    "(j) => { const c = window[Symbol.for('"
    + PASSKEY_CONTROLLER
    + "')]; return Boolean(c && c.resolve(j)); }"
)


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
            **PASSKEY_LOGOUT_REASONS,
        }.get(self.reason_code or "", "phone_logout")

    @property
    def is_failure(self) -> bool:
        """A link that broke (sync) rather than a device that was logged out."""
        return self.reason_code in {"1", "2"} or self.reason_code in PASSKEY_LOGOUT_REASONS


# ----- the storage that holds the login (docs/durability.md, "What a snapshot needs")
LOGIN_DATABASES: tuple[str, ...] = ("wawc_db_enc", "wawc", "signal-storage", "model-storage")
"""IndexedDB databases (``WAWebSchemaVersions.DatabaseNames``) a restored login cannot do without:
the non-extractable key, the device, the Signal keys and sessions, and (strict: nothing public
says WhatsApp rebuilds it) the chats and contacts."""
LOGIN_LOCAL_STORAGE: tuple[str, ...] = ("WANoiseInfo", "WebEncKeySalt", "last-wid-md")
"""localStorage keys of the login: the encrypted credentials, their salt, the linked account."""
LOGIN_STORAGE_SCRIPT = (
    "async (keys) => { const entries = {};"
    " for (let i = 0; i < localStorage.length; i++) {"
    " const k = localStorage.key(i); if (k !== null) { entries[k] = localStorage.getItem(k); } }"
    " return { databases: (await indexedDB.databases()).map((d) => d.name).filter(Boolean),"
    " local_storage: keys.filter((k) => k in entries), entries }; }"
)
"""The page's IndexedDB database names, which of ``LOGIN_LOCAL_STORAGE`` it holds, and its whole
localStorage (``entries``: a live snapshot keeps it, as Chromium's own copy on disk lags)."""


_RESTORED_FLAG = "__walinkLocalStorageRestored"


def local_storage_restore_script(entries: dict[str, str]) -> str:
    """An init script that puts ``entries`` back into the origin's localStorage before WhatsApp's
    own scripts run, on the first document of the tab only (a later reload, e.g. after a logout,
    must see what the page itself left; sessionStorage lives as long as the tab)."""
    return (
        "(() => { try {"
        f" if (location.origin !== {orjson.dumps(ORIGIN).decode()}) {{ return; }}"
        f" if (sessionStorage.getItem({orjson.dumps(_RESTORED_FLAG).decode()})) {{ return; }}"
        f" sessionStorage.setItem({orjson.dumps(_RESTORED_FLAG).decode()}, '1');"
        f" const entries = {orjson.dumps(entries).decode()};"
        " for (const [k, v] of Object.entries(entries)) {"
        " if (localStorage.getItem(k) !== v) { localStorage.setItem(k, v); } }"
        " } catch (e) { /* storage unavailable: the page boots from what is on disk */ } })();"
    )


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


# ----- the app shell and its builds (the web version cache: worker/web_cache.py) ---------------------
# The bootstrap HTML ("app shell") names the build's script bundle; the bundle's version is
# ``window.Debug.VERSION``. whatsapp-web.js pins it by answering the request whose URL *equals*
# ``https://web.whatsapp.com/`` (LocalWebCache/RemoteWebCache); the origin also serves the shell
# on other paths, so walink answers every app-shell navigation (docs/whatsapp-web-2026.md, §
# "Builds and the web version cache").

APP_SHELL_PATHS = frozenset({"/", "/send", "/accept"})
"""Paths of the origin answered with the app shell, with any query: ``/`` (also
``/?post_logout=1&logout_reason=…`` after a logout), ``/send?phone=…`` (click-to-chat) and
``/accept?code=…`` (group invites)."""
VERSION_RE = re.compile(r"[0-9]{1,4}\.[0-9]{1,6}\.[0-9]{1,12}(?:-[a-z0-9]{1,16})?")
"""A WhatsApp Web build: ``2.3000.1017054665``, ``2.2412.54``, ``2.3000.1014522270-alpha``."""
LOADED_STATES = frozenset({STATE_UNPAIRED, STATE_UNPAIRED_IDLE, STATE_PAIRING, STATE_CONNECTED})
"""Socket states of a page whose build the server accepted (its shell is then worth keeping)."""
SHELL_MAX_BYTES = 8 * 1024 * 1024
"""An app shell larger than this is not one (wa-version's are about 590 KB)."""


def is_version(value: str) -> bool:
    return VERSION_RE.fullmatch(value) is not None


def is_app_shell_url(url: str) -> bool:
    """Does a navigation to ``url`` get WhatsApp Web's app shell from the origin?"""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" == ORIGIN and (parts.path or "/") in APP_SHELL_PATHS


def shell_is_build(html: bytes, version: str) -> bool:
    """Is ``html`` an app shell that names build ``version`` (its bundle URLs carry it)?"""
    if not is_version(version) or len(html) > SHELL_MAX_BYTES:
        return False
    head = html[:1024].lstrip().lower()
    if not head.startswith((b"<!doctype html", b"<html")):
        return False
    # the version as a whole token: "2.3000.10" must not match inside "2.3000.101"
    token = re.compile(rb"(?<![0-9A-Za-z.\-])" + re.escape(version.encode()) + rb"(?![0-9A-Za-z\-]|\.[0-9])")
    return token.search(html) is not None
