"""``make bench`` step ``snapshot``: what a snapshot costs as WhatsApp's storage grows.

Two tables:

* **sizes** — for the simulator's ``idb_mb`` 0, 50 and 200 (WhatsApp Web's IndexedDB after a history
  sync of that size; simulator/README.md), one linked session on a real worker that hibernates
  after 1 s idle: how long after ``ready`` its first snapshot is stored (a worker killed before
  then leaves a session that needs a re-scan; the issue's target: 10 s), the snapshot's size, the
  worker's pack and store times for it
  (``timings.snapshot_pack_ms`` / ``snapshot_store_ms``), and hibernated → ``ready`` at the client
  (a GET wakes it; ready on SSE), with the worker's own ``restore_ms``.
* **storage** — where a large snapshot lives: one sealed (incompressible) snapshot of 50 and 200 MiB
  written and read back in this process through (a) one ``bytea`` value, (b) 1 MiB chunk rows (what
  walink does, :mod:`shared.snapshot_store`), (c) 8 MiB chunk rows, (d) a large object in 1 MiB
  ``lo_put`` pieces; for each, the wall time both ways, the longest the event loop was held (a 5 ms
  ticker's worst lateness) and the most this process's RSS grew.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from shared import snapshot_store

if TYPE_CHECKING:
    from load_tests.bench import Bench

IDB_SIZES_MB = (0, 50, 200)
STORAGE_SIZES_MB = (50, 200)
MIB = 1 << 20
_TICK_S = 0.005


class LoopStall:
    """While this runs: the longest the event loop was held (a ticker's worst lateness) and the
    most this process's resident memory grew (sampled at each tick)."""

    def __init__(self) -> None:
        self.worst_s = 0.0
        self.rss_growth_mb = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        start = _rss_mb()
        while True:
            due = loop.time() + _TICK_S
            await asyncio.sleep(_TICK_S)  # a ticker: measuring the loop's lateness is its purpose
            self.worst_s = max(self.worst_s, loop.time() - due)
            self.rss_growth_mb = max(self.rss_growth_mb, _rss_mb() - start)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[LoopStall]:
        self._task = asyncio.create_task(self._tick())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / MIB


def _rss_mb() -> float:
    with open("/proc/self/statm", "rb") as fh:  # one tiny read of procfs: no disk behind it
        return int(fh.read().split()[1]) * _PAGE_MB


async def _timed(op: Callable[[], Awaitable[Any]]) -> tuple[float, float, float]:
    """(seconds, worst loop stall in ms, most RSS growth in MB) of ``op``."""
    async with LoopStall().watch() as stall:
        t0 = time.perf_counter()
        await op()
        elapsed = time.perf_counter() - t0
    return elapsed, stall.worst_s * 1000, stall.rss_growth_mb


async def _storage_ways(b: Bench, size_mb: int) -> list[dict[str, Any]]:
    """Store and read back one sealed snapshot of ``size_mb`` MiB each way."""
    pool = b.h.pool
    assert pool is not None
    path = b.h.workdir / f"bench-snapshot-{size_mb}"
    await asyncio.to_thread(path.write_bytes, secrets.token_bytes(size_mb * MIB))
    sid = f"bench.snapshot{size_mb}"
    await b.h.store.ensure_workspace("bench")
    await pool.execute(
        "INSERT INTO whatsapp_accounts (id, workspace_id, session_status) VALUES ($1, 'bench', 'hibernated')"
        " ON CONFLICT DO NOTHING",
        sid,
    )
    out: list[dict[str, Any]] = []

    async def one_value_put() -> None:
        blob = await asyncio.to_thread(path.read_bytes)
        await pool.execute(
            "INSERT INTO profile_snapshots (session_id, blob, size_bytes, fencing_token) VALUES ($1,$2,$3,1)"
            " ON CONFLICT (session_id) DO UPDATE SET blob = EXCLUDED.blob, chunks = 0",
            sid,
            blob,
            len(blob),
        )

    async def one_value_get() -> None:
        blob = await pool.fetchval("SELECT blob FROM profile_snapshots WHERE session_id = $1", sid)
        await asyncio.to_thread((b.h.workdir / "bench-snapshot-back").write_bytes, blob)

    def chunked(chunk_bytes: int) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]:
        async def put() -> None:
            async with pool.acquire() as conn:
                await snapshot_store.put_file(conn, sid, path, token=2, chunk_bytes=chunk_bytes)

        async def get() -> None:
            back = b.h.workdir / "bench-snapshot-back"
            back.unlink(missing_ok=True)
            async with pool.acquire() as conn:
                await snapshot_store.get_file(conn, sid, back)

        return put, get

    lo_oid: list[int] = []

    async def lo_put() -> None:
        async with pool.acquire() as conn, conn.transaction():
            oid = await conn.fetchval("SELECT lo_create(0)")
            lo_oid.append(int(oid))
            fh = await asyncio.to_thread(path.open, "rb")
            try:
                offset = 0
                while data := await asyncio.to_thread(fh.read, MIB):
                    await conn.execute("SELECT lo_put($1, $2, $3)", oid, offset, data)
                    offset += len(data)
            finally:
                await asyncio.to_thread(fh.close)

    async def lo_get() -> None:
        back = b.h.workdir / "bench-snapshot-back"
        async with pool.acquire() as conn, conn.transaction():
            fh = await asyncio.to_thread(back.open, "wb")
            try:
                offset = 0
                while data := await conn.fetchval("SELECT lo_get($1, $2, $3)", lo_oid[-1], offset, MIB):
                    await asyncio.to_thread(fh.write, data)
                    offset += len(data)
            finally:
                await asyncio.to_thread(fh.close)

    ways: list[tuple[str, Callable[[], Awaitable[Any]], Callable[[], Awaitable[Any]]]] = [
        ("one bytea value", one_value_put, one_value_get),
        ("1 MiB chunks (walink)", *chunked(MIB)),
        ("8 MiB chunks", *chunked(8 * MIB)),
        ("large object, 1 MiB lo_put", lo_put, lo_get),
    ]
    try:
        for name, put, get in ways:
            await pool.execute("DELETE FROM profile_snapshots WHERE session_id = $1", sid)
            put_s, put_stall_ms, put_rss = await _timed(put)
            get_s, get_stall_ms, get_rss = await _timed(get)
            row = {
                "way": name,
                "size_mb": size_mb,
                "put_s": round(put_s, 3),
                "get_s": round(get_s, 3),
                "worst_loop_stall_ms": round(max(put_stall_ms, get_stall_ms), 1),
                "rss_growth_mb": round(max(put_rss, get_rss, 0.0), 1),
            }
            out.append(row)
            b.progress(
                f"snapshot storage {size_mb} MiB, {name}: store {put_s:.2f} s, read {get_s:.2f} s, "
                f"loop held ≤ {row['worst_loop_stall_ms']} ms, RSS +{row['rss_growth_mb']} MB"
            )
    finally:
        for oid in lo_oid:
            await pool.execute("SELECT lo_unlink($1)", oid)
        await pool.execute("DELETE FROM profile_snapshots WHERE session_id = $1", sid)
        for leftover in (path, b.h.workdir / "bench-snapshot-back"):
            await asyncio.to_thread(leftover.unlink, True)
    return out


async def _sizes(b: Bench, idb_mb: int, wakes: int) -> dict[str, Any]:
    """One linked session at ``idb_mb``: hibernate → wake ``wakes`` times."""
    from load_tests.bench import WAIT_S, fmt_kb, fmt_s, until_status
    from load_tests.client import ClientError, is_ready, link

    await b.h.sim_profile("strict", idb_mb=idb_mb)
    worker = await b.h.start_worker(WALINK_WARM_POOL_SIZE="0", WALINK_IDLE_TIMEOUT_S="1")
    api = b.api(worker)
    sizes: list[float] = []
    pack_ms: list[float] = []
    store_ms: list[float] = []
    wake_s: list[float] = []
    restore_ms: list[float] = []
    sid = ""
    first_snapshot_s = math.nan
    try:
        sid = str((await link(api, b.scan, b.phone(), label=f"bench-idb-{idb_mb}"))["id"])
        ready_at = time.perf_counter()
        # how long a crash after ready would still need a re-scan: until the first snapshot is stored
        # (Postgres is asked, not the worker: a request would wake or delay it)
        while await b.h.snapshot_size(sid) is None:
            if time.perf_counter() - ready_at > 300:
                raise TimeoutError(f"no snapshot of {sid} within 300 s of ready")
            await asyncio.sleep(0.05)  # the bench's own view of Postgres: nothing to await there
        first_snapshot_s = time.perf_counter() - ready_at
        b.progress(f"snapshot idb_mb={idb_mb}: first snapshot stored {fmt_s(first_snapshot_s)} after ready")
        for i in range(wakes + 1):
            await until_status(b, sid, "hibernated", 300)
            timings = await b.h.session_timings(sid)
            size = await b.h.snapshot_size(sid)
            if size is not None:
                sizes.append(float(size))
            for key, into in (("snapshot_pack_ms", pack_ms), ("snapshot_store_ms", store_ms)):
                if key in timings:
                    into.append(float(timings[key]))
            if i > 0 and "restore_ms" in timings:
                restore_ms.append(float(timings["restore_ms"]))
            if i == wakes:
                break
            t0 = time.perf_counter()
            await api.get(sid)  # any request wakes a hibernated session
            async with api.stream(sid) as stream:
                await stream.until(is_ready, WAIT_S * 5)
            wake_s.append(time.perf_counter() - t0)
            b.progress(
                f"snapshot idb_mb={idb_mb} wake {i + 1}/{wakes}: {fmt_s(wake_s[-1])} "
                f"(snapshot {fmt_kb(size)}, pack {timings.get('snapshot_pack_ms')} ms, "
                f"store {timings.get('snapshot_store_ms')} ms)"
            )
    finally:
        if sid:
            with contextlib.suppress(ClientError):
                await api.delete(sid)
        await b.h.retire_workers([worker])
    med = statistics.median
    return {
        "idb_mb": idb_mb,
        "ready_to_first_snapshot_s": round(first_snapshot_s, 3),
        "snapshot_bytes": med(sizes) if sizes else None,
        "pack_ms": med(pack_ms) if pack_ms else None,
        "store_ms": med(store_ms) if store_ms else None,
        "wake_s": med(wake_s) if wake_s else None,
        "worker_restore_ms": med(restore_ms) if restore_ms else None,
        "samples": len(wake_s),
    }


async def step_snapshot(b: Bench) -> None:
    from load_tests.bench import Row, fmt_mb, fmt_ms, fmt_s

    wakes = b.count(full=3, quick=1)
    storage = [r for mb in STORAGE_SIZES_MB for r in await _storage_ways(b, mb)]
    b.figures["snapshot_storage"] = {"ways": storage}
    rows = [await _sizes(b, mb, wakes) for mb in IDB_SIZES_MB]
    await b.use_profile("strict")
    b.figures["snapshot"] = {
        "what": "per idb_mb (simulator: WhatsApp's IndexedDB after a history sync of that many MB): the "
        "hibernation snapshot's size, the worker's pack and store times, hibernated → ready at the client "
        "(medians); and where a large sealed snapshot can live in Postgres (store/read, event-loop stall, "
        "RSS growth, in the bench process)",
        "sizes": rows,
        "storage": storage,
    }
    for r in rows:
        fig = f"snapshot {r['idb_mb']} MB"
        b.add(Row(fig, "snapshot size, p50", fmt_mb(r["snapshot_bytes"])))
        b.add(Row(fig, "  pack (timings.snapshot_pack_ms), p50", fmt_ms(r["pack_ms"])))
        b.add(Row(fig, "  store (timings.snapshot_store_ms), p50", fmt_ms(r["store_ms"])))
        b.add(Row(fig, "  hibernated → ready at client, p50", fmt_s(r["wake_s"])))
        first = r["ready_to_first_snapshot_s"]
        b.add(
            Row(
                fig,
                "  ready → first snapshot stored (a crash before needs a re-scan)",
                fmt_s(first),
                target="≤ 10 s",
                ok=first <= 10.0,
            )
        )
        b.add(Row(fig, "  worker restore_ms, p50", fmt_ms(r["worker_restore_ms"])))
    for s in storage:
        fig = f"storage {s['size_mb']} MiB"
        b.add(Row(fig, f"{s['way']}: store / read", f"{s['put_s']:.2f} s / {s['get_s']:.2f} s"))
        b.add(
            Row(
                fig,
                "  event loop held, RSS growth",
                f"{s['worst_loop_stall_ms']} ms, +{s['rss_growth_mb']} MB",
            )
        )
