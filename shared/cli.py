"""``walink`` command line: run a worker, the gateway or the simulator; migrate; make API keys; rekey."""

from __future__ import annotations

import argparse
import asyncio
import sys


async def _migrate(grant: list[str]) -> None:
    import asyncpg

    from shared import db
    from shared.settings import Settings

    settings = Settings.from_env()
    await db.ensure_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_timeout_s)
    try:
        applied = await db.migrate(conn)
        for role in grant:
            await db.grant_data_access(conn, role)
    finally:
        await conn.close()
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"), file=sys.stderr)
    if grant:
        print(f"granted {db.DATA_PRIVILEGES} (no DDL) to: {', '.join(grant)}", file=sys.stderr)


async def _api_key(workspace: str, admin: bool) -> str:
    from shared import resources
    from shared.settings import Settings
    from shared.store import Store

    settings = Settings.from_env()
    async with resources.open_pool(settings, max_size=2) as pool:
        store = Store(pool)
        await store.ensure_workspace(workspace)
        return await store.create_api_key(None if admin else workspace, admin=admin)


async def _rekey(batch_size: int) -> bool:
    from shared import resources
    from shared.errors import SettingsError
    from shared.settings import Settings
    from worker.rekey import rekey
    from worker.snapshot import SnapshotKeys

    settings = Settings.from_env()
    keys = SnapshotKeys.from_settings(settings.snapshot_key, settings.snapshot_keys)
    if keys is None:
        raise SettingsError(
            "walink rekey needs WALINK_SNAPSHOT_KEYS (the new key first) or WALINK_SNAPSHOT_KEY"
        )
    print(f"rekey: sealing with key {keys.ids[0]}; opening with {', '.join(keys.ids)}", file=sys.stderr)
    async with resources.open_pool(settings, max_size=2) as pool:
        report = await rekey(
            pool,
            keys,
            batch_size=batch_size,
            timeout_s=settings.db_timeout_s,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    print(report.summary(), file=sys.stderr)
    return report.ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walink", description="walink: link WhatsApp accounts by QR code")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a worker (settings from WALINK_* variables)")
    sub.add_parser("gateway", help="run the gateway")
    sub.add_parser("run", help="start the whole cluster under supervisord (what `make run` does)")
    migrate = sub.add_parser("migrate", help="create the database if needed and apply the migrations")
    migrate.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="ROLE",
        help="then give ROLE row rights (select/insert/update/delete) on every table, no DDL; repeatable",
    )
    keys = sub.add_parser("api-key", help="create an API key (printed once; only its hash is stored)")
    keys.add_argument("--workspace", default="default", help="workspace id (created if missing)")
    keys.add_argument("--admin", action="store_true", help="an admin key (all workspaces, cluster routes)")
    rekey = sub.add_parser(
        "rekey",
        help="seal every stored snapshot again with the first of WALINK_SNAPSHOT_KEYS (safe beside live "
        "workers; exit 1 while some are still on another key)",
    )
    rekey.add_argument("--batch-size", type=int, default=50, help="snapshots per batch (default 50)")
    sim = sub.add_parser("simulator", help="run the WhatsApp Web simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=3100)
    sim.add_argument("--profile", default="instant")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from worker.app import main as worker_main

        worker_main()
    elif args.command == "gateway":
        from gateway.app import main as gateway_main

        gateway_main()
    elif args.command == "run":
        from shared.devrun import run

        run()
    elif args.command == "migrate":
        asyncio.run(_migrate(args.grant))
    elif args.command == "api-key":
        print(asyncio.run(_api_key(args.workspace, args.admin)))
    elif args.command == "rekey":
        if args.batch_size < 1:
            parser.error("--batch-size must be at least 1")
        return 0 if asyncio.run(_rekey(args.batch_size)) else 1
    elif args.command == "simulator":
        from simulator.__main__ import main as sim_main

        sim_main(["--host", args.host, "--port", str(args.port), "--profile", args.profile])
    return 0


if __name__ == "__main__":
    sys.exit(main())
