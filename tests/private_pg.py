"""A Postgres server of one test, on a spare port, that the test may stop and start again (a real
outage, never the shared server). Run as the ``postgres`` user when the tests run as root
(``initdb`` refuses root)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import asyncpg

from tests.conftest import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S = 60


class PrivatePostgres:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="walink-pg-"))
        self.data = self.dir / "data"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/walink"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    async def _run(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._as_user,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_S + 10)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {out.decode(errors='replace')}")

    async def init(self) -> None:
        await self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    async def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        await self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-o",
            options,
            "-t",
            str(START_TIMEOUT_S),
            "-w",
            "start",
        )

    async def stop(self) -> None:
        await self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-t",
            str(START_TIMEOUT_S),
            "-w",
            "stop",
        )

    async def running(self) -> bool:
        try:
            conn = await asyncpg.connect(self.dsn.rsplit("/", 1)[0] + "/postgres", timeout=5)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    async def close(self) -> None:
        if await self.running():
            await self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
