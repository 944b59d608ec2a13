-- The account's LID (WhatsApp's "…@lid" user id) is kept apart from its phone number, and the
-- history sync is reported on its own: a session is ready once the phone is known, synced later.
ALTER TABLE whatsapp_accounts ADD COLUMN lid text;
ALTER TABLE whatsapp_accounts ADD COLUMN synced boolean NOT NULL DEFAULT false;
