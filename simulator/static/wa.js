/*
 * Simulated WhatsApp Web (walink simulator).
 *
 * Emulates the linking flow of web.whatsapp.com: WhatsApp's own module registry (window.require of
 * "WAWeb..." modules), the QR screen with rotating refs, the pairing-code screen, the loading screen,
 * the main UI, logout/conflict handling, and persistence through a non-extractable CryptoKey kept in
 * IndexedDB. Every URL is same-origin so the page works behind a Playwright route of
 * https://web.whatsapp.com/** as well as served directly.
 */
(() => {
  "use strict";

  // ---------------------------------------------------------------- the build (simulator/builds.py)
  // This bundle's build, compiled in by the server (/rsrc/<version>/wa.js): window.Debug.VERSION is
  // the build the page loaded, whatever the server's current build is; the page names it to the
  // server at boot and on its long-poll, and a refused build gets DEPRECATED_VERSION.
  const SIM_BUILD = "__SIM_BUILD__";

  // ---------------------------------------------------------------- module registry (__d / require)
  const factories = new Map();
  const instances = new Map();
  window.__d = (name, factory) => {
    factories.set(name, factory);
    instances.delete(name);
  };
  window.require = (name) => {
    if (instances.has(name)) return instances.get(name);
    const factory = factories.get(name);
    if (!factory) throw new Error(`Requiring unknown module "${name}"`);
    const mod = factory();
    instances.set(name, mod);
    return mod;
  };

  // ---------------------------------------------------------------- Backbone-like emitter and model
  class Emitter {
    constructor() {
      Object.defineProperty(this, "_listeners", { value: new Map(), enumerable: false });
    }
    _add(names, cb, ctx, once) {
      if (typeof cb !== "function") return this;
      for (const name of String(names).split(/\s+/)) {
        if (!name) continue;
        if (!this._listeners.has(name)) this._listeners.set(name, []);
        this._listeners.get(name).push({ cb, ctx, once });
      }
      return this;
    }
    on(names, cb, ctx) {
      return this._add(names, cb, ctx, false);
    }
    once(names, cb, ctx) {
      return this._add(names, cb, ctx, true);
    }
    off(names, cb) {
      const keys = names == null ? [...this._listeners.keys()] : String(names).split(/\s+/);
      for (const name of keys) {
        const list = this._listeners.get(name);
        if (!list) continue;
        const kept = cb == null ? [] : list.filter((l) => l.cb !== cb);
        if (kept.length) this._listeners.set(name, kept);
        else this._listeners.delete(name);
      }
      return this;
    }
    trigger(name, ...args) {
      this._fire(name, args);
      if (name !== "all") this._fire("all", [name, ...args]);
      return this;
    }
    emit(name, ...args) {
      return this.trigger(name, ...args);
    }
    _fire(name, args) {
      const list = this._listeners.get(name);
      if (!list) return;
      for (const l of [...list]) {
        if (l.once) this.off(name, l.cb);
        try {
          l.cb.apply(l.ctx ?? this, args);
        } catch (err) {
          console.error(err);
        }
      }
    }
  }

  class Model extends Emitter {
    constructor(defaults) {
      super();
      Object.defineProperty(this, "attributes", { value: {}, enumerable: false });
      for (const [key, value] of Object.entries(defaults)) this._define(key, value);
    }
    _define(key, value) {
      this.attributes[key] = value;
      if (!(key in this)) {
        Object.defineProperty(this, key, {
          get: () => this.attributes[key],
          set: (v) => this.set(key, v),
          enumerable: true,
          configurable: true,
        });
      }
    }
    get(key) {
      return this.attributes[key];
    }
    set(key, value) {
      const changes = typeof key === "object" && key !== null ? key : { [key]: value };
      const changed = [];
      for (const [k, v] of Object.entries(changes)) {
        if (!(k in this.attributes)) this._define(k, undefined);
        if (Object.is(this.attributes[k], v)) continue;
        this.attributes[k] = v;
        changed.push(k);
      }
      for (const k of changed) this.trigger(`change:${k}`, this, this.attributes[k]);
      if (changed.length) this.trigger("change", this);
      return this;
    }
    serialize() {
      return { ...this.attributes };
    }
    toJSON() {
      return this.serialize();
    }
  }

  class Wid {
    constructor(user, server) {
      this.server = server;
      this.user = user;
      this._serialized = `${user}@${server}`;
    }
    toString() {
      return this._serialized;
    }
  }

  // ---------------------------------------------------------------- small helpers
  const $ = (sel, root = document) => root.querySelector(sel);
  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) if (c != null) el.append(c);
    return el;
  }
  const rand = (n) => crypto.getRandomValues(new Uint8Array(n));
  const toHex = (u8) => Array.from(u8, (b) => b.toString(16).padStart(2, "0")).join("");
  function toBytes(buf) {
    if (buf instanceof Uint8Array) return buf;
    if (ArrayBuffer.isView(buf)) return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    return new Uint8Array(buf);
  }
  function encodeB64(buf) {
    const bytes = toBytes(buf);
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function decodeB64(text) {
    const s = atob(text);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const b64ToBuffer = (text) => decodeB64(text).buffer;
  const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function api(method, path, body) {
    const init = { method, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      init.headers = { "Content-Type": "application/json" };
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const err = new Error(data?.error?.message || `HTTP ${resp.status}`);
      err.code = data?.error?.code || "http_error";
      err.status = resp.status;
      throw err;
    }
    return data;
  }

  /** Retry network failures and 5xx (not 4xx) with a capped backoff while `alive()` holds. */
  async function apiRetry(method, path, body, alive = () => true) {
    for (let wait = 250; ; wait = Math.min(wait * 2, 5000)) {
      try {
        return await api(method, path, body);
      } catch (err) {
        if (err.status && err.status < 500) throw err;
        if (!alive()) throw err;
        await delay(wait);
      }
    }
  }

  // ---------------------------------------------------------------- simulator state
  const DEVICE_PLATFORM = "1"; // Chrome
  const BANNERS = {
    0: "A database error occurred on your browser. Please relink your device.",
    1: "Your device could not link due to a sync issue. Please relink your device.",
    2: "Couldn't link device. Keep WhatsApp open on your phone when your device is linking.",
    3: "You have been logged out. To log back in, you will need to verify your phone number.",
  };
  const sim = {
    profile: { load_ms: 0, sync_ms: 50, resume_ms: 0, jitter_ms: 0, me_module: true },
    connId: toHex(rand(8)), // this page instance: a device has one live connection (conflict "strict")
    mode: "boot", // boot | qr | phone_entry | code | pairing | passkey | syncing | main | conflict | logout
    creds: null,
    seq: 0,
    linked: null, // {phone, push_name, device_index}
    me: null,
    meLid: null,
    progress: 0,
    banner: null,
    batch: null,
    reqGen: 0, // bumped to drop a pair-device request in flight
    pendingBatch: null, // refs that arrived while another screen showed (shown by initializeQRLinking)
    refIndex: 0,
    mainLoaded: false,
    encKey: null,
    qrTimers: new Set(),
    timers: new Set(),
    pollAbort: null,
    loggingOut: false,
    pairingType: "QR",
    heap: [],
  };
  let resolveCreds;
  const credsReady = new Promise((resolve) => {
    resolveCreds = resolve;
  });

  function later(ms, fn, set = sim.timers) {
    const id = setTimeout(() => {
      set.delete(id);
      fn();
    }, ms);
    set.add(id);
    return id;
  }
  function clearTimers(set) {
    for (const id of set) clearTimeout(id);
    set.clear();
  }
  /** A profile delay: a fixed value (± jitter_ms) or a [min, max] range drawn uniformly. */
  function jittered(ms) {
    if (Array.isArray(ms)) return Math.round(ms[0] + Math.random() * (ms[1] - ms[0]));
    const j = sim.profile.jitter_ms || 0;
    return Math.max(0, Math.round((ms || 0) + (Math.random() * 2 - 1) * j));
  }

  // ---------------------------------------------------------------- WhatsApp modules
  const Socket = new Model({ state: "UNLAUNCHED", stream: "DISCONNECTED", hasSynced: false });
  Socket.takeover = async function takeover() {
    if (this.state !== "CONFLICT") throw new Error("Takeover called without conflict!");
    this.set({ state: "OPENING", stream: "CONNECTING" });
    await apiRetry("POST", "/sim/api/takeover", { device_id: sim.creds.device_id, conn_id: sim.connId });
    this.set({ state: "CONNECTED", stream: "CONNECTED" });
    Stream.set({ mode: "MAIN", displayInfo: "NORMAL" });
    showMain();
    if (!sim.mainLoaded) finishSync();
  };
  Socket.logout = function logout(reason) {
    return userLogout(reason ?? "user_initiated");
  };
  Socket.reconnect = function reconnect() {};

  const Conn = new Model({
    id: undefined,
    ref: undefined,
    refTTL: undefined,
    wid: undefined,
    connected: false,
    platform: undefined,
    pushname: undefined,
  });

  // WAWebStreamModel: wa-js reads `mode` (QR, SYNCING, MAIN, CONFLICT, ...) and `displayInfo`.
  const Stream = new Model({ mode: "QR", displayInfo: "OPENING", available: false, clientExpired: false });

  // No Cmd.refreshQR: the reload goes through the backend event bus to WAWebLaunchSocketUtils.
  const Cmd = new Emitter();
  const LaunchSocketUtils = {
    refreshQR() {
      if (sim.linked) return undefined;
      return requestBatch();
    },
  };
  const BackendEventBus = { triggerRefreshQR: () => LaunchSocketUtils.refreshQR() };
  const advSecretEventEmitter = new Emitter();

  const OfflineMessageHandler = { getOfflineDeliveryProgress: () => sim.progress };

  const AltDeviceLinkingApi = {
    setPairingType(type) {
      sim.pairingType = type;
      // no more refs are issued for the QR while a phone-number link is set up
      if (type === "ALT_DEVICE_LINKING") stopQr();
    },
    async initializeAltDeviceLinking() {
      await credsReady;
      sim.pairingType = "ALT_DEVICE_LINKING";
    },
    async startAltLinkingFlow(phone, showNotification = true) {
      void showNotification;
      await credsReady;
      if (sim.linked) throw new Error("startAltLinkingFlow: already linked");
      const { code } = await api("POST", "/sim/api/pair-code", {
        device_id: sim.creds.device_id,
        phone: String(phone),
      });
      showCodeScreen(String(phone), code);
      return code;
    },
    /** Back to the QR screen; the refs come from LaunchSocketUtils.refreshQR() (either order). */
    initializeQRLinking() {
      sim.pairingType = "QR";
      if (sim.linked || !["code", "phone_entry", "qr"].includes(sim.mode)) return;
      stopQr(false);
      sim.mode = "qr";
      renderQrScreen();
      if (sim.pendingBatch) startBatch(sim.pendingBatch);
    },
  };

  const keyPair = (pair) => ({ pubKey: b64ToBuffer(pair.pub), privKey: b64ToBuffer(pair.priv) });

  // Core modules are there when Debug.VERSION is; the linking ones come `lazy_modules_ms` later
  // (requireDeferred): until then require() throws `Requiring unknown module "…"`.
  function defineCoreModules() {
    __d("WAWebSocketModel", () => ({ Socket }));
    __d("WAWebConnModel", () => ({ Conn }));
    __d("WAWebStreamModel", () => ({ Stream }));
    __d("WAWebCmd", () => ({ Cmd }));
    __d("WABase64", () => ({ encodeB64, decodeB64 }));
    __d("WAWebLaunchSocketUtils", () => LaunchSocketUtils);
    __d("WAWebMiscBrowserUtils", () => ({
      info: () => ({ name: "Chrome", os: "Linux", version: navigator.userAgent.match(/Chrome\/([\d.]+)/)?.[1] }),
    }));
  }
  const lazyModules = [];
  const lazy = (name, factory) => lazyModules.push([name, factory]);
  lazy("WAWebOfflineHandler", () => ({ OfflineMessageHandler }));
  lazy("WAWebAltDeviceLinkingApi", () => AltDeviceLinkingApi);
  lazy("WAWebCompanionRegClientUtils", () => ({ DEVICE_PLATFORM }));
  lazy("WAWebUserPrefsMultiDevice", () => ({ advSecretEventEmitter }));
  lazy("WAWebAdvSignatureApi", () => ({
    async getADVSecretKey() {
      const creds = await credsReady;
      // a phone-number link has no QR secret (whatsapp-web.js's QR strings ending in "null")
      return sim.pairingType === "ALT_DEVICE_LINKING" ? null : creds.adv_secret;
    },
    generateADVSecretKey() {
      return encodeB64(rand(32));
    },
  }));
  lazy("WAWebUserPrefsInfoStore", () => ({
    waNoiseInfo: {
      async get() {
        const creds = await credsReady;
        return { staticKeyPair: keyPair(creds.noise) };
      },
    },
  }));
  lazy("WAWebSignalStoreApi", () => ({
    waSignalStore: {
      async getRegistrationInfo() {
        const creds = await credsReady;
        return { registrationId: creds.registration_id, identityKeyPair: keyPair(creds.identity) };
      },
    },
  }));
  lazy("WAWebUserPrefsMeUser", () => ({
    getMaybeMePnUser: () => (sim.profile.me_module ? sim.me : null),
    getMaybeMeLidUser: () => (sim.profile.me_module ? sim.meLid : null),
  }));
  function defineLazyModules() {
    for (const [name, factory] of lazyModules) __d(name, factory);
  }

  // ---------------------------------------------------------------- persistence (IndexedDB + localStorage)
  const IDB_NAME = "wawc_db_enc";
  const IDB_STORE = "keys";
  const KEY_ID = "enc_key";

  function idbOpen() {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open(IDB_NAME, 1);
      req.onupgradeneeded = () => {
        if (!req.result.objectStoreNames.contains(IDB_STORE)) {
          req.result.createObjectStore(IDB_STORE, { keyPath: "id" });
        }
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error("IndexedDB open blocked"));
    });
  }
  async function idbRun(mode, op) {
    const db = await idbOpen();
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(IDB_STORE, mode);
        const req = op(tx.objectStore(IDB_STORE));
        let result;
        req.onsuccess = () => {
          result = req.result;
        };
        tx.oncomplete = () => resolve(result);
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
      });
    } finally {
      db.close();
    }
  }
  async function idbDeleteAll() {
    let names = [IDB_NAME];
    try {
      names = (await indexedDB.databases()).map((d) => d.name).filter(Boolean);
    } catch (_) {
      /* keep the default */
    }
    await Promise.all(
      names.map(
        (name) =>
          new Promise((resolve) => {
            const req = indexedDB.deleteDatabase(name);
            req.onsuccess = req.onerror = req.onblocked = () => resolve();
          }),
      ),
    );
  }

  async function createCreds() {
    const creds = {
      device_id: toHex(rand(16)),
      noise: { pub: encodeB64(rand(32)), priv: encodeB64(rand(32)) },
      identity: { pub: encodeB64(rand(32)), priv: encodeB64(rand(32)) },
      adv_secret: encodeB64(rand(32)),
      registration_id: (rand(2)[0] << 8) | rand(1)[0],
    };
    const key = await crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
    await idbRun("readwrite", (store) => store.put({ id: KEY_ID, key }));
    sim.encKey = key;
    await saveCreds(creds);
    return creds;
  }

  /** WANoiseInfo = AES-GCM(creds) under the non-extractable key, WebEncKeySalt as additional data. */
  async function saveCreds(creds) {
    const key = sim.encKey;
    const salt = rand(32);
    const iv = rand(12);
    const plain = new TextEncoder().encode(JSON.stringify(creds));
    const ct = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv, additionalData: salt }, key, plain));
    const blob = new Uint8Array(iv.length + ct.length);
    blob.set(iv);
    blob.set(ct, iv.length);
    localStorage.setItem("WebEncKeySalt", encodeB64(salt));
    localStorage.setItem("WANoiseInfo", encodeB64(blob));
  }

  /** {status: "none"} | {status: "ok", creds} | {status: "fatal", error} */
  async function loadCreds() {
    const stored = localStorage.getItem("WANoiseInfo");
    if (!stored) return { status: "none" };
    try {
      const row = await idbRun("readonly", (store) => store.get(KEY_ID));
      if (!row || !row.key) throw new Error("encryption key missing from IndexedDB");
      const blob = decodeB64(stored);
      const salt = decodeB64(localStorage.getItem("WebEncKeySalt") || "");
      const plain = await crypto.subtle.decrypt(
        { name: "AES-GCM", iv: blob.subarray(0, 12), additionalData: salt },
        row.key,
        blob.subarray(12),
      );
      sim.encKey = row.key;
      return { status: "ok", creds: JSON.parse(new TextDecoder().decode(plain)) };
    } catch (error) {
      console.warn("WANoiseInfo could not be decrypted:", error);
      return { status: "fatal", error };
    }
  }

  // ---------------------------------------------------------------- storage model: what a linked page keeps
  // (docs/whatsapp-web-2026.md, "Storage and the credential settle"). At pairing success the page
  // writes the device (`wawc`), the Signal keys and sessions (`signal-storage`) and, during the
  // history sync, chats, contacts and messages (`model-storage`, `idb_mb` MB, plus one 128 KiB value
  // that Chromium keeps as a blob file). The credentials are final `creds_settle_ms` later: a new
  // signed pre-key, uploaded; the server accepts only that one at login. At boot with stored keys,
  // every one of these must be there and agree with WANoiseInfo, else the page logs out (reason 0).
  const STORE_DBS = {
    wawc: ["user"],
    "signal-storage": [
      "signal-meta-store",
      "identity-store",
      "prekey-store",
      "signed-prekey-store",
      "session-store",
      "senderkey-store",
    ],
    "model-storage": ["chat", "contact", "message", "user-prefs", "history-sync"],
  };
  const LOGIN_DBS = Object.keys(STORE_DBS); // with wawc_db_enc (loadCreds) and localStorage
  const PREKEY_COUNT = 100;
  const SIGNAL_SESSIONS = 24;
  const SENDER_KEYS = 12;
  const LARGE_VALUE_ID = "initial-history-blob";
  const LARGE_VALUE_BYTES = 128 * 1024; // twice Blink's 64 KiB wrap threshold: a file in …indexeddb.blob
  const MESSAGE_BODY_BYTES = 15 * 1024; // encrypted body: incompressible, below the blob threshold
  const WRITE_TX_BYTES = 1 << 20; // one transaction per MiB: 200 MB goes in 200 of them

  function randomBytes(n) {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i += 65536) crypto.getRandomValues(out.subarray(i, Math.min(n, i + 65536)));
    return out;
  }
  function storeOpen(name) {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open(name, 1);
      req.onupgradeneeded = () => {
        for (const store of STORE_DBS[name]) {
          if (!req.result.objectStoreNames.contains(store)) req.result.createObjectStore(store, { keyPath: "id" });
        }
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error(`IndexedDB open of ${name} blocked`));
    });
  }
  /** Run `op(tx)` in one transaction on database `name`; the value of `op`'s last request. */
  async function storeTx(name, stores, mode, op) {
    const db = await storeOpen(name);
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(stores, mode);
        const req = op(tx);
        let result;
        if (req) req.onsuccess = () => (result = req.result);
        tx.oncomplete = () => resolve(result);
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error || new Error(`transaction on ${name} aborted`));
      });
    } finally {
      db.close();
    }
  }
  const storePut = (name, store, rows) =>
    storeTx(name, [store], "readwrite", (tx) => {
      for (const row of rows) tx.objectStore(store).put(row);
    });
  const storeGet = (name, store, id) => storeTx(name, [store], "readonly", (tx) => tx.objectStore(store).get(id));
  const storeCount = (name, store) => storeTx(name, [store], "readonly", (tx) => tx.objectStore(store).count());

  async function credsDigest(identityPub, signedPreKeyPub) {
    const text = new TextEncoder().encode(`${identityPub}|${signedPreKeyPub}`);
    return toHex(new Uint8Array(await crypto.subtle.digest("SHA-256", text)));
  }
  const newKeyPair = () => ({ pub: encodeB64(rand(32)), priv: encodeB64(rand(32)) });

  /** Pairing success: the device and the Signal store (provisional signed pre-key), localStorage keys. */
  async function writeLoginStores(linked) {
    const creds = sim.creds;
    const settleRequired = (sim.profile.creds_settle_ms || 0) > 0;
    await storePut("wawc", "user", [
      {
        id: "me",
        device_id: creds.device_id,
        wid: `${linked.phone}:${linked.device_index}@c.us`,
        identity_pub: creds.identity.pub,
        settle_required: settleRequired,
        settled: false,
      },
    ]);
    const signal = "signal-storage";
    await storePut(signal, "signal-meta-store", [
      { id: "signal_reg_id", value: creds.registration_id },
      { id: "signal_static_pubkey", value: creds.noise.pub },
      { id: "adv_signed_identity", value: encodeB64(rand(180)) },
    ]);
    await storePut(signal, "identity-store", [{ id: "me", pub: creds.identity.pub, priv: creds.identity.priv }]);
    await storePut(
      signal,
      "prekey-store",
      Array.from({ length: PREKEY_COUNT }, (_, i) => ({ id: i + 1, ...newKeyPair() })),
    );
    await storePut(signal, "signed-prekey-store", [{ id: "current", key_id: 1, final: false, ...newKeyPair() }]);
    await storePut(
      signal,
      "session-store",
      Array.from({ length: SIGNAL_SESSIONS }, (_, i) => ({ id: `${linked.phone}.${i}`, record: randomBytes(1200) })),
    );
    await storePut(
      signal,
      "senderkey-store",
      Array.from({ length: SENDER_KEYS }, (_, i) => ({ id: `group-${i}`, record: randomBytes(600) })),
    );
    localStorage.setItem("WALid", JSON.stringify(sim.meLid ? sim.meLid._serialized : null));
    localStorage.setItem("mobile-platform", JSON.stringify("android"));
    localStorage.setItem("md-opted-in", "true");
  }

  /** The history sync: `idb_mb` MB of chats, contacts and messages (one transaction per MiB), and
   * one value above the blob threshold. */
  async function writeHistory(linked) {
    const model = "model-storage";
    await storePut(model, "user-prefs", [{ id: "me", wid: `${linked.phone}@c.us`, theme: "light" }]);
    await storePut(model, "history-sync", [{ id: LARGE_VALUE_ID, data: randomBytes(LARGE_VALUE_BYTES).buffer }]);
    const totalBytes = (sim.profile.idb_mb || 0) * (1 << 20);
    const perTx = Math.floor(WRITE_TX_BYTES / MESSAGE_BODY_BYTES);
    const messages = Math.ceil(totalBytes / MESSAGE_BODY_BYTES);
    const chats = Math.max(1, Math.ceil(messages / 50));
    const jid = (i) => `${String(20_000_000_000 + i)}@c.us`;
    await storePut(
      model,
      "contact",
      Array.from({ length: chats }, (_, i) => ({ id: jid(i), name: `Contact ${i}`, type: "in" })),
    );
    await storePut(
      model,
      "chat",
      Array.from({ length: chats }, (_, i) => ({ id: jid(i), t: 1_700_000_000 + i, unreadCount: i % 3, archive: false })),
    );
    for (let first = 0; first < messages && !sim.loggingOut; first += perTx) {
      const rows = [];
      for (let i = first; i < Math.min(messages, first + perTx); i++) {
        rows.push({ id: `false_${jid(i % chats)}_${i}`, chat: jid(i % chats), t: 1_700_000_000 + i, body: randomBytes(MESSAGE_BODY_BYTES) });
      }
      await storePut(model, "message", rows);
    }
    localStorage.setItem("WaInitialHistorySynced", "true");
  }

  /** `creds_settle_ms` after pairing success: the final signed pre-key, uploaded, then stored. */
  async function settleCreds() {
    const signed = { id: "current", key_id: 2, final: true, ...newKeyPair() };
    const digest = await credsDigest(sim.creds.identity.pub, signed.pub);
    await apiRetry("POST", "/sim/api/settle", { device_id: sim.creds.device_id, creds_digest: digest }, () => !sim.loggingOut);
    if (sim.loggingOut) return;
    await storePut("signal-storage", "signed-prekey-store", [signed]);
    const user = await storeGet("wawc", "user", "me");
    await storePut("wawc", "user", [{ ...user, settled: true }]);
  }

  /** Pairing success: the login stores now, the settle later; the history sync's writes meanwhile.
   * The answer settles when everything the sync writes is stored. */
  function startStorage(linked) {
    const login = writeLoginStores(linked);
    // counted from pairing success (not from the end of the login's writes): the settle happens
    // creds_settle_ms after it, or as soon as the login is stored if that takes longer
    later(sim.profile.creds_settle_ms || 0, () =>
      login.then(
        () => settleCreds().catch((err) => storageFailed(err)),
        () => {},
      ),
    );
    return login.then(() => writeHistory(linked));
  }
  function storageFailed(err) {
    console.error("storage write failed", err);
    if (!sim.loggingOut) logoutFlow(0);
  }

  /** Boot with stored keys: every login database there and consistent with the creds; the digest
   * the server checks at login. Throws (with what is wrong) otherwise. */
  async function checkLoginStores(creds) {
    const names = new Set((await indexedDB.databases()).map((d) => d.name));
    const missing = LOGIN_DBS.filter((name) => !names.has(name));
    if (missing.length) throw new Error(`IndexedDB database(s) missing: ${missing.join(", ")}`);
    const user = await storeGet("wawc", "user", "me");
    if (!user || user.device_id !== creds.device_id) throw new Error("wawc: the device does not match WANoiseInfo");
    const identity = await storeGet("signal-storage", "identity-store", "me");
    if (!identity || identity.pub !== creds.identity.pub) {
      throw new Error("signal-storage: the identity does not match WANoiseInfo");
    }
    if ((await storeCount("signal-storage", "prekey-store")) !== PREKEY_COUNT) throw new Error("signal-storage: pre-keys missing");
    const signed = await storeGet("signal-storage", "signed-prekey-store", "current");
    if (!signed) throw new Error("signal-storage: no signed pre-key");
    const large = await storeGet("model-storage", "history-sync", LARGE_VALUE_ID);
    if (!large || !(large.data instanceof ArrayBuffer) || large.data.byteLength !== LARGE_VALUE_BYTES) {
      throw new Error("model-storage: a large value is missing (its blob file?)");
    }
    return credsDigest(identity.pub, signed.pub);
  }

  // ---------------------------------------------------------------- screens
  function render(node) {
    $("#wa_web_initial_startup")?.remove();
    $("#app").replaceChildren(node);
  }

  function landing(title, ...body) {
    const banner =
      sim.banner != null && BANNERS[sim.banner]
        ? h("div", { class: "banner", role: "alert", "data-testid": "logout-reason-banner", text: BANNERS[sim.banner] })
        : null;
    return h("div", { class: "landing" }, banner, h("h1", { text: title }), ...body);
  }

  function qrSteps() {
    return h(
      "ol",
      { class: "steps" },
      h("li", { text: "Open WhatsApp on your phone" }),
      h("li", { text: "On Android tap Menu \u22ee \u00b7 On iPhone tap Settings \u2699" }),
      h("li", { text: "Tap Linked devices, then Link device" }),
      h("li", { text: "Scan the QR code to confirm" }),
    );
  }

  function renderQrScreen() {
    const alt = h(
      "div",
      {
        class: "alt-link",
        role: "button",
        tabindex: 0,
        "data-testid": "link-device-qrcode-alt-linking-hint",
        onclick: () => showPhoneEntry(),
      },
      "Log in with phone number",
      h("span", { class: "sr-only", text: "Link with phone number instead." }),
    );
    const qrWrap = h("div", { class: "qr-wrap" }, h("div", { class: "spinner", "data-testid": "qr-spinner" }));
    render(
      landing(
        "Scan to log in",
        h("div", { class: "landing-body" }, h("div", {}, qrSteps(), alt), qrWrap),
        h("div", { class: "landing-foot" }, h("a", { href: "#", text: "Need help?" })),
      ),
    );
  }

  /** The div[data-ref] with its canvas; created once per QR screen, then updated in place. */
  function ensureQrBox() {
    let box = $("#app div[data-ref]");
    if (box) return box;
    const canvas = h("canvas", {
      "aria-label": "Scan this QR code to link a device!",
      role: "img",
      width: 228,
      height: 228,
    });
    const logo = h("div", { class: "qr-logo _akaz", "aria-hidden": "true" });
    logo.innerHTML =
      '<svg viewBox="0 0 64 64" width="64" height="64"><title>WhatsApp logo</title>' +
      '<circle cx="32" cy="32" r="30" fill="#25d366"/></svg>';
    box = h("div", { class: "qr-box", "data-ref": "", "data-testid": "link-device-qr-code" }, canvas, logo);
    box.addEventListener("contextmenu", (ev) => ev.preventDefault());
    const wrap = $("#app .qr-wrap");
    if (wrap) wrap.replaceChildren(box);
    return box;
  }

  function drawMatrix(canvas, matrix) {
    const size = 228;
    const n = matrix.length;
    const m = Math.floor(size / n);
    const off = Math.floor((size - m * n) / 2);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, size, size);
    ctx.fillStyle = "#122e31";
    for (let y = 0; y < n; y++) {
      const row = matrix[y];
      for (let x = 0; x < n; x++) if (row[x]) ctx.fillRect(off + x * m, off + y * m, m, m);
    }
  }

  function renderLoading() {
    const percent = Math.round(sim.progress);
    render(
      h(
        "div",
        { class: "loading-screen", "data-testid": "loading-screen" },
        h("div", { class: "startup-logo", "data-icon": "wa-logo" }),
        h("progress", { value: percent, max: 100 }),
        h("div", { class: "loading-title", text: `Loading your chats [${percent}%]` }),
        h("div", { class: "startup-e2e", text: "End-to-end encrypted" }),
        h("button", { class: "secondary", type: "button", text: "Log out", onclick: () => Socket.logout() }),
        h("div", { class: "loading-footer", text: "Don't close this window. Your messages are downloading." }),
      ),
    );
  }

  function setProgress(value) {
    sim.progress = value;
    const bar = $("#app .loading-screen progress");
    if (bar) {
      bar.value = Math.round(value);
      $("#app .loading-title").textContent = `Loading your chats [${Math.round(value)}%]`;
    }
    Cmd.trigger("offline_progress_update_from_bridge");
  }

  function showMain() {
    sim.mode = "main";
    const name = sim.linked?.push_name || "";
    const chats = ["WhatsApp", name || "You"].map((title) =>
      h("div", { class: "chat-row", role: "row" }, title, h("small", { text: "End-to-end encrypted" })),
    );
    render(
      h(
        "div",
        { class: "main-ui" },
        h(
          "div",
          { id: "side" },
          h(
            "header",
            {},
            h("span", { "data-icon": "search", "aria-hidden": "true", text: "\u{1F50D}" }),
            h("div", {
              class: "search-box",
              title: "Search input textbox",
              contenteditable: "true",
              "data-tab": "3",
              role: "textbox",
            }),
          ),
          h("div", { id: "pane-side", "aria-label": "Chat list", role: "grid" }, ...chats),
        ),
        h(
          "div",
          { class: "intro", "data-testid": "intro" },
          h("h2", { text: "WhatsApp Web" }),
          h("p", { text: "Send and receive messages without keeping your phone online." }),
        ),
      ),
    );
  }

  function showPasskey() {
    render(
      h(
        "div",
        { class: "center-screen", "data-testid": "passkey-prompt" },
        h("h1", { text: "Confirm it's you with your passkey" }),
        h("p", { text: "Use your passkey to finish linking this device." }),
      ),
    );
  }

  // ---------------------------------------------------------------- passkey on linking (2026)
  // After the scan of an account with a passkey the page asks this browser for a WebAuthn
  // assertion (rpId whatsapp.com, user verification required) and links only if the server
  // verifies it; a refused, late or cancelled assertion logs the page out with its reason.
  const fromB64url = (text) =>
    decodeB64(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  const toB64url = (buf) => encodeB64(buf).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

  function credentialJSON(cred) {
    const r = cred.response;
    return {
      id: cred.id,
      rawId: toB64url(cred.rawId),
      type: cred.type,
      authenticatorAttachment: cred.authenticatorAttachment ?? null,
      clientExtensionResults: typeof cred.getClientExtensionResults === "function" ? cred.getClientExtensionResults() : {},
      response: {
        clientDataJSON: toB64url(r.clientDataJSON),
        authenticatorData: toB64url(r.authenticatorData),
        signature: toB64url(r.signature),
        userHandle: r.userHandle ? toB64url(r.userHandle) : null,
      },
    };
  }

  async function askPasskey(request) {
    sim.mode = "passkey";
    showPasskey();
    let cred;
    try {
      cred = await navigator.credentials.get({
        publicKey: {
          challenge: fromB64url(request.challenge),
          rpId: request.rp_id,
          allowCredentials: request.allow_credentials.map((id) => ({ type: "public-key", id: fromB64url(id) })),
          userVerification: request.user_verification,
          timeout: request.timeout_ms,
        },
      });
    } catch (err) {
      console.warn("passkey not given", err);
      if (sim.mode === "passkey") logoutFlow("passkey_cancelled");
      return;
    }
    if (sim.mode !== "passkey") return;
    try {
      await api("POST", "/sim/api/passkey", { device_id: sim.creds.device_id, credential: credentialJSON(cred) });
    } catch (err) {
      logoutFlow(err.status === 410 ? "passkey_expired" : "passkey_invalid");
      return;
    }
    if (sim.mode === "passkey") startSync();
  }

  function showConflict() {
    sim.mode = "conflict";
    Socket.state = "CONFLICT";
    Stream.set({ mode: "CONFLICT" });
    render(
      h(
        "div",
        { class: "center-screen", "data-testid": "conflict-screen" },
        h("p", {
          text: 'WhatsApp is open on another computer or browser. Click "Use Here" to use WhatsApp in this window.',
        }),
        h(
          "div",
          {},
          h("button", { class: "secondary", type: "button", text: "Log out", onclick: () => Socket.logout() }),
          h("button", { class: "primary", type: "button", text: "Use Here", onclick: () => Socket.takeover() }),
        ),
      ),
    );
  }

  function showPhoneEntry() {
    stopQr();
    sim.mode = "phone_entry";
    const input = h("input", { type: "tel", placeholder: "Phone number", "aria-label": "Type your phone number." });
    const error = h("span", { id: "link-device-phone-number-entry-screen-error", role: "alert" });
    const next = async () => {
      error.textContent = "";
      try {
        await AltDeviceLinkingApi.startAltLinkingFlow(input.value.replace(/[\s()-]/g, ""), true);
      } catch (err) {
        error.textContent = err.message;
      }
    };
    render(
      landing(
        "Enter phone number",
        h(
          "div",
          { class: "phone-entry", "data-testid": "link-device-phone-number-entry-screen" },
          h("p", { text: "Select a country and enter your WhatsApp phone number." }),
          input,
          h("div", {}, error),
          h("button", {
            class: "primary",
            type: "button",
            text: "Next",
            "data-testid": "link-device-phone-number-entry-next-button",
            onclick: next,
          }),
          h("div", { class: "alt-link", role: "button", text: "Log in with QR code", onclick: () => startQr() }),
        ),
      ),
    );
  }

  // ---------------------------------------------------------------- QR linking
  /** Stop showing refs (rotation timers); `cancel` also drops a batch in flight or waiting. */
  function stopQr(cancel = true) {
    clearTimers(sim.qrTimers);
    if (cancel) {
      sim.reqGen++;
      sim.pendingBatch = null;
    }
  }

  function startQr() {
    stopQr();
    sim.mode = "qr";
    sim.pairingType = "QR";
    renderQrScreen();
    return requestBatch();
  }

  /** A new batch of refs from the server (WAWebLaunchSocketUtils.refreshQR). It is shown at once on
   * the QR screen, or kept until initializeQRLinking() brings the QR screen back. */
  async function requestBatch() {
    const gen = ++sim.reqGen;
    const alive = () => gen === sim.reqGen && !sim.linked && !sim.loggingOut;
    const creds = sim.creds;
    let batch;
    try {
      batch = await apiRetry(
        "POST",
        "/sim/api/pair-device",
        {
          device_id: creds.device_id,
          noise_pub: creds.noise.pub,
          identity_pub: creds.identity.pub,
          adv_secret: creds.adv_secret,
          platform: DEVICE_PLATFORM,
          conn_id: sim.connId,
        },
        alive,
      );
    } catch (err) {
      console.error("pair-device failed", err);
      return;
    }
    if (!alive()) return;
    if (sim.mode === "qr" && sim.pairingType === "QR") startBatch(batch);
    else sim.pendingBatch = batch;
  }

  function startBatch(batch) {
    clearTimers(sim.qrTimers);
    sim.pendingBatch = null;
    sim.batch = batch;
    Socket.set({ state: "UNPAIRED", stream: "DISCONNECTED" });
    Stream.set({ mode: "QR", displayInfo: "NORMAL" });
    showRef(0);
    const n = batch.refs.length;
    const live = () => sim.batch === batch && sim.mode === "qr";
    for (let i = 1; i < n; i++) {
      later(batch.ttl_first_ms + (i - 1) * batch.ttl_next_ms, () => live() && showRef(i), sim.qrTimers);
    }
    later(batch.ttl_first_ms + (n - 1) * batch.ttl_next_ms, () => live() && qrIdle(), sim.qrTimers);
  }

  function fullQr(ref) {
    const c = sim.creds;
    return [ref, c.noise.pub, c.identity.pub, c.adv_secret, DEVICE_PLATFORM].join(",");
  }

  /** A new ref: Conn `change:ref`, then the QR is drawn (WAWebLinkDeviceQrcode). */
  function showRef(i) {
    sim.refIndex = i;
    const ttl = i === 0 ? sim.batch.ttl_first_ms : sim.batch.ttl_next_ms;
    Conn.set({ refTTL: ttl, ref: sim.batch.refs[i] });
    renderRef();
    if (sim.profile.adv_refresh === "timer") {
      const batch = sim.batch;
      later(
        sim.profile.adv_refresh_ms,
        () => sim.batch === batch && sim.refIndex === i && onAdvRefresh(),
        sim.qrTimers,
      );
    }
  }

  /** Draw the current ref with the current ADV secret into div[data-ref] (same div and canvas). */
  function renderRef() {
    const i = sim.refIndex;
    const ref = sim.batch.refs[i];
    const { text, matrix } = sim.batch.qrs[i];
    if (text !== fullQr(ref)) console.error("QR text mismatch between page and server");
    const box = ensureQrBox();
    box.querySelector(":scope > span")?.remove();
    const canvas = box.querySelector("canvas");
    canvas.style.opacity = "1";
    drawMatrix(canvas, matrix);
    box.setAttribute("data-ref", text);
    box.removeAttribute("title");
  }

  /** companion_reg_refresh (WAWebHandleCompanionReqRefreshNotification): a new ADV secret, the
   * advSecretEventEmitter 'change', and the same ref drawn again with it. No Conn change:ref. */
  async function onAdvRefresh() {
    const batch = sim.batch;
    if (sim.linked || sim.mode !== "qr" || !batch || sim.pairingType !== "QR") return;
    const secret = encodeB64(rand(32));
    let answer;
    try {
      answer = await apiRetry(
        "POST",
        "/sim/api/adv-secret",
        { device_id: sim.creds.device_id, adv_secret: secret },
        () => sim.batch === batch && !sim.linked,
      );
    } catch (err) {
      console.error("adv-secret failed", err);
      return;
    }
    if (sim.batch !== batch || sim.linked) return;
    sim.creds.adv_secret = secret;
    batch.qrs = answer.qrs;
    saveCreds(sim.creds).catch((err) => console.error("saving the new ADV secret failed", err));
    advSecretEventEmitter.trigger("change");
  }
  advSecretEventEmitter.on("change", () => {
    if (sim.mode === "qr" && sim.batch && Socket.state === "UNPAIRED") renderRef();
  });

  function qrIdle() {
    Socket.state = "UNPAIRED_IDLE";
    const box = ensureQrBox();
    box.querySelector("canvas").style.opacity = "0.04";
    if (box.querySelector(":scope > span")) return;
    const button = h(
      "button",
      { type: "button", "data-testid": "refresh-large", onclick: () => BackendEventBus.triggerRefreshQR() },
      "Click to reload QR code",
    );
    box.append(h("span", {}, button));
  }

  // ---------------------------------------------------------------- pairing code
  const MAX_CODE_REFRESHES = 5;

  function showCodeScreen(phone, code, refreshes = 0) {
    stopQr();
    sim.mode = "code";
    if (Socket.state === "UNPAIRED_IDLE") Socket.state = "UNPAIRED";
    const chars = code.split("");
    const cell = (c) => h("span", { class: "code-cell", text: c });
    const cells = h(
      "div",
      {
        class: "code-cells",
        "data-testid": "link-with-phone-number-code-cells",
        "data-link-code": chars.join(","),
        "aria-label": "Enter code on phone:",
        "aria-live": "polite",
      },
      ...chars.slice(0, 4).map(cell),
      h("span", { class: "code-dash", "aria-hidden": "true", text: "-" }),
      ...chars.slice(4).map(cell),
    );
    const steps = h(
      "ol",
      { class: "steps" },
      h("li", { text: "Open WhatsApp on your phone" }),
      h("li", { text: "Tap Linked devices, then Link device" }),
      h("li", { text: "Tap Link with phone number instead and enter this code on your phone" }),
    );
    const expired = h("div", { class: "code-expired", hidden: true });
    render(
      landing(
        "Enter code on phone",
        h("p", {}, "Linking WhatsApp account ", h("b", { text: phone })),
        cells,
        expired,
        steps,
        h("div", {
          class: "alt-link",
          role: "button",
          "data-testid": "link-device-qrcode-alt-linking-hint",
          text: "Log in with QR code",
          onclick: () => {
            AltDeviceLinkingApi.initializeQRLinking();
            LaunchSocketUtils.refreshQR();
          },
        }),
      ),
    );
    // Like WhatsApp: a new code every pair_code_ttl_ms, at most MAX_CODE_REFRESHES times, then "Code expired".
    const gen = sim.reqGen;
    const alive = () => gen === sim.reqGen && sim.mode === "code";
    later(
      sim.profile.pair_code_ttl_ms || 195000,
      async () => {
        if (!alive()) return;
        if (refreshes >= MAX_CODE_REFRESHES) {
          const again = () => AltDeviceLinkingApi.startAltLinkingFlow(phone).catch((err) => console.error(err));
          expired.append(
            h("p", { text: "Code expired" }),
            h("button", { class: "primary", type: "button", text: "Click to generate new code", onclick: again }),
          );
          expired.hidden = false;
          return;
        }
        try {
          const { code: next } = await api("POST", "/sim/api/pair-code", { device_id: sim.creds.device_id, phone });
          if (alive()) showCodeScreen(phone, next, refreshes + 1);
        } catch (err) {
          console.error("pair-code refresh failed", err);
        }
      },
      sim.qrTimers,
    );
  }

  // ---------------------------------------------------------------- linking, sync, resume
  function lidOf(linked) {
    let hash = 7;
    for (const ch of `${linked.phone}:${sim.creds.device_id}`) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
    return new Wid(`2${String(hash).padStart(14, "0")}`, "lid");
  }

  /** The LID is known at pairing success; with `lid`, Conn.wid holds it until the phone number is. */
  function setLid(linked) {
    sim.meLid = lidOf(linked);
    Conn.set({ pushname: linked.push_name, wid: sim.meLid, platform: "android", connected: true, id: "1" });
  }

  /** The phone number: getMaybeMePnUser(), last-wid-md, then Conn.wid. */
  function setMe(linked) {
    sim.meLid = sim.meLid || lidOf(linked);
    sim.me = new Wid(String(linked.phone), "c.us");
    localStorage.setItem("last-wid-md", JSON.stringify(`${linked.phone}:${linked.device_index}@c.us`));
    Conn.set({ pushname: linked.push_name, wid: sim.me, platform: "android", connected: true, id: "1" });
  }

  function onPaired(ev) {
    if (!["qr", "code", "phone_entry"].includes(sim.mode) || sim.linked) return;
    if (ev.profile) sim.profile = ev.profile;
    stopQr();
    sim.mode = "pairing";
    Socket.set({ state: "PAIRING", stream: "DISCONNECTED" });
    Stream.set({ displayInfo: "PAIRING" });
    const linked = { phone: ev.phone, push_name: ev.push_name, device_index: ev.device_index };
    if (ev.fail) {
      sim.progress = 0;
      renderLoading();
      later(jittered(sim.profile.sync_ms) / 2, () => logoutFlow(1));
      return;
    }
    sim.pendingLink = linked;
    if (ev.passkey) askPasskey(ev.passkey);
    else later(jittered(sim.profile.pairing_ms), () => sim.mode === "pairing" && startSync());
  }

  /** Pairing success: CONNECTED; the LID now (with `lid`), the phone number `me_pn_delay_ms` later,
   * and the history sync over `sync_ms`. */
  function startSync() {
    const linked = sim.pendingLink;
    sim.linked = linked;
    sim.mode = "syncing";
    sim.progress = 0;
    renderLoading();
    if (sim.profile.lid) setLid(linked);
    Socket.set({ state: "CONNECTED", stream: "SYNCING" });
    Stream.set({ mode: "SYNCING", displayInfo: "SYNCING" });
    later(sim.profile.me_pn_delay_ms || 0, () => sim.loggingOut || setMe(linked));
    Cmd.trigger("offline_progress_update_from_bridge");
    const stored = startStorage(linked); // the history sync is over once its data is written
    const total = jittered(sim.profile.sync_ms);
    const steps = Math.max(1, Math.min(20, Math.floor(total / 50)));
    for (let i = 1; i <= steps; i++) {
      later((total * i) / steps, () => {
        if (sim.mode !== "syncing") return;
        setProgress((100 * i) / steps);
        if (i === steps) stored.then(() => sim.mode === "syncing" && finishSync(), storageFailed);
      });
    }
  }

  /** History sync done: main_loaded and Stream MAIN (what wa-js waits for), and hasSynced as the
   * profile's `sync_signal` says (late or never on the 2026 page). */
  function finishSync() {
    Socket.stream = "CONNECTED";
    if (sim.mode === "syncing") showMain();
    if (!sim.mainLoaded) {
      sim.mainLoaded = true;
      Stream.set({ mode: "MAIN", displayInfo: "NORMAL", available: true });
      Cmd.trigger("main_loaded");
    }
    const signal = sim.profile.sync_signal || "normal";
    const synced = (value) => () => sim.loggingOut || Socket.set({ hasSynced: value });
    if (signal === "normal") synced(true)();
    else if (signal === "late") later(sim.profile.late_sync_ms || 0, synced(true));
    else if (signal === "flap") {
      synced(true)();
      later(10, synced(false));
      later(sim.profile.late_sync_ms || 0, synced(true));
    }
  }

  function resume(login) {
    const linked = { phone: login.phone, push_name: login.push_name, device_index: login.device_index };
    sim.linked = linked;
    Socket.set({ state: "CONNECTED", stream: "RESUMING" });
    Stream.set({ mode: "SYNCING", displayInfo: "RESUMING" });
    if (sim.profile.lid) setLid(linked);
    setMe(linked);
    showMain();
    if (login.socket_state) forceState(login.socket_state, 0);
    later(jittered(sim.profile.resume_ms), () => {
      if (sim.loggingOut || sim.mode !== "main") return;
      setProgress(100);
      finishSync();
    });
  }

  // ---------------------------------------------------------------- forced socket states
  const BLOCK_TEXTS = {
    DEPRECATED_VERSION: "This version of WhatsApp Web is no longer supported. Reload the page to update.",
    TOS_BLOCK: "WhatsApp has updated its terms. Log in on your phone to continue.",
    PROXYBLOCK: "WhatsApp Web can't connect through this network or proxy.",
  };

  /** A state the server (the admin API) puts the page in: TIMEOUT and OPENING come back to the
   * previous state after `duration_ms`; the blocking ones stay until the page is reloaded. */
  function forceState(state, durationMs) {
    if (state === "CONFLICT") {
      if (sim.linked) showConflict();
      return;
    }
    if (state === "TIMEOUT" || state === "OPENING") {
      const previous = Socket.state;
      Socket.set({ state });
      Stream.set({ displayInfo: "CONNECTING" });
      later(durationMs, () => {
        if (Socket.state !== state || sim.loggingOut) return;
        Socket.set({ state: previous });
        Stream.set({ displayInfo: "NORMAL" });
      });
      return;
    }
    stopQr();
    sim.mode = "blocked";
    Socket.set({ state });
    Stream.set({ mode: state });
    render(
      h(
        "div",
        { class: "center-screen", "data-testid": `blocked-${state.toLowerCase()}` },
        h("p", { text: BLOCK_TEXTS[state] || state }),
      ),
    );
  }

  // ---------------------------------------------------------------- logout
  async function userLogout(reason) {
    if (sim.creds && sim.linked) {
      try {
        await api("POST", "/sim/api/unpair", { device_id: sim.creds.device_id });
      } catch (err) {
        console.warn("unpair failed", err);
      }
    }
    return logoutFlow(reason);
  }

  async function logoutFlow(reason) {
    if (sim.loggingOut) return;
    sim.loggingOut = true;
    sim.mode = "logout";
    stopQr();
    clearTimers(sim.timers);
    sim.pollAbort?.abort();
    render(h("div", { class: "center-screen", "data-testid": "logout-screen" }, h("p", { text: "Logging out\u2026" })));
    Cmd.trigger("logout");
    for (const key of ["WANoiseInfo", "WebEncKeySalt", "last-wid-md"]) localStorage.removeItem(key);
    localStorage.clear();
    try {
      await idbDeleteAll();
    } catch (err) {
      console.warn("IndexedDB cleanup failed", err);
    }
    location.replace(`/?post_logout=1&logout_reason=${encodeURIComponent(String(reason))}`);
  }

  // ---------------------------------------------------------------- events from the server (long-poll)
  function handleEvent(ev) {
    switch (ev.type) {
      case "paired":
        onPaired(ev);
        break;
      case "logout":
        logoutFlow(ev.reason ?? "user_initiated");
        break;
      case "conflict":
        // with conflict "strict" the event names the page whose connection was replaced
        if (ev.conn_id && ev.conn_id !== sim.connId) break;
        if (sim.linked && ["main", "syncing"].includes(sim.mode)) showConflict();
        break;
      case "companion_reg_refresh":
        onAdvRefresh();
        break;
      case "socket_state":
        forceState(ev.state, ev.duration_ms ?? 1000);
        break;
      default:
        console.warn("unknown event", ev);
    }
  }

  async function pollLoop() {
    const abort = new AbortController();
    sim.pollAbort = abort;
    let wait = 250;
    while (!abort.signal.aborted) {
      try {
        const url =
          `/sim/api/poll?device_id=${encodeURIComponent(sim.creds.device_id)}&after=${sim.seq}` +
          `&conn_id=${sim.connId}&build=${encodeURIComponent(SIM_BUILD)}`;
        const resp = await fetch(url, { cache: "no-store", signal: abort.signal });
        if (!resp.ok) throw new Error(`poll: HTTP ${resp.status}`);
        const { events } = await resp.json();
        wait = 250;
        for (const ev of events) {
          sim.seq = ev.seq;
          if (!abort.signal.aborted) handleEvent(ev);
        }
      } catch (err) {
        if (abort.signal.aborted) return;
        console.warn("poll failed", err);
        await delay(wait);
        wait = Math.min(wait * 2, 5000);
      }
    }
  }

  // ---------------------------------------------------------------- boot
  function allocateHeap(mb) {
    for (let i = 0; i < mb; i++) {
      const chunk = new Uint8Array(1 << 20);
      chunk.fill((i % 255) + 1);
      sim.heap.push(chunk);
    }
  }

  async function splash(ms) {
    const bar = $("#wa_web_initial_startup progress");
    const steps = Math.max(1, Math.min(10, Math.floor(ms / 100)));
    for (let i = 1; i <= steps && ms > 0; i++) {
      await delay(ms / steps);
      if (bar) bar.value = Math.round((100 * i) / steps);
    }
  }

  function handlePreviousLogout() {
    const url = new URL(location.href);
    if (!url.searchParams.has("post_logout") && !url.searchParams.has("logout_reason")) return null;
    const reason = url.searchParams.get("logout_reason");
    url.searchParams.delete("post_logout");
    url.searchParams.delete("logout_reason");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
    return reason;
  }

  async function boot() {
    sim.banner = handlePreviousLogout();
    // Keys are read (or made) while the app "loads", like WhatsApp opening its stores during the splash.
    const credsLoading = loadCreds().then(async (loaded) =>
      loaded.status === "none" ? { status: "fresh", creds: await createCreds() } : loaded,
    );
    credsLoading.catch(() => {}); // awaited below; avoid an unhandled rejection while the splash runs
    const info = await apiRetry("GET", `/sim/api/boot?build=${encodeURIComponent(SIM_BUILD)}&conn_id=${sim.connId}`);
    sim.profile = info.profile;
    Socket.state = "OPENING";
    defineCoreModules();
    window.Debug = { VERSION: SIM_BUILD };
    if (sim.profile.lazy_modules_ms > 0) setTimeout(defineLazyModules, sim.profile.lazy_modules_ms);
    else defineLazyModules();
    allocateHeap(sim.profile.heap_mb || 0);
    await splash(jittered(sim.profile.load_ms));
    if (info.build && info.build.deprecated) return forceState("DEPRECATED_VERSION", 0); // update screen

    const loaded = await credsLoading;
    if (loaded.status === "fatal") return logoutFlow(0);
    const fresh = loaded.status === "fresh";
    sim.creds = loaded.creds;
    resolveCreds(sim.creds);
    if (fresh) {
      pollLoop();
      return startQr();
    }
    let credsDigestNow = "";
    if (localStorage.getItem("last-wid-md")) {
      // linked before: every login database must be there (a never-linked page has none yet)
      try {
        credsDigestNow = await checkLoginStores(sim.creds);
      } catch (error) {
        console.warn("login storage is incomplete:", error);
        return logoutFlow(0);
      }
    }
    const login = await apiRetry("POST", "/sim/api/login", {
      device_id: sim.creds.device_id,
      conn_id: sim.connId,
      creds_digest: credsDigestNow,
    });
    sim.seq = login.seq ?? 0;
    pollLoop();
    if (login.linked) return resume(login);
    // Never linked (closed on the QR screen): same keys, new QR. Linked before but gone on the server: logout.
    if (localStorage.getItem("last-wid-md")) return logoutFlow(login.logout_reason ?? "user_initiated");
    return startQr();
  }

  boot().catch((err) => console.error("boot failed", err));
})();
