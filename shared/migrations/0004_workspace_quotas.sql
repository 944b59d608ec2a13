-- Per-workspace quota overrides (docs/limits.md): NULL keeps the cluster's default (WALINK_QUOTA_*).
CREATE TABLE workspace_quotas (
    workspace_id        text PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    sessions            integer CHECK (sessions >= 0),
    linkings            integer CHECK (linkings >= 0),
    creates_per_minute  integer CHECK (creates_per_minute >= 0),
    create_burst        integer CHECK (create_burst >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- the quota's count of a workspace's live and linking sessions, at every create
CREATE INDEX whatsapp_accounts_workspace_live
    ON whatsapp_accounts (workspace_id, session_status)
    WHERE deleted_at IS NULL;
