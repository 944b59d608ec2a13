"""Everything that knows WhatsApp Web's page: origin, selectors, in-page modules, page scripts.

This is the only module that knows how WhatsApp Web looks from the inside. It follows what
whatsapp-web.js and wa-js read from the live page (see ``../shared/research/
whatsapp-web-behaviour.md`` §1.5, §2, §3): the QR is ``Conn.ref`` plus the noise, identity and
ADV keys; rotations are ``Conn`` ``change:ref`` events; the link is ``Socket`` ``state`` and
``change:hasSynced``; the phone is ``WAWebUserPrefsMeUser.getMaybeMePnUser()`` with the
``last-wid-md`` localStorage key as the fallback; a logout reloads to ``/?post_logout=1``.

Events reach Python through one exposed binding (``BINDING_NAME``); nothing here sleeps or polls
for a state, except Playwright's own ``wait_for_function`` for the module system to boot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("walink.whatsapp_web")

ORIGIN = "https://web.whatsapp.com"
APP_URL = ORIGIN + "/"
ROUTE_PATTERN = ORIGIN + "/**"

# DOM selectors (used by tests, screenshots and the fallback path; the driving uses the modules)
QR_CONTAINER = "div[data-ref]"
QR_CANVAS = "div[data-ref] canvas"
QR_RELOAD_BUTTON = "div[data-ref] button"
PASSKEY_PROMPT = '[data-testid="passkey-prompt"]'

BINDING_NAME = "__walinkEmit"

# The module system is up (whatsapp-web.js waits for the same thing before ExposeAuthStore).
MODULES_READY = "() => Boolean(window.Debug && window.Debug.VERSION && typeof window.require === 'function')"

# Socket states (WAWebSocketModel / wa-js SOCKET_STATE)
STATE_UNPAIRED = "UNPAIRED"
STATE_UNPAIRED_IDLE = "UNPAIRED_IDLE"
STATE_PAIRING = "PAIRING"
STATE_CONNECTED = "CONNECTED"
STATE_CONFLICT = "CONFLICT"

# Default QR ref lifetimes when the page does not say (Baileys/whatsmeow/WAHA: 60 s, then 20 s)
QR_FIRST_TTL_MS = 60_000
QR_NEXT_TTL_MS = 20_000

# Installed once per document; emits: state, qr, passkey, ready, logout, progress, hooked.
HOOK_SCRIPT = """
async (passkeySelector) => {
  if (window.__walinkHooked) { return 'already'; }
  window.__walinkHooked = true;
  const emit = (kind, data) => window.__walinkEmit(kind, data === undefined ? null : data);
  const R = (name) => window.require(name);
  const Socket = R('WAWebSocketModel').Socket;
  const Conn = R('WAWebConnModel').Conn;
  const Cmd = R('WAWebCmd').Cmd;
  const qrFor = async (ref) => {
    const b64 = R('WABase64');
    const noise = await R('WAWebUserPrefsInfoStore').waNoiseInfo.get();
    const reg = await R('WAWebSignalStoreApi').waSignalStore.getRegistrationInfo();
    const adv = await R('WAWebAdvSignatureApi').getADVSecretKey();
    const platform = R('WAWebCompanionRegClientUtils').DEVICE_PLATFORM;
    return [ref, b64.encodeB64(noise.staticKeyPair.pubKey), b64.encodeB64(reg.identityKeyPair.pubKey),
            adv, platform].join(',');
  };
  const emitQr = async (ref) => {
    if (!ref) { return; }
    emit('qr', {qr: await qrFor(ref), ttl_ms: Conn.refTTL || null});
  };
  const me = () => {
    let user = null;
    try {
      const wid = R('WAWebUserPrefsMeUser').getMaybeMePnUser();
      if (wid && wid.user) { return {phone: String(wid.user), method: 'getMaybeMePnUser'}; }
    } catch (e) { /* module missing: fall back */ }
    const raw = window.localStorage.getItem('last-wid-md');
    if (raw) {
      try { user = JSON.parse(raw).replace(/:\\d+@/, '@').split('@')[0]; } catch (e) { user = null; }
      if (user) { return {phone: user, method: 'last-wid-md'}; }
    }
    return null;
  };
  const emitReady = () => {
    const who = me();
    emit('ready', who ? {...who, push_name: Conn.pushname || null} : null);
  };
  Socket.on('change:state', (_m, state) => emit('state', state));
  Conn.on('change:ref', (_m, ref) => { emitQr(ref); });
  Socket.on('change:hasSynced', (_m, synced) => { if (synced) { emitReady(); } });
  Cmd.on('logout', () => emit('logout', null));
  Cmd.on('offline_progress_update_from_bridge', () => {
    try { emit('progress', R('WAWebOfflineHandler').OfflineMessageHandler.getOfflineDeliveryProgress()); }
    catch (e) { /* progress is informative only */ }
  });
  let passkeyShown = false;
  const checkPasskey = () => {
    const shown = Boolean(document.querySelector(passkeySelector));
    if (shown && !passkeyShown) { emit('passkey', null); }
    passkeyShown = shown;
  };
  new MutationObserver(checkPasskey).observe(document.documentElement, {childList: true, subtree: true});
  emit('hooked', {version: window.Debug.VERSION});
  emit('state', Socket.state);
  if (Socket.state === 'UNPAIRED' && Conn.ref) { await emitQr(Conn.ref); }
  checkPasskey();
  if (Socket.hasSynced) { emitReady(); }
  return 'hooked';
}
"""

# whatsapp-web.js Client.requestPairingCode: ALT_DEVICE_LINKING, then startAltLinkingFlow.
PAIRING_CODE_SCRIPT = """
async (phone) => {
  const api = window.require('WAWebAltDeviceLinkingApi');
  api.setPairingType('ALT_DEVICE_LINKING');
  await api.initializeAltDeviceLinking();
  return await api.startAltLinkingFlow(phone, true);
}
"""

# "Click to reload QR code" (the overlay button WhatsApp shows when a batch of refs ran out);
# Cmd.refreshQR is only a fallback: whatsapp-web.js reports it gone from recent builds.
REFRESH_QR_SCRIPT = """
(reloadSelector) => {
  const button = document.querySelector(reloadSelector);
  if (button) { button.click(); return 'button'; }
  const Cmd = window.require('WAWebCmd').Cmd;
  if (typeof Cmd.refreshQR === 'function') { Cmd.refreshQR(); return 'cmd'; }
  return 'none';
}
"""

TAKEOVER_SCRIPT = "() => window.require('WAWebSocketModel').Socket.takeover()"
LOGOUT_SCRIPT = "() => window.require('WAWebSocketModel').Socket.logout()"


@dataclass(frozen=True, slots=True)
class LogoutNotice:
    """A navigation to ``/?post_logout=1&logout_reason=…`` (WAWebReloadAfterLogout)."""

    reason_code: str | None

    @property
    def reason(self) -> str:
        """walink's reason string for WhatsApp's LOGOUT_REASON_CODE (research §5.3)."""
        return {
            "0": "client_fatal",
            "1": "sync_failed",
            "2": "history_sync_timeout",
            "3": "account_locked",
        }.get(self.reason_code or "", "phone_logout")

    @property
    def is_failure(self) -> bool:
        """A link that broke (sync) rather than a device that was logged out."""
        return self.reason_code in {"1", "2"}


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
    """A desktop Chrome UA: WhatsApp refuses ``HeadlessChrome`` (research §5.1)."""
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

    def __init__(self, directory: Path, version: str) -> None:
        self.directory = directory
        self.version = version

    def _path(self, version: str) -> Path:
        safe = "".join(c for c in version if c.isalnum() or c in ".-")
        if not safe or safe != version:
            raise ValueError(f"not a WhatsApp Web version: {version!r}")
        return self.directory / f"{safe}.html"

    def resolve(self) -> bytes | None:
        try:
            return self._path(self.version).read_bytes()
        except FileNotFoundError:
            return None

    def persist(self, html: bytes, version: str) -> Path:
        path = self._path(version)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(html)
        tmp.replace(path)
        log.info("cached WhatsApp Web %s (%d bytes)", version, len(html))
        return path
