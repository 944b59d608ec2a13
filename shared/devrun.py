"""``walink run``: what `make run` does on a bare machine before supervisord takes over.

- Redis and Postgres: used as configured (``WALINK_REDIS_URL`` / ``WALINK_DATABASE_URL``) or on
  the default ports; when nothing answers there, a local Redis and Postgres are started from data
  directories under ``var/`` (Debian's binaries), so a fresh machine just works.
- Development secrets (the snapshot key, an API key for the default workspace, the internal token)
  are made once and kept in ``var/dev.env`` (``var/`` 0700, the file created 0600 before anything
  is written to it); they are never printed except the API key, which the dashboard needs.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from shared.private_files import make_private_dirs, write_private_file

VAR = Path("var")
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait_port(host: str, port: int, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(host, port):
            return
        time.sleep(0.2)  # a process we just started: nothing to await but its port
    raise SystemExit(f"{what} did not start on {host}:{port}; see {VAR / 'log'}")


def _to_start(url: str, default_port: int, what: str, variable: str) -> tuple[str, int] | None:
    """``(host, port)`` of a local service to start, or None when one answers already there.

    Nothing is started for a configured (``variable``) or remote address that does not answer."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    if _answers(host, port):
        return None
    if variable in os.environ or host not in {"127.0.0.1", "localhost"}:
        raise SystemExit(f"{what} does not answer at {host}:{port} ({variable})")
    return host, port


def ensure_redis(url: str) -> None:
    target = _to_start(url, 6379, "Redis", "WALINK_REDIS_URL")
    if target is None:
        return
    host, port = target
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no Redis on 127.0.0.1:6379 and no redis-server: apt-get install -y redis-server")
    data = VAR / "redis"
    make_private_dirs(data)
    print(f"walink: starting a local Redis on {port} (data in {data})", file=sys.stderr)
    subprocess.Popen(  # noqa: S603 - fixed argv
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data.resolve()),
            "--daemonize",
            "yes",
            "--logfile",
            str((VAR / "log" / "redis.log").resolve()),
        ],
    ).wait()
    _wait_port(host, port, "Redis")


def ensure_postgres(url: str) -> None:
    target = _to_start(url, 5432, "Postgres", "WALINK_DATABASE_URL")
    if target is None:
        return
    host, port = target
    if not PG_BIN_DIRS:
        raise SystemExit("no Postgres on 127.0.0.1:5432 and none installed: apt-get install -y postgresql")
    bin_dir = PG_BIN_DIRS[0]
    data = (VAR / "postgres").resolve()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if not (data / "PG_VERSION").exists():
        make_private_dirs(data)
        if as_postgres:
            shutil.chown(data, "postgres", "postgres")
        print(f"walink: creating a local Postgres cluster in {data}", file=sys.stderr)
        subprocess.run(  # noqa: S603
            [*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    print(f"walink: starting the local Postgres on {port}", file=sys.stderr)
    log_file = (VAR / "log" / "postgres.log").resolve()
    if as_postgres:
        log_file.touch()
        shutil.chown(log_file, "postgres", "postgres")
    subprocess.run(  # noqa: S603
        [
            *as_postgres,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log_file),
            "-o",
            f"-p {port} -k /tmp -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _wait_port(host, port, "Postgres")


def dev_env() -> dict[str, str]:
    """Secrets for a development cluster, made once and kept in var/dev.env."""
    make_private_dirs(VAR)
    path = VAR / "dev.env"
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key and value:
                values[key] = value
    values.setdefault("WALINK_SNAPSHOT_KEY", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    values.setdefault("WALINK_DEV_API_KEY", "wlk_dev_" + secrets.token_urlsafe(24))
    values.setdefault("WALINK_INTERNAL_TOKEN", secrets.token_urlsafe(24))
    write_private_file(path, "".join(f"{k}={v}\n" for k, v in values.items()).encode())
    return values


def _pools_warm(workers: list[str]) -> tuple[int, int] | None:
    """``(warm browsers, their target)`` over every worker, or None while one does not answer."""
    import json
    import urllib.request

    ready = target = 0
    for entry in workers:
        url = (entry if entry.startswith("http") else f"http://{entry}").rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own workers
                pool = json.loads(resp.read()).get("pool") or {}
        except (OSError, ValueError):
            return None
        ready += int(pool.get("ready") or 0)
        target += int(pool.get("target") or 0)
    return ready, target


def announce_when_up(workers: list[str], gateway_port: int, *, timeout_s: float = 180.0) -> None:
    """Say that walink is up once the gateway answers and every worker's warm pool is full (an
    "add account" then gets its QR from a warm browser at once), or that it is not, in time."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        warm = _pools_warm(workers) if _answers("127.0.0.1", gateway_port) else None
        if warm is not None and warm[0] >= warm[1]:
            print(
                f"walink: up in {time.monotonic() - started:.1f}s ◆ {len(workers)} workers, "
                f"{warm[0]} warm browser(s) showing a QR",
                file=sys.stderr,
            )
            return
        time.sleep(0.25)  # other processes' start-up: nothing to await but their answers
    print(f"walink: not up after {timeout_s:.0f}s; see {VAR / 'log'}", file=sys.stderr)


def run() -> None:
    make_private_dirs(VAR / "log")
    from shared.settings import Settings

    settings = Settings.from_env()
    ensure_redis(settings.redis_url)
    ensure_postgres(settings.database_url)
    env = dict(os.environ)
    for key, value in dev_env().items():
        if key == "WALINK_SNAPSHOT_KEY" and env.get("WALINK_SNAPSHOT_KEYS"):
            continue  # the operator gave the keys (a rotation): one or the other, never both
        env.setdefault(key, value)
    # the dev cluster's webhook receivers are on this machine: loopback admitted, explicitly
    env.setdefault("WALINK_WEBHOOK_ALLOW", "127.0.0.0/8,::1")
    env.setdefault("SIMULATOR_AUTOSTART", "true" if settings.target == "simulator" else "false")
    print(
        "walink: dashboard http://127.0.0.1:8080/  ·  API key "
        f"{env['WALINK_DEV_API_KEY']}  ·  simulator http://127.0.0.1:3100/  ·  Ctrl-C stops",
        file=sys.stderr,
    )
    if os.fork() == 0:  # the announcer: prints "up" when it is, then goes
        try:
            announce_when_up([w for w in settings.workers.split(",") if w.strip()], settings.gateway_port)
        finally:
            os._exit(0)
    supervisord = str(Path(sys.executable).with_name("supervisord"))
    os.execve(supervisord, [supervisord, "-c", "supervisord.conf", "-n"], env)  # noqa: S606
