"""Processes the chaos suite starts and kills: a private Redis and Postgres on spare ports, and
walink's own processes (simulator, gateway, workers) as real ``python -m …`` children.

The Redis and Postgres are the suite's own (never the shared 6379/5432): their data lives in a
directory under /tmp that the ``postgres`` user owns (initdb and postgres refuse to run as root).
Every child gets SIGTERM when the test process dies (``PR_SET_PDEATHSIG``), so nothing outlives a
killed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from load_tests.ports import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = Path("/usr/bin/redis-server")
START_S = 60.0  # how long a process may take to answer on its port (a busy 2-core box)
STOP_S = 45.0  # how long a process may take to exit after a signal


async def port_answers(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _postgres_user() -> str | None:
    """``postgres`` when we are root (initdb and postgres refuse to run as root). The server is
    then our child itself, not behind ``runuser``, so that our signals reach it."""
    return "postgres" if os.geteuid() == 0 else None


def _child_setup(user: str | None) -> Callable[[], None]:
    """In the child: become ``user`` if given, then ask for SIGTERM when the test process dies
    (after the change of user, which clears that setting), so no child outlives a killed run."""
    ids = pwd.getpwnam(user) if user is not None else None

    def setup() -> None:
        if ids is not None:
            os.setgroups([])
            os.setgid(ids.pw_gid)
            os.setuid(ids.pw_uid)
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)

    return setup


class Child:
    """A child process whose output goes to a log file (read back by ``log_since``)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: Mapping[str, str],
        port: int,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.user = user
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env)
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self, ready_line: str | None = None) -> None:
        assert not self.running(), f"{self.name} is running already"
        offset = self.log_size()
        with self.log_path.open("ab") as out:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_child_setup(self.user),
            )
        self.starts += 1
        async with asyncio.timeout(START_S):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited:\n{self.log_since(offset)[-4000:]}")
                if ready_line is not None:
                    if ready_line in self.log_since(offset):
                        return
                elif await port_answers(self.port):
                    return
                await asyncio.sleep(0.2)  # another process starting: nothing to await but its port/log

    async def wait_log(self, needle: str, *, after: int, timeout_s: float) -> str:
        """The log from ``after`` once it contains ``needle`` (AssertionError after the deadline)."""
        for _ in range(int(timeout_s / 0.2) + 1):
            text = self.log_since(after)
            if needle in text:
                return text
            await asyncio.sleep(0.2)  # written by another process: we can only look again
        raise AssertionError(f"{self.name} never logged {needle!r} within {timeout_s:.0f}s")

    def send(self, sig: int) -> None:
        assert self.proc is not None and self.proc.returncode is None, f"{self.name} is not running"
        self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal and wait for the exit (SIGKILL after ``STOP_S``); the exit code."""
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_S)
        except TimeoutError:
            self.proc.kill()
            return await asyncio.wait_for(self.proc.wait(), STOP_S)


class PrivateRedis:
    """A Redis of the suite's own on a spare port, without persistence: a restart starts empty."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        argv = [
            str(REDIS_SERVER),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ]
        self.child = Child("redis", argv, logs / "redis.log", os.environ, self.port)

    async def start(self) -> None:
        await self.child.start()

    async def stop(self) -> None:
        await self.child.stop(signal.SIGTERM)


class PrivatePostgres:
    """A Postgres cluster of the suite's own (initdb'd under /tmp, owned by ``postgres``)."""

    def __init__(self, logs: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="walink-chaos-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/walink_chaos"
        argv = [
            str(PG_BIN / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",  # a test cluster: durability across a machine crash is not what is tested
        ]
        self.child = Child("postgres", argv, logs / "postgres.log", os.environ, self.port, _postgres_user())

    async def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        proc = await asyncio.create_subprocess_exec(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_child_setup(_postgres_user()),
        )
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()

    async def start(self) -> None:
        await self.child.start()

    async def stop(self) -> None:
        """A fast shutdown (SIGINT: open transactions are rolled back, clients disconnected)."""
        await self.child.stop(signal.SIGINT)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def run_quietly(*argv: str) -> int:
    """Run a short command (mount, umount) to its end; its exit code."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 60)


def walink_env(**values: str) -> dict[str, str]:
    """The environment of a walink child: ours without any WALINK_* key, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALINK_")}
    env.update(values)
    return env


def python_child(
    name: str, module: str, args: list[str], log_path: Path, env: Mapping[str, str], port: int
) -> Child:
    return Child(name, [sys.executable, "-m", module, *args], log_path, env, port)
