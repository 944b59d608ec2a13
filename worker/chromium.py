"""Chromium processes: launch flags, finding a profile's browser process, ending process groups,
and reaping what an earlier run of this worker left behind.

Playwright starts Chromium detached (its own process group), so the browser's pid is also its
process-group id and ``killpg`` ends the browser with its renderers, GPU and zygote processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("walink.chromium")

PROFILE_LOCKS = ("SingletonLock", "SingletonSocket", "SingletonCookie")


def sandboxed(wanted: bool = True) -> bool:
    """Does Chromium run in its own sandbox? Yes unless it is not wanted (``WALINK_CHROMIUM_SANDBOX``)
    or we run as root, where Chromium refuses to start sandboxed. Playwright passes ``--no-sandbox``
    unless told otherwise (its ``chromium_sandbox`` option), so this must be passed on to it."""
    return wanted and os.geteuid() != 0


# what Chromium says when its sandbox cannot start (no user namespaces, no setuid helper)
SANDBOX_FAILURES = ("No usable sandbox", "sandbox_host_linux", "zygote_host_impl_linux")


def sandbox_hint(message: str) -> str:
    """What to add to a failed launch's error when Chromium's sandbox is why it failed."""
    if not any(failure in message for failure in SANDBOX_FAILURES):
        return ""
    return (
        " (Chromium's sandbox needs unprivileged user namespaces, which this host or container "
        "forbids: allow them, or set WALINK_CHROMIUM_SANDBOX=false to run Chromium without it)"
    )


def launch_args(*, sandbox: bool = False) -> list[str]:
    """Flags for every Chromium walink starts (the network is closed); ``--no-sandbox`` unless
    ``sandbox`` (see :func:`sandboxed`)."""
    args = [
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--disable-blink-features=AutomationControlled",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        "--mute-audio",
        "--no-default-browser-check",
        "--password-store=basic",
    ]
    if not sandbox:
        args.append("--no-sandbox")
    return args


def chromium_version(executable: Path) -> str:
    """``156.0.7000.1`` from ``chromium --version``; empty when it cannot be run."""
    try:
        out = subprocess.run(  # noqa: S603 - fixed argv, our own setting
            [str(executable), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for word in out.split():
        if word[:1].isdigit():
            return word
    return ""


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    pgid: int
    cmdline: tuple[str, ...]


def _processes() -> Iterator[Proc]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
            pgid = os.getpgid(pid)
        except (OSError, ProcessLookupError):
            continue
        if raw:
            yield Proc(pid, pgid, tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a))


def _user_data_dir(proc: Proc) -> str | None:
    for arg in proc.cmdline:
        if arg.startswith("--user-data-dir="):
            return arg.split("=", 1)[1]
    return None


def browser_pid_for_profile(profile_dir: Path) -> int | None:
    """The pid of the main browser process running on ``profile_dir`` (not its helpers)."""
    wanted = str(profile_dir.resolve())
    for proc in _processes():
        if _user_data_dir(proc) == wanted and not any(a.startswith("--type=") for a in proc.cmdline):
            return proc.pid
    return None


def kill_group(pgid: int) -> bool:
    """SIGKILL a whole process group; False when it was already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        log.warning("not allowed to kill process group %d", pgid)
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pgid, os.WNOHANG)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def proc_stats() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, the fields of /proc/<pid>/stat after the command name)`` of every process: its
    state first, then its parent, its process group, …, ``utime``/``stime`` at 11/12."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 14:
            yield int(entry.name), fields


def pids_in_group(pgid: int) -> list[int]:
    """The live processes of a process group (no command lines read)."""
    return [pid for pid, fields in proc_stats() if fields[0] != b"Z" and int(fields[2]) == pgid]


async def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Until every process of the group has exited, by pidfd (each fd turns readable when its
    process ends: nothing polled); False when some still run after ``timeout_s``.

    A closed browser's helpers (the storage service among them) can outlive its main process for
    a moment while they flush the profile's databases: a profile is complete only then."""
    loop = asyncio.get_running_loop()
    waiters: list[tuple[int, asyncio.Future[None]]] = []
    for pid in await asyncio.to_thread(pids_in_group, pgid):
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            continue
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _resolve, done)
        waiters.append((fd, done))
    try:
        if waiters:
            await asyncio.wait_for(asyncio.gather(*(f for _, f in waiters)), timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        for fd, _ in waiters:
            loop.remove_reader(fd)
            os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def remove_profile_locks(profile_dir: Path) -> int:
    removed = 0
    for name in PROFILE_LOCKS:
        path = profile_dir / name
        if path.is_symlink() or path.exists():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


def processes_under(root: Path) -> list[Proc]:
    """Processes (Chromium's) whose ``--user-data-dir`` lies inside ``root``."""
    prefix = str(root.resolve()) + os.sep
    return [p for p in _processes() if (_user_data_dir(p) or "").startswith(prefix)]


def groups_under(root: Path) -> set[int]:
    """Process groups of the Chromium running on a profile inside ``root``, never our own group."""
    groups = {p.pgid for p in processes_under(root)}
    groups.discard(os.getpgid(0))
    return groups


def reap(profiles_root: Path) -> tuple[int, int]:
    """Kill every Chromium running on a profile under ``profiles_root`` and drop stale locks.

    Only processes whose ``--user-data-dir`` is inside this worker's own profiles directory are
    touched, so several workers (and anything else on the machine) are left alone. Returns
    ``(process groups killed, lock files removed)``.
    """
    killed = sum(kill_group(g) for g in groups_under(profiles_root))
    locks = 0
    if profiles_root.is_dir():
        for profile in profiles_root.iterdir():
            if profile.is_dir():
                locks += remove_profile_locks(profile)
    if killed or locks:
        log.warning("reaped %d orphan Chromium group(s) and %d stale profile lock(s)", killed, locks)
    return killed, locks


def pss_by_group(pgids: set[int]) -> dict[int, int]:
    """Proportional set size (bytes) of each process group, in one pass over /proc."""
    totals = dict.fromkeys(pgids, 0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:  # the group alone (no cmdline read): this walk runs every few seconds
            pgid = os.getpgid(int(entry.name))
            if pgid not in totals:
                continue
            with open(f"/proc/{entry.name}/smaps_rollup", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Pss:"):
                        totals[pgid] += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError):
            continue
    return totals


class PssGauge:
    """The PSS of a set of process groups, for ``/health`` and ``/metrics``.

    The /proc walk runs in a thread, at most every ``every_s``; a read returns the last figure and
    starts a new walk in the background when it is stale, so a health check never waits on /proc
    (slow with many browsers on a busy machine). Only a figure older than ``wait_after_s`` (or none
    yet) is waited for."""

    def __init__(self, *, every_s: float = 2.0, wait_after_s: float = 10.0) -> None:
        self.every_s = every_s
        self.wait_after_s = wait_after_s
        self.total_bytes = 0
        self._at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def read(self, pgids: Callable[[], set[int]]) -> int:
        now = time.monotonic()
        age_s = None if self._at is None else now - self._at
        if age_s is not None and age_s <= self.every_s:
            return self.total_bytes
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._walk(pgids()), name="pss-walk")
        if age_s is None or age_s > self.wait_after_s:
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        return self.total_bytes

    async def _walk(self, pgids: set[int]) -> None:
        totals = await asyncio.to_thread(pss_by_group, pgids)
        self.total_bytes = sum(totals.values())
        self._at = time.monotonic()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
