// Service worker: the only part that talks to walink (cross-origin, by host permission). The
// content script on web.whatsapp.com asks it for the pending request and gives it the assertion.
importScripts("config.js");

const TOKEN_RE = /^[a-z0-9._-]{3,129}~[A-Za-z0-9_-]{16,64}$/;
const TIMEOUT_MS = 20000;

function allowed(base) {
  try {
    const origin = new URL(base).origin;
    return self.WALINK_ALLOWED_ORIGINS.includes(origin) ? origin : null;
  } catch (_) {
    return null;
  }
}

async function call(base, token, init) {
  const origin = allowed(base);
  if (!origin) return { ok: false, status: 0, error: { code: "walink_not_allowed", message: `not an allowed service: ${base}` } };
  if (!TOKEN_RE.test(token)) return { ok: false, status: 0, error: { code: "bad_link", message: "the link holds no valid token" } };
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch(`${origin}/v1/passkey/${encodeURIComponent(token)}`, {
      ...init,
      cache: "no-store",
      credentials: "omit",
      signal: controller.signal,
    });
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      body = null;
    }
    return resp.ok ? { ok: true, status: resp.status, body } : { ok: false, status: resp.status, error: body?.error || { code: "http_error", message: `HTTP ${resp.status}` } };
  } catch (err) {
    return { ok: false, status: 0, error: { code: "network_error", message: String(err) } };
  } finally {
    clearTimeout(timer);
  }
}

chrome.runtime.onMessage.addListener((msg, sender, reply) => {
  // only the content script on WhatsApp Web's origin may ask
  if (!sender.url || new URL(sender.url).origin !== "https://web.whatsapp.com") return false;
  if (msg?.kind === "request") {
    call(msg.base, msg.token, { method: "GET" }).then(reply);
    return true;
  }
  if (msg?.kind === "answer") {
    call(msg.base, msg.token, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(msg.credential),
    }).then(reply);
    return true;
  }
  return false;
});
