// Content script on https://web.whatsapp.com/*: acts only on a walink passkey link
// (https://web.whatsapp.com/#walink-passkey=<base64url JSON {u: walink URL, t: token}>). It asks
// walink (through the service worker) for the pending request, asks the user's authenticator for
// an assertion on this origin (rpId whatsapp.com), and hands the assertion back.
(() => {
  "use strict";
  const KEY = "walink-passkey";
  const params = new URLSearchParams(location.hash.slice(1));
  const blob = params.get(KEY);
  if (!blob) return;
  history.replaceState(history.state, "", location.pathname + location.search); // a link is used once

  const fromB64url = (text) => {
    const s = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out.buffer;
  };
  const toB64url = (buf) => {
    let s = "";
    for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  };

  const banner = document.createElement("div");
  banner.setAttribute("data-walink-passkey", "starting");
  banner.style.cssText =
    "position:fixed;z-index:2147483647;top:16px;left:50%;transform:translateX(-50%);padding:12px 18px;" +
    "background:#111b21;color:#e9edef;font:14px system-ui,sans-serif;border-radius:8px;box-shadow:0 2px 12px #0006";
  const show = (state, text) => {
    banner.setAttribute("data-walink-passkey", state);
    banner.textContent = text;
    if (!banner.isConnected) document.documentElement.append(banner);
  };

  function requestOptions(json) {
    if (typeof PublicKeyCredential.parseRequestOptionsFromJSON === "function") {
      return PublicKeyCredential.parseRequestOptionsFromJSON(json);
    }
    return {
      challenge: fromB64url(json.challenge),
      rpId: json.rpId,
      allowCredentials: (json.allowCredentials || []).map((c) => ({ type: "public-key", id: fromB64url(c.id) })),
      userVerification: json.userVerification,
      timeout: json.timeout ?? undefined,
    };
  }

  function credentialJSON(cred) {
    const r = cred.response;
    return {
      id: cred.id,
      rawId: toB64url(cred.rawId),
      type: cred.type,
      authenticatorAttachment: cred.authenticatorAttachment ?? null,
      clientExtensionResults: cred.getClientExtensionResults(),
      response: {
        clientDataJSON: toB64url(r.clientDataJSON),
        authenticatorData: toB64url(r.authenticatorData),
        signature: toB64url(r.signature),
        userHandle: r.userHandle ? toB64url(r.userHandle) : null,
      },
    };
  }

  async function run() {
    let link;
    try {
      link = JSON.parse(new TextDecoder().decode(fromB64url(blob)));
    } catch (_) {
      return show("failed", "This passkey link is damaged.");
    }
    const base = String(link.u || "");
    const token = String(link.t || "");
    show("loading", "Getting WhatsApp's passkey request…");
    const request = await chrome.runtime.sendMessage({ kind: "request", base, token });
    if (!request?.ok) return show("failed", `Cannot finish linking: ${request?.error?.message || "no answer"}`);
    show("signing", "Confirm with your passkey to link WhatsApp.");
    let cred;
    try {
      cred = await navigator.credentials.get({ publicKey: requestOptions(request.body.public_key) });
    } catch (err) {
      return show("failed", `No passkey was given (${err.name}).`);
    }
    show("sending", "Linking…");
    const answer = await chrome.runtime.sendMessage({ kind: "answer", base, token, credential: credentialJSON(cred) });
    if (!answer?.ok) return show("failed", `Linking failed: ${answer?.error?.message || "no answer"}`);
    const status = answer.body?.status;
    if (status === "failed") return show("failed", `WhatsApp refused the passkey (${answer.body.reason}).`);
    show("done", "Done: your WhatsApp account is linked. You can close this tab.");
  }

  run().catch((err) => show("failed", `Linking failed: ${err}`));
})();
