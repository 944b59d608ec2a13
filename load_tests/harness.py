"""Process management for the benchmark: simulator, workers, gateway, a throwaway database.

One :class:`Harness` per run owns everything the run starts:

* a working directory (``walink_bench_<pid>_…`` under ``--workdir`` or the system temp dir) with
  the workers' data directories, the baseline's browser profiles and every process's log;
* a Postgres database ``walink_bench_<pid>`` (created and migrated here, dropped at the end);
* a Redis key prefix ``walink_bench:<pid>:`` (its keys are deleted at the end);
* the simulator (``python -m simulator``), workers (``python -m worker``) and the gateway
  (``python -m gateway``), each in its own process group with ``PR_SET_PDEATHSIG`` so that even a
  SIGKILLed benchmark takes them down.

:meth:`Harness.close` stops everything in order (gateway, workers, simulator), kills any Chromium
whose profile lives under the working directory, and cleans the database and Redis. It runs on a
normal exit, on an error and on Ctrl-C/SIGTERM (the caller cancels the main task); an ``atexit``
hook does the synchronous part (processes, Chromium) if the loop could not.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from load_tests.client import ScanRefused
from load_tests.ports import free_port
from shared import db
from shared.settings import HEADLESS_SHELL
from shared.store import Store
from worker import chromium

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
PR_SET_PDEATHSIG = 1

Progress = Callable[[str], None]


def _load_prctl() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved in the parent: the child only calls it between fork and exec


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark process dies, however it dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _pid_of(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LIFTED_QUOTAS = {
    "WALINK_QUOTA_SESSIONS": "100000",
    "WALINK_QUOTA_LINKINGS": "100000",
    "WALINK_QUOTA_CREATES_PER_MINUTE": "1000000",
    "WALINK_SSE_MAX_PER_WORKSPACE": "100000",
    "WALINK_SSE_MAX_PER_GATEWAY": "100000",
}


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``WALINK_*`` (settings refuse unknown ones), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALINK_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _open_log(path: Path) -> BinaryIO:
    """The log file a child writes to (the caller closes its copy once the child has started)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


class ProcessError(RuntimeError):
    """A process did not start, or died while it was needed."""


class ManagedProcess:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        with _open_log(self.log_path) as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=str(ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the benchmark only; it stops children in order
                preexec_fn=_die_with_parent,  # only a prctl call between fork and exec
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send(self, sig: int) -> None:
        if self.alive and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def stop(self, timeout_s: float, sig: int = signal.SIGTERM) -> int | None:
        """Signal, wait up to ``timeout_s``, then SIGKILL the whole process group."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.send(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), timeout_s)
        self.kill_group()
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL the process group (the process and anything it started in the group)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Worker(ManagedProcess):
    def __init__(self, port: int, data_dir: Path, env: dict[str, str], log_path: Path) -> None:
        super().__init__(f"worker:{port}", [sys.executable, "-m", "worker"], env, log_path)
        self.port = port
        self.data_dir = data_dir
        self.url = f"http://{LOOPBACK}:{port}"
        self.node_name = f"{LOOPBACK}:{port}"  # the worker's name on the ring and in leases

    @property
    def profiles_dir(self) -> Path:
        return self.data_dir / f"worker-{self.port}" / "profiles"


class Gateway(ManagedProcess):
    def __init__(self, port: int, env: dict[str, str], log_path: Path, api_key: str, admin_key: str) -> None:
        super().__init__(f"gateway:{port}", [sys.executable, "-m", "gateway"], env, log_path)
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self.api_key = api_key  # a key of workspace "default": what a SaaS backend holds
        self.admin_key = admin_key  # for /health/cluster only

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}


@dataclass
class HarnessConfig:
    chromium_path: Path
    pg_admin_dsn: str
    redis_url: str
    workdir_parent: Path | None = None
    keep_workdir: bool = False
    # WALINK_* settings applied to every worker and gateway (``--set``), after the harness's own
    extra_env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 40.0


class RunOptions(Protocol):
    """What a command-line run (the benchmark, the load test) tells the harness."""

    chromium: Path
    pg: str
    redis: str
    workdir: Path | None
    keep_workdir: bool
    set_env: dict[str, str]


def config_of(opts: RunOptions) -> HarnessConfig:
    return HarnessConfig(
        chromium_path=opts.chromium,
        pg_admin_dsn=opts.pg,
        redis_url=opts.redis,
        workdir_parent=opts.workdir,
        keep_workdir=opts.keep_workdir,
        extra_env=opts.set_env,
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options every run (the benchmark, the load test) shares: see :class:`RunOptions`."""
    p.add_argument("--workdir", type=Path, help="parent of the run's working directory (default: temp dir)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the processes' logs and profiles")
    p.add_argument(
        "--chromium",
        type=Path,
        default=Path(os.environ.get("CHROMIUM_PATH", str(HEADLESS_SHELL))),
        help="walink's browser (default: chromium-headless-shell, as in production)",
    )
    p.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="admin DSN; the run creates and drops its own database next to it",
    )
    p.add_argument("--redis", default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    p.add_argument(
        "--set",
        dest="set_env",
        action="append",
        default=[],
        metavar="WALINK_NAME=VALUE",
        help="a setting for every worker and the gateway (repeatable)",
    )


def set_env_of(p: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """``--set`` values as environment entries (an error on the command line when malformed)."""
    set_env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("WALINK_"):
            p.error(f"--set wants WALINK_NAME=VALUE, not {item!r}")
        set_env[key] = value
    return set_env


def run_main(run: Callable[[Any], Coroutine[Any, Any, int]], opts: Any) -> None:
    """A run's process: its exit code, 130 on Ctrl-C."""
    code: int
    try:
        code = asyncio.run(run(opts))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def cancel_on_sigterm() -> None:
    """SIGTERM cancels the running task: a run's ``finally`` then stops everything it started."""
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def gateway_available() -> bool:
    return (ROOT / "gateway" / "app.py").is_file() and (ROOT / "gateway" / "__main__.py").is_file()


class Harness:
    """Everything a benchmark run starts, and the guarantee that it all stops."""

    def __init__(self, config: HarnessConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _msg: None)
        self.run_pid = os.getpid()
        self.db_name = f"walink_bench_{self.run_pid}"
        self.dsn = config.pg_admin_dsn.rsplit("/", 1)[0] + "/" + self.db_name
        self.redis_prefix = f"walink_bench:{self.run_pid}:"
        self.snapshot_key = base64.b64encode(os.urandom(32)).decode()
        parent = config.workdir_parent or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"walink_bench_{self.run_pid}_", dir=parent)).resolve()
        self.data_dir = self.workdir / "var"
        self.logs_dir = self.workdir / "logs"
        self.processes: list[ManagedProcess] = []
        self.sim_url = ""
        self.simulator: ManagedProcess | None = None
        self.pool: asyncpg.Pool | None = None
        self.http: aiohttp.ClientSession | None = None
        self._db_created = False
        self._closed = False
        atexit.register(self._last_resort)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Harness:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self.http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )
        self.progress(f"workdir {self.workdir}; database {self.db_name}; redis prefix {self.redis_prefix}")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reap_stale_runs(), 30)
        await asyncio.wait_for(self._create_database(), 60)
        self.pool = await db.create_pool(self.dsn, max_size=4)
        await self.start_simulator()

    async def _create_database(self) -> None:
        admin = await asyncpg.connect(self.config.pg_admin_dsn, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{self.db_name}"')
            self._db_created = True
        finally:
            await admin.close()
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    async def _reap_stale_runs(self) -> None:
        """What earlier runs killed with SIGKILL left (their processes died with them, by
        PDEATHSIG): databases, Redis keys and working directories of benchmark pids no longer alive."""
        admin = await asyncpg.connect(self.config.pg_admin_dsn, timeout=10)
        try:
            names = [
                r["datname"]
                for r in await admin.fetch(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'walink\\_bench\\_%'"
                )
            ]
            for name in names:
                pid = _pid_of(name.removeprefix("walink_bench_"))
                if pid is not None and pid != self.run_pid and not _alive(pid):
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    self.progress(f"dropped {name}, left by a run that no longer exists")
        finally:
            await admin.close()
        client = aioredis.from_url(self.config.redis_url)
        try:
            stale: list[bytes] = []
            async for key in client.scan_iter(match="walink_bench:*", count=1000):
                pid = _pid_of(key.decode(errors="replace").split(":")[1] if b":" in key else "")
                if pid is not None and pid != self.run_pid and not _alive(pid):
                    stale.append(key)
            for i in range(0, len(stale), 500):
                await client.delete(*stale[i : i + 500])
        finally:
            await client.aclose()
        for entry in self.workdir.parent.glob("walink_bench_*_*"):
            pid = _pid_of(entry.name.split("_")[2])
            if entry.is_dir() and pid is not None and pid != self.run_pid and not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)

    async def close(self) -> None:
        """Stop everything (gateway, workers, simulator), reap Chromium, drop the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            gateways = [p for p in self.processes if isinstance(p, Gateway) and p.alive]
            await asyncio.gather(*(p.stop(10) for p in gateways), return_exceptions=True)
            workers = [p for p in self.processes if isinstance(p, Worker) and p.alive]
            if workers:
                self.progress(f"stopping {len(workers)} worker(s)")
            await asyncio.gather(
                *(p.stop(self.config.stop_timeout_s) for p in workers), return_exceptions=True
            )
            rest = [p for p in self.processes if p.alive]
            await asyncio.gather(*(p.stop(10) for p in rest), return_exceptions=True)
        finally:
            for p in self.processes:
                p.kill_group()
            left = self.reap_chromium()
            if left:
                self.progress(f"killed {left} leftover Chromium process group(s)")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drop_state(), 30)
            if self.http is not None:
                await self.http.close()
            if not self.config.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            else:
                for lock in self.workdir.rglob("Singleton*"):
                    with contextlib.suppress(OSError):
                        lock.unlink()
            atexit.unregister(self._last_resort)

    async def _drop_state(self) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 10)
            self.pool = None
        client = aioredis.from_url(self.config.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=self.redis_prefix + "*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i : i + 500])
        finally:
            await client.aclose()
        if self._db_created:
            admin = await asyncpg.connect(self.config.pg_admin_dsn, timeout=10)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            finally:
                await admin.close()

    def _last_resort(self) -> None:
        """atexit: the loop is gone; at least no process and no Chromium of this run stays."""
        for p in self.processes:
            p.kill_group()
        self.reap_chromium()
        if not self.config.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cluster_env(self, name: str) -> dict[str, str]:
        """Settings of a separate cluster inside this run: its own Redis prefix (under the run's), so
        its gateway neither sees nor routes to the workers of other steps (membership is by heartbeat)."""
        return {"WALINK_REDIS_PREFIX": f"{self.redis_prefix}{name}:"}

    # ------------------------------------------------------------------ Chromium
    @staticmethod
    def kill_chromium_under(root_dir: Path) -> int:
        """Kill every Chromium whose profile lives under ``root_dir`` (any process group but ours)."""
        groups = chromium.groups_under(root_dir)
        for pgid in groups:
            chromium.kill_group(pgid)
        return len(groups)

    def reap_chromium(self) -> int:
        """Kill every Chromium whose profile lives under the working directory (any process group)."""
        return self.kill_chromium_under(self.workdir)

    # ------------------------------------------------------------------ processes
    def _base_env(self) -> dict[str, str]:
        return {
            "WALINK_DATABASE_URL": self.dsn,
            "WALINK_REDIS_URL": self.config.redis_url,
            "WALINK_REDIS_PREFIX": self.redis_prefix,
            "CHROMIUM_PATH": str(self.config.chromium_path),
        }

    async def start_simulator(self, profile: str = "instant") -> None:
        port = free_port()
        proc = ManagedProcess(
            "simulator",
            [
                sys.executable,
                "-m",
                "simulator",
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--profile",
                profile,
            ],
            clean_env({}),
            self.logs_dir / "simulator.log",
        )
        self.processes.append(proc)
        self.simulator = proc
        await proc.start()
        self.sim_url = f"http://{LOOPBACK}:{port}"
        await self._until_http_ok(proc, self.sim_url + "/admin/profile", 30)

    def worker_env(self, port: int, env: Mapping[str, str]) -> dict[str, str]:
        return clean_env(
            {
                **self._base_env(),
                "WALINK_WORKER_PORT": str(port),
                "WALINK_DATA_DIR": str(self.data_dir),
                "WALINK_SIMULATOR_URL": self.sim_url,
                "WALINK_SNAPSHOT_KEY": self.snapshot_key,
                "WALINK_LOG_LEVEL": "INFO",
                "WALINK_WEBHOOK_ALLOW": "127.0.0.0/8,::1",  # the benchmark's receiver is on loopback
                **self.config.extra_env,
                **env,
            }
        )

    async def start_worker(self, **env: str) -> Worker:
        """A ``python -m worker`` on a fresh port (a fresh name: it restores nothing of another step)."""
        port = free_port()
        worker = Worker(port, self.data_dir, self.worker_env(port, env), self.logs_dir / f"worker-{port}.log")
        self.processes.append(worker)
        await worker.start()
        await self._until_http_ok(worker, worker.url + "/health", self.config.start_timeout_s)
        return worker

    async def restart_worker(self, old: Worker) -> Worker:
        """The same worker again (same port, name and data directory), e.g. after a SIGKILL."""
        if old.alive:
            await old.stop(self.config.stop_timeout_s)
        worker = Worker(old.port, old.data_dir, old.env, old.log_path)
        self.processes.append(worker)
        await worker.start()
        await self._until_http_ok(worker, worker.url + "/health", self.config.start_timeout_s)
        return worker

    async def start_workers(self, n: int, **env: str) -> list[Worker]:
        return list(await asyncio.gather(*(self.start_worker(**env) for _ in range(n))))

    async def stop_workers(self, workers: list[Worker]) -> None:
        """SIGTERM (the worker ends its browsers within its shutdown deadline), SIGKILL after
        ``stop_timeout_s``; then no Chromium may be left on their profiles."""
        started = time.monotonic()
        codes = await asyncio.gather(
            *(w.stop(self.config.stop_timeout_s) for w in workers), return_exceptions=True
        )
        slow = [w.name for w, c in zip(workers, codes, strict=True) if c not in (0, None)]
        left = sum(self.kill_chromium_under(w.profiles_dir) for w in workers)
        if slow or left:
            self.progress(
                f"stopped {len(workers)} worker(s) in {time.monotonic() - started:.1f}s; "
                f"not a clean exit: {slow or 'none'} (codes {codes}); Chromium groups left and killed: {left}"
            )

    async def start_gateway(self, workers: list[Worker], **env: str) -> Gateway:
        if not gateway_available():
            raise ProcessError("gateway/app.py does not exist yet")
        store = self.store
        await store.ensure_workspace("default")
        api_key = await store.create_api_key("default")
        admin_key = await store.create_api_key(None, admin=True)
        port = free_port()
        gw_env = clean_env(
            {
                **self._base_env(),
                "WALINK_GATEWAY_PORT": str(port),
                "WALINK_WORKERS": ",".join(w.node_name for w in workers),
                "WALINK_LOG_LEVEL": "INFO",
                # a benchmark is one workspace taking the whole cluster, which the per-workspace
                # quotas exist to prevent (docs/limits.md): lifted here (``--set`` may set them)
                **LIFTED_QUOTAS,
                **self.config.extra_env,
                **env,
            }
        )
        gateway = Gateway(port, gw_env, self.logs_dir / f"gateway-{port}.log", api_key, admin_key)
        self.processes.append(gateway)
        await gateway.start()
        await self._until_http_ok(gateway, gateway.url + "/health", self.config.start_timeout_s)
        return gateway

    async def _until_http_ok(self, proc: ManagedProcess, url: str, timeout_s: float) -> None:
        assert self.http is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive:
                raise ProcessError(f"{proc.name} exited during start:\n{proc.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise ProcessError(f"{proc.name} not answering {url} after {timeout_s:.0f}s:\n{proc.log_tail()}")

    # ------------------------------------------------------------------ the simulator's APIs
    async def sim_post(self, path: str, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.post(
            self.sim_url + path, json=body, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            data: dict[str, Any] = await resp.json()
            if resp.status != expect:
                raise ProcessError(f"simulator {path} → {resp.status}: {data}")
            return data

    async def sim_profile(self, name: str, **overrides: Any) -> dict[str, Any]:
        return await self.sim_post("/admin/profile", {"name": name, **overrides})

    async def scan(self, qr: str, phone: str) -> dict[str, Any]:
        """The phone scans ``qr``: the 200 body, else :class:`ScanRefused` with the phone's error
        (409 ``couldnt_link_device`` and 410 ``qr_expired`` mean: scan the next QR)."""
        assert self.http is not None
        async with self.http.post(
            self.sim_url + "/phone/scan",
            json={"qr": qr, "phone": phone},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            data: dict[str, Any] = await resp.json(content_type=None)
            if resp.status != 200:
                error = data.get("error") or {}
                raise ScanRefused(resp.status, str(error.get("code", "")), str(error.get("message", "")))
            return data

    async def devices(self, phone: str) -> list[dict[str, Any]]:
        assert self.http is not None
        async with self.http.get(
            self.sim_url + "/phone/devices", params={"phone": phone}, timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            data = await resp.json()
            devices: list[dict[str, Any]] = data["devices"]
            return devices

    # ------------------------------------------------------------------ database reads
    @property
    def store(self) -> Store:
        assert self.pool is not None
        return Store(self.pool)

    async def webhook_secret(self, workspace_id: str = "default") -> str:
        workspace = await self.store.get_workspace(workspace_id)
        if workspace is None:
            raise ProcessError(f"no workspace {workspace_id!r} in the benchmark database")
        return workspace.webhook_secret

    async def session_status(self, session_id: str) -> str | None:
        """The session's state as committed in Postgres (reading it does not wake a hibernated session)."""
        rec = await self.store.load_session(session_id)
        return None if rec is None or rec["status"] is None else str(rec["status"])

    async def session_timings(self, session_id: str) -> dict[str, Any]:
        """The session's ``timings`` as committed in Postgres (no request to a worker: no wake)."""
        rec = await self.store.load_session(session_id)
        timings = None if rec is None else rec["timings"]
        return dict(timings) if isinstance(timings, dict) else {}

    async def session_states(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each session's ``status``, ``owner`` and ``history`` as committed in Postgres, in one
        query (reading them wakes nothing)."""
        assert self.pool is not None
        rows = await self.pool.fetch(
            "SELECT id, session_status, owner, history FROM whatsapp_accounts WHERE id = ANY($1::text[])",
            session_ids,
        )
        states: dict[str, dict[str, Any]] = {}
        for row in rows:
            history = row["history"]
            if isinstance(history, str | bytes):
                history = orjson.loads(history)
            states[str(row["id"])] = {
                "status": row["session_status"],
                "owner": row["owner"],
                "history": list(history or []),
            }
        return states

    async def snapshot_size(self, session_id: str) -> int | None:
        assert self.pool is not None
        value = await self.pool.fetchval(
            "SELECT size_bytes FROM profile_snapshots WHERE session_id = $1", session_id
        )
        return None if value is None else int(value)

    async def retire_sessions_of(self, workers: list[Worker]) -> int:
        """After a step's workers stopped: mark what they left as deleted, so that no worker of a
        later step (nor a gateway) adopts it. The rows stay for the record; the database is dropped
        at the end anyway."""
        assert self.pool is not None
        result = await self.pool.execute(
            "UPDATE whatsapp_accounts SET session_status = 'deleted', deleted_at = now()"
            " WHERE deleted_at IS NULL AND owner = ANY($1::text[])",
            [w.node_name for w in workers],
        )
        return int(str(result).rsplit(" ", 1)[-1] or 0)

    async def retire_workers(self, workers: list[Worker]) -> None:
        """The end of a step's own workers: stop them, then retire the sessions they left."""
        await self.stop_workers(workers)
        await self.retire_sessions_of(workers)


def chromium_version(path: Path) -> str:
    return chromium.chromium_version(path)
