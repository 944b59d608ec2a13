-- The event feed's cursor (outbox.id, GET /v1/events?after=) in commit order, so a poller never
-- passes an id whose transaction commits later (issue 10, item 11).
--
-- Every insert into the outbox takes one transaction-scoped advisory lock before its id is drawn,
-- and holds it until its transaction ends. A transaction that draws ids after another has drawn
-- its own must wait until that one has committed (or rolled back), so ids become visible in
-- increasing order: once a reader sees id N, every id below N that will ever exist is visible
-- too. PostgreSQL already serialises the commits of transactions that NOTIFY (walink's event
-- writers do), so the extra wait is the few statements between an event's insert and its commit.
-- The trigger, not the callers, draws the id: no writer (tools, tests, a future code path) can
-- bypass the order. The lock's key is the 64-bit hash of 'walink.outbox.feed'.

CREATE FUNCTION walink_outbox_commit_ordered_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('walink.outbox.feed', 0));
    NEW.id := nextval(pg_get_serial_sequence('outbox', 'id'));
    RETURN NEW;
END
$$;

-- the trigger draws every id (an id from the column default would be drawn before the lock)
ALTER TABLE outbox ALTER COLUMN id DROP DEFAULT;

CREATE TRIGGER outbox_commit_ordered_id
    BEFORE INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION walink_outbox_commit_ordered_id();

-- Retention (issue 10, item 16): delivered and skipped outbox rows go after WALINK_OUTBOX_RETENTION_S;
-- a deleted session's phone number (and push name, LID) leaves its events and its account row
-- WALINK_DELETED_PHONE_RETENTION_S after the delete, once none of its events is still pending.
ALTER TABLE whatsapp_accounts ADD COLUMN phone_purged_at timestamptz;
CREATE INDEX whatsapp_accounts_phone_purge ON whatsapp_accounts (deleted_at)
    WHERE deleted_at IS NOT NULL AND phone_purged_at IS NULL;
CREATE INDEX outbox_finished ON outbox ((coalesce(delivered_at, created_at)))
    WHERE state IN ('delivered', 'skipped');
