"""Large snapshots: packed and restored through files in flat memory, stored in Postgres chunks
(``worker/snapshot.py`` streaming, ``shared/snapshot_store.py``, migration 0009)."""

from __future__ import annotations

import os
import secrets
import tracemalloc
from pathlib import Path

import asyncpg
import pytest

from shared import snapshot_store
from shared.errors import SnapshotInvalid
from shared.store import Store
from worker import rekey as rekey_mod
from worker import snapshot
from worker.snapshot import SnapshotKeys

KEY = secrets.token_bytes(32)
NEW_KEY = secrets.token_bytes(32)
SID = "ws_big.s1"
MIB = 1 << 20


def _profile(root: Path, mib: int) -> dict[str, bytes]:
    """A closed profile as Chromium leaves it: the login's LevelDBs and a large-value blob file,
    ``mib`` MiB of incompressible (encrypted-like) data in all; its files by relative name."""
    files = {
        f"{snapshot.IDB_LEVELDB}/CURRENT": b"MANIFEST-000001\n",
        f"{snapshot.IDB_LEVELDB}/MANIFEST-000001": secrets.token_bytes(300),
        f"{snapshot.LOCAL_STORAGE}/CURRENT": b"MANIFEST-000001\n",
        f"{snapshot.LOCAL_STORAGE}/MANIFEST-000001": secrets.token_bytes(200),
        f"{snapshot.LOCAL_STORAGE}/000003.log": secrets.token_bytes(4000),
        f"{snapshot.IDB_BLOBS}/1/00/3": secrets.token_bytes(600_000),
    }
    for n in range(mib):
        files[f"{snapshot.IDB_LEVELDB}/{n + 10:06d}.ldb"] = secrets.token_bytes(MIB)
    for name, data in files.items():
        path = root.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_large_profile_is_packed_and_restored_through_files_in_flat_memory(tmp_path: Path) -> None:
    files = _profile(tmp_path / "profile", 24)
    sealed = tmp_path / "snap"
    tracemalloc.start()
    try:
        size = snapshot.pack_profile_file(tmp_path / "profile", sealed, key=KEY, session_id=SID)
        _, pack_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        snapshot.unpack_profile_file(sealed, tmp_path / "restored", key=KEY, session_id=SID)
        _, unpack_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == sealed.stat().st_size > 24 * MIB  # incompressible: about the input's size
    assert oct(sealed.stat().st_mode & 0o777) == "0o600"
    assert _read_tree(tmp_path / "restored") == files
    # a 25 MiB snapshot never has to be in memory: a few buffers of 64 KiB to 1 MiB at a time
    assert pack_peak < 8 * MIB, pack_peak
    assert unpack_peak < 8 * MIB, unpack_peak
    # the streamed file is the same format as the in-memory snapshot: either one opens the other's
    assert len(snapshot.open_sealed(sealed.read_bytes(), key=KEY, session_id=SID)) > 0
    small = snapshot.pack_profile(tmp_path / "restored", key=KEY, session_id=SID)
    (tmp_path / "small").write_bytes(small)
    snapshot.unpack_profile_file(tmp_path / "small", tmp_path / "again", key=KEY, session_id=SID)
    assert _read_tree(tmp_path / "again") == files
    # nothing of the restore's staging or decrypted payload stays next to the profile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "profile", "restored", "small", "snap"]


def test_an_altered_or_foreign_snapshot_file_restores_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    _profile(tmp_path / "profile", 2)
    sealed = tmp_path / "snap"
    snapshot.pack_profile_file(tmp_path / "profile", sealed, key=KEY, session_id=SID)
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "altered").write_bytes(bytes(data))
    (tmp_path / "short").write_bytes(bytes(data[:40]))
    for name, sid in (("altered", SID), ("snap", "ws_big.other"), ("short", SID)):
        with pytest.raises(SnapshotInvalid):
            snapshot.unpack_profile_file(tmp_path / name, tmp_path / "target", key=KEY, session_id=sid)
        assert not (tmp_path / "target").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["altered", "profile", "short", "snap"]


async def _account(pool: asyncpg.Pool, sid: str) -> Store:
    store = Store(pool)
    await store.ensure_workspace("ws_big")
    await pool.execute(
        "INSERT INTO whatsapp_accounts (id, workspace_id, session_status) VALUES ($1, 'ws_big', 'hibernated')"
        " ON CONFLICT DO NOTHING",
        sid,
    )
    return store


async def test_a_snapshot_is_stored_in_ordered_chunks_fenced_and_replaced_whole(
    pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    store = await _account(pg_pool, SID)
    first = secrets.token_bytes(5 * 1000 + 17)
    async with pg_pool.acquire() as conn:
        assert await snapshot_store.put_bytes(conn, SID, first, token=5, chunk_bytes=1000)
    row = await pg_pool.fetchrow(
        "SELECT size_bytes, chunks FROM profile_snapshots WHERE session_id = $1", SID
    )
    assert row is not None and (row["size_bytes"], row["chunks"]) == (len(first), 5)
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM profile_snapshot_chunks WHERE session_id = $1", SID) == 5
    )
    assert await store.get_snapshot(SID) == first
    assert await store.get_snapshot_file(SID, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == first
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o600"

    # an older owner (a lower lease token) changes nothing, chunks included
    async with pg_pool.acquire() as conn:
        assert not await snapshot_store.put_bytes(
            conn, SID, secrets.token_bytes(2500), token=4, chunk_bytes=1000
        )
    assert await store.get_snapshot(SID) == first
    # a newer one replaces all of it: fewer chunks leave none of the old ones behind
    second = secrets.token_bytes(1500)
    async with pg_pool.acquire() as conn:
        assert await snapshot_store.put_bytes(conn, SID, second, token=6, chunk_bytes=1000)
    assert await store.get_snapshot(SID) == second
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM profile_snapshot_chunks WHERE session_id = $1", SID) == 1
    )

    # a store that lost a chunk is reported as such, and no partial file is left
    await pg_pool.execute("DELETE FROM profile_snapshot_chunks WHERE session_id = $1", SID)
    with pytest.raises(SnapshotInvalid, match="incomplete"):
        await store.get_snapshot_file(SID, tmp_path / "torn")
    assert not (tmp_path / "torn").exists()
    assert not await store.get_snapshot_file("ws_big.none", tmp_path / "none")
    assert not (tmp_path / "none").exists()

    # deleting the snapshot (or its session) takes its chunks
    async with pg_pool.acquire() as conn:
        assert await snapshot_store.put_bytes(conn, SID, first, token=7, chunk_bytes=1000)
    await store.delete_snapshot(SID)
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM profile_snapshot_chunks WHERE session_id = $1", SID) == 0
    )


async def test_a_large_snapshot_round_trips_through_postgres_and_rekey(
    pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    files = _profile(tmp_path / "profile", 5)
    store = await _account(pg_pool, SID)
    sealed = tmp_path / "snap"
    size = snapshot.pack_profile_file(tmp_path / "profile", sealed, key=KEY, session_id=SID)
    assert await store.put_snapshot_file(SID, sealed, token=3)
    chunks = await pg_pool.fetchval("SELECT chunks FROM profile_snapshots WHERE session_id = $1", SID)
    assert chunks == snapshot_store.chunk_count(size) - 1 >= 5

    # a key rotation re-seals the chunked snapshot whole, and it still restores
    keys = SnapshotKeys((NEW_KEY, KEY))
    report = await rekey_mod.rekey(pg_pool, keys)
    assert (report.resealed, report.remaining) == (1, 0)
    assert await store.get_snapshot_file(SID, tmp_path / "fetched")
    assert snapshot.blob_key_id((tmp_path / "fetched").read_bytes()[:64]) == snapshot.key_id(NEW_KEY).hex()
    snapshot.unpack_profile_file(
        tmp_path / "fetched", tmp_path / "restored", key=SnapshotKeys((NEW_KEY,)), session_id=SID
    )
    assert _read_tree(tmp_path / "restored") == files
    assert os.listdir(tmp_path / "restored") == ["Default"]


def test_a_starting_worker_removes_half_done_restores_and_copies_but_no_profile(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    for name in ("p_0123456789abcdef0123", ".p_1.restore-x1y2", "walink-live-abc"):
        (profiles / name / "Default").mkdir(parents=True)
    (profiles / ".p_1.payload-zz9").write_bytes(b"decrypted")
    (profiles / "p_0123456789abcdef0123" / ".p_2.restore-inner").mkdir()  # not at the top: kept
    assert snapshot.remove_leftovers(profiles) == 3
    assert sorted(p.name for p in profiles.iterdir()) == ["p_0123456789abcdef0123"]
    assert (profiles / "p_0123456789abcdef0123" / ".p_2.restore-inner").is_dir()
    assert snapshot.remove_leftovers(tmp_path / "absent") == 0
