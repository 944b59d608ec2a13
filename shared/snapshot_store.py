"""Where snapshots live: Postgres rows of at most :data:`CHUNK_BYTES` each.

A snapshot (``worker/snapshot.py``: compressed and encrypted, so incompressible) is stored as its
first chunk in ``profile_snapshots.blob`` (the row that also holds its size, chunk count and
fencing token) and the rest, in order, in ``profile_snapshot_chunks`` (migration 0009). Chunks
rather than one ``bytea`` value or large objects, by the figures of ``make bench`` (the "snapshot
storage" table; docs/durability.md):

* one value is built and parsed whole on both sides: a 200 MB snapshot would be 200 MB in the
  worker's memory twice and one 200 MB message that blocks the worker's event loop while asyncpg
  encodes or decodes it (Postgres also caps a value at 1 GB);
* large objects were slower to store (2.5 s against 0.9 s at 200 MiB), carry privileges of their
  own (each object belongs to the role that made it; another role needs a ``GRANT`` per object),
  and need their own clean-up (``vacuumlo`` or a trigger): ``ON DELETE CASCADE`` does not remove
  them;
* rows of 1 MiB are plain DML under the same roles, stream in and out with flat memory (a file is
  read and written a chunk at a time, off the event loop), cascade with their session, and
  replicate and back up like every other row.

A snapshot is replaced in one transaction: the header row is written first, fenced (a writer
whose lease token is lower than the stored one changes nothing) and row-locked, then the old
chunks are deleted and the new ones inserted. A reader sees a whole snapshot or the previous one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from shared.db import Conn
from shared.errors import SnapshotInvalid

CHUNK_BYTES = 1 << 20
"""Bytes per stored chunk (``make bench``, 200 MiB: 1 MiB chunks store in 0.86 s and read in 0.34 s
with +6 MB of RSS; 8 MiB chunks 1.25 s / 0.62 s with +51 MB)."""

Reader = Callable[[int], Awaitable[bytes]]

_UPSERT_SQL = (
    "INSERT INTO profile_snapshots (session_id, blob, size_bytes, fencing_token, chunks)"
    " VALUES ($1, $2, $3, $4, $5)"
    " ON CONFLICT (session_id) DO UPDATE SET blob = EXCLUDED.blob, size_bytes = EXCLUDED.size_bytes,"
    " fencing_token = EXCLUDED.fencing_token, chunks = EXCLUDED.chunks, created_at = now()"
    " WHERE profile_snapshots.fencing_token <= EXCLUDED.fencing_token"
    " RETURNING session_id"
)


def chunk_count(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many chunks a snapshot of ``size`` bytes takes (one at least, the header row's)."""
    return max(1, -(-size // chunk_bytes))


async def write(
    conn: Conn, session_id: str, read: Reader, size: int, *, token: int, chunk_bytes: int = CHUNK_BYTES
) -> bool:
    """Store a snapshot of ``size`` bytes that ``read(n)`` hands over in order, inside the caller's
    transaction; False (nothing changed) when a snapshot with a greater fencing token is stored."""
    first = await read(chunk_bytes)
    count = chunk_count(size, chunk_bytes)
    stored = await conn.fetchval(_UPSERT_SQL, session_id, first, size, token, count - 1)
    if stored is None:
        return False
    await conn.execute("DELETE FROM profile_snapshot_chunks WHERE session_id = $1", session_id)
    total = len(first)
    for seq in range(1, count):
        data = await read(chunk_bytes)
        if not data:
            raise SnapshotInvalid(f"the snapshot of {session_id} ended at {total} of {size} bytes")
        total += len(data)
        await conn.execute(
            "INSERT INTO profile_snapshot_chunks (session_id, seq, data) VALUES ($1, $2, $3)",
            session_id,
            seq,
            data,
        )
    if total != size or await read(1):
        raise SnapshotInvalid(f"the snapshot of {session_id} is not the {size} bytes announced")
    return True


async def put_file(
    conn: Conn, session_id: str, path: Path, *, token: int, chunk_bytes: int = CHUNK_BYTES
) -> bool:
    """:func:`write` the snapshot file ``path`` (read a chunk at a time, off the event loop) in
    one transaction of its own on ``conn``."""
    fh = await asyncio.to_thread(open, path, "rb")
    try:
        size = (await asyncio.to_thread(os.fstat, fh.fileno())).st_size

        async def read(n: int) -> bytes:
            return await asyncio.to_thread(fh.read, n)

        async with conn.transaction():
            return await write(conn, session_id, read, size, token=token, chunk_bytes=chunk_bytes)
    finally:
        await asyncio.to_thread(fh.close)


async def put_bytes(
    conn: Conn, session_id: str, blob: bytes, *, token: int, chunk_bytes: int = CHUNK_BYTES
) -> bool:
    """:func:`write` a snapshot held in memory (small ones, ``walink rekey``, tests)."""
    view = memoryview(blob)
    offset = 0

    async def read(n: int) -> bytes:
        nonlocal offset
        part = bytes(view[offset : offset + n])
        offset += len(part)
        return part

    async with conn.transaction():
        return await write(conn, session_id, read, len(blob), token=token, chunk_bytes=chunk_bytes)


async def read_into(conn: Conn, session_id: str, write_chunk: Callable[[bytes], Awaitable[None]]) -> bool:
    """Hand the stored snapshot of ``session_id`` to ``write_chunk`` in order, from one consistent
    view (a repeatable-read transaction); False when none is stored. A snapshot whose chunks do
    not add up (a broken store) raises :class:`~shared.errors.SnapshotInvalid`."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            "SELECT blob, size_bytes, chunks FROM profile_snapshots WHERE session_id = $1", session_id
        )
        if row is None:
            return False
        first = bytes(row["blob"])
        await write_chunk(first)
        total, expected_seq = len(first), 1
        if row["chunks"]:
            async for chunk in conn.cursor(
                "SELECT seq, data FROM profile_snapshot_chunks WHERE session_id = $1 ORDER BY seq",
                session_id,
                prefetch=4,
            ):
                if chunk["seq"] != expected_seq:
                    break
                data = bytes(chunk["data"])
                total += len(data)
                expected_seq += 1
                await write_chunk(data)
        if expected_seq - 1 != row["chunks"] or total != row["size_bytes"]:
            raise SnapshotInvalid(
                f"the stored snapshot of {session_id} is incomplete ({expected_seq - 1} of "
                f"{row['chunks']} chunks, {total} of {row['size_bytes']} bytes)"
            )
    return True


async def get_file(conn: Conn, session_id: str, path: Path) -> bool:
    """The stored snapshot into the new private file ``path`` (0600); False when none is stored
    (no file is left then, nor when it fails)."""

    def create() -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    fd = await asyncio.to_thread(create)
    out = os.fdopen(fd, "wb")
    try:

        async def write_chunk(data: bytes) -> None:
            await asyncio.to_thread(out.write, data)

        found = await read_into(conn, session_id, write_chunk)
        await asyncio.to_thread(out.close)
    except BaseException:
        await asyncio.to_thread(out.close)
        await asyncio.to_thread(path.unlink, True)
        raise
    if not found:
        await asyncio.to_thread(path.unlink, True)
    return found


async def get_bytes(conn: Conn, session_id: str) -> bytes | None:
    """The stored snapshot in memory (small ones, ``walink rekey``, tests)."""
    parts: list[bytes] = []

    async def keep(data: bytes) -> None:
        parts.append(data)

    return b"".join(parts) if await read_into(conn, session_id, keep) else None
