"""The cluster the chaos suite breaks, and what it checks after every fault.

One cluster for the whole suite: the simulator, a gateway and three workers as real processes,
on a private Postgres and Redis. Sessions are linked through the gateway as a client would
(SSE, the simulator's phone scanning the QR) and followed by :mod:`tests.chaos.observers`.

After each fault (:meth:`ChaosCluster.fault`):
- no ready session needs a re-scan: each comes back ``ready`` with its phone, on a live worker,
  with one linked device on the phone and no new QR in its history;
- a linking in flight ends clearly (ready after its scan, or a terminal state), never stuck;
- no committed event is lost: every outbox row of the workspace reaches the webhook receiver
  (state ``delivered``) and the client's ``GET /v1/events`` feed;
- no Chromium is orphaned: every browser under the cluster's data directory descends from a
  running worker;
- the API answered throughout: only 2xx, or clear JSON errors, never a 500 or a hang (a refused
  connection only while the gateway itself is down);
- one driver per session: no two workers held the same session live at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from load_tests.harness import LIFTED_QUOTAS
from load_tests.ports import free_port
from tests.chaos.observers import ApiProbe, DriverSampler, FeedReader, Receiver, answer_of
from tests.chaos.services import (
    PrivatePostgres,
    PrivateRedis,
    python_child,
    run_quietly,
    walink_env,
)
from tests.conftest import CHROMIUM, LOOPBACK_WEBHOOKS, SNAPSHOT_KEY, EventStream
from worker import chromium

API_KEY = "wlk_chaos_dev_key"
INTERNAL_TOKEN = "chaos-internal-token"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RECOVER_S = 120.0  # a fault's generous bound: a session not back by then is lost, not slow
DELIVER_S = 90.0
REAP_S = 60.0
SNAPSHOT_S = 60.0  # the live snapshot comes 8 s after ready; this bound leaves room for its retries
WORKERS = 3
LEASE_TTL_MS = 10_000
TRACKED_MAX = 6  # ready sessions followed at once (each is a live Chromium on a 2-core box)
PROFILE_FS_MB = 256  # the tmpfs of the worker whose profile writes are made to fail


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid in ancestors:
            return True
        pid = _ppid(pid)
        seen += 1
    return False


@dataclass
class Ready:
    """A linked session the suite follows: it must stay ``ready`` with this phone."""

    sid: str
    phone: str
    qrs_in_history: int
    devices: int  # linked devices on the phone once it was ready (a re-scan would add one)


@dataclass
class Linking:
    """A linking in flight: created, its QR shown, not scanned yet."""

    sid: str
    phone: str
    stream: EventStream | None = None
    scanned: bool = False


@dataclass
class Outcome:
    fault: str
    passed: bool = False
    recovery_s: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    rescans: int = 0
    lost_events: int = 0
    orphans: int = 0
    doubles: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # what the fault's body tells the checks
    dead: set[str] = field(default_factory=set)  # workers that must not own anything at recovery
    restart: list[str] = field(default_factory=list)  # workers to start again once recovered
    linkings: list[Linking] = field(default_factory=list)
    after_recovery: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    allow_refused: bool = False  # the gateway itself is down during the fault
    letting_go: set[tuple[str, str]] = field(default_factory=set)  # (session, worker) finding out
    injected_at: float = 0.0

    def injected(self) -> None:
        self.injected_at = time.monotonic()

    def problem(self, text: str) -> None:
        self.problems.append(text)


class ChaosCluster:
    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.data_dir = root / "var"
        self.logs = logs  # kept after the run (the data dir is pytest's and goes)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = PrivatePostgres(logs)
        self.redis = PrivateRedis(root, logs)
        self.sim_port = free_port()
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        self.gateway_port = free_port()
        self.base = f"http://127.0.0.1:{self.gateway_port}"
        self.receiver = Receiver(free_port())
        self.worker_ports = [free_port() for _ in range(WORKERS)]
        self.full_disk_port = self.worker_ports[-1]  # its data dir is a tmpfs of its own
        self.mounted: Path | None = None
        self.sim = python_child(
            "simulator",
            "simulator",
            ["--port", str(self.sim_port), "--profile", "strict"],
            self.logs / "simulator.log",
            walink_env(),
            self.sim_port,
        )
        self.gateway = python_child(
            "gateway",
            "gateway",
            [],
            self.logs / "gateway.log",
            walink_env(**self._gateway_env()),
            self.gateway_port,
        )
        self.workers = {
            self.name(p): python_child(
                f"worker {p}",
                "worker",
                [],
                self.logs / f"worker-{p}.log",
                walink_env(**self._worker_env(p)),
                p,
            )
            for p in self.worker_ports
        }
        self.paused: set[str] = set()
        self.http: aiohttp.ClientSession | None = None
        self.api: ApiProbe | None = None
        self.feed: FeedReader | None = None
        self.drivers: DriverSampler | None = None
        self.ready: dict[str, Ready] = {}
        self.outcomes: list[Outcome] = []
        self._phones = 0

    # ------------------------------------------------------------------------------ set-up
    @staticmethod
    def name(port: int) -> str:
        return f"127.0.0.1:{port}"

    def _common_env(self) -> dict[str, str]:
        return {
            "WALINK_DATABASE_URL": self.pg.dsn,
            "WALINK_REDIS_URL": self.redis.url,
            "WALINK_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "WALINK_LEASE_TTL_MS": str(LEASE_TTL_MS),
            "WALINK_WEBHOOK_ALLOW": LOOPBACK_WEBHOOKS,  # the receiver is the suite's, on loopback
        }

    def _gateway_env(self) -> dict[str, str]:
        return {
            **self._common_env(),
            "WALINK_GATEWAY_PORT": str(self.gateway_port),
            "WALINK_WORKERS": ",".join(self.name(p) for p in self.worker_ports),
            "WALINK_DEV_API_KEY": API_KEY,
            "WALINK_SHUTDOWN_DEADLINE_S": "10",
            # one workspace takes the whole (small) cluster on purpose
            **LIFTED_QUOTAS,
        }

    def _worker_env(self, port: int) -> dict[str, str]:
        return {
            **self._common_env(),
            "WALINK_WORKER_PORT": str(port),
            "WALINK_DATA_DIR": str(self.data_dir),
            "WALINK_SIMULATOR_URL": self.sim_url,
            "WALINK_SNAPSHOT_KEY": SNAPSHOT_KEY,
            "WALINK_WARM_POOL_SIZE": "0",
            "WALINK_WARM_POOL_MAX": "0",
            "WALINK_SHUTDOWN_DEADLINE_S": "10",
            # retries outlast a 30 s receiver outage by a wide margin (full jitter: ~65 s expected
            # over 30 attempts of at most 5 s), so the receiver fault tests delivery, not luck
            "WALINK_WEBHOOK_BACKOFF_BASE_S": "0.5",
            "WALINK_WEBHOOK_BACKOFF_MAX_S": "5",
            "WALINK_WEBHOOK_MAX_ATTEMPTS": "30",
            "CHROMIUM_PATH": str(CHROMIUM),
        }

    async def mount_profile_fs(self) -> None:
        """The last worker's own directory on a small tmpfs, so that it can be filled up."""
        target = self.data_dir / f"worker-{self.full_disk_port}"
        target.mkdir(parents=True, exist_ok=True)
        options = f"size={PROFILE_FS_MB}m,mode=0700"
        if await run_quietly("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)) == 0:
            self.mounted = target

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            await self.mount_profile_fs()
        await self.pg.init()
        await asyncio.gather(self.pg.start(), self.redis.start(), self.sim.start(), self.receiver.start())
        for child in self.workers.values():  # one at a time: each migrates/checks Postgres first
            await child.start("ready on")
        await self.gateway.start()
        self.http = aiohttp.ClientSession()
        await self.until("every worker reachable", self._all_reachable, RECOVER_S)
        self.api = ApiProbe(self.http, self.base, AUTH)
        self.feed = FeedReader(self.http, self.base, AUTH)
        self.drivers = DriverSampler(self.http, self.running_workers, headers=self._internal())
        self.api.start()
        self.feed.start()
        self.drivers.start()

    def _internal(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {INTERNAL_TOKEN}"}

    async def without_snapshot(self) -> list[str]:
        """Followed sessions with no snapshot in Postgres (a crash would lose them)."""
        try:
            rows = await self.pg_fetch(
                "SELECT session_id FROM profile_snapshots WHERE session_id = ANY($1)", list(self.ready)
            )
        except (OSError, asyncpg.PostgresError):
            return list(self.ready)
        have = {r["session_id"] for r in rows}
        return [sid for sid in self.ready if sid not in have]

    async def _all_snapshotted(self) -> bool:
        return not await self.without_snapshot()

    async def steady_state(self, outcome: Outcome) -> None:
        """What a fault meets: every followed session has the live snapshot that lets another
        worker restore it (WALINK_LIVE_SNAPSHOT_DELAY_S after ready, once the credentials
        settled). One still without it after an earlier fault (that fault's check failed already)
        is no longer followed, so that this fault is judged on its own."""
        with contextlib.suppress(AssertionError):
            await self.until("every ready session has its snapshot", self._all_snapshotted, SNAPSHOT_S)
        for sid in await self.without_snapshot():
            outcome.notes.append(f"{sid} not followed: no snapshot since an earlier fault")
            del self.ready[sid]
        if self.api is not None:
            self.api.session_ids = list(self.ready)

    async def check_snapshots(self, outcome: Outcome) -> None:
        """After the fault, every followed session has its snapshot again (else a crash now would
        need a re-scan)."""
        with contextlib.suppress(AssertionError):
            await self.until("every ready session has its snapshot", self._all_snapshotted, SNAPSHOT_S)
        if missing := await self.without_snapshot():
            outcome.problem(f"no snapshot in Postgres for {missing}: a worker crash now needs a re-scan")

    async def _all_reachable(self) -> bool:
        status, _, _, body = await answer_of(self.h, "GET", self.base + "/health/cluster", headers=AUTH)
        return status == 200 and sum(1 for w in body["workers"] if w.get("reachable")) == WORKERS

    async def close(self) -> None:
        for observer in (self.api, self.feed, self.drivers):
            if observer is not None:
                await observer.stop()
        for linking in (lk for o in self.outcomes for lk in o.linkings):
            if linking.stream is not None:
                linking.stream.close()
        if self.http is not None:
            await self.http.close()
        await self.gateway.stop()
        await asyncio.gather(*(w.stop() for w in self.workers.values()), return_exceptions=True)
        for port in self.worker_ports:  # a worker killed last leaves its browsers to its next start
            chromium.reap(self.data_dir / f"worker-{port}" / "profiles")
        await asyncio.gather(self.sim.stop(), self.redis.stop(), self.pg.stop(), self.receiver.stop())
        if self.mounted is not None:
            await run_quietly("umount", "-l", str(self.mounted))
        self.pg.remove()

    # ------------------------------------------------------------------------------ helpers
    @property
    def h(self) -> aiohttp.ClientSession:
        assert self.http is not None
        return self.http

    def running_workers(self) -> dict[str, str]:
        return {
            name: f"http://{name}"
            for name, child in self.workers.items()
            if child.running() and name not in self.paused
        }

    def set_phase(self, phase: str) -> None:
        for observer in (self.api, self.feed, self.drivers):
            if observer is not None:
                observer.phase = phase

    async def until(self, what: str, probe: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
        """Seconds until ``probe()`` is true (AssertionError after ``timeout_s``)."""
        started = time.monotonic()
        while not await probe():
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"not within {timeout_s:.0f}s: {what}")
            await asyncio.sleep(0.25)  # other processes change this: we can only look again
        return time.monotonic() - started

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, _, _, body = await answer_of(self.h, method, self.base + path, headers=AUTH, **kwargs)
        return status, body

    async def client_call(self, outcome: Outcome, method: str, path: str, **kwargs: Any) -> int:
        """A client's call during a fault: its answer goes into the outcome (a 500, a hang or an
        unclear error is a problem); the status."""
        status, code, clear, _ = await answer_of(self.h, method, self.base + path, headers=AUTH, **kwargs)
        outcome.notes.append(f"{method} {path} during the fault: {status} {code}".rstrip())
        if not 200 <= status < 300:
            outcome.errors[f"{status or '-'} {code}"] += 1
        if status in {0, 500} or not clear:
            outcome.problem(f"{method} {path} during the fault: {status} {code}")
        return status

    async def session(self, sid: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/sessions/{sid}")
        return dict(body) if status == 200 and isinstance(body, dict) else {"status": f"http {status}"}

    async def owner(self, sid: str) -> str:
        body = await self.session(sid)
        assert body.get("worker"), body
        return str(body["worker"])

    async def profile_dir(self, sid: str) -> Path:
        conn = await asyncpg.connect(self.pg.dsn, timeout=10)
        try:
            row = await conn.fetchrow("SELECT owner, profile_id FROM whatsapp_accounts WHERE id = $1", sid)
        finally:
            await conn.close()
        assert row is not None and row["owner"] and row["profile_id"], row
        port = int(str(row["owner"]).rsplit(":", 1)[1])
        return self.data_dir / f"worker-{port}" / "profiles" / str(row["profile_id"])

    async def pg_fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.pg.dsn, timeout=10)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def devices(self, phone: str) -> int:
        async with self.h.get(self.sim_url + "/phone/devices", params={"phone": phone}) as resp:
            return len((await resp.json())["devices"])

    async def sim_profile(self, **fields: Any) -> None:
        async with self.h.post(self.sim_url + "/admin/profile", json=fields) as resp:
            assert resp.status == 200, await resp.text()

    def next_phone(self) -> str:
        self._phones += 1
        return f"3177{os.getpid() % 10000:04d}{self._phones:03d}"

    def sessions_on(self, worker: str, owners: dict[str, str]) -> list[str]:
        return [sid for sid, name in owners.items() if name == worker]

    async def owners(self) -> dict[str, str]:
        return {sid: str((await self.session(sid)).get("worker")) for sid in self.ready}

    # ------------------------------------------------------------------------------ linking
    async def open_stream(self, sid: str) -> EventStream:
        resp = await self.h.get(
            f"{self.base}/v1/sessions/{sid}/events", headers=AUTH, timeout=aiohttp.ClientTimeout(total=None)
        )
        assert resp.status == 200, resp.status
        return EventStream(resp)

    async def start_linking(self) -> Linking:
        """ "Add account": a session created with the receiver as webhook, its first QR seen."""
        status, body = await self.call("POST", "/v1/sessions", json={"webhook_url": self.receiver.url})
        assert status == 201, (status, body)
        return await self._follow(str(body["id"]))

    async def _follow(self, sid: str) -> Linking:
        """A new session's linking, followed through the gateway from its first QR."""
        linking = Linking(sid, self.next_phone())
        linking.stream = await self.open_stream(sid)
        await linking.stream.until("qr")
        return linking

    async def start_linking_on(self, worker: str) -> Linking:
        """A linking in flight on ``worker``: created on that worker itself (with the gateway's
        internal token), since the gateway's bounded-load placement rightly sends a new session
        elsewhere when ``worker`` already carries its share; everything after goes through the gateway."""
        assert self.http is not None
        async with self.http.post(
            f"http://{worker}/v1/sessions",
            json={"webhook_url": self.receiver.url},
            headers=self._internal(),
            timeout=aiohttp.ClientTimeout(total=RECOVER_S),
        ) as resp:
            body = await resp.json()
            assert resp.status == 201, (resp.status, body)
        linking = await self._follow(str(body["id"]))
        assert await self.owner(linking.sid) == worker
        return linking

    async def current_qr(self, sid: str, not_this: str | None) -> str:
        """The QR shown now (a different one than ``not_this``), read from ``/qr``."""
        qr = ""

        async def fresh() -> bool:
            nonlocal qr
            status, body = await self.call("GET", f"/v1/sessions/{sid}/qr?format=raw")
            qr = str(body.get("qr") or "") if status == 200 and isinstance(body, dict) else ""
            return bool(qr) and qr != not_this

        await self.until(f"a new QR for {sid}", fresh, 60)
        return qr

    async def scan(self, linking: Linking) -> None:
        """Scan what the session shows until the phone links (the 2026 page refuses first scans)."""
        last: str | None = None
        for _ in range(6):
            last = await self.current_qr(linking.sid, last)
            async with self.h.post(
                self.sim_url + "/phone/scan", json={"qr": last, "phone": linking.phone}
            ) as resp:
                data = await resp.json()
                if resp.status == 200:
                    linking.scanned = True
                    return
            code = data["error"]["code"]
            assert (resp.status, code) in {(409, "couldnt_link_device"), (410, "qr_expired")}, data
        raise AssertionError(f"{linking.sid}: the phone could not link after six scans")

    async def link(self) -> Ready:
        linking = await self.start_linking()
        try:
            await self.scan(linking)
            assert linking.stream is not None
            await linking.stream.until("session_ready")
        finally:
            if linking.stream is not None:
                linking.stream.close()
        return await self.track(linking)

    async def track(self, linking: Linking) -> Ready:
        body = await self.session(linking.sid)
        assert body["status"] == "ready" and body["phone_number"] == linking.phone, body
        qrs = sum(1 for h in body["history"] if h["status"] == "qr")
        ready = Ready(linking.sid, linking.phone, qrs, await self.devices(linking.phone))
        self.ready[ready.sid] = ready
        if self.api is not None:
            self.api.session_ids = list(self.ready)
        return ready

    async def trim(self) -> None:
        """Delete the oldest followed sessions beyond ``TRACKED_MAX`` (a bounded number of browsers)."""
        while len(self.ready) > TRACKED_MAX:
            sid = next(iter(self.ready))
            status, body = await self.call("DELETE", f"/v1/sessions/{sid}")
            assert status == 204, (status, body)
            del self.ready[sid]
        if self.api is not None:
            self.api.session_ids = list(self.ready)

    # ------------------------------------------------------------------------------ faults
    @contextlib.asynccontextmanager
    async def fault(self, name: str) -> AsyncIterator[Outcome]:
        """Run a fault's body, then every check; the outcome goes into the table either way."""
        outcome = Outcome(name)
        self.outcomes.append(outcome)
        try:
            await self.steady_state(outcome)
            self.set_phase(name)
            yield outcome
            if not outcome.injected_at:
                outcome.injected()
            await self.verify(outcome)
        except Exception as exc:
            outcome.problem(f"{type(exc).__name__}: {exc}")
        finally:
            self.set_phase(f"after {name}")
            for linking in outcome.linkings:
                if linking.stream is not None:
                    linking.stream.close()
                    linking.stream = None
            self.api_answers(outcome)
            outcome.passed = not outcome.problems

    def api_answers(self, outcome: Outcome) -> None:
        assert self.api is not None and self.feed is not None and self.drivers is not None
        answers = self.api.during(outcome.fault) + [a for a in self.feed.answers if a.phase == outcome.fault]
        for a in answers:
            outcome.errors[f"{a.status or '-'} {a.code}"] += 1
        bad = [
            a
            for a in answers
            if a.status == 500
            or a.code == "hang"
            or (not a.clear and not (outcome.allow_refused and a.code == "connection refused"))
        ]
        if bad:
            outcome.problem(
                "the API did not answer clearly: "
                + ", ".join(f"{a.what} {a.status} {a.code}" for a in bad[:8])
                + (f" (+{len(bad) - 8})" if len(bad) > 8 else "")
            )
        doubles = [
            d
            for d in self.drivers.doubles
            if d[0] == outcome.fault and not any((d[1], w) in outcome.letting_go for w in d[2])
        ]
        outcome.doubles = len({d[1] for d in doubles})
        if doubles:
            outcome.problem(f"sessions driven by two workers at once: {sorted(set(doubles))[:4]}")

    async def verify(self, outcome: Outcome) -> None:
        started = outcome.injected_at
        await self.check_ready(outcome)
        for linking in outcome.linkings:
            await self.finish_linking(outcome, linking)
        outcome.recovery_s = round(time.monotonic() - started, 1)
        for hook in outcome.after_recovery:
            await hook()
        for name in outcome.restart:
            child = self.workers[name]
            if not child.running():
                await child.start("ready on")
        await self.until("every worker reachable", self._all_reachable, RECOVER_S)
        await self.check_orphans(outcome)
        await self.check_events(outcome)
        await self.check_snapshots(outcome)
        await self.trim()

    async def check_ready(self, outcome: Outcome) -> None:
        """Every followed session ready again, same phone, on a live worker, without a re-scan."""
        pending = dict(self.ready)
        deadline = time.monotonic() + RECOVER_S
        last: dict[str, dict[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            for sid in list(pending):
                body = last[sid] = await self.session(sid)
                if body.get("status") == "ready" and body.get("worker") not in outcome.dead:
                    del pending[sid]
            if pending:
                await asyncio.sleep(0.25)  # other processes restore them: we can only look again
        for sid, ready in self.ready.items():
            body = last.get(sid) or await self.session(sid)
            qrs = sum(1 for h in body.get("history") or [] if h.get("status") == "qr")
            devices = await self.devices(ready.phone)
            if sid in pending or body.get("phone_number") != ready.phone or qrs != ready.qrs_in_history:
                outcome.rescans += 1
                outcome.problem(
                    f"{sid} not ready again without a re-scan: status {body.get('status')} "
                    f"({body.get('reason')}), worker {body.get('worker')}, phone {body.get('phone_number')}, "
                    f"QRs in history {qrs} (was {ready.qrs_in_history})"
                )
            elif devices != ready.devices:
                outcome.rescans += 1
                outcome.problem(f"{sid}: {devices} linked devices on {ready.phone} (was {ready.devices})")

    async def finish_linking(self, outcome: Outcome, linking: Linking) -> None:
        """A linking in flight: ready once scanned, or a clear end (never stuck in between)."""
        end: dict[str, Any] = {}

        async def settled() -> bool:
            nonlocal end
            end = await self.session(linking.sid)
            status, worker = end.get("status"), end.get("worker")
            if status in {"failed", "expired", "logged_out", "deleted"}:
                return True
            if status == "ready":
                return True
            return status == "qr" and worker not in outcome.dead

        try:
            await self.until(f"linking {linking.sid} settles", settled, RECOVER_S)
        except AssertionError:
            outcome.problem(f"linking {linking.sid} stuck: {end.get('status')} on {end.get('worker')}")
            return
        if end["status"] == "qr":
            if linking.scanned:  # the scan was lost with its browser: the user scans the new QR
                outcome.notes.append("the linking's scan was lost: scanned again")
            await self.scan(linking)
            try:
                await self.until(
                    f"linking {linking.sid} ready",
                    lambda: self.is_ready(linking.sid),
                    RECOVER_S,
                )
            except AssertionError:
                end = await self.session(linking.sid)
                outcome.problem(f"linking {linking.sid} scanned but not ready: {end.get('status')}")
                return
            end = await self.session(linking.sid)
        if end["status"] == "ready":
            ready = await self.track(linking)
            outcome.notes.append("linking ready")
            if ready.devices != 1:
                outcome.notes.append(f"{ready.devices} linked devices on the linking's phone (a stale one)")
        else:
            outcome.notes.append(f"linking {end['status']}/{end.get('reason')}")

    async def is_ready(self, sid: str) -> bool:
        return (await self.session(sid)).get("status") == "ready"

    def orphans(self) -> list[int]:
        """Chromium processes under the data dir that descend from no running worker."""
        live = {c.pid for c in self.workers.values() if c.pid is not None}
        return [p.pid for p in chromium.processes_under(self.data_dir) if not _descends_from(p.pid, live)]

    async def check_orphans(self, outcome: Outcome) -> None:
        async def none_left() -> bool:
            return not self.orphans()

        try:
            await self.until("no orphan Chromium", none_left, REAP_S)
        except AssertionError:
            left = self.orphans()
            outcome.orphans = len(left)
            outcome.problem(f"orphan Chromium processes: {left[:10]}")

    async def check_events(self, outcome: Outcome) -> None:
        """Every committed event delivered to the receiver and seen on the client's feed."""
        feed = self.feed
        assert feed is not None
        rows: list[asyncpg.Record] = []

        async def all_arrived() -> bool:
            nonlocal rows
            try:
                rows = await self.pg_fetch(
                    "SELECT event_id::text AS event_id, state, webhook_url IS NOT NULL AS hooked FROM outbox"
                )
            except (OSError, asyncpg.PostgresError):
                return False
            await feed.read_once()
            return all(
                (not r["hooked"] or (r["state"] == "delivered" and r["event_id"] in self.receiver.events))
                and r["event_id"] in feed.seen
                for r in rows
            )

        with contextlib.suppress(AssertionError):
            await self.until("every committed event delivered", all_arrived, DELIVER_S)
        committed = {r["event_id"] for r in rows}
        undelivered = [r for r in rows if r["hooked"] and r["event_id"] not in self.receiver.events]
        dead = [r for r in rows if r["state"] == "dead"]
        unseen = [r for r in rows if r["event_id"] not in feed.seen]
        phantom = [e for e in self.receiver.events if e not in committed]
        if phantom:  # committed (and delivered) after the rows above were read: look again
            found = await self.pg_fetch(
                "SELECT event_id::text AS event_id FROM outbox WHERE event_id = ANY($1::uuid[])", phantom
            )
            phantom = sorted(set(phantom) - {r["event_id"] for r in found})
        outcome.lost_events = len({r["event_id"] for r in undelivered + unseen})
        if undelivered:
            outcome.problem(
                f"{len(undelivered)} committed event(s) never reached the webhook: "
                + ", ".join(f"{r['event_id']} ({r['state']})" for r in undelivered[:5])
            )
        if dead:
            outcome.problem(f"{len(dead)} event(s) dead-lettered")
        if unseen:
            outcome.problem(f"{len(unseen)} committed event(s) missing from GET /v1/events")
        if phantom:
            outcome.problem(f"{len(phantom)} delivered event(s) not in the outbox: {phantom[:3]}")
        if feed.out_of_order:
            outcome.problem(f"events out of order on the feed: {feed.out_of_order[:3]}")
