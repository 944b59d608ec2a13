// The walink deployments this extension may talk to (origins, exact). A passkey link naming any
// other server is refused: the assertion signs in to the user's WhatsApp account, so it must only
// ever go to the service the user meant. A SaaS that ships the extension puts its own walink URL
// here and in manifest.json "host_permissions" (see README.md).
self.WALINK_ALLOWED_ORIGINS = ["http://127.0.0.1:8080", "http://localhost:8080"];
