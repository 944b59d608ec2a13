-- walink schema v1: workspaces and hashed API keys, linked accounts (the seed's whatsapp_accounts),
-- encrypted profile snapshots, the event outbox and its delivery log.

CREATE TABLE workspaces (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    webhook_url     text,
    -- HMAC secret for X-Walink-Signature; it must be readable to sign, unlike API keys
    webhook_secret  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    key_hash      bytea PRIMARY KEY,            -- sha256 of the key; the key itself is never stored
    prefix        text NOT NULL,                -- first characters, to recognise a key in lists
    workspace_id  text REFERENCES workspaces (id) ON DELETE CASCADE,
    is_admin      boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CHECK (is_admin OR workspace_id IS NOT NULL)
);

CREATE TABLE whatsapp_accounts (
    id              text PRIMARY KEY,           -- the session id
    workspace_id    text NOT NULL REFERENCES workspaces (id),
    status          text NOT NULL DEFAULT 'pending',   -- the seed's account status: pending|connected|disconnected|failed
    session_status  text NOT NULL DEFAULT 'starting',  -- walink's session state machine
    reason          text NOT NULL DEFAULT 'created',
    phone_number    text,
    push_name       text,
    is_primary      boolean NOT NULL DEFAULT false,
    label           text,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    webhook_url     text,
    history         jsonb NOT NULL DEFAULT '[]'::jsonb,
    timings         jsonb NOT NULL DEFAULT '{}'::jsonb,
    profile_id      text,
    owner           text,                       -- the worker driving it
    fencing_token   bigint NOT NULL DEFAULT 0,  -- the owner's lease token; older tokens are refused
    last_seq        bigint NOT NULL DEFAULT 0,  -- per-session event sequence
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);

-- a workspace never has two live accounts with the same phone, nor two primaries
CREATE UNIQUE INDEX whatsapp_accounts_live_phone
    ON whatsapp_accounts (workspace_id, phone_number)
    WHERE deleted_at IS NULL AND phone_number IS NOT NULL;
CREATE UNIQUE INDEX whatsapp_accounts_one_primary
    ON whatsapp_accounts (workspace_id)
    WHERE is_primary AND deleted_at IS NULL;
-- the seed's cleanup index
CREATE INDEX idx_cleanup ON whatsapp_accounts (workspace_id, phone_number, deleted_at);
CREATE INDEX whatsapp_accounts_owner ON whatsapp_accounts (owner) WHERE deleted_at IS NULL;

CREATE TABLE profile_snapshots (
    session_id     text PRIMARY KEY REFERENCES whatsapp_accounts (id) ON DELETE CASCADE,
    blob           bytea NOT NULL,              -- AES-GCM encrypted, compressed WhatsApp-origin storage
    size_bytes     integer NOT NULL,
    fencing_token  bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE outbox (
    id               bigserial PRIMARY KEY,     -- global order: GET /v1/events?after=<id>
    event_id         uuid NOT NULL UNIQUE,
    workspace_id     text NOT NULL,
    session_id       text NOT NULL,
    seq              bigint NOT NULL,
    type             text NOT NULL,
    payload          jsonb NOT NULL,            -- the webhook body, exactly as delivered
    webhook_url      text,                      -- resolved when written; NULL: nothing to deliver
    state            text NOT NULL DEFAULT 'pending',  -- pending|delivered|dead|skipped
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    claimed_by       text,
    claimed_until    timestamptz,
    delivered_at     timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, seq)
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_session_pending ON outbox (session_id, seq) WHERE state = 'pending';
CREATE INDEX outbox_workspace ON outbox (workspace_id, id);

CREATE TABLE delivery_attempts (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL REFERENCES outbox (event_id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    worker       text,
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id, attempt);
