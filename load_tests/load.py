"""``python -m load_tests.load`` (``make load``): a mixed Locust load on a real cluster, bounded in
time, failing on any error.

1. :mod:`load_tests.harness` starts the simulator (``strict`` profile: every behaviour of the 2026
   page), 4 workers (warm pool 2 each) and the gateway, as real processes with a throwaway
   database and Redis prefix; the gateway's API key is the one the users send.
2. A few sessions are linked for the ``Reader`` users (create, scan the QR with the simulated phone,
   ``session_ready`` on SSE).
3. Locust runs ``load_tests/locustfile.py`` headless as a subprocess for ``--run-time``:
   ``AddAccount`` users (``--linkers``, each one a real Chromium while it links) add an account,
   get its QR on SSE, scan it, wait for ``session_ready`` on SSE, read it and log out (or delete
   it); ``Reader`` users read the linked sessions and ``/health``. One progress line every
   ``--every`` seconds on stderr.
4. The cluster is checked (every process still up, ``/health/cluster`` healthy, the readers'
   sessions still ready, no session of the load left linked, no traceback in any log), the
   workers are stopped (a clean exit, no Chromium left on their profiles), then everything else.

stdout gets the summary of Locust's ``<csv>_stats.csv`` (name, requests, failures, median, p95,
requests/s), then its failures and errors. Exit status 0 only when Locust reported no failure and
no error and the cluster had no problem; 1 otherwise; 130 when interrupted. The CSV files and
Locust's log stay in ``var/load/``.

    python -m load_tests.load                             # 20 users (3 linkers) for 60 s
    python -m load_tests.load --users 10 --run-time 30s --linkers 2
    LOAD_USERS=40 LOAD_RUN_TIME=2m make load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from load_tests.client import Api, ClientError, link, wait_pool_full
from load_tests.harness import (
    ROOT,
    Gateway,
    Harness,
    ManagedProcess,
    ProcessError,
    Worker,
    add_run_arguments,
    cancel_on_sigterm,
    clean_env,
    config_of,
    run_main,
    set_env_of,
)
from worker import chromium

LOCUSTFILE = ROOT / "load_tests" / "locustfile.py"
POOL_WAIT_S = 120.0  # every worker's warm pool on the QR screen, on a loaded 2-core machine
LINK_WAIT_S = 60.0  # one event while linking a reader's session
STOP_TIMEOUT_S = 60  # Locust lets a user finish its flow (it logs out what it linked) at the end
LOCUST_MARGIN_S = 60.0  # beyond run time + stop timeout, Locust is stopped and that is a problem
# a status in which no session of the load may be left once Locust is done
LIVE = ("starting", "qr", "authenticated", "passkey_required", "ready", "hibernated")
# Locust entries that must have requests, or the mix did not run
REQUIRED = ("add account", "QR on SSE", "phone scan", "scan → ready on SSE", "/health")


def print_progress(started: float, msg: str) -> None:
    print(f"[load {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)


def timespan_s(text: str) -> float:
    """Locust's ``--run-time`` format (``60``, ``90s``, ``2m``, ``1h30m``) in seconds."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    parts = re.fullmatch(r"(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"not a time span: {text!r} (e.g. 60s, 2m, 1h30m)")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


@dataclass
class Options:
    chromium: Path
    pg: str
    redis: str
    users: int = 20
    spawn_rate: float = 5.0
    run_time: str = "60s"
    linkers: int = 3
    sessions: int = 4
    workers: int = 4
    warm_pool: int = 2
    profile: str = "strict"
    csv_prefix: Path = ROOT / "var" / "load" / "load"
    every_s: float = 10.0
    workdir: Path | None = None
    keep_workdir: bool = False
    set_env: dict[str, str] = field(default_factory=dict)

    @property
    def run_s(self) -> float:
        return timespan_s(self.run_time)


@dataclass
class Outcome:
    problems: list[str] = field(default_factory=list)
    locust_rc: int | None = None
    interrupted: bool = False


# ---------------------------------------------------------------------------- the cluster
def _http(h: Harness) -> aiohttp.ClientSession:
    assert h.http is not None  # the harness is open
    return h.http


async def until_cluster_healthy(
    h: Harness, gateway: Gateway, workers: list[Worker], timeout_s: float
) -> None:
    """Until ``/health/cluster`` (admin key) says healthy with every worker on the ring."""
    wanted = {w.node_name for w in workers}
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = await cluster_view(h, gateway)
        if view.get("status") == "healthy" and wanted <= set((view.get("ring") or {}).get("nodes") or []):
            return
        await asyncio.sleep(0.2)
    raise ProcessError(f"the cluster is not healthy after {timeout_s:.0f}s: {view.get('status')}")


async def cluster_view(h: Harness, gateway: Gateway) -> dict[str, Any]:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with _http(h).get(
            gateway.url + "/health/cluster",
            headers=gateway.admin_headers,
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            if resp.status == 200:
                view: dict[str, Any] = await resp.json()
                return view
    return {}


async def link_readers(h: Harness, api: Api, n: int, progress: Callable[[str], None]) -> list[str]:
    """``n`` sessions linked through the gateway (the phone scans as a user does), for ``Reader``."""
    ids = []
    for i in range(1, n + 1):
        phone = f"17{os.getpid() % 10_000:04d}{i:06d}"  # the locustfile's linkers use 19…
        t0 = time.monotonic()
        created = await link(api, h.scan, phone, timeout_s=LINK_WAIT_S, label=f"load-reader-{i}")
        ids.append(str(created["id"]))
        progress(f"reader session {i}/{n} {created['id']} ready in {time.monotonic() - t0:.1f}s")
    return ids


async def check_cluster(
    h: Harness, gateway: Gateway, workers: list[Worker], reader_ids: list[str]
) -> list[str]:
    """What went wrong with the cluster during the load (empty: nothing)."""
    problems = [
        f"{p.name} exited ({p.proc.returncode if p.proc else '?'})"
        for p in h.processes
        if not p.alive and p.name != "locust"
    ]
    view = await cluster_view(h, gateway)
    if view.get("status") != "healthy":
        problems.append(f"/health/cluster says {view.get('status') or 'nothing'} after the load")
    api = Api(_http(h), gateway.url, gateway.headers, timeout_s=30)
    for sid in reader_ids:
        try:
            status = (await api.get(sid)).get("status")
        except ClientError as exc:
            problems.append(f"reader session {sid}: {exc}")
            continue
        if status != "ready":
            problems.append(f"reader session {sid} is {status} after the load, not ready")
    assert h.pool is not None
    left = await h.pool.fetch(
        "SELECT id, session_status FROM whatsapp_accounts"
        " WHERE deleted_at IS NULL AND session_status = ANY($1::text[]) AND NOT (id = ANY($2::text[]))",
        list(LIVE),
        reader_ids,
    )
    if left:
        shown = ", ".join(f"{r['id']} {r['session_status']}" for r in left[:5])
        problems.append(f"{len(left)} session(s) of the load neither logged out nor deleted: {shown}")
    return problems


def log_problems(processes: list[ManagedProcess]) -> list[str]:
    """A traceback in a process's log is a problem; its first lines are shown on stderr."""
    problems = []
    for p in processes:
        try:
            lines = p.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        if tracebacks:
            first = tracebacks[0]
            problems.append(
                f"{len(tracebacks)} traceback(s) in the log of {p.name}; the first:\n    "
                + "\n    ".join(lines[max(0, first - 2) : first + 25])
            )
    return problems


async def stop_cluster(h: Harness, gateway: Gateway, workers: list[Worker]) -> list[str]:
    """The gateway, then the workers (SIGTERM): each must exit cleanly and leave no Chromium."""
    await gateway.stop(10)
    codes = await asyncio.gather(*(w.stop(h.config.stop_timeout_s) for w in workers), return_exceptions=True)
    problems = [
        f"{w.name} exited with {c!r} at SIGTERM" for w, c in zip(workers, codes, strict=True) if c != 0
    ]
    left = sum(h.kill_chromium_under(w.profiles_dir) for w in workers)
    if left:
        problems.append(f"{left} Chromium process group(s) left on the workers' profiles after they stopped")
    return problems


# ---------------------------------------------------------------------------- Locust
def locust_argv(opts: Options, host: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(opts.users),
        "--spawn-rate",
        str(opts.spawn_rate),
        "--run-time",
        opts.run_time,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--csv",
        str(opts.csv_prefix),
        "--only-summary",
        "--exit-code-on-error",
        "1",
    ]


def csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def history_line(opts: Options) -> str:
    """Locust's latest aggregated figures, from ``<csv>_stats_history.csv`` (written every second)."""
    rows = [
        r for r in csv_rows(Path(f"{opts.csv_prefix}_stats_history.csv")) if r.get("Name") == "Aggregated"
    ]
    if not rows:
        return "starting"
    last = rows[-1]
    return (
        f"{last.get('User Count')} users, {last.get('Total Request Count')} requests, "
        f"{last.get('Total Failure Count')} failures, {float(last.get('Requests/s') or 0):.1f} req/s"
    )


async def run_locust(
    opts: Options, h: Harness, gateway: Gateway, reader_ids: list[str], progress: Callable[[str], None]
) -> int | None:
    """Locust headless against the gateway for ``--run-time``; its exit code (None: it had to be stopped)."""
    opts.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
    for old in opts.csv_prefix.parent.glob(opts.csv_prefix.name + "_*.csv"):
        old.unlink()
    log_path = opts.csv_prefix.parent / "locust.log"
    log_path.unlink(missing_ok=True)
    env = clean_env(
        {
            "BENCH_API_KEY": gateway.api_key,
            "BENCH_SESSION_IDS": ",".join(reader_ids),
            "BENCH_SIMULATOR_URL": h.sim_url,
            "BENCH_LINK": "1",
            "BENCH_LINKERS": str(opts.linkers),
        }
    )
    proc = ManagedProcess("locust", locust_argv(opts, gateway.url), env, log_path)
    h.processes.append(proc)  # the harness stops it too, whatever happens here
    progress(
        f"locust: {opts.users} users ({opts.linkers} adding accounts) at {opts.spawn_rate:g}/s "
        f"for {opts.run_time} against {gateway.url}; log {log_path}"
    )
    await proc.start()
    assert proc.proc is not None
    t0 = time.monotonic()
    deadline = t0 + opts.run_s + STOP_TIMEOUT_S + LOCUST_MARGIN_S
    try:
        while proc.alive and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.proc.wait(), opts.every_s)
                break
            down = [p.name for p in h.processes if p is not proc and not p.alive]
            suffix = f"; DOWN: {', '.join(down)}" if down else ""
            progress(
                f"locust {time.monotonic() - t0:4.0f}s/{opts.run_s:.0f}s: {history_line(opts)}; "
                f"load average {os.getloadavg()[0]:.1f}{suffix}"
            )
    except asyncio.CancelledError:
        await proc.stop(10)  # Locust first: its users would only count the cluster's teardown
        raise
    if proc.alive:
        progress(f"locust still running {time.monotonic() - t0:.0f}s after its start: stopping it")
        await proc.stop(10, signal.SIGINT)
        return None
    return proc.proc.returncode


# ---------------------------------------------------------------------------- the summary
def _ms(value: str) -> str:
    """A time of the CSV in whole milliseconds (Locust writes a lone sample's median unrounded)."""
    try:
        return f"{float(value):.0f}"
    except ValueError:
        return value


def summary_table(rows: list[dict[str, str]]) -> str:
    """Locust's ``_stats.csv`` as a table: type, name, requests, failures, median, p95, req/s."""
    head = ("type", "name", "requests", "failures", "median ms", "p95 ms", "req/s")
    body = [
        (
            r.get("Type", ""),
            r.get("Name", ""),
            r.get("Request Count", ""),
            r.get("Failure Count", ""),
            _ms(r.get("Median Response Time", "")),
            _ms(r.get("95%", "")),
            f"{float(r.get('Requests/s') or 0):.2f}",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    right = {2, 3, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(b) for b in body)])


def report(opts: Options, outcome: Outcome) -> int:
    """Print the summary, the failures and the problems; the exit status."""
    stats = csv_rows(Path(f"{opts.csv_prefix}_stats.csv"))
    failures = csv_rows(Path(f"{opts.csv_prefix}_failures.csv"))
    errors = csv_rows(Path(f"{opts.csv_prefix}_exceptions.csv"))
    problems = list(outcome.problems)
    if stats:
        print(
            f"Locust, {opts.users} users ({opts.linkers} adding accounts), {opts.run_time}"
            f" ({opts.csv_prefix}_stats.csv):"
        )
        print(summary_table(stats))
        total = next((r for r in stats if r.get("Name") == "Aggregated"), {})
        if int(total.get("Failure Count") or 0):
            problems.append(f"Locust counted {total.get('Failure Count')} failure(s)")
        seen = {r.get("Name") for r in stats if int(r.get("Request Count") or 0)}
        missing = [n for n in REQUIRED if n not in seen]
        if missing:
            problems.append(f"no request of: {', '.join(missing)} (the mix did not run)")
    elif outcome.locust_rc is not None or not problems:
        problems.append(f"no statistics in {opts.csv_prefix}_stats.csv")
    for f in failures:
        print(f"FAILURE {f.get('Method')} {f.get('Name')}: {f.get('Error')} (x{f.get('Occurrences')})")
    for e in errors:
        print(f"ERROR (x{e.get('Count')}) {e.get('Message')}\n{e.get('Traceback')}")
    if errors:
        problems.append(f"{len(errors)} error(s) raised in Locust users")
    if outcome.locust_rc not in (0, None) and not failures and not errors:
        problems.append(f"locust exited with {outcome.locust_rc}")
    if outcome.interrupted:
        print("interrupted")
        return 130
    for p in problems:
        print(f"PROBLEM {p}")
    print("load: FAILED" if problems else "load: ok (no failure, no error, the cluster fine)")
    return 1 if problems else 0


# ---------------------------------------------------------------------------- the run
async def run(opts: Options) -> int:
    started = time.monotonic()
    progress = functools.partial(print_progress, started)
    cancel_on_sigterm()
    config = config_of(opts)
    outcome = Outcome()
    workdir: Path | None = None
    try:
        async with Harness(config, progress) as h:
            workdir = h.workdir
            await load(opts, h, outcome, progress)
    except asyncio.CancelledError:
        outcome.interrupted = True
        progress("interrupted: everything this run started has been stopped")
    except (ProcessError, ClientError, OSError) as exc:
        outcome.problems.append(f"{type(exc).__name__}: {exc}")
        progress(f"FAILED {type(exc).__name__}: {exc}")
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    if workdir is not None:
        left = chromium.groups_under(workdir)
        if left:
            outcome.problems.append(f"{len(left)} Chromium process group(s) still running after the teardown")
        else:
            progress("torn down: no process and no Chromium of this run left")
    return report(opts, outcome)


async def load(opts: Options, h: Harness, outcome: Outcome, progress: Callable[[str], None]) -> None:
    await h.sim_profile(opts.profile)  # before the workers: the page reads its profile at boot
    progress(
        f"simulator {h.sim_url} ({opts.profile}); "
        f"starting {opts.workers} workers (warm pool {opts.warm_pool}) and the gateway"
    )
    workers = await h.start_workers(opts.workers, WALINK_WARM_POOL_SIZE=str(opts.warm_pool))
    gateway = await h.start_gateway(workers)
    await until_cluster_healthy(h, gateway, workers, 60)
    for w in workers:
        await wait_pool_full(Api(_http(h), w.url), POOL_WAIT_S)
    progress(f"gateway {gateway.url} and {len(workers)} workers up, warm pools full")
    api = Api(_http(h), gateway.url, gateway.headers)
    reader_ids = await link_readers(h, api, opts.sessions, progress)
    outcome.locust_rc = await run_locust(opts, h, gateway, reader_ids, progress)
    if outcome.locust_rc is None:
        outcome.problems.append("Locust did not end in time and was stopped")
    progress(f"locust exited with {outcome.locust_rc}; checking the cluster")
    outcome.problems += await check_cluster(h, gateway, workers, reader_ids)
    outcome.problems += await stop_cluster(h, gateway, workers)
    outcome.problems += log_problems([p for p in h.processes if p.name != "locust"])


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> Options:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m load_tests.load",
        description="A mixed Locust load (add account → QR → scan → ready over SSE, reads, logouts) "
        "on a cluster it starts; fails on any error.",
    )
    p.add_argument(
        "--users", type=int, default=int(env("LOAD_USERS", "20")), help="Locust users (LOAD_USERS)"
    )
    p.add_argument(
        "--spawn-rate",
        type=float,
        default=float(env("LOAD_SPAWN_RATE", "5")),
        help="users started per second",
    )
    p.add_argument(
        "--run-time",
        default=env("LOAD_RUN_TIME", "60s"),
        help="how long the load runs, e.g. 60s (LOAD_RUN_TIME)",
    )
    p.add_argument(
        "--linkers",
        type=int,
        default=int(env("LOAD_LINKERS", "3")),
        help="users adding accounts, each a real Chromium while it links (LOAD_LINKERS)",
    )
    p.add_argument(
        "--sessions", type=int, default=int(env("LOAD_SESSIONS", "4")), help="sessions linked for the readers"
    )
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--warm-pool", type=int, default=2, help="WALINK_WARM_POOL_SIZE of each worker")
    p.add_argument("--profile", default="strict", help="the simulator's profile")
    p.add_argument("--csv", dest="csv_prefix", type=Path, default=ROOT / "var" / "load" / "load")
    p.add_argument("--every", dest="every_s", type=float, default=10.0, help="seconds between progress lines")
    add_run_arguments(p)
    a = p.parse_args(argv)
    set_env = set_env_of(p, a.set_env)
    try:
        timespan_s(a.run_time)
    except ValueError as exc:
        p.error(str(exc))
    if a.users < 1 or a.linkers < 0 or a.linkers > a.users or a.sessions < 0 or a.workers < 1:
        p.error("wants --users ≥ 1, 0 ≤ --linkers ≤ --users, --sessions ≥ 0, --workers ≥ 1")
    return Options(
        chromium=a.chromium,
        pg=a.pg,
        redis=a.redis,
        users=a.users,
        spawn_rate=a.spawn_rate,
        run_time=a.run_time,
        linkers=a.linkers,
        sessions=a.sessions,
        workers=a.workers,
        warm_pool=a.warm_pool,
        profile=a.profile,
        csv_prefix=a.csv_prefix.resolve(),
        every_s=max(1.0, a.every_s),
        workdir=a.workdir,
        keep_workdir=a.keep_workdir,
        set_env=set_env,
    )


def main(argv: list[str] | None = None) -> None:
    run_main(run, parse_args(argv))


if __name__ == "__main__":
    main()
