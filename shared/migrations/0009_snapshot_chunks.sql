-- Large snapshots in chunks (docs/durability.md, "Where snapshots live"): profile_snapshots.blob
-- holds the first chunk (with the header `walink rekey` reads), profile_snapshot_chunks the rest,
-- in order. Snapshots are compressed and encrypted: Postgres must not try to compress them again.
ALTER TABLE profile_snapshots ADD COLUMN chunks integer NOT NULL DEFAULT 0 CHECK (chunks >= 0);
ALTER TABLE profile_snapshots ALTER COLUMN blob SET STORAGE EXTERNAL;

CREATE TABLE profile_snapshot_chunks (
    session_id  text NOT NULL REFERENCES profile_snapshots (session_id) ON DELETE CASCADE,
    seq         integer NOT NULL CHECK (seq >= 1),
    data        bytea NOT NULL,
    PRIMARY KEY (session_id, seq)
);
ALTER TABLE profile_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
