"""Security hardening (issue 10, items 3, 4, 6 and 9): what a stranger can learn or reach.

Fast: the gateway app in-process against the test's Postgres and Redis, no Chromium.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import asyncpg
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.app import create_app
from gateway.pages import is_local_visit
from shared.loopback import host_of_header, is_loopback_host, is_loopback_url
from shared.settings import Settings
from tests.conftest import REDIS_URL, AiohttpClient

DEV_KEY = "wlk_dev_test-key"


def gateway_settings(pg_dsn: str, redis_prefix: str, **overrides: Any) -> Settings:
    base = Settings(
        workers="",
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        health_interval_s=0.2,
    )
    return base.replace(**overrides)


# ------------------------------------------------------------------------ item 3: the dev key
def test_loopback_means_literal_loopback_addresses_and_localhost() -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "LOCALHOST", "::ffff:127.0.0.1"):
        assert is_loopback_host(host), host
    assert not is_loopback_host(None)
    for other in (
        "",
        "0.0.0.0",
        "::",
        "192.0.2.2",
        "10.0.0.1",
        "169.254.169.254",
        "example.com",
        "localhost.example.com",
        "127.0.0.1.nip.io",
        "::ffff:10.0.0.1",
        "fd00::2",
    ):
        assert not is_loopback_host(other), other
    assert [host_of_header(h) for h in ("localhost:8080", "127.0.0.1", "[::1]:8080", "[::1]", "a.b")] == [
        "localhost",
        "127.0.0.1",
        "::1",
        "::1",
        "a.b",
    ]
    assert host_of_header("::1") is None and host_of_header("[::1]x") is None and host_of_header("") is None
    assert is_loopback_url("http://127.0.0.1:3001") and is_loopback_url("http://[::1]:3001/x")
    assert not is_loopback_url("http://10.1.2.3:3001") and not is_loopback_url("http://[::1")


def _request(host: str | None, peer: str, **headers: str) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    sent = {**({"Host": host} if host is not None else {}), **headers}
    return make_mocked_request("GET", "/", headers=sent, transport=transport)


def test_only_a_loopback_peer_naming_a_loopback_host_without_a_proxy_is_a_local_visit() -> None:
    assert is_local_visit(_request("127.0.0.1:8080", "127.0.0.1"))
    assert is_local_visit(_request("localhost:8080", "::1"))
    assert is_local_visit(_request("[::1]:8080", "127.0.0.1"))
    assert not is_local_visit(_request("127.0.0.1:8080", "192.0.2.7"))  # a remote client
    assert not is_local_visit(_request("walink.example.com", "127.0.0.1"))  # a rebound name
    assert not is_local_visit(_request("192.0.2.2:8080", "127.0.0.1"))
    assert not is_local_visit(_request(None, "127.0.0.1"))
    for proxy_header in ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host"):
        assert not is_local_visit(_request("127.0.0.1:8080", "127.0.0.1", **{proxy_header: "127.0.0.1"}))


async def test_the_dashboard_gives_the_dev_key_only_to_a_local_visit(
    aiohttp_client: AiohttpClient, pg_pool: asyncpg.Pool, pg_dsn: str, redis_prefix: str
) -> None:
    gateway = await aiohttp_client(create_app(gateway_settings(pg_dsn, redis_prefix, dev_api_key=DEV_KEY)))
    port = gateway.server.port
    local = await gateway.get("/", headers={"Host": f"127.0.0.1:{port}"})
    assert local.status == 200 and f'"dev_api_key":"{DEV_KEY}"' in await local.text()
    assert local.headers["Cache-Control"] == "no-store"
    for headers in (
        {"Host": "walink.example.com"},
        {"Host": f"192.0.2.2:{port}"},
        {"Host": f"localhost:{port}", "X-Forwarded-For": "203.0.113.9"},
        {"Host": f"localhost:{port}", "Forwarded": "for=203.0.113.9"},
    ):
        resp = await gateway.get("/", headers=headers)
        page = await resp.text()
        assert resp.status == 200 and DEV_KEY not in page, headers
        assert '"dev_api_key":null' in page, headers
