"""Security hardening (issue 10, items 3, 4, 6 and 9): what a stranger can learn or reach.

Fast: the gateway app in-process against the test's Postgres and Redis, no Chromium.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway import openapi
from gateway.app import create_app
from gateway.auth import is_local_visit
from gateway.keys import HEALTH, MEMBERSHIP
from shared import db, devrun, resources
from shared.errors import (
    InvalidSessionId,
    InvalidWorkspaceId,
    SchemaNotCurrent,
    SessionIdOutsideWorkspace,
    SettingsError,
)
from shared.heartbeats import MAX_SKEW_MS, HeartbeatAuth, heartbeat_alive, scan_heartbeats
from shared.ids import (
    CHOSEN_SESSION_ID_RE,
    SESSION_ID_RE,
    check_chosen_session_id,
    check_new_session_id,
    check_session_id,
    check_workspace_id,
    namespace_of,
    new_session_id,
)
from shared.loopback import host_of_header, is_loopback_host, is_loopback_url
from shared.private_files import make_private_dirs, write_private_file
from shared.redis_keys import Keys
from shared.settings import Settings
from shared.store import Store
from tests.conftest import CHROMIUM, REDIS_URL, AiohttpClient, AiohttpServer, WorkerFactory
from worker import chromium
from worker.app import create_app as create_worker_app
from worker.membership import Heartbeat

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
        # nor the cluster's health, open to a local visit in development
        cluster = await gateway.get("/health/cluster", headers=headers)
        assert cluster.status == 401, headers
    assert (await gateway.get("/health/cluster", headers={"Host": f"localhost:{port}"})).status == 200


# ------------------------------------------------------------------------ item 4: workers and heartbeats
def test_a_worker_on_a_non_loopback_address_refuses_to_start_without_an_internal_token() -> None:
    for host in ("0.0.0.0", "", "::", "192.0.2.2", "walink-worker-0.walink-workers"):
        with pytest.raises(SettingsError, match="WALINK_INTERNAL_TOKEN"):
            create_worker_app(Settings(host=host))
    create_worker_app(Settings(host="0.0.0.0", internal_token="t0ken"))  # with a token: fine
    create_worker_app(Settings(host="127.0.0.1"))  # loopback development: fine
    create_worker_app(Settings(host="::1"))


def test_heartbeats_are_believed_only_when_signed_with_the_internal_token() -> None:
    clock = [1_000_000]
    auth = HeartbeatAuth("t0ken", clock=lambda: clock[0])
    beat = {"name": "w0", "url": "http://10.0.0.5:3001", "pid": 7, "draining": False}
    signed = auth.sign(beat)
    assert signed["signed_at_ms"] == clock[0] and isinstance(signed["sig"], str)
    assert "t0ken" not in orjson.dumps(signed).decode()
    assert auth.refusal("w0", signed) is None
    assert auth.refusal("w0", beat) == "unsigned"
    assert auth.refusal("w0", {**signed, "url": "http://evil.example:80"}) == "bad_signature"
    assert auth.refusal("w1", signed) == "bad_name"  # a copy under another worker's key
    assert HeartbeatAuth("other-token", clock=lambda: clock[0]).refusal("w0", signed) == "bad_signature"
    clock[0] += MAX_SKEW_MS + 1
    assert auth.refusal("w0", signed) == "stale"  # an old beat replayed
    # no token (one machine, development): unsigned beats, believed for loopback URLs only
    open_auth = HeartbeatAuth("")
    assert open_auth.sign(beat) == beat
    assert open_auth.refusal("w0", {**beat, "url": "http://127.0.0.1:3001"}) is None
    assert open_auth.refusal("127.0.0.1:3001", {"name": "127.0.0.1:3001"}) is None
    assert open_auth.refusal("w0", beat) == "not_loopback"
    assert open_auth.refusal("10.0.0.5:3001", {"name": "10.0.0.5:3001"}) == "not_loopback"


async def test_the_worker_signs_its_heartbeat(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    heartbeat = Heartbeat(
        redis_client,
        keys,
        name="w0",
        url="http://10.0.0.5:3001",
        ttl_ms=5000,
        timeout_s=1.0,
        auth=HeartbeatAuth("t0ken"),
    )
    assert await heartbeat.beat()
    assert await scan_heartbeats(redis_client, keys, HeartbeatAuth("t0ken")) == {
        "w0": orjson.loads(heartbeat.payload()) | {"signed_at_ms": mock.ANY, "sig": mock.ANY}
    }
    assert await heartbeat_alive(redis_client, keys, HeartbeatAuth("t0ken"), "w0")
    assert await scan_heartbeats(redis_client, keys, HeartbeatAuth("wrong")) == {}
    assert not await heartbeat_alive(redis_client, keys, HeartbeatAuth("wrong"), "w0")


async def test_the_gateway_ignores_forged_heartbeats_and_never_sends_them_its_token(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A heartbeat written by anyone who can write to Redis must not steer the gateway's token."""
    seen: list[tuple[str, str | None]] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Authorization")))
        if request.path == "/health":
            return web.json_response({"status": "healthy", "sessions": {}, "queue": {}})
        return web.json_response({"id": "s_x", "status": "starting"}, status=201)

    trap = web.Application()
    trap.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(trap)
    trap_url = str(server.make_url("")).rstrip("/")
    keys = Keys(redis_prefix)
    forged = {"name": "evil", "url": trap_url, "pid": 1, "started_at_ms": 0, "draining": False}
    await redis_client.set(keys.worker("evil"), orjson.dumps(forged), px=60_000)
    wrong_key = HeartbeatAuth("not-the-token").sign({**forged, "name": "evil2"})
    await redis_client.set(keys.worker("evil2"), orjson.dumps(wrong_key), px=60_000)

    store = Store(pg_pool)
    await store.ensure_workspace("ws_a")
    api_key = await store.create_api_key("ws_a")
    app = create_app(gateway_settings(pg_dsn, redis_prefix, internal_token="t0ken"))
    with caplog.at_level(logging.WARNING, logger="walink.heartbeats"):
        gateway = await aiohttp_client(app)
        checker = app[HEALTH]
        await checker.round()
        await checker.round()
    assert app[MEMBERSHIP].all() == []
    resp = await gateway.post("/v1/sessions", json={}, headers={"X-API-Key": api_key})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_worker_available"
    assert seen == []  # not probed, not proxied to: the token never left
    refusals = [r.getMessage() for r in caplog.records if "ignoring the heartbeat" in r.getMessage()]
    assert len(refusals) == 2, refusals  # once per worker and reason, not once per round
    assert any("'evil' (unsigned)" in m for m in refusals) and any(
        "'evil2' (bad_signature)" in m for m in refusals
    )

    # the same worker, signed with the token: believed, and then it gets the token
    await redis_client.set(keys.worker("evil"), orjson.dumps(HeartbeatAuth("t0ken").sign(forged)), px=60_000)
    await checker.round()
    assert [w.name for w in app[MEMBERSHIP].all()] == ["evil"]
    resp = await gateway.post("/v1/sessions", json={}, headers={"X-API-Key": api_key})
    assert resp.status == 201
    assert ("/v1/sessions", "Bearer t0ken") in seen


# ------------------------------------------------------------------------ item 9: modes, sandbox
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dirs_are_0700_from_their_mkdir_even_with_an_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dirs(tmp_path / "var" / "worker-3001" / "profiles" / "p_1")
        (tmp_path / "old").mkdir(mode=0o755)  # made by an older walink: narrowed when used
        make_private_dirs(tmp_path / "old")
    finally:
        os.umask(old)
    for path in ("var", "var/worker-3001", "var/worker-3001/profiles", "var/worker-3001/profiles/p_1", "old"):
        assert _mode(tmp_path / path) == 0o700, path


def test_private_files_are_created_0600_and_never_chmod_ed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "dev.env"
    target.write_text("old")
    target.chmod(0o644)
    opened: list[tuple[int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        opened.append((flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def no_chmod(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a secret file must be created with its mode, not chmod-ed after")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)
    try:
        write_private_file(target, b"KEY=1\n")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"KEY=1\n" and _mode(target) == 0o600
    assert opened and all(
        flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600 for flags, mode in opened
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.env"]  # no temporary file left


def test_the_dev_stack_secrets_are_private_from_the_first_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_chmod(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("chmod after writing leaves the secrets readable meanwhile")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    values = devrun.dev_env()
    assert set(values) >= {"WALINK_SNAPSHOT_KEY", "WALINK_DEV_API_KEY", "WALINK_INTERNAL_TOKEN"}
    assert _mode(tmp_path / "var") == 0o700 and _mode(tmp_path / "var" / "dev.env") == 0o600
    assert devrun.dev_env() == values  # made once, kept


def test_chromium_is_sandboxed_unless_root_or_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert not chromium.sandboxed() and "--no-sandbox" in chromium.launch_args(sandbox=chromium.sandboxed())
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    assert chromium.sandboxed() and "--no-sandbox" not in chromium.launch_args(sandbox=True)
    assert not chromium.sandboxed(Settings(chromium_sandbox=False).chromium_sandbox)
    assert Settings.from_env({"WALINK_CHROMIUM_SANDBOX": "false"}).chromium_sandbox is False


# ------------------------------------------------------------------------ item 6: session id namespaces
def test_chosen_session_ids_live_in_their_workspace_namespace() -> None:
    assert check_chosen_session_id("ws_a.acct-1", "ws_a") == "ws_a.acct-1"
    for chosen, workspace in [("ws_a.x", "ws_b"), ("x-1", "ws_a"), ("ws_ab.x", "ws_a"), ("ws.a.x", "ws")]:
        with pytest.raises(InvalidSessionId) as raised:
            check_chosen_session_id(chosen, workspace)
        assert raised.value.status == 400
        if SESSION_ID_RE.fullmatch(chosen):
            assert raised.value.code == "session_id_outside_workspace"
            assert f"'{workspace}.'" in raised.value.message  # the exact prefix to use
    with pytest.raises(SessionIdOutsideWorkspace, match="cannot choose session ids"):
        check_chosen_session_id("x.y", "Old Workspace")  # made before workspace ids were checked
    # the worker takes the gateway's generated ids, or chosen ones in the namespace
    generated = new_session_id()
    assert check_new_session_id(generated, "ws_a") == generated
    assert check_new_session_id("ws_a.x", "ws_a") == "ws_a.x"
    with pytest.raises(SessionIdOutsideWorkspace):
        check_new_session_id("ws_b.x", "ws_a")
    # workspace ids never hold the separator, so namespaces never overlap
    assert check_workspace_id("ws_a") == "ws_a"
    for bad in ("a.b", "", "A", "x" * 65, "-a", None):
        with pytest.raises(InvalidWorkspaceId):
            check_workspace_id(bad)
    # older, un-namespaced ids stay addressable; the OpenAPI document uses the same patterns
    assert check_session_id("shop-42") == "shop-42" and namespace_of("shop-42") is None
    assert namespace_of("ws_a.x") == "ws_a"
    document = openapi.document()
    path_param = document["paths"]["/v1/sessions/{session_id}"]["get"]["parameters"][0]
    assert path_param["schema"]["pattern"] == SESSION_ID_RE.pattern
    create = document["components"]["schemas"]["CreateSession"]["properties"]["id"]
    assert create["pattern"] == CHOSEN_SESSION_ID_RE.pattern


async def test_new_workspaces_get_ids_that_can_prefix_session_ids(pg_pool: asyncpg.Pool) -> None:
    store = Store(pg_pool)
    with pytest.raises(InvalidWorkspaceId):
        await store.ensure_workspace("acme.corp")
    assert await store.get_workspace("acme.corp") is None
    await pg_pool.execute(
        "INSERT INTO workspaces (id, name, webhook_secret) VALUES ('Legacy WS', 'Legacy WS', 'whsec_x')"
    )
    assert (await store.ensure_workspace("Legacy WS")).id == "Legacy WS"  # an old one stays usable


async def test_a_tenant_cannot_create_in_or_probe_another_tenants_namespace(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> None:
    """Through the gateway: B creating ``ws_a.x`` gets a 400 (not A's 409), and B's 404 for A's id
    is the very answer for an id nobody has; no worker is even asked."""
    calls: list[tuple[str, str, str | None]] = []
    sessions: dict[str, str] = {}  # the fake worker's sessions: id -> workspace

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "sessions": {}, "queue": {}})

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(("POST", body["id"], request.headers.get("X-Walink-Workspace")))
        if body["id"] in sessions:
            return web.json_response({"error": {"code": "session_exists", "message": "taken"}}, status=409)
        sessions[body["id"]] = body["workspace_id"]
        return web.json_response({"id": body["id"], "status": "starting"}, status=201)

    async def get(request: web.Request) -> web.Response:
        sid, ws = request.match_info["sid"], request.headers.get("X-Walink-Workspace")
        calls.append(("GET", sid, ws))
        if sessions.get(sid) != ws:
            return web.json_response(
                {"error": {"code": "session_not_found", "message": f"no session {sid}"}}, status=404
            )
        return web.json_response({"id": sid, "workspace_id": ws})

    fake = web.Application()
    fake.router.add_get("/health", health)
    fake.router.add_post("/v1/sessions", create)
    fake.router.add_get("/v1/sessions/{sid}", get)
    server = await aiohttp_server(fake)
    store = Store(pg_pool)
    for ws in ("ws_a", "ws_b"):
        await store.ensure_workspace(ws)
    a = {"X-API-Key": await store.create_api_key("ws_a")}
    b = {"X-API-Key": await store.create_api_key("ws_b")}
    admin = {"X-API-Key": await store.create_api_key(None, admin=True)}
    settings = gateway_settings(pg_dsn, redis_prefix, workers=f"127.0.0.1:{server.port}")
    gateway = await aiohttp_client(create_app(settings))

    assert (await gateway.post("/v1/sessions", json={"id": "ws_a.x"}, headers=a)).status == 201
    assert (await gateway.post("/v1/sessions", json={"id": "ws_b.x"}, headers=b)).status == 201  # B's own x
    calls.clear()
    taken = await gateway.post("/v1/sessions", json={"id": "ws_a.x"}, headers=b)
    error = (await taken.json())["error"]
    assert (taken.status, error["code"]) == (400, "session_id_outside_workspace"), error
    assert "'ws_b.'" in error["message"] and "ws_a" not in error["message"]
    plain = await gateway.post("/v1/sessions", json={"id": "acct-1"}, headers=b)
    assert (plain.status, (await plain.json())["error"]["code"]) == (400, "session_id_outside_workspace")
    assert calls == []  # refused before anything happened

    async def answer(path: str, headers: dict[str, str], method: str = "GET") -> tuple[int, Any, set[str]]:
        resp = await gateway.request(method, path, headers=headers)
        body = await resp.read()
        return resp.status, body, {h for h in resp.headers if h.lower().startswith("x-walink")}

    for method, suffix in [
        ("GET", ""),
        ("GET", "/qr"),
        ("GET", "/events"),
        ("DELETE", ""),
        ("POST", "/restart"),
    ]:
        known = await answer(f"/v1/sessions/ws_a.x{suffix}", b, method)
        unknown = await answer(f"/v1/sessions/ws_a.nobody{suffix}", b, method)
        assert known[0] == unknown[0] == 404, (method, suffix, known)
        assert known[1].replace(b"ws_a.x", b"ID") == unknown[1].replace(b"ws_a.nobody", b"ID")
        assert known[2] == unknown[2] == set()
    assert calls == []  # another namespace: the gateway answers itself, no worker asked

    # ids outside any namespace (generated, or older): the worker's 404, without saying who answered
    sessions["legacy-1"] = "ws_a"
    known = await answer("/v1/sessions/legacy-1", b)
    unknown = await answer("/v1/sessions/legacy-2", b)
    assert known[0] == unknown[0] == 404 and known[2] == unknown[2] == set()
    # A and the admin still see A's session
    assert (await gateway.get("/v1/sessions/ws_a.x", headers=a)).status == 200
    assert (await gateway.get("/v1/sessions/ws_a.x?workspace_id=ws_a", headers=admin)).status == 200
    assert (await gateway.get("/v1/sessions/ws_b.x", headers=b)).status == 200


@pytest.mark.chromium
@pytest.mark.timeout(300)
async def test_two_workspaces_each_have_their_own_x_on_a_real_worker(start_worker: WorkerFactory) -> None:
    client = await start_worker()
    ws_a, ws_b = {"X-Walink-Workspace": "ws_a"}, {"X-Walink-Workspace": "ws_b"}
    created = []
    for headers, sid in ((ws_a, "ws_a.x"), (ws_b, "ws_b.x")):
        resp = await client.post("/v1/sessions", json={"id": sid}, headers=headers)
        assert resp.status == 201, await resp.text()
        created.append(sid)
    resp = await client.post("/v1/sessions", json={"id": "ws_a.x"}, headers=ws_b)
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "session_id_outside_workspace")
    again = await client.post("/v1/sessions", json={"id": "ws_a.x"}, headers=ws_a)
    assert (again.status, (await again.json())["error"]["code"]) == (409, "session_exists")  # A's own
    known = await client.get("/v1/sessions/ws_a.x", headers=ws_b)
    unknown = await client.get("/v1/sessions/ws_a.nobody", headers=ws_b)
    assert known.status == unknown.status == 404
    assert (await known.json())["error"]["code"] == (await unknown.json())["error"]["code"]
    for headers, sid in ((ws_a, "ws_a.x"), (ws_b, "ws_b.x")):
        assert (await client.get(f"/v1/sessions/{sid}", headers=headers)).status == 200
        assert (await client.delete(f"/v1/sessions/{sid}", headers=headers)).status == 204


async def test_a_role_with_data_rights_only_runs_the_gateway_store_and_cannot_change_the_schema(
    pg_pool: asyncpg.Pool, pg_dsn: str
) -> None:
    """The manifests' gateway role: `walink migrate --grant` gives it rows, never DDL."""
    role = f"walink_test_dml_{os.getpid()}_{os.urandom(3).hex()}"
    role_dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)
    assert role_dsn != pg_dsn
    empty_db = f"walink_test_empty_{os.getpid()}_{os.urandom(3).hex()}"
    await pg_pool.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        async with pg_pool.acquire() as conn:
            await db.grant_data_access(conn, role)
        with pytest.raises(ValueError, match="role name"):
            async with pg_pool.acquire() as conn:
                await db.grant_data_access(conn, 'x"; DROP TABLE api_keys; --')

        settings = Settings(database_url=role_dsn, migrate_on_start=False)
        async with resources.open_pool(settings, max_size=2) as pool:
            store = Store(pool)
            await store.ensure_workspace("ws_dml")
            key = await store.create_api_key("ws_dml")
            assert await store.key_scope(key) == ("ws_dml", False)
            for ddl in (
                "CREATE TABLE intruder (x int)",
                "DROP TABLE api_keys",
                "ALTER TABLE api_keys ADD c int",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await pool.execute(ddl)
        # today's start-up (migrate at start) needs DDL rights: the role cannot do it
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with resources.open_pool(settings.replace(migrate_on_start=True), max_size=2):
                pass

        # a process that may not migrate refuses a database that is behind, saying what to run
        await pg_pool.execute(f'CREATE DATABASE "{empty_db}"')
        behind = pg_dsn.rsplit("/", 1)[0] + "/" + empty_db
        with pytest.raises(SchemaNotCurrent, match="walink migrate"):
            async with resources.open_pool(Settings(database_url=behind, migrate_on_start=False), max_size=1):
                pass
    finally:
        await pg_pool.execute(f'DROP DATABASE IF EXISTS "{empty_db}" WITH (FORCE)')
        await pg_pool.execute(f'DROP OWNED BY "{role}"')
        await pg_pool.execute(f'DROP ROLE "{role}"')


def test_a_sandbox_failure_says_how_to_fix_it() -> None:
    message = "[FATAL:zygote_host_impl_linux.cc(127)] No usable sandbox! ..."
    assert "WALINK_CHROMIUM_SANDBOX=false" in chromium.sandbox_hint(message)
    assert chromium.sandbox_hint("Timeout 45000ms exceeded") == ""


@pytest.mark.chromium
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become another user"
)
def test_chromium_starts_sandboxed_as_a_non_root_user() -> None:
    """What a non-root worker launches: walink's flags without --no-sandbox, as uid 65534."""
    with tempfile.TemporaryDirectory(prefix="walink-sandbox-") as where:  # pytest's tmp is root's 0700
        home = Path(where)
        os.chown(home, 65534, 65534)
        _run_chromium_as_nobody(home)


def _run_chromium_as_nobody(home: Path) -> None:
    args = chromium.launch_args(sandbox=True)
    assert "--no-sandbox" not in args
    done = subprocess.run(
        [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "env", f"HOME={home}",
            str(CHROMIUM), "--headless", f"--user-data-dir={home / 'profile'}", *args,
            "--dump-dom", "data:text/html,<p>sandboxed</p>",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "<p>sandboxed</p>" in done.stdout, done.stderr[-2000:]
    assert "No usable sandbox" not in done.stderr
