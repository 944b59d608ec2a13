"""The gateway's lean HTTP/1.1 client (``gateway/upstream.py``) against real sockets: aiohttp
servers as the workers are, and raw servers for the answers aiohttp would not give."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway import upstream
from gateway.upstream import Broken, NotSent, Refused, Upstream, _parse
from tests.conftest import free_port


async def test_answers_with_length_and_chunked_on_one_kept_connection(aiohttp_server: Any) -> None:
    peers: list[Any] = []

    async def sized(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"path": request.path_qs, "body": (await request.read()).decode()})

    async def chunked(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b"one ", b"two ", b"three"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/sized", sized)
    app.router.add_get("/chunked", chunked)
    server = await aiohttp_server(app)
    client = Upstream(connect_timeout_s=1)
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, headers, body = await client.request(
            base, "POST", "/sized?a=1", {"Content-Type": "application/json"}, b"hello", timeout_s=5
        )
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert body == b'{"path": "/sized?a=1", "body": "hello"}'
        status, headers, body = await client.request(base, "GET", "/chunked", {}, None, timeout_s=5)
        assert (status, body) == (200, b"one two three") and "Transfer-Encoding" not in headers
        status, _, _ = await client.request(base, "GET", "/missing", {}, None, timeout_s=5)
        assert status == 404
    finally:
        client.close()
    assert len(peers) == 2 and peers[0] == peers[1]  # one keep-alive connection for all


async def test_a_closed_port_is_not_sent_and_refused() -> None:
    client = Upstream(connect_timeout_s=1)
    with pytest.raises(Refused) as info:
        await client.request(f"http://127.0.0.1:{free_port()}", "GET", "/", {}, None, timeout_s=1)
    assert isinstance(info.value, NotSent)


HEADS: list[bytes] = []


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """A server that reads one request (its head kept in ``HEADS``) and answers ``reply`` as
    given, then closes."""
    servers: list[asyncio.Server] = []

    async def start(reply: bytes) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            HEADS.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_an_answer_delimited_by_the_close_and_one_cut_short(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    client = Upstream(connect_timeout_s=1)
    base = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
    assert (await client.request(base, "GET", "/", {}, None, timeout_s=2))[2] == b"until the end"
    cut = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    with pytest.raises(Broken):
        await client.request(cut, "GET", "/", {}, None, timeout_s=2)
    nothing = await raw_server(b"")
    with pytest.raises(Broken):  # sent, then closed without an answer: it may have been applied
        await client.request(nothing, "POST", "/", {}, b"{}", timeout_s=2)
    client.close()


async def test_a_silent_worker_times_out(raw_server: Callable[[bytes], Awaitable[str]]) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    client = Upstream(connect_timeout_s=1)
    try:
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(TimeoutError):
            await client.request(base, "GET", "/", {}, None, timeout_s=0.2)
    finally:
        client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_answers_are_broken(raw: bytes) -> None:
    with pytest.raises(Broken):
        _parse(bytearray(raw))


def test_partial_answers_wait() -> None:
    assert _parse(bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc")) is None
    assert _parse(bytearray(b"HTTP/1.1 200 OK\r\nContent-Le")) is None
    done = _parse(bytearray(b"HTTP/1.1 204 No Content\r\n\r\n"))
    assert done is not None and done[0] == 204 and done[2] == b""
    with pytest.raises(Broken):
        _parse(bytearray(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (upstream.MAX_HEAD_BYTES // 6)))


async def test_a_header_with_a_line_break_is_never_sent(
    raw_server: Callable[[bytes], Awaitable[str]],
) -> None:
    client = Upstream(connect_timeout_s=1)
    base = await raw_server(b"HTTP/1.1 204 No Content\r\n\r\n")
    headers = {"X-Fine": "yes", "X-Bad": "no\r\nInjected: 1"}
    assert (await client.request(base, "GET", "/", headers, None, timeout_s=2))[0] == 204
    client.close()
    assert b"X-Fine: yes\r\n" in HEADS[-1] and b"Injected" not in HEADS[-1]


def test_the_client_runs_on_uvloop_as_the_gateway_does() -> None:
    """The gateway runs on uvloop (``shared.aio.run``), whose transports are not asyncio's."""
    import uvloop

    async def main() -> tuple[int, bytes, bytes]:
        async def hello(_: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = Upstream(connect_timeout_s=1)
        try:
            first = await client.request(f"http://127.0.0.1:{port}", "GET", "/", {}, None, timeout_s=5)
            second = await client.request(f"http://127.0.0.1:{port}", "GET", "/", {}, None, timeout_s=5)
            return first[0], first[2], second[2]
        finally:
            client.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == (200, b'{"ok": true}', b'{"ok": true}')
