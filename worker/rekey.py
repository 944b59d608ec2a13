"""``walink rekey``: seal every stored snapshot again with the first snapshot key.

A key rotation (docs/snapshot-keys.md) gives every worker ``WALINK_SNAPSHOT_KEYS=new,old``; from
then on new snapshots are sealed with the new key, and this command re-seals the stored ones so
the old key can be dropped. It runs beside live workers:

* it reads the snapshots not yet sealed with the first key (their header says so), in batches of
  ``batch_size`` in ``session_id`` order, and never holds a transaction across a batch;
* it opens each with any of the keys and seals the same payload (the compressed profile) with the
  first key — the profile itself is never unpacked;
* it writes a re-sealed snapshot only over the very snapshot it read (same ``fencing_token``,
  same first chunk, which holds the snapshot's random nonce; all its chunks in one transaction):
  a snapshot a worker stored meanwhile is newer, and is never overwritten;
* run again, it finds nothing left to do (idempotent); a snapshot none of the keys opens is left
  untouched and counted, and the command then exits 1.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from shared import snapshot_store
from shared.errors import SnapshotInvalid, SnapshotKeyUnknown
from worker import snapshot
from worker.snapshot import SnapshotKeys

DEFAULT_BATCH_SIZE = 50

# rows whose header is not the first key's v2 header, after a cursor, in key order
_TODO_SQL = """
SELECT session_id, sha256(blob) AS head, fencing_token FROM profile_snapshots
WHERE substring(blob FROM 1 FOR $1) IS DISTINCT FROM $2 AND session_id > $3
ORDER BY session_id LIMIT $4
"""
_TODO_COUNT_SQL = (
    "SELECT count(*) FROM profile_snapshots WHERE substring(blob FROM 1 FOR $1) IS DISTINCT FROM $2"
)
# only over the snapshot as it was read: a newer one (another token; another first chunk, which
# holds the snapshot's random nonce) stays
_LOCK_SQL = """
SELECT 1 FROM profile_snapshots WHERE session_id = $1 AND fencing_token = $2 AND sha256(blob) = $3
FOR UPDATE
"""


@dataclass(slots=True)
class RekeyReport:
    to_do: int = 0  # snapshots not on the first key when the run started
    checked: int = 0
    resealed: int = 0
    changed_meanwhile: int = 0  # a worker stored a newer snapshot first: left as it is
    unknown_key: int = 0  # none of the keys opens it: left untouched
    invalid: int = 0  # not a snapshot of its session (altered?): left untouched
    remaining: int = 0  # not on the first key when the run ended (0: the old keys can go)

    @property
    def ok(self) -> bool:
        return self.remaining == 0

    def line(self) -> str:
        return (
            f"rekey: {self.checked}/{self.to_do} checked, {self.resealed} re-sealed, "
            f"{self.changed_meanwhile} changed meanwhile, {self.unknown_key} with an unknown key, "
            f"{self.invalid} invalid"
        )

    def summary(self) -> str:
        if self.ok:
            return self.line() + "; every snapshot is on the first key (the other keys can go)"
        return (
            self.line()
            + f"; {self.remaining} still on another key"
            + (
                " (a worker sealed them with an older key: is every worker on the new keys?)"
                if self.changed_meanwhile
                else ""
            )
        )


def _reseal(blob: bytes, keys: SnapshotKeys, session_id: str) -> bytes:
    payload = snapshot.open_sealed(blob, key=keys, session_id=session_id)
    return snapshot.seal(payload, key=keys.primary, session_id=session_id)


async def rekey(
    pool: asyncpg.Pool,
    keys: SnapshotKeys,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = None,
) -> RekeyReport:
    """Re-seal every snapshot not sealed with ``keys.primary``; ``progress`` hears a line per batch."""
    header = snapshot.MAGIC + snapshot.key_id(keys.primary)
    report = RekeyReport()
    report.to_do = int(await pool.fetchval(_TODO_COUNT_SQL, len(header), header, timeout=timeout_s))
    cursor = ""
    while True:
        rows = await pool.fetch(_TODO_SQL, len(header), header, cursor, batch_size, timeout=timeout_s)
        if not rows:
            break
        cursor = rows[-1]["session_id"]
        for row in rows:
            report.checked += 1
            sid, head, token = row["session_id"], bytes(row["head"]), row["fencing_token"]
            async with pool.acquire(timeout=timeout_s) as conn:
                # a snapshot is read whole here (the command's memory, not a worker's)
                blob = await asyncio.wait_for(snapshot_store.get_bytes(conn, sid), timeout_s)
                if blob is None or hashlib.sha256(blob[: snapshot_store.CHUNK_BYTES]).digest() != head:
                    report.changed_meanwhile += 1  # replaced or deleted since the batch was read
                    continue
                try:
                    sealed = await asyncio.to_thread(_reseal, blob, keys, sid)
                except SnapshotKeyUnknown:
                    report.unknown_key += 1
                    continue
                except SnapshotInvalid:
                    report.invalid += 1
                    continue
                async with conn.transaction():
                    if await conn.fetchval(_LOCK_SQL, sid, token, head, timeout=timeout_s) is None:
                        report.changed_meanwhile += 1
                        continue
                    await asyncio.wait_for(
                        snapshot_store.put_bytes(conn, sid, sealed, token=token), timeout_s
                    )
                report.resealed += 1
        if progress is not None:
            progress(report.line())
    report.remaining = int(await pool.fetchval(_TODO_COUNT_SQL, len(header), header, timeout=timeout_s))
    return report
