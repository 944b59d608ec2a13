"""``python -m simulator [--host 127.0.0.1] [--port 3100] [--profile strict|instant|realistic]``."""

from __future__ import annotations

import argparse
import logging

from aiohttp import web

from simulator.app import create_app
from simulator.profiles import DEFAULT_PROFILE, PROFILES

log = logging.getLogger("simulator")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulator",
        description="Local stand-in for WhatsApp Web's linking flow and for the user's phone.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("simulator listening on http://%s:%d (profile %s)", args.host, args.port, args.profile)
    web.run_app(
        create_app(args.profile),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
