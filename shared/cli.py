"""``walink`` command line: run a worker or the simulator."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="walink", description="walink: link WhatsApp accounts by QR code")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a worker (settings from WALINK_* variables)")
    sim = sub.add_parser("simulator", help="run the WhatsApp Web simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=3100)
    sim.add_argument("--profile", default="instant")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from worker.app import main as worker_main

        worker_main()
    elif args.command == "simulator":
        from simulator.__main__ import main as sim_main

        sim_main(["--host", args.host, "--port", str(args.port), "--profile", args.profile])
    return 0


if __name__ == "__main__":
    sys.exit(main())
