"""Snapshot keys rotate, ``walink rekey`` re-seals, and a worker with the wrong key destroys nothing.

The first tests need no browser (sealed payloads and Postgres rows); the last links one account in
real Chromium, hibernates it, and brings it to a worker without its key (the session is left as it
was: hibernated, snapshot untouched, device linked) and then to one that has it (restored, no scan).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway.proxy import Call
from gateway.routing import Kind
from shared.errors import SettingsError, SnapshotInvalid, SnapshotKeyUnknown
from shared.redis_keys import Keys
from shared.store import Store
from tests.conftest import SNAPSHOT_KEY, AiohttpServer, Sim, WorkerFactory, events, link_id, manager_of
from tests.test_gateway_units import fake_cluster, forward
from tests.test_snapshot import GOOD, make_tar
from tests.test_snapshot import seal as seal_v1
from worker import rekey as rekey_mod
from worker import snapshot
from worker.snapshot import SnapshotKeys, blob_key_id, key_id, open_sealed, unpack_profile

OLD = secrets.token_bytes(32)
NEW = secrets.token_bytes(32)
STRANGER = secrets.token_bytes(32)
SESSION = "sess_keys"


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def payload() -> bytes:
    import lzma

    return lzma.compress(make_tar(GOOD), format=lzma.FORMAT_XZ, preset=0)


# ---------------------------------------------------------------------------------------- keys


def test_settings_give_one_or_several_keys_and_the_first_seals() -> None:
    one = SnapshotKeys.from_settings(b64(OLD), "")
    assert one is not None and one.keys == (OLD,)  # WALINK_SNAPSHOT_KEY still works
    both = SnapshotKeys.from_settings("", f"{b64(NEW)}, {b64(OLD)}")
    assert both is not None and both.primary == NEW and both.ids == [key_id(NEW).hex(), key_id(OLD).hex()]
    assert SnapshotKeys.from_settings("", "") is None
    with pytest.raises(SettingsError, match="not both"):
        SnapshotKeys.from_settings(b64(OLD), b64(NEW))
    with pytest.raises(SettingsError, match="same key twice"):
        SnapshotKeys.from_settings("", f"{b64(NEW)},{b64(NEW)}")
    with pytest.raises(SettingsError, match=r"WALINK_SNAPSHOT_KEYS \(key 2\)"):
        SnapshotKeys.from_settings("", f"{b64(NEW)},not-a-key")


def test_rotation_old_snapshots_open_with_old_and_new_keys_and_new_ones_name_the_first(
    tmp_path: Path,
) -> None:
    rotated = SnapshotKeys((NEW, OLD))
    sealed_old = snapshot.seal(payload(), key=OLD, session_id=SESSION)
    legacy = seal_v1(make_tar(GOOD), key=OLD, session_id=SESSION)  # the v1 format: no key id
    assert blob_key_id(sealed_old) == key_id(OLD).hex() and blob_key_id(legacy) is None
    for n, blob in enumerate((sealed_old, legacy)):
        assert unpack_profile(blob, tmp_path / f"p{n}", key=rotated, session_id=SESSION) == 32
    # what is sealed now names the new key, and the old key alone cannot open it
    fresh = snapshot.seal(payload(), key=rotated.primary, session_id=SESSION)
    assert blob_key_id(fresh) == key_id(NEW).hex()
    with pytest.raises(SnapshotKeyUnknown) as lacking:
        open_sealed(fresh, key=OLD, session_id=SESSION)
    assert lacking.value.key_id == key_id(NEW).hex() and key_id(NEW).hex() in lacking.value.message
    assert (lacking.value.status, lacking.value.code) == (503, "snapshot_key_unknown")
    with pytest.raises(SnapshotKeyUnknown) as v1_lacking:
        open_sealed(legacy, key=STRANGER, session_id=SESSION)
    assert v1_lacking.value.key_id == "v1"
    # a known key that does not authenticate the bytes: a broken snapshot, not a missing key
    altered = bytearray(fresh)
    altered[-1] ^= 1
    with pytest.raises(SnapshotInvalid):
        open_sealed(bytes(altered), key=rotated, session_id=SESSION)
    with pytest.raises(SnapshotInvalid):
        open_sealed(fresh, key=rotated, session_id=SESSION + "_other")


# ---------------------------------------------------------------------------------------- rekey


async def _snapshot_rows(pool: asyncpg.Pool, blobs: dict[str, bytes]) -> None:
    store = Store(pool)
    await store.ensure_workspace("ws_keys")
    for sid, blob in blobs.items():
        await pool.execute(
            "INSERT INTO whatsapp_accounts (id, workspace_id, session_status)"
            " VALUES ($1, 'ws_keys', 'hibernated')",
            sid,
        )
        await store.put_snapshot(sid, blob, token=3)


async def _blob(pool: asyncpg.Pool, sid: str) -> bytes:
    return bytes(await pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sid))


async def test_rekey_reseals_every_snapshot_with_the_first_key_and_is_idempotent(
    pg_pool: asyncpg.Pool,
) -> None:
    blobs = {f"s_{n}": snapshot.seal(payload(), key=OLD, session_id=f"s_{n}") for n in range(5)}
    blobs["s_legacy"] = seal_v1(make_tar(GOOD), key=OLD, session_id="s_legacy")
    blobs["s_new"] = snapshot.seal(payload(), key=NEW, session_id="s_new")
    blobs["s_stranger"] = snapshot.seal(payload(), key=STRANGER, session_id="s_stranger")
    await _snapshot_rows(pg_pool, blobs)
    keys = SnapshotKeys((NEW, OLD))
    lines: list[str] = []

    report = await rekey_mod.rekey(pg_pool, keys, batch_size=2, progress=lines.append)
    print("\n".join(lines))
    assert (report.to_do, report.checked, report.resealed) == (7, 7, 6)
    assert (report.unknown_key, report.invalid, report.changed_meanwhile) == (1, 0, 0)
    assert report.remaining == 1 and not report.ok  # the one sealed with a key nobody has
    assert len(lines) == 4  # a progress line per batch of 2
    new_only = SnapshotKeys((NEW,))
    for sid in [*(f"s_{n}" for n in range(5)), "s_legacy"]:
        blob = await _blob(pg_pool, sid)
        assert blob_key_id(blob) == key_id(NEW).hex()
        assert open_sealed(blob, key=new_only, session_id=sid) == open_sealed(
            blobs[sid], key=keys, session_id=sid
        )
    assert await _blob(pg_pool, "s_new") == blobs["s_new"]  # already on the first key: not rewritten
    assert await _blob(pg_pool, "s_stranger") == blobs["s_stranger"]  # untouched
    tokens = await pg_pool.fetch("SELECT DISTINCT fencing_token FROM profile_snapshots")
    assert [r["fencing_token"] for r in tokens] == [3]  # the owners' fencing is not changed

    again = await rekey_mod.rekey(pg_pool, keys, batch_size=2)
    assert (again.to_do, again.resealed, again.remaining) == (1, 0, 1)  # only the stranger is left


async def test_rekey_never_overwrites_a_snapshot_a_worker_stored_meanwhile(
    pg_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _snapshot_rows(pg_pool, {"s_race": snapshot.seal(payload(), key=OLD, session_id="s_race")})
    newer = snapshot.seal(payload(), key=OLD, session_id="s_race")  # a worker not yet on the new keys
    loop = asyncio.get_running_loop()
    real = rekey_mod._reseal

    def reseal_while_a_worker_stores(blob: bytes, keys: SnapshotKeys, session_id: str) -> bytes:
        # between rekey's read and its write, the session's owner stores a newer snapshot
        stored = asyncio.run_coroutine_threadsafe(
            Store(pg_pool).put_snapshot(session_id, newer, token=4), loop
        )
        stored.result(timeout=30)
        return real(blob, keys, session_id)

    monkeypatch.setattr(rekey_mod, "_reseal", reseal_while_a_worker_stores)
    report = await rekey_mod.rekey(pg_pool, SnapshotKeys((NEW, OLD)))
    assert (report.resealed, report.changed_meanwhile, report.remaining) == (0, 1, 1)
    assert await _blob(pg_pool, "s_race") == newer
    assert "is every worker on the new keys?" in report.summary()


def test_walink_rekey_command_prints_progress_and_exits_by_what_is_left(pg_dsn: str) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "WALINK_DATABASE_URL": pg_dsn,
        "WALINK_SNAPSHOT_KEYS": f"{b64(NEW)},{b64(OLD)}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "rekey", "--batch-size", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    print(done.stderr)
    assert f"sealing with key {key_id(NEW).hex()}" in done.stderr
    assert "rekey: " in done.stderr and " checked, " in done.stderr
    assert done.returncode in {0, 1}
    assert (done.returncode == 0) == ("the other keys can go" in done.stderr)


# ---------------------------------------------------------------------------------------- a worker


@pytest.mark.chromium
async def test_a_worker_without_the_key_leaves_the_session_as_it_was_and_one_with_it_restores(
    sim: Sim,
    start_worker: WorkerFactory,
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    phone = "5511987650001"
    first = await start_worker(worker_port=3111)  # the old key (conftest's SNAPSHOT_KEY)
    sid = await link_id(first, sim, phone)
    manager = manager_of(first)
    await manager.hibernate(manager.get(sid))
    await manager.settle()
    await first.close()  # its worker is gone; the session sleeps in Postgres
    old_key = snapshot.load_key(SNAPSHOT_KEY)
    stored = await _blob(pg_pool, sid)
    assert blob_key_id(stored) == key_id(old_key).hex()
    before = await pg_pool.fetchrow("SELECT * FROM whatsapp_accounts WHERE id = $1", sid)
    assert before is not None and before["session_status"] == "hibernated"

    # a worker that only has a new key: a clear 503 naming the missing key, and nothing changes
    lacking = await start_worker(worker_port=3112, snapshot_key=b64(NEW))
    for _ in range(2):  # asked twice: the same answer, still nothing changed
        resp = await lacking.get(f"/v1/sessions/{sid}")
        answer = await resp.json()
        assert resp.status == 503, answer
        assert answer["error"]["code"] == "snapshot_key_unknown"
        assert key_id(old_key).hex() in answer["error"]["message"]
    after = await pg_pool.fetchrow("SELECT * FROM whatsapp_accounts WHERE id = $1", sid)
    assert dict(after or {}) == dict(before)  # status, reason, owner, token, history: as they were
    assert await _blob(pg_pool, sid) == stored
    assert len(await sim.devices(phone)) == 1  # still linked on the phone
    assert await redis_client.get(Keys(redis_prefix).lease(sid)) is None  # free for another worker
    lacking_manager = manager_of(lacking)
    assert sid not in lacking_manager.sessions and lacking_manager.launcher.launched_total == 0
    metrics = await (await lacking.get("/metrics")).text()
    assert f'walink_snapshot_key_unknown_total{{key_id="{key_id(old_key).hex()}"}}' in metrics
    await lacking.close()

    # a worker in the middle of a rotation (new key first, old key too) restores it without a scan
    rotated = await start_worker(
        worker_port=3113, snapshot_key="", snapshot_keys=f"{b64(NEW)},{SNAPSHOT_KEY}"
    )
    stream = await events(rotated, sid, after=int(before["last_seq"]))
    try:
        assert (await rotated.get(f"/v1/sessions/{sid}")).status == 200  # the request wakes it
        ready = await stream.until("session_ready")
    finally:
        stream.close()
    assert ready["phone_number"] == phone
    assert len(await sim.devices(phone)) == 1  # the same device: no new scan
    # hibernated again here, its snapshot is sealed with the new key
    rotated_manager = manager_of(rotated)
    await rotated_manager.hibernate(rotated_manager.get(sid))
    assert blob_key_id(await _blob(pg_pool, sid)) == key_id(NEW).hex()


# ---------------------------------------------------------------------------------------- the gateway


async def test_the_gateway_takes_a_missing_snapshot_key_to_the_next_worker(
    aiohttp_server: AiohttpServer,
) -> None:
    """Any route (a restart is not idempotent: nothing was changed where the key was missing)."""
    sid = "s_rotating"
    lacking = (503, {"error": {"code": "snapshot_key_unknown", "message": "sealed with key 487e…"}})
    membership, router, fakes = await fake_cluster(
        aiohttp_server, {"w1": [lacking], "w2": [lacking], "w3": [(202, {"id": sid, "status": "starting"})]}
    )
    call = Call("POST", f"/v1/sessions/{sid}/restart", {}, b"")
    answer = await forward(router, call, Kind.SESSION, sid)
    assert answer.status == 202 and answer.worker.name == "w3"
    for name in set(fakes.names) - {"w3"}:  # a worker without a key is healthy, and not draining
        worker = membership.get(name)
        assert worker is not None and worker.breaker.snapshot()["consecutive_failures"] == 0
        assert not worker.draining
