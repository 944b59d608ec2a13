-- Webhook configuration a tenant controls (issue 10, items 1, 7, 17):
-- a rotated secret keeps signing for an overlap window next to the new one, and each session may
-- name the event types its webhook receives (NULL: all of them; GET /v1/events still lists all).
ALTER TABLE workspaces ADD COLUMN webhook_secret_previous text;
ALTER TABLE workspaces ADD COLUMN webhook_secret_previous_until timestamptz;
ALTER TABLE workspaces ADD COLUMN webhook_secret_rotated_at timestamptz;
ALTER TABLE whatsapp_accounts ADD COLUMN webhook_events text[];
